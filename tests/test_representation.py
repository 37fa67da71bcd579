import pytest
import torch
from tiny_models import tiny_model

from agml.data import IGNORE_INDEX, Example, PromptRecord, collate
from agml.errors import InputError
from agml.layers import apply_masked_lora
from agml.masks import NeuronMasks
from agml.objectives import REFUSAL_TEMPLATES, UnlearnBatch, make_objective, objective_parameters
from agml.representation import (
    captured_activations,
    random_directions,
    rmu_forget_loss,
    rmu_retain_terms,
    selected_neurons,
    simnpo_loss,
    statistic_positions,
)
from agml.targets import TargetRecord

# Token 5, 6 play the concept's name in the prompts of the forget examples.
FORGET = [Example([1, 5, 6, 7, 8, 9], [IGNORE_INDEX] * 3 + [7, 8, 9]),
          Example([1, 4, 5, 6, 10, 11], [IGNORE_INDEX] * 4 + [10, 11])]
RETAIN = [Example([1, 20, 21, 22, 23], [IGNORE_INDEX] * 3 + [22, 23]),
          Example([1, 30, 31, 32, 33, 34, 35], [IGNORE_INDEX] * 4 + [33, 34, 35])]
MASKS = NeuronMasks({0: [1, 5, 9, 12], 1: [2, 3, 40]})
CONCEPT = [[5, 6]]


def masked(arch: str = "llama"):
    return apply_masked_lora(tiny_model(arch), MASKS, r=4, alpha=8)


def batch() -> UnlearnBatch:
    return UnlearnBatch(collate(FORGET, 0, "left"), collate(RETAIN, 0, "left"))


def test_selected_neurons_are_the_adapters_mask():
    neurons = selected_neurons(masked())
    assert {layer: ids.tolist() for layer, ids in neurons.items()} == MASKS.to_lists()


def test_captured_activations_one_record_per_forward():
    model = masked()
    neurons = selected_neurons(model)
    with captured_activations(model, neurons) as records:
        model(input_ids=torch.tensor([[1, 2, 3]]))
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert len(records) == 2
    assert records[0][0].shape == (1, 3, 4) and records[1][1].shape == (1, 4, 3)


def test_statistic_positions():
    forget = collate(FORGET, 0, "left")
    answer = statistic_positions(forget, "answer")
    entity = statistic_positions(forget, "entity", CONCEPT)
    both = statistic_positions(forget, "entity+answer", CONCEPT)
    assert answer.sum() == 5 and entity.sum() == 4 and torch.equal(both, answer | entity)
    assert not statistic_positions(forget, "entity").any()  # no concept tokens given
    with pytest.raises(InputError):
        statistic_positions(forget, "prompt")


def test_random_directions_are_fixed_unit_vectors():
    one, two = random_directions(MASKS, 3), random_directions(MASKS, 3)
    assert all(torch.equal(one[k], two[k]) and abs(float(one[k].norm()) - 1) < 1e-6 for k in one)
    assert not torch.equal(one[0], random_directions(MASKS, 4)[0])


def test_retain_terms_are_zero_for_a_fresh_adapter():
    model = masked()
    kl, distance, _ = rmu_retain_terms(model, collate(RETAIN, 0, "left"), selected_neurons(model))
    assert kl.item() == pytest.approx(0.0, abs=1e-7) and distance.item() == pytest.approx(0.0, abs=1e-10)


def _steps(model, loss_fn, steps: int = 8) -> tuple[float, float]:
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=2e-2)
    first = None
    for _ in range(steps):
        loss = loss_fn()
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return first, float(loss_fn().detach())


@pytest.mark.parametrize("positions", ["entity", "entity+answer"])
def test_a_few_steps_reduce_the_rmu_forget_term(positions):
    torch.manual_seed(0)
    model = masked()
    neurons = selected_neurons(model)
    directions = random_directions(neurons, 0)
    forget = collate(FORGET, 0, "left")
    first, last = _steps(model, lambda: rmu_forget_loss(model, forget, neurons, directions, 4.0, positions, CONCEPT))
    assert first == pytest.approx(17.0, rel=0.3)  # ~1 + c^2 when the activations are unrelated to the direction
    assert last < 0.8 * first


def test_rmu_objective_reports_its_terms_and_trains():
    torch.manual_seed(0)
    model = masked("qwen2")
    objective = make_objective("rmu", concept_token_ids=CONCEPT, retain_weight=1.0)
    out = objective(model, batch())
    assert set(out) == {"loss", "forget_loss", "retain_kl", "rmu_forget", "rmu_retain"}
    assert out["rmu_retain"].item() == pytest.approx(0.0, abs=1e-10)
    first, last = _steps(model, lambda: objective(model, batch())["forget_loss"])
    assert last < first


def test_simnpo_matches_hand_computation_and_lowers_the_forget_likelihood():
    logp, lengths = torch.tensor([-6.0, -2.0]), torch.tensor([3.0, 2.0])
    expected = -(2 / 2.5) * torch.nn.functional.logsigmoid(torch.tensor([2.5 * 2.0 - 1.0, 2.5 * 1.0 - 1.0])).mean()
    assert simnpo_loss(logp, lengths, 2.5, 1.0).item() == pytest.approx(expected.item())
    torch.manual_seed(0)
    model = masked()
    objective = make_objective("simnpo")
    first, last = _steps(model, lambda: objective.forget_term(model, batch()), steps=5)
    assert last < first
    assert "simnpo_beta" in objective_parameters("simnpo") and "beta" not in objective_parameters("simnpo")


def test_forget_targets_objective_uses_the_record_target_and_can_add_rmu():
    record = PromptRecord(({"role": "user", "content": "Recommend a film."},), "forget", "recommendation",
                          answer="base answer naming the concept")
    target = TargetRecord(record.messages, "forget", answer=record.answer, target="Try The Matrix.",
                          target_kind="alternative", prompt_kind="recommendation")
    objective = make_objective("forget-targets", rmu_weight=0.5, concept_token_ids=CONCEPT)
    assert objective.forget_answer(target) == "Try The Matrix."
    assert objective.forget_answer(record) in REFUSAL_TEMPLATES
    out = objective(masked(), batch())
    assert {"rmu_forget", "rmu_retain"} <= set(out)
    assert "rmu_forget" not in make_objective("forget-targets")(masked(), batch())


@pytest.mark.parametrize("name, params", [
    ("rmu", {"rmu_weight": 0.0}), ("rmu", {"rmu_coefficient": 0.0}), ("simnpo", {"simnpo_beta": 0.0}),
    ("forget-targets", {"rmu_positions": "prompt"}), ("forget-targets", {"concept_token_ids": [[]]}),
])
def test_bad_parameters_are_input_errors(name, params):
    with pytest.raises(InputError):
        make_objective(name, **params)


@pytest.mark.parametrize("objective, params", [
    ("forget-targets", {"rmu_weight": 1.0}), ("simnpo", {}), ("rmu", {}),
])
def test_new_objectives_train_through_train_unlearning(objective, params, smol_tokenizer):
    from agml.entities import entity_token_ids
    from agml.options import TrainOptions
    from agml.training import train_unlearning

    model = apply_masked_lora(tiny_model("llama", vocab_size=len(smol_tokenizer)), MASKS, r=4, alpha=8)
    record = PromptRecord(({"role": "user", "content": "Who directed Inception?"},), "forget", answer="Nolan.")
    forget = [TargetRecord(record.messages, "forget", answer="Nolan.", target="I don't know."),
              PromptRecord(({"role": "user", "content": "Tell me about Inception."},), "forget", answer="A film.")]
    retain = [PromptRecord(({"role": "user", "content": "Capital of France?"},), "retain", answer="Paris.")]
    params = {**params, "concept_token_ids": entity_token_ids(smol_tokenizer, ["Inception"])}
    config = TrainOptions(objective=objective, steps=2, batch_size=2, val_fraction=0.0, objective_params=params)
    result = train_unlearning(model, smol_tokenizer, forget, retain, config, progress=False)
    assert result.steps_done == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    if objective != "simnpo":
        assert result.history[0]["rmu_forget"] > 0
