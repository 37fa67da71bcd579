"""masked_lora_linear: both backends against the float64 contract, for the output and every gradient."""

import pytest
import torch
import torch.nn.functional as F
from kernel_formulas import TOLERANCE, masked_lora_f64, rel_err

from agml_kernels import masked_lora_linear
from agml_kernels._backend import use_triton_for

IN, OUT, RANK, SCALING = 40, 50, 3, 0.7
TOKENS = 37  # not a multiple of any block size


def make_case(device, dtype=torch.float32, lead=(TOKENS,), mode="both", rank=RANK, bias=True, in_f=IN, out_f=OUT,
              seed=0, weight_grad=True):  # fmt: skip
    """Random operands; mode is which indices are given: "out", "in", "both" or "neither"."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

    def index(size, k):
        return torch.randperm(size, generator=gen)[:k].sort().values.to(device)

    out_index = index(out_f, max(1, out_f // 5)) if mode in ("out", "both") else None
    in_index = index(in_f, max(1, in_f // 4)) if mode in ("in", "both") else None
    k_in = in_f if in_index is None else in_index.numel()
    k_out = out_f if out_index is None else out_index.numel()
    return {
        "x": rand(*lead, in_f),
        "weight": rand(out_f, in_f, grad=weight_grad),
        "bias": rand(out_f, grad=weight_grad) if bias else None,
        "lora_a": rand(rank, k_in),
        "lora_b": rand(k_out, rank),
        "scaling": SCALING,
        "out_index": out_index,
        "in_index": in_index,
    }


def differentiable(case):
    return [name for name in ("x", "weight", "bias", "lora_a", "lora_b") if case[name] is not None and
            case[name].requires_grad]  # fmt: skip


def run(case, grad_out):
    """Output and gradients of every differentiable operand."""
    y = masked_lora_linear(**case)
    names = differentiable(case)
    grads = torch.autograd.grad(y, [case[n] for n in names], grad_out)
    return y, dict(zip(names, grads, strict=True))


def run_f64(case, grad_out):
    names = differentiable(case)
    leaves = {n: case[n].detach().double().requires_grad_() for n in names}
    args = {**case, **leaves}
    y = masked_lora_f64(**args)
    grads = torch.autograd.grad(y, [leaves[n] for n in names], grad_out.double())
    return y, dict(zip(names, grads, strict=True))


def assert_matches_f64(case, tol):
    grad_out = torch.randn(*case["x"].shape[:-1], case["weight"].shape[0], generator=torch.Generator().manual_seed(1))
    grad_out = grad_out.to(case["x"].device, case["x"].dtype)
    y, grads = run(case, grad_out)
    y64, grads64 = run_f64(case, grad_out)
    assert y.dtype == case["x"].dtype and y.shape == y64.shape
    assert rel_err(y, y64) < tol, "output"
    for name, g64 in grads64.items():
        assert grads[name].dtype == case[name].dtype and grads[name].shape == case[name].shape, name
        assert rel_err(grads[name], g64) < tol, f"d{name}"


@pytest.mark.parametrize("mode", ["out", "in", "both", "neither"])
def test_matches_float64_formula(kernel_backend, device, mode):
    case = make_case(device, mode=mode, bias=mode != "in")
    assert use_triton_for(case["x"]) == (kernel_backend == "triton")
    assert_matches_f64(case, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_float64(kernel_backend, device, dtype):
    case = make_case(device, dtype=dtype)
    assert_matches_f64(case, TOLERANCE[dtype])


@pytest.mark.parametrize("lead", [(), (0,), (1,), (2, 3, 7)], ids=["1d", "no-tokens", "one-token", "3-lead-dims"])
def test_leading_dims(kernel_backend, device, lead):
    case = make_case(device, lead=lead)
    y = masked_lora_linear(**case)
    assert y.shape == (*lead, OUT)
    if y.numel():
        assert_matches_f64(case, TOLERANCE[torch.float32])


def test_non_contiguous_x(kernel_backend, device):
    case = make_case(device, lead=(TOKENS,), in_f=IN)
    wide = torch.randn(2 * IN, TOKENS, device=device).t()  # transposed and strided: x[t, i] = wide.T[t, 2 i]
    case["x"] = wide[:, ::2].requires_grad_()
    assert not case["x"].is_contiguous()
    assert_matches_f64(case, TOLERANCE[torch.float32])


def test_frozen_base_gets_no_gradient(kernel_backend, device):
    case = make_case(device, weight_grad=False)
    y = masked_lora_linear(**case)
    y.sum().backward()
    assert case["weight"].grad is None and case["bias"].grad is None
    assert case["x"].grad is not None and case["lora_a"].grad is not None and case["lora_b"].grad is not None


@pytest.mark.parametrize("rank", [1, 128])
def test_rank_extremes(kernel_backend, device, rank):
    case = make_case(device, rank=rank, lead=(19,), in_f=24, out_f=20, mode="both")
    assert_matches_f64(case, TOLERANCE[torch.float32])


@pytest.mark.parametrize("empty", ["out_index", "in_index", "rank"])
def test_empty_lora_is_exactly_the_base(kernel_backend, device, empty):
    case = make_case(device, mode="both")
    if empty == "rank":
        case["lora_a"] = case["lora_a"][:0].detach().requires_grad_()
        case["lora_b"] = case["lora_b"][:, :0].detach().requires_grad_()
    else:
        case[empty] = case[empty][:0]
        side = "lora_b" if empty == "out_index" else "lora_a"
        dim = 0 if side == "lora_b" else 1
        case[side] = case[side].narrow(dim, 0, 0).detach().requires_grad_()
    y = masked_lora_linear(**case)
    assert torch.equal(y, F.linear(case["x"], case["weight"], case["bias"]))
    y.sum().backward()
    assert torch.equal(case["lora_a"].grad, torch.zeros_like(case["lora_a"]))
    assert torch.equal(case["lora_b"].grad, torch.zeros_like(case["lora_b"]))
    assert torch.equal(case["x"].grad, torch.ones_like(y) @ case["weight"].detach())


def test_triton_is_deterministic(triton_backend, device):
    case = make_case(device, lead=(2, 40), mode="both")
    grad_out = torch.randn(2, 40, OUT, device=device)
    first_y, first = run(case, grad_out)
    second_y, second = run(case, grad_out)
    assert torch.equal(first_y, second_y)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def _bad(case, **changes):
    return {**case, **changes}


BAD_ARGUMENTS = {
    "x-not-tensor": (lambda c: _bad(c, x=[1.0]), "x"),
    "x-integer": (lambda c: _bad(c, x=c["x"].detach().long()), "x"),
    "x-wrong-width": (lambda c: _bad(c, x=c["x"].detach()[..., :-1]), "x"),
    "weight-1d": (lambda c: _bad(c, weight=c["weight"].detach()[0]), "weight"),
    "bias-shape": (lambda c: _bad(c, bias=c["bias"].detach()[:-1]), "bias"),
    "bias-not-tensor": (lambda c: _bad(c, bias=3.0), "bias"),
    "lora_a-shape": (lambda c: _bad(c, lora_a=c["lora_a"].detach()[:, :-1]), "lora_a"),
    "lora_b-shape": (lambda c: _bad(c, lora_b=c["lora_b"].detach()[:-1]), "lora_b"),
    "lora_b-rank": (lambda c: _bad(c, lora_b=c["lora_b"].detach()[:, :-1]), "lora_b"),
    "dtype-mismatch": (lambda c: _bad(c, lora_a=c["lora_a"].detach().double()), "lora_a"),
    "bias-dtype": (lambda c: _bad(c, bias=c["bias"].detach().half()), "bias"),
    "scaling-string": (lambda c: _bad(c, scaling="2"), "scaling"),
    "scaling-bool": (lambda c: _bad(c, scaling=True), "scaling"),
    "scaling-nan": (lambda c: _bad(c, scaling=float("nan")), "scaling"),
    "scaling-tensor": (lambda c: _bad(c, scaling=torch.tensor([1.0, 2.0])), "scaling"),
    "out_index-unsorted": (lambda c: _bad(c, out_index=c["out_index"].flip(0)), "out_index"),
    "out_index-duplicate": (
        lambda c: _bad(c, out_index=c["out_index"].repeat_interleave(2)[: c["out_index"].numel()]),
        "out_index",
    ),  # fmt: skip
    "out_index-range": (lambda c: _bad(c, out_index=c["out_index"] + OUT), "out_index"),
    "out_index-negative": (lambda c: _bad(c, out_index=c["out_index"] - OUT), "out_index"),
    "out_index-float": (lambda c: _bad(c, out_index=c["out_index"].float()), "out_index"),
    "out_index-int32": (lambda c: _bad(c, out_index=c["out_index"].int()), "out_index"),
    "out_index-2d": (lambda c: _bad(c, out_index=c["out_index"][None]), "out_index"),
    "out_index-list": (lambda c: _bad(c, out_index=c["out_index"].tolist()), "out_index"),
    "in_index-unsorted": (lambda c: _bad(c, in_index=c["in_index"].flip(0)), "in_index"),
    "in_index-range": (lambda c: _bad(c, in_index=c["in_index"] + IN), "in_index"),
    "in_index-bool": (lambda c: _bad(c, in_index=c["in_index"] > 3), "in_index"),
}


@pytest.mark.parametrize("bad", list(BAD_ARGUMENTS), ids=list(BAD_ARGUMENTS))
def test_bad_arguments_raise_value_error_naming_them(bad):
    make_bad, name = BAD_ARGUMENTS[bad]
    case = make_bad(make_case("cpu"))
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        masked_lora_linear(**case)
