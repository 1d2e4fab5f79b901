"""A trained configuration as a standard peft LoRA adapter plus its base:
`python -m llmm_tune.export_adapter results/cola/best.yaml --out DIR`.

DIR/adapter/ is written by peft itself (adapter_config.json with r, lora_alpha and the target modules, and
adapter_model.safetensors holding the adapter means, which is what Llmm predicts with in eval mode).
DIR/base/ is the pretrained model with each adapted layer's quantised weight dequantised and the trained
task head in place (vLLM refuses an adapter with modules_to_save), with its tokenizer. DIR/export.json says
how to load it: with 4-bit normal_float, the `bnb_4bit` arguments of transformers' BitsAndBytesConfig
quantise exactly the adapted layers again, to the same codes (each block's largest weight is its scale
times the code 1, so re-quantising a dequantised NF4 block finds the same scale and codes); other formats
(2, 8 bit, uniform) load in full precision, as bitsandbytes has no such formats. `merge_llmm` stays the
way to one merged model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from llmm_tune.errors import UsageError
from llmm_tune.files import write_text
from llmm_tune.method.config import LlmmConfig
from llmm_tune.method.model import default_target_modules, dequantize_llmm, llmm_layers, matches

EXPORT_FILE = "export.json"


def lora_targets(names: list[str], model: nn.Module, config: LlmmConfig) -> list[str]:
    """peft's `target_modules` for exactly the adapted layers: the short suffixes (as vLLM expects) when they
    select no other linear layer, else the full names."""
    suffixes = sorted(s for s in config.target_modules or default_target_modules(model)
                      if any(matches(n, (s,)) for n in names))
    selected = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)
                and matches(name, tuple(suffixes))}
    return suffixes if selected == set(names) else sorted(names)


@torch.no_grad()
def to_peft(model: nn.Module, out: Path, tokenizer=None) -> dict:
    """Write `model` (wrapped with `apply_llmm`, trained) as DIR/base + DIR/adapter; the model is consumed
    (its Llmm layers become plain linear layers, then peft's). Returns what export.json records."""
    config: LlmmConfig = model.llmm_config
    layers = llmm_layers(model)
    means = {name: (layer.A_mean.detach().clone(), layer.B_mean.detach().clone()) for name, layer in layers.items()}
    dequantize_llmm(model).requires_grad_(False)
    model.save_pretrained(out / "base")
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "base")
    names = sorted(means)
    targets = lora_targets(names, model, config)
    others = sorted(name for name, module in model.named_modules() if isinstance(module, nn.Linear)
                    and name not in means)  # what bitsandbytes must leave in full precision
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    peft_model = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets,
                                                  lora_dropout=config.dropout, bias="none",
                                                  task_type="CAUSAL_LM" if causal else None))
    for name, (A, B) in means.items():
        module = peft_model.base_model.model.get_submodule(name)
        module.lora_A["default"].weight.copy_(A)
        module.lora_B["default"].weight.copy_(B)
    peft_model.save_pretrained(out / "adapter")
    nf4 = (config.bits, config.quant_method) == (4, "normal_float")
    record = {"base": "base", "adapter": "adapter", "bits": config.bits, "quant_method": config.quant_method,
              "bnb_4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32",
                           "bnb_4bit_use_double_quant": config.double_quant, "llm_int8_skip_modules": others}
              if nf4 else None}
    write_text(out / EXPORT_FILE, json.dumps(record, indent=2) + "\n")
    return record


def trained_model(record: dict, storage: str, data_dir: str | None):
    """The record's trained model: its checkpoint in the experiment under `storage` when still there, else
    trained again with the record's seed (what `reproduce` checks gives the same numbers)."""
    from llmm_tune import load_adapter
    from llmm_tune.export import collect
    from llmm_tune.reproduce import reproduce_seed
    from llmm_tune.train.data import locate_source
    from llmm_tune.tune import storage as stores
    from llmm_tune.tune.family import load_family

    recipe = load_family(record["family"])
    if not hasattr(recipe, "build_model"):
        raise UsageError(f"family {record['family']} trains no single LoRA adapter per model (a continual trial "
                         "stacks one pair per task); export_adapter takes glue and causal_lm records")
    config = {**record["config"], "trust_remote_code": record.get("trust_remote_code", False)}
    experiment = stores.join(stores.resolve(storage), record["experiment"])
    checkpoints = collect(experiment)[2] if stores.exists(stores.join(experiment, "llmm_experiment.json")) else {}
    model = recipe.build_model(config, "cpu")
    if record["trial"] in checkpoints:
        print(f"adapter of trial {record['trial']} from {experiment}")
        with checkpoints[record["trial"]].as_directory() as directory:
            return load_adapter(model, directory).eval()
    print(f"no checkpoint of trial {record['trial']} under {storage}; training it again with seed {record['seed']}")
    found = locate_source(record["data"]["source"], data_dir)
    source = recipe.check_data(record["task"], None if found == "hub" else found)
    data = recipe.prepare({**config, "seed": record["data"]["validation_seed"]}, source)
    with tempfile.TemporaryDirectory() as work:
        reproduce_seed(record, record["seed"], data, source, Path(work))
        return load_adapter(model, Path(work) / f"seed{record['seed']}").eval()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m llmm_tune.export_adapter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("record", type=Path, help="best.yaml or configs/<row>.yaml written by llmm_tune.export")
    parser.add_argument("--out", type=Path, required=True, help="folder for base/, adapter/ and export.json")
    parser.add_argument("--storage", default="ray_results", help="where the search kept its experiment")
    parser.add_argument("--data-dir", help="data folder, when the trial must be trained again")
    args = parser.parse_args()
    try:
        from llmm_tune.reproduce import read_record
        from llmm_tune.train.pretrained import load_tokenizer
        from llmm_tune.tune.console import quiet_logs

        quiet_logs()
        record = read_record(args.record)
        model = trained_model(record, args.storage, args.data_dir)
        written = to_peft(model, args.out, load_tokenizer(record["config"]["model"]))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    load = ("BitsAndBytesConfig(**export.json['bnb_4bit'])" if written["bnb_4bit"] else "full precision")
    print(f"wrote {args.out}/base (load with {load}) and {args.out}/adapter (PeftModel.from_pretrained(base, "
          f"'{args.out}/adapter'))")


if __name__ == "__main__":
    main()
