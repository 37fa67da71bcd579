"""Controls for activation-guided (AG) masks, issue 15 item 4: do the selected neurons matter for the concept?

Three measurements on the built-in Inception demo (dev split = agml/datasets/inception_probes.jsonl):

1. trade-off: AG masks, random masks with the same per-layer counts (several seeds) and plain LoRA, each trained
   as `agml unlearn` trains (same objective, targets by prompt kind, options) at several KL (retain) weights and
   judged as its evaluation judges the dev probes -> forget/retain pass rates with 95% intervals, retain
   refusals, JSON and a PNG plot. Every trained run is saved at once (tradeoff_runs.json), so a rerun continues.
2. ablation (no training): set the selected neurons to their mean activation and measure the drop of log p of the
   concept's tokens in the base answers to forget prompts (teacher forcing, per token) minus the drop on the
   neighbours' answers; the same for random masks of equal per-layer counts; z-score of the AG mask among them.
   Measured in sample (all records) and held out (masks from the even-numbered records, measured on the odd).
3. overlap: Jaccard of the AG masks of Inception, two neighbour films and Harry Potter (same templates, only the
   name differs), and of masks built from two halves of the forget set; random-mask Jaccard for reference.

    python benchmarks/controls.py --out benchmarks/results/controls            # everything (hours on 2 CPU cores)
    python benchmarks/controls.py --parts ablation --random-masks 100          # the ablation z-score only
    python benchmarks/controls.py --quick --tiny --out /tmp/controls           # smoke run, tiny random model
    # a sweep split over two processes by KL weight, then merged and plotted (no model needed):
    python benchmarks/controls.py --parts tradeoff --kl-weights 3,30 --out /tmp/a   # and 10,100 into /tmp/b
    python benchmarks/controls.py --replot --merge-runs /tmp/a/tradeoff_runs.json,/tmp/b/tradeoff_runs.json

The pipeline is reached only through the small wrappers below (`unlearn_options`, `answered`, `ag_masks`,
`trained_rates`, `labelled_logprobs`, `demo_data`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from agml import concepts
from agml.architecture import mlp_dims, mlp_modules
from agml.data import PromptRecord, build_example
from agml.masks import NeuronMasks, mask_jaccard, random_masks_like
from agml.options import MaskOptions, TrainOptions

DEFAULT_FACTS = ("Inception", "Dom Cobb", "nolan", "dicaprio", "cobb")
NEIGHBOURS = ("Interstellar", "The Dark Knight")
OTHER_CONCEPT = "Harry Potter"


# --- wrappers around the pipeline ---------------------------------------------------------------------------------
# Every control goes through agml.pipeline, so it measures the method `agml unlearn` runs (objective, targets by
# prompt kind, mask options), not a re-implementation of it.


def unlearn_options(options, kl_weight: float | None = None):
    """The `agml unlearn` options of these controls: the defaults, overridden by the script's arguments."""
    from agml.options import EvalOptions, LoraOptions, UnlearnOptions

    train = TrainOptions(objective=options.objective, steps=options.steps, batch_size=options.batch_size,
                         lr=options.lr, seed=options.seed, kl_weight=30.0 if kl_weight is None else kl_weight)
    return UnlearnOptions(
        out="controls", probe_split="dev", answer_tokens=options.answer_tokens,
        mask=MaskOptions(density=options.density, mask_retain_weight=options.mask_retain_weight,
                         per_layer_standardize=options.per_layer_standardize),
        lora=LoraOptions(rank=options.rank, alpha=2.0 * options.rank), train=train,
        eval=EvalOptions(max_new_tokens=options.max_new_tokens, skip_capability=True))


def answered(model, tokenizer, records: Sequence[PromptRecord], max_new_tokens: int) -> list[PromptRecord]:
    """Records with the base model's greedy answers."""
    from agml.scoring import answer_records

    return answer_records(model, tokenizer, records, max_new_tokens, desc=None)


def ag_masks(model, tokenizer, data, options) -> NeuronMasks:
    """Activation-guided masks as `agml unlearn` builds them from answered forget and retain records."""
    from agml.pipeline import score_and_select

    return score_and_select(model, tokenizer, unlearn_options(options), data)[1]


def trained_rates(model, tokenizer, masks: NeuronMasks | None, data, kl_weight: float, options) -> dict:
    """Train an adapter (masked, or plain LoRA when masks is None) as `agml unlearn` does and judge the dev probes
    as its evaluation does (capability skipped). `data.forget` already carries the training targets."""
    from agml.adapters import apply_lora, apply_masked_lora
    from agml.evaluation import evaluate
    from agml.pipeline import training_options
    from agml.training import train_unlearning

    run = unlearn_options(options, kl_weight)
    targets = ("gate_proj", "up_proj", "down_proj")
    shape = dict(r=run.lora.rank, alpha=run.lora.alpha, targets=targets)
    peft = apply_lora(model, **shape) if masks is None else apply_masked_lora(model, masks, **shape)
    train_unlearning(peft, tokenizer, data.forget, data.retain, training_options(run, tokenizer, data),
                     progress=False)
    result = evaluate(peft, tokenizer, data.probes, max_new_tokens=run.eval.max_new_tokens, concept_terms=data.terms,
                      facts=data.facts, capability=False, split=data.split, progress=False)
    summary = result["summary"]
    return {"forget": summary["forget_pass_after"], "retain": summary["retain_pass_after"],
            "forget_interval": summary["forget_pass_after_interval"],
            "retain_interval": summary["retain_pass_after_interval"],
            "retain_refusal": summary["retain_refusal_after"], "retain_kl": summary["retain_kl"],
            "forget_before": summary["forget_pass_before"], "retain_before": summary["retain_pass_before"],
            "n_forget": result["after"]["forget"]["n"], "n_retain": result["after"]["retain"]["n"]}


def labelled_logprobs(model, tokenizer, examples, batch_size: int = 16) -> tuple[list[float], list[int]]:
    """Summed log-probability of each example's labelled tokens, and their count."""
    from agml.data import pad_token_id
    from agml.logprobs import example_logprobs

    return example_logprobs(model, examples, pad_token_id(tokenizer), batch_size)


# --- models and data ------------------------------------------------------------------------------------------------


def model_factory(options) -> tuple[Callable[[], torch.nn.Module], object]:
    """(a function returning a fresh base model, tokenizer): every trained adapter starts from a clean model."""
    from agml.models import load_model, load_tokenizer

    if not options.tiny:
        _, tokenizer = load_model(options.model)
        return (lambda: load_model(options.model)[0]), tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    def tiny() -> torch.nn.Module:
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()

    return tiny, tokenizer


def concept_facts() -> tuple[str, ...]:
    """Name, aliases and key facts of Inception (the data set's facts file when it ships one)."""
    path = Path(concepts.__file__).parent / "datasets" / "inception_facts.json"
    if path.is_file():
        facts = json.loads(path.read_text(encoding="utf-8"))
        return tuple(dict.fromkeys([facts["name"], *facts.get("aliases", []), *facts.get("facts", [])]))
    return DEFAULT_FACTS


def demo_data(model, tokenizer, options):
    """The built-in demo's data as `agml unlearn --probe-split dev` resolves it (RunData): answered forget, answered
    retain without the concept, dev probes; cut to --limit each (probes: of each type) when given."""
    from agml.pipeline import answer_data, resolve_data

    run = unlearn_options(options)
    data = resolve_data(run)
    if options.limit is not None:
        cut = slice(options.limit)
        probes = [p for kind in ("forget", "retain") for p in [p for p in data.probes if p.type == kind][cut]]
        data = dataclasses.replace(data, forget=data.forget[cut], retain=data.retain[cut], probes=probes)
    return answer_data(model, tokenizer, run, data, None)


def with_records(data, forget, retain):
    """The same concept and probes with other forget/retain records (for masks of halves or other concepts)."""
    return dataclasses.replace(data, forget=list(forget), retain=list(retain))


# --- 1. trade-off curves ------------------------------------------------------------------------------------------


def tradeoff(new_model, tokenizer, data, masks: NeuronMasks, options, log, saved: Path | None = None) -> dict:
    """Forget/retain dev pass rates of AG masks, plain LoRA and random masks over the KL weights. Results are
    written to `saved` after every trained adapter and read back from it, so an interrupted sweep continues."""
    from agml.pipeline import with_targets

    width = mlp_dims(new_model())[1]
    variants: dict[str, NeuronMasks | None] = {"ag": masks, "lora": None}
    variants.update({f"random-{seed}": random_masks_like(masks, width, seed) for seed in range(options.seeds)})
    data = with_targets(new_model(), tokenizer, unlearn_options(options), data)  # the same targets for every run
    results = json.loads(saved.read_text()) if saved is not None and saved.is_file() else {}
    for weight in options.kl_weights:
        for name, variant in variants.items():
            if str(weight) in results.get(name, {}):
                continue
            started = time.perf_counter()
            rates = trained_rates(new_model(), tokenizer, variant, data, weight, options)
            rates["seconds"] = round(time.perf_counter() - started, 1)
            results.setdefault(name, {})[str(weight)] = rates
            if saved is not None:
                saved.write_text(json.dumps(results, indent=1))
            log(f"trade-off {name} kl={weight}: forget {rates['forget']} retain {rates['retain']} "
                f"({rates['seconds']:.0f}s)")
    return {name: results[name] for name in variants}


def plot_tradeoff(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=150)
    randoms = [k for k in results if k.startswith("random-")]
    groups = {"AG masks": ["ag"], "plain LoRA": ["lora"], f"random masks (mean ± sd of {len(randoms)})": randoms}
    for label, keys in groups.items():
        keys = [k for k in keys if k in results]  # a sweep may hold only some variants
        if not keys:
            continue
        weights = sorted(results[keys[0]], key=float)
        xs, ys, xe, ye = [], [], [], []
        for weight in weights:
            retain = [results[k][weight]["retain"] or 0.0 for k in keys]
            forget = [results[k][weight]["forget"] or 0.0 for k in keys]
            xs.append(statistics.mean(retain))
            ys.append(statistics.mean(forget))
            xe.append(statistics.pstdev(retain))
            ye.append(statistics.pstdev(forget))
        ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker="o", capsize=3, label=label)
        labels: dict[tuple[float, float], list[str]] = {}  # weights that land on the same point share a label
        for x, y, weight in zip(xs, ys, weights, strict=True):
            labels.setdefault((x, y), []).append(f"{float(weight):g}")
        for (x, y), same in labels.items():
            ax.annotate("kl " + ", ".join(same), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("retain probes passed (dev)")
    ax.set_ylabel("forget probes passed (dev)")
    ax.set_title("Forget vs retain over KL weights (dev split, seed 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --- 2. mean ablation -----------------------------------------------------------------------------------------------


@torch.no_grad()
def mean_activations(model, tokenizer, records: Sequence[PromptRecord]) -> list[torch.Tensor]:
    """Per layer, the mean of every MLP neuron's activation (down_proj input) over the records' answer tokens."""
    from agml.data import collate, pad_token_id

    mlps = mlp_modules(model)
    sums = [torch.zeros(mlp_dims(model)[1], dtype=torch.float64) for _ in mlps]
    count = 0
    examples = [build_example(tokenizer, r.messages, r.answer) for r in records]
    state = {}

    def hook_for(layer):
        def hook(_module, args):
            sums[layer] += args[0][state["where"]].double().sum(0).cpu()
        return hook

    handles = [mlp.down_proj.register_forward_pre_hook(hook_for(i)) for i, mlp in enumerate(mlps)]
    try:
        for start in range(0, len(examples), 16):
            batch = collate(examples[start:start + 16], pad_token_id(tokenizer))
            state["where"] = batch["labels"] != -100
            count += int(state["where"].sum())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [(s / max(count, 1)).float() for s in sums]


@contextmanager
def mean_ablated(model, masks: NeuronMasks, means: Sequence[torch.Tensor]):
    """Inside the block, the selected neurons of each layer output their mean activation."""
    mlps = mlp_modules(model)

    def hook_for(layer, ids):
        def hook(_module, args):
            acts = args[0].clone()
            acts[..., ids] = means[layer][ids].to(acts.dtype)
            return (acts, *args[1:])
        return hook

    handles = [mlps[layer].down_proj.register_forward_pre_hook(hook_for(layer, ids)) for layer, ids in masks.items()]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def ablation_examples(tokenizer, forget, neighbours, terms: Sequence[str]) -> tuple[list, list]:
    """Forget: the concept term's tokens in each base answer (agml.evaluation.cloze_example); neighbours: all
    answer tokens of their base answers."""
    from agml.evaluation import cloze_example

    concept = [e for e in (cloze_example(tokenizer, r, r.answer, terms) for r in forget) if e is not None]
    return concept, [build_example(tokenizer, r.messages, r.answer) for r in neighbours]


def per_token(model, tokenizer, examples) -> float:
    totals, counts = labelled_logprobs(model, tokenizer, examples)
    return sum(totals) / max(sum(counts), 1)


def ablation(model, tokenizer, forget, retain, masks: NeuronMasks, options, log) -> dict:
    terms = concept_facts()
    concept, neighbour = ablation_examples(tokenizer, forget, retain, terms)
    means = mean_activations(model, tokenizer, [*forget, *retain])
    base = (per_token(model, tokenizer, concept), per_token(model, tokenizer, neighbour))

    def drops(mask: NeuronMasks) -> dict:
        with mean_ablated(model, mask, means):
            now = (per_token(model, tokenizer, concept), per_token(model, tokenizer, neighbour))
        forget_drop, neighbour_drop = base[0] - now[0], base[1] - now[1]
        return {"forget_drop": forget_drop, "neighbour_drop": neighbour_drop,
                "specificity": forget_drop - neighbour_drop}

    ag = drops(masks)
    width = mlp_dims(model)[1]
    seeds = tqdm(range(options.random_masks), desc="random masks ablated", disable=options.tiny)
    randoms = [drops(random_masks_like(masks, width, 1000 + seed)) for seed in seeds]

    def z(key: str) -> float | None:
        values = [r[key] for r in randoms]
        spread = statistics.pstdev(values)
        return (ag[key] - statistics.mean(values)) / spread if spread > 0 else None

    result = {"ag": ag, "random_mean": {k: statistics.mean(r[k] for r in randoms) for k in ag},
              "random_sd": {k: statistics.pstdev([r[k] for r in randoms]) for k in ag},
              "z": {k: z(k) for k in ag}, "n_random": len(randoms), "neurons": masks.total,
              "n_concept_examples": len(concept), "n_neighbour_examples": len(neighbour),
              "base_logprob_per_token": {"concept": base[0], "neighbour": base[1]}}
    log(f"ablation: AG {ag}; z {result['z']} over {len(randoms)} random masks")
    return result


def held_out_ablation(model, tokenizer, data, options, log) -> dict:
    """The ablation out of sample: masks built from the even-numbered forget and retain records only, measured on
    the odd-numbered ones (the in-sample test measures on the records the masks were scored on)."""
    masks = ag_masks(model, tokenizer, with_records(data, data.forget[0::2], data.retain[0::2]), options)
    log(f"held-out ablation: mask of {masks.total} neurons from the even-numbered records")
    return ablation(model, tokenizer, data.forget[1::2], data.retain[1::2], masks, options, log)


# --- 3. overlap -----------------------------------------------------------------------------------------------------


def overlap(model, tokenizer, data, masks: NeuronMasks, options, log) -> dict:
    cut = slice(None) if options.limit is None else slice(options.limit)
    general = answered(model, tokenizer, concepts.general_retain_set()[cut], options.answer_tokens)
    by_concept = {}
    for name in ("Inception", *options.neighbours, OTHER_CONCEPT):
        records = answered(model, tokenizer, concepts.concept_forget_set(name)[cut], options.answer_tokens)
        by_concept[name] = ag_masks(model, tokenizer, with_records(data, records, general), options)
    names = list(by_concept)
    matrix = {a: {b: mask_jaccard(by_concept[a], by_concept[b]) for b in names} for a in names}
    halves = (ag_masks(model, tokenizer, with_records(data, data.forget[0::2], data.retain), options),
              ag_masks(model, tokenizer, with_records(data, data.forget[1::2], data.retain), options))
    width = mlp_dims(model)[1]
    chance = mask_jaccard(random_masks_like(masks, width, 1), random_masks_like(masks, width, 2))
    result = {"concepts": matrix, "forget_halves": mask_jaccard(*halves), "random_pair": chance,
              "neurons": {name: m.total for name, m in by_concept.items()}}
    log(f"overlap: halves {result['forget_halves']:.3f}, random pair {chance:.3f}, concepts {matrix}")
    return result


# --- the script -----------------------------------------------------------------------------------------------------

PARTS = ("tradeoff", "ablation", "overlap")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/controls", help="folder for controls.json and plots")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--seeds", type=int, default=5, help="random-mask seeds in the trade-off")
    parser.add_argument("--kl-weights", default="3,10,30,100")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--random-masks", type=int, default=100, help="random masks in the ablation test")
    parser.add_argument("--density", type=float, default=MaskOptions().density, help="agml unlearn's --density")
    parser.add_argument("--mask-retain-weight", type=float, default=MaskOptions().mask_retain_weight,
                        help="agml unlearn's --mask-retain-weight (the controls before session 14 ran at 1)")
    parser.add_argument("--per-layer-standardize", action="store_true")
    parser.add_argument("--objective", default=TrainOptions().objective, help="training objective (agml unlearn's)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="use at most this many prompts of each set")
    parser.add_argument("--neighbours", default=",".join(NEIGHBOURS))
    parser.add_argument("--replot", action="store_true",
                        help="no model: redraw tradeoff.png and controls.json's trade-off from --out's saved runs")
    parser.add_argument("--merge-runs", default="", metavar="FILE[,FILE]",
                        help="with --replot: first fold these tradeoff_runs.json files (e.g. of a sweep split over "
                             "processes by --kl-weights) into --out's")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 2 KL weights, 3 steps, 10 random masks")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and 6 prompts per set (smoke test)")
    options = parser.parse_args(argv)
    if options.quick:
        options.seeds, options.kl_weights, options.steps = 2, "10,100", 3
        options.random_masks = min(options.random_masks, 10)
    if options.tiny:
        options.limit, options.answer_tokens, options.max_new_tokens = 6, 8, 8
        options.density, options.batch_size = 0.1, 2
    options.kl_weights = [float(w) for w in options.kl_weights.split(",") if w.strip()]
    options.neighbours = tuple(n.strip() for n in options.neighbours.split(",") if n.strip())
    options.parts = [p.strip() for p in options.parts.split(",") if p.strip()]
    unknown = set(options.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {list(PARTS)}")
    return options


def merged_runs(saved: Path, others: Sequence[Path]) -> dict:
    """The saved trade-off runs with those of other sweeps folded in; one (variant, weight) measured twice
    with different results is an error, not a silent choice."""
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    for other in others:
        if not other.is_file():
            raise SystemExit(f"--merge-runs: no such file {other}")
        for name, runs in json.loads(other.read_text()).items():
            for weight, rates in runs.items():
                known = results.setdefault(name, {}).get(weight)
                if known is not None and known != rates:
                    raise SystemExit(f"--merge-runs: {name} at kl {weight} in {other} differs from the same run in "
                                     f"{saved} or an earlier --merge-runs file")
                results[name][weight] = rates
    return results


def replot(options, out: Path) -> dict:
    """Redraw the trade-off from saved runs (merging --merge-runs first) and update controls.json's trade-off."""
    saved = out / "tradeoff_runs.json"
    results = merged_runs(saved, [Path(p.strip()) for p in options.merge_runs.split(",") if p.strip()])
    if not results:
        raise SystemExit(f"--replot: no saved trade-off runs in {saved}")
    saved.write_text(json.dumps(results, indent=1))
    summary = out / "controls.json"
    result = json.loads(summary.read_text()) if summary.is_file() else {}
    result["tradeoff"] = results
    result["sweep"] = {"kl_weights": sorted({float(w) for runs in results.values() for w in runs}),
                       "random_seeds": sum(name.startswith("random-") for name in results)}
    result["plot"] = str(plot_tradeoff(results, out / "tradeoff.png"))
    summary.write_text(json.dumps(result, indent=1, default=_json_default), encoding="utf-8")
    return result


def main(argv: Sequence[str] | None = None, log=print) -> dict:
    options = parse_args(argv)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    if options.replot:
        return replot(options, out)
    torch.manual_seed(options.seed)
    new_model, tokenizer = model_factory(options)
    model = new_model()
    data = demo_data(model, tokenizer, options)
    masks = ag_masks(model, tokenizer, data, options)
    log(f"AG mask: {masks.total} neurons in {len(masks)} layers")
    result = {"options": {k: v for k, v in vars(options).items()},
              "mask_options": dataclasses.asdict(unlearn_options(options).mask), "neurons": masks.total,
              "per_layer": {str(k): int(v.numel()) for k, v in masks.items()}}
    if "ablation" in options.parts:
        result["ablation"] = ablation(model, tokenizer, data.forget, data.retain, masks, options, log)
        result["ablation_held_out"] = held_out_ablation(model, tokenizer, data, options, log)
    if "overlap" in options.parts:
        result["overlap"] = overlap(model, tokenizer, data, masks, options, log)
    if "tradeoff" in options.parts:
        result["tradeoff"] = tradeoff(new_model, tokenizer, data, masks, options, log, out / "tradeoff_runs.json")
        result["plot"] = str(plot_tradeoff(result["tradeoff"], out / "tradeoff.png"))
    write_summary(out / "controls.json", result)
    return result


def write_summary(path: Path, result: dict) -> None:
    """Write controls.json, keeping the parts an earlier run measured and this one did not (the parts are often
    run as separate processes). `measured_with` keeps, per part, the options and the AG mask's size it ran with."""
    summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    measured_with = summary.setdefault("measured_with", {})
    for part in summary.get("options", {}).get("parts", []):  # a file written before this was kept per part
        if part in summary:
            measured_with.setdefault(part, _run_settings(summary))
    summary.update(result)
    for key in result:
        if key.split("_held_out")[0] in PARTS:
            measured_with[key] = _run_settings(result)
    path.write_text(json.dumps(summary, indent=1, default=_json_default), encoding="utf-8")


def _run_settings(result: dict) -> dict:
    return {key: result[key] for key in ("options", "mask_options", "neurons", "per_layer") if key in result}


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    main(sys.argv[1:])
