"""Print the floor of every requirement in pyproject.toml as ``name==version``, for pip's
``--constraint``: ``make test-oldest`` installs the project at these versions (its transitive
dependencies then resolve to the newest they allow).

    python tools/floors.py dev data train eval > floors.txt

A requirement without a ``>=`` floor is an error: the oldest end of the range must be tested.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")


def floor(requirement: str) -> str:
    """``"torch>=2.4,<3"`` -> ``"torch==2.4"``."""
    match = REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"cannot read the requirement {requirement!r}")
    name, specifiers = match.groups()
    lower = [s.strip()[2:].strip() for s in specifiers.split(",") if s.strip().startswith(">=")]
    if len(lower) != 1:
        raise ValueError(
            f"{requirement!r} in pyproject.toml needs exactly one '>=' floor: the oldest "
            "version the suite passes on (make test-oldest installs it)"
        )
    return f"{name}=={lower[0]}"


def requirements(extras: list[str] | None = None, pyproject: Path = PYPROJECT) -> list[str]:
    """The project's requirements and those of ``extras`` (all of them when None)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    extras = sorted(optional) if extras is None else extras
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise ValueError(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    return project["dependencies"] + [r for e in extras for r in optional[e]]


def floors(extras: list[str] | None = None, pyproject: Path = PYPROJECT) -> list[str]:
    return [floor(r) for r in requirements(extras, pyproject)]


if __name__ == "__main__":
    try:
        print("\n".join(floors(sys.argv[1:])))
    except ValueError as error:
        sys.exit(f"tools/floors.py: {error}")
