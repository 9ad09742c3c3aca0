"""Spec and status of one object have different writers: the controller's spec writes must not
race the daemons' status writes (the controller patches its part; no whole-object replace that
answers 409 whenever an agent wrote in between)."""

from __future__ import annotations

import itertools

import pytest
from fakecluster.fakeapi import FakeApiServer, RecordedRequest, wait_until
from kubernetes.client import ApiClient
from test_controller_harness import (
    GROUP,
    TIMEOUT,
    Agents,
    World,
    basic_cluster,
    options,
    running,
    settled,
)

pytestmark = pytest.mark.kube


def test_spec_writes_land_while_the_agent_writes_status_in_between(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world)
    beats = itertools.count()
    spec_writes: list[RecordedRequest] = []

    def agent_writes_status_first(request: RecordedRequest) -> None:
        """Before each spec write of the controller, the gateway's agent writes its status (a
        transition of its own), so the controller's cached resourceVersion is stale."""
        parts = request.path.split("/")
        writes = request.method in ("PUT", "PATCH") and f"/apis/{GROUP}/" in request.path
        if writes and parts[-2] == "egressgateways":  # the main resource, not /status
            spec_writes.append(request)
            gateway = fake_api.get("egressgateways", parts[-1]) or {}
            status = {**gateway.get("status", {}), "egressIPs": [f"203.0.113.{next(beats)}"]}
            fake_api.put({**gateway, "status": status})

    fake_api.before_request = agent_writes_status_first
    with Agents(fake_api, api), running(api, options()) as controller:
        wait_until(
            lambda: world.gateway_roles("gw-1", "pay") == {"active"}, TIMEOUT, "gw-1's plan"
        )
        settled(fake_api, controller)
    # Every spec write landed at the first attempt: one new generation each.
    generations = sum(
        (fake_api.get("egressgateways", g) or {})["metadata"]["generation"] - 1
        for g in ("gw-1", "gw-2")
    )
    assert generations == len(spec_writes)
    # and the status the agent wrote meanwhile is untouched by them
    assert (fake_api.get("egressgateways", "gw-1") or {})["status"]["egressIPs"] != []
