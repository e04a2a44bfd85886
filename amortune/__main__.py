"""``python -m amortune``: the same command as ``amortune`` (see ``amortune.cli``)."""

from amortune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
