"""The base model's answer states: its answer logits in compact form, cached across runs (agml.logprobs,
agml.answer_cache). The claim under test is exactness: a run that reads the states computes what a run with a base
pass computes, bit for bit."""

import pytest
import torch
from test_objectives import FORGET, RETAIN, peft_model
from test_training import records, run

import agml.logprobs as logprobs
from agml import answer_cache
from agml.data import collate
from agml.errors import InputError
from agml.logprobs import (
    KL_CHUNK_TOKENS,
    _kl_sum,
    base_answer_logits,
    base_answer_states,
    kl_and_base_logprobs,
    left_padded_batches,
    states_answer_logits,
)
from agml.objectives import make_objective

EXAMPLES = FORGET + RETAIN


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_states_give_the_base_answer_logits_exactly(arch, padding_side):
    model = peft_model(arch)
    batches = [collate(EXAMPLES[:3], 0, padding_side), collate(EXAMPLES[3:], 0, padding_side)]
    states = base_answer_states(model, batches)
    assert states is not None and len(states) == 2
    for batch, batch_states in zip(batches, states, strict=True):
        expected, got = base_answer_logits(model, batch), states_answer_logits(model, batch, batch_states)
        assert batch_states.shape == (expected.logits.shape[0], model.config.hidden_size)
        assert torch.equal(got.logits, expected.logits)
        assert torch.equal(got.targets, expected.targets) and torch.equal(got.rows, expected.rows)
    # The adapter changes the model's logits but not the base's, so the states are the base's.
    with_adapter = logprobs.answer_logits(model, batches[0]).logits
    assert not torch.equal(with_adapter, base_answer_logits(model, batches[0]).logits)


def test_states_of_the_wrong_batch_are_refused():
    model = peft_model()
    states = base_answer_states(model, [collate(EXAMPLES[:1], 0)])
    with pytest.raises(InputError, match="answer tokens"):
        states_answer_logits(model, collate(EXAMPLES[2:], 0), states[0])


def test_a_model_that_changes_its_heads_output_has_no_states():
    model = peft_model()

    def soft_cap(module, args, kwargs, output):  # as Gemma 2's final logit soft-capping does
        output.logits = 30.0 * torch.tanh(output.logits / 30.0)
        return output

    model.get_base_model().register_forward_hook(soft_cap, with_kwargs=True)
    assert base_answer_states(model, [collate(EXAMPLES, 0)]) is None


def test_retain_kl_from_states_equals_the_kl_with_a_base_pass():
    model = peft_model()
    examples = EXAMPLES * 3
    batches = [batch for _, batch in left_padded_batches(examples, 0, 4, None)]
    plain = kl_and_base_logprobs(model, examples, 0, batch_size=4)
    from_states = kl_and_base_logprobs(model, examples, 0, batch_size=4, base_states=base_answer_states(model, batches))
    assert plain.kl > 0
    assert from_states.kl == plain.kl
    assert from_states.base_totals == plain.base_totals and from_states.counts == plain.counts


def test_the_kl_sum_in_slices_is_the_whole_sum():
    generator = torch.Generator().manual_seed(0)
    base = torch.log_softmax(torch.randn(2 * KL_CHUNK_TOKENS + 7, 50, generator=generator), -1)
    current = torch.log_softmax(torch.randn(base.shape, generator=generator), -1)
    whole = float((base.exp() * (base - current)).sum())
    assert _kl_sum(base, current) == pytest.approx(whole, rel=1e-5)


def test_states_are_cached_and_a_file_that_does_not_match_is_a_miss(monkeypatch):
    model = peft_model()
    batches = [collate(EXAMPLES[:2], 0), collate(EXAMPLES[2:], 0)]
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return base_answer_states(*args, **kwargs)

    monkeypatch.setattr(logprobs, "base_answer_states", counted)
    assert answer_cache.cached_base_answer_states(None, "t", model, batches) is None  # cache off: no states
    first = answer_cache.cached_base_answer_states("fp-states", "t", model, batches)
    again = answer_cache.cached_base_answer_states("fp-states", "t", model, batches)
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = [collate(EXAMPLES[:1], 0)]
    answer_cache.cached_base_answer_states("fp-states", "t", model, other)
    assert len(calls) == 2  # other batches, other key
    path = answer_cache._entry_path("fp-states", "t", [[b[k].tolist() for k in ("input_ids", "attention_mask",
                                                                                 "labels")] for b in batches],
                                    ".safetensors")
    answer_cache._save_states([first[0][:1], first[1]], path)  # a stale file of the same key
    redone = answer_cache.cached_base_answer_states("fp-states", "t", model, batches)
    assert len(calls) == 3 and all(torch.equal(a, b) for a, b in zip(first, redone, strict=True))


def test_a_model_without_states_is_not_cached(monkeypatch):
    model = peft_model()
    monkeypatch.setattr(logprobs, "base_answer_states", lambda *args, **kwargs: None)
    assert answer_cache.cached_base_answer_states("fp-none", "t", model, [collate(EXAMPLES, 0)]) is None
    assert not list((answer_cache.answer_cache_dir() / "fp-none").glob("*"))


def test_training_with_cached_states_trains_the_same_adapter_bitwise(smol_tokenizer, monkeypatch):
    calls = []
    original = logprobs.base_answer_states
    monkeypatch.setattr(logprobs, "base_answer_states", lambda *a, **k: calls.append(1) or original(*a, **k))
    options = dict(steps=4, seed=3, objective="forget-targets", early_stop=False, val_fraction=0.0)
    retain = records("retain", 6)
    plain, plain_result = run(smol_tokenizer, retain=retain, **options)
    assert not calls  # no fingerprint: the base pass runs inside each step
    adapters = []
    for _ in range(2):  # the first run computes and stores the states, the second reads them
        model, result = run(smol_tokenizer, retain=retain, fingerprint="fp-train", **options)
        adapters.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
        assert [h["loss"] for h in result.history] == [h["loss"] for h in plain_result.history]
    assert len(calls) == 1
    expected = {n: p for n, p in plain.named_parameters() if "lora_" in n}
    assert all(torch.equal(expected[n], a[n]) and torch.equal(expected[n], b[n])
               for a, b in [adapters] for n in expected)


def test_the_representation_term_runs_its_own_base_pass():
    assert make_objective("forget-targets").reads_retain_base_states
    assert not make_objective("forget-targets", rmu_weight=0.3, concept_token_ids=[[5]]).reads_retain_base_states


def test_no_states_without_batches():
    assert base_answer_states(peft_model(), []) is None
