"""Where the MLP neurons are: the one place that knows a model's MLP layout.

A *neuron site* is one decoder layer's MLP: the projections that write its intermediate neurons (each with the row
of its output where neuron 0 sits), the projection that reads them (its input columns are the neurons) and their
number. Scoring hooks the reader's input, adapters mask the writers' output rows and the reader's input columns;
another MLP layout is added here, in `neuron_sites`. Supported: gated MLPs with separate `gate_proj`, `up_proj`
and `down_proj` (Llama, Qwen2, Mistral, Gemma). A fused `gate_up_proj` (Phi-3) is refused with an error naming it.
See docs/architecture.md ("Architecture seam").
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class NeuronSite:
    """One decoder layer's MLP neurons: who writes them, who reads them, how many there are."""

    key: int  # decoder layer index (the key of `agml.masks.NeuronMasks`)
    mlp: torch.nn.Module
    writers: tuple[tuple[str, int], ...]  # (projection name, output row of neuron 0)
    reader: str  # projection whose input columns are the neurons
    width: int  # number of neurons (the MLP intermediate size)

    def projection(self, name: str) -> torch.nn.Module:
        """The projection module as found (PEFT-wrapped or not)."""
        return getattr(self.mlp, name)

    @property
    def projections(self) -> tuple[str, ...]:
        """Every projection that touches the neurons: the writers, then the reader."""
        return (*dict.fromkeys(name for name, _ in self.writers), self.reader)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """The output rows of writer `name` that hold neurons `ids` (several blocks for a fused projection)."""
        return torch.cat([offset + ids for writer, offset in self.writers if writer == name])


def _site(index: int, mlp: torch.nn.Module, model_name: str) -> NeuronSite:
    def linear(name: str) -> torch.nn.Linear | None:
        module = base_linear(getattr(mlp, name, None))
        return module if isinstance(module, torch.nn.Linear) else None

    if linear("gate_up_proj") is not None:
        raise AgmlError(
            f"{model_name}: the MLP of layer {index} ({type(mlp).__name__}) fuses gate and up projections in "
            "gate_up_proj (Phi-3 style); agml does not support fused MLP projections yet"
        )
    missing = [name for name in MLP_PROJECTIONS if linear(name) is None]
    if missing:
        children = ", ".join(name for name, _ in mlp.named_children()) or "none"
        raise AgmlError(
            f"{model_name}: the MLP of layer {index} ({type(mlp).__name__}) lacks {missing}; "
            f"its modules are: {children}"
        )
    return NeuronSite(index, mlp, (("gate_proj", 0), ("up_proj", 0)), "down_proj", linear("down_proj").in_features)


def neuron_sites(model: torch.nn.Module) -> list[NeuronSite]:
    """One NeuronSite per decoder layer, in layer order; an unsupported MLP layout raises AgmlError naming it."""
    return [_site(index, layer.mlp, type(model).__name__) for index, layer in enumerate(decoder_layers(model))]


def mlp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """One MLP per decoder layer, each checked to have a supported layout."""
    return [site.mlp for site in neuron_sites(model)]


def mlp_dims(model: torch.nn.Module) -> tuple[int, int]:
    """(number of decoder layers, MLP intermediate size)."""
    sites = neuron_sites(model)
    return len(sites), sites[0].width
