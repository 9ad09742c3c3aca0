"""Pods that finish, are deleted with a grace period, and whose IP a new pod reuses: the
controller against the fake API server, which plays the kubelet's and the API server's part."""

from __future__ import annotations

import pytest
from fakecluster.fakeapi import FakeApiServer, wait_until
from kubernetes.client import ApiClient, CoreV1Api, V1DeleteOptions
from test_controller_harness import TIMEOUT, Agents, World, basic_cluster, options, running

pytestmark = pytest.mark.kube

JOB_DESTINATIONS = ("198.18.0.0/24",)


def selected(world: World, policy: str) -> int | None:
    count = world.status(policy).get("selectedPods")
    return count if isinstance(count, int) else None


def steered(world: World, node: str, policy: str) -> set[str]:
    """The sources node `node` steers for `policy`."""
    return {
        source
        for rule in world.spec("egressnodes", node).get("rules", [])
        if rule["policy"] == policy
        for source in rule["sources"]
    }


def test_a_finished_pods_ip_goes_to_the_new_pod_that_reuses_it(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world)
    world.policy("jobs", app="job", destinations=JOB_DESTINATIONS)
    reused = world.pod("job-1", 1, 20, app="job")
    fake_api.set_pod_phase("job-1", "Running")
    with Agents(fake_api, api), running(api, options()):
        # The policy's status is written after the plans: wait for both.
        wait_until(
            lambda: steered(world, "node-1", "jobs") == {reused} and selected(world, "jobs") == 1,
            TIMEOUT,
            "job-1 steered and counted",
        )

        fake_api.set_pod_phase("job-1", "Succeeded")  # it keeps status.podIP
        wait_until(
            lambda: selected(world, "jobs") == 0 and not steered(world, "node-1", "jobs"),
            TIMEOUT,
            "the finished job-1 to be left out",
        )

        assert world.pod("web-9", 1, 20, app="web") == reused  # the CNI hands the IP out again
        # The node's spec and the policy's status are separate writes: wait for both.
        wait_until(
            lambda: steered(world, "node-1", "pay") == {"10.244.1.10", reused}
            and selected(world, "pay") == 2,
            TIMEOUT,
            "web-9 steered and counted by its own policy",
        )
        assert selected(world, "jobs") == 0
        assert not steered(world, "node-1", "jobs")

        # A finished pod is deleted at once, even with a grace period.
        CoreV1Api(api).delete_namespaced_pod(
            "job-1", "default", body=V1DeleteOptions(grace_period_seconds=30),
            _preload_content=False,  # the fake's pods have no containers: no V1Pod
        )
        assert fake_api.get("pods", "job-1") is None


def test_a_pod_in_its_grace_period_keeps_its_policy_until_a_new_pod_shows_its_ip(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    """As Cilium does: egress stays while the containers may still run (and drain)."""
    world = World(fake_api)
    basic_cluster(world)
    world.policy("jobs", app="job", destinations=JOB_DESTINATIONS)
    ip = world.pod("job-1", 1, 20, app="job")
    fake_api.set_pod_phase("job-1", "Running")
    pods = CoreV1Api(api)
    with Agents(fake_api, api), running(api, options()):
        wait_until(lambda: steered(world, "node-1", "jobs") == {ip}, TIMEOUT, "job-1 steered")

        pods.delete_namespaced_pod(
            "job-1", "default", body=V1DeleteOptions(grace_period_seconds=600),
            _preload_content=False,
        )
        deleting = fake_api.get("pods", "job-1")
        assert deleting is not None and deleting["metadata"]["deletionTimestamp"]
        assert deleting["metadata"]["deletionGracePeriodSeconds"] == 600
        assert steered(world, "node-1", "jobs") == {ip}

        # While it drains, a new pod shows its IP (a CNI that reuses IPs at once): it wins.
        world.pod("web-9", 1, 20, app="web")
        fake_api.set_pod_phase("web-9", "Running")
        wait_until(
            lambda: steered(world, "node-1", "pay") == {"10.244.1.10", ip}
            and not steered(world, "node-1", "jobs"),
            TIMEOUT,
            "web-9 to win the IP",
        )
        assert fake_api.get("pods", "job-1") is not None  # still in its grace period

        pods.delete_namespaced_pod(  # forced
            "job-1", "default", body=V1DeleteOptions(grace_period_seconds=0),
            _preload_content=False,
        )
        assert fake_api.get("pods", "job-1") is None


def test_a_pod_is_gone_when_its_grace_period_ends(fake_api: FakeApiServer) -> None:
    world = World(fake_api)
    world.namespace("default")
    world.node(1)
    world.pod("job-1", 1, 20, app="job")
    fake_api.set_pod_phase("job-1", "Running")
    deleting = fake_api.delete_pod("job-1", grace_seconds=1)
    assert deleting["metadata"]["deletionGracePeriodSeconds"] == 1
    assert fake_api.get("pods", "job-1") is not None
    wait_until(lambda: fake_api.get("pods", "job-1") is None, TIMEOUT, "the grace period")
