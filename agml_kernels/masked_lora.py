"""Neuron-masked LoRA linear: y = x W^T + b, y[..., out] += s * (x[..., in] A^T) B^T.

The LoRA term only reads the selected input neurons and only writes the
selected output neurons: no dense masked B, no full-width LoRA output.

Two implementations behind one autograd contract:
- `_MaskedLoraReference`: PyTorch ops (CPU fallback and test oracle's sibling).
  Forward is one base GEMM plus an in-place scatter-add of the rank-r term;
  backward is one GEMM for dx plus rank-r work on the selected columns only.
- `_MaskedLoraTriton`: two Triton kernels. `_linear_lowrank_kernel` computes a
  GEMM tile and adds the rank-r term for the selected columns of the same tile
  (forward: y; backward: dx). `_gather_rank_kernel` reads selected columns once
  and computes a rank-r shrink and/or per-token-block partials of a rank-r
  outer product (u = x_sel A^T; gu = s dy_sel B with dB partials; dA partials).
  Partials are summed in a fixed order, so results are deterministic.
"""

from __future__ import annotations

import functools
import math
import numbers
import os

import torch
import torch.nn.functional as F

from agml_kernels._backend import import_triton, triton_interpreted, use_triton_for

# Imported on first use of the Triton path (see _backend.import_triton): importing agml_kernels never imports triton.
triton = tl = None


def _ensure_triton() -> None:
    global triton, tl
    if triton is None:
        triton, tl = import_triton()


# ---------------------------------------------------------------------------------------------------------------------
# Argument validation


def _check_index(name: str, index: torch.Tensor | None, size: int, device: torch.device) -> None:
    if index is None:
        return
    if not isinstance(index, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise ValueError(f"{name} must be an int64 tensor, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but x is on {device}")
    if index.numel() == 0:
        return
    if int(index.min()) < 0 or int(index.max()) >= size:
        raise ValueError(f"{name} has values outside [0, {size})")
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise ValueError(f"{name} must be sorted and unique")


def _check_scaling(scaling: object) -> None:
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise ValueError(f"scaling must be a real number, got {type(scaling).__name__}")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be finite, got {scaling}")


def _check_args(x, weight, bias, lora_a, lora_b, scaling, out_index, in_index) -> None:
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    _check_scaling(scaling)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must end in in_features={in_features}, got shape {tuple(x.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,)):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must have shape ({out_features},), got {shape}")
    _check_index("out_index", out_index, out_features, x.device)
    _check_index("in_index", in_index, in_features, x.device)
    k_in = in_features if in_index is None else in_index.numel()
    k_out = out_features if out_index is None else out_index.numel()
    if lora_a.dim() != 2 or lora_a.shape[1] != k_in:
        raise ValueError(f"lora_a must have shape (r, {k_in}), got {tuple(lora_a.shape)}")
    rank = lora_a.shape[0]
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (k_out, rank):
        raise ValueError(f"lora_b must have shape ({k_out}, {rank}), got {tuple(lora_b.shape)}")
    tensors = {"weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}")


def _lora_is_empty(lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """True when the LoRA term is identically zero by shape (r = 0, k_in = 0 or k_out = 0)."""
    return lora_a.numel() == 0 or lora_b.numel() == 0


def _zero_grad_like(t: torch.Tensor, needed: bool) -> torch.Tensor | None:
    return torch.zeros_like(t) if needed else None


# ---------------------------------------------------------------------------------------------------------------------
# Reference path (CPU fallback)


class _MaskedLoraReference(torch.autograd.Function):
    """Base GEMM once, rank-r term on the selected columns only, in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, out_index, in_index):
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, weight, bias)
        x_sel = u = None
        if not _lora_is_empty(lora_a, lora_b):
            x_sel = x2 if in_index is None else x2.index_select(1, in_index)
            u = x_sel @ lora_a.t()  # (tokens, r): the only LoRA activation kept
            if out_index is None:
                y.addmm_(u, lora_b.t(), alpha=scaling)
            else:
                y.index_add_(1, out_index, u @ lora_b.t(), alpha=scaling)
        # x itself is only needed for dW; x_sel (tokens, k_in) is all dA needs.
        x_for_dw = x2 if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(x_for_dw, x_sel, u, weight, lora_a, lora_b, out_index, in_index)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, x_sel, u, weight, lora_a, lora_b, out_index, in_index = ctx.saved_tensors
        need_dx, need_dw, need_db, need_da, need_db_lora = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, weight.shape[0])
        dx = dw = dbias = da = db = None
        gu = None
        if u is not None:
            dy_sel = dy2 if out_index is None else dy2.index_select(1, out_index)  # read once, reused below
            gu = (dy_sel @ lora_b).mul_(ctx.scaling)  # (tokens, r)
            if need_db_lora:
                db = (dy_sel.t() @ u).mul_(ctx.scaling)
            if need_da:
                da = gu.t() @ x_sel
        else:
            da = _zero_grad_like(lora_a, need_da)
            db = _zero_grad_like(lora_b, need_db_lora)
        if need_dx:
            dx = dy2 @ weight
            if gu is not None:
                if in_index is None:
                    dx.addmm_(gu, lora_a)
                else:
                    dx.index_add_(1, in_index, gu @ lora_a)
            dx = dx.reshape(ctx.x_shape)
        if need_dw:
            dw = dy2.t() @ x2
        if need_db:
            dbias = dy2.sum(0)
        return dx, dw, dbias, da, db, None, None, None


def masked_lora_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    out_index: torch.Tensor | None = None,
    in_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch path (no validation): gather, rank-r matmuls, in-place scatter-add; custom backward."""
    return _MaskedLoraReference.apply(x, weight, bias, lora_a, lora_b, float(scaling), out_index, in_index)


# ---------------------------------------------------------------------------------------------------------------------
# Triton path
#
# Kernels are plain functions here and wrapped with triton.jit on first use (see `_kernels`): Triton decides at
# decoration time whether a kernel runs compiled or in the CPU interpreter (TRITON_INTERPRET=1), so deferring the
# decoration lets the interpreter be switched on after this module was imported (as the tests do).


def _linear_lowrank_kernel(
    x_ptr, w_ptr, bias_ptr, u_ptr, l_ptr, pos_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk,
    stride_wk, stride_wn,
    stride_um, stride_ur,
    stride_lr, stride_lc,
    stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """y[M, N] = x[M, K] @ w[K, N] (+ bias) (+ scaling * u[M, R] @ l[R, pos[n]] where pos[n] >= 0).

    `pos[n]` is the LoRA column feeding output column n, or -1 when n is not selected (identity without HAS_POS).
    The rank-r term is added to the accumulator of the same tile, so y is written once.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped tile order: GROUP_M row-blocks share the same weight columns while they are in L2.
    tiles_per_group = GROUP_M * num_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        if HAS_POS:
            lora_col = tl.load(pos_ptr + offs_n, mask=mask_n, other=-1)
        else:
            lora_col = tl.where(mask_n, offs_n, -1)
        if tl.max(lora_col, axis=0) >= 0:  # skip tiles with no selected column
            offs_r = tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            u = tl.load(
                u_ptr + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :] * stride_ur,
                mask=mask_m[:, None] & mask_r[None, :],
                other=0.0,
            )
            lora = tl.load(
                l_ptr + offs_r[:, None] * stride_lr + lora_col[None, :].to(tl.int64) * stride_lc,
                mask=mask_r[:, None] & (lora_col[None, :] >= 0),
                other=0.0,
            )
            if UPCAST:
                lora = lora.to(tl.float32)
            acc = tl.dot((u * scaling).to(lora.dtype), lora, acc, input_precision=PRECISION)

    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _gather_rank_kernel(
    x_ptr, idx_ptr, m_ptr, v_ptr, u_ptr, p_ptr,
    T, KSEL, R,
    stride_xt, stride_xk,
    stride_mk, stride_mr,
    stride_vt, stride_vr,
    stride_ut, stride_ur,
    stride_pb, stride_pk, stride_pr,
    scaling,
    HAS_INDEX: tl.constexpr, COMPUTE_U: tl.constexpr, COMPUTE_PARTIAL: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """For one block of tokens, read the selected columns x_sel = x[:, idx] once and compute

    COMPUTE_U:       u[T, R] = scaling * x_sel @ m            (m is (KSEL, R))
    COMPUTE_PARTIAL: p[block, KSEL, R] = x_sel^T @ v[block]   (summed over blocks by the caller, fixed order)
    """
    pid_t = tl.program_id(0)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    mask_t = offs_t < T
    mask_r = offs_r < R
    x_rows = x_ptr + offs_t[:, None].to(tl.int64) * stride_xt
    if COMPUTE_PARTIAL:
        v = tl.load(
            v_ptr + offs_t[:, None].to(tl.int64) * stride_vt + offs_r[None, :] * stride_vr,
            mask=mask_t[:, None] & mask_r[None, :],
            other=0.0,
        )
        if not UPCAST:
            v = v.to(x_ptr.dtype.element_ty)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, KSEL, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < KSEL
        if HAS_INDEX:
            cols = tl.load(idx_ptr + offs_k, mask=mask_k, other=0)
        else:
            cols = offs_k
        xs = tl.load(x_rows + cols[None, :].to(tl.int64) * stride_xk, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            xs = xs.to(tl.float32)
        if COMPUTE_U:
            mt = tl.load(
                m_ptr + offs_k[:, None] * stride_mk + offs_r[None, :] * stride_mr,
                mask=mask_k[:, None] & mask_r[None, :],
                other=0.0,
            )
            if UPCAST:
                mt = mt.to(tl.float32)
            acc = tl.dot(xs, mt, acc, input_precision=PRECISION)
        if COMPUTE_PARTIAL:
            part = tl.dot(tl.trans(xs), v, input_precision=PRECISION)
            tl.store(
                p_ptr + pid_t * stride_pb + offs_k[:, None] * stride_pk + offs_r[None, :] * stride_pr,
                part,
                mask=mask_k[:, None] & mask_r[None, :],
            )
    if COMPUTE_U:
        tl.store(
            u_ptr + offs_t[:, None].to(tl.int64) * stride_ut + offs_r[None, :] * stride_ur,
            acc * scaling,
            mask=mask_t[:, None] & mask_r[None, :],
        )


def _hopper_linear_configs() -> list:
    """GEMM tile configs worth trying on Hopper-class GPUs (bf16/fp16, wgmma-sized tiles)."""
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 5, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
        for bm, bn, bk, stages, warps in shapes
    ]


# Fixed tile sizes of the gather kernel: its partial buffer is sized by BLOCK_T, so it is not autotuned.
_GATHER_BLOCKS_CUDA = {"BLOCK_T": 64, "BLOCK_K": 64}
# Under the interpreter every program instance runs in numpy: few, small tiles keep tests fast.
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_T": 32, "GROUP_M": 4}


def _autotune_enabled() -> bool:
    """AGML_TRITON_AUTOTUNE=0 pins one GEMM config (GPU test runs: every new shape would otherwise retune)."""
    return os.environ.get("AGML_TRITON_AUTOTUNE", "1") != "0"


@functools.lru_cache(maxsize=4)
def _kernels_for(interpreted: bool, autotune: bool):
    _ensure_triton()
    if interpreted:
        b = _INTERPRETER_BLOCKS
        configs = [triton.Config({k: b[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")})]
    else:
        configs = _hopper_linear_configs()
        if not autotune:  # small tiles: fit shared memory even with float32 operands
            configs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3)]
    linear = triton.autotune(configs=configs, key=["M", "N", "K", "R", "HAS_LORA"])(triton.jit(_linear_lowrank_kernel))
    gather = triton.jit(_gather_rank_kernel)
    return linear, gather


def _kernels(interpreted: bool):
    """JIT-wrapped kernels for the current mode: GEMM autotuned on GPUs, one small config in the interpreter."""
    return _kernels_for(interpreted, _autotune_enabled())


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (what F.linear gives), not TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter's tl.dot multiplies bf16 as raw uint16 bits; give it float32 operands instead.
    return dtype == torch.bfloat16 and triton_interpreted()


def _column_positions(index: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """pos[j] = position of column j in index, or -1: lets a GEMM tile find its LoRA columns."""
    if index is None:
        return None
    pos = torch.full((size,), -1, dtype=torch.int32, device=index.device)
    pos[index] = torch.arange(index.numel(), dtype=torch.int32, device=index.device)
    return pos


def _linear_lowrank(x2, w_kn, bias, u, lora_rc, pos, scaling) -> torch.Tensor:
    """(M, K) @ (K, N) [+ bias] [+ scaling * u (M, R) @ lora_rc (R, k_sel) on the selected columns]."""
    linear, _ = _kernels(triton_interpreted())
    m, k = x2.shape
    n = w_kn.shape[1]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    has_lora = u is not None
    rank = u.shape[1] if has_lora else 0
    dummy = y  # placeholder pointer for absent operands (never dereferenced: constexpr flags)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    linear[grid](
        x2, w_kn, bias if bias is not None else dummy, u if has_lora else dummy,
        lora_rc if has_lora else dummy, pos if pos is not None else dummy, y,
        m, n, k, rank,
        x2.stride(0), x2.stride(1),
        w_kn.stride(0), w_kn.stride(1),
        u.stride(0) if has_lora else 0, u.stride(1) if has_lora else 0,
        lora_rc.stride(0) if has_lora else 0, lora_rc.stride(1) if has_lora else 0,
        y.stride(0), y.stride(1),
        float(scaling),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_POS=pos is not None, PRECISION=_precision(x2.dtype),
        UPCAST=_upcast(x2.dtype), BLOCK_R=_rank_block(rank),
    )  # fmt: skip
    return y


def _gather_rank(x2, index, m_kr=None, v=None, scaling=1.0):
    """Read x2[:, index] once: returns (u = scaling * x_sel @ m_kr or None, partials (blocks, k_sel, r) or None)."""
    _, gather = _kernels(triton_interpreted())
    interpreted = triton_interpreted()
    blocks = _INTERPRETER_BLOCKS if interpreted else _GATHER_BLOCKS_CUDA
    block_t, block_k = blocks["BLOCK_T"], blocks["BLOCK_K"]
    tokens = x2.shape[0]
    k_sel = x2.shape[1] if index is None else index.numel()
    rank = (m_kr if m_kr is not None else v).shape[1]
    n_blocks = triton.cdiv(tokens, block_t)
    f32 = {"dtype": torch.float32, "device": x2.device}
    u = torch.empty((tokens, rank), **f32) if m_kr is not None else None
    partials = torch.empty((n_blocks, k_sel, rank), **f32) if v is not None else None
    dummy = x2
    if n_blocks > 0:
        gather[(n_blocks,)](
            x2, index if index is not None else dummy, m_kr if m_kr is not None else dummy,
            v if v is not None else dummy, u if u is not None else dummy,
            partials if partials is not None else dummy,
            tokens, k_sel, rank,
            x2.stride(0), x2.stride(1),
            *(m_kr.stride() if m_kr is not None else (0, 0)),
            *(v.stride() if v is not None else (0, 0)),
            *(u.stride() if u is not None else (0, 0)),
            *(partials.stride() if partials is not None else (0, 0, 0)),
            float(scaling),
            HAS_INDEX=index is not None, COMPUTE_U=m_kr is not None, COMPUTE_PARTIAL=v is not None,
            PRECISION=_precision(x2.dtype), UPCAST=_upcast(x2.dtype),
            BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_R=_rank_block(rank),
            num_warps=4,
        )  # fmt: skip
    elif u is not None:
        u.zero_()
    return u, partials


def _sum_partials(partials: torch.Tensor) -> torch.Tensor:
    """Fixed-order reduction over token blocks (deterministic, unlike float atomics)."""
    if partials.shape[0] == 0:
        return partials.new_zeros(partials.shape[1:])
    return partials.sum(0)


class _MaskedLoraTriton(torch.autograd.Function):
    """Fused Triton forward/backward; the LoRA is non-empty here (empty LoRAs take the reference path)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, out_index, in_index):
        out_features, in_features = weight.shape
        x2 = x.reshape(-1, in_features)
        u, _ = _gather_rank(x2, in_index, m_kr=lora_a.t())  # (tokens, r) float32, unscaled
        pos_out = _column_positions(out_index, out_features)
        y = _linear_lowrank(x2, weight.t(), bias, u, lora_b.t(), pos_out, scaling)
        ctx.save_for_backward(x2, u, weight, lora_a, lora_b, out_index, in_index)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x2, u, weight, lora_a, lora_b, out_index, in_index = ctx.saved_tensors
        need_dx, need_dw, need_db, need_da, need_db_lora = ctx.needs_input_grad[:5]
        out_features, in_features = weight.shape
        dy2 = dy.reshape(-1, out_features)
        if dy2.dtype != x2.dtype:
            dy2 = dy2.to(x2.dtype)
        # gu = s * dy_sel @ B and the dB partials dy_sel^T @ u, from one read of the selected columns of dy.
        gu, db_partials = _gather_rank(dy2, out_index, m_kr=lora_b, v=u, scaling=ctx.scaling)
        dx = dw = dbias = da = db = None
        if need_db_lora:
            db = (_sum_partials(db_partials) * ctx.scaling).to(lora_b.dtype)
        if need_da:
            _, da_partials = _gather_rank(x2, in_index, v=gu)
            da = _sum_partials(da_partials).t().to(lora_a.dtype)
        if need_dx:
            pos_in = _column_positions(in_index, in_features)
            dx = _linear_lowrank(dy2, weight, None, gu, lora_a, pos_in, 1.0).reshape(ctx.x_shape)
        if need_dw:
            dw = dy2.t() @ x2
        if need_db:
            dbias = dy2.sum(0, dtype=torch.float32).to(dy2.dtype)
        return dx, dw, dbias, da, db, None, None, None


# ---------------------------------------------------------------------------------------------------------------------
# Public entry point


def masked_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    out_index: torch.Tensor | None = None,
    in_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear layer plus a LoRA that reads only `in_index` and writes only `out_index`.

    y = x @ weight.T + bias; y[..., out_index] += scaling * (x[..., in_index] @ lora_a.T) @ lora_b.T.
    See DESIGN.md for the contract. Bad arguments raise ValueError naming the argument.
    """
    _check_args(x, weight, bias, lora_a, lora_b, scaling, out_index, in_index)
    if not _lora_is_empty(lora_a, lora_b) and use_triton_for(x):
        return _MaskedLoraTriton.apply(x, weight, bias, lora_a, lora_b, float(scaling), out_index, in_index)
    return masked_lora_reference(x, weight, bias, lora_a, lora_b, scaling, out_index, in_index)
