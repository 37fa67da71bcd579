"""Hostile inputs against the `agml` CLI on a tiny random Llama: prints a table (case, expected, got, pass/fail).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/adversarial.py [--keep DIR]

Each case runs `agml.cli.main` in this process in a fresh folder; "refused: TEXT" expects exit code 2 with TEXT in
the one-line error, and nothing left behind where the case says so. Exit code 1 when any case fails. The same cases
are tests in tests/test_reliability.py; this script is the starting point of the next adversarial round.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tiny_models import write_workspace  # noqa: E402

from agml.index_keys import INDEX_BUFFER, OUT_INDEX  # noqa: E402

_GATE_NEURON_IDS = f"gate_proj.{OUT_INDEX}.{INDEX_BUFFER}"


@dataclasses.dataclass
class Case:
    name: str
    expected: str  # "ok" or "refused: <text in the error>"
    argv: Callable[[Path, dict], list[str]]  # (case folder, workspace) -> agml arguments
    untouched: Callable[[Path], bool] = lambda folder: True  # what must still hold afterwards


def unlearn(ws: dict, out, *extra: str, **replace: str) -> list[str]:
    files = {"model": ws["model"], "forget": ws["forget"], "retain": ws["retain"], "probes": ws["probes"], **replace}
    return ["unlearn", "--model", files["model"], "--forget", files["forget"], "--retain", files["retain"],
            "--probes", files["probes"], "--density", "0.1", "--batch-size", "2", "--max-new-tokens", "4",
            "--answer-tokens", "4", "--steps", "1", "--out", str(out), *extra]


def _write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _copy_run(ws: dict, folder: Path, edit: Callable[[Path], None] | None = None) -> Path:
    run = folder / "run"
    shutil.copytree(ws["run"], run)
    if edit is not None:
        edit(run)
    return run


def _edit_adapter(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        path = run / "adapter" / "adapter_model.safetensors"
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path))
    return edit


def _first(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _nan(t):
    key = _first(t, "lora_B.weight")
    t[key] = torch.full_like(t[key], float("nan"))


def _disagree(t):
    key = _first(t, _GATE_NEURON_IDS)
    t[key] = t[key][:-1].clone()


def _float_index(t):
    key = _first(t, _GATE_NEURON_IDS)
    t[key] = t[key].float()


def _config(text: str) -> Callable[[Path], None]:
    return lambda run: (run / "config.json").write_text(text)


def _other_model(ws: dict) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        config = json.loads((run / "config.json").read_text())
        config["model"]["id"] = ws["qwen"]
        (run / "config.json").write_text(json.dumps(config))
    return edit


def _locked(folder: Path, ws: dict) -> list[str]:
    from agml import run_lock

    ws["held_lock"] = (run_lock.acquire(folder / "run"), folder / "run")
    return unlearn(ws, folder / "run")


def _resumable(folder: Path, ws: dict, config: str | None = None) -> Path:
    from agml import ownership
    from agml.options import TrainOptions, UnlearnOptions

    partial = folder / "run.partial"
    (partial / "checkpoint").mkdir(parents=True)
    ownership.mark(partial)
    _write(partial / "checkpoint" / "checkpoint-2.safetensors", b"x")
    options = UnlearnOptions(out=str(folder / "run"), model=ws["model"], train=TrainOptions(steps=12))
    saved = {"options": options.to_dict()}
    _write(partial / "config.json", config if config is not None else json.dumps(saved))
    return folder / "run"


def _foreign_folder(folder: Path) -> Path:
    (folder / "mine").mkdir()
    _write(folder / "mine" / "notes.txt", "keep")
    return folder / "mine"


def _sibling_old(folder: Path, ws: dict) -> list[str]:
    run = _copy_run(ws, folder)
    (folder / "run.old").mkdir()
    _write(folder / "run.old" / "thesis.tex", "mine")
    return unlearn(ws, run, "--force")


def _symlink(folder: Path, ws: dict) -> list[str]:
    (folder / "real").mkdir()
    (folder / "link").symlink_to(folder / "real")
    return unlearn(ws, folder / "link", "--force")


def _qwen_masks(folder: Path, ws: dict) -> list[str]:
    from agml import fingerprint
    from agml.masks import NeuronMasks
    from agml.models import load_model

    qwen, _ = load_model(ws["qwen"], device="cpu")
    meta = {"num_layers": 2, "intermediate_size": 64, fingerprint.MASKS_KEY: fingerprint.model_record(qwen)}
    NeuronMasks({0: [1, 2]}, meta=meta).save(folder / "masks.safetensors")
    return unlearn(ws, folder / "run", "--masks", str(folder / "masks.safetensors"))


def _cut_model(folder: Path, ws: dict) -> list[str]:
    shutil.copytree(ws["model"], folder / "model")
    weights = next((folder / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    return unlearn(ws, folder / "run", model=str(folder / "model"))


def _cut(run: Path) -> None:
    path = run / "adapter" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:200])


def _random(run: Path) -> None:
    path = run / "adapter" / "adapter_model.safetensors"
    path.write_bytes(os.urandom(path.stat().st_size))


def _no_partial(folder: Path) -> bool:
    """Nothing written: no run, no working folder, no lock file."""
    return not any((folder / name).exists() for name in ("run", "run.partial", "run.lock"))


def cases() -> list[Case]:
    jsonl = {
        "nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
        "5,000-digit number": '{"prompt": "hi", "answer": ' + "1" * 5000 + "}",
        "200,000-char prompt": json.dumps({"prompt": "word " * 40_000, "answer": "no"}),
    }
    expected = {"nested 100,000 deep": "RecursionError", "5,000-digit number": "digits",
                "200,000-char prompt": "256 positions"}
    out = [
        Case("second run on a locked --out", "refused: in use by another agml run", _locked, _no_partial),
        Case("--force beside a sibling RUN.old", "ok", _sibling_old,
             lambda f: (f / "run.old" / "thesis.tex").read_text() == "mine"),
        Case("--force on a folder agml did not make", "refused: not made by agml",
             lambda f, ws: unlearn(ws, _foreign_folder(f), "--force"), lambda f: (f / "mine" / "notes.txt").exists()),
        Case("plain run over a resumable RUN.partial", "refused: --resume",
             lambda f, ws: unlearn(ws, _resumable(f, ws)), lambda f: (f / "run.partial" / "checkpoint").is_dir()),
        Case("--resume a finished run", "refused: finished run",
             lambda f, ws: ["unlearn", "--resume", str(_copy_run(ws, f))]),
        Case("--resume --steps 5 --seed 3", "refused: these differ",
             lambda f, ws: ["unlearn", "--resume", str(_resumable(f, ws)), "--steps", "5", "--seed", "3"]),
        Case("--resume --out elsewhere", "refused: contradicts --resume",
             lambda f, ws: ["unlearn", "--resume", str(_resumable(f, ws)), "--out", str(f / "elsewhere")]),
        Case("--resume with corrupt partial config", "refused: not a readable agml config",
             lambda f, ws: ["unlearn", "--resume", str(_resumable(f, ws, "{oops"))]),
        Case("--resume with partial config {}", "refused: not an agml run config",
             lambda f, ws: ["unlearn", "--resume", str(_resumable(f, ws, "{}"))]),
        Case("eval with another base model", "refused: --allow-model-mismatch",
             lambda f, ws: ["eval", str(_copy_run(ws, f, _other_model(ws)))]),
        Case("eval --allow-model-mismatch", "ok",
             lambda f, ws: ["eval", str(_copy_run(ws, f, _other_model(ws))), "--max-new-tokens", "2",
                            "--allow-model-mismatch"]),
        Case("--masks from a same-shape Qwen2", "refused: fingerprint", _qwen_masks, _no_partial),
        Case("eval --json RUN/config.json", "refused: inside the run",
             lambda f, ws: ["eval", str(_copy_run(ws, f)), "--json", str(f / "run" / "config.json")]),
        Case("eval --json existing file", "refused: --force",
             lambda f, ws: ["eval", ws["run"], "--json", _write(f / "old.json", "keep")],
             lambda f: (f / "old.json").read_text() == "keep"),
        Case("eval --json unwritable folder", "refused: cannot write",
             lambda f, ws: ["eval", ws["run"], "--json", "/proc/self/out.json"]),
        Case("eval --trust-remote-code", "ok",
             lambda f, ws: ["eval", ws["run"], "--max-new-tokens", "2", "--trust-remote-code"]),
        Case("--max-new-tokens 100000", "refused: 256 positions",
             lambda f, ws: [*unlearn(ws, f / "run"), "--max-new-tokens", "100000"], _no_partial),
        Case("--out .", "refused: names no new folder", lambda f, ws: unlearn(ws, ".")),
        Case("--out / --force", "refused: names no new folder", lambda f, ws: unlearn(ws, "/", "--force")),
        Case("--out on a read-only place", "refused: cannot write", lambda f, ws: unlearn(ws, "/proc/self/run")),
        Case("--out a mount point", "refused: mount point", lambda f, ws: unlearn(ws, "/proc", "--force")),
        Case("--out a symlink --force", "refused: symbolic link", _symlink, lambda f: (f / "real").is_dir()),
        Case("1,000-char --concept, no --out", "refused: shorter --out",
             lambda f, ws: ["unlearn", "--concept", "x" * 1000, "--steps", "1"]),
        Case("model .safetensors cut short", "refused: cut short or corrupt", _cut_model),
        Case("adapter .safetensors cut short", "refused: cut short or corrupt",
             lambda f, ws: ["eval", str(_copy_run(ws, f, _cut))]),
        Case("adapter .safetensors random bytes", "refused: cut short or corrupt",
             lambda f, ws: ["eval", str(_copy_run(ws, f, _random))]),
        Case("adapter weights NaN", "refused: NaN", lambda f, ws: ["eval", str(_copy_run(ws, f, _edit_adapter(_nan)))]),
        Case("gate/up/down ids disagree", "refused: different neuron ids",
             lambda f, ws: ["eval", str(_copy_run(ws, f, _edit_adapter(_disagree)))]),
        Case("float index tensors", "refused: integer neuron ids",
             lambda f, ws: ["eval", str(_copy_run(ws, f, _edit_adapter(_float_index)))]),
        Case("run config.json of {}", "refused: not an agml run config",
             lambda f, ws: ["eval", str(_copy_run(ws, f, _config("{}")))]),
        Case("JSONL with a UTF-8 BOM", "ok", lambda f, ws: unlearn(
            ws, f / "run", forget=_write(f / "bom.jsonl", b"\xef\xbb\xbf" + Path(ws["forget"]).read_bytes()))),
        Case("every retain answer names the concept", "refused: names the concept", lambda f, ws: [*unlearn(
            ws, f / "run", retain=_write(f / "r.jsonl", json.dumps({"prompt": "Hi?", "answer": "Zorblax!"}))),
            "--concept", "Zorblax"], _no_partial),
    ]
    for name, line in jsonl.items():
        out.append(Case(f"JSONL line: {name}", f"refused: {expected[name]}",
                        lambda f, ws, line=line: unlearn(ws, f / "run", forget=_write(f / "bad.jsonl", line + "\n")),
                        _no_partial))
    for flags in (["--alpha", "0"], ["--alpha", "nan"], ["--lr", "nan"], ["--seed", "-1"],
                  ["--kl-weight", "nan"], ["--kl-weight", "-5"], ["--mask-retain-weight", "nan"],
                  ["--objective", "bogus"]):
        out.append(Case(" ".join(flags), f"refused: {flags[0]}",
                        lambda f, ws, flags=flags: unlearn(ws, f / "run", *flags), _no_partial))
    return out


def run_case(case: Case, folder: Path, ws: dict) -> tuple[str, bool, float]:
    from agml import run_lock
    from agml.cli import main

    folder.mkdir()
    cwd = os.getcwd()
    os.chdir(folder)
    err = io.StringIO()
    started = time.perf_counter()
    try:
        argv = case.argv(folder, ws)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except Exception as exc:  # a traceback is a failed case, never a crash of the table
        code, err = None, io.StringIO(f"{type(exc).__name__}: {exc}")
    finally:
        os.chdir(cwd)
        if "held_lock" in ws:
            run_lock.release(*ws.pop("held_lock"))
    seconds = time.perf_counter() - started
    lines = err.getvalue().strip().splitlines()
    message = lines[-1] if lines else ""
    got = "ok" if code == 0 else f"exit {code}: {message.split(': error: ')[-1]}"
    if case.expected == "ok":
        passed = code == 0
    else:
        passed = code == 2 and case.expected.removeprefix("refused: ") in message
    return got, passed and case.untouched(folder), seconds


def main_table(keep: Path | None) -> int:
    from tiny_models import tiny_model

    from agml.models import load_tokenizer

    root = Path(tempfile.mkdtemp(prefix="agml-adversarial-")) if keep is None else keep
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer()
    ws = write_workspace(root, tokenizer)
    tiny_model("qwen2", vocab_size=len(tokenizer), hidden=32, intermediate=64, layers=2).save_pretrained(root / "qwen")
    tokenizer.save_pretrained(root / "qwen")
    ws["qwen"], ws["run"] = str(root / "qwen"), str(root / "base-run")
    from agml.cli import main

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(unlearn(ws, ws["run"])) == 0, "the base run failed"
    rows, failures = [], 0
    for number, case in enumerate(cases(), start=1):
        got, passed, seconds = run_case(case, root / f"case-{number:02d}", ws)
        failures += not passed
        rows.append((case.name, case.expected, got[:70], "pass" if passed else "FAIL", f"{seconds:.1f}"))
    widths = [max(len(str(r[i])) for r in rows + [("case", "expected", "got", "result", "s")]) for i in range(5)]
    for row in [("case", "expected", "got", "result", "s"), *rows]:
        print(" | ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"{len(rows) - failures} of {len(rows)} cases pass")
    if keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it (default: a temporary folder, removed)")
    raise SystemExit(main_table(parser.parse_args().keep))
