"""FSDP for models that do not fit one device: the frozen base is sharded, the adapter stays replicated.

`accelerate launch --use_fsdp ...` (or an accelerate config with `distributed_type: FSDP`, see
`examples/accelerate/fsdp.yaml`) starts the processes and says, through its environment, that the model is to be
sharded. agml then applies FSDP2 (`torch.distributed.fsdp.fully_shard`) itself, right after loading: one FSDP unit
per decoder layer, one each for untied embeddings and LM head, and the root (final norm; tied embeddings). It
does not call accelerate's `prepare`, which wants the optimizer and data loaders of a training loop and refuses
FSDP on CPU processes (which CI needs). Only `fsdp_reshard_after_forward` and `fsdp_cpu_ram_efficient_loading`
of the accelerate config are read; FSDP2 is used whatever `fsdp_version` says; `fsdp_offload_params` is refused.

What is sharded: every frozen base weight (each process keeps 1/N of it; a layer's full weights exist only while
that layer runs). What stays replicated on every process: the masked LoRA factors and neuron indices (they are
added by PEFT after sharding, are tiny, and their gradients are averaged by `agml.distributed`), the optimizer
state, the masks and scores. With accelerate's `cpu_ram_efficient_loading` (on unless turned off), only rank 0
reads the checkpoint into host memory; the other processes build the model on the meta device and get their shards
broadcast from rank 0.

Every forward is a collective under FSDP, so every process must run the same number of forwards and backwards:
`agml.distributed.padded_shard` gives each process equally many prompts, and generation runs with `synced_gpus`.
"""

from __future__ import annotations

import torch
from accelerate.utils import parse_flag_from_env

from agml import distributed
from agml.architecture import decoder_layers
from agml.errors import AgmlError


def fsdp_requested() -> bool:
    """True when accelerate launched several processes with FSDP (`--use_fsdp` or `distributed_type: FSDP`)."""
    return parse_flag_from_env("ACCELERATE_USE_FSDP", False) and distributed.world_size() > 1


def main_process_reads_weights() -> bool:
    """accelerate's `fsdp_cpu_ram_efficient_loading` (on unless turned off): only rank 0 reads the checkpoint."""
    return parse_flag_from_env("FSDP_CPU_RAM_EFFICIENT_LOADING", True)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def check_settings() -> None:
    """Refuse the accelerate FSDP settings agml cannot honour, before anything is loaded."""
    if parse_flag_from_env("FSDP_OFFLOAD_PARAMS", False):
        # Offloaded shards live on the CPU while the compute runs on the GPU: every place that reads a device from
        # the parameters (inputs, adapter placement) would have to learn that first.
        raise AgmlError("agml does not support FSDP parameter offload (fsdp_offload_params: true); set it to false "
                        "and shard over more GPUs instead (README: weight memory per GPU)")


def _fsdp_options(device: torch.device) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    check_settings()
    return {
        "mesh": init_device_mesh(device.type, (distributed.world_size(),)),
        "reshard_after_forward": parse_flag_from_env("FSDP_RESHARD_AFTER_FORWARD", True),
    }


def _non_persistent_buffers(model: torch.nn.Module) -> list[str]:
    """Names of buffers outside the state dict (rotary frequencies), which the state-dict broadcast skips."""
    persistent = set(model.state_dict())
    return [name for name, _ in model.named_buffers() if name not in persistent]


def _broadcast_buffers(model: torch.nn.Module, names: list[str], device: torch.device) -> None:
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        value = owner._buffers[leaf].to(device)
        torch.distributed.broadcast(value, src=0)
        owner._buffers[leaf] = value


def _fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules whose weights are gathered only while they run: each decoder layer, and untied embeddings and LM
    head (a large vocabulary's are bigger than a layer). Tied ones share one weight, so they stay in the root."""
    units = list(decoder_layers(model))
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is not embeddings.weight:
        units += [embeddings, head]
    return units


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Shard a loaded (not yet adapted) model across the processes, in place; the weights come from rank 0.

    Non-main processes may hold the model on the meta device (see `main_process_reads_weights`); they are
    materialised empty and filled by a broadcast, so every process agrees on the weights whatever it loaded.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model
    device = distributed.device()
    options = _fsdp_options(device)
    on_meta = any(p.is_meta for p in model.parameters())
    if distributed.is_main() and on_meta:
        raise AgmlError("the main process holds no weights (meta device); it must load the checkpoint")
    full_state = model.state_dict() if distributed.is_main() else {}
    buffers = _non_persistent_buffers(model)
    for unit in _fsdp_units(model):
        fully_shard(unit, **options)
    fully_shard(model, **options)
    if on_meta:
        model.to_empty(device=device)
    _broadcast_buffers(model, buffers, device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model
