"""Llmm adapter vs peft's plain LoRA on MiniLM: step time, peak memory, LoftQ time, bytes/parameter.

    python benchmarks/bench_layers.py [--rank 16] [--K 2] [--steps 20]

Both adapters run on the same base (full precision, then 4-bit NF), same rank, same targets,
same trainable heads, batch 16 x length 128, AdamW. Step times are interleaved in one process
so machine noise hits both alike. Peak memory is read per variant in a fresh subprocess: on CPU
the resident high-water mark during the steps (reset through /proc/self/clear_refs after the model
is built, so loading does not mask training), on a GPU the allocator's peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from llmm_tune import LlmmConfig, apply_llmm, bytes_per_base_parameter
from llmm_tune.method.model import DEFAULT_TARGETS
from llmm_tune.method.quant import quantized_linear, weight_bytes
from llmm_tune.train.pretrained import load_classifier

TARGETS = list(DEFAULT_TARGETS["bert"])
HEADS = ["classifier", "pooler"]


def build(kind: str, bits: int | None, rank: int, K: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    model = load_classifier("minilm", num_labels=2)
    if kind == "llmm":
        # init="zero" for both so the comparison is of the adapters, not of LoftQ's start
        config = LlmmConfig(rank=rank, K=K, bits=bits, alpha=16.0, init="zero", target_modules=TARGETS,
                            head_modules=tuple(HEADS))
        return apply_llmm(model, config).to(device)
    if bits is not None:  # the same NF4 base layers that Llmm uses, under peft's LoRA
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and any(name.endswith("." + t) for t in TARGETS):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child,
                        quantized_linear(module.weight, module.bias, bits, "normal_float"))
    config = LoraConfig(r=rank, lora_alpha=16, target_modules=TARGETS, modules_to_save=HEADS)
    return get_peft_model(model, config).to(device)


def make_step(model: nn.Module, device: str):
    torch.manual_seed(1)
    batch = {"input_ids": torch.randint(1000, 20000, (16, 128), device=device),
             "labels": torch.randint(0, 2, (16,), device=device)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def _status_mib(field: str) -> float:
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def peak_memory_mib(kind: str, bits: int | None, rank: int, K: int, device: str) -> float:
    """Peak memory (MiB) while running 3 training steps; called in a fresh subprocess."""
    model = build(kind, bits, rank, K, device)
    step = make_step(model, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident high-water mark to the current size
    for _ in range(3):
        step()
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mib("VmHWM")


def measure_memory(kind: str, bits: int | None, args) -> float:
    cmd = [sys.executable, __file__, "--memory-of", json.dumps([kind, bits]), "--rank", str(args.rank),
           "--K", str(args.K), "--device", args.device]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--K", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        kind, bits = json.loads(args.memory_of)
        print(peak_memory_mib(kind, bits, args.rank, args.K, args.device))
        return

    print(f"device={args.device} threads={torch.get_num_threads()} rank={args.rank} K={args.K} "
          f"batch=16x128 torch={torch.__version__}")
    for bits, label in [(None, "fp32 base"), (4, "NF4 base ")]:
        steps = {kind: make_step(build(kind, bits, args.rank, args.K, args.device), args.device)
                 for kind in ("llmm", "lora")}
        times = {kind: [] for kind in steps}
        for i in range(args.steps + 3):  # interleaved; the first 3 of each are warm-up
            for kind, step in steps.items():
                elapsed = step()
                if i >= 3:
                    times[kind].append(elapsed)
        llmm, lora = (statistics.median(times[k]) for k in ("llmm", "lora"))
        mem = {kind: measure_memory(kind, bits, args) for kind in ("llmm", "lora")}
        print(f"{label}: step llmm {llmm * 1e3:7.1f} ms  peft-lora {lora * 1e3:7.1f} ms  "
              f"ratio {llmm / lora:.3f} (goal <= 1.10) | peak memory llmm {mem['llmm']:.0f} MiB  "
              f"peft-lora {mem['lora']:.0f} MiB  ratio {mem['llmm'] / mem['lora']:.3f}")

    model = load_classifier("minilm", num_labels=2)
    start = time.perf_counter()
    apply_llmm(model, LlmmConfig(rank=args.rank, K=args.K, bits=4), init_device=args.device)
    print(f"LoftQ init (NF4, rank {args.rank}, 5 iterations) of all {6 * 6} MiniLM layers: "
          f"{time.perf_counter() - start:.2f} s")
    for bits, method, double_quant in [(4, "normal_float", False), (4, "normal_float", True), (2, "uniform", False)]:
        model = apply_llmm(load_classifier("minilm", num_labels=2),
                           LlmmConfig(rank=args.rank, bits=bits, quant_method=method, loftq_iters=1,
                                      double_quant=double_quant))
        size = bytes_per_base_parameter(model)
        goal = " (goal <= 4.13)" if double_quant else ""
        print(f"base weights, {bits}-bit {method}{' double-quantised' if double_quant else ''}: {size:.4f} bytes = "
              f"{8 * size:.3f} bits per parameter on MiniLM{goal}")
    # the 4096 x 4096 projections of Llama-2-7B: bitsandbytes' 1 KiB map of the 8-bit scales weighs less there
    layer = quantized_linear(torch.randn(4096, 4096) * 0.02, None, 4, "normal_float", double_quant=True)
    print(f"base weights, 4-bit normal_float double-quantised, one 4096x4096 layer: "
          f"{8 * weight_bytes(layer) / 4096**2:.3f} bits per parameter (goal <= 4.13)")


if __name__ == "__main__":
    main()
