"""The unlearning training loop: seeded, resumable, validated, early-stopping.

Reproducibility: every random choice of a step is derived from (seed, step) alone. The batch contents come from
per-epoch permutations seeded by (seed, stream, epoch), and each step runs under a forked torch RNG seeded by
(seed, step), so dropout inside the adapter is reproducible too. A run resumed from a checkpoint therefore ends
with bitwise the same adapter as an uninterrupted run.

Checkpoints hold only tensors (safetensors) and scalars/history (JSON); nothing is pickled.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from tqdm.auto import tqdm

from agml import answer_cache, distributed
from agml.checkpoints import load_checkpoint, save_checkpoint
from agml.data import Example, PromptRecord, build_example, collate, pad_token_id
from agml.entities import entity_positions
from agml.errors import InputError
from agml.evaluation import probe_passes
from agml.generation import greedy_answers
from agml.logprobs import answer_logits, base_answer_logits, kl_per_token
from agml.objectives import Objective, UnlearnBatch
from agml.options import TrainOptions

_FORGET_STREAM, _RETAIN_STREAM, _SPLIT_STREAM, _STEP_STREAM = range(4)


@dataclass
class TrainResult:
    history: list[dict]  # one entry per step: step, loss, forget_loss, retain_kl, lr, seconds (+ val_* when evaluated)
    steps_done: int
    stopped_early: bool
    validation: dict | None  # the last validation, None when there is no validation slice
    seconds: float = 0.0  # wall time of this call's training steps (validation included)


# --- deterministic randomness ------------------------------------------------------------------------------


def derived_seed(seed: int, stream: int, index: int) -> int:
    """A 63-bit seed that depends only on (seed, stream, index)."""
    digest = hashlib.sha256(f"agml:{seed}:{stream}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


@lru_cache(maxsize=64)
def _permutation(n: int, seed: int, stream: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(derived_seed(seed, stream, epoch))
    return tuple(torch.randperm(n, generator=generator).tolist())


def batch_indices(n: int, batch_size: int, seed: int, stream: int, step: int) -> list[int]:
    """Example indices of a step's batch: consecutive slices of per-epoch permutations (every example once an epoch)."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [_permutation(n, seed, stream, p // n)[p % n] for p in positions]


def split_validation(records: Sequence[PromptRecord], fraction: float, seed: int,
                     stream: int) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train, validation): a seeded random `fraction` held out, always leaving at least one training record."""
    count = min(round(fraction * len(records)), len(records) - 1)
    if count <= 0:
        return list(records), []
    generator = torch.Generator().manual_seed(derived_seed(seed, _SPLIT_STREAM, stream))
    order = torch.randperm(len(records), generator=generator)
    held = set(order[:count].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


# --- examples and reference log-probabilities --------------------------------------------------------------


def _answer_of(record: PromptRecord) -> str:
    if record.answer is None:
        raise InputError(f"{record.type} prompt {record.prompt!r} has no answer; generate the base answers first")
    return record.answer


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _collate(examples: Sequence[Example], pad: int) -> dict[str, torch.Tensor]:
    # Left padding puts every answer at the end, where the answer-position logits are cheap to select.
    return collate(examples, pad, padding_side="left")


@torch.no_grad()
def _mean_token_logprobs(model, examples: Sequence[Example], pad: int, batch_size: int, base: bool) -> torch.Tensor:
    """Mean log-probability per answer token of each example, (n,), under the model or its base (adapter off)."""
    values = []
    for chunk in _chunks(examples, batch_size):
        batch = _collate(chunk, pad)
        out = base_answer_logits(model, batch) if base else answer_logits(model, batch)
        tokens = out.per_sequence_sum(torch.ones_like(out.targets, dtype=torch.float32))
        values.append((out.per_sequence_sum(out.token_logprobs()) / tokens).cpu())
    return torch.cat(values)


@torch.no_grad()
def _reference_sequence_logprobs(model, examples: Sequence[Example], pad: int, batch_size: int) -> torch.Tensor:
    """Summed base log-probability of each example's answer (NPO's reference), computed once up front."""
    values = []
    for chunk in _chunks(examples, batch_size):
        out = base_answer_logits(model, _collate(chunk, pad))
        values.append(out.per_sequence_sum(out.token_logprobs()).cpu())
    return torch.cat(values)


# --- validation ---------------------------------------------------------------------------------------------


class Validator:
    """Checks, on held-out forget prompts, whether the concept is forgotten and whether retain KL is within budget.

    A forget prompt with forbidden terms passes when the greedy answer contains none of them (case-insensitive).
    A forget prompt without forbidden terms passes when the mean per-token log-probability of its base answer has
    dropped by at least `val_logprob_drop` nats under the adapter. Retain KL is KL(base || model) per answer token on
    the held-out retain prompts (or on the training retain prompts when there are too few to hold any out).
    """

    def __init__(self, model, tokenizer, forget: Sequence[PromptRecord], retain: Sequence[PromptRecord],
                 config: TrainOptions) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.pad = pad_token_id(tokenizer)
        self.by_terms = [r for r in forget if r.forbidden]
        self.by_logprob = [build_example(tokenizer, r.messages, _answer_of(r)) for r in forget if not r.forbidden]
        self.retain = [build_example(tokenizer, r.messages, _answer_of(r)) for r in retain]
        self.base_logprobs = (_mean_token_logprobs(model, self.by_logprob, self.pad, config.val_batch_size,
                                                   base=True) if self.by_logprob else None)

    @property
    def n_forget(self) -> int:
        return len(self.by_terms) + len(self.by_logprob)

    def __call__(self, step: int) -> dict:
        passes = 0
        if self.by_terms:
            answers = greedy_answers(self.model, self.tokenizer, [r.messages for r in self.by_terms],
                                     max_new_tokens=self.config.max_new_tokens_val,
                                     batch_size=self.config.val_batch_size)
            passes += sum(probe_passes(r, a) for a, r in zip(answers, self.by_terms, strict=True))
        if self.by_logprob:
            now = _mean_token_logprobs(self.model, self.by_logprob, self.pad, self.config.val_batch_size, base=False)
            passes += int(((self.base_logprobs - now) >= self.config.val_logprob_drop).sum())
        forget_pass = passes / self.n_forget
        kl = self.retain_kl()
        return {
            "step": step, "forget_pass": forget_pass, "n_forget": self.n_forget, "retain_kl": kl,
            "n_retain": len(self.retain), "forgotten": forget_pass >= self.config.forget_pass_target,
            "within_budget": kl <= self.config.kl_budget,
        }

    @torch.no_grad()
    def retain_kl(self) -> float:
        was_training = self.model.training
        self.model.eval()
        total, tokens = 0.0, 0
        for chunk in _chunks(self.retain, self.config.val_batch_size):
            batch = _collate(chunk, self.pad)
            current = answer_logits(self.model, batch)
            total += float(kl_per_token(base_answer_logits(self.model, batch), current)) * len(current.targets)
            tokens += len(current.targets)
        self.model.train(was_training)
        return total / tokens


# --- trainable parameters ---------------------------------------------------------------------------------


def _trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    if not params:
        raise InputError("the model has no trainable LoRA parameters (attach an adapter first)")
    return params


# --- the loop -----------------------------------------------------------------------------------------------


@dataclass
class _Data:
    forget: list[Example]
    retain: list[Example]
    forget_reference: torch.Tensor | None
    pad: int
    shared_token_ids: Sequence[Sequence[int]] = ()
    shared_fact_kl_weight: float = 1.0
    retain_base_states: list[torch.Tensor] | None = None  # per step; set by train_unlearning

    def retain_batch(self, config: TrainOptions, step: int) -> dict[str, torch.Tensor]:
        # Every process draws the same global batch and trains on its shard of it (data parallelism).
        r_idx = distributed.shard(batch_indices(len(self.retain), config.batch_size, config.seed, _RETAIN_STREAM, step))
        batch = _collate([self.retain[i] for i in r_idx], self.pad)
        if self.shared_token_ids and self.shared_fact_kl_weight != 1.0:
            shared = entity_positions(batch["input_ids"], self.shared_token_ids).float()
            batch["kl_weights"] = 1.0 + (self.shared_fact_kl_weight - 1.0) * shared
        return batch

    def batch(self, config: TrainOptions, step: int) -> UnlearnBatch:
        f_idx = distributed.shard(batch_indices(len(self.forget), config.batch_size, config.seed, _FORGET_STREAM, step))
        reference = self.forget_reference[f_idx] if self.forget_reference is not None else None
        states = self.retain_base_states[step] if self.retain_base_states is not None else None
        return UnlearnBatch(_collate([self.forget[i] for i in f_idx], self.pad), self.retain_batch(config, step),
                            reference, states)


def _rng_devices(model: torch.nn.Module) -> list[torch.device]:
    device = next(model.parameters()).device
    return [device] if device.type == "cuda" else []


def _train_step(model, objective: Objective, optimizer, params, data: _Data, config: TrainOptions,
                step: int) -> dict[str, float]:
    with torch.random.fork_rng(devices=_rng_devices(model)):
        torch.manual_seed(derived_seed(config.seed, _STEP_STREAM, step))
        metrics = objective(model, data.batch(config, step))
        optimizer.zero_grad(set_to_none=True)
        metrics["loss"].backward()
        distributed.average_gradients(p for _, p in params)
        torch.nn.utils.clip_grad_norm_([p for _, p in params], config.max_grad_norm)
        optimizer.step()
    names = sorted(metrics)
    local = torch.stack([metrics[k].detach().float() for k in names])
    values = distributed.sum_across(local) / distributed.world_size()  # metrics of the whole (global) batch
    return dict(zip(names, values.tolist(), strict=True))


def train_unlearning(
    model,
    tokenizer,
    forget: list[PromptRecord],
    retain: list[PromptRecord],
    config: TrainOptions,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    shared_token_ids: Sequence[Sequence[int]] = (),
    fingerprint: str | None = None,
) -> TrainResult:
    """Train the model's adapter to forget `forget` while staying close to the base model on `retain`.

    Records carry `answer` (the base model's greedy answers). A seeded `val_fraction` of the forget prompts (and of
    the retain prompts) is held out for validation every `eval_every` steps; with `early_stop`, training stops once
    the held-out forget prompts pass and retain KL is within `kl_budget`. Checkpoints go to `checkpoint_dir` every
    `checkpoint_every` steps and at the end; `resume=True` continues from the checkpoint there, if any.
    `shared_token_ids`: token sequences of facts the concept shares with its neighbours; the retain KL on the
    answer tokens that spell them is scaled by `config.shared_fact_kl_weight`. `fingerprint` (the base model's,
    `agml.answer_cache.base_fingerprint`) lets the retain KL read the base side from cached answer states instead of
    a base pass per step: the retain answers are the base model's own (cached) answers, so are their base logits.
    """
    if not forget or not retain:
        raise InputError(f"unlearning needs forget and retain prompts (got {len(forget)} forget, {len(retain)} retain)")
    if resume and checkpoint_dir is None:
        raise InputError("resume needs a checkpoint directory")
    if config.batch_size < distributed.world_size():
        raise InputError(f"batch_size {config.batch_size} is smaller than the {distributed.world_size()} processes")
    objective = config.make_objective()
    train_forget, val_forget = split_validation(forget, config.val_fraction, config.seed, _FORGET_STREAM)
    train_retain, val_retain = split_validation(retain, config.val_fraction, config.seed, _RETAIN_STREAM)
    pad = pad_token_id(tokenizer)
    params = _trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=config.lr, weight_decay=config.weight_decay)

    was_training = model.training
    model.eval()
    forget_examples = [build_example(tokenizer, r.messages, objective.forget_answer(r), objective.forget_answer_ends(r))
                       for r in train_forget]
    retain_examples = [build_example(tokenizer, r.messages, _answer_of(r)) for r in train_retain]
    reference = (_reference_sequence_logprobs(model, forget_examples, pad, config.batch_size)
                 if objective.needs_forget_reference else None)
    data = _Data(forget_examples, retain_examples, reference, pad, shared_token_ids, config.shared_fact_kl_weight)
    if objective.reads_retain_base_states:
        # The base side of every step's retain KL, computed on the very batches the steps draw (so the numbers are
        # those of a base pass inside the step) and cached across runs with the base answers they are made of.
        data.retain_base_states = answer_cache.cached_base_answer_states(
            fingerprint, "retain-train-states", model, [data.retain_batch(config, s) for s in range(config.steps)],
            "retain answers (base)" if progress else None)
    validator = Validator(model, tokenizer, val_forget, val_retain or train_retain, config) if val_forget else None

    start, history, stopped_early, validation = 0, [], False, None
    meta = load_checkpoint(Path(checkpoint_dir), params, optimizer, config) if resume else None
    if meta is not None:
        start, history = meta["step"], meta["history"]
        stopped_early, validation = meta["stopped_early"] and config.early_stop, meta["validation"]

    started = time.perf_counter()
    last_saved = start if meta is not None else -1
    bar = tqdm(total=config.steps, initial=start, desc="unlearning", disable=not progress or stopped_early)
    step = start
    model.train()
    while step < config.steps and not stopped_early:
        tick = time.perf_counter()
        metrics = _train_step(model, objective, optimizer, params, data, config, step)
        step += 1
        entry = {"step": step, **metrics, "lr": optimizer.param_groups[0]["lr"],
                 "seconds": time.perf_counter() - tick}
        if validator is not None and (step % config.eval_every == 0 or step == config.steps):
            validation = distributed.broadcast(validator(step))  # one early-stop decision for all processes
            entry.update(val_forget_pass=validation["forget_pass"], val_retain_kl=validation["retain_kl"])
            # Passing at the last step is not an early stop (and must not block a resume with more steps).
            stopped_early = (config.early_stop and step < config.steps and validation["forgotten"]
                             and validation["within_budget"])
        history.append(entry)
        bar.update(1)
        bar.set_postfix(forget=f"{metrics['forget_loss']:.3f}", kl=f"{metrics['retain_kl']:.4f}")
        if checkpoint_dir is not None and step % config.checkpoint_every == 0 and distributed.is_main():
            save_checkpoint(Path(checkpoint_dir), params, optimizer, step, history, config, stopped_early, validation)
            last_saved = step
    bar.close()
    if checkpoint_dir is not None and last_saved != step and distributed.is_main():
        save_checkpoint(Path(checkpoint_dir), params, optimizer, step, history, config, stopped_early, validation)
    model.train(was_training)
    return TrainResult(history, step, stopped_early, validation, time.perf_counter() - started)
