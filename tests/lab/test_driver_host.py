"""Smaller drivers: policy routing, sysctls, the egress interface (macvlan)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from gatewayd.dataplane.interfaces import (
    EgressInterfaceDriver,
    EgressInterfaceState,
    InterfaceChanges,
    InterfaceError,
)
from gatewayd.dataplane.routing import PolicyRoutingDriver, RoutingChanges, RoutingError
from gatewayd.dataplane.sysctl import SysctlError, ensure_sysctls, observe_sysctls
from gatewayd.lab.netns import Sandbox, entered, run

pytestmark = pytest.mark.lab


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")
    with Sandbox(f"drvhost{secrets.token_hex(2)}-") as box:
        yield box


def route_get(netns: str, *args: str) -> str:
    proc = run(["ip", "route", "get", *args], netns, check=False)
    return proc.stdout + proc.stderr


def test_policy_routing_follows_marks_and_never_falls_through(sandbox: Sandbox) -> None:
    node, other = sandbox.netns("node"), sandbox.netns("other")
    sandbox.veth(node, "egw-a", other, "pa")
    sandbox.veth(node, "egw-b", other, "pb")
    sandbox.veth(node, "eth0", other, "pc")
    run(["ip", "addr", "add", "192.0.2.1/24", "dev", "eth0"], node)
    run(["ip", "route", "add", "default", "via", "192.0.2.2"], node)
    # Not ours: left alone whatever happens.
    run(["ip", "rule", "add", "fwmark", "0x5", "lookup", "200"], node)
    run(["ip", "route", "add", "198.51.100.0/24", "dev", "egw-a", "table", "100"], node)

    driver = PolicyRoutingDriver(priority=100, mark_mask=0xFF00)
    wanted = {0x100: (100, "egw-a"), 0x200: (101, "egw-b")}
    with entered(node):
        first = driver.ensure(wanted)
        assert len(first.added) == 4 + 8 and first.removed == ()  # rules; dev + blackhole routes
        assert driver.ensure(wanted) == RoutingChanges()
        assert driver.observe() == wanted
    assert "dev egw-a" in route_get(node, "203.0.113.5", "mark", "0x100")
    assert "dev egw-a" in route_get(node, "203.0.113.5", "mark", "0x10100")  # bits outside the mask
    assert "dev egw-b" in route_get(node, "2001:db8::5", "mark", "0x200")
    assert "dev eth0" in route_get(node, "203.0.113.5", "mark", "0x300")

    run(["ip", "rule", "del", "priority", "100", "fwmark", "0x100/0xff00"], node)
    run(["ip", "route", "del", "default", "dev", "egw-b", "table", "101"], node)
    with entered(node):
        assert driver.ensure(wanted) == RoutingChanges(added=(
            "ipv4 route default dev egw-b table 101",
            "ipv4 rule priority 100 fwmark 0x100/0xff00 lookup 100",
        ))

    # The tunnel goes away: its traffic is blackholed, not sent out through the main table.
    run(["ip", "link", "del", "egw-b"], node)
    assert "dev eth0" not in route_get(node, "203.0.113.5", "mark", "0x200")
    with entered(node), pytest.raises(RoutingError, match="egw-b"):
        driver.ensure(wanted)

    with entered(node):
        fewer = driver.ensure({0x100: (100, "egw-a")})
        assert fewer.added == () and len(fewer.removed) == 2 + 2  # rules; blackholes of 101
        assert driver.observe() == {0x100: (100, "egw-a")}
        assert len(driver.delete().removed) == 2 + 4
        assert driver.observe() == {}
    assert "fwmark 0x5 lookup 200" in run(["ip", "rule"], node).stdout
    assert "198.51.100.0/24 dev egw-a" in run(["ip", "route", "show", "table", "100"],
                                              node).stdout


def test_sysctls_are_set_in_the_callers_namespace(sandbox: Sandbox) -> None:
    ns, peer = sandbox.netns("a"), sandbox.netns("b")
    sandbox.veth(ns, "v.10", peer, "pv")
    keys = ("net.ipv4.ip_forward", "net.ipv4.conf.v.10.rp_filter", "net/ipv6/conf/v.10/mtu")
    host_before = observe_sysctls(keys[:1])
    with entered(ns):
        before = observe_sysctls(keys)
        wanted = {key: "1" if value != "1" else "2" for key, value in before.items()}
        wanted["net/ipv6/conf/v.10/mtu"] = "1400"
        assert ensure_sysctls(wanted) == tuple(sorted(keys))
        assert ensure_sysctls(wanted) == ()
        assert observe_sysctls(keys) == wanted
        run(["sysctl", "-qw", "net.ipv4.ip_forward=" + before["net.ipv4.ip_forward"]], ns)
        assert ensure_sysctls(wanted) == ("net.ipv4.ip_forward",)
        with pytest.raises(SysctlError, match=r"net\.ipv4\.conf\.nosuch\.rp_filter"):
            ensure_sysctls({"net.ipv4.conf.nosuch.rp_filter": "2"})
    assert observe_sysctls(keys[:1]) == host_before


def test_egress_macvlan(sandbox: Sandbox) -> None:
    ns, peer = sandbox.netns("gw"), sandbox.netns("peer")
    sandbox.veth(ns, "upl", peer, "pl")
    driver = EgressInterfaceDriver()
    with entered(ns):
        assert driver.ensure("egr0", "upl") == InterfaceChanges(created=True, brought_up=True)
        assert driver.ensure("egr0", "upl") == InterfaceChanges()
        state = driver.observe("egr0")
        assert state == EgressInterfaceState("egr0", "macvlan", "upl", "bridge", None, 1500,
                                             True)
        assert driver.ensure("egr0", "upl", mtu=1400) == InterfaceChanges(mtu_set=True)
        assert driver.ensure("egr0", "upl", mode="private", mtu=1400) == InterfaceChanges(
            recreated=True, mtu_set=True, brought_up=True)
        run(["ip", "link", "set", "dev", "egr0", "down"], ns)
        assert driver.ensure("egr0", "upl", mode="private", mtu=1400) == InterfaceChanges(
            brought_up=True)
        run(["ip", "link", "del", "egr0"], ns)
        assert driver.ensure("egr0", "upl", mode="private").created

        with pytest.raises(InterfaceError, match="not a macvlan"):
            driver.ensure("upl", "egr0")
        try:
            driver.ensure("egr0.7", "upl", vlan_id=7)
        except InterfaceError as exc:  # kernels without 8021q, like the test hosts
            assert "vlan" in str(exc)
        else:
            vlan = driver.observe("egr0.7")
            assert vlan is not None and (vlan.kind, vlan.vlan_id) == ("vlan", 7)

        assert driver.delete("egr0") is True
        assert driver.delete("egr0") is False
        assert driver.observe("egr0") is None
    assert "upl" in run(["ip", "link"], ns).stdout
