"""`agml unlearn --resume RUN`: continue an unfinished run with its saved options, and nothing else.

Options given with --resume must agree with the saved ones (a different value is refused, naming it); a
finished run is never touched; a saved config that is not what agml wrote is refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from agml.errors import InputError

CONFIG_FILE = "config.json"
# Flags that only steer this invocation; they may differ from the saved run.
_INVOCATION_ONLY = {"out", "extra"}


def read_config_file(path: Path) -> dict:
    """A run's config.json as agml wrote it: an object whose "options" is an object naming the model."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise InputError(f"{path} is not a readable agml config ({type(err).__name__}: {err})") from err
    check_config(config, path)
    return config


def check_config(config, where) -> None:
    if not isinstance(config, dict) or not isinstance(config.get("options"), dict):
        raise InputError(f"{where} is not an agml run config (no \"options\" object inside)")
    model = config["options"].get("model")
    if not isinstance(model, str) or not model:
        raise InputError(f"{where} is not an agml run config (\"options\" names no model)")


def _saved_options(saved: dict, where: Path, option_type) -> dict:
    """Saved values of the known fields, each of the type the option has (a corrupt file is refused)."""
    defaults = option_type(out="")
    values = {}
    for spec in dataclasses.fields(option_type):
        if spec.name not in saved:
            continue
        value, default = saved[spec.name], getattr(defaults, spec.name)
        if spec.name == "aliases" and isinstance(value, list):
            value = tuple(value)
        if default is not None and value is not None and not _same_kind(value, default):
            raise InputError(f"{where}: saved option {spec.name!r} is {value!r}, not a {type(default).__name__}")
        values[spec.name] = value
    return values


def _same_kind(value, default) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _contradictions(args, saved: dict, defaults) -> list[str]:
    """Options typed on this command line whose value differs from the saved run's."""
    problems = []
    for name, saved_value in saved.items():
        if name in _INVOCATION_ONLY or not hasattr(args, name):
            continue
        given, default = getattr(args, name), getattr(defaults, name)
        if name == "aliases":
            given = tuple(a for a in (given or "").split(",") if a.strip())
        if given is None or given == default or given == saved_value:
            continue
        problems.append(f"--{name.replace('_', '-')} {given!r} (the run has {saved_value!r})")
    return problems


def resumed_options(args, option_type):
    """The saved options of the unfinished run `args.resume`; refuses what resume cannot honour."""
    from agml.ownership import is_ours

    run = Path(args.resume)
    partial = run.with_name(run.name + ".partial")
    if not partial.is_dir():
        if run.is_dir():
            raise InputError(f"{run} is a finished run; --resume continues only an unfinished one ({partial})")
        raise InputError(f"nothing to resume at {run}: {partial / CONFIG_FILE} not found")
    if not is_ours(partial) and not (partial / CONFIG_FILE).is_file():
        raise InputError(f"nothing to resume at {run}: {partial / CONFIG_FILE} not found")
    if run.exists() and not getattr(args, "force", False):
        raise InputError(f"{run} already holds a finished run; --resume {run} would replace it: pass --force to "
                         "allow that")
    if args.out is not None and os.path.abspath(args.out) != os.path.abspath(run):
        raise InputError(f"--out {args.out} contradicts --resume {run}: a resumed run finishes where it started")
    config_path = partial / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"nothing to resume at {run}: {config_path} not found")
    config = read_config_file(config_path)
    saved = _saved_options(config["options"], config_path, option_type)
    problems = _contradictions(args, saved, option_type(out=""))
    if problems:
        raise InputError("--resume continues the run with its saved options; these differ: " + "; ".join(problems)
                         + ". Start a new run (another --out) to change them")
    saved["out"] = str(run)
    record = config.get("model")
    if isinstance(record, dict) and isinstance(record.get("id"), str):
        saved["model"] = record["id"]  # the resolved model, whatever folder this command runs in
    return option_type(**saved)


def check_same_base_model(out, model, allow: bool, log) -> None:
    """A resumed run continues on the model it started with (checked before its config is rewritten)."""
    from agml.fingerprint import RECORD_KEY, check_same_model

    run = Path(out)
    config = read_config_file(run.with_name(run.name + ".partial") / CONFIG_FILE)
    warning = check_same_model(config.get(RECORD_KEY), model, f"the interrupted run {run}", allow)
    if warning and log is not None:
        log(warning)
