"""One cloud node must not poison every gateway: the controller leaves out a node whose
published key or endpoint is bad, or whose key another node published first, and reports it
on that EgressNode (condition PeerAccepted and a PeerRejected Event)."""

from __future__ import annotations

from typing import Any

import pytest
from fakecluster.fakeapi import FakeApiServer, wait_until
from kubernetes.client import ApiClient
from test_controller_harness import (
    TIMEOUT,
    Agents,
    World,
    basic_cluster,
    options,
    public_key,
    running,
    settled,
)

pytestmark = pytest.mark.kube


def publish(fake: FakeApiServer, node: str, **status: Any) -> None:
    """Change what `node`'s steer published (as a steer with these values would)."""
    obj = fake.get("egressnodes", node) or {}
    fake.put({**obj, "status": {**obj.get("status", {}), **status}})


def peer_names(world: World, gateway: str) -> list[str]:
    return [p["name"] for p in world.spec("egressgateways", gateway).get("peers", [])]


def peer_condition(fake: FakeApiServer, node: str) -> dict[str, Any]:
    conditions = ((fake.get("egressnodes", node) or {}).get("status") or {}).get("conditions")
    return next((c for c in conditions or [] if c["type"] == "PeerAccepted"), {})


def test_a_bad_endpoint_and_a_copied_key_leave_only_those_nodes_out(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world)
    for index in (2, 3, 4):
        world.node(index)
    publish(fake_api, "node-2", endpoint="10.0.0.2:99999")
    publish(fake_api, "node-3", publicKey=public_key("node-1"))  # node-1's, published first
    good = ["node-1", "node-4"]
    with Agents(fake_api, api), running(api, options()) as controller:
        for gateway in ("gw-1", "gw-2"):
            wait_until(
                lambda g=gateway: peer_names(world, g) == good, TIMEOUT, f"{gateway}'s peers"
            )
        wait_until(
            lambda: peer_condition(fake_api, "node-3").get("status") == "False",
            TIMEOUT,
            "node-3's PeerAccepted=False",
        )
        settled(fake_api, controller)
        assert peer_condition(fake_api, "node-1")["status"] == "True"
        assert peer_condition(fake_api, "node-4")["status"] == "True"
        bad_endpoint = peer_condition(fake_api, "node-2")
        assert (bad_endpoint["status"], bad_endpoint["reason"]) == ("False", "InvalidEndpoint")
        assert bad_endpoint["message"].startswith("status.endpoint: '10.0.0.2:99999'")
        copied = peer_condition(fake_api, "node-3")
        assert (copied["status"], copied["reason"]) == ("False", "DuplicatePublicKey")
        assert "EgressNode node-1 published this key first" in copied["message"]
        rejected = {e["regarding"]["name"]: e for e in world.events("PeerRejected")}
        assert sorted(rejected) == ["node-2", "node-3"]
        assert rejected["node-2"]["regarding"]["kind"] == "EgressNode"
        assert rejected["node-2"]["type"] == "Warning"
        assert "left out of every gateway's peers" in rejected["node-2"]["note"]

        # Fixed: the node is a peer again, its condition says so, and no Event repeats.
        publish(fake_api, "node-2", endpoint="10.0.0.2:51820")
        wait_until(
            lambda: peer_names(world, "gw-1") == ["node-1", "node-2", "node-4"],
            TIMEOUT,
            "node-2 back among the peers",
        )
        wait_until(
            lambda: peer_condition(fake_api, "node-2").get("status") == "True",
            TIMEOUT,
            "node-2's PeerAccepted=True",
        )
        settled(fake_api, controller)
        assert len(world.events("PeerRejected")) == 2


def test_the_controller_keeps_steers_conditions_beside_its_own(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world)
    steer_ready = {"type": "Ready", "status": "True", "reason": "PlanApplied", "message": ""}
    publish(fake_api, "node-1", conditions=[steer_ready])
    with Agents(fake_api, api), running(api, options()) as controller:
        wait_until(
            lambda: peer_condition(fake_api, "node-1").get("status") == "True",
            TIMEOUT,
            "node-1's PeerAccepted=True",
        )
        settled(fake_api, controller)
    conditions = (fake_api.get("egressnodes", "node-1") or {})["status"]["conditions"]
    assert [c["type"] for c in conditions] == ["Ready", "PeerAccepted"]
    assert conditions[0] == steer_ready


def test_a_gateway_with_a_bad_endpoint_is_left_out_of_the_nodes_plans(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world)
    gateway = fake_api.get("egressgateways", "gw-2") or {}
    fake_api.put({**gateway, "status": {**gateway["status"], "endpoint": "192.0.2.2:0"}})
    with Agents(fake_api, api), running(api, options()) as controller:
        wait_until(lambda: world.roles("pay") != set(), TIMEOUT, "pay planned")
        settled(fake_api, controller)
        names = [g["name"] for g in world.spec("egressnodes", "node-1")["gateways"]]
    assert names == ["gw-1"]
