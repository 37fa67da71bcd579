"""Multi-process helpers on Hugging Face accelerate (torch.distributed underneath).

Under `accelerate launch --num_processes N -m agml ...` each process takes a strided shard of the prompts,
per-neuron sums and adapter gradients are summed across processes, and results are gathered back in input
order; only the main process writes files. In a single process every helper is the identity.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


@functools.lru_cache(maxsize=1)
def state():
    """accelerate's process state (initialises torch.distributed when launched by accelerate)."""
    from accelerate import PartialState

    # Without CUDA, processes started by `accelerate launch --multi_gpu` or torchrun talk over gloo.
    return PartialState(cpu=not torch.cuda.is_available())


def world_size() -> int:
    return state().num_processes


def rank() -> int:
    return state().process_index


def is_main() -> bool:
    return state().is_main_process


def device() -> torch.device:
    """This process's device: its own GPU (cuda:LOCAL_RANK) under a multi-GPU launch, else CUDA or CPU."""
    return state().device


def barrier() -> None:
    if world_size() > 1:
        state().wait_for_everyone()


def shard(items: Sequence[T]) -> list[T]:
    """This process's share: every world_size-th item starting at rank (balanced, order-preserving)."""
    return list(items[rank()::world_size()])


def padded_shard(items: Sequence[T]) -> tuple[list[T], int]:
    """(`shard(items)` padded to the same length on every process, how many of them are real).

    FSDP makes every forward a collective, so processes must run equally many batches; the padding repeats this
    process's first item (or the first item overall) and its results are dropped by the caller.
    """
    local = shard(items)
    missing = -(-len(items) // world_size()) - len(local)
    if missing == 0:
        return local, len(local)
    return local + [local[0] if local else items[0]] * missing, len(local)


def sum_across(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (a new tensor; the input is left alone)."""
    out = tensor.detach().clone()
    if world_size() > 1:
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def average_gradients(parameters) -> None:
    """Data parallelism for the tiny adapter: mean of each trainable gradient over processes."""
    if world_size() == 1:
        return
    for param in parameters:
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM)
            param.grad /= world_size()


def gather_sharded(local: list[T], total: int) -> list[T]:
    """Undo `shard`: every process gets the full list in the original order."""
    if world_size() == 1:
        return list(local)
    from accelerate.utils import gather_object

    pieces = gather_object([(rank(), local)])
    ordered: list = [None] * total
    for source, values in pieces:
        ordered[source::world_size()] = values
    return ordered


def broadcast(value: T) -> T:
    """The main process's value, on every process."""
    if world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
