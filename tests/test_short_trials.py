"""The short-trials benchmark's checks of what it is asked to train (benchmarks/bench_short_trials.py): a setting the
family lacks or refuses stops it before any training, where the trials would ignore a misspelt key."""

from __future__ import annotations

import pytest

from benchmarks.bench_short_trials import checked_settings, point_name
from llmm_tune.errors import UsageError
from llmm_tune.tune.spaces import load_spec


@pytest.fixture(scope="module")
def glue_settings() -> dict:
    return load_spec("glue_cola", "cpu", "llmm").recipe.SETTINGS


def test_set_items_become_settings_with_yaml_values(glue_settings):
    settings = checked_settings(["batch_size=16", "lr=3e-4", "compile=true"], [2.5], glue_settings)
    assert settings == {"batch_size": 16, "lr": 3e-4, "compile": True}  # 3e-4: PyYAML alone reads it as text


@pytest.mark.parametrize(("items", "epochs", "message"), [
    (["batchsize=16"], [2], "unknown setting(s) ['batchsize']"),
    (["batch_size=0"], [2], "batch_size must be an integer >= 1, got 0"),
    (["batch_size"], [2], "--set takes KEY=VALUE"),
    ([], [0.0], "epochs must be a number > 0"),
])
def test_a_setting_the_family_lacks_or_refuses_is_named(glue_settings, items, epochs, message):
    with pytest.raises(UsageError) as refused:
        checked_settings(items, epochs, glue_settings)
    assert message in str(refused.value)


def test_a_column_is_named_by_what_the_warm_start_sets():
    assert point_name({"quant_method": "uniform", "bits": 8, "lr": 5e-4, "rank": 16}) == "uniform-8 lr 0.0005"
    assert point_name({"rank": 16}) == "{'rank': 16}"
