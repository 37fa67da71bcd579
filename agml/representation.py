"""Representation-level forgetting on the selected neurons, and SimNPO's loss.

RMU-style term (after Li et al., 2024, "The WMDP benchmark", restricted here to the masked MLP neurons): the
activations of the selected neurons (the input of each masked layer's `down_proj`) are pushed, at the concept's
token positions and/or the answer positions of forget batches, toward a fixed random direction of length
`coefficient` times their typical norm under the base model; on retain batches they are pulled toward the base
model's own activations. The base activations come from the same model with its adapter disabled (no second
copy), so a fresh adapter (B = 0) has a retain term of exactly 0. Both terms are divided by the squared typical
norm per layer, so layers of different scales weigh the same and the forget term starts near 1 + coefficient^2.

SimNPO (Fan et al., 2024): NPO without a reference model, on the length-normalised log-likelihood,
    loss = -(2 / beta) * mean_rows logsigmoid(-(beta / |y|) * log p(y) - gamma).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from agml.architecture import base_linear, mlp_modules
from agml.data import IGNORE_INDEX
from agml.entities import entity_positions
from agml.errors import InputError

POSITIONS = ("answer", "entity", "entity+answer")


def selected_neurons(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """The neurons the model's adapter may touch, per layer; every neuron of every layer for a plain LoRA adapter."""
    from agml.layers import adapter_masks

    masks = adapter_masks(model) if hasattr(model, "peft_config") else {}
    if len(masks):
        return {layer: ids for layer, ids in masks.items()}
    mlps = mlp_modules(model)
    width = base_linear(mlps[0].down_proj).in_features
    return {layer: torch.arange(width) for layer in range(len(mlps))}


@contextmanager
def captured_activations(model: torch.nn.Module, neurons: Mapping[int, torch.Tensor]) -> Iterator[list[dict]]:
    """Record, for every forward inside the block, {layer: down_proj input at the selected neurons (B, T, k)}.

    Yields a list that gets one dict per forward pass (gradients flow through the recorded tensors).
    """
    mlps = mlp_modules(model)
    records: list[dict[int, torch.Tensor]] = []
    first = min(neurons) if neurons else None

    def hook_for(layer: int, ids: torch.Tensor):
        def hook(_module, args):
            if layer == first:
                records.append({})
            elif not records:
                records.append({})
            records[-1][layer] = args[0][..., ids.to(args[0].device)]
        return hook

    handles = [mlps[layer].down_proj.register_forward_pre_hook(hook_for(layer, ids))
               for layer, ids in sorted(neurons.items())]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def random_directions(neurons: Mapping[int, torch.Tensor], seed: int) -> dict[int, torch.Tensor]:
    """A fixed random unit vector per layer over its selected neurons, from (seed, layer) alone."""
    directions = {}
    for layer, ids in neurons.items():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + layer)
        vector = torch.randn(len(ids), generator=generator)
        directions[layer] = vector / vector.norm().clamp_min(1e-12)
    return directions


def statistic_positions(batch: dict[str, torch.Tensor], positions: str,
                        concept_token_ids: Sequence[Sequence[int]] = ()) -> torch.Tensor:
    """Bool (batch, seq): answer tokens, the concept's name tokens (see agml.entities), or both."""
    if positions not in POSITIONS:
        raise InputError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")
    found = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    if "answer" in positions:
        found |= batch["labels"] != IGNORE_INDEX
    if "entity" in positions and concept_token_ids:
        found |= entity_positions(batch["input_ids"], concept_token_ids)
    return found & batch["attention_mask"].bool()


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """A forward pass for its activations only (logits of one position where the model allows it)."""
    device = next(model.parameters()).device
    mask = batch["attention_mask"].to(device)
    kwargs = {"input_ids": batch["input_ids"].to(device), "attention_mask": mask,
              "position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "use_cache": False}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        kwargs["logits_to_keep"] = 1
    model(**kwargs)


def _typical_norms(base: Mapping[int, torch.Tensor], where: torch.Tensor) -> dict[int, torch.Tensor]:
    return {layer: acts[where].norm(dim=-1).mean().clamp_min(1e-6) for layer, acts in base.items()}


def _normalised_distance(current: Mapping[int, torch.Tensor], targets: Mapping[int, torch.Tensor],
                         norms: Mapping[int, torch.Tensor], where: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the mean squared distance at `where`, divided by the layer's squared typical norm."""
    terms = [((current[layer][where] - targets[layer]) ** 2).sum(-1).mean() / norms[layer] ** 2
             for layer in sorted(current)]
    return torch.stack(terms).mean()


def rmu_forget_loss(model, batch: dict[str, torch.Tensor], neurons: Mapping[int, torch.Tensor],
                    directions: Mapping[int, torch.Tensor], coefficient: float, positions: str = "entity+answer",
                    concept_token_ids: Sequence[Sequence[int]] = ()) -> torch.Tensor:
    """Selected activations at the chosen positions vs `coefficient` x typical norm x the layer's direction."""
    device = next(model.parameters()).device
    where = statistic_positions(batch, positions, concept_token_ids).to(device)
    if not bool(where.any()):
        return torch.zeros((), device=device)
    with torch.no_grad(), model.disable_adapter(), captured_activations(model, neurons) as base:
        _forward(model, batch)
    norms = _typical_norms(base[0], where)
    with captured_activations(model, neurons) as current:
        _forward(model, batch)
    targets = {layer: coefficient * norms[layer] * directions[layer].to(device, current[0][layer].dtype)
               for layer in current[0]}
    return _normalised_distance(current[0], targets, norms, where)


def rmu_retain_terms(model, batch: dict[str, torch.Tensor], neurons: Mapping[int, torch.Tensor]):
    """(KL(base || model) per retain answer token, selected-activation distance to the base, model AnswerLogits).

    Both come from the two forwards the KL needs anyway (base with adapter disabled, then the model).
    """
    from agml.logprobs import answer_token_weights
    from agml.objectives import answer_logits, base_answer_logits, kl_per_token

    device = next(model.parameters()).device
    with captured_activations(model, neurons) as base_acts:
        base = base_answer_logits(model, batch)
    with captured_activations(model, neurons) as current_acts:
        current = answer_logits(model, batch)
    where = statistic_positions(batch, "answer").to(device)
    base_layers = {layer: acts.detach() for layer, acts in base_acts[0].items()}
    norms = _typical_norms(base_layers, where)
    targets = {layer: acts[where] for layer, acts in base_layers.items()}
    distance = _normalised_distance(current_acts[0], targets, norms, where)
    return kl_per_token(base, current, answer_token_weights(batch)), distance, current


def simnpo_loss(logp: torch.Tensor, lengths: torch.Tensor, beta: float, gamma: float = 0.0) -> torch.Tensor:
    """-(2/beta) * mean(logsigmoid(-(beta/|y|) * logp - gamma)); logp summed per row, lengths in tokens."""
    return -(2.0 / beta) * F.logsigmoid(-(beta / lengths.clamp_min(1)) * logp - gamma).mean()
