"""The frames of conflict probes: built and read without a network."""

from __future__ import annotations

import struct
from ipaddress import IPv6Address

import pytest

from gatewayd.dataplane.announce import (
    ICMPV6_NEIGHBOUR_ADVERTISEMENT,
    ICMPV6_NEIGHBOUR_SOLICITATION,
    NeighbourMessage,
    dad_frame,
    multicast_mac,
    parse_neighbour,
    solicited_node,
)

MAC = bytes.fromhex("020000000001")
TARGET = IPv6Address("2001:db8:100::72")


def ones_complement_sum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data + b"\0" * (len(data) % 2)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_the_solicited_node_group_keeps_the_last_24_bits() -> None:
    assert solicited_node(TARGET) == IPv6Address("ff02::1:ff00:72")
    assert solicited_node(IPv6Address("fe80::abcd:12ff:fe34:5678")) == IPv6Address(
        "ff02::1:ff34:5678")
    assert multicast_mac(IPv6Address("ff02::1:ff34:5678")) == bytes.fromhex("3333ff345678")


def test_a_dad_probe_is_a_solicitation_from_the_unspecified_address() -> None:
    frame = dad_frame(MAC, TARGET)
    assert frame[:6] == bytes.fromhex("3333ff000072") and frame[6:12] == MAC
    assert parse_neighbour(frame) == NeighbourMessage(
        ICMPV6_NEIGHBOUR_SOLICITATION, MAC, IPv6Address(0), TARGET)
    # the ICMPv6 checksum covers the pseudo-header: summed with it, all ones
    ipv6, icmp = frame[14:54], frame[54:]
    pseudo = ipv6[8:40] + struct.pack("!I3xB", len(icmp), 58)
    assert ones_complement_sum(pseudo + icmp) == 0xFFFF
    assert struct.unpack("!H", ipv6[4:6])[0] == len(icmp) == 24  # no link-layer option


def advertisement(hop_limit: int = 255, kind: int = ICMPV6_NEIGHBOUR_ADVERTISEMENT) -> bytes:
    source = IPv6Address("2001:db8:100::2")
    icmp = struct.pack("!BBHI16s", kind, 0, 0, 0x20000000, TARGET.packed)
    header = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), 58, hop_limit, source.packed,
                         IPv6Address("ff02::1").packed)
    return bytes.fromhex("333300000001") + MAC + b"\x86\xdd" + header + icmp


def test_an_advertisement_names_its_target() -> None:
    assert parse_neighbour(advertisement()) == NeighbourMessage(
        ICMPV6_NEIGHBOUR_ADVERTISEMENT, MAC, IPv6Address("2001:db8:100::2"), TARGET)


@pytest.mark.parametrize("frame", [
    advertisement(hop_limit=64),  # routed here from elsewhere: not from this link
    advertisement(kind=128),  # an echo request
    advertisement()[:70],  # cut short
    b"\x00" * 12 + b"\x08\x06" + advertisement()[14:],  # not IPv6
], ids=["hop-limit", "other-icmpv6", "short", "ethertype"])
def test_anything_else_is_ignored(frame: bytes) -> None:
    assert parse_neighbour(frame) is None
