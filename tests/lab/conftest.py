"""Fixtures of the lab tests: network namespaces, so root only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fixtures.labs import running_lab

from gatewayd.lab.topology import Lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A lab of the module's own. Tests that change it put it back as they found it."""
    yield from running_lab(tmp_path_factory)
