"""Neuron-masked LoRA as a PEFT drop-in: the adapter is a normal `PeftModel` adapter.

`MaskedLoraLinear` is PEFT's LoRA `Linear` with compact factors: on `gate_proj`/`up_proj`
`lora_B` holds one row per selected MLP neuron, on `down_proj` `lora_A` one column per
selected neuron. It is registered through `LoraConfig._register_custom_module`, so PEFT's
adapter bookkeeping (several adapters, `set_adapter`, `disable_adapter()`, merge/unmerge,
`merge_and_unload`, `save_pretrained`) keeps working. Its forward calls
`agml_kernels.masked_lora_linear`.

The selected neuron ids live in persistent buffers named `lora_out_index` / `lora_in_index`
(one entry per adapter), so they travel inside `adapter_model.safetensors`: a folder written
by `save_adapter` or by PEFT's own `save_pretrained` is enough for `load_adapter`. Attaching,
saving, loading and baking live in `agml.adapters`; their names stay importable from here.

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
from collections.abc import Iterator, Mapping, Sequence

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from agml.errors import AgmlError
from agml_kernels import masked_lora_linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
AGML_CONFIG = "agml_config.json"
PEFT_PREFIX = "base_model.model."
OUT_INDEX = "lora_out_index"
IN_INDEX = "lora_in_index"
# Attribute on a base nn.Linear holding {adapter name: (out_index, in_index)} while PEFT builds the adapter.
_PENDING_INDEX = "_agml_pending_neuron_index"

IndexPair = tuple[torch.Tensor | None, torch.Tensor | None]


class MaskedLoraLinear(LoraLinear):
    """PEFT LoRA `Linear` whose LoRA writes only `out_index` rows and reads only `in_index` columns.

    An adapter without indices (e.g. a plain LoRA adapter added to an already masked layer) is a
    full LoRA. Masked adapters support vanilla LoRA only (no DoRA or other variants, no lora_bias).
    """

    def update_layer(self, adapter_name: str, r: int, *args, **kwargs) -> None:
        out_index, in_index = _take_pending_index(self.get_base_layer(), adapter_name)
        # PEFT sizes lora_A/lora_B from in_features/out_features; shrinking them for the call makes
        # PEFT create, initialise, place and freeze the compact factors exactly like its own.
        with self._compact_features(out_index, in_index):
            super().update_layer(adapter_name, r, *args, **kwargs)
        if adapter_name in self.lora_variant or self.lora_bias.get(adapter_name, False):
            raise AgmlError("masked LoRA supports plain LoRA only: no DoRA or other LoRA variants, no lora_bias")
        device = self.get_base_layer().weight.device
        for store_name, index in ((OUT_INDEX, out_index), (IN_INDEX, in_index)):
            if index is not None:
                # Each layer keeps its own copy: safetensors refuses tensors that share storage.
                self._index_store(store_name)[adapter_name] = index.to(device, copy=True)

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

    def dense_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """lora_A (r, in_features) and lora_B (out_features, r) with zeros outside the mask."""
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

    def _add_lora(self, result: torch.Tensor, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """`result` plus the adapter's term on input `x`, with dropout: the path besides the fused op."""
        out_index, in_index = self.neuron_index(adapter_name)
        lora_a = self.lora_A[adapter_name].weight.to(x.dtype)
        lora_b = self.lora_B[adapter_name].weight.to(x.dtype)
        selected = x if in_index is None else x.index_select(-1, in_index)
        low = nn.functional.linear(nn.functional.linear(self.lora_dropout[adapter_name](selected), lora_a), lora_b)
        low = (low * self.scaling[adapter_name]).to(result.dtype)
        return result + low if out_index is None else result.index_add(-1, out_index, low)

    def _fused_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        out_index, in_index = self.neuron_index(adapter_name)
        return masked_lora_linear(
            x,
            base.weight,
            base.bias,
            self.lora_A[adapter_name].weight.to(x.dtype),
            self.lora_B[adapter_name].weight.to(x.dtype),
            self.scaling[adapter_name],
            out_index=out_index,
            in_index=in_index,
        )

    def _dropout_active(self, adapter_name: str) -> bool:
        dropout = self.lora_dropout[adapter_name]
        return isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0

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
        x = x.to(self.get_base_layer().weight.dtype)
        first, *others = active
        if self._dropout_active(first):
            # The fused op feeds one input to the base and the LoRA path; dropout must reach the LoRA path only.
            result = self._add_lora(self.base_layer(x, *args, **kwargs), first, x)
        else:
            result = self._fused_forward(first, x)
        for name in others:
            result = self._add_lora(result, name, x)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: Sequence[str], **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in set(adapter_names):
            if name not in self.lora_A:  # includes "__base__", PEFT's name for "no adapter"
                continue
            rows = [i for i, row_adapter in enumerate(adapter_names) if row_adapter == name]
            sub_batch = x[rows].to(self.get_base_layer().weight.dtype)
            result[rows] = self._add_lora(result[rows], name, sub_batch)
        return result

    def __repr__(self) -> str:
        return "agml." + super().__repr__().removeprefix("lora.")


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
