"""`gatewayctl status` and `gatewayctl teardown` on the lab's hosts, as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from gatewayd.lab.netns import run
from gatewayd.lab.observe import GATEWAY_TABLE, has_address, nft_table
from gatewayd.lab.topology import GATEWAYS, NODES, Lab
from gatewayd.lab.verify import probe
from gatewayd.version import VERSION

pytestmark = pytest.mark.lab

ACTIVE, STANDBY = GATEWAYS
CHECKOUT = NODES[0].pods[0]


def gatewayctl(lab: Lab, host: str, *args: str) -> subprocess.CompletedProcess[str]:
    netns = next(h.netns for h in (*GATEWAYS, *NODES) if h.name == host)
    return run([sys.executable, "-m", "gatewayd.cli.gatewayctl", *args,
                "--config", str(lab.config_path(host))], netns, check=False)


def status(lab: Lab, host: str) -> dict[str, Any]:
    result = gatewayctl(lab, host, "status", "-o", "json")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_active_gateway_status_shows_policies_ips_peers_and_counters(lab: Lab) -> None:
    assert probe(CHECKOUT.netns, "198.51.100.10") == "198.51.100.70"  # traffic and handshakes
    report = status(lab, ACTIVE.name)
    assert report["ready"] is True and report["running"] is True
    assert report["version"] == VERSION  # the daemon's own, from status.json
    assert report["policies"] == ["batch-all (active)", "payment-gateway (active)",
                                  "reports-ipv6 (active)"]
    # the IPv6 traffic of the policies with an IPv4 egressIP leaves with the uplink's address
    assert report["egressIPs"] == ["198.51.100.70", "198.51.100.71", ACTIVE.address6,
                                   "2001:db8:100::72"]
    assert set(report["egressIPs"]) <= set(report["egressIPsPresent"])
    handshakes = [p["latestHandshake"] for p in report["peers"]]
    assert len(handshakes) == len(NODES) and any(handshakes)
    payment = [v for k, v in report["counters"].items() if k.startswith("rule")]
    assert payment and sum(v["packets"] for v in payment) > 0

    text = gatewayctl(lab, ACTIVE.name, "status").stdout
    assert f"agent gw1: ready, daemon {VERSION} running" in text
    assert "198.51.100.70 (present)" in text


def test_standby_gateway_holds_rules_but_not_the_explicit_egress_ips(lab: Lab) -> None:
    report = status(lab, STANDBY.name)
    assert report["policies"] == ["batch-all (standby)", "payment-gateway (standby)",
                                  "reports-ipv6 (standby)"]
    assert report["egressIPs"] == []
    assert not has_address(STANDBY.netns, "eth0", "198.51.100.70")


def test_steer_status(lab: Lab) -> None:
    report = status(lab, NODES[0].name)
    assert report["role"] == "steer" and report["ready"] is True
    assert report["policies"] == ["batch-all", "payment-gateway", "reports-ipv6"]
    assert {p["interface"] for p in report["peers"]} == {
        NODES[0].tunnel_interface(g) for g in GATEWAYS
    }


def test_status_wait_ready_times_out_when_the_daemon_is_not_ready(lab: Lab) -> None:
    lab.stop_daemon(STANDBY.name)
    try:
        status_file = lab.status_path(STANDBY.name)
        saved = status_file.read_text()
        status_file.write_text(json.dumps({**json.loads(saved), "ready": False}))
        result = gatewayctl(lab, STANDBY.name, "status", "--wait-ready", "--timeout", "1")
        assert result.returncode == 1
        assert "not ready after 1s" in result.stderr
    finally:
        started = time.time()
        lab.start_daemon(STANDBY.name)
        lab.wait_ready([STANDBY.name], since=started)


def test_teardown_refuses_while_the_daemon_runs_then_removes_everything(lab: Lab) -> None:
    refused = gatewayctl(lab, STANDBY.name, "teardown")
    assert refused.returncode == 1 and "stop it first" in refused.stderr
    assert nft_table(STANDBY.netns, *GATEWAY_TABLE) is not None

    lab.stop_daemon(STANDBY.name)
    try:
        result = gatewayctl(lab, STANDBY.name, "teardown")
        assert result.returncode == 0, result.stderr
        assert "removed nftables table inet gatewayd" in result.stdout
        assert f"removed wireguard interface {STANDBY.tunnel_interface}" in result.stdout
        assert nft_table(STANDBY.netns, *GATEWAY_TABLE) is None
        links = run(["ip", "-br", "link"], STANDBY.netns).stdout
        assert STANDBY.tunnel_interface not in links
        assert not (lab.state_dir(STANDBY.name) / "plan.json").exists()
        # a second teardown finds nothing left
        assert "removed" not in gatewayctl(lab, STANDBY.name, "teardown").stdout
    finally:
        started = time.time()
        lab.start_daemon(STANDBY.name)
        lab.wait_ready([STANDBY.name], since=started)
    assert nft_table(STANDBY.netns, *GATEWAY_TABLE) is not None
