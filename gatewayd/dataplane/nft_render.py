"""Pure renderers: a plan in, the whole content of one nftables table out, as nft JSON.

No I/O here. `NftablesDriver` applies a `RenderedTable` in one transaction and diffs it against
the kernel; everything it sends to libnftables is built by the functions at the end of this file.

Names inside a table come from a deterministic index (`rule0_src`, `rule0_dst`, counter
`rule0`); the policy they serve is in the object's comment, because policy names may be long
and hold dots. Set elements are canonical strings (`10.0.0.1`, `10.0.0.0/24`, `2001:db8::/32`,
ranges as `first-last`) so that what we render and what the kernel lists compare equal.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gatewayd.policy.model import (
    ConnectionFollow,
    GatewayPlan,
    IPAddress,
    IPNetwork,
    NodePlan,
    SnatRule,
    SteerAction,
    SteerRule,
)

JsonObject = dict[str, Any]

FAMILY = "inet"
GATEWAY_TABLE = "gatewayd"
STEER_TABLE = "gatewayd-steer"

# Named counters of the gateway table, one per reason a forwarded packet is dropped.
DROP_INVALID = "drop_invalid"
DROP_TUNNEL_UNKNOWN = "drop_tunnel_unknown"
DROP_UPLINK_FORWARD = "drop_uplink_forward"
DROP_TUNNEL_NOT_UPLINK = "drop_tunnel_not_uplink"
DROP_EGRESS_IP_NOT_HELD = "drop_egress_ip_not_held"
DROP_NOT_TRANSLATED = "drop_not_translated"
DROP_EGRESS_IP_INBOUND = "drop_egress_ip_inbound"
DROP_TUNNEL_INPUT = "drop_tunnel_input"

# Set on every packet from or into the tunnel while the table is in place. The agent's routing
# guard (`dataplane/forward_guard.py`) blackholes tunnel traffic without it, so a flushed
# ruleset can never forward a pod's packet unfiltered and un-NATed, however fast the repair is.
GUARD_MARK = 0x20000000

COMMENT_MAX = 128  # nft refuses longer comments
FULL_MARK_MASK = 0xFFFFFFFF
PRIORITY_FILTER = 0
PRIORITY_MANGLE = -150
PRIORITY_DSTNAT = -100
PRIORITY_SRCNAT = 100
# Before the CNIs' own nat postrouting chains (srcnat): see render_steer_table.
PRIORITY_STEER_SRCNAT = PRIORITY_SRCNAT - 10


@dataclass(frozen=True)
class SetSpec:
    """A named set: element type (`ipv4_addr`/`ipv6_addr`), flags, canonical elements."""

    type: str
    flags: tuple[str, ...] = ()
    elements: frozenset[str] = frozenset()
    comment: str = ""

    def declaration(self) -> SetSpec:
        """The set without its elements: what must match for an element-only update."""
        return replace(self, elements=frozenset())


@dataclass(frozen=True)
class RenderedTable:
    """Everything one table holds. `body` = counters, chains and rules as nft JSON objects
    (`{"counter": ...}`, `{"chain": ...}`, `{"rule": ...}`) in the order they are added."""

    family: str
    name: str
    sets: Mapping[str, SetSpec]
    body: tuple[JsonObject, ...]
    # What each set of the SNAT rules was rendered from (source addresses, destination
    # networks): the next render of the table writes only what changed as text (100,000
    # addresses: 0.1 s; 1,000 destinations merged: 20 ms).
    rendered_from: Mapping[str, object] = field(default_factory=dict, compare=False,
                                                repr=False)

    def declarations(self) -> dict[str, SetSpec]:
        return {name: spec.declaration() for name, spec in self.sets.items()}


# --- gateway host -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayTableSettings:
    tunnel_interface: str  # e.g. "egress0"
    # Where SNATed traffic leaves; empty = any interface but the tunnel.
    uplink_interfaces: tuple[str, ...]
    tunnel_mtu: int = 1420  # TCP MSS is clamped to fit it
    # The only port on the host itself that tunnel peers may reach (UDP, the cloud nodes'
    # probes); None: none.
    probe_port: int | None = None
    # Egress IPs the agent provisions for SNAT alone (never an address of the host's own):
    # nothing from an uplink may open a connection to them.
    dedicated_egress_ips: frozenset[IPAddress] = frozenset()


def render_gateway_table(
    plan: GatewayPlan, settings: GatewayTableSettings, *, held: Collection[IPAddress],
    previous: RenderedTable | None = None,
) -> RenderedTable:
    """Table `inet gatewayd`: SNAT per rule and a forward filter that is never an open relay.

    Forward chain (policy drop), in order: invalid packets are dropped (they would skip NAT and
    leak a pod address); TCP SYNs into and out of the tunnel get their MSS clamped; tunnel
    traffic from a rule's sources to that rule's destinations, leaving through an uplink, is
    accepted and counted per rule (before the conntrack shortcut, so a rule's counter is its
    whole egress volume); replies pass as established/related; everything else is dropped and
    counted as `drop_tunnel_not_uplink` (from the tunnel to any other interface: a management
    LAN, docker0, back into the tunnel), `drop_tunnel_unknown` (from the tunnel) or
    `drop_uplink_forward` (from anywhere else).
    Postrouting chain: the SNAT of each rule; a new connection from the tunnel that leaves
    through an uplink and that no SNAT rule translated is dropped and counted as
    `drop_not_translated`: the forward chain and the SNAT rules look into the same sets, but
    not at the same instant, and no pod address may leave the gateway whatever the kernel
    sees in between.
    Standby rules are rendered like active ones: their SNAT is ready when sources arrive.
    A rule whose egress IP is not in `held` (the addresses the host holds now) gets no SNAT;
    its traffic is dropped and counted as `drop_egress_ip_not_held` instead of leaving with an
    address whose replies cannot come back, or with the pod's own.

    Input chain: from the tunnel, the host itself accepts replies, neighbour discovery and
    the probe port only; the rest is dropped and counted as `drop_tunnel_input` (tunnel
    peers never reach sshd). From an uplink, a packet to a dedicated egress IP that belongs
    to no connection of the host's (a reply to a SNATed connection is translated before it
    gets here) is dropped and counted as `drop_egress_ip_inbound`: the host's TCP stack would
    answer it with a reset, which kills a connection the gateway has just taken over before
    its NAT state arrived, and no service of the host is reached through those addresses.
    Prerouting chain (after destination NAT, so replies to SNATed connections have their pod
    address again): every packet from the tunnel or routed into it gets GUARD_MARK. Marking
    the way in matters too: with `src_valid_mark`, the reverse-path check of a reply to a pod
    looks up the route back into the tunnel with the mark, and the guard lets it pass.

    `previous`: the table rendered before, whose source sets are reused, only the addresses
    that changed written as text (the same result, in time proportional to the change).
    """
    _check_interface_name(settings.tunnel_interface, "GatewayTableSettings.tunnel_interface")
    if not 1280 <= settings.tunnel_mtu <= 65535:
        raise ValueError(
            f"GatewayTableSettings.tunnel_mtu: {settings.tunnel_mtu} is out of range; "
            "accepted: 1280..65535"
        )
    table = _TableBuilder(GATEWAY_TABLE, previous)
    tunnel = _match_meta("iifname", settings.tunnel_interface)
    table.counter(DROP_INVALID, "invalid conntrack state")
    table.counter(DROP_TUNNEL_UNKNOWN, "from the tunnel, no rule allows source and destination")
    table.counter(DROP_UPLINK_FORWARD, "forwarding not from the tunnel")
    table.counter(DROP_TUNNEL_NOT_UPLINK, "from the tunnel to an interface that is no uplink")
    table.counter(DROP_EGRESS_IP_NOT_HELD, "the rule's egress IP is not held by this host")
    table.counter(DROP_TUNNEL_INPUT, "from the tunnel to the host, not the probe port")
    table.counter(DROP_NOT_TRANSLATED, "from the tunnel to an uplink, no SNAT rule matched")
    table.counter(DROP_EGRESS_IP_INBOUND, "from an uplink to an egress IP, no connection")
    table.chain("prerouting", "filter", "prerouting", PRIORITY_DSTNAT + 10, "accept")
    table.chain("input", "filter", "input", PRIORITY_FILTER, "accept")
    table.chain("forward", "filter", "forward", PRIORITY_FILTER, "drop")
    table.chain("postrouting", "nat", "postrouting", PRIORITY_SRCNAT, "accept")

    forward_head: list[list[JsonObject]] = [
        [_ct_state("invalid"), {"counter": DROP_INVALID}, {"drop": None}]
    ]
    for version, overhead in ((4, 40), (6, 60)):
        mss = settings.tunnel_mtu - overhead
        for direction in ("iifname", "oifname"):
            forward_head.append([
                _match_meta(direction, settings.tunnel_interface),
                _match_meta("nfproto", f"ipv{version}"),
                _tcp_syn(),
                {"mangle": {"key": {"tcp option": {"name": "maxseg", "field": "size"}},
                            "value": mss}},
            ])
    for expr in forward_head:
        table.rule("forward", expr)

    meta_mark: JsonObject = {"meta": {"key": "mark"}}
    guard_mark = {"mangle": {"key": meta_mark, "value": {"|": [meta_mark, GUARD_MARK]}}}
    into_tunnel = {"match": {"op": "==", "left": {"fib": {"result": "oifname",
                                                          "flags": ["daddr"]}},
                             "right": settings.tunnel_interface}}
    table.rule("prerouting", [tunnel, guard_mark])
    table.rule("prerouting", [into_tunnel, guard_mark])
    table.rule("input", [tunnel, _ct_state("established", "related"), {"accept": None}])
    # Neighbour discovery, for a tunnel that needs it (WireGuard does not).
    icmpv6_type = {"payload": {"protocol": "icmpv6", "field": "type"}}
    table.rule("input", [tunnel, {"match": {
        "op": "==", "left": icmpv6_type,
        "right": {"set": ["nd-neighbor-solicit", "nd-neighbor-advert"]}}}, {"accept": None}])
    if settings.probe_port is not None:
        probe = {"payload": {"protocol": "udp", "field": "dport"}}
        table.rule("input", [
            tunnel, {"match": {"op": "==", "left": probe, "right": settings.probe_port}},
            {"accept": None},
        ])
    table.rule("input", [tunnel, {"counter": DROP_TUNNEL_INPUT}, {"drop": None}])

    uplinks = _uplink_match(settings)
    from_uplink = _uplink_match(settings, "iifname")
    for version in (4, 6):
        dedicated = sorted(a for a in settings.dedicated_egress_ips if a.version == version)
        if not dedicated:
            continue
        to_dedicated = {"match": {
            "op": "==", "left": {"payload": {"protocol": _ip(version), "field": "daddr"}},
            "right": {"set": [str(a) for a in dedicated]}}}
        table.rule("input", [from_uplink, to_dedicated, _ct_state("new", "invalid"),
                             {"counter": DROP_EGRESS_IP_INBOUND}, {"drop": None}])
    for index, rule in enumerate(sorted(plan.rules, key=_snat_rule_key)):
        version = _snat_rule_version(rule)
        name = f"rule{index}"
        comment = f"{rule.policy} ({rule.role.value}) via {rule.egress_ip}"
        src, dst = table.rule_sets(name, version, rule.sources, rule.destinations)
        table.counter(name, comment)
        if rule.egress_ip not in held:
            table.rule("forward", [
                tunnel, uplinks, src, dst, {"counter": DROP_EGRESS_IP_NOT_HELD}, {"drop": None},
            ], f"{comment}: egress IP not held")
            continue
        table.rule("forward", [tunnel, uplinks, src, dst, {"counter": name}, {"accept": None}],
                   comment)
        ip = _ip(version)
        table.rule(
            "postrouting",
            [uplinks, src, dst, {"snat": {"family": ip, "addr": str(rule.egress_ip)}}],
            comment,
        )

    table.rule("postrouting", [tunnel, uplinks, {"counter": DROP_NOT_TRANSLATED}, {"drop": None}])
    table.rule("forward", [_ct_state("established", "related"), {"accept": None}])
    table.rule("forward", [tunnel, _negated(uplinks), {"counter": DROP_TUNNEL_NOT_UPLINK},
                           {"drop": None}])
    table.rule("forward", [tunnel, {"counter": DROP_TUNNEL_UNKNOWN}, {"drop": None}])
    table.rule("forward", [{"counter": DROP_UPLINK_FORWARD}, {"drop": None}])
    return table.build()


def snat_counter_rules(plan: GatewayPlan) -> dict[str, SnatRule]:
    """The named counter of each SNAT rule (`rule0`, ...), as `render_gateway_table` names
    them: metrics read the counters without listing the sets."""
    return {f"rule{i}": rule for i, rule in enumerate(sorted(plan.rules, key=_snat_rule_key))}


def _snat_rule_key(rule: SnatRule) -> tuple[str, str, int, int, tuple[str, ...]]:
    return (
        rule.policy,
        rule.role.value,
        rule.egress_ip.version,
        int(rule.egress_ip),
        tuple(sorted(str(d) for d in rule.destinations)),
    )


def _snat_rule_version(rule: SnatRule) -> int:
    version = rule.egress_ip.version
    # type() through map(): this runs over every source, up to 100,000 of them.
    families = set(map(type, rule.sources)) | {type(d.network_address) for d in rule.destinations}
    if families - {type(rule.egress_ip)}:
        mixed = [str(a) for a in (*rule.sources, *rule.destinations) if a.version != version]
        raise ValueError(
            f"SNAT rule of policy {rule.policy!r}: egress IP {rule.egress_ip} is IPv{version} "
            f"but {', '.join(sorted(mixed)[:3])} is not; a rule holds one address family"
        )
    return version


def _uplink_match(settings: GatewayTableSettings, direction: str = "oifname") -> JsonObject:
    """Packets leaving through an uplink (`direction` "iifname": arriving from one)."""
    uplinks = sorted(set(settings.uplink_interfaces))
    for uplink in uplinks:
        _check_interface_name(uplink, "GatewayTableSettings.uplink_interfaces")
    if not uplinks:
        return _match_meta(direction, settings.tunnel_interface, op="!=")
    if len(uplinks) == 1:
        return _match_meta(direction, uplinks[0])
    return _match_meta(direction, {"set": uplinks})


def _negated(match: JsonObject) -> JsonObject:
    inner = match["match"]
    return {"match": {**inner, "op": "==" if inner["op"] == "!=" else "!="}}


# --- cloud node -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SteerTableSettings:
    gateway_marks: Mapping[str, int]  # gateway name -> fwmark (its routing table follows it)
    tunnel_interfaces: Mapping[str, str]  # gateway name -> its WireGuard interface here
    # Bits of the packet and conntrack marks that steering owns; the rest is left alone so
    # the CNI's and kube-proxy's mark bits survive. Marks must lie inside it.
    mark_mask: int = FULL_MARK_MASK


def render_steer_table(
    plan: NodePlan,
    settings: SteerTableSettings,
    active: Mapping[str, str] | None = None,
    follows: Collection[ConnectionFollow] = (),
) -> RenderedTable:
    """Table `inet gatewayd-steer`: mark selected pod traffic for its gateway's tunnel.

    prerouting (filter, priority mangle, before the routing decision), in order:
      1. destinations in `cluster_internal` return: never steered;
      2. reply-direction packets return: replies to pods must route normally, not into a tunnel;
      3. an answered connection of a policy in `follows` (gateway, policy, gateway) whose
         conntrack mark names the first gateway gets the second one's, in its conntrack entry
         and on the packet, and is accepted: it follows its policy there with its next packet
         (the gateways share connection state), in the same transaction as the failover;
      4. an answered connection whose conntrack mark names a gateway gets that packet mark
         again and is accepted, so established connections stay on their gateway whatever
         the plan says later, unless step 3 moved them.
         A connection that has seen no reply yet (a handshake under way, a SYN retried, a
         one-way UDP flow) is NEW to conntrack and goes on to step 5 with every packet: it
         always takes the gateway the rules name now, never one the policy has left;
      5. TUNNEL rules match NEW connections only and set both the packet mark (routing) and the
         conntrack mark (step 4 for the rest of the connection). `active` (policy -> gateway)
         overrides a rule's gateway for fast failover; it therefore moves new connections only.
         Connections that were already open unsteered when a policy appeared stay unsteered;
      6. DROP rules drop and count every original-direction packet (step 4 already let
         connections with a live gateway through).

    postrouting (nat, priority srcnat - 10): traffic marked for a gateway and leaving through
    that gateway's tunnel gets an SNAT to its own source address. The kernel's NAT core stops
    consulting later nat chains once a connection has a binding, so the CNI's masquerade rules
    (priority srcnat, other tables) never see it and the pod IP reaches the gateway unchanged.
    """
    marks = _checked_marks(settings)
    mask = settings.mark_mask
    table = _TableBuilder(STEER_TABLE)
    table.chain("prerouting", "filter", "prerouting", PRIORITY_MANGLE, "accept")
    table.chain("postrouting", "nat", "postrouting", PRIORITY_STEER_SRCNAT, "accept")

    for version in (4, 6):
        name = f"cluster{version}"
        table.sets[name] = SetSpec(
            type=_addr_type(version),
            flags=("interval",),
            elements=_network_elements(n for n in plan.cluster_internal if n.version == version),
        )
        table.rule("prerouting", [_match_addr(version, "daddr", f"@{name}"), {"return": None}])
    table.rule("prerouting", [
        {"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "reply"}},
        {"return": None},
    ])
    meta_mark: JsonObject = {"meta": {"key": "mark"}}
    ct_mark: JsonObject = {"ct": {"key": "mark"}}
    answered = {"match": {"op": "in", "left": {"ct": {"key": "status"}},
                          "right": "seen-reply"}}

    entries = [
        (rule, version)
        for rule in plan.rules
        for version in sorted({d.version for d in rule.destinations})
    ]
    entries.sort(key=lambda entry: _steer_entry_key(*entry))
    steps: list[tuple[SteerRule, str, JsonObject, JsonObject]] = []
    for index, (rule, version) in enumerate(entries):
        name = f"rule{index}"
        sources = frozenset(s for s in rule.sources if s.version == version)
        destinations = tuple(d for d in rule.destinations if d.version == version)
        src, dst = table.rule_sets(name, version, sources, destinations)
        steps.append((rule, name, src, dst))

    # by policy, grouped once: a failover renders this for every rule of the node
    follows_of: dict[str, list[ConnectionFollow]] = {}
    for follow in sorted(follows):
        if follow.gone in marks and follow.to in marks:
            follows_of.setdefault(follow.policy, []).append(follow)
    for rule, _, src, dst in steps:
        if rule.action is not SteerAction.TUNNEL:
            continue
        for gone, policy, to in follows_of.get(rule.policy, ()):
            table.rule("prerouting", [
                _match_mark(ct_mark, marks[gone], mask), answered, src, dst,
                _set_mark(ct_mark, marks[to], mask), _set_mark(meta_mark, marks[to], mask),
                {"accept": None},
            ], f"{policy}: established via {gone} follow to {to}")
    for gateway, mark in sorted(marks.items()):
        table.rule(
            "prerouting",
            [_match_mark(ct_mark, mark, mask), answered, _set_mark(meta_mark, mark, mask),
             {"accept": None}],
            f"established via {gateway}",
        )

    for rule, name, src, dst in steps:
        if rule.action is SteerAction.TUNNEL:
            target = (active or {}).get(rule.policy) or rule.gateway
            if target is None or target not in marks:
                raise ValueError(
                    f"steer rule of policy {rule.policy!r}: gateway {target!r} has no mark in "
                    f"SteerTableSettings.gateway_marks; known: {', '.join(sorted(marks)) or '-'}"
                )
            comment = f"{rule.policy} -> {target}"
            table.counter(name, comment)
            table.rule("prerouting", [
                _ct_state("new"), src, dst, {"counter": name},
                _set_mark(meta_mark, marks[target], mask),
                _set_mark(ct_mark, marks[target], mask),
                {"accept": None},
            ], comment)
        else:
            reason = rule.reason.value if rule.reason else "no gateway"
            comment = f"{rule.policy} drop ({reason})"
            table.counter(name, comment)
            table.rule("prerouting", [src, dst, {"counter": name}, {"drop": None}], comment)

    for gateway, mark in sorted(marks.items()):
        interface = settings.tunnel_interfaces[gateway]
        for version in (4, 6):
            ip = _ip(version)
            source = {"payload": {"protocol": ip, "field": "saddr"}}
            table.rule("postrouting", [
                _match_meta("nfproto", f"ipv{version}"),
                _match_mark(meta_mark, mark, mask),
                _match_meta("oifname", interface),
                {"snat": {"family": ip, "addr": source}},
            ], f"keep pod source via {gateway}")
    return table.build()


def _checked_marks(settings: SteerTableSettings) -> dict[str, int]:
    mask = settings.mark_mask
    if not 0 < mask <= FULL_MARK_MASK:
        raise ValueError(f"SteerTableSettings.mark_mask: {mask:#x} is not a 32-bit mask")
    if set(settings.gateway_marks) != set(settings.tunnel_interfaces):
        raise ValueError(
            "SteerTableSettings: gateway_marks and tunnel_interfaces must name the same "
            f"gateways; got {sorted(settings.gateway_marks)} and "
            f"{sorted(settings.tunnel_interfaces)}"
        )
    seen: dict[int, str] = {}
    for gateway, mark in sorted(settings.gateway_marks.items()):
        if mark == 0 or mark & ~mask & FULL_MARK_MASK or mark > FULL_MARK_MASK:
            raise ValueError(
                f"SteerTableSettings.gateway_marks[{gateway!r}]: {mark:#x} must be non-zero "
                f"and inside mark_mask {mask:#x}"
            )
        if mark in seen:
            raise ValueError(
                f"SteerTableSettings.gateway_marks: {gateway!r} and {seen[mark]!r} share "
                f"mark {mark:#x}; each gateway needs its own"
            )
        seen[mark] = gateway
        field = f"SteerTableSettings.tunnel_interfaces[{gateway!r}]"
        _check_interface_name(settings.tunnel_interfaces[gateway], field)
    return dict(settings.gateway_marks)


def _steer_entry_key(rule: SteerRule, version: int) -> tuple[str, int, str, tuple[str, ...]]:
    destinations = tuple(sorted(str(d) for d in rule.destinations if d.version == version))
    return (rule.policy, version, rule.action.value, destinations)


def _match_mark(key: JsonObject, mark: int, mask: int) -> JsonObject:
    left = key if mask == FULL_MARK_MASK else {"&": [key, mask]}
    return {"match": {"op": "==", "left": left, "right": mark}}


def _set_mark(key: JsonObject, mark: int, mask: int) -> JsonObject:
    value: Any = mark
    if mask != FULL_MARK_MASK:
        value = {"|": [{"&": [key, FULL_MARK_MASK & ~mask]}, mark]}
    return {"mangle": {"key": key, "value": value}}


# --- building blocks --------------------------------------------------------------------------


class _TableBuilder:
    def __init__(self, name: str, previous: RenderedTable | None = None) -> None:
        self.name = name
        self.previous = previous
        self.rendered_from: dict[str, object] = {}
        self.sets: dict[str, SetSpec] = {}
        self._counters: list[JsonObject] = []
        self._chains: list[JsonObject] = []
        self._rules: list[JsonObject] = []

    def _ref(self) -> JsonObject:
        return {"family": FAMILY, "table": self.name}

    def counter(self, name: str, comment: str) -> None:
        self._counters.append(
            {"counter": {**self._ref(), "name": name, "comment": _comment(comment)}}
        )

    def chain(self, name: str, type_: str, hook: str, priority: int, policy: str) -> None:
        self._chains.append({"chain": {
            **self._ref(), "name": name, "type": type_, "hook": hook, "prio": priority,
            "policy": policy,
        }})

    def rule(self, chain: str, expr: list[JsonObject], comment: str = "") -> None:
        rule: JsonObject = {**self._ref(), "chain": chain, "expr": expr}
        if comment:
            rule["comment"] = _comment(comment)
        self._rules.append({"rule": rule})

    def rule_sets(
        self,
        name: str,
        version: int,
        sources: Iterable[IPAddress],
        destinations: Iterable[IPNetwork],
    ) -> tuple[JsonObject, JsonObject]:
        """Declare `<name>_src` (hash) and `<name>_dst` (interval); return the two matches.
        The sets carry no comment (nft 1.0.6 drops set comments given in JSON): counter
        `<name>` and the rules using them name the policy."""
        sources = frozenset(sources)
        self.sets[f"{name}_src"] = SetSpec(
            type=_addr_type(version), elements=self._as_text(f"{name}_src", sources)
        )
        self.rendered_from[f"{name}_src"] = sources
        destinations = tuple(destinations)
        before = self._previous(f"{name}_dst")
        self.sets[f"{name}_dst"] = SetSpec(
            type=_addr_type(version), flags=("interval",),
            elements=before[0] if before is not None and before[1] == destinations
            else _network_elements(destinations),
        )
        self.rendered_from[f"{name}_dst"] = destinations
        return (
            _match_addr(version, "saddr", f"@{name}_src"),
            _match_addr(version, "daddr", f"@{name}_dst"),
        )

    def _previous(self, name: str) -> tuple[frozenset[str], object] | None:
        """The previous render's elements of set `name`, and what they were rendered from."""
        previous = self.previous
        if previous is None or name not in previous.sets:
            return None
        return previous.sets[name].elements, previous.rendered_from.get(name)

    def _as_text(self, name: str, sources: frozenset[IPAddress]) -> frozenset[str]:
        """The set's elements: the previous render's, with what changed since written anew."""
        before = self._previous(name)
        base = before[1] if before is not None else None
        if before is None or not isinstance(base, frozenset):
            return frozenset(map(str, sources))
        gone, new = base - sources, sources - base
        if len(gone) + len(new) > len(sources) // 2:
            return frozenset(map(str, sources))
        return (before[0] - frozenset(map(str, gone))) | frozenset(map(str, new))

    def build(self) -> RenderedTable:
        return RenderedTable(
            family=FAMILY,
            name=self.name,
            sets=dict(sorted(self.sets.items())),
            body=(*self._counters, *self._chains, *self._rules),
            rendered_from=self.rendered_from,
        )


def _ip(version: int) -> str:
    return "ip" if version == 4 else "ip6"


def _addr_type(version: int) -> str:
    return "ipv4_addr" if version == 4 else "ipv6_addr"


def _match_addr(version: int, field: str, right: str) -> JsonObject:
    left = {"payload": {"protocol": _ip(version), "field": field}}
    return {"match": {"op": "==", "left": left, "right": right}}


def _match_meta(key: str, right: Any, op: str = "==") -> JsonObject:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": right}}


def _ct_state(*states: str) -> JsonObject:
    right: Any = states[0] if len(states) == 1 else list(states)
    return {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": right}}


def _tcp_syn() -> JsonObject:
    flags = {"payload": {"protocol": "tcp", "field": "flags"}}
    return {"match": {"op": "==", "left": {"&": [flags, ["syn", "rst"]]}, "right": "syn"}}


def _comment(text: str) -> str:
    if len(text.encode()) <= COMMENT_MAX:
        return text
    return text.encode()[: COMMENT_MAX - 3].decode(errors="ignore") + "..."


def _check_interface_name(name: str, field: str) -> None:
    if not 0 < len(name) <= 15 or "/" in name or any(c.isspace() for c in name):
        raise ValueError(
            f"{field}: {name!r} is not a Linux interface name; accepted: 1-15 characters, "
            "no '/' or whitespace"
        )


# --- set elements -----------------------------------------------------------------------------


def _network_elements(networks: Iterable[IPNetwork]) -> frozenset[str]:
    """Canonical interval elements. Overlapping or adjacent networks are merged first: an
    interval set refuses overlaps, and the merged form is what a lookup sees anyway."""
    nets = list(networks)
    merged: list[IPNetwork] = [
        *ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv4Network)),
        *ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv6Network)),
    ]
    return frozenset(network_element(n) for n in merged)


def network_element(network: IPNetwork) -> str:
    """How an interval set lists a network: a single address without its prefix length."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def element_to_json(element: str) -> Any:
    if "/" in element:
        addr, length = element.split("/")
        return {"prefix": {"addr": addr, "len": int(length)}}
    if "-" in element:
        first, last = element.split("-")
        return {"range": [first, last]}
    return element


def element_from_json(value: Any) -> str:
    """The canonical string of one element as `nft -j list` shows it."""
    if isinstance(value, dict) and "elem" in value:  # element with its own counter/timeout
        return element_from_json(value["elem"]["val"])
    if isinstance(value, dict) and "prefix" in value:
        prefix = value["prefix"]
        return network_element(ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}"))
    if isinstance(value, dict) and "range" in value:
        first, last = (ipaddress.ip_address(a) for a in value["range"])
        return f"{first}-{last}"
    if isinstance(value, str):
        return str(ipaddress.ip_address(value))
    raise ValueError(f"unexpected nftables set element {value!r}")


# --- transactions -----------------------------------------------------------------------------


def replace_commands(table: RenderedTable) -> JsonObject:
    """One transaction that swaps the whole table. `add` first so `delete` cannot fail on a
    missing table; delete and re-create in the same batch so conntrack's NAT bindings, which
    live outside the table, keep established connections translated.

    Only for a table that is not there yet or whose chains change: an interval set created in
    a transaction misses lookups for a moment after its commit (measured on Linux 6.18: about
    one new connection in two table swaps at 80,000 new connections a second), and a missed
    lookup lets a connection leave unsteered. `update_commands` keeps the sets."""
    ref = {"family": table.family, "name": table.name}
    commands: list[JsonObject] = [
        {"add": {"table": ref}},
        {"delete": {"table": ref}},
        {"add": {"table": ref}},
    ]
    commands.extend(_set_commands(table, table.sets))
    commands.extend({"add": obj} for obj in table.body)
    return {"nftables": commands}


@dataclass(frozen=True)
class TableUpdate:
    """Two transactions that change a table in place (`update_commands`)."""

    prepare: tuple[JsonObject, ...]  # sets and counters no rule uses yet; may be empty
    swap: tuple[JsonObject, ...]
    unprepare: tuple[JsonObject, ...]  # removes what `prepare` made, if `swap` is refused


def update_commands(
    table: RenderedTable, current_sets: Mapping[str, SetSpec],
    current_body: Iterable[JsonObject],
) -> TableUpdate | None:
    """Change the table from `current_sets` and `current_body` (counters, chains and rules as
    nft lists them, without handles and values) to `table` without re-creating a set that
    stays: new sets and counters are made first, in a transaction of their own, so that they
    are complete before a rule looks into them; then one transaction flushes the chains,
    replaces what changed and adds the rules. None when a chain differs (`replace_commands`).
    """
    def named(body: Iterable[JsonObject], kind: str) -> dict[str, JsonObject]:
        return {obj[kind]["name"]: obj[kind] for obj in body if kind in obj}

    current = list(current_body)
    chains = named(table.body, "chain")
    if named(current, "chain") != chains:
        return None
    counters, have_counters = named(table.body, "counter"), named(current, "counter")
    new_sets = {n: s for n, s in table.sets.items() if n not in current_sets}
    new_counters = [c for n, c in counters.items() if n not in have_counters]
    prepare = [*_set_commands(table, new_sets), *({"add": {"counter": c}} for c in new_counters)]
    ref = {"family": table.family, "table": table.name}
    unprepare = [*({"delete": {"set": {**ref, "name": n}}} for n in new_sets),
                 *({"delete": {"counter": {**ref, "name": c["name"]}}} for c in new_counters)]

    swap: list[JsonObject] = [{"flush": {"chain": {**ref, "name": n}}} for n in chains]
    redeclared = {
        n: s for n, s in table.sets.items()
        if n in current_sets and current_sets[n].declaration() != s.declaration()
    }
    swap += [{"delete": {"set": {**ref, "name": n}}}
             for n in current_sets if n not in table.sets or n in redeclared]
    changed = [n for n, c in counters.items() if n in have_counters and have_counters[n] != c]
    swap += [{"delete": {"counter": {**ref, "name": n}}}
             for n in have_counters if n not in counters or n in changed]
    swap += [{"add": {"counter": counters[n]}} for n in changed]
    swap += _set_commands(table, redeclared)
    kept = [n for n in table.sets if n in current_sets and n not in redeclared]
    swap += element_commands(table, *element_delta(
        {n: current_sets[n] for n in kept}, {n: table.sets[n] for n in kept}))
    swap += [{"add": obj} for obj in table.body if "rule" in obj]
    return TableUpdate(tuple(prepare), tuple(swap), tuple(unprepare))


def element_delta(
    current: Mapping[str, SetSpec], desired: Mapping[str, SetSpec]
) -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    """(removed, added) elements per set. One symmetric difference per changed set: with
    100,000 sources and one change this is most of the fast path's time."""
    removed: dict[str, frozenset[str]] = {}
    added: dict[str, frozenset[str]] = {}
    for name, spec in desired.items():
        old = current[name].elements if name in current else frozenset()
        if old == spec.elements:
            continue
        changed = old ^ spec.elements
        if gone := changed & old:
            removed[name] = gone
        if new := changed - gone:
            added[name] = new
    return removed, added


def _set_commands(table: RenderedTable, sets: Mapping[str, SetSpec]) -> list[JsonObject]:
    """Declare `sets` of `table` and add their elements."""
    commands: list[JsonObject] = []
    for name, spec in sets.items():
        declaration: JsonObject = {
            "family": table.family, "table": table.name, "name": name, "type": spec.type,
        }
        if spec.flags:
            declaration["flags"] = list(spec.flags)
        if spec.comment:
            declaration["comment"] = spec.comment
        commands.append({"add": {"set": declaration}})
    commands.extend(element_commands(table, {}, {n: s.elements for n, s in sets.items()}))
    return commands


def element_commands(
    table: RenderedTable,
    removed: Mapping[str, frozenset[str]],
    added: Mapping[str, frozenset[str]],
) -> list[JsonObject]:
    """Element deletions, then additions, set by set (in one batch with the rest)."""
    commands: list[JsonObject] = []
    for verb, changes in (("delete", removed), ("add", added)):
        for name in sorted(changes):
            if changes[name]:
                elements = [element_to_json(e) for e in sorted(changes[name])]
                commands.append({verb: {"element": {
                    "family": table.family, "table": table.name, "name": name, "elem": elements,
                }}})
    return commands

