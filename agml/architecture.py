"""Where the MLPs are: decoder layers and their gate/up/down projections (Llama, Qwen2 and alike)."""

from __future__ import annotations

import torch

from agml.errors import AgmlError

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder layers, whatever wrapper (PEFT, CausalLM) surrounds it."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and len(module):
            if all(hasattr(layer, "mlp") for layer in module):
                return module
    found = sorted({type(m).__name__ for m in model.modules()})[:12]
    raise AgmlError(
        f"{type(model).__name__} has no decoder layers with an 'mlp' (found modules: {', '.join(found)}); "
        "agml supports Llama/Qwen2-style models whose MLP has gate_proj, up_proj and down_proj"
    )


def base_linear(module):
    """The nn.Linear inside a PEFT-wrapped projection (or the module itself)."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def mlp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """One MLP per decoder layer, each checked to have gate_proj, up_proj and down_proj."""
    mlps = [layer.mlp for layer in decoder_layers(model)]
    for index, mlp in enumerate(mlps):
        missing = [name for name in MLP_PROJECTIONS
                   if not isinstance(base_linear(getattr(mlp, name, None)), torch.nn.Linear)]
        if missing:
            children = ", ".join(name for name, _ in mlp.named_children()) or "none"
            raise AgmlError(
                f"{type(model).__name__}: the MLP of layer {index} ({type(mlp).__name__}) lacks {missing}; "
                f"its modules are: {children}"
            )
    return mlps


def mlp_dims(model: torch.nn.Module) -> tuple[int, int]:
    """(number of decoder layers, MLP intermediate size)."""
    mlps = mlp_modules(model)
    return len(mlps), base_linear(mlps[0].down_proj).in_features
