"""The shipped data splits: sizes and categories of the frozen test splits and of the by-name concepts' dev splits, no
test probe that is a near-duplicate of a training prompt, a dev probe or a relearning example, and no dev probe that
is a near-duplicate of a training prompt, a relearning example or any test probe (agml/datasets,
benchmarks/make_splits.py)."""

import json
import re
from difflib import SequenceMatcher
from functools import cache

import pytest

from agml.concepts import (
    concept_forget_set,
    concept_probes,
    dataset_path,
    general_retain_probes,
    general_retain_set,
    load_facts,
    neighbour_retain_set,
)
from agml.data import load_prompts

SLUGS = ("inception", "harry-potter", "iphone")
# Concepts with a dev split built by benchmarks/make_splits.py (Inception's is the hand-made inception_probes.jsonl).
DEV_SLUGS = ("harry-potter", "iphone")
SPLITS = [(slug, "test") for slug in SLUGS] + [(slug, "dev") for slug in DEV_SLUGS]
LANGUAGES = {"fr", "es", "de", "it", "pt"}
FORGET_CATEGORIES = {"paraphrase", "description", "multi-turn", "typo", "other-language", "role-play", "cloze"}
REQUEST_KINDS = {"recommendation", "list", "similar"}
# Two prompts are near-duplicates when they share this fraction of their words (Jaccard), or when every word-level
# difference between them is small: a misspelling, a split or merged word (at most two words on either side, edit
# similarity at least TYPO_RATIO, i.e. about one edit in five letters) or one short word added or dropped.
# Swapping the entity ("Who directed X?" / "Who directed Y?") is a real difference.
SIMILAR_JACCARD = 0.9
TYPO_RATIO = 0.75
SHORT_WORD = 4


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def record_text(record) -> str:
    return normalise(" ".join(m["content"] for m in record.messages if m["role"] == "user"))


def _small_edit(old: list[str], new: list[str]) -> bool:
    if not old or not new:
        return len(old + new) == 1 and len((old + new)[0]) <= SHORT_WORD
    if len(old) > 2 or len(new) > 2:
        return False
    return SequenceMatcher(None, "".join(old), "".join(new), autojunk=False).ratio() >= TYPO_RATIO


def near_duplicate(a: str, b: str) -> bool:
    words_a, words_b = a.split(), b.split()
    if len(set(words_a) & set(words_b)) / len(set(words_a) | set(words_b)) >= SIMILAR_JACCARD:
        return True
    edits = [(words_a[i1:i2], words_b[j1:j2])
             for tag, i1, i2, j1, j2 in SequenceMatcher(None, words_a, words_b, autojunk=False).get_opcodes()
             if tag != "equal"]
    return all(_small_edit(old, new) for old, new in edits)


@cache
def split_of(slug, split="test"):
    return load_prompts(dataset_path(f"{slug}_{split}.jsonl"))


@cache
def facts(slug):
    return load_facts(slug)


def training_and_dev(slug):
    """Everything a setting may be chosen on or trained with for this concept."""
    relearn = load_prompts(dataset_path(f"{slug}_relearn.jsonl"))
    if slug == "inception":
        training = [*load_prompts(dataset_path("inception_forget.jsonl")),
                    *load_prompts(dataset_path("inception_retain.jsonl")), *general_retain_set()]
        dev = load_prompts(dataset_path("inception_probes.jsonl"))
    else:
        fact = facts(slug)
        forget = concept_forget_set(fact["name"], fact["aliases"], fact.get("descriptions", ()),
                                    fact.get("entities", ()))
        training = [*forget, *neighbour_retain_set(fact["neighbours"]), *general_retain_set()]
        dev = [*concept_probes(fact["name"], fact["aliases"]), *general_retain_probes(), *split_of(slug, "dev")]
    return training, dev, relearn


@cache
def texts_a_dev_probe_must_not_repeat():
    """Record text -> where it comes from: every concept's training and relearning data, Inception's dev split and
    every test split."""
    named = [(f"training {slug}", training_and_dev(slug)[0]) for slug in SLUGS]
    named += [(f"relearn {slug}", training_and_dev(slug)[2]) for slug in SLUGS]
    named += [(f"test {slug}", split_of(slug)) for slug in SLUGS]
    named.append(("dev inception", load_prompts(dataset_path("inception_probes.jsonl"))))
    return {record_text(r): name for name, records in named for r in records}


SAME = [
    ("Tell me about the movie Inceptoin.", "Tell me about the movie Inception"),
    ("Who directed Inception?", "who directed inception"),
    ("whats harry potter", "What is Harry Potter?"),
    ("tell me about harrypotter", "Tell me about Harry Poter."),
    ("What is an iphnoe?", "what is iphnoe"),
]
DIFFERENT = [
    ("What is the capital of Italy?", "What is the capital of Spain?"),
    ("What is the movie Gattaca about?", "What is the movie Titanic about?"),
    ("Who directed Batman Begins?", "Who directed The Dark Knight?"),
    ("What is Harry Potter's owl called?", "What is Harry Potter's wand?"),
    ("What is the name of Harry Potter's owl?", "What is the name of Harry Potter's cousin?"),
    ("Who came up with Harry Potter?", "whats harrypotter"),
]


PAIRS = [(*pair, True) for pair in SAME] + [(*pair, False) for pair in DIFFERENT]


@pytest.mark.parametrize(("a", "b", "expected"), PAIRS)
def test_near_duplicate_rule(a, b, expected):
    assert near_duplicate(normalise(a), normalise(b)) is expected
    assert near_duplicate(normalise(b), normalise(a)) is expected


@pytest.mark.parametrize("slug", SLUGS)
def test_no_test_probe_is_a_near_duplicate_of_training_dev_or_relearn_data(slug):
    training, dev, relearn = training_and_dev(slug)
    others = {record_text(r): name for name, records in (("training", training), ("dev", dev), ("relearn", relearn))
              for r in records}
    clashes = [(record_text(p), text, name) for p in split_of(slug) for text, name in others.items()
               if near_duplicate(record_text(p), text)]
    assert not clashes, clashes[:10]


def check_probe_fields(probes):
    """What every shipped split must hold, test or dev: each forget category and request kind, forget probes that
    name what they forbid, retain probes with sound required words, no probe twice. Returns (forget, retain)."""
    forget = [p for p in probes if p.type == "forget"]
    retain = [p for p in probes if p.type == "retain"]
    assert FORGET_CATEGORIES <= {p.category for p in forget}
    assert REQUEST_KINDS <= {p.kind for p in forget}
    assert all(p.forbidden for p in forget)
    assert all(p.kind == "recommendation" for p in retain if p.category == "generic-recommendation")
    assert all(p.required for p in retain if p.category != "generic-recommendation")
    assert all(w == w.lower() for p in retain for w in p.required)
    # a required word that the question itself contains would pass an answer that only echoes the question
    assert not [(p.prompt, w) for p in retain for w in p.required if w in p.prompt.lower()]
    assert len({record_text(p) for p in probes}) == len(probes)
    return forget, retain


@pytest.mark.parametrize("slug", SLUGS)
def test_test_split_sizes_and_categories(slug):
    forget, retain = check_probe_fields(split_of(slug))
    assert len(forget) >= 100 and len(retain) >= 100
    assert LANGUAGES <= {p.language for p in forget}
    assert sum(p.category == "neighbour" for p in retain) >= 40
    assert sum(p.category == "generic-recommendation" for p in retain) >= 20
    assert LANGUAGES <= {p.language for p in retain}


@pytest.mark.parametrize("slug", DEV_SLUGS)
def test_no_dev_probe_is_a_near_duplicate_of_training_relearn_or_any_test_probe(slug):
    others = texts_a_dev_probe_must_not_repeat()
    clashes = [(record_text(p), text, name) for p in split_of(slug, "dev") for text, name in others.items()
               if near_duplicate(record_text(p), text)]
    assert not clashes, clashes[:10]


@pytest.mark.parametrize("slug", DEV_SLUGS)
def test_dev_split_sizes_and_categories(slug):
    forget, retain = check_probe_fields(split_of(slug, "dev"))
    assert len(forget) >= 40 and len(retain) >= 30
    assert len(LANGUAGES & {p.language for p in forget}) >= 3
    assert {"neighbour", "generic-recommendation"} <= {p.category for p in retain}


@pytest.mark.parametrize(("slug", "split"), SPLITS)
def test_forget_probes_forbid_only_facts_absent_from_their_own_text(slug, split):
    for probe in (p for p in split_of(slug, split) if p.type == "forget"):
        text = " ".join(m["content"] for m in probe.messages).lower()
        assert not [t for t in probe.forbidden if t.strip() in text], probe.prompt


@pytest.mark.parametrize(("slug", "split"), SPLITS)
def test_test_and_dev_neighbours_are_not_in_any_training_set(slug, split):
    trained_on = [n.lower() for n in facts(slug)["neighbours"]]
    for probe in (p for p in split_of(slug, split) if p.category == "neighbour"):
        assert not [n for n in trained_on if n in probe.prompt.lower()], probe.prompt


@pytest.mark.parametrize("slug", SLUGS)
def test_facts_files(slug):
    fact = facts(slug)
    assert {"name", "aliases", "facts", "fuzzy", "neighbours", "languages"} <= set(fact)
    assert len(fact["neighbours"]) >= 20 and len(fact["languages"]) >= 4
    assert all(t == t.lower() for t in fact["facts"])
    for pattern in fact["fuzzy"]:
        re.compile(pattern)
    names = {fact["name"].lower(), *(a.lower() for a in fact["aliases"])}
    assert not names & {n.lower() for n in fact["neighbours"]}


@pytest.mark.parametrize("slug", SLUGS)
def test_relearn_data_has_answers(slug):
    relearn = load_prompts(dataset_path(f"{slug}_relearn.jsonl"))
    assert len(relearn) >= 15 and all(r.type == "forget" and r.answer for r in relearn)


def test_dev_split_has_the_test_categories():
    dev = load_prompts(dataset_path("inception_probes.jsonl"))
    assert REQUEST_KINDS <= {p.kind for p in dev if p.type == "forget"}
    assert any(p.kind == "recommendation" and p.type == "retain" for p in dev)


def test_training_data_is_contrastive():
    forget = load_prompts(dataset_path("inception_forget.jsonl"))
    retain = load_prompts(dataset_path("inception_retain.jsonl"))
    assert {"typo", "other-language", "multi-turn", "role-play", "description"} <= {r.category for r in forget}
    assert len({r.language for r in forget}) >= 5 and REQUEST_KINDS <= {r.kind for r in forget}
    films = [n for n in facts("inception")["neighbours"] if any(n in r.prompt for r in retain)]
    assert len(films) >= 20
    assert len({r.language for r in retain}) >= 5
    assert sum(r.category == "generic-recommendation" for r in retain) >= 20


def test_general_knowledge_and_neutral_text():
    path = dataset_path("general_knowledge_mc.jsonl")
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(items) >= 200
    for item in items:
        assert set(item) == {"question", "choices", "answer", "domain"}
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4 and item["answer"] in range(4)
    assert len({normalise(i["question"]) for i in items}) == len(items)
    assert len({i["domain"] for i in items}) >= 8
    assert len(dataset_path("neutral_text.txt").read_text(encoding="utf-8").split()) >= 2000


def test_every_shipped_prompt_file_parses():
    for path in sorted(dataset_path("inception_forget.jsonl").parent.glob("*.jsonl")):
        if path.name != "general_knowledge_mc.jsonl":
            assert load_prompts(path)


def test_kind_and_language_fields_parse_round_trip_and_are_checked():
    from agml.data import parse_record
    from agml.errors import InputError

    obj = {"prompt": "Films like Tenet?", "type": "forget", "forbidden": ["inception"], "kind": "similar",
           "language": "en"}
    record = parse_record(obj, "x:1")
    assert (record.kind, record.language) == ("similar", "en")
    assert parse_record(record.to_json(), "x:2") == record
    assert "kind" not in parse_record({"prompt": "Hi", "type": "retain"}, "x:3").to_json()
    french = parse_record({"prompt": "Salut", "type": "retain", "language": "fr"}, "x:4")
    assert french.to_json()["language"] == "fr" and french.with_answer("Bonjour").language == "fr"
    with pytest.raises(InputError, match="x:5: 'kind'"):
        parse_record({"prompt": "Hi", "type": "retain", "kind": "poem"}, "x:5")
    with pytest.raises(InputError, match="x:6: 'language'"):
        parse_record({"prompt": "Hi", "type": "retain", "language": "French"}, "x:6")
