"""Small files in each user-data format, built at run time from the shared data (`data_dir`, the fixture's folder;
never copied into the project), as a user would bring them."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pandas as pd


def gsm8k_rows(data_dir: Path, count: int) -> list[dict]:
    with open(data_dir / "gsm8k" / "train.jsonl") as f:
        return [json.loads(line) for _, line in zip(range(count), f)]


def alpaca_rows(data_dir: Path, count: int) -> list[dict]:
    return json.loads((data_dir / "alpaca" / "alpaca_5000_subset_pr152.json").read_text())[:count]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def chat(row: dict, system: str = "You are a helpful assistant.") -> dict:
    """An Alpaca row as a conversation with a system turn."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": row["output"]}]}


def glue_rows(data_dir: Path, folder: str, count: int, columns: tuple[str, ...]) -> list[list[str]]:
    with open(data_dir / "glue" / folder / "train.tsv", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        index = [header.index(c) for c in columns]
        return [[row[i].strip() for i in index] for _, row in zip(range(count), reader)]


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t" if ".tsv" in path.name else ",")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def hh_rlhf_rows(data_dir: Path, count: int) -> list[dict]:
    with gzip.open(data_dir / "hh-rlhf" / "helpful-base" / "test.jsonl.gz", "rt") as f:
        return [json.loads(line) for _, line in zip(range(count), f)]


def build(data_dir: Path, kind: str, folder: Path, count: int = 64) -> tuple[Path, dict]:
    """A data file of `kind` (a format, as a user would bring it) made from the shared data in `data_dir`, and the
    command line's dataset options for it."""
    if kind == "text":
        rows = [{"text": f"Question: {r['question']}\nAnswer: {r['answer']}"} for r in gsm8k_rows(data_dir, count)]
        return write_jsonl(folder / "text.jsonl", rows), {}
    if kind == "prompt_completion":  # their column names, mapped
        path = write_csv(folder / "qa.csv", ["question", "answer"],
                         [[r["question"], r["answer"]] for r in gsm8k_rows(data_dir, count)])
        return path, {"columns": {"prompt": "question", "completion": "answer"}}
    if kind == "messages":
        return write_jsonl(folder / "chat.jsonl", [chat(r) for r in alpaca_rows(data_dir, count)]), {}
    if kind == "alpaca":
        path = folder / "alpaca.json"
        path.write_text(json.dumps(alpaca_rows(data_dir, count)))
        return path, {}
    if kind == "preference":  # full transcripts: the shared beginning is the prompt
        return write_jsonl(folder / "pairs.jsonl.gz", hh_rlhf_rows(data_dir, count)), {}
    if kind == "single":  # string labels
        names = {"0": "negative", "1": "positive"}
        rows = [[text, names[label]] for text, label in glue_rows(data_dir, "SST-2", count, ("sentence", "label"))]
        return write_csv(folder / "reviews.csv", ["review", "sentiment"], rows), \
            {"columns": {"text": "review", "label": "sentiment"}}
    if kind == "pair":  # integer labels, parquet
        rows = glue_rows(data_dir, "MRPC", count, ("#1 String", "#2 String", "Quality"))
        path = folder / "pairs.parquet"
        pd.DataFrame([{"text": a, "text_pair": b, "label": int(q)} for a, b, q in rows]).to_parquet(path)
        return path, {}
    if kind == "regression":  # real-valued labels, gzipped TSV
        rows = glue_rows(data_dir, "STS-B", count, ("sentence1", "sentence2", "score"))
        return write_csv(folder / "similarity.tsv.gz", ["text", "text_pair", "label"], rows), {}
    raise ValueError(kind)


CAUSAL_FORMATS = ("text", "prompt_completion", "messages", "alpaca", "preference")
CLASSIFICATION_FORMATS = ("single", "pair", "regression")


def rows_file(folder: Path, name: str, rows: list[dict]) -> str:
    """A JSON-lines file of `rows` (whatever their columns), for inputs a user gets wrong."""
    return str(write_jsonl(folder / name, rows))


def model_without_chat_template(folder: Path) -> str:
    """A tiny causal LM whose tokenizer has no chat template (a base model's)."""
    from tests.helpers.search_fixtures import tiny_causal_lm

    path = tiny_causal_lm(folder / "base-llm")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return str(path)
