"""Streaming per-neuron statistics: Fisher sum g^2 and saliency sum |a*g| over tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NeuronStats:
    """Per-neuron sums over unmasked tokens, accumulated in float32."""

    fisher: torch.Tensor
    saliency: torch.Tensor
    tokens: int

    def __add__(self, other: NeuronStats) -> NeuronStats:
        if not isinstance(other, NeuronStats):
            return NotImplemented
        if self.fisher.shape != other.fisher.shape:
            raise ValueError(f"cannot add NeuronStats of {tuple(self.fisher.shape)} and {tuple(other.fisher.shape)}")
        return NeuronStats(self.fisher + other.fisher, self.saliency + other.saliency, self.tokens + other.tokens)

    @classmethod
    def zeros(cls, hidden: int, device: torch.device | str = "cpu") -> NeuronStats:
        z = torch.zeros(hidden, dtype=torch.float32, device=device)
        return cls(z, z.clone(), 0)


def _flatten(acts, grads, token_mask):
    if not isinstance(acts, torch.Tensor) or not isinstance(grads, torch.Tensor):
        raise ValueError("acts and grads must be torch.Tensors")
    if acts.shape != grads.shape:
        raise ValueError(f"acts and grads must have the same shape, got {tuple(acts.shape)} and {tuple(grads.shape)}")
    if not acts.is_floating_point() or not grads.is_floating_point():
        raise ValueError(f"acts and grads must be floating point, got {acts.dtype} and {grads.dtype}")
    if acts.device != grads.device:
        raise ValueError(f"acts is on {acts.device} but grads is on {grads.device}")
    if acts.dim() < 1:
        raise ValueError("acts must have at least one dimension (..., H)")
    hidden = acts.shape[-1]
    a2 = acts.reshape(-1, hidden)
    g2 = grads.reshape(-1, hidden)
    if token_mask is None:
        return a2, g2, None
    if not isinstance(token_mask, torch.Tensor):
        raise ValueError("token_mask must be a torch.Tensor or None")
    try:
        mask = torch.broadcast_to(token_mask, acts.shape[:-1])
    except RuntimeError as err:
        raise ValueError(
            f"token_mask of shape {tuple(token_mask.shape)} does not broadcast to {tuple(acts.shape[:-1])}"
        ) from err
    return a2, g2, mask.reshape(-1).to(device=acts.device) != 0


def neuron_stats_reference(acts, grads, token_mask=None) -> NeuronStats:
    a2, g2, mask = _flatten(acts, grads, token_mask)
    if mask is not None:
        a2, g2 = a2[mask], g2[mask]
    a32, g32 = a2.float(), g2.float()
    return NeuronStats((g32 * g32).sum(0), (a32 * g32).abs().sum(0), int(a2.shape[0]))


def neuron_stats(acts: torch.Tensor, grads: torch.Tensor, token_mask: torch.Tensor | None = None) -> NeuronStats:
    """Per-neuron Fisher (sum g^2) and saliency (sum |a*g|) over tokens where token_mask is set."""
    return neuron_stats_reference(acts, grads, token_mask)
