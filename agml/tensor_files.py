"""Safetensors files of agml (masks, scores): atomic writes, and reads that check the file's format tag."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from agml.errors import InputError
from agml.io import atomic_path


def write_tensor_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], file_format: str,
                      metadata: dict[str, str]) -> None:
    """Write safetensors atomically (temporary file, then rename), tagged with `file_format`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": file_format, **metadata})


def read_tensor_file(path: str | os.PathLike, file_format: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file written by `write_tensor_file`; InputError naming `what` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise InputError(f"{path} is not a safetensors {what} file: {err}") from err
    if metadata.get("format") != file_format:
        raise InputError(f"{path} is not an agml {what} file (missing format metadata)")
    return tensors, metadata
