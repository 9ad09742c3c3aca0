"""The plans the controller writes as EgressGateway and EgressNode specs (pure functions).

The engine's plans, in planio's camelCase shape, with two additions for make-before-break:

* `hold_back_moves`: a node's rules may only move a policy's traffic to a gateway that surely
  has that policy's rules programmed (its reported observedGeneration covers a spec holding
  them). Until then the node keeps sending it to the gateway it used before, as long as that
  one is usable. If the old gateway is unusable the traffic moves at once: a failover cannot
  wait.
* `retained_rules`: a gateway keeps the rules of a policy the engine took away from it while any
  node may still send it that policy's traffic (a node's plan names it, or a node has not yet
  reported applying a plan that no longer does). Kept rules are demoted to standby when another
  gateway is now active with the same egress IP, so an explicit egress IP has one active owner.

Specs hold no nulls: an API server drops null fields of a custom resource, and the controller
compares what it wants with what it reads back.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from gatewayd.configfile import parse_wireguard_key
from gatewayd.policy.model import GatewayPlan, IPNetwork, NodePlan, SnatRule, SteerRule
from gatewayd.policy.planio import gateway_plan_to_dict, node_plan_to_dict

Rule = dict[str, Any]
Object = Mapping[str, Any]
log = logging.getLogger(__name__)


def without_nulls(rule: Mapping[str, Any]) -> Rule:
    return {key: value for key, value in rule.items() if value is not None}


class SpecForms:
    """Plans in spec form (planio's dicts, without nulls), rule by rule, remembered while the
    rules stay in the plans: after a pod change most rules equal the last plan's, and writing
    thousands of addresses as text again would cost more than the engine run itself."""

    def __init__(self) -> None:
        self._current: dict[object, Any] = {}
        self._previous: dict[object, Any] = {}

    def next_plan(self) -> None:
        """Forget the forms the last plan did not use."""
        self._previous, self._current = self._current, {}

    def forget(self, rules: Iterable[object]) -> None:
        """Forget the forms of these rules (a plan kept current replaced them)."""
        for rule in rules:
            self._current.pop(rule, None)
            self._previous.pop(rule, None)

    def _form(self, key: object, make: Callable[[], Any]) -> Any:
        form = self._current.get(key)
        if form is None:
            form = self._previous.get(key)
            if form is None:
                form = make()
            self._current[key] = form
        return form

    def gateway_rules(self, plan: GatewayPlan) -> list[Rule]:
        return [self._form(rule, partial(_snat_form, rule)) for rule in plan.rules]

    def node_rules(self, plan: NodePlan) -> tuple[list[Rule], list[str]]:
        """(rules, clusterInternal) of a node plan. The lists of text that every node's spec
        repeats (the cluster-internal networks, a policy's destinations) are one list each,
        shared by all the specs that hold them (at 100,000 pods and 1,000 nodes their copies
        took a seventh of the controller's memory). Nothing changes a spec's lists in place."""
        rules = [self._form(rule, partial(self._steer_form, rule)) for rule in plan.rules]
        internal = self._form(
            ("clusterInternal", plan.cluster_internal),
            partial(_cluster_internal_form, plan.cluster_internal),
        )
        return rules, internal

    def _steer_form(self, rule: SteerRule) -> Rule:
        form = _steer_form(replace(rule, destinations=()))  # their text: shared, made once
        form["destinations"] = self._form(
            ("destinations", rule.destinations),
            lambda: _steer_form(replace(rule, sources=frozenset()))["destinations"],
        )
        return form


def _snat_form(rule: SnatRule) -> Rule:
    return without_nulls(gateway_plan_to_dict(GatewayPlan("", (rule,)))["rules"][0])


def _steer_form(rule: SteerRule) -> Rule:
    return without_nulls(node_plan_to_dict(NodePlan("", (rule,)))["rules"][0])


def _cluster_internal_form(networks: tuple[IPNetwork, ...]) -> list[str]:
    return list(node_plan_to_dict(NodePlan("", (), networks))["clusterInternal"])


def spec_rules(obj: Object) -> list[Mapping[str, Any]]:
    """The rules of an object's spec, skipping anything malformed."""
    spec = obj.get("spec")
    rules = spec.get("rules") if isinstance(spec, Mapping) else None
    if not isinstance(rules, list):
        return []
    return [r for r in rules if isinstance(r, Mapping) and isinstance(r.get("policy"), str)]


def gateway_policies(obj: Object) -> frozenset[str]:
    """Policies an EgressGateway spec holds rules for."""
    return frozenset(r["policy"] for r in spec_rules(obj))


def steered_pairs(rules: Iterable[Mapping[str, Any]]) -> frozenset[tuple[str, str]]:
    """(policy, gateway) pairs node rules may send traffic along: to the gateway, or to the
    standby after a fast failover."""
    pairs = set()
    for rule in rules:
        for role in ("gateway", "standby"):
            name = rule.get(role)
            if isinstance(name, str) and rule.get("action") == "tunnel":
                pairs.add((rule["policy"], name))
    return frozenset(pairs)


def failed_over_everywhere(egress_nodes: Iterable[Object]) -> dict[tuple[str, str], str]:
    """(policy, gateway) -> standby, for each tunnel rule that every node whose spec has it
    reports failed over to the rule's standby (its status's `failovers`).

    The nodes then all send that policy's new connections to the standby, and the gateway no
    longer holds the egress IP: the nodes never move back on their own, so the controller
    makes the standby active, and its plan matches what the data plane already does. A rule
    only some nodes failed over stays (those nodes have lost their path to the gateway, the
    others have not)."""
    reports: dict[tuple[str, str, str], set[str]] = {}
    for node in egress_nodes:
        failovers = _status(node).get("failovers")
        for failover in failovers if isinstance(failovers, list) else []:
            if isinstance(failover, Mapping):
                key = (failover.get("policy"), failover.get("from"), failover.get("to"))
                reports.setdefault(key, set()).add(_name(node))  # type: ignore[arg-type]
    if not reports:
        return {}  # the usual case: no need to read every node's rules (1 s at 1,000 nodes)
    reported = {policy for policy, _, _ in reports}
    steering: dict[tuple[str, str, str], set[str]] = {}
    for node in egress_nodes:
        for rule in spec_rules(node):
            gateway, standby = rule.get("gateway"), rule.get("standby")
            if rule["policy"] in reported and rule.get("action") == "tunnel" and isinstance(
                    gateway, str) and isinstance(standby, str):
                steering.setdefault((rule["policy"], gateway, standby), set()).add(_name(node))
    return {(policy, gateway): standby
            for (policy, gateway, standby), nodes in steering.items()
            if nodes <= reports.get((policy, gateway, standby), set())}


def _address_order(text: str) -> tuple[int, int]:
    try:
        address = ip_address(text)
    except ValueError:
        return (0, 0)
    return (address.version, int(address))


def _rule_key(rule: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        rule["policy"].encode(),
        rule.get("action", ""),
        rule.get("gateway", ""),
        rule.get("standby", ""),
        rule.get("reason", ""),
        tuple(rule.get("destinations", ())),
    )


def hold_back_moves(
    desired: Sequence[Rule],
    current: Sequence[Mapping[str, Any]],
    programmed: Callable[[str], frozenset[str]],
    usable: Mapping[str, bool],
) -> list[Rule]:
    """Node rules in which no policy's traffic moves to a gateway not yet programmed for it
    while the gateway it goes to now is usable (see the module docstring). Rules that hold
    nothing back are returned as they are."""
    now_using: dict[tuple[str, str], str] | None = None  # (policy, source) -> gateway
    pieces: list[Rule] = []
    held = False
    for rule in desired:
        target = rule.get("gateway")
        if rule.get("action") != "tunnel" or target is None or rule["policy"] in programmed(target):
            pieces.append(rule)
            continue
        if now_using is None:
            now_using = _gateways_in_use(current)
        groups: dict[str, list[str]] = {}
        for source in rule["sources"]:
            before = now_using.get((rule["policy"], source))
            keep = before is not None and before != target and usable.get(before, False)
            groups.setdefault(before if keep and before is not None else target, []).append(source)
        for gateway, sources in groups.items():
            piece = {**rule, "gateway": gateway, "sources": sources}
            if gateway != target:
                held = True
                if piece.get("standby") == gateway:
                    del piece["standby"]
            pieces.append(piece)
    if not held:
        return list(desired)
    merged: dict[tuple[Any, ...], Rule] = {}
    for piece in pieces:
        key = _rule_key(piece)
        sources = (
            [*merged[key]["sources"], *piece["sources"]] if key in merged else piece["sources"]
        )
        merged[key] = {**piece, "sources": sorted(set(sources), key=_address_order)}
    return [merged[key] for key in sorted(merged)]


def _gateways_in_use(rules: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], str]:
    """(policy, source) -> the gateway node rules send it to."""
    using = {}
    for rule in rules:
        gateway = rule.get("gateway")
        if rule.get("action") == "tunnel" and isinstance(gateway, str):
            for source in rule.get("sources") or ():
                using[(rule["policy"], source)] = gateway
    return using


def retained_rules(
    gateway: str,
    planned: Sequence[Rule],
    current: Sequence[Mapping[str, Any]],
    may_send: Callable[[str, str], bool],
    active_elsewhere: frozenset[str],
) -> list[Rule]:
    """The gateway's rules: the engine's (`planned`), plus its current rules of every policy the
    engine took away from it that a node may still send it (`may_send(policy, gateway)`).
    `active_elsewhere`: egress IPs other gateways are now active with."""
    planned_policies = {r["policy"] for r in planned}
    kept = []
    for rule in current:
        policy = rule["policy"]
        if policy in planned_policies or not may_send(policy, gateway):
            continue
        old = dict(rule)
        if old.get("role") == "active" and old.get("egressIP") in active_elsewhere:
            old["role"] = "standby"
        kept.append(old)
    return sorted([*planned, *kept], key=lambda r: r["policy"].encode())


def active_egress_ips(rules_by_gateway: Mapping[str, Sequence[Rule]]) -> dict[str, frozenset[str]]:
    """For each gateway, the egress IPs the OTHER gateways' planned rules are active with."""
    owners: dict[str, set[str]] = {}
    for gateway, rules in rules_by_gateway.items():
        for rule in rules:
            if rule.get("role") == "active":
                owners.setdefault(rule["egressIP"], set()).add(gateway)
    return {
        gateway: frozenset(ip for ip, holders in owners.items() if holders - {gateway})
        for gateway in rules_by_gateway
    }


def _status(obj: Object) -> Mapping[str, Any]:
    status = obj.get("status")
    return status if isinstance(status, Mapping) else {}


def _name(obj: Object) -> str:
    return str(obj["metadata"]["name"])


def node_endpoint(status: Mapping[str, Any], gateway: str) -> str | None:
    """Where `gateway` reaches a cloud node: the node's address with the port it listens on
    for that gateway (`gatewayPorts`); its main endpoint until it has published that port."""
    endpoint = status.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        return None
    ports = status.get("gatewayPorts")
    port = ports.get(gateway) if isinstance(ports, Mapping) else None
    if not isinstance(port, int):
        return endpoint
    host, _, _ = endpoint.rpartition(":")
    return f"{host}:{port}"


@dataclass(frozen=True)
class PeerProblem:
    """Why a cloud node's published tunnel end is left out of every gateway's peers."""

    reason: str  # InvalidPublicKey, InvalidEndpoint or DuplicatePublicKey
    message: str  # names the status field


_DNS_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*"
)


def valid_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def valid_endpoint(text: object) -> bool:
    """`HOST:PORT` (an IPv4 address or a DNS name) or `[IPv6]:PORT`, with a port 1-65535."""
    if not isinstance(text, str):
        return False
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not valid_port(int(port)):
        return False
    try:
        if host.startswith("[") and host.endswith("]"):
            return isinstance(ip_address(host[1:-1]), IPv6Address)
        return isinstance(ip_address(host), IPv4Address)
    except ValueError:
        return _DNS_NAME.fullmatch(host) is not None


def _published_key(obj: Object) -> str | None:
    key = _status(obj).get("publicKey")
    return key if isinstance(key, str) and key else None


def _gateway_problem(key: str, endpoint: object) -> str | None:
    try:
        parse_wireguard_key(key)
    except ValueError as error:
        return f"status.publicKey: {error}"
    if endpoint is not None and not valid_endpoint(endpoint):
        return f"status.endpoint: {str(endpoint)[:100]!r} is not HOST:PORT or [IPv6]:PORT"
    return None


def peer_problems(egress_nodes: Iterable[Object]) -> dict[str, PeerProblem]:
    """The cloud nodes (by name) whose published tunnel end no gateway may be given: a public
    key that is not a WireGuard key, an endpoint or per-gateway port that is not HOST:PORT, or
    a public key another node published first. One such node would otherwise make every
    gateway refuse its whole spec. Of two nodes with one key, the older EgressNode (then the
    first by name) keeps it: a key is public, so a newcomer copying it must not cut the node
    that holds it off (without the private key, the copy cannot carry traffic anyway)."""
    problems: dict[str, PeerProblem] = {}
    owners: dict[str, str] = {}
    ordered = sorted(
        egress_nodes,
        key=lambda n: (str(n["metadata"].get("creationTimestamp", "")), _name(n).encode()),
    )
    for node in ordered:
        key = _published_key(node)
        if key is None:
            continue
        name, status = _name(node), _status(node)
        try:
            parse_wireguard_key(key)
        except ValueError as error:
            problems[name] = PeerProblem("InvalidPublicKey", f"status.publicKey: {error}")
            continue
        endpoint = status.get("endpoint")
        ports = status.get("gatewayPorts")
        bad_ports = sorted(
            str(gateway)
            for gateway, port in (ports.items() if isinstance(ports, Mapping) else ())
            if port is not None and not valid_port(port)
        )
        if endpoint is not None and not valid_endpoint(endpoint):
            problems[name] = PeerProblem(
                "InvalidEndpoint",
                f"status.endpoint: {str(endpoint)[:100]!r} is not HOST:PORT or [IPv6]:PORT "
                "with a port from 1 to 65535",
            )
        elif bad_ports or (ports is not None and not isinstance(ports, Mapping)):
            where = f"status.gatewayPorts.{bad_ports[0]}" if bad_ports else "status.gatewayPorts"
            problems[name] = PeerProblem(
                "InvalidEndpoint", f"{where}: must be a port from 1 to 65535"
            )
        elif key in owners:
            problems[name] = PeerProblem(
                "DuplicatePublicKey",
                f"status.publicKey: EgressNode {owners[key]} published this key first and keeps "
                "it; generate a new key pair on this node",
            )
        else:
            owners[key] = name
    return problems


def peers(
    egress_nodes: Iterable[Object],
    pod_cidrs: Mapping[str, Sequence[str]],
    tunnel_addresses: Mapping[str, IPv4Address],
    gateways: Iterable[str],
    left_out: Collection[str] = (),
) -> dict[str, list[Rule]]:
    """Each gateway's WireGuard peers: every cloud node that published its public key, but
    those `left_out` (see `peer_problems`). The allowed IPs are the pod CIDRs of the node's
    Node object and its tunnel address, never anything the node wrote itself. Only the
    endpoint differs between gateways (the node's port for each)."""
    common = []
    for node in sorted(egress_nodes, key=lambda n: _name(n).encode()):
        status = _status(node)
        key = _published_key(node)
        name = _name(node)
        if key is None or name in left_out:
            continue
        allowed = list(pod_cidrs.get(name, ()))
        if name in tunnel_addresses:
            allowed.append(f"{tunnel_addresses[name]}/32")
        common.append((status, {"name": name, "publicKey": key, "allowedIPs": allowed}))
    found: dict[str, list[Rule]] = {}
    for gateway in gateways:
        found[gateway] = []
        for status, peer in common:
            endpoint = node_endpoint(status, gateway)
            found[gateway].append(peer if endpoint is None else {**peer, "endpoint": endpoint})
    return found


def node_gateways(gateways: Iterable[Object]) -> list[Rule]:
    """The gateways a node keeps a tunnel to: every one that published its public key, so a
    gateway's health changes never rewrite the node plans, and a standby's tunnel is up
    before it is needed. A gateway whose key or endpoint is malformed is left out (and
    logged): it would make every node refuse its whole spec."""
    found = []
    for gateway in sorted(gateways, key=lambda g: _name(g).encode()):
        status = _status(gateway)
        key = status.get("publicKey")
        if isinstance(key, str) and key:
            endpoint = status.get("endpoint") or None
            problem = _gateway_problem(key, endpoint)
            if problem is not None:
                log.warning("EgressGateway %s left out of the nodes' plans: %s", _name(gateway),
                            problem)
                continue
            found.append(
                without_nulls({"name": _name(gateway), "publicKey": key, "endpoint": endpoint})
            )
    return found
