"""Your model, your data: a `dataset:` block (or `search sft|classify --data ...`) reads the user's rows in each
format, trains the assistant turns of a conversation only, records the data portably with content hashes, and a
search over it exports tables and records that `reproduce` checks against the data it finds."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

from llmm_tune.errors import UsageError
from llmm_tune.search import written_space
from llmm_tune.train import dataset
from llmm_tune.train.lm_scoring import IGNORE, encode_conversation
from llmm_tune.train.pretrained import tokenizer_for
from llmm_tune.tune.spaces import load_spec
from tests.helpers.search_fixtures import run_module, tiny_bert, tiny_causal_lm
from tests.helpers.user_data import alpaca_rows, build, chat, hh_rlhf_rows, rows_file, write_jsonl
from trainables import causal_data, causal_lm, glue_data

# a prompt holding an assistant turn of its own: only the completion's may be learnt
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
LENGTHS = {"max_source_length": 500, "max_target_length": 500}


def learnt(tokenizer, encoded: dict) -> str:
    return tokenizer.decode([token for token, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE])


def test_a_conversation_is_learnt_on_its_assistant_turns_alone_with_their_end_of_turn_tokens():
    tokenizer = tokenizer_for("smollm2", False)
    turns = PROMPT + [{"role": "assistant", "content": "4"}]
    encoded = encode_conversation(tokenizer, turns, 1000)
    assert learnt(tokenizer, encoded) == "Hello!<|im_end|>\n4<|im_end|>\n"
    assert tokenizer.decode(encoded["input_ids"]) == tokenizer.apply_chat_template(turns, tokenize=False)
    assert encode_conversation(tokenizer, turns, 5)["input_ids"] == encoded["input_ids"][:5]


def test_a_conversational_completion_alone_is_learnt_after_its_prompt_rendered_with_the_generation_prompt():
    """TRL's conversational prompt-completion: the prompt rendered with the generation prompt is masked, the loss
    falls on what the template adds after it, the prompt's own assistant turn included in the mask."""
    tokenizer = tokenizer_for("smollm2", False)
    completion = [{"role": "assistant", "content": "4"}]
    example = causal_data.prompt_completion({"prompt": PROMPT, "completion": completion})
    encoded = causal_lm.tokenize([example], tokenizer, LENGTHS)[0]
    prompt = tokenizer(tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert ids[:len(prompt)] == prompt and labels == [IGNORE] * len(prompt) + ids[len(prompt):]
    assert tokenizer.decode(ids[len(prompt):]) == "4<|im_end|>\n"
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(PROMPT + completion, tokenize=False)


def test_a_conversational_preference_pair_shares_its_prompt_and_is_scored_on_the_rejected_completion():
    """With or without a `prompt` column (TRL's implicit prompt: the conversations' shared first turns)."""
    tokenizer = tokenizer_for("smollm2", False)
    chosen, rejected = [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]
    implicit = causal_data.preference({"chosen": PROMPT + chosen, "rejected": PROMPT + rejected})
    assert implicit == causal_data.preference({"prompt": PROMPT, "chosen": chosen, "rejected": rejected})
    assert implicit.extra["prompt_turns"] == len(PROMPT) and implicit.extra["rejected"] == rejected
    assert learnt(tokenizer, causal_lm.tokenize([implicit], tokenizer, LENGTHS)[0]) == "4<|im_end|>\n"
    scored = causal_lm.tokenize([implicit], tokenizer, LENGTHS, [implicit.extra["rejected"]])[0]
    assert learnt(tokenizer, scored) == "5<|im_end|>\n"
    assert tokenizer.decode(scored["input_ids"]) == tokenizer.apply_chat_template(PROMPT + rejected, tokenize=False)


ASSISTANT, OTHER = [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]
PC, PAIR = {"prompt": PROMPT, "completion": ASSISTANT}, {"chosen": PROMPT + ASSISTANT, "rejected": PROMPT + OTHER}


@pytest.mark.parametrize("good, bad, problem", [
    (PC, {**PC, "completion": {"role": "assistant", "content": "a"}},
     "expected 'completion': a non-empty list of {role, content} with role one of system, user, assistant"),
    (PC, {**PC, "prompt": [{"role": "bot", "content": "q"}]}, "expected 'prompt': a non-empty list"),
    (PC, {**PC, "prompt": "text"}, "expected 'prompt': a non-empty list of {role, content} with role one of system, "
                                   "user, assistant (TRL's conversational form: message lists in prompt, completion)"),
    (PC, {**PC, "completion": [{"role": "user", "content": "a"}]}, "the completion has no assistant turn"),
    (PAIR, {**PAIR, "rejected": PROMPT + ASSISTANT}, "expected a prompt (or conversations sharing their first turns) "
                                                     "and two different replies"),
    (PAIR, {**PAIR, "rejected": [{"role": "user"}]}, "expected 'rejected': a non-empty list"),
], ids=["completion-not-a-list", "unknown-role", "text-beside-messages", "no-assistant-turn", "same-replies",
        "turn-without-content"])
def test_a_malformed_conversational_row_is_refused_naming_its_line_and_the_fix(good, bad, problem, tmp_path):
    path = rows_file(tmp_path, "conv.jsonl", [good] * 20 + [bad])
    block = load_spec("sft", "cpu", "llmm", dataset={"path": path}).dataset.fields
    task = causal_lm.dataset_task("sft", block).details
    with pytest.raises(UsageError, match=re.escape(f"conv.jsonl:21: {problem}") + r".*--on-bad-row skip"):
        causal_data.load(task, "dataset", "error")


def test_a_chat_template_whose_prompt_is_no_prefix_of_the_whole_is_refused_naming_the_row(tmp_path):
    path = rows_file(tmp_path, "conv.jsonl", [PC] * 20)
    block = load_spec("sft", "cpu", "llmm", dataset={"path": path}).dataset.fields
    examples = causal_data.load(causal_lm.dataset_task("sft", block).details, "dataset", "error")["train"]
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant says:{% endif %}")  # the whole renders "assistant: a"
    tokenizer = tokenizer_for("smollm2", False, template)
    with pytest.raises(UsageError, match=r"conv.jsonl:\d+: the chat template does not render a conversation turn by "
                                         r"turn .* --chat-template FILE"):
        causal_lm.tokenize(examples, tokenizer, LENGTHS)


def test_preference_transcripts_without_a_prompt_column_share_their_beginning_as_the_prompt():
    example = causal_data.preference({"chosen": "Human: hi\nAssistant: hello", "rejected": "Human: hi\nAssistant: go"})
    assert (example.prompt, example.target, example.extra["rejected"]) == ("Human: hi\nAssistant: ", "hello", "go")
    assert isinstance(causal_data.preference({"chosen": "same", "rejected": "same"}), str)  # a bad row


def transcript_turns(transcript: str) -> list[dict]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as a message list."""
    parts = re.split(r"\n\n(Human|Assistant):", transcript)
    return [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
            for who, text in zip(parts[1::2], parts[2::2])]


def conversational_file(data_dir: Path, kind: str, folder: Path) -> Path:
    """TRL's conversational form of a format, from the shared data: Alpaca rows as prompt and completion message
    lists; single-turn HH-RLHF pairs as whole conversations, no prompt column (TRL's implicit prompt)."""
    if kind == "prompt_completion":
        turns = [chat(row)["messages"] for row in alpaca_rows(data_dir, 40)]
        return write_jsonl(folder / "conv_pc.jsonl", [{"prompt": t[:-1], "completion": t[-1:]} for t in turns])
    pairs = [(transcript_turns(r["chosen"]), transcript_turns(r["rejected"])) for r in hh_rlhf_rows(data_dir, 400)]
    rows = [{"chosen": c, "rejected": r} for c, r in pairs if len(c) == len(r) == 2 and c != r
            and len(str(c + r)) < 800]  # short: the first max_source + max_target tokens hold the completion
    return write_jsonl(folder / "conv_pref.jsonl", rows[:40])


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer and chat template (random weights)."""
    return tiny_causal_lm(tmp_path_factory.mktemp("llm") / "llama")


@pytest.mark.parametrize("kind", ["prompt_completion", "preference"])
def test_a_conversational_file_is_inferred_trained_on_its_completions_and_scored(kind, tiny_llm, tmp_path, data_dir):
    """From the file to the held-out scores: the format inferred from the columns, examples learnt on what the chat
    template adds after the prompt with its generation prompt, a validation report, and test scores (preference
    accuracy from the rejected conversations)."""
    spec = load_spec("sft", "cpu", "llmm", dataset={"path": str(conversational_file(data_dir, kind, tmp_path))})
    assert spec.dataset.fields["format"] == kind
    config = {**spec.fixed, **spec.warm_start[0], "model": str(tiny_llm), "max_train_examples": 16, "rank": 4,
              "validation_size": 8, "test_examples": 4, "evals_per_epoch": 1, "grad_accum": 1, "loftq_iters": 1}
    context, source = spec.context(), spec.context().source(None)
    data = causal_lm.prepare(config, context, source)
    tokenizer = tokenizer_for(str(tiny_llm))
    for example, encoded in zip(data.validation_examples, data.validation):
        turns, start = example.extra["messages"], example.extra["prompt_turns"]
        prompt = tokenizer.apply_chat_template(turns[:start], tokenize=False, add_generation_prompt=True)
        masked = encoded["labels"].count(IGNORE)
        assert tokenizer.decode(encoded["input_ids"][:masked]) == prompt and 0 < masked < len(encoded["labels"])
        assert tokenizer.apply_chat_template(turns, tokenize=False)[len(prompt):].startswith(learnt(tokenizer, encoded))
    reports = []

    def report(metrics: dict, directory: str) -> None:
        reports.append(metrics)
        shutil.copytree(directory, tmp_path / "checkpoint", dirs_exist_ok=True)

    causal_lm.train(config, context, data, report)
    scores = causal_lm.score(config, context, str(tmp_path / "checkpoint"), source)
    assert len(reports) == 1 and math.isfinite(reports[0]["val_nll"]), reports
    assert math.isfinite(scores["nll"]) and math.isfinite(scores["untuned_nll"]), scores
    if kind == "preference":
        assert 0 <= scores["preference_accuracy"] <= 1 and 0 <= scores["untuned_preference_accuracy"] <= 1, scores


@pytest.mark.parametrize("labels, names, indices", [
    (["pos", "neg", "pos", "neutral"], ["neg", "neutral", "pos"], [2, 0, 2, 1]),
    ([2, 1, 2, 10], [1, 2, 10], [1, 0, 1, 2]),  # numbers in numeric order, not as text
])
def test_a_label_set_is_read_from_train_recorded_and_maps_every_row(labels, names, indices, tmp_path):
    path = rows_file(tmp_path, "rows.jsonl", [{"text": f"t{i}", "label": v} for i, v in enumerate(labels * 5)])
    block = load_spec("classify", "cpu", "llmm", dataset={"path": path, "test_size": 4}).dataset
    task = glue_data.dataset_task("classify", block.fields).details
    assert block.fields["labels"] == names and task.label_names == tuple(str(n) for n in names)
    train, test = glue_data.load_splits(task, "dataset")
    rows = {text: label for split in (train, test) for text, label in zip(split["text_a"], split["label"])}
    assert [rows[f"t{i}"] for i in range(len(labels))] == indices


def test_bad_rows_are_skipped_and_counted_when_asked(tmp_path, capsys):
    path = rows_file(tmp_path, "qa.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(30)]
                     + [{"prompt": "q"}, "not an object"])
    block = load_spec("sft", "cpu", "llmm", dataset={"path": path}).dataset.fields
    task = causal_data.CausalTask("sft", causal_data.prompt_completion, block)
    with pytest.raises(UsageError, match=r"qa.jsonl:32: not a JSON object; .* --on-bad-row skip"):
        causal_data.load(task, "dataset", "error")
    rows = causal_data.load(task, "dataset", "skip")
    assert len(rows["train"]) + len(rows["test"]) == 30
    out = capsys.readouterr().out
    assert "skipped 1 bad row(s)" in out and "qa.jsonl:31: expected text in 'prompt'" in out


def test_the_resolved_block_names_files_portably_with_hashes_and_a_changed_file_is_reported(tmp_path, capsys,
                                                                                            data_dir):
    path, _ = build(data_dir, "text", tmp_path)
    block = dataset.resolve({"path": str(path)}, {"text": ("text",)})
    assert block["files"] == {"all": dataset.portable(path)} and block["hashes"]["all"].startswith("sha256:")
    assert dataset.resolve(block, {"text": ("text",)}) == block  # a record's block is not resolved again
    dataset.load_rows(block, "error")
    assert "warning" not in capsys.readouterr().out
    path.write_text(path.read_text().replace("Question", "Q", 1))
    dataset.load_rows(block, "error")
    assert "is not the data the record was made with" in capsys.readouterr().out


def test_a_data_file_inside_the_projects_parent_is_named_relative_to_the_project(monkeypatch, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.setattr(dataset, "ROOT", project)
    assert dataset.portable(tmp_path / "shared" / "x.jsonl") == "../shared/x.jsonl"
    assert dataset.located("../shared/x.jsonl") == tmp_path / "shared" / "x.jsonl"


def test_a_search_on_your_own_data_writes_its_space_exports_and_reproduces_warning_of_changed_data(tmp_path,
                                                                                                   data_dir):
    """The user's flow: --write-space, edit the YAML, search it; the export's record carries the data block and
    the classifier's label names; `reproduce` retrains from the record and says when the data has changed."""
    rows = [dict(text=r["instruction"][:60], label=["short", "long"][len(r["output"]) > 300])
            for r in alpaca_rows(data_dir, 120)]
    data = rows_file(tmp_path, "lengths.jsonl", rows)
    written = tmp_path / "space.yaml"
    run = run_module("llmm_tune.search", "classify", "--data", data, "--model", "minilm", "--seed", "7",
                     "--write-space", str(written))
    assert run.returncode == 0 and "format single (inferred from the columns ['text', 'label'])" in run.stdout, run
    spec = load_spec(str(written), "paper", "llmm")  # the command line's settings win over the profile's, as they did
    assert (spec.fixed["model"], spec.fixed["seed"]) == ("minilm", 7)
    space = yaml.safe_load(written.read_text())
    space["profiles"]["cpu"] = {"fixed": {"model": str(tiny_bert(tmp_path / "bert")), "epochs": 1, "batch_size": 16,
                                          "max_length": 32, "evals_per_epoch": 1, "loftq_iters": 1},
                                "space": {"rank": {"choice": [4]}, "bits": {"choice": [4]}}, "num_samples": 1}
    written.write_text(yaml.safe_dump(space))
    run = run_module("llmm_tune.search", str(written), "--profile", "cpu", "--storage", str(tmp_path / "runs"),
                     "--results", str(tmp_path / "results"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    best = tmp_path / "results" / "classify" / "best.yaml"
    record = yaml.safe_load(best.read_text())
    assert record["data"]["dataset"]["labels"] == ["long", "short"] and "majority_accuracy" in \
        record["held_out"]["scores"]
    Path(data).write_text(Path(data).read_text().replace('"text": "', '"text": "Now ', 1))
    again = run_module("llmm_tune.reproduce", str(best), "--seeds", "0", "--threads", "1")
    assert again.returncode == 0 and "is not the data the record was made with" in again.stdout, again


def test_a_users_space_extends_a_shipped_one_by_name_and_names_its_data_in_yaml(tmp_path, data_dir):
    path, _ = build(data_dir, "prompt_completion", tmp_path)
    space = tmp_path / "tickets.yaml"
    space.write_text(yaml.safe_dump({"extends": "sft", "task": "tickets", "fixed": {"seed": 3},
                                     "dataset": {"path": str(path), "columns": {"prompt": "question",
                                                                                "completion": "answer"}}}))
    spec = load_spec(str(space), "cpu", "llmm")
    assert (spec.task, spec.family, spec.fixed["seed"], spec.fixed["model"]) == ("tickets", "causal_lm", 3, "smollm2")
    assert spec.dataset.fields["format"] == "prompt_completion"
    assert load_spec(str(space), "cpu", "llmm", text=spec.text).dataset == spec.dataset  # as a record resumes it


def test_a_written_space_carries_the_command_lines_settings_into_every_fixed_block_that_does_not_search_them():
    text = yaml.safe_dump({"family": "glue", "task": "cola", "space": {"seed": {"choice": [0, 1]}},
                           "fixed": {"alpha": 16}, "profiles": {"cpu": {"fixed": {"model": "minilm"}}, "paper": None}})
    written = yaml.safe_load(written_space(text, {"model": "mine", "seed": 7}))
    assert written["fixed"] == {"alpha": 16, "model": "mine"}  # seed stays searched there, as in a trial
    assert written["profiles"]["cpu"]["fixed"] == {"model": "mine", "seed": 7}
    assert written["profiles"]["paper"] is None and written_space(text, {}) == text
