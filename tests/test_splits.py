"""The shipped data splits: sizes and categories of the frozen test splits, and no test probe that is a
near-duplicate of a training prompt, a dev probe or a relearning example (agml/datasets, benchmarks/make_splits.py)."""

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
LANGUAGES = {"fr", "es", "de", "it", "pt"}
FORGET_CATEGORIES = {"paraphrase", "description", "multi-turn", "typo", "other-language", "role-play", "cloze"}
REQUEST_KINDS = {"recommendation", "list", "similar"}
# Two prompts are near-duplicates when their normalised texts are this similar (difflib ratio ~ 1 - normalised
# edit distance) or share this fraction of their words (Jaccard). Same template with another entity stays below.
SIMILAR_RATIO = 0.9
SIMILAR_JACCARD = 0.8


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def record_text(record) -> str:
    return normalise(" ".join(m["content"] for m in record.messages if m["role"] == "user"))


def near_duplicate(a: str, b: str) -> bool:
    words_a, words_b = set(a.split()), set(b.split())
    if len(words_a & words_b) / len(words_a | words_b) >= SIMILAR_JACCARD:
        return True
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    return matcher.real_quick_ratio() >= SIMILAR_RATIO and matcher.quick_ratio() >= SIMILAR_RATIO \
        and matcher.ratio() >= SIMILAR_RATIO


@cache
def test_split(slug):
    return load_prompts(dataset_path(f"{slug}_test.jsonl"))


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
        training = [*concept_forget_set(fact["name"], fact["aliases"]), *neighbour_retain_set(fact["neighbours"]),
                    *general_retain_set()]
        dev = [*concept_probes(fact["name"], fact["aliases"]), *general_retain_probes()]
    return training, dev, relearn


def test_near_duplicate_rule():
    typo, original = "Tell me about the movie Inceptoin.", "Tell me about the movie Inception"
    assert near_duplicate(normalise(typo), normalise(original))
    assert near_duplicate(normalise("Who directed Inception?"), normalise("who directed inception"))
    assert not near_duplicate(normalise("What is the capital of Italy?"), normalise("What is the capital of Spain?"))
    assert not near_duplicate(normalise("Who directed Batman Begins?"), normalise("Who directed The Dark Knight?"))


@pytest.mark.parametrize("slug", SLUGS)
def test_no_test_probe_is_a_near_duplicate_of_training_dev_or_relearn_data(slug):
    training, dev, relearn = training_and_dev(slug)
    others = {record_text(r): name for name, records in (("training", training), ("dev", dev), ("relearn", relearn))
              for r in records}
    clashes = [(record_text(p), text, name) for p in test_split(slug) for text, name in others.items()
               if near_duplicate(record_text(p), text)]
    assert not clashes, clashes[:10]


@pytest.mark.parametrize("slug", SLUGS)
def test_test_split_sizes_and_categories(slug):
    probes = test_split(slug)
    forget = [p for p in probes if p.type == "forget"]
    retain = [p for p in probes if p.type == "retain"]
    assert len(forget) >= 100 and len(retain) >= 100
    assert FORGET_CATEGORIES <= {p.category for p in forget}
    assert REQUEST_KINDS <= {p.kind for p in forget}
    assert LANGUAGES <= {p.language for p in forget}
    assert all(p.forbidden for p in forget)
    assert sum(p.category == "neighbour" for p in retain) >= 40
    generic = [p for p in retain if p.category == "generic-recommendation"]
    assert len(generic) >= 20 and all(p.kind == "recommendation" for p in generic)
    assert all(p.required for p in retain if p.category != "generic-recommendation")
    assert all(w == w.lower() for p in retain for w in p.required)
    assert LANGUAGES <= {p.language for p in retain}
    assert len({record_text(p) for p in probes}) == len(probes)


@pytest.mark.parametrize("slug", SLUGS)
def test_forget_probes_forbid_only_facts_absent_from_their_own_text(slug):
    for probe in (p for p in test_split(slug) if p.type == "forget"):
        text = " ".join(m["content"] for m in probe.messages).lower()
        assert not [t for t in probe.forbidden if t.strip() in text], probe.prompt


@pytest.mark.parametrize("slug", SLUGS)
def test_test_neighbours_are_not_in_any_training_set(slug):
    training, _, _ = training_and_dev(slug)
    trained_on = [n.lower() for n in facts(slug)["neighbours"]]
    for probe in (p for p in test_split(slug) if p.category == "neighbour"):
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
