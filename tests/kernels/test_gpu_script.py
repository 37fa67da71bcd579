"""benchmarks/gpu/run.sh --dry-run: every section of the GPU script runs on CPU (Triton interpreter, tiny sizes).

GPU minutes are few and come in one call, so the script must not fail on its first real run for a reason a CPU
could have shown: a typo, a wrong argument, a section writing nothing, more files than the device tool returns.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("correctness", "masked", "neuron_stats", "scoring")


@pytest.mark.skipif(not (REPO / "benchmarks" / "gpu" / "run.sh").exists(), reason="no GPU script in this checkout")
def test_gpu_script_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHON": os.environ.get("PYTHON", __import__("sys").executable)}  # fmt: skip
    for name in ("AGML_KERNELS", "AGML_LINEAR_PATH", "AGML_TRITON_AUTOTUNE"):
        env.pop(name, None)
    done = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "failed sections: none" in done.stdout
    merged = json.loads((tmp_path / "h200.json").read_text())
    assert merged["goals"]["correctness_all_ok"] is True
    for key in ("masked_fwd_over_base_fwd", "masked_fwdbwd_over_base_fwdbwd", "lora_overhead_share",
                "neuron_stats_fraction_of_copy_bandwidth", "scoring_over_plain_frozen"):  # fmt: skip
        assert merged["goals"][key] > 0, key
    for section in SECTIONS:
        assert merged[section], section
    assert {row["path"] for row in merged["correctness"]} == {"torch", "triton"}
    assert {"triton_over_cublas_fwd", "triton_over_cublas_dx"} <= set(merged["masked"][0])
    # What the device tool returns: at most 8 files, plain names.
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), files
