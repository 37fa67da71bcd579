"""Command line: `agml unlearn | score | eval | bench` (also `python -m agml`).

User errors (AgmlError) print one line and exit with code 2; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback

from agml.errors import AgmlError

EXIT_USAGE = 2
EXIT_STORAGE = 1
# Storage failures a user can fix (free space, quota, a read-only or forbidden folder): one line, not a traceback.
STORAGE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agml", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


# Each entry adds one subparser and sets `handler` (a function taking the parsed args).
_SUBCOMMANDS: list = []


def _score_settings() -> tuple[str, ...]:
    """Settings `agml score` takes: the data, the model and every mask setting (as `agml unlearn` builds masks)."""
    from agml.options import leaf_fields

    data_and_model = ("concept", "aliases", "model", "dtype", "trust_remote_code", "forget", "retain", "neighbours",
                      "answer_tokens", "forbidden", "neighbour_names", "descriptions", "entities")
    mask = tuple(name for name, (part, _) in leaf_fields().items() if part == "mask")
    return (*data_and_model, *mask, "seed")


def _add_option_flags(p, names) -> None:
    """One flag per setting, with the type, choices, help and default of its field in `agml.options`.

    Defaults stay out of the parsed namespace (argparse.SUPPRESS), so that only the flags given on the command
    line override the settings of a --config file.
    """
    from agml.options import UnlearnOptions, leaf_fields

    defaults = UnlearnOptions().to_dict()
    fields = leaf_fields()
    for name in names:
        _, f = fields[name]
        default = defaults[name]
        shown = "" if default in (None, False, ()) or "default" in f.metadata["help"] else f" (default: {default})"
        kwargs = {"dest": name, "default": argparse.SUPPRESS, "help": f.metadata["help"] + shown}
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = str if default is None or f.metadata.get("csv") else type(default)
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        p.add_argument("--" + name.replace("_", "-"), **kwargs)


def _settings_from_args(args, names) -> dict:
    """{setting: value} of the --config file (if any) with the flags given on the command line on top."""
    from agml.options import read_options_file

    settings = read_options_file(args.config) if getattr(args, "config", None) else {}
    for name in names:
        if hasattr(args, name):  # list settings given as one string are split by agml.options
            settings[name] = getattr(args, name)
    return settings


def _unlearn_settings() -> list[str]:
    from agml.options import leaf_fields

    return [name for name, (_, f) in leaf_fields().items() if f.metadata.get("cli", True)]


def _add_unlearn_parser(sub) -> None:
    p = sub.add_parser("unlearn", help="forget a concept: score neurons, train a masked LoRA, evaluate, report",
                       description="With no options: forget 'Inception' in the built-in SmolLM2-135M-Instruct.")
    p.add_argument("--config", metavar="FILE", help="settings from a YAML or JSON file (a run's config.json "
                                                   "works too); flags given here override it")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--resume", metavar="RUN", help="continue the interrupted run RUN from its last checkpoint")
    _add_option_flags(p, _unlearn_settings())
    p.add_argument("--retain-weight", type=float, dest="legacy_retain_weight", metavar="W",
                   help="deprecated name of --kl-weight")
    p.set_defaults(handler=_cmd_unlearn)


def _unlearn_options(args):
    from pathlib import Path

    from agml.options import build_options
    from agml.resume import resumable_options

    settings = _settings_from_args(args, _unlearn_settings())
    if args.legacy_retain_weight is not None:
        print("agml unlearn: note: --retain-weight is now --kl-weight (the training KL weight); the mask contrast "
              "weight is --mask-retain-weight", file=sys.stderr)
        settings.setdefault("kl_weight", args.legacy_retain_weight)
    if args.resume:  # the saved settings; any given here must agree with them
        return resumable_options(args.resume, settings, force=args.force)
    if settings.get("out") is None:
        settings["out"] = str(Path("runs") / _slug(settings.get("concept") or "inception"))
    return build_options(settings)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "run"


def _cmd_unlearn(args) -> int:
    from agml import distributed, ownership, preflight, run_lock
    from agml.pipeline import run_unlearn

    options = _unlearn_options(args)
    resume = bool(args.resume)
    if not resume:
        preflight.check_out_path(options.out)
    # One writer per run; a start that fails before training leaves nothing behind (see docs/reliability.md).
    with run_lock.exclusive_run(options.out, distributed.is_main()), \
            ownership.discard_failed_start(options.out, resume, distributed.is_main()):
        preflight.check_unlearn(options, force=args.force, resume=resume)
        run = run_unlearn(options, force=args.force, resume=resume)
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
                       description="With no data options: the built-in model and the built-in Inception sets. "
                                   "Masks are built exactly as `agml unlearn` builds them with the same settings.")
    p.add_argument("--out", required=True, help="folder to create: scores.safetensors, masks.safetensors, plots/")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--config", metavar="FILE", help="settings from a YAML or JSON file; flags given here override it")
    _add_option_flags(p, _score_settings())
    p.add_argument("--max-new-tokens", type=int, dest="answer_tokens", default=argparse.SUPPRESS,
                   help="older name of --answer-tokens")
    p.add_argument("--batch-size", type=int, dest="score_batch_size", default=argparse.SUPPRESS,
                   help="older name of --score-batch-size")
    p.add_argument("--retain-weight", type=float, dest="legacy_retain_weight", help=argparse.SUPPRESS)
    p.set_defaults(handler=_cmd_score)


def _score_options(args):
    from agml.errors import InputError
    from agml.options import build_options

    if args.legacy_retain_weight is not None:
        raise InputError("--retain-weight is gone from agml score: the mask contrast weight is --mask-retain-weight "
                         "(the same setting `agml unlearn` builds its masks with)")
    settings = _settings_from_args(args, _score_settings())
    settings["out"] = args.out
    options = build_options(settings)
    return options


def _cmd_score(args) -> int:
    from agml import distributed, preflight, run_lock
    from agml.pipeline import run_score

    options = _score_options(args)
    preflight.check_out_path(options.out)
    with run_lock.exclusive_run(options.out, distributed.is_main()):
        preflight.check_model_files(options.model)
        run_score(options, force=args.force)
    return 0


_SUBCOMMANDS.append(_add_score_parser)


def _add_eval_parser(sub) -> None:
    from agml.options import EvalOptions
    from agml.relearn import DEFAULT_EXAMPLES, DEFAULT_FULL_LR, DEFAULT_LR, VARIANTS

    p = sub.add_parser("eval", help="evaluate a run: forget/retain pass rates before and after, KL, fluency",
                       description="Answers every probe greedily with the run's adapter disabled (before) and "
                                   "active (after); optionally attacks the run by relearning.")
    p.add_argument("run", metavar="RUN", help="run folder written by agml unlearn")
    p.add_argument("--probes", help="probes (JSONL) to use instead of the run's held-out probes")
    p.add_argument("--json", metavar="OUT", help="also write the full result to OUT (JSON; replaced atomically)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length (greedy)")
    p.add_argument("--batch-size", type=int, default=EvalOptions().eval_batch_size,
                   help="probes answered (and scored) per batch")
    p.add_argument("--samples", type=int, default=0, metavar="N",
                   help="best-of-N sampling (temperature 0.7, seeded): a forget probe leaks if any sample leaks")
    p.add_argument("--noise-floor", type=int, default=0, metavar="SEEDS",
                   help="retain flips under SEEDS random adapters of the trained one's size, sparsity and norm")
    p.add_argument("--skip-capability", "--no-capability", dest="no_capability", action="store_true",
                   help="skip general-knowledge accuracy and neutral-text perplexity (agml unlearn's flag; "
                        "--no-capability is its older name here)")
    p.add_argument("--lm-eval", metavar="TASKS",
                   help="comma-separated lm-eval tasks (e.g. agml_general_knowledge), adapter on and off "
                        "(pip install agml[lm-eval])")
    p.add_argument("--relearn", type=int, metavar="STEPS",
                   help="relearning attack: fine-tune STEPS steps on facts the probes do not ask, re-run the "
                        "forget probes (the base model is attacked too, as the control)")
    p.add_argument("--relearn-variant", choices=VARIANTS, default="lora",
                   help="attacker: a fresh LoRA (lora) or every weight (full)")
    p.add_argument("--relearn-data", metavar="PATH",
                   help="attack data (JSONL with answers; default: the shipped <concept>_relearn.jsonl, else the "
                        "run's forget records)")
    p.add_argument("--relearn-lr", type=float, default=None,
                   help=f"attack learning rate (default {DEFAULT_LR:g} for lora, {DEFAULT_FULL_LR:g} for full)")
    p.add_argument("--relearn-examples", type=int, default=DEFAULT_EXAMPLES,
                   help="how many attack records the relearning attack trains on")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling and of the relearning attack")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="evaluate with a base model other than the one the run was trained on")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the hub (also taken from the run when it was trained so)")
    from agml.export import add_quantize_argument

    add_quantize_argument(p)
    p.set_defaults(handler=_cmd_eval)


def _eval_inputs(args):
    """Validate options, the run folder and the probes before loading any model: (config, probes, forget)."""
    from pathlib import Path

    from agml import preflight, runs
    from agml.data import load_prompts
    from agml.errors import InputError
    from agml.probe_defaults import with_default_forbidden
    from agml.relearn import attack_slice
    from agml.resume import check_config

    checks = {"--max-new-tokens": args.max_new_tokens, "--batch-size": args.batch_size}
    if args.relearn is not None:
        checks.update({"--relearn": args.relearn, "--relearn-examples": args.relearn_examples})
        if args.relearn_lr is not None and not args.relearn_lr > 0:
            raise InputError(f"--relearn-lr must be > 0, got {args.relearn_lr}")
        from agml.fsdp import fsdp_requested

        if fsdp_requested():  # the attack merges the adapter into a copy of the whole model
            raise InputError("--relearn needs the whole model on one device; run it without FSDP "
                             "(plain `accelerate launch`, or a single process)")
    for flag, value in checks.items():
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    for flag, value in {"--samples": args.samples, "--noise-floor": args.noise_floor}.items():
        if value < 0:
            raise InputError(f"{flag} must be >= 0, got {value}")
    if args.lm_eval is not None and not _lm_eval_tasks(args):
        raise InputError("--lm-eval needs at least one task name (comma-separated)")
    if args.json is not None:
        preflight.check_json_target(args.json, args.run, args.force)
    config = runs.read_config(args.run)
    check_config(config, Path(args.run) / runs.CONFIG_FILE)
    probes = load_prompts(args.probes) if args.probes else runs.load_records(Path(args.run), "probes")
    if probes:
        probes = with_default_forbidden(probes, _eval_concept_terms(config), print)
    if not probes:
        raise InputError(f"{args.run} holds no probes ({runs.DATA_DIR}/probes.jsonl); pass --probes")
    forget = []
    if args.relearn is not None:
        forget = _eval_attack_records(args, config)
        if not any(p.type == "forget" for p in probes):
            raise InputError("--relearn needs forget probes; the probe set has none")
        attack_slice(forget, probes, args.relearn_examples, args.seed)  # raises when nothing is left to train on
    return config, probes, forget


def _eval_concept_terms(config: dict) -> tuple[str, ...]:
    """The concept's name and aliases as the run resolved them (for the cloze metric)."""
    return tuple(config.get("concept", {}).get("terms", ()))


def _lm_eval_tasks(args) -> list[str]:
    return [task.strip() for task in (args.lm_eval or "").split(",") if task.strip()]


def _eval_attack_records(args, config: dict) -> list:
    """--relearn-data, else the shipped concept's relearning data, else the run's forget records (with answers)."""
    from pathlib import Path

    from agml import concepts, runs
    from agml.relearn import load_attack_records

    if args.relearn_data:
        return load_attack_records(args.relearn_data)
    slug = runs.shipped_slug(config)
    if slug is not None:
        return load_attack_records(concepts.dataset_path(f"{slug}_relearn.jsonl"))
    return runs.load_records(Path(args.run), "forget") or []


def _eval_split(args) -> str:
    """Which probes: "custom" for --probes, else the split the run's report recorded (default "custom")."""
    import json
    from pathlib import Path

    if args.probes:
        return "custom"
    try:
        report = json.loads((Path(args.run) / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "custom"
    split = report.get("evaluation", {}).get("split") if isinstance(report, dict) else None
    return split if isinstance(split, str) else "custom"


def _cmd_eval(args) -> int:
    from agml import distributed, preflight, runs
    from agml.evaluation import evaluate
    from agml.reporting import format_summary

    config, probes, forget = _eval_inputs(args)
    if args.quantize is not None:
        from agml.export import quantized_eval_handler

        return quantized_eval_handler(args, probes)
    loaded = runs.load_run(args.run, trust_remote_code=args.trust_remote_code,
                           allow_model_mismatch=args.allow_model_mismatch)
    preflight.check_context(loaded.model, loaded.tokenizer, probes, {"--max-new-tokens": args.max_new_tokens})
    facts = runs.run_facts(args.run, config)
    result = evaluate(loaded.model, loaded.tokenizer, probes, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, concept_terms=_eval_concept_terms(config), facts=facts,
                      samples=args.samples, seed=args.seed, capability=not args.no_capability,
                      noise_floor_seeds=args.noise_floor, split=_eval_split(args))
    if args.lm_eval:
        from agml.capability import run_lm_eval

        result["lm_eval"] = run_lm_eval(loaded.model, _lm_eval_tasks(args), tokenizer=loaded.tokenizer,
                                        batch_size=args.batch_size)
    if args.relearn is not None:
        from agml.relearn import relearn_attack

        result["relearn"] = relearn_attack(
            loaded.model, loaded.tokenizer, forget, probes, steps=args.relearn, lr=args.relearn_lr,
            n_examples=args.relearn_examples, seed=args.seed, max_new_tokens=args.max_new_tokens,
            eval_batch_size=args.batch_size, facts=facts, variant=args.relearn_variant,
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
    from agml.quiet import silence_known_library_noise

    silence_known_library_noise()
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
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"agml {args.command}{_process_label()}: error: {_storage_message(args, err)}", file=sys.stderr)
        return EXIT_STORAGE


def _storage_message(args, err: OSError) -> str:
    """What failed, where, and that nothing finished was replaced (outputs are staged and renamed at the end)."""
    where = f" writing {err.filename}" if err.filename else ""
    text = f"{STORAGE_ERRORS[err.errno]}{where}; no finished output was replaced"
    if args.command == "unlearn":
        from agml.options import UnlearnOptions

        out = getattr(args, "resume", None) or getattr(args, "out", None) or UnlearnOptions().out
        text += (f"; the unfinished run stays in {out}.partial: make room, then continue it with "
                 f"`agml unlearn --resume {out}` (from its last checkpoint) or start again with --force")
    return text


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
