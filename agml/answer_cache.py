"""On-disk cache of what the BASE model produces: greedy answers, sampled answers, multiple-choice scores and
neutral-text perplexity ("before" of an evaluation), the neuron scores of a training set, and the base model's
answer states (its answer logits in compact form, `agml.logprobs.base_answer_states`) on fixed answer sets, under
`$AGML_CACHE/answers/<fingerprint>/` (or `$AGML_ANSWER_CACHE/<fingerprint>/`).

The base model is the same for every run of a model, so `agml eval` and `agml unlearn` recompute only the "after"
side. The fingerprint hashes the model id, its config, the tokenizer (name and chat template) and a strided sample of
the base weights (adapter weights excluded), so a different checkpoint under the same name misses. Greedy answers are
cached per conversation (keyed by the conversation and max_new_tokens) so overlapping probe sets share entries; other
values are cached whole, keyed by everything that determines them. Files are written atomically (agml.io); only the
main process writes, and under several processes the cache is off (every process must run the same batches).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agml import distributed
from agml.errors import InputError
from agml.io import atomic_write_json
from agml.models import cache_dir, model_id

SAMPLED_VALUES = 4096  # weights hashed per sampled tensor
SAMPLED_TENSORS = 2    # tensors hashed from each end of the parameter list
# Config fields that training or loading may change without changing what the model computes.
VOLATILE_CONFIG_KEYS = ("use_cache", "transformers_version", "_name_or_path", "torch_dtype", "dtype")


def answer_cache_dir() -> Path:
    """`$AGML_ANSWER_CACHE` when set (the test suite points it at a temporary folder), else `$AGML_CACHE/answers`."""
    override = os.environ.get("AGML_ANSWER_CACHE")
    return Path(override).expanduser() if override else cache_dir() / "answers"


def enabled() -> bool:
    return distributed.world_size() == 1


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def _base_name(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def model_fingerprint(model, tokenizer) -> str:
    """Hash of what decides the base model's outputs (see the module docstring)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update(model_id(model).encode())
    settings = config.to_dict() if hasattr(config, "to_dict") else {}
    h.update(digest({k: v for k, v in settings.items() if k not in VOLATILE_CONFIG_KEYS}).encode())
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(str(len(tokenizer)).encode())
    params = [(n, p) for n, p in model.named_parameters() if "lora_" not in n and p.device.type != "meta"]
    for name, param in params[:SAMPLED_TENSORS] + params[-SAMPLED_TENSORS:]:
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLED_VALUES)
        h.update(f"{_base_name(name)} {tuple(param.shape)} {param.dtype}".encode())
        h.update(flat[::step][:SAMPLED_VALUES].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def base_fingerprint(model, tokenizer) -> str | None:
    """`model_fingerprint` of the base model (a PEFT model's adapter disabled); None when the cache is off."""
    from agml.logprobs import base_model_only

    if not enabled():
        return None
    with base_model_only(model):
        return model_fingerprint(model, tokenizer)


def _read(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # a missing or unreadable cache file is a miss, never an error
    return value if isinstance(value, dict) else {}


def cached_greedy(
    fingerprint: str | None,
    conversations: Sequence[Sequence[dict[str, str]]],
    max_new_tokens: int,
    generate: Callable[[list], list[str]],
) -> list[str]:
    """Greedy base answers: cached ones read, the others generated (one call, in input order) and stored."""
    if fingerprint is None or not enabled():
        return list(generate(list(conversations)))
    path = answer_cache_dir() / fingerprint / f"greedy-{max_new_tokens}.json"
    stored = _read(path)
    keys = [digest(list(c)) for c in conversations]
    missing = [i for i, key in enumerate(keys) if not isinstance(stored.get(key), str)]
    if missing:
        fresh = generate([conversations[i] for i in missing])
        stored = {**_read(path), **{keys[i]: answer for i, answer in zip(missing, fresh, strict=True)}}
        if distributed.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, stored, indent=0)
    return [stored[key] for key in keys]


def _entry_path(fingerprint: str, kind: str, key: Any, suffix: str) -> Path:
    """Where a whole value of `kind` keyed by `key` lives (`cached_value`, `cached_file`)."""
    return answer_cache_dir() / fingerprint / f"{kind}-{digest(key)[:24]}{suffix}"


def cached_value(fingerprint: str | None, kind: str, key: Any, compute: Callable[[], Any]) -> Any:
    """A whole JSON value (MC scores, perplexity, samples), keyed by `kind` and `key`."""
    if fingerprint is None or not enabled():
        return compute()
    path = _entry_path(fingerprint, kind, key, ".json")
    stored = _read(path)
    if "value" in stored:
        return stored["value"]
    value = compute()
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"value": value}, indent=0)
    return value


def cached_file(
    fingerprint: str | None, kind: str, key: Any, compute: Callable[[], Any],
    save: Callable[[Any, Path], None], load: Callable[[Path], Any], suffix: str = ".safetensors",
) -> Any:
    """A value kept in its own file format (`save(value, path)` must write atomically), keyed by `kind` and `key`;
    a file that `load` rejects is a miss."""
    if fingerprint is None or not enabled():
        return compute()
    path = _entry_path(fingerprint, kind, key, suffix)
    if path.is_file():
        try:
            return load(path)
        except (InputError, OSError):
            pass
    value = compute()
    if value is not None and distributed.is_main():  # None: nothing worth keeping (computed again next time)
        path.parent.mkdir(parents=True, exist_ok=True)
        save(value, path)
    return value


_STATES_FORMAT = "agml-answer-states"


def _save_states(states: list, path: Path) -> None:
    from agml.tensor_files import write_tensor_file

    write_tensor_file(path, {f"batch.{i}": s.contiguous() for i, s in enumerate(states)}, _STATES_FORMAT,
                      {"batches": str(len(states))})


def _load_states(path: Path) -> list:
    from agml.tensor_files import read_tensor_file

    tensors, metadata = read_tensor_file(path, _STATES_FORMAT, "answer states")
    try:
        return [tensors[f"batch.{i}"] for i in range(int(metadata.get("batches", "")))]
    except (KeyError, ValueError) as err:
        raise InputError(f"{path} is incomplete") from err


def cached_base_answer_states(fingerprint: str | None, kind: str, model, batches: Sequence[dict],
                              desc: str | None = None) -> list | None:
    """The base model's answer states of collated `batches` (`agml.logprobs.base_answer_states`: its answer logits
    in compact form), keyed by `kind` and the batches' tokens. None when the cache is off (the caller then runs the
    base model as it goes: within one run the states would not be reused) or when the model's logits are not its
    head's output (never stored)."""
    from agml.logprobs import answer_positions, base_answer_states

    if fingerprint is None or not enabled():
        return None
    key = [[b[name].tolist() for name in ("input_ids", "attention_mask", "labels")] for b in batches]
    answer_tokens = [int(answer_positions(b["labels"]).sum()) for b in batches]

    def load(path: Path) -> list:
        states = _load_states(path)
        if [s.shape[0] for s in states] != answer_tokens:
            raise InputError(f"{path} does not match its batches")  # a miss: computed again
        return states

    return cached_file(fingerprint, kind, key, lambda: base_answer_states(model, batches, desc),
                       save=_save_states, load=load)
