"""Relearning attack: how much of the forgotten concept comes back after a little fine-tuning on it?

The attacker takes the unlearned model (the agml adapter merged into a copy of the base weights) and fine-tunes it on
facts about the concept that the probes do NOT ask (`<slug>_relearn.jsonl`: records with a written `answer`, checked
disjoint from the probes), each answer in full, ended by the chat template's own end-of-turn marker (nothing cut,
nothing appended: a cut answer with an end-of-turn teaches the model to answer briefly, which lowers leaks by itself).
Two attackers:

* `lora` (default): a fresh plain LoRA (rank 8) on every linear layer but the output head; lr 1e-3.
* `full`: every weight of the copy is trained; lr 1e-5 (a full fine-tune at 1e-3 wrecks a small model).

The forget probes are then answered again and judged with agml.judges (a leak = the answer names the concept or a
key fact). The same attack (same initialisation, data, order, steps, learning rate) runs on a copy of the base model
as the control: it shows what the attack data alone does to the leak rate.

recovery = (leak_after_attack - leak_after_unlearning) / (leak_base - leak_after_unlearning), all on the unlearned
model except leak_base (the base model before the attack): 0 = nothing came back, 1 = back to the base's leak rate.
It is undefined (None) when unlearning removed no leaks on these probes (denominator <= 0).

`held_out` repeats the count with only the leak terms the attack data does not contain (`taught_terms`): the attack
data names the concept and several key facts, so an attacked model that repeats them has been taught them again,
which says little about whether the unlearned weights still hold what was not taught (the held-out-facts test of
relearning attacks). Both are reported; `recovery` is the stricter one.

The caller's model is never modified; the copies cost one extra model in memory at a time.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from agml.data import Example, PromptRecord, build_example, collate, conversation_key, load_prompts, pad_token_id
from agml.errors import InputError
from agml.generation import greedy_answers
from agml.judges import contains_term, judge_probe, leak_terms, normalise
from agml.stats import rate

ATTACK_RANK = 8
DEFAULT_STEPS = 50
DEFAULT_LR = 1e-3
DEFAULT_FULL_LR = 1e-5
DEFAULT_EXAMPLES = 64
DEFAULT_BATCH_SIZE = 4
VARIANTS = ("lora", "full")
_MAX_GRAD_NORM = 1.0


# --- attack data ---------------------------------------------------------------------------------------------------


def load_attack_records(path) -> list[PromptRecord]:
    """Read a relearning-attack JSONL file (probe schema, every record with an `answer`)."""
    records = load_prompts(path, default_type="forget")
    unanswered = [r.source for r in records if not r.answer]
    if unanswered:
        raise InputError(f"relearning-attack records need an 'answer'; missing at {', '.join(unanswered[:3])}")
    return records


def check_disjoint(attack_records: Sequence[PromptRecord], probes: Sequence[PromptRecord]) -> None:
    """Refuse attack data that asks what a probe asks (same normalised conversation)."""
    probed = {conversation_key(p) for p in probes}
    shared = [r for r in attack_records if conversation_key(r) in probed]
    if shared:
        listed = "; ".join(repr(r.prompt) for r in shared[:3])
        raise InputError(f"{len(shared)} relearning-attack record(s) ask what a probe asks, e.g. {listed}: "
                         "the attack must train on facts the probes do not ask")


def attack_slice(
    records: Sequence[PromptRecord], probes: Sequence[PromptRecord], n_examples: int, seed: int
) -> list[PromptRecord]:
    """A seeded sample of at most n_examples answered records (in file order when all fit), disjoint from the probes."""
    pool = [r for r in records if r.answer]
    if not pool:
        raise InputError("the relearning attack needs records with answers (relearn data or forget records with "
                         "answers); found none")
    check_disjoint(pool, probes)
    if n_examples >= len(pool):
        return list(pool)
    return random.Random(seed).sample(pool, n_examples)


# --- model copies --------------------------------------------------------------------------------------------------


def merged_copy(peft_model) -> torch.nn.Module:
    """A standalone copy of the model with its adapter merged into the weights."""
    return copy.deepcopy(peft_model).merge_and_unload()


def base_copy(peft_model) -> torch.nn.Module:
    """A standalone copy of the base model (the adapter removed, not merged)."""
    return copy.deepcopy(peft_model).unload()


def add_attack_lora(model: torch.nn.Module, seed: int, rank: int = ATTACK_RANK):
    """A fresh plain LoRA on every linear layer except the output head; seeded so both attacks start alike."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def attacker(model: torch.nn.Module, variant: str, seed: int) -> torch.nn.Module:
    """The copy prepared for the attack: a fresh LoRA on it, or all its weights trainable."""
    if variant == "lora":
        return add_attack_lora(model, seed)
    model.requires_grad_(True)
    return model


# --- training and judging ------------------------------------------------------------------------------------------


def train_steps(
    model, tokenizer, examples: Sequence[Example], steps: int, lr: float, batch_size: int, seed: int,
    desc: str | None = None,
) -> list[float]:
    """AdamW on the NLL of the examples' answers, cycling through them in a seeded order; the loss of each step."""
    pad = pad_token_id(tokenizer)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    device = next(model.parameters()).device
    model.train()
    losses = []
    for step in tqdm(range(steps), desc=desc, disable=desc is None, leave=False):
        rows = [order[(step * batch_size + i) % len(order)] for i in range(min(batch_size, len(order)))]
        batch = {k: v.to(device) for k, v in collate([examples[r] for r in rows], pad).items()}
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, _MAX_GRAD_NORM)
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def leaked_answers(
    model, tokenizer, probes: Sequence[PromptRecord], facts: Mapping | None, max_new_tokens: int, batch_size: int
) -> tuple[list[str], list[tuple[str, ...]]]:
    """The model's greedy answers to the forget probes and the leak terms each names (agml.judges.judge_probe)."""
    answers = greedy_answers(model, tokenizer, [p.messages for p in probes], max_new_tokens, batch_size)
    return answers, [judge_probe(p, a, facts).leaked_terms for p, a in zip(probes, answers, strict=True)]


def taught_terms(attack_records: Sequence[PromptRecord], probes: Sequence[PromptRecord],
                 facts: Mapping | None) -> list[str]:
    """The probes' leak terms that the attack data itself contains (in a prompt or an answer), sorted."""
    text = normalise(" ".join(" ".join(m["content"] for m in r.messages) + " " + (r.answer or "")
                              for r in attack_records))
    terms = {term for probe in probes for term in leak_terms(probe, facts)}
    return sorted(term for term in terms if contains_term(text, term))


def recovery(leak_base: float, leak_unlearned: float, leak_attacked: float) -> float | None:
    """(attacked - unlearned) / (base - unlearned); None when unlearning removed no leaks (denominator <= 0)."""
    removed = leak_base - leak_unlearned
    return None if removed <= 0 else (leak_attacked - leak_unlearned) / removed


def _check_arguments(steps: int, lr: float, n_examples: int, batch_size: int, variant: str) -> None:
    if steps < 1:
        raise InputError(f"relearning steps must be >= 1, got {steps}")
    if not lr > 0:
        raise InputError(f"relearning learning rate must be > 0, got {lr}")
    if n_examples < 1 or batch_size < 1:
        raise InputError(f"relearning examples and batch size must be >= 1, got {n_examples} and {batch_size}")
    if variant not in VARIANTS:
        raise InputError(f"relearning variant must be one of {list(VARIANTS)}, got {variant!r}")


def relearn_attack(
    model,
    tokenizer,
    attack_records: Sequence[PromptRecord],
    probes: Sequence[PromptRecord],
    steps: int = DEFAULT_STEPS,
    lr: float | None = None,
    n_examples: int = DEFAULT_EXAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    max_new_tokens: int = 64,
    eval_batch_size: int = 16,
    progress: bool = True,
    facts: Mapping | None = None,
    variant: str = "lora",
) -> dict:
    """Attack the unlearned PeftModel and, as the control, its base model; leak rates, recovery (module docstring).

    `lr` defaults to 1e-3 for the LoRA attacker and 1e-5 for the full fine-tune.
    """
    lr = (DEFAULT_LR if variant == "lora" else DEFAULT_FULL_LR) if lr is None else lr
    _check_arguments(steps, lr, n_examples, batch_size, variant)
    forget_probes = [p for p in probes if p.type == "forget"]
    if not forget_probes:
        raise InputError("the relearning attack needs forget probes; the probe set has none")
    chosen = attack_slice(attack_records, probes, n_examples, seed)
    examples = [build_example(tokenizer, r.messages, r.answer) for r in chosen]
    answers, terms, losses = {}, {}, {}

    def judge(attacked, key: str) -> None:
        answers[key], terms[key] = leaked_answers(attacked, tokenizer, forget_probes, facts, max_new_tokens,
                                                  eval_batch_size)

    for name, make_copy in (("unlearned", merged_copy), ("base", base_copy)):
        attacked = attacker(make_copy(model), variant, seed)
        judge(attacked, f"{name}_before_attack")
        losses[name] = train_steps(
            attacked, tokenizer, examples, steps, lr, batch_size, seed, f"relearn ({name})" if progress else None
        )
        judge(attacked, f"{name}_after_attack")
        del attacked
    n = len(forget_probes)
    order = ("unlearned_before_attack", "unlearned_after_attack", "base_before_attack", "base_after_attack")
    taught = taught_terms(chosen, forget_probes, facts)
    summary = _leak_summary({key: [bool(found) for found in terms[key]] for key in order}, n)
    leak_rate = summary["leak_rate"]
    return {
        "variant": variant,
        **summary,
        # Pass rate = 1 - leak rate, in the shape `agml eval` printed before.
        "forget_pass": {key: 1.0 - leak_rate[key] for key in order},
        "base_control_change": leak_rate["base_after_attack"] - leak_rate["base_before_attack"],
        "held_out": {"taught_terms": taught, **_leak_summary(
            {key: [bool(set(found) - set(taught)) for found in terms[key]] for key in order}, n)},
        "steps": steps,
        "examples": len(examples),
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "probes": n,
        "losses": losses,
        # Per forget probe, each model's answer and the leak terms it names: what the attack brought back, readable.
        "answers": [{"prompt": probe.prompt,
                     **{key: {"answer": answers[key][i], "leaked": bool(terms[key][i]),
                              "leaked_terms": list(terms[key][i])} for key in order}}
                    for i, probe in enumerate(forget_probes)],
    }


def _leak_summary(flags: Mapping[str, list[bool]], n: int) -> dict:
    """Leak rates, leak counts with intervals and the recovery, from each model's per-probe leak flags."""
    leak_rate = {key: sum(values) / n for key, values in flags.items()}
    return {"leak_rate": leak_rate, "leaks": {key: rate(sum(values), n) for key, values in flags.items()},
            "recovery": recovery(leak_rate["base_before_attack"], leak_rate["unlearned_before_attack"],
                                 leak_rate["unlearned_after_attack"])}
