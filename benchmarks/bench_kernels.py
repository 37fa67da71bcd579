"""Kernel benchmarks (pytest-benchmark): masked_lora_linear and neuron_stats against their baselines.

masked_lora_linear, base weight frozen, forward ("fwd", no grad) and forward+backward ("fwdbwd"), against
  base        F.linear alone: the floor
  peft        peft.tuners.lora.Linear at the same rank, unmasked: what users run today
  dense_mask  a naive composition: full-size A and B multiplied by 0/1 neuron masks
neuron_stats against the eager torch a user would write (boolean-select tokens, upcast, square, sum).

Each `masked` case also times every implementation round-robin in the same run (medians), so its extra_info holds
ratios measured under the same conditions: `masked_over_base`, `masked_over_peft`, `masked_over_dense_mask`.
Cases marked `gpu` are full size; `pytest benchmarks -m "not gpu" --benchmark-enable` is the CPU subset.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from agml_kernels import backend, masked_lora_linear, neuron_stats, prepare_masked_lora

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ("masked", "base", "peft", "dense_mask")


@dataclass(frozen=True)
class LinearCase:
    """One masked linear: the LoRA writes `density` of the outputs ("out") or reads that of the inputs ("in")."""

    in_features: int
    out_features: int
    side: str
    density: float
    rank: int
    tokens: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        shape = f"{self.in_features}x{self.out_features}-{self.side}"
        return f"{shape}-d{self.density:g}-r{self.rank}-t{self.tokens}-{dtype}"


def build_linear(case: LinearCase, device: str = DEVICE, seed: int = 0) -> dict:
    """Operands for every implementation of one case (frozen base, trainable LoRA, input that needs grad)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=case.dtype)

    n_in, n_out = case.in_features, case.out_features
    size = n_out if case.side == "out" else n_in
    k = max(1, round(case.density * size))
    index = torch.randperm(size, generator=gen)[:k].sort().values.to(device)
    out_index = index if case.side == "out" else None
    in_index = index if case.side == "in" else None
    weight = rand(n_out, n_in, scale=n_in**-0.5)
    lora_a = rand(case.rank, k if in_index is not None else n_in, scale=n_in**-0.5).requires_grad_()
    lora_b = rand(k if out_index is not None else n_out, case.rank, scale=0.1).requires_grad_()
    scaling = 2.0
    # Dense-mask baseline: full-size factors, neuron masks applied by multiplication.
    in_mask = torch.zeros(n_in, device=device, dtype=case.dtype)
    out_mask = torch.zeros(n_out, device=device, dtype=case.dtype)
    (in_mask if in_index is not None else out_mask).index_fill_(0, index, 1.0)
    (out_mask if in_index is not None else in_mask).fill_(1.0)
    dense_a = rand(case.rank, n_in, scale=n_in**-0.5).requires_grad_()
    dense_b = rand(n_out, case.rank, scale=0.1).requires_grad_()
    return {
        "x": rand(case.tokens, n_in).requires_grad_(),
        "grad_out": rand(case.tokens, n_out),
        "weight": weight,
        "lora_a": lora_a,
        "lora_b": lora_b,
        "scaling": scaling,
        "out_index": out_index,
        "in_index": in_index,
        "in_mask": in_mask,
        "out_mask": out_mask,
        "dense_a": dense_a,
        "dense_b": dense_b,
        "peft": peft_linear(weight, case.rank, scaling),
        # Validated once with positions precomputed, as a layer does when it builds the adapter.
        "plan": prepare_masked_lora(out_index, in_index, n_out, n_in),
    }


def peft_linear(weight: torch.Tensor, rank: int, scaling: float) -> torch.nn.Module:
    """PEFT's LoRA Linear around a frozen nn.Linear holding `weight` (B non-zero, as after some training)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    base = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    base.weight.data.copy_(weight)
    base.weight.requires_grad_(False)
    alpha = scaling * rank
    layer = LoraLinear(base, "default", config=LoraConfig(r=rank, lora_alpha=alpha), r=rank, lora_alpha=alpha)
    layer.to(device=weight.device, dtype=weight.dtype)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    return layer


def linear_forward(impl: str, ops: dict) -> Callable[[], torch.Tensor]:
    x = ops["x"]

    def dense_mask() -> torch.Tensor:
        lora = ((x * ops["in_mask"]) @ ops["dense_a"].t()) @ (ops["dense_b"] * ops["out_mask"][:, None]).t()
        return F.linear(x, ops["weight"]) + ops["scaling"] * lora

    forwards = {
        "masked": lambda: masked_lora_linear(x, ops["weight"], None, ops["lora_a"], ops["lora_b"], ops["scaling"],
                                             **ops["plan"]),
        "base": lambda: F.linear(x, ops["weight"]),
        "peft": lambda: ops["peft"](x),
        "dense_mask": dense_mask,
    }
    return forwards[impl]


def step(impl: str, mode: str, ops: dict) -> Callable[[], None]:
    """One timed call: forward without grad ("fwd") or forward and backward ("fwdbwd"), synchronised on CUDA."""
    forward = linear_forward(impl, ops)
    sync = torch.cuda.synchronize if ops["x"].is_cuda else (lambda: None)

    def fwd() -> None:
        with torch.no_grad():
            forward()
        sync()

    leaves = [ops[name] for name in ("x", "lora_a", "lora_b", "dense_a", "dense_b")]
    leaves += [p for p in ops["peft"].parameters() if p.requires_grad]

    def fwdbwd() -> None:
        forward().backward(ops["grad_out"])
        sync()
        for leaf in leaves:  # no gradient accumulation: every call does the same work
            leaf.grad = None

    return fwd if mode == "fwd" else fwdbwd


def interleaved_medians(calls: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds per call, timing the calls round-robin so that machine load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()  # warm-up (and Triton autotuning)
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def ratios(medians: dict[str, float]) -> dict[str, float]:
    return {f"masked_over_{name}": medians["masked"] / medians[name] for name in medians if name != "masked"}


# --- cases ---------------------------------------------------------------------------------------------------------

GOAL_SHAPES = [(1024, 4096, "out"), (4096, 1024, "in")]  # the CPU goals: 2048 tokens, r=16, 1%, fp32
MLP_SHAPES = [(576, 1536), (2048, 11008), (4096, 4096)]  # SmolLM2, Qwen2.5-3B, square


def _cpu_cases() -> list[LinearCase]:
    goals = [LinearCase(i, o, side, 0.01, 16, 2048, torch.float32) for i, o, side in GOAL_SHAPES]
    smol = [LinearCase(576, 1536, "out", 0.01, 16, 512, torch.float32), LinearCase(1536, 576, "in", 0.01, 16, 512,
                                                                                    torch.float32)]  # fmt: skip
    return goals + smol


def _gpu_cases() -> list[LinearCase]:
    cases = []
    for n_in, n_out in MLP_SHAPES:
        for i, o, side in ((n_in, n_out, "out"), (n_out, n_in, "in")):
            cases += [LinearCase(i, o, side, d, 16, 8192, torch.bfloat16) for d in (0.005, 0.01, 0.02, 0.1)]
            cases += [LinearCase(i, o, side, 0.01, r, 8192, torch.bfloat16) for r in (8, 64)]
    return cases


def _params(cases: list[LinearCase], gpu: bool) -> list:
    marks = [pytest.mark.gpu] if gpu else []
    return [pytest.param(case, id=case.label, marks=marks) for case in cases]


LINEAR_PARAMS = _params(_cpu_cases(), gpu=False) + _params(_gpu_cases(), gpu=True)


# On CPU only the `masked` rows are timed on their own: their extra_info already holds every baseline's median.
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", IMPLS if DEVICE == "cuda" else IMPLS[:1])
@pytest.mark.parametrize("case", LINEAR_PARAMS)
def test_masked_lora_linear(benchmark, case: LinearCase, impl: str, mode: str) -> None:
    ops = build_linear(case)
    rounds = 3 if DEVICE == "cpu" else 20
    benchmark.group = f"masked_lora_linear {case.label} {mode}"
    benchmark.extra_info.update({"case": case.label, "impl": impl, "mode": mode, "backend": backend()})
    if impl == "masked":
        medians = interleaved_medians({name: step(name, mode, ops) for name in IMPLS}, rounds=rounds)
        benchmark.extra_info["interleaved_median_s"] = medians
        benchmark.extra_info.update(ratios(medians))
    benchmark.pedantic(step(impl, mode, ops), rounds=rounds, warmup_rounds=1)


def eager_neuron_stats(acts: torch.Tensor, grads: torch.Tensor, token_mask: torch.Tensor) -> tuple:
    """What one writes without the kernel: select tokens, upcast, square, sum."""
    keep = token_mask.reshape(-1).bool()
    a = acts.reshape(-1, acts.shape[-1])[keep].float()
    g = grads.reshape(-1, grads.shape[-1])[keep].float()
    return (g * g).sum(0), (a * g).abs().sum(0), int(keep.sum())


NEURON_CASES = [
    pytest.param(2048, 1536, torch.float32, id="t2048-h1536-float32"),
    pytest.param(2048, 1536, torch.bfloat16, id="t2048-h1536-bfloat16"),
    pytest.param(8192, 11008, torch.bfloat16, id="t8192-h11008-bfloat16", marks=pytest.mark.gpu),
    pytest.param(8192, 4096, torch.bfloat16, id="t8192-h4096-bfloat16", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("impl", ["neuron_stats", "eager"])
@pytest.mark.parametrize("tokens, hidden, dtype", NEURON_CASES)
def test_neuron_stats(benchmark, tokens: int, hidden: int, dtype: torch.dtype, impl: str) -> None:
    gen = torch.Generator().manual_seed(0)
    acts, grads = (torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype) for _ in range(2))
    mask = (torch.rand(tokens, generator=gen) > 0.5).to(DEVICE)  # answer tokens only, as in scoring
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    calls = {
        "neuron_stats": lambda: (neuron_stats(acts, grads, mask), sync()),
        "eager": lambda: (eager_neuron_stats(acts, grads, mask), sync()),
    }
    benchmark.group = f"neuron_stats t{tokens} h{hidden} {dtype}"
    benchmark.extra_info.update({"impl": impl, "backend": backend()})
    if impl == "neuron_stats":
        medians = interleaved_medians(calls, rounds=7)
        benchmark.extra_info["interleaved_median_s"] = medians
        benchmark.extra_info["neuron_stats_over_eager"] = medians["neuron_stats"] / medians["eager"]
    benchmark.pedantic(calls[impl], rounds=7, warmup_rounds=1)
