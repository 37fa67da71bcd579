"""Neuron masks: which MLP intermediate neurons of which decoder layers the adapter may touch."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping

import torch

from agml.errors import AgmlError, InputError
from agml.tensor_files import read_tensor_file, write_tensor_file

_FORMAT = "agml-neuron-masks"
SPLITS = ("forget", "retain")
STATISTICS = ("fisher", "saliency")
SCORE_KINDS = ("fisher", "saliency", "combined")


# --- selection maths: normalised importance and the forget/retain contrast -----------------------------------


def importance(scores, split: str, score: str = "fisher") -> torch.Tensor:
    """Normalised per-token importance `(num_layers, intermediate)` of one split of `agml.scoring.NeuronScores`.

    Two scales that say nothing about *which* neurons carry the concept are divided out, in this order:
    1. the split's overall scale (its mean over all neurons): how surprising or long its answers are;
    2. each layer's scale (the layer's mean neuron over both splits, after step 1): Fisher = sum g^2 depends
       on how each layer's activations happen to be scaled (early layers of SmolLM2 hold ~100x the Fisher of
       late ones), so raw values would rank neurons by layer, not by concept.
    What stays: differences between neurons of a layer, and whether a layer as a whole matters more for the
    forget set than for the retain set. "combined" averages normalised Fisher and saliency.
    """
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    if score not in SCORE_KINDS:
        raise InputError(f"score must be one of {SCORE_KINDS}, got {score!r}")
    stats = STATISTICS if score == "combined" else (score,)
    parts = []
    for stat in stats:
        by_split = {s: getattr(scores, f"{s}_{stat}") for s in SPLITS}
        by_split = {s: x / x.mean().clamp_min(1e-30) for s, x in by_split.items()}
        layer_scale = (0.5 * (by_split["forget"] + by_split["retain"])).mean(1, keepdim=True).clamp_min(1e-30)
        parts.append(by_split[split] / layer_scale)
    return sum(parts) / len(parts)


def contrast(scores, score: str = "fisher", retain_weight: float = 1.0) -> torch.Tensor:
    """Concept specificity `forget - retain_weight * retain` of the normalised importances (see build_masks)."""
    return importance(scores, "forget", score) - retain_weight * importance(scores, "retain", score)


def _as_index(layer: int, ids) -> torch.Tensor:
    t = torch.as_tensor(ids) if len(ids) else torch.empty(0, dtype=torch.int64)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise InputError(f"mask for layer {layer} must hold integer neuron ids, got {t.dtype}")
    t = t.to(torch.int64).reshape(-1).cpu()
    if t.numel() and int(t.min()) < 0:
        raise InputError(f"mask for layer {layer} has a negative neuron id {int(t.min())}")
    if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
        raise InputError(f"mask for layer {layer} must be sorted and unique")
    return t.contiguous()


class NeuronMasks(Mapping[int, torch.Tensor]):
    """Map decoder layer index -> sorted unique int64 ids of MLP intermediate neurons.

    Layers whose id tensor is empty are dropped: an empty mask means "leave this layer alone".
    `meta` carries optional facts about the model the mask was built for
    (`num_layers`, `intermediate_size`, `model`), checked by `validate_for`.
    """

    def __init__(self, layers: Mapping[int, torch.Tensor | list[int]], meta: Mapping[str, object] | None = None):
        cleaned: dict[int, torch.Tensor] = {}
        for layer, ids in layers.items():
            if int(layer) < 0:
                raise InputError(f"mask names a negative layer index {layer}")
            index = _as_index(int(layer), ids)
            if index.numel():
                cleaned[int(layer)] = index
        self._layers = dict(sorted(cleaned.items()))
        self.meta = dict(meta or {})

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self._layers[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        counts = {layer: int(ids.numel()) for layer, ids in self._layers.items()}
        return f"NeuronMasks({counts})"

    @property
    def total(self) -> int:
        """Number of selected neurons over all layers."""
        return sum(int(ids.numel()) for ids in self._layers.values())

    def validate_for(self, num_layers: int, intermediate_size: int) -> None:
        """Raise InputError when the mask was built for another model or names a layer or neuron it lacks."""
        built_for = (self.meta.get("num_layers"), self.meta.get("intermediate_size"))
        if None not in built_for and tuple(built_for) != (num_layers, intermediate_size):
            raise InputError(
                f"the mask was built for a model with {built_for[0]} layers x {built_for[1]} MLP neurons "
                f"({self.meta.get('model', 'unknown model')}); this model has {num_layers} x {intermediate_size}"
            )
        for layer, ids in self._layers.items():
            if layer >= num_layers:
                raise InputError(f"mask names decoder layer {layer}, but the model has {num_layers} layers")
            if ids.numel() and int(ids.max()) >= intermediate_size:
                raise InputError(
                    f"mask for layer {layer} names neuron {int(ids.max())}, "
                    f"but the MLP has {intermediate_size} intermediate neurons"
                )

    def save(self, path: str | os.PathLike) -> None:
        """Write safetensors atomically (temporary file, then rename)."""
        tensors = {f"layer.{layer}": ids for layer, ids in self._layers.items()}
        write_tensor_file(path, tensors, _FORMAT, {"meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuronMasks:
        tensors, metadata = read_tensor_file(path, _FORMAT, "mask")
        layers = {}
        for key, ids in tensors.items():
            prefix, _, index = key.partition(".")
            if prefix != "layer" or not index.isdigit():
                raise InputError(f"{path}: unexpected tensor {key!r} in mask file")
            layers[int(index)] = ids
        return cls(layers, meta=json.loads(metadata.get("meta", "{}")))

    def to_lists(self) -> dict[int, list[int]]:
        return {layer: ids.tolist() for layer, ids in self._layers.items()}


def build_masks(
    scores,
    density: float = 0.01,
    strategy: str = "global",
    score: str = "fisher",
    layers: Iterable[int] | None = None,
    max_per_layer: int | None = None,
    retain_weight: float = 1.0,
    outlier_quantile: float | None = 0.999,
    per_layer_standardize: bool = False,
) -> NeuronMasks:
    """Select the concept's neurons from `agml.scoring.NeuronScores`.

    Contrast (per neuron, on the per-token importance of kind `score`: "fisher", "saliency" or "combined",
    normalised by `NeuronScores.importance`: each split by its own mean, then each layer by its mean neuron)::

        c = forget_importance - retain_weight * retain_importance

    i.e. how much more of the forget set's sensitivity than of the retain set's the neuron carries, in units of
    its layer's average neuron. A neuron that matters equally for both (shared machinery: syntax, end of turn,
    general film knowledge) gets c ~ 0 and one that matters more for retain gets c < 0; only c > 0 is ever
    selected, so the budget is a maximum. The normalisation keeps a set whose answers are merely more
    surprising (larger gradients everywhere) from making every neuron look specific to it, and a layer whose
    activations are merely scaled small (large Fisher) from taking the whole budget. Unlike a ratio
    forget/retain, the difference does not blow up for neurons whose importances are both tiny (noise).

    Outliers: neurons whose retain importance lies above the `outlier_quantile` of all retain importances (the
    massive-activation / "matters for every input" neurons) are never selected, even when their large forget
    importance gives them a large difference; touching them would disturb everything. None disables this.

    Budget: `k = max(1, round(density * num_layers * intermediate_size))` neurons. "global" takes the k best
    eligible neurons anywhere; "per-layer" splits k evenly over the allowed layers (earlier layers get the
    remainder) and takes the best of each layer. `layers` restricts selection to those decoder layers,
    `max_per_layer` caps every layer. Ties break deterministically: contrast descending, then (layer, neuron)
    ascending. `layer_range` turns "8-20" into such a list.

    `per_layer_standardize`: rank by the contrast z-scored within each layer (`standardized_by_layer`) instead of
    the contrast itself, so a layer shifted as a whole cannot take the budget; eligibility stays "c > 0".
    """
    from agml.scoring import SCORE_KINDS

    if not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise InputError(f"density must be in (0, 1], got {density!r}")
    if strategy not in ("global", "per-layer"):
        raise InputError(f"strategy must be 'global' or 'per-layer', got {strategy!r}")
    if score not in SCORE_KINDS:
        raise InputError(f"score must be one of {list(SCORE_KINDS)}, got {score!r}")
    if max_per_layer is not None and (not isinstance(max_per_layer, int) or max_per_layer < 1):
        raise InputError(f"max_per_layer must be a positive integer or None, got {max_per_layer!r}")
    if retain_weight < 0:
        raise InputError(f"retain_weight must be >= 0, got {retain_weight}")
    if outlier_quantile is not None and not 0.0 < outlier_quantile <= 1.0:
        raise InputError(f"outlier_quantile must be in (0, 1] or None, got {outlier_quantile}")
    num_layers, width = scores.num_layers, scores.intermediate_size
    allowed = sorted(set(range(num_layers) if layers is None else (int(i) for i in layers)))
    if not allowed or allowed[0] < 0 or allowed[-1] >= num_layers:
        raise InputError(f"layers must name decoder layers in 0..{num_layers - 1}, got {allowed}")

    specificity = contrast(scores, score, retain_weight)
    eligible = specificity > 0  # also drops NaN
    layer_allowed = torch.zeros(num_layers, dtype=torch.bool)
    layer_allowed[allowed] = True
    eligible &= layer_allowed[:, None]
    if outlier_quantile is not None and outlier_quantile < 1.0:
        retain = importance(scores, "retain", score)
        eligible &= retain <= torch.quantile(retain.flatten().double(), outlier_quantile).float()

    budget = max(1, round(float(density) * num_layers * width))
    # Stable sort of -ranking over the flattened (layer, neuron) order: ties keep (layer, neuron) ascending.
    ranking = standardized_by_layer(specificity) if per_layer_standardize else specificity
    flat = torch.where(eligible, ranking, torch.tensor(float("-inf"))).flatten()
    order = torch.sort(-flat, stable=True).indices[: int(eligible.sum())]
    if strategy == "global":
        quota = {layer: budget for layer in allowed}
    else:
        share, extra = divmod(budget, len(allowed))
        quota = {layer: share + (1 if i < extra else 0) for i, layer in enumerate(allowed)}
    if max_per_layer is not None:
        quota = {layer: min(q, max_per_layer) for layer, q in quota.items()}
    chosen: dict[int, list[int]] = {layer: [] for layer in allowed}
    taken = 0
    for index in order.tolist():
        layer, neuron = divmod(index, width)
        if taken == budget:
            break
        if len(chosen[layer]) < quota[layer]:
            chosen[layer].append(neuron)
            taken += 1
    if taken == 0:
        raise AgmlError(
            f"no neuron matters more for the forget answers than {retain_weight:g} x for the retain answers "
            f"(score={score}); lower the weight (--mask-retain-weight; 1 weighs both sets alike) or check the "
            "forget/retain sets"
        )
    meta = {
        **{k: v for k, v in scores.meta.items() if k == "model"},
        "num_layers": num_layers,
        "intermediate_size": width,
        "density": float(density),
        "strategy": strategy,
        "score": score,
        "retain_weight": float(retain_weight),
        "outlier_quantile": outlier_quantile,
        "budget": budget,
        "selected": taken,
        **({"per_layer_standardize": True} if per_layer_standardize else {}),
    }
    return NeuronMasks({layer: sorted(ids) for layer, ids in chosen.items()}, meta=meta)


# Masks below this size were measured to forget nothing on one of the three shipped concepts (Inception's dev
# split: 1 neuron at --mask-retain-weight 3) while 15-26 neurons forgot on all three (docs/results.md, session 14).
SMALL_MASK_NEURONS = 10


def budget_shortfall(masks: NeuronMasks) -> str | None:
    """A line for the run log when fewer neurons have a positive contrast than the density budget (None when filled).

    Only c = forget - w * retain > 0 is eligible, so --density is a maximum: at the default weight 2 the shipped
    concepts keep 15-26 of 115 neurons (a note); under SMALL_MASK_NEURONS it is a warning, since a mask that small
    can carry none of the concept (docs/architecture.md, "Two weights")."""
    budget, selected = masks.meta.get("budget"), masks.total
    if budget is None or selected >= budget:
        return None
    shortfall = (f"{selected} of the {budget} neurons that --density allows matter more for the forget answers than "
                 f"{masks.meta.get('retain_weight', 1.0):g} x for the retain answers")
    if selected >= SMALL_MASK_NEURONS:
        return f"note: {shortfall}; the mask is that size"
    return (f"warning: only {shortfall}; a mask under {SMALL_MASK_NEURONS} neurons may not carry the concept (lower "
            "--mask-retain-weight for a fuller one)")


# --- mask options and controls (issue 15): layer ranges, per-layer standardisation, random masks, overlap --------


def standardized_by_layer(contrast: torch.Tensor) -> torch.Tensor:
    """Each layer's row z-scored over its finite entries (a constant layer becomes 0)."""
    finite = torch.isfinite(contrast)
    values = torch.where(finite, contrast, torch.zeros_like(contrast))
    count = finite.sum(1, keepdim=True).clamp_min(1)
    mean = values.sum(1, keepdim=True) / count
    spread = (torch.where(finite, contrast - mean, torch.zeros_like(contrast)) ** 2).sum(1, keepdim=True) / count
    return torch.where(finite, (contrast - mean) / spread.sqrt().clamp_min(1e-12), contrast)


def layer_range(spec: str, num_layers: int) -> list[int]:
    """Decoder layers named by "A-B" (inclusive), "A-" (to the last), "-B" or a single "A"; for build_masks."""
    text = spec.strip() if isinstance(spec, str) else ""
    first, dash, last = text.partition("-")
    try:
        if not text or text == "-":
            raise ValueError
        low = int(first) if first.strip() else 0
        high = (int(last) if last.strip() else num_layers - 1) if dash else low
    except ValueError:
        raise InputError(f"layer range must look like '8-20', '8-', '-20' or '8', got {spec!r}") from None
    if not 0 <= low <= high < num_layers:
        raise InputError(f"layer range {spec!r} must lie within 0..{num_layers - 1} with start <= end")
    return list(range(low, high + 1))


def random_masks_like(masks: NeuronMasks, intermediate_size: int, seed: int) -> NeuronMasks:
    """A random mask with the same number of neurons in each layer (the control for activation-guided masks)."""
    generator = torch.Generator().manual_seed(seed)
    layers = {layer: torch.randperm(intermediate_size, generator=generator)[: ids.numel()].sort().values
              for layer, ids in masks.items()}
    return NeuronMasks(layers, meta={**{k: v for k, v in masks.meta.items()
                                        if k in ("num_layers", "intermediate_size", "model")},
                                     "random_seed": seed})


def mask_jaccard(first: Mapping[int, torch.Tensor], second: Mapping[int, torch.Tensor]) -> float:
    """|A & B| / |A | B| over (layer, neuron) pairs; 1.0 for two empty masks."""
    def pairs(masks):
        return {(layer, n) for layer, ids in masks.items() for n in torch.as_tensor(ids).tolist()}

    a, b = pairs(first), pairs(second)
    return len(a & b) / len(a | b) if a | b else 1.0
