"""Two processes (gloo on CPU, started by accelerate) agree with one: scores, and a whole unlearn run."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from tiny_models import write_workspace

from agml.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smol_tokenizer):
    return write_workspace(tmp_path_factory.mktemp("distributed"), smol_tokenizer)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(*agml_args: str) -> subprocess.CompletedProcess:
    # --multi_gpu picks accelerate's torchrun launcher; without CUDA the processes talk over gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "agml", *agml_args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def score_args(ws, out) -> list[str]:
    return ["score", "--model", ws["model"], "--forget", ws["forget"], "--retain", ws["retain"],
            "--density", "0.1", "--batch-size", "2", "--out", str(out)]


def test_two_processes_give_the_same_scores_as_one(workspace):
    one, two = workspace["root"] / "one", workspace["root"] / "two"
    assert main(score_args(workspace, one)) == 0
    done = launch_two(*score_args(workspace, two))
    assert done.returncode == 0, done.stderr[-3000:]
    single, double = load_file(str(one / "scores.safetensors")), load_file(str(two / "scores.safetensors"))
    assert single.keys() == double.keys()
    for key in single:
        error = (single[key] - double[key]).norm() / single[key].norm().clamp_min(1e-30)
        assert error <= 1e-4, (key, float(error))
    assert load_file(str(one / "masks.safetensors")).keys() == load_file(str(two / "masks.safetensors")).keys()


def test_two_process_unlearn_writes_one_run(workspace):
    out = workspace["root"] / "run2"
    done = launch_two("unlearn", "--model", workspace["model"], "--forget", workspace["forget"],
                      "--retain", workspace["retain"], "--probes", workspace["probes"], "--density", "0.1",
                      "--batch-size", "2", "--steps", "2", "--max-new-tokens", "4", "--answer-tokens", "4",
                      "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "report.json").is_file() and (out / "adapter").is_dir()
    assert not out.with_name("run2.partial").exists()
    assert done.stdout.count("run written to") == 1
