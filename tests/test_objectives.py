import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_model

from agml.data import IGNORE_INDEX, Example, PromptRecord, collate
from agml.errors import InputError
from agml.judges import REFUSAL_PATTERNS, is_refusal, refusal_match
from agml.objectives import (
    OBJECTIVES,
    REFUSAL_TEMPLATES,
    REFUSALS_BY_LANGUAGE,
    UnlearnBatch,
    answer_logits,
    make_objective,
    refusal_for,
    sequence_logprobs,
)

TARGETS = ["gate_proj", "up_proj", "down_proj"]
FORGET = [Example([1, 5, 6, 7, 8, 9], [IGNORE_INDEX] * 3 + [7, 8, 9]),
          Example([1, 5, 6, 10, 11], [IGNORE_INDEX] * 3 + [11, 2])]
RETAIN = [Example([1, 20, 21, 22, 23], [IGNORE_INDEX] * 3 + [22, 23]),
          Example([1, 30, 31, 32, 33, 34, 35], [IGNORE_INDEX] * 4 + [33, 34, 35])]


def peft_model(arch: str = "llama", perturb: bool = True):
    """A tiny model with a LoRA adapter; `perturb` makes the adapter a non-no-op (lora_B is zero at init)."""
    model = get_peft_model(tiny_model(arch), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    if perturb:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def full_logits(model, batch, base: bool) -> torch.Tensor:
    """Plain forward over every position (no answer selection), as an independent hand computation."""
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=position_ids)
    with torch.no_grad():
        if base:
            with model.disable_adapter():
                return model(**kwargs).logits.float()
        return model(**kwargs).logits.float()


def hand_token_logps(model, batch, base: bool) -> list[list[float]]:
    """log p(answer token) per row, computed token by token from full logits."""
    logits = full_logits(model, batch, base)
    rows = []
    for b in range(logits.shape[0]):
        labels = batch["labels"][b]
        rows.append([float(torch.log_softmax(logits[b, t - 1], -1)[labels[t]])
                     for t in range(1, labels.shape[0]) if labels[t] != IGNORE_INDEX])
    return rows


def hand_kl(model, batch) -> float:
    base, current = full_logits(model, batch, base=True), full_logits(model, batch, base=False)
    values = []
    for b in range(base.shape[0]):
        for t in range(1, batch["labels"].shape[1]):
            if batch["labels"][b, t] != IGNORE_INDEX:
                p_log, q_log = torch.log_softmax(base[b, t - 1], -1), torch.log_softmax(current[b, t - 1], -1)
                values.append(float((p_log.exp() * (p_log - q_log)).sum()))
    return sum(values) / len(values)


@pytest.mark.parametrize("side", ["left", "right"])
def test_answer_logits_select_the_positions_that_predict_answers(arch, side):
    model = peft_model(arch)
    batch = collate(FORGET, pad_id=0, padding_side=side)
    out = answer_logits(model, batch)
    flat = [v for row in hand_token_logps(model, batch, base=False) for v in row]
    assert out.targets.tolist() == [7, 8, 9, 11, 2]
    assert out.rows.tolist() == [0, 0, 0, 1, 1]
    torch.testing.assert_close(out.token_logprobs().detach(), torch.tensor(flat), atol=1e-5, rtol=1e-5)


def test_answer_logits_agree_between_padding_sides():
    model = peft_model()
    left = sequence_logprobs(model, collate(FORGET, 0, "left"))
    right = sequence_logprobs(model, collate(FORGET, 0, "right"))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)


def test_npo_matches_hand_computation():
    model, beta = peft_model(), 0.3
    forget, retain = collate(FORGET, 0, "left"), collate(RETAIN, 0, "left")
    out = make_objective("npo", beta=beta, retain_weight=0.7)(model, UnlearnBatch(forget, retain))
    logp = torch.tensor([sum(r) for r in hand_token_logps(model, forget, base=False)])
    ref = torch.tensor([sum(r) for r in hand_token_logps(model, forget, base=True)])
    expected_forget = -(2 / beta) * torch.stack([F.logsigmoid(-beta * d) for d in logp - ref]).mean()
    assert out["forget_loss"].item() == pytest.approx(float(expected_forget), rel=1e-5)
    assert out["retain_kl"].item() == pytest.approx(hand_kl(model, retain), rel=1e-4)
    assert out["loss"].item() == pytest.approx(float(expected_forget) + 0.7 * hand_kl(model, retain), rel=1e-5)


def test_npo_uses_a_given_reference_instead_of_recomputing():
    model, beta = peft_model(), 0.1
    forget, retain = collate(FORGET, 0, "left"), collate(RETAIN, 0, "left")
    logp = torch.tensor([sum(r) for r in hand_token_logps(model, forget, base=False)])
    reference = logp + torch.tensor([2.0, -1.0])  # arbitrary reference: the loss must follow it
    out = make_objective("npo", beta=beta)(model, UnlearnBatch(forget, retain, reference))
    expected = -(2 / beta) * F.logsigmoid(-beta * torch.tensor([-2.0, 1.0])).mean()
    assert out["forget_loss"].item() == pytest.approx(float(expected), rel=1e-4)


def test_refusal_is_mean_token_nll():
    model = peft_model()
    forget, retain = collate(FORGET, 0, "right"), collate(RETAIN, 0, "right")
    out = make_objective("refusal", retain_weight=2.0)(model, UnlearnBatch(forget, retain))
    tokens = [v for row in hand_token_logps(model, forget, base=False) for v in row]
    assert out["forget_loss"].item() == pytest.approx(-sum(tokens) / len(tokens), rel=1e-5)
    assert out["loss"].item() == pytest.approx(-sum(tokens) / len(tokens) + 2.0 * hand_kl(model, retain), rel=1e-5)


def test_gradient_difference_is_bounded_ascent_plus_retain_descent():
    model, bound = peft_model(), 4.8
    forget, retain = collate(FORGET, 0, "left"), collate(RETAIN, 0, "left")
    objective = make_objective("gradient-difference", nll_bound=bound, retain_weight=0.5, retain_nll_weight=0.25)
    out = objective(model, UnlearnBatch(forget, retain))
    forget_nll = [-v for row in hand_token_logps(model, forget, base=False) for v in row]
    retain_nll = [-v for row in hand_token_logps(model, retain, base=False) for v in row]
    assert min(forget_nll) < bound < max(forget_nll)  # the bound really clips some tokens here
    expected_forget = -sum(min(v, bound) for v in forget_nll) / len(forget_nll)
    expected_retain_nll = sum(retain_nll) / len(retain_nll)
    assert out["forget_loss"].item() == pytest.approx(expected_forget, rel=1e-5)
    assert out["retain_nll"].item() == pytest.approx(expected_retain_nll, rel=1e-5)
    expected = expected_forget + 0.5 * hand_kl(model, retain) + 0.25 * expected_retain_nll
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_gradient_difference_gives_no_gradient_past_the_bound():
    model = peft_model()
    forget, retain = collate(FORGET, 0, "left"), collate(RETAIN, 0, "left")
    objective = make_objective("gradient-difference", nll_bound=1e-3, retain_weight=0.0, retain_nll_weight=0.0)
    objective(model, UnlearnBatch(forget, retain))["loss"].backward()
    assert all(p.grad is None or not p.grad.any() for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_retain_kl_is_zero_for_a_fresh_adapter_and_uses_the_disabled_adapter(name, monkeypatch):
    model = peft_model(perturb=False)
    calls = []
    original = type(model).disable_adapter

    def counting(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(type(model), "disable_adapter", counting)
    batch = UnlearnBatch(collate(FORGET, 0, "left"), collate(RETAIN, 0, "left"))
    out = make_objective(name)(model, batch)
    assert out["retain_kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert calls and all(c is model for c in calls)  # the base logits came from this very model


def test_retain_kl_grows_when_the_adapter_changes_the_model():
    model = peft_model(perturb=True)
    out = make_objective("refusal")(model, UnlearnBatch(collate(FORGET, 0), collate(RETAIN, 0)))
    assert out["retain_kl"].item() > 1e-3


def test_npo_gradient_lowers_forget_logprob():
    model = peft_model(perturb=False)
    forget, retain = collate(FORGET, 0, "left"), collate(RETAIN, 0, "left")
    before = sequence_logprobs(model, forget).detach()
    loss = make_objective("npo", retain_weight=0.0)(model, UnlearnBatch(forget, retain))["loss"]
    loss.backward()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and param.grad is not None:
                param -= 0.05 * param.grad
    after = sequence_logprobs(model, forget).detach()
    assert (after < before - 1e-3).all()


def test_objectives_need_a_peft_model():
    with pytest.raises(InputError, match="PEFT"):
        make_objective("npo")(tiny_model("llama"), UnlearnBatch(collate(FORGET, 0), collate(RETAIN, 0)))


def test_unknown_objective_lists_the_choices():
    with pytest.raises(InputError, match="gradient-difference.*npo.*refusal"):
        make_objective("ascent")


@pytest.mark.parametrize("name, params, match", [
    ("npo", {"nll_bound": 2.0}, "nll_bound"),
    ("npo", {"beta": 0.0}, "beta"),
    ("refusal", {"retain_weight": -1.0}, "retain_weight"),
    ("gradient-difference", {"nll_bound": -1.0}, "nll_bound"),
])
def test_bad_objective_parameters_are_input_errors(name, params, match):
    with pytest.raises(InputError, match=match):
        make_objective(name, **params)


def _record(text: str, answer: str | None = "The base answer.") -> PromptRecord:
    return PromptRecord(({"role": "user", "content": text},), "forget", answer=answer)


def test_refusals_are_varied_deterministic_and_replace_the_answer():
    assert len(set(REFUSAL_TEMPLATES)) >= 12
    records = [_record(f"Tell me about film number {i}.") for i in range(60)]
    chosen = [refusal_for(r, seed=0) for r in records]
    assert len(set(chosen)) >= 8
    assert chosen == [refusal_for(r, seed=0) for r in records]
    assert chosen != [refusal_for(r, seed=1) for r in records]
    objective = make_objective("refusal", seed=0)
    assert [objective.forget_answer(r) for r in records] == chosen


def _french(i: int) -> PromptRecord:
    return PromptRecord(({"role": "user", "content": f"Parle-moi du film numéro {i}."},), "forget", language="fr")


def test_every_refusal_template_is_judged_a_refusal():
    # The judges must recognise the refusals agml itself trains toward, or refusal rates under-count.
    assert set(REFUSALS_BY_LANGUAGE) == set(REFUSAL_PATTERNS)
    for language, templates in REFUSALS_BY_LANGUAGE.items():
        assert len(set(templates)) >= 6, language
        assert all(is_refusal(t) for t in templates), [t for t in templates if not refusal_match(t)]


def test_refusals_are_english_by_default_and_in_the_prompt_language_on_request():
    records = [_french(i) for i in range(30)]
    assert {refusal_for(r, 0) for r in records} <= set(REFUSAL_TEMPLATES)
    chosen = [refusal_for(r, 0, "prompt") for r in records]
    assert set(chosen) <= set(REFUSALS_BY_LANGUAGE["fr"]) and len(set(chosen)) >= 4
    english = _record("Tell me about film number 3.")
    assert refusal_for(english, 0, "prompt") == refusal_for(english, 0)
    unknown = PromptRecord(english.messages, "forget", language="nl")  # no Dutch templates: English
    assert refusal_for(unknown, 0, "prompt") == refusal_for(english, 0)
    for name in ("refusal", "forget-targets"):
        assert make_objective(name).forget_answer(records[0]) in REFUSAL_TEMPLATES
        assert make_objective(name, refusal_language="prompt").forget_answer(records[0]) == chosen[0]
    with pytest.raises(InputError, match="refusal_language"):
        make_objective("refusal", refusal_language="fr")
    with pytest.raises(InputError, match="refusal_language"):
        refusal_for(records[0], 0, "french")


def test_forget_answer_is_required_for_answer_based_objectives():
    with pytest.raises(InputError, match="no answer"):
        make_objective("npo").forget_answer(_record("What is Inception?", answer=None))
    assert make_objective("refusal").forget_answer(_record("What is Inception?", answer=None)) in REFUSAL_TEMPLATES
