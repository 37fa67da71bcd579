"""Streaming per-neuron statistics: Fisher sum g^2 and saliency sum |a*g| over tokens.

Reference (CPU fallback): chunked over tokens with one reused float32 buffer, no boolean-index copy when every
token counts. Triton: one pass over acts and grads; each program owns a block of neurons and a slice of tokens and
writes its float32 partial sums; the slices are summed in a fixed order (deterministic, no float atomics).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from agml_kernels._backend import import_triton, triton_interpreted, use_triton_for

# Imported on first use of the Triton path (see _backend.import_triton): importing agml_kernels never imports triton.
triton = tl = None


def _ensure_triton() -> None:
    global triton, tl
    if triton is None:
        triton, tl = import_triton()


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
    if token_mask.dtype != torch.bool and not bool(((token_mask == 0) | (token_mask == 1)).all()):
        raise ValueError("token_mask must be bool or hold only 0 and 1")
    try:
        mask = torch.broadcast_to(token_mask, acts.shape[:-1])
    except RuntimeError as err:
        raise ValueError(
            f"token_mask of shape {tuple(token_mask.shape)} does not broadcast to {tuple(acts.shape[:-1])}"
        ) from err
    return a2, g2, mask.reshape(-1).to(device=acts.device) != 0


def _select_tokens(a2, g2, mask):
    """Drop masked-out tokens; no copy when the mask keeps every token."""
    if mask is None or bool(mask.all()):
        return a2, g2
    rows = mask.nonzero().squeeze(1)
    return a2.index_select(0, rows), g2.index_select(0, rows)


# Rows per chunk in the reference: bounds the float32 temporary to about 4M elements.
_REFERENCE_CHUNK_ELEMENTS = 1 << 22


def neuron_stats_reference(acts, grads, token_mask=None) -> NeuronStats:
    """PyTorch path: float32 sums over token chunks, one reused temporary."""
    a2, g2, mask = _flatten(acts, grads, token_mask)
    a2, g2 = _select_tokens(a2, g2, mask)
    tokens, hidden = a2.shape
    fisher = torch.zeros(hidden, dtype=torch.float32, device=a2.device)
    saliency = torch.zeros_like(fisher)
    chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // max(hidden, 1))
    buf = torch.empty((min(chunk, tokens), hidden), dtype=torch.float32, device=a2.device)
    for start in range(0, tokens, chunk):
        a = a2[start : start + chunk].float()  # no copy when already float32
        g = g2[start : start + chunk].float()
        prod = buf[: a.shape[0]]
        torch.mul(g, g, out=prod)
        fisher += prod.sum(0)
        torch.mul(a, g, out=prod).abs_()
        saliency += prod.sum(0)
    return NeuronStats(fisher, saliency, tokens)


def _neuron_stats_kernel(
    a_ptr, g_ptr, mask_ptr, fisher_ptr, saliency_ptr,
    T, H, rows_per_split,
    stride_at, stride_ah, stride_gt, stride_gh, stride_ps,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Partial sums for neurons [pid_h * BLOCK_H, +BLOCK_H) over tokens [pid_s * rows_per_split, +rows_per_split)."""
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    fisher = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    saliency = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    start = pid_s * rows_per_split
    end = start + rows_per_split
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        keep = (offs_t < end) & (offs_t < T)
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + offs_t, mask=keep, other=0) != 0)
        tile_mask = keep[:, None] & mask_h[None, :]
        rows = offs_t[:, None].to(tl.int64)
        a = tl.load(a_ptr + rows * stride_at + offs_h[None, :] * stride_ah, mask=tile_mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows * stride_gt + offs_h[None, :] * stride_gh, mask=tile_mask, other=0.0).to(tl.float32)
        fisher += g * g
        saliency += tl.abs(a * g)
    out = pid_s * stride_ps + offs_h
    tl.store(fisher_ptr + out, tl.sum(fisher, axis=0), mask=mask_h)
    tl.store(saliency_ptr + out, tl.sum(saliency, axis=0), mask=mask_h)


@functools.lru_cache(maxsize=2)
def _kernel(interpreted: bool):
    """JIT-wrap on first use, so the interpreter can be switched on after import (Triton decides at decoration)."""
    _ensure_triton()
    return triton.jit(_neuron_stats_kernel)


def _launch_shape(tokens: int, hidden: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, token splits, rows per split): enough programs to fill the GPU, few in the interpreter."""
    if triton_interpreted():
        block_t, block_h, target_programs = 16, 64, 1
    else:
        block_t, block_h = 32, 128
        target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    h_blocks = triton.cdiv(hidden, block_h)
    t_blocks = max(1, triton.cdiv(tokens, block_t))
    splits = max(1, min(t_blocks, triton.cdiv(target_programs, h_blocks)))
    if triton_interpreted():
        splits = min(t_blocks, 2)  # still exercise the cross-split reduction
    rows_per_split = triton.cdiv(t_blocks, splits) * block_t
    splits = max(1, triton.cdiv(tokens, rows_per_split))
    return block_t, block_h, splits, rows_per_split


def neuron_stats_triton(acts, grads, token_mask=None) -> NeuronStats:
    """Triton path: one pass over acts and grads, per-split float32 partials, fixed-order reduction."""
    a2, g2, mask = _flatten(acts, grads, token_mask)
    tokens, hidden = a2.shape
    kernel = _kernel(triton_interpreted())
    block_t, block_h, splits, rows_per_split = _launch_shape(tokens, hidden, a2.device)
    partials = torch.zeros((2, splits, hidden), dtype=torch.float32, device=a2.device)
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else None
    if tokens > 0 and hidden > 0:
        kernel[(triton.cdiv(hidden, block_h), splits)](
            a2, g2, mask_u8 if mask_u8 is not None else a2, partials[0], partials[1],
            tokens, hidden, rows_per_split,
            a2.stride(0), a2.stride(1), g2.stride(0), g2.stride(1), partials.stride(1),
            HAS_MASK=mask_u8 is not None, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4,
        )  # fmt: skip
    sums = partials.sum(1)
    counted = tokens if mask is None else int(mask.sum())
    return NeuronStats(sums[0], sums[1], counted)


def neuron_stats(acts: torch.Tensor, grads: torch.Tensor, token_mask: torch.Tensor | None = None) -> NeuronStats:
    """Per-neuron Fisher (sum g^2) and saliency (sum |a*g|) over tokens where token_mask is set.

    Sums are float32 whatever the input dtype, and deterministic. Stream over batches with `+`.
    """
    if isinstance(acts, torch.Tensor) and use_triton_for(acts):
        return neuron_stats_triton(acts, grads, token_mask)
    return neuron_stats_reference(acts, grads, token_mask)
