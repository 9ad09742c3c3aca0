"""Policy routing for steering: `ip rule fwmark MARK lookup TABLE` and, in TABLE, a default
route through the gateway's tunnel (cloud nodes).

Each table also gets a blackhole default route with the largest metric: when the tunnel
interface disappears the kernel removes its route, and marked traffic is then dropped instead
of falling through to the main table and leaving the node without its gateway.

Rules and routes we create carry OWNER_PROTOCOL; only those are ever changed or removed.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from gatewayd.dataplane.netlink import (
    OWNER_PROTOCOL,
    RTN_BLACKHOLE,
    RTN_UNICAST,
    LinkNotFoundError,
    link_index,
    link_names,
)

FULL_MASK = 0xFFFFFFFF
LAST_METRIC = 0xFFFFFFFF
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_DEFAULT = {4: "0.0.0.0/0", 6: "::/0"}


class RoutingError(Exception):
    pass


@dataclass(frozen=True)
class RoutingChanges:
    added: tuple[str, ...] = ()  # e.g. "ipv4 rule fwmark 0x100/0xff00 lookup 100"
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


@dataclass(frozen=True, order=True)
class _Rule:
    version: int
    mark: int
    mask: int
    table: int
    priority: int

    def __str__(self) -> str:
        return (f"ipv{self.version} rule priority {self.priority} fwmark "
                f"{self.mark:#x}/{self.mask:#x} lookup {self.table}")


@dataclass(frozen=True, order=True)
class _Route:
    version: int
    table: int
    interface: str  # "": the blackhole fallback

    def __str__(self) -> str:
        target = f"dev {self.interface}" if self.interface else f"blackhole metric {LAST_METRIC}"
        return f"ipv{self.version} route default {target} table {self.table}"


class PolicyRoutingDriver:
    def __init__(
        self, priority: int = 100, mark_mask: int = FULL_MASK, families: Iterable[int] = (4, 6)
    ) -> None:
        self.priority = priority
        self.mark_mask = mark_mask
        self.families = tuple(sorted(families))

    def ensure(self, rules: Mapping[int, tuple[int, str]]) -> RoutingChanges:
        """`rules`: mark -> (routing table, tunnel interface). Adds what is missing, then removes
        rules and routes of ours that are not wanted. A missing interface is reported with a
        RoutingError after everything else was applied (its blackhole already protects it)."""
        tables = [table for table, _ in rules.values()]
        if len(set(tables)) != len(tables):
            raise ValueError(f"policy routing: each mark needs its own table, got {dict(rules)}")
        want_rules = {
            _Rule(v, mark, self.mark_mask, table, self.priority)
            for mark, (table, _) in rules.items() for v in self.families
        }
        want_routes = {
            _Route(v, table, interface)
            for table, interface in rules.values() for v in self.families
        } | {_Route(v, table, "") for table in tables for v in self.families}
        added: list[str] = []
        removed: list[str] = []
        errors: list[str] = []
        with IPRoute() as ipr:
            have_rules, have_routes = self._observe(ipr)
            for route in sorted(want_routes - have_routes):
                try:
                    self._route(ipr, "replace", route)
                except (LinkNotFoundError, NetlinkError) as exc:
                    errors.append(f"{route}: {exc}")
                    continue
                added.append(str(route))
            for rule in sorted(want_rules - have_rules):
                self._rule(ipr, "add", rule)
                added.append(str(rule))
            for rule in sorted(have_rules - want_rules):
                self._rule(ipr, "del", rule)
                removed.append(str(rule))
            _, have_routes = self._observe(ipr)
            for route in sorted(have_routes - want_routes):
                self._route(ipr, "del", route)
                removed.append(str(route))
        if errors:
            raise RoutingError("policy routing incomplete: " + "; ".join(errors))
        return RoutingChanges(tuple(added), tuple(removed))

    def observe(self) -> dict[int, tuple[int, str]]:
        """mark -> (table, interface) for every mark whose rule and tunnel route are in place in
        all families."""
        with IPRoute() as ipr:
            have_rules, have_routes = self._observe(ipr)
        result: dict[int, tuple[int, str]] = {}
        for rule in have_rules:
            interfaces = {
                r.interface for r in have_routes if r.table == rule.table and r.interface
            }
            complete = all(
                _Rule(v, rule.mark, rule.mask, rule.table, rule.priority) in have_rules
                and any(_Route(v, rule.table, i) in have_routes for i in interfaces)
                for v in self.families
            )
            if complete and len(interfaces) == 1:
                result[rule.mark] = (rule.table, interfaces.pop())
        return result

    def delete(self) -> RoutingChanges:
        """Remove every rule and route of ours (teardown)."""
        removed: list[str] = []
        with IPRoute() as ipr:
            have_rules, have_routes = self._observe(ipr)
            for rule in sorted(have_rules):
                self._rule(ipr, "del", rule)
                removed.append(str(rule))
            for route in sorted(have_routes):
                self._route(ipr, "del", route)
                removed.append(str(route))
        return RoutingChanges(removed=tuple(removed))

    def _observe(self, ipr: IPRoute) -> tuple[set[_Rule], set[_Route]]:
        names = link_names(ipr)
        rules: set[_Rule] = set()
        routes: set[_Route] = set()
        for version, family in _FAMILIES.items():
            for msg in ipr.get_rules(family=family):
                if msg.get("FRA_PROTOCOL") == OWNER_PROTOCOL:
                    rules.add(_Rule(
                        version, msg.get("FRA_FWMARK") or 0, msg.get("FRA_FWMASK") or 0,
                        msg.get("FRA_TABLE") or msg["table"], msg.get("FRA_PRIORITY") or 0,
                    ))
            for msg in ipr.route("dump", family=family):
                if msg["proto"] != OWNER_PROTOCOL or msg["dst_len"] != 0:
                    continue
                table = msg.get("RTA_TABLE") or msg["table"]
                if msg["type"] == RTN_BLACKHOLE:
                    routes.add(_Route(version, table, ""))
                elif msg["type"] == RTN_UNICAST and msg.get("RTA_OIF") in names:
                    routes.add(_Route(version, table, names[msg.get("RTA_OIF")]))
        return rules, routes

    @staticmethod
    def _rule(ipr: IPRoute, command: str, rule: _Rule) -> None:
        ipr.rule(
            command, family=_FAMILIES[rule.version], fwmark=rule.mark, fwmask=rule.mask,
            table=rule.table, priority=rule.priority, protocol=OWNER_PROTOCOL,
        )

    @staticmethod
    def _route(ipr: IPRoute, command: str, route: _Route) -> None:
        spec: dict[str, object] = {
            "family": _FAMILIES[route.version], "dst": _DEFAULT[route.version],
            "table": route.table, "proto": OWNER_PROTOCOL,
        }
        if not route.interface:
            spec.update(type="blackhole", priority=LAST_METRIC)
        else:
            spec["oif"] = link_index(ipr, route.interface)
        ipr.route(command, **spec)
