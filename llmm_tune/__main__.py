"""`llmm-tune COMMAND [options]` (the console script) and `python -m llmm_tune COMMAND [options]`: the same as
`python -m llmm_tune.COMMAND [options]`."""

from __future__ import annotations

import importlib
import sys

from llmm_tune.cli import COMMANDS

USAGE = (f"usage: llmm-tune COMMAND [options]\n\ncommands: {', '.join(COMMANDS)}\n"
         "each takes --help (llmm-tune search --help); the same as python -m llmm_tune.COMMAND")


def main(argv: list[str] | None = None) -> None:
    """Run the command named first with the arguments after it (the command module is loaded by name: only the
    one asked for is imported)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command = argv[0].replace("-", "_")
    if command not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"llmm-tune {argv[0]}", *argv[1:]]
    importlib.import_module(f"llmm_tune.{command}").main()


if __name__ == "__main__":
    main()
