"""Fixtures for the system tests: a Debian 12 root file system, the .deb, booted containers.

The rootfs is built once from Debian's packages by scripts/build-rootfs and cached under
.cache/rootfs/; the .deb is built fresh from the work tree (tests/conftest.py). Each test
gets its own container (boot < 1.5 s); everything it created goes away when the test ends.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.image import build
from nspawn import Container

from gatewayd.lab.netns import Sandbox

REPO = Path(__file__).resolve().parents[2]
_names = itertools.count(1)


@pytest.fixture(scope="session")
def rootfs() -> Path:
    return build("scripts/build-rootfs")


@pytest.fixture
def container(
    rootfs: Path, deb: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Container]:
    """A booted container with the .deb's directory at /mnt/dist. When the test fails, the
    gatewayd journal is shown; the console log stays in the test's tmp_path."""
    name = f"gwt{os.getpid() % 100000}-{next(_names)}"
    with Sandbox(name) as sandbox:
        booted = Container(sandbox, name, rootfs, tmp_path / "console.log",
                           binds=[(deb.parent, "/mnt/dist")])
        yield booted
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            journal = booted.run("journalctl", "-u", "gatewayd", "--no-pager", "-n", "80",
                                 check=False)
            print(f"--- journal of gatewayd in container {name} ---\n{journal.stdout}")
