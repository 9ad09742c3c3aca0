"""One standalone lab for every module here: this directory is a package so that the lab goes
down after its last test, before the Kubernetes lab's timing tests run. A test that changes the
lab (stops a daemon, edits the snapshot copy, tears a host down) puts it back as it found it,
or the modules after it fail."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fixtures.labs import running_lab

from gatewayd.lab.topology import Lab


@pytest.fixture(scope="package")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from running_lab(tmp_path_factory)
