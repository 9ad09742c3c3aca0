"""`gatewayctl rules`: reading SNAT rules back from a gateway table (here: as rendered; the
lab test reads the kernel's)."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from test_nft_render import GATEWAY_PLAN, SETTINGS

from gatewayd.cli.rules import compared_with_plan, kernel_rules, render_text
from gatewayd.dataplane.nft_render import render_gateway_table, snat_counter_rules

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
