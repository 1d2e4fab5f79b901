import os

# before huggingface_hub is imported (by transformers, datasets): it reads them once, at import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tests.helpers import shared_data  # noqa: E402

# one thread a test process when xdist runs two of them: two processes of two threads on two cores spin against
# each other (a MiniLM test took 106 s instead of 7)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder (`LLMM_DATA_DIR`, else ../shared/data). Where it is missing, a test that needs it
    fails under CI and skips elsewhere: the one policy for missing data."""
    if not shared_data.FOLDER.is_dir():
        missing = f"no shared data at {shared_data.FOLDER} (set LLMM_DATA_DIR to its folder)"
        if shared_data.IN_CI:
            pytest.fail(f"{missing}; under CI a test that needs it fails", pytrace=False)
        pytest.skip(missing)
    return shared_data.FOLDER


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


@pytest.fixture
def minilm():
    from llmm_tune.train.pretrained import load_classifier

    torch.manual_seed(0)
    return load_classifier("minilm", num_labels=2)
