"""Llmm adapter vs peft's plain LoRA at the shapes users train: step time, the share of the matmul peak, peak
memory, LoftQ time, bytes per parameter.

    python benchmarks/bench_layers.py                         # MiniLM at the main job's batch, a Llama stack at 2048
    python benchmarks/bench_layers.py --cases llama --width 4096 --ranks 16 64 --Ks 1 2
    python benchmarks/bench_layers.py --quick                 # smoke test: a few steps at one small width

Two cases, each with a full-precision and a 4-bit NF base (the same NF4 layers under both adapters), same rank,
same targets, a training step = forward, backward and an AdamW step, on one thread by default:
- minilm: the packaged MiniLM classifier at the CoLA main job's batch (cpu profile: 32 x 64), every BERT target;
- llama: a Llama-shaped stack, each block's q, k, v, o, gate, up and down projections wired as in Llama
  (attention and norms left out: they cost both adapters alike), at --width (intermediate 8/3 of it, rounded up
  to 256 as Llama's), --batch sequences of --seq tokens; its input needs a gradient, as deep in a network.
Steps of the variants are interleaved round by round (in reverse order every other round) so machine noise hits
them alike: medians, and the interquartile range of the rounds' ratios. The llama lines give the Llmm step's matmul
throughput (the step's matmul FLOPs over its median time) as a share of the one-thread peak: a plain torch.mm of
(tokens x width) by (width x width) timed in the same rounds, its fastest round. `--memory` adds the MiniLM
variants' peak memory, each in a fresh subprocess: on CPU the resident high-water mark during 3 steps (reset
through /proc/self/clear_refs after the model is built), on a GPU the allocator's peak. `--profile` prints where
each Llmm and LoRA step's time goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmm_tune import LlmmConfig, apply_llmm, bytes_per_base_parameter
from llmm_tune.method.model import DEFAULT_TARGETS
from llmm_tune.method.quant import quantized_linear, weight_bytes

TARGETS = {"minilm": list(DEFAULT_TARGETS["bert"]), "llama": list(DEFAULT_TARGETS["llama"])}
HEADS = ["classifier", "pooler"]
MAIN_JOB_BATCH = (32, 64)  # glue_cola's cpu profile: batch_size 32, max_length 64


@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison: the model, its base, and the adapter's rank and K."""

    model: str  # minilm or llama
    bits: int | None
    rank: int
    K: int
    width: int = 2048
    blocks: int = 1
    batch: tuple[int, int] = MAIN_JOB_BATCH  # sequences x tokens

    @property
    def intermediate(self) -> int:
        return 256 * math.ceil(8 * self.width / 3 / 256)

    def label(self) -> str:
        shape = f"width {self.width} x{self.blocks}" if self.model == "llama" else "MiniLM"
        return (f"{self.model} {shape}, batch {self.batch[0]}x{self.batch[1]}, {'NF4' if self.bits else 'fp32'} "
                f"base, rank {self.rank}, K {self.K}")


class LlamaShaped(nn.Module):
    """One Llama block's projections: a = o(q(x) + k(x) + v(x)); h = x + a; y = h + down(silu(gate(h)) * up(h))."""

    def __init__(self, width: int, intermediate: int):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(width, width, bias=False))
        self.gate_proj, self.up_proj = (nn.Linear(width, intermediate, bias=False) for _ in range(2))
        self.down_proj = nn.Linear(intermediate, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.o_proj(self.q_proj(x) + self.k_proj(x) + self.v_proj(x))
        return h + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def llama_stack(width: int, intermediate: int, blocks: int, device: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    stack = nn.Sequential(*(LlamaShaped(width, intermediate) for _ in range(blocks)))
    with torch.no_grad():
        for p in stack.parameters():
            p.normal_(std=width ** -0.5)
    return stack.to(device=device, dtype=dtype)


def quantize_targets(model: nn.Module, targets: list[str]) -> nn.Module:
    """The target layers as the same NF4 layers Llmm's base uses, for peft's LoRA."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    quantized_linear(module.weight, module.bias, 4, "normal_float"))
    return model


def adapted(kind: str, model: nn.Module, case: Case, targets: list[str], heads: list[str]) -> nn.Module:
    """`model` with the Llmm adapter (kind llmm, llmm-compiled) or peft's LoRA (lora) at the case's rank."""
    from peft import LoraConfig, get_peft_model

    if kind.startswith("llmm"):
        # init="zero" for both, so the comparison is of the adapters, not of LoftQ's start
        options = {"compile": True} if kind == "llmm-compiled" else {}
        config = LlmmConfig(rank=case.rank, K=case.K, bits=case.bits, alpha=16.0, init="zero",
                            target_modules=tuple(targets), head_modules=tuple(heads), **options)
        return apply_llmm(model, config)
    if case.bits is not None:
        quantize_targets(model, targets)
    return get_peft_model(model, LoraConfig(r=case.rank, lora_alpha=16, target_modules=targets,
                                            modules_to_save=heads or None))


def build(kind: str, case: Case, device: str) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    """The adapted model and its loss on a fixed batch."""
    generator = torch.Generator().manual_seed(1)
    sequences, tokens = case.batch
    if case.model == "minilm":
        from llmm_tune.train.pretrained import load_classifier

        torch.manual_seed(0)
        model = adapted(kind, load_classifier("minilm", num_labels=2), case, TARGETS["minilm"], HEADS).to(device)
        batch = {"input_ids": torch.randint(1000, 20000, case.batch, generator=generator).to(device),
                 "labels": torch.randint(0, 2, (sequences,), generator=generator).to(device)}
        return model, lambda m: m(**batch).loss
    model = adapted(kind, llama_stack(case.width, case.intermediate, case.blocks, device), case, TARGETS["llama"], [])
    x = torch.randn(sequences, tokens, case.width, generator=generator).to(device).requires_grad_()
    grad = torch.randn(x.shape, generator=generator).to(device) / x.numel()
    return model, lambda m: (m(x) * grad).sum()


def make_step(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(model).backward()
        optimizer.step()

    return step


def timed(device: str, fn: Callable[[], object]) -> float:
    """fn's seconds, waiting for the device."""
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def interleaved(steps: dict[str, Callable[[], object]], rounds: int, device: str, warmup: int = 2) -> dict[str, list]:
    """Each step's seconds in each of `rounds` rounds, the steps taking turns, in reverse order every other round
    (after `warmup` untimed rounds)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + rounds):
        for name, step in list(steps.items())[::-1 if i % 2 else 1]:
            seconds = timed(device, step)
            if i >= warmup:
                times[name].append(seconds)
    return times


def ratio_spread(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """The ratio of the medians, and the quartiles of the rounds' own ratios."""
    rounds = [a / b for a, b in zip(numerator, denominator)]
    low, _, high = statistics.quantiles(rounds, n=4) if len(rounds) > 1 else (rounds[0],) * 3
    return statistics.median(numerator) / statistics.median(denominator), low, high


def step_flops(case: Case) -> float:
    """The llama stack's matmul FLOPs in a step: each projection's forward and input gradient, and the adapter's
    x A^T, (.) B^T and their four gradient matmuls (the draw of a factor is O(K r d), left out)."""
    tokens = case.batch[0] * case.batch[1]
    w, i, r = case.width, case.intermediate, case.rank
    shapes = [(w, w)] * 4 + [(w, i)] * 2 + [(i, w)]
    return case.blocks * sum(4 * tokens * a * b + 6 * tokens * r * (a + b) for a, b in shapes)


def matmul_peak(case: Case, device: str) -> Callable[[], object]:
    """A plain torch.mm of (tokens x width) by (width x width): the throughput the step is held against."""
    tokens = case.batch[0] * case.batch[1]
    a, b = torch.randn(tokens, case.width, device=device), torch.randn(case.width, case.width, device=device)
    return lambda: torch.mm(a, b)


def compare(case: Case, args) -> str:
    """One case's line: median step times, ratio and spread; for the llama stack the share of the matmul peak."""
    kinds = ["llmm", "lora"] + (["llmm-compiled"] if args.compile else [])
    steps = {kind: make_step(*build(kind, case, args.device)) for kind in kinds}
    if case.model == "llama":
        steps["mm"] = matmul_peak(case, args.device)
    times = interleaved(steps, args.steps, args.device)
    ms = {kind: 1e3 * statistics.median(t) for kind, t in times.items()}
    ratio, low, high = ratio_spread(times["llmm"], times["lora"])
    line = (f"{case.label()}: step llmm {ms['llmm']:.1f} ms, peft-lora {ms['lora']:.1f} ms, ratio {ratio:.3f} "
            f"[{low:.3f}, {high:.3f}]")
    if args.compile:
        line += f", compiled llmm {ms['llmm-compiled']:.1f} ms (ratio {ms['llmm-compiled'] / ms['lora']:.3f})"
    if case.model == "llama":
        peak = 2 * case.batch[0] * case.batch[1] * case.width**2 / min(times["mm"])  # the fastest round: a peak
        rate, best = (step_flops(case) / f(times["llmm"]) for f in (statistics.median, min))
        line += (f" | llmm {rate / 1e9:.0f} GFLOP/s = {100 * rate / peak:.0f}% of torch.mm's {peak / 1e9:.0f} "
                 f"({100 * best / peak:.0f}% in its fastest round)")
    if args.profile:
        line += "".join(profiled(kind, steps[kind]) for kind in ("llmm", "lora"))
    return line


def profiled(kind: str, step: Callable[[], None]) -> str:
    """Where 3 steps' time goes, by operator (self time, the top 12)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                 ) as prof:
        for _ in range(3):
            step()
    return f"\n  {kind}, 3 steps:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def _status_mib(field: str) -> float:
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def peak_memory_mib(kind: str, case: Case, device: str) -> float:
    """Peak memory (MiB) while running 3 training steps; called in a fresh subprocess."""
    step = make_step(*build(kind, case, device))
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


def measure_memory(kind: str, case: Case, device: str) -> float:
    cmd = [sys.executable, __file__, "--memory-of", json.dumps([kind, dataclasses.asdict(case)]), "--device", device]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def memory_line(case: Case, device: str) -> str:
    mem = {kind: measure_memory(kind, case, device) for kind in ("llmm", "lora")}
    return (f"{case.label()}: peak memory llmm {mem['llmm']:.0f} MiB, peft-lora {mem['lora']:.0f} MiB, "
            f"ratio {mem['llmm'] / mem['lora']:.3f}")


def init_and_storage(rank: int, K: int, device: str) -> list[str]:
    """LoftQ's initialisation time of MiniLM and the bytes per base parameter of each storage format."""
    from llmm_tune.train.pretrained import load_classifier

    model = load_classifier("minilm", num_labels=2)
    start = time.perf_counter()
    apply_llmm(model, LlmmConfig(rank=rank, K=K, bits=4), init_device=device)
    lines = [f"LoftQ init (NF4, rank {rank}, 5 iterations) of all {6 * 6} MiniLM layers: "
             f"{time.perf_counter() - start:.2f} s"]
    for bits, method, double_quant in [(4, "normal_float", False), (4, "normal_float", True), (2, "uniform", False)]:
        model = apply_llmm(load_classifier("minilm", num_labels=2),
                           LlmmConfig(rank=rank, bits=bits, quant_method=method, loftq_iters=1,
                                      double_quant=double_quant))
        size = bytes_per_base_parameter(model)
        goal = " (goal <= 4.13)" if double_quant else ""
        lines.append(f"base weights, {bits}-bit {method}{' double-quantised' if double_quant else ''}: {size:.4f} "
                     f"bytes = {8 * size:.3f} bits per parameter on MiniLM{goal}")
    # the 4096 x 4096 projections of Llama-2-7B: bitsandbytes' 1 KiB map of the 8-bit scales weighs less there
    layer = quantized_linear(torch.randn(4096, 4096) * 0.02, None, 4, "normal_float", double_quant=True)
    lines.append(f"base weights, 4-bit normal_float double-quantised, one 4096x4096 layer: "
                 f"{8 * weight_bytes(layer) / 4096**2:.3f} bits per parameter (goal <= 4.13)")
    return lines


def cases(args) -> list[Case]:
    """Every comparison the options ask for, fp32 base first."""
    chosen = []
    for model in args.cases:
        batch = (args.batch, args.seq) if model == "llama" else MAIN_JOB_BATCH
        for bits in (None, 4):
            for rank in args.ranks or ([16, 64] if model == "llama" else [16]):
                chosen += [Case(model, bits, rank, K, args.width, args.blocks, batch) for K in args.Ks]
    return chosen


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=("minilm", "llama"), default=["minilm", "llama"])
    parser.add_argument("--ranks", nargs="+", type=int, help="default: 16 for MiniLM (the main job's), 16 64 else")
    parser.add_argument("--Ks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--width", type=int, default=2048, help="the Llama stack's width (4096: Llama-2-7B's)")
    parser.add_argument("--blocks", type=int, default=1, help="Llama-shaped blocks in the stack")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence of the Llama stack")
    parser.add_argument("--batch", type=int, default=1, help="sequences per batch of the Llama stack")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (after 2 untimed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time Llmm with compile: true")
    parser.add_argument("--memory", action="store_true", help="also the MiniLM variants' peak memory")
    parser.add_argument("--profile", action="store_true", help="print where each step's time goes")
    parser.add_argument("--extras", action="store_true", help="also LoftQ's time and the bytes per parameter")
    parser.add_argument("--quick", action="store_true", help="smoke test: the llama stack at width 256, 3 rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.width, args.seq, args.steps, args.ranks, args.Ks = ["llama"], 256, 64, 3, [16], [1]
    return args


def main() -> None:
    from transformers.utils import logging

    args = parse()
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()  # the packaged MiniLM's load report, each time a variant loads it
    logging.disable_progress_bar()
    if args.memory_of:
        kind, case = json.loads(args.memory_of)
        print(peak_memory_mib(kind, Case(**{**case, "batch": tuple(case["batch"])}), args.device))
        return
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} steps={args.steps} "
          f"(medians; [quartiles] of the rounds' ratios; goal: ratio <= 1.03)", flush=True)
    for case in cases(args):
        print(compare(case, args), flush=True)
        if args.memory and case.model == "minilm":
            print(memory_line(case, args.device), flush=True)
    if args.extras:
        print("\n".join(init_and_storage((args.ranks or [16])[0], args.Ks[0], args.device)))


if __name__ == "__main__":
    main()
