"""`agml unlearn` / `agml eval` end to end on a tiny random model saved as a local folder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny_models import write_workspace

from agml.cli import main
from agml.errors import InputError


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smol_tokenizer):
    return write_workspace(tmp_path_factory.mktemp("pipeline"), smol_tokenizer)


def unlearn_args(ws, out: Path, *extra: str) -> list[str]:
    return ["unlearn", "--model", ws["model"], "--forget", ws["forget"], "--retain", ws["retain"],
            "--probes", ws["probes"], "--density", "0.1", "--batch-size", "2", "--max-new-tokens", "6",
            "--answer-tokens", "6", "--out", str(out), *extra]


EXPECTED = ["config.json", "scores.safetensors", "masks.safetensors", "adapter", "adapter-baked", "report.json",
            "report.md", "plots/heatmap.png", "plots/training.png", "plots/before_after.png"]


def test_unlearn_writes_the_whole_run_folder(workspace, capsys):
    out = workspace["root"] / "run"
    assert main(unlearn_args(workspace, out, "--steps", "3", "--lr", "1e-2")) == 0
    for name in EXPECTED:
        assert (out / name).exists(), name
    assert not (workspace["root"] / "run.partial").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["seed"] == 0 and "torch" in config["versions"]
    assert config["concept"]["terms"] == ["forget"]  # no --concept: named after the forget file
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["before"]["forget"]["n"] == 2
    assert report["parameters"]["trainable"] > 0
    stages = report["stage_seconds"]
    assert list(stages) == ["load and base answers", "scoring and masks", "training targets", "training",
                            "evaluation"]
    assert all(value >= 0 for value in stages.values()) and sum(stages.values()) <= report["seconds"] + 0.5
    assert "run written to" in capsys.readouterr().out


NOISE = ("Unable to fetch remote file", "Could not find a config file", "gemm_4bit_forward",
         "is_gradient_checkpointing")


def test_a_normal_run_prints_no_library_noise(workspace, capfd):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(unlearn_args(workspace, workspace["root"] / "run-quiet", "--steps", "1")) == 0
    printed = capfd.readouterr()
    shown = printed.out + printed.err + "\n".join(str(w.message) for w in caught)
    assert not [noise for noise in NOISE if noise in shown]


def test_eval_command_on_a_run(workspace, capsys):
    out = workspace["root"] / "run"
    if not out.exists():
        pytest.skip("needs the run from test_unlearn_writes_the_whole_run_folder")
    target = workspace["root"] / "eval.json"
    assert main(["eval", str(out), "--json", str(target)]) == 0
    result = json.loads(target.read_text())
    assert set(result) >= {"before", "after", "probes"}
    assert {p["type"] for p in result["probes"]} == {"forget", "retain"}


def test_lora_baseline_method(workspace):
    out = workspace["root"] / "run-lora"
    assert main(unlearn_args(workspace, out, "--steps", "2", "--method", "lora")) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "masks.safetensors").exists()


def _adapter_tensors(run: Path) -> dict:
    files = sorted((run / "adapter").glob("*.safetensors"))
    assert files, f"no adapter weights in {run}"
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def test_killed_run_resumes_to_the_same_adapter(workspace):
    """SIGKILL mid-training, `--resume`, and the adapter equals an uninterrupted run's, bit for bit."""
    # The poll below sees the first checkpoint (step 2) long before the run could finish: after training it
    # still evaluates, and wherever the kill lands, the resumed run must end with the same adapter.
    flags = ("--steps", "12", "--checkpoint-every", "2", "--lr", "1e-2")
    straight = workspace["root"] / "straight"
    assert main(unlearn_args(workspace, straight, *flags)) == 0

    killed = workspace["root"] / "killed"
    checkpoints = killed.with_name("killed.partial") / "checkpoint"
    proc = subprocess.Popen([sys.executable, "-m", "agml", *unlearn_args(workspace, killed, *flags)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not any(checkpoints.glob("checkpoint-*.safetensors")) and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "a killed run must not leave a complete-looking run folder"

    assert main(["unlearn", "--resume", str(killed)]) == 0
    a, b = _adapter_tensors(straight), _adapter_tensors(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key


def test_mask_file_for_another_model_is_refused_before_writing(workspace, capsys):
    from agml.masks import NeuronMasks

    foreign = workspace["root"] / "foreign-masks.safetensors"
    NeuronMasks({3: [5, 17]}, meta={"num_layers": 30, "intermediate_size": 1536, "model": "other"}).save(foreign)
    out = workspace["root"] / "run-foreign"
    assert main(unlearn_args(workspace, out, "--masks", str(foreign))) == 2
    assert "built for a model with 30 layers x 1536" in capsys.readouterr().err
    assert not out.exists() and not out.with_name("run-foreign.partial").exists()


def test_masks_from_agml_score_are_reused(workspace):
    scored = workspace["root"] / "scored"
    assert main(["score", "--model", workspace["model"], "--forget", workspace["forget"], "--retain",
                 workspace["retain"], "--density", "0.1", "--out", str(scored)]) == 0
    out = workspace["root"] / "run-reused"
    assert main(unlearn_args(workspace, out, "--steps", "1", "--masks", str(scored / "masks.safetensors"))) == 0
    from agml.masks import NeuronMasks

    assert NeuronMasks.load(out / "masks.safetensors").to_lists() == NeuronMasks.load(
        scored / "masks.safetensors").to_lists()


def test_retain_answers_naming_the_concept_are_dropped():
    from agml.data import PromptRecord
    from agml.pipeline import _without_concept

    def record(answer):
        return PromptRecord(({"role": "user", "content": "Recommend a book series."},), "retain", answer=answer)

    logged = []
    kept = _without_concept([record("Try Harry Potter!"), record("Try Discworld.")], ("Harry Potter",), logged.append)
    assert [r.answer for r in kept] == ["Try Discworld."] and "dropped 1" in logged[0]
    with pytest.raises(InputError):
        _without_concept([record("harry potter, of course")], ("Harry Potter",), None)
