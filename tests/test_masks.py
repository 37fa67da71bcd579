"""build_masks: budget, strategies, contrast, outliers, ties, layer range, caps, errors; mask files keep meta."""

from __future__ import annotations

import pytest
import torch

from agml.errors import AgmlError, InputError
from agml.masks import NeuronMasks, budget_shortfall, build_masks
from agml.scoring import NeuronScores


def scores_from(forget: torch.Tensor, retain: torch.Tensor | None = None) -> NeuronScores:
    """NeuronScores whose Fisher and saliency are both the given importances."""
    retain = torch.zeros_like(forget) if retain is None else retain
    return NeuronScores(forget_fisher=forget, forget_saliency=forget, retain_fisher=retain, retain_saliency=retain,
                        forget_tokens=10, retain_tokens=10, meta={"model": "synthetic"})


def random_scores(layers: int = 4, width: int = 50, seed: int = 0) -> NeuronScores:
    gen = torch.Generator().manual_seed(seed)
    return scores_from(torch.rand(layers, width, generator=gen), 0.5 * torch.rand(layers, width, generator=gen))


def selected(masks: NeuronMasks) -> set[tuple[int, int]]:
    return {(layer, int(n)) for layer, ids in masks.items() for n in ids}


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval_is_an_input_error(density):
    with pytest.raises(InputError, match="density"):
        build_masks(random_scores(), density=density)


def test_density_is_a_fraction_of_all_mlp_neurons_and_at_least_one():
    scores = random_scores(layers=4, width=50)  # 200 neurons
    assert build_masks(scores, density=0.05, retain_weight=0.0).total == 10
    assert build_masks(scores, density=1e-9).total == 1
    assert build_masks(scores, density=1.0, retain_weight=0.0, outlier_quantile=None).total == 200


def test_global_selection_takes_the_largest_contrast_anywhere():
    forget = torch.ones(3, 6)
    bumps = {(0, 1): 9.0, (0, 2): 8.0, (1, 5): 7.0, (1, 0): 6.0, (1, 3): 4.0, (2, 4): 17.0}  # 17 per layer
    for (layer, neuron), bump in bumps.items():
        forget[layer, neuron] += bump
    masks = build_masks(scores_from(forget, torch.ones(3, 6)), density=3 / 18, outlier_quantile=None)
    assert masks.to_lists() == {0: [1, 2], 2: [4]}
    assert masks.meta == {"model": "synthetic", "num_layers": 3, "intermediate_size": 6, "density": 3 / 18,
                          "strategy": "global", "score": "fisher", "retain_weight": 1.0, "outlier_quantile": None,
                          "budget": 3, "selected": 3}


def test_contrast_drops_neurons_that_matter_as_much_for_retain():
    forget = torch.tensor([[5.0, 4.0, 3.0, 0.5]])
    retain = torch.tensor([[5.0, 0.1, 0.0, 0.0]])  # neuron 0: big for both sets
    masks = build_masks(scores_from(forget, retain), density=0.5, outlier_quantile=None)
    assert masks.to_lists() == {0: [1, 2]}
    # Only positive contrast is eligible: the budget is a maximum.
    assert build_masks(scores_from(forget, retain), density=1.0, outlier_quantile=None).to_lists() == {0: [1, 2, 3]}
    # retain_weight 0 ranks by forget importance alone.
    assert build_masks(scores_from(forget, retain), density=0.25, retain_weight=0.0,
                       outlier_quantile=None).to_lists() == {0: [0]}


def test_outliers_with_huge_retain_importance_are_excluded():
    forget = torch.stack([torch.ones(100), torch.full((100,), 0.5)])  # layer 0 leans forget, layer 1 retain
    retain = torch.stack([torch.full((100,), 0.5), torch.ones(100)])
    forget[1, 7], retain[1, 7] = 50.0, 30.0  # a massive neuron: largest contrast, but large for everything
    with_outliers = build_masks(scores_from(forget, retain), density=0.005, outlier_quantile=None)
    assert with_outliers.to_lists() == {1: [7]}
    without = build_masks(scores_from(forget, retain), density=0.005, outlier_quantile=0.99)
    assert without.to_lists() == {0: [0]}


def test_overall_scale_of_a_split_does_not_make_neurons_specific():
    gen = torch.Generator().manual_seed(3)
    shared = torch.rand(2, 50, generator=gen)
    forget = 10 * shared  # the forget answers are just more surprising: every gradient 10x larger
    forget[1, 9] += 5.0  # the one neuron that really is forget-specific
    masks = build_masks(scores_from(forget, shared), density=0.01, outlier_quantile=None)
    assert masks.to_lists() == {1: [9]}


def test_ties_break_by_layer_then_neuron():
    forget = torch.ones(3, 4)
    masks = build_masks(scores_from(forget), density=5 / 12, outlier_quantile=None)
    assert masks.to_lists() == {0: [0, 1, 2, 3], 1: [0]}
    assert build_masks(scores_from(forget), density=5 / 12, outlier_quantile=None).to_lists() == masks.to_lists()


def test_per_layer_strategy_splits_the_budget_evenly():
    forget = torch.ones(3, 10)
    forget[0, :7] = 10.0  # layer 0: seven forget-specific neurons; layers 1 and 2: one each
    forget[1:, 0] = 10.0
    scores = scores_from(forget, torch.ones(3, 10))
    per_layer = build_masks(scores, density=7 / 30, strategy="per-layer", outlier_quantile=None)
    # Quotas 3 + 2 + 2 (earlier layers get the remainder); layers 1 and 2 have one positive contrast only.
    assert per_layer.to_lists() == {0: [0, 1, 2], 1: [0], 2: [0]}
    assert per_layer.meta["selected"] == 5
    assert build_masks(scores, density=7 / 30, outlier_quantile=None).to_lists() == {0: [0, 1, 2, 3, 4], 1: [0],
                                                                                       2: [0]}


def test_max_per_layer_caps_every_layer():
    scores = random_scores(layers=4, width=50, seed=1)
    masks = build_masks(scores, density=0.2, max_per_layer=6, retain_weight=0.0)
    assert all(ids.numel() <= 6 for ids in masks.values())
    assert masks.total == 24  # budget 40, but only 4 layers x 6 allowed
    with pytest.raises(InputError, match="max_per_layer"):
        build_masks(scores, max_per_layer=0)


def test_layer_range_restricts_selection():
    scores = random_scores(layers=6, width=20, seed=2)
    for layers in (range(2, 4), [5, 1]):
        masks = build_masks(scores, density=0.1, layers=layers, retain_weight=0.0)
        assert set(masks) <= set(layers) and masks.total == 12
    with pytest.raises(InputError, match="layers"):
        build_masks(scores, layers=range(4, 8))
    with pytest.raises(InputError, match="layers"):
        build_masks(scores, layers=[])


def test_bad_options_are_input_errors():
    scores = random_scores()
    for kwargs, word in (({"strategy": "best"}, "strategy"), ({"score": "magic"}, "score"),
                         ({"retain_weight": -1.0}, "retain_weight"), ({"outlier_quantile": 0.0}, "outlier_quantile")):
        with pytest.raises(InputError, match=word):
            build_masks(scores, **kwargs)


def test_no_forget_specific_neuron_is_an_error():
    forget = torch.ones(2, 5)
    with pytest.raises(AgmlError, match="--mask-retain-weight"):
        build_masks(scores_from(forget, 2 * forget), outlier_quantile=None)


def test_a_mask_smaller_than_its_budget_is_named_in_a_warning():
    forget, retain = torch.ones(2, 5), torch.ones(2, 5)
    retain[1, 3] = 0.1  # the one neuron that matters less for retain than for forget
    masks = build_masks(scores_from(forget, retain), density=0.5, retain_weight=3.0, outlier_quantile=None)
    assert selected(masks) == {(1, 3)} and masks.meta["budget"] == 5
    warning = budget_shortfall(masks)
    assert warning is not None and warning.startswith("warning: only 1 of the 5 neurons") and "3 x" in warning


def test_a_mask_short_of_its_budget_but_not_tiny_gets_a_note_not_a_warning():
    forget = torch.ones(2, 20)
    retain = torch.ones(2, 20)
    retain[0, :12] = 0.1  # twelve neurons matter more for forget than 3 x for retain
    masks = build_masks(scores_from(forget, retain), density=0.5, retain_weight=3.0, outlier_quantile=None)
    assert masks.meta["selected"] == 12 and masks.meta["budget"] == 20
    line = budget_shortfall(masks)
    assert line is not None and line.startswith("note: 12 of the 20 neurons") and "warning" not in line


def test_a_filled_budget_gives_no_warning():
    assert budget_shortfall(build_masks(random_scores(), density=0.05, retain_weight=0.0)) is None


@pytest.mark.parametrize("score", ["fisher", "saliency", "combined"])
def test_score_kind_picks_its_statistic(score):
    fisher, saliency = torch.zeros(1, 4), torch.zeros(1, 4)
    fisher[0, 1], saliency[0, 2] = 1.0, 1.0
    fisher[0, 3], saliency[0, 3] = 0.8, 0.8  # best on the combined (mean-normalised average) scale
    zeros = torch.zeros(1, 4)
    scores = NeuronScores(fisher, saliency, zeros, zeros, forget_tokens=1, retain_tokens=1)
    expected = {"fisher": [1], "saliency": [2], "combined": [3]}[score]
    masks = build_masks(scores, density=0.25, score=score, outlier_quantile=None)
    assert masks.to_lists() == {0: expected}


def test_masks_round_trip_with_meta_and_fit_the_model(tmp_path):
    masks = build_masks(random_scores(), density=0.05)
    masks.save(tmp_path / "masks.safetensors")
    loaded = NeuronMasks.load(tmp_path / "masks.safetensors")
    assert loaded.to_lists() == masks.to_lists() and loaded.meta == masks.meta
    loaded.validate_for(loaded.meta["num_layers"], loaded.meta["intermediate_size"])
