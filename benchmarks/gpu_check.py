"""What a lent GPU should tell us, in one command of well under 10 minutes, with no internet:

    python benchmarks/gpu_check.py          # on the GPU machine
    python benchmarks/gpu_check.py --cpu    # every part up to the CUDA calls, small (what the test runs)

The GPU machine has torch, transformers, peft and accelerate; bring the rest as wheels made here by
benchmarks/gpu_wheels.sh (64 MiB a transfer: two transfers, docs/benchmarks.md says how). No model or data is
read but the shared CoLA data of part 5: the model is a random Llama built here.

Prints, each line after the device's name:
1. the 4-bit normal_float base on the device through bitsandbytes: train -> eval -> train, then the merged model's
   and the exported peft adapter's logits against the adapter's own;
2. a training step of the Llmm adapter against peft's LoRA at the same rank on the same NF4 base (median ms, ratio):
   on the random Llama, then on Llama-shaped blocks of width 4096 (benchmarks/bench_layers.py's stack) with bf16
   compute (autocast, bitsandbytes' compute dtype bf16), eager and with `compile: true`;
3. LoftQ's initialisation of one 4096 x 4096 layer (NF4, rank 64, 5 iterations);
4. where Ray is installed: the same 4 trials at --gpus-per-trial 0.25 and at 1, timed, beside the plan's prediction;
   without Ray: 4 Llmm trainings in plain processes at once against one alone (steps per second);
5. where Ray is installed: `search glue_cola --profile gpu --model minilm --budget 8m` (trials packed by memory, up
   to 4 a GPU), its predicted wall time against the measured one and trials per hour (--data-dir: the CoLA data);
   8 minutes of its own, so it runs only when asked: `--only budget`.
A part that fails prints its error and lets the others run; `--only PART` runs one.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_layers import TARGETS, Case, adapted, interleaved, llama_stack, make_step  # noqa: E402
from llmm_tune import LlmmConfig, apply_llmm, load_llmm, merge_llmm, save_adapter  # noqa: E402
from llmm_tune.method.loftq import loftq  # noqa: E402

# stack: the Llama-shaped blocks of the bf16 step comparison
SIZES = {"gpu": dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                     num_attention_heads=16, layer=4096, batch=(8, 256), steps=20,
                     stack=dict(width=4096, blocks=2, batch=(4, 512))),
         "cpu": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, layer=256, batch=(2, 32), steps=3,
                     stack=dict(width=256, blocks=1, batch=(2, 32)))}
RANK, K = 16, 2


def random_llama(size: dict, device: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = {k: v for k, v in size.items() if k not in ("layer", "batch", "steps", "stack")}
    return LlamaForCausalLM(LlamaConfig(**config, max_position_embeddings=512)).to(device)


def synchronised(device: str, fn):
    """(fn's result, its seconds), waiting for the device."""
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def train_steps(model: nn.Module, batch: torch.Tensor, steps: int) -> float:
    """`steps` AdamW steps of the language-model loss on `batch`; the last loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=batch).logits.float()


def nf4_cycle(size: dict, device: str, work: Path) -> str:
    """Train, evaluate, train again on an NF4 base; then merged and peft-exported logits against the adapter's."""
    from peft import PeftModel
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from llmm_tune.method.peft_export import to_peft

    batch = torch.randint(0, size["vocab_size"], size["batch"], device=device)
    config = LlmmConfig(rank=RANK, K=K, scale=400.0, bits=4, quant_method="normal_float", loftq_iters=2)
    model = apply_llmm(random_llama(size, device), config, init_device=device)
    first = train_steps(model, batch, size["steps"])
    logits(model, batch)
    second = train_steps(model, batch, size["steps"])  # training after an evaluation
    expected = logits(model, batch)
    save_adapter(model, work / "llmm")
    merged = merge_llmm(load_llmm(random_llama(size, device), work / "llmm", init_device=device))
    merge_error = (logits(merged, batch) - expected).abs().max().item()
    record = to_peft(model, work / "peft", "random-llama")
    base = LlamaForCausalLM.from_pretrained(work / "peft" / "base", device_map={"": device},
                                            quantization_config=BitsAndBytesConfig(**record["bnb_4bit"]))
    for layer in base.modules():  # on a CPU with AVX512-BF16, bitsandbytes would infer in bf16: keep float32
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    reloaded = PeftModel.from_pretrained(base, work / "peft" / "adapter")
    peft_error = (logits(reloaded, batch) - expected).abs().max().item()
    return (f"NF4 base through bitsandbytes: loss {first:.3f} -> {second:.3f} across an evaluation; max |logit "
            f"difference| to the adapter's: merged {merge_error:.2e}, peft export reloaded {peft_error:.2e}")


def step_times(size: dict, device: str) -> str:
    """Median step times of the Llmm adapter and of peft's LoRA, interleaved so that noise hits both alike: on the
    random Llama (float32 compute), then on the Llama-shaped blocks with bf16 compute."""
    batch = torch.randint(0, size["vocab_size"], size["batch"], device=device)
    case = Case("llama", 4, RANK, K, batch=size["batch"])
    models = {kind: adapted(kind, random_llama(size, device), case, TARGETS["llama"], [])
              for kind in ("llmm", "lora")}
    times = interleaved({kind: lambda m=model: train_steps(m, batch, 1) for kind, model in models.items()},
                        size["steps"], device)
    llmm_ms, peft_ms = (1e3 * statistics.median(times[kind]) for kind in ("llmm", "lora"))
    return (f"training step, rank {RANK}, NF4 base: random {size['num_hidden_layers']}-layer Llama of width "
            f"{size['hidden_size']}, batch {size['batch'][0]}x{size['batch'][1]}: Llmm (K={K}) {llmm_ms:.1f} ms, "
            f"peft LoRA {peft_ms:.1f} ms, ratio {llmm_ms / peft_ms:.2f}; {bf16_step_times(size, device)}")


def bf16_step_times(size: dict, device: str) -> str:
    """The step on Llama-shaped blocks in bf16 under autocast, the NF4 bases computing in bf16 (QLoRA's recipe),
    the adapters in float32: Llmm eager and compiled against peft's LoRA."""
    stack = size["stack"]
    case = Case("llama", 4, RANK, K, stack["width"], stack["blocks"], stack["batch"])
    x = torch.randn(*case.batch, case.width, device=device, dtype=torch.bfloat16, requires_grad=True)

    def loss(model: nn.Module) -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16):
            return model(x).float().pow(2).mean()

    steps = {}
    for kind in ("llmm", "llmm-compiled", "lora"):
        model = adapted(kind, llama_stack(case.width, case.intermediate, case.blocks, device, torch.bfloat16),
                        case, TARGETS["llama"], [])
        for layer in model.modules():
            if hasattr(layer, "compute_dtype"):  # bitsandbytes' 4-bit layers
                layer.compute_dtype = torch.bfloat16
        steps[kind] = make_step(model, loss)
    try:  # where torch.compile cannot run here, the eager figures still come
        steps["llmm-compiled"]()
    except Exception as error:
        compiled = f"compiled Llmm failed ({type(error).__name__}: {str(error)[:200]})"
        del steps["llmm-compiled"]
    ms = {kind: 1e3 * statistics.median(t) for kind, t in interleaved(steps, size["steps"], device).items()}
    if "llmm-compiled" in ms:
        compiled = f"compiled Llmm (K={K}) {ms['llmm-compiled']:.1f} ms, ratio {ms['llmm-compiled'] / ms['lora']:.2f}"
    return (f"{case.blocks} Llama-shaped blocks of width {case.width}, bf16 compute, batch {case.batch[0]}x"
            f"{case.batch[1]}: {compiled}; eager Llmm (K={K}) {ms['llmm']:.1f} ms, peft LoRA {ms['lora']:.1f} ms, "
            f"ratio {ms['llmm'] / ms['lora']:.2f}")


def loftq_time(size: dict, device: str) -> str:
    n = size["layer"]
    weight = torch.randn(n, n, device=device) * 0.02
    loftq(weight[:256, :256], 64, 4, "normal_float", 1, 0.25)  # the solver's one-time start, not LoftQ's time
    result, seconds = synchronised(device, lambda: loftq(weight, 64, 4, "normal_float", 5, 0.25))
    return (f"LoftQ of one {n}x{n} layer (NF4, rank 64, 5 iterations): {seconds:.2f} s, relative error "
            f"{result.errors[-1] / torch.linalg.norm(weight).item():.4f}")


def saved_random_llama(size: dict, folder: Path) -> Path:
    """The random Llama with a word-level tokenizer of its vocabulary (w0, w1, ...), saved as a model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(size["vocab_size"] - 3)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    model = random_llama(size, "cpu")
    model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id = 0, 1, None
    model.save_pretrained(folder)
    return folder


def packing(size: dict, work: Path) -> list[str]:
    """The same 4 trials at a quarter of a GPU each and at a whole one, beside the plan's prediction."""
    data = work / "text.jsonl"
    data.write_text("".join(f'{{"text": "{" ".join(f"w{(i * j) % 500}" for j in range(120))}"}}\n'
                            for i in range(400)))
    space, figures = work / "space.yaml", work / "figures.json"
    command = [sys.executable, "-m"]
    written = subprocess.run([*command, "llmm_tune.search", "sft", "--data", str(data), "--model",
                              str(saved_random_llama(size, work / "model")), "--profile", "cpu",
                              "--write-space", str(space)], capture_output=True, text=True, cwd=ROOT)
    if written.returncode:
        raise RuntimeError(f"--write-space failed: {written.stderr.strip()[-300:]}")
    common = ["--profile", "cpu", "--num-samples", "4"]
    lines = []
    for gpus in ("0.25", "1"):  # the plan probes once, then reads the probe's figures
        probe = ["--save-figures", str(figures)] if gpus == "0.25" else ["--figures", str(figures)]
        plan = subprocess.run([*command, "llmm_tune.plan", str(space), *common, "--gpus-per-trial", gpus, *probe],
                              capture_output=True, text=True, cwd=ROOT)
        lines += [f"plan at --gpus-per-trial {gpus}: {line.strip()}" for line in plan.stdout.splitlines()
                  if "wall" in line or "per GPU" in line] or [f"plan failed: {plan.stderr.strip()[-300:]}"]
        search = [*command, "llmm_tune.search", str(space), *common, "--gpus-per-trial", gpus, "--no-export",
                  "--storage", str(work / f"runs-{gpus}")]
        run, seconds = synchronised("cpu", lambda s=search: subprocess.run(s, capture_output=True, text=True, cwd=ROOT))
        lines.append(f"search of 4 trials at --gpus-per-trial {gpus}: {seconds:.0f} s (exit {run.returncode})"
                     + (f": {run.stderr.strip()[-300:]}" if run.returncode else ""))
    return lines


def budgeted_search(work: Path, data_dir: Path) -> list[str]:
    """`search glue_cola --profile gpu --budget 8m` with the packaged MiniLM (trials packed by the probe's memory, up to
    4 a GPU): the sizing line, its predicted wall time against the measured one, and trials per hour."""
    if not (data_dir / "glue").is_dir():
        raise RuntimeError(f"no GLUE data under {data_dir}: pass --data-dir (the shared data folder)")
    results = work / "budget-results"
    search = [sys.executable, "-m", "llmm_tune.search", "glue_cola", "--profile", "gpu", "--model", "minilm",
              "--budget", "8m", "--data-dir", str(data_dir), "--storage", str(work / "budget-runs"),
              "--results", str(results)]
    run, seconds = synchronised("cpu", lambda: subprocess.run(search, capture_output=True, text=True, cwd=ROOT))
    if run.returncode:
        raise RuntimeError(f"the budgeted search failed: {run.stderr.strip()[-300:]}")
    sized = next(line for line in run.stdout.splitlines() if line.startswith("budget "))
    predicted = float(re.search(r"about ([\d.]+) min predicted", sized).group(1))
    trials = len((results / "cola" / "trials.csv").read_text().strip().splitlines()) - 1
    return [sized, f"budgeted search: {seconds / 60:.1f} min measured against {predicted:.1f} min predicted "
                   f"({100 * (predicted * 60 - seconds) / seconds:+.0f}%), {trials} trials: "
                   f"{trials * 3600 / seconds:.0f} trials per hour"]


def packed_throughput(device: str, processes: int) -> float:
    """Training steps per second of `processes` Llmm trainings run at once on one device (without Ray): each warms
    up, then all start their timed steps together; all their steps over the span from the first start to the last
    end."""
    worker = [sys.executable, __file__, "--worker", *(["--cpu"] if device == "cpu" else [])]
    runs = [subprocess.Popen(worker, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            for _ in range(processes)]
    try:
        if any(run.stdout.readline().strip() != "ready" for run in runs):
            raise RuntimeError("a packing worker failed while warming up")
        for run in runs:
            run.stdin.write("go\n")
            run.stdin.flush()
        timed = [[float(x) for x in run.communicate()[0].split()[-3:]] for run in runs]  # steps, start, end
    finally:
        for run in runs:
            run.kill()
    return sum(steps for steps, _, _ in timed) / (max(end for *_, end in timed) - min(start for _, start, _ in timed))


def packing_without_ray(size: dict, device: str) -> str:
    """What fractional packing buys, measured with plain processes where Ray cannot be brought along."""
    alone, together = packed_throughput(device, 1), packed_throughput(device, 4)
    return (f"4 Llmm trainings at once on one device (no Ray): {together:.1f} steps/s together against "
            f"{alone:.1f} alone, a gain of {together / alone:.2f}x from packing 4 trials")


def worker_rate(size: dict, device: str) -> None:
    """One packed training: after two warm-up steps and the go, print its steps and their wall-clock start and end."""
    batch = torch.randint(0, size["vocab_size"], size["batch"], device=device)
    model = apply_llmm(random_llama(size, device), LlmmConfig(rank=RANK, K=K, bits=4, init="zero"))
    train_steps(model, batch, 2)
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.time()  # the wall clock: comparable across the workers
    synchronised(device, lambda: train_steps(model, batch, 2 * size["steps"]))
    print(2 * size["steps"], started, time.time())


def report(name: str, part) -> bool:
    """Print a part's lines as soon as it ends; a failing part prints its error and lets the others run."""
    try:
        lines = part()
    except Exception as error:  # a lent GPU is minutes long: one broken part must not hide the others' figures
        traceback.print_exc()
        print(f"[{name}] FAILED {part.__name__}: {type(error).__name__}: {error}", flush=True)
        return False
    for line in [lines] if isinstance(lines, str) else lines:
        print(f"[{name}] {line}", flush=True)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run every part up to the CUDA calls, small, on the CPU")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data",
                        help="the shared data folder, for the budgeted CoLA search (default: %(default)s)")
    parser.add_argument("--only", action="append", choices=("nf4", "step", "loftq", "packing", "budget"),
                        help="run this part alone (repeatable; default: every part)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of packing's processes
    args = parser.parse_args()
    from transformers.utils import logging

    logging.disable_progress_bar()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; pass --cpu to run the parts that need none, small")
    device = "cpu" if args.cpu else "cuda"
    size = SIZES["cpu" if args.cpu else "gpu"]
    if args.worker:
        return worker_rate(size, device)
    name = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    print(f"[{name}] torch {torch.__version__}, {'CPU' if args.cpu else 'CUDA ' + torch.version.cuda}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        with_ray = importlib.util.find_spec("ray") is not None and not args.cpu
        parts = {"nf4": functools.partial(nf4_cycle, size, device, Path(work)),
                 "step": functools.partial(step_times, size, device),
                 "loftq": functools.partial(loftq_time, size, device),
                 "packing": functools.partial(packing, size, Path(work)) if with_ray
                 else functools.partial(packing_without_ray, size, device)}
        chosen = args.only or list(parts)  # the budgeted search (8 minutes) only when asked, and on a GPU
        if with_ray:
            parts["budget"] = functools.partial(budgeted_search, Path(work), args.data_dir)
        for key in (key for key in chosen if key not in parts):
            print(f"[{name}] {key}: skipped, it runs on a GPU with Ray installed", flush=True)
        ok = [report(name, functools.update_wrapper(parts[key], parts[key].func)) for key in chosen if key in parts]
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
