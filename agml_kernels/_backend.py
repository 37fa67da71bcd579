"""Backend choice: Triton kernels on CUDA, PyTorch references elsewhere."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

_CHOICES = ("triton", "reference")


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors in the interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def import_triton():
    """Import triton on first use of a Triton path; returns (triton, triton.language).

    Triton decides at decoration time whether a @triton.jit function is compiled or interpreted, including its own
    standard library (decorated when triton is imported). So TRITON_INTERPRET=1 only works if it was set before the
    first `import triton` in the process; say so instead of failing deep inside the interpreter.
    """
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if triton_interpreted() and isinstance(tl.zeros, JITFunction):
        raise RuntimeError("TRITON_INTERPRET=1 must be set before triton is first imported in this process")
    return triton, tl


def backend() -> str:
    """Return "triton" or "reference"; the env var AGML_KERNELS forces one."""
    forced = os.environ.get("AGML_KERNELS", "").strip().lower()
    if forced:
        if forced not in _CHOICES:
            raise ValueError(f"AGML_KERNELS must be one of {_CHOICES}, got {forced!r}")
        if forced == "triton" and not _triton_importable():
            raise ValueError("AGML_KERNELS=triton but the triton package is not installed")
        return forced
    return "triton" if torch.cuda.is_available() and _triton_importable() else "reference"


def use_triton_for(*tensors: torch.Tensor) -> bool:
    """Whether this call should take the Triton path for tensors on this device."""
    if backend() != "triton":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    return on_cuda or triton_interpreted()
