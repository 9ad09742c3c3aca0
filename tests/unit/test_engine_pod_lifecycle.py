"""Pods that finished or are being deleted, and pods that show the same IP (IP reuse)."""

from __future__ import annotations

import pytest
from engine_fixtures import gateway, ip, pod, policy, sel, snapshot

from gatewayd.policy.engine import build_plan
from gatewayd.policy.model import Verdict
from gatewayd.policy.snapshot import parse_objects

pytestmark = pytest.mark.unit

JOBS = policy("jobs", ["198.51.100.0/24"], selectors=[sel({"app": "job"})])
WEB = policy("web", ["203.0.113.0/24"], selectors=[sel({"app": "web"})])
REUSED = "10.244.1.7"


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_finished_pod_is_not_selected_and_its_ip_is_not_steered(phase: str) -> None:
    done = pod("job-1", [REUSED], labels={"app": "job"}, phase=phase)
    plan = build_plan(snapshot([JOBS], [done], [gateway("gw-1")]))
    assert plan.policy_results["jobs"].selected_pods == 0
    assert plan.node_plan("node-1").rules == ()
    answer = plan.explain(ip(REUSED), ip("198.51.100.1"))
    assert answer.verdict is Verdict.NO_POLICY
    assert f"has finished (phase {phase})" in answer.details[0]


@pytest.mark.parametrize("names", [("job-1", "web-1"), ("web-1", "job-1")])
def test_a_new_running_pod_with_a_finished_pods_ip_gets_its_own_policy(
    names: tuple[str, str],
) -> None:
    """Whatever the names (which once decided who won), the running pod owns the IP."""
    old_name, new_name = names
    finished = pod(old_name, [REUSED], labels={"app": "job"}, phase="Succeeded")
    running = pod(new_name, [REUSED], labels={"app": "web"})
    plan = build_plan(snapshot([JOBS, WEB], [finished, running], [gateway("gw-1")]))
    assert plan.policy_results["jobs"].selected_pods == 0
    assert plan.policy_results["web"].selected_pods == 1
    steered = {rule.policy: rule.sources for rule in plan.node_plan("node-1").rules}
    assert steered == {"web": frozenset({ip(REUSED)})}
    to_jobs_destination = plan.explain(ip(REUSED), ip("198.51.100.1"))
    assert to_jobs_destination.verdict is Verdict.NO_POLICY
    assert to_jobs_destination.pod == f"default/{new_name}"
    to_web_destination = plan.explain(ip(REUSED), ip("203.0.113.1"))
    assert to_web_destination.verdict is Verdict.SNAT
    assert to_web_destination.policy == "web"
    assert any(f"pod default/{old_name} has finished" in d for d in to_web_destination.details)


def test_a_pod_in_its_deletion_grace_period_keeps_its_policy() -> None:
    """As in Cilium: its endpoint lives until its containers stop, so does its egress."""
    leaving = pod("job-1", [REUSED], labels={"app": "job"}, deleting=True)
    plan = build_plan(snapshot([JOBS], [leaving], [gateway("gw-1")]))
    assert plan.policy_results["jobs"].selected_pods == 1
    assert plan.explain(ip(REUSED), ip("198.51.100.1")).verdict is Verdict.SNAT


@pytest.mark.parametrize("names", [("a-old", "b-new"), ("b-old", "a-new")])
def test_a_running_pod_wins_an_ip_over_one_being_deleted(names: tuple[str, str]) -> None:
    old_name, new_name = names
    leaving = pod(old_name, [REUSED], labels={"app": "job"}, deleting=True)
    running = pod(new_name, [REUSED], labels={"app": "web"})
    plan = build_plan(snapshot([JOBS, WEB], [leaving, running], [gateway("gw-1")]))
    assert plan.policy_results["jobs"].selected_pods == 0
    assert plan.policy_results["web"].selected_pods == 1
    assert plan.explain(ip(REUSED), ip("203.0.113.1")).pod == f"default/{new_name}"


def test_a_running_pod_wins_an_ip_over_a_pending_one() -> None:
    starting = pod("a-starting", [REUSED], labels={"app": "job"}, phase="Pending")
    running = pod("b-running", [REUSED], labels={"app": "web"})
    plan = build_plan(snapshot([JOBS, WEB], [starting, running], [gateway("gw-1")]))
    assert plan.policy_results["web"].selected_pods == 1
    assert plan.policy_results["jobs"].selected_pods == 0


def test_a_finished_pods_ip_is_not_cluster_internal() -> None:
    """Cilium forgets it (ipcache): traffic to it is no longer traffic to a pod."""
    finished = pod("job-1", ["198.51.100.9"], labels={"app": "job"}, phase="Succeeded")
    running = pod("web-1", [REUSED], labels={"app": "job"})
    plan = build_plan(snapshot([JOBS], [finished, running], [gateway("gw-1")]))
    assert plan.explain(ip(REUSED), ip("198.51.100.9")).verdict is Verdict.SNAT


def test_the_snapshot_reads_phase_and_deletion() -> None:
    loaded = parse_objects([("test", {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "default", "uid": "u",
                     "deletionTimestamp": "2026-12-02T23:00:00Z"},
        "status": {"phase": "Succeeded", "podIP": REUSED},
    })])
    (read,) = loaded.snapshot.pods
    assert (read.phase, read.deleting, read.finished) == ("Succeeded", True, True)
