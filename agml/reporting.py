"""RUN/report.json, RUN/report.md and RUN/plots/: what a run did and what it achieved."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from agml.io import atomic_write_text
from agml.runs import write_json

EXAMPLES_PER_TYPE = 5


def _rate(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _training_dict(training) -> dict:
    if training is None:
        return {}
    return dataclasses.asdict(training) if dataclasses.is_dataclass(training) else dict(training)


def build_report(options: dict, evaluation: dict, training, masks, parameters: dict, seconds: float,
                 concept: str, stages: dict[str, float] | None = None) -> dict:
    train = _training_dict(training)
    return {
        "concept": concept,
        "method": options.get("method"),
        "objective": options.get("objective"),
        "model": options.get("model"),
        "seconds": round(seconds, 1),
        "stage_seconds": {name: round(value, 1) for name, value in (stages or {}).items()},
        "parameters": {**parameters, "fraction": parameters["trainable"] / max(parameters["total"], 1)},
        "masks": None if masks is None else {"neurons": masks.total, "budget": masks.meta.get("budget"),
                                             "layers": masks.to_lists()},
        "training": {k: v for k, v in train.items() if k != "history"},
        "history": train.get("history", []),
        "evaluation": evaluation,
    }


def _summary_table(evaluation: dict) -> list[str]:
    rows = ["| metric | base | unlearned |", "|---|---|---|"]
    rows += [f"| {_quote(label.strip())} | {before} | {after} |" for label, before, after in summary_rows(evaluation)
             if not label.startswith("  ")]
    return rows


def _category_rate(rates: dict, category: str) -> str:
    return _with_interval(rates.get("by_category", {}).get(category),
                          rates.get("by_category_interval", {}).get(category))


def _category_table(evaluation: dict) -> list[str]:
    rows = ["| type | category | base | unlearned |", "|---|---|---|---|"]
    for kind in ("forget", "retain"):
        before, after = evaluation["before"][kind], evaluation["after"][kind]
        for category in sorted(before.get("by_category", {})):
            rows.append(f"| {kind} | {category} | {_category_rate(before, category)} | "
                        f"{_category_rate(after, category)} |")
    return rows


NO_NEIGHBOURS_NOTE = ("**No neighbours by name.** None were shipped, named (`--neighbour-names`) or proposed by the "
                      "base model, so unless your own retain files hold some, nothing in training told items like the "
                      "concept apart from it: read the answers about its neighbours before trusting the retain rate.")


def _judge_section(evaluation: dict) -> list[str]:
    """The terms and facts the judges used, so a reader can check them (and edit the facts file)."""
    judge = evaluation.get("judge")
    if not judge:
        return []
    lines = ["## What the judges looked for", "",
             "A forget probe fails when its answer names one of these terms (whole words, case- and accent-"
             "insensitive; terms the question itself contains are ignored). A retain probe fails when the answer is "
             "a refusal, lacks its required word, or (recommendation requests) recommends nothing.", "",
             f"Leak terms: {', '.join(f'`{t}`' for t in judge['leak_terms']) or '(none)'}", ""]
    facts = judge.get("facts")
    if facts:
        lines += [f"Facts used (concept `{facts.get('name')}`; edit the run's `data/facts.json` to change them):", "",
                  "```json", json.dumps(facts, indent=2, ensure_ascii=False), "```", ""]
        if not facts.get("neighbours"):
            lines += [NO_NEIGHBOURS_NOTE, ""]
    return lines


def _noise_floor_section(evaluation: dict) -> list[str]:
    floor = evaluation.get("noise_floor")
    if not floor:
        return []
    random, trained = floor["random"]["pass_to_fail"], floor["trained"]["pass_to_fail"]
    verdict = ("within the noise floor" if random["max"] is not None and trained <= random["max"]
               else "above the noise floor: damage, not noise")
    return ["## Noise floor", "",
            f"Retain answers that flip from pass to fail: {trained} of {floor['trained']['n']} with the trained "
            f"adapter; {random['min']:.0f}-{random['max']:.0f} (mean {random['mean']:.1f}) with random adapters of the "
            f"same size, sparsity and weight norm ({len(floor['random']['per_seed'])} seeds). The retain loss is "
            f"{verdict}.", "", *_flips_by_category(floor)]


def _flips_by_category(floor: dict) -> list[str]:
    """Pass -> fail per probe category, trained adapter beside each random one (older results lack the counts)."""
    sides = [("trained", floor["trained"])] + [(f"random seed {s['seed']}", s) for s in floor["random"]["per_seed"]]
    if not all("pass_to_fail_by_category" in counts for _, counts in sides):
        return []
    categories = sorted({c for _, counts in sides for c in counts["pass_to_fail_by_category"]})
    if not categories:
        return []
    rows = [f"| {name} | " + " | ".join(str(counts["pass_to_fail_by_category"].get(c, 0)) for c in categories) + " |"
            for name, counts in sides]
    return ["| pass -> fail by category | " + " | ".join(categories) + " |",
            "|---|" + "---|" * len(categories), *rows, ""]


def _quote(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:300]


def _examples(evaluation: dict, kind: str) -> list[str]:
    probes = [p for p in evaluation.get("probes", []) if p["type"] == kind][:EXAMPLES_PER_TYPE]
    rows = ["| prompt | base answer | unlearned answer |", "|---|---|---|"]
    rows += [f"| {_quote(p['prompt'])} | {_quote(p['before'])} | {_quote(p['after'])} |" for p in probes]
    return rows


def render_markdown(report: dict) -> str:
    evaluation = report["evaluation"]
    params = report["parameters"]
    lines = [
        f"# agml unlearning report: {report['concept']}",
        "",
        f"Model `{report['model']}`, method `{report['method']}`, objective `{report['objective']}`, "
        f"{report['seconds']:.0f} s wall. Trainable parameters: {params['trainable']:,} of {params['total']:,} "
        f"({100 * params['fraction']:.3f}%).",
    ]
    if report.get("stage_seconds"):
        lines.append("Wall seconds by stage: " + ", ".join(f"{name} {value:.0f}"
                                                          for name, value in report["stage_seconds"].items()) + ".")
    if report["masks"] is not None:
        lines.append(f"Neurons selected: {report['masks']['neurons']} in {len(report['masks']['layers'])} layers.")
    training = report["training"]
    if training:
        early = " (stopped early: forgotten and retain KL within budget)" if training.get("stopped_early") else ""
        lines.append(f"Training: {training.get('steps_done')} steps{early}.")
    lines += ["", f"## Summary ({split_label(evaluation.get('split'))}, greedy answers; 95% Wilson intervals)", "",
              *_summary_table(evaluation), "", *_noise_floor_section(evaluation), *_judge_section(evaluation),
              "## Per category", "", *_category_table(evaluation), "",
              "## Example answers: forget probes", "", *_examples(evaluation, "forget"), "",
              "## Example answers: retain probes", "", *_examples(evaluation, "retain"), "",
              "## Plots", "", "![training curves](plots/training.png)", "",
              "![before and after](plots/before_after.png)", ""]
    if report["masks"] is not None:
        lines += ["![selected neurons](plots/heatmap.png)", ""]
    return "\n".join(lines)


def write_report(run: Path, options: dict, evaluation: dict, training, masks, parameters: dict, seconds: float,
                 concept: str, stages: dict[str, float] | None = None) -> dict:
    """Write report.json, report.md and the training / before-after plots into the run folder. `stages`: wall
    seconds of each pipeline stage (base answers, masks, training, evaluation, ...), in order."""
    from agml.plots import plot_before_after, plot_training

    report = build_report(options, evaluation, training, masks, parameters, seconds, concept, stages)
    plots = Path(run) / "plots"
    plots.mkdir(exist_ok=True)
    if report["history"]:
        plot_training(report["history"], plots / "training.png")
    plot_before_after(evaluation, plots / "before_after.png")
    write_json(Path(run) / "report.json", report)
    atomic_write_text(Path(run) / "report.md", render_markdown(report))
    return report


# --- terminal tables (agml eval) --------------------------------------------------------------------------------------

LABEL_WIDTH = 40
VALUE_WIDTH = 28
SPLIT_LABELS = {"test": "frozen TEST split", "dev": "DEV split (used to choose settings)",
                "template": "probes generated from templates", "custom": "custom probes"}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _with_interval(value: float | None, interval) -> str:
    """'86.7% [70.3, 94.7]'; the rate alone when there is no interval."""
    if value is None:
        return "-"
    if not interval:
        return _percent(value)
    return f"{100 * value:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _stats_rate(rate: dict | None) -> str:
    """An agml.stats.rate dict as '86.7% [70.3, 94.7] (26/30)'."""
    if not rate or rate.get("rate") is None:
        return "-"
    return f"{_with_interval(rate['rate'], (rate['low'], rate['high']))} ({rate['successes']}/{rate['n']})"


def _text_row(label: str, before: str, after: str) -> str:
    return f"{label:<{LABEL_WIDTH}} {before:>{VALUE_WIDTH}} {after:>{VALUE_WIDTH}}"


def split_label(split: str | None) -> str:
    return SPLIT_LABELS.get(split or "", split or "unlabelled probes")


def summary_rows(result: dict) -> list[tuple[str, str, str]]:
    """(label, before, after) rows of an evaluation, every rate with its 95% Wilson interval; shared by the
    terminal table and report.md."""
    rows = []
    for kind, meaning in (("forget", "forget pass (nothing leaked)"), ("retain", "retain pass (still knows)")):
        before, after = result["before"][kind], result["after"][kind]
        rows.append((f"{meaning}, n={before['n']}", _with_interval(before["pass_rate"], before.get("interval")),
                     _with_interval(after["pass_rate"], after.get("interval"))))
        categories = sorted(set(before["by_category"]) | set(after["by_category"]))
        for category in categories:
            rows.append((f"  {category}", *(
                _with_interval(side["by_category"].get(category), side.get("by_category_interval", {}).get(category))
                for side in (before, after))))
    for key, label in (("refusal", "refusals"), ("still_recommends", "still recommends")):
        for kind in ("forget", "retain"):
            if key in result and result[key]["before"][kind]["n"]:
                rows.append((f"{label} ({kind})", _stats_rate(result[key]["before"][kind]),
                             _stats_rate(result[key]["after"][kind])))
    if "fuzzy_leak" in result:
        rows.append(("seed-style fuzzy leak (forget)", _stats_rate(result["fuzzy_leak"]["before"]),
                     _stats_rate(result["fuzzy_leak"]["after"])))
    sampling = result.get("sampling")
    if sampling:
        rows.append((f"best-of-{sampling['n_samples']} leak (T={sampling['temperature']:g})",
                     _stats_rate(sampling["before"]), _stats_rate(sampling["after"])))
    cloze = result["cloze_logprob"]
    rows.append((f"cloze log p (n={cloze['n']})", _number(cloze["before"]), _number(cloze["after"])))
    fluency = result["fluency"]
    on = "retain answers: " if fluency.get("on") == "retain" else "answers: "
    for key, label in (("perplexity", "base perplexity"), ("repetition_rate", "repetition rate"),
                       ("distinct_2", "distinct-2"), ("answer_length", "length (words)")):
        rows.append((on + label, _number(fluency["before"][key]), _number(fluency["after"][key])))
    coherence = result.get("forget_coherence")
    if coherence:
        for key, label in (("repetition_rate", "forget answers: repetition rate"),
                           ("distinct_2", "forget answers: distinct-2"),
                           ("language_match", "forget answers: language match")):
            rows.append((label, _number(coherence["before"][key]), _number(coherence["after"][key])))
    rows.append(("retain KL (nats/token)", "", _number(result["retain_kl"])))
    rows += _capability_rows(result.get("capability"))
    floor = result.get("noise_floor")
    if floor:
        rows.append(noise_floor_row(floor))
    return rows


def _capability_rows(capability: dict | None) -> list[tuple[str, str, str]]:
    if not capability:
        return []
    mc = capability["mc"]
    metric = mc["headline"]
    text = capability["neutral_perplexity"]
    return [
        (f"general knowledge MC {metric}, n={mc['before']['n']}",
         _with_interval(mc["before"][metric], mc["before"].get("interval")),
         _with_interval(mc["after"][metric], mc["after"].get("interval"))),
        ("general knowledge: base-right items kept", str(mc["base_right"]),
         f"{mc['kept']} ({_with_interval(mc['kept'] / mc['base_right'], mc.get('kept_interval'))})"
         if mc["base_right"] else "-"),
        ("neutral-text perplexity", _number(text["before"]["perplexity"]), _number(text["after"]["perplexity"])),
    ]


def noise_floor_row(floor: dict) -> tuple[str, str, str]:
    """Retain answers flipped pass -> fail: random adapters (range over seeds) vs the trained adapter."""
    random = floor["random"]["pass_to_fail"]
    seeds = len(floor["random"]["per_seed"])
    return (f"retain flips pass->fail, n={floor['trained']['n']}",
            f"noise floor {random['min']:.0f}-{random['max']:.0f} ({seeds} seeds)",
            f"trained {floor['trained']['pass_to_fail']}")


def judge_lines(result: dict) -> list[str]:
    """What the leak judge looked for (so a user can check the lists and edit the facts)."""
    judge = result.get("judge")
    if not judge:
        return []
    lines = [f"leak terms judged: {', '.join(judge['leak_terms']) or '(none)'}"]
    facts = judge.get("facts")
    if facts:
        lines.append(f"facts: {facts.get('name')!r}; fuzzy patterns: {', '.join(facts.get('fuzzy', [])) or '(none)'}")
    return lines


def format_summary(result: dict) -> str:
    """A compact before/after table for the terminal, every rate with its 95% interval."""
    lines = [f"probes: {split_label(result.get('split'))}; rates with 95% Wilson intervals",
             _text_row("", "before", "after")]
    lines += [_text_row(*row) for row in summary_rows(result)]
    lines += judge_lines(result)
    if result.get("lm_eval"):
        lines.append(format_lm_eval(result["lm_eval"]))
    if "relearn" in result:
        lines.append(format_relearn(result["relearn"]))
    return "\n".join(lines)


def format_lm_eval(lm_eval: dict) -> str:
    """lm-eval metrics per task, base (adapter off) vs unlearned (adapter on)."""
    limit = "" if lm_eval.get("limit") is None else f", limit {lm_eval['limit']}"
    lines = [f"lm-eval ({', '.join(lm_eval['tasks'])}{limit})",
             _text_row("", "before", "after")]
    for task in sorted(set(lm_eval["before"]) | set(lm_eval["after"])):
        metrics = sorted(set(lm_eval["before"].get(task, {})) | set(lm_eval["after"].get(task, {})))
        for metric in metrics:
            lines.append(_text_row(f"  {task} {metric}", _number(lm_eval["before"].get(task, {}).get(metric)),
                                   _number(lm_eval["after"].get(task, {}).get(metric))))
    return "\n".join(lines)


def relearn_rows(relearn: dict, label: str = "leak") -> list[tuple[str, str, str]]:
    """Leak rates (95% intervals) of the unlearned model and the base control, before and after the attack."""
    leaks = relearn.get("leaks")
    if leaks is None:  # a result written before leak counts were recorded: pass rates only
        rates = relearn["forget_pass"]
        return [(f"  {name} model (forget pass)", _percent(rates[f"{name}_before_attack"]),
                 _percent(rates[f"{name}_after_attack"])) for name in ("unlearned", "base")]
    return [(f"  {name} model ({label})", _stats_rate(leaks[f"{name}_before_attack"]),
             _stats_rate(leaks[f"{name}_after_attack"])) for name in ("unlearned", "base")]


def format_relearn(relearn: dict) -> str:
    """The relearning attack: leak rates before and after the attack, and the recovery."""
    variant = relearn.get("variant", "lora")
    lines = [f"relearning attack ({variant}): {relearn['steps']} steps on {relearn['examples']} examples, "
             f"lr {relearn['lr']:g}",
             _text_row("", "before attack", "after attack"),
             *(_text_row(*row) for row in relearn_rows(relearn))]
    if "recovery" in relearn:
        lines.append(f"recovery (0 = nothing came back, 1 = back to the base's leak rate): "
                     f"{_number(relearn['recovery'])}")
    held_out = relearn.get("held_out")
    if held_out:  # only the leak terms the attack data does not contain (agml.relearn)
        taught = ", ".join(held_out["taught_terms"]) or "none"
        lines += [f"held out (leaks of terms the attack data does not contain; taught: {taught}):",
                  *(_text_row(*row) for row in relearn_rows(held_out, "held-out leak")),
                  f"held-out recovery: {_number(held_out['recovery'])}"]
    return "\n".join(lines)
