"""Invalid policies: the newest version is rejected with its field path in the status and an
Event, the last valid version stays in force, and a policy never valid has no effect."""

from __future__ import annotations

import pytest
from fakecluster.fakeapi import FakeApiServer, wait_until
from kubernetes.client import ApiClient
from test_controller_harness import (
    TIMEOUT,
    Agents,
    World,
    basic_cluster,
    controller_writes,
    options,
    running,
    settled,
)

pytestmark = pytest.mark.kube


def test_an_invalid_edit_keeps_the_last_valid_version(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world)
    with Agents(fake_api, api), running(api, options()) as controller:
        wait_until(
            lambda: world.condition("pay", "Ready").get("status") == "True", TIMEOUT, "Ready"
        )
        settled(fake_api, controller)
        plans = {name: world.spec("egressgateways", name) for name in ("gw-1", "gw-2")}
        node_plan = world.spec("egressnodes", "node-1")
        start = len(fake_api.requests)

        world.policy("pay", destinations=("198.51.100.0/24", "198.51.100.300/24"))
        wait_until(
            lambda: world.condition("pay", "Accepted").get("status") == "False",
            TIMEOUT,
            "Accepted=False",
        )
        settled(fake_api, controller)
        accepted = world.condition("pay", "Accepted")
        assert accepted["reason"] == "InvalidSpec"
        assert accepted["observedGeneration"] == 2
        assert accepted["message"].startswith("spec.destinationCIDRs[1]: Invalid value")
        assert accepted["message"].endswith(
            "; the last valid version (generation 1) stays in force"
        )
        status = world.status("pay")
        assert status["lastError"]["field"] == "spec.destinationCIDRs[1]"
        assert status["observedGeneration"] == 2
        # The last valid version still decides: same gateways, still Ready, no plan rewritten.
        assert world.roles("pay") == {("gw-1", "active"), ("gw-2", "standby")}
        assert world.condition("pay", "Ready")["status"] == "True"
        assert {name: world.spec("egressgateways", name) for name in plans} == plans
        assert world.spec("egressnodes", "node-1") == node_plan
        assert [r.path for r in controller_writes(fake_api, start)] == [
            "/apis/egress.gatewayd.io/v1alpha1/egressgatewaypolicies/pay/status",
            "/apis/events.k8s.io/v1/namespaces/default/events",
        ]
        (rejected,) = world.events("PolicyRejected")
        assert rejected["type"] == "Warning"
        assert rejected["regarding"]["name"] == "pay"
        assert "spec.destinationCIDRs[1]" in rejected["note"]

        world.policy("pay", destinations=("198.51.100.0/24", "203.0.113.0/24"))
        wait_until(
            lambda: world.condition("pay", "Accepted").get("status") == "True",
            TIMEOUT,
            "Accepted=True",
        )
        wait_until(
            lambda: "203.0.113.0/24" in str(world.spec("egressnodes", "node-1")),
            TIMEOUT,
            "the fixed version in force",
        )
        assert "lastError" not in world.status("pay")
        assert len(world.events("PolicyRejected")) == 1


def test_a_policy_never_valid_has_no_effect(fake_api: FakeApiServer, api: ApiClient) -> None:
    world = World(fake_api)
    basic_cluster(world)
    world.policy(
        "broken",
        app="web",
        gateway_labels={"role": "gateway"},
        excludedCIDRs=["10.0.0.0/33"],
    )
    with Agents(fake_api, api), running(api, options()):
        wait_until(
            lambda: world.condition("broken", "Accepted").get("status") == "False",
            TIMEOUT,
            "Accepted=False",
        )
        ready = world.condition("broken", "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
        assert world.condition("broken", "Accepted")["message"].endswith(
            "; no valid version was seen, so the policy has no effect"
        )
        assert world.status("broken")["lastError"]["field"] == "spec.excludedCIDRs[0]"
        assert world.status("broken")["selectedPods"] == 0
        wait_until(lambda: world.roles("pay") != set(), TIMEOUT, "pay planned")
        assert world.node_routes("node-1", "broken") == set()
        assert world.gateway_roles("gw-1", "broken") == set()
