"""agml deletes only folders it can prove it made: each working folder gets a marker file when created.

A finished run keeps the marker (RUN.partial is renamed to RUN), so `--force` may replace an earlier agml run,
never a folder of the user's. Replacing goes through a trash folder of a fresh unique name, so a sibling such
as RUN.old is never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agml.errors import AgmlError, InputError
from agml.io import atomic_write_text

MARKER = ".agml-run"
CHECKPOINT_DIR = "checkpoint"


def mark(folder: str | os.PathLike) -> None:
    """Record that agml created `folder` (called right after creating a working folder)."""
    atomic_write_text(Path(folder) / MARKER, "created by agml; agml may delete this folder\n")


def is_ours(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return folder.is_dir() and not folder.is_symlink() and (folder / MARKER).is_file()


def is_resumable(partial: str | os.PathLike) -> bool:
    """A killed run's working folder holding a training checkpoint (`--resume` continues it)."""
    return any((Path(partial) / CHECKPOINT_DIR).glob("checkpoint-*"))


def check_replaceable(out: str | os.PathLike, force: bool) -> None:
    """`--out` may be created, or (with --force) replaced when it is an agml run; anything else is refused."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if not force:
        raise InputError(f"--out {out} exists and is not empty; pass --force to replace it")
    if not is_ours(out):
        raise InputError(f"--out {out} was not made by agml (no {MARKER} inside), so --force will not delete it; "
                         "remove or rename it yourself, or choose another --out")


def check_partial(partial: str | os.PathLike, force: bool) -> None:
    """A leftover RUN.partial: refuse when it is not agml's, or resumable and not forced."""
    partial = Path(partial)
    if not partial.exists() and not partial.is_symlink():
        return
    if not is_ours(partial):
        raise InputError(f"{partial} exists and was not made by agml (no {MARKER} inside); remove or rename it")
    if is_resumable(partial) and not force:
        run = partial.with_name(partial.name.removesuffix(".partial"))
        raise InputError(f"{partial} holds an interrupted run; continue it with `agml unlearn --resume {run}`, "
                         "or pass --force to start over")


def remove_ours(folder: str | os.PathLike) -> None:
    """Delete a folder agml made; refuse (AgmlError) anything else."""
    if not is_ours(folder):
        raise AgmlError(f"refusing to delete {folder}: it was not made by agml (no {MARKER} inside)")
    shutil.rmtree(folder)


def start_fresh(work: str | os.PathLike) -> Path:
    """Create the working folder (removing a leftover agml one) and mark it as agml's."""
    work = Path(work)
    if work.exists():
        remove_ours(work)
    work.mkdir(parents=True)
    mark(work)
    return work


def start_run(out: str | os.PathLike, resume: bool = False) -> Path:
    """The run's working folder RUN.partial: the existing one to resume, else a fresh marked one."""
    work = Path(out).with_name(Path(out).name + ".partial")
    if resume:
        if not work.is_dir():
            raise InputError(f"nothing to resume: {work} does not exist")
        return work
    return start_fresh(work)


def finish(work: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Rename the completed working folder to `out`; an earlier agml run there goes through a unique trash folder."""
    work, out = Path(work), Path(out)
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(work, out)
        return out
    if not is_ours(out):
        raise AgmlError(f"refusing to replace {out}: it was not made by agml (no {MARKER} inside)")
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
    os.replace(out, trash / out.name)
    os.replace(work, out)
    shutil.rmtree(trash)
    return out


@contextmanager
def discard_failed_start(out: str | os.PathLike, resume: bool, enabled: bool = True) -> Iterator[None]:
    """A run refused by a check made after its working folder was created (say, every retain answer names the
    concept) leaves nothing behind; a run that reached a checkpoint keeps it for --resume. `enabled=False`: a
    non-main process of a multi-process launch, which leaves the folder to the main one."""
    partial = Path(out).with_name(Path(out).name + ".partial")
    try:
        yield
    except AgmlError:
        if enabled and not resume and is_ours(partial) and not is_resumable(partial):
            shutil.rmtree(partial, ignore_errors=True)
        raise
