"""Connections SNATed to this gateway's egress IPs, from the kernel's conntrack table."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection
from dataclasses import dataclass

from pyroute2 import Conntrack

_PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp",
              socket.IPPROTO_ICMPV6: "icmpv6", socket.IPPROTO_SCTP: "sctp"}


@dataclass(frozen=True)
class NatFlow:
    """One connection: the egress IP it leaves with, where it goes (port: None without)."""

    egress_ip: str
    destination: str
    port: int | None
    protocol: str


def snat_flows(egress_ips: Collection[str]) -> list[NatFlow]:
    """Every conntrack entry of this network namespace whose replies come back to one of
    `egress_ips` from elsewhere, i.e. a connection SNATed to it. Reads the whole table
    (netlink cannot filter by address here): call it seldom on a busy gateway."""
    wanted = {ipaddress.ip_address(ip) for ip in egress_ips}
    flows: list[NatFlow] = []
    if not wanted:
        return flows
    conntrack = Conntrack()
    try:
        for entry in conntrack.dump_entries():
            orig, reply = entry.tuple_orig, entry.tuple_reply
            try:
                egress = ipaddress.ip_address(reply.daddr)
                source = ipaddress.ip_address(orig.saddr)
            except ValueError:
                continue
            if egress not in wanted or source == egress:
                continue  # not translated: the gateway's own connection from that address
            protocol = _PROTOCOLS.get(orig.proto, str(orig.proto))
            flows.append(NatFlow(str(egress), str(ipaddress.ip_address(orig.daddr)),
                                 orig.dport if protocol in ("tcp", "udp", "sctp") else None,
                                 protocol))
    finally:
        conntrack.close()
    return flows
