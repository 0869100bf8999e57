"""The lower bounds in pyproject.toml are the versions CI's "oldest" leg pins (``.ci/oldest.txt``), so each is tested."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lower_bounds(requirements: list[str]) -> dict[str, str]:
    out = {}
    for req in requirements:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(?:;.*)?", req.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_every_lower_bound_is_pinned_in_the_oldest_leg():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = _lower_bounds(project["dependencies"])
    for extra in ("pertpy", "decoupler"):
        bounds |= _lower_bounds(project["optional-dependencies"][extra])
    pins = _pins(ROOT / ".ci" / "oldest.txt")
    assert set(bounds) == set(pins), set(bounds) ^ set(pins)
    assert bounds == pins


def test_every_dependency_has_a_lower_bound():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    unbounded = [d for d in deps if ">=" not in d]
    assert not unbounded, unbounded


def test_ci_runs_the_readme_test_command_in_each_leg():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && pytest'
    assert command in readme
    assert command in ci
    assert "oldest.txt" in ci
    for version in ("3.11", "3.13"):
        assert version in ci
