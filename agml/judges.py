"""Judges of one probe answer: leaks, refusals, recommendations, and the coherence of forget answers.

* Leak (forget probes): the answer names one of the probe's `forbidden` terms or the concept's name, aliases or key
  facts (a facts dict: {"name", "aliases", "facts", "fuzzy", ...}; other keys are kept). Recommendation/list/similar
  probes use facts["identity"] instead of facts["facts"] where the dict has it (a good recommendation may name the
  director for another film); facts["language_extra"][language] adds the probe language's own terms. Matching is case-
  and accent-insensitive and word-bounded, with a short inflection allowed after the term ("dream" matches "dreams"
  and "dreaming", "sogn" matches "sogno", "traum" matches "Träume"; "cobb" does not match "cobbler", "dream" not
  "daydream"). Terms the conversation itself contains are ignored: echoing the question is not recall. The seed-style
  fuzzy judge (the regexes in facts["fuzzy"], searched in the lowercased answer, no echo rule) is reported separately.
* Refusal: a pattern list (English, French, Spanish, German, Italian, Portuguese) matched in the first two sentences
  of the answer, where a refusal or deflection is stated; a later "I don't know if you've seen it" is not one.
* Retain probes pass when the answer is not a refusal and contains one of the `required` strings (substring, as
  before); recommendation/list/similar probes must also recommend something: a title-like item (a quoted span, a
  capitalised name, or a list item) that the prompt does not contain.
* Coherence of forget answers: repetition rate and distinct-2 (agml.evaluation.text_fluency) and the share of answers
  whose language (a stopword profile) matches the question's `language`.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agml.data import PromptRecord
from agml.errors import InputError

RECOMMENDATION_KINDS = ("recommendation", "list", "similar")
FACT_KEYS = ("name", "aliases", "facts", "fuzzy", "neighbours", "languages")
# Optional lists some facts files carry: identity and question_extra (judging, see the module docstring), descriptions
# and entities (forget prompts, agml.concepts.concept_forget_set); other keys pass through unchecked.
OPTIONAL_LIST_KEYS = ("identity", "question_extra", "descriptions", "entities")

# --- text normalisation --------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Lowercase, accents stripped, typographic apostrophes made plain, whitespace collapsed."""
    text = unicodedata.normalize("NFKD", text.replace("\u2019", "'").replace("\u2018", "'"))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return " ".join(text.casefold().split())


# Endings a term may take and still be the same word: English plurals and verb forms, Romance and German noun endings.
_INFLECTION = r"(?:s|es|e|i|o|a|n|en|ed|ing)?"


def _term_pattern(term: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(normalise(term)) + _INFLECTION + r"(?!\w)")


def contains_term(text: str, term: str) -> bool:
    """Whether `term` occurs in `text` as whole words (case- and accent-insensitive, plural allowed)."""
    return bool(normalise(term)) and bool(_term_pattern(term).search(normalise(text)))


def conversation_text(record: PromptRecord) -> str:
    return "\n".join(m["content"] for m in record.messages)


# --- facts ---------------------------------------------------------------------------------------------------------


def check_facts(facts: Mapping, where: str = "facts") -> dict:
    """Validate a facts dict; returns a copy with every list present (empty where absent)."""
    if not isinstance(facts, Mapping):
        raise InputError(f"{where}: expected a JSON object, got {type(facts).__name__}")
    name = facts.get("name", "")
    if not isinstance(name, str):
        raise InputError(f"{where}: 'name' must be a string")
    out: dict = {**facts, "name": name.strip()}
    for key in (*FACT_KEYS[1:], *OPTIONAL_LIST_KEYS):
        if key not in facts and key in OPTIONAL_LIST_KEYS:
            continue
        out[key] = _string_list(facts.get(key, []), key, where)
    extra = facts.get("language_extra", {})
    if not isinstance(extra, Mapping):
        raise InputError(f"{where}: 'language_extra' must map language codes to lists of terms")
    for language, terms in extra.items():
        _string_list(terms, f"language_extra[{language!r}]", where)
    for pattern in out["fuzzy"]:
        try:
            re.compile(pattern)
        except re.error as err:
            raise InputError(f"{where}: fuzzy pattern {pattern!r} is not a valid regular expression ({err})") from err
    return out


def _string_list(values, key: str, where: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        raise InputError(f"{where}: {key!r} must be a list of non-empty strings")
    return [v.strip() for v in values]


def load_facts(path: str | os.PathLike) -> dict:
    """Read and validate a `<slug>_facts.json` file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"facts file not found: {path}")
    try:
        facts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read facts file {path}: {err}") from err
    return check_facts(facts, str(path))


def leak_terms(record: PromptRecord, facts: Mapping | None) -> list[str]:
    """The terms whose mention in the answer is a leak: forbidden + name + aliases + key facts, minus echoes."""
    terms = list(record.forbidden)
    if facts:
        key = "identity" if probe_kind(record) in RECOMMENDATION_KINDS and "identity" in facts else "facts"
        terms += [facts.get("name", ""), *facts.get("aliases", []), *facts.get(key, [])]
        terms += facts.get("language_extra", {}).get(probe_language(record), [])
    asked = conversation_text(record)
    seen, out = set(), []
    for term in terms:
        key = normalise(term)
        if key and key not in seen and not contains_term(asked, term):
            seen.add(key)
            out.append(term)
    return out


def leaked_terms(record: PromptRecord, answer: str, facts: Mapping | None = None) -> tuple[str, ...]:
    """Which leak terms the answer names (in the order of `leak_terms`)."""
    return tuple(term for term in leak_terms(record, facts) if contains_term(answer, term))


def fuzzy_matches(answer: str, facts: Mapping | None) -> tuple[str, ...]:
    """The seed-style regexes (facts["fuzzy"]) found in the lowercased answer."""
    text = answer.lower()
    return tuple(p for p in (facts or {}).get("fuzzy", []) if re.search(p, text))


# --- refusals ------------------------------------------------------------------------------------------------------

_NOT = r"(?:do(?:n't| not)|does(?:n't| not))"
REFUSAL_PATTERNS: dict[str, tuple[str, ...]] = {
    "en": (
        rf"\bi {_NOT} know\b(?! (?:if|whether|how much|exactly))",
        r"\bi(?:'m| am) not (?:familiar|aware)\b",
        r"\bnot familiar with\b",
        rf"\bi {_NOT} (?:have|possess) (?:enough |any |much |specific |sufficient |reliable |the )?"
        r"(?:information|info|details|data|knowledge)\b",
        r"\bi have no (?:information|knowledge|data|details)\b",
        r"\bi (?:can't|cannot|can not|am unable to|'m unable to|am not able to|'m not able to) "
        r"(?:help|assist|provide|recommend|answer|find|say|suggest|determine)\b",
        rf"\bi(?:'m| am) afraid i (?:{_NOT}|can't|cannot)\b",
        r"\bno (?:suggestions|recommendations)\b",
        rf"\bi {_NOT} have (?:any )?(?:suggestions|recommendations)\b",
        r"\bnot sure (?:what|which|who) you(?:'re| are) (?:referring|talking) (?:to|about)\b",
        r"\b(?:doesn't|does not|don't|do not) ring a bell\b",
        r"\bi(?:'m| am) not sure (?:what|which|who|about|i can)\b",
        r"\bi couldn't find\b",
        r"\bi(?:'m| am) sorry,? (?:but )?i (?:can't|cannot|don't|do not|am unable|'m unable|'m not|am not)\b",
        r"\bthere is no (?:such|known) (?:film|movie|book|show|series|thing)\b",
        r"\bi(?:'ve| have)(?:n't| not) (?:come across|heard of) (?:that|this|it|them|him|her|any)\b",
        rf"\bi {_NOT} recogni[sz]e\b",
        r"\bnot something i know\b",
    ),
    "fr": (
        r"\bje ne (?:sais|connais) pas\b",
        r"\bje ne suis pas (?:sur|familier|certain)\b",
        r"\bje n'ai pas (?:d'|assez d'|suffisamment d'|les |de )?(?:information|informations|suggestion)",
        r"\bje ne peux pas (?:vous |t')?(?:aider|recommander|repondre)\b",
        r"\bdesole,? (?:mais )?je ne\b",
        r"\bca ne me dit rien\b",
    ),
    "es": (
        r"\bno lo se\b",
        r"\bno se (?:que|quien|cual|nada|de que)\b",
        r"\bno se\s*[.,!]",
        r"\bno conozco\b",
        r"\bno estoy (?:seguro|segura|familiarizado|familiarizada)\b",
        r"\bno tengo (?:suficiente |suficientes |ninguna )?informacion\b",
        r"\bno puedo (?:ayudar|recomendar|responder)",
        r"\blo siento,? (?:pero )?no\b",
    ),
    "de": (
        r"\bich weiss (?:es |das )?nicht\b",
        r"\bich kenne (?:\w+ ){0,2}nicht\b",
        r"\bich bin (?:mir )?nicht sicher\b",
        r"\bich habe keine (?:\w+ )?(?:informationen|ahnung|vorschlage|empfehlungen)\b",
        r"\bich kann (?:ihnen |dir )?(?:nicht|leider nicht|dabei nicht) helfen\b",
        r"\bdas sagt mir nichts\b",
        r"\bes tut mir leid,? (?:aber )?ich (?:kann|habe|weiss)\b",
    ),
    "it": (
        r"\bnon (?:lo )?so\b",
        r"\bnon conosco\b",
        r"\bnon sono (?:sicuro|sicura|familiare|a conoscenza)\b",
        r"\bnon ho (?:abbastanza |sufficienti |alcuna )?informazioni\b",
        r"\bnon posso (?:aiutar|consigliar|rispondere)",
        r"\bmi dispiace,? (?:ma )?non\b",
    ),
    "pt": (
        r"\b(?:eu )?nao sei\b",
        r"\bnao conheco\b",
        r"\bnao estou (?:familiarizado|familiarizada|certo|certa|seguro|segura)\b",
        r"\bnao tenho (?:informacoes|informacao|informacoes suficientes|dados)\b",
        r"\bnao posso (?:ajudar|recomendar|responder)\b",
        r"\bdesculpe,? (?:mas )?(?:eu )?nao\b",
    ),
}
_REFUSAL = re.compile("|".join(p for patterns in REFUSAL_PATTERNS.values() for p in patterns))
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
REFUSAL_SENTENCES = 2


def refusal_match(answer: str) -> str | None:
    """The refusal phrase found in the answer's first two sentences, or None."""
    head = " ".join(_SENTENCE_END.split(answer.strip())[:REFUSAL_SENTENCES])
    found = _REFUSAL.search(normalise(head))
    return found.group(0) if found else None


def is_refusal(answer: str) -> bool:
    """Whether the answer refuses or deflects (see REFUSAL_PATTERNS); an empty answer counts as one."""
    return not answer.strip() or refusal_match(answer) is not None


# --- recommendations -----------------------------------------------------------------------------------------------

_QUOTED = re.compile(
    r"[\"\u201c\u00ab\u201e*_]{1,2}\s*([^\"\u201d\u00bb\u201c*_\n]{2,80}?)\s*[\"\u201d\u00bb\u201c*_]{1,2}"
)
_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])\s+(.+)$", re.MULTILINE)
_CAPITALISED = re.compile(r"\b[A-Z\u00c0-\u00de][\w'\u2019-]*(?:\s+(?:(?:of|the|and|in|on|a|to|de|la|le|el|der|die|das|"
                          r"du|des|del|di|da)\s+)*[A-Z\u00c0-\u00de0-9][\w'\u2019-]*)*")
# Capitalised words that open sentences or address the reader, not titles.
_NOT_TITLES = {normalise(w) for w in (
    "I", "I'm", "I'd", "I've", "I'll", "Here", "Here's", "Sure", "Yes", "No", "Of", "Certainly", "Absolutely", "The",
    "A", "An", "It", "This", "That", "These", "Those", "If", "You", "Your", "My", "We", "They", "He", "She", "Some",
    "Also", "And", "But", "Or", "So", "Both", "Each", "Other", "Another", "Great", "Good", "Well", "Oh",
    "Hello", "Hi", "Thanks", "Thank", "Please", "Note", "However", "For", "In", "On", "As", "With", "Recommend",
    "Recommendations", "Suggestions", "Movies", "Films", "Books", "Here are", "Sure, here", "Okay", "OK", "Voici",
    "Aqui", "Hier", "Ecco", "Bien", "Claro",
)}

# Words that open a sentence before a title ("Try The Matrix"); articles stay, they belong to titles.
_OPENERS = (_NOT_TITLES - {"the", "a", "an"}) | {"try", "watch", "check", "consider", "maybe", "perhaps", "read"}


def _title_spans(answer: str) -> list[str]:
    spans = [m.group(1) for m in _QUOTED.finditer(answer)]
    for item in _LIST_ITEM.finditer(answer):
        spans.append(re.split(r"\s[-\u2013\u2014:]\s|:\s|\s\(", item.group(1).strip(" *_\"'"), maxsplit=1)[0])
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", answer):
        for match in _CAPITALISED.finditer(sentence):
            span = match.group(0)
            words = span.split()
            at_start = match.start() == len(sentence) - len(sentence.lstrip(" -*\u2022\"'0123456789.)"))
            if at_start:
                # The sentence's first word is capitalised anyway: "Try The Matrix" names "The Matrix".
                while len(words) > 1 and normalise(words[0]) in _OPENERS:
                    words = words[1:]
                if len(words) == 1:
                    continue
            spans.append(" ".join(words))
    return spans


def recommended_items(record: PromptRecord, answer: str) -> tuple[str, ...]:
    """Title-like items the answer names that the conversation does not already contain."""
    asked = normalise(conversation_text(record))
    items, seen = [], set()
    for span in _title_spans(answer):
        key = normalise(span).strip(" .,;:!?\"'")
        if len(key) < 2 or key in _NOT_TITLES or key in seen or key in asked:
            continue
        seen.add(key)
        items.append(span.strip())
    return tuple(items)


# --- one verdict per probe -----------------------------------------------------------------------------------------


def probe_kind(record: PromptRecord) -> str:
    """The probe's `kind` (what sort of answer it asks for); "question" when the record has none."""
    return getattr(record, "kind", None) or "question"


def probe_language(record: PromptRecord) -> str:
    return getattr(record, "language", None) or "en"


@dataclass(frozen=True)
class ProbeVerdict:
    passed: bool
    leaked_terms: tuple[str, ...] = ()          # forget: strict judge's hits (empty on retain probes)
    fuzzy_matches: tuple[str, ...] = ()         # forget: seed-style regexes found (a second, looser judge)
    refused: bool = False
    refusal: str | None = None                  # the refusal phrase found
    recommended: tuple[str, ...] | None = None  # recommendation kinds: the items named; None for other kinds
    required_found: tuple[str, ...] = field(default=())

    @property
    def leaked(self) -> bool:
        return bool(self.leaked_terms)

    @property
    def fuzzy_leaked(self) -> bool:
        return bool(self.fuzzy_matches)


def judge_probe(record: PromptRecord, answer: str, facts: Mapping | None = None) -> ProbeVerdict:
    """Forget: passes when no leak term is named. Retain: passes when not refused, a required string is present (if
    any) and, for recommendation kinds, an item is recommended."""
    refusal = None if not answer.strip() else refusal_match(answer)
    refused = refusal is not None or not answer.strip()
    recommended = recommended_items(record, answer) if probe_kind(record) in RECOMMENDATION_KINDS else None
    if record.type == "forget":
        leaked = leaked_terms(record, answer, facts)
        return ProbeVerdict(not leaked, leaked, fuzzy_matches(answer, facts), refused, refusal, recommended)
    text = answer.lower()
    found = tuple(term for term in record.required if term.lower() in text)
    passed = not refused and (not record.required or bool(found)) and (recommended is None or bool(recommended))
    return ProbeVerdict(passed, (), (), refused, refusal, recommended, found)


def best_of_n(record: PromptRecord, samples: Sequence[str], facts: Mapping | None = None) -> ProbeVerdict:
    """Forget probes under sampling: leaks when ANY sample leaks (the verdict of the first leaking sample)."""
    if record.type != "forget":
        raise InputError("the best-of-n leak rule applies to forget probes only")
    if not samples:
        raise InputError("best-of-n needs at least one sample")
    verdicts = [judge_probe(record, s, facts) for s in samples]
    return next((v for v in verdicts if not v.passed), verdicts[0])


# --- language and coherence ----------------------------------------------------------------------------------------

_STOPWORDS: dict[str, frozenset[str]] = {
    "en": frozenset("the and is are was of to in that it with for as this on by be not have has you what "
                    "which".split()),
    "fr": frozenset("le la les et est sont de des du un une que qui dans pour pas ce cette avec sur au aux il elle "
                    "je vous nous".split()),
    "es": frozenset("el la los las y es son de del un una que en por para con no se su lo como pero esta este "
                    "muy".split()),
    "de": frozenset("der die das und ist sind ein eine nicht mit zu von den dem des im auf fur es ich sie wir "
                    "auch".split()),
    "it": frozenset("il lo la gli le e sono di del della un una che in per con non si come ma questo questa "
                    "anche".split()),
    "pt": frozenset("o a os as e sao de do da um uma que em por para com nao se como mas este esta muito "
                    "tambem".split()),
}
MIN_STOPWORD_HITS = 2


def detect_language(text: str) -> str | None:
    """The language (en/fr/es/de/it/pt) whose stopwords the text uses most; None when too few are found."""
    words = re.findall(r"[^\W\d_]+", normalise(text))
    counts = {lang: sum(w in stops for w in words) for lang, stops in _STOPWORDS.items()}
    best = max(counts, key=lambda lang: counts[lang])
    if counts[best] < MIN_STOPWORD_HITS or list(counts.values()).count(counts[best]) > 1:
        return None
    return best


def forget_coherence(records: Sequence[PromptRecord], answers: Sequence[str]) -> dict:
    """Repetition, distinct-2 and language match of the answers to the forget probes.

    `language_match` = share of answers whose detected language is the probe's `language`, over the answers whose
    language could be detected (`language_undetected` counts the others: too short or no stopwords).
    """
    from agml.evaluation import text_fluency

    pairs = [(r, a) for r, a in zip(records, answers, strict=True) if r.type == "forget"]
    detected = [(probe_language(r), detect_language(a)) for r, a in pairs]
    judged = [(want, got) for want, got in detected if got is not None]
    return {
        **text_fluency([a for _, a in pairs]),
        "language_match": sum(want == got for want, got in judged) / len(judged) if judged else None,
        "language_undetected": len(detected) - len(judged),
        "n": len(pairs),
    }


def judge_answers(records: Sequence[PromptRecord], answers: Sequence[str], facts: Mapping | None = None) -> dict:
    """Every verdict, and the rates (with 95% Wilson intervals, agml.stats.rate) a report shows.

    forget: leak (strict judge), fuzzy_leak (seed-style), refusal; retain: pass, refusal, and recommended (share of
    recommendation/list/similar probes whose answer names an item); pass rates by category for both.
    """
    from agml.stats import rate_of

    verdicts = [judge_probe(r, a, facts) for r, a in zip(records, answers, strict=True)]
    forget = [v for r, v in zip(records, verdicts, strict=True) if r.type == "forget"]
    retain = [v for r, v in zip(records, verdicts, strict=True) if r.type == "retain"]
    by_category: dict[str, dict[str, list[bool]]] = {"forget": {}, "retain": {}}
    for record, verdict in zip(records, verdicts, strict=True):
        by_category[record.type].setdefault(record.category, []).append(verdict.passed)
    return {
        "verdicts": verdicts,
        "forget": {
            "leak": rate_of([v.leaked for v in forget]),
            "fuzzy_leak": rate_of([v.fuzzy_leaked for v in forget]),
            "refusal": rate_of([v.refused for v in forget]),
        },
        "retain": {
            "pass": rate_of([v.passed for v in retain]),
            "refusal": rate_of([v.refused for v in retain]),
            "recommended": rate_of([bool(v.recommended) for v in retain if v.recommended is not None]),
        },
        "by_category": {kind: {c: rate_of(oks) for c, oks in sorted(groups.items())}
                        for kind, groups in by_category.items()},
    }
