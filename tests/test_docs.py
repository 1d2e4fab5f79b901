"""The README and docs/ stay true to the code: every `python -m llmm_tune.<command>` they show names a command
whose options parse, every relative link leads to a file or folder of the repository, every figure quoted beside
a link into results/ is in what it links, and the README stays short enough to read in five minutes."""

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


# --- figures quoted beside a link into results/ --------------------------------------------------------------------

# a decimal number (0.3276, 7.47) or a percentage (2.5%, 5%); not a version's part (0.1.0), a word's (r16) or a
# number in scientific notation (1.9e-3)
FIGURE = re.compile(r"(?<![\w.])(\d+\.\d+|\d+(?=%))(%?)(?![\w.]*\d|[eE][-+]\d)")
NUMBER = re.compile(r"(?<![\w.])[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z*`\[(])")
TEXT_FILES = (".md", ".csv", ".json", ".yaml", ".yml", ".txt")
# (file, figure, link target) quoted where no committed file backs it, each with why; an entry that a file comes to
# back (or that is no longer quoted there) fails the test, so the list cannot outlive its reason
UNRECORDED: dict[tuple[str, str, str], str] = {}  # (file, figure, link): why a quoted figure is in no file


def sentences(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each table row and each prose sentence outside code blocks, a sentence numbered by
    the line it starts on; a sentence may run over several lines, and a heading, list item, table row, code block
    or blank line ends one."""
    units: list[tuple[int, str]] = []
    paragraph: list[tuple[int, str]] = []

    def flush() -> None:
        if not paragraph:
            return
        text, starts = "", []  # the paragraph's text; (offset, line number) where each line begins in it
        for line_number, line in paragraph:
            starts.append((len(text), line_number))
            text += line.strip() + " "
        offset = 0
        for sentence in SENTENCE_END.split(text.strip()):
            offset = text.index(sentence, offset)
            units.append((max(line for begin, line in starts if begin <= offset), sentence))
            offset += len(sentence)
        paragraph.clear()

    for number, text, fenced in logical_lines(path):
        stripped = text.strip()
        if fenced or not stripped or stripped.startswith(("#", "|", "- ", "* ")) or re.match(r"\d+\. ", stripped):
            flush()
            if fenced or not stripped or stripped.startswith("#"):
                continue
            if stripped.startswith("|"):
                units.append((number, stripped))
                continue
        paragraph.append((number, text))
    flush()
    return units


def quoted_figures(text: str) -> list[tuple[str, str]]:
    """(figure, link target) for each figure in `text` outside code spans and the link that backs it: the first
    link after the figure (a citation follows its claim), else the last link before it."""
    text = CODE_SPAN.sub(" ", text)
    links = list(LINK.finditer(text))
    found, start = [], 0
    for i, link in enumerate(links):
        end = len(text) if i == len(links) - 1 else link.end()  # after the last link: the last link's
        shown = LINK.sub(lambda other: other.group(0).split("](")[0], text[start:end])  # a link's text, not its path
        found += [(figure.group(1) + figure.group(2), link.group(1)) for figure in FIGURE.finditer(shown)]
        start = end
    return found


def file_numbers(target: Path) -> list[float]:
    """Every number in the file, or in the text files directly inside the folder, a link leads to."""
    files = sorted(p for p in target.iterdir() if p.suffix in TEXT_FILES) if target.is_dir() else [target]
    return [float(n) for f in files for n in NUMBER.findall(f.read_text(encoding="utf-8", errors="replace"))]


def holds(figure: str, numbers: list[float]) -> bool:
    """Whether a number rounds to the figure at the figure's precision (signs aside: "worse by 0.039" quotes
    -0.0393); a percentage also matches its fraction (2.5% and 0.025)."""
    percent = figure.endswith("%")
    digits = figure.rstrip("%")
    value, places = float(digits), len(digits.partition(".")[2])
    tolerance = 0.5 * 10 ** -places + 1e-9
    return any(abs(abs(n) - value) <= tolerance or (percent and abs(abs(n) * 100 - value) <= tolerance)
               for n in numbers)


def unbacked_figures(markdown: Path, root: Path) -> list[tuple[str, int, str, str]]:
    """(file name, line, figure, link target) for each figure a sentence quotes beside a link into results/ that
    the linked file (or folder) does not hold."""
    missing = []
    for number, sentence in sentences(markdown):
        for figure, target in quoted_figures(sentence):
            path = (markdown.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(root / "results") or not path.exists():
                continue  # a link elsewhere is not this test's; a broken one test_relative_link_resolves reports
            if not holds(figure, file_numbers(path)):
                missing.append((markdown.name, number, figure, target))
    return missing


def test_figures_are_in_the_results_they_link():
    missing = [found for path in MARKDOWN for found in unbacked_figures(path, ROOT)]
    unknown = [f"{name}:{line}: {figure} not in {target}" for name, line, figure, target in missing
               if (name, figure, target) not in UNRECORDED]
    assert unknown == [], "figures the results they link do not hold"
    still = {(name, figure, target) for name, _, figure, target in missing}
    assert [entry for entry in UNRECORDED if entry not in still] == [], "backed now, or gone: update UNRECORDED"


def test_figure_check_catches_a_wrong_figure(tmp_path: Path):
    """The check on a made-up README and results: right figures pass, rounded or as percentages; a wrong one, or
    one checked against the wrong link of its sentence, is reported."""
    (tmp_path / "results" / "a").mkdir(parents=True)
    (tmp_path / "results" / "a" / "table.md").write_text("| mcc | 0.3276 |\n| exact match | 0.025 |\n"
                                                          "| loss | -0.0393 |\n")
    (tmp_path / "results" / "b.csv").write_text("method,score\nllmm,7.4677\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Title\n\n"
        "| task | score | files |\n|---|---|---|\n"
        "| CoLA | 0.328, 2.5%, worse by 0.039 | [a](results/a/) |\n"  # all held (rounded, as a fraction, unsigned)
        "| CoLA | 0.329 | [a](results/a/table.md) |\n\n"  # wrong: 0.3276 rounds to 0.328
        "Alpaca reaches 7.47 ([b](results/b.csv)), CoLA 0.3276\n"  # the second figure: the next link's
        "and 7.4677 ([a](results/a/)). Not checked: 0.5 ([docs](docs/x.md)).\n\n"
        "```bash\nrun --lr 0.999 [a](results/a/)\n```\n")
    assert unbacked_figures(readme, tmp_path) == [("README.md", 6, "0.329", "results/a/table.md"),
                                                  ("README.md", 8, "7.4677", "results/a/")]
    assert quoted_figures("v0.1.0, lr 1.9e-3 and `0.7` beside [a](results/a/)") == []
    assert quoted_figures("0.5 [a](results/a/) 0.6 [b](b.md) 0.7") == [("0.5", "results/a/"), ("0.6", "b.md"),
                                                                      ("0.7", "b.md")]
    assert holds("5%", [0.05]) and holds("0.090", [0.0898]) and not holds("0.09", [0.0849])
