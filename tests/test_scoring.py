"""Neuron scoring: a planted concept is recovered; scores equal a hand-computed reference; batching, padding side
and PEFT wrapping do not change them; files round-trip; `agml score` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from agml.data import IGNORE_INDEX, Example, PromptRecord, collate
from agml.errors import InputError
from agml.masks import NeuronMasks, build_masks
from agml.scoring import NeuronScores, _recompute_source, answer_positions, score_neurons, score_records

# --- the planted-concept model ------------------------------------------------------------------------------
# Vocabulary of 64 token ids, residual stream of 128 dims: token k is *read* from dim k (input embedding) and
# *written* to dim 64 + k (unembedding), so no MLP reads what another writes and each neuron's effect is direct.
# Attention output is zeroed (no mixing between positions). A large constant dim keeps RMSNorm's scale steady.
VOCAB, PAD, BOS, EOS, CONST = 64, 0, 1, 2, 63
TRIGGER, ANSWER = 10, 11  # the concept: TRIGGER -> ANSWER
RETAIN_PAIRS = [(20, 21), (22, 23), (24, 25)]  # everything else: other triggers -> other answers
FILLERS = range(30, 62)
INTERMEDIATE, LAYERS = 128, 2
CONCEPT = {0: [5, 40, 77, 120], 1: [3, 50, 64, 101]}  # read TRIGGER, write ANSWER
SHARED = {0: [6, 41, 90, 121], 1: [4, 51, 70, 102]}  # read every answer token, write EOS: matter for both sets
RETAIN_ONLY = {0: [7, 42], 1: [8, 52]}  # read the retain triggers, write the retain answers


def _neurons(groups: dict[int, list[int]]) -> set[tuple[int, int]]:
    return {(layer, n) for layer, ids in groups.items() for n in ids}


def planted_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)  # background neurons keep their random init
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=2 * VOCAB, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    model = LlamaForCausalLM(config).eval()
    eye = torch.eye(2 * VOCAB)
    read, write = eye[:VOCAB], eye[VOCAB:]
    answers = [ANSWER] + [a for _, a in RETAIN_PAIRS]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(4.0 * read + 16.0 * read[CONST])
        model.lm_head.weight.copy_(0.5 * write)
        for layer, block in enumerate(model.model.layers):
            block.self_attn.o_proj.weight.zero_()
            plantings = ((CONCEPT, [TRIGGER], [ANSWER]), (SHARED, answers, [EOS]),
                         (RETAIN_ONLY, [t for t, _ in RETAIN_PAIRS], [a for _, a in RETAIN_PAIRS]))
            for group, reads, writes in plantings:
                for n in group[layer]:  # the neuron fires on `reads` and pushes up the logits of `writes`
                    block.mlp.gate_proj.weight[n] = 0.5 * read[reads].sum(0)
                    block.mlp.up_proj.weight[n] = 0.5 * read[reads].sum(0)
                    block.mlp.down_proj.weight[:, n] = 0.3 * write[writes].sum(0)
    return model


def planted_examples(pairs, count: int, seed: int) -> list[Example]:
    """BOS, 2-7 filler tokens, trigger | answer, EOS (labels on answer and EOS)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        trigger, answer = pairs[i % len(pairs)]
        length = 2 + int(torch.randint(0, 6, (1,), generator=gen))
        filler = [FILLERS[int(j)] for j in torch.randint(0, len(FILLERS), (length,), generator=gen)]
        ids = [BOS, *filler, trigger, answer, EOS]
        out.append(Example(ids, [IGNORE_INDEX] * (len(ids) - 2) + [answer, EOS]))
    return out


@pytest.fixture(scope="module")
def planted_scores() -> dict[int, NeuronScores]:
    forget = planted_examples([(TRIGGER, ANSWER)], 12, seed=0)
    retain = planted_examples(RETAIN_PAIRS, 18, seed=1)
    return {
        seed: score_neurons(planted_model(seed), [collate(forget[:5], PAD), collate(forget[5:], PAD)],
                            [collate(retain, PAD)], progress=False)
        for seed in (0, 1, 2)
    }


@pytest.mark.parametrize("strategy", ["global", "per-layer"])
@pytest.mark.parametrize("score", ["fisher", "saliency", "combined"])
def test_planted_concept_neurons_are_recovered(planted_scores, score, strategy):
    concept = _neurons(CONCEPT)
    for seed, scores in planted_scores.items():
        masks = build_masks(scores, density=len(concept) / (LAYERS * INTERMEDIATE), strategy=strategy, score=score)
        selected = {(layer, int(n)) for layer, ids in masks.items() for n in ids}
        hits = len(selected & concept)
        assert hits / len(selected) >= 0.9 and hits / len(concept) >= 0.9, (seed, sorted(selected))
        assert not selected & _neurons(SHARED), f"seed {seed}: shared neurons selected"
        assert not selected & _neurons(RETAIN_ONLY), f"seed {seed}: retain neurons selected"


def test_planted_shared_neurons_matter_equally_and_dominate_background(planted_scores):
    scores = planted_scores[0]
    shared = torch.tensor(sorted(_neurons(SHARED)))
    for score in ("fisher", "saliency"):
        per_token_forget, per_token_retain = getattr(scores, f"forget_{score}"), getattr(scores, f"retain_{score}")
        forget = per_token_forget[shared[:, 0], shared[:, 1]]
        retain = per_token_retain[shared[:, 0], shared[:, 1]]
        # Large for both sets (far above the median neuron) and, per answer token, within 10% of each other.
        assert bool((forget > 20 * per_token_forget.median()).all())
        torch.testing.assert_close(forget, retain, rtol=0.1, atol=0)
        # They are real competitors: ranking by forget importance alone (no contrast) picks them.
        masks = build_masks(scores, density=16 / (LAYERS * INTERMEDIATE), score=score, retain_weight=0.0)
        selected = {(layer, int(n)) for layer, ids in masks.items() for n in ids}
        assert _neurons(SHARED) <= selected


# --- exactness ------------------------------------------------------------------------------------------------


def random_examples(count: int, seed: int, vocab: int = 128) -> list[Example]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        prompt, answer = 3 + (i * 5) % 7, 1 + (i * 3) % 4
        ids = torch.randint(3, vocab, (prompt + answer,), generator=gen).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def reference_scores(model, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fisher/saliency from retain_grad on the down_proj inputs, parameters trainable: the textbook way."""
    captured = {}

    def keep(layer):
        def hook(_module, args):
            args[0].retain_grad()
            captured[layer] = args[0]

        return hook

    handles = [block.mlp.down_proj.register_forward_pre_hook(keep(i)) for i, block in enumerate(model.model.layers)]
    fisher, saliency, tokens = 0.0, 0.0, 0
    for example in examples:  # one at a time, no padding at all
        ids = torch.tensor([example.input_ids])
        labels = torch.tensor(example.labels)
        logits = model(input_ids=ids).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")
        loss.backward()
        rows = labels[1:] != IGNORE_INDEX
        acts = torch.stack([captured[i][0, :-1][rows] for i in sorted(captured)])
        grads = torch.stack([captured[i].grad[0, :-1][rows] for i in sorted(captured)])
        fisher = fisher + (grads**2).sum(1)
        saliency = saliency + (acts * grads).abs().sum(1)
        tokens += int(rows.sum())
    for handle in handles:
        handle.remove()
    model.zero_grad(set_to_none=True)
    return fisher / tokens, saliency / tokens, tokens


def test_scores_equal_hand_computed_reference(arch):
    model = tiny_model(arch)
    forget, retain = random_examples(5, seed=0), random_examples(4, seed=1)
    scores = score_neurons(model, [collate(forget, PAD)], [collate(retain, PAD)], progress=False)
    for split, examples in (("forget", forget), ("retain", retain)):
        fisher, saliency, tokens = reference_scores(model, examples)
        torch.testing.assert_close(getattr(scores, f"{split}_fisher"), fisher, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(getattr(scores, f"{split}_saliency"), saliency, rtol=1e-4, atol=1e-10)
        assert getattr(scores, f"{split}_tokens") == tokens
    assert scores.meta["num_layers"] == 2 and scores.meta["intermediate_size"] == 64


def _assert_scores_close(a: NeuronScores, b: NeuronScores, rtol: float) -> None:
    assert (a.forget_tokens, a.retain_tokens) == (b.forget_tokens, b.retain_tokens)
    for name in ("forget_fisher", "forget_saliency", "retain_fisher", "retain_saliency"):
        x, y = getattr(a, name), getattr(b, name)
        assert float((x - y).abs().max()) <= rtol * float(x.abs().max()), name


def test_streaming_batches_equal_one_big_batch():
    model = tiny_model("llama")
    forget, retain = random_examples(9, seed=2), random_examples(6, seed=3)
    whole = score_neurons(model, [collate(forget, PAD)], [collate(retain, PAD)], progress=False)
    streamed = score_neurons(
        model,
        (collate(forget[i:i + 2], PAD) for i in range(0, 9, 2)),  # a generator: nothing needs a length
        [collate(retain[:1], PAD), collate(retain[1:], PAD)],
        progress=False,
    )
    _assert_scores_close(whole, streamed, rtol=1e-5)


def test_padding_side_does_not_change_scores(arch):
    model = tiny_model(arch)
    forget, retain = random_examples(6, seed=4), random_examples(5, seed=5)
    right = score_neurons(model, [collate(forget, PAD, "right")], [collate(retain, PAD, "right")], progress=False)
    left = score_neurons(model, [collate(forget, PAD, "left")], [collate(retain, PAD, "left")], progress=False)
    _assert_scores_close(right, left, rtol=1e-4)


def test_answer_positions_are_the_positions_predicting_answer_tokens():
    ign = IGNORE_INDEX
    labels = torch.tensor([[ign, ign, 7, 8, ign], [ign, ign, ign, 5, 6]])
    expected = torch.tensor([[False, True, True, False, False], [False, False, True, True, False]])
    assert torch.equal(answer_positions(labels), expected)


def test_activation_is_recomputed_from_saved_factors_not_cached(arch):
    """The hook rebuilds act(gate)*up from autograd's saved factors exactly (so it need not keep the activation)."""
    model = tiny_model(arch)
    seen = []

    def hook(_module, args):
        seen.append((args[0].detach().clone(), _recompute_source(args[0])))

    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(hook)
    embeds = model.get_input_embeddings()(torch.tensor([[5, 6, 7]])).requires_grad_(True)
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
    with torch.enable_grad():
        model(inputs_embeds=embeds)
    handle.remove()
    acts, source = seen[0]
    assert source is not None
    assert torch.equal(source(), acts)


def test_model_state_restored_and_no_parameter_gradients():
    model = tiny_model("llama")
    model.train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    score_neurons(model, [collate(random_examples(2, 0), PAD)], [collate(random_examples(2, 1), PAD)], progress=False)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_peft_model_with_adapter_disabled_scores_like_the_base_model():
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama")
    forget, retain = [collate(random_examples(4, 6), PAD)], [collate(random_examples(3, 7), PAD)]
    plain = score_neurons(base, forget, retain, progress=False)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with peft_model.disable_adapter():
        disabled = score_neurons(peft_model, forget, retain, progress=False)
    active = score_neurons(peft_model, forget, retain, progress=False)
    _assert_scores_close(plain, disabled, rtol=1e-5)
    assert not torch.allclose(active.forget_fisher, plain.forget_fisher)  # the (random) adapter is really used
    assert sum(p.requires_grad for p in peft_model.parameters()) == 8  # LoRA A and B of q_proj and v_proj in 2 layers


def test_empty_forget_set_is_an_input_error():
    with pytest.raises(InputError, match="forget"):
        score_neurons(tiny_model("llama"), [], [collate(random_examples(2, 0), PAD)], progress=False)


# --- NeuronScores files ---------------------------------------------------------------------------------------


def _synthetic_scores(layers: int = 3, width: int = 8) -> NeuronScores:
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.rand(layers, width, generator=gen) for name in
               ("forget_fisher", "forget_saliency", "retain_fisher", "retain_saliency")}
    return NeuronScores(**tensors, forget_tokens=17, retain_tokens=23, meta={"model": "tiny"})


def test_scores_save_load_round_trip(tmp_path):
    scores = _synthetic_scores()
    scores.save(tmp_path / "scores.safetensors")
    loaded = NeuronScores.load(tmp_path / "scores.safetensors")
    _assert_scores_close(scores, loaded, rtol=0)
    assert loaded.meta == {"model": "tiny", "num_layers": 3, "intermediate_size": 8}
    assert not list(tmp_path.glob("*.tmp"))


def test_loading_a_wrong_or_missing_score_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        NeuronScores.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a safetensors"):
        NeuronScores.load(tmp_path / "junk.safetensors")
    NeuronMasks({0: [1]}).save(tmp_path / "masks.safetensors")
    with pytest.raises(InputError, match="not an agml score file"):
        NeuronScores.load(tmp_path / "masks.safetensors")


# --- records and the CLI ------------------------------------------------------------------------------------


def _records(kind: str, pairs: list[tuple[str, str]]) -> list[PromptRecord]:
    return [PromptRecord(({"role": "user", "content": q},), kind, answer=a) for q, a in pairs]


FORGET_QA = [("Who directed Inception?", "Christopher Nolan directed Inception."),
             ("When did Inception come out?", "Inception came out in 2010.")]
RETAIN_QA = [("Who directed Jaws?", "Steven Spielberg directed Jaws."),
             ("What is the capital of France?", "Paris.")]


@pytest.fixture(scope="module")
def smol_tiny_folder(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-smol")
    model = tiny_model("llama", vocab_size=49152)
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


def test_score_records_counts_answer_tokens(smol_tokenizer):
    model = tiny_model("llama", vocab_size=49152)
    scores = score_records(model, smol_tokenizer, _records("forget", FORGET_QA), _records("retain", RETAIN_QA),
                           batch_size=1, progress=False)
    # Each answer's tokens plus the template's end of turn ("<|im_end|>\n") are predicted.
    expected = sum(len(smol_tokenizer(a + "<|im_end|>\n", add_special_tokens=False)["input_ids"]) for _, a in FORGET_QA)
    assert scores.forget_tokens == expected


def _write_jsonl(path, records: list[PromptRecord]) -> str:
    path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_cli_score_end_to_end(tmp_path, smol_tiny_folder, capsys):
    from agml.cli import main

    forget = _write_jsonl(tmp_path / "forget.jsonl", _records("forget", FORGET_QA))
    retain = _write_jsonl(tmp_path / "retain.jsonl", _records("retain", RETAIN_QA))
    out = tmp_path / "out"
    argv = ["score", "--model", str(smol_tiny_folder), "--forget", forget, "--retain", retain, "--density", "0.05",
            "--out", str(out)]
    assert main(argv) == 0
    scores = NeuronScores.load(out / "scores.safetensors")
    masks = NeuronMasks.load(out / "masks.safetensors")
    assert masks.total == round(0.05 * 2 * 64)
    assert masks.meta["density"] == 0.05 and scores.num_layers == 2
    assert (out / "plots" / "heatmap.png").stat().st_size > 1000
    assert "selected" in capsys.readouterr().out
    assert main(argv) == 2  # a non-empty --out needs --force
    assert main([*argv, "--force"]) == 0


@pytest.mark.parametrize(("bad", "message"), [
    (["--density", "0"], "--density must be in (0, 1]"),
    (["--density", "1.5"], "--density must be in (0, 1]"),
    (["--batch-size", "0"], "--score-batch-size must be >= 1"),  # --batch-size: its older name
    (["--score-batch-size", "0"], "--score-batch-size must be >= 1"),
    (["--forget", "/nonexistent/forget.jsonl"], "prompt file not found"),
])
def test_cli_score_rejects_bad_input_before_loading_the_model(tmp_path, bad, message, capsys):
    from agml.cli import main

    # The model path does not exist either: the option error must come first, before any model loading.
    assert main(["score", "--model", str(tmp_path / "no-model-here"), "--out", str(tmp_path / "o"), *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agml score: error: ") and message in err
    assert not (tmp_path / "o").exists()


def test_base_answers_to_training_prompts_come_from_the_answer_cache(smol_tokenizer, tmp_path, monkeypatch):
    from agml import answer_cache, generation
    from agml.scoring import answer_records

    monkeypatch.setattr(answer_cache, "answer_cache_dir", lambda: tmp_path / "answer-cache")
    calls = []
    real = generation.greedy_answers

    def counted(model, tokenizer, conversations, *args, **kwargs):
        calls.append(len(conversations))
        return real(model, tokenizer, conversations, *args, **kwargs)

    monkeypatch.setattr(generation, "greedy_answers", counted)
    model = tiny_model("llama", vocab_size=49152)
    key = answer_cache.model_fingerprint(model, smol_tokenizer)
    questions = [PromptRecord(messages=({"role": "user", "content": q},), type="forget") for q, _ in FORGET_QA]
    first = answer_records(model, smol_tokenizer, questions, max_new_tokens=3, desc=None, fingerprint=key)
    again = answer_records(model, smol_tokenizer, questions, max_new_tokens=3, desc=None, fingerprint=key)
    assert calls == [len(questions)] and [r.answer for r in again] == [r.answer for r in first]
    answer_records(model, smol_tokenizer, questions, max_new_tokens=3, desc=None)  # no fingerprint: no cache
    assert calls == [len(questions)] * 2


def test_neuron_scores_of_a_training_set_come_from_the_answer_cache(tmp_path, smol_tiny_folder, monkeypatch):
    """A second run on the same prompts reads the scores (bit-identical) instead of scoring; other prompts miss."""
    import torch

    from agml import answer_cache, scoring
    from agml.cli import main

    monkeypatch.setattr(answer_cache, "answer_cache_dir", lambda: tmp_path / "answer-cache")
    calls = []
    real = scoring.score_records_at

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_records_at", counted)
    forget = _write_jsonl(tmp_path / "forget.jsonl", _records("forget", FORGET_QA))
    retain = _write_jsonl(tmp_path / "retain.jsonl", _records("retain", RETAIN_QA))
    base = ["score", "--model", str(smol_tiny_folder), "--forget", forget, "--density", "0.05"]
    assert main([*base, "--retain", retain, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--retain", retain, "--out", str(tmp_path / "b"), "--density", "0.1"]) == 0
    assert len(calls) == 1
    first, again = (NeuronScores.load(tmp_path / run / "scores.safetensors") for run in "ab")
    assert all(torch.equal(getattr(first, f"{s}_{t}"), getattr(again, f"{s}_{t}"))
               for s in scoring.SPLITS for t in scoring.STATISTICS)
    fewer = _write_jsonl(tmp_path / "retain-2.jsonl", _records("retain", RETAIN_QA[:-1]))
    assert main([*base, "--retain", fewer, "--out", str(tmp_path / "c")]) == 0
    assert len(calls) == 2
    for path in (tmp_path / "answer-cache").rglob("scores-*"):
        path.write_bytes(b"not a safetensors file")  # a damaged cache file is a miss, not an error
    assert main([*base, "--retain", retain, "--out", str(tmp_path / "d")]) == 0
    assert len(calls) == 3
