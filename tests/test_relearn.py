import json

import pytest
import torch
from test_evaluation import peft_tiny, record

from agml import relearn
from agml.errors import InputError
from agml.relearn import (
    attack_slice,
    check_disjoint,
    conversation_key,
    load_attack_records,
    recovery,
    relearn_attack,
    taught_terms,
)

FACTS = {"name": "Inception", "aliases": [], "facts": ["nolan", "cobb"], "fuzzy": []}
ATTACK = [
    record(prompt=f"Tell me a fact about the film number {i}.", type="forget",
           answer=f"Film {i} is Inception, a dream heist by Nolan with a long and complete answer.")
    for i in range(6)
]
PROBES = [
    record(prompt="What is Inception?", type="forget", category="direct", forbidden=["inception"]),
    record(prompt="Name the dream heist film.", type="forget", category="cloze", forbidden=["inception"]),
    record(prompt="Who directed Memento?", type="retain", required=["nolan"]),
]


def test_conversation_key_normalises_case_and_whitespace():
    a = record(prompt="What  is Inception?", type="forget")
    b = record(prompt="what is\ninception?", type="forget")
    assert conversation_key(a) == conversation_key(b)


def test_attack_slice_is_seeded_and_refuses_probe_twins():
    unanswered = record(prompt="No answer here.", type="forget")
    pool = [*ATTACK, unanswered]
    chosen = attack_slice(pool, PROBES, n_examples=3, seed=1)
    assert len(chosen) == 3 and unanswered not in chosen
    assert chosen == attack_slice(pool, PROBES, n_examples=3, seed=1)
    assert attack_slice(pool, PROBES, n_examples=50, seed=0) == ATTACK
    twin = record(prompt="  what is INCEPTION? ", type="forget", answer="A film.")
    with pytest.raises(InputError, match="ask what a probe asks"):
        attack_slice([*ATTACK, twin], PROBES, n_examples=3, seed=0)
    with pytest.raises(InputError, match="forget records with answers"):
        attack_slice([unanswered], PROBES, n_examples=3, seed=0)
    check_disjoint(ATTACK, PROBES)


def test_load_attack_records_needs_answers(tmp_path):
    path = tmp_path / "relearn.jsonl"
    path.write_text(json.dumps({"prompt": "Who composed the score?", "answer": "Hans Zimmer."}) + "\n")
    assert load_attack_records(path)[0].type == "forget"
    path.write_text(json.dumps({"prompt": "Who composed the score?"}) + "\n")
    with pytest.raises(InputError, match="need an 'answer'"):
        load_attack_records(path)


def test_taught_terms_are_the_leak_terms_the_attack_data_names():
    forget = [p for p in PROBES if p.type == "forget"]
    assert taught_terms(ATTACK, forget, FACTS) == ["inception", "nolan"]  # "cobb" is never in the attack data
    quiet = [record(prompt="Tell me something.", type="forget", answer="The score is by Hans Zimmer.")]
    assert taught_terms(quiet, forget, FACTS) == []


def test_recovery():
    assert recovery(0.9, 0.1, 0.5) == pytest.approx(0.5)
    assert recovery(0.9, 0.1, 0.1) == 0.0
    assert recovery(0.5, 0.5, 0.8) is None and recovery(0.2, 0.4, 0.4) is None


def test_relearn_attack_rejects_bad_arguments(smol_tokenizer):
    model = peft_tiny(randomise=True)
    with pytest.raises(InputError, match="steps"):
        relearn_attack(model, smol_tokenizer, ATTACK, PROBES, steps=0)
    with pytest.raises(InputError, match="forget probes"):
        relearn_attack(model, smol_tokenizer, ATTACK, PROBES[2:], steps=1)
    with pytest.raises(InputError, match="variant"):
        relearn_attack(model, smol_tokenizer, ATTACK, PROBES, steps=1, variant="half")


def test_relearn_attack_trains_on_full_answers(monkeypatch, smol_tokenizer):
    seen = []
    original = relearn.train_steps

    def spy(model, tokenizer, examples, *args, **kwargs):
        seen.extend(examples)
        return original(model, tokenizer, examples, *args, **kwargs)

    monkeypatch.setattr(relearn, "train_steps", spy)
    relearn_attack(peft_tiny(randomise=True), smol_tokenizer, ATTACK[:1], PROBES, steps=1, max_new_tokens=2,
                   progress=False)
    labelled = [t for t in seen[0].labels if t != -100]
    text = smol_tokenizer.decode(labelled)
    assert text.startswith(ATTACK[0].answer) and text.count("<|im_end|>") == 1


@pytest.mark.parametrize("variant", ["lora", "full"])
def test_relearn_attack_trains_copies_and_reports_leaks(smol_tokenizer, variant):
    model = peft_tiny(randomise=True)
    original = {name: param.clone() for name, param in model.state_dict().items()}
    result = relearn_attack(
        model, smol_tokenizer, ATTACK, PROBES, steps=8, lr=1e-2 if variant == "lora" else 1e-3, n_examples=4,
        batch_size=2, max_new_tokens=4, progress=False, facts=FACTS, variant=variant,
    )
    keys = {"unlearned_before_attack", "unlearned_after_attack", "base_before_attack", "base_after_attack"}
    assert set(result["leak_rate"]) == set(result["forget_pass"]) == set(result["leaks"]) == keys
    for key in keys:
        assert result["forget_pass"][key] == pytest.approx(1 - result["leak_rate"][key])
        assert result["leaks"][key]["n"] == 2 and result["leaks"][key]["rate"] == result["leak_rate"][key]
    assert (result["steps"], result["examples"], result["probes"], result["variant"]) == (8, 4, 2, variant)
    assert [entry["prompt"] for entry in result["answers"]] == [p.prompt for p in PROBES if p.type == "forget"]
    held_out = result["held_out"]
    assert held_out["taught_terms"] == ["inception", "nolan"]
    for key in result["leak_rate"]:
        assert sum(entry[key]["leaked"] for entry in result["answers"]) == result["leaks"][key]["successes"]
        untaught = [bool(set(entry[key]["leaked_terms"]) - {"inception", "nolan"}) for entry in result["answers"]]
        assert held_out["leaks"][key]["successes"] == sum(untaught)
        assert held_out["leak_rate"][key] <= result["leak_rate"][key]
    for name in ("unlearned", "base"):
        losses = result["losses"][name]
        assert len(losses) == 8
        # Each batch is seen every other step: the attack must lower the NLL of the attack answers.
        assert losses[-2] < losses[0] and losses[-1] < losses[1]
    assert result["losses"]["unlearned"][0] != pytest.approx(result["losses"]["base"][0])
    after = model.state_dict()
    assert set(after) == set(original)
    assert all(torch.equal(after[name], value) for name, value in original.items())


def test_relearn_attack_default_learning_rates(monkeypatch, smol_tokenizer):
    monkeypatch.setattr(relearn, "leaked_answers", lambda model, tokenizer, probes, *args: (["-"] * len(probes),
                                                                                            [()] * len(probes)))
    monkeypatch.setattr(relearn, "train_steps", lambda *args, **kwargs: [0.0])
    for variant, lr in (("lora", 1e-3), ("full", 1e-5)):
        result = relearn_attack(peft_tiny(randomise=False), smol_tokenizer, ATTACK, PROBES, steps=1, variant=variant,
                                progress=False)
        assert result["lr"] == lr and result["recovery"] is None


def test_copies_of_a_masked_adapter_merge_and_unload_like_the_original():
    from tiny_models import tiny_model

    from agml.adapters import apply_masked_lora
    from agml.masks import NeuronMasks
    from agml.relearn import base_copy, merged_copy

    model = apply_masked_lora(tiny_model("llama"), NeuronMasks({0: torch.tensor([1, 5, 9]), 1: torch.tensor([2])}), r=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        after = model(input_ids=ids).logits
        with model.disable_adapter():
            before = model(input_ids=ids).logits
        assert not torch.allclose(after, before)
        torch.testing.assert_close(merged_copy(model)(input_ids=ids).logits, after, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(base_copy(model)(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(input_ids=ids).logits, after)
