"""What steer keeps in force: the node plan and, in Kubernetes mode, the gateways to keep
tunnels to and this node's tunnel address (all from the EgressNode's spec).

In standalone mode the gateways come from the config file (`gateways` is None here). In
Kubernetes mode a change of a gateway's key or endpoint, or of the tunnel address, is a plan
change: saved on disk like the rules, and restored before the API server is reachable.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gatewayd.configfile import parse_endpoint, parse_wireguard_key
from gatewayd.policy.model import IPNetwork, NodePlan, SteerRule
from gatewayd.policy.planio import PlanFormatError, node_plan_from_dict, node_plan_to_dict


@dataclass(frozen=True)
class GatewayPeer:
    """One entry of `spec.gateways`: a gateway this node keeps a tunnel to."""

    name: str
    public_key: str
    endpoint: str | None = None


@dataclass(frozen=True)
class NodeTarget:
    plan: NodePlan
    gateways: tuple[GatewayPeer, ...] | None = None  # None: the config's (standalone mode)
    tunnel_address: str | None = None  # ADDRESS/32 on every tunnel (Kubernetes mode)

    @property
    def generation(self) -> int:
        return self.plan.generation

    @property
    def rules(self) -> tuple[SteerRule, ...]:
        return self.plan.rules

    @property
    def cluster_internal(self) -> tuple[IPNetwork, ...]:
        return self.plan.cluster_internal


def target_to_dict(plan: NodeTarget) -> dict[str, Any]:
    data = node_plan_to_dict(plan.plan)
    if plan.gateways is not None:
        data["gateways"] = [
            {"name": g.name, "publicKey": g.public_key,
             **({"endpoint": g.endpoint} if g.endpoint else {})}
            for g in plan.gateways
        ]
    if plan.tunnel_address is not None:
        data["tunnelAddress"] = plan.tunnel_address
    return data


def target_from_dict(data: Mapping[str, Any]) -> NodeTarget:
    """A node target from planio's shape plus `gateways` and `tunnelAddress` (an EgressNode's
    spec has that shape); PlanFormatError names the field that is wrong."""
    if not isinstance(data, Mapping):
        raise PlanFormatError("a node plan must be a mapping (a JSON object)")
    plan = node_plan_from_dict({**data, "clusterInternal": data.get("clusterInternal") or [],
                                "rules": data.get("rules") or []})
    gateways = data.get("gateways")
    address = data.get("tunnelAddress")
    return NodeTarget(
        plan,
        gateways_from_list(gateways, "gateways") if gateways is not None else None,
        tunnel_address(address) if address is not None else None,
    )


def gateways_from_list(items: object, path: str) -> tuple[GatewayPeer, ...]:
    if not isinstance(items, list):
        raise PlanFormatError(f"{path}: must be a list of gateways")
    gateways = []
    for index, item in enumerate(items):
        where = f"{path}[{index}]"
        try:
            if not isinstance(item, Mapping):
                raise TypeError("must be a mapping")
            name = item["name"]
            if not isinstance(name, str) or not name:
                raise ValueError("name must be a non-empty string")
            endpoint = item.get("endpoint")
            gateways.append(GatewayPeer(
                name=name,
                public_key=parse_wireguard_key(str(item["publicKey"])),
                endpoint=parse_endpoint(endpoint) if isinstance(endpoint, str) else None,
            ))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanFormatError(f"{where}: {exc}") from exc
    names = [g.name for g in gateways]
    if len(set(names)) != len(names):
        raise PlanFormatError(f"{path}: a gateway is listed twice")
    return tuple(gateways)


def tunnel_address(value: object) -> str:
    """`spec.tunnelAddress` (an IPv4 address, with or without /32) as ADDRESS/32."""
    try:
        interface = ipaddress.IPv4Interface(str(value))
    except ValueError as exc:
        raise PlanFormatError(f"tunnelAddress: {exc}") from exc
    if interface.network.prefixlen != 32:
        raise PlanFormatError(f"tunnelAddress: {value!r} must be one address (/32)")
    return f"{interface.ip}/32"
