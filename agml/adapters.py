"""Attaching, saving, loading and baking neuron-masked LoRA adapters (the layer itself is `agml.layers`).

A masked adapter is a normal PEFT adapter whose MLP projections are `agml.layers.MaskedLoraLinear`; the neuron ids
travel in the adapter's safetensors (`<layer>.lora_out_index.ids` / `<layer>.lora_in_index.ids`, see
`agml.index_keys`), so a folder written by `save_adapter` or by PEFT's own `save_pretrained` is enough for
`load_adapter`, and PEFT's `hotswap_adapter` can swap one masked adapter for another. Where the neurons live in a
model comes from `agml.architecture.neuron_sites`. See docs/architecture.md ("Adapters").
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from agml import adapter_check
from agml.architecture import MLP_PROJECTIONS, NeuronSite, mlp_dims, neuron_sites
from agml.errors import AgmlError, InputError
from agml.index_keys import IN_INDEX, OUT_INDEX, PREVIOUS_LAYOUT_KEY_MAPPING, is_previous_layout, parse_index_key
from agml.io import atomic_folder
from agml.layers import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AGML_CONFIG,
    PEFT_PREFIX,
    IndexPair,
    MaskedLoraLinear,
    _pending_indices,
)
from agml.masks import NeuronMasks


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _unwrap(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _model_dims(model: nn.Module) -> tuple[int, int]:
    """(decoder layers, MLP intermediate size); works on models whose MLP Linears PEFT already wrapped."""
    return mlp_dims(_base_model(model))  # also checks the MLP layout, with an error naming what it found


def _check_hyperparameters(r: int, alpha: float, targets: Sequence[str], dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise InputError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise InputError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if isinstance(targets, str) or not targets:
        raise InputError(f"targets must be a non-empty list of MLP projections, got {targets!r}")
    unknown = [name for name in targets if name not in MLP_PROJECTIONS]
    if unknown or len(set(targets)) != len(targets):
        raise InputError(f"targets must be distinct names among {', '.join(MLP_PROJECTIONS)}; got {list(targets)}")


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in _base_model(model).named_modules()}


def _task_type(model: nn.Module) -> str | None:
    return "CAUSAL_LM" if hasattr(_base_model(model), "generate") else None


def _masked_targets(
    model: nn.Module, masks: NeuronMasks, targets: Sequence[str]
) -> dict[str, tuple[nn.Module, IndexPair]]:
    """Qualified module name -> (module as found, (out_index, in_index)) for every masked projection."""
    names = _module_names(model)
    sites = neuron_sites(_base_model(model))
    found = {}
    for layer, ids in masks.items():
        site = sites[layer]
        for projection in targets:
            module = site.projection(projection)
            pair = (None, ids) if projection == site.reader else (site.rows(projection, ids), None)
            found[names[id(module)]] = (module, pair)
    return found


def _refuse_plain_lora(modules: Mapping[str, nn.Module]) -> None:
    """PEFT would extend a plain LoRA layer with a full-size adapter, silently ignoring the mask."""
    for name, module in modules.items():
        if isinstance(module, LoraLayer) and not isinstance(module, MaskedLoraLinear):
            raise AgmlError(f"{name} already holds a plain PEFT LoRA adapter; a masked adapter cannot share it")


def _lora_config(r: int, alpha: float, dropout: float, target_modules: list[str], model: nn.Module) -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        task_type=_task_type(model),
    )


def _add_peft_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> PeftModel:
    if not isinstance(model, PeftModel):
        model = get_peft_model(model, config, adapter_name=adapter_name)
    elif adapter_name in model.peft_config:
        raise InputError(f"the model already has an adapter named {adapter_name!r}")
    else:
        model.add_adapter(adapter_name, config)
    _record_local_base(model, adapter_name)
    return model


def _record_local_base(model: PeftModel, adapter_name: str) -> None:
    """Point the adapter config's base model at the local folder `agml.models.load_model` read (if any).

    PEFT looks up `base_model_name_or_path`'s config.json when saving; for the built-in alias it would ask the hub
    (offline: misleading "Unable to fetch remote file" warnings). agml's own files keep the alias.
    """
    folder = getattr(model.get_base_model(), "agml_local_folder", None)
    if folder:
        model.peft_config[adapter_name].base_model_name_or_path = folder


def _masked_config(config: LoraConfig) -> LoraConfig:
    config._register_custom_module({nn.Linear: MaskedLoraLinear})
    return config


def apply_masked_lora(
    model: nn.Module,
    masks: NeuronMasks,
    r: int = 8,
    alpha: float = 16,
    targets: Sequence[str] = ("gate_proj", "up_proj", "down_proj"),
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> PeftModel:
    """Add a masked LoRA adapter on the MLP projections of the layers `masks` selects neurons in.

    A plain model becomes a `PeftModel` with this adapter active. On a `PeftModel` the adapter is
    added next to the others and, as with `PeftModel.add_adapter`, the active adapter is unchanged:
    call `set_adapter(adapter_name)` to use it. The base weights are never modified.
    """
    _check_hyperparameters(r, alpha, targets, dropout)
    if not isinstance(masks, Mapping):
        raise InputError(f"masks must be a NeuronMasks (layer -> neuron ids), got {type(masks).__name__}")
    masks = masks if isinstance(masks, NeuronMasks) else NeuronMasks(masks)
    num_layers, intermediate = _model_dims(model)
    masks.validate_for(num_layers, intermediate)
    if not len(masks):
        raise InputError("the mask selects no neuron in any layer: there is nothing to adapt")
    found = _masked_targets(model, masks, targets)
    _refuse_plain_lora({name: module for name, (module, _) in found.items()})
    config = _masked_config(_lora_config(r, alpha, dropout, sorted(found), model))
    with _pending_indices({_unwrap(module): pair for module, pair in found.values()}, adapter_name):
        return _add_peft_adapter(model, config, adapter_name)


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    targets: Sequence[str] = ("gate_proj", "up_proj", "down_proj"),
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> PeftModel:
    """Plain PEFT LoRA on `targets` of every decoder layer's MLP: the unmasked baseline (`--method lora`)."""
    _check_hyperparameters(r, alpha, targets, dropout)
    _model_dims(model)
    names = _module_names(model)
    modules = [site.projection(name) for site in neuron_sites(_base_model(model)) for name in targets]
    config = _lora_config(r, alpha, dropout, sorted(names[id(module)] for module in modules), model)
    return _add_peft_adapter(model, config, adapter_name)


def _masked_layers(peft_model: nn.Module, adapter_name: str) -> Iterator[tuple[str, MaskedLoraLinear]]:
    for name, module in peft_model.named_modules():
        if isinstance(module, MaskedLoraLinear) and adapter_name in module.lora_A:
            yield name, module


def adapter_masks(peft_model: PeftModel, adapter_name: str = "default") -> NeuronMasks:
    """The neurons a masked adapter may touch, per decoder layer (empty for a plain LoRA adapter)."""
    if adapter_name not in peft_model.peft_config:
        raise InputError(f"the model has no adapter named {adapter_name!r}")
    num_layers, intermediate = _model_dims(peft_model)
    layers = {}
    for site in neuron_sites(peft_model.get_base_model()):
        for projection in site.projections:
            module = site.projection(projection)
            if isinstance(module, MaskedLoraLinear) and adapter_name in module.lora_A:
                out_index, in_index = module.neuron_index(adapter_name)
                ids = in_index if projection == site.reader else _neurons_of_rows(site, projection, out_index)
                if ids is not None:
                    layers[site.key] = ids.cpu()
                    break
    return NeuronMasks(layers, meta={"num_layers": num_layers, "intermediate_size": intermediate})


def _neurons_of_rows(site: NeuronSite, projection: str, rows: torch.Tensor | None) -> torch.Tensor | None:
    """The neuron ids behind a writer's masked output rows (the first block of a fused projection)."""
    if rows is None:
        return None
    offsets = [offset for writer, offset in site.writers if writer == projection]
    return rows[: rows.numel() // len(offsets)] - offsets[0]


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of scalar parameters that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _write_adapter_folder(folder: Path, config: PeftConfig, tensors: dict[str, torch.Tensor]) -> None:
    config = copy.copy(config)
    config.inference_mode = True
    config.save_pretrained(str(folder))
    tensors = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def _check_adapter(peft_model: PeftModel, adapter_name: str) -> None:
    if not isinstance(peft_model, PeftModel):
        raise InputError(f"expected a PeftModel, got {type(peft_model).__name__}")
    if adapter_name not in peft_model.peft_config:
        raise InputError(f"the model has no adapter named {adapter_name!r} (it has {list(peft_model.peft_config)})")


def _agml_summary(peft_model: PeftModel, adapter_name: str) -> dict:
    config = peft_model.peft_config[adapter_name]
    masks = adapter_masks(peft_model, adapter_name)
    targets = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
    projections = sorted({name.rsplit(".", 1)[-1] for name in targets})
    return {
        "format": "agml-adapter",
        "version": 1,
        "method": "ag-masked-lora" if len(masks) else "lora",
        # The name agml.models.load_model understands (e.g. the built-in alias); PEFT's config holds the folder.
        "base_model": getattr(peft_model.get_base_model(), "name_or_path", None),
        "r": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "targets": projections,
        "neurons_per_layer": {str(layer): int(ids.numel()) for layer, ids in masks.items()},
        "total_neurons": masks.total,
        "note": "neuron ids are stored in adapter_model.safetensors (<layer>.lora_out_index.ids / "
        "<layer>.lora_in_index.ids)",
    }


def save_adapter(
    peft_model: PeftModel, path: str | os.PathLike, adapter_name: str = "default", overwrite: bool = False
) -> Path:
    """Write one adapter as a PEFT folder (config, safetensors with the neuron ids, agml_config.json), atomically."""
    _check_adapter(peft_model, adapter_name)
    tensors = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    summary = _agml_summary(peft_model, adapter_name)
    with atomic_folder(path, "replace" if overwrite else "error") as staging:
        _write_adapter_folder(staging, peft_model.peft_config[adapter_name], tensors)
        (staging / AGML_CONFIG).write_text(json.dumps(summary, indent=2) + "\n")
    return Path(path)


def export_baked(
    peft_model: PeftModel, path: str | os.PathLike, adapter_name: str = "default", overwrite: bool = False
) -> Path:
    """Write a plain PEFT LoRA folder (zeros outside the mask) that loads without agml, atomically."""
    _check_adapter(peft_model, adapter_name)
    tensors = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    tensors = {key: value for key, value in tensors.items() if parse_index_key(key) is None}
    for name, module in _masked_layers(peft_model, adapter_name):
        lora_a, lora_b = module.dense_factors(adapter_name)
        for key, dense in ((f"{name}.lora_A.weight", lora_a), (f"{name}.lora_B.weight", lora_b)):
            if key not in tensors:
                raise AgmlError(f"PEFT state dict lacks {key}; this PEFT version names adapter weights differently")
            tensors[key] = dense
    with atomic_folder(path, "replace" if overwrite else "error") as staging:
        _write_adapter_folder(staging, peft_model.peft_config[adapter_name], tensors)
    return Path(path)


def _checked_index(ids: torch.Tensor, size: int, where: str) -> torch.Tensor:
    ids = ids.to(torch.int64).reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise InputError(f"{where}: neuron ids outside [0, {size})")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise InputError(f"{where}: neuron ids must be sorted and unique")
    return ids


def _saved_indices(model: nn.Module, tensors: Mapping[str, torch.Tensor], folder: Path) -> dict[nn.Linear, IndexPair]:
    """Base Linear -> (out_index, in_index) from the index buffers of a saved adapter."""
    modules = dict(_base_model(model).named_modules())
    pairs: dict[nn.Linear, list] = {}
    for key, ids in tensors.items():
        parsed = parse_index_key(key)
        if parsed is None:
            continue
        module_key, store = parsed
        module_name = module_key.removeprefix(PEFT_PREFIX)
        if module_name not in modules:
            raise InputError(f"{folder}: the adapter targets {module_name}, which {type(model).__name__} lacks")
        _refuse_plain_lora({module_name: modules[module_name]})
        linear = _unwrap(modules[module_name])
        size = linear.out_features if store == OUT_INDEX else linear.in_features
        pair = pairs.setdefault(linear, [None, None])
        pair[0 if store == OUT_INDEX else 1] = _checked_index(ids, size, f"{folder}: {key}")
    return {linear: (pair[0], pair[1]) for linear, pair in pairs.items()}


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> PeftModel:
    """Load a folder written by `save_adapter`, `export_baked` or PEFT's `save_pretrained` onto `model`.

    `model` is a plain transformers model (it becomes a PeftModel) or a PeftModel (the adapter is
    added, not activated). Masked layers are rebuilt from the neuron ids saved with the weights.
    """
    folder = Path(path)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise InputError(f"{folder} is not an adapter folder: {name} is missing")
    try:
        config = PeftConfig.from_pretrained(str(folder))
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except (ValueError, OSError, TypeError, KeyError) as err:
        raise InputError(f"{folder}: cannot read the adapter: {err}") from err
    if not isinstance(config, LoraConfig):
        raise InputError(f"{folder} holds a {config.peft_type} adapter; agml loads LoRA adapters only")
    _model_dims(model)
    if isinstance(model, PeftModel) and adapter_name in model.peft_config:
        raise InputError(f"the model already has an adapter named {adapter_name!r}")
    indices = _saved_indices(model, tensors, folder)
    config.inference_mode = not is_trainable
    if indices:
        _masked_config(config)
    previous_layout = _previous_layout_options(model, tensors)
    with _pending_indices(indices, adapter_name):
        if not isinstance(model, PeftModel):
            return PeftModel.from_pretrained(
                model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable, config=config,
                **previous_layout,
            )
        model.add_adapter(adapter_name, config)
    model.load_adapter(str(folder), adapter_name, is_trainable=is_trainable, **previous_layout)
    _set_adapter_trainable(model, adapter_name, is_trainable)
    return model


def _previous_layout_options(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict:
    """PEFT loading options for a file in the previous index layout: a `key_mapping` renaming its index keys.

    Nothing for current files (PEFT's defaults). Replacing PEFT's default `key_mapping` (the model's own checkpoint
    conversion mapping) keeps that mapping first; PEFT applies only the first entry that matches a key.
    """
    if not is_previous_layout(tensors):
        return {}
    own = {} if isinstance(model, PeftModel) else dict(getattr(model, "_checkpoint_conversion_mapping", None) or {})
    return {"key_mapping": own | PREVIOUS_LAYOUT_KEY_MAPPING}


def _set_adapter_trainable(model: PeftModel, adapter_name: str, trainable: bool) -> None:
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for store in (module.lora_A, module.lora_B):
                if adapter_name in store:
                    store[adapter_name].requires_grad_(trainable)


def check_hotswap(peft_model: PeftModel, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Refuse, before anything is swapped, a saved masked adapter that PEFT's `hotswap_adapter` cannot swap in whole.

    PEFT swaps one tensor at a time. It can give a layer the same number of neurons (copied in place) or more
    (tensors swapped, like a larger rank), but not fewer: it pads only 2-D LoRA factors, so on the first layer with
    fewer neurons it raises NotImplementedError with the earlier layers already swapped. After
    `prepare_model_for_compiled_hotswap` (tensor scalings, padded ranks) only the same number works: more would
    leave padded and unpadded factors that no longer multiply. A layer masked in only one of the two adapters cannot
    be swapped either (PEFT would zero the model's ids). See docs/architecture.md ("Hotswapping").
    """
    _check_adapter(peft_model, adapter_name)
    folder = Path(path)
    tensors = adapter_check.read_adapter_tensors(folder)
    adapter_check.check_finite(tensors, str(folder))
    adapter_check.check_neuron_indices(tensors, str(folder))
    if is_previous_layout(tensors):
        raise InputError(f"{folder} stores its neuron ids in agml's previous layout, which PEFT's hotswap_adapter "
                         "cannot read: load it with load_adapter and save it again with save_adapter")
    incoming: dict[str, dict[str, torch.Tensor]] = {}
    for key, ids in tensors.items():
        parsed = parse_index_key(key)
        if parsed is not None:
            incoming.setdefault(parsed[0], {})[parsed[1]] = ids
    problems = []
    for name, module in _masked_layers(peft_model, adapter_name):
        new = incoming.pop(name, {})
        for store, old in zip((OUT_INDEX, IN_INDEX), module.neuron_index(adapter_name), strict=True):
            ids = new.get(store)
            if (old is None) != (ids is None):
                problems.append(f"{name} has a neuron mask in only one of the two adapters")
            elif ids is not None:
                base = module.get_base_layer()
                size = base.out_features if store == OUT_INDEX else base.in_features
                ids = _checked_index(ids, size, f"{folder}: {name}")
                prepared = isinstance(module.scaling[adapter_name], torch.Tensor)
                if ids.numel() < old.numel() or (prepared and ids.numel() != old.numel()):
                    problems.append(f"{name}: {ids.numel()} neurons instead of {old.numel()}")
    problems += [f"{name} has a neuron mask in only one of the two adapters" for name in incoming]
    if problems:
        listed = sorted(set(problems))
        raise AgmlError(
            f"cannot hotswap {folder} into adapter {adapter_name!r}: PEFT's hotswap_adapter swaps a masked layer "
            "only to the same number of neurons or more (the same number after prepare_model_for_compiled_hotswap), "
            f"and only where both adapters mask it ({'; '.join(listed[:5])}{'; ...' if len(listed) > 5 else ''}). "
            "Load the adapter instead (load_adapter)"
        )


def hotswap_adapter(
    peft_model: PeftModel, path: str | os.PathLike, adapter_name: str = "default", torch_device: str | None = None
) -> None:
    """PEFT's `hotswap_adapter` after `check_hotswap`: a refused adapter leaves the model untouched."""
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter

    check_hotswap(peft_model, path, adapter_name)
    peft_hotswap_adapter(peft_model, str(path), adapter_name=adapter_name, torch_device=torch_device)
