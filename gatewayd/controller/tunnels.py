"""Tunnel addresses: one unique IPv4 address per cloud node, stable once assigned.

Every gateway's own tunnel address is the first host address of the tunnel CIDR (100.127.0.1 in
the default 100.127.0.0/16); nodes get the others, lowest free first. A node keeps the address
its EgressNode spec already holds, so a controller restart or a leader change moves nothing; an
address that is outside the CIDR, reserved, or claimed twice is replaced (of two nodes claiming
one address, the first by name keeps it).
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network

DEFAULT_TUNNEL_CIDR = IPv4Network("100.127.0.0/16")


def gateway_tunnel_address(cidr: IPv4Network) -> IPv4Address:
    """The address every gateway uses on its end of the tunnels."""
    return cidr.network_address + 1


def _parse(text: str | None) -> IPv4Address | None:
    if text is None:
        return None
    try:
        return IPv4Address(text)
    except ValueError:
        return None


def _is_node_address(address: IPv4Address, cidr: IPv4Network) -> bool:
    """A host address of `cidr` other than the gateways' own."""
    if address not in cidr or address == gateway_tunnel_address(cidr):
        return False
    return cidr.prefixlen >= 31 or address not in (cidr.network_address, cidr.broadcast_address)


def allocate_tunnel_addresses(
    current: Mapping[str, str | None], cidr: IPv4Network
) -> tuple[dict[str, IPv4Address], list[str]]:
    """An address for every node in `current` (node -> the address its spec holds, if any).

    Returns the assignment and the nodes left without one because the CIDR is full.
    """
    nodes = sorted(current, key=str.encode)
    assigned: dict[str, IPv4Address] = {}
    used: set[IPv4Address] = set()
    for node in nodes:
        address = _parse(current[node])
        if address is not None and _is_node_address(address, cidr) and address not in used:
            assigned[node] = address
            used.add(address)
    free = (a for a in cidr.hosts() if a not in used and _is_node_address(a, cidr))
    unassigned = []
    for node in nodes:
        if node not in assigned:
            address = next(free, None)
            if address is None:
                unassigned.append(node)
            else:
                assigned[node] = address
    return assigned, unassigned
