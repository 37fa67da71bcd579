import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tiny_models import tiny_model

import agml.training as training
from agml.data import PromptRecord, build_example, collate, pad_token_id
from agml.errors import InputError
from agml.objectives import sequence_logprobs
from agml.options import TrainOptions
from agml.training import batch_indices, split_validation, train_unlearning

TARGETS = ["gate_proj", "up_proj", "down_proj"]
FAST = dict(batch_size=2, max_new_tokens_val=4, eval_every=3, checkpoint_every=100)
# The loop settings these tests were written against (the library defaults before `agml unlearn`'s were adopted).
LOOP = dict(objective="npo", steps=60, batch_size=8, kl_weight=1.0, checkpoint_every=20, early_stop=True,
            val_fraction=0.2)


def train_options(**settings) -> TrainOptions:
    return TrainOptions(**{**LOOP, **settings})


def peft_model(seed: int = 0, dropout: float = 0.0):
    """A tiny Llama with the real tokenizer's vocabulary and a fresh LoRA on the MLP (seeded init)."""
    model = tiny_model("llama", vocab_size=49152)
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))


def records(kind: str, n: int, forbidden: tuple[str, ...] = ()) -> list[PromptRecord]:
    if kind == "forget":
        return [PromptRecord(({"role": "user", "content": f"Tell me about the film Zeta {i}."},), "forget",
                             forbidden=forbidden, answer=f"Zeta {i} is a film about dreams within dreams.")
                for i in range(n)]
    return [PromptRecord(({"role": "user", "content": f"What is {i} plus {i}?"},), "retain", answer=f"It is {2 * i}.")
            for i in range(n)]


def adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def run(tokenizer, seed_model: int = 0, dropout: float = 0.0, forget=None, retain=None, **options):
    model = peft_model(seed_model, dropout)
    checkpoint_dir = options.pop("checkpoint_dir", None)
    fingerprint = options.pop("fingerprint", None)
    config = train_options(**{**FAST, **options})
    result = train_unlearning(model, tokenizer, forget or records("forget", 5), retain or records("retain", 5), config,
                              checkpoint_dir=checkpoint_dir, progress=False, fingerprint=fingerprint)
    return model, result


@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("batch_size", 0), ("lr", 0.0), ("lr", -1e-3), ("eval_every", 0), ("checkpoint_every", 0),
    ("val_fraction", 1.0), ("val_fraction", -0.1), ("max_grad_norm", 0.0), ("weight_decay", -1.0),
    ("kl_weight", float("nan")), ("beta", 0.0), ("kl_budget", -0.01), ("seed", -1), ("steps", 2.5),
    ("max_new_tokens_val", 0), ("val_batch_size", 0), ("forget_pass_target", 0.0), ("objective", "ascent"),
    ("shared_fact_kl_weight", -1.0), ("recommendation_targets", "opened"),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(InputError, match=field if field != "objective" else "unknown objective"):
        train_options(**{field: value})


def test_early_stop_needs_held_out_prompts():
    with pytest.raises(InputError, match="val-fraction must be > 0 with --early-stop"):
        train_options(early_stop=True, val_fraction=0.0)
    assert train_options(early_stop=False, val_fraction=0.0).val_fraction == 0.0


def test_objective_params_are_checked_against_the_objective():
    config = train_options(objective="gradient-difference", objective_params={"nll_bound": 3.0})
    assert config.make_objective().nll_bound == 3.0
    with pytest.raises(InputError, match="nll_bound"):
        train_options(objective="npo", objective_params={"nll_bound": 3.0})


def test_batches_cover_every_example_once_per_epoch():
    seen = [i for step in range(5) for i in batch_indices(7, 3, seed=4, stream=0, step=step)]
    assert sorted(seen[:7]) == list(range(7)) and sorted(seen[7:14]) == list(range(7))
    assert seen != [i for step in range(5) for i in batch_indices(7, 3, seed=5, stream=0, step=step)]


def test_validation_split_is_seeded_disjoint_and_leaves_training_data():
    items = records("forget", 10)
    train, val = split_validation(items, 0.2, seed=3, stream=0)
    assert len(val) == 2 and len(train) == 8 and not {r.prompt for r in train} & {r.prompt for r in val}
    assert (train, val) == split_validation(items, 0.2, seed=3, stream=0)
    assert split_validation(items[:1], 0.5, seed=3, stream=0) == (items[:1], [])


def test_inputs_are_checked(smol_tokenizer):
    model = peft_model()
    config = train_options(**FAST, steps=1)
    with pytest.raises(InputError, match="forget and retain"):
        train_unlearning(model, smol_tokenizer, [], records("retain", 2), config, progress=False)
    no_answer = [PromptRecord(({"role": "user", "content": "Hi?"},), "retain")]
    with pytest.raises(InputError, match="no answer"):
        train_unlearning(model, smol_tokenizer, records("forget", 2), no_answer, config, progress=False)
    with pytest.raises(InputError, match="no trainable LoRA"):
        train_unlearning(tiny_model("llama", vocab_size=49152), smol_tokenizer, records("forget", 2),
                         records("retain", 2), config, progress=False)


def test_same_seed_same_adapter_different_seed_different(smol_tokenizer):
    first, result = run(smol_tokenizer, steps=3, seed=0, dropout=0.1)
    again, _ = run(smol_tokenizer, steps=3, seed=0, dropout=0.1)
    other, _ = run(smol_tokenizer, steps=3, seed=1, dropout=0.1)
    a, b, c = adapter(first), adapter(again), adapter(other)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert result.steps_done == 3 and [h["step"] for h in result.history] == [1, 2, 3]
    assert {"loss", "forget_loss", "retain_kl", "lr"} <= set(result.history[0])


def test_resumed_run_matches_an_uninterrupted_run_bitwise(smol_tokenizer, tmp_path):
    # Dropout in the adapter and a validation pass in between: both must leave the trajectory unchanged.
    options = dict(seed=7, dropout=0.1, early_stop=False, checkpoint_every=2)
    straight, _ = run(smol_tokenizer, steps=6, **options)
    first_half, _ = run(smol_tokenizer, steps=3, checkpoint_dir=tmp_path, **options)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 3
    resumed_model = peft_model(0, dropout=0.1)
    result = train_unlearning(resumed_model, smol_tokenizer, records("forget", 5), records("retain", 5),
                              train_options(**{**FAST, "steps": 6, "seed": 7, "early_stop": False,
                                             "checkpoint_every": 2}),
                              checkpoint_dir=tmp_path, resume=True, progress=False)
    expected, got = adapter(straight), adapter(resumed_model)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert any(not torch.equal(expected[n], adapter(first_half)[n]) for n in expected)
    assert result.steps_done == 6 and [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_checkpoint_with_other_options(smol_tokenizer, tmp_path):
    run(smol_tokenizer, steps=1, checkpoint_dir=tmp_path)
    with pytest.raises(InputError, match="lr"):
        train_unlearning(peft_model(), smol_tokenizer, records("forget", 5), records("retain", 5),
                         train_options(**FAST, steps=2, lr=0.5), checkpoint_dir=tmp_path, resume=True, progress=False)


def test_checkpoints_are_safetensors_and_json_only(smol_tokenizer, tmp_path):
    model, _ = run(smol_tokenizer, steps=4, checkpoint_dir=tmp_path, checkpoint_every=2)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["checkpoint-000004.safetensors", "checkpoint.json"]
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    tensors = load_file(str(tmp_path / meta["tensors"]))
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert set(meta["parameters"]) == set(trained)
    assert all(torch.equal(tensors[f"param::{n}"], p.detach()) for n, p in trained.items())
    assert all(f"optim.exp_avg::{n}" in tensors and f"optim.exp_avg_sq::{n}" in tensors for n in trained)
    assert meta["step"] == 4 and len(meta["history"]) == 4


def test_npo_training_lowers_forget_logprob_and_keeps_retain_close(smol_tokenizer):
    forget, retain = records("forget", 4), records("retain", 4)
    model = peft_model()
    pad = pad_token_id(smol_tokenizer)
    forget_batch = collate([build_example(smol_tokenizer, r.messages, r.answer) for r in forget], pad, "left")
    before = sequence_logprobs(model, forget_batch).detach()
    options = train_options(**{**FAST, "steps": 8, "lr": 1e-2, "val_fraction": 0.0, "early_stop": False})
    result = train_unlearning(model, smol_tokenizer, forget, retain, options, progress=False)
    after = sequence_logprobs(model, forget_batch).detach()
    assert (after < before - 1.0).all()
    assert result.history[-1]["forget_loss"] < result.history[0]["forget_loss"]
    assert max(h["retain_kl"] for h in result.history) < 0.05
    assert result.validation is None and not result.stopped_early


def test_early_stop_when_validation_says_forgotten(smol_tokenizer, monkeypatch):
    validated = []

    def clean_answers(model, tokenizer, conversations, **kwargs):
        validated.extend(c[-1]["content"] for c in conversations)
        return ["I don't know that film."] * len(conversations)

    built = []

    def recording_build_example(tokenizer, messages, answer, end_of_turn=True):
        built.append(messages[-1]["content"])
        return build_example(tokenizer, messages, answer, end_of_turn)

    monkeypatch.setattr(training, "greedy_answers", clean_answers)
    monkeypatch.setattr(training, "build_example", recording_build_example)
    _, result = run(smol_tokenizer, steps=9, forget=records("forget", 5, forbidden=("zeta",)))
    assert result.stopped_early and result.steps_done == 3
    assert result.validation["forgotten"] and result.validation["within_budget"]
    assert result.history[-1]["val_forget_pass"] == 1.0
    assert validated and not set(validated) & set(built)  # the validation prompts were never trained on


def test_no_early_stop_while_the_concept_is_still_named(smol_tokenizer, monkeypatch):
    # The judge ignores terms the prompt itself contains (echoing "Zeta" is not recall): name a key fact instead.
    monkeypatch.setattr(training, "greedy_answers",
                        lambda model, tok, convs, **kw: ["Zeta is about dreams within dreams."] * len(convs))
    _, result = run(smol_tokenizer, steps=6, forget=records("forget", 5, forbidden=("zeta", "dreams")))
    assert not result.stopped_early and result.steps_done == 6
    assert result.validation["forget_pass"] == 0.0 and [h.get("val_forget_pass") for h in result.history][2] == 0.0


def test_no_early_stop_when_retain_kl_is_over_budget(smol_tokenizer, monkeypatch):
    monkeypatch.setattr(training, "greedy_answers", lambda model, tok, convs, **kw: ["No idea."] * len(convs))
    _, result = run(smol_tokenizer, steps=6, lr=1e-2, kl_budget=0.0, forget=records("forget", 5, forbidden=("zeta",)))
    assert not result.stopped_early and result.validation["forgotten"] and not result.validation["within_budget"]


def test_prompts_without_forbidden_terms_are_validated_by_logprob_drop(smol_tokenizer):
    # Without forbidden terms the check is the drop of the base answer's log-probability per token.
    _, trained = run(smol_tokenizer, steps=6, lr=2e-2, val_logprob_drop=0.05)
    _, strict = run(smol_tokenizer, steps=6, lr=2e-2, val_logprob_drop=1e6)
    assert trained.validation["forget_pass"] == 1.0 and trained.stopped_early
    assert strict.validation["forget_pass"] == 0.0 and not strict.stopped_early


def test_retain_kl_is_weighted_on_the_tokens_of_shared_facts(smol_tokenizer):
    """`shared_fact_kl_weight`: the retain batch marks the answer tokens that spell a shared fact, and the KL on
    them counts that many times (the mean still divides by every answer token)."""
    from agml.entities import entity_token_ids
    from agml.logprobs import answer_logits, answer_token_weights, base_answer_logits, kl_per_token

    retain = [build_example(smol_tokenizer, ({"role": "user", "content": "Who directed Memento?"},),
                            "Christopher Nolan directed it."),
              build_example(smol_tokenizer, ({"role": "user", "content": "What is 2 plus 2?"},), "It is 4.")]
    shared = entity_token_ids(smol_tokenizer, ["nolan"])
    pad = pad_token_id(smol_tokenizer)
    both = TrainOptions(batch_size=2)  # one step's retain batch holds both examples
    batch = training._Data([], retain, None, pad, shared, 10.0).retain_batch(both, 0)
    weights = answer_token_weights(batch)
    spelled = len(smol_tokenizer(" Nolan", add_special_tokens=False)["input_ids"])
    assert int((weights == 10.0).sum()) == spelled and int((weights == 1.0).sum()) == len(weights) - spelled
    assert "kl_weights" not in training._Data([], retain, None, pad, shared, 1.0).retain_batch(both, 0)
    model = peft_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a changed model, so the KL is not zero
    base, current = base_answer_logits(model, batch), answer_logits(model, batch)
    per_token = torch.stack([kl_per_token(base_row, current_row) for base_row, current_row in (
        (type(base)(base.logits[i:i + 1], base.targets[i:i + 1], base.rows[i:i + 1], 1),
         type(current)(current.logits[i:i + 1], current.targets[i:i + 1], current.rows[i:i + 1], 1))
        for i in range(len(weights)))])
    assert torch.allclose(kl_per_token(base, current, weights), (per_token * weights).mean(), rtol=1e-4)
    assert torch.allclose(kl_per_token(base, current, torch.ones_like(weights)), kl_per_token(base, current),
                          rtol=1e-5)


def test_cut_forget_targets_are_trained_without_end_of_turn(smol_tokenizer, monkeypatch):
    from agml.targets import TargetRecord

    ends = {}

    def recording_build_example(tokenizer, messages, answer, end_of_turn=True):
        ends[answer] = end_of_turn
        return build_example(tokenizer, messages, answer, end_of_turn)

    monkeypatch.setattr(training, "build_example", recording_build_example)
    forget = [TargetRecord(r.messages, r.type, answer=r.answer, target=f"Try Paprika {i}, or",
                           target_kind="alternative", target_complete=i % 2 == 1)
              for i, r in enumerate(records("forget", 4))]
    run(smol_tokenizer, steps=1, forget=forget, objective="forget-targets", early_stop=False, val_fraction=0.0)
    assert {answer: end for answer, end in ends.items() if answer.startswith("Try")} == {
        "Try Paprika 0, or": False, "Try Paprika 1, or": True, "Try Paprika 2, or": False, "Try Paprika 3, or": True}
