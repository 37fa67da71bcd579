"""The one place where answer-token logits, log-probabilities and KL(base || model) are computed.

Every caller works on batches made by `agml.data.collate` (labels only on assistant-answer tokens, IGNORE_INDEX
elsewhere, either padding side). Position t predicts token t + 1, so the positions that matter are those whose NEXT
label is an answer token. Only those positions are projected onto the vocabulary (`logits_to_keep` with a boolean
`(batch, seq)` mask on Llama/Qwen2-style models), which saves most of the `lm_head` work and memory for large
vocabularies. Position ids follow the attention mask, so left- and right-padded batches see the same positions.

"Base" always means the SAME model with its adapter disabled (`adapter_disabled`), never a second copy: a fresh
LoRA adapter (B = 0) therefore starts at KL = 0. See docs/architecture.md ("Log-probabilities").
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from agml.data import IGNORE_INDEX, Example, collate
from agml.errors import InputError
from agml.layers import adapter_merged


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only (as in generation), whichever side the batch is padded."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model: `model` with its adapter switched off for the duration of the block."""
    if not hasattr(model, "disable_adapter"):
        raise InputError("the base model comes from model.disable_adapter(); this needs a PEFT model")
    with model.disable_adapter():
        yield


@contextmanager
def base_model_only(model: torch.nn.Module) -> Iterator[None]:
    """The base model: a PEFT model's adapter disabled, any other model as it is."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


@dataclass
class AnswerLogits:
    """Float32 logits at every position that predicts an answer token, flattened over the batch."""

    logits: torch.Tensor  # (N, vocab)
    targets: torch.Tensor  # (N,) the answer token each position predicts
    rows: torch.Tensor  # (N,) batch row of each position
    batch_size: int

    def token_logprobs(self) -> torch.Tensor:
        """log p(target) per answer token, (N,)."""
        return torch.log_softmax(self.logits, dim=-1).gather(-1, self.targets[:, None]).squeeze(-1)

    def per_sequence_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per-token `values` (N,) into per-row totals (batch,)."""
        return torch.zeros(self.batch_size, dtype=values.dtype, device=values.device).index_add(0, self.rows, values)


def _base_of(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _forward_accepts(model: torch.nn.Module, keyword: str) -> bool:
    return keyword in inspect.signature(_base_of(model).forward).parameters


def _predicting_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bool mask of the positions that predict an answer token, their targets, their batch rows), row-major."""
    predicts = answer_positions(labels)
    if not predicts.any():
        raise InputError("batch has no answer tokens (all labels are IGNORE_INDEX)")
    return predicts, labels[:, 1:][predicts[:, :-1]], predicts.nonzero()[:, 0]


def answer_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> AnswerLogits:
    """Run `model` on a collated batch and return the logits that predict its labelled (answer) tokens."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    predicts, targets, rows = _predicting_positions(labels)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "position_ids": position_ids(attention_mask), "use_cache": False}
    if _forward_accepts(model, "logits_to_keep"):
        logits = model(**kwargs, logits_to_keep=predicts).logits
        if logits.dim() == 3:  # a model that keeps the batch axis: index it ourselves
            logits = logits[predicts]
    else:
        logits = model(**kwargs).logits[predicts]
    return AnswerLogits(logits.float(), targets, rows, labels.shape[0])


def base_answer_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> AnswerLogits:
    """`answer_logits` of the base model: the same model with its adapter disabled, without gradients."""
    with torch.no_grad(), adapter_disabled(model):
        return answer_logits(model, batch)


# --- the base model's answer states: its answer logits, kept small --------------------------------------------------
#
# The base model's logits on a fixed set of answers are a base-model output like its answers, so they can be computed
# once and reused (across training steps and across runs, through agml.answer_cache). Logits are too big to keep
# (one vocabulary-sized row per answer token); the output head's INPUT at the same positions (the last hidden state,
# hidden-size floats) is small, and the head turns it back into exactly the base logits. Where the model does more
# after its head (logit soft-capping, scaling), the states would not give the same logits: the check below finds that
# and the caller falls back to running the base model. See docs/architecture.md ("Log-probabilities").


@contextmanager
def _captured_head_inputs(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    head = model.get_output_embeddings()
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, args, out: captured.append(args[0].detach()))
    try:
        yield captured
    finally:
        handle.remove()


def _head_logits(model: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
    head = model.get_output_embeddings()
    return head(states.to(head.weight.device, head.weight.dtype)).float()


@torch.no_grad()
def base_answer_states(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                       desc: str | None = None) -> list[torch.Tensor] | None:
    """Per collated batch, the base model's output-head input at its answer-predicting positions ((N, hidden) in
    `AnswerLogits` order, on the CPU), such that `states_answer_logits` gives the base answer logits of that batch
    exactly; None when the model's logits are not its head applied to those states (checked on the first batch) or
    it has no separate output head."""
    if not batches or not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return None
    states: list[torch.Tensor] = []
    for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        with _captured_head_inputs(model) as captured:
            out = base_answer_logits(model, batch)
        if len(captured) != 1:
            return None
        hidden = captured[0]
        if hidden.dim() == 3:
            hidden = hidden[_predicting_positions(batch["labels"].to(hidden.device))[0]]
        if not states and (hidden.shape[0] != out.logits.shape[0]
                           or not torch.equal(_head_logits(model, hidden), out.logits)):
            return None
        states.append(hidden.cpu())
    return states


def states_answer_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                         states: torch.Tensor) -> AnswerLogits:
    """The base model's `answer_logits` on `batch` from its answer states (one entry of `base_answer_states`)."""
    predicts, targets, rows = _predicting_positions(batch["labels"])
    if states.shape[0] != targets.shape[0]:
        raise InputError(f"the answer states cover {states.shape[0]} answer tokens, the batch has {targets.shape[0]}")
    logits = _head_logits(model, states)
    return AnswerLogits(logits, targets.to(logits.device), rows.to(logits.device), predicts.shape[0])


def kl_per_token(base: AnswerLogits, current: AnswerLogits, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over answer tokens of KL(base || current) = sum_v p_base (log p_base - log p_current); with `weights`
    (N,) one per answer token (`answer_token_weights`), each token's KL is scaled by its weight (still / N)."""
    base_logp = torch.log_softmax(base.logits, dim=-1)
    current_logp = torch.log_softmax(current.logits, dim=-1)
    if weights is None:
        return F.kl_div(current_logp, base_logp, log_target=True, reduction="batchmean")
    per_token = F.kl_div(current_logp, base_logp, log_target=True, reduction="none").sum(-1)
    return (per_token * weights.to(per_token.device)).sum() / per_token.shape[0]


def answer_token_weights(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The batch's `kl_weights` (batch, seq; one per label position) at its answer tokens, in `AnswerLogits`
    order; None when the batch has none."""
    weights = batch.get("kl_weights")
    if weights is None:
        return None
    labels = batch["labels"]
    return weights[:, 1:][labels[:, 1:] != IGNORE_INDEX].float()


def sequence_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each row's answer, (batch,); differentiable."""
    out = answer_logits(model, batch)
    return out.per_sequence_sum(out.token_logprobs())


def _shortest_first(lengths: Sequence[int], batch_size: int, desc: str | None) -> Iterator[list[int]]:
    """Batches of indices, shortest items first so that batches pad little; a progress bar when `desc` is given.
    Callers put results back by index."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None or not lengths, leave=False):
        yield order[start:start + batch_size]


def left_padded_batches(examples: Sequence[Example], pad_id: int, batch_size: int,
                         desc: str | None) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(indices of its examples, left-padded batch), shortest examples first (`_shortest_first`)."""
    for indices in _shortest_first([len(e.input_ids) for e in examples], batch_size, desc):
        yield indices, collate([examples[i] for i in indices], pad_id, padding_side="left")


@contextmanager
def _maybe_base(model: torch.nn.Module, base: bool) -> Iterator[None]:
    if base:
        with adapter_disabled(model):
            yield
    else:
        yield


def _add_per_example(out: AnswerLogits, token_logprobs: torch.Tensor, indices: list[int], totals: list[float],
                     counts: list[int]) -> None:
    """Accumulate one batch's per-token log-probs into per-example totals and token counts."""
    for row, value in zip(out.rows.tolist(), token_logprobs.tolist(), strict=True):
        totals[indices[row]] += value
        counts[indices[row]] += 1


@torch.no_grad()
def example_logprobs(model: torch.nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 16,
                     base: bool = False, desc: str | None = None) -> tuple[list[float], list[int]]:
    """Per example: summed log-probability of its labelled tokens, and how many there are.

    `base=True` scores with the adapter disabled. Examples without labelled tokens get (0.0, 0).
    """
    totals = [0.0] * len(examples)
    counts = [0] * len(examples)
    with _maybe_base(model, base):
        for indices, batch in left_padded_batches(examples, pad_id, batch_size, desc):
            out = answer_logits(model, batch)
            _add_per_example(out, out.token_logprobs(), indices, totals, counts)
    return totals, counts


@dataclass
class KlAndBaseLogprobs:
    """`kl_and_base_logprobs`'s result: KL(base || model) per labelled token (None without tokens), and per example
    the base model's summed log-probability of its labelled tokens and their count (as `example_logprobs(base=True)`).
    """

    kl: float | None
    base_totals: list[float]
    counts: list[int]


@torch.no_grad()
def kl_and_base_logprobs(model: torch.nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 16,
                         desc: str | None = None,
                         base_states: Sequence[torch.Tensor] | None = None) -> KlAndBaseLogprobs:
    """KL(base || model) per labelled token over `examples`, and the base model's log-probabilities of them.

    One base pass and one adapter pass (merged, `agml.layers.adapter_merged`) per batch give both: the evaluation
    wants the retain KL and the base perplexity of the same answers. With `base_states` (`base_answer_states` of
    `left_padded_batches(examples, pad_id, batch_size)`) the base side comes from them instead of a base pass.
    """
    kl_total = 0.0
    totals = [0.0] * len(examples)
    counts = [0] * len(examples)
    for number, (indices, batch) in enumerate(left_padded_batches(examples, pad_id, batch_size, desc)):
        base = (base_answer_logits(model, batch) if base_states is None
                else states_answer_logits(model, batch, base_states[number]))
        base_logprobs = torch.log_softmax(base.logits, dim=-1)
        with adapter_merged(model):
            logprobs = torch.log_softmax(answer_logits(model, batch).logits, dim=-1)
        kl_total += _kl_sum(base_logprobs, logprobs)
        _add_per_example(base, base_logprobs.gather(-1, base.targets[:, None]).squeeze(-1), indices, totals, counts)
    tokens = sum(counts)
    return KlAndBaseLogprobs(kl_total / tokens if tokens else None, totals, counts)


KL_CHUNK_TOKENS = 512  # answer tokens per slice of the KL sum: its temporaries stay (512, vocab), whatever the batch


def _kl_sum(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """sum over tokens and vocabulary of p_base (log p_base - log p), in slices of KL_CHUNK_TOKENS tokens."""
    return sum(float((b.exp() * (b - c)).sum())
               for b, c in zip(base_logprobs.split(KL_CHUNK_TOKENS), logprobs.split(KL_CHUNK_TOKENS), strict=True))


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool `(batch, seq)`: positions t whose next token t+1 is an answer token (never the last position)."""
    return F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)


@torch.no_grad()
def continuation_logprobs(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[Sequence[int]]], pad_id: int, batch_size: int = 16,
                          desc: str | None = None) -> list[list[float]]:
    """Per prompt, the summed log-probability of each of its continuations (teacher forcing).

    Multiple choice asks one question with several answers: each prompt runs once and its KV cache is shared by its
    continuations, so a batch costs one prompt pass plus one short pass per choice instead of a full pass per choice
    (about 3x less work for the shipped set). Equal to scoring every prompt + continuation on its own
    (`example_logprobs`) up to float rounding; tests/test_capability.py checks that.
    """
    if any(not tail for tails in continuations for tail in tails):
        raise InputError("a continuation has no tokens")
    totals: list[list[float]] = [[] for _ in prompts]
    for indices in _shortest_first([len(p) for p in prompts], batch_size, desc):
        scores = _continuation_batch(model, [prompts[i] for i in indices], [continuations[i] for i in indices], pad_id)
        for i, value in zip(indices, scores, strict=True):
            totals[i] = value
    return totals


def _continuation_batch(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[Sequence[int]]], pad_id: int) -> list[list[float]]:
    device = next(model.parameters()).device
    prompt = collate([Example(list(p), list(p)) for p in prompts], pad_id, padding_side="left")
    prompt_mask = prompt["attention_mask"].to(device)
    kwargs = {"logits_to_keep": 1} if _forward_accepts(model, "logits_to_keep") else {}
    out = model(input_ids=prompt["input_ids"].to(device), attention_mask=prompt_mask,
                position_ids=position_ids(prompt_mask), use_cache=True, **kwargs)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each continuation's first token
    cache_key = "cache" if _forward_accepts(model, "cache") else "past_key_values"  # renamed in transformers 5.2x
    prompt_cache = out.get(cache_key)
    if prompt_cache is None:  # reading the other name only when needed: transformers warns on the old one
        prompt_cache = out.get("past_key_values")
    lengths = prompt_mask.sum(1, keepdim=True)
    totals = [[0.0] * len(tails) for tails in continuations]
    for choice in range(max(len(tails) for tails in continuations)):
        # A prompt without this choice gets one pad token, scored and dropped: the batch must match the shared cache.
        tails = [list(tails[choice]) if choice < len(tails) else [pad_id] for tails in continuations]
        batch = collate([Example(t, t) for t in tails], pad_id)  # right-padded; labels IGNORE_INDEX on padding
        mask, labels = batch["attention_mask"].to(device), batch["labels"].to(device)
        step = model(input_ids=batch["input_ids"].to(device), attention_mask=torch.cat([prompt_mask, mask], dim=1),
                     position_ids=lengths + torch.arange(labels.shape[1], device=device), use_cache=True,
                     **{cache_key: copy.deepcopy(prompt_cache)})
        later_targets = labels[:, 1:]
        later = torch.log_softmax(step.logits[:, :-1].float(), dim=-1).gather(
            -1, later_targets.clamp(min=0)[..., None]).squeeze(-1)
        scores = first.gather(1, labels[:, :1]).squeeze(1) + (later * (later_targets != IGNORE_INDEX)).sum(1)
        for row, value in enumerate(scores.tolist()):
            if choice < len(continuations[row]):
                totals[row][choice] = value
    return totals
