"""Figures written into run folders (matplotlib, Agg backend: no display needed). One function per plot."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402
from matplotlib.colors import SymLogNorm  # noqa: E402


def plot_heatmap(scores, masks, path: str | os.PathLike, score: str | None = None,
                 retain_weight: float | None = None) -> Path:
    """Layers x neurons image of the forget-vs-retain contrast, selected neurons marked; returns the path.

    `score` and `retain_weight` default to those the masks were built with (their meta), so the image shows the
    quantity the selection ranked. The colour scale is symmetric-logarithmic around zero: contrasts span orders
    of magnitude, and red (forget-specific) vs blue (retain-specific) must stay visible for small values too.
    """
    score = score or masks.meta.get("score", "fisher")
    retain_weight = masks.meta.get("retain_weight", 1.0) if retain_weight is None else retain_weight
    contrast = scores.contrast(score, retain_weight).numpy()
    num_layers, width = contrast.shape
    limit = float(abs(contrast).max()) or 1.0
    nonzero = abs(contrast[contrast != 0])
    linear = float(torch.quantile(torch.from_numpy(nonzero).double(), 0.9)) if nonzero.size else limit
    norm = SymLogNorm(linthresh=max(linear, limit * 1e-6), vmin=-limit, vmax=limit, base=10)

    fig, ax = plt.subplots(figsize=(12, max(3.0, 0.22 * num_layers + 1.5)), dpi=150)
    image = ax.imshow(contrast, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest",
                      origin="lower", extent=(-0.5, width - 0.5, -0.5, num_layers - 0.5))
    rows = [(layer, int(n)) for layer, ids in masks.items() for n in ids]
    if rows:
        ax.scatter([n for _, n in rows], [layer for layer, _ in rows], s=9, marker="s", facecolors="none",
                   edgecolors="black", linewidths=0.6, label=f"selected ({len(rows)})")
        ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    ax.set_xlabel("MLP neuron (down_proj input)")
    ax.set_ylabel("decoder layer")
    ax.set_yticks(range(0, num_layers, max(1, num_layers // 15)))
    weight = "" if retain_weight == 1 else f"{retain_weight:g} x "
    ax.set_title(f"{score} contrast: forget - {weight}retain importance (per token, normalised per set and layer; "
                 f"{scores.forget_tokens} forget / {scores.retain_tokens} retain tokens)", fontsize=10)
    fig.colorbar(image, ax=ax, label="forget-specific (red) / retain-specific (blue)", pad=0.01)
    return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_training(history: list[dict], path: str | os.PathLike) -> Path | None:
    """Training curves: forget loss and retain KL per step."""
    steps = [h["step"] for h in history]
    fig, (ax_forget, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_forget.plot(steps, [h.get("forget_loss") for h in history], color="tab:red")
    ax_forget.set(title="forget loss", xlabel="step")
    ax_kl.plot(steps, [h.get("retain_kl") for h in history], color="tab:blue")
    ax_kl.set(title="retain KL (nats/token)", xlabel="step")
    for ax in (ax_forget, ax_kl):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _bar_series(evaluation: dict) -> tuple[list[str], dict[str, list[tuple[float | None, list | None]]]]:
    """Labels and, per side, (rate, [low, high]) of the headline rates then every category."""
    labels: list[str] = []
    sides: dict[str, list] = {"before": [], "after": []}
    for kind in ("forget", "retain"):
        labels.append(f"{kind}\nall")
        for side in sides:
            rates = evaluation[side][kind]
            sides[side].append((rates.get("pass_rate"), rates.get("interval")))
    capability = evaluation.get("capability")
    if capability:
        mc = capability["mc"]
        labels.append(f"general\nknowledge\n({mc['headline']})")
        for side in sides:
            sides[side].append((mc[side][mc["headline"]], mc[side].get("interval")))
    for kind in ("forget", "retain"):
        for category in sorted(evaluation["before"][kind].get("by_category", {})):
            labels.append(f"{kind}\n{category}")
            for side in sides:
                rates = evaluation[side][kind]
                sides[side].append((rates["by_category"].get(category),
                                    rates.get("by_category_interval", {}).get(category)))
    return labels, sides


def _error_bars(series: list[tuple[float | None, list | None]]) -> list[list[float]]:
    """Asymmetric error bars (below, above) from 95% intervals; zero where a rate has none."""
    below, above = [], []
    for value, interval in series:
        if value is None or not interval:
            below.append(0.0)
            above.append(0.0)
        else:
            below.append(max(0.0, value - interval[0]))
            above.append(max(0.0, interval[1] - value))
    return [below, above]


def plot_before_after(evaluation: dict, path: str | os.PathLike) -> Path | None:
    """Pass rates (all probes of a type, then per category) and general-knowledge accuracy, base vs unlearned, with
    95% Wilson intervals as error bars."""
    labels, sides = _bar_series(evaluation)
    if not labels:
        return None
    xs = range(len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels)), 4.2))
    width = 0.4
    for offset, side, label, colour in ((-width / 2, "before", "base", "tab:gray"),
                                        (width / 2, "after", "unlearned", "tab:green")):
        values = [v or 0 for v, _ in sides[side]]
        ax.bar([x + offset for x in xs], values, width, label=label, color=colour,
               yerr=_error_bars(sides[side]), capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(list(xs), labels, fontsize=7)
    split = evaluation.get("split")
    ax.set(ylim=(0, 1.05), ylabel="pass rate / accuracy",
           title=f"before and after ({split or 'unlabelled'} probes; bars: 95% Wilson intervals)")
    ax.legend()
    return _save(fig, path)
