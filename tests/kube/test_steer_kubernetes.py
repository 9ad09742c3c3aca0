"""`gatewayd steer` in Kubernetes mode against the fake API server: join, the plan from the
EgressNode spec (tunnels per gateway with stable slots, tunnel address, steering), status,
observedGeneration and API outages.

steer runs as a process in a throwaway network namespace; the fake API server listens inside
it. The gateways named in the specs do not exist: their tunnels never answer (the lab tests,
tests/lab/test_k8s_*.py, have real gateways and traffic).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakecluster.fakeapi import FakeApiServer
from test_controller_harness import public_key

from gatewayd.lab.sandboxed import HOST_ADDRESS, DaemonSandbox

pytestmark = [pytest.mark.kube, pytest.mark.lab]  # the daemons run in network namespaces

NODE = "node-kube"
PREFIX = "kt1-"
TIMEOUT = 20.0


GATEWAYS = [
    {"name": "gw1", "publicKey": public_key("gw1"), "endpoint": "198.51.100.12:51820"},
    {"name": "gw2", "publicKey": public_key("gw2"), "endpoint": "198.51.100.13:51820"},
]
RULE = {"policy": "pay", "action": "tunnel", "gateway": "gw1", "standby": "gw2",
        "sources": ["10.244.1.10"], "destinations": ["203.0.113.0/24"]}
SPEC = {"gateways": GATEWAYS, "tunnelAddress": "100.127.0.2",
        "clusterInternal": ["10.244.0.0/16"], "rules": [RULE]}


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[DaemonSandbox]:
    if os.geteuid() != 0:
        pytest.skip("steer needs root (a network namespace of its own)")
    with DaemonSandbox("gwdksteer-", tmp_path, FakeApiServer()) as box:
        box.interfaces.update(f"{PREFIX}{g['name']}" for g in GATEWAYS)
        box.interfaces.add(f"{PREFIX}gw0")
        yield box


def config(box: DaemonSandbox) -> dict[str, Any]:
    return {
        "node": NODE,
        "kubernetes": {"kubeconfig": str(box.kubeconfig)},
        "stateDirectory": str(box.directory / "state"),
        "tunnel": {"interfacePrefix": PREFIX, "listenPort": 51821},
        "failover": {"probeIntervalSeconds": 0.05},
        "reconcile": {"pollSeconds": 0.2, "repairSeconds": 1},
    }


def node(box: DaemonSandbox) -> dict[str, Any]:
    return box.api.get("egressnodes", NODE) or {}


def status(box: DaemonSandbox) -> dict[str, Any]:
    return node(box).get("status") or {}


def applied(box: DaemonSandbox, generation: int | None = None) -> bool:
    obj = node(box)
    wanted = generation or (obj.get("metadata") or {}).get("generation")
    ready = any(c["type"] == "Ready" and c["status"] == "True"
                for c in status(box).get("conditions", []))
    return wanted is not None and status(box).get("observedGeneration") == wanted and ready


def set_spec(box: DaemonSandbox, spec: dict[str, Any]) -> None:
    box.api.put({**node(box), "spec": spec})


def start_with_spec(box: DaemonSandbox) -> None:
    """steer joins (generation 1), then follows SPEC (generation 2)."""
    box.start("steer", config(box))
    box.wait(lambda: applied(box), TIMEOUT, "steer to report generation 1")
    set_spec(box, SPEC)
    box.wait(lambda: applied(box, 2), TIMEOUT, "steer to apply the spec")


def test_joins_with_an_egress_node_owned_by_its_node(sandbox: DaemonSandbox) -> None:
    node_object = sandbox.api.put({"apiVersion": "v1", "kind": "Node",
                                   "metadata": {"name": NODE}})
    sandbox.start("steer", config(sandbox))
    sandbox.wait(lambda: applied(sandbox), TIMEOUT, "steer to report generation 1")
    owners = node(sandbox)["metadata"]["ownerReferences"]
    assert owners == [{"apiVersion": "v1", "kind": "Node", "name": NODE,
                       "uid": node_object["metadata"]["uid"]}]
    found = status(sandbox)
    assert found["endpoint"] == f"{HOST_ADDRESS}:51821"
    assert len(found["publicKey"]) == 44
    assert found["gatewayPorts"] == {} and found["failovers"] == []
    # the DaemonSet's probes, on the node
    for path in ("healthz", "readyz"):
        assert sandbox.cmd("curl", "-s", f"http://{HOST_ADDRESS}:9441/{path}") == "ok\n"
    # Prometheus metrics beside them, and on the node's loopback (the default address)
    for url in (f"http://{HOST_ADDRESS}:9441/metrics", "http://127.0.0.1:9641/metrics"):
        sandbox.wait(lambda u=url: 'gatewayd_ready{role="steer"} 1.0' in sandbox.cmd(
            "curl", "-s", u), TIMEOUT, f"steer's metrics at {url}")


def test_follows_the_spec_with_one_tunnel_per_gateway(sandbox: DaemonSandbox) -> None:
    start_with_spec(sandbox)
    for index, gateway in enumerate(GATEWAYS):
        interface = f"{PREFIX}{gateway['name']}"
        dump = sandbox.cmd("wg", "show", interface, "dump").splitlines()
        assert dump[0].split("\t")[2] == str(51821 + index)  # listen port of its slot
        peer = dump[1].split("\t")
        assert (peer[0], peer[2]) == (gateway["publicKey"], gateway["endpoint"])
        assert "100.127.0.2/32" in sandbox.cmd("ip", "-br", "addr", "show", "dev", interface)
    rules = sandbox.cmd("ip", "rule", "show")
    assert "fwmark 0x10/0xf0 lookup 26700" in rules and "fwmark 0x20/0xf0 lookup 26701" in rules
    table = sandbox.nft("list", "table", "inet", "gatewayd-steer")
    assert "10.244.1.10" in table and "203.0.113.0/24" in table
    assert status(sandbox)["gatewayPorts"] == {"gw1": 51821, "gw2": 51822}
    # The tunnels never answer: after the first-probe grace the gateways are unreachable,
    # and with both down nothing fails over.
    sandbox.wait(lambda: [g["reachable"] for g in status(sandbox).get("gateways", [])]
                 == [False, False], TIMEOUT, "the probes to give up on both gateways")
    assert status(sandbox)["failovers"] == []


def test_gateways_keep_their_slots_and_departed_ones_lose_their_tunnel(
    sandbox: DaemonSandbox,
) -> None:
    start_with_spec(sandbox)
    # gw0 sorts first but gets a new slot; gw1 leaves; gw2 keeps its mark and port
    gw0 = {"name": "gw0", "publicKey": public_key("gw0")}
    set_spec(sandbox, {**SPEC, "gateways": [gw0, GATEWAYS[1]],
                       "rules": [{**RULE, "gateway": "gw2", "standby": "gw0"}]})
    sandbox.wait(lambda: applied(sandbox, 3), TIMEOUT, "steer to apply the new spec")
    assert status(sandbox)["gatewayPorts"] == {"gw0": 51823, "gw2": 51822}
    links = sandbox.cmd("ip", "-br", "link")
    assert f"{PREFIX}gw0" in links and f"{PREFIX}gw2" in links and f"{PREFIX}gw1" not in links
    assert "fwmark 0x20/0xf0 lookup 26701" in sandbox.cmd("ip", "rule", "show")
    slots = json.loads((sandbox.directory / "state" / "slots.json").read_text())
    assert slots == {"gw0": 2, "gw1": 0, "gw2": 1}


def test_a_gateway_missing_from_the_gateways_list_drops_its_traffic(
    sandbox: DaemonSandbox,
) -> None:
    sandbox.start("steer", config(sandbox))
    sandbox.wait(lambda: applied(sandbox), TIMEOUT, "steer to report generation 1")
    set_spec(sandbox, {**SPEC, "gateways": [GATEWAYS[1]]})
    sandbox.wait(lambda: applied(sandbox, 2), TIMEOUT, "steer to apply the spec")
    table = sandbox.nft("list", "table", "inet", "gatewayd-steer")
    assert "pay drop" in table  # no tunnel to gw1: dropped, never sent with the node's IP


def test_an_api_outage_keeps_the_plan_and_the_return_reprograms_nothing(
    sandbox: DaemonSandbox,
) -> None:
    start_with_spec(sandbox)
    programmed = sandbox.events("plan-applied")
    table = sandbox.nft("-a", "list", "table", "inet", "gatewayd-steer")
    sandbox.api.go_down()
    local = sandbox.directory / "state" / "status.json"
    written = local.stat().st_mtime_ns
    sandbox.wait(lambda: local.stat().st_mtime_ns != written, TIMEOUT, "a repair pass")
    sandbox.api_up()
    sandbox.wait(lambda: sandbox.running and applied(sandbox, 2), TIMEOUT, "steer to report")
    assert sandbox.events("plan-applied") == programmed
    assert sandbox.nft("-a", "list", "table", "inet", "gatewayd-steer") == table


def test_restarts_from_its_saved_plan_and_slots(sandbox: DaemonSandbox) -> None:
    start_with_spec(sandbox)
    assert sandbox.stop(signal.SIGTERM) == 0
    sandbox.api.go_down()
    sandbox.nft("delete", "table", "inet", "gatewayd-steer")
    sandbox.log_path.unlink()
    sandbox.start("steer", config(sandbox))
    sandbox.wait(lambda: sandbox.events("plan-applied") == 1, TIMEOUT,
                 "the saved plan to be restored")
    assert "10.244.1.10" in sandbox.nft("list", "table", "inet", "gatewayd-steer")
    assert "fwmark 0x20/0xf0 lookup 26701" in sandbox.cmd("ip", "rule", "show")


def test_gatewayctl_status_and_teardown_know_the_tunnels_from_the_plan(
    sandbox: DaemonSandbox,
) -> None:
    start_with_spec(sandbox)
    gatewayctl = [sys.executable, "-m", "gatewayd.cli.gatewayctl"]
    path = str(sandbox.directory / "config.yaml")
    report = json.loads(sandbox.cmd(*gatewayctl, "status", "--config", path, "-o", "json"))
    assert {(p["interface"], p["publicKey"]) for p in report["peers"]} == {
        (f"{PREFIX}{g['name']}", g["publicKey"]) for g in GATEWAYS}
    assert report["running"] and report["mode"] == "kubernetes"
    assert sandbox.stop(signal.SIGTERM) == 0
    removed = sandbox.cmd(*gatewayctl, "teardown", "--config", path).splitlines()
    state = sandbox.directory / "state"
    assert removed == [
        "removed nftables table inet gatewayd-steer",
        "removed policy routing rules",
        f"removed wireguard interface {PREFIX}gw1",
        f"removed wireguard interface {PREFIX}gw2",
        f"removed {state / 'plan.json'}",
        f"removed {state / 'slots.json'}",
    ]
    assert PREFIX not in sandbox.cmd("ip", "-br", "link")
    assert "fwmark" not in sandbox.cmd("ip", "rule", "show")
