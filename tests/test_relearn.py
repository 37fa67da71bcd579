import pytest
import torch
from test_evaluation import peft_tiny, record

from agml.errors import InputError
from agml.relearn import attack_slice, relearn_attack

FORGET = [
    record(prompt=f"Tell me about the film number {i}.", type="forget", forbidden=["inception"],
           answer=f"Film {i} is Inception, a dream heist by Nolan.")
    for i in range(6)
]
PROBES = [
    record(prompt="What is Inception?", type="forget", category="direct", forbidden=["inception"]),
    record(prompt="Name the dream heist film.", type="forget", category="cloze", forbidden=["inception"]),
    record(prompt="Who directed Memento?", type="retain", required=["nolan"]),
]


def test_attack_slice_is_seeded_and_skips_probes_and_unanswered_records():
    probe_twin = FORGET[0]
    unanswered = record(prompt="No answer here.", type="forget", forbidden=["inception"])
    pool = [*FORGET, unanswered]
    chosen = attack_slice(pool, [*PROBES, probe_twin], n_examples=3, seed=1)
    assert len(chosen) == 3 and probe_twin not in chosen and unanswered not in chosen
    assert chosen == attack_slice(pool, [*PROBES, probe_twin], n_examples=3, seed=1)
    assert len(attack_slice(pool, PROBES, n_examples=50, seed=0)) == len(FORGET)
    with pytest.raises(InputError, match="forget records with answers"):
        attack_slice([unanswered], PROBES, n_examples=3, seed=0)


def test_relearn_attack_rejects_bad_arguments(smol_tokenizer):
    model = peft_tiny(randomise=True)
    with pytest.raises(InputError, match="steps"):
        relearn_attack(model, smol_tokenizer, FORGET, PROBES, steps=0)
    with pytest.raises(InputError, match="forget probes"):
        relearn_attack(model, smol_tokenizer, FORGET, PROBES[2:], steps=1)


def test_relearn_attack_trains_copies_and_reports_pass_rates(smol_tokenizer):
    model = peft_tiny(randomise=True)
    original = {name: param.clone() for name, param in model.state_dict().items()}
    result = relearn_attack(
        model, smol_tokenizer, FORGET, PROBES, steps=8, lr=1e-2, n_examples=4, batch_size=2,
        max_new_tokens=4, progress=False,
    )
    assert set(result["forget_pass"]) == {
        "unlearned_before_attack", "unlearned_after_attack", "base_before_attack", "base_after_attack"
    }
    assert all(0.0 <= rate <= 1.0 for rate in result["forget_pass"].values())
    assert (result["steps"], result["examples"], result["lr"], result["probes"]) == (8, 4, 1e-2, 2)
    for name in ("unlearned", "base"):
        losses = result["losses"][name]
        assert len(losses) == 8
        # Each batch is seen every other step: the attack must lower the NLL of the attack answers.
        assert losses[-2] < losses[0] and losses[-1] < losses[1]
    # The unlearned and the base copies differ, so the same attack starts from different losses.
    assert result["losses"]["unlearned"][0] != pytest.approx(result["losses"]["base"][0])
    after = model.state_dict()
    assert set(after) == set(original)
    assert all(torch.equal(after[name], value) for name, value in original.items())


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
