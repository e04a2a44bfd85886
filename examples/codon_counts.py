"""ETL aggregation that never holds more than running counts (the batched codon count).

Counts codons over 32,000 random DNA sequences in batches; each batch is reduced to one Counter
and merged into the running total. With ``checkpoint=``, a crashed run resumes after the last
finished batch: run it, press Ctrl-C half way, run it again.
"""

from __future__ import annotations

import operator
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path

import amortune


def sequences(n: int, seed: int = 7):
    """A generator: the input is streamed, never materialized."""
    rng = random.Random(seed)
    for _ in range(n):
        yield "".join(rng.choice("ACGT") for _ in range(rng.randint(300, 900)))


def count_codons(seq: str) -> Counter[str]:
    return Counter(seq[i:i + 3] for i in range(0, len(seq) - 2, 3))


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 32_000
    ckpt = Path(tempfile.gettempdir()) / "amortune-codon-example.ckpt"
    total = amortune.process_in_batches(
        count_codons, sequences(n), batch_size=5_000, reduce=operator.add,
        checkpoint=ckpt, verbose=True)
    print(f"{len(total)} distinct codons, {sum(total.values()):,} codons; most common:",
          total.most_common(3))
    print(f"checkpoint kept at {ckpt} (delete it to start over)")
