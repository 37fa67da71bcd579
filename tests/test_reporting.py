import pytest
from test_evaluation import PROBES, peft_tiny, scripted_generation

from agml.evaluation import evaluate
from agml.reporting import format_relearn, format_summary, render_markdown, write_report

FACTS = {"name": "Inception", "aliases": ["Dom Cobb"], "facts": ["Nolan"], "fuzzy": ["inc[eai]p"],
         "neighbours": [], "languages": []}


@pytest.fixture(scope="module")
def model():
    return peft_tiny(randomise=True, seed=7)


@pytest.fixture
def evaluation(monkeypatch, smol_tokenizer, model):
    before = ["Inception is a film.", "It is called Inception.", "Christopher Nolan", "It is in France."]
    after = ["I don't know.", "a movie", "I'm sorry, I can't answer that. Nolan.", "France"]
    scripted_generation(monkeypatch, before, after)
    return evaluate(model, smol_tokenizer, PROBES, facts=FACTS, capability=False, split="test", cache=False,
                    progress=False)


def test_terminal_table_shows_intervals_refusals_and_the_judges_terms(evaluation):
    table = format_summary(evaluation)
    assert "frozen TEST split" in table
    assert "0.0% [0.0, 65.8]" in table and "100.0% [34.2, 100.0]" in table
    assert "refusals (retain)" in table and "50.0% [9.5, 90.5] (1/2)" in table
    assert "seed-style fuzzy leak (forget)" in table
    assert "leak terms judged: inception, nolan, Dom Cobb\n" in table and "inc[eai]p" in table


def test_report_markdown_and_plot(tmp_path, evaluation):
    report = write_report(tmp_path, options={"method": "masked-lora", "model": "tiny"}, evaluation=evaluation,
                          training=None, masks=None, parameters={"trainable": 10, "total": 100}, seconds=1.0,
                          concept="Inception", stages={"load and base answers": 12.34, "evaluation": 56.7})
    text = (tmp_path / "report.md").read_text()
    assert text == render_markdown(report)
    assert report["stage_seconds"] == {"load and base answers": 12.3, "evaluation": 56.7}
    assert "Wall seconds by stage: load and base answers 12, evaluation 57." in text
    assert "## Summary (frozen TEST split" in text and "95% Wilson intervals" in text
    assert "| forget | direct | 0.0% [0.0, 79.3] | 100.0% [20.7, 100.0] |" in text
    assert "`Dom Cobb`" in text and '"fuzzy"' in text
    assert "**No neighbours by name.**" in text  # FACTS names none
    assert (tmp_path / "plots" / "before_after.png").stat().st_size > 1000


def test_relearn_table_shows_leak_intervals_and_recovery():
    from agml.stats import rate

    relearn = {"variant": "full", "steps": 5, "examples": 8, "lr": 1e-5, "recovery": 0.25,
               "leaks": {"unlearned_before_attack": rate(1, 10), "unlearned_after_attack": rate(3, 10),
                         "base_before_attack": rate(9, 10), "base_after_attack": rate(10, 10)}}
    text = format_relearn(relearn)
    assert "relearning attack (full): 5 steps on 8 examples" in text
    assert "10.0% [1.8, 40.4] (1/10)" in text and "recovery" in text and "0.25" in text
    assert "held out" not in text  # a result written before held-out counts
    relearn["held_out"] = {"taught_terms": ["inception", "nolan"], "recovery": 0.125,
                           "leaks": {"unlearned_before_attack": rate(1, 10), "unlearned_after_attack": rate(2, 10),
                                     "base_before_attack": rate(9, 10), "base_after_attack": rate(9, 10)}}
    text = format_relearn(relearn)
    assert "taught: inception, nolan" in text and "held-out recovery: 0.125" in text
    held_out_row = next(line for line in text.splitlines() if "unlearned model (held-out leak)" in line)
    assert "20.0% [5.7, 51.0] (2/10)" in held_out_row


def test_lm_eval_rows_show_both_sides_per_task_and_metric():
    from agml.reporting import format_lm_eval

    text = format_lm_eval({"tasks": ["agml_general_knowledge"], "limit": 20,
                           "before": {"agml_general_knowledge": {"acc": 0.5, "acc_norm": 0.6}},
                           "after": {"agml_general_knowledge": {"acc": 0.4}}})
    assert "lm-eval (agml_general_knowledge, limit 20)" in text
    acc_norm = next(line for line in text.splitlines() if "acc_norm" in line)
    assert acc_norm.split()[-2:] == ["0.6", "-"]


def test_noise_floor_section_tabulates_flips_by_category():
    from agml.reporting import _noise_floor_section

    def counts(p2f, categories):
        return {"pass_to_fail": p2f, "fail_to_pass": 0, "changed": p2f, "n": 10,
                "pass_to_fail_by_category": categories}

    floor = {"trained": counts(3, {"neighbour": 2, "other-language": 1}),
             "random": {"per_seed": [{"seed": 0, **counts(1, {"other-language": 1})}],
                        "pass_to_fail": {"min": 1.0, "max": 1.0, "mean": 1.0}}}
    lines = _noise_floor_section({"noise_floor": floor})
    assert "| pass -> fail by category | neighbour | other-language |" in lines
    assert "| trained | 2 | 1 |" in lines and "| random seed 0 | 0 | 1 |" in lines
    del floor["trained"]["pass_to_fail_by_category"]  # a result written before the counts existed
    assert not [line for line in _noise_floor_section({"noise_floor": floor}) if "by category" in line]


def test_report_names_no_gap_when_the_facts_have_neighbours(tmp_path, evaluation):
    evaluation = {**evaluation, "judge": {**evaluation["judge"],
                                          "facts": {**evaluation["judge"]["facts"], "neighbours": ["Memento"]}}}
    report = write_report(tmp_path, options={"method": "masked-lora", "model": "tiny"}, evaluation=evaluation,
                          training=None, masks=None, parameters={"trainable": 10, "total": 100}, seconds=1.0,
                          concept="Inception")
    text = render_markdown(report)
    assert '"Memento"' in text and "No neighbours by name" not in text
