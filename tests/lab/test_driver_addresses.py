"""AddressDriver: owned egress IPs, conflict probes and announcements on a veth segment; and
the agent's probe responder fencing the gateway with it."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pyroute2 import IPRoute

from gatewayd.agent.config import FailoverSettings
from gatewayd.agent.responder import ProbeResponder
from gatewayd.dataplane import addresses
from gatewayd.dataplane.addresses import AddressChanges, AddressDriver
from gatewayd.dataplane.probe import ClaimWatcher
from gatewayd.lab.netns import Sandbox, entered, run, wait_for
from gatewayd.probe import Fenced, ProbeRequest, decode_reply, encode_request

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


def test_an_address_another_remover_took_first_is_not_reported_removed(
    segment: Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's keeper and its probe responder both fence: when both remove an address in
    the same moment, only the one whose delete took it reports it (one journal entry)."""
    driver = AddressDriver(probe_seconds=0)
    with entered(segment.gateway):
        driver.ensure("upl", {EGRESS_V4, EGRESS_V6})
        with IPRoute() as ipr:
            listed = driver._present(ipr, ipr.link_lookup(ifname="upl")[0])
        run(["ip", "addr", "del", f"{EGRESS_V4}/32", "dev", "upl"], segment.gateway)
        # The other remover deleted it after this driver listed the addresses.
        monkeypatch.setattr(driver, "_present", lambda ipr, index: listed)
        assert driver.remove_all({"upl"}) == AddressChanges(removed=(EGRESS_V6,))
        monkeypatch.undo()
        driver.ensure("upl", {EGRESS_V4, EGRESS_V6})
        monkeypatch.setattr(driver, "_present", lambda ipr, index: listed)
        run(["ip", "addr", "del", f"{EGRESS_V6}/128", "dev", "upl"], segment.gateway)
        assert driver.ensure("upl", set()) == AddressChanges(removed=(EGRESS_V4,))
    assert str(EGRESS_V4) not in addresses_on(segment.gateway, "upl")


def test_an_address_another_host_answers_for_is_refused(segment: Segment) -> None:
    driver = AddressDriver(probe_seconds=0.3)
    with entered(segment.gateway):
        changes = driver.ensure("upl", {TAKEN_V4, TAKEN_V6, EGRESS_V4})
        assert changes.added == (EGRESS_V4,) and changes.removed == ()
        refused = {c.address: c.detail for c in changes.conflicts}
        peer = mac_of(segment.peer, "pl")
        assert refused == {TAKEN_V4: f"answered by {peer}", TAKEN_V6: f"answered by {peer}"}
        # Still refused on the next pass, without probing again.
        again = driver.ensure("upl", {TAKEN_V4, TAKEN_V6, EGRESS_V4})
        assert not again and {c.address for c in again.conflicts} == {TAKEN_V4, TAKEN_V6}
        assert driver.observe("upl") == {EGRESS_V4}
    left = addresses_on(segment.gateway, "upl")
    assert str(TAKEN_V4) not in left and str(TAKEN_V6) not in left


def test_a_holder_is_heard_within_the_default_probe_window_every_time(segment: Segment
                                                                      ) -> None:
    """`arpProbeSeconds`' default leaves the second round half of it (15 ms): a host on the
    segment that holds the address answers within it every time, in both families."""
    window = FailoverSettings.arp_probe_seconds
    with entered(segment.gateway):
        for attempt in range(20):
            changes = AddressDriver(probe_seconds=window).ensure("upl", {TAKEN_V4, TAKEN_V6})
            refused = {c.address for c in changes.conflicts}
            assert (changes.added, refused) == ((), {TAKEN_V4, TAKEN_V6}), attempt


# In the peer's namespace: wait for the first probe for the address (an ARP request from
# 0.0.0.0, or a neighbour solicitation from ::), then give the address up, as a gateway handing
# it over does; print when listening. With a pid and seconds, then also keep that process off
# the CPU for that long, as a busy host does.
GIVE_UP_ON_FIRST_PROBE = """
import ipaddress, os, signal, socket, subprocess, sys, time
address = ipaddress.ip_address(sys.argv[1])
ethertype = 0x0806 if address.version == 4 else 0x86DD
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
sock.bind(("pl", ethertype))
print("listening", flush=True)
while True:
    frame = sock.recv(2048)
    if address.version == 4:
        probe = frame[20:22] == b"\\x00\\x01" and frame[28:32] == bytes(4)
        target = frame[38:42]
    else:
        probe = frame[20] == 58 and frame[22:38] == bytes(16) and frame[54] == 135
        target = frame[62:78]
    if probe and target == address.packed:
        break
subprocess.run(["ip", "addr", "del", f"{address}/{address.max_prefixlen}", "dev", "pl"],
               check=True)
if len(sys.argv) > 2:
    os.kill(int(sys.argv[2]), signal.SIGSTOP)
    time.sleep(float(sys.argv[3]))
    os.kill(int(sys.argv[2]), signal.SIGCONT)
print("given up", flush=True)
"""

# In the gateway's namespace: once told to on stdin, claim the address with a probe of
# argv[2] seconds; print what was added and what was refused.
CLAIM_WHEN_TOLD = """
import ipaddress, sys
from gatewayd.dataplane.addresses import AddressDriver
address = ipaddress.ip_address(sys.argv[1])
sys.stdin.readline()
changes = AddressDriver(probe_seconds=float(sys.argv[2])).ensure("upl", {address})
print([str(a) for a in changes.added], [str(c.address) for c in changes.conflicts], flush=True)
"""


@pytest.mark.parametrize("taken", [TAKEN_V4, TAKEN_V6], ids=["ipv4", "ipv6"])
def test_an_address_given_up_during_the_probe_is_taken_at_its_end(
    segment: Segment, taken: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> None:
    """The holder answers the first round of probes and gives the address up before the
    second: the address is free when the probe ends, with no refusal and retry."""
    with in_peer(segment, GIVE_UP_ON_FIRST_PROBE, str(taken), "listening") as giver:
        with entered(segment.gateway):
            # The rounds are 1 s apart: the holder has long given up by the second.
            changes = AddressDriver(probe_seconds=2.0).ensure("upl", {taken})
        assert giver.communicate(timeout=10)[0] == "given up\n"
    assert changes.conflicts == () and changes.added == (taken,)


@pytest.mark.parametrize("taken", [TAKEN_V4, TAKEN_V6], ids=["ipv4", "ipv6"])
def test_a_prober_kept_off_the_cpu_between_the_rounds_still_hears_the_second(
    segment: Segment, taken: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> None:
    """The holder gives the address up at the first round, and the prober is stopped until
    after its window: the second round is still sent and heard for its half, so the address
    is free. (The prober used to end the probe without it, and refuse on the first round's
    answer: a standby on a busy host took a handed-over address only at its next try.)"""
    window = 2.0  # rounds 1 s apart: the holder has long given up by the second
    claimer = subprocess.Popen(
        ["ip", "netns", "exec", segment.gateway, sys.executable, "-c", CLAIM_WHEN_TOLD,
         str(taken), str(window)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert claimer.stdin is not None
        with in_peer(segment, GIVE_UP_ON_FIRST_PROBE, str(taken), "listening",
                     str(claimer.pid), str(window + 0.5)) as giver:
            claimer.stdin.write("go\n")
            claimer.stdin.flush()
            assert giver.communicate(timeout=20)[0] == "given up\n"
        output, _ = claimer.communicate(timeout=20)
    finally:
        claimer.kill()
        claimer.wait()
    assert output == f"{[str(taken)]} []\n"


@contextlib.contextmanager
def in_peer(segment: Segment, script: str, argument: str, ready: str, *more: str
            ) -> Iterator[subprocess.Popen[str]]:
    """`script` running in the peer's namespace, once it printed the line `ready`."""
    process = subprocess.Popen(
        ["ip", "netns", "exec", segment.peer, sys.executable, "-c", script, argument, *more],
        stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == ready + "\n"
        yield process
    finally:
        process.kill()
        process.wait()


def test_an_ipv6_address_is_usable_when_it_is_added(segment: Segment) -> None:
    """The probe was the duplicate address detection: the kernel does not run its own, which
    would keep the address tentative (unusable) for up to two more seconds."""
    with entered(segment.gateway):
        assert AddressDriver(probe_seconds=0.2).ensure("upl", {EGRESS_V6}).added == (EGRESS_V6,)
    line = next(line for line in addresses_on(segment.gateway, "upl").splitlines()
                if str(EGRESS_V6) in line)
    assert "tentative" not in line, line
    pinged = run(["ping", "-6", "-c", "1", "-W", "2", str(EGRESS_V6)], segment.peer, check=False)
    assert pinged.returncode == 0, pinged.stdout


def test_ipv6_resolutions_under_way_start_again_when_an_address_is_added(
    segment: Segment,
) -> None:
    """A neighbour solicitation sent with the new address as its source before the kernel
    delivered packets to it has its answer dropped, and its resolution would wait a second
    for the next try, with the packets to that neighbour queued: ensure drops the entries
    still being resolved, and the next packet asks again."""
    silent = "2001:db8::99"  # on the segment, and nobody answers for it

    def entry() -> str:
        return run(["ip", "-6", "neigh", "show", silent, "dev", "upl"],
                   segment.gateway).stdout.strip()

    # Ask 100 times a second apart before giving up (3 by default): however late the claim
    # comes on a busy machine, the resolution is still under way.
    run(["sysctl", "-qw", "net.ipv6.neigh.upl.mcast_solicit=100"], segment.gateway)
    with entered(segment.gateway):
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"queued until the neighbour answers", (silent, 9))
        assert "INCOMPLETE" in entry()  # asked once; the next try is a second away
        assert AddressDriver(probe_seconds=0).ensure("upl", {EGRESS_V6}).added == (EGRESS_V6,)
    assert entry() == ""


# In the peer's namespace: probe for an IPv6 address every 20 ms, as a host claiming it at
# the same time does; print when the first probe went out.
KEEP_PROBING = """
import ipaddress, socket, sys, time
from gatewayd.dataplane.announce import dad_frame
address = ipaddress.ip_address(sys.argv[1])
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
sock.bind(("pl", 0x86DD))
mac = open("/sys/class/net/pl/address").read().strip()
while True:
    sock.send(dad_frame(bytes.fromhex(mac.replace(":", "")), address))
    print("probing", flush=True)
    time.sleep(0.02)
"""


def test_another_host_probing_for_the_same_ipv6_address_is_a_conflict(segment: Segment
                                                                      ) -> None:
    """Two hosts claiming one address at once: neither may take it (RFC 4862, 5.4.3)."""
    with in_peer(segment, KEEP_PROBING, str(EGRESS_V6), "probing"), entered(segment.gateway):
        changes = AddressDriver(probe_seconds=0.4).ensure("upl", {EGRESS_V6})
    assert changes.added == ()
    assert changes.conflicts[0].detail == f"answered by {mac_of(segment.peer, 'pl')}"


def test_an_owned_address_the_kernel_refused_is_probed_again(segment: Segment) -> None:
    """An IPv6 egress IP an earlier version added with the kernel's DAD, which failed: it is
    removed and asked for like a missing one."""
    with entered(segment.gateway), IPRoute() as ipr:  # iproute2 6.1 cannot set a protocol
        ipr.addr("add", index=ipr.link_lookup(ifname="upl")[0], address=str(TAKEN_V6),
                 prefixlen=128, proto=addresses.OWNER_PROTOCOL)
    wait_for(lambda: "dadfailed" in addresses_on(segment.gateway, "upl"), 10,
             "the kernel's duplicate address detection to fail")
    with entered(segment.gateway):
        changes = AddressDriver(probe_seconds=0.2).ensure("upl", {TAKEN_V6})
    assert [c.address for c in changes.conflicts] == [TAKEN_V6] and changes.added == ()
    assert changes.removed == (TAKEN_V6,)
    assert str(TAKEN_V6) not in addresses_on(segment.gateway, "upl")


def test_a_refused_address_is_asked_for_again_less_and_less_often(
    segment: Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes: list[float] = []
    real_probe = addresses.probe

    def counted(*args: Any) -> dict[Any, str]:
        probes.append(time.monotonic())
        return real_probe(*args)

    monkeypatch.setattr(addresses, "probe", counted)
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


def test_a_refused_address_no_longer_asked_for_is_not_tried_again(segment: Segment) -> None:
    """The keeper wakes for the next retry (`next_retry`): one for an address nobody wants
    any more would wake it for nothing, again and again."""
    driver = AddressDriver(probe_seconds=0.05, retry_conflicts_after=10.0)
    with entered(segment.gateway):
        assert driver.next_retry() is None
        assert driver.ensure("upl", {TAKEN_V4}).conflicts
        due = driver.next_retry()
        assert due is not None and due > time.monotonic() + 5
        assert driver.ensure("upl", set()) == AddressChanges()
        assert driver.next_retry() is None


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


def test_another_host_announcing_a_held_address_is_reported_in_both_families(
    segment: Segment,
) -> None:
    """The split-brain rule's ears: another gateway that took an egress IP announces it
    (gratuitous ARP, unsolicited neighbour advertisement); the watcher reports both, and
    not this host's own announcements."""
    claims: list[tuple[str, str, str]] = []
    with entered(segment.gateway):
        held = {EGRESS_V4, EGRESS_V6}
        watcher = ClaimWatcher(["upl"], lambda: held,
                               lambda address, iface, mac: claims.append((str(address), iface,
                                                                         mac)))
        watcher.start()  # its thread opens its sockets in this namespace
    try:
        wait_for(lambda: watcher_listening(segment.gateway), 5, "the watcher's sockets")
        with entered(segment.gateway):  # added and announced: our own is not a claim
            assert AddressDriver(probe_seconds=0).ensure("upl", held).added
        with entered(segment.peer):
            AddressDriver(probe_seconds=0).ensure("pl", held)
        peer = mac_of(segment.peer, "pl")
        wait_for(lambda: {c[0] for c in claims} == {str(EGRESS_V4), str(EGRESS_V6)}, 5,
                 "both claims to be reported")
        assert {(iface, mac) for _, iface, mac in claims} == {("upl", peer)}
    finally:
        watcher.stop()


def watcher_listening(netns: str) -> bool:
    """Two packet sockets (ARP, neighbour discovery) are open in `netns`."""
    sockets = run(["ss", "-H", "-0", "-a"], netns).stdout.splitlines()
    return len(sockets) >= 2


def test_a_gateway_no_probe_reaches_gives_its_egress_ips_up_while_the_agent_reads_nothing(
    segment: Segment,
) -> None:
    """The probe responder fences the gateway by itself: when no probe came for the hold time,
    it removes the owned addresses on the pools' interfaces, while nothing reads its messages
    (the agent's keeper thread kept off the CPU), and then tells the agent."""
    gateway, node, port = ip("192.0.2.1"), ip("192.0.2.2"), 4790
    other = ip("198.51.100.10")  # owned, on an interface of no pool
    run(["ip", "link", "add", "other", "type", "veth", "peer", "other-peer"], segment.gateway)
    for link in ("other", "other-peer"):
        run(["ip", "link", "set", link, "up"], segment.gateway)
    with entered(segment.gateway):
        driver = AddressDriver(probe_seconds=0)
        driver.ensure("upl", {EGRESS_V4, EGRESS_V6})
        driver.ensure("other", {other})
        responder = ProbeResponder("gw1", gateway, port, hold_seconds=0.2,
                                   fence_interfaces={"upl"})
        responder.start()  # its process lives in the gateway's namespace
    try:
        with entered(segment.peer):
            prober = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with prober:
            prober.settimeout(10)
            prober.bind((str(node), 0))
            # One probe arms the fence; its answer says the process runs.
            prober.sendto(encode_request(ProbeRequest("node1", 1, frozenset({"pay"}))),
                          (str(gateway), port))
            assert decode_reply(prober.recv(65535)).sequence == 1
        wait_for(lambda: str(EGRESS_V4) not in addresses_on(segment.gateway, "upl"),
                 10, "the responder to fence the gateway", interval=0.01)
        left = addresses_on(segment.gateway, "upl")
        assert str(EGRESS_V6) not in left
        assert "192.0.2.1/24" in left  # not gatewayd's: never removed
        assert str(other) in addresses_on(segment.gateway, "other")
        fenced = [m for m in responder.messages() if isinstance(m, Fenced)]
        assert [set(f.removed) for f in fenced] == [{EGRESS_V4, EGRESS_V6}]
    finally:
        responder.stop()
