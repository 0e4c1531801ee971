"""constraints.txt pins what pyproject.toml asks for, and this environment runs those pins.

The Makefile (so CI) and the Dockerfile install with ``--constraint constraints.txt``;
``make lock`` regenerates the file. A dependency added to pyproject.toml without a
``make lock`` fails here, before an image is built with whatever is newest.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
CONSTRAINTS = ROOT / "constraints.txt"
PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+)(?:\s*;\s*(?P<marker>.+))?$")


def pins() -> dict[str, tuple[Version, Marker | None]]:
    found: dict[str, tuple[Version, Marker | None]] = {}
    for raw in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"constraints.txt: not an exact pin: {line!r}"
        marker = Marker(match["marker"]) if match["marker"] else None
        found[canonicalize_name(match["name"])] = (Version(match["version"]), marker)
    return found


def declared() -> list[Requirement]:
    project = PYPROJECT["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in ("server", "dev"):
        requirements += [Requirement(r) for r in project["optional-dependencies"][extra]]
    requirements += [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    return [r for r in requirements if canonicalize_name(r.name) != "authsession"]


@pytest.mark.parametrize("requirement", declared(), ids=str)
def test_every_declared_dependency_is_pinned_within_its_range(requirement: Requirement) -> None:
    pinned = pins()
    name = canonicalize_name(requirement.name)
    assert name in pinned, f"{requirement.name} is not in constraints.txt: run `make lock`"
    version, _ = pinned[name]
    assert requirement.specifier.contains(version, prereleases=True), (
        f"constraints.txt pins {requirement.name}=={version}, outside {requirement}: "
        "run `make lock`"
    )


def test_this_environment_runs_the_pinned_versions() -> None:
    # The build backend's pins apply to the isolated build environment, not to this one
    # (where `python -m venv` may have put an older setuptools of its own).
    build_only = {
        canonicalize_name(Requirement(r).name) for r in PYPROJECT["build-system"]["requires"]
    }
    mismatched = []
    for name, (version, marker) in pins().items():
        if name in build_only or (marker is not None and not marker.evaluate()):
            continue
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            mismatched.append(f"{name}: not installed, pinned {version}")
            continue
        if installed != version:
            mismatched.append(f"{name}: installed {installed}, pinned {version}")
    assert mismatched == [], "reinstall with `make` (the stamp follows constraints.txt)"


def test_the_image_and_the_makefile_install_with_the_constraints() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^COPY .*constraints\.txt", dockerfile, re.M)
    installs = re.findall(r"pip (?:install|wheel)[^\n]*(?:\\\n[^\n]*)*", dockerfile)
    assert installs
    for command in installs:
        assert "--constraint" in command, command
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^CONSTRAINTS := constraints\.txt$", makefile, re.M)
    for line in makefile.splitlines():
        if "pip install" in line and "uv==" not in line:
            assert "--constraint" in line or "PIP_PINNED" in line, line
