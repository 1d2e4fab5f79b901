"""What makes a result reproducible: the command, the settings, package versions and git commit.
Written once into each experiment folder (`llmm_experiment.json`) and copied into every export."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from llmm_tune.files import write_text

METADATA_FILE = "llmm_experiment.json"
PACKAGES = ("llmm-tune", "torch", "transformers", "peft", "bitsandbytes", "ray", "optuna", "datasets")
ROOT = Path(__file__).resolve().parent.parent


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str:
    """The checkout's commit, marked `-dirty` when it has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line(module: str, args: list[str]) -> str:
    return shlex.join(["python", "-m", module, *args])


def write_metadata(experiment_dir: Path, metadata: dict) -> None:
    write_text(experiment_dir / METADATA_FILE, json.dumps(metadata, indent=2, default=str))


def read_metadata(experiment_dir: Path) -> dict:
    return json.loads((experiment_dir / METADATA_FILE).read_text())
