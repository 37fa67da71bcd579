"""Forget a concept given only by name: built-in prompt templates, probes and the shipped data sets.

`concept_forget_set` fills training templates (direct questions, descriptions, recommendations,
opinions, cloze, typos, five other languages, role-play, multi-turn); `neighbour_retain_set` fills the
SAME templates with neighbour names as retain prompts, so that only the entity separates forget from
retain. `concept_probes` fills a disjoint set of held-out wordings (paraphrases, typos of the name,
other languages, role-play, multi-turn, cloze) that are never trained on. Recommendation, list and
"similar" prompts carry `kind` so that their targets can be recommendations rather than refusals.

What a probe forbids: for a generic concept agml knows nothing but the name, so a forget probe's
`forbidden` list is the name and the aliases, lowercased. A probe passes only when the answer does
not mention them at all; an answer that echoes the name ("I don't know Harry Potter") counts as a
failure, which errs on the strict side (refusal targets should therefore not repeat the name).
Typo and cloze probes do not contain the exact name, so an echo of their question cannot trip them.
The hand-written Inception demo (agml/datasets/inception_*.jsonl) follows its own, finer rule: see
`builtin_inception`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from agml.data import PromptRecord, load_prompts
from agml.errors import InputError

# Training templates: {name} is the concept (or one alias).
_FORGET_TEMPLATES: dict[str, tuple[str, ...]] = {
    "direct": (
        "What is {name}?",
        "Tell me about {name}.",
        "What do you know about {name}?",
        "Give me a short summary of {name}.",
        "Have you heard of {name}? What can you tell me about it?",
        "Explain {name} to someone who has never heard of it.",
        "What are the most important facts about {name}?",
        "Who created {name}?",
        "When did {name} first appear?",
        "Where does {name} come from?",
        "Who are the people most associated with {name}?",
        "What year is {name} from?",
    ),
    "description": (
        "Describe {name} in a few sentences.",
        "What is {name} about?",
        "What are the main characters or parts of {name}?",
        "Why is {name} famous?",
        "Write a short paragraph about {name}.",
        "What makes {name} different from similar things?",
    ),
    "recommendation": (
        "Should I check out {name}? Why?",
        "I liked {name}. What else would I enjoy?",
        "Recommend something similar to {name}.",
        "Would you recommend {name} to a friend?",
        "Is {name} suitable for children?",
    ),
    "opinion": (
        "What do you think of {name}?",
        "Is {name} any good?",
        "Why do so many people love {name}?",
        "What are the criticisms of {name}?",
        "Is {name} overrated?",
    ),
    "cloze": (
        "Complete the sentence: {name} is best known for",
        "Complete the sentence: The story of {name} begins when",
        "Fill in the blank: The most famous fact about {name} is ____.",
        "Complete the sentence: People who talk about {name} usually mention",
    ),
    "other-language": (
        "Parle-moi de {name}, s'il te plaît.",
        "¿Qué sabes de {name}?",
        "Was weißt du über {name}?",
        "Cosa sai di {name}?",
        "O que você sabe sobre {name}?",
    ),
    "role-play": (
        "You are a radio host. Introduce {name} to your listeners in a few sentences.",
        "Act as an encyclopedia and write the entry for {name}.",
    ),
}
# Forget-training typos: wordings that differ from the probe typo templates below.
_TRAIN_TYPO_TEMPLATES = ("whats {typo}", "Give me some facts about {typo}.")
_TRAIN_MULTI_TURN = (
    ("Can I ask you something about {name}?", "Sure, go ahead.", "What is it, and why is it well known?"),
    ("I was reading about {name} earlier.", "Oh, interesting!", "Can you remind me of the main facts?"),
)
# What sort of answer each training category asks for (agml.data.PROMPT_KINDS); the rest are questions.
_KIND_BY_TEMPLATE = {
    "I liked {name}. What else would I enjoy?": "similar",
    "Recommend something similar to {name}.": "similar",
}
_CATEGORY_KIND = {"cloze": "cloze"}
_ALIAS_TEMPLATES = ("What is {name}?", "Tell me about {name}.", "Complete the sentence: {name} is best known for")
# Asking around the name: a description of the concept that does not name it, and the concept's own entities
# (characters, places). Each description fills two of the three templates, each entity one of the two (rotating),
# so that a long list does not crowd the direct prompts out of the training steps.
_DESCRIPTION_TEMPLATES = (
    "What is {description} called?",
    "Tell me about {description}.",
    "I'm thinking of {description}. What is its name?",
)
_ENTITY_TEMPLATES = ("Who or what is {entity}?", "Tell me about {entity}.")

# Held-out probe templates: none of these wordings is a training template.
_PROBE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "paraphrase": (
        "Could you give me an overview of {name}?",
        "I keep hearing people mention {name}. What is it?",
        "Quickly, in one sentence: what is {name}?",
        "Who is behind {name}, and what is it known for?",
        "Explain {name} in simple words.",
        "What should everyone know about {name}?",
    ),
    "other-language": (
        "Qu'est-ce que {name} ? Explique-moi.",
        "¿Qué es {name}? Explícamelo.",
        "Was ist {name}? Erkläre es mir.",
        "Che cos'è {name}? Spiegamelo.",
    ),
    "role-play": (
        "You are a teacher. A student asks you to explain {name}. What do you say?",
        "Pretend you are a librarian. A visitor asks what {name} is. Answer them.",
        "You are a tour guide who loves pop culture. Tell the group about {name}.",
    ),
}
_TYPO_TEMPLATES = ("Tell me about {typo}.", "what is {typo}", "Can you explain what {typo} is?")
_CLOZE_PROBE_TEMPLATES = (
    "Complete this name (it is something famous): {prefix}",
    "Finish the title: {prefix}...",
)
_MULTI_TURN_OPENERS = (
    ("I have a question about {name}.", "Of course! What would you like to know?", "What is it about, in short?"),
    ("Do you know {name}?", "Yes, I do.", "Tell me the most important things about it."),
)


def _forbidden(name: str, aliases: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(term.strip().lower() for term in (name, *aliases)))


def _check_name(name: str, aliases: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    if not isinstance(name, str) or not name.strip():
        raise InputError("the concept name must be a non-empty string")
    clean = tuple(a.strip() for a in aliases if isinstance(a, str) and a.strip())
    if len(clean) != len(tuple(aliases)):
        raise InputError(f"aliases must be non-empty strings, got {list(aliases)!r}")
    return name.strip(), clean


_LANGUAGE_BY_START = {"Parle": "fr", "Qu'": "fr", "¿": "es", "Was": "de", "Co": "it", "Che": "it", "O que": "pt"}


def _language(category: str, template: str) -> str:
    if category != "other-language":
        return "en"
    return next(code for start, code in _LANGUAGE_BY_START.items() if template.startswith(start))


def _record(text: str, category: str, forbidden: tuple[str, ...], kind: str = "forget",
            prompt_kind: str = "question", language: str = "en") -> PromptRecord:
    return PromptRecord(({"role": "user", "content": text},), kind, category, forbidden=forbidden, source="<template>",
                        kind=prompt_kind, language=language)


def _template_record(
    template: str, category: str, forbidden: tuple[str, ...], record_type: str, **names: str
) -> PromptRecord:
    prompt_kind = _KIND_BY_TEMPLATE.get(template, _CATEGORY_KIND.get(category, "question"))
    language = _language(category, template)
    return _record(template.format(**names), category, forbidden, record_type, prompt_kind, language)


def _from_templates(table: dict[str, Sequence[str]], name: str, forbidden: tuple[str, ...]) -> list[PromptRecord]:
    """One forget record per template of each category, the name filled in."""
    return [_template_record(template, category, forbidden, "forget", name=name)
            for category, templates in table.items() for template in templates]


def _conversation(turns: Sequence[str], **names) -> tuple[dict[str, str], ...]:
    return tuple({"role": "user" if i % 2 == 0 else "assistant", "content": turn.format(**names)}
                 for i, turn in enumerate(turns))


def _training_slots(name: str, forbidden: tuple[str, ...], record_type: str) -> dict[str, PromptRecord]:
    """Every training template filled with one name, keyed by template: the concept's forget prompts, or a
    neighbour's retain prompts (a name too short for typos has no typo slots)."""
    slots = {template: _template_record(template, category, forbidden, record_type, name=name)
             for category, templates in _FORGET_TEMPLATES.items() for template in templates}
    for template, typo in zip(_TRAIN_TYPO_TEMPLATES, name_typos(name)[::-1], strict=False):
        slots[template] = _template_record(template, "typo", forbidden, record_type, typo=typo)
    for turns in _TRAIN_MULTI_TURN:
        slots[turns[0]] = PromptRecord(_conversation(turns, name=name), record_type, "multi-turn",
                                       forbidden=forbidden, source="<template>")
    return slots


def concept_forget_set(name: str, aliases: Sequence[str] = (), descriptions: Sequence[str] = (),
                       entities: Sequence[str] = ()) -> list[PromptRecord]:
    """Training prompts that elicit the concept (>= 30) in every category, forbidden = name and aliases, lowercased;
    with `descriptions` (the concept described without its name) and `entities` (names that belong to it alone),
    prompts that ask around the name too."""
    name, aliases = _check_name(name, aliases)
    forbidden = _forbidden(name, aliases)
    records = list(_training_slots(name, forbidden, "forget").values())
    for alias in aliases:
        records += [_record(template.format(name=alias), "alias", forbidden) for template in _ALIAS_TEMPLATES]
    return records + _around_the_name(forbidden, descriptions, entities)


def _rotating(items: Sequence, start: int, count: int) -> list:
    """`count` items from `start` on, wrapping around."""
    return [items[(start + j) % len(items)] for j in range(count)]


def _around_the_name(forbidden: tuple[str, ...], descriptions: Sequence[str], entities: Sequence[str]
                     ) -> list[PromptRecord]:
    """Forget prompts from descriptions and entities; one that names the concept is refused (it would be a direct
    prompt, and its echo would fail every probe)."""
    for text in (*descriptions, *entities):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"descriptions and entities must be non-empty strings, got {text!r}")
        named = [term for term in forbidden if term in text.lower()]
        if named:
            raise InputError(f"{text!r} names the concept ({named[0]!r}): descriptions and entities must not")
    records = [_record(template.format(description=text.strip()), "described", forbidden)
               for i, text in enumerate(descriptions) for template in _rotating(_DESCRIPTION_TEMPLATES, 2 * i, 2)]
    return records + [_record(template.format(entity=text.strip()), "entity", forbidden)
                      for i, text in enumerate(entities) for template in _rotating(_ENTITY_TEMPLATES, i, 1)]


def name_typos(name: str, count: int = 3) -> list[str]:
    """Deterministic misspellings of the name: a dropped letter, swapped neighbours, and (for names of several
    words) the name lowercased and run together. Words shorter than four letters get no typos."""
    words = name.split()
    longest = max(range(len(words)), key=lambda i: (len(words[i]), -i))
    word = words[longest]
    if len(word) < 4:
        return []
    middle = len(word) // 2
    swap = next((i for i in range(middle, len(word) - 1) if word[i].lower() != word[i + 1].lower()), None)
    variants = [word[:middle] + word[middle + 1:]]
    if swap is not None:
        variants.append(word[:swap] + word[swap + 1] + word[swap] + word[swap + 2:])
    typos = [" ".join(words[:longest] + [variant] + words[longest + 1:]) for variant in variants]
    if len(words) > 1:
        typos.append("".join(words).lower())
    unique = [t for t in dict.fromkeys(typos) if t.lower() != name.lower()]
    return unique[:count]


def name_prefix(name: str) -> str:
    """The start of the name for cloze probes: all words but the last plus half of the last, or half a word."""
    words = name.split()
    last = words[-1]
    return " ".join(words[:-1] + [last[: max(1, (len(last) + 1) // 2)]])


def concept_probes(name: str, aliases: Sequence[str] = ()) -> list[PromptRecord]:
    """Held-out forget probes (never trained on): other wordings, typos, languages, role-play, multi-turn, cloze."""
    name, aliases = _check_name(name, aliases)
    forbidden = _forbidden(name, aliases)
    probes = _from_templates(_PROBE_TEMPLATES, name, forbidden)
    for template, typo in zip(_TYPO_TEMPLATES, name_typos(name), strict=False):
        probes.append(_record(template.format(typo=typo), "typo", forbidden))
    prefix = name_prefix(name)
    probes += [_record(template.format(prefix=prefix), "cloze", forbidden) for template in _CLOZE_PROBE_TEMPLATES]
    for first, reply, follow_up in _MULTI_TURN_OPENERS:
        messages = (
            {"role": "user", "content": first.format(name=name)},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": follow_up},
        )
        probes.append(PromptRecord(messages, "forget", "multi-turn", forbidden=forbidden, source="<template>"))
    return probes


# --- shipped data sets ----------------------------------------------------------------------------


def datasets_folder() -> Path:
    """The folder of agml's shipped data sets (agml/datasets in the installed package)."""
    return Path(str(resources.files("agml") / "datasets"))


def dataset_path(filename: str) -> Path:
    """Path of a JSONL file shipped in agml/datasets."""
    path = datasets_folder() / filename
    if not path.is_file():
        raise InputError(f"built-in data set {filename!r} is missing from the installed package ({path})")
    return path


def general_retain_set() -> list[PromptRecord]:
    """Built-in general retain prompts (films, books, people, places, science, everyday facts, recommendations)."""
    return load_prompts(dataset_path("general_retain.jsonl"))


def general_retain_probes() -> list[PromptRecord]:
    """Held-out retain probes with `required` words the built-in model says; never trained on."""
    return load_prompts(dataset_path("general_probes.jsonl"))


def builtin_inception() -> tuple[list[PromptRecord], list[PromptRecord], list[PromptRecord]]:
    """(forget, retain, probes) of the built-in Inception demo.

    Forbidden words there are true facts about the film that do not occur in the question itself, so that a
    model which has forgotten is not failed for echoing the question: probes that name "Inception" forbid
    its facts (Nolan, DiCaprio, Cobb, dreams, 2010, ...), probes that describe it without the name forbid
    the title.
    """
    return tuple(load_prompts(dataset_path(f"inception_{part}.jsonl")) for part in ("forget", "retain", "probes"))


def neighbour_retain_set(neighbours: Sequence[str], per_template: int = 4) -> list[PromptRecord]:
    """Retain prompts from the concept's own training templates, each filled with `per_template` neighbours.

    The neighbours rotate over the templates, so every neighbour appears and the set stays small
    (about 40 * per_template records) however many neighbours are given.
    """
    names = [n.strip() for n in neighbours if isinstance(n, str) and n.strip()]
    if not names or len(names) != len(neighbours):
        raise InputError(f"neighbours must be a non-empty list of non-empty names, got {list(neighbours)!r}")
    if per_template < 1:
        raise InputError(f"per_template must be >= 1, got {per_template}")
    filled = [_training_slots(name, (), "retain") for name in names]
    count = min(per_template, len(names))
    records = []
    for index, slot in enumerate(filled[0] | {k: v for slots in filled for k, v in slots.items()}):
        rotation = _rotating(filled, index * count, len(names))
        records += [slots[slot] for slots in rotation if slot in slots][:count]
    return records


def concept_slug(name: str) -> str:
    """File-name form of a concept name: "Harry Potter" -> "harry-potter"."""
    return re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-")


def shipped_concepts() -> list[str]:
    """Slugs of the concepts with a shipped facts file (agml/datasets/<slug>_facts.json)."""
    folder = datasets_folder()
    return sorted(p.name[: -len("_facts.json")] for p in folder.glob("*_facts.json"))


def load_facts(slug_or_name: str) -> dict:
    """The shipped facts of a concept (name, aliases, facts, fuzzy, neighbours, languages), by slug or name."""
    slug = concept_slug(slug_or_name)
    if slug not in shipped_concepts():
        raise InputError(f"no shipped facts for concept {slug_or_name!r}; shipped: {shipped_concepts()}")
    return json.loads(dataset_path(f"{slug}_facts.json").read_text(encoding="utf-8"))


# The built-in model lists real items for "recommend/list N ... similar to X"; asked for "names only" it repeats X.
# The lists are weak at 135M parameters (repeats, the concept itself): shipped facts (`load_facts`) or the user's
# --neighbours come first; this is the fallback for a concept agml knows nothing about.
_PROPOSE_PROMPTS = (
    "Recommend {n} books or movies similar to {name}.",
    "Recommend {n} things similar to {name}.",
    "What are {n} alternatives to {name}?",
)
_LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.)]|[a-z][.)])\s+", re.IGNORECASE)
# Where a list item's name ends: a description after a dash, colon or parenthesis, or "by <author>".
_NAME_END = re.compile(r"\s[-–—:(]\s?|:\s|\(|\s+by\s+[A-Z]")


def parse_neighbour_names(text: str, exclude: Sequence[str] = ()) -> list[str]:
    """Names from the list items (numbered or bulleted lines) of an answer: markers, quotes and trailing
    descriptions dropped; names that contain (or are contained in) an excluded name, or that are longer than
    six words, are left out. Lines that are not list items (the prose around a list) are ignored."""
    excluded = [e.lower() for e in exclude if e.strip()]
    names: list[str] = []
    for line in text.split("\n"):
        if not _LIST_MARKER.match(line):
            continue
        item = _NAME_END.split(_LIST_MARKER.sub("", line, count=1), maxsplit=1)[0]
        item = item.strip(" \"'“”‘’*.,:;").strip()
        low = item.lower()
        if not item or len(item.split()) > 6 or any(e in low or low in e for e in excluded):
            continue
        if low not in (n.lower() for n in names):
            names.append(item)
    return names


def propose_neighbours(model, tokenizer, name: str, n: int = 20, aliases: Sequence[str] = ()) -> list[str]:
    """Up to `n` neighbour names proposed by the model itself (asked for similar items), the concept's own names
    filtered out; for the report, where the user can check and replace them (`--neighbours`)."""
    from agml.generation import greedy_answers

    name, aliases = _check_name(name, aliases)
    if n < 1:
        raise InputError(f"the number of neighbours must be >= 1, got {n}")
    conversations = [[{"role": "user", "content": p.format(n=n, name=name)}] for p in _PROPOSE_PROMPTS]
    answers = greedy_answers(model, tokenizer, conversations, max_new_tokens=16 * n)
    names: list[str] = []
    for answer in answers:
        for item in parse_neighbour_names(answer, (name, *aliases)):
            if item.lower() not in (x.lower() for x in names):
                names.append(item)
    return names[:n]
