"""`gatewayctl rules` on the lab's hosts: what the kernels hold (each node's steering, each
gateway's SNAT) agrees with what `gatewayctl lab verify` expects for every pod and
destination, without sending a packet."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from gatewayd.cli.rules import KernelRule, KernelSteerRule, KernelSteerTable
from gatewayd.lab.netns import run
from gatewayd.lab.topology import GATEWAYS, NODES, Lab
from gatewayd.lab.verify import expectations
from gatewayd.policy.snapshot import load_snapshot

pytestmark = pytest.mark.lab


def rules_json(lab: Lab, host: Any) -> dict[str, Any]:
    result = run([sys.executable, "-m", "gatewayd.cli.gatewayctl", "rules", "-o", "json",
                  "--config", str(lab.config_path(host.name))], host.netns, check=False)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def gateway_rules(lab: Lab, gateway: Any) -> list[KernelRule]:
    report = rules_json(lab, gateway)
    assert report["gateway"] == gateway.name and report["planGeneration"] >= 1
    return [KernelRule(counter=r["counter"], policy=r["policy"], role=r["role"],
                       egress_ip=r["egressIP"], snat=r["snat"], sources=tuple(r["sources"]),
                       destinations=tuple(r["destinations"]), packets=r["packets"],
                       bytes=r["bytes"], matches_plan=r["matchesPlan"])
            for r in report["rules"]]


def node_table(lab: Lab, node: Any) -> KernelSteerTable:
    report = rules_json(lab, node)
    assert report["node"] == node.name
    return KernelSteerTable(tuple(report["clusterInternal"]), tuple(
        KernelSteerRule(counter=r["counter"], policy=r["policy"], gateway=r["gateway"],
                        drop_reason=r["dropReason"], sources=tuple(r["sources"]),
                        destinations=tuple(r["destinations"]), packets=r["packets"],
                        bytes=r["bytes"])
        for r in report["rules"]))


def test_the_kernels_agree_with_every_pods_expectation(lab: Lab) -> None:
    gateways = {g.name: gateway_rules(lab, g) for g in GATEWAYS}
    assert all(r.matches_plan for rules in gateways.values() for r in rules)
    nodes = {node.name: node_table(lab, node) for node in NODES}
    node_of = {pod.name: node.name for node in NODES for pod in node.pods}
    wanted = expectations(load_snapshot([lab.snapshot_dir]).snapshot)
    assert wanted
    for expectation in wanted:
        node, source = node_of[expectation.pod], expectation.source
        steer = nodes[node].decide(source, expectation.destination)
        if steer is None:
            outcome: str | None = "not steered"
        elif steer.gateway is None:
            outcome = "dropped by the node"
        else:
            # the gateway's first rule that covers the pair decides (rule order)
            rule = next((r for r in gateways[steer.gateway]
                         if r.covers(source, expectation.destination)), None)
            outcome = rule.egress_ip if rule is not None and rule.snat else (
                f"not SNATed by {steer.gateway}")
        if expectation.why.startswith("snat"):
            assert outcome == expectation.expected, expectation
        elif expectation.why.startswith("drop"):
            assert outcome == "dropped by the node", expectation
        else:
            assert outcome == "not steered", expectation


def test_rules_text_names_policies_and_counters(lab: Lab) -> None:
    active, node = GATEWAYS[0], NODES[0]
    text = run([sys.executable, "-m", "gatewayd.cli.gatewayctl", "rules",
                "--config", str(lab.config_path(active.name))], active.netns).stdout
    assert "payment-gateway (active): SNAT to 198.51.100.70" in text
    assert "KERNEL DIFFERS" not in text
    text = run([sys.executable, "-m", "gatewayd.cli.gatewayctl", "rules",
                "--config", str(lab.config_path(node.name))], node.netns).stdout
    assert f"payment-gateway: to gateway {active.name}" in text

