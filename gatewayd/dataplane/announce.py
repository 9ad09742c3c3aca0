"""Telling the segment about an address, and asking it whether someone else has it.

- IPv4: ARP probe before use (sender address 0.0.0.0, RFC 5227): any ARP from another MAC
  claiming the address is a conflict. After use: gratuitous ARP (a request whose sender and
  target address are both ours), which neighbours use to update existing cache entries.
- IPv6: the kernel runs duplicate address detection itself; afterwards we send an unsolicited
  neighbour advertisement (override flag set) to all nodes.

Raw sockets, opened in the calling thread's network namespace.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Collection
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARP_REQUEST = 1
ARP_REPLY = 2
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
MIN_FRAME = 60  # Ethernet minimum without FCS; short frames are padded
ICMPV6_NEIGHBOUR_ADVERTISEMENT = 136
NA_ROUTER, NA_OVERRIDE = 0x80000000, 0x20000000
ALL_NODES = "ff02::1"


@dataclass(frozen=True)
class ArpPacket:
    operation: int
    sender_mac: bytes
    sender_ip: IPv4Address
    target_mac: bytes
    target_ip: IPv4Address


def arp_frame(packet: ArpPacket, destination: bytes = BROADCAST) -> bytes:
    header = destination + packet.sender_mac + struct.pack("!H", ETH_P_ARP)
    body = struct.pack(
        "!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, packet.operation,
        packet.sender_mac, packet.sender_ip.packed, packet.target_mac, packet.target_ip.packed,
    )
    return (header + body).ljust(MIN_FRAME, b"\x00")


def parse_arp(frame: bytes) -> ArpPacket | None:
    """The ARP packet in an Ethernet frame, None for anything else (IPv4 over Ethernet only)."""
    if len(frame) < 42 or frame[12:14] != struct.pack("!H", ETH_P_ARP):
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack(
        "!HHBBH6s4s6s4s", frame[14:42]
    )
    if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4):
        return None
    return ArpPacket(op, sha, IPv4Address(spa), tha, IPv4Address(tpa))


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def send_gratuitous_arp(interface: str, mac: bytes, address: IPv4Address) -> None:
    packet = ArpPacket(ARP_REQUEST, mac, address, ZERO_MAC, address)
    with _arp_socket(interface) as sock:
        sock.send(arp_frame(packet))


def probe_ipv4(
    interface: str, mac: bytes, addresses: Collection[IPv4Address], seconds: float
) -> dict[IPv4Address, str]:
    """ARP-probe `addresses` for `seconds` (two rounds of probes); return each address that
    another host claims, with that host's MAC.

    Only what arrives after the second round counts: a holder that answered the first round
    and then gave the address up (a gateway handing it over) does not answer the second, and
    the address is free at the end of this probe instead of after a refusal and a retry."""
    wanted = set(addresses)
    conflicts: dict[IPv4Address, str] = {}
    unspecified = IPv4Address(0)
    with _arp_socket(interface) as sock:
        start = time.monotonic()
        rounds = 0
        while (elapsed := time.monotonic() - start) < seconds:
            if rounds < 2 and elapsed >= rounds * seconds / 2:
                conflicts.clear()
                for address in sorted(wanted):
                    probe = ArpPacket(ARP_REQUEST, mac, unspecified, ZERO_MAC, address)
                    sock.send(arp_frame(probe))
                rounds += 1
            next_step = rounds * seconds / 2 if rounds < 2 else seconds
            if not select.select([sock], [], [], max(next_step - elapsed, 0))[0]:
                continue
            packet = parse_arp(sock.recv(2048))
            if packet is None or packet.sender_mac == mac:
                continue
            # Someone using the address, or probing for it at the same time.
            claimed = packet.sender_ip
            if claimed == unspecified and packet.operation == ARP_REQUEST:
                claimed = packet.target_ip
            if claimed in wanted:
                conflicts[claimed] = format_mac(packet.sender_mac)
    return conflicts


def send_unsolicited_na(
    interface_index: int, mac: bytes, address: IPv6Address, router: bool
) -> None:
    flags = NA_OVERRIDE | (NA_ROUTER if router else 0)
    # The kernel fills in the ICMPv6 checksum of raw ICMPv6 sockets.
    message = struct.pack("!BBHI16s", ICMPV6_NEIGHBOUR_ADVERTISEMENT, 0, 0, flags, address.packed)
    message += struct.pack("!BB6s", 2, 1, mac)  # option: target link-layer address
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, interface_index)
        sock.bind((str(address), 0, 0, interface_index))
        sock.sendto(message, (ALL_NODES, 0, 0, interface_index))


def _arp_socket(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    try:
        sock.bind((interface, ETH_P_ARP))
    except OSError:
        sock.close()
        raise
    return sock
