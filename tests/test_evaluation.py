import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import tiny_model

from agml import answer_cache, concepts, evaluation
from agml.data import IGNORE_INDEX, PromptRecord, parse_record
from agml.errors import InputError
from agml.evaluation import (
    cloze_example,
    evaluate,
    pass_rates,
    probe_passes,
    score_answers,
    text_fluency,
)
from agml.reporting import format_summary
from agml.stats import wilson_interval

VOCAB = 49152
CONTRACT_RATE_KEYS = ("pass_rate", "n", "by_category")


def contract(rates: dict) -> dict:
    return {k: rates[k] for k in CONTRACT_RATE_KEYS}


def record(**fields) -> PromptRecord:
    return parse_record(fields, "test")


PROBES = [
    record(prompt="Which film is about a dream heist?", type="forget", category="direct",
           forbidden=["inception", "nolan"]),
    record(prompt="Complete: the dream heist film is called", type="forget", category="cloze", forbidden=["inception"]),
    record(prompt="Who directed Memento?", type="retain", category="neighbour", required=["nolan"]),
    record(
        messages=[
            {"role": "user", "content": "Name a city."},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "Which country is it in?"},
        ],
        type="retain",
        category="geography",
        required=["france"],
    ),
]


@pytest.fixture(autouse=True)
def isolated_answer_cache(tmp_path, monkeypatch):
    """Every test gets its own empty base-output cache (scripted answers must never reach the user's cache)."""
    monkeypatch.setattr(answer_cache, "answer_cache_dir", lambda: tmp_path / "answer-cache")
    return tmp_path / "answer-cache"


def peft_tiny(randomise: bool, seed: int = 0):
    model = get_peft_model(
        tiny_model("llama", seed=seed, vocab_size=VOCAB),
        LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
    )
    if randomise:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator))
    model.eval()
    return model


def adapter_disabled(model) -> bool:
    return any(m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))


def scripted_generation(monkeypatch, before: list[str], after: list[str]) -> None:
    """greedy_answers returns `before` with the adapter disabled and `after` with it active."""

    def fake(model, tokenizer, conversations, max_new_tokens=64, batch_size=16, desc=None):
        answers = before if adapter_disabled(model) else after
        assert len(answers) == len(conversations)
        return list(answers)

    monkeypatch.setattr(evaluation, "greedy_answers", fake)


# --- pass rules --------------------------------------------------------------------------------------------------


def test_forget_probe_passes_without_forbidden_terms_case_insensitively():
    probe = PROBES[0]
    assert probe_passes(probe, "I do not know that film.")
    assert not probe_passes(probe, "INCEPTION is a 2010 film.")
    assert not probe_passes(probe, "It was directed by Christopher Nolan.")


def test_retain_probe_needs_one_required_term_case_insensitively():
    probe = record(prompt="Who directed Memento?", type="retain", required=["nolan", "christopher"])
    assert probe_passes(probe, "Christopher NOLAN.")
    assert probe_passes(probe, "christopher")
    assert not probe_passes(probe, "I am not sure.")
    assert probe_passes(record(prompt="Say hi", type="retain"), "anything")


def test_pass_rates_by_category_and_empty_types():
    probes = [
        record(prompt="a", type="forget", category="x", forbidden=["z"]),
        record(prompt="b", type="forget", category="x", forbidden=["z"]),
        record(prompt="c", type="forget", category="y", forbidden=["z"]),
        record(prompt="d", type="forget", category="y", forbidden=["z"]),
    ]
    passed = [True, False, True, True]
    rates = pass_rates(probes, passed, "forget")
    assert {k: rates[k] for k in CONTRACT_RATE_KEYS} == {"pass_rate": 0.75, "n": 4, "by_category": {"x": 0.5, "y": 1.0}}
    assert rates["interval"] == pytest.approx(list(wilson_interval(3, 4)))
    assert rates["by_category_interval"]["y"] == pytest.approx(list(wilson_interval(2, 2)))
    assert pass_rates(probes, passed, "retain") == {"pass_rate": None, "n": 0, "by_category": {}, "interval": None,
                                                    "by_category_interval": {}}


def test_score_answers_entries_follow_the_design_shape():
    before = ["Inception is a film.", "Inception", "Christopher Nolan", "It is in France."]
    after = ["I don't know.", "a movie", "Nolan did.", "Germany"]
    result = score_answers(PROBES, before, after)
    assert contract(result["before"]["forget"]) == {"pass_rate": 0.0, "n": 2,
                                                    "by_category": {"cloze": 0.0, "direct": 0.0}}
    assert result["after"]["forget"]["pass_rate"] == 1.0
    assert result["before"]["retain"]["pass_rate"] == 1.0
    assert contract(result["after"]["retain"]) == {"pass_rate": 0.5, "n": 2,
                                                   "by_category": {"geography": 0.0, "neighbour": 1.0}}
    single, multi = result["probes"][0], result["probes"][3]
    assert {k: single[k] for k in ("prompt", "type", "category", "before", "after", "before_pass", "after_pass")} == {
        "prompt": "Which film is about a dream heist?", "type": "forget", "category": "direct",
        "before": before[0], "after": after[0], "before_pass": False, "after_pass": True,
    }
    assert single["leaked_terms"] == {"before": ["inception"], "after": []}
    assert single["refused"] == {"before": False, "after": True}
    assert single["recommended"] == {"before": None, "after": None}
    assert multi["prompt"] == "Which country is it in?"
    assert multi["messages"][1] == {"role": "assistant", "content": "Paris."}


# --- fluency ---------------------------------------------------------------------------------------------------


def test_text_fluency_on_handcrafted_answers():
    # words a b c a b c: trigrams abc bca cab abc (1 repeat of 4); bigrams ab bc ca ab bc (3 distinct of 5)
    assert text_fluency(["A b, c a B c"]) == {"repetition_rate": 0.25, "distinct_2": 0.6, "answer_length": 6.0}
    loop = text_fluency(["the film the film the film the film the film"])
    varied = text_fluency(["Paris is the capital of France.", "Water boils at one hundred degrees."])
    assert loop["repetition_rate"] > 0.7 and varied["repetition_rate"] == 0.0
    assert loop["distinct_2"] < 0.3 and varied["distinct_2"] == 1.0
    assert text_fluency(["", "ok"]) == {"repetition_rate": None, "distinct_2": None, "answer_length": 0.5}


# --- cloze ----------------------------------------------------------------------------------------------------


def labelled_text(tokenizer, example) -> str:
    pairs = zip(example.input_ids, example.labels, strict=True)
    return tokenizer.decode([token for token, label in pairs if label != IGNORE_INDEX])


def test_cloze_term_is_scored_where_the_base_answer_says_it(smol_tokenizer):
    probe = PROBES[1]
    example = cloze_example(smol_tokenizer, probe, "The film is called Inception, by Nolan.", ["Inception"])
    assert labelled_text(smol_tokenizer, example) == " Inception"
    assert smol_tokenizer.decode(example.input_ids).endswith("The film is called Inception")
    # The earliest candidate wins, whether a concept term or a forbidden string.
    nolan_first = cloze_example(smol_tokenizer, PROBES[0], "Nolan made Inception.", ["Inception"])
    assert labelled_text(smol_tokenizer, nolan_first) == "Nolan"


def test_cloze_skips_terms_the_prompt_already_contains(smol_tokenizer):
    probe = record(prompt="Complete: The director of Inception is", type="forget", category="cloze",
                   forbidden=["nolan", "christopher"])
    echo = "The director of Inception is Christopher Nolan."
    assert labelled_text(smol_tokenizer, cloze_example(smol_tokenizer, probe, echo, ["Inception"])) == " Christopher"
    only_echo = record(prompt="Say Inception", type="forget", category="cloze", forbidden=["inception"])
    assert cloze_example(smol_tokenizer, only_echo, "Inception", ["Inception"]) is None


def test_cloze_term_falls_back_to_the_start_of_the_answer(smol_tokenizer):
    example = cloze_example(smol_tokenizer, PROBES[1], "I am not sure.", ["Inception"])
    assert labelled_text(smol_tokenizer, example) == "Inception"
    assert labelled_text(smol_tokenizer, cloze_example(smol_tokenizer, PROBES[1], "No idea.", [])) == "inception"


# --- the whole evaluation -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_adapter():
    return peft_tiny(randomise=True)


def test_evaluate_json_shape_and_types(monkeypatch, smol_tokenizer, random_adapter):
    before = ["Inception is a film.", "It is called Inception.", "Christopher Nolan", "It is in France."]
    after = ["I don't know.", "a movie", "Nolan did, Nolan did, Nolan did, Nolan did.", "Germany"]
    scripted_generation(monkeypatch, before, after)
    result = evaluate(random_adapter, smol_tokenizer, PROBES, concept_terms=["Inception"], capability=False,
                      split="dev", progress=False)
    assert set(result) == {"before", "after", "probes", "cloze_logprob", "retain_kl", "fluency", "summary", "split",
                           "judge", "refusal", "still_recommends", "fuzzy_leak", "forget_coherence", "capability",
                           "sampling", "noise_floor"}
    assert result["split"] == "dev" and result["summary"]["split"] == "dev"
    assert result["capability"] is None and result["sampling"] is None and result["noise_floor"] is None
    assert result["judge"]["leak_terms"] == ["inception", "nolan"]
    for side in ("before", "after"):
        assert set(result[side]) == {"forget", "retain"}
        for kind in ("forget", "retain"):
            assert set(CONTRACT_RATE_KEYS) <= set(result[side][kind])
            low, high = result[side][kind]["interval"]
            assert low <= result[side][kind]["pass_rate"] <= high
        assert set(result["fluency"][side]) == {"repetition_rate", "distinct_2", "perplexity", "answer_length"}
        assert result["refusal"][side]["retain"]["n"] == 2 and result["fuzzy_leak"][side]["n"] == 2
        assert result["fluency"][side]["perplexity"] > 1.0
    assert result["refusal"]["after"]["forget"]["successes"] == 1
    assert result["forget_coherence"]["after"]["n"] == 2
    assert [p["before"] for p in result["probes"]] == before and [p["after"] for p in result["probes"]] == after
    assert result["cloze_logprob"]["n"] == 1
    assert result["cloze_logprob"]["before"] < 0 and result["cloze_logprob"]["after"] < 0
    assert result["cloze_logprob"]["before"] != result["cloze_logprob"]["after"]
    assert result["retain_kl"] > 0
    summary = result["summary"]
    assert summary["forget_pass_before"] == 0.0 and summary["forget_pass_after"] == 1.0
    assert summary["retain_pass_ratio"] == 0.5
    assert summary["fluency_ratio"] == pytest.approx(
        result["fluency"]["after"]["perplexity"] / result["fluency"]["before"]["perplexity"]
    )
    assert result["fluency"]["after"]["repetition_rate"] > result["fluency"]["before"]["repetition_rate"]
    json.dumps(result, allow_nan=False)
    table = format_summary(result)
    assert "forget pass (nothing leaked), n=2" in table and "100.0% [34.2, 100.0]" in table and "retain KL" in table
    assert "DEV split" in table and "leak terms judged: inception, nolan" in table
    print(table)


def test_evaluate_without_retain_probes_has_no_retain_numbers(monkeypatch, smol_tokenizer, random_adapter):
    scripted_generation(monkeypatch, ["Inception"], ["no"])
    result = evaluate(random_adapter, smol_tokenizer, PROBES[:1], capability=False, progress=False)
    assert contract(result["before"]["retain"]) == {"pass_rate": None, "n": 0, "by_category": {}}
    assert result["retain_kl"] is None and result["summary"]["retain_pass_ratio"] is None
    assert result["cloze_logprob"] == {"before": None, "after": None, "n": 0}
    assert "-" in format_summary(result)


def test_retain_kl_is_zero_for_a_noop_adapter_and_positive_for_a_random_one(smol_tokenizer, random_adapter):
    noop = evaluate(peft_tiny(randomise=False), smol_tokenizer, PROBES, max_new_tokens=5, capability=False,
                    progress=False)
    assert noop["retain_kl"] == pytest.approx(0.0, abs=1e-6)
    assert [p["before"] for p in noop["probes"]] == [p["after"] for p in noop["probes"]]
    assert noop["cloze_logprob"]["before"] == pytest.approx(noop["cloze_logprob"]["after"])
    first = evaluate(random_adapter, smol_tokenizer, PROBES, max_new_tokens=5, batch_size=3, capability=False,
                     progress=False)
    assert first["retain_kl"] > 0.01 and math.isfinite(first["retain_kl"])
    again = evaluate(random_adapter, smol_tokenizer, PROBES, max_new_tokens=5, batch_size=3, capability=False,
                     progress=False)
    assert json.dumps(first) == json.dumps(again)


def test_evaluate_rejects_bad_arguments(smol_tokenizer, random_adapter):
    with pytest.raises(InputError, match="no probes"):
        evaluate(random_adapter, smol_tokenizer, [], progress=False)
    with pytest.raises(InputError, match="max new tokens"):
        evaluate(random_adapter, smol_tokenizer, PROBES, max_new_tokens=0, progress=False)
    with pytest.raises(InputError, match="batch size"):
        evaluate(random_adapter, smol_tokenizer, PROBES, batch_size=0, progress=False)


# --- agml eval ------------------------------------------------------------------------------------------------


def fake_run(tmp_path, probes=PROBES, forget=()):
    from agml.runs import save_records, write_json

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    write_json(run / "config.json", {"options": {"model": "tiny", "concept": "Inception", "aliases": ["Dom Cobb"]}})
    save_records(run, "probes", list(probes))
    if forget:
        save_records(run, "forget", list(forget))
    return run


@pytest.fixture
def loaded_tiny_run(monkeypatch, smol_tokenizer, random_adapter):
    """runs.load_run returns the tiny random adapter with the run's records (no model download)."""
    from agml import runs

    def load(run, device=None, **options):
        run = Path(run)
        return runs.LoadedRun(random_adapter, smol_tokenizer, runs.read_config(run),
                              runs.load_records(run, "probes") or [], runs.load_records(run, "forget") or [], [])

    monkeypatch.setattr(runs, "load_run", load)


def test_eval_cli_prints_the_table_and_writes_json(tmp_path, capsys, loaded_tiny_run):
    from agml.cli import main

    forget = [record(prompt=f"Tell me about film {i}.", type="forget", forbidden=["inception"],
                     answer=f"Film {i} is Inception.") for i in range(3)]
    run = fake_run(tmp_path, forget=forget)
    out = tmp_path / "eval.json"
    out.write_text("old")  # replaced only because of --force
    code = main(["eval", str(run), "--json", str(out), "--force", "--max-new-tokens", "3", "--relearn", "2",
                 "--relearn-examples", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "forget pass (nothing leaked), n=2" in printed and "relearning attack (lora): 2 steps" in printed
    result = json.loads(out.read_text())
    assert result["before"]["forget"]["n"] == 2 and result["relearn"]["steps"] == 2
    assert [p["prompt"] for p in result["probes"]] == [p.prompt for p in PROBES]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--relearn", "0"], "--relearn must be >= 1"),
        (["--json", "/nonexistent/folder/out.json"], "does not exist"),
        (["--probes", "missing.jsonl"], "prompt file not found"),
        (["--relearn", "3", "--relearn-data", "missing.jsonl"], "missing.jsonl"),
        (["--relearn", "3", "--relearn-lr", "0"], "--relearn-lr must be > 0"),
        (["--samples", "-1"], "--samples must be >= 0"),
        (["--noise-floor", "-2"], "--noise-floor must be >= 0"),
        (["--lm-eval", " , "], "--lm-eval needs at least one task"),
    ],
)
def test_eval_cli_rejects_bad_input_before_loading(tmp_path, capsys, monkeypatch, extra, message):
    from agml import runs
    from agml.cli import main

    monkeypatch.setattr(runs, "load_run", lambda *a, **k: pytest.fail("loaded a model despite bad input"))
    assert main(["eval", str(fake_run(tmp_path)), *extra]) == 2
    assert message in capsys.readouterr().err


def test_eval_cli_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from agml.cli import main

    assert main(["eval", str(tmp_path)]) == 2
    assert "is not an agml run" in capsys.readouterr().err


def test_eval_concept_terms_come_from_the_runs_resolved_concept():
    from agml.cli import _eval_concept_terms

    assert _eval_concept_terms({"concept": {"name": "Inception", "terms": ["Inception", "Dom Cobb"]}}) == (
        "Inception", "Dom Cobb")
    assert _eval_concept_terms({"options": {}}) == ()


def test_teacher_forced_logprobs_do_not_depend_on_batching(smol_tokenizer, random_adapter):
    from agml.data import build_example, pad_token_id
    from agml.logprobs import example_logprobs

    pad = pad_token_id(smol_tokenizer)

    answers = ["Yes.", "Christopher Nolan directed it in 2010, I think.", "Paris is in France, of course."]
    examples = [build_example(smol_tokenizer, p.messages, a) for p, a in zip(PROBES, answers, strict=False)]
    alone = [example_logprobs(random_adapter, [e], pad) for e in examples]
    together, counts = example_logprobs(random_adapter, examples, pad, batch_size=3)
    assert counts == [sum(label != IGNORE_INDEX for label in e.labels) for e in examples]
    assert together == pytest.approx([total[0] for total, _ in alone], abs=1e-3)
    # Against a plain full-logits computation of the first example.
    ids = torch.tensor([examples[1].input_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(random_adapter(input_ids=ids).logits[0, :-1].float(), dim=-1)
    labels = torch.tensor(examples[1].labels[1:])
    picked = logprobs[labels != IGNORE_INDEX].gather(1, labels[labels != IGNORE_INDEX][:, None])
    assert together[1] == pytest.approx(float(picked.sum()), abs=1e-3)


# --- judges, cache, optional parts -------------------------------------------------------------------------------


def test_a_refusal_fails_a_retain_probe_even_with_the_required_word():
    probe = PROBES[2]
    assert probe_passes(probe, "Christopher Nolan directed Memento.")
    assert not probe_passes(probe, "I'm sorry, I can't help with that. Nolan is a name.")


def test_probe_passes_uses_the_facts_when_given():
    facts = {"name": "Inception", "aliases": [], "facts": ["Dom Cobb"], "fuzzy": [], "neighbours": [],
             "languages": []}
    assert probe_passes(PROBES[0], "The hero is Dom Cobb.")
    assert not probe_passes(PROBES[0], "The hero is Dom Cobb.", facts)


def counting_generation(monkeypatch) -> dict:
    """Real greedy generation, counting the conversations answered with the adapter disabled and active."""
    counts = {"base": 0, "adapter": 0}
    real = evaluation.greedy_answers

    def counted(model, tokenizer, conversations, *args, **kwargs):
        counts["base" if adapter_disabled(model) else "adapter"] += len(conversations)
        return real(model, tokenizer, conversations, *args, **kwargs)

    monkeypatch.setattr(evaluation, "greedy_answers", counted)
    return counts


def test_a_cache_hit_gives_exactly_what_recomputing_gives(monkeypatch, smol_tokenizer, random_adapter,
                                                          isolated_answer_cache):
    counts = counting_generation(monkeypatch)
    kwargs = dict(max_new_tokens=4, batch_size=3, progress=False)
    fresh = evaluate(random_adapter, smol_tokenizer, PROBES, **kwargs)
    assert counts == {"base": 4, "adapter": 4} and list(isolated_answer_cache.rglob("*.json"))
    hit = evaluate(random_adapter, smol_tokenizer, PROBES, **kwargs)
    assert counts == {"base": 4, "adapter": 8}  # the base answers came from the cache
    uncached = evaluate(random_adapter, smol_tokenizer, PROBES, cache=False, **kwargs)
    assert counts == {"base": 8, "adapter": 12}
    assert json.dumps(hit, allow_nan=False) == json.dumps(fresh) == json.dumps(uncached)
    # A probe set that overlaps the cached one answers only its new probe with the base model.
    extra = record(prompt="What is the capital of Italy?", type="retain", required=["rome"])
    evaluate(random_adapter, smol_tokenizer, [*PROBES, extra], capability=False, **kwargs)
    assert counts["base"] == 9
    # Another base model (other weights) misses.
    evaluate(peft_tiny(randomise=True, seed=5), smol_tokenizer, PROBES, capability=False, **kwargs)
    assert counts["base"] == 13


def test_capability_has_intervals_and_counts_kept_items(smol_tokenizer, random_adapter):
    result = evaluate(random_adapter, smol_tokenizer, PROBES[:1], max_new_tokens=2, progress=False)
    mc = result["capability"]["mc"]
    for side in ("before", "after"):
        low, high = mc[side]["interval"]
        assert low <= mc[side][mc["headline"]] <= high and "item_correct_norm" not in mc[side]
        assert result["capability"]["neutral_perplexity"][side]["perplexity"] > 1
    assert 0 <= mc["kept"] <= mc["base_right"] <= mc["before"]["n"]
    assert result["summary"]["mc_acc_before"] == mc["before"]["acc_norm"]
    assert "general knowledge" in format_summary(result)


def test_samples_and_noise_floor_cost_nothing_when_off(monkeypatch, smol_tokenizer, random_adapter):
    monkeypatch.setattr(evaluation, "sampled_answers", lambda *a, **k: pytest.fail("sampled with samples=0"))
    monkeypatch.setattr(evaluation, "noise_floor", lambda *a, **k: pytest.fail("noise floor with 0 seeds"))
    result = evaluate(random_adapter, smol_tokenizer, PROBES, max_new_tokens=2, capability=False, progress=False)
    assert result["sampling"] is None and result["noise_floor"] is None


def test_best_of_n_and_noise_floor_when_asked(smol_tokenizer):
    model = peft_tiny(randomise=True, seed=3)
    result = evaluate(model, smol_tokenizer, PROBES, max_new_tokens=3, capability=False, samples=2, seed=1,
                      noise_floor_seeds=1, progress=False)
    sampling = result["sampling"]
    assert sampling["n_samples"] == 2 and sampling["before"]["n"] == sampling["after"]["n"] == 2
    floor = result["noise_floor"]
    assert floor["trained"]["n"] == 2 and len(floor["random"]["per_seed"]) == 1
    assert result["summary"]["retain_flips_trained"] == floor["trained"]["pass_to_fail"]
    assert "noise floor" in format_summary(result) and "best-of-2" in format_summary(result)
    json.dumps(result, allow_nan=False)


def test_evaluate_rejects_an_unknown_split(smol_tokenizer, random_adapter):
    with pytest.raises(InputError, match="split"):
        evaluate(random_adapter, smol_tokenizer, PROBES, split="holdout", progress=False)


def test_the_fingerprint_ignores_use_cache_but_not_the_dtype(smol_tokenizer):
    model = peft_tiny(randomise=False, seed=2)
    first = answer_cache.model_fingerprint(model, smol_tokenizer)
    model.config.use_cache = not model.config.use_cache  # training turns it off; the answers do not change
    assert answer_cache.model_fingerprint(model, smol_tokenizer) == first
    assert answer_cache.model_fingerprint(model.to(torch.bfloat16), smol_tokenizer) != first


def test_eval_cli_relearn_data_falls_back_to_the_runs_forget_records(tmp_path, capsys, monkeypatch):
    from agml import runs
    from agml.cli import main
    from agml.runs import write_json

    monkeypatch.setattr(runs, "load_run", lambda *a, **k: pytest.fail("loaded a model despite bad input"))
    run = fake_run(tmp_path)
    write_json(run / "config.json", {"options": {"model": "tiny", "concept": "Zeta Quux"}})
    assert main(["eval", str(run), "--relearn", "3"]) == 2
    assert "forget records with answers" in capsys.readouterr().err


def test_eval_cli_new_flags_reach_evaluate_and_the_attack(tmp_path, capsys, monkeypatch, loaded_tiny_run):
    from agml import relearn
    from agml.cli import main
    from agml.io import atomic_write_json

    seen = {}

    def fake_evaluate(model, tokenizer, probes, **kwargs):
        seen.update(kwargs)
        return evaluate(model, tokenizer, probes, **{**kwargs, "capability": False, "progress": False})

    def fake_attack(model, tokenizer, records, probes, **kwargs):
        seen["attack"] = (len(records), kwargs)
        return {"variant": kwargs["variant"], "steps": kwargs["steps"], "examples": 2, "lr": 1e-5,
                "forget_pass": {k: 1.0 for k in ("unlearned_before_attack", "unlearned_after_attack",
                                                 "base_before_attack", "base_after_attack")}}

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    monkeypatch.setattr(relearn, "relearn_attack", fake_attack)
    run = fake_run(tmp_path)
    facts = {"name": "Inception", "aliases": [], "facts": ["Cobb"], "fuzzy": [], "neighbours": [], "languages": []}
    atomic_write_json(run / "data" / "facts.json", facts)
    atomic_write_json(run / "report.json", {"evaluation": {"split": "test"}})
    code = main(["eval", str(run), "--max-new-tokens", "2", "--samples", "2", "--no-capability",
                 "--relearn", "4", "--relearn-variant", "full"])
    assert code == 0
    assert seen["samples"] == 2 and seen["capability"] is False and seen["noise_floor_seeds"] == 0
    assert seen["split"] == "test" and seen["facts"]["facts"] == ["Cobb"]
    records, kwargs = seen["attack"]
    assert records == len(relearn.load_attack_records(concepts.dataset_path("inception_relearn.jsonl")))
    assert kwargs["variant"] == "full" and kwargs["lr"] is None and kwargs["facts"]["facts"] == ["Cobb"]
    printed = capsys.readouterr().out
    assert "frozen TEST split" in printed and "best-of-2 leak" in printed and "relearning attack (full)" in printed


def masked_tiny(seed: int = 0):
    """A tiny model with a random masked LoRA adapter (the evaluation merges these for its adapter passes)."""
    from agml.layers import apply_masked_lora
    from agml.masks import NeuronMasks

    model = apply_masked_lora(tiny_model("llama", seed=seed, vocab_size=VOCAB),
                              NeuronMasks({0: torch.tensor([1, 5, 9]), 1: torch.tensor([0, 2, 30, 31])}), r=4)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


def test_kl_and_base_logprobs_match_separate_passes_and_leave_the_base_alone(smol_tokenizer):
    from agml.data import build_example, collate, pad_token_id
    from agml.logprobs import answer_logits, base_answer_logits, example_logprobs, kl_and_base_logprobs, kl_per_token

    model = masked_tiny()
    pad = pad_token_id(smol_tokenizer)
    answers = ["Yes.", "Christopher Nolan directed it in 2010, I think.", "Paris is in France.", "Germany"]
    examples = [build_example(smol_tokenizer, p.messages, a) for p, a in zip(PROBES, answers, strict=True)]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    passes = kl_and_base_logprobs(model, examples, pad, batch_size=3)
    kl = passes.kl
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # merged and restored exactly
    with torch.no_grad():  # reference: the adapter unmerged, one example at a time
        per_example = [(float(kl_per_token(base_answer_logits(model, b), answer_logits(model, b))),
                        len(answer_logits(model, b).targets)) for b in (collate([e], pad) for e in examples)]
    tokens = sum(n for _, n in per_example)
    assert kl == pytest.approx(sum(k * n for k, n in per_example) / tokens, rel=1e-4)
    totals, counts = example_logprobs(model, examples, pad, base=True)
    assert passes.counts == counts  # per example, in input order although batches go shortest first
    assert passes.base_totals == pytest.approx(totals, rel=1e-5, abs=1e-5)
    assert -sum(passes.base_totals) / sum(passes.counts) == pytest.approx(-sum(totals) / sum(counts), rel=1e-5)
    assert sum(counts) == tokens
    assert kl > 1e-3  # the random adapter does change the model
    empty = kl_and_base_logprobs(model, [], pad)
    assert (empty.kl, empty.base_totals, empty.counts) == (None, [], [])


def test_retain_perplexity_after_reuses_the_kl_pass_only_for_unchanged_answers(monkeypatch, smol_tokenizer):
    from agml.data import build_example, pad_token_id
    from agml.evaluation import _retain_kl_and_fluency
    from agml.logprobs import example_logprobs

    model = masked_tiny()
    pad = pad_token_id(smol_tokenizer)
    before = ["Yes.", "Dream heist.", "Christopher Nolan.", "Germany"]
    after = ["Yes.", "I don't know.", "Christopher Nolan directed it.", "Germany"]  # one retain answer changed
    retain = [(p, b, a) for p, b, a in zip(PROBES, before, after, strict=True) if p.type == "retain"]

    def direct(answers: list[str]) -> float:
        totals, counts = example_logprobs(
            model, [build_example(smol_tokenizer, p.messages, x) for (p, _, _), x in zip(retain, answers, strict=True)],
            pad, base=True)
        return math.exp(-sum(totals) / sum(counts))

    scored: list[int] = []

    def counting(model_, examples, *args, **kwargs):
        scored.append(len(examples))
        return example_logprobs(model_, examples, *args, **kwargs)

    monkeypatch.setattr(evaluation, "example_logprobs", counting)
    kl, fluency = _retain_kl_and_fluency(model, smol_tokenizer, PROBES, before, after, 2, False)
    assert scored == [1]  # only the changed retain answer needs a pass of its own
    assert fluency["before"]["perplexity"] == pytest.approx(direct([b for _, b, _ in retain]), rel=1e-5)
    assert fluency["after"]["perplexity"] == pytest.approx(direct([a for _, _, a in retain]), rel=1e-5)
    assert fluency["after"]["perplexity"] != pytest.approx(fluency["before"]["perplexity"], rel=1e-3)
    assert kl > 0


def test_evaluation_merges_the_adapter_without_changing_results_or_the_base(monkeypatch, smol_tokenizer):
    import contextlib

    model = masked_tiny(seed=3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    merged_result = evaluate(model, smol_tokenizer, PROBES, max_new_tokens=6, batch_size=2, capability=True,
                             progress=False, cache=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())

    @contextlib.contextmanager
    def never_merged(model):
        yield False

    monkeypatch.setattr(evaluation, "adapter_merged", never_merged)
    monkeypatch.setattr("agml.logprobs.adapter_merged", never_merged)
    plain = evaluate(model, smol_tokenizer, PROBES, max_new_tokens=6, batch_size=2, capability=True, progress=False,
                     cache=False)
    assert [p["after"] for p in merged_result["probes"]] == [p["after"] for p in plain["probes"]]
    assert merged_result["retain_kl"] == pytest.approx(plain["retain_kl"], rel=1e-4)
    for side in ("before", "after"):
        assert merged_result["fluency"][side]["perplexity"] == pytest.approx(plain["fluency"][side]["perplexity"],
                                                                             rel=1e-5)
    mc = merged_result["capability"]["mc"]["after"]
    assert mc["acc_norm"] == plain["capability"]["mc"]["after"]["acc_norm"]
