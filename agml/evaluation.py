"""Before/after evaluation of an unlearning adapter on held-out probes (`agml eval`).

"Before" is the model with its adapter disabled (`model.disable_adapter()`), "after" the model with it active; both
answer every probe greedily through the chat template. The result follows the JSON shape of docs/architecture.md
("File formats") and adds teacher-forced and fluency metrics:

* Pass rule: agml.judges.judge_probe (`probe_passes`). A forget probe fails when the answer names one of its
  `forbidden` strings or, given `facts`, the concept's name, aliases or key facts; a retain probe fails when the
  answer is a refusal, lacks every `required` string, or (recommendation/list/similar kinds) recommends nothing.
  Every pass rate carries its 95% Wilson `interval` [low, high]; each probe entry carries the judges' findings.
* `refusal`, `still_recommends` (recommendation/list/similar probes whose answer names an item) per probe type and
  `fuzzy_leak` (the seed-style regexes of facts["fuzzy"], forget probes), before and after, with intervals.
* `forget_coherence`: repetition, distinct-2 and language match of the forget answers (agml.judges).
* `capability`: multiple-choice accuracy on the shipped general-knowledge set and perplexity of the shipped neutral
  text, before and after (agml.capability); `sampling`: best-of-n leak rate of the forget probes (seeded);
  `noise_floor`: retain flips of the trained adapter beside those of random adapters (agml.noise_floor).
* The base model's outputs (greedy answers, samples, MC scores, neutral perplexity) are cached on disk
  (agml.answer_cache): they do not depend on the adapter.
* `cloze_logprob`: on forget probes of category "cloze", the log-probability (nats, summed over the term's tokens) that
  the model says the concept term where the base model said it. The term is the earliest of `concept_terms` +
  the probe's `forbidden` found in the base ("before") answer, and it is scored after the base answer's prefix up to
  that point (teacher forcing). Terms the probe's own text contains are skipped (the base answer often echoes the
  prompt). When the base answer names none of them, the term is the first remaining concept term (else forbidden
  string) at the start of the answer; a probe with no remaining term is left out. Before and after use the same
  prefix and term, so the difference is the adapter's effect alone. Averaged over the cloze probes scored ("n").
* `retain_kl`: KL(base || model) per token on the base model's own answers to the retain probes (teacher forcing),
  summed over the answer tokens (end-of-turn marker included) and divided by their number.
* `fluency` over the answers to the RETAIN probes (forget answers have `forget_coherence`): `repetition_rate` =
  share of word 3-grams that repeat an earlier 3-gram of the same answer (pooled over answers); `distinct_2` =
  distinct word bigrams / all word bigrams over all answers; `perplexity` = the BASE model's perplexity of the
  answers (adapter disabled, teacher forcing, end-of-turn marker included), so gibberish and loops score badly
  (and a canned refusal, which scores well, only counts where it is damage); `answer_length` = mean number of
  words. Words are `\\w+` runs, lowercased.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

from agml import answer_cache
from agml.data import IGNORE_INDEX, Example, PromptRecord, build_example, pad_token_id, prompt_ids
from agml.errors import InputError
from agml.generation import greedy_answers, sampled_answers
from agml.judges import (
    RECOMMENDATION_KINDS,
    ProbeVerdict,
    best_of_n,
    check_facts,
    forget_coherence,
    judge_probe,
    leak_terms,
    normalise,
    probe_kind,
)
from agml.layers import adapter_merged
from agml.logprobs import adapter_disabled, example_logprobs, kl_and_base_logprobs, left_padded_batches
from agml.noise_floor import flip_counts, noise_floor
from agml.stats import rate_of, wilson_interval

CLOZE_CATEGORY = "cloze"
SPLITS = ("test", "dev", "template", "custom")
_WORD = re.compile(r"\w+")


# --- pass rules and pass rates ---------------------------------------------------------------------------------


def probe_passes(record: PromptRecord, answer: str, facts: Mapping | None = None) -> bool:
    """The one pass rule (agml.judges.judge_probe): forget = nothing of the concept leaked (forbidden strings, and
    with `facts` its name, aliases and key facts); retain = not a refusal, a required string present, and for
    recommendation kinds something recommended. Training's validation uses it too."""
    return judge_probe(record, answer, facts).passed


def _interval(flags: Sequence[bool]) -> list[float] | None:
    interval = wilson_interval(sum(bool(f) for f in flags), len(flags))
    return None if interval is None else [interval[0], interval[1]]


def pass_rates(records: Sequence[PromptRecord], passed: Sequence[bool], kind: str) -> dict:
    """{"pass_rate", "n", "by_category"} over the records of one type (pass_rate None when n == 0), plus the 95%
    Wilson `interval` of the pass rate and `by_category_interval`."""
    by_category: dict[str, list[bool]] = {}
    for record, ok in zip(records, passed, strict=True):
        if record.type == kind:
            by_category.setdefault(record.category, []).append(ok)
    every = [ok for oks in by_category.values() for ok in oks]
    return {
        "pass_rate": _mean(every),
        "n": len(every),
        "by_category": {category: _mean(oks) for category, oks in sorted(by_category.items())},
        "interval": _interval(every),
        "by_category_interval": {category: _interval(oks) for category, oks in sorted(by_category.items())},
    }


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values)) / len(values) if values else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _verdict_fields(verdict: ProbeVerdict) -> dict:
    return {
        "leaked_terms": list(verdict.leaked_terms),
        "fuzzy_matches": list(verdict.fuzzy_matches),
        "refused": verdict.refused,
        "recommended": None if verdict.recommended is None else list(verdict.recommended),
    }


def score_answers(probes: Sequence[PromptRecord], before: Sequence[str], after: Sequence[str],
                  facts: Mapping | None = None) -> dict:
    """The contract part of the result (docs/architecture.md): pass rates before/after and one entry per probe,
    each with the judges' findings (`leaked_terms`, `fuzzy_matches`, `refused`, `recommended`: {"before", "after"})."""
    verdicts_before = [judge_probe(p, a, facts) for p, a in zip(probes, before, strict=True)]
    verdicts_after = [judge_probe(p, a, facts) for p, a in zip(probes, after, strict=True)]
    before_pass = [v.passed for v in verdicts_before]
    after_pass = [v.passed for v in verdicts_after]
    entries = []
    for probe, answer_before, answer_after, verdict_before, verdict_after in zip(
        probes, before, after, verdicts_before, verdicts_after, strict=True
    ):
        entry = {"prompt": probe.prompt, "type": probe.type, "category": probe.category}
        if len(probe.messages) > 1:
            entry["messages"] = [dict(m) for m in probe.messages]
        entry.update(before=answer_before, after=answer_after, before_pass=verdict_before.passed,
                     after_pass=verdict_after.passed)
        fields_before, fields_after = _verdict_fields(verdict_before), _verdict_fields(verdict_after)
        entry.update({key: {"before": fields_before[key], "after": fields_after[key]} for key in fields_before})
        entries.append(entry)
    return {
        "before": {kind: pass_rates(probes, before_pass, kind) for kind in ("forget", "retain")},
        "after": {kind: pass_rates(probes, after_pass, kind) for kind in ("forget", "retain")},
        "probes": entries,
        "judged": {"before": verdicts_before, "after": verdicts_after},
    }


def judge_rates(probes: Sequence[PromptRecord], verdicts: Sequence[ProbeVerdict]) -> dict:
    """Refusal rates (forget, retain), "still recommends" rates (recommendation/list/similar probes of each type)
    and the seed-style fuzzy leak rate (forget) of one side, each as agml.stats.rate (rate with 95% interval)."""
    def of(kind: str, flag, recommendation_only: bool = False) -> dict:
        return rate_of([flag(v) for p, v in zip(probes, verdicts, strict=True) if p.type == kind
                        and (not recommendation_only or probe_kind(p) in RECOMMENDATION_KINDS)])

    return {
        "refusal": {kind: of(kind, lambda v: v.refused) for kind in ("forget", "retain")},
        "still_recommends": {kind: of(kind, lambda v: bool(v.recommended), True) for kind in ("forget", "retain")},
        "fuzzy_leak": of("forget", lambda v: v.fuzzy_leaked),
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


# --- capability, sampling, noise floor ------------------------------------------------------------------------------


def _accuracy_side(scores: dict) -> dict:
    """One side of the MC accuracy without per-item flags, with the 95% interval of the headline (acc_norm)."""
    flags = scores["item_correct_norm"]
    return {**{k: v for k, v in scores.items() if k != "item_correct_norm"}, "interval": _interval(flags)}


def capability_before_after(model, tokenizer, fingerprint: str | None, batch_size: int) -> dict:
    """General-knowledge MC accuracy and neutral-text perplexity, base (cached) vs adapter active (agml.capability).

    `kept` counts the items the base gets right that stay right; `kept_interval` is its 95% interval over
    `base_right` items.
    """
    from agml.capability import (
        DEFAULT_CHUNK_TOKENS,
        HEADLINE_MC_METRIC,
        MC_FILE,
        NEUTRAL_TEXT,
        choice_accuracy,
        load_choice_items,
        perplexity,
        read_neutral_text,
        text_chunks,
    )

    items = load_choice_items(MC_FILE)
    item_key = [dataclasses.asdict(item) for item in items]
    chunks = text_chunks(tokenizer, read_neutral_text(NEUTRAL_TEXT), DEFAULT_CHUNK_TOKENS)
    chunk_key = [chunk.input_ids for chunk in chunks]

    def base_mc() -> dict:
        with adapter_disabled(model):
            return choice_accuracy(model, tokenizer, items, batch_size)

    def base_perplexity_of_text() -> dict:
        with adapter_disabled(model):
            return perplexity(model, tokenizer, chunks, batch_size)

    mc_before = answer_cache.cached_value(fingerprint, "mc", item_key, base_mc)
    ppl_before = answer_cache.cached_value(fingerprint, "neutral-ppl", chunk_key, base_perplexity_of_text)
    with adapter_merged(model):
        mc_after = choice_accuracy(model, tokenizer, items, batch_size)
        ppl_after = perplexity(model, tokenizer, chunks, batch_size)
    known = [i for i, ok in enumerate(mc_before["item_correct_norm"]) if ok]
    kept = [bool(mc_after["item_correct_norm"][i]) for i in known]
    return {
        "mc": {
            "headline": HEADLINE_MC_METRIC,
            "before": _accuracy_side(mc_before),
            "after": _accuracy_side(mc_after),
            "base_right": len(known),
            "kept": sum(kept),
            "kept_interval": _interval(kept),
        },
        "neutral_perplexity": {
            "before": ppl_before,
            "after": ppl_after,
            "ratio": _ratio(ppl_after["perplexity"], ppl_before["perplexity"]),
            "chunk_tokens": DEFAULT_CHUNK_TOKENS,
        },
    }


def best_of_n_leaks(model, tokenizer, probes, facts, fingerprint, samples: int, temperature: float, seed: int,
                    max_new_tokens: int, batch_size: int, progress: bool) -> dict:
    """Best-of-n leak rate of the forget probes (a probe leaks when ANY of `samples` seeded samples leaks), before
    (base, cached) and after; with 95% intervals."""
    forget = [p for p in probes if p.type == "forget"]
    conversations = [p.messages for p in forget]

    def sample(desc: str) -> list[list[str]]:
        return sampled_answers(model, tokenizer, conversations, samples, temperature, seed, max_new_tokens,
                               batch_size, _desc(desc, progress))

    def sample_base() -> list[list[str]]:
        with adapter_disabled(model):
            return sample("samples (before)")

    def sample_after() -> list[list[str]]:
        with adapter_merged(model):
            return sample("samples (after)")

    key = {"conversations": [list(c) for c in conversations], "n": samples, "temperature": temperature,
           "seed": seed, "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    sides = {"before": answer_cache.cached_value(fingerprint, "samples", key, sample_base) if forget else [],
             "after": sample_after() if forget else []}
    out: dict = {"n_samples": samples, "temperature": temperature, "seed": seed}
    for side, answers in sides.items():
        leaked = [best_of_n(p, a, facts).leaked for p, a in zip(forget, answers, strict=True)]
        out[side] = rate_of(leaked)
    return out


def noise_floor_flips(model, tokenizer, probes, before, after, facts, seeds: int, max_new_tokens: int,
                      batch_size: int) -> dict:
    """Retain flips (pass -> fail vs the base) of the trained adapter beside those of `seeds` random adapters of the
    same size, sparsity and norm (agml.noise_floor): a retain loss within the random adapters' range is noise."""
    retain_before = [a for p, a in zip(probes, before, strict=True) if p.type == "retain"]
    adapter = getattr(model, "active_adapter", "default")
    floor = noise_floor(model, tokenizer, probes, seeds=tuple(range(seeds)), facts=facts,
                        max_new_tokens=max_new_tokens, batch_size=batch_size, base_answers=retain_before,
                        adapter_name=adapter if isinstance(adapter, str) else "default")
    return {"trained": flip_counts(probes, before, after, facts), "random": floor}


# --- the whole evaluation ------------------------------------------------------------------------------------------


def judge_terms(probes: Sequence[PromptRecord], facts: Mapping | None, concept_terms: Sequence[str]) -> dict:
    """What the judges used, for the report (so a user can check and edit it): the facts dict, the concept terms
    and every leak term some forget probe is judged with."""
    terms: dict[str, str] = {}  # normalised -> first spelling seen (the judge matches case-insensitively)
    for probe in probes:
        if probe.type == "forget":
            for term in leak_terms(probe, facts):
                terms.setdefault(normalise(term), term)
    return {"facts": dict(facts) if facts else None, "concept_terms": list(concept_terms),
            "leak_terms": list(terms.values())}


def evaluate(
    model,
    tokenizer,
    probes: Sequence[PromptRecord],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    concept_terms: Sequence[str] = (),
    facts: Mapping | None = None,
    samples: int = 0,
    temperature: float = 0.7,
    seed: int = 0,
    capability: bool = True,
    noise_floor_seeds: int = 0,
    progress: bool = True,
    split: str = "custom",
    cache: bool = True,
) -> dict:
    """Answer every probe before (adapter disabled) and after, score them; see the module docstring.

    `split` labels the probes ("test": frozen test split, "dev", "template": generated from the concept's name, or
    "custom"); `cache` reads and stores the base model's outputs under
    `$AGML_CACHE/answers/` (agml.answer_cache); samples=0 and noise_floor_seeds=0 skip those parts.
    """
    _check_arguments(probes, max_new_tokens, batch_size)
    if samples < 0 or noise_floor_seeds < 0:
        raise InputError(f"samples and noise floor seeds must be >= 0, got {samples} and {noise_floor_seeds}")
    if split not in SPLITS:
        raise InputError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if facts is not None:
        facts = check_facts(facts)
    fingerprint = answer_cache.base_fingerprint(model, tokenizer) if cache else None
    conversations = [p.messages for p in probes]

    def generate(chosen: list, desc: str) -> list[str]:
        return greedy_answers(model, tokenizer, chosen, max_new_tokens, batch_size, _desc(desc, progress))

    def generate_base(chosen: list) -> list[str]:
        with adapter_disabled(model):
            return generate(chosen, "answers (before)")

    before = answer_cache.cached_greedy(fingerprint, conversations, max_new_tokens, generate_base)
    with adapter_merged(model):
        after = generate(conversations, "answers (after)")
    result = score_answers(probes, before, after, facts)
    judged = result.pop("judged")
    result["split"] = split
    result["judge"] = judge_terms(probes, facts, concept_terms)
    rates = {side: judge_rates(probes, judged[side]) for side in ("before", "after")}
    for key in ("refusal", "still_recommends", "fuzzy_leak"):
        result[key] = {side: rates[side][key] for side in ("before", "after")}
    result["cloze_logprob"] = _cloze_logprob(model, tokenizer, probes, before, concept_terms, batch_size, progress)
    result["retain_kl"], result["fluency"] = _retain_kl_and_fluency(model, tokenizer, probes, before, after,
                                                                    batch_size, progress, fingerprint)
    result["forget_coherence"] = {"before": forget_coherence(probes, before),
                                  "after": forget_coherence(probes, after)}
    result["capability"] = (capability_before_after(model, tokenizer, fingerprint, batch_size)
                            if capability else None)
    result["sampling"] = (best_of_n_leaks(model, tokenizer, probes, facts, fingerprint, samples, temperature, seed,
                                          max_new_tokens, batch_size, progress) if samples else None)
    result["noise_floor"] = (noise_floor_flips(model, tokenizer, probes, before, after, facts, noise_floor_seeds,
                                               max_new_tokens, batch_size) if noise_floor_seeds else None)
    result["summary"] = summarise(result)
    return result


def _retain_kl_and_fluency(model, tokenizer, probes, before, after, batch_size, progress,
                           fingerprint: str | None = None) -> tuple[float | None, dict]:
    """Retain KL on the base answers, and the fluency of the RETAIN answers only (a canned refusal to a forget probe
    is the goal, not a fluency gain). The KL pass also gives the base log-probabilities of the base answers: they are
    the base perplexity before, and after for every answer the adapter left unchanged (most of them), so only the
    changed answers need a pass of their own. The base side of the KL comes from cached answer states when the
    cache is on (the base answers are cached, so their base logits are too)."""
    retain = [p for p in probes if p.type == "retain"]
    kept = {name: [a for p, a in zip(probes, answers, strict=True) if p.type == "retain"]
            for name, answers in (("before", before), ("after", after))}
    pad = pad_token_id(tokenizer)
    examples = _answer_examples(tokenizer, retain, kept["before"])
    batches = [batch for _, batch in left_padded_batches(examples, pad, batch_size, None)]
    states = answer_cache.cached_base_answer_states(fingerprint, "retain-kl-states", model, batches,
                                                    desc=_desc("retain KL (base)", progress))
    passes = kl_and_base_logprobs(model, examples, pad, batch_size, desc=_desc("retain KL", progress),
                                  base_states=states)
    changed = [i for i, (b, a) in enumerate(zip(kept["before"], kept["after"], strict=True)) if a != b]
    totals, counts = list(passes.base_totals), list(passes.counts)
    changed_totals, changed_counts = example_logprobs(
        model, _answer_examples(tokenizer, [retain[i] for i in changed], [kept["after"][i] for i in changed]), pad,
        batch_size, base=True, desc=_desc("perplexity", progress))
    for i, total, count in zip(changed, changed_totals, changed_counts, strict=True):
        totals[i], counts[i] = total, count
    fluency: dict = {"on": "retain"}
    fluency["before"] = {**text_fluency(kept["before"]), "perplexity": _perplexity(passes.base_totals, passes.counts)}
    fluency["after"] = {**text_fluency(kept["after"]), "perplexity": _perplexity(totals, counts)}
    return passes.kl, fluency


def _perplexity(totals: Sequence[float], counts: Sequence[int]) -> float | None:
    """exp(mean NLL per token) from per-example summed log-probabilities and token counts; None without tokens."""
    tokens = sum(counts)
    return math.exp(-sum(totals) / tokens) if tokens else None


def _check_arguments(probes: Sequence[PromptRecord], max_new_tokens: int, batch_size: int) -> None:
    if not probes:
        raise InputError("no probes to evaluate")
    if max_new_tokens < 1:
        raise InputError(f"max new tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")


def _rate_value(rate: dict | None) -> float | None:
    return None if rate is None else rate["rate"]


def summarise(result: dict) -> dict:
    """Headline numbers of an evaluation result (ratios are after/before; None where undefined); `*_interval`
    entries are 95% Wilson intervals [low, high]."""
    before, after, fluency = result["before"], result["after"], result["fluency"]
    summary = {
        "split": result.get("split"),
        "forget_pass_before": before["forget"]["pass_rate"],
        "forget_pass_after": after["forget"]["pass_rate"],
        "retain_pass_before": before["retain"]["pass_rate"],
        "retain_pass_after": after["retain"]["pass_rate"],
        "forget_pass_before_interval": before["forget"].get("interval"),
        "forget_pass_after_interval": after["forget"].get("interval"),
        "retain_pass_before_interval": before["retain"].get("interval"),
        "retain_pass_after_interval": after["retain"].get("interval"),
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
    for key in ("refusal", "still_recommends"):
        for side in ("before", "after"):
            for kind in ("forget", "retain"):
                summary[f"{kind}_{key}_{side}"] = _rate_value(result.get(key, {}).get(side, {}).get(kind))
    for side in ("before", "after"):
        summary[f"fuzzy_leak_{side}"] = _rate_value(result.get("fuzzy_leak", {}).get(side))
    capability = result.get("capability")
    if capability:
        mc = capability["mc"]
        summary.update(mc_acc_before=mc["before"][mc["headline"]], mc_acc_after=mc["after"][mc["headline"]],
                       mc_kept=mc["kept"], mc_base_right=mc["base_right"],
                       neutral_perplexity_before=capability["neutral_perplexity"]["before"]["perplexity"],
                       neutral_perplexity_after=capability["neutral_perplexity"]["after"]["perplexity"])
    if result.get("sampling"):
        summary.update(best_of_n_leak_before=result["sampling"]["before"]["rate"],
                       best_of_n_leak_after=result["sampling"]["after"]["rate"])
    if result.get("noise_floor"):
        floor = result["noise_floor"]
        summary.update(retain_flips_trained=floor["trained"]["pass_to_fail"],
                       retain_flips_random_mean=floor["random"]["pass_to_fail"]["mean"],
                       retain_flips_random_max=floor["random"]["pass_to_fail"]["max"])
    return summary
