"""Property tests (hypothesis): random indices and shapes against float64. Skipped where hypothesis is missing.

Kept apart so that every other kernel test collects and runs without hypothesis (the GPU machine has none).
"""

import pytest

pytest.importorskip("hypothesis")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_formulas import neuron_stats_f64  # noqa: E402
from test_masked_lora import IN, OUT, RANK, make_case, run, run_f64  # noqa: E402
from test_neuron_stats import acts_grads  # noqa: E402

from agml_kernels import masked_lora_linear, neuron_stats  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.sampled_from(["out_index", "in_index"]),
    values=st.lists(st.integers(-60, 60), min_size=1, max_size=12),
)
def test_random_bad_indices_raise(which, values):
    size = OUT if which == "out_index" else IN
    valid = all(0 <= v < size for v in values) and values == sorted(set(values))
    case = make_case("cpu")
    case[which] = torch.tensor(values, dtype=torch.int64)
    k = len(values)
    if which == "out_index":
        case["lora_b"] = torch.randn(k, RANK)
    else:
        case["lora_a"] = torch.randn(RANK, k)
    if valid:
        masked_lora_linear(**case)
    else:
        with pytest.raises(ValueError, match=which):
            masked_lora_linear(**case)


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    in_f=st.integers(1, 12),
    out_f=st.integers(1, 12),
    rank=st.integers(0, 5),
    data=st.data(),
)
def test_random_valid_shapes_match_float64(lead, in_f, out_f, rank, data):
    def subset(size):
        picked = data.draw(st.one_of(st.none(), st.sets(st.integers(0, size - 1), max_size=size)))
        return None if picked is None else torch.tensor(sorted(picked), dtype=torch.int64)

    out_index, in_index = subset(out_f), subset(in_f)
    k_in = in_f if in_index is None else in_index.numel()
    k_out = out_f if out_index is None else out_index.numel()
    case = {
        "x": torch.randn(*lead, in_f, requires_grad=True),
        "weight": torch.randn(out_f, in_f, requires_grad=True),
        "bias": data.draw(st.sampled_from([None, torch.randn(out_f, requires_grad=True)])),
        "lora_a": torch.randn(rank, k_in, requires_grad=True),
        "lora_b": torch.randn(k_out, rank, requires_grad=True),
        "scaling": data.draw(st.floats(-4, 4)),
        "out_index": out_index,
        "in_index": in_index,
    }
    grad_out = torch.randn(*lead, out_f)
    y, grads = run(case, grad_out)
    y64, grads64 = run_f64(case, grad_out)
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)
    for name, g64 in grads64.items():
        torch.testing.assert_close(grads[name].double(), g64, rtol=1e-4, atol=1e-4, msg=f"d{name}")


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(0, 5), min_size=0, max_size=2),
    hidden=st.integers(1, 9),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_float64(lead, hidden, dtype, masked, seed):
    acts, grads = acts_grads("cpu", dtype=dtype, shape=(*lead, hidden), seed=seed)
    mask = torch.rand(tuple(lead), generator=torch.Generator().manual_seed(seed)) > 0.5 if masked else None
    stats = neuron_stats(acts, grads, mask)
    fisher, saliency, tokens = neuron_stats_f64(acts, grads, mask)
    assert stats.tokens == tokens
    torch.testing.assert_close(stats.fisher.double(), fisher, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.saliency.double(), saliency, rtol=1e-5, atol=1e-6)
