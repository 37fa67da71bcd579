"""Batched generation through the chat template: greedy answers, and seeded samples (best-of-n judging)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from agml import distributed
from agml.data import Example, collate, pad_token_id, prompt_ids
from agml.errors import InputError


@torch.no_grad()
def greedy_answers(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict[str, str]]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    desc: str | None = None,
    logits_processor=None,
    answer_prefix: str = "",
) -> list[str]:
    """Greedy answers to each conversation, left-padded batches, special tokens stripped.

    `logits_processor`: an optional `transformers.LogitsProcessorList` applied at every step (e.g. banned terms).
    `answer_prefix`: text the answer starts with (the model continues it; the answers returned include it).
    Under several processes each answers its shard and every process gets all answers, in input order. Shards are
    padded to equal length and generation is synchronised (`synced_gpus`): a sharded (FSDP) model makes every
    forward a collective, so all processes must run the same batches for the same number of steps.
    """
    answers = _generate(model, tokenizer, conversations, max_new_tokens, batch_size, desc, 1, answer_prefix,
                        do_sample=False, logits_processor=logits_processor)
    return [samples[0] for samples in answers]


@torch.no_grad()
def sampled_answers(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict[str, str]]],
    n: int = 5,
    temperature: float = 0.7,
    seed: int = 0,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    desc: str | None = None,
) -> list[list[str]]:
    """`n` sampled answers per conversation (plain temperature sampling: no top-k/top-p cut).

    Seeded: the same model, conversations, seed and batch size give the same samples (the random state is forked,
    so the caller's is untouched). Under several processes each shard draws from seed + its rank.
    """
    if n < 1:
        raise InputError(f"the number of samples must be >= 1, got {n}")
    if not temperature > 0:
        raise InputError(f"the sampling temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + distributed.rank())
        return _generate(
            model, tokenizer, conversations, max_new_tokens, batch_size, desc, n, "",
            do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
        )


def _generate(
    model, tokenizer, conversations, max_new_tokens: int, batch_size: int, desc: str | None, n: int,
    answer_prefix: str, **sampling
) -> list[list[str]]:
    """n answers per conversation, in input order (see greedy_answers for the batching, sharding and prefix)."""
    total = len(conversations)
    conversations, real = distributed.padded_shard(conversations)
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    prefix = tokenizer(answer_prefix, add_special_tokens=False)["input_ids"] if answer_prefix else []
    encoded = [prompt_ids(tokenizer, conv) + prefix for conv in conversations]
    # Sort by length so batches pad little; answers come back in input order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[list[str]] = [[] for _ in encoded]
    was_training = model.training
    model.eval()
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None, leave=False):
        rows = order[start:start + batch_size]
        # collate wants labels; generation reads only the ids and the mask
        batch = collate([Example(encoded[i], encoded[i]) for i in rows], pad, padding_side="left")
        written = _continuations(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                 max_new_tokens, n, pad, _stop_ids(tokenizer), sampling)
        for r, i in enumerate(rows):
            answers[i] = [tokenizer.decode(encoded[i][len(encoded[i]) - len(prefix):] + tokens,
                                           skip_special_tokens=True).strip() for tokens in written[r]]
    model.train(was_training)
    return distributed.gather_sharded(answers[:real], total)


def _continuations(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, n: int, pad: int,
                   stop_ids: list[int], sampling: dict) -> list[list[list[int]]]:
    """Per row of a left-padded batch, the tokens of its n continuations. Greedy on one process: the loop that
    drops finished rows (`greedy_continuations`); sampling, or a sharded model whose processes must step together
    (`synced_gpus`), goes through `generate`, whose stop and padding tokens the decoder skips."""
    if not sampling.get("do_sample") and distributed.world_size() == 1:
        return [[tokens] for tokens in greedy_continuations(model, ids, mask, max_new_tokens, stop_ids,
                                                              sampling.get("logits_processor"))]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, num_return_sequences=n,
                         pad_token_id=pad, eos_token_id=stop_ids, synced_gpus=distributed.world_size() > 1,
                         **sampling)
    # generate returns the n sequences of each input next to each other
    return [[out[r * n + j, ids.shape[1]:].tolist() for j in range(n)] for r in range(ids.shape[0])]


@torch.no_grad()
def greedy_continuations(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stop_ids: Sequence[int],
                         logits_processor=None) -> list[list[int]]:
    """Greedy tokens after each row of a left-padded batch, up to (without) its first stop token.

    The same tokens as `model.generate(do_sample=False)`, but a row that has stopped leaves the batch and the KV
    cache, so later steps cost only the rows still writing (in a batch of 64 answers, 15-19% of the row-steps were
    padding after a stop: docs/results.md, session 19). Positions follow the left padding as in `generate`.
    """
    from transformers import DynamicCache

    generative = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = inspect.signature(generative.forward).parameters
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    cache_name = "cache" if "cache" in accepted else "past_key_values"  # renamed in transformers 5.2x
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=ids.device)
    written: list[list[int]] = [[] for _ in range(ids.shape[0])]
    active = torch.arange(ids.shape[0], device=ids.device)  # original row of each row still in the batch
    sequences, step_ids, step_positions = ids, ids, (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    for _ in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions, use_cache=True,
                       **{cache_name: cache}, **keep_last).logits[:, -1, :].float()
        if logits_processor is not None:
            logits = logits_processor(sequences, logits)
        tokens = logits.argmax(-1)
        stopped = torch.isin(tokens, stops)
        for row, token, done in zip(active.tolist(), tokens.tolist(), stopped.tolist(), strict=True):
            if not done:
                written[row].append(token)
        if bool(stopped.all()):
            break
        if bool(stopped.any()):
            kept = (~stopped).nonzero().squeeze(-1)
            cache.batch_select_indices(kept)
            active, tokens, mask, step_positions = active[kept], tokens[kept], mask[kept], step_positions[kept]
            if logits_processor is not None:
                sequences = sequences[kept]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        if logits_processor is not None:  # only a processor reads the sequences so far
            sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
        step_ids, step_positions = tokens[:, None], step_positions[:, -1:] + 1
    return written


def _stop_ids(tokenizer) -> list[int]:
    """EOS plus the chat template's end-of-turn token where the vocabulary has one."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(ids)
