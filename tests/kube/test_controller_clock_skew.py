"""Gateways whose clocks run off the controller's: their agents' Lease renewals go through the
fake API server's per-client clock offset, so their renewTimes are written with skewed clocks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from fakecluster.fakeapi import FakeApiServer, wait_until
from kubernetes.client import ApiClient, CoordinationV1Api, CustomObjectsApi
from kubernetes.config import new_client_from_config_dict
from test_controller_harness import (
    GROUP,
    LEASE_SECONDS,
    NS,
    TIMEOUT,
    VERSION,
    Agents,
    World,
    basic_cluster,
    options,
    running,
)

from gatewayd.clusterlink import CustomObject
from gatewayd.kube.leases import micro_time

pytestmark = pytest.mark.kube

OFFSETS = {"gw-1": -30.0, "gw-2": 30.0}  # gw-1's clock runs 30 s behind, gw-2's 30 s ahead


def client_of(fake: FakeApiServer, token: str) -> ApiClient:
    config = fake.kubeconfig_dict()
    config["users"][0]["user"] = {"token": token}
    client: ApiClient = new_client_from_config_dict(config, persist_config=False)
    return client


@contextmanager
def skewed_heartbeats(fake: FakeApiServer, alive: dict[str, threading.Event]) -> Iterator[None]:
    """Each gateway in `alive` renews its Lease every 0.5 s while its event is set, and
    reports the plans it is given as applied (its agent's work, without the harness's)."""
    stop = threading.Event()

    def beat(gateway: str) -> None:
        client = client_of(fake, f"token-{gateway}")
        leases, objects = CoordinationV1Api(client), CustomObjectsApi(client)
        while not stop.wait(0.5):
            if not alive[gateway].is_set() or not fake.is_up:
                continue
            spec = {"holderIdentity": gateway, "leaseDurationSeconds": LEASE_SECONDS,
                    "renewTime": micro_time(datetime.now(UTC))}
            leases.patch_namespaced_lease(f"egressgateway-{gateway}", NS, {"spec": spec})
            obj = fake.get("egressgateways", gateway) or {}
            generation = obj.get("metadata", {}).get("generation")
            if obj.get("status", {}).get("observedGeneration") != generation:
                objects.patch_cluster_custom_object_status(  # the plan is applied
                    GROUP, VERSION, "egressgateways", gateway,
                    {"status": {"observedGeneration": generation}},
                )

    threads = [threading.Thread(target=beat, args=(g,), daemon=True) for g in alive]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)


def failovers(fake: FakeApiServer) -> list[dict[str, object]]:
    """GatewayFailover Events, of either Events API."""
    return [
        e
        for e in fake.list("events") + fake.list("events.events.k8s.io")
        if e.get("reason") == "GatewayFailover"
    ]


def renewals(fake: FakeApiServer, start: int) -> int:
    """The fewest Lease renewals of one gateway since request `start`."""
    return min(
        sum(1 for r in fake.requests[start:]
            if r.method == "PATCH" and r.path.endswith(f"/leases/egressgateway-{gateway}"))
        for gateway in OFFSETS
    )


def set_offsets(fake: FakeApiServer, offsets: dict[str, float]) -> None:
    for gateway in OFFSETS:
        fake.set_clock_offset(f"token-{gateway}", offsets.get(gateway, 0.0))


@contextmanager
def cluster_with_skewed_gateways(
    fake_api: FakeApiServer, api: ApiClient, **controller_options: Any
) -> Iterator[tuple[World, dict[str, threading.Event]]]:
    """The basic cluster; its gateways' clocks are off by OFFSETS unless the caller sets
    others (`set_offsets`)."""
    set_offsets(fake_api, OFFSETS)
    world = World(fake_api)
    basic_cluster(world)
    alive = {g: threading.Event() for g in OFFSETS}
    for event in alive.values():
        event.set()
    with Agents(fake_api, api) as agents, skewed_heartbeats(fake_api, alive):
        for gateway in OFFSETS:
            agents.kill(gateway)  # the harness leaves these gateways to skewed_heartbeats
        with running(api, options(**controller_options)):
            yield world, alive


def test_gateways_with_skewed_clocks_are_healthy_while_renewing_and_fail_over_after(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    with cluster_with_skewed_gateways(fake_api, api) as (world, alive):
        start = len(fake_api.requests)
        wait_until(lambda: renewals(fake_api, start) >= 4 * LEASE_SECONDS / 0.5, TIMEOUT,
                   "renewals for four lease durations")
        assert world.roles("pay") == {("gw-1", "active"), ("gw-2", "standby")}
        assert failovers(fake_api) == []  # neither ever looked dead

        alive["gw-1"].clear()  # 30 s behind: it must not look dead forever
        wait_until(lambda: ("gw-2", "active") in world.roles("pay"), TIMEOUT, "failover to gw-2")
        alive["gw-1"].set()
        alive["gw-2"].clear()  # 30 s ahead: it must not stay alive 30 s after it died
        wait_until(lambda: ("gw-1", "active") in world.roles("pay"), TIMEOUT,
                   "failover back to gw-1 after its hold-down")


def test_the_skew_is_reported_in_status_and_as_a_warning(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    def skews() -> dict[str, object]:
        return {
            g: (fake_api.get("egressgateways", g) or {}).get("status", {}).get("clockSkewSeconds")
            for g in OFFSETS
        }

    # No resync within the test: once all is quiet, Lease renewals alone must bring the report.
    with cluster_with_skewed_gateways(fake_api, api, resync_interval=3600.0) as (world, _):
        set_offsets(fake_api, {})
        wait_until(lambda: world.roles("pay") == {("gw-1", "active"), ("gw-2", "standby")},
                   TIMEOUT, "the steady state")
        start = len(fake_api.requests)
        wait_until(lambda: renewals(fake_api, start) >= 4, TIMEOUT, "quiet renewals")
        assert skews() == {"gw-1": None, "gw-2": None}  # within a second: nothing to say
        set_offsets(fake_api, OFFSETS)
        wait_until(lambda: all(isinstance(v, int) for v in skews().values()), TIMEOUT,
                   "the skew in status")
        measured = skews()
        for gateway, offset in OFFSETS.items():
            assert abs(measured[gateway] - offset) <= 2, measured  # type: ignore[operator]
        wait_until(
            lambda: {e["regarding"]["name"] for e in world.events("ClockSkew")} == set(OFFSETS),
            TIMEOUT,
            "a ClockSkew Warning about each",
        )
        # Its agent writes its status as it does (a merge patch of its keys): ours stays.
        agent = CustomObject(api, "egressgateways", "EgressGateway", "gw-1")
        agent.patch_status({"observedGeneration": 1, "endpoint": "192.0.2.1:51820"})
        assert skews()["gw-1"] == measured["gw-1"]
