import importlib.util
import json
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "controls.py"


def controls_module():
    spec = importlib.util.spec_from_file_location("agml_controls", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        controls_module().main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_quick_tiny_run_writes_every_control(tmp_path, smol_tokenizer):
    started = time.perf_counter()
    result = controls_module().main(["--quick", "--tiny", "--out", str(tmp_path)], log=lambda _: None)
    assert time.perf_counter() - started < 120  # well under a minute on an idle 2-core machine
    saved = json.loads((tmp_path / "controls.json").read_text())
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000
    assert set(saved["tradeoff"]) == {"ag", "lora", "random-0", "random-1"}
    assert all({"forget", "retain", "forget_interval", "retain_interval", "retain_refusal"} <= set(rates)
               and rates["retain"] is not None and rates["n_retain"] > 0
               for runs in saved["tradeoff"].values() for rates in runs.values())
    assert saved["ablation"]["n_random"] == 10 and "specificity" in saved["ablation"]["z"]
    overlap = saved["overlap"]
    assert overlap["concepts"]["Inception"]["Inception"] == 1.0 and 0.0 <= overlap["forget_halves"] <= 1.0
    assert result["neurons"] == saved["neurons"] > 0


def test_an_interrupted_tradeoff_continues_from_its_saved_runs(tmp_path, smol_tokenizer):
    module = controls_module()
    args = ["--quick", "--tiny", "--parts", "tradeoff", "--out", str(tmp_path)]
    first = module.main(args, log=lambda _: None)
    assert (tmp_path / "tradeoff_runs.json").is_file()

    def must_not_train(*_args, **_kwargs):
        raise AssertionError("a saved run was trained again")

    module.trained_rates = must_not_train
    assert module.main(args, log=lambda _: None)["tradeoff"] == first["tradeoff"]
