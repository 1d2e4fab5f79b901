"""A trained configuration as a standard peft LoRA adapter plus its base:
`python -m llmm_tune.export_adapter results/cola/best.yaml --out DIR`.

DIR/adapter/ is written by peft itself (adapter_config.json with r, lora_alpha, the target modules, the task type
and, for a classifier, the trained head as `modules_to_save`; adapter_model.safetensors holding the adapter means,
which is what Llmm predicts with in eval mode). Its `base_model_name_or_path` is the base's hub id (a packaged
model's, e.g. sentence-transformers/all-MiniLM-L6-v2; a local folder's own name), never a path of this machine.
DIR/base/ is the pretrained model with each adapted layer's quantised weight dequantised, the trained task head in
place and the task's label names (id2label), with its tokenizer (model_max_length: the training max_length).
DIR/export.json says how to load it and the lengths the model was trained with: with 4-bit normal_float, the
`bnb_4bit` arguments of transformers' BitsAndBytesConfig quantise exactly the adapted layers again, to the same
codes; other formats (2, 8 bit, uniform) load in full precision, as bitsandbytes has no such formats.
DIR/README.md (and the console) show both ways to load it. `merge_llmm` stays the way to one merged model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from torch import nn

from llmm_tune.cli import command_parser
from llmm_tune.cli import main as run_command
from llmm_tune.errors import UsageError
from llmm_tune.files import write_text
from llmm_tune.method.peft_export import EXPORT_FILE, to_peft
from llmm_tune.results.record import ExportRecord
from llmm_tune.tune.context import TrialContext

LENGTHS = ("max_length", "max_source_length", "max_target_length")  # a trial's token lengths, as families name them


def trained_model(record: ExportRecord, context: TrialContext, storage: str, data_dir: str | None) -> nn.Module:
    """The record's trained model: its checkpoint in the experiment under `storage` when still there, else
    trained again with the record's seed (what `reproduce` checks gives the same numbers)."""
    from llmm_tune import load_adapter
    from llmm_tune.results.collect import collect
    from llmm_tune.tune import storage as stores
    from llmm_tune.tune.experiment import METADATA_FILE
    from llmm_tune.tune.runner import train_standing

    if not hasattr(context.recipe, "build_model"):
        raise UsageError(f"family {record.family} trains no single LoRA adapter per model (a continual trial "
                         "stacks one pair per task); export_adapter takes glue and causal_lm records")
    config = record.settings()
    experiment = stores.join(stores.resolve(storage), record.experiment)
    checkpoints = collect(experiment).checkpoints if stores.exists(stores.join(experiment, METADATA_FILE)) else {}
    model = context.recipe.build_model(config, context, "cpu")
    if record.trial in checkpoints:
        print(f"adapter of trial {record.trial} from {experiment}")
        with checkpoints[record.trial].as_directory() as directory:
            return load_adapter(model, directory).eval()
    print(f"no checkpoint of trial {record.trial} under {storage}; training it again with seed {record.seed}")
    data, _ = record.prepare_data(context, data_dir)
    with tempfile.TemporaryDirectory() as work:
        _, checkpoint = train_standing(context, {**config, "seed": record.seed}, data, Path(work))
        return load_adapter(model, checkpoint).eval()


def base_model_name(model: str) -> str:
    """The base's name, the same on every machine: a packaged model's hub id, a hub id as given, a local folder's
    own name (its path is this machine's)."""
    from llmm_tune.train.pretrained import HUB_IDS

    if model in HUB_IDS:
        return HUB_IDS[model]
    return Path(model).name if Path(model).exists() else model


def name_labels(model: nn.Module, task_details: object) -> None:
    """The task's label names as the model config's id2label and label2id (transformers' LABEL_i stay for a task
    without names: a regression, or a family that names none)."""
    names = getattr(task_details, "label_names", None)
    if names:
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {name: i for i, name in enumerate(names)}


def how_to_load(folder: str, record: dict) -> str:
    """Python that loads the export in `folder`: exactly, offline, from its own base; or on the hub's base."""
    head = "CausalLM" if record["task_type"] == "CAUSAL_LM" else "SequenceClassification"
    quantised = (f", quantization_config=BitsAndBytesConfig(**json.load(open('{folder}/{EXPORT_FILE}'))"
                 "['bnb_4bit'])") if record["bnb_4bit"] else ""
    labels = f", num_labels={record['num_labels']}" if record["num_labels"] else ""
    return (f"# exactly as trained, offline, from this export's base (its tokenizer too: {folder}/base)\n"
            f"base = AutoModelFor{head}.from_pretrained('{folder}/base'{quantised})\n"
            f"model = PeftModel.from_pretrained(base, '{folder}/adapter')\n"
            f"# or on the hub's base, {record['base_model_name_or_path']}: its full-precision weights, the same only "
            f"when the base was not quantised (bits: {record['bits']}) and is the hub's own\n"
            f"model = AutoPeftModelFor{head}.from_pretrained('{folder}/adapter'{labels})\n")


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("export_adapter", __doc__)
    parser.add_argument("record", type=Path, help="best.yaml or configs/<row>.yaml written by llmm_tune.export")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for base/, adapter/, export.json and README.md")
    parser.add_argument("--storage", default="ray_results", help="where the search kept its experiment")
    parser.add_argument("--data-dir", help="data folder, when the trial must be trained again (default: "
                                           "$LLMM_DATA_DIR, else the record's)")
    return parser


def run(argv: list[str]) -> dict:
    from llmm_tune.train.pretrained import load_tokenizer
    from llmm_tune.tune.console import quiet_logs

    args = build_parser().parse_args(argv)
    quiet_logs()
    record = ExportRecord.read(args.record)
    context = record.context()
    model = trained_model(record, context, args.storage, args.data_dir)
    name_labels(model, context.definition.details)
    training = {k: record.config[k] for k in LENGTHS if k in record.config}
    tokenizer = load_tokenizer(record.config["model"], trust_remote_code=context.trust_remote_code)
    if "max_length" in training:  # one truncation for every text (a causal LM's prompt and reply have their own)
        tokenizer.model_max_length = training["max_length"]
    written = to_peft(model, args.out, base_model_name(record.config["model"]), tokenizer, training)
    write_text(args.out / "README.md", f"# {record.task}: {record.method} adapter\n\nDIR is this folder; "
               f"trained with {json.dumps(training)}. {what_the_mean_loses(record.config)}\n\n```python\n"
               f"{how_to_load('DIR', written)}```\n")
    print(f"wrote {args.out}/base and {args.out}/adapter; {what_the_mean_loses(record.config)} Load with (also in "
          f"{args.out}/README.md):\n" + how_to_load(str(args.out), written))
    return written


def what_the_mean_loses(config: dict) -> str:
    """What a peft adapter (each Llmm factor's mean) predicts against what the record was scored with (`draws`)."""
    draws = config.get("draws", 0)
    if not config.get("K"):
        return "The adapter has no moment directions (K = 0): peft predicts exactly as it was scored."
    if not draws:
        return ("peft holds each factor's mean, what the record was scored with (draws 0); the moment directions, "
                "which only sampling uses, are left out.")
    return (f"The record was scored with the mean of {draws} adapter samples' probabilities (draws {draws}); peft "
            "holds each factor's mean only and predicts as draws 0 does: its scores may differ from the record's, "
            "its calibration most (docs/results.md, calibration).")


def main() -> None:
    run_command(run)


if __name__ == "__main__":
    main()
