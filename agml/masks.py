"""Neuron masks: which MLP intermediate neurons of which decoder layers the adapter may touch."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from agml.errors import InputError


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
        """Raise InputError when the mask names a layer or neuron the model does not have."""
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
        path = Path(path)
        tensors = {f"layer.{layer}": ids for layer, ids in self._layers.items()}
        metadata = {"format": "agml-neuron-masks", "meta": json.dumps(self.meta)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuronMasks:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"mask file not found: {path}")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise InputError(f"{path} is not a safetensors mask file: {err}") from err
        if metadata.get("format") != "agml-neuron-masks":
            raise InputError(f"{path} is not an agml mask file (missing format metadata)")
        layers = {}
        for key, ids in tensors.items():
            prefix, _, index = key.partition(".")
            if prefix != "layer" or not index.isdigit():
                raise InputError(f"{path}: unexpected tensor {key!r} in mask file")
            layers[int(index)] = ids
        return cls(layers, meta=json.loads(metadata.get("meta", "{}")))

    def to_lists(self) -> dict[int, list[int]]:
        return {layer: ids.tolist() for layer, ids in self._layers.items()}
