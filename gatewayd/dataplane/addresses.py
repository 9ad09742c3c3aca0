"""Egress IPs as /32 and /128 addresses on an interface.

The driver owns only the addresses it added: they carry OWNER_PROTOCOL as their address
protocol (IFA_PROTO, kernel >= 5.18), so ownership survives a daemon restart and an address
someone else configured is never removed, even when it is also desired.

Before an address is used, a probe asks the segment whether another host has it (ARP probe,
IPv6 duplicate address detection; both families in one window, see `announce.probe`); the
address is then added without the kernel's own DAD, which would take up to two seconds more.
An address another host answers for is refused and reported in `AddressChanges.conflicts`, and
not tried again for `retry_conflicts_after` seconds, doubled after each refusal in a row up to
8 times as long (a probe costs `probe_seconds` of the reconcile pass). Added addresses are
announced: gratuitous ARP, unsolicited neighbour advertisement.

An added IPv6 address is in use at once (as the source of the neighbour solicitations for
packets forwarded with it), but the kernel installs the route that delivers packets to it
later, from a work queue: milliseconds, more on a busy host (once 0.29 s in the lab). An
answer to a solicitation sent in between is lost, and that neighbour's resolution waits a
second for its next try, with every packet to it queued (a failover's new IPv6 connections,
in the lab). So, once the route is there, the driver restarts the IPv6 resolutions still
under way on the interface. The announcement does not wait for the route: replies to the
connections the gateway translates have their destination translated back before routing.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from gatewayd.dataplane.announce import (
    close_in_background,
    probe,
    send_gratuitous_arp,
    send_unsolicited_na,
)
from gatewayd.dataplane.netlink import (
    OWNER_PROTOCOL,
    RTN_LOCAL,
    address_of,
    link_index,
    link_names,
)
from gatewayd.policy.model import IPAddress, address_order

IFA_F_NODAD = 0x02
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
IFF_NOARP = 0x80
NUD_INCOMPLETE = 0x01
LOCAL_ROUTE_SECONDS = 1.0  # the longest wait for an added IPv6 address's route
LOCAL_ROUTE_POLL_SECONDS = 0.001

log = logging.getLogger(__name__)


class AddressError(Exception):
    pass


@dataclass(frozen=True)
class AddressConflict:
    address: IPAddress
    interface: str
    detail: str  # who answers for it, or that duplicate address detection failed

    def __str__(self) -> str:
        return f"{self.address} on {self.interface}: {self.detail}"


@dataclass(frozen=True)
class AddressChanges:
    added: tuple[IPAddress, ...] = ()
    removed: tuple[IPAddress, ...] = ()
    # Refused addresses. Not a change: `bool(changes)` only says whether something changed.
    conflicts: tuple[AddressConflict, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


@dataclass(frozen=True)
class _Present:
    address: IPAddress
    prefixlen: int
    owned: bool
    flags: int


MAX_BACKOFF = 8  # a refused address is asked for again at most this many retry periods later


class AddressDriver:
    def __init__(
        self,
        protocol: int = OWNER_PROTOCOL,
        probe_seconds: float = 1.0,
        retry_conflicts_after: float = 60.0,
    ) -> None:
        """`probe_seconds` = 0 turns conflict probing off."""
        self.protocol = protocol
        self.probe_seconds = probe_seconds
        self.retry_conflicts_after = retry_conflicts_after
        # (interface, address) -> (when to ask again, the conflict); refusals in a row
        self._conflicts: dict[tuple[str, IPAddress], tuple[float, AddressConflict]] = {}
        self._refusals: dict[tuple[str, IPAddress], int] = {}
        self._protocol_kept = False  # the kernel kept an added address's protocol once

    def ensure(self, interface: str, desired: Iterable[IPAddress]) -> AddressChanges:
        """Add the missing addresses (after a conflict probe), announce them, then remove the
        owned ones on this interface that are not desired."""
        wanted = set(desired)
        for key in [k for k in self._conflicts if k[0] == interface and k[1] not in wanted]:
            del self._conflicts[key]  # no longer asked for: nothing to try again
            self._refusals.pop(key, None)
        conflicts: list[AddressConflict] = []
        removed: list[IPAddress] = []
        with IPRoute() as ipr:
            index = link_index(ipr, interface)
            link = ipr.get_links(index)[0]
            mac, can_arp = _mac(link)
            present = {p.address: p for p in self._present(ipr, index)}
            refused_by_kernel = []
            for item in list(present.values()):
                # The kernel refused it (an earlier version left DAD to the kernel): probe
                # and add it again like a missing one.
                if item.owned and item.flags & IFA_F_DADFAILED:
                    self._delete(ipr, index, item)
                    del present[item.address]
                    refused_by_kernel.append(item.address)
            missing: list[IPAddress] = []
            for address in sorted(wanted - set(present), key=address_order):
                refused = self._refused_recently(interface, address)
                if refused:
                    conflicts.append(refused)
                else:
                    missing.append(address)

            # closed once the addresses are in use, off this path
            with close_in_background() as probe_sockets:
                taken = probe(interface, mac, missing, self.probe_seconds, probe_sockets) if (
                    self.probe_seconds > 0 and can_arp and missing) else {}
                for address, owner in sorted(taken.items(),
                                             key=lambda item: address_order(item[0])):
                    conflicts.append(self._refuse(interface, address, f"answered by {owner}"))
                added = [a for a in missing if a not in taken]
                for address in added:  # each announced at once: a failover waits for it
                    self._add(ipr, index, address)
                    self._refusals.pop((interface, address), None)
                    if can_arp:
                        self._announce(interface, index, mac, [address])
                added_v6 = [a for a in added if isinstance(a, IPv6Address)]
                if added_v6:
                    _await_local_routes(ipr, added_v6)
                    _restart_resolutions(ipr, index)
            removed += [a for a in refused_by_kernel if a not in added]

            # Stale ones last: add before remove, as everywhere in the reconcile.
            for item in sorted(present.values(), key=lambda p: address_order(p.address)):
                if item.owned and item.address not in wanted and self._delete(ipr, index, item):
                    removed.append(item.address)
        return AddressChanges(
            added=tuple(sorted(added, key=address_order)),
            removed=tuple(sorted(removed, key=address_order)),
            conflicts=tuple(conflicts),
        )

    def announce(self, interface: str, addresses: Iterable[IPAddress]) -> None:
        """Announce addresses again (after a failover, say): gratuitous ARP / unsolicited NA."""
        with IPRoute() as ipr:
            index = link_index(ipr, interface)
            mac, can_arp = _mac(ipr.get_links(index)[0])
        if can_arp:
            self._announce(interface, index, mac, addresses)

    def observe(self, interface: str) -> frozenset[IPAddress]:
        """The owned addresses present on `interface`."""
        with IPRoute() as ipr:
            index = link_index(ipr, interface)
            return frozenset(p.address for p in self._present(ipr, index) if p.owned)

    def remove_all(self, interfaces: Collection[str] | None = None) -> AddressChanges:
        """Remove every owned address on every interface (teardown), or on `interfaces` (a
        gateway that fences itself)."""
        removed: list[IPAddress] = []
        with IPRoute() as ipr:
            for index, name in sorted(link_names(ipr).items()):
                if interfaces is not None and name not in interfaces:
                    continue
                for item in self._present(ipr, index):
                    if item.owned and self._delete(ipr, index, item):
                        removed.append(item.address)
        self._conflicts.clear()
        return AddressChanges(removed=tuple(sorted(removed, key=address_order)))

    # --- internals ----------------------------------------------------------------------------

    @staticmethod
    def _announce(interface: str, index: int, mac: bytes, addresses: Iterable[IPAddress]
                  ) -> None:
        for address in addresses:
            if isinstance(address, IPv4Address):
                send_gratuitous_arp(interface, mac, address)
            else:
                send_unsolicited_na(index, mac, address, _forwarding(interface))

    def _present(self, ipr: IPRoute, index: int) -> list[_Present]:
        return [
            _Present(
                address_of(msg),
                msg["prefixlen"],
                msg.get("IFA_PROTO") == self.protocol,
                msg.get("IFA_FLAGS") or msg["flags"],
            )
            for msg in ipr.get_addr(index=index)
        ]

    def _add(self, ipr: IPRoute, index: int, address: IPAddress) -> None:
        spec: dict[str, Any] = {
            "index": index, "address": str(address), "prefixlen": address.max_prefixlen,
            "proto": self.protocol,
        }
        if isinstance(address, IPv6Address):  # probed already (or probing is off)
            spec["flags"] = IFA_F_NODAD
        ipr.addr("add", **spec)
        if self._protocol_kept:  # the kernel does not change: once is enough, and a claim waits
            return
        mine = [p for p in self._present(ipr, index) if p.address == address]
        if not mine or not mine[0].owned:
            if mine:
                self._delete(ipr, index, _Present(address, mine[0].prefixlen, True, 0))
            raise AddressError(
                f"the kernel did not keep the protocol of {address} (IFA_PROTO, kernel >= "
                "5.18 needed): without it the address could not be told apart from others'"
            )
        self._protocol_kept = True

    @staticmethod
    def _delete(ipr: IPRoute, index: int, item: _Present) -> bool:
        """Whether this call removed it: another remover (the agent's keeper and its probe
        responder both fence) may have been first, and only one reports the removal."""
        try:
            ipr.addr("del", index=index, address=str(item.address), prefixlen=item.prefixlen)
        except NetlinkError as exc:
            if exc.code != errno.EADDRNOTAVAIL:
                raise
            return False
        return True

    def _refuse(self, interface: str, address: IPAddress, detail: str) -> AddressConflict:
        conflict = AddressConflict(address, interface, detail)
        key = (interface, address)
        self._refusals[key] = refusals = self._refusals.get(key, 0) + 1
        delay = self.retry_conflicts_after * min(2 ** (refusals - 1), MAX_BACKOFF)
        self._conflicts[key] = (time.monotonic() + delay, conflict)
        return conflict

    def next_retry(self) -> float | None:
        """When (time.monotonic()) the first refused address may be asked for again."""
        return min((due for due, _ in self._conflicts.values()), default=None)

    def _refused_recently(self, interface: str, address: IPAddress) -> AddressConflict | None:
        entry = self._conflicts.get((interface, address))
        if entry is None:
            return None
        if time.monotonic() >= entry[0]:
            del self._conflicts[(interface, address)]
            return None
        return entry[1]


@dataclass(frozen=True)
class HostAddresses:
    """The host's addresses, from one dump."""

    held: frozenset[IPAddress]  # held now, whoever added them (see `held_addresses`)
    others: frozenset[IPAddress]  # not added by gatewayd: the host's own, another tool's


def host_addresses(protocol: int = OWNER_PROTOCOL) -> HostAddresses:
    with IPRoute() as ipr:
        messages = ipr.get_addr()
    return HostAddresses(
        held=frozenset(address_of(msg) for msg in messages if _held(msg)),
        others=frozenset(address_of(msg) for msg in messages
                         if msg.get("IFA_PROTO") != protocol),
    )


def held_addresses(interfaces: Collection[str] | None = None) -> frozenset[IPAddress]:
    """Every address this host holds now, on any interface (or on `interfaces`), whoever added
    it. IPv6 addresses still in duplicate address detection, or refused by it, are not held."""
    with IPRoute() as ipr:
        names = link_names(ipr)
        return frozenset(
            address_of(msg)
            for msg in ipr.get_addr()
            if _held(msg) and (interfaces is None or names.get(msg["index"]) in interfaces)
        )


def _await_local_routes(ipr: IPRoute, addresses: Collection[IPv6Address]) -> None:
    """Until the kernel delivers packets to each of `addresses` (see the module's docstring)."""
    deadline = time.monotonic() + LOCAL_ROUTE_SECONDS
    waiting = list(addresses)
    while True:
        waiting = [a for a in waiting if ipr.route("get", dst=str(a))[0]["type"] != RTN_LOCAL]
        if not waiting:
            return
        if time.monotonic() >= deadline:
            log.warning("the kernel has no local route for %s %gs after adding it",
                        ", ".join(map(str, waiting)), LOCAL_ROUTE_SECONDS)
            return
        time.sleep(LOCAL_ROUTE_POLL_SECONDS)


def _restart_resolutions(ipr: IPRoute, index: int) -> None:
    """Drop the IPv6 neighbour entries of interface `index` still being resolved: a
    solicitation of theirs may have had a new address as its source before the kernel
    delivered packets to it. The next packet to such a neighbour asks again at once."""
    restarted = []
    for msg in ipr.get_neighbours(family=socket.AF_INET6, ifindex=index):
        if msg["state"] != NUD_INCOMPLETE:
            continue
        neighbour = msg.get("NDA_DST")
        try:
            ipr.neigh("del", dst=neighbour, ifindex=index, family=socket.AF_INET6)
            restarted.append(neighbour)
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:  # resolved or gone meanwhile
                raise
    if restarted:
        log.info("neighbour resolution of %s starts again: its solicitation may have come "
                 "from an egress IP the kernel did not receive on yet", ", ".join(restarted))


def _held(msg: Any) -> bool:
    return not (msg.get("IFA_FLAGS") or msg["flags"]) & (IFA_F_TENTATIVE | IFA_F_DADFAILED)


def _mac(link: Any) -> tuple[bytes, bool]:
    """The link's MAC, and whether it speaks ARP/NDP at all (tunnels do not)."""
    text = link.get("IFLA_ADDRESS") or ""
    mac = bytes.fromhex(text.replace(":", "")) if text else b""
    return mac, len(mac) == 6 and not link["flags"] & IFF_NOARP


def _forwarding(interface: str) -> bool:
    """Neighbour advertisements carry the router flag when the interface forwards."""
    try:
        return Path(f"/proc/sys/net/ipv6/conf/{interface}/forwarding").read_text().strip() == "1"
    except OSError:
        return False

