"""Neuron-masked LoRA as a PEFT drop-in: the adapter is a normal `PeftModel` adapter.

`MaskedLoraLinear` is PEFT's LoRA `Linear` with compact factors: on `gate_proj`/`up_proj`
`lora_B` holds one row per selected MLP neuron, on `down_proj` `lora_A` one column per
selected neuron. It is registered through `LoraConfig._register_custom_module`, so PEFT's
adapter bookkeeping (several adapters, `set_adapter`, `disable_adapter()`, merge/unmerge,
`merge_and_unload`, `save_pretrained`) keeps working. Its forward calls
`agml_kernels.masked_lora_linear`.

The selected neuron ids live in persistent buffers (`<layer>.lora_out_index.<adapter>.ids`,
layout in `agml.index_keys`), so they travel inside `adapter_model.safetensors`: a folder written
by `save_adapter` or by PEFT's own `save_pretrained` is enough for `load_adapter`, and PEFT's
`hotswap_adapter` swaps them with the factors. Attaching, saving, loading and baking live in
`agml.adapters`; their names stay importable from here.

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
import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from agml.errors import AgmlError
from agml.index_keys import IN_INDEX, INDEX_BUFFER, OUT_INDEX
from agml_kernels import masked_lora_linear, prepare_masked_lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
AGML_CONFIG = "agml_config.json"
PEFT_PREFIX = "base_model.model."
# Attribute on a base nn.Linear holding {adapter name: (out_index, in_index)} while PEFT builds the adapter.
_PENDING_INDEX = "_agml_pending_neuron_index"

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
                self._index_store(store_name)[adapter_name] = _NeuronIds(index.to(device, copy=True))

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

    def _index_store(self, name: str) -> nn.ModuleDict:
        # Created on first use: PEFT's constructor calls update_layer before a subclass could add modules.
        if name not in self._modules:
            self.add_module(name, nn.ModuleDict())
        return self._modules[name]

    def neuron_index(self, adapter_name: str) -> IndexPair:
        """(out_index, in_index) of an adapter; None where the adapter covers every row/column."""
        return tuple(  # type: ignore[return-value]
            getattr(self._modules[name][adapter_name], INDEX_BUFFER)
            if name in self._modules and adapter_name in self._modules[name]
            else None
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
                f"but its neuron index selects {k_in} and {k_out}. Either it was built by combining masked adapters "
                "tensor by tensor (add_weighted_adapter with a 'linear'/'ties'/'dare'/'magnitude_prune'/'cat' "
                "combination: use combination_type='svd' or another '*_svd' type), or PEFT's hotswap_adapter stopped "
                "midway (an adapter with fewer neurons in some layer: load it with agml.adapters.load_adapter, or "
                "check first with agml.adapters.check_hotswap)"
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

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """PEFT's merge; a masked adapter first keeps the base rows/columns it changes, so `unmerge` is exact."""
        base = self.get_base_layer()
        if not _plain_float_linear(base):
            raise AgmlError(
                f"cannot merge a masked LoRA adapter into a {type(base).__name__} with {base.weight.dtype} weights "
                "(quantised or custom Linear): use the adapter unmerged"
            )
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
        if not names:
            return
        originals = self._merge_originals()
        for name in names:
            originals[name] = self._touched_slice(name)
        try:
            with warnings.catch_warnings():  # PEFT's merge checks again: its "already merged" warning came above
                warnings.filterwarnings("ignore", message="Already following adapters were merged")
                super().merge(safe_merge=safe_merge, adapter_names=names)
        finally:
            for name in names:  # an adapter that did not merge (safe_merge found NaNs) keeps nothing
                if name not in self.merged_adapters:
                    originals.pop(name, None)

    def unmerge(self) -> None:
        """PEFT's unmerge, except that a masked adapter's rows/columns get their saved pre-merge values back
        (bit-exact; subtracting the delta again, as PEFT does, leaves rounding errors in the base weights)."""
        if not self.merged:
            super().unmerge()  # PEFT's "Already unmerged" warning
            return
        originals = self._merge_originals()
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            saved = originals.pop(name, None)
            if name not in self.lora_A:
                continue
            if saved is not None:
                dim, index, values = saved
                weight = base.weight.data  # moved or cast since the merge: restore in its current place and type
                weight.index_copy_(dim, index.to(weight.device), values.to(weight.device, weight.dtype))
                continue
            base.weight.data -= self.get_delta_weight(name).to(base.weight.dtype)  # a full-size adapter
            if self.lora_bias[name]:
                base.bias.data -= self.lora_B[name].bias * self.scaling[name]

    def exact_unmerge(self, adapter_name: str) -> bool:
        """True when merging this adapter can be undone bit-exactly (it touches only masked rows or columns)."""
        return any(index is not None for index in self.neuron_index(adapter_name))

    def _merge_originals(self) -> dict:
        # A plain attribute (not a buffer): the saved values must never reach a state dict or a saved adapter.
        if "_agml_merge_originals" not in self.__dict__:
            self.__dict__["_agml_merge_originals"] = {}
        return self.__dict__["_agml_merge_originals"]

    def _touched_slice(self, adapter_name: str) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """(dim, index, copy of the base weight there) for the rows/columns the adapter's delta can change."""
        out_index, in_index = self.neuron_index(adapter_name)
        weight = self.get_base_layer().weight.data
        if out_index is not None:
            return 0, out_index, weight.index_select(0, out_index)
        if in_index is not None:
            return 1, in_index, weight.index_select(1, in_index)
        return None

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
        result = masked_lora_linear(
            x,
            base.weight,
            base.bias,
            self.lora_A[adapter_name].weight,
            self.lora_B[adapter_name].weight,
            self.scaling[adapter_name],
            **self._kernel_plan(adapter_name),
        )
        if result.requires_grad and result._is_view():
            # A view made inside a custom autograd Function cannot be modified in place (ReLU(inplace=True),
            # `out += residual`, a tuner layer stacked on top); PEFT's output can, so hand back a fresh tensor.
            result = result.clone()
        return result

    def _kernel_plan(self, adapter_name: str) -> dict:
        """The adapter's indices checked once and their column positions, cached until an index changes.

        Checking indices synchronises with the host; doing it once per adapter keeps every later forward free of
        device->host syncs (docs/architecture.md, "Kernels"). The cache key notices a moved (`.to`), rewritten
        in place (`load_state_dict`, PEFT's hotswap `copy_`: both bump the tensor's version) or swapped
        (`torch.utils.swap_tensors`, PEFT's hotswap to more neurons: same object, new storage and version) index.
        """
        indices = self.neuron_index(adapter_name)
        key = tuple(
            None if t is None else (id(t), t.device, t._version, t.data_ptr(), tuple(t.shape)) for t in indices
        )
        plans = self.__dict__.setdefault("_agml_kernel_plans", {})
        cached = plans.get(adapter_name)
        if cached is None or cached[0] != key:
            base = self.get_base_layer()
            plan = prepare_masked_lora(*indices, base.out_features, base.in_features)
            # Holding the storages keeps their addresses from being reused by a later index while cached.
            storages = [t.untyped_storage() for t in indices if t is not None]
            cached = (key, plan, storages)
            plans[adapter_name] = cached
        return cached[1]

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


class _NeuronIds(nn.Module):
    """One adapter's neuron ids on one side of a layer, in the persistent buffer `ids` (see `agml.index_keys`)."""

    def __init__(self, ids: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer(INDEX_BUFFER, ids, persistent=True)

    def extra_repr(self) -> str:
        return f"{getattr(self, INDEX_BUFFER).numel()} ids"


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Initialisations computed from the base weights or from data: they assume full-size factors.
_DATA_DRIVEN_INITS = ("pissa", "olora", "corda", "loftq", "eva", "lora_ga")


@contextlib.contextmanager
def adapter_merged(model: nn.Module) -> Iterator[bool]:
    """`model` with its active adapter merged into the base weights for the block; yields whether it merged.

    A merged forward costs what the base model's does (one matmul per projection instead of three); the evaluation
    runs its adapter-side passes this way. On exit every layer is unmerged bit-exactly (`MaskedLoraLinear.unmerge`
    restores the rows/columns the adapter changed), so later base-model passes and saved weights see the same base.
    The block runs unmerged instead (the same results up to float rounding) wherever that guarantee or the merge
    could fail: a tuner layer that is not masked LoRA, an adapter without a neuron index, a layer already merged or
    disabled, a quantised, hooked or non-float base layer, or several processes (sharded weights). A base-model
    pass inside the block (`disable_adapter()`) unmerges exactly, as PEFT's layers do, and the rest runs unmerged.
    """
    from agml import distributed

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if distributed.world_size() > 1 or not layers or not all(_exactly_mergeable(m) for m in layers):
        yield False
        return
    try:
        for layer in layers:
            layer.merge()
        yield True
    finally:
        for layer in layers:
            if layer.merged:
                layer.unmerge()


def _exactly_mergeable(layer: nn.Module) -> bool:
    if not isinstance(layer, MaskedLoraLinear) or layer.merged or layer.disable_adapters:
        return False
    base = layer.get_base_layer()
    if not _plain_float_linear(base) or _runs_hooks(base):
        return False
    if type(base.weight.data) is not torch.Tensor or base.weight.device.type == "meta":
        return False
    return all(layer.exact_unmerge(name) for name in layer.active_adapters if name in layer.lora_A)


def _plain_float_linear(base: nn.Module) -> bool:
    """A base a LoRA delta can be added to in place: exactly `nn.Linear` (no quantised subclass), float weights."""
    return type(base) is nn.Linear and base.weight.dtype in _FLOAT_DTYPES


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


# Names that moved to agml.adapters stay importable from here; resolved lazily because adapters imports this module.
_MOVED_TO_ADAPTERS = frozenset({
    "apply_masked_lora", "apply_lora", "adapter_masks", "trainable_parameter_count", "save_adapter",
    "export_baked", "load_adapter",
})


def __getattr__(name: str):
    if name in _MOVED_TO_ADAPTERS:
        from agml import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module 'agml.layers' has no attribute {name!r}")
