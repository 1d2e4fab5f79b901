"""A task's data as data: the `dataset:` block of a search space (or `search sft|classify --data ...`).

The block names where the rows are (a file, a folder of split files, or a hub id with optional config and
revision), an optional held-out file or split, the format, and a column mapping (ours: theirs) when the names
differ. Where the search starts, `resolve` checks it against the data once and writes back what it found: the
format (inferred from the columns when unambiguous, as TRL infers dataset types), the files named portably
with a content hash each, and what a family reads from train (a classifier's label set). The resolved block is
part of the search's YAML, so every record carries it and every trial reads the same rows from it.

A shipped task's block (`is_shipped`) is the same kind of value: its hub dataset (`path`, `name`, `splits`) and
its copy under the data folder (`local`), its format and the fields that make the task what it is. It is not
resolved where the search starts: the family reads the data folder or the hub where the trial runs. A task
sequence (the continual family's) is a list of such blocks, one a task of a shipped benchmark, in order.
"""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from llmm_tune.errors import UsageError
from llmm_tune.project import ROOT, SPACES_DIR
from llmm_tune.settings import count
from llmm_tune.train.data import BadRows, hub_reachable, local_or_hub, split_off

KEYS = {"path", "name", "revision", "splits", "test", "test_size", "format", "columns", "chat_template", "files",
        "hashes", "labels"}
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".jsonl.gz", ".json.gz", ".csv.gz", ".tsv.gz")
SHIPPED_KEYS = {"path", "name", "splits", "local", "format", "test_seed"}  # a shipped task's block; a family adds
# its own fields (`check_shipped`)
TEST_SEED = 42  # the seeded carve and draw of the test examples: the same for every trial, every family's
DEFAULT_TEST_SIZE = 0.1
INVALID_JSON = object()  # the row read from a line that is not JSON (a bad row)
HUB_SPLITS = {"train": "train", "test": "test"}  # ours -> the hub dataset's, unless `splits` says otherwise


def portable(path: Path) -> str:
    """A file as records name it: relative to the project root when inside the project's parent (links kept
    as given), else absolute."""
    path = Path(os.path.abspath(path))
    return os.path.relpath(path, ROOT) if path.is_relative_to(ROOT.parent) else str(path)


def located(recorded: str) -> Path:
    """A recorded (portable) file name on this machine."""
    return Path(os.path.normpath(ROOT / recorded))


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def check_block(block: object, where: str) -> dict:
    """The block as a mapping with known keys and a `path`; a UsageError naming the key otherwise."""
    if not isinstance(block, dict) or not isinstance(block.get("path"), str) or not block["path"]:
        raise UsageError(f"{where}: needs path: a data file, a folder of split files or a hub dataset id "
                         "(or pass --data PATH_OR_HUB_ID)")
    unknown = sorted(set(block) - KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(KEYS)}")
    columns = block.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        raise UsageError(f"{where}.columns: must map our column names to yours, e.g. {{prompt: question}}")
    return block


@dataclass(frozen=True)
class DataBlock:
    """A task's resolved `dataset:` block as it travels from the search space to every trial, record and export:
    one hashable value (the trial context holds it; a task definition is cached by it), parsed once."""

    text: str  # the block as canonical JSON: two blocks are the same when their texts are

    @classmethod
    def of(cls, block: dict | list[dict] | None) -> DataBlock | None:
        return None if block is None else cls(json.dumps(block, sort_keys=True))

    @functools.cached_property
    def fields(self) -> dict | list[dict]:
        """The block's keys and values (a task sequence's: its tasks' blocks, in order)."""
        return json.loads(self.text)

    @property
    def users(self) -> bool:
        """Whether it names the user's data (resolved where the search started), not a shipped task's."""
        return not is_shipped(self.fields)


def is_shipped(block: dict | list[dict]) -> bool:
    """Whether a `dataset:` block describes a shipped task's data (its copy under the data folder, `local`, or its
    hub dataset; a list: a sequence of a shipped benchmark's tasks), found where the trial runs, rather than the
    user's data, resolved where the search starts."""
    return isinstance(block, list) or "local" in block


def check_shipped(block: dict, formats: Iterable[str], fields: set[str], where: str) -> dict:
    """A shipped task's block with known keys (ours and the family's `fields`), a hub id, its local files and one
    of the family's `formats`; a UsageError naming the key otherwise."""
    if not isinstance(block, dict):
        raise UsageError(f"{where}: a list of blocks is a task sequence (the continual family's); give this task's "
                         "one block, a mapping")
    unknown = sorted(set(block) - SHIPPED_KEYS - fields)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(SHIPPED_KEYS | fields)}")
    local = block["local"]
    if not isinstance(local, dict) or not isinstance(local.get("folder"), str) or not isinstance(
            local.get("files"), dict):
        raise UsageError(f"{where}.local: needs folder: FOLDER (under the data folder) and files: {{split: FILE or "
                         "[FILES]}")
    if not isinstance(block.get("path"), str) or not block["path"]:
        raise UsageError(f"{where}.path: needs the task's hub dataset id (owner/name), read when no data folder is set")
    if block.get("format") not in formats:
        raise UsageError(f"{where}.format: {block.get('format')!r} is not a format of this family; choose one of "
                         f"{', '.join(formats)}")
    return block


def local_files(block: dict) -> dict[str, tuple[str, ...]]:
    """Our split -> a shipped task's files in its folder under the data folder ("all": one pool the test split is
    carved from)."""
    return {split: (names,) if isinstance(names, str) else tuple(names)
            for split, names in block["local"]["files"].items()}


def shipped_source(task: str, block: dict, data_dir: Path | None) -> str:
    """Where a shipped task's data will come from (a family's `check_data`): the data folder when given, else
    its hub dataset."""
    files = [name for names in local_files(block).values() for name in names]
    return local_or_hub(task, data_dir, Path(block["local"]["folder"]), files, block["path"])


def _shipped_space(path: Path) -> dict:
    """A shipped space's top-level keys, over those of the space it `extends:` (a shipped one, by file or name)."""
    raw = yaml.safe_load(path.read_text()) or {}
    base = raw.pop("extends", None)
    return raw if base is None else {**_shipped_space(SPACES_DIR / f"{str(base).removesuffix('.yaml')}.yaml"), **raw}


def shipped_blocks(family: str) -> dict[str, dict | list[dict]]:
    """Task -> its `dataset:` block, for each space shipped in `search_spaces/` that describes a shipped task of
    `family`: the tasks a family ships are their spaces' blocks (records that name a task alone find it here)."""
    spaces = (_shipped_space(path) for path in sorted(SPACES_DIR.glob("*.yaml")))
    return {raw["task"]: raw["dataset"] for raw in spaces
            if raw.get("family") == family and is_shipped(raw.get("dataset") or {})}


def split_files(block: dict) -> dict[str, Path]:
    """Our split -> the file that holds it ("all": one pool the test split is carved from), for file sources."""
    path = Path(os.path.abspath(Path(block["path"]).expanduser()))
    if path.is_dir():
        files = {p.name.split(".")[0]: p for p in sorted(path.iterdir()) if p.name.endswith(SUFFIXES)}
        named = {ours: files.get(theirs) for ours, theirs in {**HUB_SPLITS, **(block.get("splits") or {})}.items()}
        if named["train"] is None:
            raise UsageError(f"data folder {block['path']} holds no train file ({', '.join(sorted(files)) or 'none'} "
                             f"found); name it train.jsonl (or .csv, .parquet, ...) or map splits: {{train: NAME}}")
        found = {ours: p for ours, p in named.items() if p is not None}
        if "test" not in found:
            found = {"all": found["train"]}
    elif path.is_file():
        if not path.name.endswith(SUFFIXES):
            raise UsageError(f"{block['path']}: unknown file type; use one of {', '.join(SUFFIXES)}")
        found = {"all": path}
    else:
        raise UsageError(f"data {block['path']} not found: no such file or folder here; pass an existing file or "
                         "folder (or a hub dataset id, owner/name) with --data or dataset.path")
    if block.get("test"):
        test = Path(os.path.abspath(Path(block["test"]).expanduser()))
        if not test.is_file() or not test.name.endswith(SUFFIXES):
            raise UsageError(f"test data {block['test']} not found or not a data file ({', '.join(SUFFIXES)}); "
                             "pass an existing file to --test-data")
        found = {"train": found.pop("all", found.get("train")), "test": test}
    return found


def read_file(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) of a data file; `where` names the file and line (or row)."""
    name = path.name.removesuffix(".gz")
    try:
        if name.endswith(".jsonl"):
            yield from _json_lines(path)
            return
        if name.endswith(".json"):
            with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
                items = json.load(f)
            if not isinstance(items, list):
                raise UsageError(f"{path}: expected a JSON list of rows; fix the file or use JSON lines")
            yield from ((f"{path}: item {i + 1}", item) for i, item in enumerate(items))
            return
        if name.endswith(".parquet"):
            table = pd.read_parquet(path)
            first = 1
        else:  # csv / tsv: text stays text ("NA" is a word), numbers become numbers
            table = pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",", keep_default_na=False)
            first = 2  # the header is line 1
        for i, row in enumerate(table.to_dict("records")):
            yield f"{path}:{i + first}", row
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as error:
        raise UsageError(f"cannot read {path}: {error}; check the file") from None


def _json_lines(path: Path) -> Iterator[tuple[str, dict]]:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError:
                    yield f"{path}:{number}", INVALID_JSON


def read_hub(block: dict) -> dict[str, list[tuple[str, dict]]]:
    if not hub_reachable(block["path"]):
        raise UsageError(f"data {block['path']!r} is neither a file or folder here nor reachable on the Hugging Face "
                         "hub (offline, or no such dataset); pass a local file or folder with --data")
    from datasets import load_dataset

    splits = load_dataset(block["path"], block.get("name"), revision=block.get("revision"))
    wanted = {**HUB_SPLITS, **(block.get("splits") or {})}
    return {ours: [(f"{block['path']} {theirs} row {i + 1}", dict(r)) for i, r in enumerate(splits[theirs])]
            for ours, theirs in wanted.items() if theirs in splits}


def raw_splits(block: dict) -> dict[str, list[tuple[str, object]]]:
    """Our split -> its (where, row) pairs as the source holds them (columns not yet mapped)."""
    if block.get("files"):
        files = {split: located(name) for split, name in block["files"].items()}
    elif is_local(block):
        files = split_files(block)
    else:
        return read_hub(block)
    for split, path in files.items():
        recorded = (block.get("hashes") or {}).get(split)
        if recorded and content_hash(path) != recorded:
            print(f"warning: {portable(path)} is not the data the record was made with (content hash differs)")
    return {split: list(read_file(path)) for split, path in files.items()}


def is_local(block: dict) -> bool:
    """Whether the block names files here rather than a hub dataset (a missing path: split_files names it)."""
    path = block["path"]
    return Path(path).expanduser().exists() or path.endswith(SUFFIXES) or path.startswith((".", "/", "~"))


def columns_of(rows: list[tuple[str, object]]) -> list[str]:
    first = next((row for _, row in rows if isinstance(row, dict)), {})
    return list(first)


def mapped(row: dict, columns: dict[str, str]) -> dict:
    """The row with our column names: each mapped column renamed, the others kept."""
    renamed = {theirs: ours for ours, theirs in columns.items()}
    return {renamed.get(name, name): value for name, value in row.items()}


def check_columns(block: dict, splits: dict[str, list[tuple[str, object]]], where: str) -> list[str]:
    """The train columns; a mapping naming an absent column, or a test file with other columns, stops here."""
    train = splits.get("train", splits.get("all", []))
    if not train:
        raise UsageError(f"{where}: {block['path']} holds no rows; point --data at a file with rows")
    found = columns_of(train)
    absent = sorted(set((block.get("columns") or {}).values()) - set(found))
    if absent:
        raise UsageError(f"{where}.columns: {absent} not in {block['path']}; its columns are {found}")
    if "test" in splits and splits["test"] and set(columns_of(splits["test"])) != set(found):
        raise UsageError(f"test data has columns {columns_of(splits['test'])} but train has {found}; give both the "
                         "same columns")
    return found


def infer_format(block: dict, found: list[str], formats: dict[str, tuple[str, ...]], where: str) -> str:
    """The block's format, or the one format whose required columns the (mapped) columns hold."""
    names = set(mapped(dict.fromkeys(found), block.get("columns") or {}))
    requirements = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in formats.items())
    if block.get("format") is not None:
        if block["format"] not in formats:
            raise UsageError(f"{where}.format: unknown format {block['format']!r}; choose one of {', '.join(formats)}")
        missing = sorted(set(formats[block["format"]]) - names)
        if missing:
            raise UsageError(f"{where}: format {block['format']} needs columns {missing}; found {sorted(names)} "
                             "(map yours with --columns ours=yours)")
        return block["format"]
    fitting = [name for name, cols in formats.items() if set(cols) <= names]
    widest = [name for name in fitting if all(set(formats[other]) <= set(formats[name]) for other in fitting)]
    fitting = widest or fitting  # a text pair's columns also hold a single text's: the pair it is
    if len(fitting) != 1:
        problem = "no format fits" if not fitting else f"several formats fit ({', '.join(fitting)})"
        raise UsageError(f"{where}: {problem} the columns {sorted(names)}; pass --format (formats and the columns "
                         f"they need: {requirements}) or map columns with --columns ours=yours")
    return fitting[0]


def resolve(block: object, formats: dict[str, tuple[str, ...]], where: str = "dataset") -> dict:
    """The block checked against its data, with its format, files (portable) and their hashes filled in."""
    block = copy.deepcopy(check_block(block, where))
    if block.get("files") is not None:  # resolved already (a record's)
        return block
    splits = raw_splits(block)
    found = check_columns(block, splits, where)
    given = block.get("format") is not None
    block["format"] = infer_format(block, found, formats, where)
    held_out = count(block.get("test_size", DEFAULT_TEST_SIZE), len(splits.get("all", [])))
    sizes = ", ".join(f"{len(rows)} rows, {held_out} of them held out for test (seeded)" if split == "all"
                      else f"{len(rows)} {split} rows" for split, rows in splits.items())
    print(f"data {block['path']}: format {block['format']} ({'given' if given else 'inferred from the columns'} "
          f"{found}); {sizes}")
    if not is_local(block):
        block["files"] = {}  # a hub dataset: its id, config and revision name it
        return block
    files = split_files(block)  # found by raw_splits above already: cheap, reads no rows
    block["files"] = {split: portable(path) for split, path in files.items()}
    block["hashes"] = {split: content_hash(path) for split, path in files.items()}
    block["path"] = portable(Path(block["path"]).expanduser())
    if block.get("test"):
        block["test"] = portable(Path(block["test"]).expanduser())
    return block


def load_rows(block: dict, on_bad_row: str) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(train, test) rows with our column names; a source shipped as one pool has its test split carved
    (seeded with TEST_SEED, `test_size` of it). Rows that are not mappings are bad rows."""
    splits = raw_splits(block)
    bad_rows = BadRows(on_bad_row)
    columns = block.get("columns") or {}
    ready = {}
    for split, rows in splits.items():
        ready[split] = []
        for at, row in rows:
            if isinstance(row, dict):
                ready[split].append((at, mapped(row, columns)))
            else:
                bad_rows.add(f"{at}: {'not valid JSON' if row is INVALID_JSON else 'not a JSON object'}")
        bad_rows.done(split)
    if "all" not in ready:
        if "test" not in ready:
            raise UsageError(f"{block['path']} has no test split; add one (a test file, --test-data) or drop "
                             "it so the test split is carved from the data")
        return ready["train"], ready["test"]
    pool = ready["all"]
    kept, held = split_off(range(len(pool)), block.get("test_size", DEFAULT_TEST_SIZE), TEST_SEED)
    return [pool[i] for i in kept], [pool[i] for i in held]
