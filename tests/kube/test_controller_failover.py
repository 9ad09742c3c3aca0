"""Health-aware failover: a gateway whose Lease expires (or that reports Ready=False) loses its
active role to the standby, a new standby is picked, and a gateway that comes back does not take
the traffic back (sticky): it becomes the standby once it has been healthy for the hold-down."""

from __future__ import annotations

import time

import pytest
from fakecluster.fakeapi import FakeApiServer, wait_until
from kubernetes.client import ApiClient, CustomObjectsApi
from test_controller_harness import (
    GROUP,
    HOLD_DOWN,
    TIMEOUT,
    VERSION,
    Agents,
    World,
    basic_cluster,
    options,
    running,
)

pytestmark = pytest.mark.kube


def test_lease_expiry_fails_over_and_the_returning_gateway_becomes_standby_after_hold_down(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world, gateways=3)
    with Agents(fake_api, api) as agents, running(api, options()):
        wait_until(
            lambda: world.node_routes("node-1", "pay") == {("gw-1", "gw-2")},
            TIMEOUT,
            "gw-1 active, gw-2 standby",
        )

        agents.kill("gw-1")
        wait_until(
            lambda: world.node_routes("node-1", "pay") == {("gw-2", "gw-3")},
            TIMEOUT,
            "gw-2 active, gw-3 the new standby",
        )
        assert world.gateway_roles("gw-2", "pay") == {"active"}
        assert world.gateway_roles("gw-3", "pay") == {"standby"}
        # The status and the Event follow the plans in the same reconcile.
        wait_until(
            lambda: world.roles("pay") == {("gw-2", "active"), ("gw-3", "standby")},
            TIMEOUT,
            "the status",
        )
        wait_until(lambda: world.events("GatewayFailover") != [], TIMEOUT, "the Event")
        (failover,) = world.events("GatewayFailover")
        assert failover["type"] == "Warning"
        assert failover["note"].startswith(
            "entry 0: gateway gw-1 is unusable (Lease egressgateway-gw-1 expired"
        )
        assert failover["note"].endswith("; gw-2 takes over")
        # Once node-1 has applied the plan without gw-1, gw-1's plan loses the policy.
        wait_until(lambda: world.gateway_roles("gw-1", "pay") == set(), TIMEOUT, "gw-1 retired")

        agents.revive("gw-1")
        revived = time.monotonic()
        wait_until(
            lambda: ("gw-1", "standby") in world.roles("pay"), TIMEOUT, "gw-1 to become the standby"
        )
        # Sticky: gw-2 keeps the traffic, gw-1 is only the standby, and only after hold-down.
        assert time.monotonic() - revived >= HOLD_DOWN
        assert world.roles("pay") == {("gw-2", "active"), ("gw-1", "standby")}
        wait_until(
            lambda: world.node_routes("node-1", "pay") == {("gw-2", "gw-1")},
            TIMEOUT,
            "node-1 steered to gw-2 with gw-1 standby",
        )
        assert world.gateway_roles("gw-1", "pay") == {"standby"}
        # gw-3 keeps its standby rules until node-1 has applied the plan that drops it.
        wait_until(lambda: world.gateway_roles("gw-3", "pay") == set(), TIMEOUT, "gw-3 retired")
        assert world.gateway_roles("gw-2", "pay") == {"active"}


def test_a_failover_every_node_made_on_its_own_becomes_the_plan(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    """The nodes' fast path never moves back on its own: when every node sent a policy to the
    standby (the active gateway missed their probes, though its Lease is fine), the controller
    makes the standby active, so the plan and the status say what the data plane does. One
    node alone is not enough: the others still reach the active gateway."""
    world = World(fake_api)
    basic_cluster(world, gateways=2)
    world.node(2)
    world.pod("web-2", 2, 10, app="web")
    objects = CustomObjectsApi(api)

    def routes() -> set[tuple[str | None, str | None]]:
        return world.node_routes("node-1", "pay") | world.node_routes("node-2", "pay")

    def report_failover(node: str) -> None:
        objects.patch_cluster_custom_object_status(GROUP, VERSION, "egressnodes", node, {
            "status": {"failovers": [{"policy": "pay", "from": "gw-1", "to": "gw-2",
                                      "time": "2026-12-03T00:00:00Z"}]}})

    with Agents(fake_api, api), running(api, options()) as controller:
        wait_until(lambda: routes() == {("gw-1", "gw-2")}, TIMEOUT, "gw-1 active, gw-2 standby")
        report_failover("node-1")
        runs = controller.reconciles
        wait_until(lambda: controller.reconciles >= runs + 3, TIMEOUT, "three more reconciles")
        assert world.roles("pay") == {("gw-1", "active"), ("gw-2", "standby")}

        report_failover("node-2")
        wait_until(lambda: routes() == {("gw-2", "gw-1")}, TIMEOUT, "gw-2 active, gw-1 standby")
        wait_until(lambda: world.roles("pay") == {("gw-2", "active"), ("gw-1", "standby")},
                   TIMEOUT, "the status")
        wait_until(lambda: world.events("GatewayFailover") != [], TIMEOUT, "the Event")
        (event,) = world.events("GatewayFailover")
        assert event["note"] == ("entry 0: every node failed over from gw-1 to gw-2 (no answer "
                                 "to their probes through gw-1's tunnel); gw-2 is active")


def test_during_hold_down_the_returning_gateway_is_not_used(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world, gateways=2)
    with Agents(fake_api, api) as agents, running(api, options(hold_down=60)) as controller:
        wait_until(
            lambda: world.node_routes("node-1", "pay") == {("gw-1", "gw-2")}, TIMEOUT, "gw-1 active"
        )
        agents.kill("gw-1")
        wait_until(
            lambda: world.node_routes("node-1", "pay") == {("gw-2", None)},
            TIMEOUT,
            "gw-2 active, no standby",
        )
        agents.revive("gw-1")
        runs = controller.reconciles
        wait_until(lambda: controller.reconciles >= runs + 3, TIMEOUT, "three more reconciles")
        # Healthy again, but within the 60 s hold-down: neither active nor standby.
        assert world.roles("pay") == {("gw-2", "active")}
        assert world.node_routes("node-1", "pay") == {("gw-2", None)}


def test_ready_false_fails_over_and_no_usable_gateway_drops(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world, gateways=2)
    with Agents(fake_api, api), running(api, options()):
        wait_until(
            lambda: world.node_routes("node-1", "pay") == {("gw-1", "gw-2")}, TIMEOUT, "gw-1 active"
        )
        world.gateway(1, ready=False)
        wait_until(
            lambda: world.node_routes("node-1", "pay") == {("gw-2", None)}, TIMEOUT, "gw-2 active"
        )
        wait_until(lambda: world.events("GatewayFailover") != [], TIMEOUT, "the Event")
        assert "(Ready=False)" in world.events("GatewayFailover")[0]["note"]

        world.gateway(2, ready=False)
        wait_until(
            lambda: [r["action"] for r in world.spec("egressnodes", "node-1")["rules"]] == ["drop"],
            TIMEOUT,
            "pay's traffic dropped",
        )
        (rule,) = world.spec("egressnodes", "node-1")["rules"]
        assert rule["reason"] == "no-egress-gateway"
        wait_until(
            lambda: world.condition("pay", "Ready").get("reason") == "NoGatewayMatches",
            TIMEOUT,
            "Ready=False NoGatewayMatches",
        )
        assert world.status("pay")["activeGateways"] == ""
