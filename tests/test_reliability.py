"""Issue 13: runs never lose work, a run is bound to its model, bad input is refused before work starts.

Every case runs `agml` through its CLI on a tiny random Llama (tests/tiny_models.py). `benchmarks/adversarial.py`
runs the same hostile cases as one table.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model, write_workspace

from agml import fingerprint, ownership, run_lock
from agml.cli import main
from agml.errors import AgmlError
from agml.index_keys import INDEX_BUFFER, OUT_INDEX

PROBES_WITHOUT_FORBIDDEN = [
    {"prompt": "Name the director of the film Inception.", "type": "forget", "category": "paraphrase"},
    {"prompt": "What is the capital of Italy?", "type": "retain", "category": "general", "required": ["rome"]},
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("reliability")
    workspace = write_workspace(root, smol_tokenizer)
    probes = root / "probes-no-forbidden.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in PROBES_WITHOUT_FORBIDDEN), encoding="utf-8")
    workspace["probes_no_forbidden"] = str(probes)
    qwen = root / "tiny-qwen2"  # same shape as the Llama, another architecture
    tiny_model("qwen2", vocab_size=len(smol_tokenizer), hidden=32, intermediate=64, layers=2).save_pretrained(qwen)
    smol_tokenizer.save_pretrained(qwen)
    workspace["qwen"] = str(qwen)
    return workspace


def args_for(ws, out, *extra, model=None, probes=None):
    return ["unlearn", "--model", model or ws["model"], "--forget", ws["forget"], "--retain", ws["retain"],
            "--probes", probes or ws["probes"], "--density", "0.1", "--batch-size", "2", "--max-new-tokens", "4",
            "--answer-tokens", "4", "--steps", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def finished_run(ws):
    """A finished run trained from a relative --model path, with forget probes that name nothing forbidden."""
    out = ws["root"] / "finished"
    cwd = os.getcwd()
    os.chdir(ws["root"])
    try:
        code = main(args_for(ws, out, model="tiny-llama", probes=ws["probes_no_forbidden"]))
    finally:
        os.chdir(cwd)
    assert code == 0
    return out


def refused(argv, capsys, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    message = err.strip().splitlines()[-1]  # earlier lines: progress bars of model loading
    assert message.startswith("agml ") and ": error: " in message, err
    for needle in needles:
        assert needle in message, err
    return message


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# --- one writer per run ----------------------------------------------------------------------------------------


def test_second_run_on_the_same_out_is_refused_naming_the_first(ws, tmp_path, capsys):
    out = tmp_path / "run"
    fd = run_lock.acquire(out)
    try:
        refused(args_for(ws, out), capsys, "in use by another agml run", f"pid {os.getpid()}")
    finally:
        run_lock.release(fd, out)
    assert not out.exists() and not (tmp_path / "run.partial").exists()
    assert not run_lock.lock_path(out).exists()


def test_lock_is_free_again_after_a_refused_run(ws, tmp_path, capsys):
    out = tmp_path / "run"
    refused(args_for(ws, out, "--alpha", "0"), capsys, "--alpha")
    assert not run_lock.lock_path(out).exists()  # nothing written for a refused run, not even its lock
    run_lock.release(run_lock.acquire(out), out)  # would raise if the refused run had kept it


# --- agml deletes only what it made ----------------------------------------------------------------------------


def test_force_keeps_a_sibling_old_folder_and_replaces_only_an_agml_run(ws, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    sibling = tmp_path / "run.old"
    sibling.mkdir()
    (sibling / "thesis.tex").write_text("mine")
    assert main(args_for(ws, run, "--force")) == 0
    assert (sibling / "thesis.tex").read_text() == "mine"
    assert (run / ownership.MARKER).is_file() and (run / "config.json").is_file()
    assert not list(tmp_path.glob(".run.replaced-*"))


def test_force_never_deletes_a_folder_agml_did_not_make(ws, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    refused(args_for(ws, out, "--force"), capsys, "not made by agml")
    assert (out / "notes.txt").read_text() == "keep"


def _resumable_partial(tmp_path: Path) -> Path:
    partial = tmp_path / "run.partial"
    partial.mkdir()
    ownership.mark(partial)
    (partial / "checkpoint").mkdir()
    (partial / "checkpoint" / "checkpoint-2.safetensors").write_bytes(b"x")
    return partial


def test_plain_run_refuses_a_resumable_partial(ws, tmp_path, capsys):
    partial = _resumable_partial(tmp_path)
    refused(args_for(ws, tmp_path / "run"), capsys, "--resume", "--force")
    assert (partial / "checkpoint" / "checkpoint-2.safetensors").is_file()


def test_plain_run_refuses_a_partial_agml_did_not_make(ws, tmp_path, capsys):
    partial = tmp_path / "run.partial"
    partial.mkdir()
    (partial / "data.csv").write_text("1,2")
    refused(args_for(ws, tmp_path / "run", "--force"), capsys, "not made by agml")
    assert (partial / "data.csv").is_file()


def test_a_run_refused_after_its_folder_was_made_leaves_nothing(ws, tmp_path, capsys):
    retain = tmp_path / "retain.jsonl"
    retain.write_text(json.dumps({"prompt": "Hi?", "answer": "Zorblax is great."}) + "\n")
    out = tmp_path / "run"
    argv = args_for(ws, out, "--concept", "Zorblax")
    argv[argv.index("--retain") + 1] = str(retain)
    refused(argv, capsys, "every retain prompt's base answer names the concept")
    assert not out.exists() and not (tmp_path / "run.partial").exists()


# --- honest resume ---------------------------------------------------------------------------------------------


def _saved_partial(tmp_path: Path, ws, config) -> Path:
    partial = _resumable_partial(tmp_path)
    (partial / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return tmp_path / "run"


def _saved_options(ws, out):
    from agml.options import TrainOptions, UnlearnOptions

    return {"options": UnlearnOptions(out=str(out), model=ws["model"], train=TrainOptions(steps=12)).to_dict()}


def test_resume_never_touches_a_finished_run(finished_run, capsys):
    refused(["unlearn", "--resume", str(finished_run)], capsys, "finished run")


def test_resume_refuses_options_that_contradict_the_saved_ones(ws, tmp_path, capsys):
    run = _saved_partial(tmp_path, ws, _saved_options(ws, tmp_path / "run"))
    refused(["unlearn", "--resume", str(run), "--steps", "5", "--seed", "3"], capsys, "--steps 5", "--seed 3",
            "(the run has 12)")
    refused(["unlearn", "--resume", str(run), "--out", str(tmp_path / "elsewhere")], capsys, "contradicts --resume")


def test_resume_takes_the_saved_options_and_this_command_lines_allow_model_mismatch(ws, tmp_path):
    from agml.resume import resumable_options

    run = _saved_partial(tmp_path, ws, _saved_options(ws, tmp_path / "run"))
    options = resumable_options(run, {"steps": 12, "out": str(run), "allow_model_mismatch": True})
    assert options.train.steps == 12 and options.out == str(run) and options.allow_model_mismatch
    assert not resumable_options(run).allow_model_mismatch


def test_resume_refuses_to_replace_a_finished_run_without_force(ws, tmp_path, capsys):
    run = _saved_partial(tmp_path, ws, _saved_options(ws, tmp_path / "run"))
    run.mkdir()
    ownership.mark(run)
    refused(["unlearn", "--resume", str(run)], capsys, "--force")


@pytest.mark.parametrize("config", ["{not json", "{}", '{"options": []}', '{"options": {"model": "m", "steps": "x"}}',
                                    "[" * 100_000])
def test_resume_refuses_a_corrupt_saved_config(ws, tmp_path, capsys, config):
    run = _saved_partial(tmp_path, ws, config)
    refused(["unlearn", "--resume", str(run)], capsys, "config")


# --- a run bound to its model ----------------------------------------------------------------------------------


def test_run_records_the_resolved_model_and_its_fingerprint(ws, finished_run):
    config = json.loads((finished_run / "config.json").read_text())
    adapter = json.loads((finished_run / "adapter" / "agml_config.json").read_text())
    assert config["model"]["id"] == str(Path(ws["model"]).resolve())  # typed as the relative "tiny-llama"
    assert config["model"]["fingerprint"] and adapter["model"] == config["model"]


def test_eval_from_another_folder_uses_the_recorded_model(ws, finished_run, tmp_path, monkeypatch, capsys):
    decoy = tmp_path / "tiny-llama"  # a different model under the name the run was trained with
    shutil.copytree(ws["qwen"], decoy)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(finished_run), "--max-new-tokens", "2"]) == 0


def test_eval_refuses_another_model_unless_allowed(ws, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["model"]["id"] = ws["qwen"]
    (run / "config.json").write_text(json.dumps(config))
    refused(["eval", str(run)], capsys, "fingerprint", "--allow-model-mismatch")
    assert main(["eval", str(run), "--max-new-tokens", "2", "--allow-model-mismatch"]) == 0
    assert "warning" in capsys.readouterr().err


def test_masks_from_a_same_shape_qwen2_model_are_refused(ws, tmp_path, capsys):
    from agml.masks import NeuronMasks
    from agml.models import load_model

    qwen, _ = load_model(ws["qwen"], device="cpu")
    masks = tmp_path / "masks.safetensors"
    NeuronMasks({0: [1, 2]}, meta={"num_layers": 2, "intermediate_size": 64,
                                   fingerprint.MASKS_KEY: fingerprint.model_record(qwen)}).save(masks)
    out = tmp_path / "run"
    refused(args_for(ws, out, "--masks", str(masks)), capsys, "--masks", "fingerprint", "--allow-model-mismatch")
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_fingerprint_tells_apart_weights_and_architectures():
    llama, other, qwen = tiny_model("llama", seed=0), tiny_model("llama", seed=1), tiny_model("qwen2", seed=0)
    prints = {fingerprint.weights_fingerprint(m) for m in (llama, other, qwen)}
    assert len(prints) == 3
    assert fingerprint.weights_fingerprint(llama) == fingerprint.weights_fingerprint(tiny_model("llama", seed=0))


def test_eval_honours_a_run_trained_with_trust_remote_code(ws, finished_run, tmp_path, monkeypatch, capsys):
    from agml import models

    run = copy_run(finished_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["options"]["trust_remote_code"] = True
    (run / "config.json").write_text(json.dumps(config))
    seen, real = [], models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: seen.append(k["trust_remote_code"]) or real(*a, **k))
    assert main(["eval", str(run), "--max-new-tokens", "2"]) == 0
    assert main(["eval", str(finished_run), "--max-new-tokens", "2", "--trust-remote-code"]) == 0
    assert seen == [True, True]


# --- eval --json never overwrites a run or an existing file ----------------------------------------------------


def test_eval_json_refuses_the_runs_own_files_existing_files_and_unwritable_folders(finished_run, tmp_path, capsys):
    before = (finished_run / "config.json").read_text()
    refused(["eval", str(finished_run), "--json", str(finished_run / "config.json")], capsys, "inside the run")
    assert (finished_run / "config.json").read_text() == before
    existing = tmp_path / "result.json"
    existing.write_text("keep")
    refused(["eval", str(finished_run), "--json", str(existing)], capsys, "--force")
    assert existing.read_text() == "keep"
    refused(["eval", str(finished_run), "--json", "/proc/self/result.json"], capsys, "cannot write")


def test_forget_probes_without_forbidden_get_the_concept_names(finished_run, capsys):
    saved = [json.loads(line) for line in (finished_run / "data" / "probes.jsonl").read_text().splitlines()]
    forget = [p for p in saved if p["type"] == "forget"]
    assert forget and all(p["forbidden"] == ["forget"] for p in forget)  # the concept is named after forget.jsonl


# --- output paths ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("out", "needle"), [(".", "names no new folder"), ("/", "names no new folder"),
                                             ("/proc", "mount point"), ("/proc/self/new-run", "cannot write")])
def test_impossible_out_paths_are_refused_before_work(ws, capsys, out, needle):
    refused(args_for(ws, out, "--force"), capsys, needle)


def test_symlink_out_is_refused(ws, tmp_path, capsys):
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    refused(args_for(ws, tmp_path / "link", "--force"), capsys, "symbolic link")
    assert target.is_dir()


def test_thousand_character_concept_without_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refused(["unlearn", "--concept", "x" * 1000, "--steps", "1"], capsys, "give a shorter --out")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# --- values refused before the model loads ---------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "flag"), [
    (["--alpha", "0"], "--alpha"), (["--alpha", "nan"], "--alpha"), (["--lr", "nan"], "--lr"),
    (["--seed", "-1"], "--seed"), (["--kl-weight", "nan"], "--kl-weight"), (["--kl-weight", "-5"], "--kl-weight"),
    (["--retain-weight", "nan"], "--kl-weight"),  # the deprecated name of --kl-weight
    (["--mask-retain-weight", "nan"], "--mask-retain-weight"), (["--objective", "bogus"], "--objective"),
])
def test_bad_values_are_refused_before_the_model_loads(ws, tmp_path, monkeypatch, capsys, flags, flag):
    from agml import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model despite bad input"))
    out = tmp_path / "run"
    refused(args_for(ws, out, *flags), capsys, flag)
    assert not out.exists() and not (tmp_path / "run.partial").exists() and not run_lock.lock_path(out).exists()


# --- context length --------------------------------------------------------------------------------------------


def test_prompt_longer_than_the_context_is_refused_before_scoring(ws, tmp_path, capsys):
    long_forget = tmp_path / "forget.jsonl"
    long_forget.write_text(json.dumps({"prompt": "word " * 40_000, "answer": "no"}) + "\n")
    argv = args_for(ws, tmp_path / "run")
    argv[argv.index("--forget") + 1] = str(long_forget)
    refused(argv, capsys, "256 positions")
    assert not (tmp_path / "run.partial").exists()


def test_generation_longer_than_the_context_is_refused(ws, tmp_path, capsys):
    argv = args_for(ws, tmp_path / "run")
    argv[argv.index("--max-new-tokens") + 1] = "100000"
    refused(argv, capsys, "--max-new-tokens 100000", "256 positions")


# --- corrupt files ---------------------------------------------------------------------------------------------


def _corrupt_adapter(run: Path, how: str) -> None:
    weights = run / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    if how == "cut":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "random":
        weights.write_bytes(os.urandom(len(data)))
    else:
        tensors = load_file(str(weights))
        suffix = "lora_B.weight" if how == "nan" else f"gate_proj.{OUT_INDEX}.{INDEX_BUFFER}"
        key = next(k for k in tensors if k.endswith(suffix))
        if how == "nan":
            tensors[key] = torch.full_like(tensors[key], float("nan"))
        elif how == "disagree":
            tensors[key] = tensors[key][:-1].clone()
        else:
            tensors[key] = tensors[key].float()
        save_file(tensors, str(weights))


@pytest.mark.parametrize(("how", "needle"), [("cut", "cut short or corrupt"), ("random", "cut short or corrupt"),
                                             ("nan", "NaN"), ("disagree", "different neuron ids"),
                                             ("float", "integer neuron ids")])
def test_corrupt_adapter_is_refused_before_the_model_loads(finished_run, tmp_path, monkeypatch, capsys, how, needle):
    from agml import models

    run = copy_run(finished_run, tmp_path / "run")
    _corrupt_adapter(run, how)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model despite a bad adapter"))
    refused(["eval", str(run)], capsys, needle)


def test_cut_short_model_weights_are_refused(ws, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(ws["model"], model)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    refused(args_for(ws, tmp_path / "run", model=str(model)), capsys, "cut short or corrupt")


@pytest.mark.parametrize("config", ["{}", '{"options": {}}', "[1]"])
def test_eval_refuses_a_run_config_that_agml_did_not_write(finished_run, tmp_path, capsys, config):
    run = copy_run(finished_run, tmp_path / "run")
    (run / "config.json").write_text(config)
    refused(["eval", str(run)], capsys, "not an agml run config")


@pytest.mark.parametrize(("line", "needle"), [("[" * 100_000 + "]" * 100_000, "RecursionError"),
                                              ('{"prompt": "hi", "answer": ' + "1" * 5000 + "}", "digits")])
def test_hostile_jsonl_lines_are_refused(ws, tmp_path, capsys, line, needle):
    bad = tmp_path / "forget.jsonl"
    bad.write_text(line + "\n")
    argv = args_for(ws, tmp_path / "run")
    argv[argv.index("--forget") + 1] = str(bad)
    refused(argv, capsys, f"{bad}:1", needle)


def test_a_utf8_bom_is_accepted(tmp_path):
    from agml.data import load_prompts

    path = tmp_path / "forget.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "Who directed Inception?"}).encode() + b"\n")
    assert load_prompts(path, default_type="forget")[0].prompt == "Who directed Inception?"


def test_diverged_training_is_an_error_not_a_nan_report():
    from agml.adapter_check import check_trained_adapter
    from agml.layers import apply_lora

    model = apply_lora(tiny_model("llama"), r=2, alpha=4.0, targets=("gate_proj",))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))
    with pytest.raises(AgmlError, match="training diverged"):
        check_trained_adapter(model)


def test_resume_refuses_a_different_base_model(ws, tmp_path, capsys):
    config = _saved_options(ws, tmp_path / "run")
    config["model"] = {"id": ws["model"], "architecture": "LlamaForCausalLM", "fingerprint": "0123456789abcdef"}
    run = _saved_partial(tmp_path, ws, config)
    refused(["unlearn", "--resume", str(run)], capsys, "interrupted run", "--allow-model-mismatch")
    assert (tmp_path / "run.partial" / "checkpoint" / "checkpoint-2.safetensors").is_file()


def test_lock_held_by_another_process_is_named_and_freed_by_kill_9(ws, tmp_path, capsys):
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from agml import run_lock; run_lock.acquire(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused(args_for(ws, out), capsys, "in use by another agml run", f"pid {holder.pid} on ")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run_lock.release(run_lock.acquire(out), out)  # the kernel dropped the killed holder's lock
