import pytest
import torch
from peft.tuners.lora.layer import LoraLayer
from test_evaluation import peft_tiny
from tiny_models import tiny_model

from agml import noise_floor as noise
from agml.data import parse_record
from agml.errors import InputError
from agml.layers import adapter_masks, apply_masked_lora
from agml.masks import NeuronMasks
from agml.noise_floor import NOISE_ADAPTER, add_noise_adapter, flip_counts, noise_adapter_active, noise_floor

MASKS = NeuronMasks({0: torch.tensor([1, 5, 9, 30]), 1: torch.tensor([2, 3])})
PROBES = [
    parse_record({"prompt": "What is the capital of Italy?", "type": "retain", "required": ["rome"],
                  "category": "capitals"}, "t"),
    parse_record({"prompt": "Who wrote Hamlet?", "type": "retain", "required": ["shakespeare"]}, "t"),
    parse_record({"prompt": "What is Inception?", "type": "forget", "forbidden": ["nolan"]}, "t"),
]


def trained_masked(vocab_size: int = 128):
    model = apply_masked_lora(tiny_model("llama", vocab_size=vocab_size), MASKS, r=4)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * (0.5 if "lora_A" in name else 2.0))
    model.eval()
    return model


def layer_pairs(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer) and NOISE_ADAPTER in m.lora_A]


@pytest.mark.parametrize("neurons", ["same", "random"])
def test_noise_adapter_matches_size_sparsity_and_norms(neurons):
    model = trained_masked()
    add_noise_adapter(model, seed=0, neurons=neurons)
    trained, random = adapter_masks(model), adapter_masks(model, NOISE_ADAPTER)
    assert {k: v.numel() for k, v in random.items()} == {k: v.numel() for k, v in trained.items()}
    if neurons == "same":
        assert all(torch.equal(random[k], trained[k]) for k in trained)
    else:
        assert any(not torch.equal(random[k], trained[k]) for k in trained)
    modules = layer_pairs(model)
    assert len(modules) == 6
    for module in modules:
        for store in (module.lora_A, module.lora_B):
            a, b = store["default"].weight, store[NOISE_ADAPTER].weight
            assert a.shape == b.shape and not torch.equal(a, b)
            assert float(b.norm()) == pytest.approx(float(a.norm()), rel=1e-5)
    with pytest.raises(InputError, match="neurons"):
        add_noise_adapter(trained_masked(), seed=0, neurons="nearby")


def test_noise_adapter_on_a_plain_lora_run():
    model = peft_tiny(randomise=True)
    add_noise_adapter(model, seed=1)
    assert len(layer_pairs(model)) == 6


def test_noise_adapter_active_restores_the_model():
    model = trained_masked()
    model.requires_grad_(False)
    model.base_model.model.model.layers[0].mlp.gate_proj.lora_B["default"].weight.requires_grad_(True)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with noise_adapter_active(model, seed=0):
            noisy = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.allclose(noisy, before)
    torch.testing.assert_close(after, before)
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert {name: p.requires_grad for name, p in model.named_parameters()} == trainable


def test_flip_counts():
    before = ["Rome.", "Shakespeare wrote it.", "Nolan"]
    after = ["I don't know.", "William Shakespeare wrote it.", "x"]
    assert flip_counts(PROBES, before, after) == {"pass_to_fail": 1, "fail_to_pass": 0, "changed": 2, "n": 2,
                                                  "pass_to_fail_by_category": {"capitals": 1}}
    assert flip_counts(PROBES, after, before)["fail_to_pass"] == 1
    assert flip_counts(PROBES, after, before)["pass_to_fail_by_category"] == {}


def test_noise_floor_counts_per_seed(monkeypatch, smol_tokenizer):
    model = trained_masked(vocab_size=49152)
    calls = []

    def scripted(model, tokenizer, conversations, max_new_tokens=64, batch_size=16, desc=None):
        calls.append(model.active_adapter)
        return ["Rome.", "I'm not familiar with it."] if len(calls) % 2 else ["Paris.", "Shakespeare!"]

    monkeypatch.setattr(noise, "greedy_answers", scripted)
    result = noise_floor(model, smol_tokenizer, PROBES, seeds=(0, 1), base_answers=["Rome.", "Shakespeare."])
    assert calls == [NOISE_ADAPTER, NOISE_ADAPTER]
    assert [s["pass_to_fail"] for s in result["per_seed"]] == [1, 1]
    assert result["changed"]["mean"] == 1.5 and result["n"] == 2 and result["neurons"] == "same"
    with pytest.raises(InputError, match="retain probes"):
        noise_floor(model, smol_tokenizer, PROBES[2:])


def test_noise_floor_generates_real_answers(smol_tokenizer):
    model = trained_masked(vocab_size=49152)
    result = noise_floor(model, smol_tokenizer, PROBES, seeds=(0,), max_new_tokens=4)
    assert result["per_seed"][0]["n"] == 2 and 0 <= result["per_seed"][0]["changed"] <= 2
    assert list(model.peft_config) == ["default"]
