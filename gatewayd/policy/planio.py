"""Plans as plain JSON-able dicts: the saved state on disk (and, later, the CRD specs).

The camelCase shape is the one an EgressGateway / EgressNode `spec` carries. Reading rejects
anything malformed with a `PlanFormatError` naming the field, so a damaged state file is
reported, not half-applied.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from gatewayd.policy.model import (
    DropReason,
    GatewayPlan,
    NodePlan,
    Role,
    SnatRule,
    SteerAction,
    SteerRule,
)


class PlanFormatError(ValueError):
    pass


def gateway_plan_to_dict(plan: GatewayPlan) -> dict[str, Any]:
    return {
        "gateway": plan.gateway,
        "generation": plan.generation,
        "rules": [
            {
                "policy": r.policy,
                "role": r.role.value,
                "egressIP": str(r.egress_ip),
                "sources": sorted(map(str, r.sources), key=_address_order),
                "destinations": [str(d) for d in r.destinations],
            }
            for r in plan.rules
        ],
    }


def node_plan_to_dict(plan: NodePlan) -> dict[str, Any]:
    return {
        "node": plan.node,
        "generation": plan.generation,
        "clusterInternal": [str(n) for n in plan.cluster_internal],
        "rules": [
            {
                "policy": r.policy,
                "action": r.action.value,
                "gateway": r.gateway,
                "standby": r.standby,
                "reason": r.reason.value if r.reason else None,
                "sources": sorted(map(str, r.sources), key=_address_order),
                "destinations": [str(d) for d in r.destinations],
            }
            for r in plan.rules
        ],
    }


def gateway_plan_from_dict(data: Mapping[str, Any]) -> GatewayPlan:
    try:
        return GatewayPlan(
            gateway=_str(data, "gateway"),
            generation=int(data.get("generation", 0)),
            rules=tuple(
                SnatRule(
                    policy=_str(r, "policy"),
                    role=Role(r["role"]),
                    egress_ip=ipaddress.ip_address(r["egressIP"]),
                    sources=frozenset(ipaddress.ip_address(s) for s in r["sources"]),
                    destinations=tuple(ipaddress.ip_network(d) for d in r["destinations"]),
                )
                for r in data["rules"]
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanFormatError(f"not a valid gateway plan: {exc!r}") from exc


def node_plan_from_dict(data: Mapping[str, Any]) -> NodePlan:
    try:
        return NodePlan(
            node=_str(data, "node"),
            generation=int(data.get("generation", 0)),
            cluster_internal=tuple(ipaddress.ip_network(n) for n in data["clusterInternal"]),
            rules=tuple(
                SteerRule(
                    policy=_str(r, "policy"),
                    action=SteerAction(r["action"]),
                    gateway=r.get("gateway"),
                    standby=r.get("standby"),
                    reason=DropReason(r["reason"]) if r.get("reason") else None,
                    sources=frozenset(ipaddress.ip_address(s) for s in r["sources"]),
                    destinations=tuple(ipaddress.ip_network(d) for d in r["destinations"]),
                )
                for r in data["rules"]
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanFormatError(f"not a valid node plan: {exc!r}") from exc


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string")
    return value


def _address_order(text: str) -> tuple[int, int]:
    address = ipaddress.ip_address(text)
    return (address.version, int(address))
