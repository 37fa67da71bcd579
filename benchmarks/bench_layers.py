"""One CPU training step of a SmolLM2-135M-shaped model: masked LoRA at 1% density vs PEFT LoRA.

Run: .venv/bin/pytest -q benchmarks/bench_layers.py --benchmark-enable
The model is built from config with random weights (no download), batch 4 x 128 tokens,
rank 8 on gate/up/down of every layer for LoRA, of the masked neurons only for agml.

Step time: pytest-benchmark (1 warm-up step, then 2 timed steps: forward + backward + AdamW).
Peak memory: tracemalloc does not see torch's CPU allocator, and the process RSS high-water mark
mostly measured malloc slack (it varied by hundreds of MiB between identical runs), so one more
step runs under torch.profiler(profile_memory=True) and the benchmark reports the high-water mark
of the bytes torch allocated during that step ("Total Allocated" of the profiler's memory
events). That is activations, gradients and temporaries; the model and the AdamW state already
exist before the step and are not counted.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from agml.layers import apply_lora, apply_masked_lora, trainable_parameter_count
from agml.masks import NeuronMasks

METHODS = ("lora", "ag-masked-lora")
DENSITY = 0.01
RANK = 8
BATCH, SEQ = 4, 128
SMOL_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
_RESULTS: dict[str, dict[str, float]] = {}


def random_masks(config: LlamaConfig, density: float, seed: int = 0) -> NeuronMasks:
    """The same number of random neurons in every layer (1% of 1536 -> 15)."""
    generator = torch.Generator().manual_seed(seed)
    per_layer = max(1, round(density * config.intermediate_size))
    return NeuronMasks(
        {
            layer: torch.randperm(config.intermediate_size, generator=generator)[:per_layer].sort().values
            for layer in range(config.num_hidden_layers)
        }
    )


def build(method: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    config = LlamaConfig(**SMOL_SHAPE)
    model = LlamaForCausalLM(config)
    if method == "lora":
        model = apply_lora(model, r=RANK, alpha=2 * RANK)
    else:
        model = apply_masked_lora(model, random_masks(config, DENSITY), r=RANK, alpha=2 * RANK)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return model, optimizer, batch


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_peak_mib(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    """High-water mark of torch CPU allocations during one training step, in MiB."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, optimizer, batch)
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not memory:
        raise RuntimeError("torch.profiler recorded no memory events")
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return (max(e["args"]["Total Allocated"] for e in memory) - start) / 2**20


@pytest.mark.parametrize("method", METHODS)
def test_train_step(benchmark, method):
    model, optimizer, batch = build(method)
    benchmark.pedantic(train_step, args=(model, optimizer, batch), rounds=2, warmup_rounds=1, iterations=1)
    peak_mib = step_peak_mib(model, optimizer, batch)
    info = {
        "method": method,
        "density": DENSITY if method != "lora" else 1.0,
        "rank": RANK,
        "batch_tokens": BATCH * SEQ,
        "trainable_params": trainable_parameter_count(model),
        "memory_method": "torch.profiler profile_memory: peak bytes allocated during one step (after warm-up)",
        "step_peak_alloc_mib": peak_mib,
    }
    if benchmark.stats is not None:  # None under --benchmark-disable
        _RESULTS[method] = {
            "median_s": benchmark.stats.stats.median,
            "step_peak_alloc_mib": peak_mib,
            "params": info["trainable_params"],
        }
        info["step_median_s"] = benchmark.stats.stats.median
    if method != "lora" and "lora" in _RESULTS and method in _RESULTS:
        ours, lora = _RESULTS[method], _RESULTS["lora"]
        info["step_time_ratio_vs_lora"] = ours["median_s"] / lora["median_s"]
        info["step_peak_alloc_ratio_vs_lora"] = ours["step_peak_alloc_mib"] / lora["step_peak_alloc_mib"]
        info["trainable_params_ratio_vs_lora"] = ours["params"] / lora["params"]
    benchmark.extra_info.update(info)
    print(json.dumps(info))
