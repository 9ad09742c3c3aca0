"""Connections that never got an answer through a gateway that failed start over.

A connection keeps the gateway its first packet was marked for (its conntrack mark), so that a
failover moves new connections only. A connection whose handshake is still under way when its
gateway fails has no answer yet, and its SYN retransmissions (or a client that reuses the
port while the entry lives) would keep going to the dead gateway for minutes. Deleting those
entries lets the next packet start a new connection entry, marked for the standby.

Connections that did get answers follow a fast failover to the standby (Kubernetes mode: the
gateways share connection state through conntrackd, so the standby continues them):
`move_answered` gives them the standby's mark (`gatewayd.probe.connection_follows` says
when).
"""

from __future__ import annotations

import errno
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import ip_address

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from gatewayd.policy.model import IPAddress, IPNetwork

# TCP states in which a connection is over: its entry only waits to expire. A client that
# reuses the port then makes the kernel replace the entry, marked by the rules of now.
ENDED_TCP_STATES = frozenset({"TIME_WAIT", "CLOSE"})


@dataclass(frozen=True)
class Flow:
    """A conntrack entry as `conntrack -L -o extended` lists it: the original direction."""

    protocol: str  # tcp, udp, icmp, icmpv6, ...
    number: int  # the protocol's number
    source: IPAddress
    destination: IPAddress
    ports: tuple[int, int] | None  # source and destination port (TCP, UDP, SCTP, ...)
    icmp: tuple[int, int, int] | None  # type, code, id (ICMP, ICMPv6)
    state: str  # TCP's state; "" for the others
    answered: bool  # a reply was seen
    mark: int

    @property
    def ended(self) -> bool:
        return self.protocol == "tcp" and self.state in ENDED_TCP_STATES

    def tuple_orig(self) -> NFCTAttrTuple:
        family = socket.AF_INET if self.source.version == 4 else socket.AF_INET6
        icmp_type, icmp_code, icmp_id = self.icmp or (None, None, None)
        sport, dport = self.ports or (None, None)
        return NFCTAttrTuple(family=family, saddr=str(self.source), daddr=str(self.destination),
                             proto=self.number, sport=sport, dport=dport, icmp_type=icmp_type,
                             icmp_code=icmp_code, icmp_id=icmp_id)


def parse_flows(listing: str) -> list[Flow]:
    """`conntrack -L -o extended` output: one flow per line (its first src=, dst=, ports or
    ICMP fields are the original direction's)."""
    flows = []
    for line in listing.splitlines():
        words = line.split()
        if len(words) < 6:
            continue
        fields: dict[str, str] = {}
        for word in words:
            key, equals, value = word.partition("=")
            if equals and key not in fields:
                fields[key] = value
        protocol = words[2]
        ports = (int(fields["sport"]), int(fields["dport"])) if "sport" in fields else None
        icmp = ((int(fields["type"]), int(fields["code"]), int(fields["id"]))
                if "type" in fields and "id" in fields else None)
        flows.append(Flow(
            protocol=protocol,
            number=int(words[3]),
            source=ip_address(fields["src"]),
            destination=ip_address(fields["dst"]),
            ports=ports,
            icmp=icmp,
            state=words[5] if protocol == "tcp" and "=" not in words[5] else "",
            answered="[UNREPLIED]" not in words,
            mark=int(fields.get("mark", "0")),
        ))
    return flows


def marked_flows(mark: int, mask: int, tcp_state: str | None = None) -> list[Flow]:
    """The entries (of this network namespace) whose mark, under `mask`, is `mark`, only TCP
    ones in `tcp_state` if given. Listed by conntrack-tools: pyroute2 parses an entry in about
    half a millisecond, so 3,000 ended connections (a busy client's TIME_WAITs) took 1.5 s to
    read on an idle machine, and several seconds during a failover, while the established
    ones waited for their move."""
    only = ["-p", "tcp", "--state", tcp_state] if tcp_state else []
    flows = []
    for family in ("ipv4", "ipv6"):
        listing = subprocess.run(
            ["conntrack", "-L", "-f", family, "-o", "extended", "--mark", f"{mark}/{mask}",
             *only],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout
        flows += parse_flows(listing)
    return flows


def forget_unanswered(mark: int, mask: int) -> int:
    """Delete every conntrack entry (of this network namespace) whose mark, under `mask`, is
    `mark` and that never saw a reply; returns how many. An entry that ended (or was deleted)
    since the listing is skipped: the others still go."""
    doomed = [flow for flow in marked_flows(mark, mask) if not flow.answered]
    if not doomed:
        return 0
    with _EntryChanges() as changes:
        return sum(changes.make(flow, "del") for flow in doomed)


@dataclass(frozen=True)
class MarkMove:
    """Connections from `sources` to `destinations` marked `from_mark` (under the mask) now
    belong to the gateway of `to_mark`: one failed-over steer rule."""

    from_mark: int
    to_mark: int
    sources: frozenset[IPAddress]
    destinations: tuple[IPNetwork, ...]


def moved_mark(
    source: IPAddress, destination: IPAddress, mark: int, mask: int, moves: Iterable[MarkMove]
) -> int | None:
    """The new conntrack mark of a connection (`mark` as the kernel has it), or None when no
    move applies. Bits outside `mask` are kept. A node's rules have disjoint destinations
    per source, so at most one move matches."""
    for move in moves:
        if mark & mask != move.from_mark or source not in move.sources:
            continue
        if any(destination.version == net.version and destination in net
               for net in move.destinations):
            return (mark & ~mask) | move.to_mark
    return None


def move_answered(moves: list[MarkMove], mask: int) -> int:
    """Give the live answered connections of each move its new gateway's mark, so that their
    next packets go there (it has their state from the gateways' conntrack sync); returns how
    many. Ended ones stay: nothing more goes through them."""
    moved = 0
    with _EntryChanges() as changes:
        for from_mark in sorted({m.from_mark for m in moves}):
            # Established TCP connections first, picked out by conntrack-tools: under a
            # failover's load, reading a busy client's thousands of TIME_WAIT entries took up
            # to half a second, and TCP's retransmission backoff doubles what it delays. Then
            # the rest (other states, UDP); the moved ones no longer carry `from_mark`.
            for tcp_state in ("ESTABLISHED", None):
                for flow in marked_flows(from_mark, mask, tcp_state):
                    if not flow.answered or flow.ended:
                        continue  # forget_unanswered's, or over
                    new = moved_mark(flow.source, flow.destination, flow.mark, mask, moves)
                    if new is not None:
                        moved += changes.make(flow, "set", mark=new)
    return moved


class _EntryChanges:
    """Changes to listed entries through ctnetlink, one socket per address family: the
    kernel reads an entry's addresses by the family of the request, so an IPv6 entry asked
    for on an IPv4 socket is refused (EINVAL)."""

    def __init__(self) -> None:
        self._sockets: dict[int, Conntrack] = {}

    def __enter__(self) -> _EntryChanges:
        return self

    def __exit__(self, *exc: object) -> None:
        for conntrack in self._sockets.values():
            conntrack.close()

    def make(self, flow: Flow, command: str, **attributes: int) -> bool:
        """Change (`set`) or delete (`del`) `flow`'s entry; False when it ended since it was
        listed."""
        family = socket.AF_INET if flow.source.version == 4 else socket.AF_INET6
        if family not in self._sockets:
            self._sockets[family] = Conntrack(nfgen_family=family)
        try:
            self._sockets[family].entry(command, tuple_orig=flow.tuple_orig(), **attributes)
        except NetlinkError as error:
            if error.code != errno.ENOENT:
                raise
            return False
        return True
