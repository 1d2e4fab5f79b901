"""llmm-tune: quantised distributional-LoRA (Llmm / MeMoTune) fine-tuning and its hyperparameter search.

Read in this order: `method/` (the Llmm library, re-exported here), `train/` (what recipes share), `tune/` (the
search machinery), `trainables/` (the task families), then the commands users type: search, export, compare,
reproduce, export_adapter and plan (`python -m llmm_tune.<command>`, sharing `cli.py`).
"""

import logging

# On CPUs with AVX512-BF16, bitsandbytes warns at import that the optional `kernels` package is missing.
# That package fetches a CPU inference kernel from the hub at run time, for the packed bf16 layout that
# llmm-tune uses only on request (`nf4.NF4Linear.fast_cpu_inference`): drop that one message, before
# anything imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels" not in record.getMessage())

# The method's names, imported when first used (PEP 562): a command that trains nothing, the search's driver or the
# export, then starts without bitsandbytes and peft (5.1 s of the 5.6 s `import llmm_tune.export` took).
_EXPORTS = {
    "LlmmConfig": "llmm_tune.method.config",
    "LlmmLinear": "llmm_tune.method.layer",
    **dict.fromkeys(["apply_llmm", "bytes_per_base_parameter", "load_adapter", "load_llmm", "merge_llmm", "predict_mc",
                     "save_adapter"], "llmm_tune.method.model"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llmm_tune' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
