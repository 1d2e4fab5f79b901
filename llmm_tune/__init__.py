"""llmm-tune: quantised distributional-LoRA (Llmm / MeMoTune) fine-tuning and its hyperparameter search.

Read in this order: `method/` (the Llmm library, re-exported here), `train/` (what recipes share), `tune/` (the
search machinery), `trainables/` (the task families), then the commands users type: search, export, compare,
reproduce, export_adapter and plan (`python -m llmm_tune.<command>`, sharing `cli.py`).
"""

import logging

# On CPUs with AVX512-BF16, bitsandbytes warns at import that the optional `kernels` package is missing.
# That package fetches a CPU inference kernel from the hub at run time, for the packed bf16 layout that
# llmm-tune uses only on request (`quant.NF4Linear.fast_cpu_inference`): drop that one message, before
# anything imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels" not in record.getMessage())

from llmm_tune.method.config import LlmmConfig  # noqa: E402
from llmm_tune.method.layer import LlmmLinear  # noqa: E402
from llmm_tune.method.model import (  # noqa: E402
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
