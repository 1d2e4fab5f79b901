"""Bad input is rejected before Ray starts: one line naming the problem and the fix, exit code 2.

The table below is the list of inputs tried (mirrored in the README's troubleshooting section).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from llmm_tune import search
from llmm_tune.project import SPACES_DIR
from tests.helpers.search_fixtures import ENV, earlier_results, run_module, tiny_space
from tests.helpers.user_data import alpaca_rows, build, chat, model_without_chat_template, rows_file

TEXT = "text"


def data_file(data_dir: Path, kind: str, folder: Path) -> str:
    return str(build(data_dir, kind, folder)[0])

SPACE = yaml.safe_load((SPACES_DIR / "glue_cola.yaml").read_text())


def space_file(tmp_path: Path, edit=None, text: str | None = None) -> str:
    path = tmp_path / "space.yaml"
    if text is None:
        raw = yaml.safe_load(yaml.safe_dump(SPACE))
        edit(raw)
        text = yaml.safe_dump(raw)
    path.write_text(text)
    return str(path)


def data_with_train_rows(tmp_path: Path, data_dir: Path, rows: str) -> str:
    folder = tmp_path / "data" / "glue" / "CoLA"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text(rows)
    (folder / "dev.tsv").write_text((data_dir / "glue" / "CoLA" / "dev.tsv").read_text())
    return str(tmp_path / "data")


def data_with_train_bytes(tmp_path: Path, data_dir: Path) -> str:
    """A train.tsv that is not UTF-8 text."""
    folder = tmp_path / "data" / "glue" / "CoLA"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_bytes(b"gj04\t1\t\t\xff\xfe broken\n")
    (folder / "dev.tsv").write_text((data_dir / "glue" / "CoLA" / "dev.tsv").read_text())
    return str(tmp_path / "data")


def timed_space(tmp_path: Path) -> str:
    """A space of the model-free family whose trials take time (tests/doubles/timed_family.py)."""
    return str(tiny_space(tmp_path, tmp_path / "no-model", "timed", family="tests.doubles.timed_family", epochs=4))


def missing_file(tmp_path: Path) -> str:
    (tmp_path / "data" / "glue" / "CoLA").mkdir(parents=True)
    return str(tmp_path / "data")


def gsm8k_with_bad_row(tmp_path: Path, data_dir: Path) -> str:
    folder = tmp_path / "data" / "gsm8k"
    folder.mkdir(parents=True)
    rows = (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:50]
    (folder / "train.jsonl").write_text("\n".join(rows[:2] + ['{"question": "What is 1 + 1?"}'] + rows[2:]) + "\n")
    (folder / "test.jsonl").write_text((data_dir / "gsm8k" / "test.jsonl").read_text())
    return str(tmp_path / "data")


def causal_space(tmp_path: Path, **fixed) -> str:
    raw = yaml.safe_load((SPACES_DIR / "gsm8k.yaml").read_text())
    raw["profiles"]["cpu"]["fixed"].update(fixed)
    path = tmp_path / "gsm8k_space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def continual_space(tmp_path: Path, order: list[str], also: tuple[dict, ...] = ()) -> str:
    """cl_local with the cpu profile's `order`, and the tasks `also` added to its dataset: list."""
    raw = yaml.safe_load((SPACES_DIR / "cl_local.yaml").read_text())
    raw["profiles"]["cpu"]["fixed"].update(order=order, on_bad_row="error")
    raw["dataset"].extend(also)
    path = tmp_path / "cl_space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def continual_with_bad_label(tmp_path: Path, data_dir: Path) -> str:
    """SST-2 of the continual benchmark with a row labelled outside its labels.json."""
    benchmark = Path("cl_benchmark") / "O-LoRA"
    task = benchmark / "CL_Benchmark" / "SC" / "SST-2"
    (tmp_path / "data" / task).mkdir(parents=True)
    (tmp_path / "data" / benchmark / "configs").mkdir()
    for name in (task / "labels.json", task / "test.json", benchmark / "configs" / "instruction_config.json"):
        (tmp_path / "data" / name).write_text((data_dir / name).read_text())
    rows = [{"sentence": "Text: a fine film .", "label": "Good"}, {"sentence": "Text: dull .", "label": "Meh"}]
    (tmp_path / "data" / task / "train.json").write_text(json.dumps(rows))
    return str(tmp_path / "data")


GOOD_ROW = "gj04\t1\t\tThe book was read by Mary.\n"
# (case, arguments given tmp_path and `data`, words the message must contain): `data()` is the data_dir fixture,
# requested by the cases that call it only
BAD_INPUTS = [
    ("unknown task", lambda t, data: ["glue_foo"], ["unknown task 'glue_foo'", "glue_cola"]),
    ("malformed YAML", lambda t, data: [space_file(t, text="task: cola\nspace: {lr: [1\n")], ["malformed YAML"]),
    ("unknown top-level key", lambda t, data: [space_file(t, lambda s: s.update(epochz=3))],
     ["unknown key(s) ['epochz']"]),
    ("unknown setting", lambda t, data: [space_file(t, lambda s: s["fixed"].update(lr_decay=1))], ["['lr_decay']"]),
    ("empty range", lambda t, data: [space_file(t, lambda s: s["space"].update(scale={"loguniform": [5, 5]}))],
     ["empty or inverted range [5, 5]", "low < high"]),
    ("inverted range", lambda t, data: [space_file(t, lambda s: s["space"].update(scale={"uniform": [9, 1]}))],
     ["empty or inverted range [9, 1]"]),
    ("rank 0", lambda t, data: [space_file(t, lambda s: s["space"].update(rank={"choice": [0, 8]}))],
     ["rank must be an integer >= 1, got 0"]),
    ("K negative", lambda t, data: [space_file(t, lambda s: s["space"].update(K={"choice": [-1]}))],
     ["K must be an integer >= 0"]),
    ("scale not positive", lambda t, data: [space_file(t, lambda s: s["space"].update(scale={"uniform": [-1, 5]}))],
     ["scale must be a number > 0, got -1"]),
    ("lr not positive", lambda t, data: [space_file(t, lambda s: s["space"].update(lr={"loguniform": [0, 1e-3]}))],
     ["lr must be a number > 0, got 0"]),
    ("bits 3", lambda t, data: [space_file(t, lambda s: s["space"].update(bits={"choice": [3, 4]}))],
     ["bits must be one of [2, 4, 8]"]),
    ("profile missing", lambda t, data: [space_file(t, lambda s: s["profiles"].pop("cpu"))], ["no 'cpu' profile"]),
    ("num-samples 0", lambda t, data: ["glue_cola", "--num-samples", "0"], ["--num-samples must be >= 1"]),
    ("data dir missing", lambda t, data: ["glue_cola", "--data-dir", str(t / "nowhere")],
     ["does not exist", "--data-dir"]),
    ("data file missing", lambda t, data: ["glue_cola", "--data-dir", missing_file(t)], ["train.tsv not found"]),
    ("data file unreadable", lambda t, data: ["glue_cola", "--data-dir", data_with_train_bytes(t, data())],
     ["cannot read", "train.tsv"]),
    ("row with wrong columns",
     lambda t, data: ["glue_cola", "--data-dir",
                      data_with_train_rows(t, data(), GOOD_ROW * 3 + "gj04\t1\tonly three\n")],
     ["train.tsv:4: expected 4 tab-separated fields, found 3"]),
    ("bad label",
     lambda t, data: ["glue_cola", "--data-dir", data_with_train_rows(t, data(), GOOD_ROW + "gj04\t7\t\tx\n")],
     ["train.tsv:2: bad label '7'"]),
    ("no data, hub unreachable", lambda t, data: ["glue_cola"], ["hub is unreachable", "--data-dir"]),
    ("task of another family", lambda t, data: [space_file(t, lambda s: s.update(task="gsm8k"))],
     ["'gsm8k' is not a task of family glue", "the family that has it"]),
    ("shipped block, unknown key", lambda t, data: [space_file(t, lambda s: s["dataset"].update(colour="red"))],
     ["dataset: unknown key(s) ['colour']"]),
    ("shipped block, no labels", lambda t, data: [space_file(t, lambda s: s["dataset"].pop("labels"))],
     ["dataset.labels: name the task's labels"]),
    ("family unknown", lambda t, data: [space_file(t, lambda s: s.update(family="no_such_family"))],
     ["unknown family 'no_such_family'"]),
    ("model not found", lambda t, data: ["glue_cola", "--data-dir", str(data()), "--model", str(t / "nowhere")],
     ["cannot load model", "nowhere", "a local folder holding config.json"]),
    ("not a causal LM", lambda t, data: [causal_space(t, model="minilm"), "--data-dir", str(data())],
     ["model 'minilm' is not a causal LM", "set model in the YAML"]),
    ("causal row without its fields", lambda t, data: ["gsm8k", "--data-dir", gsm8k_with_bad_row(t, data())],
     ["gsm8k/train.jsonl:3: expected 'question' and 'answer'", "--on-bad-row skip"]),
    ("unknown task in an order",
     lambda t, data: [continual_space(t, ["MNLI", "no_such_task"]), "--data-dir", str(data())],
     ["order (fixed.order): no_such_task not in the dataset: list of cl_local", "pick tasks from that list"]),
    ("order not a list of tasks", lambda t, data: [continual_space(t, ["MNLI", "MNLI"]), "--data-dir", str(data())],
     ["cl_space.yaml: profiles.cpu.fixed: order must be a list of distinct tasks from the space's dataset: list"]),
    ("task listed twice", lambda t, data: [continual_space(t, ["MNLI"], ({"name": "CB", "group": "NLI"},))],
     ["cl_space.yaml: dataset: a task is listed twice", "list each task once"]),
    ("task without its splits",
     lambda t, data: [continual_space(t, ["SST-2", "yelp"], ({"name": "yelp", "group": "SC"},)), "--data-dir",
                      str(data())],
     ["SC/yelp/test.json not found", "take yelp out of the order"]),
    ("label outside the task's labels",
     lambda t, data: [continual_space(t, ["SST-2"]), "--data-dir", continual_with_bad_label(t, data())],
     ["SST-2/train.json: item 2: label 'Meh' is not one of", "labels.json", "--on-bad-row skip"]),
    ("continual without a data folder", lambda t, data: ["cl_local"], ["read from a data folder", "--data-dir"]),
    ("resume of nothing", lambda t, data: ["glue_cola", "--resume", "--name", "never", "--storage", str(t)],
     ["no experiment 'never'", "drop --resume"]),
    ("results not writable", lambda t, data: ["glue_cola", "--data-dir", str(data()), "--results", "/dev/null/x"],
     ["--results /dev/null/x is not writable"]),
    ("fsdp on one worker", lambda t, data: ["glue_cola", "--data-dir", str(data()), "--fsdp"],
     ["fsdp shards each trial's model over its workers", "--workers-per-trial 2"]),
    ("fsdp for a family with its own loop",
     lambda t, data: [continual_space(t, ["SST-2"]), "--data-dir", str(data()), "--fsdp", "--workers-per-trial", "2"],
     ["--fsdp: the continual family trains each trial in one process", "drop --fsdp"]),
    ("more GPUs than the machine", lambda t, data: ["glue_cola", "--data-dir", str(data()), "--gpus-per-trial", "1"],
     ["--gpus-per-trial 1", "exceeds the 0 GPU(s)"]),
    # your own data (search sft|classify --data ...)
    ("user data missing", lambda t, data: ["sft", "--data", str(t / "nothing.jsonl")],
     ["nothing.jsonl not found", "--data"]),
    ("no data given", lambda t, data: ["sft"], ["needs path", "--data PATH_OR_HUB_ID"]),
    ("unknown hub id, offline", lambda t, data: ["sft", "--data", "someone/no_such_dataset"],
     ["'someone/no_such_dataset' is neither a file or folder here nor reachable on the Hugging Face hub", "--data"]),
    ("unknown format", lambda t, data: ["sft", "--data", data_file(data(), TEXT, t), "--format", "csvish"],
     ["unknown format 'csvish'", "text, prompt_completion, messages, alpaca, preference"]),
    ("ambiguous format",
     lambda t, data: ["sft", "--data", rows_file(t, "x.jsonl", [dict(text="a", prompt="b", completion="c")])],
     ["several formats fit (text, prompt_completion) the columns ['completion', 'prompt', 'text']", "--format"]),
    ("no format fits", lambda t, data: ["sft", "--data", rows_file(t, "x.jsonl", [dict(foo="a", bar="b")])],
     ["no format fits the columns ['bar', 'foo']", "messages: messages", "--columns ours=yours"]),
    ("column mapping names no column",
     lambda t, data: ["sft", "--data", data_file(data(), TEXT, t), "--columns", "text=body"],
     ["['body'] not in", "its columns are ['text']"]),
    ("bad --columns", lambda t, data: ["sft", "--data", data_file(data(), TEXT, t), "--columns", "text"],
     ["ours=yours pairs"]),
    ("row without a required field",
     lambda t, data: ["sft", "--data", rows_file(t, "qa.jsonl", [dict(prompt="1+1?", completion="2")] * 20
                                           + [dict(prompt="2+2?")]), "--model", "smollm2"],
     ["qa.jsonl:21: expected text in 'prompt' and a non-empty 'completion'", "--on-bad-row skip"]),
    ("conversation without an assistant turn",
     lambda t, data: ["sft", "--data", rows_file(t, "chat.jsonl", [chat(r) for r in alpaca_rows(data(), 20)]
                                           + [{"messages": [{"role": "user", "content": "hi"}]}])],
     ["chat.jsonl:21: the conversation has no assistant turn"]),
    ("one class only",
     lambda t, data: ["classify", "--data", rows_file(t, "x.jsonl", [dict(text="a", label="ok")] * 9)],
     ["single class (['ok'])", "two or more"]),
    ("messages for a model without a chat template",
     lambda t, data: ["sft", "--data", data_file(data(), "messages", t), "--model", model_without_chat_template(t)],
     ["has no chat template", "--chat-template FILE"]),
    ("warm start from a folder without results", lambda t, data: ["glue_cola", "--warm-start-from", str(t)],
     ["holds neither exported results", "(results/<task>)"]),
    ("warm start from a search sharing no setting",
     lambda t, data: ["glue_cola", "--warm-start-from",
                      str(earlier_results(t / "gorp", [dict(trial="a", learning_rate=1e-3, val_mcc=0.3)]))],
     ["its trials set none of the settings this space searches (lr, scale, rank, K, bits, quant_method)"]),
    ("no warm starts", lambda t, data: ["glue_cola", "--warm-start-from", "results/cola", "--warm-starts", "0"],
     ["--warm-starts must be >= 1, got 0"]),
    ("budget not a duration", lambda t, data: ["glue_cola", "--budget", "soon"],
     ["--budget soon: expected a duration such as 45m, 2h, 1h30m or 90s"]),
    ("budget and a trial count", lambda t, data: ["glue_cola", "--budget", "10m", "--num-samples", "3"],
     ["--budget sizes the number of trials itself; drop --num-samples"]),
    ("budget below one trial", lambda t, data: [timed_space(t), "--budget", "5s"],
     ["--budget 0.1 min is too short for one trial here", "give --budget"]),
    ("test data with other columns",
     lambda t, data: ["sft", "--data", data_file(data(), TEXT, t), "--test-data",
                      rows_file(t, "test.jsonl", [dict(body="x")])],
     ["test data has columns ['body'] but train has ['text']"]),
]


@pytest.mark.parametrize("case, argv, words", BAD_INPUTS, ids=[c for c, _, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_before_ray(case, argv, words, tmp_path, monkeypatch, capsys, request):
    args = argv(tmp_path, lambda: request.getfixturevalue("data_dir"))  # only the cases that read the data need it
    monkeypatch.delenv("LLMM_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    storage = [] if "--storage" in args else ["--storage", str(tmp_path / "runs")]
    monkeypatch.setattr(sys, "argv", ["llmm_tune.search", *args, *storage])
    with pytest.raises(SystemExit) as exit_info:
        search.main()
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    for word in words:
        assert word in message, message
    assert not ray.is_initialized()


def test_the_command_line_itself_exits_2():
    run = run_module("llmm_tune.search", "glue_foo")
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert "unknown task 'glue_foo'" in run.stderr


def test_bitsandbytes_missing_kernels_warning_is_dropped_on_every_cpu():
    """bitsandbytes logs it at import only on CPUs with AVX512-BF16; emit the same record on any CPU."""
    code = ("import logging, llmm_tune; logging.getLogger('bitsandbytes.backends.cpu.ops').warning("
            "\"Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'\"); "
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another warning')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert run.returncode == 0 and run.stderr.strip() == "another warning"
