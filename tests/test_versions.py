"""The supported ranges and the lock agree: every requirement has a tested floor, and the lock
pins each one inside its range (a pyproject.toml change without ``make lock`` fails here)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import ROOT
from tools.floors import floor, floors, requirements


def locked() -> dict[str, str]:
    text = (ROOT / "requirements" / "lock.txt").read_text()
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\]+)", text, flags=re.M)
    return {canonicalize_name(name): version for name, version in pins}


def test_every_requirement_has_a_floor_for_make_test_oldest():
    pins = floors()
    assert len(pins) == len(requirements()) > 20
    assert "torch==2.4" in pins  # the floor of "torch>=2.4,<3"
    assert floor("open_clip_torch>=2.27,<4") == "open_clip_torch==2.27"
    with pytest.raises(ValueError, match="needs exactly one '>=' floor"):
        floor("accelerate")
    with pytest.raises(ValueError, match="needs exactly one '>=' floor"):
        floor("torch<3")


def test_the_lock_pins_every_requirement_inside_its_range():
    pins = locked()
    for text in requirements():
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements/lock.txt: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"the lock pins {name}=={pins[name]} outside {requirement}: run make lock"
        )


def test_make_install_stops_early_without_java_and_says_how_to_get_it(tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    cmd = [make, "-s", "-C", str(ROOT), "check-java"]
    missing = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": str(tmp_path)})
    assert missing.returncode != 0 and "default-jre-headless" in missing.stderr
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0  # Java is here
