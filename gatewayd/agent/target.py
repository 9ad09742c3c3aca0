"""What the agent keeps in force: its gateway plan and, in Kubernetes mode, its tunnel peers.

In standalone mode the peers come from the config file (`peers` is None here); in Kubernetes
mode they come with the plan, from the EgressGateway's `spec.peers`, so a peer change is a
plan change (saved on disk like the rules, and restored before the API server is reachable).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gatewayd.agent.config import TunnelPeer
from gatewayd.configfile import (
    parse_endpoint,
    parse_peer_network,
    parse_wireguard_key,
    peer_network_conflicts,
)
from gatewayd.policy.model import GatewayPlan, SnatRule
from gatewayd.policy.planio import PlanFormatError, gateway_plan_from_dict, gateway_plan_to_dict

# The gateway may sit behind NAT: it keeps its mappings open towards the nodes it knows.
PEER_KEEPALIVE_SECONDS = 25


@dataclass(frozen=True)
class GatewayTarget:
    plan: GatewayPlan
    peers: tuple[TunnelPeer, ...] | None = None  # None: the config's (standalone mode)

    @property
    def generation(self) -> int:
        return self.plan.generation

    @property
    def rules(self) -> tuple[SnatRule, ...]:
        return self.plan.rules


def target_to_dict(plan: GatewayTarget) -> dict[str, Any]:
    data = gateway_plan_to_dict(plan.plan)
    if plan.peers is not None:
        data["peers"] = [peer_to_dict(p) for p in plan.peers]
    return data


def target_from_dict(data: Mapping[str, Any]) -> GatewayTarget:
    plan = gateway_plan_from_dict(data)
    peers = data.get("peers")
    return GatewayTarget(plan, peers_from_list(peers, "peers") if peers is not None else None)


def peer_to_dict(peer: TunnelPeer) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": peer.name,
        "publicKey": peer.public_key,
        "allowedIPs": [str(n) for n in peer.allowed_ips],
    }
    if peer.endpoint is not None:
        data["endpoint"] = peer.endpoint
    return data


def peers_from_list(items: object, path: str) -> tuple[TunnelPeer, ...]:
    """Peers as a saved plan holds them; PlanFormatError names the field that is wrong."""
    peers, problems = usable_peers(items, path)
    if problems:
        raise PlanFormatError(problems[0])
    return peers


def usable_peers(items: object, path: str) -> tuple[tuple[TunnelPeer, ...], tuple[str, ...]]:
    """The well-formed peers of `spec.peers`, and why each other one is left out (naming its
    field). One bad peer must not stop the others: a controller older than peer validation may
    copy a bad key or endpoint from one node's status. Peers sharing a public key are all left
    out, since the gateway cannot tell which one owns it. Raises PlanFormatError only when
    `items` is not a list."""
    if not isinstance(items, list):
        raise PlanFormatError(f"{path}: must be a list of peers")
    peers = []
    problems = []
    for index, item in enumerate(items):
        where = f"{path}[{index}]"
        if not isinstance(item, Mapping):
            problems.append(f"{where}: must be a mapping")
            continue
        try:
            name = item["name"]
            if not isinstance(name, str) or not name:
                raise ValueError("name must be a non-empty string")
            endpoint = item.get("endpoint")
            peers.append(TunnelPeer(
                name=name,
                public_key=parse_wireguard_key(str(item["publicKey"])),
                allowed_ips=tuple(parse_peer_network(str(n)) for n in _list(item, "allowedIPs")),
                endpoint=parse_endpoint(endpoint) if isinstance(endpoint, str) else None,
                persistent_keepalive=PEER_KEEPALIVE_SECONDS,
            ))
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"{where}: {exc}")
    keys = Counter(p.public_key for p in peers)
    unique = []
    for peer in peers:
        if keys[peer.public_key] > 1:
            problems.append(f"{path}: peer {peer.name}: its public key is listed twice")
        else:
            unique.append(peer)
    accepted: list[TunnelPeer] = []
    for peer in unique:  # WireGuard would route a shared network to one of them only, silently
        conflicts = peer_network_conflicts(
            [(p.name, p.allowed_ips) for p in accepted] + [(peer.name, peer.allowed_ips)])
        if conflicts:
            problems.append(f"{path}: peer {peer.name}: allowedIPs: {conflicts[0]}")
        else:
            accepted.append(peer)
    return tuple(accepted), tuple(problems)


def _list(item: Mapping[str, Any], key: str) -> Iterable[object]:
    value = item.get(key, [])
    if not isinstance(value, list):
        raise TypeError(f"{key} must be a list")
    return value
