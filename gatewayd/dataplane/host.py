"""What the gateway host looks like, for its EgressGateway status: interfaces, addresses, and
which interface holds the default route (read from netlink, in the daemon's namespace).

Egress IPs the agent provisions (addresses carrying OWNER_PROTOCOL) are left out: they move
with failovers, and the engine must not derive egress IPs from them.
"""

from __future__ import annotations

import socket
from typing import Any

from pyroute2 import IPRoute

from gatewayd.dataplane.netlink import OWNER_PROTOCOL, address_of
from gatewayd.policy.model import GatewayInterface, InterfaceAddress

_MAIN_TABLE = 254
_LOOPBACK = 0x8


def observe_interfaces(skip: frozenset[str] = frozenset()) -> tuple[GatewayInterface, ...]:
    """Every interface but loopback and those in `skip`, in index order."""
    with IPRoute() as ipr:
        links = sorted(ipr.get_links(), key=lambda link: link["index"])
        defaults = {4: _default_route_links(ipr, socket.AF_INET),
                    6: _default_route_links(ipr, socket.AF_INET6)}
        addresses: dict[int, list[InterfaceAddress]] = {}
        for msg in ipr.get_addr():
            if msg.get("IFA_PROTO") == OWNER_PROTOCOL:
                continue
            address = address_of(msg)
            if address.version == 6 and address.is_link_local:
                continue
            addresses.setdefault(msg["index"], []).append(
                InterfaceAddress(address, msg["prefixlen"])
            )
    found = []
    for link in links:
        name = link.get("IFLA_IFNAME")
        if link["flags"] & _LOOPBACK or name in skip:
            continue
        found.append(GatewayInterface(
            name=name,
            altnames=_altnames(link),
            addresses=tuple(addresses.get(link["index"], ())),
            default_route_v4=link["index"] in defaults[4],
            default_route_v6=link["index"] in defaults[6],
        ))
    return tuple(found)


def first_ipv4(interfaces: tuple[GatewayInterface, ...], name: str) -> str | None:
    """The first IPv4 address of interface `name`, as the host lists it."""
    for interface in interfaces:
        if interface.name == name:
            for item in interface.addresses:
                if item.address.version == 4:
                    return str(item.address)
    return None


def _default_route_links(ipr: IPRoute, family: int) -> set[int]:
    links = set()
    for msg in ipr.route("dump", family=family):
        table = msg.get("RTA_TABLE") or msg["table"]
        if table != _MAIN_TABLE or msg["dst_len"] != 0:
            continue
        if msg.get("RTA_OIF"):
            links.add(msg.get("RTA_OIF"))
        for hop in msg.get("RTA_MULTIPATH") or ():
            links.add(hop["oif"])
    return links


def _altnames(link: Any) -> tuple[str, ...]:
    properties = link.get("IFLA_PROP_LIST")
    if not properties:
        return ()
    return tuple(properties.get_attrs("IFLA_ALT_IFNAME"))
