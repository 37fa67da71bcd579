"""One writer per run: an exclusive `flock` on RUN.lock (beside RUN) held for the whole run.

The kernel drops the lock when the process ends, however it ends (exit, exception, kill -9), so a stale lock
file never blocks a later run. The holder deletes the file when it is done; a process that locked a file that was
deleted meanwhile (its inode no longer at RUN.lock) tries again, so two processes never both hold "the" lock.
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
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{out} is in use by another agml run ({_holder(path)}); wait for it to finish "
                             f"or choose another --out") from None
        if _still_at(fd, path):
            break
        os.close(fd)  # the previous holder deleted this file after we opened it: lock the current one
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {stamp}\n".encode())
    return fd


def _still_at(fd: int, path: Path) -> bool:
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (current.st_dev, current.st_ino)


def release(fd: int, out: str | os.PathLike) -> None:
    """Delete the lock file (while still holding the lock), then release it."""
    path = lock_path(out)
    if _still_at(fd, path):
        path.unlink()
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
        release(fd, out)
