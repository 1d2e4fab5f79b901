"""Generation and held-out scoring speed of the causal-LM family on SmolLM2-135M (GSM8K test prompts).

    python benchmarks/bench_generate.py [--data-dir ../shared/data] [--threads 2] [--problems 200]

Prints: generated tokens/s of greedy decoding batched with a KV cache vs one prompt at a time (the same
prompts, each decoding the same number of tokens; goal: batched at least 3x), the time to score
`--problems` GSM8K test problems as the export does (an Llmm NF4 model merged for decoding, greedy,
strict and flexible exact match; its tokens counted up to each sequence's EOS), and teacher-forced
held-out NLL tokens/s.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmm_tune import LlmmConfig, apply_llmm, merge_llmm  # noqa: E402
from llmm_tune.train.data import resolve_data_dir  # noqa: E402
from llmm_tune.train.lm_scoring import greedy_generate, target_logprobs  # noqa: E402
from llmm_tune.train.pretrained import load_causal_lm  # noqa: E402
from llmm_tune.tune.console import quiet_logs  # noqa: E402
from llmm_tune.tune.spaces import load_spec  # noqa: E402
from trainables import causal_lm  # noqa: E402
from trainables.causal_data import exact_match, splits  # noqa: E402


def generated_tokens(texts: list[str], tokenizer) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)  # + its EOS


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="default: $LLMM_DATA_DIR")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--problems", type=int, default=200, help="GSM8K test problems to score")
    parser.add_argument("--compare", type=int, default=16, help="prompts for batched vs one at a time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--compare-tokens", type=int, default=64, help="new tokens per prompt in the comparison")
    args = parser.parse_args()
    quiet_logs()
    torch.set_num_threads(args.threads)
    source = str(resolve_data_dir(args.data_dir or str(Path(__file__).resolve().parent.parent.parent / "shared/data")))
    config = {**load_spec("gsm8k", "cpu", "llmm").fixed, "test_examples": args.problems}
    _, validation, test = splits(causal_lm.TASKS["gsm8k"].details, source, config)
    tokenizer = causal_lm.tokenizer_for(config["model"], trust_remote_code=False)
    model = load_causal_lm("smollm2").eval()

    prompts = [e.prompt for e in test[:args.compare]]
    # past EOS too, so both sides decode the same number of tokens (the untuned model often stops at once)
    single, single_s = timed(lambda: [greedy_generate(model, tokenizer, [p], args.compare_tokens, 1, "cpu",
                                                      stop_at_eos=False)[0] for p in prompts])
    batched, batched_s = timed(lambda: greedy_generate(model, tokenizer, prompts, args.compare_tokens,
                                                       len(prompts), "cpu", stop_at_eos=False))
    tokens = len(prompts) * args.compare_tokens
    print(f"greedy decoding, {len(prompts)} prompts x {args.compare_tokens} new tokens, {args.threads} threads: "
          f"one at a time {tokens / single_s:.1f} tokens/s, batched with KV cache {tokens / batched_s:.1f} tokens/s "
          f"({single_s / batched_s:.2f}x; goal >= 3x); same text: {single == batched}")

    torch.manual_seed(0)
    adapted = apply_llmm(load_causal_lm("smollm2"), LlmmConfig(rank=16, K=2, scale=400, loftq_iters=1)).eval()
    merged, merge_s = timed(lambda: merge_llmm(copy.deepcopy(adapted)))
    generations, score_s = timed(lambda: greedy_generate(merged, tokenizer, [e.prompt for e in test],
                                                         config["max_new_tokens"], args.batch_size, "cpu"))
    golds = [e.extra["gold"] for e in test]
    print(f"scoring {len(test)} GSM8K test problems (Llmm NF4 r16 merged in {merge_s:.1f} s, greedy, "
          f"<= {config['max_new_tokens']} new tokens, batch {args.batch_size}): {score_s:.0f} s, "
          f"{generated_tokens(generations, tokenizer) / score_s:.1f} generated tokens/s; exact match "
          f"strict {exact_match(generations, golds, True):.3f} flexible {exact_match(generations, golds, False):.3f}")

    encoded = list(causal_lm.tokenize(validation, tokenizer, config))
    _, nll_s = timed(lambda: target_logprobs(adapted, encoded, tokenizer.pad_token_id, "cpu", config["eval_tokens"]))
    tokens = sum(len(f["input_ids"]) for f in encoded)
    print(f"held-out NLL of {len(encoded)} gold solutions (Llmm NF4 model, teacher-forced): {tokens / nll_s:.0f} "
          f"tokens/s ({nll_s:.1f} s)")


if __name__ == "__main__":
    main()
