import pytest
import torch
from tiny_models import tiny_model

from agml.errors import InputError
from agml.generation import greedy_answers, sampled_answers

CONVERSATIONS = [
    [{"role": "user", "content": "What is Inception?"}],
    [{"role": "user", "content": "Name a film."}],
    [{"role": "user", "content": "Hello there, how are you today?"}],
]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=49152)


def test_sampled_answers_are_seeded_and_leave_the_global_random_state_alone(model, smol_tokenizer):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = sampled_answers(model, smol_tokenizer, CONVERSATIONS, n=3, seed=7, max_new_tokens=6, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(first) == 3 and all(len(samples) == 3 for samples in first)
    assert first == sampled_answers(model, smol_tokenizer, CONVERSATIONS, n=3, seed=7, max_new_tokens=6, batch_size=2)
    other = sampled_answers(model, smol_tokenizer, CONVERSATIONS, n=3, seed=8, max_new_tokens=6, batch_size=2)
    assert other != first
    # A random model at temperature 0.7 over 49k tokens: the samples of one prompt differ from each other.
    assert len(set(first[0])) > 1


def test_greedy_answers_are_one_deterministic_answer_each(model, smol_tokenizer):
    answers = greedy_answers(model, smol_tokenizer, CONVERSATIONS, max_new_tokens=5, batch_size=2)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert answers == greedy_answers(model, smol_tokenizer, CONVERSATIONS[::-1], max_new_tokens=5, batch_size=2)[::-1]


def test_sampled_answers_reject_bad_arguments(model, smol_tokenizer):
    with pytest.raises(InputError, match="samples"):
        sampled_answers(model, smol_tokenizer, CONVERSATIONS, n=0)
    with pytest.raises(InputError, match="temperature"):
        sampled_answers(model, smol_tokenizer, CONVERSATIONS, temperature=0.0)
