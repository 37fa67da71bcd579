"""Training checkpoints: adapter tensors and optimizer state (safetensors) plus step, history and options (JSON).

Nothing is pickled. Files are replaced atomically and the JSON last, so a kill at any point leaves either the
previous checkpoint or the new one; see docs/architecture.md ("File formats").
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from agml.errors import InputError
from agml.io import atomic_path, atomic_write_json
from agml.options import TrainOptions

CHECKPOINT_JSON = "checkpoint.json"
CHECKPOINT_FORMAT = 1
# Options that may change between an interrupted run and its resumption without changing the trajectory.
RESUMABLE_CHANGES = frozenset({"steps", "checkpoint_every"})


def save_checkpoint(directory: Path, params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
                    step: int, history: list[dict], config: TrainOptions, stopped_early: bool,
                    validation: dict | None) -> None:
    """Write adapter tensors and optimizer state (safetensors), then the JSON that points to them, both atomically.

    The JSON is replaced last and older tensor files are removed after it, so a kill at any point leaves a
    consistent checkpoint: either the previous one or the new one.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, param in params:
        tensors[f"param::{name}"] = param.detach().cpu().contiguous()
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value):
                tensors[f"optim.{key}::{name}"] = value.detach().cpu().contiguous()
    tensor_name = f"checkpoint-{step:06d}.safetensors"
    with atomic_path(directory / tensor_name) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(directory / CHECKPOINT_JSON, {
        "format": CHECKPOINT_FORMAT, "step": step, "tensors": tensor_name, "parameters": [n for n, _ in params],
        "config": dataclasses.asdict(config), "history": history, "stopped_early": stopped_early,
        "validation": validation,
    }, indent=1)
    for old in directory.glob("checkpoint-*.safetensors"):
        if old.name != tensor_name:
            old.unlink()


def _config_differences(saved: dict, config: TrainOptions) -> list[str]:
    current = dataclasses.asdict(config)
    return sorted(k for k in set(saved) | set(current)
                  if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))


def load_checkpoint(directory: Path, params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
                    config: TrainOptions) -> dict | None:
    """Restore adapter tensors and optimizer state in place; returns the checkpoint's JSON, or None if there is none."""
    meta_path = directory / CHECKPOINT_JSON
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tensors = load_file(str(directory / meta["tensors"]))
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot read checkpoint in {directory}: {err}") from err
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"checkpoint in {directory} has format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    differences = _config_differences(meta["config"], config)
    if differences:
        raise InputError(f"cannot resume from {directory}: training options differ from the checkpoint's: "
                         f"{', '.join(differences)}")
    names = [n for n, _ in params]
    if meta["parameters"] != names:
        raise InputError(f"cannot resume from {directory}: its adapter parameters do not match this model's")
    state = {}
    for index, (name, param) in enumerate(params):
        saved = tensors[f"param::{name}"]
        if saved.shape != param.shape:
            raise InputError(f"cannot resume from {directory}: {name} has shape {tuple(saved.shape)}, "
                             f"the model has {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(saved)
        prefix, suffix = "optim.", f"::{name}"
        entries = {k[len(prefix):-len(suffix)]: v for k, v in tensors.items()
                   if k.startswith(prefix) and k.endswith(suffix)}
        if entries:
            # Moment buffers follow the parameter's device/dtype; the step counter stays as saved.
            state[index] = {k: v if v.dim() == 0 else v.to(param.device, param.dtype) for k, v in entries.items()}
    optimizer_state = optimizer.state_dict()
    optimizer_state["state"] = state
    optimizer.load_state_dict(optimizer_state)
    return meta
