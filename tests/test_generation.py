"""agml.generation.greedy_continuations against transformers' own greedy `generate` (the reference)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import ARCHS, tiny_model
from transformers import LogitsProcessorList, NoBadWordsLogitsProcessor

from agml.data import IGNORE_INDEX, Example, collate
from agml.generation import greedy_answers, greedy_continuations

PROMPTS = [[5, 9, 17, 33, 8, 21, 40], [7, 3], [11, 60, 12, 9], [90, 4, 4, 4, 4, 70], [15]]
PAD = 0


def sharp(model):
    """A tiny random model attends almost uniformly, so wrong positions would hardly change its tokens: scaling the
    queries and keys makes attention (and so the rotary positions and the padding mask) decide the output."""
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(8.0)
    return model


def left_padded(prompts):
    batch = collate([Example(list(p), [IGNORE_INDEX] * len(p)) for p in prompts], PAD, padding_side="left")
    return batch["input_ids"], batch["attention_mask"]


def reference(model, ids, mask, max_new_tokens, stop_ids, logits_processor=None):
    """generate's greedy tokens, cut before each row's first stop token."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=PAD, eos_token_id=list(stop_ids), logits_processor=logits_processor)
    rows = []
    for tokens in out[:, ids.shape[1]:].tolist():
        cut = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
        rows.append(tokens[:cut])
    return rows


def early_stops(model, ids, mask):
    """Stop tokens that end some rows early and leave others writing, so rows leave the batch mid-way."""
    free = reference(model, ids, mask, 12, stop_ids=[])
    stops = {free[0][2], free[2][5]}
    assert not all(stops & set(row) for row in free), "every row would stop: pick other stop tokens"
    return sorted(stops)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_continuations_match_generate_while_rows_stop_at_different_steps(arch):
    model = sharp(tiny_model(arch))
    ids, mask = left_padded(PROMPTS)
    stops = early_stops(model, ids, mask)
    expected = reference(model, ids, mask, 12, stops)
    assert len({len(row) for row in expected}) > 1  # rows really stop at different steps
    assert greedy_continuations(model, ids, mask, 12, stops) == expected


def test_greedy_continuations_apply_the_logits_processor_to_the_rows_still_writing():
    model = sharp(tiny_model("qwen2"))
    ids, mask = left_padded(PROMPTS)
    stops = early_stops(model, ids, mask)
    free = reference(model, ids, mask, 12, stops)
    banned = [[free[1][0]], [free[3][1]]]  # tokens two rows would write: they must write something else
    processors = LogitsProcessorList([NoBadWordsLogitsProcessor(banned, eos_token_id=stops)])
    got = greedy_continuations(model, ids, mask, 12, stops, processors)
    assert got == reference(model, ids, mask, 12, stops, processors)
    assert got != free and not any(b[0] in row for b in banned for row in got)


def test_greedy_continuations_through_a_peft_model_match_its_generate():
    torch.manual_seed(0)
    model = get_peft_model(sharp(tiny_model("llama")), LoraConfig(r=4, target_modules=["gate_proj", "down_proj"],
                                                          init_lora_weights=False))
    model.eval()
    ids, mask = left_padded(PROMPTS)
    stops = early_stops(model, ids, mask)
    assert greedy_continuations(model, ids, mask, 10, stops) == reference(model, ids, mask, 10, stops)


def test_greedy_answers_keep_the_answer_prefix_and_drop_the_stop_token(smol_tokenizer):
    model = tiny_model("llama", vocab_size=49152)
    conversation = [[{"role": "user", "content": "Name a film."}]]
    plain = greedy_answers(model, smol_tokenizer, conversation, max_new_tokens=4)[0]
    prefixed = greedy_answers(model, smol_tokenizer, conversation, max_new_tokens=4, answer_prefix="Sure:")[0]
    assert prefixed.startswith("Sure:") and isinstance(plain, str)
    assert "<|im_end|>" not in plain + prefixed
