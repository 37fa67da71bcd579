"""Prompt JSONL loading, chat-templated examples and batching (agml.data)."""

import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agml.data import IGNORE_INDEX, PromptRecord, build_example, collate, load_prompts, save_prompts
from agml.errors import InputError


def write_lines(tmp_path, lines, name="prompts.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_loads_prompt_and_messages_forms(tmp_path):
    path = write_lines(tmp_path, [
        json.dumps({"prompt": "Who directed Inception?", "type": "forget", "category": "director",
                    "forbidden": ["Nolan"]}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                 {"role": "user", "content": "Who directed Memento?"}],
                    "type": "retain", "required": ["nolan"], "answer": "Christopher Nolan."}),
    ])
    forget, retain = load_prompts(path)
    assert forget.messages == ({"role": "user", "content": "Who directed Inception?"},)
    assert (forget.type, forget.category, forget.forbidden) == ("forget", "director", ("Nolan",))
    assert retain.prompt == "Who directed Memento?" and len(retain.messages) == 3
    assert (retain.type, retain.category, retain.required, retain.answer) == (
        "retain", "default", ("nolan",), "Christopher Nolan.")
    assert retain.source == f"{path}:3"


def test_default_type_applies_only_when_missing(tmp_path):
    path = write_lines(tmp_path, ['{"prompt": "a"}', '{"prompt": "b", "type": "forget"}'])
    assert [r.type for r in load_prompts(path, default_type="retain")] == ["retain", "forget"]


def test_save_and_load_round_trip(tmp_path):
    records = [
        PromptRecord(({"role": "user", "content": "Q1"},), "forget", "cloze", forbidden=("x",), answer="A1"),
        # JSON Lines ends records at \n only: separators that str.splitlines() also honours stay inside a record.
        PromptRecord(({"role": "user", "content": "line\u2028separator\x85next\x1cfile"},), "retain"),
        PromptRecord(({"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A"},
                      {"role": "user", "content": "Q3"}), "retain", "general", required=("y", "z")),
    ]
    save_prompts(records, tmp_path / "out.jsonl")
    assert load_prompts(tmp_path / "out.jsonl") == records


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "a", "type": "forget", "colour": "red"}', "unknown field"),
    ('{"type": "forget"}', "exactly one of 'prompt' or 'messages'"),
    ('{"prompt": "a", "messages": [{"role": "user", "content": "b"}], "type": "forget"}', "exactly one of"),
    ('{"prompt": "a", "type": "remember"}', "'type' must be one of"),
    ('{"prompt": "a"}', "'type' must be one of"),
    ('{"prompt": "", "type": "forget"}', "'prompt' must be a non-empty string"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "type": "retain"}',
     "last message must be from the user"),
    ('{"messages": [{"role": "robot", "content": "a"}], "type": "retain"}', "role 'robot'"),
    ('{"messages": [{"role": ["user"], "content": "a"}], "type": "retain"}', "role"),
    ('{"prompt": "a", "type": "forget", "forbidden": [1]}', "'forbidden' must be a list"),
    ('[1, 2]', "expected a JSON object"),
])
def test_each_error_names_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path, ['{"prompt": "fine", "type": "retain"}', line])
    with pytest.raises(InputError, match=message) as info:
        load_prompts(path)
    assert f"{path}:2:" in str(info.value)


def test_empty_and_missing_files_are_errors(tmp_path):
    empty = write_lines(tmp_path, ["", "   "])
    with pytest.raises(InputError, match=f"empty: {empty}"):
        load_prompts(empty)
    with pytest.raises(InputError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["prompt", "messages", "type", "category", "forbidden", "required", "answer", "role",
                         "content", "x"]), inner, max_size=4),
    max_leaves=8,
)
record_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["forget", "retain", "other"])},
    optional={
        "prompt": st.text(max_size=8) | json_values,
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "bot"]) | json_values,
                                                    "content": st.text(max_size=5) | json_values}), max_size=3),
        "forbidden": st.lists(st.text(max_size=4), max_size=2) | json_values,
        "required": st.lists(st.text(max_size=4), max_size=2),
        "category": st.text(max_size=4) | json_values,
        "answer": st.text(max_size=4) | json_values,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(json_values | record_like | st.text(max_size=12), min_size=1, max_size=4))
def test_any_json_line_loads_or_names_its_line(tmp_path, values):
    lines = [v if isinstance(v, str) and not v.startswith("{") else json.dumps(v) for v in values]
    lines = [line.replace("\n", " ").replace("\r", " ") for line in lines]
    path = write_lines(tmp_path, lines, "fuzz.jsonl")
    try:
        records = load_prompts(path)
    except InputError as err:
        assert re.match(rf"({re.escape(str(path))}:\d+: |prompt file is empty: {re.escape(str(path))})", str(err))
        return
    assert 1 <= len(records) <= len(lines)
    for record in records:
        assert record.type in ("forget", "retain") and record.messages[-1]["role"] == "user"


def labelled_text(tokenizer, example):
    pairs = zip(example.input_ids, example.labels, strict=True)
    return tokenizer.decode([token for token, label in pairs if label != IGNORE_INDEX])


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Who directed Memento?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Who directed Memento?"}],
])
def test_labels_cover_exactly_the_answer(smol_tokenizer, messages):
    answer = "Christopher Nolan directed Memento (2000)."
    example = build_example(smol_tokenizer, messages, answer)
    assert len(example.input_ids) == len(example.labels)
    assert labelled_text(smol_tokenizer, example) == answer + "<|im_end|>\n"
    start = build_example(smol_tokenizer, messages, answer, end_of_turn=False)
    assert labelled_text(smol_tokenizer, start) == answer  # the start of a longer answer: no end-of-turn
    assert start.input_ids == example.input_ids[:len(start.input_ids)]
    labelled = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    assert labelled == list(range(labelled[0], len(example.labels)))  # one contiguous tail
    assert all(example.labels[i] == example.input_ids[i] for i in labelled)
    prompt_text = smol_tokenizer.decode(example.input_ids[:labelled[0]])
    assert prompt_text.endswith("<|im_start|>assistant\n") and messages[-1]["content"] in prompt_text


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_pads_on_the_requested_side(smol_tokenizer, side):
    short = build_example(smol_tokenizer, [{"role": "user", "content": "Hi"}], "Hello.")
    long = build_example(smol_tokenizer, [{"role": "user", "content": "Name a long river in Africa."}],
                         "The Nile is a long river.")
    batch = collate([short, long], pad_id=0, padding_side=side)
    width = len(long.input_ids)
    pad = width - len(short.input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    real = slice(pad, width) if side == "left" else slice(0, width - pad)
    padding = slice(0, pad) if side == "left" else slice(width - pad, width)
    assert batch["input_ids"][0, real].tolist() == short.input_ids
    assert batch["labels"][0, real].tolist() == short.labels
    assert batch["attention_mask"][0].tolist() == [1 if real.start <= i < real.stop else 0 for i in range(width)]
    assert torch.all(batch["labels"][0, padding] == IGNORE_INDEX)
    assert torch.all(batch["input_ids"][0, padding] == 0)
    assert batch["input_ids"][1].tolist() == long.input_ids and batch["attention_mask"][1].all()
