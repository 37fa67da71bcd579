"""Neuron-masked LoRA linear: y = x W^T + b, y[..., out] += s * (x[..., in] A^T) B^T.

The LoRA term only reads the selected input neurons and only writes the selected output neurons: no dense masked
B, no full-width LoRA output.

Two ops registered with `torch.library` (`agml::masked_lora_forward`, `agml::masked_lora_backward`) with fake
implementations, so `torch.compile` traces through them; autograd connects the two.

Each GEMM (forward y, backward dx) takes one of two paths:
- "torch": cuBLAS (or the CPU BLAS) for the base GEMM, then the rank-r term as a small epilogue:
  `index_add_` into the selected columns, or `addmm_` when every column is selected.
- "triton": `_linear_lowrank_kernel`, a GEMM tile that adds the rank-r term for the selected columns of the same
  tile, so y is written once.
On CUDA the faster one is measured once per (kind, device, M bucketed to a power of two, N, K, dtype, layout,
HAS_POS) and remembered (`linear_path_choices()` lists them); float32 always takes "torch", so cuBLAS applies
`allow_tf32`/`float32_matmul_precision`. `AGML_LINEAR_PATH=torch|triton` forces one. Without CUDA the reference
backend takes "torch" and the Triton backend (interpreter) takes "triton".
Rank-r work (u = x_sel A^T, gu = s dy_sel B, dA = gu^T x_sel, dB = s dy_sel^T u) is one BLAS GEMM each on the
gathered columns: no per-token-block partial sums, nothing that grows with the token count except u and gu.

Synchronisation invariant: after the first call per shape bucket (path choice, Triton autotuning), a call with
`checked=True` and precomputed positions (see `prepare_masked_lora`) never synchronises the device with the host.
Index validation (min/max/sortedness) synchronises, so it runs once, when an adapter is built, not per call.
Triton launches run under `torch.cuda.device(x.device)` (layers spread over GPUs by `device_map`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import statistics

import torch
import torch.nn.functional as F

from agml_kernels._backend import import_triton, triton_interpreted, use_triton_for

# Imported on first use of the Triton path (see _backend.import_triton): importing agml_kernels never imports triton.
triton = tl = None


def _ensure_triton() -> None:
    global triton, tl
    if triton is None:
        triton, tl = import_triton()


PATHS = ("torch", "triton")


# ---------------------------------------------------------------------------------------------------------------------
# Argument validation


def check_index(name: str, index: torch.Tensor | None, size: int, device: torch.device | None = None) -> None:
    """Validate a neuron index: int64, 1-D, sorted, unique, inside [0, size). Reads values: synchronises once."""
    _check_index_meta(name, index, device)
    if index is None or index.numel() == 0:
        return
    if int(index.min()) < 0 or int(index.max()) >= size:
        raise ValueError(f"{name} has values outside [0, {size})")
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise ValueError(f"{name} must be sorted and unique")


def _check_index_meta(name: str, index: torch.Tensor | None, device: torch.device | None) -> None:
    """Type, dtype, rank and device of an index: metadata only, no synchronisation."""
    if index is None:
        return
    if not isinstance(index, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise ValueError(f"{name} must be an int64 tensor, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(index.shape)}")
    if device is not None and index.device != device:
        raise ValueError(f"{name} is on {index.device} but x is on {device}")


def _check_positions(name: str, positions: torch.Tensor | None, index: torch.Tensor | None, size: int) -> None:
    if positions is None:
        return
    if index is None:
        raise ValueError(f"{name} given without its index")
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int32 or tuple(positions.shape) != (size,):
        raise ValueError(f"{name} must be an int32 tensor of shape ({size},) from column_positions")
    if positions.device != index.device:
        raise ValueError(f"{name} is on {positions.device} but its index is on {index.device}")


def _check_scaling(scaling: object) -> None:
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise ValueError(f"scaling must be a real number, got {type(scaling).__name__}")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be finite, got {scaling}")


def _check_args(x, weight, bias, lora_a, lora_b, scaling, out_index, in_index, checked: bool) -> None:
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
    for name, index, size in (("out_index", out_index, out_features), ("in_index", in_index, in_features)):
        if checked:
            _check_index_meta(name, index, x.device)
        else:
            check_index(name, index, size, x.device)
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


# ---------------------------------------------------------------------------------------------------------------------
# Built once per adapter


def column_positions(index: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """pos[j] = position of column j in index, or -1 (int32, shape (size,)): lets a GEMM tile find its LoRA columns.

    Three small device kernels and no synchronisation; compute it once per adapter and keep it as a buffer.
    """
    if index is None:
        return None
    pos = torch.full((size,), -1, dtype=torch.int32, device=index.device)
    pos[index] = torch.arange(index.numel(), dtype=torch.int32, device=index.device)
    return pos


def prepare_masked_lora(
    out_index: torch.Tensor | None, in_index: torch.Tensor | None, out_features: int, in_features: int
) -> dict[str, torch.Tensor | bool | None]:
    """Validate the indices once and precompute their column positions, for an adapter's lifetime.

    Returns the keyword arguments a layer passes to every `masked_lora_linear` call:
    {"out_index", "in_index", "out_positions", "in_positions", "checked": True}. Calls made with them do no index
    validation and build no positions: nothing on that path synchronises with the host.
    """
    check_index("out_index", out_index, out_features)
    check_index("in_index", in_index, in_features)
    return {
        "out_index": out_index,
        "in_index": in_index,
        "out_positions": column_positions(out_index, out_features),
        "in_positions": column_positions(in_index, in_features),
        "checked": True,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Triton GEMM with a fused rank-r epilogue
#
# Kernels are plain functions here and wrapped with triton.jit on first use (see `_kernels_for`): Triton decides at
# decoration time whether a kernel runs compiled or in the CPU interpreter (TRITON_INTERPRET=1), so deferring the
# decoration lets the interpreter be switched on after this module was imported (as the tests do).


def _linear_lowrank_kernel(
    x_ptr, w_ptr, bias_ptr, u_ptr, l_ptr, pos_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk,
    stride_wk, stride_wn,
    stride_um, stride_ur,
    stride_lr, stride_lc,
    stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_POS: tl.constexpr, LAYOUT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """y[M, N] = x[M, K] @ w[K, N] (+ bias) (+ scaling * u[M, R] @ l[R, pos[n]] where pos[n] >= 0).

    `pos[n]` is the LoRA column feeding output column n, or -1 when n is not selected (identity without HAS_POS).
    The rank-r term is added to the accumulator of the same tile, so y is written once. M_BUCKET and LAYOUT only
    key the autotuning cache (M rounded up to a power of two; which operands are K-contiguous).
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
            u = u.to(tl.float32) * scaling
            if UPCAST:
                lora = lora.to(tl.float32)
            acc = tl.dot(u.to(lora.dtype), lora, acc, input_precision=PRECISION)

    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Hopper-class tiles (bf16/fp16, wgmma-sized); three, so a new key costs three compilations, not seven.
_HOPPER_TILES = [  # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps
    (128, 256, 64, 3, 8),
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
]
# Under the interpreter every program instance runs in numpy: few, small tiles keep tests fast.
_INTERPRETER_TILE = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "HAS_LORA", "HAS_POS", "LAYOUT"]


def _autotune_enabled() -> bool:
    """AGML_TRITON_AUTOTUNE=0 pins one small config (GPU test runs: many small shapes, no tuning per shape)."""
    return os.environ.get("AGML_TRITON_AUTOTUNE", "1") != "0"


@functools.lru_cache(maxsize=4)
def _kernels_for(interpreted: bool, autotune: bool):
    _ensure_triton()
    if interpreted:
        configs = [triton.Config(dict(_INTERPRETER_TILE))]
    elif not autotune:  # small tiles: fit shared memory even with float32 operands
        configs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3)]
    else:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s,
                                 num_warps=w) for bm, bn, bk, s, w in _HOPPER_TILES]  # fmt: skip
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY)(triton.jit(_linear_lowrank_kernel))


def _m_bucket(m: int) -> int:
    return 1 << max(0, m - 1).bit_length()


def _layout(x2: torch.Tensor, w_kn: torch.Tensor) -> int:
    """Bit 0: x is K-contiguous; bit 1: w is K-contiguous (forward: W^T view; backward dx: W itself is not)."""
    return int(x2.stride(1) == 1) | (int(w_kn.stride(0) == 1) << 1)


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU, not the current one (layers spread over GPUs by device_map)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _linear_lowrank_triton(x2, w_kn, bias, u, lora_rc, pos, scaling) -> torch.Tensor:
    """(M, K) @ (K, N) [+ bias] [+ scaling * u (M, R) @ lora_rc (R, k_sel) on the selected columns]."""
    kernel = _kernels_for(triton_interpreted(), _autotune_enabled())
    m, k = x2.shape
    n = w_kn.shape[1]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    has_lora = u is not None
    rank = u.shape[1] if has_lora else 0
    dummy = y  # placeholder pointer for absent operands (never dereferenced: constexpr flags)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if m == 0 or n == 0:
        return y
    with _device_guard(x2):
        kernel[grid](
            x2, w_kn, bias if bias is not None else dummy, u if has_lora else dummy,
            lora_rc if has_lora else dummy, pos if pos is not None else dummy, y,
            m, n, k, rank, _m_bucket(m),
            x2.stride(0), x2.stride(1),
            w_kn.stride(0), w_kn.stride(1),
            u.stride(0) if has_lora else 0, u.stride(1) if has_lora else 0,
            lora_rc.stride(0) if has_lora else 0, lora_rc.stride(1) if has_lora else 0,
            y.stride(0), y.stride(1),
            float(scaling),
            HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_POS=pos is not None, LAYOUT=_layout(x2, w_kn),
            PRECISION=_precision(x2.dtype), UPCAST=_upcast(x2.dtype), BLOCK_R=max(16, triton.next_power_of_2(rank)),
        )  # fmt: skip
    return y


def _precision(dtype: torch.dtype) -> str:
    """float32 operands: TF32 only where torch allows it for cuBLAS too (allow_tf32 / float32_matmul_precision)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter's tl.dot multiplies bf16 as raw uint16 bits; give it float32 operands instead.
    return dtype == torch.bfloat16 and triton_interpreted()


def _linear_lowrank_torch(x2, w_nk, bias, u, lora_cr, index, scaling) -> torch.Tensor:
    """BLAS base GEMM, then the rank-r term: index_add_ into the selected columns, or addmm_ into all of them."""
    y = F.linear(x2, w_nk, bias)
    if u is not None:
        if index is None:
            y.addmm_(u, lora_cr.t(), alpha=scaling)
        else:
            y.index_add_(1, index, u @ lora_cr.t(), alpha=scaling)
    return y


# ---------------------------------------------------------------------------------------------------------------------
# Path choice (the cuBLAS hedge)

_PATH_CHOICES: dict[tuple, dict] = {}


def linear_path_choices() -> list[dict]:
    """Every path chosen so far in this process, with the times that decided it (for benchmark reports)."""
    return [dict(choice) for choice in _PATH_CHOICES.values()]


def _median_ms(fn, reps: int = 5) -> float:
    fn()  # warm-up: Triton autotuning and compilation happen here
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _choose_path(kind: str, x2, w_kn, has_pos: bool, run_torch, run_triton) -> str:
    """"torch" or "triton" for one GEMM; on CUDA measured once per key and remembered (synchronises only then)."""
    forced = os.environ.get("AGML_LINEAR_PATH", "").strip().lower()
    if forced:
        if forced not in PATHS:
            raise ValueError(f"AGML_LINEAR_PATH must be one of {PATHS}, got {forced!r}")
        return forced
    if not x2.is_cuda:
        return "triton"  # the interpreter: the Triton backend was asked for, so exercise it
    if x2.dtype == torch.float32:
        return "torch"  # cuBLAS honours allow_tf32 / float32_matmul_precision
    m, k = x2.shape
    key = (kind, torch.cuda.get_device_name(x2.device), _m_bucket(m), w_kn.shape[1], k, str(x2.dtype),
           _layout(x2, w_kn), has_pos)  # fmt: skip
    if key not in _PATH_CHOICES:
        choice = {"kind": kind, "device": key[1], "m_bucket": key[2], "n": key[3], "k": key[4], "dtype": key[5],
                  "layout": key[6], "has_pos": has_pos, "torch_ms": None, "triton_ms": None, "triton_error": None}
        with _device_guard(x2):
            choice["torch_ms"] = _median_ms(run_torch)
            try:  # a hedge: a Triton failure (compilation, resources) on a new GPU falls back to cuBLAS, recorded
                choice["triton_ms"] = _median_ms(run_triton)
            except Exception as err:  # noqa: BLE001
                choice["triton_error"] = f"{type(err).__name__}: {err}"[:500]
        faster = choice["triton_ms"] is not None and choice["triton_ms"] < choice["torch_ms"]
        choice["path"] = "triton" if faster else "torch"
        _PATH_CHOICES[key] = choice
    return _PATH_CHOICES[key]["path"]


def _masked_gemm(kind, x2, weight_nk, bias, u, lora_cr, index, positions, scaling, use_triton: bool):
    """x2 @ weight_nk^T (+ bias) (+ scaling * u @ lora_cr^T on the columns in index), on the chosen path."""

    def run_torch():
        return _linear_lowrank_torch(x2, weight_nk, bias, u, lora_cr, index, scaling)

    def run_triton():
        pos = positions if positions is not None or index is None else column_positions(index, weight_nk.shape[0])
        return _linear_lowrank_triton(x2, weight_nk.t(), bias, u, lora_cr.t() if u is not None else None, pos,
                                      scaling)  # fmt: skip

    if not use_triton or u is None:
        return run_torch()
    path = _choose_path(kind, x2, weight_nk.t(), index is not None, run_torch, run_triton)
    return run_triton() if path == "triton" else run_torch()


# ---------------------------------------------------------------------------------------------------------------------
# The two ops


def _forward_impl(x, weight, bias, lora_a, lora_b, scaling, out_index, in_index, out_positions):
    """(y, u): u = x_sel A^T (tokens, r) in x's dtype, the only LoRA activation kept for backward."""
    out_features, in_features = weight.shape
    x2 = x.reshape(-1, in_features)
    u = None
    if not _lora_is_empty(lora_a, lora_b):
        x_sel = x2 if in_index is None else x2.index_select(1, in_index)
        u = x_sel @ lora_a.t()
    y = _masked_gemm("forward", x2, weight, bias, u, lora_b, out_index, out_positions, scaling, use_triton_for(x))
    if u is None:
        u = x2.new_zeros((x2.shape[0], lora_a.shape[0]))
    return y.reshape(*x.shape[:-1], out_features), u


@torch.library.custom_op("agml::masked_lora_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    out_index: torch.Tensor | None,
    in_index: torch.Tensor | None,
    out_positions: torch.Tensor | None,
    in_positions: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(x, weight, bias, lora_a, lora_b, scaling, out_index, in_index, out_positions)


@_forward_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, out_index, in_index, out_positions, in_positions):
    tokens = math.prod(x.shape[:-1])
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((tokens, lora_a.shape[0]))


def _backward_impl(dy, x, x_sel, u, weight, lora_a, lora_b, scaling, out_index, in_index, in_positions, needs):
    """Gradients (dx, dW, dbias, dA, dB); an empty tensor where `needs` says it is not wanted."""
    need_dx, need_dw, need_db, need_da, need_dlb = needs
    out_features, in_features = weight.shape
    dy2 = dy.reshape(-1, out_features).to(weight.dtype)
    dx, dw, dbias, da, dlb = (dy2.new_empty(0) for _ in range(5))  # distinct: op outputs may not alias
    gu = None
    if not _lora_is_empty(lora_a, lora_b):
        dy_sel = dy2 if out_index is None else dy2.index_select(1, out_index)  # read once, reused below
        gu = (dy_sel @ lora_b).mul_(scaling)  # (tokens, r)
        if need_dlb:
            dlb = (dy_sel.t() @ u).mul_(scaling)
        if need_da:
            da = gu.t() @ x_sel.reshape(-1, x_sel.shape[-1])
    else:
        da = torch.zeros_like(lora_a) if need_da else da
        dlb = torch.zeros_like(lora_b) if need_dlb else dlb
    if need_dx:
        # dx = dy W + gu A on the selected input columns: the forward GEMM with W^T's roles swapped.
        lora_t = lora_a.t() if gu is not None else None
        dx = _masked_gemm("backward_dx", dy2, weight.t(), None, gu, lora_t, in_index, in_positions, 1.0,
                          use_triton_for(dy2)).reshape(*dy.shape[:-1], in_features)  # fmt: skip
    if need_dw:
        dw = dy2.t() @ x.reshape(-1, in_features)
    if need_db:
        dbias = dy2.sum(0, dtype=torch.float32).to(dy2.dtype)
    return dx, dw, dbias, da, dlb


@torch.library.custom_op("agml::masked_lora_backward", mutates_args=())
def _backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    x_sel: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    out_index: torch.Tensor | None,
    in_index: torch.Tensor | None,
    in_positions: torch.Tensor | None,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dy, x, x_sel, u, weight, lora_a, lora_b, scaling, out_index, in_index, in_positions, needs)


@_backward_op.register_fake
def _(dy, x, x_sel, u, weight, lora_a, lora_b, scaling, out_index, in_index, in_positions, needs):
    shapes = ((*dy.shape[:-1], weight.shape[1]), weight.shape, weight.shape[:1], lora_a.shape, lora_b.shape)
    return tuple(weight.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs, strict=True))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, out_index, in_index, _, in_positions = inputs
    _, u = output
    need_dw = ctx.needs_input_grad[1]
    # x itself is kept only when dW needs it or the LoRA reads every column; else only x_sel (1% of the columns).
    x_sel = x if in_index is None else x.detach().reshape(-1, x.shape[-1]).index_select(1, in_index)
    ctx.save_for_backward(x if need_dw else x_sel, x_sel, u, weight, lora_a, lora_b, out_index, in_index,
                          in_positions)  # fmt: skip
    ctx.scaling = scaling


def _backward(ctx, dy, _du):
    x, x_sel, u, weight, lora_a, lora_b, out_index, in_index, in_positions = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = _backward_op(dy, x, x_sel, u, weight, lora_a, lora_b, ctx.scaling, out_index, in_index, in_positions,
                         needs)  # fmt: skip
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)), None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


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
    *,
    out_positions: torch.Tensor | None = None,
    in_positions: torch.Tensor | None = None,
    checked: bool = False,
) -> torch.Tensor:
    """Linear layer plus a LoRA that reads only `in_index` and writes only `out_index`.

    y = x @ weight.T + bias; y[..., out_index] += scaling * (x[..., in_index] @ lora_a.T) @ lora_b.T.
    See DESIGN.md for the contract. Bad arguments raise ValueError naming the argument.
    `checked=True` skips the index value checks (which synchronise): pass it, with `out_positions`/`in_positions`,
    only with indices validated by `prepare_masked_lora` (or `check_index`), which returns all five keywords.
    """
    _check_args(x, weight, bias, lora_a, lora_b, scaling, out_index, in_index, checked)
    _check_positions("out_positions", out_positions, out_index, weight.shape[0])
    _check_positions("in_positions", in_positions, in_index, weight.shape[1])
    y, _ = _forward_op(x, weight, bias, lora_a, lora_b, float(scaling), out_index, in_index, out_positions,
                       in_positions)  # fmt: skip
    return y


