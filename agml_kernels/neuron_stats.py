"""Streaming per-neuron statistics: Fisher sum g^2 and saliency sum |a*g| over tokens.

`NeuronStats` holds running float32 sums and a running token count, all on the device; `accumulate_` adds one
batch into them in place. Synchronisation invariant: with a bool (or absent) token mask, `accumulate_` never
synchronises the device with the host; the count stays a device tensor until `.tokens` is read. (A non-bool mask is
checked to hold only 0 and 1, which reads it: pass bool masks on the hot path.)

Reference (CPU fallback): chunked over tokens with one reused float32 buffer; masked-out tokens are zeroed by
multiplication, not selected (selection would need the count on the host). Triton: one pass over acts and grads;
each program owns a block of neurons and a slice of tokens and writes float32 partial sums (splits bounded by
4 x SM count / neuron blocks); a second small kernel adds the slices in a fixed order into the running sums
(deterministic, no float atomics) and the kept-token counts into the running count.
Both are the op `agml::neuron_stats_accumulate_` (registered with `torch.library`, so `torch.compile` traces it).
"""

from __future__ import annotations

import contextlib
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
    """Per-neuron sums over unmasked tokens, accumulated in float32; `token_count` is a 0-d int64 device tensor.

    The third constructor argument may be an int or a tensor; `tokens` reads the count as an int (synchronises).
    """

    fisher: torch.Tensor
    saliency: torch.Tensor
    token_count: torch.Tensor | int

    def __post_init__(self) -> None:
        if not isinstance(self.token_count, torch.Tensor):
            self.token_count = torch.tensor(int(self.token_count), dtype=torch.int64, device=self.fisher.device)

    @property
    def tokens(self) -> int:
        return int(self.token_count)

    def __add__(self, other: NeuronStats) -> NeuronStats:
        if not isinstance(other, NeuronStats):
            return NotImplemented
        if self.fisher.shape != other.fisher.shape:
            raise ValueError(f"cannot add NeuronStats of {tuple(self.fisher.shape)} and {tuple(other.fisher.shape)}")
        return NeuronStats(self.fisher + other.fisher, self.saliency + other.saliency,
                           self.token_count + other.token_count)  # fmt: skip

    @classmethod
    def zeros(cls, hidden: int, device: torch.device | str = "cpu") -> NeuronStats:
        z = torch.zeros(hidden, dtype=torch.float32, device=device)
        return cls(z, z.clone(), torch.zeros((), dtype=torch.int64, device=device))

    def accumulate_(self, acts: torch.Tensor, grads: torch.Tensor, token_mask: torch.Tensor | None = None):
        """Add one batch's sums and kept-token count into these buffers, in place; returns self."""
        a2, g2, mask = _flatten(acts, grads, token_mask)
        if a2.shape[1] != self.fisher.shape[0]:
            raise ValueError(f"acts have {a2.shape[1]} neurons but these stats hold {self.fisher.shape[0]}")
        if a2.device != self.fisher.device:
            raise ValueError(f"acts are on {a2.device} but these stats are on {self.fisher.device}")
        _accumulate_op(a2, g2, mask, self.fisher, self.saliency, self.token_count)
        return self


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


# Rows per chunk in the reference: bounds the float32 temporary to about 4M elements.
_REFERENCE_CHUNK_ELEMENTS = 1 << 22


def _accumulate_reference(a2, g2, mask, fisher, saliency, count) -> None:
    """PyTorch path: float32 sums over token chunks, one reused temporary; masked tokens multiplied by 0."""
    tokens, hidden = a2.shape
    chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // max(hidden, 1))
    buf = torch.empty((min(chunk, tokens), hidden), dtype=torch.float32, device=a2.device)
    for start in range(0, tokens, chunk):
        g = g2[start : start + chunk].float()  # no copy when already float32
        if mask is not None:
            g = g * mask[start : start + chunk, None]
        prod = buf[: g.shape[0]]
        torch.mul(g, g, out=prod)
        fisher += prod.sum(0)
        torch.mul(a2[start : start + chunk], g, out=prod).abs_()
        saliency += prod.sum(0)
    count += tokens if mask is None else mask.sum()


def _neuron_stats_kernel(
    a_ptr, g_ptr, mask_ptr, fisher_ptr, saliency_ptr, count_ptr,
    T, H, rows_per_split,
    stride_at, stride_ah, stride_gt, stride_gh, stride_ps,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Partial sums for neurons [pid_h * BLOCK_H, +BLOCK_H) over tokens [pid_s * rows_per_split, +rows_per_split).

    Programs of the first neuron block also write their slice's kept-token count.
    """
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    fisher = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    saliency = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    kept = tl.zeros((BLOCK_T,), dtype=tl.int32)
    start = pid_s * rows_per_split
    end = start + rows_per_split
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        keep = (offs_t < end) & (offs_t < T)
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + offs_t, mask=keep, other=0) != 0)
        kept += keep.to(tl.int32)
        tile_mask = keep[:, None] & mask_h[None, :]
        rows = offs_t[:, None].to(tl.int64)
        a = tl.load(a_ptr + rows * stride_at + offs_h[None, :] * stride_ah, mask=tile_mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows * stride_gt + offs_h[None, :] * stride_gh, mask=tile_mask, other=0.0).to(tl.float32)
        fisher += g * g
        saliency += tl.abs(a * g)
    out = pid_s * stride_ps + offs_h
    tl.store(fisher_ptr + out, tl.sum(fisher, axis=0), mask=mask_h)
    tl.store(saliency_ptr + out, tl.sum(saliency, axis=0), mask=mask_h)
    if pid_h == 0:
        tl.store(count_ptr + pid_s, tl.sum(kept, axis=0))


def _add_partials_kernel(
    fisher_part_ptr, saliency_part_ptr, count_part_ptr, fisher_ptr, saliency_ptr, count_ptr,
    H, SPLITS, stride_ps,
    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """running[h] += sum over splits of partial[s, h], in split order; program 0 adds the kept-token counts."""
    pid = tl.program_id(0)
    offs_h = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    fisher = tl.load(fisher_ptr + offs_h, mask=mask_h, other=0.0)
    saliency = tl.load(saliency_ptr + offs_h, mask=mask_h, other=0.0)
    for s in range(0, SPLITS):
        fisher += tl.load(fisher_part_ptr + s * stride_ps + offs_h, mask=mask_h, other=0.0)
        saliency += tl.load(saliency_part_ptr + s * stride_ps + offs_h, mask=mask_h, other=0.0)
    tl.store(fisher_ptr + offs_h, fisher, mask=mask_h)
    tl.store(saliency_ptr + offs_h, saliency, mask=mask_h)
    if pid == 0:
        offs_s = tl.arange(0, BLOCK_S)
        counts = tl.load(count_part_ptr + offs_s, mask=offs_s < SPLITS, other=0).to(tl.int64)
        tl.store(count_ptr, tl.load(count_ptr) + tl.sum(counts, axis=0))


@functools.lru_cache(maxsize=2)
def _kernels(interpreted: bool):
    """JIT-wrap on first use, so the interpreter can be switched on after import (Triton decides at decoration)."""
    _ensure_triton()
    return triton.jit(_neuron_stats_kernel), triton.jit(_add_partials_kernel)


@functools.lru_cache(maxsize=16)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_shape(tokens: int, hidden: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, token splits, rows per split): enough programs to fill the GPU, few in the interpreter."""
    if triton_interpreted():
        block_t, block_h, target_programs = 16, 64, 1
    else:
        block_t, block_h = 32, 128
        target_programs = 4 * _multiprocessors(device)
    h_blocks = triton.cdiv(hidden, block_h)
    t_blocks = max(1, triton.cdiv(tokens, block_t))
    splits = max(1, min(t_blocks, triton.cdiv(target_programs, h_blocks)))
    if triton_interpreted():
        splits = min(t_blocks, 2)  # still exercise the cross-split reduction
    rows_per_split = triton.cdiv(t_blocks, splits) * block_t
    splits = max(1, triton.cdiv(tokens, rows_per_split))
    return block_t, block_h, splits, rows_per_split


def _accumulate_triton(a2, g2, mask, fisher, saliency, count) -> None:
    """Triton path: one pass over acts and grads into bounded partials, then one fixed-order add into the buffers."""
    tokens, hidden = a2.shape
    if tokens == 0 or hidden == 0:
        return
    stats_kernel, add_kernel = _kernels(triton_interpreted())
    block_t, block_h, splits, rows_per_split = _launch_shape(tokens, hidden, a2.device)
    partials = torch.empty((2, splits, hidden), dtype=torch.float32, device=a2.device)
    counts = torch.empty((splits,), dtype=torch.int32, device=a2.device)
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else None
    guard = torch.cuda.device(a2.device) if a2.is_cuda else contextlib.nullcontext()
    with guard:
        stats_kernel[(triton.cdiv(hidden, block_h), splits)](
            a2, g2, mask_u8 if mask_u8 is not None else a2, partials[0], partials[1], counts,
            tokens, hidden, rows_per_split,
            a2.stride(0), a2.stride(1), g2.stride(0), g2.stride(1), partials.stride(1),
            HAS_MASK=mask_u8 is not None, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4,
        )  # fmt: skip
        add_block = 64 if triton_interpreted() else 1024
        add_kernel[(triton.cdiv(hidden, add_block),)](
            partials[0], partials[1], counts, fisher, saliency, count, hidden, splits, partials.stride(1),
            BLOCK_H=add_block, BLOCK_S=triton.next_power_of_2(splits), num_warps=4,
        )  # fmt: skip


@torch.library.custom_op("agml::neuron_stats_accumulate_", mutates_args=("fisher", "saliency", "count"))
def _accumulate_op(
    acts: torch.Tensor,
    grads: torch.Tensor,
    mask: torch.Tensor | None,
    fisher: torch.Tensor,
    saliency: torch.Tensor,
    count: torch.Tensor,
) -> None:
    if use_triton_for(acts):
        _accumulate_triton(acts, grads, mask, fisher, saliency, count)
    else:
        _accumulate_reference(acts, grads, mask, fisher, saliency, count)


@_accumulate_op.register_fake
def _(acts, grads, mask, fisher, saliency, count) -> None:
    return None


def neuron_stats(acts: torch.Tensor, grads: torch.Tensor, token_mask: torch.Tensor | None = None) -> NeuronStats:
    """Per-neuron Fisher (sum g^2) and saliency (sum |a*g|) over tokens where token_mask is set.

    Sums are float32 whatever the input dtype, and deterministic. To stream over batches without allocating,
    accumulate into running buffers: `stats = NeuronStats.zeros(H, device)`, then `stats.accumulate_(a, g, mask)`.
    """
    if not isinstance(acts, torch.Tensor):
        raise ValueError("acts and grads must be torch.Tensors")
    device = acts.device
    hidden = acts.shape[-1] if acts.dim() >= 1 else 0
    return NeuronStats.zeros(hidden, device=device).accumulate_(acts, grads, token_mask)
