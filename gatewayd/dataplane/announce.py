"""Telling the segment about an address, and asking it whether someone else has it.

Before use, both families are probed the same way, in one window with two rounds:
- IPv4: ARP probe (sender address 0.0.0.0, RFC 5227): any ARP from another MAC claiming the
  address is a conflict.
- IPv6: duplicate address detection (RFC 4862): a neighbour solicitation from the unspecified
  address to the target's solicited-node group. A neighbour advertisement for the target, or
  another host's solicitation for it from the unspecified address (it probes at the same time),
  is a conflict. We send it ourselves rather than leave it to the kernel, whose DAD waits up
  to a second before its probe and a second after it: a failover would wait that long for an
  IPv6 egress IP while an IPv4 one is taken after the probe window.

After use: gratuitous ARP (a request whose sender and target address are both ours), and an
unsolicited neighbour advertisement (override flag set) to all nodes; neighbours update their
caches from them.

Raw sockets, opened in the calling thread's network namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import select
import socket
import struct
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from gatewayd.policy.model import IPAddress

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ARP_REQUEST = 1
ARP_REPLY = 2
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
UNSPECIFIED = IPv4Address(0)
MIN_FRAME = 60  # Ethernet minimum without FCS; short frames are padded
ICMPV6_NEIGHBOUR_SOLICITATION = 135
ICMPV6_NEIGHBOUR_ADVERTISEMENT = 136
IPPROTO_ICMPV6 = 58
ND_HOP_LIMIT = 255  # neighbour discovery messages from anywhere but the link carry less
NA_ROUTER, NA_OVERRIDE = 0x80000000, 0x20000000
ALL_NODES = "ff02::1"
SOL_PACKET, PACKET_ADD_MEMBERSHIP, PACKET_MR_MULTICAST = 263, 1, 0
SO_ATTACH_FILTER = 26


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
    sock = packet_socket(interface, ETH_P_ARP)
    with close_in_background(sock):
        sock.send(arp_frame(packet))


@contextlib.contextmanager
def close_in_background(*sockets: socket.socket) -> Iterator[contextlib.ExitStack]:
    """Close `sockets`, and whatever is pushed onto the stack this yields, in a thread of
    their own when the block ends: closing a packet socket waits for the kernel (about
    10 ms, see `packet_socket`), and a failover's claim must not."""
    with contextlib.ExitStack() as stack:
        for sock in sockets:
            stack.enter_context(sock)
        yield stack
        later = stack.pop_all()
        threading.Thread(target=later.close, name="close-sockets", daemon=True).start()


@dataclass(frozen=True)
class NeighbourMessage:
    """A neighbour solicitation or advertisement, as far as duplicate detection needs it."""

    kind: int  # ICMPV6_NEIGHBOUR_SOLICITATION or ICMPV6_NEIGHBOUR_ADVERTISEMENT
    sender_mac: bytes  # the Ethernet source
    source: IPv6Address
    target: IPv6Address


def solicited_node(address: IPv6Address) -> IPv6Address:
    """The multicast group a host joins for each of its addresses (ff02::1:ffXX:XXXX)."""
    return IPv6Address(b"\xff\x02" + bytes(9) + b"\x01\xff" + address.packed[13:])


def multicast_mac(group: IPv6Address) -> bytes:
    return b"\x33\x33" + group.packed[12:]


def dad_frame(mac: bytes, target: IPv6Address) -> bytes:
    """A duplicate address detection probe: a neighbour solicitation for `target` from the
    unspecified address, to its solicited-node group, without a link-layer option."""
    source, group = IPv6Address(0), solicited_node(target)
    message = struct.pack("!BBHI16s", ICMPV6_NEIGHBOUR_SOLICITATION, 0, 0, 0, target.packed)
    checksum = _icmpv6_checksum(source, group, message)
    message = message[:2] + struct.pack("!H", checksum) + message[4:]
    header = struct.pack("!IHBB16s16s", 6 << 28, len(message), IPPROTO_ICMPV6, ND_HOP_LIMIT,
                         source.packed, group.packed)
    ethernet = multicast_mac(group) + mac + struct.pack("!H", ETH_P_IPV6)
    return ethernet + header + message


def parse_neighbour(frame: bytes) -> NeighbourMessage | None:
    """The neighbour solicitation or advertisement in an Ethernet frame, None for anything
    else, and for messages that did not start on this link (hop limit below 255)."""
    if len(frame) < 14 + 40 + 24 or frame[12:14] != struct.pack("!H", ETH_P_IPV6):
        return None
    first_word, _, next_header, hop_limit, src, _dst = struct.unpack(
        "!IHBB16s16s", frame[14:54])
    kind = frame[54]
    if (first_word >> 28 != 6 or next_header != IPPROTO_ICMPV6 or hop_limit != ND_HOP_LIMIT
            or kind not in (ICMPV6_NEIGHBOUR_SOLICITATION, ICMPV6_NEIGHBOUR_ADVERTISEMENT)):
        return None
    return NeighbourMessage(kind, frame[6:12], IPv6Address(src), IPv6Address(frame[62:78]))


def _icmpv6_checksum(source: IPv6Address, destination: IPv6Address, message: bytes) -> int:
    data = source.packed + destination.packed + struct.pack("!IxxxB", len(message),
                                                            IPPROTO_ICMPV6) + message
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# After its time, a probe still reads this many frames already queued: a socket's buffer holds
# a few hundred, and a segment flooded with ARP must not keep the probe reading for ever.
LATE_FRAMES = 1024


def probe(
    interface: str, mac: bytes, addresses: Collection[IPAddress], seconds: float,
    sockets: contextlib.ExitStack,
) -> dict[IPAddress, str]:
    """Probe `addresses` of both families for `seconds` (two rounds of probes: ARP for IPv4,
    duplicate address detection for IPv6); return each address that another host claims,
    with that host's MAC. The probe's sockets are closed with `sockets`: the caller closes
    them once it has used the address (closing costs time, see `packet_socket`).

    Only what arrives after the second round counts: a holder that answered the first round
    and then gave the address up (a gateway handing it over) does not answer the second, and
    the address is free at the end of this probe instead of after a refusal and a retry. Each
    round is heard for half of `seconds` from when it was sent: a thread kept off the CPU
    makes the probe longer, never a round shorter or skipped."""
    wanted = set(addresses)
    v4 = sorted(a for a in wanted if isinstance(a, IPv4Address))
    v6 = sorted(a for a in wanted if isinstance(a, IPv6Address))
    conflicts: dict[IPAddress, str] = {}
    listening: list[socket.socket] = []
    round_frames: list[tuple[socket.socket, bytes]] = []
    if v4:
        arp = sockets.enter_context(packet_socket(interface, ETH_P_ARP))
        listening.append(arp)
        round_frames += [
            (arp, arp_frame(ArpPacket(ARP_REQUEST, mac, UNSPECIFIED, ZERO_MAC, a)))
            for a in v4]
    if v6:
        nd = sockets.enter_context(neighbour_socket(interface))
        listening.append(nd)
        for group in {solicited_node(a) for a in v6}:  # hear others probing for them
            _join(nd, interface, multicast_mac(group))
        round_frames += [(nd, dad_frame(mac, a)) for a in v6]
    for _ in range(2):  # each hearing ends with the queue read: the round before is all heard
        conflicts.clear()
        for sock, frame in round_frames:
            sock.send(frame)
        _hear_claims(listening, mac, wanted, conflicts, time.monotonic() + seconds / 2)
    return conflicts


def _hear_claims(listening: list[socket.socket], mac: bytes, wanted: set[IPAddress],
                 conflicts: dict[IPAddress, str], until: float) -> None:
    """Record the claims `listening` hears until `until`, and then those already queued: an
    answer that came in time counts however late this thread ran (a busy host)."""
    late = 0
    while late < LATE_FRAMES:
        left = until - time.monotonic()
        ready = select.select(listening, [], [], max(left, 0))[0]
        if not ready:
            return
        for sock in ready:
            if left <= 0:
                late += 1
            claim = claimed_in(sock.recv(2048), mac, probes=True)
            if claim is not None and claim[0] in wanted:
                conflicts[claim[0]] = format_mac(claim[1])


def claimed_in(frame: bytes, own_mac: bytes, *, probes: bool) -> tuple[IPAddress, bytes] | None:
    """The address another host claims in `frame`, with that host's MAC: one it uses (the
    sender of an ARP packet, the target of a neighbour advertisement) and, with `probes`, one
    it probes for at the same time (the target of an ARP probe or of a DAD solicitation)."""
    claim: tuple[IPAddress, bytes] | None = None
    if (packet := parse_arp(frame)) is not None:
        if probes and packet.sender_ip == UNSPECIFIED and packet.operation == ARP_REQUEST:
            claim = packet.target_ip, packet.sender_mac
        else:
            claim = packet.sender_ip, packet.sender_mac
    elif (message := parse_neighbour(frame)) is not None and (
            message.kind == ICMPV6_NEIGHBOUR_ADVERTISEMENT
            or (probes and message.source == IPv6Address(0))):
        claim = message.target, message.sender_mac
    return claim if claim is not None and claim[1] != own_mac else None


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


def packet_socket(interface: str, ethertype: int) -> socket.socket:
    """A raw socket for the frames of one ethertype on `interface`. Created for no ethertype
    and then bound: a socket created for one takes all frames of it until the bind, which
    then waits for the kernel to let go of that first hook (about 10 ms, measured). Closing
    one waits as long: a failover's claim closes its sockets after the address is in use."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind((interface, ethertype))
    except OSError:
        sock.close()
        raise
    return sock


# Classic BPF: accept IPv6 frames carrying ICMPv6 neighbour solicitations or advertisements
# (no extension headers: neighbour discovery has none), drop the rest in the kernel. Without
# it the socket would copy every IPv6 packet the uplink forwards.
_BPF_LDH_ABS, _BPF_LDB_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x28, 0x30, 0x15, 0x06
_NEIGHBOUR_FILTER = (
    (_BPF_LDH_ABS, 0, 0, 12), (_BPF_JEQ_K, 0, 6, ETH_P_IPV6),  # ethertype
    (_BPF_LDB_ABS, 0, 0, 20), (_BPF_JEQ_K, 0, 4, IPPROTO_ICMPV6),  # next header
    (_BPF_LDB_ABS, 0, 0, 54),  # ICMPv6 type
    (_BPF_JEQ_K, 1, 0, ICMPV6_NEIGHBOUR_SOLICITATION),
    (_BPF_JEQ_K, 0, 1, ICMPV6_NEIGHBOUR_ADVERTISEMENT),
    (_BPF_RET_K, 0, 0, 0xFFFF), (_BPF_RET_K, 0, 0, 0),
)


def neighbour_socket(interface: str) -> socket.socket:
    """A raw socket for the neighbour solicitations and advertisements on `interface`."""
    sock = packet_socket(interface, ETH_P_IPV6)
    program = ctypes.create_string_buffer(
        b"".join(struct.pack("HBBI", *instruction) for instruction in _NEIGHBOUR_FILTER))
    fprog = struct.pack("HL", len(_NEIGHBOUR_FILTER), ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError:
        sock.close()
        raise
    return sock


def _join(sock: socket.socket, interface: str, group_mac: bytes) -> None:
    """Receive frames to a multicast MAC: a NIC filters groups nobody asked for."""
    request = struct.pack("iHH8s", socket.if_nametoindex(interface), PACKET_MR_MULTICAST,
                          len(group_mac), group_mac)
    sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, request)
