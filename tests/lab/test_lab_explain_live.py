"""`gatewayctl explain --live` against a real kernel: a gateway table and a steer table are
installed in namespaces of their own, the saved plan is written where the daemon keeps it, and
the command (run inside each namespace) answers from the kernel's sets and compares."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.agent.target import GatewayTarget
from gatewayd.agent.target import target_to_dict as gateway_target_to_dict
from gatewayd.dataplane.nft_render import (
    FAMILY,
    GATEWAY_TABLE,
    STEER_TABLE,
    GatewayTableSettings,
    SteerTableSettings,
    render_gateway_table,
    render_steer_table,
)
from gatewayd.dataplane.nftables import NftablesDriver
from gatewayd.lab.netns import Sandbox, entered, run
from gatewayd.policy.model import GatewayPlan, NodePlan, Role, SnatRule, SteerAction, SteerRule
from gatewayd.steer.target import NodeTarget
from gatewayd.steer.target import target_to_dict as node_target_to_dict

pytestmark = pytest.mark.lab

ip = ipaddress.ip_address
net = ipaddress.ip_network
KEY = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="

GATEWAY_PLAN = GatewayPlan("gw-a", generation=4, rules=(
    SnatRule("payments", Role.ACTIVE, frozenset({ip("10.244.1.5"), ip("10.244.2.7")}),
             (net("192.0.2.0/24"),), ip("198.51.100.10")),
))
NODE_PLAN = NodePlan("node-1", generation=5, cluster_internal=(net("10.96.0.0/12"),), rules=(
    SteerRule("payments", SteerAction.TUNNEL, frozenset({ip("10.244.1.5")}),
              (net("192.0.2.0/24"),), gateway="gw-a", standby="gw-b"),
))
STEER = SteerTableSettings(gateway_marks={"gw-a": 0x10, "gw-b": 0x20},
                           tunnel_interfaces={"gw-a": "egw-gw-a", "gw-b": "egw-gw-b"},
                           mark_mask=0xF0)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")
    with Sandbox(f"explive{secrets.token_hex(2)}-") as box:
        yield box


def explain(netns: str, config: Path, src: str, dst: str) -> dict[str, Any]:
    result = run([sys.executable, "-m", "gatewayd.cli.gatewayctl", "explain", "--live",
                  "--config", str(config), "--src", src, "--dst", dst, "-o", "json"], netns,
                 check=False)
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_gateway_answers_from_its_kernel_and_names_a_plan_it_differs_from(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    netns = sandbox.netns("gw")
    with entered(netns):
        NftablesDriver(FAMILY, GATEWAY_TABLE).ensure(render_gateway_table(
            GATEWAY_PLAN, GatewayTableSettings("egress0", ("eth0",)),
            held={ip("198.51.100.10")}))
    state = tmp_path / "state"
    state.mkdir()
    config = write_config(tmp_path, f"""\
        name: gw-a
        snapshot: {tmp_path}/snapshot
        stateDirectory: {state}
        uplink: eth0
        tunnel:
          peers: []
        """)
    plan_file = state / "plan.json"
    plan_file.write_text(json.dumps(gateway_target_to_dict(GatewayTarget(GATEWAY_PLAN))))

    answer = explain(netns, config, "10.244.2.7", "192.0.2.9")
    assert answer["gateway"] == "gw-a" and answer["planGeneration"] == 4
    assert answer["kernel"] == {"verdict": "snat", "policy": "payments", "role": "active",
                                "egressIP": "198.51.100.10", "counter": "rule0", "packets": 0}
    assert answer["agrees"] is True
    assert explain(netns, config, "10.244.9.9", "192.0.2.9")["kernel"] == {
        "verdict": "drop", "reason": "no-rule"}

    # A newer plan that no longer selects 10.244.2.7, not applied yet: the kernel still SNATs.
    newer = GatewayPlan("gw-a", generation=5, rules=(
        SnatRule("payments", Role.ACTIVE, frozenset({ip("10.244.1.5")}),
                 (net("192.0.2.0/24"),), ip("198.51.100.10")),))
    plan_file.write_text(json.dumps(gateway_target_to_dict(GatewayTarget(newer))))
    answer = explain(netns, config, "10.244.2.7", "192.0.2.9")
    assert (answer["kernel"]["verdict"], answer["plan"], answer["agrees"]) == (
        "snat", {"verdict": "drop", "reason": "no-rule"}, False)


def test_a_node_answers_from_its_kernel_and_recognises_a_fast_failover(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    netns = sandbox.netns("node")
    driver = NftablesDriver(FAMILY, STEER_TABLE)
    with entered(netns):
        driver.ensure(render_steer_table(NODE_PLAN, STEER))
    state = tmp_path / "state"
    state.mkdir()
    config = write_config(tmp_path, f"""\
        node: node-1
        snapshot: {tmp_path}/snapshot
        stateDirectory: {state}
        tunnel:
          gateways:
            - name: gw-a
              publicKey: "{KEY}"
        """)
    (state / "plan.json").write_text(json.dumps(node_target_to_dict(NodeTarget(NODE_PLAN))))

    answer = explain(netns, config, "10.244.1.5", "192.0.2.9")
    assert answer["node"] == "node-1" and answer["planGeneration"] == 5
    assert (answer["kernel"]["verdict"], answer["kernel"]["gateway"], answer["agrees"]) == (
        "tunnel", "gw-a", True)
    assert explain(netns, config, "10.244.1.5", "10.96.0.1")["kernel"] == {
        "verdict": "not-steered", "reason": "cluster-internal"}

    with entered(netns):
        driver.ensure(render_steer_table(NODE_PLAN, STEER, active={"payments": "gw-b"}))
    answer = explain(netns, config, "10.244.1.5", "192.0.2.9")
    assert (answer["kernel"]["gateway"], answer["agrees"]) == ("gw-b", True)
    assert answer["notes"] == ["fast failover in force: the plan's gateway gw-a is down, new "
                               "connections go to its standby gw-b"]
