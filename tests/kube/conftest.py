"""Fixtures of the Kubernetes API tests: the in-repo fake API server and a client for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fakecluster.fakeapi import FakeApiServer
from kubernetes.client import ApiClient


@pytest.fixture
def fake_api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def api(fake_api: FakeApiServer) -> Iterator[ApiClient]:
    """A client made by the real kubeconfig loader from the fake's kubeconfig."""
    with fake_api.api_client() as client:
        yield client
