"""MaskedLoraLinear behaves like PEFT's lora.Linear where PEFT's tooling reaches into the layer (issue 18).

Each test is one way PEFT users reach into a LoRA layer: hooks and offload on base_layer/lora_A/lora_B,
other tuners stacked on the same Linear, quantised bases, add_weighted_adapter, in-place ops on the
output, hotswap, data-driven initialisations and mixed precision.
"""

import warnings

import pytest
import torch
from peft import LoHaConfig, LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from tiny_models import tiny_model
from torch import nn

from agml.errors import AgmlError
from agml.layers import MaskedLoraLinear, _pending_indices, adapter_masks, apply_masked_lora
from agml.masks import NeuronMasks

OUT_INDEX = torch.tensor([1, 4, 5, 11, 17])
IN_INDEX = torch.tensor([0, 2, 3, 7])


def two_layer_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))


def lora_config(cls: type = MaskedLoraLinear, **options) -> LoraConfig:
    config = LoraConfig(target_modules=["0"], **({"init_lora_weights": False, "r": 4} | options))
    config._register_custom_module({nn.Linear: cls})
    return config


def wrap(net: nn.Module, cls: type = MaskedLoraLinear, index=(None, None), seed: int = 1, **options):
    """get_peft_model with `cls` on layer 0; `index` = (out_index, in_index) for agml's layer."""
    torch.manual_seed(seed)
    with _pending_indices({net[0]: index} if cls is MaskedLoraLinear else {}, "default"):
        return get_peft_model(net, lora_config(cls, **options))


def expected_output(layer: MaskedLoraLinear, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """Dense reference: base_layer(x) + scaling * x @ A_dense.T @ B_dense.T."""
    lora_a, lora_b = layer.dense_factors(adapter)
    return layer.base_layer(x) + (x @ lora_a.t() @ lora_b.t()) * layer.scaling[adapter]


# 1. nothing between the LoRA layer and its modules is bypassed ------------------------------------------------------


@pytest.mark.parametrize("index", [(None, None), (OUT_INDEX, None), (None, IN_INDEX)])
def test_hooks_on_lora_modules_fire_and_output_is_unchanged(index):
    model = wrap(two_layer_net(), index=index)
    layer = model.base_model.model[0]
    x = torch.randn(3, 10)
    fused = layer(x)
    assert layer._fused_path_safe("default", x)
    seen = []
    for module in (layer.base_layer, layer.lora_A["default"], layer.lora_B["default"]):
        module.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    assert not layer._fused_path_safe("default", x)
    torch.testing.assert_close(layer(x), fused)
    assert len(seen) == 3


def test_accelerate_cpu_offload_runs_like_peft():
    accelerate = pytest.importorskip("accelerate")
    x = torch.randn(3, 10)
    model = wrap(two_layer_net(), index=(OUT_INDEX, None))
    with torch.no_grad():
        expected = model(x)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_loha_stacked_on_the_same_linear_keeps_its_contribution():
    x = torch.randn(4, 10)
    loha = LoHaConfig(target_modules=["0"], init_weights=False)
    torch.manual_seed(2)
    only_loha = get_peft_model(two_layer_net(), loha, adapter_name="loha", mixed=True).eval()
    torch.manual_seed(2)
    both = get_peft_model(two_layer_net(), loha, adapter_name="loha", mixed=True)
    torch.manual_seed(1)
    both.add_adapter("lora", lora_config())
    both.set_adapter(["loha", "lora"])
    layer = both.base_model.model[0]
    assert isinstance(layer, MaskedLoraLinear) and not layer._fused_path_safe("lora", x)
    with torch.no_grad():
        lora_delta = (x @ layer.lora_A["lora"].weight.t() @ layer.lora_B["lora"].weight.t()) * layer.scaling["lora"]
        torch.testing.assert_close(layer(x), only_loha.base_model.model[0](x) + lora_delta)


# 2. quantised bases --------------------------------------------------------------------------------------------------


class RoundingLinear(nn.Linear):
    """Stand-in for a quantised Linear subclass: its forward is not F.linear on `weight`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).round()


def test_linear_subclass_base_is_called_and_merge_is_refused():
    net = two_layer_net()
    net[0] = RoundingLinear(10, 20)
    model = wrap(net, index=(OUT_INDEX, None))
    layer = model.base_model.model[0]
    x = torch.randn(3, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected_output(layer, x))
        with pytest.raises(AgmlError, match="cannot merge"):
            layer.merge()


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_base_with_masked_lora(bits):
    bnb = pytest.importorskip("bitsandbytes")
    net = two_layer_net()
    if bits == 4:
        quantised = bnb.nn.Linear4bit(10, 20, compute_dtype=torch.float32, quant_type="nf4")
    else:
        quantised = bnb.nn.Linear8bitLt(10, 20, has_fp16_weights=False)
    quantised.load_state_dict(net[0].state_dict())
    net[0] = quantised.to("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = wrap(net, index=(OUT_INDEX, None))
        layer = model.base_model.model[0]
        x = torch.randn(3, 10)
        out = layer(x)
        torch.testing.assert_close(out, expected_output(layer, x))
        out.sum().backward()
    assert layer.lora_B["default"].weight.grad is not None
    with pytest.raises(AgmlError, match="cannot merge"):
        layer.merge()


# 3. add_weighted_adapter ---------------------------------------------------------------------------------------------


SAME = NeuronMasks({1: [3, 10, 40, 63]})
OTHER = NeuronMasks({1: [0, 5, 6, 7]})
IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def two_masked_adapters(second: NeuronMasks) -> nn.Module:
    model = apply_masked_lora(tiny_model("llama"), SAME, r=4, alpha=8)
    apply_masked_lora(model, second, r=4, alpha=8, adapter_name="b")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def combined_logits(model: nn.Module, combination: str, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits with both adapters active, logits of their add_weighted_adapter combination)."""
    model.base_model.set_adapter(["default", "b"])
    with torch.no_grad():
        both = model(input_ids=IDS).logits
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "merged", combination_type=combination, **options)
    model.set_adapter("merged")
    with torch.no_grad():
        return both, model(input_ids=IDS).logits


@pytest.mark.parametrize("second", [SAME, OTHER], ids=["same-masks", "other-masks"])
def test_add_weighted_adapter_svd_equals_both_adapters_active(second):
    both, merged = combined_logits(two_masked_adapters(second), "svd", svd_rank=8)
    torch.testing.assert_close(merged, both, atol=1e-5, rtol=1e-5)


def test_add_weighted_adapter_cat_on_shared_masks_is_exact_and_masked():
    model = two_masked_adapters(SAME)
    both, merged = combined_logits(model, "cat")
    torch.testing.assert_close(merged, both)
    assert adapter_masks(model, "merged").to_lists() == SAME.to_lists()


def test_add_weighted_adapter_linear_on_shared_masks_keeps_the_mask():
    model = two_masked_adapters(SAME)
    _, merged = combined_logits(model, "linear")
    assert torch.isfinite(merged).all()
    up = model.get_base_model().model.layers[1].mlp.up_proj
    assert up.lora_B["merged"].weight.shape == (4, 4)
    assert torch.equal(up.neuron_index("merged")[0], SAME[1])


@pytest.mark.parametrize("combination", ["cat", "linear", "ties"])
def test_add_weighted_adapter_tensorwise_on_different_masks_is_refused(combination):
    model = two_masked_adapters(OTHER)
    with pytest.raises(AgmlError, match="same neurons"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "merged", combination_type=combination, density=0.5)


# 4. in-place ops on the output ---------------------------------------------------------------------------------------


def lora_a_grad(cls: type, index, inplace: bool) -> torch.Tensor:
    net = two_layer_net()
    net[1] = nn.ReLU(inplace=inplace)
    model = wrap(net, cls=cls, index=index)
    model(torch.linspace(-1, 1, 40).reshape(4, 10)).sum().backward()
    return model.base_model.model[0].lora_A["default"].weight.grad


@pytest.mark.parametrize("index", [(None, None), (OUT_INDEX, None), (None, IN_INDEX)])
def test_inplace_op_on_output_trains_like_out_of_place(index):
    torch.testing.assert_close(
        lora_a_grad(MaskedLoraLinear, index, inplace=True), lora_a_grad(MaskedLoraLinear, index, inplace=False)
    )


def test_inplace_op_on_output_matches_peft():
    torch.testing.assert_close(
        lora_a_grad(MaskedLoraLinear, (None, None), inplace=True),
        lora_a_grad(PeftLoraLinear, (None, None), inplace=True),
    )


# 5. hotswap ----------------------------------------------------------------------------------------------------------


def test_forward_after_prepare_model_for_compiled_hotswap():
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    model = wrap(two_layer_net(), index=(OUT_INDEX, None)).eval()
    x = torch.randn(3, 10)
    with torch.no_grad():
        before = model(x)
        prepare_model_for_compiled_hotswap(model, target_rank=8)
        assert isinstance(model.base_model.model[0].scaling["default"], torch.Tensor)
        torch.testing.assert_close(model(x), before)


# 6. data-driven initialisations and variants are refused before anything is built -----------------------------------


@pytest.mark.parametrize(
    "options",
    [{"init_lora_weights": "pissa"}, {"init_lora_weights": "olora"}, {"use_dora": True}, {"lora_bias": True}],
    ids=["pissa", "olora", "dora", "lora_bias"],
)
def test_unsupported_options_are_refused_without_leftovers(options):
    model = apply_masked_lora(tiny_model("llama"), NeuronMasks({1: [3, 10]}), r=4)
    layer = model.get_base_model().model.layers[1].mlp.up_proj
    config = LoraConfig(target_modules=["up_proj"], r=4, **options)
    with pytest.raises(AgmlError, match="masked|DoRA"):
        with _pending_indices({layer.get_base_layer(): (torch.tensor([3, 10]), None)}, "new"):
            model.add_adapter("new", config)
    assert list(layer.lora_A) == ["default"] and not layer.lora_variant


def test_data_driven_init_without_mask_is_left_to_peft():
    model = wrap(two_layer_net(), init_lora_weights="olora")
    assert model.base_model.model[0].lora_A["default"].weight.shape == (4, 10)


def test_lora_bias_without_mask_matches_peft():
    x = torch.randn(3, 10)
    outputs = []
    for cls in (PeftLoraLinear, MaskedLoraLinear):
        model = wrap(two_layer_net(), cls=cls, lora_bias=True)
        with torch.no_grad():
            model.base_model.model[0].lora_B["default"].bias.fill_(0.5)
            outputs.append(model(x))
    torch.testing.assert_close(outputs[1], outputs[0])


# 7. mixed precision: bf16 base, fp32 adapter -------------------------------------------------------------------------


def test_bf16_base_fp32_adapter_matches_peft():
    x = torch.randn(6, 10).to(torch.bfloat16)
    results = {}
    for cls in (PeftLoraLinear, MaskedLoraLinear):
        model = wrap(two_layer_net().to(torch.bfloat16), cls=cls)
        layer = model.base_model.model[0]
        assert layer.lora_A["default"].weight.dtype == torch.float32
        out = model(x)
        out.float().sum().backward()
        results[cls] = (out, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)
    for ours, peft in zip(results[MaskedLoraLinear], results[PeftLoraLinear], strict=True):
        torch.testing.assert_close(ours, peft)
