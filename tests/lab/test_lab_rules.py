"""`gatewayctl rules` on the lab's gateways: what the kernel holds agrees with what
`gatewayctl lab verify` expects for every pod and destination."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from gatewayd.cli.rules import KernelRule
from gatewayd.lab.netns import run
from gatewayd.lab.topology import GATEWAYS, PODS, Lab
from gatewayd.lab.verify import expectations
from gatewayd.policy.snapshot import load_snapshot

pytestmark = pytest.mark.lab


def gatewayctl(lab: Lab, netns: str, host: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "gatewayd.cli.gatewayctl", *args,
                "--config", str(lab.config_path(host))], netns, check=False)


def kernel_rules(lab: Lab, gateway: Any) -> list[KernelRule]:
    result = gatewayctl(lab, gateway.netns, gateway.name, "rules", "-o", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["gateway"] == gateway.name and report["planGeneration"] >= 1
    return [
        KernelRule(counter=r["counter"], policy=r["policy"], role=r["role"],
                   egress_ip=r["egressIP"], snat=r["snat"], sources=tuple(r["sources"]),
                   destinations=tuple(r["destinations"]), packets=r["packets"],
                   bytes=r["bytes"], matches_plan=r["matchesPlan"])
        for r in report["rules"]
    ]


def test_rules_in_the_kernel_agree_with_every_pods_expectation(lab: Lab) -> None:
    held = {g.name: kernel_rules(lab, g) for g in GATEWAYS}
    assert all(r.matches_plan for rules in held.values() for r in rules)
    assert any(r.snat for rules in held.values() for r in rules)
    wanted = expectations(load_snapshot([lab.snapshot_dir]).snapshot)
    pods = {pod.name: pod.address for pod in PODS}
    for expectation in wanted:
        source = pods[expectation.pod]
        # The first rule of each gateway that covers the pair decides there (rule order).
        first = [next((r for r in rules if r.snat and r.covers(source, expectation.destination)),
                      None) for rules in held.values()]
        snat_to = {r.egress_ip for r in first if r is not None}
        if expectation.why.startswith("snat"):
            assert snat_to == {expectation.expected}, expectation
        else:
            assert snat_to == set(), expectation


def test_rules_text_names_policies_and_counters(lab: Lab) -> None:
    active = GATEWAYS[0]
    text = gatewayctl(lab, active.netns, active.name, "rules").stdout
    assert "payment-gateway (active): SNAT to 198.51.100.70" in text
    assert "KERNEL DIFFERS" not in text
