"""Neuron-masked LoRA linear: y = x W^T + b, y[..., out] += s * (x[..., in] A^T) B^T.

The LoRA term only reads the selected input neurons and only writes the
selected output neurons: no dense masked B, no full-width LoRA output.
"""

from __future__ import annotations

import torch


def _check_index(name: str, index: torch.Tensor | None, size: int, device: torch.device) -> None:
    if index is None:
        return
    if not isinstance(index, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise ValueError(f"{name} must be int64, got {index.dtype}")
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


def _check_args(x, weight, bias, lora_a, lora_b, out_index, in_index) -> None:
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
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
    """PyTorch reference, differentiable through autograd: gather, rank-r matmuls, scatter-add."""
    y = torch.nn.functional.linear(x, weight, bias)
    if lora_a.shape[0] == 0 or (out_index is not None and out_index.numel() == 0):
        return y
    if in_index is not None and in_index.numel() == 0:
        return y
    x_sel = x if in_index is None else x.index_select(-1, in_index)
    delta = (x_sel @ lora_a.t()) @ lora_b.t()
    delta = delta * scaling
    if out_index is None:
        return y + delta
    return y.index_add(-1, out_index, delta)


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

    See DESIGN.md for the contract. Bad arguments raise ValueError naming the argument.
    """
    _check_args(x, weight, bias, lora_a, lora_b, out_index, in_index)
    # TODO(kernels issue): Triton path when use_triton_for(x).
    return masked_lora_reference(x, weight, bias, lora_a, lora_b, scaling, out_index, in_index)
