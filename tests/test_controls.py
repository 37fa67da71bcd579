import importlib.util
import json
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
    # weight 1: a tiny random model's forget and retain halves look alike, so no neuron reaches the default 2 x
    args = ["--quick", "--tiny", "--mask-retain-weight", "1", "--out", str(tmp_path)]
    result = controls_module().main(args, log=lambda _: None)
    saved = json.loads((tmp_path / "controls.json").read_text())
    assert saved["mask_options"]["mask_retain_weight"] == 1.0
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000
    assert set(saved["tradeoff"]) == {"ag", "lora", "random-0", "random-1"}
    assert all({"forget", "retain", "forget_interval", "retain_interval", "retain_refusal"} <= set(rates)
               and rates["retain"] is not None and rates["n_retain"] > 0
               for runs in saved["tradeoff"].values() for rates in runs.values())
    assert saved["ablation"]["n_random"] == 10 and "specificity" in saved["ablation"]["z"]
    assert saved["ablation_held_out"]["n_concept_examples"] < saved["ablation"]["n_concept_examples"]
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


def test_replot_merges_sweeps_split_by_kl_weight_without_a_model(tmp_path):
    module = controls_module()
    rates = {"forget": 0.5, "retain": 0.75}
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"ag": {"30.0": rates}, "random-0": {"30.0": rates}}))
    second.write_text(json.dumps({"ag": {"3.0": {**rates, "forget": 1.0}}, "random-0": {"3.0": rates}}))
    out = tmp_path / "out"
    result = module.main(["--replot", "--merge-runs", f"{first},{second}", "--out", str(out)])
    assert result["tradeoff"]["ag"] == {"30.0": rates, "3.0": {**rates, "forget": 1.0}}
    assert json.loads((out / "tradeoff_runs.json").read_text()) == result["tradeoff"]
    assert (out / "tradeoff.png").stat().st_size > 1000
    second.write_text(json.dumps({"ag": {"30.0": {**rates, "retain": 0.0}}}))
    with pytest.raises(SystemExit, match="differs"):
        module.main(["--replot", "--merge-runs", str(second), "--out", str(out)])


def test_summary_keeps_the_parts_an_earlier_run_measured(tmp_path):
    module = controls_module()
    path = tmp_path / "controls.json"
    path.write_text(json.dumps({"options": {"parts": ["tradeoff"]}, "tradeoff": {"ag": {}}}))  # an older file
    module.write_summary(path, {"options": {"parts": ["overlap"]}, "neurons": 5, "overlap": {"forget_halves": 0.5}})
    module.write_summary(path, {"options": {"parts": ["ablation"]}, "neurons": 5, "ablation": {"z": 3.0},
                                "ablation_held_out": {"z": 2.0}})
    saved = json.loads(path.read_text())
    assert saved["overlap"] == {"forget_halves": 0.5} and saved["ablation"] == {"z": 3.0}
    assert saved["tradeoff"] == {"ag": {}} and saved["measured_with"] == {
        "tradeoff": {"options": {"parts": ["tradeoff"]}},
        "overlap": {"options": {"parts": ["overlap"]}, "neurons": 5},
        "ablation": {"options": {"parts": ["ablation"]}, "neurons": 5},
        "ablation_held_out": {"options": {"parts": ["ablation"]}, "neurons": 5}}
