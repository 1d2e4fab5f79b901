"""Causal-LM building blocks the generative families share: prompt/target examples with the loss on the
target only, padding that keeps EOS in the loss when pad == eos, teacher-forced target log-likelihoods,
and batched greedy decoding with a KV cache."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from transformers import BatchEncoding, DynamicCache, PreTrainedTokenizerBase

IGNORE = -100  # label of a position that carries no loss


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, max_source: int,
           max_target: int) -> dict[str, list[int]]:
    """input_ids = prompt + target (+ EOS when the target is whole); labels mask the prompt. The prompt
    keeps its last `max_source` tokens (its end leads into the answer), the target its first `max_target`."""
    source = tokenizer(prompt, add_special_tokens=True)["input_ids"][-max_source:]
    answer = tokenizer(target, add_special_tokens=False)["input_ids"]
    answer = answer[:max_target] if len(answer) >= max_target else answer + [tokenizer.eos_token_id]
    return {"input_ids": source + answer, "labels": [IGNORE] * len(source) + answer}


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


@torch.inference_mode()
def target_logprobs(model: nn.Module, features: Sequence[dict], pad_id: int, device: str,
                    max_tokens: int = 4096) -> list[tuple[float, int]]:
    """(sum of log p(target token), number of target tokens) per example, teacher-forced, in eval mode.
    Only target positions go through the output layer: most of a sequence is prompt."""
    model.eval()
    head = model.get_output_embeddings()
    results: list[tuple[float, int]] = [(0.0, 0)] * len(features)
    for indices in token_batches([len(f["input_ids"]) for f in features], max_tokens):
        batch = pad([features[i] for i in indices], pad_id).to(device)
        hidden = model.base_model(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"]).last_hidden_state
        targets = batch["labels"][:, 1:]
        chosen = targets != IGNORE
        logprobs = head(hidden[:, :-1][chosen]).float().log_softmax(dim=-1)
        picked = logprobs.gather(1, targets[chosen][:, None])[:, 0]
        rows = chosen.nonzero()[:, 0]
        sums = torch.zeros(len(indices), dtype=torch.float64, device=picked.device).index_add_(0, rows, picked.double())
        counts = chosen.sum(dim=1)
        for slot, index in enumerate(indices):
            results[index] = (sums[slot].item(), int(counts[slot]))
    return results


def mean_nll(logprobs: Sequence[tuple[float, int]]) -> float:
    """Token-weighted mean negative log-likelihood (its exp is the perplexity)."""
    return -sum(s for s, _ in logprobs) / max(1, sum(n for _, n in logprobs))


@torch.inference_mode()
def greedy_generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                    max_new_tokens: int, batch_size: int, device: str, stop_at_eos: bool = True) -> list[str]:
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
    return outputs
