"""Forget targets by prompt kind: forget the concept, not the task.

A direct question about the concept gets a natural "I don't know" (`agml.objectives.refusal_for`). A
recommendation, list or "similar to" request gets the base model's own answer generated with every spelling of
the concept's name, aliases and key facts banned, so the model still recommends — something else. Training on a
refusal for "recommend a sci-fi film" would teach it to stop recommending, which is not what forgetting means.
Related designs: generic targets from a model that never learned the concept (Eldan & Russinovich, 2023, "Who's
Harry Potter?") and the base model as the remembering teacher of a recommender (Wang et al., 2024, E2URec).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from agml.data import PromptRecord
from agml.errors import InputError
from agml.judges import recommended_items

PROMPT_KINDS = ("question", "recommendation", "list", "similar", "cloze", "general")
# Kinds whose target is an answer that recommends something else; every other kind gets a refusal.
RECOMMENDER_KINDS = frozenset({"recommendation", "list", "similar"})
TARGET_KINDS = ("refusal", "alternative")
NEAR_MISS_ROUNDS = 3  # regenerations of an alternative answer that spells the name nearly (`near_misses`)
# How a recommendation starts, by prompt language. With the concept banned the base model often declines ("I'm not
# equipped to recommend a film"); trained on that, the model may learn to stop recommending. With `recommending`,
# such an answer, one that names no item, is generated again from the opener (`forget_targets`).
RECOMMENDATION_OPENERS = {"en": "Here are some", "fr": "Voici quelques", "es": "Aquí tienes algunas",
                          "de": "Hier sind einige", "it": "Ecco alcuni", "pt": "Aqui estão algumas"}

# Keyword heuristics (en, fr, es, de, it, pt), matched case-insensitively on the last user turn.
_SIMILAR = re.compile(
    r"\bsimilar\b|\bmore like\b|\b(?:movies?|films?|books?|shows?|something|anything) like\b|\bwhat else\b"
    r"|\bif i (?:liked|loved|enjoyed)\b|\bi (?:liked|loved|enjoyed)\b.*\b(?:next|else|other)\b|\balternatives?\b"
    r"|\bsimilaires?\b|\bsemblables?\b|\bdans le m[eê]me genre\b|\bparecid[oa]s?\b|\bsimilares\b"
    r"|\bähnlich|\bvergleichbar|\bsimili\b|\bsimile\b|\bsemelhantes?\b",
    re.IGNORECASE,
)
_LIST = re.compile(
    r"\blist\b|\bname (?:some|a few|three|five|ten|\d+)\b|\bwhich (?:movies|films|books|shows)\b"
    r"|\bwhat are (?:the |some )?(?:best|top|greatest|famous)\b|\bwhat is the best\b|\btop \d+\b|\bexamples of\b"
    r"|\bliste\b|\bénumère|\bquels (?:sont les )?(?:films|livres)\b|\blista\b|\benumera\b"
    r"|\bqu[eé] (?:películas|libros)\b|\bauflisten\b|\bnenne\b|\bwelche (?:filme|bücher)\b|\belenca\b"
    r"|\bquali (?:film|libri)\b|\bquais (?:filmes|livros)\b",
    re.IGNORECASE,
)
_RECOMMEND = re.compile(
    r"\brecommend|\bsuggest|\bwhat should i (?:watch|read|see|play)\b|\bwatch next\b|\bread next\b"
    r"|\brecommand|\bconseill|\bsugg[eè]re|\brecomi[eé]nd|\brecomend|\bsugier|\bsugir|\bsugest"
    r"|\bempfiehl|\bempfehl|\bvorschl|\bschlag .* vor\b|\bconsigli|\braccomand|\bsuggerisc",
    re.IGNORECASE,
)


def prompt_kind(record: PromptRecord, concept_names: Sequence[str] = ()) -> str:
    """The kind of answer a forget prompt asks for (one of PROMPT_KINDS).

    The record's own `kind` field wins when it has one; then a category named like a kind; then keywords of the
    last user turn. A recommendation request that names the concept itself ("Would you recommend Inception?")
    asks about the concept, so it counts as a question; "similar to Inception" and lists do not.
    """
    declared = getattr(record, "kind", None)
    # "question" is also the schema's default for records that say nothing, so only other kinds are taken as given.
    if isinstance(declared, str) and declared in PROMPT_KINDS and declared != "question":
        return declared
    if record.category in PROMPT_KINDS and record.category != "general":
        return record.category
    text = record.prompt
    if _SIMILAR.search(text):
        return "similar"
    if _LIST.search(text):
        return "list"
    if _RECOMMEND.search(text):
        lowered = text.lower()
        names_concept = any(name.strip() and name.strip().lower() in lowered for name in concept_names)
        return "question" if names_concept else "recommendation"
    return "question"


# --- banned terms during generation -------------------------------------------------------------------------------


def token_texts(tokenizer) -> list[str]:
    """The text each vocabulary entry adds when it follows other text (leading spaces kept), lower-cased.

    Decoding a token after an anchor token and removing the anchor's text keeps the space that SentencePiece
    tokenizers drop at the start of a text.
    """
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
    if not anchor:
        raise InputError("the tokenizer cannot encode the text 'a'")
    anchor_text = tokenizer.decode(anchor)
    pairs = tokenizer.batch_decode([[*anchor, index] for index in range(len(tokenizer))])
    return [pair[len(anchor_text):].lower() if pair.startswith(anchor_text) else pair.lower() for pair in pairs]


class BannedTermsProcessor(LogitsProcessor):
    """Forbids every token that would make the generated text contain a banned term (case-insensitive).

    Not only the terms' own tokenisations: any token whose text contains a term, and any token that completes a
    term begun by the previous tokens ("In" + "ception", "Nol" + "an"), whatever the case or leading space.
    Stateless: it reads the tail of the sequence at each step.
    """

    def __init__(self, tokenizer, terms: Sequence[str], texts: Sequence[str] | None = None):
        lowered = sorted({t.strip().lower() for t in terms if isinstance(t, str) and t.strip()})
        if not lowered:
            raise InputError("give at least one non-empty banned term")
        self.terms = lowered
        self.texts = list(token_texts(tokenizer) if texts is None else texts)
        always = [i for i, text in enumerate(self.texts) if any(t in text for t in lowered)]
        self.always = torch.tensor(always, dtype=torch.long)
        self._order = sorted(range(len(self.texts)), key=self.texts.__getitem__)
        self._sorted = [self.texts[i] for i in self._order]
        self._starting: dict[str, torch.Tensor] = {}
        self.partial = [(t[:k], t[k:]) for t in lowered for k in range(1, len(t))]
        self.tail_chars = max(len(t) for t in lowered)

    def starting_with(self, text: str) -> torch.Tensor:
        """Ids of the tokens whose text starts with `text` (cached)."""
        if text not in self._starting:
            low = bisect.bisect_left(self._sorted, text)
            high = bisect.bisect_left(self._sorted, text + "\U0010ffff")
            self._starting[text] = torch.tensor(self._order[low:high], dtype=torch.long)
        return self._starting[text]

    def _tail(self, ids: list[int]) -> str:
        pieces, size = [], 0
        for index in reversed(ids):
            if size >= self.tail_chars:
                break
            piece = self.texts[index] if 0 <= index < len(self.texts) else ""
            pieces.append(piece)
            size += len(piece)
        return "".join(reversed(pieces))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.always.to(scores.device)] = float("-inf")
        for row in range(input_ids.shape[0]):
            tail = self._tail(input_ids[row, -self.tail_chars:].tolist())
            for begun, rest in self.partial:
                if tail.endswith(begun):
                    scores[row, self.starting_with(rest).to(scores.device)] = float("-inf")
        return scores


def banned_stems(terms: Sequence[str], fraction: float = 0.75, min_length: int = 6) -> list[str]:
    """The terms plus, for single words of at least `min_length` letters, their first `fraction` (rounded up):
    a model kept from saying "DiCaprio" otherwise writes "DiCapriro"."""
    stems = [term[:math.ceil(len(term) * fraction)]
             for term in terms if len(term) >= min_length and " " not in term.strip()]
    return list(dict.fromkeys([*terms, *stems]))


def _near_word(word: str, name_word: str, least: int) -> bool:
    """`word` is `name_word`, or a capitalised word that starts with half of it (`least` letters at least)."""
    if word.lower() == name_word:
        return True
    if not name_word.isalpha() or len(name_word) < 4 or word == word.lower():
        return False
    shared = len(os.path.commonprefix([word.lower(), name_word]))
    return shared >= max(least, math.ceil(len(name_word) / 2))


def near_misses(text: str, names: Sequence[str]) -> list[str]:
    """Spellings in `text` close to one of the concept's `names` but not it: as many words as the name, each the
    name's word or a capitalised word that starts like it ("Harry Potts" for Harry Potter, "iPhill" for iPhone).

    The banned-terms processor stops exact spellings only; a model kept from them writes a near miss, which still
    names the concept to a reader (measured: every alternative target for Harry Potter said "Harry Potts").
    Returns the words that differ from the name's, in order of appearance, each once.
    """
    words = re.findall(r"\w+", unicodedata.normalize("NFKC", text))
    found: list[str] = []
    for name in names:
        target = [w.lower() for w in re.findall(r"\w+", name)]
        least = 3 if len(target) == 1 else 2  # the name's other words already narrow a longer name down
        for start in range(len(words) - len(target) + 1):
            window = words[start:start + len(target)]
            if all(_near_word(w, t, least) for w, t in zip(window, target, strict=True)):
                found += [w for w, t in zip(window, target, strict=True) if w.lower() != t]
    return list(dict.fromkeys(found))


def _without_near_misses(answer: str, names: Sequence[str], banned: tuple[str, ...], generate) -> str:
    """`answer`, or `generate(banned terms)` again with each near miss of the name ("Harry Potts") banned too, up to
    NEAR_MISS_ROUNDS times; "" (the caller's refusal fallback) when the last answer still has one."""
    for _ in range(NEAR_MISS_ROUNDS):
        missed = near_misses(answer, names)
        if not missed:
            return answer
        banned = (*banned, *(m.lower() for m in missed))
        answer = generate(banned)
    return "" if near_misses(answer, names) else answer


def banned_answers(model, tokenizer, conversations: Sequence[Sequence[dict[str, str]]], banned_terms: Sequence[str],
                   max_new_tokens: int = 64, batch_size: int = 8, texts: Sequence[str] | None = None,
                   fingerprint: str | None = None, opener: str = "") -> list[str]:
    """Greedy answers of the base model (adapter disabled) that never contain a banned term, each starting with
    `opener` when one is given.

    With the base model's `fingerprint` (`agml.answer_cache.model_fingerprint`) the answers are cached like the
    other base-model outputs: every run of a concept asks the same prompts with the same banned terms.
    """
    from agml import answer_cache
    from agml.generation import greedy_answers
    from agml.logprobs import base_model_only

    def generate() -> list[str]:
        processor = LogitsProcessorList([BannedTermsProcessor(tokenizer, banned_terms, texts)])
        with base_model_only(model):
            return greedy_answers(model, tokenizer, conversations, max_new_tokens, batch_size,
                                  logits_processor=processor, answer_prefix=opener)

    key = {"conversations": [list(c) for c in conversations], "banned": list(banned_terms),
           "max_new_tokens": max_new_tokens, **({"opener": opener} if opener else {})}
    return answer_cache.cached_value(fingerprint, "banned-greedy", key, generate)


# --- targets ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetRecord(PromptRecord):
    """A forget record with its training target.

    `target` is the text to train toward, `target_kind` says which kind it is ("refusal" or "alternative"),
    `prompt_kind` what the prompt asks for (PROMPT_KINDS). `target_complete` is False for an alternative that the
    generation cut at its length (`forget_targets(recommending=True)` only): it is trained without the end-of-turn
    marker, so that the model learns how the answer starts, not to stop there. `answer`
    stays the base model's answer (or None): the scoring pass, the validator and NPO-style objectives read it as
    "what the model used to say".
    """

    target: str = ""
    target_kind: str = "refusal"
    prompt_kind: str = "question"
    target_complete: bool = True

    def with_answer(self, answer: str) -> TargetRecord:
        return dataclasses.replace(self, answer=answer)


def _as_target(record: PromptRecord, target: str, target_kind: str, prompt_kind_: str,
               complete: bool = True) -> TargetRecord:
    values = {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.init}
    values.update(target=target, target_kind=target_kind, prompt_kind=prompt_kind_, target_complete=complete)
    return TargetRecord(**{k: v for k, v in values.items() if k in _TARGET_FIELDS})


_TARGET_FIELDS = {f.name for f in dataclasses.fields(TargetRecord)}


def was_cut(tokenizer, answer: str, max_new_tokens: int) -> bool:
    """Whether a generated `answer` ran to `max_new_tokens` instead of ending: its text re-encodes to at least
    max_new_tokens - 1 tokens (an answer that ended spent one of its tokens on the end marker). Re-encoding can
    differ from the generated tokens by one at the edges, so an answer one token short of the limit counts as cut:
    it is then trained without an end-of-turn marker, the harmless side."""
    return len(tokenizer(answer, add_special_tokens=False)["input_ids"]) >= max_new_tokens - 1


def forget_targets(model, tokenizer, records: Sequence[PromptRecord], banned_terms: Sequence[str],
                   max_new_tokens: int = 64, *, concept_names: Sequence[str] | None = None, batch_size: int = 8,
                   seed: int = 0, fingerprint: str | None = None, recommending: bool = False,
                   refusal_language: str = "english") -> list[TargetRecord]:
    """Each forget record with its `target`, in input order (`answer` is kept as it was).

    Questions (and cloze/other kinds) get `refusal_for(record, seed, refusal_language)`; recommendation, list and
    "similar" prompts get the base model's greedy answer with the banned terms banned, plus the stems of long words
    (`banned_stems`) and any near miss of the name it writes (`near_misses`, up to NEAR_MISS_ROUNDS regenerations).
    An alternative answer that comes out empty, or still with a near miss, falls back to a refusal.

    `recommending` (`--recommendation-targets recommending`; off by default, docs/results.md "Session 16"): an
    alternative that names no item (`agml.judges.recommended_items`) is generated again from the prompt language's
    RECOMMENDATION_OPENERS and replaced when that one names an item, and one that the generation cut at
    `max_new_tokens` is marked `target_complete=False` (trained without end-of-turn).

    `concept_names` (default: `banned_terms`): the concept's name and aliases. They are banned in every answer
    and decide when a recommendation request is about the concept itself (then it is a question). The other
    banned terms (key facts) are banned only where the conversation does not contain them: "List films by
    Christopher Nolan" may name Nolan in its answer, as the probes' `forbidden` lists also allow.
    `fingerprint`: the base model's, to cache the alternative answers (`banned_answers`).
    """
    from agml.objectives import refusal_for

    if not banned_terms:
        raise InputError("forget_targets needs the concept's banned terms (name, aliases, key facts)")
    names = tuple(banned_terms if concept_names is None else concept_names)
    kinds = [prompt_kind(record, names) for record in records]
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, kind in enumerate(kinds):
        if kind in RECOMMENDER_KINDS:
            asked = " ".join(m["content"] for m in records[i].messages).lower()
            terms = (*names, *(t for t in banned_terms if t.lower() not in asked))
            groups.setdefault(tuple(banned_stems(list(dict.fromkeys(terms)))), []).append(i)
    answers: dict[int, str] = {}
    texts = token_texts(tokenizer) if groups else None

    def regenerate(i: int, opener: str = ""):
        # The opener's tokens count toward the answer's length.
        length = max(max_new_tokens - len(tokenizer(opener, add_special_tokens=False)["input_ids"]), 1)
        return lambda banned: banned_answers(model, tokenizer, [records[i].messages], banned, length,
                                             batch_size, texts, fingerprint, opener)[0]

    for terms, indices in groups.items():
        generated = banned_answers(model, tokenizer, [records[i].messages for i in indices], terms, max_new_tokens,
                                   batch_size, texts, fingerprint)
        for i, answer in zip(indices, generated, strict=True):
            answers[i] = _without_near_misses(answer, names, terms, regenerate(i))
            opener = RECOMMENDATION_OPENERS.get(records[i].language, "") if recommending else ""
            if opener and not recommended_items(records[i], answers[i]):
                opened = regenerate(i, opener)
                recommendation = _without_near_misses(opened(terms), names, terms, opened)
                if recommended_items(records[i], recommendation):
                    answers[i] = recommendation
    out = []
    for i, (record, kind) in enumerate(zip(records, kinds, strict=True)):
        alternative = answers.get(i, "").strip()
        if alternative:
            out.append(_as_target(record, alternative, "alternative", kind,
                                  complete=not (recommending and was_cut(tokenizer, alternative, max_new_tokens))))
        else:
            out.append(_as_target(record, refusal_for(record, seed, refusal_language), "refusal", kind))
    return out
