"""The causal-LM family: GSM8K answer extraction, loss on the response only, pad == eos, deterministic
held-out scoring, preference accuracy, the splits, bad rows, and a resumed trial."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from llmm_tune.errors import UsageError
from llmm_tune.train.lm_scoring import IGNORE, encode, greedy_generate, pad, response_loss, target_logprobs
from llmm_tune.train.pretrained import load_causal_lm, load_tokenizer
from llmm_tune.tune.context import TrialContext
from llmm_tune.tune.spaces import load_spec
from tests.helpers.search_fixtures import tiny_causal_lm
from trainables import causal_lm
from trainables.causal_data import exact_match, extract_answer, gsm8k, hh_rlhf, splits
from trainables.causal_lm import TASKS


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


@pytest.mark.parametrize("split", ["train", "test"])
def test_extraction_reads_every_real_gsm8k_reference(data_dir, split):
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / f"{split}.jsonl").read_text().splitlines()]
    for row in rows:
        example = gsm8k(row)
        gold = float(example.extra["gold"].replace(",", ""))
        assert extract_answer(example.target, strict=True) == gold, example.target  # "The final answer is: "
        assert extract_answer(row["answer"], strict=True) == gold  # the raw "#### " form
    assert any("," in gsm8k(r).extra["gold"] for r in rows)  # both splits hold answers over 999
    assert any(gsm8k(r).extra["gold"].startswith("-") for r in rows)  # and negative ones


@pytest.mark.parametrize("generation, strict, flexible", [
    ("48 + 24 = 72 clips.\nThe final answer is: 1,080", 1080, 1080),
    ("The final answer is: $18.", 18, 18),
    ("It costs $1,234.50 in all.\nThe final answer is: $1,234.50", 1234.5, 1234.5),
    ("She is down 7 points.\nThe final answer is: -7", -7, -7),
    ("The final answer is: -$5", -5, -5),
    ("#### 42", 42, 42),
    ("The final answer is: 0.5 of the cake", 0.5, 0.5),
    ("The final answer is: 5\n\nQuestion: Tom has 12 apples...\nThe final answer is: 12", 5, 5),
    ("So 3 + 4 = 7 apples in all.", None, 7),
    ("He has 3 cats and 4 dogs, 7 pets, and 1,000 fish", None, 1000),
    ("The final answer is: ten, or 10 in digits", None, 10),
    ("I do not know.", None, None),
    ("", None, None),
])
def test_extraction_on_tricky_generations(generation, strict, flexible):
    assert extract_answer(generation, strict=True) == strict
    assert extract_answer(generation, strict=False) == flexible


def test_exact_match_compares_numerically():
    generations = ["The final answer is: 1,080", "The final answer is: 18.00", "so 17", "nothing"]
    golds = ["1,080", "18", "17", "3"]
    assert exact_match(generations, golds, strict=True) == 0.5
    assert exact_match(generations, golds, strict=False) == 0.75


def test_the_loss_covers_exactly_the_response_tokens_and_its_eos(tokenizer):
    prompt, target = "What is 2 + 3?\nAnswer:", " 2 + 3 = 5. The final answer is: 5"
    encoded = encode(tokenizer, prompt, target, max_source=384, max_target=128)
    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"] == prompt_ids + target_ids + [tokenizer.eos_token_id]
    assert encoded["labels"] == [IGNORE] * len(prompt_ids) + target_ids + [tokenizer.eos_token_id]
    # truncation: the prompt keeps its end, the target its start, and a cut target has no EOS
    cut = encode(tokenizer, prompt, target, max_source=3, max_target=4)
    assert cut["input_ids"] == prompt_ids[-3:] + target_ids[:4] and cut["labels"][:3] == [IGNORE] * 3


def test_pad_equal_to_eos_keeps_every_eos_in_the_loss(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2, as GENERATIVE.md says
    eos = tokenizer.eos_token_id
    short = encode(tokenizer, "Hi", " Hello", 384, 128)
    long = encode(tokenizer, "Tell me a story about a cat", " Once upon a time there was a cat.", 384, 128)
    batch = pad([short, long], pad_id=eos)
    n = len(short["input_ids"])
    assert batch["input_ids"][0, n - 1] == eos and batch["input_ids"][0, n:].eq(eos).all()  # EOS, then padding
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][0, n - 1] == eos and batch["labels"][0, n:].eq(IGNORE).all()
    assert batch["attention_mask"][1].all() and batch["labels"][1, -1] == eos


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm"))


def test_held_out_scoring_is_deterministic_and_independent_of_batching(tiny_model_dir, tokenizer):
    model = load_causal_lm(str(tiny_model_dir))
    texts = [("Question one?", " An answer."), ("A much longer question about many things?", " Short."),
             ("Q?", " A longer answer with several more tokens in it.")]
    features = [encode(tokenizer, p, t, 384, 128) for p, t in texts]
    first = target_logprobs(model, features, tokenizer.pad_token_id, "cpu", max_tokens=4096)
    assert first == target_logprobs(model, features, tokenizer.pad_token_id, "cpu", max_tokens=4096)
    one_by_one = target_logprobs(model, features, tokenizer.pad_token_id, "cpu", max_tokens=1)  # no padding
    for (a, n), (b, m) in zip(first, one_by_one):
        assert n == m and a == pytest.approx(b, abs=1e-4)
    assert [n for _, n in first] == [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for _, t in texts]


def test_response_loss_is_the_models_own_loss_computed_on_target_positions_only(tiny_model_dir, tokenizer):
    model = load_causal_lm(str(tiny_model_dir))
    batch = pad([encode(tokenizer, "A long question with many words in it?", " Yes.", 384, 128),
                 encode(tokenizer, "Q?", " A longer answer with more tokens.", 384, 128)], tokenizer.pad_token_id)
    assert response_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), abs=1e-5)


def test_gradient_checkpointing_replays_the_adapters_noise(tiny_model_dir, tokenizer):
    batch = pad([encode(tokenizer, "Question?", " Some answer here.", 384, 128)] * 2, tokenizer.pad_token_id)
    config = tiny_config(tiny_model_dir, K=2, scale=4.0)  # large noise: a different draw changes the gradient

    def gradients(checkpointing: bool) -> tuple[float, dict]:
        model = causal_lm.build_model({**config, "gradient_checkpointing": checkpointing}, GSM8K, "cpu").train()
        torch.manual_seed(3)
        loss = response_loss(model, batch)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (plain, plain_grads), (recomputed, recomputed_grads) = gradients(False), gradients(True)
    assert recomputed == pytest.approx(plain, abs=1e-6)
    assert plain_grads and plain_grads.keys() == recomputed_grads.keys()
    assert all(torch.allclose(plain_grads[n], recomputed_grads[n], atol=1e-6) for n in plain_grads)


def test_batched_greedy_decoding_equals_one_prompt_at_a_time(tiny_model_dir, tokenizer):
    model = load_causal_lm(str(tiny_model_dir))
    prompts = ["Question one?", "A much longer question about many things?", "Q?"]
    batched = greedy_generate(model, tokenizer, prompts, 6, batch_size=3, device="cpu")
    assert batched == [greedy_generate(model, tokenizer, [p], 6, batch_size=1, device="cpu")[0] for p in prompts]
    for prompt, text in zip(prompts, batched):  # the same as transformers' own greedy search
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        reference = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
        assert text == tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True)


def test_preference_accuracy_on_pairs_whose_answer_is_known(tokenizer):
    model = load_causal_lm("smollm2")
    prompt = "\n\nHuman: What is the capital of France?\n\nAssistant:"
    good, bad = " The capital of France is Paris.", " Purple elephant seventeen banana of the."
    config = {"max_source_length": 128, "max_target_length": 64, "eval_tokens": 4096}

    def accuracy(chosen: str, rejected: str) -> float:
        examples = [hh_rlhf({"chosen": prompt + chosen, "rejected": prompt + rejected})]
        encoded = causal_lm.tokenize(examples, tokenizer, config)
        logprobs = target_logprobs(model, list(encoded), tokenizer.pad_token_id, "cpu")
        return causal_lm.preference_accuracy(model, examples, logprobs, tokenizer, config, "cpu")

    assert accuracy(good, bad) == 1.0
    assert accuracy(bad, good) == 0.0
    identical = hh_rlhf({"chosen": prompt + good, "rejected": prompt + good})
    assert "rejected" not in identical.extra  # identical pairs are not compared


def test_hh_rlhf_keys_are_the_first_human_turn():
    first = hh_rlhf({"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello\n\nHuman: More?\n\nAssistant: Yes",
                     "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello\n\nHuman: More?\n\nAssistant: No"})
    assert first.key == "Hi there" and first.prompt.endswith("More?\n\nAssistant:") and first.target == " Yes"
    assert first.extra["rejected"] == " No"


def test_splits_keep_held_out_keys_apart_and_are_seeded(data_dir):
    config = load_spec("hh_rlhf", "cpu", "llmm").fixed
    train, validation, test = splits(TASKS["hh_rlhf"].details, str(data_dir), config)
    keys = [{e.key for e in split} for split in (train, validation, test)]
    assert not keys[0] & keys[2] and not keys[1] & keys[2] and not keys[0] & keys[1]  # grouped by first turn
    assert len(test) == config["test_size"] and len(validation) >= config["validation_size"]
    assert len(train) == config["max_train_examples"]
    assert len({e.prompt[:40] for e in test}) > 1  # a sample across the four subsets, not the first file's rows
    again = splits(TASKS["hh_rlhf"].details, str(data_dir), config)
    assert [e.key for e in again[1]] == [e.key for e in validation]
    other = splits(TASKS["hh_rlhf"].details, str(data_dir), {**config, "seed": 1})
    assert [e.key for e in other[2]] == [e.key for e in test]  # the test split never depends on the trial seed
    assert [e.key for e in other[1]] != [e.key for e in validation]
    gsm = splits(TASKS["gsm8k"].details, str(data_dir), load_spec("gsm8k", "cpu", "llmm").fixed)
    assert not {e.key for e in gsm[1]} & {e.key for e in gsm[2]}  # no question shared with test


def bad_gsm8k(tmp_path):
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    good = [json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
            for i in range(40)]
    (folder / "train.jsonl").write_text("\n".join(good[:2] + ['{"question": "no answer"}'] + good[2:]) + "\n")
    (folder / "test.jsonl").write_text("\n".join(good[:5]) + "\n")
    return tmp_path


def test_a_bad_row_names_its_file_and_line_or_is_skipped_and_counted(tmp_path, capsys):
    config = {"on_bad_row": "error", "validation_size": 4, "test_size": None, "max_train_examples": None,
              "test_examples": None, "seed": 0}
    data = bad_gsm8k(tmp_path)
    with pytest.raises(UsageError, match=r"gsm8k/train.jsonl:3: expected 'question' and 'answer'.*--on-bad-row skip"):
        splits(TASKS["gsm8k"].details, str(data), config)
    train, validation, test = splits(TASKS["gsm8k"].details, str(data), {**config, "on_bad_row": "skip"})
    assert len(train) + len(validation) == 40 and len(validation) == 4  # only the bad row skipped
    assert not {e.key for e in validation} & {e.key for e in test}  # test questions never select a trial
    assert "skipped 1 bad row(s)" in capsys.readouterr().out


GSM8K = TrialContext.of("causal_lm", "gsm8k", "nll")


def tiny_config(model_dir, **overrides) -> dict:
    spec = load_spec("gsm8k", "cpu", "llmm")
    config = {**spec.fixed, **spec.warm_start[0], "model": str(model_dir), "max_train_examples": 24,
              "validation_size": 8, "test_examples": 4,
              "batch_size": 4, "epochs": 2, "evals_per_epoch": 2, "max_new_tokens": 8, "rank": 4,
              "loftq_iters": 1, "max_source_length": 64, "max_target_length": 48}
    return {**config, **overrides}


def test_a_resumed_trial_ends_in_the_same_state_as_an_uninterrupted_one(tiny_model_dir, tmp_path, data_dir, capsys):
    config = tiny_config(tiny_model_dir)
    data = causal_lm.prepare(config, GSM8K, str(data_dir))

    def run(resume=None) -> tuple[list[dict], list]:
        reports, kept = [], []

        def report(metrics: dict, directory: str) -> None:
            reports.append(metrics)
            kept.append(shutil.copytree(directory, tmp_path / f"{'resumed' if resume else 'run'}{len(kept)}"))

        torch.manual_seed(123)  # whatever the global RNG holds before, a trial's outcome must not depend on it
        causal_lm.train(config, GSM8K, data, report, resume=resume)
        return reports, kept

    reports, checkpoints = run()
    assert len(reports) == 4 and all(math.isfinite(r["val_nll"]) for r in reports)
    assert reports[-1]["val_perplexity"] == pytest.approx(math.exp(reports[-1]["val_nll"]))
    resumed, resumed_checkpoints = run(resume=str(checkpoints[1]))
    assert len(resumed) == 2
    for key in ("val_nll", "train_loss", "step", "epoch"):
        assert resumed[-1][key] == reports[-1][key], key
    from safetensors.torch import load_file

    final, again = (load_file(str(c[-1] / "adapter.safetensors")) for c in (checkpoints, resumed_checkpoints))
    assert final and final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    scores = causal_lm.score(config, GSM8K, str(checkpoints[-1]), str(data_dir))
    assert {"nll", "exact_match_strict", "exact_match_flexible", "untuned_exact_match_flexible"} <= set(scores)
    assert scores["nll"] == pytest.approx(reports[-1]["val_nll"], rel=0.5)  # same model, other examples
    capsys.readouterr()
    other_seed = causal_lm.score({**config, "seed": 1}, GSM8K, str(checkpoints[-1]), str(data_dir))
    assert other_seed["nll"] == scores["nll"]  # the same test examples whatever the training seed
    decoded = capsys.readouterr().out
    assert "with the tuned model" in decoded and "with the untuned model" not in decoded  # so it is decoded once


@pytest.mark.parametrize("metric", ["exact_match_flexible", "exact_match_strict"])
def test_selecting_on_exact_match_reports_it_on_validation_and_test(tiny_model_dir, tmp_path, data_dir, metric):
    config = tiny_config(tiny_model_dir, epochs=1, evals_per_epoch=1)
    context = TrialContext.of("causal_lm", "gsm8k", metric)
    kept, reports = [], []

    def report(metrics: dict, directory: str) -> None:
        reports.append(metrics)
        kept.append(shutil.copytree(directory, tmp_path / "checkpoint"))

    causal_lm.train(config, context, causal_lm.prepare(config, context, str(data_dir)), report)
    assert len(reports) == 1 and 0 <= reports[0][f"val_{metric}"] <= 1  # decoded on validation, as it selects
    assert metric in causal_lm.score(config, context, str(kept[0]), str(data_dir))  # compare reads it on test
