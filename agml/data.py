"""Prompt records, JSONL loading and chat-templated training examples.

Every prompt goes through the tokenizer's chat template the same way in
training, scoring and evaluation (`prompt_ids`, `build_example`); labels cover
only the assistant answer.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agml.errors import InputError
from agml.io import atomic_write_text

IGNORE_INDEX = -100
RECORD_TYPES = ("forget", "retain")
_FIELDS = {"prompt", "messages", "type", "category", "forbidden", "required", "answer", "kind", "language"}
# What sort of answer a prompt asks for; recommendation/list/similar are judged by whether something is recommended.
PROMPT_KINDS = ("question", "recommendation", "list", "similar", "cloze", "general")
_ROLES = {"system", "user", "assistant"}
# Used only when a tokenizer has no chat template (some tiny test tokenizers).
_FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: a conversation ending in a user turn, plus what to check in the answer."""

    messages: tuple[dict[str, str], ...]
    type: str
    category: str = "default"
    forbidden: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    answer: str | None = None
    source: str = field(default="<memory>", compare=False)
    kind: str = "question"
    language: str = "en"

    @property
    def prompt(self) -> str:
        """The last user turn (what a person would call the prompt)."""
        return self.messages[-1]["content"]

    def with_answer(self, answer: str) -> PromptRecord:
        return PromptRecord(self.messages, self.type, self.category, self.forbidden, self.required, answer, self.source,
                            self.kind, self.language)

    def to_json(self) -> dict:
        out: dict = {"type": self.type, "category": self.category}
        if len(self.messages) == 1:
            out["prompt"] = self.prompt
        else:
            out["messages"] = [dict(m) for m in self.messages]
        if self.forbidden:
            out["forbidden"] = list(self.forbidden)
        if self.required:
            out["required"] = list(self.required)
        if self.answer is not None:
            out["answer"] = self.answer
        if self.kind != "question":
            out["kind"] = self.kind
        if self.language != "en":
            out["language"] = self.language
        return out


def _string_list(value, name: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise InputError(f"{where}: {name!r} must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def _messages(obj: dict, where: str) -> tuple[dict[str, str], ...]:
    if ("prompt" in obj) == ("messages" in obj):
        raise InputError(f"{where}: give exactly one of 'prompt' or 'messages'")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise InputError(f"{where}: 'prompt' must be a non-empty string")
        return ({"role": "user", "content": obj["prompt"]},)
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise InputError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise InputError(f"{where}: messages[{i}] must be an object with exactly 'role' and 'content'")
        if not isinstance(m["role"], str) or m["role"] not in _ROLES:
            raise InputError(f"{where}: messages[{i}] has role {m['role']!r}; expected one of {sorted(_ROLES)}")
        if not isinstance(m["content"], str):
            raise InputError(f"{where}: messages[{i}]['content'] must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise InputError(f"{where}: the last message must be from the user (the model answers it)")
    return tuple(out)


def parse_record(obj, where: str, default_type: str | None = None) -> PromptRecord:
    """Validate one JSON object; `where` ("file:line") prefixes every error."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - _FIELDS
    if unknown:
        raise InputError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
    kind = obj.get("type", default_type)
    if kind not in RECORD_TYPES:
        raise InputError(f"{where}: 'type' must be one of {list(RECORD_TYPES)}, got {kind!r}")
    category = obj.get("category", "default")
    if not isinstance(category, str) or not category.strip():
        raise InputError(f"{where}: 'category' must be a non-empty string")
    answer = obj.get("answer")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise InputError(f"{where}: 'answer' must be a non-empty string")
    prompt_kind = obj.get("kind", "question")
    if prompt_kind not in PROMPT_KINDS:
        raise InputError(f"{where}: 'kind' must be one of {list(PROMPT_KINDS)}, got {prompt_kind!r}")
    language = obj.get("language", "en")
    if not isinstance(language, str) or not re.fullmatch(r"[a-z]{2,3}", language):
        raise InputError(f"{where}: 'language' must be a lower-case ISO 639 code such as 'fr', got {language!r}")
    return PromptRecord(
        messages=_messages(obj, where),
        type=kind,
        category=category.strip(),
        forbidden=_string_list(obj.get("forbidden", []), "forbidden", where),
        required=_string_list(obj.get("required", []), "required", where),
        answer=answer,
        source=where,
        kind=prompt_kind,
        language=language,
    )


def read_jsonl(path: str | os.PathLike, what: str) -> Iterator[tuple[object, str]]:
    """(parsed object, "file:line") for every non-blank line of a JSON Lines file; errors name the file and line.

    `what` names the file's role in errors ("prompt", "multiple-choice"). A UTF-8 BOM is accepted.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not data
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {what} file {path}: {err}") from err
    # JSON Lines separates records by "\n" only; str.splitlines() would also split at U+2028, U+0085, ...
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield json.loads(line), where
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg})") from err
        except (ValueError, RecursionError) as err:  # a 5,000-digit number; nesting deeper than Python's stack
            raise InputError(f"{where}: not valid JSON for agml ({type(err).__name__}: {str(err)[:120]})") from err


def load_prompts(path: str | os.PathLike, default_type: str | None = None) -> list[PromptRecord]:
    """Read a prompt/probe JSONL file; errors name the file and line. Blank lines are skipped."""
    path = Path(path)
    records = [parse_record(obj, where, default_type) for obj, where in read_jsonl(path, "prompt")]
    if not records:
        raise InputError(f"prompt file is empty: {path}")
    return records


def conversation_key(record: PromptRecord) -> tuple[tuple[str, str], ...]:
    """The conversation as (role, content) pairs, lower-cased and whitespace-normalised: equal keys = same prompt."""
    return tuple((m["role"], " ".join(m["content"].lower().split())) for m in record.messages)


def save_prompts(records: Iterable[PromptRecord], path: str | os.PathLike) -> None:
    atomic_write_text(path, "".join(json.dumps(record.to_json(), ensure_ascii=False) + "\n" for record in records))


# --- chat templating -------------------------------------------------------------------------


def _render(tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    template = None if getattr(tokenizer, "chat_template", None) else _FALLBACK_TEMPLATE
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def _encode(tokenizer, text: str) -> list[int]:
    # The chat template already holds any special tokens it wants.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of the templated conversation followed by the assistant header."""
    return _encode(tokenizer, _render(tokenizer, messages, add_generation_prompt=True))


def answer_suffix(tokenizer, messages: Sequence[dict[str, str]], answer: str) -> str:
    """The text the template appends for an assistant answer (answer plus end-of-turn marker)."""
    prompt = _render(tokenizer, messages, add_generation_prompt=True)
    full = _render(tokenizer, [*messages, {"role": "assistant", "content": answer}], add_generation_prompt=False)
    if full.startswith(prompt):
        return full[len(prompt):]
    # Templates that re-render history differently: fall back to answer + EOS.
    return answer + (tokenizer.eos_token or "")


@dataclass
class Example:
    """One tokenised training example; labels are IGNORE_INDEX outside the assistant answer."""

    input_ids: list[int]
    labels: list[int]


def build_example(tokenizer, messages: Sequence[dict[str, str]], answer: str, end_of_turn: bool = True) -> Example:
    """Prompt through the chat template, answer (with end-of-turn unless `end_of_turn` is False: the start of a
    longer answer) as the only labelled tokens."""
    head = prompt_ids(tokenizer, messages)
    suffix = answer_suffix(tokenizer, messages, answer)
    if not end_of_turn and answer in suffix:
        suffix = suffix[:suffix.index(answer) + len(answer)]
    tail = _encode(tokenizer, suffix)
    if not tail:
        raise InputError(f"answer {answer!r} is empty after chat templating")
    return Example(head + tail, [IGNORE_INDEX] * len(head) + list(tail))


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise InputError("the tokenizer has neither a pad token nor an EOS token")
    return int(pad)


def collate(examples: Sequence[Example], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example: input_ids, attention_mask, labels (IGNORE_INDEX on padding)."""
    if not examples:
        raise InputError("cannot batch an empty list of examples")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[row, cols] = torch.tensor(example.input_ids)
        labels[row, cols] = torch.tensor(example.labels)
        mask[row, cols] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(examples: Sequence[Example], batch_size: int, pad_id: int, padding_side: str = "right"):
    """Yield collated batches in order."""
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start:start + batch_size], pad_id, padding_side)
