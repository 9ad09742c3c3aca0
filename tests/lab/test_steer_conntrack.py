"""steer's conntrack cleanup against a real conntrack table (a network namespace's)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from ipaddress import ip_address, ip_network

import pytest
from pyroute2 import Conntrack

from gatewayd.lab.netns import Sandbox, entered, run
from gatewayd.steer import conntrack as steer_conntrack

pytestmark = pytest.mark.lab

MARK, MASK = 0x20, 0xFF0


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")
    with Sandbox(f"ct{secrets.token_hex(2)}-") as box:
        yield box.netns("node")


POD, SERVER = "10.244.1.10", "198.51.100.10"
POD6, SERVER6 = "fd00:10:244:1::10", "2001:db8:100::10"


def flow(netns: str, port: int, state: str, mark: int = MARK, answered: bool = True,
         ends: tuple[str, str] = (POD, SERVER)) -> list[str]:
    """A TCP entry from the pod's `port`; returns what names it to `conntrack`."""
    names = ["-p", "tcp", "-s", ends[0], "-d", ends[1], "--sport", str(port),
             "--dport", "8080"]
    run(["conntrack", "-I", *names, "--state", state, "--timeout", "120",
         *(["--status", "SEEN_REPLY,ASSURED"] if answered else []), "--mark", str(mark)],
        netns)
    return names


def unanswered(netns: str, port: int) -> list[str]:
    return flow(netns, port, "SYN_SENT", answered=False)


def test_an_entry_that_ended_meanwhile_does_not_stop_the_others(
    netns: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Entries end between the dump and the delete (an answer, a timeout, another cleanup):
    the rest are still deleted."""
    first = unanswered(netns, 40001)
    unanswered(netns, 40002)
    change = Conntrack.entry
    calls = []

    def ended_first(self: Conntrack, command: str, **entry: object) -> object:
        if not calls:
            run(["conntrack", "-D", *first], netns)  # it ends just before we delete it
        calls.append(entry)
        return change(self, command, **entry)

    monkeypatch.setattr(Conntrack, "entry", ended_first)
    with entered(netns):
        assert steer_conntrack.forget_unanswered(MARK, MASK) == 1
    assert len(calls) == 2
    listed = run(["conntrack", "-L", "--mark", f"{MARK}/{MASK}"], netns, check=False)
    assert "40002" not in listed.stdout and "40001" not in listed.stdout


def marks(netns: str) -> dict[int, int]:
    listed = "".join(run(["conntrack", "-L", "-f", family, "-o", "extended"], netns,
                         check=False).stdout for family in ("ipv4", "ipv6"))
    return {f.ports[0]: f.mark for f in steer_conntrack.parse_flows(listed) if f.ports}


def test_ipv6_connections_start_over_and_move_as_ipv4_ones_do(netns: str) -> None:
    """ctnetlink reads an entry's addresses by the family of the request: IPv6 entries asked
    for on an IPv4 socket were refused (EINVAL), and the failover's cleanup stopped there."""
    flow(netns, 40001, "SYN_SENT", answered=False, ends=(POD6, SERVER6))
    flow(netns, 40002, "SYN_SENT", answered=False)
    flow(netns, 40003, "ESTABLISHED", ends=(POD6, SERVER6))
    flow(netns, 40004, "ESTABLISHED")
    move = steer_conntrack.MarkMove(
        MARK, 0x30, frozenset({ip_address(POD), ip_address(POD6)}),
        (ip_network("198.51.100.0/24"), ip_network("2001:db8:100::/64")))
    with entered(netns):
        assert steer_conntrack.forget_unanswered(MARK, MASK) == 2
        assert steer_conntrack.move_answered([move], MASK) == 2
    assert marks(netns) == {40003: 0x30, 40004: 0x30}


def test_live_answered_connections_move_and_ended_ones_keep_their_mark(netns: str) -> None:
    """A failover moves what still carries traffic; a TIME_WAIT or CLOSE entry only waits to
    expire (a client reusing its port gets a new entry), and an unanswered one starts over
    instead. Moving the ended ones cost seconds with a busy client's thousands of them."""
    flow(netns, 40001, "ESTABLISHED")
    flow(netns, 40002, "FIN_WAIT")
    flow(netns, 40003, "TIME_WAIT")
    flow(netns, 40004, "CLOSE")
    unanswered(netns, 40005)
    flow(netns, 40006, "ESTABLISHED", mark=0x10)  # another gateway's
    move = steer_conntrack.MarkMove(MARK, 0x30, frozenset({ip_address("10.244.1.10")}),
                                    (ip_network("198.51.100.0/24"),))
    with entered(netns):
        assert steer_conntrack.move_answered([move], MASK) == 2
    assert marks(netns) == {40001: 0x30, 40002: 0x30, 40003: MARK, 40004: MARK, 40005: MARK,
                            40006: 0x10}
