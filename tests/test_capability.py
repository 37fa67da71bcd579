import importlib.util
import math
from pathlib import Path

import pytest
import torch
from test_evaluation import adapter_disabled, peft_tiny

from agml import capability
from agml.capability import (
    ChoiceItem,
    choice_accuracy,
    choice_accuracy_before_after,
    choice_examples,
    load_choice_items,
    perplexity,
    perplexity_before_after,
    text_chunks,
)
from agml.data import IGNORE_INDEX
from agml.errors import InputError

FIXTURES = Path(__file__).parent / "fixtures"
MC = FIXTURES / "general_knowledge_mc.jsonl"
TEXT = (FIXTURES / "neutral_text.txt").read_text(encoding="utf-8")


def test_load_choice_items_validates(tmp_path):
    items = load_choice_items(MC)
    assert len(items) == 5 and items[1].choices[items[1].answer] == "Eight" and items[0].domain == "geography"
    bad = tmp_path / "bad.jsonl"
    for line, message in (
        ('{"question": "q", "choices": ["a"], "answer": 0}', "at least two"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "index of the right choice"),
        ('{"question": "q", "choices": ["a", "b"]}', "'answer'"),
        ("not json", "not valid JSON"),
    ):
        bad.write_text(line + "\n")
        with pytest.raises(InputError, match=message):
            load_choice_items(bad)
    with pytest.raises(InputError, match="not found"):
        load_choice_items(tmp_path / "missing.jsonl")


def test_choice_examples_label_only_the_choice_tokens(smol_tokenizer):
    item = ChoiceItem("What is 7 times 8?", ("54", "fifty-six"), 1)
    for example, choice in zip(choice_examples(smol_tokenizer, item), item.choices, strict=True):
        labelled = [t for t in example.labels if t != IGNORE_INDEX]
        assert smol_tokenizer.decode(labelled) == choice
        assert example.input_ids[-len(labelled):] == labelled


def test_choice_accuracy_raw_and_byte_normalised(monkeypatch, smol_tokenizer):
    items = [ChoiceItem("q1", ("a", "bbbb"), 1, "x"), ChoiceItem("q2", ("cc", "d"), 0, "y")]
    # q1: raw picks "a" (-2 > -4), per byte picks "bbbb" (-1 > -2); q2: both pick "cc".
    scores = [[-2.0, -4.0], [-1.0, -3.0]]
    monkeypatch.setattr(capability.logprobs, "continuation_logprobs", lambda *args, **kwargs: scores)
    result = choice_accuracy(None, smol_tokenizer, items)
    assert (result["acc"], result["acc_norm"], result["correct"], result["correct_norm"]) == (0.5, 1.0, 1, 2)
    assert result["by_domain"] == {"x": 1.0, "y": 1.0} and result["item_correct_norm"] == [True, True]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prompt_scoring_equals_scoring_each_choice_on_its_own(arch, smol_tokenizer):
    """The prompt's KV cache shared by its choices gives the same sums as a full pass per choice, with prompts of
    different lengths, choices of different lengths and items with fewer choices in one batch."""
    from tiny_models import tiny_model

    from agml.data import pad_token_id
    from agml.logprobs import continuation_logprobs, example_logprobs

    model = tiny_model(arch, seed=3, vocab_size=len(smol_tokenizer)).eval()
    items = [*load_choice_items(MC), ChoiceItem("Is the sky blue on a clear day?", ("Yes", "No"), 0)]
    pad = pad_token_id(smol_tokenizer)
    for batch_size in (1, 3, 16):
        shared = continuation_logprobs(
            model, [capability.question_ids(smol_tokenizer, i) for i in items],
            [[capability.choice_ids(smol_tokenizer, c) for c in i.choices] for i in items], pad, batch_size)
        alone, _ = example_logprobs(model, [e for i in items for e in choice_examples(smol_tokenizer, i)], pad, 1)
        assert [len(s) for s in shared] == [len(i.choices) for i in items]
        assert [v for s in shared for v in s] == pytest.approx(alone, abs=1e-4)


def test_choice_accuracy_before_after_uses_the_adapter(smol_tokenizer):
    model = peft_tiny(randomise=True)
    items = load_choice_items(MC)
    result = choice_accuracy_before_after(model, smol_tokenizer, items, batch_size=4)
    assert result["headline"] == "acc_norm" and result["before"]["n"] == 5
    assert 0 <= result["kept"] <= result["base_right"] == result["before"]["correct_norm"]
    with model.disable_adapter():
        assert choice_accuracy(model, smol_tokenizer, items) == result["before"]
    with pytest.raises(InputError, match="PEFT model"):
        choice_accuracy_before_after(model.get_base_model(), smol_tokenizer, items)


def test_perplexity_matches_the_models_own_loss(smol_tokenizer):
    model = peft_tiny(randomise=True)
    chunks = text_chunks(smol_tokenizer, TEXT, chunk_tokens=32)
    ids = smol_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert [len(c.input_ids) for c in chunks][:-1] == [32] * (len(chunks) - 1)
    assert sum(len(c.input_ids) for c in chunks) == len(ids)
    single = text_chunks(smol_tokenizer, TEXT, chunk_tokens=len(ids))
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert perplexity(model, smol_tokenizer, single)["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    result = perplexity_before_after(model, smol_tokenizer, TEXT, chunk_tokens=32)
    assert result["before"]["perplexity"] != pytest.approx(result["after"]["perplexity"])
    assert result["ratio"] == pytest.approx(result["after"]["perplexity"] / result["before"]["perplexity"])
    with pytest.raises(InputError, match="too short"):
        text_chunks(smol_tokenizer, "", 32)


def test_local_lm_eval_task_config_points_at_the_data():
    pytest.importorskip("yaml")
    config = capability.local_task_config(MC)
    assert config["task"] == "agml_general_knowledge" and config["output_type"] == "multiple_choice"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(MC.resolve())
    with pytest.raises(InputError, match="not found"):
        capability.local_task_config(FIXTURES / "missing.jsonl")


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval extra not installed")
def test_run_lm_eval_runs_the_local_task_on_the_model_and_the_base(monkeypatch, smol_tokenizer):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = peft_tiny(randomise=True)
    result = capability.run_lm_eval(model, ["agml_general_knowledge"], tokenizer=smol_tokenizer, batch_size=4,
                                    data_file=MC)
    for side in ("after", "before"):
        metrics = result[side]["agml_general_knowledge"]
        assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
    assert not adapter_disabled(model)  # the adapter is back on afterwards
    with pytest.raises(InputError, match="non-empty list"):
        capability.run_lm_eval(model, "agml_general_knowledge", tokenizer=smol_tokenizer)
