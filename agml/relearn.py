"""Relearning attack: how much of the forgotten concept comes back after a little fine-tuning on it?

The attacker takes the unlearned model (the agml adapter merged into a copy of the base weights, then frozen), puts a
fresh plain LoRA (rank 8, every linear layer but the output head) on top and trains it for a few steps on a small
slice of the forget answers (the base model's original answers, i.e. exactly what was meant to be suppressed). The
forget probes are then answered again. For reference the same attack (same LoRA initialisation, data, order, steps and
learning rate) runs on a copy of the base model. The caller's model is never modified; the copies cost one extra model
in memory at a time.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from agml.data import Example, PromptRecord, build_example, collate, conversation_key, pad_token_id
from agml.errors import InputError
from agml.evaluation import probe_passes
from agml.generation import greedy_answers

ATTACK_RANK = 8
DEFAULT_LR = 3e-4
DEFAULT_EXAMPLES = 8
DEFAULT_BATCH_SIZE = 4
_MAX_GRAD_NORM = 1.0


def attack_slice(
    forget_records: Sequence[PromptRecord], probes: Sequence[PromptRecord], n_examples: int, seed: int
) -> list[PromptRecord]:
    """A seeded sample of forget records with answers, none sharing its conversation with a probe."""
    probed = {conversation_key(probe) for probe in probes}
    pool = [r for r in forget_records if r.type == "forget" and r.answer and conversation_key(r) not in probed]
    if not pool:
        raise InputError("the relearning attack needs forget records with answers that are not also probes; found none")
    return random.Random(seed).sample(pool, min(n_examples, len(pool)))


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


def forget_pass_rate(model, tokenizer, probes: Sequence[PromptRecord], max_new_tokens: int, batch_size: int) -> float:
    answers = greedy_answers(model, tokenizer, [p.messages for p in probes], max_new_tokens, batch_size)
    return sum(probe_passes(p, a) for p, a in zip(probes, answers, strict=True)) / len(probes)


def relearn_attack(
    model,
    tokenizer,
    forget_records: Sequence[PromptRecord],
    probes: Sequence[PromptRecord],
    steps: int,
    lr: float = DEFAULT_LR,
    n_examples: int = DEFAULT_EXAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    max_new_tokens: int = 64,
    eval_batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Attack the unlearned PeftModel and, for reference, its base model; forget pass rates before/after each."""
    if steps < 1:
        raise InputError(f"relearning steps must be >= 1, got {steps}")
    if not lr > 0:
        raise InputError(f"relearning learning rate must be > 0, got {lr}")
    if n_examples < 1 or batch_size < 1:
        raise InputError(f"relearning examples and batch size must be >= 1, got {n_examples} and {batch_size}")
    forget_probes = [p for p in probes if p.type == "forget"]
    if not forget_probes:
        raise InputError("the relearning attack needs forget probes; the probe set has none")
    chosen = attack_slice(forget_records, probes, n_examples, seed)
    examples = [build_example(tokenizer, r.messages, r.answer) for r in chosen]
    forget_pass, losses = {}, {}
    for name, make_copy in (("unlearned", merged_copy), ("base", base_copy)):
        attacked = add_attack_lora(make_copy(model), seed)
        forget_pass[f"{name}_before_attack"] = forget_pass_rate(
            attacked, tokenizer, forget_probes, max_new_tokens, eval_batch_size
        )
        losses[name] = train_steps(
            attacked, tokenizer, examples, steps, lr, batch_size, seed, f"relearn ({name})" if progress else None
        )
        forget_pass[f"{name}_after_attack"] = forget_pass_rate(
            attacked, tokenizer, forget_probes, max_new_tokens, eval_batch_size
        )
        del attacked
    return {
        "forget_pass": {key: forget_pass[key] for key in (
            "unlearned_before_attack", "unlearned_after_attack", "base_before_attack", "base_after_attack"
        )},
        "steps": steps,
        "examples": len(examples),
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "probes": len(forget_probes),
        "losses": losses,
    }
