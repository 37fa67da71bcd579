"""agml.layers: masked LoRA as a PEFT adapter on tiny random Llama and Qwen2 models."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel
from tiny_models import tiny_model
from torch import nn

from agml.errors import AgmlError, InputError
from agml.layers import (
    AGML_CONFIG,
    MaskedLoraLinear,
    adapter_masks,
    adapter_merged,
    apply_lora,
    apply_masked_lora,
    export_baked,
    load_adapter,
    save_adapter,
    trainable_parameter_count,
)
from agml.masks import NeuronMasks

HIDDEN, INTERMEDIATE, RANK = 32, 64, 4
MASKS = NeuronMasks({0: [], 1: torch.tensor([3, 10, 40, 63])})  # an empty layer gets no adapter
OTHER_MASKS = NeuronMasks({0: torch.tensor([0, 5]), 1: torch.tensor([7, 8, 9])})


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def randomize_lora(model: nn.Module, adapter_name: str = "default", seed: int = 0) -> None:
    """Non-zero LoRA factors so that the adapter visibly changes the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and f".{adapter_name}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def masked(arch: str, masks: NeuronMasks = MASKS, dtype: torch.dtype = torch.float32) -> PeftModel:
    model = apply_masked_lora(tiny_model(arch, dtype=dtype), masks, r=RANK, alpha=8)
    randomize_lora(model)
    return model


def test_fresh_adapter_is_a_no_op(tiny, input_ids):
    before = logits(tiny, input_ids)
    model = apply_masked_lora(tiny, MASKS, r=RANK)
    assert isinstance(model, PeftModel)
    assert torch.equal(logits(model, input_ids), before)


def test_compact_shapes_and_untouched_layers(arch):
    model = masked(arch)
    mlp0, mlp1 = (layer.mlp for layer in model.get_base_model().model.layers)
    assert all(type(getattr(mlp0, name)) is nn.Linear for name in ("gate_proj", "up_proj", "down_proj"))
    k = MASKS[1].numel()
    for name in ("gate_proj", "up_proj"):
        module = getattr(mlp1, name)
        assert isinstance(module, MaskedLoraLinear)
        assert module.lora_A["default"].weight.shape == (RANK, HIDDEN)
        assert module.lora_B["default"].weight.shape == (k, RANK)
    assert mlp1.down_proj.lora_A["default"].weight.shape == (RANK, k)
    assert mlp1.down_proj.lora_B["default"].weight.shape == (HIDDEN, RANK)
    assert adapter_masks(model).to_lists() == MASKS.to_lists()


def test_trainable_parameter_count_is_compact(arch):
    model = masked(arch, OTHER_MASKS)
    per_layer = [
        2 * (RANK * HIDDEN + ids.numel() * RANK) + RANK * ids.numel() + HIDDEN * RANK for ids in OTHER_MASKS.values()
    ]
    assert trainable_parameter_count(model) == sum(per_layer)


def test_disable_adapter_gives_base_logits(arch, input_ids):
    base = logits(tiny_model(arch), input_ids)
    model = masked(arch)
    adapted = logits(model, input_ids)
    assert not torch.allclose(adapted, base)
    with model.disable_adapter():
        assert torch.equal(logits(model, input_ids), base)
    assert torch.equal(logits(model, input_ids), adapted)


def down_proj_input(model: nn.Module, layer: int, input_ids: torch.Tensor) -> torch.Tensor:
    captured = []
    down_proj = model.get_base_model().model.layers[layer].mlp.down_proj
    handle = down_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        logits(model, input_ids)
    finally:
        handle.remove()
    return captured[0]


def test_only_selected_neurons_change(arch, input_ids):
    model = masked(arch)
    layer = next(iter(MASKS))
    adapted = down_proj_input(model, layer, input_ids)
    with model.disable_adapter():
        base = down_proj_input(model, layer, input_ids)
    changed = (adapted - base).abs().amax(dim=(0, 1)) > 0
    assert changed.nonzero().flatten().tolist() == MASKS[layer].tolist()


def training_step(model: nn.Module, input_ids: torch.Tensor) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_training_moves_only_lora_parameters(arch, input_ids):
    model = apply_masked_lora(tiny_model(arch), MASKS, r=RANK, dropout=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    training_step(model, input_ids)
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved and all("lora_" in name for name in moved)
    assert any("lora_B" in name for name in moved)
    assert {name for name, p in model.named_parameters() if p.requires_grad} >= moved


def test_gradient_checkpointing_trains_lora_b(arch, input_ids):
    model = tiny_model(arch)
    # Reentrant checkpointing drops gradients unless the checkpointed inputs require grad (the PEFT pitfall).
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model = apply_masked_lora(model, MASKS, r=RANK)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    before = [p.detach().clone() for p in lora_b]
    training_step(model, input_ids)
    assert all(not torch.equal(p, old) for p, old in zip(lora_b, before, strict=True))


def test_save_load_round_trip(arch, input_ids, tmp_path):
    model = masked(arch, OTHER_MASKS)
    expected = logits(model, input_ids)
    save_adapter(model, tmp_path / "adapter")
    summary = json.loads((tmp_path / "adapter" / AGML_CONFIG).read_text())
    assert summary["neurons_per_layer"] == {"0": 2, "1": 3}
    loaded = load_adapter(tiny_model(arch), tmp_path / "adapter")
    assert torch.equal(logits(loaded, input_ids), expected)
    assert adapter_masks(loaded).to_lists() == OTHER_MASKS.to_lists()
    assert trainable_parameter_count(loaded) == 0
    # PEFT's own save_pretrained keeps the neuron ids too.
    model.save_pretrained(tmp_path / "peft")
    assert torch.equal(logits(load_adapter(tiny_model(arch), tmp_path / "peft"), input_ids), expected)


def test_load_trainable_adapter_into_peft_model(arch, input_ids, tmp_path):
    model = masked(arch)
    save_adapter(model, tmp_path / "adapter")
    other = masked(arch, OTHER_MASKS)
    other = load_adapter(other, tmp_path / "adapter", adapter_name="loaded", is_trainable=True)
    other.set_adapter("loaded")
    assert torch.equal(logits(other, input_ids), logits(model, input_ids))
    assert trainable_parameter_count(other) == trainable_parameter_count(model)


def test_baked_adapter_loads_in_plain_peft(arch, input_ids, tmp_path):
    model = masked(arch, OTHER_MASKS)
    export_baked(model, tmp_path / "baked")
    assert "agml" not in (tmp_path / "baked" / "adapter_config.json").read_text()
    plain = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "baked")
    assert not any(isinstance(m, MaskedLoraLinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain, input_ids), logits(model, input_ids), atol=1e-5, rtol=0)


def test_merge_unmerge_and_merge_and_unload(arch, input_ids):
    model = masked(arch)
    expected = logits(model, input_ids)
    base_weight = model.get_base_model().model.layers[1].mlp.up_proj.base_layer.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(model.get_base_model().model.layers[1].mlp.up_proj.base_layer.weight, base_weight)
    torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-5, rtol=0)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, MaskedLoraLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-5, rtol=0)


def base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    return {name: m.get_base_layer().weight.detach().clone() for name, m in model.named_modules()
            if isinstance(m, MaskedLoraLinear)}


def assert_same_base(model: PeftModel, expected: dict[str, torch.Tensor]) -> None:
    now = base_weights(model)
    assert now.keys() == expected.keys()
    assert all(torch.equal(now[name], expected[name]) for name in expected), "base weights changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("safe_merge", [False, True])
def test_unmerge_restores_the_base_weights_bit_exactly(arch, input_ids, dtype, safe_merge):
    # PEFT subtracts the delta again, which leaves rounding errors (in bf16 large ones); masked layers restore the
    # rows/columns they changed, so merging for a fast evaluation never alters the base model.
    model = masked(arch, dtype=dtype)
    apply_masked_lora(model, OTHER_MASKS, r=RANK, adapter_name="other")
    randomize_lora(model, "other", seed=1)
    model.base_model.set_adapter(["default", "other"])  # two merged adapters on overlapping layers
    before = base_weights(model)
    for _ in range(3):
        model.merge_adapter(safe_merge=safe_merge)
        assert any(not torch.equal(w, before[n]) for n, w in base_weights(model).items())
        model.unmerge_adapter()
        assert_same_base(model, before)


def test_unmerge_after_a_cast_restores_the_cast_base(arch):
    model = masked(arch)
    before = {name: w.to(torch.bfloat16) for name, w in base_weights(model).items()}
    model.merge_adapter()
    model.to(torch.bfloat16)
    model.unmerge_adapter()
    assert_same_base(model, before)


def test_a_full_size_adapter_on_a_masked_layer_still_unmerges(arch):
    model = masked(arch)
    # A plain LoRA adapter added to masked layers has no neuron index: unmerge falls back to PEFT's subtraction.
    model.add_adapter("full", LoraConfig(target_modules=["up_proj"], r=RANK, init_lora_weights=False))
    up = model.get_base_model().model.layers[1].mlp.up_proj
    assert up.exact_unmerge("default") and not up.exact_unmerge("full")
    original = up.get_base_layer().weight.detach().clone()
    up.merge(adapter_names=["full"])
    assert not torch.equal(up.get_base_layer().weight, original)
    up.unmerge()
    torch.testing.assert_close(up.get_base_layer().weight, original, atol=1e-6, rtol=0)


def test_adapter_merged_is_fast_path_with_the_same_outputs(arch, input_ids):
    model = masked(arch)
    expected = logits(model, input_ids)
    with model.disable_adapter():
        base = logits(model, input_ids)
    weights = base_weights(model)
    with adapter_merged(model) as merged:
        assert merged and all(m.merged for m in model.modules() if isinstance(m, MaskedLoraLinear))
        torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-5, rtol=0)
        with model.disable_adapter():  # a base pass inside the block unmerges (exactly) and is the base model
            assert torch.equal(logits(model, input_ids), base)
        torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-5, rtol=0)
    assert not any(m.merged for m in model.modules() if isinstance(m, MaskedLoraLinear))
    assert_same_base(model, weights)
    assert torch.equal(logits(model, input_ids), expected)


def test_adapter_merged_unmerges_when_the_block_fails(arch):
    model = masked(arch)
    weights = base_weights(model)
    with pytest.raises(RuntimeError, match="boom"), adapter_merged(model):
        raise RuntimeError("boom")
    assert not any(m.merged for m in model.modules() if isinstance(m, MaskedLoraLinear))
    assert_same_base(model, weights)


def test_adapter_merged_leaves_inexact_cases_unmerged(arch, input_ids):
    plain = apply_lora(tiny_model(arch), r=RANK)  # PEFT's own layers cannot unmerge exactly
    with adapter_merged(plain) as merged:
        assert not merged and not any(getattr(m, "merged", False) for m in plain.modules())
    model = masked(arch)
    model.merge_adapter()  # already merged by the user: left as it is
    with adapter_merged(model) as merged:
        assert not merged
    assert all(m.merged for m in model.modules() if isinstance(m, MaskedLoraLinear))


def test_two_adapters_side_by_side(arch, input_ids):
    model = masked(arch)
    first = logits(model, input_ids)
    apply_masked_lora(model, OTHER_MASKS, r=RANK, adapter_name="other")
    randomize_lora(model, "other", seed=1)
    assert torch.equal(logits(model, input_ids), first)  # adding does not activate
    model.set_adapter("other")
    second = logits(model, input_ids)
    assert not torch.allclose(second, first)
    assert adapter_masks(model, "other").to_lists() == OTHER_MASKS.to_lists()
    model.set_adapter("default")
    assert torch.equal(logits(model, input_ids), first)


def test_bf16_forward(arch, input_ids):
    model = masked(arch, dtype=torch.bfloat16)
    out = logits(model, input_ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with model.disable_adapter():
        assert not torch.equal(logits(model, input_ids), out)


def test_plain_lora_baseline_targets_every_layer(arch):
    model = apply_lora(tiny_model(arch), r=RANK)
    per_layer = 2 * RANK * (HIDDEN + INTERMEDIATE) + RANK * (INTERMEDIATE + HIDDEN)
    assert trainable_parameter_count(model) == 2 * per_layer


@pytest.mark.parametrize(
    "masks, message",
    [
        (NeuronMasks({2: [1]}), "layer 2"),
        (NeuronMasks({0: [INTERMEDIATE]}), f"neuron {INTERMEDIATE}"),
        (NeuronMasks({}), "selects no neuron"),
    ],
)
def test_bad_masks_are_input_errors(masks, message):
    with pytest.raises(InputError, match=message):
        apply_masked_lora(tiny_model("qwen2"), masks)


def test_model_without_gate_up_down_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(AgmlError, match="GPT2LMHeadModel"):
        apply_masked_lora(model, MASKS)


def test_masked_adapter_refuses_layers_with_plain_lora():
    model = apply_lora(tiny_model("llama"), r=RANK)
    with pytest.raises(AgmlError, match="plain PEFT LoRA"):
        apply_masked_lora(model, MASKS, adapter_name="masked")


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path):
    model = masked("llama")
    target = tmp_path / "adapter"
    save_adapter(model, target)
    first = (target / "adapter_model.safetensors").read_bytes()
    with pytest.raises(InputError, match="not empty"):
        save_adapter(model, target)
    randomize_lora(model, seed=3)
    save_adapter(model, target, overwrite=True)
    assert (target / "adapter_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging folders left behind


def test_mixed_batch_rows_use_their_adapter(arch, input_ids):
    model = masked(arch).eval()  # PEFT refuses adapter_names in training mode
    adapted = logits(model, input_ids)
    with model.disable_adapter():
        base = logits(model, input_ids)
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=["default", "__base__"]).logits
    torch.testing.assert_close(mixed[0], adapted[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-5, rtol=0)


def two_active_adapters(arch: str):
    """The masked test model with a second random adapter, both active."""
    model = masked(arch)
    apply_masked_lora(model, OTHER_MASKS, r=RANK, adapter_name="other")
    randomize_lora(model, "other", seed=1)
    model.base_model.set_adapter(["default", "other"])
    return model


def test_two_active_adapters_add_up_like_their_merged_weights(arch, input_ids):
    model = two_active_adapters(arch)
    both = logits(model, input_ids)
    assert not torch.allclose(both, logits(masked(arch), input_ids))
    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), both, atol=1e-5, rtol=0)


def test_stacking_a_merge_warns_once_per_layer(arch, input_ids):
    model = two_active_adapters(arch)
    both = logits(model, input_ids)
    model.merge_adapter(["default"])
    with pytest.warns(UserWarning, match="Already following adapters were merged") as caught:
        model.merge_adapter(["other"])
    stacked = [w for w in caught if "Already following adapters were merged" in str(w.message)]
    stacked_on = [m for m in model.modules()
                  if isinstance(m, MaskedLoraLinear) and {"default", "other"} <= set(m.merged_adapters)]
    assert stacked_on and len(stacked) == len(stacked_on)  # PEFT's merge would warn a second time in each
    torch.testing.assert_close(logits(model, input_ids), both, atol=1e-5, rtol=0)


def test_dropout_reaches_only_the_lora_path(arch):
    model = apply_masked_lora(tiny_model(arch), MASKS, r=RANK, alpha=8, dropout=0.5)
    randomize_lora(model)
    gate = model.get_base_model().model.layers[1].mlp.gate_proj
    gate.train()
    x = torch.randn(3, HIDDEN)
    torch.manual_seed(7)
    out = gate(x)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, p=0.5, training=True)
    low = dropped @ gate.lora_A["default"].weight.t() @ gate.lora_B["default"].weight.t() * gate.scaling["default"]
    expected = gate.base_layer(x).index_add(-1, MASKS[1], low)
    torch.testing.assert_close(out, expected)
