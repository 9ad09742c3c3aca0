"""Property: a plan kept current event by event (`updated_plan`: pods one by one, anything else
a new plan) equals the plan built whole from the same snapshot, after any sequence of pod,
namespace, node, policy and gateway events. Pods share IPs (claims change hands), finish, lose
their IP, move between nodes and namespaces; IPs outside every pod CIDR change the
cluster-internal list."""

from __future__ import annotations

from dataclasses import dataclass, replace
from ipaddress import ip_address, ip_network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine_properties import DESTINATIONS, LABELS, gateways, policies, snapshots

from gatewayd.policy.engine import EgressPlan, build_plan, updated_plan
from gatewayd.policy.model import IPAddress, Namespace, Node, NodeAddress, Pod, Snapshot

pytestmark = pytest.mark.unit

# Few addresses, so that pods often show the same one; 10.0.0.200+ are outside n1's pod CIDR.
POD_IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.200", "10.0.0.201", "fd00::1", "fd00::2"]
SLOTS = 8  # pod-0 .. pod-7


@st.composite
def pods(draw: st.DrawFn, slot: int) -> Pod:
    addresses = draw(st.lists(st.sampled_from(POD_IPS), max_size=2, unique=True))
    return Pod(
        name=f"pod-{slot}",
        namespace=draw(st.sampled_from(["ns1", "ns2", "ns3"])),
        uid=draw(st.sampled_from(["", "u1", "u2", "u3", "u4"])),
        labels={k: draw(st.sampled_from(v)) for k, v in LABELS.items() if draw(st.booleans())},
        node_name=draw(st.sampled_from(["n1", "n2", "ghost", None])),
        host_network=draw(st.integers(0, 9)) == 0,
        ips=tuple(ip_address(a) for a in addresses),
        phase=draw(st.sampled_from([None, "Running", "Pending", "Succeeded"])),
        deleting=draw(st.integers(0, 5)) == 0,
    )


@dataclass(frozen=True)
class PodEvent:
    slot: int
    pod: Pod | None  # None: deleted


@dataclass(frozen=True)
class ClusterEvent:
    """Anything but a pod: the snapshot with this field replaced."""

    field: str
    value: object


@st.composite
def events(draw: st.DrawFn) -> PodEvent | ClusterEvent:
    kind = draw(st.sampled_from(["pod"] * 6 + ["namespace", "node", "policy", "gateway"]))
    if kind == "pod":
        slot = draw(st.integers(0, SLOTS - 1))
        return PodEvent(slot, draw(st.one_of(st.none(), pods(slot))))
    if kind == "namespace":
        teams = draw(st.lists(st.sampled_from(["t1", "t2"]), min_size=2, max_size=2))
        return ClusterEvent(
            "namespaces",
            tuple(
                Namespace(name, {"kubernetes.io/metadata.name": name, "team": team})
                for name, team in zip(("ns1", "ns2"), teams, strict=True)
            ),
        )
    if kind == "node":
        zones = draw(st.lists(st.sampled_from(["e", "w"]), min_size=2, max_size=2))
        cidrs = draw(st.sampled_from([("10.0.0.0/28",), ("10.0.0.192/26",), ()]))
        return ClusterEvent(
            "nodes",
            (
                Node(
                    "n1",
                    {"zone": zones[0]},
                    (NodeAddress("InternalIP", "10.1.0.1"),),
                    tuple(ip_network(c) for c in cidrs),
                ),
                Node("n2", {"zone": zones[1]}, (NodeAddress("InternalIP", "10.1.0.2"),), ()),
            ),
        )
    if kind == "policy":
        names = draw(
            st.lists(st.sampled_from(["a", "b", "B", "c"]), unique=True, min_size=0, max_size=3)
        )
        return ClusterEvent("policies", tuple(draw(policies(n)) for n in names))
    names = draw(
        st.lists(st.sampled_from(["gw-1", "gw-10", "gw-9"]), unique=True, min_size=1, max_size=3)
    )
    return ClusterEvent("gateways", tuple(draw(gateways(i, n)) for i, n in enumerate(names)))


def with_pods(snap: Snapshot, by_slot: dict[int, Pod]) -> Snapshot:
    # In the order events brought them, as the controller's caches have them.
    return replace(snap, pods=tuple(by_slot.values()))


def assert_same(kept: EgressPlan, whole: EgressPlan, snap: Snapshot) -> None:
    for gateway in [*(g.name for g in snap.gateways), "gw-1", "gw-10", "gw-9"]:
        assert kept.gateway_plan(gateway) == whole.gateway_plan(gateway), gateway
    for node in ("n1", "n2", "ghost"):
        assert kept.node_plan(node) == whole.node_plan(node), node
    assert kept.policy_results == whole.policy_results
    assert kept.cluster_internal == whole.cluster_internal
    sources: set[IPAddress] = {ip_address(a) for a in POD_IPS}
    for src in sorted(sources, key=lambda a: (a.version, int(a))):
        for dst in DESTINATIONS:
            target = ip_address(dst)
            if target.version == src.version:
                assert kept.explain(src, target) == whole.explain(src, target), (src, dst)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots(), st.lists(events(), min_size=1, max_size=25))
def test_kept_plan_equals_whole_plan(
    initial: Snapshot, sequence: list[PodEvent | ClusterEvent]
) -> None:
    by_slot = {int(p.name.split("-")[1]): p for p in initial.pods}
    snap = with_pods(initial, by_slot)
    plan = build_plan(snap)
    for event in sequence:
        removed: list[Pod] = []
        added: list[Pod] = []
        if isinstance(event, PodEvent):
            if event.slot in by_slot:
                removed.append(by_slot.pop(event.slot))
            if event.pod is not None:
                by_slot[event.slot] = event.pod
                added.append(event.pod)
        else:
            snap = replace(snap, **{event.field: event.value})
        snap = with_pods(snap, by_slot)
        plan, _ = updated_plan(plan, snap, None, removed, added)
        assert_same(plan, build_plan(snap), snap)


def test_a_pod_event_keeps_the_plan_and_names_what_it_changed() -> None:
    """Not a new plan: the same object, and only the touched node and gateways to render."""
    snap = with_pods(
        Snapshot(
            nodes=(Node("n1", {}, (), (ip_network("10.0.0.0/28"),)),),
        ),
        {},
    )
    plan = build_plan(snap)
    pod = Pod("p", "ns1", "u1", {}, node_name="n1", ips=(ip_address("10.0.0.1"),))
    kept, changes = updated_plan(plan, replace(snap, pods=(pod,)), None, [], [pod])
    assert kept is plan
    assert changes is not None and not changes.cluster_internal  # inside the pod CIDR
    stray = replace(pod, name="q", ips=(ip_address("10.9.0.1"),))
    _, changes = updated_plan(plan, replace(snap, pods=(pod, stray)), None, [], [stray])
    assert changes is not None and changes.cluster_internal
