"""Checks that must pass before any heavy work: output paths, option values, model files, context length.

Each raises `InputError` with one line naming the problem; see docs/reliability.md.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from agml.errors import InputError

PARTIAL_SUFFIX = ".partial"
_LONGEST_SUFFIX = ".partial"  # RUN.partial and RUN.lock sit beside RUN: the name must fit with them


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _check_writable_folder(folder: Path, what: str) -> None:
    """Create and delete a file in `folder` (os.access says yes to root on a read-only mount)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".agml-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"{what}: cannot write in {folder} ({err.strerror or err})") from err


def check_out_path(out: str | os.PathLike) -> Path:
    """A run folder agml can create and later rename into place; returns it as a Path."""
    text = str(out)
    path = Path(text)
    if not text.strip() or path.name in ("", ".", "..") or text.rstrip("/") in ("", ".", ".."):
        raise InputError(f"--out {text!r} names no new folder; give a folder name such as runs/my-run")
    absolute = Path(os.path.abspath(path))
    if absolute == Path(os.path.abspath(os.getcwd())) or absolute in Path(os.getcwd()).resolve().parents:
        raise InputError(f"--out {text} is the current folder or one of its parents; give a new folder")
    if path.is_symlink():
        raise InputError(f"--out {text} is a symbolic link (to {os.path.realpath(path)}); give the real folder")
    if path.exists() and os.path.ismount(path):
        raise InputError(f"--out {text} is a mount point; agml renames the finished run into place, which a mount "
                         "point does not allow; give a folder inside it")
    limit = _name_max(absolute.parent)
    if len(path.name.encode()) + len(_LONGEST_SUFFIX) > limit:
        raise InputError(f"--out name {path.name[:40]}... is {len(path.name.encode())} bytes; the file system allows "
                         f"{limit}, and agml needs room for {_LONGEST_SUFFIX!r}: give a shorter --out")
    parent = _existing_ancestor(absolute.parent)
    if not parent.is_dir():
        raise InputError(f"--out {text}: {parent} is not a folder")
    _check_writable_folder(parent, f"--out {text}")
    return path


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(_existing_ancestor(folder), "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_json_target(target: str | os.PathLike, run: str | os.PathLike, force: bool) -> None:
    """`eval --json OUT`: a writable file outside the run folder, not an existing file unless --force."""
    target, run = Path(target), Path(run)
    resolved, run_resolved = target.resolve(), run.resolve()
    if resolved == run_resolved or run_resolved in resolved.parents:
        raise InputError(f"--json {target} is inside the run {run}; the run's files are never overwritten; "
                         "write the result elsewhere")
    if target.is_dir():
        raise InputError(f"--json {target} is a folder; give a file name")
    if not target.parent.is_dir():
        raise InputError(f"--json {target}: folder {target.parent} does not exist")
    if target.exists() and not force:
        raise InputError(f"--json {target} exists; pass --force to replace it")
    _check_writable_folder(target.parent, f"--json {target}")


def check_model_files(name_or_path: str) -> None:
    """Every *.safetensors of a local model folder must have a readable header covering the whole file."""
    from safetensors import safe_open

    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except Exception as err:  # safetensors raises its own SafetensorError
            raise InputError(f"{weights} is not a readable safetensors file (cut short or corrupt): {err}") from err


def model_context(model) -> int | None:
    """The most positions the model takes (None when its config does not say)."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_context(model, tokenizer, records: Sequence, new_tokens: dict[str, int]) -> None:
    """Every prompt (+ its given answer) plus the longest generation asked for must fit the model's context."""
    from agml.data import _encode, answer_suffix, prompt_ids

    limit = model_context(model)
    if limit is None or not records:
        return
    longest, where = 0, None
    for record in records:
        length = len(prompt_ids(tokenizer, record.messages))
        if record.answer is not None:
            length += len(_encode(tokenizer, answer_suffix(tokenizer, record.messages, record.answer)))
        if length > longest:
            longest, where = length, record.source
    if longest >= limit:
        raise InputError(f"{where}: the prompt is {longest} tokens; the model takes at most {limit} positions")
    for flag, count in new_tokens.items():
        if longest + count > limit:
            raise InputError(f"{flag} {count}: the longest prompt ({where}, {longest} tokens) plus {count} new tokens "
                             f"exceeds the model's {limit} positions; use {flag} {limit - longest} or less")


def check_unlearn(options, force: bool, resume: bool) -> None:
    """Everything `agml unlearn` can check before loading the model (call it holding the run's lock); option
    values were checked when the options were built (`agml.options`)."""
    from agml import ownership

    if not resume:
        check_out_path(options.out)
        ownership.check_replaceable(options.out, force)
        ownership.check_partial(Path(options.out).with_name(Path(options.out).name + PARTIAL_SUFFIX), force)
    check_model_files(options.model)


def check_score_out(out: str, force: bool) -> None:
    """`agml score --out`: a folder agml can create, or (with --force) an earlier agml output it may replace."""
    from agml import ownership

    check_out_path(out)
    ownership.check_replaceable(out, force)
    ownership.check_partial(Path(out).with_name(Path(out).name + PARTIAL_SUFFIX), True)
