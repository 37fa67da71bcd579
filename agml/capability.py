"""Capability that does not depend on the project's own probes: multiple choice, perplexity, lm-eval.

* Multiple choice (`general_knowledge_mc.jsonl`): each choice is scored as the assistant's answer to the question
  through the chat template (teacher forcing, the choice's tokens only: the end-of-turn marker is not scored, so a
  choice is not rewarded for being a complete answer). `acc` picks the choice with the highest summed log-probability;
  `acc_norm` divides it by the choice's length in UTF-8 bytes first, as lm-eval's acc_norm does. The headline is
  `acc_norm`: summed log-probabilities favour short choices, and the shipped choices differ in length; the byte
  normalisation also makes the figure comparable with the same set run through lm-eval (agml/lm_eval_tasks/).
* Perplexity on a neutral text (`neutral_text.txt`): the text is tokenised once and cut into chunks of a fixed number
  of tokens (the last, shorter chunk kept); every token but each chunk's first is scored; exp(mean NLL). No chat
  template: this is the model's fluency on plain prose.
* Both before (adapter disabled) and after (adapter active) on a PeftModel.
* lm-eval: `run_lm_eval` runs any lm-eval task (the shipped set is the local task `agml_general_knowledge`) on the
  unlearned model and on the base, side by side, in memory (the same PeftModel with its adapter on, then off).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agml import logprobs
from agml.data import IGNORE_INDEX, Example, pad_token_id, prompt_ids, read_jsonl
from agml.errors import InputError

DATASETS = Path(__file__).parent / "datasets"
TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
MC_FILE = DATASETS / "general_knowledge_mc.jsonl"
NEUTRAL_TEXT = DATASETS / "neutral_text.txt"
LOCAL_TASK = "agml_general_knowledge"
HEADLINE_MC_METRIC = "acc_norm"
DEFAULT_CHUNK_TOKENS = 128


# --- the one place that turns examples into log-probabilities ------------------------------------------------------


def example_logprobs(model, tokenizer, examples: Sequence[Example], batch_size: int,
                     desc: str | None = None) -> tuple[list[float], list[int]]:
    """Per example: summed log-probability of its labelled tokens and their count (agml's shared scorer).

    `desc` shows a progress bar: a capability pass over the whole multiple-choice set takes minutes on a CPU."""
    return logprobs.example_logprobs(model, examples, pad_token_id(tokenizer), batch_size, desc=desc)


# --- multiple choice -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceItem:
    question: str
    choices: tuple[str, ...]
    answer: int
    domain: str = "general"


def load_choice_items(path: str | os.PathLike = MC_FILE) -> list[ChoiceItem]:
    """Read a multiple-choice JSONL file ({"question", "choices", "answer", "domain"} per line), validated."""
    path = Path(path)
    items = [_choice_item(obj, where) for obj, where in read_jsonl(path, "multiple-choice")]
    if not items:
        raise InputError(f"multiple-choice file is empty: {path}")
    return items


def _choice_item(obj, where: str) -> ChoiceItem:
    if not isinstance(obj, dict) or not {"question", "choices", "answer"} <= set(obj):
        raise InputError(f"{where}: expected an object with 'question', 'choices' and 'answer'")
    question, choices, answer = obj["question"], obj["choices"], obj["answer"]
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise InputError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise InputError(f"{where}: 'answer' must be the index of the right choice (0..{len(choices) - 1})")
    return ChoiceItem(question.strip(), tuple(c.strip() for c in choices), answer, str(obj.get("domain", "general")))


def choice_examples(tokenizer, item: ChoiceItem) -> list[Example]:
    """One example per choice: the question as the user turn, the choice's tokens labelled as the answer."""
    head = question_ids(tokenizer, item)
    examples = []
    for choice in item.choices:
        tail = choice_ids(tokenizer, choice)
        examples.append(Example(head + tail, [IGNORE_INDEX] * len(head) + tail))
    return examples


def question_ids(tokenizer, item: ChoiceItem) -> list[int]:
    """The question as the user turn, through the chat template up to the assistant's answer."""
    return prompt_ids(tokenizer, [{"role": "user", "content": item.question}])


def choice_ids(tokenizer, choice: str) -> list[int]:
    """A choice's tokens as the assistant's answer (no end-of-turn: see the module docstring)."""
    return tokenizer(choice, add_special_tokens=False)["input_ids"]


def choice_accuracy(model, tokenizer, items: Sequence[ChoiceItem], batch_size: int = 16) -> dict:
    """acc (raw summed log-prob) and acc_norm (per UTF-8 byte) of the model as it is, with per-item picks."""
    questions = [question_ids(tokenizer, item) for item in items]
    answers = [[choice_ids(tokenizer, choice) for choice in item.choices] for item in items]
    totals = logprobs.continuation_logprobs(model, questions, answers, pad_token_id(tokenizer), batch_size,
                                            desc="general knowledge (MC)")
    picks_raw, picks_norm = [], []
    for item, scores in zip(items, totals, strict=True):
        normalised = [s / len(c.encode("utf-8")) for s, c in zip(scores, item.choices, strict=True)]
        picks_raw.append(max(range(len(scores)), key=scores.__getitem__))
        picks_norm.append(max(range(len(normalised)), key=normalised.__getitem__))
    correct_raw = [p == item.answer for p, item in zip(picks_raw, items, strict=True)]
    correct_norm = [p == item.answer for p, item in zip(picks_norm, items, strict=True)]
    return {
        "acc": sum(correct_raw) / len(items),
        "acc_norm": sum(correct_norm) / len(items),
        "n": len(items),
        "correct": sum(correct_raw),
        "correct_norm": sum(correct_norm),
        "by_domain": _by_domain(items, correct_norm),
        "item_correct_norm": correct_norm,
    }


def _by_domain(items: Sequence[ChoiceItem], correct: Sequence[bool]) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for item, ok in zip(items, correct, strict=True):
        groups.setdefault(item.domain, []).append(ok)
    return {domain: sum(oks) / len(oks) for domain, oks in sorted(groups.items())}


def choice_accuracy_before_after(model, tokenizer, items: Sequence[ChoiceItem], batch_size: int = 16) -> dict:
    """Multiple-choice accuracy with the adapter disabled (before) and active (after).

    `kept` counts the items the base gets right (acc_norm) that stay right after: a loss on items the base never
    knew is not a loss of capability.
    """
    if not items:
        raise InputError("no multiple-choice items to score")
    with logprobs.adapter_disabled(model):
        before = choice_accuracy(model, tokenizer, items, batch_size)
    after = choice_accuracy(model, tokenizer, items, batch_size)
    known = [i for i, ok in enumerate(before["item_correct_norm"]) if ok]
    return {
        "headline": HEADLINE_MC_METRIC,
        "before": before,
        "after": after,
        "base_right": len(known),
        "kept": sum(after["item_correct_norm"][i] for i in known),
    }


# --- perplexity on neutral text ------------------------------------------------------------------------------------


def text_chunks(tokenizer, text: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[Example]:
    """The text's tokens cut into chunks of `chunk_tokens`; every token after a chunk's first is labelled."""
    if chunk_tokens < 2:
        raise InputError(f"perplexity chunks need at least 2 tokens, got {chunk_tokens}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[start:start + chunk_tokens] for start in range(0, len(ids), chunk_tokens)]
    chunks = [chunk for chunk in chunks if len(chunk) >= 2]
    if not chunks:
        raise InputError("the perplexity text is too short: it needs at least two tokens")
    return [Example(chunk, [IGNORE_INDEX, *chunk[1:]]) for chunk in chunks]


def perplexity(model, tokenizer, chunks: Sequence[Example], batch_size: int = 8) -> dict:
    """exp(mean NLL per scored token) of the model as it is over the chunks."""
    totals, counts = example_logprobs(model, tokenizer, chunks, batch_size, desc="neutral-text perplexity")
    tokens = sum(counts)
    return {"perplexity": math.exp(-sum(totals) / tokens), "tokens": tokens, "chunks": len(chunks)}


def perplexity_before_after(
    model, tokenizer, text: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, batch_size: int = 8
) -> dict:
    """Perplexity of the text with the adapter disabled (before) and active (after); ratio = after / before."""
    chunks = text_chunks(tokenizer, text, chunk_tokens)
    with logprobs.adapter_disabled(model):
        before = perplexity(model, tokenizer, chunks, batch_size)
    after = perplexity(model, tokenizer, chunks, batch_size)
    return {"before": before, "after": after, "ratio": after["perplexity"] / before["perplexity"],
            "chunk_tokens": chunk_tokens}


def read_neutral_text(path: str | os.PathLike = NEUTRAL_TEXT) -> str:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"neutral text not found: {path}")
    return path.read_text(encoding="utf-8")


# --- lm-eval -------------------------------------------------------------------------------------------------------


def local_task_config(data_file: str | os.PathLike = MC_FILE) -> dict:
    """The shipped lm-eval task (agml/lm_eval_tasks/agml_general_knowledge.yaml) reading `data_file`.

    The YAML names the data file relative to this package; lm-eval would resolve it against the working folder, so
    it is made absolute here.
    """
    import yaml

    config = yaml.safe_load((TASKS_DIR / f"{LOCAL_TASK}.yaml").read_text(encoding="utf-8"))
    data_file = Path(data_file)
    if not data_file.is_file():
        raise InputError(f"lm-eval task data not found: {data_file}")
    config["dataset_kwargs"] = {"data_files": {config["test_split"]: str(data_file.resolve())}}
    return config


def _lm_eval_modules():
    try:
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise InputError("lm-eval is not installed; install the extra: pip install 'agml[lm-eval]'") from err
    return evaluator, HFLM, TaskManager


def _task_list(tasks: Sequence[str], data_file: str | os.PathLike) -> list:
    if isinstance(tasks, str) or not tasks:
        raise InputError(f"lm-eval tasks must be a non-empty list of task names, got {tasks!r}")
    return [local_task_config(data_file) if task == LOCAL_TASK else task for task in tasks]


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    """task -> {metric: value} from lm-eval's results (its "acc,none" keys shortened to "acc")."""
    out = {}
    for task, values in results.get("results", {}).items():
        out[task] = {key.split(",")[0]: value for key, value in values.items()
                     if isinstance(value, int | float) and not isinstance(value, bool) and key != "alias"}
    return out


def run_lm_eval(
    run_dir_or_model,
    tasks: Sequence[str],
    tokenizer=None,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    data_file: str | os.PathLike = MC_FILE,
    apply_chat_template: bool = False,
) -> dict:
    """lm-eval `tasks` on the unlearned model (adapter on) and the base (adapter off): {"after", "before", "tasks"}.

    `run_dir_or_model` is a run folder (loaded with agml.runs.load_run) or a PeftModel with `tokenizer`. Both sides
    use the same in-memory model, so a masked adapter needs no baked export. "agml_general_knowledge" is the shipped
    set (`data_file`); any other name is looked up in lm-eval's own registry (its data must be in the local
    Hugging Face datasets cache when offline).
    """
    evaluator, hflm, task_manager_class = _lm_eval_modules()
    if isinstance(run_dir_or_model, str | os.PathLike):
        from agml.runs import load_run

        loaded = load_run(run_dir_or_model)
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        model = run_dir_or_model
    if tokenizer is None:
        raise InputError("run_lm_eval on a model needs its tokenizer")
    task_list = _task_list(tasks, data_file)
    # Indexing lm-eval's thousands of bundled task files takes most of a minute: skip it when only ours is asked.
    task_manager = task_manager_class(include_path=str(TASKS_DIR),
                                      include_defaults=any(task != LOCAL_TASK for task in tasks))
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model

    def evaluate() -> dict:
        lm = hflm(pretrained=inner, tokenizer=tokenizer, batch_size=batch_size)
        results = evaluator.simple_evaluate(
            model=lm, tasks=list(task_list), num_fewshot=num_fewshot, limit=limit, log_samples=False,
            apply_chat_template=apply_chat_template, bootstrap_iters=0, task_manager=task_manager,
        )
        return _metrics(results or {})

    was_training = model.training
    model.eval()
    try:
        after = evaluate()
        with logprobs.adapter_disabled(model):
            before = evaluate()
    finally:
        model.train(was_training)
    return {"tasks": list(tasks), "after": after, "before": before, "limit": limit, "num_fewshot": num_fewshot}
