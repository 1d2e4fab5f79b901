"""Records travel: the data they name resolves on another machine, installed versions are compared with
the recorded ones, a retrained trial stands for the report whose checkpoint the search kept, and a second run
of the same search starts a new experiment."""

from __future__ import annotations

import os
import stat

import pytest

from llmm_tune.errors import UsageError
from llmm_tune.files import atomic_path, write_text
from llmm_tune.reproduce import version_drift
from llmm_tune.train import data
from llmm_tune.tune.direction import Direction
from llmm_tune.tune.experiment import fresh_name, package_versions
from llmm_tune.tune.family import Task, replaces


def test_data_inside_the_project_tree_is_recorded_relative_to_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    shared = data.ROOT.parent / "shared" / "data"
    assert data.portable_source(str(shared), str(shared)) == "../shared/data"
    assert data.portable_source("hub", None) == "hub"
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.portable_source(str(tmp_path), None) == "$LLMM_DATA_DIR"  # the variable, not this machine's path


def test_a_data_folder_given_through_a_link_is_recorded_as_given_not_as_the_links_target(tmp_path, monkeypatch):
    """A fresh clone's ../shared may be a link to this machine's data: records name ../shared/data all the same."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    base = tmp_path.resolve()  # as the project root is
    project, target = base / "project", base / "elsewhere" / "mounted"
    project.mkdir()
    (target / "data").mkdir(parents=True)
    (base / "shared").symlink_to(target, target_is_directory=True)
    monkeypatch.setattr(data, "ROOT", project)
    monkeypatch.chdir(project)
    given = data.resolve_data_dir("../shared/data")  # what a search hands its trials and records
    assert given == base / "shared" / "data"
    assert data.portable_source(str(given), "../shared/data") == "../shared/data"
    assert data.portable_source(str(base / "shared" / "data"), None) == "../shared/data"
    found = data.locate_source("../shared/data")  # reproduce and export read the record back
    assert found == base / "shared" / "data"
    assert data.portable_source(str(found), None) == "../shared/data"


def test_a_recorded_source_resolves_here_or_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.locate_source("hub") == "hub"
    monkeypatch.setattr(data, "ROOT", tmp_path / "project")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert data.locate_source("../shared/data") == tmp_path / "shared" / "data"
    with pytest.raises(UsageError, match=r"data folder ../elsewhere .* does not exist here; pass --data-dir"):
        data.locate_source("../elsewhere")
    with pytest.raises(UsageError, match=r"LLMM_DATA_DIR, which is not set here"):
        data.locate_source("$LLMM_DATA_DIR")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "shared" / "data"))  # the variable wins over the record
    assert data.locate_source("../elsewhere") == tmp_path / "shared" / "data"


def test_version_drift_names_each_package_that_differs():
    recorded = {**package_versions(), "transformers": "5.23.0", "llmm-tune": "0.0.1"}
    drift = version_drift(recorded)
    assert len(drift) == 1 and drift[0].startswith("transformers ") and drift[0].endswith("(record: 5.23.0)")
    assert version_drift(package_versions()) == []


def test_running_the_same_search_again_takes_a_fresh_name(tmp_path):
    assert fresh_name(tmp_path, "glue_cola-llmm-cpu") == "glue_cola-llmm-cpu"
    (tmp_path / "glue_cola-llmm-cpu").mkdir()
    (tmp_path / "glue_cola-llmm-cpu-2").mkdir()
    assert fresh_name(tmp_path, "glue_cola-llmm-cpu") == "glue_cola-llmm-cpu-3"


@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("reports", [[0.0, 0.0], [0.2, 0.5, 0.5, 0.1], [float("nan"), 0.3, 0.3], [0.4, float("nan")]])
def test_the_report_that_stands_for_a_trial_is_the_one_rays_checkpoint_manager_keeps(reports, mode, tmp_path):
    """Ties go to the later report and NaN never wins, in reproduce and export_adapter as in the search."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    manager = _CheckpointManager(CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val",
                                                  checkpoint_score_order=mode))
    kept, task = None, Task("cola", {"mcc": "max"}, "mcc")
    for i, value in enumerate(reports):
        (tmp_path / str(i)).mkdir()
        manager.register_checkpoint(_TrainingResult(Checkpoint(str(tmp_path / str(i))), {"val": value, "i": i}))
        if replaces(task, Direction(mode), value, None if kept is None else reports[kept]):
            kept = i
    assert manager.best_checkpoint_result.metrics["i"] == kept


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_a_written_record_gets_the_mode_open_would_give_it(tmp_path, umask):
    """Records and adapters are read by others (a vLLM server's user): the crash-safe write keeps the umask's mode,
    not mkstemp's 0600, and a failed write leaves the old file and no temporary one."""
    previous = os.umask(umask)
    try:
        write_text(tmp_path / "best.yaml", "a: 1\n")
        with pytest.raises(RuntimeError), atomic_path(tmp_path / "best.yaml") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "best.yaml").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["best.yaml"] and (tmp_path / "best.yaml").read_text() == "a: 1\n"
