"""Stickiness: `build_plan(snapshot, preferred_active)` keeps an entry's current active gateway
while it is usable and matches; a recovered gateway earlier by name becomes the standby."""

from __future__ import annotations

import pytest
from engine_fixtures import ROLE, gateway, ip, node, pod, policy, sel, snapshot

from gatewayd.policy.engine import build_plan
from gatewayd.policy.gateways import candidates, resolve_gateways
from gatewayd.policy.model import (
    EgressGateway,
    GatewaySpec,
    Role,
    SteerAction,
    Verdict,
)
from gatewayd.policy.planio import gateway_plan_to_dict, node_plan_to_dict

pytestmark = pytest.mark.unit

DST = "198.51.100.7"
THREE = [
    gateway("gw-1", "192.0.2.1"),
    gateway("gw-2", "192.0.2.2"),
    gateway("gw-3", "192.0.2.3"),
]


def entry_roles(
    gateways: list[EgressGateway], preferred: dict[int, str] | None
) -> tuple[str | None, str | None]:
    """(active, standby) of the default test policy's single entry."""
    resolved = resolve_gateways(policy("p"), candidates(gateways), preferred)
    first = resolved.entries[0]
    return first.gateway, first.standby


def test_the_preferred_gateway_stays_active_and_the_first_by_name_is_standby() -> None:
    assert entry_roles(THREE, None) == ("gw-1", "gw-2")
    assert entry_roles(THREE, {0: "gw-2"}) == ("gw-2", "gw-1")
    assert entry_roles(THREE, {0: "gw-3"}) == ("gw-3", "gw-1")


def test_the_notes_say_why_the_active_gateway_was_kept() -> None:
    resolved = resolve_gateways(policy("p"), candidates(THREE), {0: "gw-3"})
    assert resolved.entries[0].notes == (
        "entry 0: gw-3 stays active (it was before, and it is still usable and matches), "
        "although gw-1 sorts first",
        "entry 0: standby gw-1 (the first other usable matching one by name)",
    )


@pytest.mark.parametrize(
    ("gateways", "expected"),
    [
        # gw-2 is not Ready: the first usable by name takes over, the next is the standby.
        ([THREE[0], gateway("gw-2", "192.0.2.2", ready=False), THREE[2]], ("gw-1", "gw-3")),
        # gw-2 no longer matches the entry's nodeSelector.
        ([THREE[0], gateway("gw-2", "192.0.2.2", labels={}), THREE[2]], ("gw-1", "gw-3")),
        # gw-2 has no IPv4 address to be reached at.
        ([THREE[0], gateway("gw-2", None), THREE[2]], ("gw-1", "gw-3")),
        # gw-2 is gone.
        ([THREE[0], THREE[2]], ("gw-1", "gw-3")),
    ],
)
def test_an_unusable_preferred_gateway_is_not_kept(
    gateways: list[EgressGateway], expected: tuple[str, str]
) -> None:
    assert entry_roles(gateways, {0: "gw-2"}) == expected


def test_without_a_preference_the_plan_is_exactly_cilium_name_order() -> None:
    snap = snapshot(
        [policy("p"), policy("q", ("203.0.113.0/24",))],
        [pod("a", ["10.0.0.1"]), pod("b", ["10.0.0.2"], node="node-2")],
        THREE,
        nodes=[node("node-1", "10.1.0.1"), node("node-2", "10.1.0.2")],
    )
    reference = build_plan(snap)
    for plan in (build_plan(snap, None), build_plan(snap, {})):
        for name in ("gw-1", "gw-2", "gw-3"):
            assert plan.gateway_plan(name) == reference.gateway_plan(name)
        for name in ("node-1", "node-2"):
            assert plan.node_plan(name) == reference.node_plan(name)
        assert plan.policy_results == reference.policy_results


def test_a_preference_applies_to_its_policy_and_entry_only() -> None:
    snap = snapshot([policy("p"), policy("q", ("203.0.113.0/24",))], [], THREE)
    plan = build_plan(snap, {("p", 0): "gw-2", ("q", 1): "gw-3", ("other", 0): "gw-3"})
    p, q = plan.policy_results["p"].entries[0], plan.policy_results["q"].entries[0]
    assert (p.gateway, p.standby) == ("gw-2", "gw-1")
    assert (q.gateway, q.standby) == ("gw-1", "gw-2")


def test_plans_follow_the_sticky_choice() -> None:
    snap = snapshot([policy("p")], [pod("a", ["10.0.0.1"])], THREE)
    plan = build_plan(snap, {("p", 0): "gw-2"})
    explained = plan.explain(ip("10.0.0.1"), ip(DST))
    assert (explained.verdict, explained.gateway, explained.egress_ip, explained.standby) == (
        Verdict.SNAT,
        "gw-2",
        ip("192.0.2.2"),
        "gw-1",
    )
    assert [(r.role, r.egress_ip) for r in plan.gateway_plan("gw-2").rules] == [
        (Role.ACTIVE, ip("192.0.2.2"))
    ]
    assert [(r.role, r.egress_ip) for r in plan.gateway_plan("gw-1").rules] == [
        (Role.STANDBY, ip("192.0.2.1"))
    ]
    assert plan.gateway_plan("gw-3").rules == ()
    (rule,) = plan.node_plan("node-1").rules
    assert (rule.action, rule.gateway, rule.standby) == (SteerAction.TUNNEL, "gw-2", "gw-1")


def test_an_explicit_egress_ip_stays_with_the_sticky_active_gateway() -> None:
    pool = [("203.0.113.0/28", "eth0")]
    gws = [gateway("gw-1", "192.0.2.1", pools=pool), gateway("gw-2", "192.0.2.2", pools=pool)]
    snap = snapshot([policy("p", egress_ip="203.0.113.10")], [pod("a", ["10.0.0.1"])], gws)
    plan = build_plan(snap, {("p", 0): "gw-2"})
    assert plan.gateway_plan("gw-2").egress_ips == {ip("203.0.113.10")}
    assert plan.gateway_plan("gw-1").egress_ips == frozenset()
    standby_rules = gateway_plan_to_dict(plan.gateway_plan("gw-1"))["rules"]
    assert [(r["role"], r["egressIP"]) for r in standby_rules] == [("standby", "203.0.113.10")]


def test_standby_is_never_a_gateway_active_for_another_entry() -> None:
    # Entry 0 keeps gw-2, entry 1 matches only gw-1 and gw-2 and keeps gw-1: each entry's
    # standby would be the other's active, so neither gets one.
    site = {"site": "x"}
    gws = [
        gateway("gw-1", "192.0.2.1", labels=site),
        gateway("gw-2", "192.0.2.2", labels=site),
    ]
    specs = [GatewaySpec(sel(site)), GatewaySpec(sel(site))]
    resolved = resolve_gateways(
        policy("p", gateways=specs), candidates(gws), {0: "gw-2", 1: "gw-1"}
    )
    assert [(e.gateway, e.standby) for e in resolved.entries] == [("gw-2", None), ("gw-1", None)]
    assert "entry 0: no standby: gw-1 is active for another entry" in resolved.entries[0].notes


def test_the_hash_ring_is_ordered_by_the_sticky_actives() -> None:
    # Two entries over the same gateways: sticky actives change the ring's IPv4 order, and
    # with it which entry a pod hashes to; every pod still gets one entry for all its IPs.
    gws = [gateway(f"gw-{i}", f"192.0.2.{i}") for i in (1, 2, 3)]
    specs = [GatewaySpec(sel(ROLE)), GatewaySpec(sel({"only": "3"}))]
    gws[2] = gateway("gw-3", "192.0.2.3", labels={**ROLE, "only": "3"})
    resolved = resolve_gateways(policy("p", gateways=specs), candidates(gws), {0: "gw-3"})
    assert [e.gateway for e in resolved.entries] == ["gw-3", "gw-3"]
    resolved = resolve_gateways(policy("p", gateways=specs), candidates(gws), {0: "gw-2"})
    assert [e.gateway for e in resolved.ring] == ["gw-2", "gw-3"]


def test_node_plans_name_the_sticky_gateway_for_every_pod_of_the_policy() -> None:
    pods = [pod(f"p{i}", [f"10.0.0.{i}"], node=f"node-{i % 2}") for i in range(1, 7)]
    plan = build_plan(snapshot([policy("p")], pods, THREE), {("p", 0): "gw-3"})
    for name in ("node-0", "node-1"):
        rules = node_plan_to_dict(plan.node_plan(name))["rules"]
        assert {(r["gateway"], r["standby"]) for r in rules} == {("gw-3", "gw-1")}
    assert plan.policy_results["p"].selected_pods == 6
