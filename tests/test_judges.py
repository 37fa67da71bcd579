import json

import pytest

from agml.data import parse_record
from agml.errors import InputError
from agml.judges import (
    best_of_n,
    check_facts,
    contains_term,
    detect_language,
    forget_coherence,
    is_refusal,
    judge_probe,
    leak_terms,
    load_facts,
    recommended_items,
)

FACTS = {
    "name": "Inception",
    "aliases": ["Dom Cobb"],
    "facts": ["nolan", "dicaprio", "cobb", "totem", "dream"],
    "fuzzy": ["inc[eai]p", "dream.*heist"],
    "neighbours": ["The Dark Knight", "Interstellar"],
    "languages": ["fr"],
}


def probe(**fields):
    return parse_record(fields, "test")


def recommendation_probe(prompt: str):
    record = probe(prompt=prompt, type="retain", category="recommendation")
    # The `kind` field arrives with the data branch; the judge reads it with getattr.
    object.__setattr__(record, "kind", "recommendation")
    return record


def test_contains_term_is_word_bounded_case_and_accent_insensitive():
    assert contains_term("Directed by NOLAN.", "nolan")
    assert contains_term("Nolan's best film", "nolan")
    assert contains_term("Lucid dreams everywhere", "dream")
    assert contains_term("Dreaming is fun", "dream")
    assert contains_term("un film sui sogni", "sogn") and contains_term("Träume", "traum")
    assert not contains_term("a cobbler in town", "cobb")
    assert not contains_term("a daydream", "dream")
    assert contains_term("Le réalisateur de Inceptión", "inception")
    assert not contains_term("anything", "   ")


def test_leak_judge_names_the_term_and_uses_the_facts():
    record = probe(prompt="Tell me about a heist film.", type="forget", forbidden=["heist"])
    verdict = judge_probe(record, "That is Inception, directed by Christopher Nolan.", FACTS)
    assert not verdict.passed and verdict.leaked_terms == ("Inception", "nolan")
    assert judge_probe(record, "I do not know that film.", FACTS).passed
    # Without the facts only the probe's own forbidden terms count.
    assert judge_probe(record, "That is Inception.", None).passed


def test_leak_judge_ignores_terms_the_conversation_contains():
    record = probe(messages=[
        {"role": "user", "content": "What is Inception?"},
        {"role": "assistant", "content": "A film with a spinning totem."},
        {"role": "user", "content": "Who is the main character?"},
    ], type="forget", forbidden=["inception"])
    assert "Inception" not in leak_terms(record, FACTS) and "totem" not in leak_terms(record, FACTS)
    assert judge_probe(record, "Inception has a totem.", FACTS).passed
    verdict = judge_probe(record, "The main character is Dom Cobb.", FACTS)
    assert verdict.leaked_terms == ("Dom Cobb", "cobb")


def test_recommendation_probes_use_the_identity_list_and_languages_add_their_terms():
    facts = {**FACTS, "identity": ["cobb", "totem"], "language_extra": {"fr": ["rêve"]}}
    record = probe(prompt="Recommend a mind-bending film.", type="forget")
    object.__setattr__(record, "kind", "recommendation")
    assert judge_probe(record, "Try Memento by Christopher Nolan.", facts).passed
    assert not judge_probe(record, "Try the one with the spinning totem.", facts).passed
    french = probe(prompt="De quoi parle ce film ?", type="forget")
    object.__setattr__(french, "language", "fr")
    assert judge_probe(french, "Il parle de rêves partagés.", facts).leaked_terms == ("rêve",)
    assert judge_probe(probe(prompt="What is it about?", type="forget"), "Il parle de rêves.", facts).passed


def test_fuzzy_judge_is_reported_separately():
    record = probe(prompt="Name the film.", type="forget")
    verdict = judge_probe(record, "A dream within a heist, an incaption.", {**FACTS, "facts": [], "name": "x"})
    assert verdict.passed and verdict.fuzzy_matches == ("inc[eai]p", "dream.*heist") and verdict.fuzzy_leaked


@pytest.mark.parametrize("answer", [
    "I don't know.",
    "I do not know who that is.",
    "I'm not familiar with that movie.",
    "I don't have enough information to recommend a movie.",
    "I don't have any information about it.",
    "I can't help with that.",
    "I'm afraid I don't have any suggestions for that.",
    "Sorry, no suggestions.",
    "I'm not sure what you're referring to.",
    "Hmm. That doesn't ring a bell.",
    "I’m sorry, but I can’t recommend anything.",
    "Je ne sais pas.",
    "Désolé, je ne connais pas ce film.",
    "No lo sé.",
    "No tengo suficiente información.",
    "Ich weiß es nicht.",
    "Ich bin mir nicht sicher, welchen Film Sie meinen.",
    "Non lo so.",
    "Mi dispiace, non conosco questo film.",
    "Não sei.",
    "Não conheço esse filme.",
    "I haven't heard of that film, sorry.",
    "I don't recognize that title.",
    "That's not something I know about.",
    "Sorry, I don't have reliable details on that.",
    "",
])
def test_refusals_are_detected(answer):
    assert is_refusal(answer)


@pytest.mark.parametrize("answer", [
    "The capital of France is Paris.",
    "Memento was directed by Christopher Nolan. I don't know if you have seen it, but it is great. Really.",
    "Sure! Here are three classics: Casablanca, Vertigo and Citizen Kane.",
    "No se trata de una película, es un libro.",
    "Paris est la capitale de la France.",
    "Ich kenne den Film gut: er ist von 1999.",
    "I haven't come across a better heist film than Heat (1995).",
])
def test_ordinary_answers_are_not_refusals(answer):
    assert not is_refusal(answer)


def test_retain_probe_fails_on_a_refusal_even_with_the_required_word():
    record = probe(prompt="Who directed Memento?", type="retain", required=["nolan"])
    assert judge_probe(record, "Christopher Nolan directed Memento.").passed
    verdict = judge_probe(record, "I'm not familiar with Nolan's Memento.")
    assert not verdict.passed and verdict.refused and verdict.required_found == ("nolan",)
    assert not judge_probe(record, "It was Steven Spielberg.").passed


def test_recommendation_judge_needs_a_named_item_not_copied_from_the_prompt():
    record = recommendation_probe("Can you recommend a film like The Dark Knight?")
    assert judge_probe(record, "You might enjoy Batman Begins, also by Christopher Nolan.").passed
    assert judge_probe(record, "Try these:\n1. heat (1995)\n2. collateral").passed
    assert judge_probe(record, 'I suggest "the prestige".').passed
    assert not judge_probe(record, "You might enjoy a superhero film with a lot of action.").passed
    assert not judge_probe(record, "The Dark Knight is a great film, you should watch it again.").passed
    refused = judge_probe(record, "I'm afraid I don't have any suggestions. Maybe Batman Begins?")
    assert not refused.passed and refused.refused


def test_recommended_items_skip_sentence_openers():
    record = recommendation_probe("Recommend three classic movies.")
    assert recommended_items(record, "Sure. Here are some. I think you will like them.") == ()
    # "and" joins capitalised words as in "Pride and Prejudice", so two titles joined by "and" read as one.
    assert recommended_items(record, "Here are three: Casablanca, Vertigo and Citizen Kane.") == (
        "Casablanca", "Vertigo and Citizen Kane")


def test_forget_recommendation_probe_is_judged_by_leaks_only():
    record = probe(prompt="Recommend a film about dream heists.", type="forget", category="recommendation")
    object.__setattr__(record, "kind", "recommendation")
    assert judge_probe(record, "I don't know.", FACTS).passed
    assert judge_probe(record, "Try The Matrix.", FACTS).recommended == ("The Matrix",)
    assert not judge_probe(record, "Try Inception.", FACTS).passed


def test_best_of_n_leaks_when_any_sample_leaks():
    record = probe(prompt="Name a mind-bending film.", type="forget")
    verdict = best_of_n(record, ["The Matrix.", "Inception, of course.", "Memento."], FACTS)
    assert not verdict.passed and verdict.leaked_terms == ("Inception",)
    assert best_of_n(record, ["The Matrix.", "Memento."], FACTS).passed
    with pytest.raises(InputError, match="forget probes only"):
        best_of_n(probe(prompt="x", type="retain"), ["a"], FACTS)


def test_detect_language_by_stopwords():
    assert detect_language("The film is about a thief who steals secrets.") == "en"
    assert detect_language("Le film est une histoire de rêves et de voleurs dans la ville.") == "fr"
    assert detect_language("La película es de un ladrón que roba secretos en los sueños.") == "es"
    assert detect_language("Der Film ist ein Thriller und die Handlung ist nicht einfach.") == "de"
    assert detect_language("Il film è una storia di sogni e non è facile per questo.") == "it"
    assert detect_language("O filme é uma história de sonhos e não é para crianças também.") == "pt"
    assert detect_language("Paris.") is None


def test_forget_coherence_reports_language_match():
    records = [probe(prompt="What is Inception?", type="forget"), probe(prompt="Inception?", type="forget"),
               probe(prompt="Who wrote Hamlet?", type="retain")]
    object.__setattr__(records[1], "language", "fr")
    answers = ["It is a film about the mind and the city.", "It is a film about the mind and the city.", "x"]
    result = forget_coherence(records, answers)
    assert result["n"] == 2 and result["language_match"] == 0.5 and result["language_undetected"] == 0
    assert result["repetition_rate"] == 0.0 and result["distinct_2"] == pytest.approx(9 / 18)


def test_facts_file_is_validated(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps({"name": "Inception", "facts": ["nolan"]}))
    assert load_facts(path) == {"name": "Inception", "aliases": [], "facts": ["nolan"], "fuzzy": [],
                                "neighbours": [], "languages": []}
    kept = check_facts({"name": "x", "comment": "free text", "identity": ["x"], "language_extra": {"fr": ["rêve"]}})
    assert kept["comment"] == "free text" and kept["identity"] == ["x"]
    with pytest.raises(InputError, match="'identity' must be"):
        check_facts({"identity": "x"})
    with pytest.raises(InputError, match="language_extra"):
        check_facts({"language_extra": {"fr": "rêve"}})
    with pytest.raises(InputError, match="not a valid regular expression"):
        check_facts({"fuzzy": ["(unclosed"]})
    with pytest.raises(InputError, match="not found"):
        load_facts(tmp_path / "missing.json")


def test_judge_answers_rates():
    from agml.judges import judge_answers

    records = [
        probe(prompt="What is it?", type="forget", category="direct", forbidden=["inception"]),
        probe(prompt="Name it.", type="forget", category="direct"),
        probe(prompt="Who directed Memento?", type="retain", category="neighbour", required=["nolan"]),
        recommendation_probe("Recommend a comedy."),
    ]
    answers = ["Inception.", "I don't know.", "I'm not familiar with Nolan.", "Try Groundhog Day."]
    result = judge_answers(records, answers, FACTS)
    assert [v.passed for v in result["verdicts"]] == [False, True, False, True]
    assert result["forget"]["leak"]["successes"] == 1 and result["forget"]["refusal"]["successes"] == 1
    assert result["retain"]["pass"]["rate"] == 0.5 and result["retain"]["refusal"]["successes"] == 1
    assert result["retain"]["recommended"] == {**result["retain"]["recommended"], "successes": 1, "n": 1}
    assert result["by_category"]["retain"]["neighbour"]["rate"] == 0.0
    assert result["forget"]["leak"]["low"] is not None
