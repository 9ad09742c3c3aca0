"""`gatewayctl explain --live`: the kernel's answer (here: tables as rendered and read back as
`gatewayctl rules` reads them; tests/lab/test_explain_live.py reads a real kernel), the plan's,
and whether they disagree."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from pathlib import Path

import pytest
from test_nft_render import GATEWAY_PLAN, NODE_PLAN, SETTINGS, STEER

from gatewayd.cli import gatewayctl
from gatewayd.cli.explain_live import (
    Decision,
    explain_gateway,
    explain_node,
    to_json,
    to_text,
)
from gatewayd.cli.rules import KernelRule, KernelSteerTable, kernel_rules, kernel_steer_table
from gatewayd.dataplane.nft_render import render_gateway_table, render_steer_table
from gatewayd.policy.model import GatewayPlan, NodePlan

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address
HELD_ACTIVE = {ip("198.51.100.10"), ip("2001:db8:1::10")}  # not the standby's 198.51.100.11


def gateway_kernel(plan: GatewayPlan, held: set[ipaddress.IPv4Address | ipaddress.IPv6Address]
                   = HELD_ACTIVE) -> list[KernelRule]:
    table = render_gateway_table(plan, SETTINGS, held=held)
    return kernel_rules(table.sets, {"rule0": (12, 1200)}, table.body)


def node_kernel(plan: NodePlan, active: dict[str, str] | None = None) -> KernelSteerTable:
    table = render_steer_table(plan, STEER, active)
    return kernel_steer_table(table.sets, {}, table.body)


def test_gateway_snat_agrees_with_the_plan() -> None:
    answer = explain_gateway(gateway_kernel(GATEWAY_PLAN), GATEWAY_PLAN, ip("10.244.2.7"),
                             ip("203.0.113.7"))
    assert answer.kernel == Decision("snat", "payments", "active", "198.51.100.10",
                                     counter="rule0", packets=12)
    assert (answer.agrees, answer.notes) == (True, ())
    assert to_text(answer, ip("10.244.2.7"), ip("203.0.113.7"), 7) == (
        "kernel: SNAT: 10.244.2.7 -> 203.0.113.7 leaves as 198.51.100.10 (policy payments, "
        "active)\n  kernel rule rule0: 12 packets so far\nplan (generation 7): agrees")
    ipv6 = explain_gateway(gateway_kernel(GATEWAY_PLAN), GATEWAY_PLAN, ip("fd00:10:244:1::5"),
                           ip("2001:db8:2::1"))
    assert (ipv6.kernel.egress_ip, ipv6.agrees) == ("2001:db8:1::10", True)


def test_a_standby_rule_whose_egress_ip_is_not_held_drops_as_planned() -> None:
    answer = explain_gateway(gateway_kernel(GATEWAY_PLAN), GATEWAY_PLAN, ip("10.244.3.3"),
                             ip("8.8.8.8"))
    assert (answer.kernel.verdict, answer.kernel.reason) == ("drop", "egress-ip-not-held")
    assert answer.plan == Decision("snat", "reports.nightly", "standby", "198.51.100.11")
    assert answer.agrees is True
    assert answer.notes[0].startswith("egress IP 198.51.100.11 is not held by this host")


def test_no_rule_for_the_pair_drops_in_kernel_and_plan() -> None:
    answer = explain_gateway(gateway_kernel(GATEWAY_PLAN), GATEWAY_PLAN, ip("10.244.9.9"),
                             ip("192.0.2.1"))
    assert answer.kernel == answer.plan == Decision("drop", reason="no-rule")
    assert answer.agrees is True


def test_a_kernel_behind_the_plan_is_named() -> None:
    # The plan no longer selects 10.244.2.7; the kernel still SNATs it.
    payments = GATEWAY_PLAN.rules[0]
    newer = replace(GATEWAY_PLAN, rules=(
        replace(payments, sources=frozenset({ip("10.244.1.5")})), *GATEWAY_PLAN.rules[1:]))
    answer = explain_gateway(gateway_kernel(GATEWAY_PLAN), newer, ip("10.244.2.7"),
                             ip("192.0.2.1"))
    assert (answer.kernel.verdict, answer.plan, answer.agrees) == (
        "snat", Decision("drop", reason="no-rule"), False)
    assert "KERNEL DIFFERS FROM THE PLAN (generation 3): the plan says DROP (no-rule): " \
           "10.244.2.7 -> 192.0.2.1 is dropped (no policy)" in to_text(
               answer, ip("10.244.2.7"), ip("192.0.2.1"), 3)


def test_without_a_saved_plan_there_is_nothing_to_compare() -> None:
    answer = explain_gateway(gateway_kernel(GATEWAY_PLAN), None, ip("10.244.1.5"),
                             ip("192.0.2.1"))
    assert (answer.plan, answer.agrees) == (None, None)
    assert "plan: none saved on this host" in to_text(answer, ip("10.244.1.5"),
                                                        ip("192.0.2.1"), None)


def test_node_tunnel_drop_and_cluster_internal_agree_with_the_plan() -> None:
    kernel = node_kernel(NODE_PLAN)
    cases = {
        ("10.244.1.5", "192.0.2.9"): Decision("tunnel", "payments", gateway="gw-a"),
        ("10.244.1.9", "203.0.113.1"): Decision("drop", "reports.nightly",
                                                reason="no-egress-gateway"),
        ("10.244.1.5", "10.96.0.1"): Decision("not-steered", reason="cluster-internal"),
        ("10.244.1.5", "198.51.100.1"): Decision("not-steered", reason="no-rule"),
    }
    for (src, dst), expected in cases.items():
        answer = explain_node(kernel, NODE_PLAN, ip(src), ip(dst))
        assert replace(answer.kernel, counter=None, packets=None) == expected, (src, dst)
        assert answer.agrees is True, (src, dst)


def test_a_fast_failover_to_the_plans_standby_agrees_with_a_note() -> None:
    answer = explain_node(node_kernel(NODE_PLAN, {"payments": "gw-b"}), NODE_PLAN,
                          ip("10.244.1.5"), ip("192.0.2.9"))
    assert (answer.kernel.gateway, answer.agrees) == ("gw-b", True)
    assert answer.notes == ("fast failover in force: the plan's gateway gw-a is down, new "
                            "connections go to its standby gw-b",)


def test_a_node_steering_to_a_gateway_the_plan_does_not_name_disagrees() -> None:
    payments = NODE_PLAN.rules[0]
    moved = replace(NODE_PLAN, rules=(replace(payments, gateway="gw-b", standby=None),
                                      *NODE_PLAN.rules[1:]))
    answer = explain_node(node_kernel(NODE_PLAN), moved, ip("10.244.1.5"), ip("192.0.2.9"))
    assert answer.agrees is False
    report = to_json(answer, {"node": "node-1"}, 9)
    assert report["agrees"] is False and report["planGeneration"] == 9
    assert report["kernel"] == {"verdict": "tunnel", "policy": "payments", "gateway": "gw-a",
                                "counter": "rule0", "packets": 0}
    assert report["plan"] == {"verdict": "tunnel", "policy": "payments", "gateway": "gw-b"}
    json.dumps(report)  # serialisable as printed


@pytest.mark.parametrize("argv", [["--live", "-f", "x.yaml"], []])
def test_live_and_a_snapshot_are_one_or_the_other(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    code = gatewayctl.main(["explain", "--src", "10.0.0.1", "--dst", "10.0.0.2", *argv])
    assert code == 2
    assert capsys.readouterr().err == (
        "gatewayctl explain: error: give a snapshot (-f SNAPSHOT) or --live for this host's "
        "kernel, one of them\n")
