import pytest
import torch
from tiny_models import tiny_model

from agml.data import PromptRecord
from agml.entities import entity_token_ids
from agml.errors import InputError
from agml.masks import (
    NeuronMasks,
    build_masks,
    layer_range,
    mask_jaccard,
    random_masks_like,
    standardized_by_layer,
)
from agml.scoring import NeuronScores, score_records, score_records_at


def shifted_scores() -> NeuronScores:
    """Layer 0's forget importance is shifted up as a whole; layer 1 has a few strongly specific neurons."""
    generator = torch.Generator().manual_seed(0)
    retain = torch.ones(2, 20) + 0.05 * torch.rand(2, 20, generator=generator)
    forget = retain.clone()
    forget[0] += 0.5 + 0.05 * torch.rand(20, generator=generator)
    forget[1, [3, 7, 11]] += 0.4
    return NeuronScores(forget, forget.clone(), retain, retain.clone(), forget_tokens=10, retain_tokens=10)


def test_standardized_by_layer_centres_and_scales_each_layer():
    contrast = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 10.0, 10.0, 10.0]])
    z = standardized_by_layer(contrast)
    assert torch.allclose(z[0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose((z[0] ** 2).mean(), torch.tensor(1.0), atol=1e-5)
    assert torch.equal(z[1], torch.zeros(4))


def test_per_layer_standardisation_stops_a_shifted_layer_from_taking_the_budget():
    scores = shifted_scores()
    plain = build_masks(scores, density=0.1, score="fisher", outlier_quantile=None)
    standard = build_masks(scores, density=0.1, score="fisher", outlier_quantile=None, per_layer_standardize=True)
    assert list(plain) == [0]
    assert 1 in standard and set(standard[1].tolist()) <= {3, 7, 11}
    assert standard.meta["per_layer_standardize"] is True and "per_layer_standardize" not in plain.meta


def test_default_masks_are_unchanged():
    scores = shifted_scores()
    assert build_masks(scores).to_lists() == build_masks(scores, per_layer_standardize=False).to_lists()


def test_layer_range():
    assert layer_range("2-4", 30) == [2, 3, 4]
    assert layer_range("28-", 30) == [28, 29]
    assert layer_range("-1", 30) == [0, 1]
    assert layer_range("5", 30) == [5]
    for bad in ("4-2", "x", "0-30", ""):
        with pytest.raises(InputError):
            layer_range(bad, 30)
    masks = build_masks(shifted_scores(), density=0.1, score="fisher", layers=layer_range("1-1", 2))
    assert list(masks) == [1]


def test_random_masks_keep_the_per_layer_counts():
    masks = NeuronMasks({0: [1, 2, 3], 4: [7]}, meta={"num_layers": 6, "intermediate_size": 50})
    one, again, other = (random_masks_like(masks, 50, seed) for seed in (0, 0, 1))
    assert {k: v.numel() for k, v in one.items()} == {0: 3, 4: 1}
    assert one.to_lists() == again.to_lists() and one.to_lists() != other.to_lists()
    one.validate_for(6, 50)


def test_mask_jaccard():
    a = NeuronMasks({0: [1, 2], 1: [3]})
    b = NeuronMasks({0: [2], 1: [3, 4]})
    assert mask_jaccard(a, b) == pytest.approx(2 / 4)
    assert mask_jaccard(a, a) == 1.0 and mask_jaccard(NeuronMasks({}), NeuronMasks({})) == 1.0


def _records(prompts, kind):
    return [PromptRecord(({"role": "user", "content": p},), kind, answer=a) for p, a in prompts]


def test_scoring_at_entity_positions(smol_tokenizer):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer), hidden=32, intermediate=64, layers=2)
    forget = _records([("Who directed Inception?", "A director."), ("Is inception good?", "Yes, very.")], "forget")
    retain = _records([("What is the capital of France?", "Paris."), ("Who wrote Hamlet?", "Shakespeare.")],
                      "retain")
    ids = entity_token_ids(smol_tokenizer, ["Inception"])
    plain = score_records(model, smol_tokenizer, forget, retain, progress=False)
    same = score_records_at(model, smol_tokenizer, forget, retain, ids, positions="answer", progress=False)
    assert torch.allclose(plain.forget_fisher, same.forget_fisher) and plain.forget_tokens == same.forget_tokens
    both = score_records_at(model, smol_tokenizer, forget, retain, ids, progress=False)
    entity = score_records_at(model, smol_tokenizer, forget, retain, ids, positions="entity", progress=False)
    assert both.forget_tokens == plain.forget_tokens + entity.forget_tokens
    assert entity.forget_tokens >= 2 and not torch.allclose(entity.forget_fisher, plain.forget_fisher)
    assert entity.retain_tokens == plain.retain_tokens  # no neighbour names given: retain stays at its answers
    with pytest.raises(InputError):
        score_records_at(model, smol_tokenizer, forget, retain, ids, positions="prompt")


def test_shared_facts_leave_the_forget_nll_and_its_positions(smol_tokenizer):
    """`--shared-facts exclude`: the tokens of a fact the concept shares with its neighbours (its director) stop
    counting in the forget statistics; every other answer token, and the retain side, count as before."""
    model = tiny_model("llama", vocab_size=len(smol_tokenizer), hidden=32, intermediate=64, layers=2)
    forget = _records([("Who directed Inception?", "Christopher Nolan did, in 2010."),
                       ("Is Inception good?", "Yes, very.")], "forget")
    retain = _records([("Who directed Memento?", "Christopher Nolan."), ("Who wrote Hamlet?", "Shakespeare.")],
                      "retain")
    ids = entity_token_ids(smol_tokenizer, ["Inception"])
    shared = entity_token_ids(smol_tokenizer, ["nolan"])
    spelled = len(smol_tokenizer(" Nolan", add_special_tokens=False)["input_ids"])
    kept = score_records_at(model, smol_tokenizer, forget, retain, ids, positions="answer", progress=False)
    left = score_records_at(model, smol_tokenizer, forget, retain, ids, positions="answer", progress=False,
                            shared_token_ids=shared)
    assert left.forget_tokens == kept.forget_tokens - spelled
    assert not torch.allclose(left.forget_fisher, kept.forget_fisher)
    assert left.retain_tokens == kept.retain_tokens and torch.equal(left.retain_fisher, kept.retain_fisher)
    unrelated = score_records_at(model, smol_tokenizer, forget, retain, ids, positions="answer", progress=False,
                                 shared_token_ids=entity_token_ids(smol_tokenizer, ["Tarantino"]))
    assert torch.equal(unrelated.forget_fisher, kept.forget_fisher)


def test_shared_facts_are_the_facts_outside_identity():
    from agml.pipeline import shared_facts

    facts = {"facts": ["inception", "nolan", "cobb", "2010"], "identity": ["inception", "cobb"]}
    assert shared_facts(facts, ("Inception", "Dom Cobb")) == ["nolan", "2010"]
    assert shared_facts({"facts": ["nolan"]}, ("Inception",)) == []  # no identity list: nothing is known shared
    with pytest.raises(InputError, match="shared_facts"):
        from agml.options import MaskOptions

        MaskOptions(shared_facts="drop")
