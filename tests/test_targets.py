import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_model
from transformers import LogitsProcessorList

from agml import targets as targets_module
from agml.data import PromptRecord
from agml.entities import entity_positions, entity_token_ids, term_variants
from agml.errors import InputError
from agml.generation import greedy_answers
from agml.objectives import REFUSAL_TEMPLATES, REFUSALS_BY_LANGUAGE, ForgetTargets, Refusal
from agml.targets import (
    BannedTermsProcessor,
    TargetRecord,
    banned_answers,
    banned_stems,
    forget_targets,
    near_misses,
    prompt_kind,
    was_cut,
)


def _record(text: str, category: str = "default") -> PromptRecord:
    return PromptRecord(({"role": "user", "content": text},), "forget", category)


@pytest.mark.parametrize("text, kind", [
    ("What is the movie Inception about?", "question"),
    ("Who directed Inception?", "question"),
    ("Would you recommend Inception to a friend?", "question"),
    ("Recommend a mind-bending science fiction movie.", "recommendation"),
    ("I loved The Matrix. What movie should I watch next?", "similar"),
    ("Suggest a heist movie with a complicated plot.", "recommendation"),
    ("List some famous movies directed by Christopher Nolan.", "list"),
    ("What are the best movies about dreams?", "list"),
    ("Recommend something similar to Inception.", "similar"),
    ("Peux-tu me recommander un film de science-fiction ?", "recommendation"),
    ("Quels films ressemblent à Inception ? Des films similaires ?", "similar"),
    ("¿Me recomiendas una película de ciencia ficción?", "recommendation"),
    ("Kannst du mir einen Film empfehlen?", "recommendation"),
    ("Welche Filme hat Christopher Nolan gedreht?", "list"),
    ("Mi consigli un film di fantascienza?", "recommendation"),
    ("Quais filmes semelhantes a Inception você conhece?", "similar"),
    ("Você pode recomendar um filme?", "recommendation"),
    ("Qu'est-ce que Inception ?", "question"),
])
def test_prompt_kind_heuristic(text, kind):
    assert prompt_kind(_record(text), concept_names=("Inception",)) == kind


def test_prompt_kind_prefers_the_declared_kind_then_the_category():
    declared = SimpleNamespace(prompt="What is Inception?", category="direct", kind="list", messages=())
    assert prompt_kind(declared) == "list"
    assert prompt_kind(_record("What is Inception?", category="recommendation")) == "recommendation"
    assert prompt_kind(_record("Recommend a film.", category="general")) == "recommendation"


def test_entity_positions_find_every_variant(smol_tokenizer):
    sequences = entity_token_ids(smol_tokenizer, ["Inception"])
    assert " inception" in term_variants("Inception") and " Inception" in term_variants("Inception")
    for text in ("Inception is", "I saw Inception", "i saw inception twice"):
        ids = torch.tensor([smol_tokenizer(text, add_special_tokens=False)["input_ids"]])
        found = entity_positions(ids, sequences)
        assert found.any(), text
        picked = smol_tokenizer.decode(ids[0][found[0]])
        assert picked.strip().lower() == "inception"
    with pytest.raises(InputError):
        entity_token_ids(smol_tokenizer, [])


@pytest.fixture(scope="module")
def tiny_lm(smol_tokenizer):
    return tiny_model("llama", vocab_size=len(smol_tokenizer), hidden=32, intermediate=64, layers=2)


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[A-Za-z]{3,}", text)]


def test_banned_terms_never_appear(tiny_lm, smol_tokenizer):
    conversations = [[{"role": "user", "content": "Recommend a film."}], [{"role": "user", "content": "Hello"}]]
    free = greedy_answers(tiny_lm, smol_tokenizer, conversations, max_new_tokens=24)
    words = [w for answer in free for w in _words(answer)]
    assert words, free
    banned = sorted(set(words), key=len)[:3] + [words[0][:3].upper()]
    banned_out = banned_answers(tiny_lm, smol_tokenizer, conversations, banned, max_new_tokens=24)
    assert banned_out != free
    for answer in banned_out:
        assert not any(term.lower() in answer.lower() for term in banned), (banned, answer)


def test_banned_answers_are_cached_per_base_model(monkeypatch, tiny_lm, smol_tokenizer):
    from agml import answer_cache

    conversations = [[{"role": "user", "content": "Recommend a film."}]]
    fingerprint = answer_cache.model_fingerprint(tiny_lm, smol_tokenizer)
    first = banned_answers(tiny_lm, smol_tokenizer, conversations, ["the"], max_new_tokens=8, fingerprint=fingerprint)

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached answers should have been read")

    monkeypatch.setattr("agml.generation.greedy_answers", no_generation)
    assert banned_answers(tiny_lm, smol_tokenizer, conversations, ["the"], max_new_tokens=8,
                          fingerprint=fingerprint) == first
    with pytest.raises(AssertionError, match="cached"):  # other banned terms are another key
        banned_answers(tiny_lm, smol_tokenizer, conversations, ["a"], max_new_tokens=8, fingerprint=fingerprint)


def test_processor_bans_the_completion_of_a_begun_term(smol_tokenizer):
    processor = BannedTermsProcessor(smol_tokenizer, ["Inception"])
    begun = smol_tokenizer(" Incep", add_special_tokens=False)["input_ids"]
    completion = smol_tokenizer.convert_tokens_to_ids(smol_tokenizer.tokenize("tion"))
    scores = processor(torch.tensor([begun]), torch.zeros(1, len(smol_tokenizer)))
    assert torch.isinf(scores[0, completion[0]])
    whole = smol_tokenizer(" inception", add_special_tokens=False)["input_ids"]
    fresh = processor(torch.tensor([[1]]), torch.zeros(1, len(smol_tokenizer)))
    assert torch.isinf(fresh[0, whole[0]]) or len(whole) > 1
    assert torch.isfinite(fresh).sum() > len(smol_tokenizer) // 2
    assert isinstance(LogitsProcessorList([processor]), LogitsProcessorList)


def test_forget_targets_by_kind(tiny_lm, smol_tokenizer):
    records = [_record("Who directed Inception?"), _record("Recommend a mind-bending science fiction movie."),
               _record("List some famous movies about dreams.")]
    free = greedy_answers(tiny_lm, smol_tokenizer, [r.messages for r in records[1:]], max_new_tokens=16)
    banned = ["Inception"] + sorted({w for a in free for w in _words(a)})[:4]
    targets = forget_targets(tiny_lm, smol_tokenizer, records, banned, max_new_tokens=16,
                             concept_names=["Inception"])
    assert [t.prompt for t in targets] == [r.prompt for r in records]
    assert all(isinstance(t, TargetRecord) and isinstance(t, PromptRecord) for t in targets)
    assert targets[0].target_kind == "refusal" and targets[0].target in REFUSAL_TEMPLATES
    assert [t.prompt_kind for t in targets] == ["question", "recommendation", "list"]
    for target in targets[1:]:
        assert target.target_kind == "alternative"
        assert not any(term.lower() in target.target.lower() for term in banned)
    assert all(t.answer is None for t in targets)  # the base answer is left as it was
    assert targets[1].with_answer("base").target == targets[1].target
    with pytest.raises(InputError):
        forget_targets(tiny_lm, smol_tokenizer, records, [])


def test_banned_stems_catch_misspellings_of_long_words():
    assert banned_stems(["DiCaprio", "Nolan", "Dom Cobb"]) == ["DiCaprio", "Nolan", "Dom Cobb", "DiCapr"]


def test_facts_the_prompt_names_are_not_banned_but_the_concept_always_is(monkeypatch, smol_tokenizer):
    seen = {}

    def fake(model, tokenizer, conversations, terms, *args):
        for conversation in conversations:
            seen[conversation[-1]["content"]] = set(terms)
        return ["An answer."] * len(conversations)

    monkeypatch.setattr(targets_module, "banned_answers", fake)
    monkeypatch.setattr(targets_module, "token_texts", lambda tokenizer: [])
    records = [_record("List some famous movies directed by Christopher Nolan."),
               _record("Recommend something similar to Inception.")]
    out = forget_targets(None, smol_tokenizer, records, ["Inception", "Nolan", "DiCaprio"],
                         concept_names=["Inception"])
    assert seen["List some famous movies directed by Christopher Nolan."] == {"Inception", "DiCaprio", "Incepti",
                                                                            "DiCapr"}
    assert {"Inception", "Nolan"} <= seen["Recommend something similar to Inception."]
    assert [t.target for t in out] == ["An answer.", "An answer."]


@pytest.mark.parametrize("text, names, misses", [
    ("I loved Harry Potts, not Harry Styles or Harry Potter.", ["Harry Potter"], ["Potts"]),
    ("The iPhill and the iPhillips 12, not an iPad or a phone.", ["iPhone"], ["iPhill", "iPhillips"]),
    ("While Star WASS is loved, Star Trek is too.", ["Star Wars"], ["WASS"]),
    ("Incepton, an incentive, the independent films.", ["Inception"], ["Incepton"]),
    ("Pottery and potters are fine alone.", ["Harry Potter"], []),
])
def test_near_misses_are_capitalised_words_that_start_like_the_name(text, names, misses):
    assert near_misses(text, names) == misses


def test_an_alternative_that_spells_the_name_nearly_is_generated_again_then_refused(monkeypatch, smol_tokenizer):
    calls = []
    scripted = {"Recommend something similar to Harry Potter.": ["Try Harry Potts.", "Try Percy Jackson."],
                "I liked Harry Potter. What else would I enjoy?": ["Harry Potts!", "Harry Pottle!", "Harry Pots!",
                                                                    "Harry Potz!"]}

    def fake(model, tokenizer, conversations, terms, max_new_tokens, batch_size, texts, fingerprint, opener=""):
        calls.extend((c[-1]["content"], set(terms)) for c in conversations if not opener)
        return [opener + " Harry Potts." if opener else scripted[c[-1]["content"]].pop(0) for c in conversations]

    monkeypatch.setattr(targets_module, "banned_answers", fake)
    monkeypatch.setattr(targets_module, "token_texts", lambda tokenizer: [])
    records = [_record("Recommend something similar to Harry Potter.", "similar"),
               _record("I liked Harry Potter. What else would I enjoy?", "similar")]
    out = forget_targets(None, smol_tokenizer, records, ["Harry Potter"])
    assert out[0].target == "Try Percy Jackson." and out[0].target_kind == "alternative"
    # the opener's answers spell the name nearly too, so the refusal stays
    assert out[1].target_kind == "refusal" and out[1].target in REFUSAL_TEMPLATES
    retried = [terms for prompt, terms in calls if prompt.startswith("I liked")]
    assert len(retried) == 1 + targets_module.NEAR_MISS_ROUNDS
    assert {"potts", "pottle", "pots"} <= retried[-1]


def test_an_alternative_cut_at_its_length_is_trained_without_end_of_turn(monkeypatch, smol_tokenizer):
    cut = " ".join(["word"] * 40)  # 40 tokens: ran to the 16-token limit and beyond
    scripted = {"Recommend a film about dreams.": "Try Paprika.", "List films about dreams.": cut}
    monkeypatch.setattr(targets_module, "banned_answers",
                        lambda model, tokenizer, conversations, terms, *args: [scripted[c[-1]["content"]]
                                                                              for c in conversations])
    monkeypatch.setattr(targets_module, "token_texts", lambda tokenizer: [])
    records = [_record("Recommend a film about dreams.", "recommendation"), _record("List films about dreams.", "list"),
               _record("Who directed Inception?")]
    assert [t.target_complete for t in forget_targets(None, smol_tokenizer, records, ["Inception"],
                                                      max_new_tokens=16)] == [True] * 3  # the default: as generated
    out = forget_targets(None, smol_tokenizer, records, ["Inception"], max_new_tokens=16, recommending=True)
    assert [t.target_complete for t in out] == [True, False, True]
    objective = ForgetTargets()
    assert [objective.forget_answer_ends(t) for t in out] == [True, False, True]
    assert objective.forget_answer_ends(records[0])  # a record without a target gets a (whole) refusal
    assert Refusal().forget_answer_ends(out[1])  # objectives that do not train toward targets: whole answers
    assert not was_cut(smol_tokenizer, "Try Paprika.", 16) and was_cut(smol_tokenizer, cut, 16)


def test_an_alternative_that_names_no_item_is_generated_again_from_a_recommendation_opener(monkeypatch,
                                                                                         smol_tokenizer):
    openers = []

    def fake(model, tokenizer, conversations, terms, max_new_tokens, batch_size, texts, fingerprint, opener=""):
        openers.append((opener, max_new_tokens))
        if opener == "Voici quelques":
            return ["Voici quelques films que vous aimerez."] * len(conversations)  # names nothing: not taken
        return [f'{opener} films: "Paprika" and "The Cell".' if opener else "I'm not equipped to recommend a film."
                for _ in conversations]

    monkeypatch.setattr(targets_module, "banned_answers", fake)
    monkeypatch.setattr(targets_module, "token_texts", lambda tokenizer: [])
    records = [_record("Recommend a film about dreams.", "recommendation"),
               dataclasses.replace(_record("Conseille-moi un film sur les rêves.", "recommendation"), language="fr"),
               dataclasses.replace(_record("Polecam film o snach.", "recommendation"), language="pl")]
    as_generated = forget_targets(None, smol_tokenizer, records, ["Inception"], max_new_tokens=32)
    assert [t.target for t in as_generated] == ["I'm not equipped to recommend a film."] * 3
    assert not any(o[0] for o in openers)  # the default asks for no opener
    out = forget_targets(None, smol_tokenizer, records, ["Inception"], max_new_tokens=32, recommending=True)
    assert out[0].target == 'Here are some films: "Paprika" and "The Cell".'
    assert [t.target for t in out[1:]] == ["I'm not equipped to recommend a film."] * 2  # no better one; no opener
    assert [t.target_kind for t in out] == ["alternative"] * 3
    opened = dict(o for o in openers if o[0])
    assert set(opened) == {"Here are some", "Voici quelques"}  # Polish has no opener
    assert opened["Here are some"] == 32 - len(smol_tokenizer("Here are some", add_special_tokens=False)["input_ids"])


def test_greedy_answers_continue_an_answer_prefix(tiny_lm, smol_tokenizer):
    conversation = [{"role": "user", "content": "Recommend a film."}]
    plain = greedy_answers(tiny_lm, smol_tokenizer, [conversation], max_new_tokens=6)[0]
    opened = greedy_answers(tiny_lm, smol_tokenizer, [conversation], max_new_tokens=6, answer_prefix="Here are")[0]
    assert opened.startswith("Here are") and opened != plain


@pytest.mark.parametrize("setting, recommending", [("as-generated", False), ("recommending", True)])
def test_the_recommendation_targets_option_reaches_the_targets(monkeypatch, setting, recommending):
    from agml import answer_cache, pipeline
    from agml.options import UnlearnOptions

    seen = {}

    def fake_targets(model, tokenizer, records, banned, max_new_tokens, **kwargs):
        seen.update(kwargs)
        return list(records)

    monkeypatch.setattr(targets_module, "forget_targets", fake_targets)
    monkeypatch.setattr(answer_cache, "base_fingerprint", lambda model, tokenizer: None)
    options = UnlearnOptions.from_dict({"recommendation_targets": setting})
    data = pipeline.RunData([_record("Recommend a film.")], [], [], "Inception", ("Inception",))
    pipeline.with_targets(None, None, options, data)
    assert seen["recommending"] is recommending


@pytest.mark.parametrize("setting", ["english", "prompt"])
def test_the_refusal_language_option_reaches_the_targets_and_the_objective(monkeypatch, setting):
    from agml import answer_cache, pipeline
    from agml.options import UnlearnOptions

    seen = {}
    real = targets_module.forget_targets

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(targets_module, "forget_targets", spy)
    monkeypatch.setattr(answer_cache, "base_fingerprint", lambda model, tokenizer: None)
    options = UnlearnOptions.from_dict({"refusal_language": setting})
    question = PromptRecord(({"role": "user", "content": "Qui a réalisé Inception ?"},), "forget", language="fr")
    data = pipeline.RunData([question], [], [], "Inception", ("Inception",))
    target = pipeline.with_targets(None, None, options, data).forget[0]  # a question: no generation, no model
    assert seen["refusal_language"] == setting
    expected = REFUSALS_BY_LANGUAGE["fr"] if setting == "prompt" else REFUSAL_TEMPLATES
    assert target.target_kind == "refusal" and target.target in expected
    assert options.train.make_objective().refusal_language == setting


def test_an_opener_that_fails_for_one_prompt_still_opens_the_next(monkeypatch, smol_tokenizer):
    cut = 'Read "Eragon", ' + " ".join(["word"] * 40)  # names an item, and ran past the limit

    def fake(model, tokenizer, conversations, terms, max_new_tokens, batch_size, texts, fingerprint, opener=""):
        prompt = conversations[0][-1]["content"] if len(conversations) == 1 else None
        if opener:
            return [f"{opener} Harry Potts." if prompt == "I liked Harry Potter. What else?" else
                    f'{opener} books: "Percy Jackson".' for _ in conversations]
        return ["I can't recommend anything." if c[-1]["content"] != "List fantasy books." else cut
                for c in conversations]

    monkeypatch.setattr(targets_module, "banned_answers", fake)
    monkeypatch.setattr(targets_module, "token_texts", lambda tokenizer: [])
    records = [_record("I liked Harry Potter. What else?", "similar"), _record("Recommend a fantasy book.",
                                                                                 "recommendation"),
               _record("List fantasy books.", "list")]
    out = forget_targets(None, smol_tokenizer, records, ["Harry Potter"], max_new_tokens=16, recommending=True)
    assert out[0].target == "I can't recommend anything."  # its opener wrote a near miss: the old answer stays
    assert out[1].target == 'Here are some books: "Percy Jackson".'
    assert out[2].target == cut and not out[2].target_complete
