"""Connections that never got an answer through a gateway that failed start over.

A connection keeps the gateway its first packet was marked for (its conntrack mark), so that a
failover moves new connections only. A connection whose handshake is still under way when its
gateway fails has no answer yet, and its SYN retransmissions (or a client that reuses the
port while the entry lives) would keep going to the dead gateway for minutes. Deleting those
entries lets the next packet start a new connection entry, marked for the standby.

Connections that did get answers follow a fast failover to the standby (Kubernetes mode: the
gateways share connection state through conntrackd, so the standby continues them):
`follow_failovers` gives them the standby's mark.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import ip_address

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError

from gatewayd.policy.model import IPAddress, IPNetwork

IPS_SEEN_REPLY = 0x2  # <linux/netfilter/nf_conntrack_common.h>


def forget_unanswered(mark: int, mask: int) -> int:
    """Delete every conntrack entry (of this network namespace) whose mark, under `mask`, is
    `mark` and that never saw a reply; returns how many. An entry that ended (or was deleted)
    since the dump is skipped: the others still go."""
    conntrack = Conntrack()
    forgotten = 0
    try:
        doomed = [
            entry for entry in conntrack.dump_entries(mark=mark, mark_mask=mask)
            if not entry.status & IPS_SEEN_REPLY
        ]
        for entry in doomed:
            try:
                conntrack.delete(entry)
            except NetlinkError as error:
                if error.code != errno.ENOENT:
                    raise
                continue
            forgotten += 1
    finally:
        conntrack.close()
    return forgotten


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


def follow_failovers(moves: list[MarkMove], mask: int) -> int:
    """Give the answered connections of each failed-over rule the standby's mark, so that
    their next packets go to the standby (which has their state from the gateways' conntrack
    sync) instead of the gateway that failed; returns how many."""
    conntrack = Conntrack()
    moved = 0
    try:
        for from_mark in sorted({m.from_mark for m in moves}):
            for entry in list(conntrack.dump_entries(mark=from_mark, mark_mask=mask)):
                if not entry.status & IPS_SEEN_REPLY:
                    continue  # forget_unanswered's
                new = moved_mark(ip_address(entry.tuple_orig.saddr),
                                 ip_address(entry.tuple_orig.daddr), entry.mark or 0, mask, moves)
                if new is None:
                    continue
                try:
                    conntrack.entry("set", mark=new, tuple_orig=entry.tuple_orig)
                except NetlinkError as exc:
                    if exc.code != errno.ENOENT:  # ended meanwhile: nothing to move
                        raise
                    continue
                moved += 1
    finally:
        conntrack.close()
    return moved
