"""Neuron scoring: how much each MLP intermediate neuron matters for the forget answers and for the retain answers.

For every decoder layer, the input of `down_proj` (`act(gate_proj(x)) * up_proj(x)`, one value per intermediate
neuron and token) is the activation `a`; its gradient `g = dL/da` comes from one backward pass of

    L = sum over answer tokens of -log p(answer token | prefix)        (a *sum*, not a mean)

The sum keeps each token's gradient independent of the batch it sits in, so scores do not depend on batch size,
batch order or padding. Per neuron we stream, through `agml_kernels.neuron_stats`,

    Fisher   = sum_t g_t^2          saliency = sum_t |a_t * g_t|

over the statistic positions t (see `answer_positions`) and divide by the number of such tokens, so forget and
retain scores are per-token averages and directly comparable.

Cost: parameters are frozen during the pass (no parameter gradients are computed or stored) and the gradient only
flows back to the activations; activations are not cached — the hook recomputes `a` from the two factors autograd
keeps for the product anyway, so memory stays that of a plain forward/backward.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from agml import distributed
from agml.architecture import neuron_sites
from agml.data import IGNORE_INDEX, Example, PromptRecord, batches, build_example, pad_token_id
from agml.errors import InputError
from agml.logprobs import answer_logits, answer_positions  # noqa: F401  (answer_positions: public here too)
from agml.masks import SCORE_KINDS, SPLITS, STATISTICS, contrast, importance  # noqa: F401  (SCORE_KINDS: public here too)
from agml.tensor_files import read_tensor_file, write_tensor_file
from agml_kernels import NeuronStats, neuron_stats

_FORMAT = "agml-neuron-scores"


@dataclass
class NeuronScores:
    """Per-token Fisher and saliency of every MLP neuron, float32 `(num_layers, intermediate_size)` each.

    `forget_tokens` / `retain_tokens`: how many answer tokens each average is over. `meta` holds at least
    `num_layers`, `intermediate_size` and (where known) `model`.
    """

    forget_fisher: torch.Tensor
    forget_saliency: torch.Tensor
    retain_fisher: torch.Tensor
    retain_saliency: torch.Tensor
    forget_tokens: int
    retain_tokens: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = tuple(self.forget_fisher.shape)
        for split in SPLITS:
            for stat in STATISTICS:
                tensor = getattr(self, f"{split}_{stat}")
                if tensor.dim() != 2 or tuple(tensor.shape) != shape:
                    raise InputError(f"{split}_{stat} has shape {tuple(tensor.shape)}, expected {shape} (2-D)")
                setattr(self, f"{split}_{stat}", tensor.detach().to("cpu", torch.float32).contiguous())
        self.meta = {**self.meta, "num_layers": shape[0], "intermediate_size": shape[1]}

    @property
    def num_layers(self) -> int:
        return int(self.forget_fisher.shape[0])

    @property
    def intermediate_size(self) -> int:
        return int(self.forget_fisher.shape[1])

    def importance(self, split: str, score: str = "fisher") -> torch.Tensor:
        """Normalised per-token importance of one split; see `agml.masks.importance`."""
        return importance(self, split, score)

    def contrast(self, score: str = "fisher", retain_weight: float = 1.0) -> torch.Tensor:
        """Concept specificity `forget - retain_weight * retain`; see `agml.masks.contrast`."""
        return contrast(self, score, retain_weight)

    def save(self, path: str | os.PathLike) -> None:
        """Write safetensors atomically (temporary file, then rename)."""
        tensors = {f"{split}.{stat}": getattr(self, f"{split}_{stat}") for split in SPLITS for stat in STATISTICS}
        metadata = {
            "forget_tokens": str(self.forget_tokens),
            "retain_tokens": str(self.retain_tokens),
            "meta": json.dumps(self.meta),
        }
        write_tensor_file(path, tensors, _FORMAT, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuronScores:
        tensors, metadata = read_tensor_file(path, _FORMAT, "score")
        expected = {f"{split}.{stat}" for split in SPLITS for stat in STATISTICS}
        if set(tensors) != expected:
            raise InputError(f"{path}: score file holds {sorted(tensors)}, expected {sorted(expected)}")
        return cls(
            **{f"{split}_{stat}": tensors[f"{split}.{stat}"] for split in SPLITS for stat in STATISTICS},
            forget_tokens=int(metadata.get("forget_tokens", 0)),
            retain_tokens=int(metadata.get("retain_tokens", 0)),
            meta=json.loads(metadata.get("meta", "{}")),
        )


# --- the scoring pass -----------------------------------------------------------------------------------------


def answer_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of answer-token NLL, answer_positions mask) for one collated batch on the model's device.

    The answer positions are exactly those whose logits the loss reads, so their activations write the answer
    directly; prompt positions only matter through attention and are mostly the chat template shared by forget and
    retain, which would dilute the per-token averages without telling the two apart. Logits come from
    `agml.logprobs.answer_logits` (only answer positions are projected onto the vocabulary).
    """
    out = answer_logits(model, batch)
    loss = F.cross_entropy(out.logits, out.targets, reduction="sum")
    return loss, answer_positions(batch["labels"].to(out.logits.device))


@contextmanager
def activation_gradients_only(model: torch.nn.Module):
    """Freeze every parameter and make the embedding output require grad, in eval mode; restore all afterwards.

    Backward then computes gradients for activations only (no parameter gradients, no weight inputs saved),
    which is what keeps the scoring pass as cheap as inference-plus-backprop-to-activations.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training

    def require_grad(_module, _inputs, output):
        return output.requires_grad_(True) if not output.requires_grad else output

    handle = model.get_input_embeddings().register_forward_hook(require_grad)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            yield model
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _recompute_source(acts: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """A way to rebuild `acts` in backward from the factors autograd saved for `act(gate) * up`, or None.

    Holding `acts` itself would keep one extra (batch, seq, intermediate) tensor per layer alive, because a
    frozen down_proj does not save its input; the two factors of the product are saved anyway.
    """
    node = acts.grad_fn
    if node is None or type(node).__name__ != "MulBackward0":
        return None
    try:
        left, right = node._saved_self, node._saved_other
    except (AttributeError, RuntimeError):
        return None
    if not (isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor)):
        return None
    if left.shape != acts.shape or right.shape != acts.shape:
        return None
    del left, right
    return lambda: node._saved_self * node._saved_other


class _NeuronStatsHooks:
    """Forward pre-hooks on every site's reader (down_proj) that stream (activation, gradient, mask) into per-layer
    NeuronStats; the reader's input is the MLP's neurons (`agml.architecture.neuron_sites`)."""

    def __init__(self, model: torch.nn.Module):
        sites = neuron_sites(model)
        self.readers = [site.projection(site.reader) for site in sites]
        self.intermediate = sites[0].width
        self.token_mask: torch.Tensor | None = None
        self.stats: list[NeuronStats] = []
        self._pending: dict[int, Callable[[], torch.Tensor]] = {}
        self._handles = []

    def __enter__(self) -> _NeuronStatsHooks:
        device = next(self.readers[0].parameters()).device
        self.stats = [NeuronStats.zeros(self.intermediate, device) for _ in self.readers]
        self._handles = [reader.register_forward_pre_hook(self._forward_hook(i))
                         for i, reader in enumerate(self.readers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending.clear()

    def _forward_hook(self, layer: int):
        def hook(_module, args):
            acts = args[0]
            if not acts.requires_grad:
                return None
            source = _recompute_source(acts)
            if source is None:  # unknown MLP form: keep the activation itself until its gradient arrives
                self._pending[layer] = lambda kept=acts: kept
            else:
                self._pending[layer] = source

            def on_gradient(grad: torch.Tensor) -> None:
                acts_now = self._pending.pop(layer)()
                self.stats[layer] = self.stats[layer] + neuron_stats(acts_now, grad, self.token_mask)

            acts.register_hook(on_gradient)
            return None

        return hook


def _score_split(model, hooks: _NeuronStatsHooks, batches_: Iterable[dict], desc: str, progress: bool):
    with hooks:
        for batch in tqdm(batches_, desc=desc, disable=not progress, leave=False):
            loss, positions = answer_nll(model, batch)
            if "statistic_positions" in batch:  # other positions to score at (see score_records_at)
                positions = batch["statistic_positions"].to(positions.device)
            if "counted" in batch:  # rows that only pad this process's shard (see _split_batches) add nothing
                positions = positions & batch["counted"].to(positions.device)[:, None]
            if not bool(positions.any()) and distributed.world_size() == 1:
                continue  # with several processes every one runs every backward: FSDP's are collectives
            hooks.token_mask = positions
            loss.backward()
            hooks.token_mask = None
        return hooks.stats


def _summed_over_processes(stats: list[NeuronStats]) -> list[NeuronStats]:
    """Each process scored its shard of the prompts; the sums make the scores independent of the process count."""
    if distributed.world_size() == 1:
        return stats
    fisher = distributed.sum_across(torch.stack([s.fisher for s in stats]))
    saliency = distributed.sum_across(torch.stack([s.saliency for s in stats]))
    tokens = distributed.sum_across(torch.tensor([s.tokens for s in stats], device=fisher.device))
    return [NeuronStats(f, a, int(t)) for f, a, t in zip(fisher, saliency, tokens, strict=True)]


def score_neurons(
    model: torch.nn.Module,
    forget_batches: Iterable[dict],
    retain_batches: Iterable[dict],
    progress: bool = True,
) -> NeuronScores:
    """One forward/backward pass over the forget batches and one over the retain batches -> NeuronScores.

    Batches are `agml.data.collate` dicts. Works on a plain model or a PeftModel (whatever adapter state it is
    in); the model is scored in eval mode and its training mode and `requires_grad` flags are restored.
    """
    hooks = _NeuronStatsHooks(model)
    with activation_gradients_only(model):
        forget = _summed_over_processes(_score_split(model, hooks, forget_batches, "scoring forget", progress))
        retain = _summed_over_processes(_score_split(model, hooks, retain_batches, "scoring retain", progress))
    forget_tokens, retain_tokens = forget[0].tokens, retain[0].tokens
    if forget_tokens == 0:
        raise InputError("the forget set has no answer tokens to score (empty forget set?)")
    if retain_tokens == 0:
        raise InputError("the retain set has no answer tokens to score (empty retain set?)")
    name = getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__

    def per_token(stats: list[NeuronStats], stat: str, tokens: int) -> torch.Tensor:
        return torch.stack([getattr(s, stat) for s in stats]).cpu() / tokens

    return NeuronScores(
        forget_fisher=per_token(forget, "fisher", forget_tokens),
        forget_saliency=per_token(forget, "saliency", forget_tokens),
        retain_fisher=per_token(retain, "fisher", retain_tokens),
        retain_saliency=per_token(retain, "saliency", retain_tokens),
        forget_tokens=forget_tokens,
        retain_tokens=retain_tokens,
        meta={"model": str(name)},
    )


# --- records -> scores (the pieces `agml score` and `agml unlearn` share) ------------------------------------


def answer_records(
    model, tokenizer, records: Sequence[PromptRecord], max_new_tokens: int = 64, batch_size: int = 16,
    desc: str | None = "answering", fingerprint: str | None = None,
) -> list[PromptRecord]:
    """Records without an `answer` get the model's greedy answer (batched); an empty answer is an InputError.
    With the base model's `fingerprint` (agml.answer_cache) answers given before are read from the answer cache."""
    from agml import answer_cache
    from agml.generation import greedy_answers

    todo = [i for i, record in enumerate(records) if record.answer is None]
    if not todo:
        return list(records)

    def generate(conversations: list) -> list[str]:
        return greedy_answers(model, tokenizer, conversations, max_new_tokens, batch_size, desc)

    answers = answer_cache.cached_greedy(fingerprint, [records[i].messages for i in todo], max_new_tokens, generate)
    filled = list(records)
    for i, answer in zip(todo, answers, strict=True):
        if not answer.strip():
            raise InputError(f"{records[i].source}: the model's answer is empty; give an 'answer' for this prompt")
        filled[i] = records[i].with_answer(answer)
    return filled


def record_examples(tokenizer, records: Sequence[PromptRecord]) -> list[Example]:
    """Chat-templated examples (labels on the answer only), shortest first so batches pad little."""
    examples = []
    for record in records:
        if record.answer is None:
            raise InputError(f"{record.source}: record has no answer (fill answers with answer_records first)")
        examples.append(build_example(tokenizer, record.messages, record.answer))
    return sorted(examples, key=lambda e: len(e.input_ids))


def score_records(
    model, tokenizer, forget: Sequence[PromptRecord], retain: Sequence[PromptRecord], batch_size: int = 8,
    progress: bool = True,
) -> NeuronScores:
    """Score answered forget/retain records (see `answer_records`) at their answer positions."""
    return score_records_at(model, tokenizer, forget, retain, (), positions="answer", batch_size=batch_size,
                            progress=progress)


def _split_batches(tokenizer, records: Sequence[PromptRecord], batch_size: int, pad: int) -> Iterator[dict]:
    """This process's batches of one split; each has a `counted` row flag, False for the padding rows.

    Every process gets equally many rows (`padded_shard`), so all run the same number of forwards and backwards.
    Sum-NLL keeps each row's activation gradients independent of the others, so padding rows change nothing
    the counted rows see; they go last, after the length-sorted real examples.
    """
    local, real = distributed.padded_shard(records)
    examples = record_examples(tokenizer, local[:real]) + record_examples(tokenizer, local[real:])
    start = 0
    for batch in batches(examples, batch_size, pad):
        rows = len(batch["input_ids"])
        batch["counted"] = torch.arange(start, start + rows) < real
        start += rows
        yield batch


# --- scoring at the entity's token positions (issue 15) ---------------------------------------------------------

POSITION_CHOICES = ("answer", "entity", "entity+answer")


def _with_positions(batches_: Iterable[dict], positions: str, token_ids: Sequence[Sequence[int]]) -> Iterator[dict]:
    from agml.entities import entity_positions

    for batch in batches_:
        chosen = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        if "answer" in positions or not token_ids:
            chosen |= answer_positions(batch["labels"])
        if "entity" in positions and token_ids:
            chosen |= entity_positions(batch["input_ids"], token_ids) & batch["attention_mask"].bool()
        batch["statistic_positions"] = chosen
        yield batch


def _without_answer_tokens(batches_: Iterable[dict], token_ids: Sequence[Sequence[int]]) -> Iterator[dict]:
    """Batches whose answer tokens that spell one of `token_ids` are taken out of the labels (NLL and positions)."""
    from agml.entities import entity_positions

    for batch in batches_:
        if token_ids:
            labels = batch["labels"].clone()
            labels[entity_positions(batch["input_ids"], token_ids) & (labels != IGNORE_INDEX)] = IGNORE_INDEX
            batch = {**batch, "labels": labels}
        yield batch


def score_records_at(
    model, tokenizer, forget: Sequence[PromptRecord], retain: Sequence[PromptRecord],
    entity_token_ids: Sequence[Sequence[int]], positions: str = "entity+answer",
    retain_entity_token_ids: Sequence[Sequence[int]] = (), batch_size: int = 8, progress: bool = True,
    shared_token_ids: Sequence[Sequence[int]] = (),
) -> NeuronScores:
    """`score_records`, but the statistics are taken at the concept's name tokens as well as (or instead of) the
    answer positions: the gradient of the same answer NLL, read where the model looks the entity up.

    `entity_token_ids`: token sequences of the concept's name variants (`agml.entities.entity_token_ids`);
    `retain_entity_token_ids`: the same for neighbour entities in the retain prompts (without them, retain is
    scored at its answer positions). `positions` is "answer" (= score_records), "entity" or "entity+answer".
    `shared_token_ids`: token sequences of facts the concept shares with its neighbours (its director's name):
    their tokens in the forget answers are left out of the forget NLL and its answer positions, so the neurons
    that write them do not look concept-specific (`--shared-facts exclude`).
    """
    if positions not in POSITION_CHOICES:
        raise InputError(f"positions must be one of {list(POSITION_CHOICES)}, got {positions!r}")
    if not forget:
        raise InputError("the forget set is empty")
    if not retain:
        raise InputError("the retain set is empty")
    pad = pad_token_id(tokenizer)
    return score_neurons(
        model,
        _with_positions(_without_answer_tokens(_split_batches(tokenizer, forget, batch_size, pad), shared_token_ids),
                        positions, entity_token_ids),
        _with_positions(_split_batches(tokenizer, retain, batch_size, pad), positions, retain_entity_token_ids),
        progress=progress,
    )
