"""What the commands users type share: their parsers' form, and one way to end (bad input: one line, exit 2;
a stopped search: its line and code)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from llmm_tune.errors import UsageError

COMMANDS = ("search", "export", "compare", "reproduce", "export_adapter", "plan")


class Interrupted(Exception):
    """A run that stopped before its end with its state saved: Ctrl+C (exit code 130), SIGTERM (143) or a
    failure of Ray (1). The message names the command that continues it."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each option's default in its help (an option whose help says its
    default in words, or that is off or unset by default, says so itself)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def command_parser(command: str, description: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"python -m llmm_tune.{command}", description=description,
                                   formatter_class=_HelpFormatter)


def main(run: Callable[[list[str]], object]) -> None:
    """Run a command on the process's arguments; bad input ends as one line and exit code 2."""
    try:
        run(sys.argv[1:])
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.code)


def parse_command(command: str, tokens: list[str]) -> argparse.Namespace:
    """`tokens` parsed as `python -m llmm_tune.<command>` would parse them, running nothing (argparse's
    SystemExit on bad options). A command whose options pass through to another (compare's to its searches)
    parses them with its own `parse_all`."""
    if command not in COMMANDS:
        raise UsageError(f"unknown command llmm_tune.{command}; the commands are {', '.join(COMMANDS)}")
    module = importlib.import_module(f"llmm_tune.{command}")
    if hasattr(module, "parse_all"):
        return module.parse_all(tokens)[0]
    return module.build_parser().parse_args(tokens)
