"""The fast failover path (Kubernetes mode): probes through the tunnels, and what they decide.

Every cloud node (steer) sends a small UDP probe through each gateway's tunnel every
`interval` (~0.1 s): from its tunnel address to the gateway's `GATEWAY_TUNNEL_ADDRESS`, port
`PROBE_PORT`, with that gateway's fwmark so the gateway's routing table carries it into the
gateway's tunnel. The agent's responder process answers from the same address
(`gatewayd.agent.responder`). The request tells the gateway which policies this node sends to
it now (`here`) and which it sends to other gateways (`away`); the reply says which of them
the gateway can serve now (`serving`: its SNAT rule is in place and its egress IP, when the
gateway provisions it, is held), and whether it is leaving (`leaving`: its agent is stopping).

A move of a policy from one gateway to another makes before it breaks: a node keeps the
policy's new connections on the gateway it leaves while that one answers and the gateway it
goes to does not serve the policy yet (`Handover`), and tells both where the policy goes now,
so that the one gives the egress IP up and the other claims it.

Everything here is pure: the wire format, the per-gateway probe history, the steer side's
failover decision (`decide_failovers`) and the gateway side's egress IP decision
(`egress_ips_to_hold`). The sockets are in `gatewayd.dataplane.probe`; the daemons wire them.
See README.md, "Egress IP failover and split brain", for the rules and their failure modes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from typing import Any

from gatewayd.policy.model import (
    ConnectionFollow,
    IPAddress,
    Role,
    SnatRule,
    SteerAction,
    SteerRule,
)
from gatewayd.policy.safeload import Limits, parse_json

PROBE_PORT = 51871
# Every gateway's own address on its tunnel interface: each node reaches it through its own
# per-gateway interface, so all gateways can share it (the controller's tunnel CIDR's first host).
GATEWAY_TUNNEL_ADDRESS = IPv4Address("100.127.0.1")
PROTOCOL_VERSION = 1
MAX_DATAGRAM = 65000
# A probe is a flat object with a few lists of policy names; anything deeper is not one (and
# a datagram of nested brackets must not cost a recursion error per packet).
PROBE_LIMITS = Limits(max_bytes=MAX_DATAGRAM, max_depth=4, max_values=20_000)
# The agent and its responder process (a socket pair) pass larger messages: the policies a
# gateway serves may not fit a datagram.
LOCAL_LIMITS = Limits(max_bytes=2**17, max_depth=4, max_values=100_000)


class ProbeFormatError(ValueError):
    pass


# --- the wire format ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRequest:
    node: str
    sequence: int
    here: frozenset[str] = frozenset()  # policies this node sends (some of) to the gateway now
    away: frozenset[str] = frozenset()  # its other policies: sent to other gateways only


@dataclass(frozen=True)
class ProbeReply:
    gateway: str
    sequence: int
    serving: frozenset[str] = frozenset()  # of the request's policies, those served now
    leaving: bool = False  # the gateway is stopping: move what can move, it serves until then


def encode_request(request: ProbeRequest) -> bytes:
    return _encode({
        "v": PROTOCOL_VERSION, "node": request.node, "seq": request.sequence,
        "here": sorted(request.here), "away": sorted(request.away),
    })


def encode_reply(reply: ProbeReply) -> bytes:
    message: dict[str, Any] = {
        "v": PROTOCOL_VERSION, "gateway": reply.gateway, "seq": reply.sequence,
        "serving": sorted(reply.serving),
    }
    if reply.leaving:  # only then: nodes of an earlier version read the rest as before
        message["leaving"] = True
    return _encode(message)


def decode_request(data: bytes) -> ProbeRequest:
    message = _decode(data)
    return ProbeRequest(
        node=_field(message, "node", str),
        sequence=_field(message, "seq", int),
        here=_names(message, "here"),
        away=_names(message, "away"),
    )


def decode_reply(data: bytes) -> ProbeReply:
    message = _decode(data)
    return ProbeReply(
        gateway=_field(message, "gateway", str),
        sequence=_field(message, "seq", int),
        serving=_names(message, "serving"),
        leaving=_field(message, "leaving", bool) if "leaving" in message else False,
    )


def _encode(message: Mapping[str, Any], limits: Limits = PROBE_LIMITS) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > limits.max_bytes:
        raise ProbeFormatError(f"probe message of {len(data)} bytes is over the "
                               f"{limits.max_bytes} bytes it may have")
    return data


def _decode(data: bytes, limits: Limits = PROBE_LIMITS) -> dict[str, Any]:
    try:
        message = parse_json(data.decode(), "probe", limits)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProbeFormatError(f"not a probe message: {exc}") from exc
    if not isinstance(message, dict) or message.get("v") != PROTOCOL_VERSION:
        raise ProbeFormatError(f"not a version {PROTOCOL_VERSION} probe message")
    return message


def _field(message: Mapping[str, Any], key: str, kind: type) -> Any:
    value = message.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProbeFormatError(f"probe message: {key} must be a {kind.__name__}")
    return value


def _names(message: Mapping[str, Any], key: str) -> frozenset[str]:
    value = message.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProbeFormatError(f"probe message: {key} must be a list of policy names")
    return frozenset(value)


# --- steer: gateway health from probe outcomes ---------------------------------------------------


def answers_probe(reply: ProbeReply, gateway: str, sequence: int, window: int) -> bool:
    """Whether `reply` counts as `gateway`'s answer to probe `sequence`: an answer to it or to
    one of the `window - 1` probes before it. An answer that comes late still shows that the
    gateway and its tunnel work (a busy host delayed it): only silence is a miss."""
    return reply.gateway == gateway and sequence - window < reply.sequence <= sequence


@dataclass
class ProbeHistory:
    """One gateway's probe outcomes as seen by one node, with hysteresis: `down` after
    `misses` unanswered probes in a row, `up` again only after `recoveries` answered in a row.
    Unknown (None) until the first verdict; a gateway never answered yet (a tunnel still
    handshaking after a start) counts as down only after `first_misses`, so a node that just
    started fails nothing over while its tunnels come up."""

    misses: int
    recoveries: int
    first_misses: int
    up: bool | None = None
    missed: int = 0  # consecutive unanswered probes
    answered: int = 0  # consecutive answered probes
    serving: frozenset[str] = frozenset()  # from the last reply
    leaving: bool = False  # from the last reply

    @property
    def available(self) -> bool | None:
        """Whether new connections may go to the gateway: up and not leaving (its failovers
        start as for a gateway that is down, while it still serves)."""
        return False if self.up and self.leaving else self.up

    def hear(self, reply: ProbeReply) -> bool:
        """Take what an answer says (what is served, whether it leaves); True when that
        changed."""
        said = self.serving, self.leaving
        self.serving, self.leaving = reply.serving, reply.leaving
        return (self.serving, self.leaving) != said

    def record(self, reply: ProbeReply | None) -> bool:
        """Count one probe's outcome (None: unanswered); True when `up` changed."""
        before = self.up
        if reply is None:
            self.missed += 1
            self.answered = 0
            if self.missed >= (self.misses if self.up is not None else self.first_misses):
                self.up = False
        else:
            self.answered += 1
            self.missed = 0
            self.hear(reply)
            if self.up is None or self.answered >= self.recoveries:
                self.up = True
        return self.up != before


@dataclass(frozen=True)
class Failover:
    """New connections of `policy` that the plan sends to `gateway` go to `standby` instead,
    since `since` (seconds, the caller's clock)."""

    policy: str
    gateway: str
    standby: str
    since: float
    at: str = field(default="", compare=False)  # wall-clock time for status, RFC 3339


FailoverKey = tuple[str, str]  # (policy, the plan's gateway)


def decide_failovers(
    rules: Iterable[SteerRule],
    up: Mapping[str, bool | None],
    serving: Mapping[str, frozenset[str]],
    previous: Mapping[FailoverKey, Failover],
    now: float,
    claim_grace: float,
    at: str = "",
) -> dict[FailoverKey, Failover]:
    """The failovers in force after this decision, from the plan's tunnel rules, each gateway's
    health (`up`: True, False, or None when unknown; a leaving gateway counts as down, see
    `ProbeHistory.available`) and what each serves.

    - A rule's traffic moves to its standby when its gateway is down and the standby is up.
    - It stays there while the standby works: no flip back when the gateway recovers. The
      controller decides the steady state; a plan that names another gateway or standby for
      the rule ends the failover (the rule then follows the new plan).
    - It goes back to the gateway only if the standby stops working while the gateway is up
      again: the standby is down, or it does not serve the policy `claim_grace` seconds after
      the failover (another gateway still holds the egress IP), or at once when the gateway
      serves the policy and the standby does not (the gateway still holds the egress IP: a
      failover of one node whose path to it stalled for a moment, which the others did not
      make, ends as soon as the path is back).
    """
    decided: dict[FailoverKey, Failover] = {}
    for rule in rules:
        if rule.action is not SteerAction.TUNNEL or rule.gateway is None:
            continue
        key = (rule.policy, rule.gateway)
        standby = rule.standby
        if key in decided or standby is None or standby == rule.gateway:
            continue
        current = previous.get(key)
        if current is not None and current.standby != standby:
            current = None  # the plan changed the standby: follow the new plan
        gateway_up, standby_up = up.get(rule.gateway), up.get(standby)
        if current is None:
            if gateway_up is False and standby_up is True:
                decided[key] = Failover(rule.policy, rule.gateway, standby, now, at)
            continue
        gateway_serves = gateway_up is True and rule.policy in serving.get(rule.gateway, ())
        standby_works = standby_up is not False and (
            rule.policy in serving.get(standby, ())
            or (now - current.since < claim_grace and not gateway_serves)
        )
        if standby_works or gateway_up is not True:
            decided[key] = current
    return decided


@dataclass(frozen=True)
class Handover:
    """New connections of `policy` go to `gateway` now (by the plan, or a failover), but
    still to `previous` while that one answers probes and `gateway` does not serve the policy
    yet, for at most the claim grace after `since` (seconds, the caller's clock)."""

    policy: str
    gateway: str
    previous: str
    since: float


@dataclass(frozen=True)
class Steering:
    """Where a node sends its tunnelled policies' new connections, beyond its plan."""

    failovers: Mapping[FailoverKey, Failover] = field(default_factory=dict)
    handovers: Mapping[str, Handover] = field(default_factory=dict)  # by policy
    # Established connections that leave a gateway for the one their policy uses now.
    follows: frozenset[ConnectionFollow] = frozenset()


def policy_gateways(rules: Iterable[SteerRule]) -> dict[str, str]:
    """Each tunnelled policy's gateway, for policies whose rules all go to one."""
    gateways: dict[str, set[str]] = {}
    for rule in rules:
        if rule.action is SteerAction.TUNNEL and rule.gateway is not None:
            gateways.setdefault(rule.policy, set()).add(rule.gateway)
    return {policy: next(iter(g)) for policy, g in gateways.items() if len(g) == 1}


def decide_handovers(
    moved_to: Mapping[str, str],
    sent_to: Mapping[str, str],
    up: Mapping[str, bool | None],
    serving: Mapping[str, frozenset[str]],
    previous: Mapping[str, Handover],
    now: float,
    claim_grace: float,
) -> dict[str, Handover]:
    """The handovers in force after this decision.

    `moved_to` is each policy's gateway by the plan and the failovers, `sent_to` where the
    node sent its new connections until now (handovers included). A policy whose gateway
    changed keeps going to the one it leaves when that one serves it, until the new one
    serves it, the old one stops answering, or the claim grace is over. Without this, a move
    between two working gateways breaks before it makes: the new one cannot hold the egress
    IP before the old one, which serves until every node has moved, lets it go.
    """
    decided: dict[str, Handover] = {}
    for policy, gateway in moved_to.items():
        current = previous.get(policy)
        if current is None or current.gateway != gateway:
            before = sent_to.get(policy)
            if before is None or before == gateway or policy not in serving.get(before, ()):
                continue
            current = Handover(policy, gateway, before, now)
        if (up.get(current.previous) is True
                and policy not in serving.get(gateway, ())
                and now - current.since < claim_grace):
            decided[policy] = current
    return decided


def effective_rules(rules: Iterable[SteerRule], steering: Steering) -> tuple[SteerRule, ...]:
    """The rules as steered now: a failed-over rule sends to its standby, a handed-over one
    to the gateway its policy leaves."""
    result = []
    for rule in rules:
        if rule.action is SteerAction.TUNNEL and rule.gateway is not None:
            moved = steering.failovers.get((rule.policy, rule.gateway))
            gateway = moved.standby if moved is not None else rule.gateway
            handover = steering.handovers.get(rule.policy)
            if handover is not None and handover.gateway == gateway:
                gateway = handover.previous
            if gateway != rule.gateway:
                rule = SteerRule(
                    policy=rule.policy, action=rule.action, sources=rule.sources,
                    destinations=rule.destinations, gateway=gateway, standby=None,
                )
        result.append(rule)
    return tuple(result)


def connection_follows(
    rules: Iterable[SteerRule],
    up: Mapping[str, bool | None],
    serving: Mapping[str, frozenset[str]],
    gateways: frozenset[str],
) -> frozenset[ConnectionFollow]:
    """Where a policy's established connections must go now.

    `rules` are the rules as steered now (failovers and handovers applied). A policy's
    connections on one of `gateways` other than the one its new connections go to follow
    them there when that gateway is down, or up but no longer serving the policy (it gave
    the egress IP up), and the gateway they follow to is up. Otherwise they stay: a gateway
    that still serves the policy (a move between two healthy gateways whose egress IPs are
    their own) carries them to the end.
    """
    follows = set()
    for rule in rules:
        target = rule.gateway
        if rule.action is not SteerAction.TUNNEL or target is None or up.get(target) is not True:
            continue
        for gateway in gateways - {target}:
            state = up.get(gateway)
            if state is False or (state is True and rule.policy not in serving.get(gateway, ())):
                follows.add(ConnectionFollow(gateway, rule.policy, target))
    return frozenset(follows)


def probe_requests(
    node: str, gateways: Iterable[str], rules: Iterable[SteerRule],
    failovers: Mapping[FailoverKey, Failover], sequence: int,
) -> dict[str, ProbeRequest]:
    """The request for each gateway: the policies this node sends to it now (`here`), and all
    its other tunnelled policies (`away`), so that no gateway holds a policy's egress IP on
    the strength of an old plan while nodes send that policy elsewhere."""
    targets: dict[str, set[str]] = {}
    for rule in rules:
        if rule.action is not SteerAction.TUNNEL or rule.gateway is None:
            continue
        moved = failovers.get((rule.policy, rule.gateway))
        targets.setdefault(rule.policy, set()).add(moved.standby if moved else rule.gateway)
    requests = {}
    for gateway in gateways:
        here = frozenset(p for p, sent_to in targets.items() if gateway in sent_to)
        requests[gateway] = ProbeRequest(node, sequence, here, frozenset(targets) - here)
    return requests


# --- the gateway: which provisioned egress IPs to hold ------------------------------------------


@dataclass(frozen=True)
class Demand:
    """What one node's latest probe said, and when it arrived (CLOCK_MONOTONIC, which the
    agent and its responder process share)."""

    node: str
    received_at: float
    here: frozenset[str]
    away: frozenset[str]


@dataclass(frozen=True)
class ResponderState:
    """What the gateway's probe responder answers: the agent's word to its responder process."""

    served: frozenset[str] = frozenset()  # policies whose rules are here, egress IPs held
    leaving: bool = False  # handing over: the nodes move what has a standby


@dataclass(frozen=True)
class Fenced:
    """The responder process's word to the agent: no probe came for the hold time, so it
    removed the provisioned egress IPs itself (`removed`, at `at`: CLOCK_MONOTONIC)."""

    at: float
    removed: tuple[IPAddress, ...]


def answer_probe(
    data: bytes, gateway: str, state: ResponderState, now: float
) -> tuple[Demand, bytes]:
    """A probe datagram's demand (arrived at `now`) and the reply to send; raises
    ProbeFormatError for a datagram that is no probe."""
    request = decode_request(data)
    demand = Demand(request.node, now, request.here, request.away)
    serving = state.served & (request.here | request.away)
    return demand, encode_reply(ProbeReply(gateway, request.sequence, serving, state.leaving))


def encode_demand(demand: Demand) -> bytes:
    return _encode({
        "v": PROTOCOL_VERSION, "node": demand.node, "at": demand.received_at,
        "here": sorted(demand.here), "away": sorted(demand.away),
    }, LOCAL_LIMITS)


def encode_fenced(fenced: Fenced) -> bytes:
    return _encode({
        "v": PROTOCOL_VERSION, "at": fenced.at, "fenced": [str(a) for a in fenced.removed],
    }, LOCAL_LIMITS)


def decode_from_responder(data: bytes) -> Demand | Fenced:
    """A message of the responder process to the agent: a node's demand, or a fence."""
    message = _decode(data, LOCAL_LIMITS)
    if "fenced" in message:
        addresses = message["fenced"]
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ProbeFormatError("probe message: fenced must be a list of addresses")
        try:
            removed = tuple(ip_address(a) for a in addresses)
        except ValueError as exc:
            raise ProbeFormatError(f"probe message: fenced: {exc}") from None
        return Fenced(at=_field(message, "at", float), removed=removed)
    return Demand(
        node=_field(message, "node", str),
        received_at=_field(message, "at", float),
        here=_names(message, "here"),
        away=_names(message, "away"),
    )


def encode_responder_state(state: ResponderState) -> bytes:
    return _encode({
        "v": PROTOCOL_VERSION, "served": sorted(state.served), "leaving": state.leaving,
    }, LOCAL_LIMITS)


def decode_responder_state(data: bytes) -> ResponderState:
    message = _decode(data, LOCAL_LIMITS)
    return ResponderState(
        served=_names(message, "served"), leaving=_field(message, "leaving", bool)
    )


def egress_ips_to_hold(
    rules: Sequence[SnatRule],
    provisioned: Callable[[IPAddress], bool],
    demands: Iterable[Demand],
    now: float,
    hold_seconds: float,
) -> frozenset[IPAddress]:
    """The egress IPs (among those this gateway provisions itself) it should hold now.

    Only probes younger than `hold_seconds` count. With none, the gateway holds nothing: a
    gateway that no cloud node reaches gives its addresses up (it fences itself), so the
    standby that the nodes moved to can take them without two hosts answering for one address.
    Otherwise an address is held when a node sends the rule's policy here, or when the plan
    makes this gateway active for it and no node reports sending it to another gateway.
    """
    recent = [d for d in demands if now - d.received_at <= hold_seconds]
    if not recent:
        return frozenset()
    here = {p for d in recent for p in d.here}
    away = {p for d in recent for p in d.away}
    held = set()
    for rule in rules:
        if not provisioned(rule.egress_ip):
            continue
        if rule.policy in here or (rule.role is Role.ACTIVE and rule.policy not in away):
            held.add(rule.egress_ip)
    return frozenset(held)


def keep_when_contested(
    policies: Iterable[str], rules: Sequence[SnatRule], here: Iterable[str]
) -> bool:
    """Whether to keep an egress IP another host now claims too (a gratuitous ARP or an ARP
    answer from another MAC), `policies` being those whose rules use it: only when the plan
    makes this gateway active for one of them and a node sends that policy here. Otherwise it
    yields at once; the other host's claim passed its own checks."""
    active = {r.policy for r in rules if r.role is Role.ACTIVE}
    demanded = set(here)
    return any(p in active and p in demanded for p in policies)
