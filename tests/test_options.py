"""agml.options: one default per setting, validated once; config files; the CLI built from the fields."""

from __future__ import annotations

import json

import pytest

from agml.cli import _score_options, _unlearn_options, build_parser, main
from agml.errors import InputError
from agml.options import TrainOptions, UnlearnOptions, build_options, read_options_file


def test_defaults_are_the_demo_defaults():
    options = UnlearnOptions()
    assert (options.train.objective, options.train.steps, options.train.batch_size, options.train.lr) == (
        "forget-targets", 30, 4, 2e-3)
    assert options.train.kl_weight == 30.0 and options.mask.mask_retain_weight == 2.0
    assert options.answer_tokens == 32 and options.train.early_stop is False
    assert (options.mask.density, options.mask.strategy, options.mask.score) == (0.0025, "global", "combined")


@pytest.mark.parametrize(("settings", "message"), [
    ({"kl_weight": float("nan")}, "--kl-weight"), ({"lr": float("inf")}, "--lr"), ({"seed": -1}, "--seed"),
    ({"objective": "ascent"}, "unknown objective"), ({"density": 0.0}, "--density must be in \\(0, 1\\]"),
    ({"mask_retain_weight": -1.0}, "--mask-retain-weight"), ({"answer_tokens": 0}, "--answer-tokens"),
    ({"method": "full"}, "--method"), ({"steps": True}, "--steps"), ({"max_new_tokens": 0}, "--max-new-tokens"),
])
def test_bad_settings_are_refused_naming_the_flag(settings, message):
    with pytest.raises(InputError, match=message):
        build_options(settings)


def test_flat_dict_round_trip_and_unknown_keys():
    options = build_options({"steps": 7, "kl_weight": 2.5, "aliases": ("A", "B"), "out": "x"})
    assert UnlearnOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options
    with pytest.raises(InputError, match="unknown option 'colour'"):
        UnlearnOptions.from_dict({"colour": "red"})
    nested = UnlearnOptions.from_dict({"train": {"steps": 3}, "mask": {"density": 0.2}})
    assert nested.train.steps == 3 and nested.mask.density == 0.2


def test_an_older_config_maps_retain_weight_to_the_kl_weight():
    assert UnlearnOptions.from_dict({"retain_weight": 12.0, "extra": {}}).train.kl_weight == 12.0


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_config_file_with_flags_on_top(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("steps: 5\nmask:\n  density: 0.05\nlr: 0.01\n", encoding="utf-8")
    options = _unlearn_options(parse("unlearn", "--config", str(config), "--steps", "9", "--out", "o"))
    assert (options.train.steps, options.mask.density, options.train.lr, options.out) == (9, 0.05, 0.01, "o")


def test_list_flags_are_split_at_their_separator():
    """Every list setting given on the command line (one string) becomes a tuple of names, as in a config file."""
    options = _unlearn_options(parse(
        "unlearn", "--concept", "Dune", "--aliases", "Arrakis, Dune novel", "--forbidden", "spice,Paul Atreides",
        "--neighbour-names", "Foundation, Hyperion", "--descriptions", "the desert planet novel; a saga, of spice",
        "--entities", "Paul Atreides,Arrakis", "--out", "o"))
    assert options.aliases == ("Arrakis", "Dune novel")
    assert options.forbidden == ("spice", "Paul Atreides")
    assert options.neighbour_names == ("Foundation", "Hyperion")
    assert options.descriptions == ("the desert planet novel", "a saga, of spice")
    assert options.entities == ("Paul Atreides", "Arrakis")
    assert build_options({"forbidden": ["a ", "", "b"]}).forbidden == ("a", "b")
    with pytest.raises(InputError, match="--forbidden must be"):
        build_options({"forbidden": 3})


def test_a_runs_config_json_reruns_it(tmp_path):
    first = build_options({"steps": 4, "kl_weight": 3.0, "concept": "Dune", "aliases": ("Arrakis",), "out": "a"})
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"options": first.to_dict(), "concept": {}, "versions": {}, "argv": []}))
    assert read_options_file(config)["kl_weight"] == 3.0
    again = _unlearn_options(parse("unlearn", "--config", str(config), "--out", "b"))
    assert again == build_options({**first.to_dict(), "out": "b"})


def test_retain_weight_is_a_noted_alias_on_unlearn_and_an_error_on_score(capsys):
    options = _unlearn_options(parse("unlearn", "--retain-weight", "7", "--out", "o"))
    assert options.train.kl_weight == 7.0 and options.mask.mask_retain_weight == 2.0
    assert "--kl-weight" in capsys.readouterr().err
    with pytest.raises(InputError, match="--mask-retain-weight"):
        _score_options(parse("score", "--out", "o", "--retain-weight", "2"))


def test_score_and_unlearn_share_mask_and_answer_defaults():
    score = _score_options(parse("score", "--out", "o"))
    unlearn = _unlearn_options(parse("unlearn", "--out", "o"))
    assert score.mask == unlearn.mask and score.answer_tokens == unlearn.answer_tokens == 32
    assert score.train.batch_size == unlearn.train.batch_size
    assert _score_options(parse("score", "--out", "o", "--max-new-tokens", "48")).answer_tokens == 48


def test_score_takes_the_concept_data_unlearn_takes():
    """The facts that shape the forget and retain sets shape the masks too, so `agml score` takes them."""
    argv = ("--out", "o", "--concept", "Dune", "--forbidden", "spice", "--neighbour-names", "Foundation",
            "--descriptions", "the desert planet novel", "--entities", "Arrakis")
    score, unlearn = _score_options(parse("score", *argv)), _unlearn_options(parse("unlearn", *argv))
    for name in ("forbidden", "neighbour_names", "descriptions", "entities"):
        assert getattr(score, name) == getattr(unlearn, name) != ()


def test_score_takes_every_mask_setting_unlearn_takes():
    argv = ("--out", "o", "--score-positions", "entity", "--mask-layers", "2-5", "--per-layer-standardize",
            "--score-batch-size", "3")
    assert _score_options(parse("score", *argv)).mask == _unlearn_options(parse("unlearn", *argv)).mask
    # --batch-size of agml score is the scoring batch (it has no training step to size).
    assert _score_options(parse("score", "--out", "o", "--batch-size", "5")).mask.score_batch_size == 5


def test_help_comes_from_the_fields(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    text = capsys.readouterr().out
    assert "weight of the retain term KL(base || model)" in text and "(default: 30.0)" in text


def test_train_options_alone():
    assert TrainOptions(steps=2).make_objective().retain_weight == 30.0


@pytest.mark.parametrize("flag", ["--skip-capability", "--no-capability"])
def test_eval_skips_capability_with_unlearns_flag_or_its_older_name(flag):
    assert parse("eval", "RUN", flag).no_capability is True
    assert parse("eval", "RUN").no_capability is False
