"""API trouble: an unreachable API server, then back, rewrites nothing (gateways whose Leases
could not be renewed meanwhile are not failed over); a 410 Gone on a watch re-lists; failing
requests are retried until they succeed."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
from fakecluster.fakeapi import FakeApiServer, wait_until
from kubernetes.client import ApiClient
from test_controller_harness import (
    LEASE_SECONDS,
    NS,
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

PODS = "/api/v1/pods"


def lease_expired(fake: FakeApiServer, gateway: str) -> bool:
    spec = (fake.get("leases", f"egressgateway-{gateway}", NS) or {})["spec"]
    renewed = datetime.fromisoformat(spec["renewTime"]).timestamp()
    return time.time() > renewed + spec["leaseDurationSeconds"] + 1


def test_an_api_outage_rewrites_nothing(fake_api: FakeApiServer, api: ApiClient) -> None:
    world = World(fake_api)
    basic_cluster(world)
    with Agents(fake_api, api), running(api, options()) as controller:
        wait_until(
            lambda: world.condition("pay", "Ready").get("status") == "True", TIMEOUT, "Ready"
        )
        settled(fake_api, controller)
        before = {
            (r, o["metadata"]["name"]): o
            for r in ("egressgateways", "egressnodes", "egressgatewaypolicies")
            for o in fake_api.list(r)
        }
        start = len(fake_api.requests)

        fake_api.go_down()  # the agents cannot renew their Leases either
        wait_until(lambda: not controller.is_leader, TIMEOUT, "the leader Lease to lapse")
        wait_until(lambda: lease_expired(fake_api, "gw-1"), TIMEOUT, "gw-1's Lease to expire")
        runs = controller.reconciles
        fake_api.come_up()

        wait_until(lambda: controller.is_leader, TIMEOUT, "leadership again")
        wait_until(lambda: not lease_expired(fake_api, "gw-1"), TIMEOUT, "gw-1 renewing again")
        wait_until(lambda: controller.reconciles >= runs + 3 * LEASE_SECONDS, TIMEOUT, "reconciles")
        settled(fake_api, controller)
        assert controller_writes(fake_api, start) == []
        after = {
            (r, o["metadata"]["name"]): o
            for r in ("egressgateways", "egressnodes", "egressgatewaypolicies")
            for o in fake_api.list(r)
        }
        assert after == before
        assert world.events("GatewayFailover") == []

        # And it still works.
        world.pod("web-2", 1, 11, app="web")
        wait_until(lambda: world.status("pay")["selectedPods"] == 2, TIMEOUT, "web-2 selected")


def test_a_watch_from_expired_history_lists_again(fake_api: FakeApiServer, api: ApiClient) -> None:
    world = World(fake_api)
    basic_cluster(world)
    with Agents(fake_api, api), running(api, options()) as controller:
        wait_until(lambda: world.roles("pay") != set(), TIMEOUT, "pay planned")
        settled(fake_api, controller)
        lists = sum(1 for r in fake_api.requests if r.path == PODS and "watch" not in r.query)
        fake_api.expire_history()
        world.pod("web-2", 1, 11, app="web")  # only a new list shows it: the history is gone
        wait_until(
            lambda: "10.244.1.11" in str(world.spec("egressnodes", "node-1")), TIMEOUT, "web-2"
        )
        relists = sum(1 for r in fake_api.requests if r.path == PODS and "watch" not in r.query)
        assert relists > lists


def test_failing_requests_are_retried(fake_api: FakeApiServer, api: ApiClient) -> None:
    world = World(fake_api)
    basic_cluster(world)
    with Agents(fake_api, api), running(api, options()) as controller:
        wait_until(lambda: world.roles("pay") != set(), TIMEOUT, "pay planned")
        settled(fake_api, controller)
        start = len(fake_api.requests)
        fake_api.fail_requests(503, count=8)
        world.pod("web-2", 1, 11, app="web")
        wait_until(
            lambda: "10.244.1.11" in str(world.spec("egressnodes", "node-1")), TIMEOUT, "web-2"
        )
        assert controller.healthy
        assert controller_writes(fake_api, start) != []
