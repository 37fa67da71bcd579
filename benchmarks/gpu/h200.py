"""Full-size kernel benchmarks for one GPU, written as JSON (called by run.sh).

Measures the ceilings (device-to-device copy bandwidth, bf16 GEMM rate), then masked_lora_linear forward and
forward+backward (base frozen) against F.linear and PEFT's LoRA Linear, neuron_stats against eager torch and the
copy bandwidth, and a whole scoring pass (`agml.scoring.score_neurons`) on a randomly initialised
Qwen2.5-3B-shaped model against its plain forward+backward. `--dry-run` uses tiny sizes on whatever device there
is (CPU: Triton interpreter) so the whole script can be tried without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: shared case builders

from bench_kernels import LinearCase, build_linear, eager_neuron_stats, step  # noqa: E402
from bench_scoring import MODES, interleaved_times, run_pass  # noqa: E402

from agml_kernels import backend, neuron_stats  # noqa: E402

DENSITIES = (0.005, 0.01, 0.02, 0.1)
HEADLINE = {"shape": "4096x4096-out", "density": 0.01}


def timer_ms(fn: Callable[[], object], cuda: bool, reps: int) -> float:
    """Median milliseconds: triton.testing.do_bench on CUDA (flushes L2 between calls), perf_counter elsewhere."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def ceilings(device: str, dry: bool, reps: int) -> dict:
    cuda = device == "cuda"
    n_bytes = (1 << 16) if dry else (1 << 30)
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = timer_ms(lambda: dst.copy_(src), cuda, reps)
    n = 256 if dry else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    gemm_ms = timer_ms(lambda: a @ b, cuda, reps)
    return {
        "copy_bytes": n_bytes,
        "copy_ms": copy_ms,
        "copy_bandwidth_gbs": 2 * n_bytes / copy_ms / 1e6,  # read + write
        "gemm_n": n,
        "gemm_ms": gemm_ms,
        "gemm_bf16_tflops": 2 * n**3 / gemm_ms / 1e9,
    }


def linear_shapes(dry: bool) -> list[tuple[str, int, int, str]]:
    if dry:
        return [("4096x4096-out", 64, 96, "out"), ("4096x4096-in", 96, 64, "in")]
    return [
        ("4096x4096-out", 4096, 4096, "out"),
        ("4096x4096-in", 4096, 4096, "in"),
        ("2048x11008-out", 2048, 11008, "out"),
        ("11008x2048-in", 11008, 2048, "in"),
    ]


def masked_lora(device: str, dry: bool, reps: int) -> list[dict]:
    """Times per shape: base and PEFT once, masked per density; ratios against the same-run baselines."""
    cuda = device == "cuda"
    tokens = 48 if dry else 8192
    rows = []
    for name, n_in, n_out, side in linear_shapes(dry):
        baselines = {}
        for density in DENSITIES:
            case = LinearCase(n_in, n_out, side, density, 16, tokens, torch.bfloat16)
            ops = build_linear(case, device=device)
            if not baselines:
                baselines = {f"{impl}_{mode}_ms": timer_ms(step(impl, mode, ops), cuda, reps)
                             for impl in ("base", "peft") for mode in ("fwd", "fwdbwd")}  # fmt: skip
            row = {"shape": name, "in_features": n_in, "out_features": n_out, "side": side, "density": density,
                   "rank": 16, "tokens": tokens, "dtype": "bfloat16", **baselines}  # fmt: skip
            for mode in ("fwd", "fwdbwd"):
                row[f"masked_{mode}_ms"] = timer_ms(step("masked", mode, ops), cuda, reps)
            row["masked_fwd_over_base_fwd"] = row["masked_fwd_ms"] / row["base_fwd_ms"]
            row["masked_fwdbwd_over_base_fwdbwd"] = row["masked_fwdbwd_ms"] / row["base_fwdbwd_ms"]
            row["masked_fwdbwd_over_peft_fwdbwd"] = row["masked_fwdbwd_ms"] / row["peft_fwdbwd_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del ops
    return rows


def neuron_stats_rows(device: str, dry: bool, reps: int, copy_bandwidth_gbs: float) -> list[dict]:
    cuda = device == "cuda"
    rows = []
    shapes = [(48, 64)] if dry else [(8192, 4096), (8192, 11008)]
    for tokens, hidden in shapes:
        gen = torch.Generator().manual_seed(0)
        acts, grads = (torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16) for _ in range(2))
        all_tokens = torch.ones(tokens, dtype=torch.bool, device=device)
        kernel_ms = timer_ms(lambda a=acts, g=grads: neuron_stats(a, g), cuda, reps)
        eager_ms = timer_ms(lambda a=acts, g=grads, m=all_tokens: eager_neuron_stats(a, g, m), cuda, reps)
        read_bytes = 2 * acts.numel() * acts.element_size()
        bandwidth = read_bytes / kernel_ms / 1e6
        row = {"tokens": tokens, "hidden": hidden, "dtype": "bfloat16", "neuron_stats_ms": kernel_ms,
               "eager_ms": eager_ms, "bytes_read": read_bytes, "bandwidth_gbs": bandwidth,
               "fraction_of_copy_bandwidth": bandwidth / copy_bandwidth_gbs,
               "neuron_stats_over_eager": kernel_ms / eager_ms}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# Qwen2.5-3B-Instruct's published shape; random weights (nothing can be downloaded on the GPU machine).
QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, tie_word_embeddings=True)


def scoring_batches(vocab: int, rows: int, length: int, device: str) -> list[dict]:
    """One batch of random token ids whose second half is the answer (labelled), as agml.data.collate builds."""
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (rows, length), generator=gen)
    labels = input_ids.clone()
    labels[:, : length // 2] = -100
    return [{"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
             "labels": labels.to(device)}]  # fmt: skip


def peak_above_resting_mib(mode: str, model, splits) -> float:
    """CUDA memory one run of `mode` allocates at its peak, above what was allocated before it (the weights)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resting = torch.cuda.memory_allocated()
    run_pass(mode, model, splits)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - resting) / 2**20


def scoring_pass(device: str, dry: bool, reps: int) -> dict:
    """Scoring pass vs plain forward+backward (frozen; and with parameter gradients), median of interleaved rounds.

    Forget and retain are one batch each (8 x 512 tokens, 256 answer tokens per row), so one run is two passes.
    """
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape, rows, length = (TINY, 2, 32) if dry else (QWEN25_3B, 8, 512)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=torch.bfloat16)
    model.eval()
    splits = (scoring_batches(shape["vocab_size"], rows, length, device),
              scoring_batches(shape["vocab_size"], rows, length, device))  # fmt: skip
    rounds = 3 if dry else max(5, reps // 20)
    medians = {mode: seconds * 1e3 for mode, seconds in interleaved_times(model, splits, rounds).items()}
    peaks = {mode: peak_above_resting_mib(mode, model, splits) for mode in MODES} if device == "cuda" else {}
    result = {"model_shape": "Qwen2.5-3B" if not dry else "tiny", "parameters": sum(p.numel() for p in
              model.parameters()), "rows": rows, "length": length, "passes": 2, "rounds": rounds,
              **{f"{mode}_median_ms": value for mode, value in medians.items()},
              **{f"{mode}_peak_above_weights_mib": value for mode, value in peaks.items()},
              "scoring_over_plain_frozen": medians["scoring"] / medians["plain-frozen"],
              "scoring_over_plain_params": medians["scoring"] / medians["plain-params"]}  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


def headline(result: dict) -> dict:
    masked = next(r for r in result["masked_lora_linear"]
                  if r["shape"] == HEADLINE["shape"] and r["density"] == HEADLINE["density"])  # fmt: skip
    stats = result["neuron_stats"][0]
    return {
        "masked_fwd_over_base_fwd": masked["masked_fwd_over_base_fwd"],
        "masked_fwdbwd_over_base_fwdbwd": masked["masked_fwdbwd_over_base_fwdbwd"],
        "masked_fwdbwd_over_peft_fwdbwd": masked["masked_fwdbwd_over_peft_fwdbwd"],
        "neuron_stats_fraction_of_copy_bandwidth": stats["fraction_of_copy_bandwidth"],
    }


def environment(device: str) -> dict:
    import peft
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else f"none ({platform.processor() or 'cpu'})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "peft": peft.__version__,
        "cuda": torch.version.cuda,
        "backend": backend(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, any device: checks the script runs")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per point (ms)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"dry_run": args.dry_run, **environment(device), "headline_case": {**HEADLINE, "tokens": 8192,
                    "rank": 16, "dtype": "bfloat16"}}  # fmt: skip

    def save() -> None:  # after every section, so a timeout still leaves what was measured
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    result["ceilings"] = ceilings(device, args.dry_run, args.rep_ms)
    save()
    result["neuron_stats"] = neuron_stats_rows(device, args.dry_run, args.rep_ms,
                                               result["ceilings"]["copy_bandwidth_gbs"])  # fmt: skip
    save()
    result["masked_lora_linear"] = masked_lora(device, args.dry_run, args.rep_ms)
    result.update(headline(result))
    save()
    result["scoring_pass"] = scoring_pass(device, args.dry_run, args.rep_ms)
    save()
    print(json.dumps({k: result[k] for k in headline(result)}, indent=2))


if __name__ == "__main__":
    main()
