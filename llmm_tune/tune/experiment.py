"""What makes a result reproducible: the command, the settings, package versions and git commit.
Written once into each experiment folder (`llmm_experiment.json`) and copied into every export."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from llmm_tune.project import ROOT
from llmm_tune.tune import storage

METADATA_FILE = "llmm_experiment.json"
PACKAGES = ("llmm-tune", "torch", "transformers", "peft", "bitsandbytes", "ray", "optuna", "datasets")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# What makes the numbers: a change elsewhere (the README, tests) does not make a record dirty.
CODE_PATHS = ("llmm_tune", "trainables", "search_spaces", "pyproject.toml", "requirements.lock")


def git_commit() -> str:
    """The checkout's commit, marked `-dirty` when the code that makes results has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line(module: str, args: list[str]) -> str:
    return shlex.join(["python", "-m", module, *args])


def fresh_name(storage_dir: Path, base: str) -> str:
    """`base`, or `base-2`, `base-3`, ... whichever is free: running the same search again starts a new one."""
    taken = set(storage.list_names(str(storage_dir)))
    number = 1
    while (name := base if number == 1 else f"{base}-{number}") in taken:
        number += 1
    return name


def write_metadata(experiment: str, metadata: dict) -> None:
    storage.write_text(storage.join(str(experiment), METADATA_FILE), json.dumps(metadata, indent=2, default=str))


def read_metadata(experiment: str) -> dict | None:
    """The experiment's metadata, or None when `experiment` is not an llmm-tune experiment."""
    path = storage.join(str(experiment), METADATA_FILE)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None
