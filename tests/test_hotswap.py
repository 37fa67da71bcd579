"""Hotswapping masked adapters with PEFT's own `hotswap_adapter`, and the neuron-id layout it relies on (issue 18).

PEFT's hotswap finds each tensor's layer by dropping the last three key parts (`lora_A.<adapter>.weight`), so the
neuron ids are stored as `<layer>.lora_out_index.<adapter>.ids` (docs/architecture.md, "Hotswapping").
"""

import warnings
from pathlib import Path

import pytest
import torch
from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter
from peft.utils.hotswap import prepare_model_for_compiled_hotswap
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

from agml.adapter_check import check_neuron_indices
from agml.adapters import (
    apply_masked_lora,
    check_hotswap,
    export_baked,
    hotswap_adapter,
    load_adapter,
    save_adapter,
)
from agml.errors import AgmlError, InputError
from agml.index_keys import IN_INDEX, INDEX_BUFFER, OUT_INDEX, parse_index_key
from agml.masks import NeuronMasks
from agml_kernels.masked_lora import column_positions

FIRST = NeuronMasks({0: [1, 2, 3], 1: [3, 10, 40]})
IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def saved_adapter(folder: Path, masks: NeuronMasks, seed: int, r: int = 4) -> Path:
    """A masked adapter with random (non-zero) factors, saved with save_adapter."""
    model = apply_masked_lora(tiny_model("llama"), masks, r=r)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return save_adapter(model, folder)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def fresh_logits(folder: Path) -> torch.Tensor:
    return logits(load_adapter(tiny_model("llama"), folder))


def previous_layout(folder: Path) -> Path:
    """Rewrite a saved adapter's index keys to the layout before `.ids` (`<layer>.lora_out_index`)."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    renamed = {key.removesuffix(f".{INDEX_BUFFER}"): value for key, value in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(path), metadata={"format": "pt"})
    return folder


def test_parse_index_key_reads_both_layouts():
    layer = "base_model.model.model.layers.0.mlp.gate_proj"
    assert parse_index_key(f"{layer}.{OUT_INDEX}.{INDEX_BUFFER}") == (layer, OUT_INDEX)
    assert parse_index_key(f"{layer}.{IN_INDEX}") == (layer, IN_INDEX)
    assert parse_index_key(f"{layer}.lora_A.weight") is None
    assert parse_index_key(f"{layer}.{OUT_INDEX}.default.{INDEX_BUFFER}") is None  # in-memory key, not a saved one


def test_saved_keys_follow_peft_layout_and_round_trip(tmp_path):
    folder = saved_adapter(tmp_path / "a", FIRST, seed=1)
    keys = set(load_file(str(folder / "adapter_model.safetensors")))
    layer = "base_model.model.model.layers.1.mlp"
    assert {f"{layer}.gate_proj.{OUT_INDEX}.ids", f"{layer}.up_proj.{OUT_INDEX}.ids",
            f"{layer}.down_proj.{IN_INDEX}.ids"} <= keys
    model = load_adapter(tiny_model("llama"), folder)
    assert f"{layer}.gate_proj.{OUT_INDEX}.default.ids" in model.state_dict()
    save_adapter(model, tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    original = load_file(str(folder / "adapter_model.safetensors"))
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)
    assert torch.equal(fresh_logits(tmp_path / "again"), fresh_logits(folder))


def test_export_baked_writes_no_neuron_ids(tmp_path):
    model = load_adapter(tiny_model("llama"), saved_adapter(tmp_path / "a", FIRST, seed=1))
    export_baked(model, tmp_path / "baked")
    keys = load_file(str(tmp_path / "baked" / "adapter_model.safetensors"))
    assert keys and not any(parse_index_key(key) or "index" in key for key in keys)


@pytest.mark.parametrize("layout", ["current", "previous"])
@pytest.mark.parametrize("into_peft_model", [False, True], ids=["plain-model", "peft-model"])
def test_both_layouts_load_identically_without_key_warnings(tmp_path, into_peft_model, layout):
    """load_adapter goes through PeftModel.from_pretrained (plain model) or PeftModel.load_adapter (PeftModel)."""
    folder = saved_adapter(tmp_path / "a", FIRST, seed=1)
    expected = fresh_logits(folder)
    if layout == "previous":
        previous_layout(folder)
    check_neuron_indices(load_file(str(folder / "adapter_model.safetensors")), str(folder))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if into_peft_model:
            model = apply_masked_lora(tiny_model("llama"), NeuronMasks({0: [7], 1: [0, 5]}), adapter_name="other")
            model = load_adapter(model, folder)
            model.set_adapter("default")
        else:
            model = load_adapter(tiny_model("llama"), folder)
    assert not [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert torch.equal(logits(model), expected)


def test_previous_layout_disagreeing_ids_are_still_caught(tmp_path):
    folder = previous_layout(saved_adapter(tmp_path / "a", FIRST, seed=1))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith(f"layers.1.mlp.gate_proj.{OUT_INDEX}"))
    tensors[key] = tensors[key][:-1].clone()
    with pytest.raises(InputError, match="different neuron ids"):
        check_neuron_indices(tensors, str(folder))


# hotswap ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "second",
    [FIRST, NeuronMasks({0: [4, 5, 6], 1: [7, 11, 41]}), NeuronMasks({0: [1, 2, 3, 9], 1: [3, 10, 40, 50]})],
    ids=["same-masks", "other-neurons-same-counts", "more-neurons"],
)
def test_peft_hotswap_equals_loading_the_second_adapter(tmp_path, second):
    first = saved_adapter(tmp_path / "a", FIRST, seed=1)
    other = saved_adapter(tmp_path / "b", second, seed=2)
    model = load_adapter(tiny_model("llama"), first)
    before = logits(model)  # caches each layer's kernel plan, which must notice the swapped ids
    peft_hotswap_adapter(model, str(other), adapter_name="default", torch_device="cpu")
    after = logits(model)
    torch.testing.assert_close(after, fresh_logits(other), atol=1e-6, rtol=0)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("second", [FIRST, NeuronMasks({0: [4, 5, 6], 1: [7, 11, 41]})], ids=["same", "other"])
@pytest.mark.parametrize("second_rank", [4, 2])
def test_peft_hotswap_after_prepare_for_compiled_hotswap(tmp_path, second, second_rank):
    first = saved_adapter(tmp_path / "a", FIRST, seed=1)
    other = saved_adapter(tmp_path / "b", second, seed=2, r=second_rank)
    model = load_adapter(tiny_model("llama"), first)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    logits(model)
    peft_hotswap_adapter(model, str(other), adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(logits(model), fresh_logits(other), atol=1e-6, rtol=0)


def test_agml_hotswap_adapter_swaps_like_peft(tmp_path):
    other = saved_adapter(tmp_path / "b", NeuronMasks({0: [4, 5, 6], 1: [7, 11, 41]}), seed=2)
    model = load_adapter(tiny_model("llama"), saved_adapter(tmp_path / "a", FIRST, seed=1))
    hotswap_adapter(model, other, torch_device="cpu")
    torch.testing.assert_close(logits(model), fresh_logits(other), atol=1e-6, rtol=0)


FEWER = NeuronMasks({0: [1, 2, 3, 4], 1: [3]})  # layer 0 grows (swappable), layer 1 shrinks (not)


def test_fewer_neurons_are_refused_before_anything_is_swapped(tmp_path):
    model = load_adapter(tiny_model("llama"), saved_adapter(tmp_path / "a", FIRST, seed=1))
    before = logits(model)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    other = saved_adapter(tmp_path / "b", FEWER, seed=2)
    with pytest.raises(AgmlError, match=r"layers\.1\.mlp\.down_proj: 1 neurons instead of 3"):
        hotswap_adapter(model, other, torch_device="cpu")
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert torch.equal(logits(model), before)


def test_peft_hotswap_to_fewer_neurons_stops_midway_and_forward_refuses(tmp_path):
    """What PEFT's own function does (docs/architecture.md): an error midway, then a forward that refuses."""
    model = load_adapter(tiny_model("llama"), saved_adapter(tmp_path / "a", FIRST, seed=1))
    other = saved_adapter(tmp_path / "b", FEWER, seed=2)
    with pytest.raises(NotImplementedError, match="1 dimensions"):
        peft_hotswap_adapter(model, str(other), adapter_name="default", torch_device="cpu")
    with pytest.raises(AgmlError, match="hotswap_adapter stopped midway"):
        logits(model)


def test_more_neurons_after_prepare_for_compiled_hotswap_is_refused(tmp_path):
    model = load_adapter(tiny_model("llama"), saved_adapter(tmp_path / "a", FIRST, seed=1))
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    other = saved_adapter(tmp_path / "b", NeuronMasks({0: [1, 2, 3, 9], 1: [3, 10, 40, 50]}), seed=2)
    with pytest.raises(AgmlError, match="4 neurons instead of 3"):
        check_hotswap(model, other)


def test_mask_in_only_one_adapter_is_refused(tmp_path):
    model = load_adapter(tiny_model("llama"), saved_adapter(tmp_path / "a", FIRST, seed=1))
    only_layer_0 = saved_adapter(tmp_path / "b", NeuronMasks({0: [1, 2, 3]}), seed=2)
    with pytest.raises(AgmlError, match=r"layers\.1\.mlp\.up_proj has a neuron mask in only one"):
        check_hotswap(model, only_layer_0)


def test_previous_layout_hotswap_is_refused_with_the_fix(tmp_path):
    model = load_adapter(tiny_model("llama"), saved_adapter(tmp_path / "a", FIRST, seed=1))
    old = previous_layout(saved_adapter(tmp_path / "b", FIRST, seed=2))
    with pytest.raises(InputError, match="previous layout.*save_adapter"):
        check_hotswap(model, old)


def test_kernel_plan_notices_ids_swapped_with_swap_tensors(tmp_path):
    """torch.utils.swap_tensors (PEFT's hotswap to more neurons) keeps the object and can keep its version number."""
    model = load_adapter(tiny_model("llama"), saved_adapter(tmp_path / "a", FIRST, seed=1))
    layer = model.get_base_model().model.layers[1].mlp.up_proj
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    assert layer._fused_path_safe("default", x)
    with torch.no_grad():
        layer(x)  # caches the plan for the current ids
        ids = layer.neuron_index("default")[0]
        new = torch.tensor([5, 20, 33])
        while new._version < ids._version:
            new.add_(0)
        torch.utils.swap_tensors(ids, new)
        assert layer.neuron_index("default")[0] is ids and ids.tolist() == [5, 20, 33]
        lora_a, lora_b = layer.dense_factors("default")
        expected = layer.base_layer(x) + x @ lora_a.t() @ lora_b.t() * layer.scaling["default"]
        torch.testing.assert_close(layer(x), expected)
    # The Triton path finds its LoRA columns through the plan's positions (the reference path reads the ids).
    assert torch.equal(layer._kernel_plan("default")["out_positions"], column_positions(ids, 64))
