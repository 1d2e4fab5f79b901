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
import tempfile
from pathlib import Path

from llmm_tune.cli import command_parser
from llmm_tune.cli import main as run_command
from llmm_tune.errors import UsageError
from llmm_tune.method.peft_export import to_peft


def trained_model(record: dict, storage: str, data_dir: str | None):
    """The record's trained model: its checkpoint in the experiment under `storage` when still there, else
    trained again with the record's seed (what `reproduce` checks gives the same numbers)."""
    from llmm_tune import load_adapter
    from llmm_tune.export import collect
    from llmm_tune.reproduce import prepare_data, record_config, record_context
    from llmm_tune.tune import storage as stores
    from llmm_tune.tune.experiment import METADATA_FILE
    from llmm_tune.tune.runner import train_standing

    context = record_context(record)
    if not hasattr(context.recipe, "build_model"):
        raise UsageError(f"family {record['family']} trains no single LoRA adapter per model (a continual trial "
                         "stacks one pair per task); export_adapter takes glue and causal_lm records")
    config = record_config(record)
    experiment = stores.join(stores.resolve(storage), record["experiment"])
    checkpoints = collect(experiment)[2] if stores.exists(stores.join(experiment, METADATA_FILE)) else {}
    model = context.recipe.build_model(config, context, "cpu")
    if record["trial"] in checkpoints:
        print(f"adapter of trial {record['trial']} from {experiment}")
        with checkpoints[record["trial"]].as_directory() as directory:
            return load_adapter(model, directory).eval()
    print(f"no checkpoint of trial {record['trial']} under {storage}; training it again with seed {record['seed']}")
    data, _ = prepare_data(record, context, data_dir)
    with tempfile.TemporaryDirectory() as work:
        _, checkpoint = train_standing(context, {**config, "seed": record["seed"]}, data, Path(work))
        return load_adapter(model, checkpoint).eval()


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("export_adapter", __doc__)
    parser.add_argument("record", type=Path, help="best.yaml or configs/<row>.yaml written by llmm_tune.export")
    parser.add_argument("--out", type=Path, required=True, help="folder for base/, adapter/ and export.json")
    parser.add_argument("--storage", default="ray_results", help="where the search kept its experiment")
    parser.add_argument("--data-dir", help="data folder, when the trial must be trained again (default: "
                                           "$LLMM_DATA_DIR, else the record's)")
    return parser


def run(argv: list[str]) -> dict:
    from llmm_tune.reproduce import read_record
    from llmm_tune.train.pretrained import load_tokenizer
    from llmm_tune.tune.console import quiet_logs

    args = build_parser().parse_args(argv)
    quiet_logs()
    record = read_record(args.record)
    model = trained_model(record, args.storage, args.data_dir)
    written = to_peft(model, args.out, load_tokenizer(record["config"]["model"]))
    load = ("BitsAndBytesConfig(**export.json['bnb_4bit'])" if written["bnb_4bit"] else "full precision")
    print(f"wrote {args.out}/base (load with {load}) and {args.out}/adapter (PeftModel.from_pretrained(base, "
          f"'{args.out}/adapter'))")
    return written


def main() -> None:
    run_command(run)


if __name__ == "__main__":
    main()
