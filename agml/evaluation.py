"""Before/after evaluation of an unlearning adapter on held-out probes (`agml eval`).

"Before" is the model with its adapter disabled (`model.disable_adapter()`), "after" the model with it active; both
answer every probe greedily through the chat template. The result follows the JSON shape of docs/architecture.md
("File formats") and adds teacher-forced and fluency metrics:

* Pass rules (lowercase substring match, nothing else normalised, so a result is easy to predict by hand): a forget
  probe passes when its answer contains none of its `forbidden` strings; a retain probe passes when it contains at
  least one of its `required` strings (a retain probe without `required` passes).
* `cloze_logprob`: on forget probes of category "cloze", the log-probability (nats, summed over the term's tokens) that
  the model says the concept term where the base model said it. The term is the earliest of `concept_terms` +
  the probe's `forbidden` found in the base ("before") answer, and it is scored after the base answer's prefix up to
  that point (teacher forcing). Terms the probe's own text contains are skipped (the base answer often echoes the
  prompt). When the base answer names none of them, the term is the first remaining concept term (else forbidden
  string) at the start of the answer; a probe with no remaining term is left out. Before and after use the same
  prefix and term, so the difference is the adapter's effect alone. Averaged over the cloze probes scored ("n").
* `retain_kl`: KL(base || model) per token on the base model's own answers to the retain probes (teacher forcing),
  summed over the answer tokens (end-of-turn marker included) and divided by their number.
* `fluency` over the answers to all probes: `repetition_rate` = share of word 3-grams that repeat an earlier 3-gram of
  the same answer (pooled over answers); `distinct_2` = distinct word bigrams / all word bigrams over all answers;
  `perplexity` = the BASE model's perplexity of the answers (adapter disabled, teacher forcing, end-of-turn marker
  included), so gibberish and loops score badly; `answer_length` = mean number of words. Words are `\\w+` runs,
  lowercased.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from agml.data import IGNORE_INDEX, Example, PromptRecord, build_example, pad_token_id, prompt_ids
from agml.errors import InputError
from agml.generation import greedy_answers
from agml.logprobs import adapter_disabled, example_logprobs, mean_token_kl

CLOZE_CATEGORY = "cloze"
_WORD = re.compile(r"\w+")


# --- pass rules and pass rates ---------------------------------------------------------------------------------


def probe_passes(record: PromptRecord, answer: str) -> bool:
    """The one pass rule (docs/architecture.md): forget = no forbidden string in the answer; retain = at least one
    required string. Training's validation uses it too."""
    text = answer.lower()
    if record.type == "forget":
        return not any(term.lower() in text for term in record.forbidden)
    if not record.required:
        return True
    return any(term.lower() in text for term in record.required)


def pass_rates(records: Sequence[PromptRecord], passed: Sequence[bool], kind: str) -> dict:
    """{"pass_rate", "n", "by_category"} over the records of one type; pass_rate is None when n == 0."""
    by_category: dict[str, list[bool]] = {}
    for record, ok in zip(records, passed, strict=True):
        if record.type == kind:
            by_category.setdefault(record.category, []).append(ok)
    every = [ok for oks in by_category.values() for ok in oks]
    return {
        "pass_rate": _mean(every),
        "n": len(every),
        "by_category": {category: _mean(oks) for category, oks in sorted(by_category.items())},
    }


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values)) / len(values) if values else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def score_answers(probes: Sequence[PromptRecord], before: Sequence[str], after: Sequence[str]) -> dict:
    """The contract part of the result (docs/architecture.md): pass rates before/after and one entry per probe."""
    before_pass = [probe_passes(p, a) for p, a in zip(probes, before, strict=True)]
    after_pass = [probe_passes(p, a) for p, a in zip(probes, after, strict=True)]
    entries = []
    for probe, answer_before, answer_after, ok_before, ok_after in zip(
        probes, before, after, before_pass, after_pass, strict=True
    ):
        entry = {"prompt": probe.prompt, "type": probe.type, "category": probe.category}
        if len(probe.messages) > 1:
            entry["messages"] = [dict(m) for m in probe.messages]
        entry.update(before=answer_before, after=answer_after, before_pass=ok_before, after_pass=ok_after)
        entries.append(entry)
    return {
        "before": {kind: pass_rates(probes, before_pass, kind) for kind in ("forget", "retain")},
        "after": {kind: pass_rates(probes, after_pass, kind) for kind in ("forget", "retain")},
        "probes": entries,
    }


# --- fluency from text -------------------------------------------------------------------------------------------


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def text_fluency(answers: Sequence[str]) -> dict:
    """repetition_rate, distinct_2 and answer_length (words) of a set of answers; None where undefined."""
    words = [_WORD.findall(answer.lower()) for answer in answers]
    trigrams = repeated = 0
    for answer_words in words:
        seen: set[tuple[str, ...]] = set()
        for gram in _ngrams(answer_words, 3):
            trigrams += 1
            repeated += gram in seen
            seen.add(gram)
    bigrams = [gram for answer_words in words for gram in _ngrams(answer_words, 2)]
    return {
        "repetition_rate": repeated / trigrams if trigrams else None,
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else None,
        "answer_length": _mean([len(w) for w in words]),
    }


# --- teacher-forced scoring ----------------------------------------------------------------------------------------


def _desc(label: str, progress: bool) -> str | None:
    return label if progress else None


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def cloze_example(tokenizer, probe: PromptRecord, base_answer: str, concept_terms: Sequence[str]) -> Example | None:
    """Teacher-forcing example whose labels are the concept term's tokens (see the module docstring)."""
    # A term the conversation already contains would be scored on a copy of the prompt, not on recall.
    asked = " ".join(m["content"] for m in probe.messages).lower()
    candidates = [t for t in (*concept_terms, *probe.forbidden) if t.strip() and t.lower() not in asked]
    if not candidates:
        return None
    lowered = base_answer.lower()
    found = [(lowered.find(t.lower()), -len(t), t) for t in candidates if t.lower() in lowered]
    if found:
        position, negative_length, _ = min(found)
        prefix = base_answer[:position].rstrip()
        # The whitespace before the term belongs to the term's first token in BPE vocabularies.
        continuation = base_answer[len(prefix):position - negative_length]
    else:
        prefix, continuation = "", candidates[0]
    head = prompt_ids(tokenizer, probe.messages)
    prefix_ids = _encode(tokenizer, prefix) if prefix else []
    full_ids = _encode(tokenizer, prefix + continuation)
    shared = 0
    while shared < min(len(prefix_ids), len(full_ids)) and prefix_ids[shared] == full_ids[shared]:
        shared += 1
    if shared == len(full_ids):
        return None
    labels = [IGNORE_INDEX] * (len(head) + shared) + full_ids[shared:]
    return Example(head + full_ids, labels)


def _cloze_logprob(model, tokenizer, probes, before, concept_terms, batch_size, progress) -> dict:
    examples = []
    for probe, answer in zip(probes, before, strict=True):
        if probe.type == "forget" and probe.category == CLOZE_CATEGORY:
            example = cloze_example(tokenizer, probe, answer, concept_terms)
            if example is not None:
                examples.append(example)
    pad = pad_token_id(tokenizer)
    base_totals, _ = example_logprobs(model, examples, pad, batch_size, base=True,
                                      desc=_desc("cloze (before)", progress))
    totals, _ = example_logprobs(model, examples, pad, batch_size, desc=_desc("cloze (after)", progress))
    return {"before": _mean(base_totals), "after": _mean(totals), "n": len(examples)}


def _answer_examples(tokenizer, probes: Sequence[PromptRecord], answers: Sequence[str]) -> list[Example]:
    return [build_example(tokenizer, p.messages, a) for p, a in zip(probes, answers, strict=True)]


def base_perplexity(model, tokenizer, probes, answers, batch_size: int = 16, progress: bool = False) -> float | None:
    """exp(mean NLL per answer token) of the answers under the base model (adapter disabled)."""
    examples = _answer_examples(tokenizer, probes, answers)
    totals, counts = example_logprobs(model, examples, pad_token_id(tokenizer), batch_size, base=True,
                                      desc=_desc("perplexity", progress))
    tokens = sum(counts)
    return math.exp(-sum(totals) / tokens) if tokens else None


# --- the whole evaluation ------------------------------------------------------------------------------------------


def evaluate(
    model,
    tokenizer,
    probes: Sequence[PromptRecord],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    concept_terms: Sequence[str] = (),
    progress: bool = True,
) -> dict:
    """Answer every probe before (adapter disabled) and after, score them; see the module docstring."""
    _check_arguments(probes, max_new_tokens, batch_size)
    conversations = [p.messages for p in probes]

    def generate(desc: str) -> list[str]:
        return greedy_answers(model, tokenizer, conversations, max_new_tokens, batch_size, desc if progress else None)

    with adapter_disabled(model):
        before = generate("answers (before)")
    after = generate("answers (after)")
    result = score_answers(probes, before, after)
    result["cloze_logprob"] = _cloze_logprob(model, tokenizer, probes, before, concept_terms, batch_size, progress)
    retain = [(p, a) for p, a in zip(probes, before, strict=True) if p.type == "retain"]
    retain_examples = _answer_examples(tokenizer, [p for p, _ in retain], [a for _, a in retain])
    result["retain_kl"] = mean_token_kl(model, retain_examples, pad_token_id(tokenizer), batch_size,
                                        desc=_desc("retain KL", progress))
    result["fluency"] = {
        name: {
            **text_fluency(answers),
            "perplexity": base_perplexity(model, tokenizer, probes, answers, batch_size, progress),
        }
        for name, answers in (("before", before), ("after", after))
    }
    result["summary"] = summarise(result)
    return result


def _check_arguments(probes: Sequence[PromptRecord], max_new_tokens: int, batch_size: int) -> None:
    if not probes:
        raise InputError("no probes to evaluate")
    if max_new_tokens < 1:
        raise InputError(f"max new tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")


def summarise(result: dict) -> dict:
    """Headline numbers of an evaluation result (ratios are after/before; None where undefined)."""
    before, after, fluency = result["before"], result["after"], result["fluency"]
    return {
        "forget_pass_before": before["forget"]["pass_rate"],
        "forget_pass_after": after["forget"]["pass_rate"],
        "retain_pass_before": before["retain"]["pass_rate"],
        "retain_pass_after": after["retain"]["pass_rate"],
        "retain_pass_ratio": _ratio(after["retain"]["pass_rate"], before["retain"]["pass_rate"]),
        "retain_kl": result["retain_kl"],
        "cloze_logprob_before": result["cloze_logprob"]["before"],
        "cloze_logprob_after": result["cloze_logprob"]["after"],
        "perplexity_before": fluency["before"]["perplexity"],
        "perplexity_after": fluency["after"]["perplexity"],
        "fluency_ratio": _ratio(fluency["after"]["perplexity"], fluency["before"]["perplexity"]),
        "repetition_rate_before": fluency["before"]["repetition_rate"],
        "repetition_rate_after": fluency["after"]["repetition_rate"],
        "distinct_2_before": fluency["before"]["distinct_2"],
        "distinct_2_after": fluency["after"]["distinct_2"],
    }
