"""Per-gateway and per-node plans, and the per-policy results (for status)."""

from __future__ import annotations

import random

import pytest
from engine_fixtures import (
    gateway,
    iface,
    ip,
    net,
    node,
    pod,
    policy,
    sel,
    snapshot,
)

from gatewayd.policy.engine import EgressPlan, build_plan
from gatewayd.policy.model import (
    DropReason,
    GatewaySpec,
    IPAddress,
    Role,
    Snapshot,
    SnatRule,
    SteerAction,
    SteerRule,
)

pytestmark = pytest.mark.unit


def eth0(v4: str, v6: str) -> list[object]:
    return [iface("eth0", f"{v4}/24", f"{v6}/64", v4_default=True, v6_default=True)]


def ips(*texts: str) -> frozenset[IPAddress]:
    return frozenset(ip(t) for t in texts)


def cidrs(*texts: str) -> tuple[object, ...]:
    return tuple(net(t) for t in texts)


def cluster() -> Snapshot:
    gws = [
        gateway("gw-a", "192.0.2.1", interfaces=eth0("192.0.2.1", "2001:db8::1"),  # type: ignore[arg-type]
                pools=[("203.0.113.0/28", "eth0")]),
        gateway("gw-b", "192.0.2.2", interfaces=eth0("192.0.2.2", "2001:db8::2"),  # type: ignore[arg-type]
                pools=[("203.0.113.0/28", "eth0")]),
    ]  # fmt: skip
    pods = [
        pod("x1", ["10.0.1.1", "fd00::1"], labels={"app": "x"}, node="n1"),
        pod("x2", ["10.0.1.2"], labels={"app": "x"}, node="n1"),
        pod("x3", ["10.0.2.1"], labels={"app": "x"}, node="n2"),
        pod("xw", ["10.0.2.3"], labels={"app": "x", "tier": "web"}, node="n2"),
        pod("y1", ["10.0.2.2"], labels={"app": "y"}, node="n2"),
        pod("z1", ["10.0.1.9"], labels={"app": "z"}, node="n1"),
    ]
    policies = [
        policy(
            "px",
            ["198.51.100.0/24", "2001:db8:5::/48"],
            selectors=[sel({"app": "x"})],
            exclusions=["198.51.100.128/25"],
            egress_ip="203.0.113.10",
        ),
        # Selects xw too: its destinations are disjoint from px's, so px's rule is shared.
        policy("pw", ["192.0.2.128/25"], selectors=[sel({"tier": "web"})]),
        # y: a broad policy from which px-like narrower ones would carve; here alone.
        policy("py", ["198.51.0.0/16"], selectors=[sel({"app": "y"})]),
        # z: no gateway matches -> dropped at the source node.
        policy(
            "pz",
            ["198.51.0.0/16"],
            selectors=[sel({"app": "z"})],
            gateways=[GatewaySpec(sel({"nothing": "here"}))],
        ),
    ]
    nodes = [node("n1", "10.1.0.1", pod_cidrs=["10.0.1.0/24"]), node("n2", "10.1.0.2")]
    return snapshot(policies, pods, gws, nodes=nodes, api_servers=["10.1.0.100"])


@pytest.fixture(scope="module")
def plan() -> EgressPlan:
    return build_plan(cluster())


def test_active_gateway_plan(plan: EgressPlan) -> None:
    assert plan.gateway_plan("gw-a").rules == (
        SnatRule("pw", Role.ACTIVE, ips("10.0.2.3"), cidrs("192.0.2.128/25"), ip("192.0.2.1")),
        SnatRule(
            "px",
            Role.ACTIVE,
            ips("10.0.1.1", "10.0.1.2", "10.0.2.1", "10.0.2.3"),  # merged across classes
            cidrs("198.51.100.0/25"),  # the exclusion is carved out
            ip("203.0.113.10"),
        ),
        # IPv6 from the interface that holds (here: will hold) the IPv4 egress IP.
        SnatRule("px", Role.ACTIVE, ips("fd00::1"), cidrs("2001:db8:5::/48"), ip("2001:db8::1")),
        SnatRule("py", Role.ACTIVE, ips("10.0.2.2"), cidrs("198.51.0.0/16"), ip("192.0.2.1")),
    )
    assert plan.gateway_plan("gw-a").egress_ips == ips("192.0.2.1", "203.0.113.10", "2001:db8::1")


def test_standby_gateway_plan(plan: EgressPlan) -> None:
    standby = plan.gateway_plan("gw-b")
    assert standby.rules == (
        SnatRule("pw", Role.STANDBY, ips("10.0.2.3"), cidrs("192.0.2.128/25"), ip("192.0.2.2")),
        SnatRule(
            "px",
            Role.STANDBY,
            ips("10.0.1.1", "10.0.1.2", "10.0.2.1", "10.0.2.3"),
            cidrs("198.51.100.0/25"),
            ip("203.0.113.10"),  # the explicit egress IP follows the active gateway
        ),
        SnatRule("px", Role.STANDBY, ips("fd00::1"), cidrs("2001:db8:5::/48"), ip("2001:db8::2")),
        SnatRule("py", Role.STANDBY, ips("10.0.2.2"), cidrs("198.51.0.0/16"), ip("192.0.2.2")),
    )
    assert standby.egress_ips == frozenset()  # a standby owns no egress IP until failover


def test_unknown_gateway_has_an_empty_plan(plan: EgressPlan) -> None:
    assert plan.gateway_plan("gw-zzz").rules == ()


def test_node_plans_hold_only_local_sources(plan: EgressPlan) -> None:
    n1 = plan.node_plan("n1")
    tunnel = {"gateway": "gw-a", "standby": "gw-b"}
    assert n1.rules == (
        SteerRule("px", SteerAction.TUNNEL, ips("10.0.1.1", "10.0.1.2"),
                  cidrs("198.51.100.0/25"), **tunnel),
        SteerRule("px", SteerAction.TUNNEL, ips("fd00::1"), cidrs("2001:db8:5::/48"), **tunnel),
        SteerRule("pz", SteerAction.DROP, ips("10.0.1.9"), cidrs("198.51.0.0/16"),
                  reason=DropReason.NO_EGRESS_GATEWAY),
    )  # fmt: skip
    n2 = plan.node_plan("n2")
    assert n2.rules == (
        SteerRule("pw", SteerAction.TUNNEL, ips("10.0.2.3"), cidrs("192.0.2.128/25"), **tunnel),
        SteerRule("px", SteerAction.TUNNEL, ips("10.0.2.1", "10.0.2.3"),
                  cidrs("198.51.100.0/25"), **tunnel),
        SteerRule("py", SteerAction.TUNNEL, ips("10.0.2.2"), cidrs("198.51.0.0/16"), **tunnel),
    )  # fmt: skip
    assert plan.node_plan("n-without-pods").rules == ()


def test_node_plan_carries_cluster_internal_networks(plan: EgressPlan) -> None:
    expected = cidrs("10.0.1.0/24", "10.0.2.1/32", "10.0.2.2/31", "10.1.0.1/32", "10.1.0.2/32",
                     "10.1.0.100/32", "fd00::1/128")  # fmt: skip
    assert plan.node_plan("n1").cluster_internal == expected
    assert plan.node_plan("n-without-pods").cluster_internal == expected


def test_no_egress_ip_is_a_drop_rule_without_gateway() -> None:
    g = gateway("gw-a", "192.0.2.1")
    snap = snapshot([policy("p", egress_ip="203.0.113.99")], [pod("a", ["10.0.0.1"])], [g])
    plan = build_plan(snap)
    assert plan.node_plan("node-1").rules == (
        SteerRule("p", SteerAction.DROP, ips("10.0.0.1"), cidrs("198.51.100.0/24"),
                  reason=DropReason.NO_EGRESS_IP),
    )  # fmt: skip
    assert plan.gateway_plan("gw-a").rules == ()


def test_drops_of_several_entries_share_one_rule() -> None:
    gws = [
        gateway("gw-a", "192.0.2.1", labels={"site": "a"}),
        gateway("gw-b", "192.0.2.2", labels={"site": "b"}),
    ]
    specs = [GatewaySpec(sel({"site": s}), egress_ip=ip("203.0.113.99")) for s in "ab"]
    pods = [pod(f"p{i}", [f"10.0.0.{i}"], uid=f"uid-{i}") for i in range(1, 9)]
    plan = build_plan(snapshot([policy("p", gateways=specs)], pods, gws))
    assert plan.policy_results["p"].pods_per_entry[0] not in (0, 8)  # both entries are used
    assert plan.node_plan("node-1").rules == (
        SteerRule("p", SteerAction.DROP, frozenset(p.ips[0] for p in pods),
                  cidrs("198.51.100.0/24"), reason=DropReason.NO_EGRESS_IP),
    )  # fmt: skip


def test_narrower_policy_is_carved_out_of_a_broader_one() -> None:
    g = gateway("gw-a", "192.0.2.1")
    snap = snapshot(
        [policy("broad", ["198.51.0.0/16"]), policy("narrow", ["198.51.100.0/24"])],
        [pod("a", ["10.0.0.1"])],
        [g],
    )
    rules = build_plan(snap).gateway_plan("gw-a").rules
    assert [(r.policy, r.destinations) for r in rules] == [
        ("broad", cidrs("198.51.0.0/18", "198.51.64.0/19", "198.51.96.0/22", "198.51.101.0/24",
                        "198.51.102.0/23", "198.51.104.0/21", "198.51.112.0/20",
                        "198.51.128.0/17")),
        ("narrow", cidrs("198.51.100.0/24")),
    ]  # fmt: skip


def test_excluded_only_class_produces_no_rules() -> None:
    g = gateway("gw-a", "192.0.2.1")
    snap = snapshot(
        [policy("p", [], exclusions=["198.51.100.0/24"])], [pod("a", ["10.0.0.1"])], [g]
    )
    plan = build_plan(snap)
    assert plan.node_plan("node-1").rules == ()
    assert plan.gateway_plan("gw-a").rules == ()


def test_plans_do_not_depend_on_snapshot_order() -> None:
    snap = cluster()
    shuffled = list(snap.policies), list(snap.pods), list(snap.gateways), list(snap.nodes)
    for items in shuffled:
        random.Random(7).shuffle(items)
    other = Snapshot(
        policies=tuple(shuffled[0]),
        pods=tuple(shuffled[1]),
        gateways=tuple(shuffled[2]),
        nodes=tuple(shuffled[3]),
        api_server_addresses=snap.api_server_addresses,
    )
    a, b = build_plan(snap), build_plan(other)
    for gw in ("gw-a", "gw-b"):
        assert a.gateway_plan(gw) == b.gateway_plan(gw)
    for n in ("n1", "n2"):
        assert a.node_plan(n) == b.node_plan(n)
    assert a.policy_results == b.policy_results


def test_policy_results(plan: EgressPlan) -> None:
    px = plan.policy_results["px"]
    assert px.selected_pods == 4
    assert px.pods_per_entry == (4,)
    assert px.ring == (0,)
    (entry,) = px.entries
    assert (entry.gateway, entry.gateway_ip, entry.standby) == ("gw-a", ip("192.0.2.1"), "gw-b")
    assert (entry.egress_ipv4, entry.egress_ipv6) == (ip("203.0.113.10"), ip("2001:db8::1"))
    pz = plan.policy_results["pz"]
    assert (pz.selected_pods, pz.entries[0].gateway, pz.entries[0].egress_ipv4) == (1, None, None)
    assert set(plan.policy_results) == {"px", "pw", "py", "pz"}


def test_duplicate_pod_ip_belongs_to_the_first_pod_by_name() -> None:
    g = gateway("gw-a", "192.0.2.1")
    first = pod("a", ["10.0.0.1"], labels={"app": "x"})
    stale = pod("b", ["10.0.0.1"], labels={"app": "y"})
    snap = snapshot([policy("p", selectors=[sel({"app": "y"})])], [stale, first], [g])
    plan = build_plan(snap)
    e = plan.explain(ip("10.0.0.1"), ip("198.51.100.1"))
    assert (e.pod, e.verdict.value) == ("default/a", "no-policy")
    assert plan.gateway_plan("gw-a").rules == ()  # b's rule would have no source left
