"""The README and docs/ stay true to the code: every `python -m llmm_tune.<command>` they show names a command
whose options parse, every relative link leads to a file or folder of the repository, and the README stays
short enough to read in five minutes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from llmm_tune.cli import parse_command

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 170  # the README must stay under this many lines
MARKDOWN = [README, *sorted((ROOT / "docs").glob("*.md"))]

COMMAND = re.compile(r"python\s+-m\s+llmm_tune\.")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# what ends a command on a shell line: a connecting or redirecting operator (a `#` comment ends it too)
SHELL_OPERATOR = set("&|;<>()")


def logical_lines(path: Path) -> list[tuple[int, str, bool]]:
    """(first line number, text, inside a fenced code block) for each line of a Markdown file; inside a fence a
    line ending in a backslash continues on the next, as the shell reads it."""
    lines: list[tuple[int, str, bool]] = []
    fenced = False
    pending: tuple[int, str] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            if pending:
                lines.append((*pending, True))
                pending = None
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line, False))
            continue
        start, text = pending if pending else (number, "")
        if line.rstrip().endswith("\\"):
            pending = (start, text + line.rstrip()[:-1] + " ")
        else:
            pending = None
            lines.append((start, text + line, True))
    if pending:
        lines.append((*pending, True))
    return lines


def shell_snippets(text: str, fenced: bool) -> list[str]:
    """The shell text of a line that holds a command: the line itself in a code block; in prose each code span
    that holds one, and the rest of the line after a command written outside any span (so it is checked too)."""
    if fenced:
        return [text] if COMMAND.search(text) else []
    snippets = [span for _, span in CODE_SPAN.findall(text) if COMMAND.search(span)]
    prose = CODE_SPAN.sub(" ", text)
    if match := COMMAND.search(prose):
        snippets.append(prose[match.start():])
    return snippets


def shell_words(snippet: str) -> list[str]:
    """The snippet as the shell splits it: quotes resolved, `#` comments dropped, operators as words of their own."""
    lexer = shlex.shlex(snippet, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def llmm_command(words: list[str]) -> tuple[str, list[str]]:
    """The command (`search`, ...) and its arguments, from `python -m llmm_tune.<command>` up to the first shell
    operator; anything before it (`ray job submit ... --`, `bash .ci/setup &&`) is not the command's."""
    for i in range(len(words) - 2):
        if Path(words[i]).name.startswith("python") and words[i + 1] == "-m" \
                and words[i + 2].startswith("llmm_tune."):
            tokens = []
            for word in words[i + 3:]:
                if set(word) <= SHELL_OPERATOR:
                    break
                tokens.append(word)
            return words[i + 2].removeprefix("llmm_tune."), tokens
    raise AssertionError(f"no `python -m llmm_tune.<command>` in {words}")


def shown_commands() -> list[tuple[str, str]]:
    """(FILE:LINE, shell snippet) for every command the README and docs/ show."""
    found = []
    for path in MARKDOWN:
        for number, text, fenced in logical_lines(path):
            found += [(f"{path.relative_to(ROOT)}:{number}", snippet) for snippet in shell_snippets(text, fenced)]
    return found


def relative_links() -> list[tuple[str, Path, str]]:
    """(FILE:LINE, the Markdown file, target) for every link to a path (no URL, mail address or bare #anchor),
    outside code."""
    found = []
    for path in MARKDOWN:
        for number, text, fenced in logical_lines(path):
            if fenced:
                continue
            for target in LINK.findall(CODE_SPAN.sub(" ", text)):
                if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                    continue  # http(s):, mailto:, ... or an anchor of the same page
                found.append((f"{path.relative_to(ROOT)}:{number}", path, target))
    return found


COMMANDS = shown_commands()
LINKS = relative_links()


def test_docs_show_commands_and_links():
    assert COMMANDS, "no `python -m llmm_tune.<command>` line found in README.md or docs/*.md"
    assert LINKS, "no relative Markdown link found in README.md or docs/*.md"


@pytest.mark.parametrize("snippet", [snippet for _, snippet in COMMANDS], ids=[where for where, _ in COMMANDS])
def test_shown_command_parses(snippet: str):
    command, tokens = llmm_command(shell_words(snippet))
    try:
        parse_command(command, tokens)
    except SystemExit as stop:
        pytest.fail(f"`python -m llmm_tune.{command} {shlex.join(tokens)}` does not parse (exit {stop.code})")


@pytest.mark.parametrize("markdown, target", [(path, target) for _, path, target in LINKS],
                         ids=[f"{where}:{target}" for where, _, target in LINKS])
def test_relative_link_resolves(markdown: Path, target: str):
    resolved = (markdown.parent / target.split("#", 1)[0]).resolve()
    assert resolved.is_relative_to(ROOT), f"{target} leads outside the repository"
    assert resolved.exists(), f"{target} (from {markdown.relative_to(ROOT)}) does not exist"


def test_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (under {README_MAX_LINES})"


def test_extraction():
    """The extraction itself: continuations, operators, comments, `ray job submit ... --` and prose spans."""
    assert llmm_command(shell_words("bash .ci/setup && .venv/bin/python -m llmm_tune.search glue_cola "
                                    "--data-dir ../shared/data")) == ("search", ["glue_cola", "--data-dir",
                                                                                 "../shared/data"])
    assert llmm_command(shell_words("ray job submit --address http://HEAD:8265 --working-dir . -- "
                                    "python -m llmm_tune.search glue_cola  --profile paper # a comment")) \
        == ("search", ["glue_cola", "--profile", "paper"])
    assert llmm_command(shell_words("python -m llmm_tune.plan glue_cola | tee plan.txt > /dev/null")) \
        == ("plan", ["glue_cola"])
    assert llmm_command(shell_words("python -m llmm_tune.export 'a b'>out")) == ("export", ["a b"])
    assert shell_snippets("run `python -m llmm_tune.plan x` or `ls`", fenced=False) == ["python -m llmm_tune.plan x"]
    assert shell_snippets("plain python -m llmm_tune.plan x", fenced=False) == ["python -m llmm_tune.plan x"]
