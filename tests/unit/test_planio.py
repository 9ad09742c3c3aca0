"""Saved plans survive a round trip through JSON, and damaged files are rejected whole."""

from __future__ import annotations

import ipaddress
import json

import pytest

from gatewayd.policy.model import (
    DropReason,
    GatewayPlan,
    NodePlan,
    Role,
    SnatRule,
    SteerAction,
    SteerRule,
)
from gatewayd.policy.planio import (
    PlanFormatError,
    gateway_plan_from_dict,
    gateway_plan_to_dict,
    node_plan_from_dict,
    node_plan_to_dict,
)

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address
net = ipaddress.ip_network

GATEWAY_PLAN = GatewayPlan(
    gateway="gw1",
    generation=7,
    rules=(
        SnatRule("pay", Role.ACTIVE, frozenset({ip("10.244.1.10"), ip("10.244.2.10")}),
                 (net("198.51.100.10/32"),), ip("203.0.113.10")),
        SnatRule("pay", Role.STANDBY, frozenset({ip("fd00::a")}),
                 (net("2001:db8::/64"),), ip("2001:db8:1::10")),
    ),
)

NODE_PLAN = NodePlan(
    node="node1",
    generation=3,
    cluster_internal=(net("10.244.0.0/16"), net("fd00::/64")),
    rules=(
        SteerRule("pay", SteerAction.TUNNEL, frozenset({ip("10.244.1.10")}),
                  (net("198.51.100.10/32"),), gateway="gw1", standby="gw2"),
        SteerRule("lost", SteerAction.DROP, frozenset({ip("10.244.1.11")}),
                  (net("0.0.0.0/1"), net("128.0.0.0/1")), reason=DropReason.NO_EGRESS_GATEWAY),
    ),
)


def test_gateway_plan_round_trip_through_json() -> None:
    text = json.dumps(gateway_plan_to_dict(GATEWAY_PLAN))
    assert gateway_plan_from_dict(json.loads(text)) == GATEWAY_PLAN


def test_node_plan_round_trip_through_json() -> None:
    text = json.dumps(node_plan_to_dict(NODE_PLAN))
    assert node_plan_from_dict(json.loads(text)) == NODE_PLAN


def test_sources_are_written_in_address_order() -> None:
    sources = gateway_plan_to_dict(GATEWAY_PLAN)["rules"][0]["sources"]
    assert sources == ["10.244.1.10", "10.244.2.10"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.pop("rules"),
        lambda d: d["rules"][0].update(role="leader"),
        lambda d: d["rules"][0].update(egressIP="203.0.113.300"),
        lambda d: d["rules"][0].update(sources="10.0.0.1"),
        lambda d: d.update(gateway=5),
    ],
)
def test_damaged_gateway_plan_is_rejected(damage) -> None:  # type: ignore[no-untyped-def]
    data = gateway_plan_to_dict(GATEWAY_PLAN)
    damage(data)
    with pytest.raises(PlanFormatError):
        gateway_plan_from_dict(data)


def test_damaged_node_plan_is_rejected() -> None:
    data = node_plan_to_dict(NODE_PLAN)
    data["rules"][1]["reason"] = "because"
    with pytest.raises(PlanFormatError):
        node_plan_from_dict(data)
