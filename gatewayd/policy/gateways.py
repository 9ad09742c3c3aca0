"""Which gateway serves each gateway entry of a policy, and with which egress IPs (spec §5).

Gateways are EgressGateway objects, not Nodes as in Cilium, and only Ready ones are chosen.
Otherwise the choice is Cilium's: the first gateway in byte-wise name order whose labels match
the entry's nodeSelector and that has an IPv4 address. With several entries, entries that match
no gateway are dropped (Cilium >= 1.20), the rest are sorted by gateway IPv4 and each pod is
pinned to one of them by FNV-1a of its UID.

Our failover extension: each entry also gets a standby, the first usable matching gateway by
name other than the active one, unless that gateway is already active for another entry of the
same policy.

Stickiness, a deliberate difference from Cilium's pure name order: the caller may name each
entry's current active gateway (`preferred`, the controller's previous decision). That gateway
stays active while it is usable and still matches the entry's nodeSelector, even when a gateway
earlier in name order is usable again; the recovered one becomes the standby. A failover is then
not undone by the failed gateway's return, which would move the traffic (and break its
connections) a second time. Without `preferred` the choice is Cilium's.

Egress IPs follow the table of spec §5.5 (>= 1.20, with the #48660 fix), plus our extension:
an explicit `egressIP` that is on no interface of the gateway but inside one of its
`egressIPPools` is valid, because the agent provisions it on the pool's interface.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from gatewayd.policy.model import (
    EgressGateway,
    GatewayInterface,
    GatewaySpec,
    IPAddress,
    NodeAddress,
    Policy,
)

FNV32_OFFSET = 0x811C9DC5
FNV32_PRIME = 0x01000193


def fnv1a32(text: str) -> int:
    """FNV-1a, 32 bit, over the UTF-8 bytes of `text` (how Cilium spreads pods over gateways)."""
    value = FNV32_OFFSET
    for byte in text.encode():
        value = ((value ^ byte) * FNV32_PRIME) & 0xFFFFFFFF
    return value


def first_ipv4(addresses: Iterable[NodeAddress]) -> IPv4Address | None:
    """The node IPv4 Cilium uses: first InternalIP, else first ExternalIP, else any IPv4."""
    parsed = [(a.type, _parse_ip(a.address)) for a in addresses]
    v4 = [(kind, ip) for kind, ip in parsed if isinstance(ip, IPv4Address)]
    for wanted in ("InternalIP", "ExternalIP", None):
        for kind, ip in v4:
            if wanted is None or kind == wanted:
                return ip
    return None


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class Candidate:
    """An EgressGateway with the IPv4 address it would be reached at."""

    gateway: EgressGateway
    ipv4: IPv4Address | None

    @property
    def unusable_because(self) -> str | None:
        """Why this gateway cannot be chosen, or None when it can."""
        if not self.gateway.ready:
            return "is not Ready"
        if self.ipv4 is None:
            return "has no IPv4 address"
        return None


def candidates(gateways: Iterable[EgressGateway]) -> tuple[Candidate, ...]:
    """Every gateway in byte-wise name order (`gw-10` < `gw-9`), as `resolve_gateways` needs."""
    found = [Candidate(g, first_ipv4(g.addresses)) for g in gateways]
    return tuple(sorted(found, key=lambda c: c.gateway.name.encode()))


# --- egress IPs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EgressIPs:
    """Egress IPs of one gateway for one entry; None = not found (traffic dropped: no-egress-ip).

    `notes` say where each address came from or why it is missing.
    """

    ipv4: IPv4Address | None
    ipv6: IPv6Address | None
    notes: tuple[str, ...] = ()

    def for_version(self, version: int) -> IPAddress | None:
        return self.ipv4 if version == 4 else self.ipv6


def _interface(gateway: EgressGateway, name: str) -> GatewayInterface | None:
    for iface in gateway.interfaces:
        if iface.name == name or name in iface.altnames:
            return iface
    return None


def _first_v4(iface: GatewayInterface) -> IPv4Address | None:
    return next((a.address for a in iface.addresses if isinstance(a.address, IPv4Address)), None)


def _first_v6(iface: GatewayInterface) -> IPv6Address | None:
    # A link-local address cannot be the source of traffic leaving the site.
    return next(
        (
            a.address
            for a in iface.addresses
            if isinstance(a.address, IPv6Address) and not a.address.is_link_local
        ),
        None,
    )


def _family_name(version: int) -> str:
    return "IPv4" if version == 4 else "IPv6"


def derive_egress_ips(
    gateway: EgressGateway, spec: GatewaySpec, v4_needed: bool, v6_needed: bool
) -> EgressIPs:
    """Egress IPs of `gateway` for one gateway entry (spec §5.5).

    Both families are derived where possible; only a family the policy's destinations need can
    make the derivation fail.
    """
    if spec.interface is not None:
        return _from_interface(gateway, spec.interface, v4_needed, v6_needed)
    if spec.egress_ip is not None:
        return _from_egress_ip(gateway, spec.egress_ip, v4_needed, v6_needed)
    return _from_default_routes(gateway, v4_needed, v6_needed)


def _from_interface(
    gateway: EgressGateway, name: str, v4_needed: bool, v6_needed: bool
) -> EgressIPs:
    iface = _interface(gateway, name)
    if iface is None:
        return EgressIPs(None, None, (f"interface {name} not found on gateway {gateway.name}",))
    v4, v6 = _first_v4(iface), _first_v6(iface)
    # Cilium: a needed family missing on the interface is an error for the whole entry.
    missing = [
        _family_name(version)
        for version, needed, ip in ((4, v4_needed, v4), (6, v6_needed, v6))
        if needed and ip is None
    ]
    if missing:
        what = " and ".join(missing)
        note = f"interface {name} of gateway {gateway.name} has no {what} address"
        return EgressIPs(None, None, (note + ", so no egress IP of either family",))
    return EgressIPs(v4, v6, (f"first addresses of interface {name} of gateway {gateway.name}",))


def _from_egress_ip(
    gateway: EgressGateway, egress_ip: IPAddress, v4_needed: bool, v6_needed: bool
) -> EgressIPs:
    holder = next(
        (i for i in gateway.interfaces if any(a.address == egress_ip for a in i.addresses)), None
    )
    if holder is not None:
        note = f"egressIP {egress_ip} is on interface {holder.name} of gateway {gateway.name}"
    else:
        pool = next((p for p in gateway.egress_ip_pools if egress_ip in p.cidr), None)
        if pool is None:
            return EgressIPs(
                None,
                None,
                (
                    f"egressIP {egress_ip} is on no interface of gateway {gateway.name} "
                    "and in none of its egressIPPools",
                ),
            )
        holder = _interface(gateway, pool.interface)
        if holder is None:
            return EgressIPs(
                None,
                None,
                (
                    f"egressIP {egress_ip} is in pool {pool.cidr} of gateway {gateway.name}, "
                    f"but its interface {pool.interface} is not reported by the gateway",
                ),
            )
        note = (
            f"egressIP {egress_ip} is in pool {pool.cidr} of gateway {gateway.name}; "
            f"the agent provisions it on {holder.name}"
        )
    # >= 1.20 with the #48660 fix: the other family comes from the same interface, and its
    # absence leaves only that family without an egress IP.
    v4: IPv4Address | None
    v6: IPv6Address | None
    if isinstance(egress_ip, IPv4Address):
        v4, v6 = egress_ip, _first_v6(holder)
        missing = 6 if v6 is None and v6_needed else None
    else:
        v4, v6 = _first_v4(holder), egress_ip
        missing = 4 if v4 is None and v4_needed else None
    notes = [note]
    if missing is not None:
        family = _family_name(missing)
        notes.append(f"interface {holder.name} has no {family} address: no {family} egress IP")
    return EgressIPs(v4, v6, tuple(notes))


def _from_default_routes(gateway: EgressGateway, v4_needed: bool, v6_needed: bool) -> EgressIPs:
    iface4 = next((i for i in gateway.interfaces if i.default_route_v4), None)
    iface6 = next((i for i in gateway.interfaces if i.default_route_v6), None)
    if v4_needed and v6_needed and iface4 and iface6 and iface4.name != iface6.name:
        return EgressIPs(
            None,
            None,
            (
                f"the IPv4 and IPv6 default routes of gateway {gateway.name} use different "
                f"interfaces ({iface4.name}, {iface6.name}), so no egress IP of either family",
            ),
        )
    notes = []
    v4 = _first_v4(iface4) if iface4 is not None else None
    v6 = _first_v6(iface6) if iface6 is not None else None
    for version, iface, ip in ((4, iface4, v4), (6, iface6, v6)):
        family = _family_name(version)
        if iface is None:
            notes.append(f"gateway {gateway.name} has no {family} default route")
        elif ip is None:
            notes.append(f"default-route interface {iface.name} has no {family} address")
        else:
            notes.append(f"{family} {ip} from default-route interface {iface.name}")
    return EgressIPs(v4, v6, tuple(notes))


def standby_egress_ips(
    standby: EgressGateway, spec: GatewaySpec, v4_needed: bool, v6_needed: bool
) -> EgressIPs:
    """Egress IPs the standby uses after a failover.

    An explicit egressIP follows the active gateway (firewalls keep seeing one source), so the
    standby uses the same address; the other family is derived on the standby as usual.
    """
    derived = derive_egress_ips(standby, spec, v4_needed, v6_needed)
    explicit = spec.egress_ip
    if explicit is None:
        return derived
    note = f"egressIP {explicit} moves to standby {standby.name} on failover"
    if isinstance(explicit, IPv4Address):
        return EgressIPs(explicit, derived.ipv6, (note, *derived.notes))
    return EgressIPs(derived.ipv4, explicit, (note, *derived.notes))


# --- gateway entries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayAssignment:
    """What one gateway entry of a policy resolved to."""

    entry: int  # index in spec.egressGateways (0 for spec.egressGateway)
    gateway: str | None  # None: no ready gateway matches (traffic dropped: no-egress-gateway)
    gateway_ip: IPv4Address | None
    egress: EgressIPs
    standby: str | None = None
    standby_egress: EgressIPs | None = None
    notes: tuple[str, ...] = ()  # why this gateway (and standby), for explain and status

    @property
    def egress_ipv4(self) -> IPv4Address | None:
        return self.egress.ipv4

    @property
    def egress_ipv6(self) -> IPv6Address | None:
        return self.egress.ipv6


@dataclass(frozen=True)
class PolicyGateways:
    """Every entry of a policy resolved, and the hash ring pods are spread over."""

    entries: tuple[GatewayAssignment, ...]  # in spec order
    ring: tuple[GatewayAssignment, ...]  # sorted by gateway IPv4; unmatched entries dropped

    def for_pod(self, uid: str) -> GatewayAssignment:
        if len(self.ring) == 1:
            return self.ring[0]
        return self.ring[fnv1a32(uid) % len(self.ring)]


def destination_families(policy: Policy) -> tuple[bool, bool]:
    """(v4Needed, v6Needed): which families the destinations (not the exclusions) contain."""
    versions = {d.version for d in policy.destinations}
    return 4 in versions, 6 in versions


def resolve_gateways(
    policy: Policy,
    all_gateways: Sequence[Candidate],
    preferred: Mapping[int, str] | None = None,
) -> PolicyGateways:
    """Resolve every gateway entry of `policy` against `all_gateways` (from `candidates()`).

    `preferred` maps an entry index to its current active gateway, which stays active while it
    is usable and matches (stickiness, see the module docstring).
    """
    v4_needed, v6_needed = destination_families(policy)
    matching = [
        [c for c in all_gateways if spec.node_selector.matches(c.gateway.labels)]
        for spec in policy.gateways
    ]
    usable = [[c for c in found if c.unusable_because is None] for found in matching]
    chosen = [_active(found, (preferred or {}).get(i)) for i, found in enumerate(usable)]
    actives = {c.gateway.name for c in chosen if c is not None}
    entries = []
    for index, spec in enumerate(policy.gateways):
        notes = []
        for candidate in matching[index]:
            if candidate.unusable_because is None:
                break
            notes.append(
                f"entry {index}: {candidate.gateway.name} matches but {candidate.unusable_because}"
            )
        active = chosen[index]
        if active is None:
            notes.append(f"entry {index}: no Ready EgressGateway with an IPv4 address matches")
            entries.append(
                GatewayAssignment(index, None, None, EgressIPs(None, None), notes=tuple(notes))
            )
            continue
        if active is usable[index][0]:
            notes.append(
                f"entry {index}: {active.gateway.name} is the first Ready EgressGateway by name "
                "that matches its nodeSelector"
            )
        else:
            notes.append(
                f"entry {index}: {active.gateway.name} stays active (it was before, and it is "
                f"still usable and matches), although {usable[index][0].gateway.name} sorts first"
            )
        standby, note = _standby(index, matching[index], usable[index], active, actives)
        notes.append(note)
        standby_ips = standby_egress_ips(standby, spec, v4_needed, v6_needed) if standby else None
        entries.append(
            GatewayAssignment(
                entry=index,
                gateway=active.gateway.name,
                gateway_ip=active.ipv4,
                egress=derive_egress_ips(active.gateway, spec, v4_needed, v6_needed),
                standby=standby.name if standby else None,
                standby_egress=standby_ips,
                notes=tuple(notes),
            )
        )
    # Cilium >= 1.20: entries matching no gateway leave the ring, unless none matches at all.
    ring = [e for e in entries if e.gateway is not None] or entries[:1]
    ring.sort(key=lambda e: int(e.gateway_ip) if e.gateway_ip is not None else 0)
    return PolicyGateways(tuple(entries), tuple(ring))


def _active(usable: list[Candidate], preferred: str | None) -> Candidate | None:
    """The entry's active gateway: the preferred one if it is usable, else the first usable."""
    for candidate in usable:
        if candidate.gateway.name == preferred:
            return candidate
    return usable[0] if usable else None


def _standby(
    index: int,
    matching: list[Candidate],
    usable: list[Candidate],
    active: Candidate,
    actives: set[str],
) -> tuple[EgressGateway | None, str]:
    """The standby of one entry (the first usable gateway by name but the active) and why."""
    others = [c for c in usable if c is not active]
    if others:
        second = others[0].gateway
        if second.name in actives:
            return None, f"entry {index}: no standby: {second.name} is active for another entry"
        order = "next" if active is usable[0] else "first other usable"
        return second, f"entry {index}: standby {second.name} (the {order} matching one by name)"
    position = next(i for i, c in enumerate(matching) if c is active)
    down = [
        f"{c.gateway.name} {c.unusable_because}"
        for c in matching[position + 1 :]
        if c.unusable_because is not None
    ]
    why = f" ({', '.join(down)})" if down else ""
    return None, f"entry {index}: no standby: no other usable gateway matches{why}"
