"""Connections that never got an answer through a gateway that failed start over.

A connection keeps the gateway its first packet was marked for (its conntrack mark), so that a
failover moves new connections only. A connection whose handshake is still under way when its
gateway fails has no answer yet, and its SYN retransmissions (or a client that reuses the
port while the entry lives) would keep going to the dead gateway for minutes. Deleting those
entries lets the next packet start a new connection entry, marked for the standby.

Connections that did get answers follow a fast failover to the standby (Kubernetes mode: the
gateways share connection state through conntrackd, so the standby continues them):
`move_answered` gives them the standby's mark (`connection_moves` says when).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from ipaddress import ip_address

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError

from gatewayd.policy.model import IPAddress, IPNetwork, SteerAction, SteerRule

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
            forgotten += _unless_ended(partial(conntrack.delete, entry))
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


def connection_moves(
    rules: Iterable[SteerRule],
    reachable: Mapping[str, bool | None],
    serving: Mapping[str, frozenset[str]],
    gateways: frozenset[str],
) -> set[tuple[str, str, str]]:
    """(from gateway, policy, to gateway): where a policy's established connections must move.

    `rules` are the rules as steered now (failovers applied). A policy's connections on a
    gateway other than the one its new connections go to move there when that gateway is
    down, or up but no longer serving the policy (it gave the egress IP up), and the gateway
    they move to is up. Otherwise they stay: a gateway that still serves the policy (a move
    between two healthy gateways whose egress IPs are their own) carries them to the end.
    """
    moves = set()
    for rule in rules:
        target = rule.gateway
        if rule.action is not SteerAction.TUNNEL or target is None:
            continue
        if reachable.get(target) is not True:
            continue
        for gateway in gateways - {target}:
            up = reachable.get(gateway)
            if up is False or (up is True and rule.policy not in serving.get(gateway, ())):
                moves.add((gateway, rule.policy, target))
    return moves


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
    """Give the answered connections of each move its new gateway's mark, so that their next
    packets go there (it has their state from the gateways' conntrack sync); returns how
    many."""
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
                moved += _unless_ended(
                    partial(conntrack.entry, "set", mark=new, tuple_orig=entry.tuple_orig))
    finally:
        conntrack.close()
    return moved


def _unless_ended(change: Callable[[], object]) -> bool:
    """Make a change to a conntrack entry; False when the entry ended since it was listed."""
    try:
        change()
    except NetlinkError as error:
        if error.code != errno.ENOENT:
            raise
        return False
    return True
