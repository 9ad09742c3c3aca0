"""A dedicated egress interface, when configured: a macvlan on the uplink (own MAC on the same
segment) or an 802.1Q VLAN on it. The egress IPs then live on it (AddressDriver).

A link of the wanted name with other settings (parent, mode, VLAN id) is re-created: its
addresses go with it and the next address pass puts them back. A link of that name that is
neither macvlan nor VLAN is not ours, and is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from gatewayd.dataplane.netlink import find_link, link_index

MACVLAN_MODES = ("private", "vepa", "bridge", "passthru", "source")
_IFF_UP = 0x1


class InterfaceError(Exception):
    pass


@dataclass(frozen=True)
class EgressInterfaceState:
    name: str
    kind: str  # "macvlan" or "vlan"
    parent: str | None
    mode: str | None  # macvlan mode
    vlan_id: int | None
    mtu: int
    up: bool


@dataclass(frozen=True)
class InterfaceChanges:
    created: bool = False
    recreated: bool = False  # existed with other settings
    mtu_set: bool = False
    brought_up: bool = False

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))


class EgressInterfaceDriver:
    def ensure(
        self,
        name: str,
        parent: str,
        mode: str = "bridge",
        mtu: int | None = None,
        vlan_id: int | None = None,
    ) -> InterfaceChanges:
        """A macvlan `name` on `parent` in `mode`, or with `vlan_id` an 802.1Q VLAN on it;
        `mtu` None keeps the parent's. Up."""
        if mode not in MACVLAN_MODES:
            raise ValueError(f"macvlan mode {mode!r} is unknown; accepted: "
                             f"{', '.join(MACVLAN_MODES)}")
        if vlan_id is not None and not 1 <= vlan_id <= 4094:
            raise ValueError(f"VLAN id {vlan_id} is out of range; accepted: 1..4094")
        kind = "macvlan" if vlan_id is None else "vlan"
        created = recreated = False
        with IPRoute() as ipr:
            parent_index = link_index(ipr, parent)
            state = self._state(ipr, name)
            wanted = (kind, parent, mode if kind == "macvlan" else None, vlan_id)
            if state and (state.kind, state.parent, state.mode, state.vlan_id) != wanted:
                ipr.link("del", ifname=name)
                recreated = True
                state = None
            if state is None:
                spec: dict[str, Any] = {"ifname": name, "kind": kind, "link": parent_index}
                if kind == "macvlan":
                    spec["macvlan_mode"] = mode
                else:
                    spec["vlan_id"] = vlan_id
                try:
                    ipr.link("add", **spec)
                except NetlinkError as exc:
                    raise InterfaceError(
                        f"cannot create {kind} {name} on {parent}: {exc} (is the {kind} "
                        "kernel module available?)"
                    ) from exc
                created = not recreated
                state = self._state(ipr, name)
                if state is None:
                    raise InterfaceError(f"{kind} {name} vanished right after creation")
            index = link_index(ipr, name)
            mtu_set = mtu is not None and state.mtu != mtu
            if mtu_set:
                ipr.link("set", index=index, mtu=mtu)
            brought_up = not state.up
            if brought_up:
                ipr.link("set", index=index, state="up")
        return InterfaceChanges(created, recreated, mtu_set, brought_up)

    def observe(self, name: str) -> EgressInterfaceState | None:
        with IPRoute() as ipr:
            return self._state(ipr, name)

    def delete(self, name: str) -> bool:
        with IPRoute() as ipr:
            if self._state(ipr, name) is None:
                return False
            ipr.link("del", ifname=name)
            return True

    @staticmethod
    def _state(ipr: IPRoute, name: str) -> EgressInterfaceState | None:
        link = find_link(ipr, name)
        if link is None:
            return None
        kind = link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND"))
        if kind not in ("macvlan", "vlan"):
            raise InterfaceError(
                f"interface {name} exists and is a {kind or 'physical'} link, not a macvlan or "
                "VLAN: choose another name for the egress interface"
            )
        parent_index = link.get("IFLA_LINK")
        parents = ipr.get_links(parent_index) if parent_index else []
        return EgressInterfaceState(
            name=name,
            kind=kind,
            parent=parents[0].get("IFLA_IFNAME") if parents else None,
            mode=link.get(("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_MACVLAN_MODE")),
            vlan_id=link.get(("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_VLAN_ID")),
            mtu=link.get("IFLA_MTU"),
            up=bool(link["flags"] & _IFF_UP),
        )
