"""`gatewayctl rules`: reading SNAT rules back from a gateway table (here: as rendered; the
lab test reads the kernel's)."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest
from test_nft_render import GATEWAY_PLAN, NODE_PLAN, SETTINGS, STEER

from gatewayd.cli.rules import compared_with_plan, kernel_rules, kernel_steer_table, render_text
from gatewayd.dataplane.nft_render import (
    RenderedTable,
    render_gateway_table,
    render_steer_table,
    snat_counter_rules,
)

pytestmark = pytest.mark.unit


def test_each_rule_with_its_policy_sets_egress_ip_and_counters() -> None:
    # The standby rule's egress IP is not held: that rule drops.
    table = render_gateway_table(GATEWAY_PLAN, SETTINGS, held={
        ipaddress.ip_address("198.51.100.10"), ipaddress.ip_address("2001:db8:1::10")})
    rules = kernel_rules(table.sets, {"rule0": (5, 500)}, table.body)
    planned = snat_counter_rules(GATEWAY_PLAN)
    assert [r.counter for r in rules] == list(planned)
    by_policy = {(r.policy, r.egress_ip): r for r in rules}
    payments = by_policy[("payments", "198.51.100.10")]
    assert payments.snat and payments.role == "active"
    assert payments.sources == ("10.244.1.5", "10.244.2.7")
    assert payments.covers("10.244.1.5", "192.0.2.77")
    assert not payments.covers("10.244.1.5", "198.51.100.1")
    assert not payments.covers("10.244.9.9", "192.0.2.77")
    nightly = by_policy[("reports.nightly", "198.51.100.11")]
    assert not nightly.snat and nightly.role == "standby"
    assert sum(r.packets for r in rules) == 5

    checked = compared_with_plan(rules, planned)
    assert all(r.matches_plan for r in checked)
    # A kernel rule whose sources differ from the plan's is named.
    drifted = [replace(rules[0], sources=("10.244.7.7",)), *rules[1:]]
    assert [r.matches_plan for r in compared_with_plan(drifted, planned)] == [
        False, *[True] * (len(rules) - 1)]
    assert "KERNEL DIFFERS FROM THE PLAN" in render_text(compared_with_plan(drifted, planned))
    assert "reports.nightly (standby): DROP (egress IP 198.51.100.11 not held)" in render_text(
        checked)


def test_a_nodes_steer_rules_and_what_is_never_steered() -> None:
    table = render_steer_table(NODE_PLAN, STEER)
    kernel = kernel_steer_table(table.sets, {}, table.body)
    assert "10.96.0.0/12" in kernel.cluster_internal
    by_policy = {(r.policy, r.gateway, r.drop_reason) for r in kernel.rules}
    assert ("payments", "gw-a", None) in by_policy
    assert ("reports.nightly", None, "no-egress-gateway") in by_policy
    assert kernel.decide("10.244.1.5", "192.0.2.9").gateway == "gw-a"  # type: ignore[union-attr]
    assert kernel.decide("10.244.1.5", "10.96.0.1") is None  # cluster-internal
    assert kernel.decide("10.244.1.5", "198.51.100.1") is None  # no rule
    dropped = kernel.decide("10.244.1.9", "203.0.113.1")
    assert dropped is not None and dropped.gateway is None
    # Fast failover: the rule's gateway is the one the kernel steers to now.
    moved = kernel_steer_table(*_parts(render_steer_table(NODE_PLAN, STEER,
                                                          active={"payments": "gw-b"})))
    assert moved.decide("10.244.1.5", "192.0.2.9").gateway == "gw-b"  # type: ignore[union-attr]


def _parts(table: RenderedTable) -> tuple[Any, dict[str, tuple[int, int]], Any]:
    return table.sets, {}, table.body
