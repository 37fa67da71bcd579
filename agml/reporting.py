"""RUN/report.json, RUN/report.md and RUN/plots/: what a run did and what it achieved."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
                 concept: str) -> dict:
    train = _training_dict(training)
    return {
        "concept": concept,
        "method": options.get("method"),
        "objective": options.get("objective"),
        "model": options.get("model"),
        "seconds": round(seconds, 1),
        "parameters": {**parameters, "fraction": parameters["trainable"] / max(parameters["total"], 1)},
        "masks": None if masks is None else {"neurons": masks.total, "layers": masks.to_lists()},
        "training": {k: v for k, v in train.items() if k != "history"},
        "history": train.get("history", []),
        "evaluation": evaluation,
    }


def _summary_table(evaluation: dict) -> list[str]:
    before, after = evaluation["before"], evaluation["after"]
    rows = ["| metric | base | unlearned |", "|---|---|---|"]
    for kind, meaning in (("forget", "forget probes passed (concept not revealed)"),
                          ("retain", "retain probes passed (still knows)")):
        rows.append(f"| {meaning}, n={after[kind].get('n', 0)} | {_rate(before[kind].get('pass_rate'))} | "
                    f"{_rate(after[kind].get('pass_rate'))} |")
    fluency = evaluation.get("fluency", {})
    for key, label in (("perplexity", "base-model perplexity of answers"), ("repetition_rate", "repetition rate"),
                       ("distinct_2", "distinct-2")):
        if key in fluency.get("before", {}):
            rows.append(f"| {label} | {_num(fluency['before'][key])} | {_num(fluency['after'][key])} |")
    cloze = evaluation.get("cloze_logprob") or {}
    if cloze.get("before") is not None:
        rows.append(f"| log p(concept) on cloze probes | {_num(cloze['before'])} | {_num(cloze.get('after'))} |")
    if evaluation.get("retain_kl") is not None:
        rows.append(f"| retain KL(base‖model), nats/token | 0 | {_num(evaluation['retain_kl'], 4)} |")
    return rows


def _category_table(evaluation: dict) -> list[str]:
    rows = ["| type | category | base | unlearned |", "|---|---|---|---|"]
    for kind in ("forget", "retain"):
        for category, rate in sorted(evaluation["before"][kind].get("by_category", {}).items()):
            after = evaluation["after"][kind].get("by_category", {}).get(category)
            rows.append(f"| {kind} | {category} | {_rate(rate)} | {_rate(after)} |")
    return rows


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
    if report["masks"] is not None:
        lines.append(f"Neurons selected: {report['masks']['neurons']} in {len(report['masks']['layers'])} layers.")
    training = report["training"]
    if training:
        early = " (stopped early: forgotten and retain KL within budget)" if training.get("stopped_early") else ""
        lines.append(f"Training: {training.get('steps_done')} steps{early}.")
    lines += ["", "## Summary (held-out probes, greedy answers)", "", *_summary_table(evaluation), "",
              "## Per category", "", *_category_table(evaluation), "",
              "## Example answers: forget probes", "", *_examples(evaluation, "forget"), "",
              "## Example answers: retain probes", "", *_examples(evaluation, "retain"), "",
              "## Plots", "", "![training curves](plots/training.png)", "",
              "![before and after](plots/before_after.png)", ""]
    if report["masks"] is not None:
        lines += ["![selected neurons](plots/heatmap.png)", ""]
    return "\n".join(lines)


def write_report(run: Path, options: dict, evaluation: dict, training, masks, parameters: dict, seconds: float,
                 concept: str) -> dict:
    """Write report.json, report.md and the training / before-after plots into the run folder."""
    from agml.plots import plot_before_after, plot_training

    report = build_report(options, evaluation, training, masks, parameters, seconds, concept)
    plots = Path(run) / "plots"
    plots.mkdir(exist_ok=True)
    if report["history"]:
        plot_training(report["history"], plots / "training.png")
    plot_before_after(evaluation, plots / "before_after.png")
    write_json(Path(run) / "report.json", report)
    atomic_write_text(Path(run) / "report.md", render_markdown(report))
    return report


# --- terminal tables (agml eval) --------------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _row(label: str, before, after, fmt: Callable[[float | None], str]) -> str:
    return f"{label:<28}{fmt(before):>12}{fmt(after):>12}"


def format_summary(result: dict) -> str:
    """A compact before/after table for the terminal."""
    lines = [f"{'':<28}{'before':>12}{'after':>12}"]
    for kind in ("forget", "retain"):
        n = result["before"][kind]["n"]
        lines.append(_row(f"{kind} pass (n={n})", result["before"][kind]["pass_rate"],
                          result["after"][kind]["pass_rate"], _percent))
        categories = sorted(set(result["before"][kind]["by_category"]) | set(result["after"][kind]["by_category"]))
        for category in categories:
            lines.append(_row(f"  {category}", result["before"][kind]["by_category"].get(category),
                              result["after"][kind]["by_category"].get(category), _percent))
    cloze = result["cloze_logprob"]
    lines.append(_row(f"cloze log p (n={cloze['n']})", cloze["before"], cloze["after"], _number))
    for key, label in (("perplexity", "base perplexity of answers"), ("repetition_rate", "repetition rate"),
                       ("distinct_2", "distinct-2"), ("answer_length", "answer length (words)")):
        lines.append(_row(label, result["fluency"]["before"][key], result["fluency"]["after"][key], _number))
    lines.append(f"{'retain KL (nats/token)':<28}{'':>12}{_number(result['retain_kl']):>12}")
    if "relearn" in result:
        lines.append(format_relearn(result["relearn"]))
    return "\n".join(lines)


def format_relearn(relearn: dict) -> str:
    """The relearning attack's forget pass rates, before and after the attack."""
    rates = relearn["forget_pass"]
    return "\n".join([
        f"relearning attack: {relearn['steps']} steps on {relearn['examples']} forget answers, lr {relearn['lr']:g}",
        f"{'forget pass':<28}{'before':>12}{'after':>12}",
        _row("  unlearned model", rates["unlearned_before_attack"], rates["unlearned_after_attack"],
             _percent),
        _row("  base model", rates["base_before_attack"], rates["base_after_attack"], _percent),
    ])
