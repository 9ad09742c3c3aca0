"""Fixtures of the lab tests: network namespaces, so root only."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

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

