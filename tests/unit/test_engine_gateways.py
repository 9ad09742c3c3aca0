"""Gateway selection (§5.1-§5.4) among EgressGateways, multi-gateway hashing, standbys."""

from __future__ import annotations

import pytest
from engine_fixtures import ROLE, gateway, iface, ip, pod, policy, sel, snapshot

from gatewayd.policy.engine import build_plan
from gatewayd.policy.gateways import (
    candidates,
    first_ipv4,
    fnv1a32,
    resolve_gateways,
)
from gatewayd.policy.model import (
    DropReason,
    EgressGateway,
    GatewaySpec,
    NodeAddress,
    Verdict,
)

pytestmark = pytest.mark.unit

DST = "198.51.100.7"


def chosen(*gateways: EgressGateway) -> str | None:
    """The gateway the default test policy's single entry resolves to."""
    resolved = resolve_gateways(policy("p"), candidates(gateways))
    return resolved.entries[0].gateway


# --- FNV-1a ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", 0x811C9DC5), ("a", 0xE40C292C), ("foobar", 0xBF9CF968)],
)
def test_fnv1a32_known_vectors(text: str, expected: int) -> None:
    assert fnv1a32(text) == expected


# --- single gateway (§5.2) ------------------------------------------------------------------


def test_first_matching_gateway_in_bytewise_name_order() -> None:
    # gw-10 < gw-9 byte-wise ('1' < '9'), whatever the snapshot order.
    assert chosen(gateway("gw-9", "192.0.2.9"), gateway("gw-10", "192.0.2.10")) == "gw-10"
    assert chosen(gateway("gw-a", "192.0.2.1"), gateway("gw-B", "192.0.2.2")) == "gw-B"


def test_gateways_not_matching_the_node_selector_are_skipped() -> None:
    other = gateway("gw-0", "192.0.2.9", labels={"role": "other"})
    assert chosen(other, gateway("gw-1", "192.0.2.1")) == "gw-1"


def test_not_ready_gateways_are_skipped() -> None:
    assert chosen(gateway("gw-1", ready=False), gateway("gw-2", "192.0.2.2")) == "gw-2"
    assert chosen(gateway("gw-1", ready=False)) is None


def test_gateway_without_an_ipv4_address_is_skipped() -> None:
    v6_only = gateway("gw-1", addresses=[NodeAddress("InternalIP", "2001:db8::1")])
    assert chosen(v6_only, gateway("gw-2", "192.0.2.2")) == "gw-2"
    assert chosen(v6_only) is None


def test_gateway_ipv4_prefers_internal_then_external_then_any() -> None:
    def a(kind: str, address: str) -> NodeAddress:
        return NodeAddress(kind, address)

    assert first_ipv4(
        [a("Hostname", "gw"), a("ExternalIP", "198.51.100.1"), a("InternalIP", "192.0.2.1")]
    ) == ip("192.0.2.1")
    assert first_ipv4([a("InternalIP", "2001:db8::1"), a("ExternalIP", "198.51.100.1")]) == ip(
        "198.51.100.1"
    )
    assert first_ipv4([a("Hostname", "gw"), a("SomethingElse", "203.0.113.1")]) == ip("203.0.113.1")
    assert first_ipv4([a("InternalIP", "not-an-ip"), a("Hostname", "gw")]) is None


def test_no_matching_gateway_drops_with_no_egress_gateway() -> None:
    snap = snapshot([policy("p")], [pod("a", ["10.0.0.1"])], [gateway("gw-1", ready=False)])
    e = build_plan(snap).explain(ip("10.0.0.1"), ip(DST))
    assert (e.verdict, e.reason, e.gateway, e.egress_ip) == (
        Verdict.DROP,
        DropReason.NO_EGRESS_GATEWAY.value,
        None,
        None,
    )
    assert "entry 0: gw-1 matches but is not Ready" in e.details
    assert "entry 0: no Ready EgressGateway with an IPv4 address matches" in e.details


# --- several gateway entries (§5.3) ---------------------------------------------------------


def zone_gateways() -> list[EgressGateway]:
    return [
        # Names and IPv4 orders differ on purpose: the ring is sorted by IPv4.
        gateway("gw-a", "192.0.2.30", labels={**ROLE, "zone": "a"}),
        gateway("gw-b", "192.0.2.10", labels={**ROLE, "zone": "b"}),
        gateway("gw-c", "192.0.2.20", labels={**ROLE, "zone": "c"}),
    ]


def entries(*zones: str) -> list[GatewaySpec]:
    return [GatewaySpec(sel({"zone": z})) for z in zones]


def test_ring_is_sorted_by_gateway_ipv4_and_pods_hash_by_uid() -> None:
    uids = [f"uid-{i}" for i in range(12)]
    pods = [pod(f"p{i}", [f"10.0.0.{i + 1}"], uid=u) for i, u in enumerate(uids)]
    snap = snapshot([policy("p", gateways=entries("a", "b", "c"))], pods, zone_gateways())
    plan = build_plan(snap)
    result = plan.policy_results["p"]
    assert result.ring == (1, 2, 0)  # gw-b .10, gw-c .20, gw-a .30
    ring = ["gw-b", "gw-c", "gw-a"]
    for p in pods:
        e = plan.explain(p.ips[0], ip(DST))
        assert e.gateway == ring[fnv1a32(p.uid) % 3], p.uid
    spread = {ring[fnv1a32(u) % 3] for u in uids}
    assert spread == set(ring)  # the test data exercises every gateway
    assert sum(result.pods_per_entry) == result.selected_pods == 12


def test_hash_details_are_explained() -> None:
    p = pod("p", ["10.0.0.1"], uid="foobar")  # 0xbf9cf968 % 2 == 0
    snap = snapshot([policy("p", gateways=entries("a", "b"))], [p], zone_gateways())
    e = build_plan(snap).explain(ip("10.0.0.1"), ip(DST))
    assert e.gateway == "gw-b"
    assert "2 gateways sorted by IPv4 (gw-b, gw-a); fnv1a32(uid foobar) % 2 = 0, so gw-b" in (
        e.details
    )


def test_unmatched_entries_leave_the_ring() -> None:
    pods = [pod(f"p{i}", [f"10.0.0.{i + 1}"]) for i in range(8)]
    snap = snapshot([policy("p", gateways=entries("a", "nowhere", "b"))], pods, zone_gateways())
    plan = build_plan(snap)
    assert plan.policy_results["p"].ring == (2, 0)
    assert plan.policy_results["p"].entries[1].gateway is None
    gateways = {plan.explain(p.ips[0], ip(DST)).gateway for p in pods}
    assert gateways == {"gw-a", "gw-b"}  # nobody is dropped


def test_no_entry_matching_leaves_one_not_found_gateway() -> None:
    pods = [pod(f"p{i}", [f"10.0.0.{i + 1}"]) for i in range(4)]
    snap = snapshot([policy("p", gateways=entries("x", "y"))], pods, zone_gateways())
    plan = build_plan(snap)
    assert plan.policy_results["p"].ring == (0,)
    for p in pods:
        e = plan.explain(p.ips[0], ip(DST))
        assert (e.verdict, e.reason) == (Verdict.DROP, "no-egress-gateway")


def test_two_entries_may_resolve_to_the_same_gateway() -> None:
    pods = [pod(f"p{i}", [f"10.0.0.{i + 1}"]) for i in range(6)]
    specs = [GatewaySpec(sel({"zone": "a"}), egress_ip=ip(f"192.0.2.3{i}")) for i in (0, 0)]
    snap = snapshot([policy("p", gateways=specs)], pods, zone_gateways())
    plan = build_plan(snap)
    assert {plan.explain(p.ips[0], ip(DST)).gateway for p in pods} == {"gw-a"}
    assert plan.policy_results["p"].ring == (0, 1)


def test_all_ips_of_a_pod_use_the_same_entry() -> None:
    eth0_of = {
        "gw-a": ("192.0.2.30", "2001:db8::30"),
        "gw-b": ("192.0.2.10", "2001:db8::10"),
    }
    gws = [
        gateway(
            name,
            v4,
            labels={**ROLE, "zone": name[-1]},
            interfaces=[iface("eth0", f"{v4}/24", f"{v6}/64", v4_default=True, v6_default=True)],
        )
        for name, (v4, v6) in eth0_of.items()
    ]
    pods = [pod(f"p{i}", [f"10.0.0.{i + 1}", f"fd00::{i + 1}"]) for i in range(8)]
    pol = policy("p", ["198.51.100.0/24", "2001:db8:5::/48"], gateways=entries("a", "b"))
    plan = build_plan(snapshot([pol], pods, gws))
    for p in pods:
        four = plan.explain(p.ips[0], ip(DST))
        six = plan.explain(p.ips[1], ip("2001:db8:5::1"))
        assert four.gateway == six.gateway
        assert six.egress_ip == ip(eth0_of[str(four.gateway)][1])


# --- standby (our failover extension) ---------------------------------------------------------


def test_standby_is_the_next_matching_ready_gateway_by_name() -> None:
    gws = [
        gateway("gw-1", "192.0.2.1"),
        gateway("gw-2", "192.0.2.2", ready=False),
        gateway("gw-3", "192.0.2.3"),
        gateway("gw-4", "192.0.2.4"),
    ]
    resolved = resolve_gateways(policy("p"), candidates(gws))
    entry = resolved.entries[0]
    assert (entry.gateway, entry.standby) == ("gw-1", "gw-3")


def test_no_standby_when_no_other_gateway_matches() -> None:
    resolved = resolve_gateways(
        policy("p"), candidates([gateway("gw-1"), gateway("gw-2", ready=False)])
    )
    assert resolved.entries[0].standby is None
    assert resolved.entries[0].notes[-1] == (
        "entry 0: no standby: no other usable gateway matches (gw-2 is not Ready)"
    )


def test_no_standby_when_it_is_active_for_another_entry_of_the_policy() -> None:
    gws = [
        gateway("gw-1", "192.0.2.1", labels={"site": "x"}),
        gateway("gw-2", "192.0.2.2", labels={"site": "x", "only": "2"}),
    ]
    specs = [GatewaySpec(sel({"site": "x"})), GatewaySpec(sel({"only": "2"}))]
    resolved = resolve_gateways(policy("p", gateways=specs), candidates(gws))
    first, second = resolved.entries
    assert (first.gateway, first.standby) == ("gw-1", None)
    assert (second.gateway, second.standby) == ("gw-2", None)
    assert "entry 0: no standby: gw-2 is active for another entry" in first.notes


def test_standby_with_explicit_egress_ip_keeps_the_same_address() -> None:
    gws = [
        gateway("gw-1", "192.0.2.1", pools=[("203.0.113.0/28", "eth0")]),
        gateway("gw-2", "192.0.2.2", pools=[("203.0.113.0/28", "eth0")]),
    ]
    snap = snapshot([policy("p", egress_ip="203.0.113.10")], [pod("a", ["10.0.0.1"])], gws)
    plan = build_plan(snap)
    e = plan.explain(ip("10.0.0.1"), ip(DST))
    assert (e.gateway, e.egress_ip, e.standby) == ("gw-1", ip("203.0.113.10"), "gw-2")
    entry = plan.policy_results["p"].entries[0]
    assert entry.standby_egress is not None
    assert entry.standby_egress.ipv4 == ip("203.0.113.10")


def test_standby_without_explicit_egress_ip_uses_its_own_addresses() -> None:
    gws = [gateway("gw-1", "192.0.2.1"), gateway("gw-2", "192.0.2.2")]
    plan = build_plan(snapshot([policy("p")], [pod("a", ["10.0.0.1"])], gws))
    entry = plan.policy_results["p"].entries[0]
    assert entry.egress_ipv4 == ip("192.0.2.1")
    assert entry.standby_egress is not None
    assert entry.standby_egress.ipv4 == ip("192.0.2.2")


def test_standby_that_cannot_serve_a_family_is_not_offered_for_it() -> None:
    # gw-2 has no default route: after a failover IPv4 traffic would have no egress IP.
    gws = [gateway("gw-1", "192.0.2.1"), gateway("gw-2", "192.0.2.2", interfaces=[])]
    plan = build_plan(snapshot([policy("p")], [pod("a", ["10.0.0.1"])], gws))
    e = plan.explain(ip("10.0.0.1"), ip(DST))
    assert (e.verdict, e.gateway, e.standby) == (Verdict.SNAT, "gw-1", None)
    assert plan.policy_results["p"].entries[0].standby == "gw-2"
