"""Fixtures of the lab tests: network namespaces, so root only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.image import build_image

from gatewayd.lab.image import ImageRoot, unpack_image
from gatewayd.lab.topology import Lab, lab_session


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The whole lab with its daemons ready, shared by a module's tests; removed afterwards
    (its configs, state and logs stay under pytest's temporary directory).

    Tests that change it (stop a daemon, edit the snapshot copy) put it back as they found it.
    """
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces)")
    with lab_session(tmp_path_factory.mktemp("lab")) as running:
        yield running


@pytest.fixture(scope="session")
def image_root(tmp_path_factory: pytest.TempPathFactory, deb: Path) -> ImageRoot:
    """The cluster side's container image (scripts/build-image, cached), unpacked: the
    Kubernetes lab runs the controller and steer from it."""
    if os.geteuid() != 0:
        pytest.skip("the image is built and run as root")
    return unpack_image(build_image(deb), tmp_path_factory.mktemp("image") / "rootfs")
