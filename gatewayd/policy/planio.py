"""Plans as plain JSON-able dicts: the saved state on disk (and, later, the CRD specs).

The camelCase shape is the one an EgressGateway / EgressNode `spec` carries. Reading rejects
anything malformed with a `PlanFormatError` naming the field, so a damaged state file is
reported, not half-applied.
"""

from __future__ import annotations

import functools
import ipaddress
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from gatewayd.policy.model import (
    DropReason,
    GatewayPlan,
    IPAddress,
    IPNetwork,
    NodePlan,
    Role,
    SnatRule,
    SteerAction,
    SteerRule,
    address_order,
)
from gatewayd.policy.safeload import describe


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
                "sources": _address_texts(r.sources),
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
                "sources": _address_texts(r.sources),
                "destinations": [str(d) for d in r.destinations],
            }
            for r in plan.rules
        ],
    }


def gateway_plan_from_dict(data: Mapping[str, Any]) -> GatewayPlan:
    try:
        _check_mapping(data)
        return GatewayPlan(
            gateway=_str(data, "gateway"),
            generation=_generation(data),
            rules=tuple(
                SnatRule(
                    policy=_str(r, "policy"),
                    role=Role(r["role"]),
                    egress_ip=_address(r["egressIP"]),
                    sources=frozenset(_address(s) for s in r["sources"]),
                    destinations=_networks(r["destinations"]),
                )
                for r in data["rules"]
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanFormatError(f"not a valid gateway plan: {_reason(exc)}") from exc


def node_plan_from_dict(data: Mapping[str, Any]) -> NodePlan:
    try:
        _check_mapping(data)
        return NodePlan(
            node=_str(data, "node"),
            generation=_generation(data),
            cluster_internal=tuple(_network(n) for n in data["clusterInternal"]),
            rules=tuple(
                SteerRule(
                    policy=_str(r, "policy"),
                    action=SteerAction(r["action"]),
                    gateway=r.get("gateway"),
                    standby=r.get("standby"),
                    reason=DropReason(r["reason"]) if r.get("reason") else None,
                    sources=frozenset(_address(s) for s in r["sources"]),
                    destinations=_networks(r["destinations"]),
                )
                for r in data["rules"]
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanFormatError(f"not a valid node plan: {_reason(exc)}") from exc


def _check_mapping(data: object) -> None:
    if not isinstance(data, Mapping):
        raise TypeError("must be a mapping (a JSON object)")


def _generation(data: Mapping[str, Any]) -> int:
    """A whole number from 0 to 2**63 - 1 (metadata.generation is an int64)."""
    value = data.get("generation", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError("generation must be a whole number from 0 to 2**63 - 1")
    return value


def _reason(exc: Exception) -> str:
    """The exception as a message, with no structure of the input expanded into it."""
    if isinstance(exc, KeyError):
        return f"missing field {describe(exc.args[0]) if exc.args else ''}"
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "…"


def _address(value: object) -> IPAddress:
    # ipaddress takes integers too (5 is 0.0.0.5): a plan spells addresses as strings.
    if not isinstance(value, str):
        raise TypeError(f"an address must be a string, got {describe(value)}")
    return ipaddress.ip_address(value)


def _networks(values: Any) -> tuple[IPNetwork, ...]:
    if isinstance(values, list) and set(map(type, values)) <= {str}:
        return _parsed_networks(tuple(values))
    return tuple(_network(d) for d in values)  # each entry's error named


@functools.lru_cache(maxsize=4096)
def _parsed_networks(values: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    # Cached: a plan is read again after each pod's change, its destinations mostly not
    # (1,000 of them: 25 ms). Entries are as large as the rules' own destinations.
    return tuple(_network(d) for d in values)


def _network(value: object) -> IPNetwork:
    if not isinstance(value, str):
        raise TypeError(f"a CIDR must be a string, got {describe(value)}")
    return ipaddress.ip_network(value)


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string")
    return value


def _address_texts(addresses: Iterable[IPAddress]) -> list[str]:
    """The addresses as text, IPv4 first, each family in numeric order (sorted as objects:
    100,000 of them parsed back from text took seconds of a cold reconcile). Interned: a pod's
    address is in its node's spec and its gateways' once per policy, one string for all."""
    return [sys.intern(str(a)) for a in sorted(addresses, key=address_order)]
