"""AddressDriver: owned egress IPs, conflict probes and announcements on a veth segment."""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from gatewayd.dataplane import addresses
from gatewayd.dataplane.addresses import AddressChanges, AddressDriver
from gatewayd.lab.netns import Sandbox, entered, run, wait_for

pytestmark = pytest.mark.lab

ip = ipaddress.ip_address
EGRESS_V4, EGRESS_V6 = ip("192.0.2.10"), ip("2001:db8::10")
TAKEN_V4, TAKEN_V6 = ip("192.0.2.20"), ip("2001:db8::20")  # the peer host has these


@dataclass(frozen=True)
class Segment:
    gateway: str  # interface "upl"
    peer: str  # interface "pl"


@pytest.fixture
def segment() -> Iterator[Segment]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")
    with Sandbox(f"drvaddr{secrets.token_hex(2)}-") as box:
        gateway, peer = box.netns("gw"), box.netns("peer")
        box.veth(gateway, "upl", peer, "pl")
        for command in (
            # Addresses that are not ours: never to be removed.
            "ip addr add 192.0.2.1/24 dev upl", "ip addr add 2001:db8::1/64 dev upl nodad",
            # Quick duplicate address detection (default: up to 1 s delay + 1 s per probe).
            "sysctl -qw net.ipv6.conf.upl.router_solicitation_delay=0",
            "sysctl -qw net.ipv6.neigh.upl.retrans_time_ms=100",
        ):
            run(command.split(), gateway)
        for command in (
            "ip addr add 192.0.2.2/24 dev pl", "ip addr add 2001:db8::2/64 dev pl nodad",
            f"ip addr add {TAKEN_V4}/32 dev pl", f"ip addr add {TAKEN_V6}/128 dev pl nodad",
        ):
            run(command.split(), peer)
        yield Segment(gateway, peer)


def addresses_on(netns: str, interface: str) -> str:
    return run(["ip", "addr", "show", "dev", interface], netns).stdout


def mac_of(netns: str, interface: str) -> str:
    return run(["cat", f"/sys/class/net/{interface}/address"], netns).stdout.strip()


def test_only_owned_addresses_are_managed(segment: Segment) -> None:
    driver = AddressDriver(probe_seconds=0.3)
    desired = {EGRESS_V4, EGRESS_V6, ip("192.0.2.1")}  # .1 is there already, not ours
    with entered(segment.gateway):
        first = driver.ensure("upl", desired)
        assert first == AddressChanges(added=(EGRESS_V4, EGRESS_V6))
        assert driver.ensure("upl", desired) == AddressChanges()
        assert driver.observe("upl") == {EGRESS_V4, EGRESS_V6}
        assert AddressDriver().observe("upl") == {EGRESS_V4, EGRESS_V6}  # after a restart

        run(["ip", "addr", "del", f"{EGRESS_V4}/32", "dev", "upl"], segment.gateway)
        assert driver.ensure("upl", desired) == AddressChanges(added=(EGRESS_V4,))

        assert driver.ensure("upl", set()) == AddressChanges(removed=(EGRESS_V4, EGRESS_V6))
        assert driver.observe("upl") == frozenset()
        driver.ensure("upl", {EGRESS_V4, EGRESS_V6})
        assert AddressDriver().remove_all() == AddressChanges(removed=(EGRESS_V4, EGRESS_V6))
    left = addresses_on(segment.gateway, "upl")
    assert "192.0.2.1/24" in left and "2001:db8::1/64" in left
    assert str(EGRESS_V4) not in left and str(EGRESS_V6) not in left


def test_an_address_another_host_answers_for_is_refused(segment: Segment) -> None:
    driver = AddressDriver(probe_seconds=0.3)
    with entered(segment.gateway):
        changes = driver.ensure("upl", {TAKEN_V4, TAKEN_V6, EGRESS_V4})
        assert changes.added == (EGRESS_V4,) and changes.removed == ()
        refused = {c.address: c.detail for c in changes.conflicts}
        assert refused == {
            TAKEN_V4: f"answered by {mac_of(segment.peer, 'pl')}",
            TAKEN_V6: "duplicate address detection failed",
        }
        # Still refused on the next pass, without probing again.
        again = driver.ensure("upl", {TAKEN_V4, TAKEN_V6, EGRESS_V4})
        assert not again and {c.address for c in again.conflicts} == {TAKEN_V4, TAKEN_V6}
        assert driver.observe("upl") == {EGRESS_V4}
    left = addresses_on(segment.gateway, "upl")
    assert str(TAKEN_V4) not in left and str(TAKEN_V6) not in left


# In the peer's namespace: wait for the first ARP probe (sender 0.0.0.0) for the address, then
# give the address up, as a gateway handing it over does; print when listening.
GIVE_UP_ON_FIRST_PROBE = """
import socket, subprocess, sys
address = socket.inet_aton(sys.argv[1])
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
sock.bind(("pl", 0x0806))
print("listening", flush=True)
while True:
    frame = sock.recv(2048)
    if frame[20:22] == b"\\x00\\x01" and frame[28:32] == bytes(4) and frame[38:42] == address:
        break
subprocess.run(["ip", "addr", "del", sys.argv[1] + "/32", "dev", "pl"], check=True)
print("given up", flush=True)
"""


def test_an_address_given_up_during_the_probe_is_taken_at_its_end(segment: Segment) -> None:
    """The holder answers the first round of probes and gives the address up before the
    second: the address is free when the probe ends, with no refusal and retry."""
    giver = subprocess.Popen(
        ["ip", "netns", "exec", segment.peer, sys.executable, "-c", GIVE_UP_ON_FIRST_PROBE,
         str(TAKEN_V4)], stdout=subprocess.PIPE, text=True)
    try:
        assert giver.stdout is not None and giver.stdout.readline() == "listening\n"
        with entered(segment.gateway):
            # The rounds are 1 s apart: the holder has long given up by the second.
            changes = AddressDriver(probe_seconds=2.0).ensure("upl", {TAKEN_V4})
        assert giver.communicate(timeout=10)[0] == "given up\n"
        assert changes.conflicts == () and changes.added == (TAKEN_V4,)
    finally:
        giver.kill()
        giver.wait()


def test_a_refused_address_is_asked_for_again_less_and_less_often(
    segment: Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes: list[float] = []
    real_probe = addresses.probe_ipv4

    def counted(*args: Any) -> dict[Any, str]:
        probes.append(time.monotonic())
        return real_probe(*args)

    monkeypatch.setattr(addresses, "probe_ipv4", counted)
    driver = AddressDriver(probe_seconds=0.1, retry_conflicts_after=0.3)
    with entered(segment.gateway):
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert driver.ensure("upl", {TAKEN_V4}).conflicts
            time.sleep(0.02)  # a keeper pass
        # asked at 0, after 0.3 s, then only after 0.6 s more (0.3 s each: 5 or more)
        assert 2 <= len(probes) <= 3, probes
        run(["ip", "addr", "del", f"{TAKEN_V4}/32", "dev", "pl"], segment.peer)
        wait_for(lambda: driver.ensure("upl", {TAKEN_V4}).added == (TAKEN_V4,), 5,
                 "the freed address to be taken")


def test_added_addresses_are_announced(segment: Segment) -> None:
    # The peer believes the egress IPs live at another MAC (their previous gateway, say).
    stale = "02:00:00:00:00:99"
    for address in (EGRESS_V4, EGRESS_V6):
        run(["ip", "neigh", "replace", str(address), "lladdr", stale, "dev", "pl", "nud",
             "stale"], segment.peer)
    gateway_mac = mac_of(segment.gateway, "upl")

    def peer_learned(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        entry = run(["ip", "neigh", "show", str(address), "dev", "pl"], segment.peer).stdout
        return gateway_mac in entry

    with entered(segment.gateway):
        changes = AddressDriver(probe_seconds=0.3).ensure("upl", {EGRESS_V4, EGRESS_V6})
    assert changes == AddressChanges(added=(EGRESS_V4, EGRESS_V6))
    wait_for(lambda: peer_learned(EGRESS_V4), 5, "the gratuitous ARP to reach the peer")
    wait_for(lambda: peer_learned(EGRESS_V6), 5, "the neighbour advertisement to reach the peer")
