"""The version-skew rule (gatewayd/controller/versions.py) and the one version source."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

from gatewayd.controller.versions import skew_problem

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("daemon", ["1.4.0", "1.4.7", "1.3.0", "1.3.12", "1.4.0rc1"])
def test_a_controller_works_with_its_minor_version_and_the_one_before(daemon: str) -> None:
    assert skew_problem("1.4.2", daemon) is None


@pytest.mark.parametrize(("daemon", "words"), [
    ("1.5.0", "upgrade the controller first"),
    ("2.4.0", "upgrade the controller first"),
    ("0.4.0", "upgrade the controller first"),
    ("1.2.9", "more than 1 minor version behind controller 1.4.2: upgrade it to 1.3 or 1.4"),
    ("unknown", "cannot be compared"),
])
def test_daemons_outside_the_rule_are_named_with_what_to_do(daemon: str, words: str) -> None:
    problem = skew_problem("1.4.2", daemon)
    assert problem is not None and words in problem and daemon in problem


@pytest.mark.parametrize("program", ["gatewayd", "gatewayctl"])
def test_version_flag_prints_the_package_metadata_version(program: str) -> None:
    shown = subprocess.run([sys.executable, "-m", f"gatewayd.cli.{program}", "--version"],
                           capture_output=True, text=True, check=True)
    assert shown.stdout == f"{program} {metadata.version('gatewayd')}\n"
