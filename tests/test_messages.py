"""The message channel between the manager and its workers: framing, buffering, broken pipes.

Real pipes and a real ``multiprocessing`` connection; a writer thread where a message is larger
than a pipe holds.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amortune._prefork import PipeConnection
from amortune._worker import MessageReader, frame_header, write_all


def _pipe() -> tuple[MessageReader, int]:
    r, w = os.pipe()
    return MessageReader(PipeConnection(r, -1)), w


def _framed(body: bytes) -> list[bytes]:
    return [frame_header(len(body)), body]


def _readable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def test_messages_that_arrived_together_are_read_in_one_go_and_kept_in_order():
    reader, w = _pipe()
    bodies = [b"", b"a", b"bc" * 100, bytes(range(256))]
    write_all(w, [b for body in bodies for b in _framed(body)])
    assert reader.has_message()
    assert reader.recv_bytes() == b""
    assert not _readable(reader._fd)  # type: ignore[arg-type]  # all of them in the buffer now
    assert reader.has_message()
    assert [reader.recv_bytes() for _ in bodies[1:]] == bodies[1:]
    assert not reader.has_message()
    os.close(w)
    assert reader.has_message()  # the end of the pipe is news too
    with pytest.raises(EOFError):
        reader.recv_bytes()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 300_000), min_size=1, max_size=12))
def test_any_sizes_round_trip_through_a_pipe_and_a_socket(sizes):
    bodies = [os.urandom(n) for n in sizes]
    for make in ("pipe", "socket"):
        if make == "pipe":
            reader, w = _pipe()
            out_fd, closer = w, lambda w=w: os.close(w)
        else:
            a, b = multiprocessing.Pipe(duplex=True)
            reader, out_fd = MessageReader(a), b.fileno()
            closer = b.close
        writer = threading.Thread(target=write_all,
                                  args=(out_fd, [x for body in bodies for x in _framed(body)]))
        writer.start()
        got = [reader.recv_bytes() for _ in bodies]
        writer.join()
        closer()
        assert [bytes(x) for x in got] == bodies
        with pytest.raises(EOFError):
            reader.recv_bytes()


def test_a_message_cut_short_by_the_end_of_the_pipe_is_an_error_not_a_message():
    for cut in (2, 4 + 10):  # inside the header, then inside the body
        reader, w = _pipe()
        os.write(w, (frame_header(100) + b"x" * 100)[:cut])
        os.close(w)
        assert reader.has_message()
        with pytest.raises(OSError, match="end of file during message"):
            reader.recv_bytes()


def test_a_large_message_is_read_whole_while_it_is_still_being_written():
    reader, w = _pipe()
    body = os.urandom(3 << 20)  # far more than a pipe holds
    writer = threading.Thread(target=write_all, args=(w, _framed(body)))
    writer.start()
    assert reader.recv_bytes() == body
    writer.join()
    os.close(w)


def test_a_broken_pipe_says_how_much_got_through():
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(OSError) as info:
        write_all(w, _framed(b"lost"))
    assert info.value.written == 0  # type: ignore[attr-defined]
    os.close(w)


def test_the_framing_is_multiprocessings_own():
    a, b = multiprocessing.Pipe(duplex=True)
    reader = MessageReader(a)
    b.send_bytes(b"from multiprocessing")
    assert reader.recv_bytes() == b"from multiprocessing"
    write_all(a.fileno(), _framed(b"to multiprocessing"))
    assert b.recv_bytes() == b"to multiprocessing"
    a.close()
    b.close()
