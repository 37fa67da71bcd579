"""Command line: `agml unlearn | score | eval | bench` (also `python -m agml`).

User errors (AgmlError) print one line and exit with code 2; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from agml.errors import AgmlError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agml", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


# Each entry adds one subparser and sets `handler` (a function taking the parsed args).
_SUBCOMMANDS: list = []


def _add_model_arguments(p, default_model: str) -> None:
    p.add_argument("--model", default=default_model, help="built-in alias, local folder, .gguf file or hub id")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype (default: checkpoint's)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def _add_unlearn_parser(sub) -> None:
    from agml.pipeline import METHODS, UnlearnOptions

    defaults = UnlearnOptions(out="")
    p = sub.add_parser("unlearn", help="forget a concept: score neurons, train a masked LoRA, evaluate, report",
                       description="With no options: forget 'Inception' in the built-in SmolLM2-135M-Instruct.")
    p.add_argument("--out", help="run folder to create (default runs/<concept>)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--resume", metavar="RUN", help="continue the interrupted run RUN from its last checkpoint")
    p.add_argument("--concept", help="name of the concept to forget (forget set and probes from templates)")
    p.add_argument("--aliases", default="", help="comma-separated other names of the concept")
    _add_model_arguments(p, defaults.model)
    p.add_argument("--forget", help="forget prompts (JSONL); overrides the built-in/template forget set")
    p.add_argument("--retain", help="retain prompts (JSONL); replaces the built-in retain set")
    p.add_argument("--neighbours", help="extra retain prompts (JSONL) added to the retain set")
    p.add_argument("--probes", help="held-out probes (JSONL); never trained on")
    p.add_argument("--masks", help="neuron masks from `agml score` (masks.safetensors) instead of scoring here")
    p.add_argument("--method", choices=METHODS, default=defaults.method)
    p.add_argument("--objective", default=defaults.objective, help="npo | refusal | gradient-difference")
    p.add_argument("--density", type=float, default=defaults.density, help="fraction of all MLP neurons to adapt")
    p.add_argument("--strategy", choices=["global", "per-layer"], default=defaults.strategy)
    p.add_argument("--score", choices=["fisher", "saliency", "combined"], default=defaults.score)
    p.add_argument("--rank", type=int, default=defaults.rank)
    p.add_argument("--alpha", type=float, default=defaults.alpha)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--retain-weight", type=float, default=defaults.retain_weight)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="probe answer length")
    p.add_argument("--answer-tokens", type=int, default=defaults.answer_tokens,
                   help="length of the base answers used as training targets")
    p.add_argument("--early-stop", action="store_true",
                   help="stop once held-out forget prompts pass and retain KL is within budget")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help="steps between adapter checkpoints (for --resume)")
    p.set_defaults(handler=_cmd_unlearn)


def _unlearn_options(args):
    import dataclasses
    import json
    from pathlib import Path

    from agml import runs
    from agml.errors import InputError
    from agml.pipeline import UnlearnOptions

    if args.resume:
        config = runs.partial_dir(args.resume) / runs.CONFIG_FILE
        if not config.is_file():
            raise InputError(f"nothing to resume at {args.resume}: {config} not found")
        saved = json.loads(config.read_text(encoding="utf-8"))["options"]
        fields = {f.name for f in dataclasses.fields(UnlearnOptions)}
        saved = {k: (tuple(v) if k == "aliases" else v) for k, v in saved.items() if k in fields}
        return UnlearnOptions(**saved)
    concept = args.concept
    out = args.out or str(Path("runs") / _slug(concept or "inception"))
    return UnlearnOptions(
        out=out, concept=concept, aliases=tuple(a for a in args.aliases.split(",") if a.strip()),
        model=args.model, dtype=args.dtype, forget=args.forget, retain=args.retain, neighbours=args.neighbours,
        probes=args.probes, masks=args.masks, method=args.method, objective=args.objective, density=args.density,
        strategy=args.strategy, score=args.score, rank=args.rank, alpha=args.alpha, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, retain_weight=args.retain_weight, seed=args.seed,
        max_new_tokens=args.max_new_tokens, answer_tokens=args.answer_tokens, early_stop=args.early_stop,
        checkpoint_every=args.checkpoint_every, trust_remote_code=args.trust_remote_code,
    )


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "run"


def _cmd_unlearn(args) -> int:
    from agml.pipeline import run_unlearn

    options = _unlearn_options(args)
    from agml import distributed

    run = run_unlearn(options, force=args.force, resume=bool(args.resume))
    if distributed.is_main():
        print(f"run written to {run}; report: {run / 'report.md'}")
    return 0


_SUBCOMMANDS.append(_add_unlearn_parser)


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suite (pytest-benchmark) of a source checkout",
                       description="Ratios against baselines measured in the same run land in each case's extra_info.")
    p.add_argument("--full", action="store_true", help="include the full-size (gpu-marked) cases")
    p.add_argument("--json", metavar="OUT", help="write pytest-benchmark's JSON to OUT")
    p.add_argument("-k", dest="select", help="pytest -k expression to pick cases")
    p.set_defaults(handler=_cmd_bench)


def _cmd_bench(args) -> int:
    import subprocess
    from pathlib import Path

    from agml.errors import InputError

    suite = Path(__file__).resolve().parent.parent / "benchmarks"
    if not suite.is_dir():
        raise InputError(f"agml bench runs the benchmarks of a source checkout; {suite} not found")
    command = [sys.executable, "-m", "pytest", str(suite), "-q", "--benchmark-enable", "-p", "no:cacheprovider"]
    if not args.full:
        command += ["-m", "not gpu"]
    if args.json:
        command.append(f"--benchmark-json={args.json}")
    if args.select:
        command += ["-k", args.select]
    return subprocess.call(command)


_SUBCOMMANDS.append(_add_bench_parser)


def _add_score_parser(sub) -> None:
    p = sub.add_parser("score", help="score MLP neurons on forget vs retain answers and select the concept's neurons",
                       description="With no data options: the built-in model and the built-in Inception sets.")
    p.add_argument("--out", required=True, help="folder to create: scores.safetensors, masks.safetensors, plots/")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    _add_model_arguments(p, "smollm2-135m-instruct")
    p.add_argument("--forget", help="forget prompts (JSONL; default: built-in Inception forget set)")
    p.add_argument("--retain", help="retain prompts (JSONL; default: built-in Inception retain set)")
    p.add_argument("--density", type=float, default=0.01, help="fraction of all MLP neurons to select, in (0, 1]")
    p.add_argument("--strategy", choices=["global", "per-layer"], default="global")
    p.add_argument("--score", choices=["fisher", "saliency", "combined"], default="combined")
    p.add_argument("--retain-weight", type=float, default=1.0, help="weight of retain importance in the contrast")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of generated answers (records without one)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_score)


def _score_inputs(args):
    """Validate options and read the prompt sets (no model needed): (forget, retain) records."""
    from agml import runs
    from agml.data import load_prompts
    from agml.errors import InputError

    if not 0.0 < args.density <= 1.0:
        raise InputError(f"--density must be in (0, 1], got {args.density}")
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    if args.retain_weight < 0:
        raise InputError(f"--retain-weight must be >= 0, got {args.retain_weight}")
    runs.check_output(args.out, args.force)
    if args.forget is None or args.retain is None:
        from agml.concepts import builtin_inception

        builtin_forget, builtin_retain, _probes = builtin_inception()  # probes stay held out
    forget = builtin_forget if args.forget is None else load_prompts(args.forget, default_type="forget")
    retain = builtin_retain if args.retain is None else load_prompts(args.retain, default_type="retain")
    for name, records, kind in (("--forget", forget, "forget"), ("--retain", retain, "retain")):
        if not any(r.type == kind for r in records):
            raise InputError(f"{name} holds no records of type {kind!r}")
    return [r for r in forget if r.type == "forget"], [r for r in retain if r.type == "retain"]


def _cmd_score(args) -> int:
    import time
    from pathlib import Path

    import torch

    from agml import distributed, runs
    from agml.masks import build_masks
    from agml.models import load_model
    from agml.plots import plot_heatmap
    from agml.scoring import answer_records, score_records

    forget, retain = _score_inputs(args)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    forget = answer_records(model, tokenizer, forget, args.max_new_tokens, desc="forget answers")
    retain = answer_records(model, tokenizer, retain, args.max_new_tokens, desc="retain answers")
    scores = score_records(model, tokenizer, forget, retain, batch_size=args.batch_size)
    masks = build_masks(scores, density=args.density, strategy=args.strategy, score=args.score,
                        retain_weight=args.retain_weight)
    if not distributed.is_main():  # under accelerate launch every process scored its shard; one writes
        return 0
    work = runs.start_run(args.out)
    scores.save(work / "scores.safetensors")
    masks.save(work / "masks.safetensors")
    plot_heatmap(scores, masks, work / "plots" / "heatmap.png")
    out = runs.finish_run(work, args.out)
    busiest = sorted(masks.items(), key=lambda item: (-item[1].numel(), item[0]))[:5]
    print(f"scored {scores.forget_tokens} forget / {scores.retain_tokens} retain answer tokens over "
          f"{scores.num_layers} layers x {scores.intermediate_size} neurons in {time.perf_counter() - started:.1f}s")
    print(f"selected {masks.total} neurons ({args.score}, {args.strategy}) in {len(masks)} layers; most in: "
          + ", ".join(f"layer {layer}: {ids.numel()}" for layer, ids in busiest))
    print(f"written to {Path(out)}: scores.safetensors, masks.safetensors, plots/heatmap.png")
    return 0


_SUBCOMMANDS.append(_add_score_parser)


def _add_eval_parser(sub) -> None:
    from agml.relearn import DEFAULT_EXAMPLES, DEFAULT_LR

    p = sub.add_parser("eval", help="evaluate a run: forget/retain pass rates before and after, KL, fluency",
                       description="Answers every probe greedily with the run's adapter disabled (before) and "
                                   "active (after); optionally attacks the run by relearning.")
    p.add_argument("run", metavar="RUN", help="run folder written by agml unlearn")
    p.add_argument("--probes", help="probes (JSONL) to use instead of the run's held-out probes")
    p.add_argument("--json", metavar="OUT", help="also write the full result to OUT (JSON; replaced atomically)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length (greedy)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--relearn", type=int, metavar="STEPS",
                   help="relearning attack: fine-tune STEPS steps on a few forget answers, re-run the forget probes")
    p.add_argument("--relearn-lr", type=float, default=DEFAULT_LR, help="learning rate of the relearning attack")
    p.add_argument("--relearn-examples", type=int, default=DEFAULT_EXAMPLES,
                   help="how many forget answers the relearning attack trains on")
    p.add_argument("--seed", type=int, default=0, help="seed of the relearning attack")
    from agml.export import add_quantize_argument

    add_quantize_argument(p)
    p.set_defaults(handler=_cmd_eval)


def _eval_inputs(args):
    """Validate options, the run folder and the probes before loading any model: (config, probes, forget)."""
    from pathlib import Path

    from agml import runs
    from agml.data import load_prompts
    from agml.errors import InputError
    from agml.relearn import attack_slice

    checks = {"--max-new-tokens": args.max_new_tokens, "--batch-size": args.batch_size}
    if args.relearn is not None:
        checks.update({"--relearn": args.relearn, "--relearn-examples": args.relearn_examples})
        if not args.relearn_lr > 0:
            raise InputError(f"--relearn-lr must be > 0, got {args.relearn_lr}")
        from agml.fsdp import fsdp_requested

        if fsdp_requested():  # the attack merges the adapter into a copy of the whole model
            raise InputError("--relearn needs the whole model on one device; run it without FSDP "
                             "(plain `accelerate launch`, or a single process)")
    for flag, value in checks.items():
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    if args.json is not None:
        target = Path(args.json)
        if target.is_dir():
            raise InputError(f"--json {target} is a folder; give a file name")
        if not target.parent.is_dir():
            raise InputError(f"--json {target}: folder {target.parent} does not exist")
    config = runs.read_config(args.run)
    probes = load_prompts(args.probes) if args.probes else runs.load_records(Path(args.run), "probes")
    if not probes:
        raise InputError(f"{args.run} holds no probes ({runs.DATA_DIR}/probes.jsonl); pass --probes")
    forget = []
    if args.relearn is not None:
        forget = runs.load_records(Path(args.run), "forget") or []
        if not any(p.type == "forget" for p in probes):
            raise InputError("--relearn needs forget probes; the probe set has none")
        attack_slice(forget, probes, args.relearn_examples, args.seed)  # raises when nothing is left to train on
    return config, probes, forget


def _eval_concept_terms(config: dict) -> tuple[str, ...]:
    """The concept's name and aliases as the run resolved them (for the cloze metric)."""
    return tuple(config.get("concept", {}).get("terms", ()))


def _cmd_eval(args) -> int:
    from agml import distributed, runs
    from agml.evaluation import evaluate, format_summary

    config, probes, forget = _eval_inputs(args)
    if args.quantize is not None:
        from agml.export import quantized_eval_handler

        return quantized_eval_handler(args, probes)
    loaded = runs.load_run(args.run)
    result = evaluate(loaded.model, loaded.tokenizer, probes, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, concept_terms=_eval_concept_terms(config))
    if args.relearn is not None:
        from agml.relearn import relearn_attack

        result["relearn"] = relearn_attack(
            loaded.model, loaded.tokenizer, forget, probes, steps=args.relearn, lr=args.relearn_lr,
            n_examples=args.relearn_examples, seed=args.seed, max_new_tokens=args.max_new_tokens,
            eval_batch_size=args.batch_size,
        )
    if not distributed.is_main():  # every process answered its shard of the probes; one reports
        return 0
    print(format_summary(result))
    if args.json is not None:
        runs.write_json(args.json, result)
        print(f"written to {args.json}")
    return 0


_SUBCOMMANDS.append(_add_eval_parser)


def _add_export_parser(sub) -> None:
    from agml.export import add_export_parser

    add_export_parser(sub)


_SUBCOMMANDS.append(_add_export_parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "WORLD_SIZE" in os.environ:
        # Launched by accelerate/torchrun: join the process group before anything (transformers' loading
        # included) creates accelerate's process state without the CPU (gloo) setting.
        from agml import distributed

        distributed.state()
    try:
        return int(_run_handler(args))
    except AgmlError as err:
        if args.debug:
            traceback.print_exc()
        print(f"agml {args.command}{_process_label()}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"agml {args.command}{_process_label()}: interrupted", file=sys.stderr)
        return 130


def _run_handler(args) -> int:
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return args.handler(args) or 0
    # Under accelerate launch (torchrun): a crash is recorded so the launcher's summary, which ends the whole job,
    # names the failing process's exception instead of "error_file: <N/A>".
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(args.handler)(args) or 0


def _process_label() -> str:
    """' (process R of N)' under a multi-process launch, so each process's message says whose it is."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return f" (process {os.environ.get('RANK', '?')} of {size})" if size > 1 else ""


if __name__ == "__main__":
    raise SystemExit(main())
