"""One writer per run: an exclusive `flock` on RUN.lock (beside RUN) held for the whole run.

The kernel drops the lock when the process ends, however it ends (exit, exception, kill -9), so a stale lock
never blocks a later run. The lock file itself is left in place: deleting it would let two processes lock two
different files of the same name.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agml.errors import InputError

LOCK_SUFFIX = ".lock"


def lock_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + LOCK_SUFFIX)


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text or "another process"


def acquire(out: str | os.PathLike) -> int:
    """Lock the run at `out` for this process; InputError naming the holder when another run has it.

    Returns the lock's file descriptor (closing it releases the lock)."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(f"{out} is in use by another agml run ({_holder(path)}); wait for it to finish "
                         f"or choose another --out") from None
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {stamp}\n".encode())
    return fd


def release(fd: int) -> None:
    os.close(fd)


@contextmanager
def exclusive_run(out: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold the run's lock for the duration of the block (`enabled=False`: a non-main process, no lock)."""
    if not enabled:
        yield
        return
    fd = acquire(out)
    try:
        yield
    finally:
        release(fd)
