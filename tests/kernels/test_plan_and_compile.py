"""The hot-path contract: indices validated once, positions reused, no host reads per call; torch.compile; paths."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_formulas import TOLERANCE
from test_masked_lora import OUT, assert_matches_f64, make_case, run

from agml_kernels import NeuronStats, column_positions, masked_lora_linear, neuron_stats, prepare_masked_lora

REPO = Path(__file__).resolve().parents[2]


def prepared(case):
    """The case with the keyword arguments a layer builds once per adapter."""
    plan = prepare_masked_lora(case["out_index"], case["in_index"], *case["weight"].shape)
    return {**case, **plan}


@pytest.mark.parametrize("mode", ["out", "in", "both", "neither"])
def test_prepared_call_matches_unprepared(kernel_backend, device, mode):
    case = make_case(device, mode=mode)
    grad_out = torch.randn(case["x"].shape[0], OUT, device=device)
    y, grads = run(case, grad_out)
    y_plan, grads_plan = run(prepared(case), grad_out)
    torch.testing.assert_close(y_plan, y)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_plan[name], grad, msg=name)
    assert_matches_f64(prepared(case), TOLERANCE[torch.float32])


def test_prepare_validates_indices():
    case = make_case("cpu")
    with pytest.raises(ValueError, match="out_index"):
        prepare_masked_lora(case["out_index"].flip(0), case["in_index"], *case["weight"].shape)
    with pytest.raises(ValueError, match="in_index"):
        prepare_masked_lora(case["out_index"], case["in_index"] + 1000, *case["weight"].shape)


@pytest.mark.parametrize(
    "change",
    [
        {"out_positions": torch.zeros(OUT, dtype=torch.int64)},
        {"out_positions": torch.zeros(3, dtype=torch.int32)},
        {"in_positions": torch.zeros(40, dtype=torch.int32), "in_index": None},
    ],
    ids=["int64", "wrong-size", "without-index"],
)
def test_bad_positions_raise_naming_them(change):
    case = {**make_case("cpu", mode="out"), **change}
    name = next(iter(change))
    with pytest.raises(ValueError, match=name):
        masked_lora_linear(**case)


def test_column_positions():
    pos = column_positions(torch.tensor([1, 4]), 6)
    assert pos.dtype == torch.int32 and pos.tolist() == [-1, 0, -1, -1, 1, -1]
    assert column_positions(None, 6) is None


class _HostReadError(AssertionError):
    pass


def _refuse(self, *args, **kwargs):
    raise _HostReadError("tensor value read on the host")


HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")


def test_prepared_call_reads_no_tensor_values(device, monkeypatch):
    """Every read of a tensor's value into Python fails here: on CUDA each would be a device->host sync.

    The CPU stand-in for `torch.cuda.set_sync_debug_mode("error")` (the CUDA test below uses that). Reference
    backend: the Triton interpreter itself reads values on the host, a compiled kernel does not.
    """
    monkeypatch.setenv("AGML_KERNELS", "reference")
    case = prepared(make_case(device, mode="both"))
    grad_out = torch.randn(case["x"].shape[0], OUT, device=device)
    with pytest.MonkeyPatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, _refuse)
        run(case, grad_out)
        stats = NeuronStats.zeros(OUT, device=device)
        acts = torch.randn(2, 5, OUT, device=device)
        stats.accumulate_(acts, acts.cos(), torch.rand(2, 5, device=device) > 0.5)
    with pytest.raises(_HostReadError):  # the guard bites: an unprepared call validates its indices on the host
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.Tensor, "__int__", _refuse)
            run(make_case(device, mode="both"), grad_out)


def test_accumulate_is_in_place(kernel_backend, device):
    gen = torch.Generator().manual_seed(0)
    acts, grads = (torch.randn(3, 11, 70, generator=gen).to(device) for _ in range(2))
    mask = (torch.rand(3, 11, generator=gen) > 0.5).to(device)
    stats = NeuronStats.zeros(70, device=device)
    buffers = (stats.fisher.data_ptr(), stats.saliency.data_ptr(), stats.token_count.data_ptr())
    for b in range(3):
        stats.accumulate_(acts[b], grads[b], mask[b])
    assert (stats.fisher.data_ptr(), stats.saliency.data_ptr(), stats.token_count.data_ptr()) == buffers
    whole = neuron_stats(acts, grads, mask)
    assert isinstance(stats.token_count, torch.Tensor) and stats.tokens == whole.tokens == int(mask.sum())
    torch.testing.assert_close(stats.fisher, whole.fisher, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.saliency, whole.saliency, rtol=1e-6, atol=1e-6)


def test_accumulate_rejects_other_width():
    with pytest.raises(ValueError, match="neurons"):
        NeuronStats.zeros(5).accumulate_(torch.randn(2, 4), torch.randn(2, 4))


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_forced_paths_match_float64(triton_backend, device, monkeypatch, path):
    monkeypatch.setenv("AGML_LINEAR_PATH", path)
    for mode in ("out", "in"):
        assert_matches_f64(make_case(device, mode=mode), TOLERANCE[torch.float32])


def test_unknown_path_raises(triton_backend, device, monkeypatch):
    monkeypatch.setenv("AGML_LINEAR_PATH", "cutlass")
    with pytest.raises(ValueError, match="AGML_LINEAR_PATH"):
        masked_lora_linear(**make_case(device))


class _Masked(torch.nn.Module):
    def __init__(self, case):
        super().__init__()
        self.weight = torch.nn.Parameter(case["weight"].detach().clone(), requires_grad=False)
        self.lora_a = torch.nn.Parameter(case["lora_a"].detach().clone())
        self.lora_b = torch.nn.Parameter(case["lora_b"].detach().clone())
        plan = prepare_masked_lora(case["out_index"], case["in_index"], *case["weight"].shape)
        self.plan = plan

    def forward(self, x):
        y = masked_lora_linear(x, self.weight, None, self.lora_a, self.lora_b, 0.5, **self.plan)
        stats = NeuronStats.zeros(y.shape[-1], device=y.device)
        stats.accumulate_(y.detach(), y.detach().sin())
        return y.square().sum() + stats.fisher.sum()


def test_torch_compile_traces_both_ops(device, monkeypatch):
    """Both custom ops trace with fullgraph=True (no graph break); outputs and gradients equal eager."""
    monkeypatch.setenv("AGML_KERNELS", "reference")
    try:
        torch._dynamo.reset()
        case = make_case(device, mode="both", lead=(6,))
        eager, compiled_module = _Masked(case), _Masked(case)
        compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
        x = case["x"].detach()
        for _module, fn in ((eager, eager), (compiled_module, compiled)):
            fn(x).backward()
        torch.testing.assert_close(compiled(x).detach(), eager(x).detach())
        for name in ("lora_a", "lora_b"):
            torch.testing.assert_close(getattr(compiled_module, name).grad, getattr(eager, name).grad, msg=name)
    finally:
        torch._dynamo.reset()


def test_kernel_tests_run_without_hypothesis(tmp_path):
    """With hypothesis unimportable, the kernel tests still collect and run; only the property module skips."""
    hidden = "raise ModuleNotFoundError('hypothesis hidden for this test', name='hypothesis')\n"
    (tmp_path / "hypothesis.py").write_text(hidden)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}  # fmt: skip
    env.pop("AGML_KERNELS", None)
    # No hypothesis also means no hypothesis pytest plugin.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-rs",
           "tests/kernels", "-k", "bad_arguments or random", "--ignore=tests/kernels/test_plan_and_compile.py"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" in done.stdout and "1 skipped" in done.stdout, done.stdout
    assert "hypothesis hidden" in done.stdout, done.stdout


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="device->host sync checks need CUDA")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["out", "in"])
def test_cuda_hot_path_never_syncs(triton_backend, dtype, mode):
    case = prepared(make_case("cuda", dtype=dtype, mode=mode, lead=(256,), in_f=256, out_f=384))
    grad_out = torch.randn(256, 384, device="cuda", dtype=dtype)
    run(case, grad_out)  # first call per shape: path choice and autotuning may synchronise
    stats = NeuronStats.zeros(384, device="cuda")
    acts, mask = torch.randn(256, 384, device="cuda", dtype=dtype), torch.rand(256, device="cuda") > 0.5
    stats.accumulate_(acts, acts, mask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(case, grad_out)
        stats.accumulate_(acts, acts, mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
