"""Neuron-masked LoRA as a PEFT drop-in: the adapter is a normal `PeftModel` adapter.

`MaskedLoraLinear` is PEFT's LoRA `Linear` with compact factors: on `gate_proj`/`up_proj`
`lora_B` holds one row per selected MLP neuron, on `down_proj` `lora_A` one column per
selected neuron. It is registered through `LoraConfig._register_custom_module`, so PEFT's
adapter bookkeeping (several adapters, `set_adapter`, `disable_adapter()`, merge/unmerge,
`merge_and_unload`, `save_pretrained`) keeps working. Its forward calls
`agml_kernels.masked_lora_linear`.

The selected neuron ids live in persistent buffers named `lora_out_index` / `lora_in_index`
(one entry per adapter), so they travel inside `adapter_model.safetensors`: a folder written
by `save_adapter` or by PEFT's own `save_pretrained` is enough for `load_adapter`.

PEFT versions: PEFT 0.19 changed the LoRA layer API from one keyword per option
(`Linear(base_layer, adapter_name, r=, lora_alpha=, lora_dropout=, init_lora_weights=, ...)`,
`update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, ...)`)
to a `config=LoraConfig` argument (`Linear(base_layer, adapter_name, config, r=, lora_alpha=)`,
`update_layer(adapter_name, r, lora_alpha, config, ...)`). `MaskedLoraLinear` forwards every
constructor and `update_layer` argument untouched and reads nothing from them: the neuron
selection reaches it through a pending attribute on the base `nn.Linear`, which both APIs hand
over, so the same class works with PEFT 0.17 and later (tested here with the installed release).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from agml.architecture import MLP_PROJECTIONS, decoder_layers, mlp_dims
from agml.errors import AgmlError, InputError
from agml.masks import NeuronMasks
from agml_kernels import masked_lora_linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
AGML_CONFIG = "agml_config.json"
PEFT_PREFIX = "base_model.model."
OUT_INDEX = "lora_out_index"
IN_INDEX = "lora_in_index"
# Attribute on a base nn.Linear holding {adapter name: (out_index, in_index)} while PEFT builds the adapter.
_PENDING_INDEX = "_agml_pending_neuron_index"
# Projections whose output neurons are the MLP intermediate neurons; the others read them.
_WRITES_NEURONS = ("gate_proj", "up_proj")

IndexPair = tuple[torch.Tensor | None, torch.Tensor | None]


class MaskedLoraLinear(LoraLinear):
    """PEFT LoRA `Linear` whose LoRA writes only `out_index` rows and reads only `in_index` columns.

    An adapter without indices (e.g. a plain LoRA adapter added to an already masked layer) is a
    full LoRA. No adapter may use DoRA or another LoRA variant; a masked adapter may also not use
    lora_bias or a data-driven initialisation (PiSSA, OLoRA, ...). These are refused before PEFT
    builds anything.

    Forward: the fused `agml_kernels.masked_lora_linear` runs only where it computes exactly what
    PEFT's composition would (see `_fused_path_safe`); everywhere else the layer composes like
    PEFT's `lora.Linear`: `base_layer(x)` plus `lora_B(lora_A(dropout(x)))` in the adapter's dtype,
    with the mask applied by `index_select` on the input columns and `index_add` on the output rows.
    """

    def update_layer(self, adapter_name: str, r: int, *args, **kwargs) -> None:
        out_index, in_index = _take_pending_index(self.get_base_layer(), adapter_name)
        if out_index is None and in_index is None:
            out_index, in_index = self._combined_adapter_index()
        _refuse_unsupported_options(
            _adapter_options(args, kwargs), masked=out_index is not None or in_index is not None
        )
        # PEFT sizes lora_A/lora_B from in_features/out_features; shrinking them for the call makes
        # PEFT create, initialise, place and freeze the compact factors exactly like its own.
        with self._compact_features(out_index, in_index):
            super().update_layer(adapter_name, r, *args, **kwargs)
        if adapter_name in self.lora_variant:
            raise AgmlError("masked LoRA supports plain LoRA only: no DoRA or other LoRA variants")
        device = self.get_base_layer().weight.device
        for store_name, index in ((OUT_INDEX, out_index), (IN_INDEX, in_index)):
            if index is not None:
                # Each layer keeps its own copy: safetensors refuses tensors that share storage.
                self._index_store(store_name)[adapter_name] = index.to(device, copy=True)

    def _combined_adapter_index(self) -> IndexPair:
        """The index of an adapter that PEFT's `add_weighted_adapter` is building here; (None, None) otherwise.

        The 'svd' family combines dense delta weights, so its result is a full-size adapter. The other
        combinations ('cat', 'linear', 'ties', 'dare_*', 'magnitude_prune') combine the factors tensor by
        tensor, which is meaningful only when every masked source on this layer uses the same neuron index:
        the result then uses that index too; otherwise it is refused.
        """
        call = _weighted_adapter_call()
        if call is None:
            return None, None
        sources, combination = call
        pairs = [self.neuron_index(name) for name in sources if name in self.lora_A]
        if all(index is None for pair in pairs for index in pair) or "svd" in combination:
            return None, None
        first = pairs[0]
        if all(_same_index(pair[side], first[side]) for pair in pairs for side in (0, 1)):
            return tuple(None if index is None else index.clone() for index in first)  # type: ignore[return-value]
        raise AgmlError(
            f"add_weighted_adapter(combination_type={combination!r}) combines LoRA factors tensor by tensor, which "
            f"needs every masked adapter in {list(sources)} to select the same neurons; these differ: use "
            "combination_type='svd' (or another '*_svd' type)"
        )

    @contextlib.contextmanager
    def _compact_features(self, out_index: torch.Tensor | None, in_index: torch.Tensor | None) -> Iterator[None]:
        full = (self.in_features, self.out_features)
        if in_index is not None:
            self.in_features = int(in_index.numel())
        if out_index is not None:
            self.out_features = int(out_index.numel())
        try:
            yield
        finally:
            self.in_features, self.out_features = full

    def _index_store(self, name: str) -> BufferDict:
        # Created on first use: PEFT's constructor calls update_layer before a subclass could add modules.
        if name not in self._modules:
            self.add_module(name, BufferDict(persistent=True))
        return self._modules[name]

    def neuron_index(self, adapter_name: str) -> IndexPair:
        """(out_index, in_index) of an adapter; None where the adapter covers every row/column."""
        return tuple(  # type: ignore[return-value]
            self._modules[name][adapter_name] if name in self._modules and adapter_name in self._modules[name] else None
            for name in (OUT_INDEX, IN_INDEX)
        )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for name in (OUT_INDEX, IN_INDEX):
            if name in self._modules and adapter_name in self._modules[name]:
                del self._modules[name][adapter_name]

    def _check_factor_shapes(self, adapter_name: str) -> None:
        """Refuse factors that do not fit the adapter's index (what PEFT's tensor-level adapter tools can produce)."""
        out_index, in_index = self.neuron_index(adapter_name)
        k_in = self.in_features if in_index is None else in_index.numel()
        k_out = self.out_features if out_index is None else out_index.numel()
        a_cols = self.lora_A[adapter_name].weight.shape[1]
        b_rows = self.lora_B[adapter_name].weight.shape[0]
        if (a_cols, b_rows) != (k_in, k_out):
            raise AgmlError(
                f"adapter {adapter_name!r} has LoRA factors for {a_cols} input columns and {b_rows} output rows, "
                f"but its neuron index selects {k_in} and {k_out}: it was built by combining masked adapters "
                "tensor by tensor (e.g. add_weighted_adapter with a 'linear'/'ties'/'dare'/'magnitude_prune'/'cat' "
                "combination); combine masked adapters with combination_type='svd' (or another '*_svd' type)"
            )

    def dense_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """lora_A (r, in_features) and lora_B (out_features, r) with zeros outside the mask."""
        self._check_factor_shapes(adapter_name)
        lora_a = self.lora_A[adapter_name].weight
        lora_b = self.lora_B[adapter_name].weight
        out_index, in_index = self.neuron_index(adapter_name)
        if in_index is not None:
            lora_a = lora_a.new_zeros(lora_a.shape[0], self.in_features).index_copy(1, in_index, lora_a)
        if out_index is not None:
            lora_b = lora_b.new_zeros(self.out_features, lora_b.shape[1]).index_copy(0, out_index, lora_b)
        return lora_a, lora_b

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        lora_a, lora_b = self.dense_factors(adapter)
        dtype = lora_b.dtype
        # Like PEFT: CPUs are slow at half-precision matmuls, so merge in float32 there.
        upcast = lora_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if upcast:
            lora_a, lora_b = lora_a.float(), lora_b.float()
        return ((lora_b @ lora_a) * self.scaling[adapter]).to(dtype)

    def merge(self, *args, **kwargs) -> None:
        base = self.get_base_layer()
        if type(base) is not nn.Linear or base.weight.dtype not in _FLOAT_DTYPES:
            raise AgmlError(
                f"cannot merge a masked LoRA adapter into a {type(base).__name__} with {base.weight.dtype} weights "
                "(quantised or custom Linear): use the adapter unmerged"
            )
        super().merge(*args, **kwargs)

    def _lora_term(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """scaling * lora_B(lora_A(dropout(x[..., in_index]))) in the adapter's dtype, as PEFT computes it."""
        self._check_factor_shapes(adapter_name)
        lora_a = self.lora_A[adapter_name]
        x = self._cast_input_dtype(self.lora_dropout[adapter_name](x), lora_a.weight.dtype)
        in_index = self.neuron_index(adapter_name)[1]
        if in_index is not None:
            x = x.index_select(-1, in_index)
        return self.lora_B[adapter_name](lora_a(x)) * self.scaling[adapter_name]

    def _add_lora(self, result: torch.Tensor, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """`result` plus the adapter's term on input `x` (out of place; promoted to the wider dtype like PEFT)."""
        term = self._lora_term(adapter_name, x)
        out_index = self.neuron_index(adapter_name)[0]
        if out_index is None:
            return result + term
        dtype = torch.promote_types(result.dtype, term.dtype)
        return result.to(dtype).index_add(-1, out_index, term.to(dtype))

    def _fused_path_safe(self, adapter_name: str, x: torch.Tensor) -> bool:
        """True where the fused op computes exactly what `base_layer(x)` + the LoRA modules would.

        The fused op reads the weights directly, so it must not skip anything a module call would
        do: hooks (accelerate offload, DeepSpeed ZeRO-3, user hooks), a base that is not a plain
        float `nn.Linear` (bitsandbytes/FP8 subclasses, another tuner layer such as LoHa), a tensor
        scaling (hotswap), autocast, dropout, or mixed dtypes (PEFT runs LoRA in the adapter dtype).
        """
        base = self.base_layer
        lora_a, lora_b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        if type(base) is not nn.Linear or _global_hooks_present():
            return False
        if any(_runs_hooks(module) for module in (base, lora_a, lora_b)):
            return False
        weight = base.weight
        return (
            not isinstance(self.scaling[adapter_name], torch.Tensor)
            and lora_a.bias is None
            and lora_b.bias is None
            and not self._dropout_active(adapter_name)
            and not torch.is_autocast_enabled(x.device.type)
            and type(x) is torch.Tensor
            and type(weight.data) is torch.Tensor
            and x.dtype in _FLOAT_DTYPES
            and x.dtype == weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype
            and x.device == weight.device == lora_a.weight.device == lora_b.weight.device
        )

    def _fused_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        self._check_factor_shapes(adapter_name)
        base = self.base_layer
        out_index, in_index = self.neuron_index(adapter_name)
        result = masked_lora_linear(
            x,
            base.weight,
            base.bias,
            self.lora_A[adapter_name].weight,
            self.lora_B[adapter_name].weight,
            self.scaling[adapter_name],
            out_index=out_index,
            in_index=in_index,
        )
        if result.requires_grad and result._is_view():
            # A view made inside a custom autograd Function cannot be modified in place (ReLU(inplace=True),
            # `out += residual`, a tuner layer stacked on top); PEFT's output can, so hand back a fresh tensor.
            result = result.clone()
        return result

    def _dropout_active(self, adapter_name: str) -> bool:
        dropout = self.lora_dropout[adapter_name]
        if isinstance(dropout, nn.Identity):
            return False
        return not (isinstance(dropout, nn.Dropout) and (not dropout.training or dropout.p == 0))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        kwargs.pop("alora_offsets", None)  # aLoRA variant argument; masked adapters never use it
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        active = [name for name in self.active_adapters if name in self.lora_A]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        first, *others = active
        if not args and not kwargs and self._fused_path_safe(first, x):
            result, pending = self._fused_forward(first, x), others
        else:
            result, pending = self.base_layer(x, *args, **kwargs), active
        result_dtype = result.dtype
        for name in pending:
            result = self._add_lora(result, name, x)
        return result.to(result_dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: Sequence[str], **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in set(adapter_names):
            if name not in self.lora_A:  # includes "__base__", PEFT's name for "no adapter"
                continue
            rows = [i for i, row_adapter in enumerate(adapter_names) if row_adapter == name]
            result[rows] = self._add_lora(result[rows], name, x[rows]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "agml." + super().__repr__().removeprefix("lora.")


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Initialisations computed from the base weights or from data: they assume full-size factors.
_DATA_DRIVEN_INITS = ("pissa", "olora", "corda", "loftq", "eva", "lora_ga")


def _adapter_options(args: tuple, kwargs: dict) -> Mapping:
    """The adapter's LoRA options, from the `LoraConfig` PEFT >= 0.19 passes or the keywords older releases pass."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, LoraConfig):
            return vars(value)
    return kwargs


def _refuse_unsupported_options(options: Mapping, masked: bool) -> None:
    """Refuse, before PEFT builds anything, the options masked LoRA cannot honour (see the class docstring)."""
    if options.get("use_dora") or options.get("use_alora"):
        raise AgmlError("masked LoRA supports plain LoRA only: no DoRA or other LoRA variants")
    if masked and options.get("lora_bias"):
        raise AgmlError("masked LoRA supports plain LoRA only: no lora_bias on an adapter with a neuron mask")
    init = options.get("init_lora_weights", True)
    if masked and isinstance(init, str) and init.lower().startswith(_DATA_DRIVEN_INITS):
        raise AgmlError(
            f"init_lora_weights={init!r} initialises full-size factors from the base weights or from data; "
            "a masked adapter cannot use it (use True, False, 'gaussian' or 'orthogonal')"
        )


def _same_index(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _weighted_adapter_call() -> tuple[list[str], str] | None:
    """(source adapters, combination type) while PEFT's `LoraModel.add_weighted_adapter` builds an adapter.

    PEFT builds the combined adapter through the ordinary `update_layer` and writes the combined
    factors afterwards; nothing passed to the layer says so, so the caller's frame is read.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "add_weighted_adapter" and isinstance(frame.f_locals.get("self"), LoraModel):
                return list(frame.f_locals["adapters"]), str(frame.f_locals["combination_type"])
            frame = frame.f_back
        return None
    finally:
        del frame


def _runs_hooks(module: nn.Module) -> bool:
    """True when calling `module` does more than its `forward` (hooks, accelerate's `_hf_hook`, a patched forward)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or hasattr(module, "_hf_hook")
        or "forward" in vars(module)
    )


def _global_hooks_present() -> bool:
    hooks = torch.nn.modules.module
    return bool(
        hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


def _take_pending_index(base_layer: nn.Module, adapter_name: str) -> IndexPair:
    pending = getattr(base_layer, _PENDING_INDEX, None) or {}
    return pending.pop(adapter_name, (None, None))


@contextlib.contextmanager
def _pending_indices(assignments: Mapping[nn.Linear, IndexPair], adapter_name: str) -> Iterator[None]:
    """Hand each base Linear its neuron index while PEFT builds the adapter (see module docstring)."""
    try:
        for linear, pair in assignments.items():
            pending = getattr(linear, _PENDING_INDEX, None) or {}
            pending[adapter_name] = pair
            setattr(linear, _PENDING_INDEX, pending)
        yield
    finally:
        for linear in assignments:
            if hasattr(linear, _PENDING_INDEX):
                delattr(linear, _PENDING_INDEX)


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _unwrap(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _model_dims(model: nn.Module) -> tuple[int, int]:
    """(decoder layers, MLP intermediate size); works on models whose MLP Linears PEFT already wrapped."""
    base = _base_model(model)
    if not isinstance(model, PeftModel):
        return mlp_dims(base)  # also checks the gate/up/down layout, with an error naming what it found
    layers = decoder_layers(base)
    return len(layers), _unwrap(layers[0].mlp.down_proj).in_features


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
    layers = decoder_layers(_base_model(model))
    found = {}
    for layer, ids in masks.items():
        for projection in targets:
            module = getattr(layers[layer].mlp, projection)
            pair = (ids, None) if projection in _WRITES_NEURONS else (None, ids)
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
        return get_peft_model(model, config, adapter_name=adapter_name)
    if adapter_name in model.peft_config:
        raise InputError(f"the model already has an adapter named {adapter_name!r}")
    model.add_adapter(adapter_name, config)
    return model


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
    modules = [getattr(layer.mlp, name) for layer in decoder_layers(_base_model(model)) for name in targets]
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
    for index, layer in enumerate(decoder_layers(peft_model.get_base_model())):
        for projection in MLP_PROJECTIONS:
            module = getattr(layer.mlp, projection)
            if isinstance(module, MaskedLoraLinear) and adapter_name in module.lora_A:
                out_index, in_index = module.neuron_index(adapter_name)
                ids = out_index if projection in _WRITES_NEURONS else in_index
                if ids is not None:
                    layers[index] = ids.cpu()
                    break
    return NeuronMasks(layers, meta={"num_layers": num_layers, "intermediate_size": intermediate})


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of scalar parameters that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def _atomic_folder(path: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `path` once the block succeeds."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise InputError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield staging
        if path.is_dir() and any(path.iterdir()):
            # A folder cannot be renamed over a non-empty one: move the old one aside first.
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / path.name)
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


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
        "r": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "targets": projections,
        "neurons_per_layer": {str(layer): int(ids.numel()) for layer, ids in masks.items()},
        "total_neurons": masks.total,
        "note": "neuron ids are stored in adapter_model.safetensors (lora_out_index / lora_in_index)",
    }


def save_adapter(
    peft_model: PeftModel, path: str | os.PathLike, adapter_name: str = "default", overwrite: bool = False
) -> Path:
    """Write one adapter as a PEFT folder (config, safetensors with the neuron ids, agml_config.json), atomically."""
    _check_adapter(peft_model, adapter_name)
    tensors = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    summary = _agml_summary(peft_model, adapter_name)
    with _atomic_folder(path, overwrite) as staging:
        _write_adapter_folder(staging, peft_model.peft_config[adapter_name], tensors)
        (staging / AGML_CONFIG).write_text(json.dumps(summary, indent=2) + "\n")
    return Path(path)


def export_baked(
    peft_model: PeftModel, path: str | os.PathLike, adapter_name: str = "default", overwrite: bool = False
) -> Path:
    """Write a plain PEFT LoRA folder (zeros outside the mask) that loads without agml, atomically."""
    _check_adapter(peft_model, adapter_name)
    tensors = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    tensors = {key: value for key, value in tensors.items() if not key.endswith((OUT_INDEX, IN_INDEX))}
    for name, module in _masked_layers(peft_model, adapter_name):
        lora_a, lora_b = module.dense_factors(adapter_name)
        for key, dense in ((f"{name}.lora_A.weight", lora_a), (f"{name}.lora_B.weight", lora_b)):
            if key not in tensors:
                raise AgmlError(f"PEFT state dict lacks {key}; this PEFT version names adapter weights differently")
            tensors[key] = dense
    with _atomic_folder(path, overwrite) as staging:
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
        module_key, _, store = key.rpartition(".")
        if store not in (OUT_INDEX, IN_INDEX):
            continue
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
    with _pending_indices(indices, adapter_name):
        if not isinstance(model, PeftModel):
            return PeftModel.from_pretrained(
                model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable, config=config
            )
        model.add_adapter(adapter_name, config)
    model.load_adapter(str(folder), adapter_name, is_trainable=is_trainable)
    _set_adapter_trainable(model, adapter_name, is_trainable)
    return model


def _set_adapter_trainable(model: PeftModel, adapter_name: str, trainable: bool) -> None:
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for store in (module.lora_A, module.lora_B):
                if adapter_name in store:
                    store[adapter_name].requires_grad_(trainable)
