"""`agml unlearn --resume RUN`: continue an unfinished run with its saved options, and nothing else.

Options given with --resume must agree with the saved ones (a different value is refused, naming it); a
finished run is never touched; a saved config that is not what agml wrote is refused with a clear error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from agml.errors import InputError

CONFIG_FILE = "config.json"
PARTIAL_SUFFIX = ".partial"
# Settings that only steer this invocation; they may differ from the saved run's.
_INVOCATION_ONLY = {"out", "allow_model_mismatch"}


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


def _saved_settings(config: dict, where: Path) -> dict:
    """The run's saved settings, flat, each checked by the options themselves (a corrupt value is refused)."""
    from agml.options import UnlearnOptions

    try:
        return UnlearnOptions.from_dict(config["options"], where=str(where)).to_dict()
    except (TypeError, AttributeError, ValueError) as err:  # e.g. a number where a name belongs
        raise InputError(f"{where}: a saved option has a value of the wrong kind ({err})") from err


def _contradictions(given: dict, saved: dict) -> list[str]:
    """Settings given with --resume whose value differs from the saved run's."""
    return [f"--{name.replace('_', '-')} {value!r} (the run has {saved[name]!r})" for name, value in given.items()
            if name not in _INVOCATION_ONLY and name in saved and value != saved[name]]


def resumable_options(run: str | os.PathLike, given: dict | None = None, force: bool = False):
    """The options the unfinished run RUN was started with (RUN.partial/config.json), for `--resume RUN`.

    `given` holds the settings of this command line: each must agree with the saved one (`out` must name RUN;
    `allow_model_mismatch` is taken from here). A finished run, a foreign or corrupt config are refused.
    """
    from agml.options import build_options
    from agml.ownership import is_ours

    given = dict(given or {})
    run = Path(run)
    partial = run.with_name(run.name + PARTIAL_SUFFIX)
    config_path = partial / CONFIG_FILE
    if not partial.is_dir():
        if run.is_dir():
            raise InputError(f"{run} is a finished run; --resume continues only an unfinished one ({partial})")
        raise InputError(f"nothing to resume at {run}: {config_path} not found")
    if not is_ours(partial) and not config_path.is_file():
        raise InputError(f"nothing to resume at {run}: {config_path} not found")
    if run.exists() and not force:
        raise InputError(f"{run} already holds a finished run; --resume {run} would replace it: pass --force to "
                         "allow that")
    out = given.get("out")
    if out is not None and os.path.abspath(out) != os.path.abspath(run):
        raise InputError(f"--out {out} contradicts --resume {run}: a resumed run finishes where it started")
    if not config_path.is_file():
        raise InputError(f"nothing to resume at {run}: {config_path} not found")
    config = read_config_file(config_path)
    saved = _saved_settings(config, config_path)
    problems = _contradictions(given, saved)
    if problems:
        raise InputError("--resume continues the run with its saved options; these differ: " + "; ".join(problems)
                         + ". Start a new run (another --out) to change them")
    saved["out"] = str(run)
    saved["allow_model_mismatch"] = bool(given.get("allow_model_mismatch", False))
    record = config.get("model")
    if isinstance(record, dict) and isinstance(record.get("id"), str):
        saved["model"] = record["id"]  # the resolved model, whatever folder this command runs in
    return build_options(saved)


def check_same_base_model(out, model, allow: bool, log) -> None:
    """A resumed run continues on the model it started with (checked before its config is rewritten)."""
    from agml.fingerprint import RECORD_KEY, check_same_model

    run = Path(out)
    config = read_config_file(run.with_name(run.name + ".partial") / CONFIG_FILE)
    warning = check_same_model(config.get(RECORD_KEY), model, f"the interrupted run {run}", allow)
    if warning and log is not None:
        log(warning)
