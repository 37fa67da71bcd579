"""The noise floor: how many retain answers flip under a random adapter the size of the trained one.

The built-in model is small enough that any perturbation changes some greedy answers. A retain loss within what a
random adapter causes is noise; above it, damage. The random adapter matches the trained one in everything but the
learned direction: same layers, same number of neurons per layer, same rank, alpha and projections, and each of its
compact factors (lora_A, lora_B per projection) is Gaussian noise rescaled to the trained factor's Frobenius norm.

Which neurons: by default the SAME neurons as the trained adapter (`neurons="same"`). The trained adapter's effect
is then compared with a random one that writes exactly where it writes, so the only difference is the learned
direction; and the selected neurons are concept-related, so random noise there is the stricter (larger) floor.
`neurons="random"` draws the same number of neurons per layer uniformly instead: the floor of a masked adapter of
this size anywhere in the MLPs.

Flips are counted against the base model's own answers (adapter disabled), with agml.judges.judge_probe:
pass -> fail, fail -> pass, and answers whose text changed at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from peft.tuners.lora.layer import LoraLayer

from agml.data import PromptRecord
from agml.errors import InputError
from agml.generation import greedy_answers
from agml.judges import judge_probe
from agml.layers import adapter_masks, apply_lora, apply_masked_lora
from agml.masks import NeuronMasks
from agml.stats import spread

NOISE_ADAPTER = "agml_noise"
NEURON_CHOICES = ("same", "random")
DEFAULT_SEEDS = (0, 1, 2)


def _projections(config) -> list[str]:
    targets = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules)
    return sorted({name.rsplit(".", 1)[-1] for name in targets})


def random_masks_like(masks: NeuronMasks, intermediate_size: int, generator: torch.Generator) -> NeuronMasks:
    """As many uniformly drawn neurons per layer as `masks` holds, sorted."""
    return NeuronMasks({
        layer: torch.randperm(intermediate_size, generator=generator)[:ids.numel()].sort().values
        for layer, ids in masks.items()
    }, meta=masks.meta)


def add_noise_adapter(
    model, seed: int, neurons: str = "same", adapter_name: str = "default", noise_name: str = NOISE_ADAPTER
):
    """Add (not activate) a random adapter shaped and scaled like `adapter_name`; see the module docstring."""
    if neurons not in NEURON_CHOICES:
        raise InputError(f"neurons must be one of {list(NEURON_CHOICES)}, got {neurons!r}")
    if not hasattr(model, "peft_config") or adapter_name not in model.peft_config:
        raise InputError(f"the noise floor needs a PeftModel with an adapter named {adapter_name!r}")
    config = model.peft_config[adapter_name]
    generator = torch.Generator().manual_seed(seed)
    masks = adapter_masks(model, adapter_name)
    shape = dict(r=config.r, alpha=config.lora_alpha, targets=_projections(config), adapter_name=noise_name)
    if len(masks):
        if neurons == "random":
            masks = random_masks_like(masks, int(masks.meta["intermediate_size"]), generator)
        apply_masked_lora(model, masks, **shape)
    else:  # a plain LoRA run (--method lora): the same LoRA on the same projections
        apply_lora(model, **shape)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer) and noise_name in module.lora_A:
                for store in (module.lora_A, module.lora_B):
                    trained, noise = store[adapter_name].weight, store[noise_name].weight
                    values = torch.randn(noise.shape, generator=generator, dtype=torch.float32)
                    values *= trained.float().norm() / values.norm()
                    noise.copy_(values.to(noise.dtype))
    return model


@contextlib.contextmanager
def noise_adapter_active(model, seed: int, neurons: str = "same", adapter_name: str = "default") -> Iterator[None]:
    """The model with a random adapter in place of the trained one; restored (adapter deleted) afterwards."""
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    add_noise_adapter(model, seed, neurons, adapter_name)
    try:
        model.set_adapter(NOISE_ADAPTER)
        yield
    finally:
        model.set_adapter(adapter_name)
        model.delete_adapter(NOISE_ADAPTER)
        for name, param in model.named_parameters():
            param.requires_grad_(trainable.get(name, False))


def flip_counts(
    records: Sequence[PromptRecord], before: Sequence[str], after: Sequence[str], facts: Mapping | None = None
) -> dict:
    """pass -> fail, fail -> pass and changed-text counts of the retain probes between two sets of answers, and the
    pass -> fail count per probe category (`pass_to_fail_by_category`, categories with none left out): whether a
    trained adapter breaks the same kinds of answers as a random one."""
    counts = {"pass_to_fail": 0, "fail_to_pass": 0, "changed": 0, "n": 0}
    by_category: dict[str, int] = {}
    for record, old, new in zip(records, before, after, strict=True):
        if record.type != "retain":
            continue
        was, now = judge_probe(record, old, facts).passed, judge_probe(record, new, facts).passed
        counts["pass_to_fail"] += was and not now
        counts["fail_to_pass"] += now and not was
        counts["changed"] += old.strip() != new.strip()
        counts["n"] += 1
        if was and not now:
            by_category[record.category] = by_category.get(record.category, 0) + 1
    return {**counts, "pass_to_fail_by_category": dict(sorted(by_category.items()))}


def noise_floor(
    model,
    tokenizer,
    probes: Sequence[PromptRecord],
    seeds: Sequence[int] = DEFAULT_SEEDS,
    facts: Mapping | None = None,
    neurons: str = "same",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    base_answers: Sequence[str] | None = None,
    adapter_name: str = "default",
) -> dict:
    """Retain flips vs the base under a random adapter, per seed and summarised (mean/std/min/max over seeds).

    `base_answers` (the base model's greedy answers to the retain probes, in order) saves regenerating them.
    """
    retain = [p for p in probes if p.type == "retain"]
    if not retain:
        raise InputError("the noise floor needs retain probes; the probe set has none")
    if not seeds:
        raise InputError("the noise floor needs at least one seed")
    conversations = [p.messages for p in retain]
    if base_answers is None:
        with model.disable_adapter():
            base_answers = greedy_answers(model, tokenizer, conversations, max_new_tokens, batch_size)
    elif len(base_answers) != len(retain):
        raise InputError(f"{len(base_answers)} base answers for {len(retain)} retain probes")
    per_seed = []
    for seed in seeds:
        with noise_adapter_active(model, seed, neurons, adapter_name):
            answers = greedy_answers(model, tokenizer, conversations, max_new_tokens, batch_size)
        per_seed.append({"seed": seed, **flip_counts(retain, base_answers, answers, facts)})
    return {
        "neurons": neurons,
        "n": len(retain),
        "per_seed": per_seed,
        **{key: spread([s[key] for s in per_seed]) for key in ("pass_to_fail", "fail_to_pass", "changed")},
    }
