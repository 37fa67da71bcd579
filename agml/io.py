"""Atomic writes: every file and folder agml writes appears whole or not at all (write to a sibling, then rename).

A run killed at any point therefore leaves either the previous file or the new one, never half of one; see
docs/architecture.md ("File formats").
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from agml.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces `path` when the block succeeds, else it is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write JSON (UTF-8, non-ASCII kept, unknown objects as str, final newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike,
                  if_exists: Literal["error", "replace", "keep"] = "error") -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes `path` once the block succeeds.

    When `path` is already a non-empty folder: "error" refuses before anything is written, "replace" swaps the new
    folder in (the old one is moved aside first, as a folder cannot be renamed over a non-empty one), and "keep"
    leaves the existing folder in place (another process finished the same work first).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a folder")
    if if_exists == "error" and path.is_dir() and any(path.iterdir()):
        raise InputError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield staging
        if path.is_dir() and any(path.iterdir()):
            if if_exists != "keep":
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
                os.replace(path, old / path.name)
                os.replace(staging, path)
                shutil.rmtree(old)
        else:
            try:
                os.replace(staging, path)
            except OSError:
                if if_exists != "keep" or not (path.is_dir() and any(path.iterdir())):
                    raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
