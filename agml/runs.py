"""Run directories: paths, config, and loading a finished run (creating and replacing them: agml.ownership)."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from agml.data import PromptRecord, load_prompts, save_prompts
from agml.errors import InputError
from agml.io import atomic_write_json

CONFIG_FILE = "config.json"
ADAPTER_DIR = "adapter"
BAKED_DIR = "adapter-baked"
DATA_DIR = "data"
FACTS_FILE = "facts.json"  # the concept facts the judges used (data/facts.json)
PARTIAL_SUFFIX = ".partial"
_VERSIONED = ("agml", "torch", "triton", "transformers", "peft", "accelerate", "safetensors")


def partial_dir(out: str | os.PathLike) -> Path:
    """Where an unfinished run lives; it is renamed to `out` only when complete."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    atomic_write_json(path, payload)


def write_config(run: Path, options: dict, concept: dict | None = None) -> dict:
    """config.json: every option, the resolved concept (name and terms), package versions, the command line."""
    config = {"options": options, "concept": concept or {}, "versions": package_versions(), "argv": sys.argv}
    write_json(run / CONFIG_FILE, config)
    return config


def save_records(run: Path, name: str, records: list[PromptRecord]) -> None:
    (run / DATA_DIR).mkdir(exist_ok=True)
    save_prompts(records, run / DATA_DIR / f"{name}.jsonl")


def load_records(run: Path, name: str) -> list[PromptRecord] | None:
    path = Path(run) / DATA_DIR / f"{name}.jsonl"
    return load_prompts(path) if path.is_file() else None


def read_config(run: str | os.PathLike) -> dict:
    run = Path(run)
    if not run.is_dir():
        raise InputError(f"run folder not found: {run}")
    path = run / CONFIG_FILE
    if not path.is_file() or not (run / ADAPTER_DIR).is_dir():
        raise InputError(f"{run} is not an agml run (expected {CONFIG_FILE} and {ADAPTER_DIR}/ inside)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON ({err.msg})") from err


def shipped_slug(config: dict) -> str | None:
    """The run's concept as a shipped concept's slug (agml/datasets/<slug>_facts.json), else None."""
    from agml import concepts

    name = config.get("concept", {}).get("name") or config.get("options", {}).get("concept")
    slug = concepts.concept_slug(name) if name else None
    return slug if slug in concepts.shipped_concepts() else None


def run_facts(run: str | os.PathLike, config: dict) -> dict | None:
    """The judges' facts of a run: its data/facts.json, else the shipped concept's, else None (forbidden terms only)."""
    from agml import concepts
    from agml.judges import check_facts, load_facts

    path = Path(run) / DATA_DIR / FACTS_FILE
    if path.is_file():
        return load_facts(path)
    slug = shipped_slug(config)
    return check_facts(concepts.load_facts(slug)) if slug else None


@dataclass
class LoadedRun:
    model: object  # peft.PeftModel with the run's adapter
    tokenizer: object
    config: dict
    probes: list[PromptRecord]
    forget: list[PromptRecord]
    retain: list[PromptRecord]


def load_run(run: str | os.PathLike, device: str | None = None, trust_remote_code: bool = False,
             allow_model_mismatch: bool = False) -> LoadedRun:
    """Load the base model (the one the run recorded; another is refused unless allowed), attach the run's
    adapter (checked before any model is loaded) and read the run's data."""
    from agml import adapter_check, fingerprint
    from agml.adapters import load_adapter
    from agml.models import load_model

    run = Path(run)
    config = read_config(run)
    options = config["options"]
    adapter_check.check_adapter_folder(run / ADAPTER_DIR)
    model, tokenizer = load_model(fingerprint.recorded_model_id(config), dtype=options.get("dtype"), device=device,
                                  trust_remote_code=trust_remote_code or bool(options.get("trust_remote_code")))
    warning = fingerprint.check_same_model(config.get(fingerprint.RECORD_KEY), model, f"run {run}",
                                           allow_model_mismatch)
    if warning:
        print(warning, file=sys.stderr)
    if options.get("method") == "lora":
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, str(run / ADAPTER_DIR))
    else:
        peft_model = load_adapter(model, run / ADAPTER_DIR)
    peft_model.eval()
    return LoadedRun(
        peft_model,
        tokenizer,
        config,
        load_records(run, "probes") or [],
        load_records(run, "forget") or [],
        load_records(run, "retain") or [],
    )
