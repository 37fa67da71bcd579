"""Full-size kernel checks and benchmarks for one GPU, one section per call, written as JSON (called by run.sh).

Sections, in run.sh's priority order:
  correctness   masked_lora_linear at full size with the production (autotuned) configs, each GEMM path forced in
                turn, against float64: output and every gradient, bf16 and fp16, every shape below
  masked        forward and forward+backward (base frozen) against F.linear (cuBLAS) and a PEFT-style dense LoRA;
                the Triton GEMM alone (HAS_LORA off) against cuBLAS; the GEMM path chosen per key
  neuron_stats  in-place accumulation against the measured device-to-device copy bandwidth and eager torch
  scoring       a whole scoring pass (`agml.scoring.score_neurons`) on a randomly initialised Qwen2.5-3B-shaped
                model against its plain forward+backward
`merge` joins the section files into one. `--dry-run` uses tiny sizes on whatever device there is (CPU: Triton
interpreter) so the whole script can be tried without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
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

from agml_kernels import NeuronStats, backend, linear_path_choices, prepare_masked_lora  # noqa: E402
from agml_kernels.masked_lora import _linear_lowrank_triton, masked_lora_linear  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "kernels"))
from kernel_formulas import TOLERANCE, masked_lora_f64, rel_err  # noqa: E402

DENSITIES = (0.005, 0.01, 0.02, 0.1)
GOAL_SHAPES = ("4096x11008-out", "11008x4096-in")  # the goal shapes: every density; others at 1% only
HEADLINE = {"shape": "4096x11008-out", "density": 0.01}


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
        return [("4096x11008-out", 64, 96, "out"), ("11008x4096-in", 96, 64, "in")]
    return [
        ("4096x11008-out", 4096, 11008, "out"),
        ("11008x4096-in", 11008, 4096, "in"),
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
        for density in DENSITIES if name in GOAL_SHAPES and not dry else (0.01,):
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
            peft_extra = row["peft_fwdbwd_ms"] - row["base_fwdbwd_ms"]
            row["lora_overhead_share"] = (row["masked_fwdbwd_ms"] - row["base_fwdbwd_ms"]) / peft_extra
            if density == 0.01:
                row.update(gemm_alone(ops, cuda, reps))
            rows.append(row)
            _on_row(row)
            print(json.dumps(row), flush=True)
            del ops
    return rows


def gemm_alone(ops: dict, cuda: bool, reps: int) -> dict:
    """The Triton GEMM with HAS_LORA off against cuBLAS, in the forward (x W^T) and backward-dx (dy W) layouts."""
    x, weight, dy = ops["x"].detach(), ops["weight"], ops["grad_out"]
    times = {
        "triton_gemm_fwd_ms": timer_ms(lambda: _linear_lowrank_triton(x, weight.t(), None, None, None, None, 1.0),
                                       cuda, reps),
        "cublas_gemm_fwd_ms": timer_ms(lambda: x @ weight.t(), cuda, reps),
        "triton_gemm_dx_ms": timer_ms(lambda: _linear_lowrank_triton(dy, weight, None, None, None, None, 1.0),
                                      cuda, reps),
        "cublas_gemm_dx_ms": timer_ms(lambda: dy @ weight, cuda, reps),
    }  # fmt: skip
    times["triton_over_cublas_fwd"] = times["triton_gemm_fwd_ms"] / times["cublas_gemm_fwd_ms"]
    times["triton_over_cublas_dx"] = times["triton_gemm_dx_ms"] / times["cublas_gemm_dx_ms"]
    return times


def correctness(device: str, dry: bool) -> list[dict]:
    """Every shape x {bf16, fp16} x {forced torch path, forced Triton path}: output and all five gradients."""
    tokens = 48 if dry else 8192
    rows = []
    for name, n_in, n_out, side in linear_shapes(dry):
        for dtype in (torch.bfloat16, torch.float16):
            case = LinearCase(n_in, n_out, side, 0.01, 16, tokens, dtype)
            ops = build_linear(case, device=device)
            args = {"x": ops["x"], "weight": ops["weight"].clone().requires_grad_(),
                    "bias": (torch.randn(n_out, device=device) * 0.1).to(dtype).requires_grad_(),
                    "lora_a": ops["lora_a"], "lora_b": ops["lora_b"], "scaling": ops["scaling"]}  # fmt: skip
            plan = prepare_masked_lora(ops["out_index"], ops["in_index"], n_out, n_in)
            leaves = ["x", "weight", "bias", "lora_a", "lora_b"]
            wide = {k: (v.detach().double().requires_grad_() if k in leaves else v) for k, v in args.items()}
            y64 = masked_lora_f64(**wide, out_index=plan["out_index"], in_index=plan["in_index"])
            grads64 = torch.autograd.grad(y64, [wide[k] for k in leaves], ops["grad_out"].double())
            for path in ("torch", "triton"):
                row = {"shape": name, "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "path": path,
                       "tolerance": TOLERANCE[dtype]}  # fmt: skip
                os.environ["AGML_LINEAR_PATH"] = path
                try:
                    y = masked_lora_linear(**args, **plan)
                    grads = torch.autograd.grad(y, [args[k] for k in leaves], ops["grad_out"])
                    errors = {"y": rel_err(y, y64), **{f"d{k}": rel_err(g, g64) for k, g, g64 in
                                                        zip(leaves, grads, grads64, strict=True)}}  # fmt: skip
                    row["ok"] = all(err < TOLERANCE[dtype] for err in errors.values())  # NaN fails too
                    row["rel_err"] = errors
                except Exception as err:  # noqa: BLE001 -- record it and go on to the next case
                    row.update(ok=False, error=f"{type(err).__name__}: {err}"[:1000])
                finally:
                    del os.environ["AGML_LINEAR_PATH"]
                rows.append(row)
                _on_row(row)
                print(json.dumps(row), flush=True)
            del ops, args, wide, y64, grads64
    return rows


def neuron_stats_rows(device: str, dry: bool, reps: int) -> list[dict]:
    cuda = device == "cuda"
    copy_bandwidth_gbs = ceilings(device, dry, reps)["copy_bandwidth_gbs"]
    rows = []
    shapes = [(48, 64)] if dry else [(8192, 4096), (8192, 11008)]
    for tokens, hidden in shapes:
        gen = torch.Generator().manual_seed(0)
        acts, grads = (torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16) for _ in range(2))
        all_tokens = torch.ones(tokens, dtype=torch.bool, device=device)
        stats = NeuronStats.zeros(hidden, device=device)
        kernel_ms = timer_ms(lambda a=acts, g=grads, m=all_tokens, s=stats: s.accumulate_(a, g, m), cuda, reps)
        eager_ms = timer_ms(lambda a=acts, g=grads, m=all_tokens: eager_neuron_stats(a, g, m), cuda, reps)
        read_bytes = 2 * acts.numel() * acts.element_size()
        bandwidth = read_bytes / kernel_ms / 1e6
        row = {"tokens": tokens, "hidden": hidden, "dtype": "bfloat16", "neuron_stats_ms": kernel_ms,
               "eager_ms": eager_ms, "bytes_read": read_bytes, "bandwidth_gbs": bandwidth,
               "copy_bandwidth_gbs": copy_bandwidth_gbs, "fraction_of_copy_bandwidth": bandwidth / copy_bandwidth_gbs,
               "neuron_stats_over_eager": kernel_ms / eager_ms}  # fmt: skip
        rows.append(row)
        _on_row(row)
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
    """The issue's goal ratios, from whichever sections finished."""
    out = {}
    masked = [r for r in result.get("masked", []) if r["shape"] == HEADLINE["shape"] and
              r["density"] == HEADLINE["density"]]  # fmt: skip
    if masked:
        row = masked[0]
        out.update({k: row[k] for k in ("masked_fwd_over_base_fwd", "masked_fwdbwd_over_base_fwdbwd",
                                         "masked_fwdbwd_over_peft_fwdbwd", "lora_overhead_share")})  # fmt: skip
    if result.get("neuron_stats"):
        out["neuron_stats_fraction_of_copy_bandwidth"] = min(r["fraction_of_copy_bandwidth"]
                                                             for r in result["neuron_stats"])  # fmt: skip
    if result.get("scoring"):
        out["scoring_over_plain_frozen"] = result["scoring"][0]["scoring_over_plain_frozen"]
    if result.get("correctness"):
        out["correctness_all_ok"] = all(r["ok"] for r in result["correctness"])
    return out


def _on_row(row: dict) -> None:
    """Called with every measured row; main() points it at a save of the section file."""


def environment(device: str) -> dict:
    from importlib.metadata import version

    return {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else f"none ({platform.processor() or 'cpu'})",
        "torch": torch.__version__,
        "triton": version("triton"),
        "peft": version("peft"),
        "cuda": torch.version.cuda,
        "backend": backend(),
    }


SECTIONS = ("correctness", "masked", "neuron_stats", "scoring", "merge")


def run_section(section: str, device: str, dry: bool, reps: int) -> list[dict]:
    if section == "correctness":
        return correctness(device, dry)
    if section == "masked":
        return masked_lora(device, dry, reps)
    if section == "neuron_stats":
        return neuron_stats_rows(device, dry, reps)
    result = scoring_pass(device, dry, reps)
    _on_row(result)
    return [result]


def merge(out_dir: Path) -> dict:
    """One JSON of every section file present, with the goal ratios on top."""
    result: dict = {}
    for section in SECTIONS[:-1]:
        path = out_dir / f"h200-{section}.json"
        if path.exists():
            part = json.loads(path.read_text())
            result.setdefault("environment", part["environment"])
            result[section] = part["rows"]
            if section == "masked":
                result["linear_path_choices"] = part.get("linear_path_choices", [])
    return {"goals": headline(result), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="+", choices=SECTIONS, help="run in this order (run.sh: one per process)")
    parser.add_argument("--out-dir", type=Path, required=True, help="writes h200-<section>.json (merge: h200.json)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, any device: checks the script runs")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per point (ms)")
    args = parser.parse_args()
    for section in args.sections:
        run_one(section, args.out_dir, args.dry_run, args.rep_ms)


def run_one(section: str, out_dir: Path, dry: bool, reps: int) -> None:
    if section == "merge":
        merged = merge(out_dir)
        (out_dir / "h200.json").write_text(json.dumps(merged, indent=2) + "\n")
        print(json.dumps(merged["goals"], indent=2))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows: list[dict] = []
    part = {"dry_run": dry, "environment": environment(device), "rows": rows}
    path = out_dir / f"h200-{section}.json"

    def save(row: dict) -> None:  # after every row, so a timeout still leaves what was measured
        rows.append(row)
        part["linear_path_choices"] = linear_path_choices()
        path.write_text(json.dumps(part, indent=2) + "\n")

    global _on_row
    _on_row = save
    run_section(section, device, dry, reps)


if __name__ == "__main__":
    main()
