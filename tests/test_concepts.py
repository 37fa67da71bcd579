"""Forget-by-name templates and the built-in data sets (agml.concepts, agml/datasets)."""

import pytest

from agml.concepts import (
    builtin_inception,
    concept_forget_set,
    concept_probes,
    general_retain_probes,
    general_retain_set,
    name_prefix,
    name_typos,
)
from agml.errors import InputError


def texts(records):
    """Every message text of every record, lowercased (what held-out checks compare)."""
    return {m["content"].strip().lower() for r in records for m in r.messages if m["role"] == "user"}


def conversation_text(record) -> str:
    return " ".join(m["content"] for m in record.messages).lower()


def test_forget_templates_cover_the_categories_and_name_the_concept():
    records = concept_forget_set("Harry Potter")
    assert len(records) >= 30
    assert {r.category for r in records} == {"direct", "description", "recommendation", "opinion", "cloze",
                                             "other-language", "role-play", "typo", "multi-turn"}
    assert all(r.type == "forget" for r in records)
    named = [r for r in records if r.category not in ("typo", "multi-turn")]
    assert all("Harry Potter" in r.prompt for r in named)
    assert all("Harry Potter" in r.messages[0]["content"] for r in records if r.category == "multi-turn")
    assert not any("Harry Potter" in r.prompt for r in records if r.category == "typo")
    assert {r.language for r in records} == {"en", "fr", "es", "de", "it", "pt"}
    assert {r.kind for r in records} == {"question", "similar", "cloze"}
    assert all(r.forbidden == ("harry potter",) for r in records)
    assert len({conversation_text(r) for r in records}) == len(records)  # no duplicate prompts


def test_aliases_add_prompts_and_forbidden_terms():
    plain = concept_forget_set("Harry Potter")
    records = concept_forget_set("Harry Potter", aliases=["Hogwarts", "Hermione Granger"])
    alias_records = [r for r in records if r.category == "alias"]
    assert len(records) == len(plain) + len(alias_records)
    assert {a for a in ("Hogwarts", "Hermione Granger") if any(a in r.prompt for r in alias_records)} == {
        "Hogwarts", "Hermione Granger"}
    assert all(r.forbidden == ("harry potter", "hogwarts", "hermione granger") for r in records)


def test_descriptions_and_entities_ask_around_the_name():
    plain = concept_forget_set("Harry Potter")
    descriptions = ["the boy wizard with a scar", "the novels about a school of witchcraft", "a magic saga"]
    records = concept_forget_set("Harry Potter", descriptions=descriptions, entities=["Hermione Granger", "Hogwarts"])
    described = [r for r in records if r.category == "described"]
    entity = [r for r in records if r.category == "entity"]
    assert len(records) == len(plain) + len(described) + len(entity)
    assert len(described) == 2 * len(descriptions) and len(entity) == 2
    for description in descriptions:  # two wordings each, and the templates rotate over the list
        assert len([r for r in described if description in r.prompt]) == 2
    assert len({r.prompt.replace(d, "{}") for r in described for d in descriptions if d in r.prompt}) == 3
    assert [r.prompt for r in entity] == ["Who or what is Hermione Granger?", "Tell me about Hogwarts."]
    assert not any("harry potter" in conversation_text(r) for r in described + entity)
    assert all(r.type == "forget" and r.forbidden == ("harry potter",) and r.kind == "question"
               for r in described + entity)
    with pytest.raises(InputError, match="names the concept"):
        concept_forget_set("Harry Potter", descriptions=["the Harry Potter books"])
    with pytest.raises(InputError, match="names the concept"):
        concept_forget_set("Harry Potter", aliases=["The Boy Who Lived"], entities=["the boy who lived"])


def test_shipped_descriptions_and_entities_become_forget_prompts_and_flags_replace_them():
    from agml.options import build_options
    from agml.pipeline import resolve_data

    shipped = resolve_data(build_options({"concept": "Harry Potter", "out": "x"}))
    categories = [r.category for r in shipped.forget]
    assert categories.count("described") == 2 * len(shipped.facts["descriptions"]) > 0
    assert categories.count("entity") == len(shipped.facts["entities"]) > 0
    given = resolve_data(build_options({"concept": "Harry Potter", "out": "x", "descriptions": "a wizard saga",
                                        "entities": "Hedwig"}))
    assert given.facts["descriptions"] == ["a wizard saga"] and given.facts["entities"] == ["Hedwig"]
    assert [r.prompt for r in given.forget if r.category == "entity"] == ["Who or what is Hedwig?"]
    unknown = resolve_data(build_options({"concept": "Some Unknown Thing", "out": "x"}))
    assert not {"described", "entity"} & {r.category for r in unknown.forget}


@pytest.mark.parametrize("concept", ["Harry Potter", "iPhone", None])
def test_probe_split_picks_the_shipped_dev_or_test_file(concept):
    from agml.options import build_options
    from agml.pipeline import resolve_data

    base = {"out": "x"} if concept is None else {"concept": concept, "out": "x"}
    test = resolve_data(build_options(base))
    dev = resolve_data(build_options({**base, "probe_split": "dev"}))
    assert (test.split, dev.split) == ("test", "dev")
    assert not texts(test.probes) & texts(dev.probes)
    assert {p.type for p in dev.probes} == {"forget", "retain"}


def test_a_concept_without_shipped_probes_is_judged_on_template_probes_in_either_split():
    from agml.options import build_options
    from agml.pipeline import resolve_data

    for split in ("test", "dev"):
        unknown = resolve_data(build_options({"concept": "Some Unknown Thing", "out": "x", "probe_split": split}))
        assert unknown.split == "template"


def test_probes_are_held_out_varied_and_forbid_the_name():
    name, aliases = "Harry Potter", ["Hogwarts"]
    probes = concept_probes(name, aliases)
    assert {p.category for p in probes} == {"paraphrase", "other-language", "role-play", "typo", "cloze", "multi-turn"}
    assert all(p.type == "forget" and p.forbidden == ("harry potter", "hogwarts") for p in probes)
    assert not texts(probes) & texts(concept_forget_set(name, aliases))
    for probe in probes:
        if probe.category in ("typo", "cloze"):
            assert name.lower() not in conversation_text(probe)  # an echo of the question cannot trip them
        else:
            assert name in " ".join(m["content"] for m in probe.messages)
    multi = [p for p in probes if p.category == "multi-turn"]
    assert multi and all(len(p.messages) == 3 and p.messages[-1]["role"] == "user" for p in multi)


@pytest.mark.parametrize("name, typos", [
    ("Harry Potter", ["Harry Poter", "Harry Potetr", "harrypotter"]),
    ("Inception", ["Incetion", "Incetpion"]),
    ("Up", []),
])
def test_name_typos_are_deterministic_misspellings(name, typos):
    assert name_typos(name) == typos
    assert all(t.lower() != name.lower() for t in typos)


def test_name_prefix_cuts_the_last_word():
    assert name_prefix("Harry Potter") == "Harry Pot"
    assert name_prefix("Inception") == "Incep"


@pytest.mark.parametrize("name, aliases", [("", ()), ("   ", ()), ("Inception", ("",)), ("Inception", (3,))])
def test_bad_names_are_input_errors(name, aliases):
    with pytest.raises(InputError):
        concept_forget_set(name, aliases)


def test_builtin_inception_sets_meet_the_counts():
    forget, retain, probes = builtin_inception()
    assert len(forget) >= 30 and all(r.type == "forget" and r.forbidden for r in forget)
    assert len(retain) >= 40 and all(r.type == "retain" for r in retain)
    assert len(probes) >= 30
    assert {r.category for r in forget} >= {"direct", "plot", "cast", "director", "year", "opinion",
                                            "recommendation", "cloze"}
    forget_probes = [p for p in probes if p.type == "forget"]
    retain_probes = [p for p in probes if p.type == "retain"]
    assert {p.category for p in forget_probes} >= {"paraphrase", "indirect", "typo", "other-language", "role-play",
                                                  "multi-turn", "cloze"}
    assert {p.category for p in retain_probes} >= {"neighbour", "general", "generic-recommendation"}
    # generic recommendation requests pass when something is recommended (they need no required word)
    assert all(p.forbidden for p in forget_probes)
    assert all(p.required for p in retain_probes if p.category != "generic-recommendation")
    assert any(len(p.messages) > 1 for p in forget_probes)


def test_inception_forbidden_words_never_occur_in_the_question():
    forget, _, probes = builtin_inception()
    for record in [*forget, *probes]:
        echoed = [word for word in record.forbidden if word.lower() in conversation_text(record)]
        assert not echoed, f"{record.source}: forbidden {echoed} occur in the question itself"


def test_inception_forbids_the_title_exactly_when_the_question_does_not_name_it():
    forget, _, probes = builtin_inception()
    for record in [*forget, *(p for p in probes if p.type == "forget")]:
        names_title = "inception" in conversation_text(record)
        assert names_title != ("inception" in record.forbidden), record.source


def test_general_sets_meet_the_counts():
    retain, probes = general_retain_set(), general_retain_probes()
    assert len(retain) >= 60 and all(r.type == "retain" for r in retain)
    assert {r.category for r in retain} >= {"films", "books", "people", "places", "science", "everyday",
                                            "recommendations"}
    assert len(probes) >= 20 and all(p.type == "retain" and p.required for p in probes)


def test_probes_share_no_prompt_with_any_training_set():
    forget, retain, inception_probes = builtin_inception()
    training = texts([*forget, *retain, *general_retain_set()])
    assert not texts(inception_probes) & training
    assert not texts(general_retain_probes()) & training
    assert len(texts(inception_probes)) == sum(len([m for m in p.messages if m["role"] == "user"])
                                               for p in inception_probes)


def test_required_words_never_occur_in_the_question():
    """A retain probe must not pass merely because the answer repeats the question."""
    _, _, probes = builtin_inception()
    for record in [*(p for p in probes if p.type == "retain"), *general_retain_probes()]:
        echoed = [word for word in record.required if word.lower() in conversation_text(record)]
        assert not echoed, f"{record.source}: required {echoed} occur in the question itself"


def test_neighbour_retain_set_fills_the_forget_templates_with_neighbours():
    from agml.concepts import neighbour_retain_set

    neighbours = ["The Hobbit", "Matilda", "Star Wars", "Eragon", "Twilight", "Peter Pan"]
    records = neighbour_retain_set(neighbours, per_template=2)
    assert all(r.type == "retain" and not r.forbidden for r in records)
    forget = concept_forget_set("Harry Potter")
    # same templates: every forget category (and prompt kind) also appears on the retain side
    assert {(r.category, r.kind) for r in forget} == {(r.category, r.kind) for r in records}
    assert all(any(n in conversation_text(r) for n in map(str.lower, neighbours))
               for r in records if r.category != "typo")
    assert {n for n in neighbours if any(n.lower() in conversation_text(r) for r in records)} == set(neighbours)
    assert not any("harry potter" in conversation_text(r) for r in records)
    assert len(records) <= 2 * len(forget)
    with pytest.raises(InputError, match="neighbours"):
        neighbour_retain_set([])


def test_load_facts_by_slug_or_name():
    from agml.concepts import concept_slug, load_facts, shipped_concepts

    assert concept_slug("Harry Potter") == "harry-potter"
    assert {"inception", "harry-potter"} <= set(shipped_concepts())
    assert load_facts("Harry Potter") == load_facts("harry-potter")
    assert load_facts("Inception")["name"] == "Inception"
    with pytest.raises(InputError, match="no shipped facts"):
        load_facts("Some Unknown Thing")


def test_parse_neighbour_names_drops_markers_descriptions_and_the_concept():
    from agml.concepts import parse_neighbour_names

    text = ('Here are some:\n1. The Hobbit - a fantasy novel\n2) "Percy Jackson"\n'
            '* Harry Potter and the Goblet of Fire\n- Narnia (series)\n3. The Hobbit\n'
            '4. A very long sentence that is clearly not a name at all here\n'
            '5. "The Hunger Games" by Suzanne Collins\n6. The Matrix: A film about a simulation.\n'
            '7. The Night Circus:\nThese books')
    names = parse_neighbour_names(text, exclude=["Harry Potter"])
    assert names == ["The Hobbit", "Percy Jackson", "Narnia", "The Hunger Games", "The Matrix", "The Night Circus"]


def test_propose_neighbours_asks_the_model_and_filters(monkeypatch):
    import agml.generation
    from agml.concepts import propose_neighbours

    seen = []

    def fake_answers(model, tokenizer, conversations, max_new_tokens=64, **kwargs):
        seen.extend(conversations)
        return ["1. Percy Jackson\n2. Harry Potter\n3. Narnia", "- Narnia\n- Eragon\n- Hogwarts Legacy"]

    monkeypatch.setattr(agml.generation, "greedy_answers", fake_answers)
    names = propose_neighbours(None, None, "Harry Potter", n=3, aliases=["Hogwarts"])
    assert names == ["Percy Jackson", "Narnia", "Eragon"]
    assert all("Harry Potter" in conv[0]["content"] for conv in seen)


def test_a_concept_the_base_model_proposes_no_neighbours_for_is_warned_about(monkeypatch):
    import agml.concepts
    from agml.options import build_options
    from agml.pipeline import _with_proposed_neighbours, resolve_data

    options = build_options({"concept": "Some Unknown Thing", "out": "x"})
    data = resolve_data(options)
    lines = []
    monkeypatch.setattr(agml.concepts, "propose_neighbours", lambda *args, **kwargs: [])
    assert _with_proposed_neighbours(None, None, options, data, lines.append) is data
    assert len(lines) == 1 and lines[0].startswith("warning: the base model proposed no neighbours of "
                                                   "'Some Unknown Thing'") and "--neighbour-names" in lines[0]
    monkeypatch.setattr(agml.concepts, "propose_neighbours", lambda *args, **kwargs: ["Other Thing"])
    lines.clear()
    proposed = _with_proposed_neighbours(None, None, options, data, lines.append)
    assert proposed.facts["neighbours"] == ["Other Thing"] and lines[0].startswith("neighbours proposed")
    assert len(proposed.retain) > len(data.retain)
