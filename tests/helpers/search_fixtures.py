"""Small, real inputs for searches on CPU: a CoLA subset of the shared data (the `data_dir` fixture's folder) and a
2-layer BERT built from config with the packaged MiniLM tokenizer (its weights are random, it has no task head; the
pipeline is real)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def subset_glue(data_dir: Path, out: Path, train_rows: int = 320, dev_rows: int = 160) -> Path:
    """`out/glue/CoLA/{train,dev}.tsv` holding the first rows of the real files in `data_dir`."""
    folder = out / "glue" / "CoLA"
    folder.mkdir(parents=True)
    for name, rows in (("train.tsv", train_rows), ("dev.tsv", dev_rows)):
        lines = (data_dir / "glue" / "CoLA" / name).read_text().splitlines(keepends=True)[:rows]
        (folder / name).write_text("".join(lines))
    return out


def tiny_bert(out: Path, dropout: float = 0.1) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from llmm_tune.train.pretrained import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, classifier_dropout=dropout)
    BertModel(config).save_pretrained(out)  # no task head, like MiniLM: loading reports it missing
    tokenizer.save_pretrained(out)
    return out


def tiny_causal_lm(out: Path) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer (pad == eos), random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmm_tune.train.pretrained import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_space(out: Path, model: Path, name: str = "tiny_cola", searched: dict | None = None,
               warm_start: list[dict] | None = None, family: str = "glue", **fixed) -> Path:
    """A CoLA search space small enough for tests, with one warm-start point unless given others."""
    space = {
        "family": family, "task": "cola", "metric": "mcc",
        "space": {"lr": {"loguniform": [1e-3, 1e-2]}, "scale": {"loguniform": [10, 1000]},
                  "rank": {"choice": [4, 8]}, "K": {"choice": [1, 2]}, "bits": {"choice": [4]},
                  "quant_method": {"choice": ["normal_float", "uniform"]}},
        "fixed": {"model": str(model), "epochs": 2, "batch_size": 16, "max_length": 32, "evals_per_epoch": 1,
                  "loftq_iters": 1, "seed": 0, "validation_size": 64, **fixed},
        "profiles": {"cpu": {"num_samples": 2}},
        "warm_start": warm_start or [{"quant_method": "uniform", "bits": 4, "rank": 8, "lr": 5e-3, "scale": 100,
                                      "K": 2}],
    }
    space["space"].update(searched or {})
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def run_module(module: str, *args: str, timeout: float = 600, cwd: Path = ROOT,
               env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def start_module(module: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """Run in its own process group (Ray's processes included), so a test can kill all of it."""
    return subprocess.Popen([sys.executable, "-u", "-m", module, *args], cwd=ROOT, env={**ENV, **(env or {})},
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def earlier_results(folder: Path, trials: list[dict], metric: str = "mcc", mode: str = "max") -> Path:
    """A results folder as the export writes it, as far as a warm start reads one: trials.csv and best.yaml (the
    first trial's record; a warm start reads its validation metric and direction)."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(trials).to_csv(folder / "trials.csv", index=False)
    export_record(task=folder.name, trial=trials[0]["trial"],
                  validation={"metric": metric, "mode": mode, "value": trials[0][f"val_{metric}"]}).write(
        folder / "best.yaml")
    return folder


def export_record(**given):
    """An export record (best.yaml) of a trial that never ran: `given` fields over placeholders."""
    from llmm_tune.results.record import ExportRecord

    placeholders = dict(family="glue", task="cola", method="llmm", experiment="earlier", trial="t0", config={},
                        validation={"metric": "mcc", "mode": "max", "value": 0.0}, held_out={},
                        data={"source": "hub", "validation_seed": 0}, seed=0, trust_remote_code=False, git_commit="",
                        versions={}, search_command="", reproduce="")
    return ExportRecord(**{**placeholders, **given})
