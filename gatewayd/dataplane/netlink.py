"""Netlink helpers shared by the drivers (pyroute2 acts on the calling thread's namespace)."""

from __future__ import annotations

import ipaddress
from typing import Any

from pyroute2 import IPRoute

from gatewayd.policy.model import IPAddress

# Protocol number we put on the addresses (IFA_PROTO, kernel >= 5.18), routes and rules we
# create, so ownership survives a daemon restart and we never touch anything else. 103 is not
# assigned in iproute2's rt_protos.
OWNER_PROTOCOL = 103

# Route types (rtm_type) as the kernel reports them.
RTN_UNICAST, RTN_LOCAL, RTN_BLACKHOLE = 1, 2, 6


class LinkNotFoundError(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"network interface {name!r} does not exist in this network namespace")
        self.name = name


def link_index(ipr: IPRoute, name: str) -> int:
    found: list[int] = ipr.link_lookup(ifname=name)
    if not found:
        raise LinkNotFoundError(name)
    return found[0]


def link_names(ipr: IPRoute) -> dict[int, str]:
    return {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}


def find_link(ipr: IPRoute, name: str) -> Any | None:
    """The link message of `name`, or None."""
    found = ipr.link_lookup(ifname=name)
    return ipr.get_links(found[0])[0] if found else None


def address_of(msg: Any) -> IPAddress:
    """The address of an address message (`get_addr()`): IFA_LOCAL, which differs from
    IFA_ADDRESS (the peer's) on a point-to-point link, else IFA_ADDRESS."""
    return ipaddress.ip_address(msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS"))
