"""Longest-prefix flattening (gatewayd/policy/lpm.py): concrete cases and a brute-force check."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.policy import lpm
from gatewayd.policy.model import IPAddress, IPNetwork

pytestmark = pytest.mark.unit


def ranges(entries: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    flat = lpm.flatten((ip_network(c), v) for c, v in entries)
    return [(str(IPv4Address(r.first)), str(IPv4Address(r.last)), r.value) for r in flat]


def test_nested_prefixes_split_the_outer_range() -> None:
    assert ranges([("10.0.0.0/8", "a"), ("10.1.0.0/16", "b")]) == [
        ("10.0.0.0", "10.0.255.255", "a"),
        ("10.1.0.0", "10.1.255.255", "b"),
        ("10.2.0.0", "10.255.255.255", "a"),
    ]


def test_inner_prefix_at_the_start_and_end_of_the_outer_one() -> None:
    assert ranges([("10.0.0.0/24", "a"), ("10.0.0.0/25", "b"), ("10.0.0.255/32", "c")]) == [
        ("10.0.0.0", "10.0.0.127", "b"),
        ("10.0.0.128", "10.0.0.254", "a"),
        ("10.0.0.255", "10.0.0.255", "c"),
    ]


def test_adjacent_ranges_with_equal_values_merge() -> None:
    assert ranges([("10.0.0.0/25", "a"), ("10.0.0.128/25", "a"), ("10.0.1.0/24", "b")]) == [
        ("10.0.0.0", "10.0.0.255", "a"),
        ("10.0.1.0", "10.0.1.255", "b"),
    ]
    # An inner prefix with the outer one's value leaves one range.
    assert ranges([("10.0.0.0/8", "a"), ("10.1.0.0/16", "a")]) == [
        ("10.0.0.0", "10.255.255.255", "a")
    ]


def test_deep_nesting_and_gaps() -> None:
    assert ranges(
        [
            ("0.0.0.0/0", "all"),
            ("10.0.0.0/8", "ten"),
            ("10.0.0.0/16", "ten-zero"),
            ("10.0.5.0/24", "five"),
            ("192.168.0.0/16", "home"),
        ]
    ) == [
        ("0.0.0.0", "9.255.255.255", "all"),
        ("10.0.0.0", "10.0.4.255", "ten-zero"),
        ("10.0.5.0", "10.0.5.255", "five"),
        ("10.0.6.0", "10.0.255.255", "ten-zero"),
        ("10.1.0.0", "10.255.255.255", "ten"),
        ("11.0.0.0", "192.167.255.255", "all"),
        ("192.168.0.0", "192.168.255.255", "home"),
        ("192.169.0.0", "255.255.255.255", "all"),
    ]


def test_nothing_in_nothing_out() -> None:
    assert lpm.flatten([]) == []


def test_duplicate_cidrs_and_mixed_families_are_refused() -> None:
    with pytest.raises(ValueError, match=r"duplicate CIDR 10\.0\.0\.0/8"):
        lpm.flatten([(ip_network("10.0.0.0/8"), 1), (ip_network("10.0.0.0/8"), 2)])
    with pytest.raises(ValueError, match="one address family"):
        lpm.flatten([(ip_network("10.0.0.0/8"), 1), (ip_network("2001:db8::/32"), 2)])


def test_range_table_lookup() -> None:
    table = lpm.RangeTable(4, lpm.flatten([(ip_network("10.0.0.0/8"), "a")]))
    assert table.lookup(IPv4Address("9.255.255.255")) is None
    hit = table.lookup(IPv4Address("10.20.30.40"))
    assert hit is not None
    assert hit.value == "a"
    assert table.lookup(IPv4Address("11.0.0.0")) is None
    assert table.lookup(IPv6Address("::a00:1")) is None  # other family: never a match


def test_to_networks_merges_and_summarizes() -> None:
    spans = [(int(IPv4Address("10.0.0.0")), int(IPv4Address("10.0.0.127")))]
    spans.append((int(IPv4Address("10.0.0.128")), int(IPv4Address("10.0.1.255"))))
    assert lpm.to_networks(spans, 4) == (IPv4Network("10.0.0.0/23"),)
    assert lpm.to_networks(spans[1:], 4) == (
        IPv4Network("10.0.0.128/25"),
        IPv4Network("10.0.1.0/24"),
    )
    six = [(int(IPv6Address("2001:db8::")), int(IPv6Address("2001:db8::2")))]
    assert lpm.to_networks(six, 6) == (
        IPv6Network("2001:db8::/127"),
        IPv6Network("2001:db8::2/128"),
    )


# --- property: flattening equals a naive longest-prefix match ----------------------------------


def naive_lpm(entries: dict[IPNetwork, int], address: IPAddress) -> int | None:
    covering = [n for n in entries if address in n]
    if not covering:
        return None
    return entries[max(covering, key=lambda n: n.prefixlen)]


@st.composite
def entries_and_probes(
    draw: st.DrawFn, version: int
) -> tuple[dict[IPNetwork, int], list[IPAddress]]:
    bits = 32 if version == 4 else 128
    make_net = IPv4Network if version == 4 else IPv6Network
    make_ip = IPv4Address if version == 4 else IPv6Address
    # Addresses from a small window so that prefixes nest and touch often.
    base = draw(st.integers(0, 2**bits - 2**12))
    offsets = st.integers(0, 2**12 - 1)
    entries: dict[IPNetwork, int] = {}
    for _ in range(draw(st.integers(0, 12))):
        length = draw(st.sampled_from([0, 1, bits - 12, bits - 10, bits - 8, bits - 4, bits]))
        network = make_net((base + draw(offsets), length), strict=False)
        entries[network] = draw(st.integers(0, 3))  # few values: merging happens
    probes = [make_ip(base + draw(offsets)) for _ in range(20)]
    probes += [make_ip(int(n.network_address)) for n in entries]
    probes += [make_ip(int(n.broadcast_address)) for n in entries]
    edges = [int(n.broadcast_address) + 1 for n in entries] + [
        int(n.network_address) - 1 for n in entries
    ]
    probes += [make_ip(e) for e in edges if 0 <= e < 2**bits]
    return entries, probes


@settings(max_examples=300)
@given(st.sampled_from([4, 6]).flatmap(entries_and_probes))
def test_flatten_matches_naive_longest_prefix(
    case: tuple[dict[IPNetwork, int], list[IPAddress]],
) -> None:
    entries, probes = case
    flat = lpm.flatten(entries.items())
    # Sorted, disjoint, non-empty, and merged: no two touching ranges share a value.
    for r in flat:
        assert r.first <= r.last
    for left, right in pairwise(flat):
        assert left.last < right.first
        assert not (left.last + 1 == right.first and left.value == right.value)
    version = next(iter(entries)).version if entries else 4
    table = lpm.RangeTable(version, flat)
    for probe in probes:
        if probe.version != version:
            continue
        hit = table.lookup(probe)
        assert (hit.value if hit else None) == naive_lpm(entries, probe), probe
    # The ranges cover exactly the union of the entries.
    covered = sum(r.last - r.first + 1 for r in flat)
    union = lpm.to_networks(
        ((int(n.network_address), int(n.broadcast_address)) for n in entries), version
    )
    assert covered == sum(n.num_addresses for n in union)
