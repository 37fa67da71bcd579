"""CLI input validation: one-line errors, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json

import pytest

from agml.cli import main


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def forget_file(tmp_path):
    return write_lines(tmp_path / "forget.jsonl", [json.dumps({"prompt": "Who directed Inception?"})])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--density", "0"], "--density must be in (0, 1]"),
        (["--density", "1.5"], "--density must be in (0, 1]"),
        (["--rank", "0"], "--rank must be >= 1"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--concept", "  "], "--concept must not be empty"),
    ],
)
def test_bad_option_values_are_refused_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    code, err = run_cli(["unlearn", "--out", str(out), *flags], capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_missing_forget_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    code, err = run_cli(["unlearn", "--forget", str(missing), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and str(missing) in err and "not found" in err


def test_non_json_line_names_file_and_line(tmp_path, capsys):
    bad = write_lines(tmp_path / "forget.jsonl", [json.dumps({"prompt": "ok?"}), "{not json"])
    code, err = run_cli(["unlearn", "--forget", str(bad), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and f"{bad}:2" in err and "not valid JSON" in err


def test_empty_prompt_file_is_refused(tmp_path, capsys):
    empty = write_lines(tmp_path / "forget.jsonl", [""])
    code, err = run_cli(["unlearn", "--forget", str(empty), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "empty" in err


def test_unknown_field_is_refused(tmp_path, capsys):
    odd = write_lines(tmp_path / "forget.jsonl", [json.dumps({"prompt": "hi?", "colour": "red"})])
    code, err = run_cli(["unlearn", "--forget", str(odd), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "unknown field" in err and "colour" in err


def test_retain_prompt_in_forget_file_is_refused(tmp_path, capsys):
    mixed = write_lines(tmp_path / "forget.jsonl", [json.dumps({"prompt": "hi?", "type": "retain"})])
    code, err = run_cli(["unlearn", "--forget", str(mixed), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "expected a forget prompt" in err


def test_non_empty_out_needs_force(tmp_path, capsys, forget_file):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier run")
    code, err = run_cli(["unlearn", "--forget", str(forget_file), "--out", str(out)], capsys)
    assert code == 2 and "--force" in err
    assert (out / "keep.txt").read_text() == "earlier run"


def test_resume_without_partial_run(tmp_path, capsys):
    code, err = run_cli(["unlearn", "--resume", str(tmp_path / "never")], capsys)
    assert code == 2 and "nothing to resume" in err


def test_debug_flag_shows_traceback(tmp_path, capsys):
    code, err = run_cli(["--debug", "unlearn", "--density", "3", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "Traceback" in err


def test_missing_mask_file_is_refused(tmp_path, capsys):
    missing = tmp_path / "none.safetensors"
    code, err = run_cli(["unlearn", "--masks", str(missing), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "mask file not found" in err
    assert not (tmp_path / "r").exists()


def test_design_contract_names_are_importable_from_agml():
    import agml

    for name in ("load_model", "score_neurons", "build_masks", "NeuronMasks", "apply_masked_lora", "load_adapter",
                 "export_baked"):
        assert callable(getattr(agml, name)), name


def _every_command_runs(monkeypatch, handler) -> None:
    """Make every subcommand call `handler` instead of its own work (argument parsing stays real)."""
    import agml.cli as cli

    real_build = cli.build_parser

    def parser_with_handler():
        parser = real_build()
        for action in parser._subparsers._group_actions:
            for sub in action.choices.values():
                sub.set_defaults(handler=handler)
        return parser

    monkeypatch.setattr(cli, "build_parser", parser_with_handler)


@pytest.mark.parametrize(("command", "code"), [("unlearn", 28), ("eval", 13)])
def test_a_full_disk_or_forbidden_folder_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch, command, code):
    import errno

    from agml.cli import EXIT_STORAGE

    def fails(_args):
        raise OSError(code, "from the file system", str(tmp_path / "run.partial" / "adapter.safetensors"))

    _every_command_runs(monkeypatch, fails)
    argv = ["unlearn", "--out", str(tmp_path / "run")] if command == "unlearn" else ["eval", str(tmp_path / "run")]
    assert main(argv) == EXIT_STORAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err and "adapter.safetensors" in err and len(err.strip().splitlines()) == 1
    assert ("no space left" if code == errno.ENOSPC else "permission denied") in err
    assert (f"--resume {tmp_path / 'run'}" in err) == (command == "unlearn")


def test_other_os_errors_still_raise(tmp_path, monkeypatch):
    def fails(_args):
        raise OSError(5, "I/O error")  # EIO: not something the user can fix by making room

    _every_command_runs(monkeypatch, fails)
    with pytest.raises(OSError):
        main(["eval", str(tmp_path / "run")])


def test_probes_that_are_training_prompts_are_all_named_at_once(tmp_path, capsys, forget_file):
    retain = write_lines(tmp_path / "retain.jsonl", [json.dumps({"prompt": "What is the capital of France?"}),
                                                     json.dumps({"prompt": "Who wrote Hamlet?"})])
    probes = write_lines(tmp_path / "probes.jsonl", [
        json.dumps({"prompt": "Who directed Inception?", "type": "forget", "forbidden": ["nolan"]}),
        json.dumps({"prompt": "Is this one new?", "type": "retain"}),
        json.dumps({"prompt": "Who wrote Hamlet?", "type": "retain"})])
    out = tmp_path / "run"
    code, err = run_cli(["unlearn", "--forget", str(forget_file), "--retain", str(retain), "--probes", str(probes),
                         "--out", str(out)], capsys)
    assert code == 2 and "2 probe(s) are also training prompts" in err
    assert f"{probes}:1" in err and f"{probes}:3" in err and f"{probes}:2" not in err
    assert "Traceback" not in err and not out.exists()
