"""Leader election: of two controllers only the leader writes; when it stops, the other takes
over, and keeps the sticky choices the policy status records."""

from __future__ import annotations

import contextlib

import pytest
from fakecluster.fakeapi import FakeApiServer, wait_until
from kubernetes.client import ApiClient
from test_controller_harness import (
    TIMEOUT,
    Agents,
    World,
    basic_cluster,
    options,
    running,
    settled,
)

pytestmark = pytest.mark.kube


def test_only_the_leader_writes_and_the_other_takes_over(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world)
    with contextlib.ExitStack() as stack:
        stack.enter_context(Agents(fake_api, api))
        first = stack.enter_context(running(api, options("c1")))
        second = stack.enter_context(running(api, options("c2"), lead=False))
        wait_until(lambda: second.ready, TIMEOUT, "c2's caches")
        wait_until(
            lambda: world.condition("pay", "Ready").get("status") == "True", TIMEOUT, "Ready"
        )
        settled(fake_api, first)
        assert (first.is_leader, second.is_leader) == (True, False)
        assert first.writes > 0
        assert second.writes == 0

        world.pod("web-2", 1, 11, app="web")
        wait_until(lambda: world.status("pay")["selectedPods"] == 2, TIMEOUT, "web-2 selected")
        assert second.writes == 0

        first.stop()  # hands the Lease back
        wait_until(lambda: second.is_leader, TIMEOUT, "c2 to lead")
        lease = fake_api.get("leases", "gatewayd-controller", "gatewayd-system") or {}
        assert lease["spec"]["holderIdentity"] == "c2"
        world.pod("web-3", 1, 12, app="web")
        wait_until(lambda: world.status("pay")["selectedPods"] == 3, TIMEOUT, "web-3 selected")
        assert second.writes > 0


def test_a_new_leader_keeps_the_active_gateway_the_status_records(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world, gateways=2)
    with contextlib.ExitStack() as stack:
        agents = stack.enter_context(Agents(fake_api, api))
        first = stack.enter_context(running(api, options("c1")))
        second = stack.enter_context(running(api, options("c2"), lead=False))
        wait_until(
            lambda: world.node_routes("node-1", "pay") == {("gw-1", "gw-2")}, TIMEOUT, "gw-1 active"
        )
        agents.kill("gw-1")
        wait_until(lambda: world.roles("pay") == {("gw-2", "active")}, TIMEOUT, "failover")

        first.stop()
        wait_until(lambda: second.is_leader, TIMEOUT, "c2 to lead")
        agents.revive("gw-1")
        # c2 watched gw-1 go down too, so gw-1 gets the hold-down, then becomes the standby;
        # gw-2 stays active although gw-1 sorts first.
        wait_until(
            lambda: world.roles("pay") == {("gw-2", "active"), ("gw-1", "standby")},
            TIMEOUT,
            "gw-1 standby under c2",
        )
        wait_until(
            lambda: world.node_routes("node-1", "pay") == {("gw-2", "gw-1")},
            TIMEOUT,
            "node-1 on gw-2",
        )
        assert len(world.events("GatewayFailover")) == 1
