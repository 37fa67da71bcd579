"""A run bound to its base model: the resolved model reference and a cheap fingerprint of its weights.

The fingerprint hashes the model's config (architecture, sizes) and a strided sample of every weight tensor
(at most `SAMPLE` values each, rounded to bfloat16 so a float32 and a bfloat16 load of one checkpoint agree).
Two models of the same shape but another architecture (Llama vs Qwen2) or other weights get other fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from agml.errors import InputError
from agml.io import atomic_write_json

SAMPLE = 256
RECORD_KEY = "model"
MASKS_KEY = "base_model"  # masks' meta already has "model" (the id as a string)
OVERRIDE_FLAG = "--allow-model-mismatch"
# Config fields that name where the model was loaded from, not what it is.
_UNSTABLE_CONFIG_KEYS = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "torch_dtype",
                         "dtype", "_attn_implementation_autoset", "use_cache")


def _config_digest(model) -> str:
    config = model.config.to_dict()
    stable = {k: v for k, v in config.items() if k not in _UNSTABLE_CONFIG_KEYS}
    return json.dumps(stable, sort_keys=True, default=str)


def _tensor_sample(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE)
    sample = flat[::step][:SAMPLE].to("cpu", torch.bfloat16).view(torch.int16)
    return sample.numpy().tobytes()


def weights_fingerprint(model) -> str | None:
    """sha256 (hex, 16 chars) of config + sampled weights; None for weights not held here (meta/sharded)."""
    digest = hashlib.sha256(_config_digest(model).encode())
    for name, tensor in sorted(_base(model).state_dict().items()):
        if tensor.device.type == "meta" or hasattr(tensor, "to_local"):  # FSDP shards: not the whole weight here
            return None
        if not tensor.is_floating_point():
            continue
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(_tensor_sample(tensor))
    return digest.hexdigest()[:16]


def _base(model):
    """The transformers model under a PeftModel (its state dict names do not depend on adapters)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_record(model) -> dict:
    """What a run records about its base model: resolved id (alias, absolute path or hub id), revision, fingerprint."""
    from agml.models import model_id

    base = _base(model)
    return {"id": model_id(base), "revision": getattr(base.config, "_commit_hash", None),
            "architecture": type(base).__name__, "fingerprint": weights_fingerprint(base)}


def add_to_json_file(path: str | os.PathLike, record: dict) -> None:
    """Add `record` under RECORD_KEY to a JSON object file (atomically: temporary file, then rename)."""
    path = Path(path)
    payload = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    payload[RECORD_KEY] = record
    atomic_write_json(path, payload)


def recorded_model_id(config: dict) -> str:
    """The model a run must be evaluated with: its resolved id when recorded, else the option as typed."""
    record = config.get(RECORD_KEY) or {}
    return record.get("id") or config["options"]["model"]


def check_same_model(recorded: dict | None, model, what: str, allow: bool = False) -> str | None:
    """Raise InputError when `model` is not the model `recorded` was made with; returns a warning when allowed.

    Nothing is checked when `recorded` holds no fingerprint (files made before fingerprints were recorded)."""
    if not recorded or not recorded.get("fingerprint"):
        return None
    current = weights_fingerprint(model)
    if current is None or current == recorded["fingerprint"]:
        return None
    message = (f"{what} was made with model {recorded.get('id')} ({recorded.get('architecture', '?')}, fingerprint "
               f"{recorded['fingerprint']}), but the model loaded now ({model_record(model)['id']}, "
               f"{type(_base(model)).__name__}) has fingerprint {current}")
    if allow:
        return f"warning: {message}; continuing because of {OVERRIDE_FLAG}"
    raise InputError(f"{message}; pass {OVERRIDE_FLAG} to use it anyway")


def masks_record(masks) -> dict | None:
    """The model record a mask file carries in its meta (written by `agml score`), if any."""
    record = masks.meta.get(MASKS_KEY)
    return record if isinstance(record, dict) else None


def warn_or_refuse_masks(masks_path: str, model, allow: bool, log) -> None:
    """`--masks`: refuse masks scored on another model (same shape or not) unless allowed."""
    from agml.masks import NeuronMasks

    warning = check_same_model(masks_record(NeuronMasks.load(masks_path)), model, f"--masks {masks_path}", allow)
    if warning and log is not None:
        log(warning)
