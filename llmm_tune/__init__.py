"""llmm-tune: quantised distributional-LoRA (Llmm / MeMoTune) fine-tuning and its hyperparameter search."""

from llmm_tune.config import LlmmConfig
from llmm_tune.layer import LlmmLinear
from llmm_tune.model import (
    apply_llmm,
    bytes_per_base_parameter,
    load_adapter,
    load_llmm,
    merge_llmm,
    predict_mc,
    save_adapter,
)

__all__ = [
    "LlmmConfig",
    "LlmmLinear",
    "apply_llmm",
    "bytes_per_base_parameter",
    "load_adapter",
    "load_llmm",
    "merge_llmm",
    "predict_mc",
    "save_adapter",
]
