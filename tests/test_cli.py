"""What the commands share (llmm_tune/cli.py): every option says what it does and its default, `--profile auto`
means the same everywhere, and bad input ends as one line with exit code 2."""

from __future__ import annotations

import importlib

import pytest

from llmm_tune.cli import COMMANDS, main


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_text_that_names_its_default(command):
    parser = importlib.import_module(f"llmm_tune.{command}").build_parser()
    actions = [a for a in parser._actions if a.dest != "help"]
    assert actions
    for action in actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        shown = parser._get_formatter()._expand_help(action)
        if action.option_strings and action.default not in (None, False):
            assert "default" in shown, f"{command} {action.option_strings}: {shown}"


@pytest.mark.parametrize("command", ["search", "compare", "plan"])
def test_profile_auto_is_the_default_of_every_command_that_resolves_a_space(command):
    parser = importlib.import_module(f"llmm_tune.{command}").build_parser()
    (profile,) = [a for a in parser._actions if "--profile" in a.option_strings]
    assert profile.default == "auto" and {"auto", "paper", "gpu", "cpu"} == set(profile.choices)


def test_a_usage_error_is_one_line_on_stderr_with_exit_code_2(monkeypatch, capsys):
    from llmm_tune.errors import UsageError

    def fails(argv: list[str]) -> None:
        raise UsageError("--thing must be > 0, got -1")

    monkeypatch.setattr("sys.argv", ["llmm_tune.x"])
    with pytest.raises(SystemExit) as stopped:
        main(fails)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: --thing must be > 0, got -1\n"
