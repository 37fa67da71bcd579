import pytest
import torch
from tiny_models import ARCHS, tiny_model


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch) -> torch.nn.Module:
    return tiny_model(arch)
