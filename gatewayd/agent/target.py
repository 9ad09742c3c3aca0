"""What the agent keeps in force: its gateway plan and, in Kubernetes mode, its tunnel peers.

In standalone mode the peers come from the config file (`peers` is None here); in Kubernetes
mode they come with the plan, from the EgressGateway's `spec.peers`, so a peer change is a
plan change (saved on disk like the rules, and restored before the API server is reachable).
"""

from __future__ import annotations

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
    """Peers as `spec.peers` holds them; PlanFormatError names the field that is wrong."""
    if not isinstance(items, list):
        raise PlanFormatError(f"{path}: must be a list of peers")
    peers = []
    for index, item in enumerate(items):
        where = f"{path}[{index}]"
        if not isinstance(item, Mapping):
            raise PlanFormatError(f"{where}: must be a mapping")
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
            raise PlanFormatError(f"{where}: {exc}") from exc
    keys = [p.public_key for p in peers]
    if len(set(keys)) != len(keys):
        raise PlanFormatError(f"{path}: a public key is listed twice")
    conflicts = peer_network_conflicts([(p.name, p.allowed_ips) for p in peers])
    if conflicts:
        raise PlanFormatError(f"{path}: allowedIPs: {conflicts[0]}")
    return tuple(peers)


def _list(item: Mapping[str, Any], key: str) -> Iterable[object]:
    value = item.get(key, [])
    if not isinstance(value, list):
        raise TypeError(f"{key} must be a list")
    return value
