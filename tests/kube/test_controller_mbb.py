"""Make-before-break, seen in the fake API server's request log: a planned move programs the new
gateway, waits for its observedGeneration, then flips the nodes, then retires the old gateway's
rules; a failover (the old gateway unusable) flips at once."""

from __future__ import annotations

from typing import Any

import pytest
from fakecluster.fakeapi import FakeApiServer, RecordedRequest, wait_until
from kubernetes.client import ApiClient
from test_controller_harness import (
    TIMEOUT,
    Agents,
    World,
    options,
    running,
)

pytestmark = pytest.mark.kube

GATEWAYS = "/apis/egress.gatewayd.io/v1alpha1/egressgateways/"
NODES = "/apis/egress.gatewayd.io/v1alpha1/egressnodes/"


def first(
    requests: list[RecordedRequest], method: str, path: str, test: Any = lambda body: True
) -> int:
    """Index of the first request with `method` and `path` whose body passes `test`."""
    for index, request in enumerate(requests):
        if request.method == method and request.path == path and test(request.body):
            return index
    raise AssertionError(f"no {method} {path} that passes the test")


def has_rules_of(policy: str) -> Any:
    return lambda body: any(r["policy"] == policy for r in body["spec"]["rules"])


def steers_to(gateway: str) -> Any:
    return lambda body: any(r.get("gateway") == gateway for r in body["spec"]["rules"])


def setup(world: World) -> None:
    world.namespace("default")
    world.node(1)
    world.pod("web-1", 1, 10, app="web")
    world.gateway(1, site="a")
    world.gateway(2, site="b")


def test_a_planned_move_programs_the_new_gateway_before_the_nodes_flip(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    setup(world)
    world.policy("pay", gateway_labels={"site": "a"})
    with Agents(fake_api, api) as agents, running(api, options()) as controller:
        wait_until(
            lambda: world.node_routes("node-1", "pay") == {("gw-1", None)},
            TIMEOUT,
            "pay through gw-1",
        )
        agents.hold("gw-2")
        start = len(fake_api.requests)

        world.policy("pay", gateway_labels={"site": "b"})
        wait_until(
            lambda: world.gateway_roles("gw-2", "pay") == {"active"},
            TIMEOUT,
            "gw-2 programmed with pay",
        )
        wait_until(
            lambda: world.condition("pay", "Ready").get("reason") == "GatewayNotProgrammed",
            TIMEOUT,
            "Ready=False GatewayNotProgrammed",
        )
        runs = controller.reconciles
        wait_until(lambda: controller.reconciles >= runs + 2, TIMEOUT, "two more reconciles")
        # gw-2 has not reported its plan: node-1 keeps using gw-1, which keeps pay's rules.
        assert world.node_routes("node-1", "pay") == {("gw-1", None)}
        assert world.gateway_roles("gw-1", "pay") == {"active"}
        assert world.roles("pay") == {("gw-2", "active")}

        agents.release("gw-2")
        wait_until(
            lambda: world.node_routes("node-1", "pay") == {("gw-2", None)},
            TIMEOUT,
            "node-1 flipped to gw-2",
        )
        wait_until(lambda: world.gateway_roles("gw-1", "pay") == set(), TIMEOUT, "gw-1 retired")
        wait_until(
            lambda: world.condition("pay", "Ready").get("status") == "True", TIMEOUT, "Ready"
        )

    log = fake_api.requests[start:]
    programmed = first(log, "PATCH", GATEWAYS + "gw-2", has_rules_of("pay"))
    reported = first(log[programmed:], "PATCH", GATEWAYS + "gw-2/status") + programmed
    flipped = first(log, "PATCH", NODES + "node-1", steers_to("gw-2"))
    retired = first(log, "PATCH", GATEWAYS + "gw-1", lambda b: not has_rules_of("pay")(b))
    assert programmed < reported < flipped < retired
    assert not any(steers_to("gw-2")(r.body) for r in log[:reported] if r.path == NODES + "node-1")


def test_a_failover_flips_at_once_even_to_a_gateway_that_has_not_reported(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    setup(world)
    world.policy("pay", gateway_labels={"role": "gateway"})
    with Agents(fake_api, api) as agents:
        agents.hold("gw-2")
        with running(api, options()):
            wait_until(
                lambda: world.node_routes("node-1", "pay") == {("gw-1", "gw-2")},
                TIMEOUT,
                "gw-1 active, gw-2 standby",
            )
            start = len(fake_api.requests)
            agents.kill("gw-1")
            wait_until(
                lambda: world.node_routes("node-1", "pay") == {("gw-2", None)},
                TIMEOUT,
                "node-1 on gw-2",
            )
            log = fake_api.requests[start:]
            assert [r for r in log if r.path == GATEWAYS + "gw-2/status"] == []
            wait_until(
                lambda: world.condition("pay", "Ready").get("reason") == "GatewayNotProgrammed",
                TIMEOUT,
                "Ready=False until gw-2 reports",
            )
