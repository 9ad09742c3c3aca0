"""Longest-prefix match, flattened: CIDR entries become disjoint, sorted address ranges.

Cilium resolves (source, destination) in an LPM trie shared by all policies (semantics spec §6).
For one source, the same answer is a list of disjoint ranges, each holding the value of the
longest prefix that covers it. That list is what the data plane programs (interval sets need no
priorities) and what `explain` searches with bisect.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, summarize_address_range
from typing import Generic, TypeVar

from gatewayd.policy.model import IPAddress, IPNetwork

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Range(Generic[V]):
    """Addresses `first`..`last` (integers, inclusive) of one family, all resolving to `value`."""

    first: int
    last: int
    value: V


def flatten(entries: Iterable[tuple[IPNetwork, V]]) -> list[Range[V]]:
    """Resolve CIDR entries of one family by longest prefix into sorted disjoint ranges.

    Each address covered by some entry lands in exactly one range, whose value is that of the
    longest covering prefix. Adjacent ranges with equal values are merged. CIDRs must be
    distinct: resolving ties between equal CIDRs is the caller's decision.
    """
    seen: set[tuple[int, int]] = set()
    spans = []
    versions = set()
    for net, value in entries:
        span = (int(net.network_address), int(net.broadcast_address))
        if span in seen:
            raise ValueError(f"duplicate CIDR {net}: resolve ties before flattening")
        seen.add(span)
        versions.add(net.version)
        spans.append((*span, value))
    if len(versions) > 1:
        raise ValueError("flatten() takes CIDRs of one address family")
    return flatten_spans(spans)


def flatten_spans(spans: Iterable[tuple[int, int, V]]) -> list[Range[V]]:
    """`flatten` for CIDRs given as distinct (first, last, value) integer spans of one family."""
    # CIDRs are either nested or disjoint, so sorting by (first, -last) visits every CIDR after
    # all CIDRs that contain it; a stack holds the chain of open, enclosing CIDRs.
    ordered = sorted(spans, key=lambda s: (s[0], -s[1]))
    firsts: list[int] = []
    lasts: list[int] = []
    values: list[V] = []

    def emit(first: int, last: int, value: V) -> None:
        if first > last:
            return
        if lasts and lasts[-1] == first - 1 and values[-1] == value:
            lasts[-1] = last
        else:
            firsts.append(first)
            lasts.append(last)
            values.append(value)

    stack: list[tuple[int, V]] = []  # (last address, value), innermost on top
    cursor = 0  # first address not emitted yet
    for first, last, value in ordered:
        while stack and stack[-1][0] < first:
            top_last, top_value = stack.pop()
            emit(cursor, top_last, top_value)
            cursor = top_last + 1
        if stack:
            emit(cursor, first - 1, stack[-1][1])
        cursor = first
        stack.append((last, value))
    while stack:
        top_last, top_value = stack.pop()
        emit(cursor, top_last, top_value)
        cursor = top_last + 1
    return [Range(f, la, v) for f, la, v in zip(firsts, lasts, values, strict=True)]


class RangeTable(Generic[V]):
    """Sorted disjoint ranges of one address family, looked up by bisection."""

    def __init__(self, version: int, ranges: Sequence[Range[V]]) -> None:
        self.version = version
        self.ranges = tuple(ranges)
        self._firsts = [r.first for r in self.ranges]

    def lookup(self, address: IPAddress) -> Range[V] | None:
        """The range holding `address`, or None when no entry covers it."""
        if address.version != self.version:
            return None
        value = int(address)
        index = bisect_right(self._firsts, value) - 1
        if index >= 0 and value <= self.ranges[index].last:
            return self.ranges[index]
        return None


def merge(spans: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Inclusive integer ranges, sorted, with overlapping and adjacent ones joined."""
    merged: list[list[int]] = []
    for first, last in sorted(spans):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return tuple((first, last) for first, last in merged)


def to_networks(spans: Iterable[tuple[int, int]], version: int) -> tuple[IPNetwork, ...]:
    """The fewest CIDRs that cover exactly the union of the inclusive integer ranges."""
    make = IPv4Address if version == 4 else IPv6Address
    networks: list[IPNetwork] = []
    for first, last in merge(spans):
        networks.extend(summarize_address_range(make(first), make(last)))
    return tuple(networks)
