"""Causal-LM building blocks the generative families share: prompt/target examples with the loss on the
target only, padding that keeps EOS in the loss when pad == eos, teacher-forced target log-likelihoods,
and batched greedy decoding with a KV cache."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BatchEncoding, DynamicCache, PreTrainedTokenizerBase

from llmm_tune.errors import UsageError
from llmm_tune.method.model import draws_needed, mean_over_draws
from llmm_tune.train.calibration import ReliabilityBins
from llmm_tune.train.progress import Progress

IGNORE = -100  # label of a position that carries no loss


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, max_source: int,
           max_target: int) -> dict[str, list[int]]:
    """input_ids = prompt + target (+ EOS when the target is whole); labels mask the prompt. The prompt
    keeps its last `max_source` tokens (its end leads into the answer), the target its first `max_target`."""
    source = tokenizer(prompt, add_special_tokens=True)["input_ids"][-max_source:]
    answer = tokenizer(target, add_special_tokens=False)["input_ids"]
    answer = answer[:max_target] if len(answer) >= max_target else answer + [tokenizer.eos_token_id]
    return {"input_ids": source + answer, "labels": [IGNORE] * len(source) + answer}


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int,
                        learnt_from: int = 0) -> dict[str, list[int]]:
    """A conversation rendered by the tokenizer's chat template, its first `max_length` tokens; the labels keep
    the assistant turns alone (TRL's assistant-only loss), those from turn `learnt_from` on (TRL's conversational
    prompt-completion: the completion's). An assistant turn is what rendering it adds to the conversation before
    it with the generation prompt, so its end-of-turn token is learnt too."""
    pieces, rendered = [], ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant" or i < learnt_from:
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (before.startswith(rendered) and through.startswith(before)):
            raise UsageError("the chat template does not render a conversation turn by turn (a turn's rendering "
                             "changes what came before it); pass --chat-template FILE with one that does")
        pieces += [(before[len(rendered):], False), (through[len(before):], True)]
        rendered = through
    ids, labels = [], []
    for text, learnt in pieces:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += tokens
        labels += tokens if learnt else [IGNORE] * len(tokens)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def pad(features: Sequence[dict], pad_id: int) -> BatchEncoding:
    """Right-padded batch whose attention mask comes from the lengths, never from `ids != pad_id`: with
    pad == eos (SmolLM2, Llama chat models) that would hide every EOS the model must learn to emit."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        ids[row, :n] = torch.tensor(feature["input_ids"])
        labels[row, :n] = torch.tensor(feature["labels"])
        mask[row, :n] = 1
    return BatchEncoding({"input_ids": ids, "attention_mask": mask, "labels": labels})


def token_batches(lengths: Sequence[int], max_tokens: int) -> Iterator[list[int]]:
    """Indices sorted by length, grouped so a padded batch holds at most `max_tokens` tokens."""
    batch, width = [], 0
    for index in np.argsort(lengths, kind="stable").tolist():
        width = max(width, lengths[index])
        if batch and width * (len(batch) + 1) > max_tokens:
            yield batch
            batch, width = [], lengths[index]
        batch.append(index)
    if batch:
        yield batch


def target_logits(model: nn.Module, batch: BatchEncoding) -> tuple[Tensor, Tensor]:
    """(logits, token ids) of every target token of a padded batch: the output layer runs only at the
    positions some row has a target at (most of a sequence is prompt, and the vocabulary projection is a
    small model's largest activation: 49,152 logits per position for SmolLM2), through the model's own
    forward (`logits_to_keep`), so soft-capping or scaling of a model's logits still applies."""
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    chosen = targets != IGNORE
    keep = chosen.any(dim=0).nonzero()[:, 0]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep,
                   use_cache=False).logits
    mask = chosen[:, keep]
    return logits[mask].float(), targets[:, keep][mask]


def response_loss(model: nn.Module, batch: BatchEncoding) -> Tensor:
    """The mean cross-entropy of the target tokens: `model(**batch).loss`, for less memory and time."""
    logits, targets = target_logits(model, batch)
    return F.cross_entropy(logits, targets)


def target_log_probs(model: nn.Module, batch: BatchEncoding, draws: int = 0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(log-probabilities of the vocabulary, token ids) at every target token of a padded batch: the mean adapter's
    (`draws` 0), else the log of the mean of `draws` adapter samples' probabilities, drawn seeded with `seed`."""
    if not draws:
        logits, targets = target_logits(model, batch)
        return logits.log_softmax(dim=-1), targets
    found = {}

    def forward() -> Tensor:
        logits, found["targets"] = target_logits(model, batch)
        return logits.log_softmax(dim=-1)

    return mean_over_draws(model, draws, forward, seed, log_space=True), found["targets"]


@torch.inference_mode()
def target_logprobs(model: nn.Module, features: Sequence[dict], pad_id: int, device: str, max_tokens: int = 4096,
                    draws: int = 0, seed: int = 0, bins: ReliabilityBins | None = None) -> list[tuple[float, int]]:
    """(sum of log p(target token), number of target tokens) per example, teacher-forced, in eval mode, with the
    mean adapter or the predictive of `draws` adapter samples (`target_log_probs`); with `bins`, each target
    token's top-1 probability and whether it is the target go into them in the same pass (token-level ECE)."""
    model.eval()
    draws = draws_needed(model, draws)
    results: list[tuple[float, int]] = [(0.0, 0)] * len(features)
    for indices in token_batches([len(f["input_ids"]) for f in features], max_tokens):
        batch = pad([features[i] for i in indices], pad_id).to(device)
        log_probs, targets = target_log_probs(model, batch, draws, seed)
        picked = log_probs.gather(1, targets[:, None])[:, 0]
        if bins is not None:
            top, guess = log_probs.max(dim=-1)
            bins.add(top.double().exp().cpu().numpy(), (guess == targets).cpu().numpy())
        rows = (batch["labels"][:, 1:] != IGNORE).nonzero()[:, 0]
        sums = torch.zeros(len(indices), dtype=torch.float64, device=picked.device).index_add_(0, rows, picked.double())
        counts = (batch["labels"][:, 1:] != IGNORE).sum(dim=1)
        for slot, index in enumerate(indices):
            results[index] = (sums[slot].item(), int(counts[slot]))
    return results


def mean_nll(logprobs: Sequence[tuple[float, int]]) -> float:
    """Token-weighted mean negative log-likelihood (its exp is the perplexity)."""
    return -sum(s for s, _ in logprobs) / max(1, sum(n for _, n in logprobs))


@torch.inference_mode()
def greedy_generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                    max_new_tokens: int, batch_size: int, device: str, stop_at_eos: bool = True,
                    progress: Progress | None = None) -> list[str]:
    """Greedy continuations (deterministic) of prompts batched by length, left-padded, with a KV cache; each
    stops at EOS (or, with `stop_at_eos=False`, runs `max_new_tokens`: for timing). Written out rather than
    `model.generate`, which keeps decoding every finished sequence until the batch's longest is done: here
    a sequence that ends leaves the batch and its cache rows go."""
    model.eval()
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    outputs: list[str] = [""] * len(prompts)
    eos = tokenizer.eos_token_id if stop_at_eos else -1
    order = np.argsort([len(ids) for ids in encoded], kind="stable").tolist()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, index in enumerate(rows):
            ids[row, width - len(encoded[index]):] = torch.tensor(encoded[index])
            mask[row, width - len(encoded[index]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                       logits_to_keep=1).logits
        generated: dict[int, list[int]] = {index: [] for index in rows}
        for step in range(max_new_tokens):
            tokens = logits[:, -1].argmax(dim=-1)
            for index, token in zip(rows, tokens.tolist()):
                generated[index].append(token)
            going = (tokens != eos).nonzero()[:, 0]
            if step + 1 == max_new_tokens or len(going) == 0:
                break
            if len(going) < len(rows):  # finished sequences leave the batch
                cache.batch_select_indices(going)
                rows, tokens, mask, positions = [rows[i] for i in going.tolist()], tokens[going], mask[going], \
                    positions[going]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
            logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, cache=cache,
                           use_cache=True).logits
        for index, tokens in generated.items():
            outputs[index] = tokenizer.decode(tokens, skip_special_tokens=True)
        if progress is not None:
            progress.advance(len(generated))
    return outputs
