"""Egress IP derivation (§5.5, Cilium >= 1.20 with the #48660 fix) and our pool extension."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from engine_fixtures import ROLE, gateway, iface, ip, pod, policy, sel, snapshot

from gatewayd.policy.engine import build_plan
from gatewayd.policy.gateways import EgressIPs, derive_egress_ips
from gatewayd.policy.model import EgressGateway, GatewayInterface, GatewaySpec, Verdict

pytestmark = pytest.mark.unit

V4_AND_V6 = {"v4_needed": True, "v6_needed": True}


def gw(*interfaces: GatewayInterface, pools: list[tuple[str, str]] | None = None) -> EgressGateway:
    return gateway("gw-1", "192.0.2.1", interfaces=interfaces, pools=pools or [])


def derive(
    g: EgressGateway,
    *,
    interface: str | None = None,
    egress_ip: str | None = None,
    v4_needed: bool = True,
    v6_needed: bool = False,
) -> tuple[str | None, str | None]:
    spec = GatewaySpec(sel(ROLE), interface, ip(egress_ip) if egress_ip else None)
    found = derive_egress_ips(g, spec, v4_needed, v6_needed)
    return (
        str(found.ipv4) if found.ipv4 else None,
        str(found.ipv6) if found.ipv6 else None,
    )


DUAL = iface("eth1", "fe80::1/64", "203.0.113.5/24", "203.0.113.6/24", "2001:db8:1::5/64")
V4_ONLY = iface("eth2", "198.51.100.5/24", altnames=["enp3s0", "uplink"])
V6_ONLY = iface("eth3", "fe80::3/64", "2001:db8:3::3/64")
LINK_LOCAL_V6 = iface("eth4", "198.51.100.44/24", "fe80::4/64")


# --- interface: X --------------------------------------------------------------------------


def test_interface_first_ipv4_and_first_non_link_local_ipv6() -> None:
    assert derive(gw(DUAL), interface="eth1", **V4_AND_V6) == ("203.0.113.5", "2001:db8:1::5")


def test_interface_found_by_altname() -> None:
    assert derive(gw(V4_ONLY), interface="uplink") == ("198.51.100.5", None)


def test_interface_missing_means_both_not_found() -> None:
    assert derive(gw(DUAL), interface="eth9", **V4_AND_V6) == (None, None)


def test_interface_lacking_a_needed_family_means_both_not_found() -> None:
    assert derive(gw(V4_ONLY), interface="eth2", **V4_AND_V6) == (None, None)
    assert derive(gw(V6_ONLY), interface="eth3", **V4_AND_V6) == (None, None)
    # A link-local IPv6 address does not count.
    assert derive(gw(LINK_LOCAL_V6), interface="eth4", **V4_AND_V6) == (None, None)


def test_interface_lacking_a_family_that_is_not_needed_is_fine() -> None:
    assert derive(gw(V4_ONLY), interface="eth2", v4_needed=True) == ("198.51.100.5", None)
    assert derive(gw(V6_ONLY), interface="eth3", v4_needed=False, v6_needed=True) == (
        None,
        "2001:db8:3::3",
    )


# --- egressIP: A ---------------------------------------------------------------------------


def test_egress_ipv4_on_a_device_takes_ipv6_from_that_device() -> None:
    assert derive(gw(V4_ONLY, DUAL), egress_ip="203.0.113.6", **V4_AND_V6) == (
        "203.0.113.6",
        "2001:db8:1::5",
    )


def test_egress_ipv6_on_a_device_takes_ipv4_from_that_device() -> None:
    assert derive(gw(V4_ONLY, DUAL), egress_ip="2001:db8:1::5", **V4_AND_V6) == (
        "203.0.113.5",
        "2001:db8:1::5",
    )


def test_missing_other_family_marks_only_that_family_not_found() -> None:
    """#48660 fix: an IPv4 egressIP with dual-stack destinations keeps working for IPv4."""
    assert derive(gw(V4_ONLY), egress_ip="198.51.100.5", **V4_AND_V6) == ("198.51.100.5", None)
    assert derive(gw(V6_ONLY), egress_ip="2001:db8:3::3", **V4_AND_V6) == (None, "2001:db8:3::3")


def test_egress_ip_on_no_device_and_in_no_pool_means_both_not_found() -> None:
    assert derive(gw(DUAL), egress_ip="203.0.113.99", **V4_AND_V6) == (None, None)


def test_egress_ip_inside_a_pool_is_provisioned_on_the_pools_interface() -> None:
    g = gw(V4_ONLY, DUAL, pools=[("198.18.0.0/28", "eth1")])
    assert derive(g, egress_ip="198.18.0.9", **V4_AND_V6) == ("198.18.0.9", "2001:db8:1::5")
    found = derive_egress_ips(g, GatewaySpec(sel(ROLE), egress_ip=ip("198.18.0.9")), True, False)
    assert found.notes == (
        "egressIP 198.18.0.9 is in pool 198.18.0.0/28 of gateway gw-1; "
        "the agent provisions it on eth1",
    )


def test_egress_ipv6_inside_a_pool() -> None:
    g = gw(V4_ONLY, pools=[("2001:db8:99::/64", "uplink")])
    assert derive(g, egress_ip="2001:db8:99::7", **V4_AND_V6) == ("198.51.100.5", "2001:db8:99::7")


def test_egress_ip_in_a_pool_whose_interface_is_not_reported_is_not_found() -> None:
    g = gw(V4_ONLY, pools=[("198.18.0.0/28", "eth7")])
    assert derive(g, egress_ip="198.18.0.9") == (None, None)


# --- neither: the default-route interfaces ------------------------------------------------


def test_default_route_interfaces() -> None:
    dual = iface("eth0", "192.0.2.1/24", "2001:db8::1/64", v4_default=True, v6_default=True)
    assert derive(gw(V4_ONLY, dual), **V4_AND_V6) == ("192.0.2.1", "2001:db8::1")


def test_default_routes_on_different_devices_fail_both_when_both_are_needed() -> None:
    v4 = iface("eth0", "192.0.2.1/24", v4_default=True)
    v6 = iface("eth1", "2001:db8::1/64", v6_default=True)
    assert derive(gw(v4, v6), **V4_AND_V6) == (None, None)
    # With one family needed there is no conflict.
    assert derive(gw(v4, v6), v4_needed=True) == ("192.0.2.1", "2001:db8::1")
    assert derive(gw(v4, v6), v4_needed=False, v6_needed=True) == ("192.0.2.1", "2001:db8::1")


def test_no_default_route_or_no_address_leaves_that_family_not_found() -> None:
    v4 = iface("eth0", "192.0.2.1/24", v4_default=True)
    assert derive(gw(v4), **V4_AND_V6) == ("192.0.2.1", None)
    no_v6_address = iface("eth0", "192.0.2.1/24", "fe80::1/64", v4_default=True, v6_default=True)
    assert derive(gw(no_v6_address), **V4_AND_V6) == ("192.0.2.1", None)
    assert derive(gw(V4_ONLY)) == (None, None)


def test_egress_ips_for_version() -> None:
    found = EgressIPs(IPv4Address("192.0.2.1"), None)
    assert found.for_version(4) == ip("192.0.2.1")
    assert found.for_version(6) is None


# --- end to end: the two drop reasons -----------------------------------------------------


def test_missing_egress_ip_drops_with_no_egress_ip_at_the_gateway() -> None:
    g = gateway("gw-1", "192.0.2.1", interfaces=[V4_ONLY])
    snap = snapshot([policy("p", egress_ip="203.0.113.99")], [pod("a", ["10.0.0.1"])], [g])
    e = build_plan(snap).explain(ip("10.0.0.1"), ip("198.51.100.7"))
    assert (e.verdict, e.reason, e.gateway, e.egress_ip) == (
        Verdict.DROP,
        "no-egress-ip",
        "gw-1",
        None,
    )
    assert "no IPv4 egress IP on gw-1: traffic is dropped" in e.details


def test_one_family_dropped_the_other_served() -> None:
    g = gateway("gw-1", "192.0.2.1", interfaces=[V4_ONLY])
    pol = policy("p", ["198.51.100.0/24", "2001:db8:7::/48"], egress_ip="198.51.100.5")
    plan = build_plan(snapshot([pol], [pod("a", ["10.0.0.1", "fd00::1"])], [g]))
    four = plan.explain(ip("10.0.0.1"), ip("198.51.100.7"))
    six = plan.explain(ip("fd00::1"), ip("2001:db8:7::1"))
    assert (four.verdict, four.egress_ip) == (Verdict.SNAT, ip("198.51.100.5"))
    assert (six.verdict, six.reason) == (Verdict.DROP, "no-egress-ip")


def test_needed_families_come_from_destinations_not_exclusions() -> None:
    """§4.1: an IPv6 exclusion does not make IPv6 needed, so an IPv4-only interface is fine."""
    g = gateway("gw-1", "192.0.2.1", interfaces=[V4_ONLY])
    pol = policy("p", ["198.51.100.0/24"], exclusions=["2001:db8::/32"], interface="eth2")
    plan = build_plan(snapshot([pol], [pod("a", ["10.0.0.1", "fd00::1"])], [g]))
    e = plan.explain(ip("10.0.0.1"), ip("198.51.100.7"))
    assert (e.verdict, e.egress_ip) == (Verdict.SNAT, ip("198.51.100.5"))
    assert plan.explain(ip("fd00::1"), ip("2001:db8::1")).verdict is Verdict.EXCLUDED
    # With an IPv6 destination the same interface fails for both families.
    pol6 = policy("p", ["198.51.100.0/24", "2001:db8::/32"], interface="eth2")
    plan6 = build_plan(snapshot([pol6], [pod("a", ["10.0.0.1", "fd00::1"])], [g]))
    assert plan6.explain(ip("10.0.0.1"), ip("198.51.100.7")).reason == "no-egress-ip"
