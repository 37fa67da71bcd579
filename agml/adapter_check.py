"""Adapter files checked before they are loaded: readable safetensors, finite weights, consistent neuron ids.

A masked layer's neuron ids are stored three times (gate_proj and up_proj write the neurons, down_proj reads
them); the three must be the same integer list, or the adapter would touch other neurons in each projection.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from agml.errors import AgmlError, InputError
from agml.index_keys import IN_INDEX, OUT_INDEX, parse_index_key

_WEIGHTS = "adapter_model.safetensors"
# projection -> the index buffer that holds its neurons
_NEURON_INDEX = {"gate_proj": OUT_INDEX, "up_proj": OUT_INDEX, "down_proj": IN_INDEX}


def read_adapter_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / _WEIGHTS
    if not path.is_file():
        raise InputError(f"{folder} is not an adapter folder: {_WEIGHTS} is missing")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError
        raise InputError(f"{path} is not a readable safetensors file (cut short or corrupt): {err}") from err


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for key, tensor in sorted(tensors.items()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{where}: adapter weight {key} holds NaN or infinite values")


def check_neuron_indices(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Index buffers are integer, and gate/up/down of one MLP name the same neurons."""
    by_mlp: dict[str, dict[str, torch.Tensor]] = {}
    for key, ids in tensors.items():
        parsed = parse_index_key(key)
        if parsed is None:
            continue
        module, store = parsed
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise InputError(f"{where}: {key} must hold integer neuron ids, got {ids.dtype}")
        mlp, _, projection = module.rpartition(".")
        if _NEURON_INDEX.get(projection) == store:
            by_mlp.setdefault(mlp, {})[projection] = ids.reshape(-1)
    for mlp, projections in sorted(by_mlp.items()):
        lists = {name: ids.tolist() for name, ids in projections.items()}
        if len({tuple(v) for v in lists.values()}) > 1:
            counts = ", ".join(f"{name}: {len(v)} ids" for name, v in sorted(lists.items()))
            raise InputError(f"{where}: {mlp} has different neuron ids in {sorted(lists)} ({counts}); "
                             "the adapter is corrupt")


def check_adapter_folder(folder: str | os.PathLike) -> None:
    """Everything about a saved adapter that can be checked without the model."""
    tensors = read_adapter_tensors(folder)
    check_finite(tensors, str(folder))
    check_neuron_indices(tensors, str(folder))


def check_trained_adapter(model) -> None:
    """After training: NaN/inf in the adapter means training diverged; say so instead of saving it."""
    for name, param in model.named_parameters():
        if "lora_" in name and not bool(torch.isfinite(param).all()):
            raise AgmlError(f"training diverged: {name} holds NaN or infinite values; lower --lr or --alpha")
