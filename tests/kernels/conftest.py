"""Kernel tests run each op on both backends; without a GPU the Triton one runs in Triton's CPU interpreter.

Triton reads TRITON_INTERPRET when a @triton.jit function is decorated, and its own standard library is decorated
when triton is first imported. transformers imports triton (through torch._dynamo), so the variable must be set
process-wide before that: by tests/conftest.py, by `make test-kernels`, or here when this directory runs alone.
It has no effect on other test directories: the Triton path is only taken where AGML_KERNELS=triton, which the
fixtures below set per test. Where triton was imported without it, the Triton cases skip and say why.
"""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agml_kernels._backend import import_triton  # noqa: E402


@pytest.fixture
def device() -> str:
    return DEVICE


def _select_backend(name: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AGML_KERNELS", name)
    if name == "triton":
        pytest.importorskip("triton")
        if DEVICE == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            try:
                import_triton()
            except RuntimeError as err:
                pytest.skip(f"{err} (run `make test-kernels`, or set TRITON_INTERPRET=1)")
        else:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return name


@pytest.fixture(params=["reference", "triton"])
def kernel_backend(request, monkeypatch) -> str:
    """Both backends, one after the other."""
    return _select_backend(request.param, monkeypatch)


@pytest.fixture
def triton_backend(monkeypatch) -> str:
    """The Triton backend only (determinism and other Triton-specific checks)."""
    return _select_backend("triton", monkeypatch)
