"""Hooks and builds of every test directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.image import build, build_image

from gatewayd.lab.image import ImageRoot, unpack_image


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the test item, so fixtures can tell a failed test."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def deb() -> Path:
    """The .deb, built once per test run from this tree: the system tests install it, and the
    container image is made from it."""
    return build("packaging/deb/build.sh")


@pytest.fixture(scope="session")
def image(deb: Path) -> Path:
    """The container image (scripts/build-image, cached by its inputs), made from `deb`."""
    return build_image(deb)


@pytest.fixture(scope="session")
def image_root(image: Path, tmp_path_factory: pytest.TempPathFactory) -> ImageRoot:
    """The image unpacked, as a runtime would: the Kubernetes lab runs the controller and
    steer from it, and the system tests check what it holds."""
    return unpack_image(image, tmp_path_factory.mktemp("image") / "rootfs")
