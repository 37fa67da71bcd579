"""agml.architecture.neuron_sites: the MLP-layout seam, on Llama/Qwen2 and on tiny Gemma and Phi-3 models."""

from __future__ import annotations

import pytest
import torch
from test_layers import down_proj_input, randomize_lora
from test_scoring import PAD, random_examples, reference_scores
from tiny_models import tiny_model

from agml.adapters import adapter_masks, apply_masked_lora, load_adapter, save_adapter
from agml.architecture import neuron_sites
from agml.data import collate
from agml.errors import AgmlError
from agml.masks import NeuronMasks
from agml.scoring import score_neurons

MASKS = NeuronMasks({0: [], 1: torch.tensor([3, 10, 40, 63])})


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_sites_of_separate_gate_up_down_projections(arch):
    model = tiny_model(arch)
    sites = neuron_sites(model)
    assert [site.key for site in sites] == [0, 1]
    for site, layer in zip(sites, model.model.layers, strict=True):
        assert site.mlp is layer.mlp and site.width == 64
        assert site.writers == (("gate_proj", 0), ("up_proj", 0)) and site.reader == "down_proj"
        assert site.projections == ("gate_proj", "up_proj", "down_proj")
        assert site.rows("up_proj", torch.tensor([2, 5])).tolist() == [2, 5]


def test_gemma_scores_equal_hand_computed_reference():
    model = tiny_model("gemma")
    forget, retain = random_examples(4, seed=0), random_examples(3, seed=1)
    scores = score_neurons(model, [collate(forget, PAD)], [collate(retain, PAD)], progress=False)
    for split, examples in (("forget", forget), ("retain", retain)):
        fisher, saliency, tokens = reference_scores(model, examples)
        torch.testing.assert_close(getattr(scores, f"{split}_fisher"), fisher, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(getattr(scores, f"{split}_saliency"), saliency, rtol=1e-4, atol=1e-10)
        assert getattr(scores, f"{split}_tokens") == tokens


def test_gemma_masked_adapter_touches_only_the_selected_neurons(tmp_path):
    model = apply_masked_lora(tiny_model("gemma"), MASKS, r=4, alpha=8)
    randomize_lora(model)
    input_ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    adapted = down_proj_input(model, 1, input_ids)
    with model.disable_adapter():
        base = down_proj_input(model, 1, input_ids)
    changed = (adapted - base).abs().amax(dim=(0, 1)) > 0
    assert changed.nonzero().flatten().tolist() == MASKS[1].tolist()
    assert adapter_masks(model).to_lists() == {1: MASKS[1].tolist()}
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(tiny_model("gemma"), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_fused_gate_up_projection_is_refused_by_name():
    model = tiny_model("phi3")
    for attempt in (lambda: neuron_sites(model), lambda: apply_masked_lora(model, MASKS),
                    lambda: score_neurons(model, [collate(random_examples(2, 0), PAD)],
                                          [collate(random_examples(2, 1), PAD)], progress=False)):
        with pytest.raises(AgmlError, match="gate_up_proj"):
            attempt()


def test_adapter_config_records_the_local_folder_not_the_alias(tmp_path):
    import warnings

    base = tiny_model("llama")
    folder = tmp_path / "base"
    base.save_pretrained(folder)
    base.name_or_path = base.config.name_or_path = "some-built-in-alias"  # what load_model records for an alias
    base.agml_local_folder = str(folder)
    model = apply_masked_lora(base, MASKS, r=4, alpha=8)
    assert model.peft_config["default"].base_model_name_or_path == str(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_adapter(model, tmp_path / "adapter")
    assert not [w for w in caught if "config file" in str(w.message) or "remote file" in str(w.message)]
    import json

    assert json.loads((tmp_path / "adapter" / "agml_config.json").read_text())["base_model"] == "some-built-in-alias"
