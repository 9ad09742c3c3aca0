"""`gatewayd agent` in Kubernetes mode against the fake API server: join, status,
observedGeneration, Lease renewal, SIGTERM, and API outages.

The agent runs as a process in a throwaway network namespace (it programs WireGuard, nftables
and addresses there); the fake API server listens inside that namespace. No traffic flows:
the lab tests (tests/lab/test_k8s_*.py) do that.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fakecluster.fakeapi import FakeApiServer
from test_controller_harness import public_key

from gatewayd.api.sourceslices import SourceSlice, shard_rule
from gatewayd.controller.slicing import slice_object
from gatewayd.lab.netns import entered
from gatewayd.lab.sandboxed import HOST_ADDRESS, DaemonSandbox
from gatewayd.probe import (
    GATEWAY_TUNNEL_ADDRESS,
    PROBE_PORT,
    ProbeRequest,
    decode_reply,
    encode_request,
)

pytestmark = [pytest.mark.kube, pytest.mark.lab]  # the daemons run in network namespaces

NAME = "gw-kube"
NAMESPACE = "gatewayd-system"
LEASE = f"egressgateway-{NAME}"
TUNNEL = "ktgw0"  # unique on the machine: wireguard-go's sockets are shared by namespaces
TIMEOUT = 20.0
RULE = {"policy": "pay", "role": "active", "egressIP": "198.51.100.70",
        "sources": ["10.244.1.10"], "destinations": ["198.51.100.10/32"]}


PEER: dict[str, Any] = {"name": "node1", "publicKey": public_key("node1"),
                        "endpoint": "192.0.2.21:51821",
                        "allowedIPs": ["10.244.1.0/24", "100.127.0.2/32"]}


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[DaemonSandbox]:
    if os.geteuid() != 0:
        pytest.skip("the agent needs root (a network namespace of its own)")
    with DaemonSandbox("gwdkagent-", tmp_path, FakeApiServer()) as box:
        box.interfaces.add(TUNNEL)
        yield box


def config(box: DaemonSandbox) -> dict[str, Any]:
    return {
        "name": NAME,
        "labels": {"site": "dc1"},
        "kubernetes": {"kubeconfig": str(box.kubeconfig), "namespace": NAMESPACE,
                       "leaseDurationSeconds": 4, "leaseRenewSeconds": 0.5},
        "stateDirectory": str(box.directory / "state"),
        "uplink": "eth0",
        "egressIPPools": [{"cidr": "198.51.100.64/27"}],
        "tunnel": {"interface": TUNNEL, "listenPort": 51820},
        "reconcile": {"pollSeconds": 0.2, "repairSeconds": 1},
    }


def gateway(box: DaemonSandbox) -> dict[str, Any]:
    return box.api.get("egressgateways", NAME) or {}


def status(box: DaemonSandbox) -> dict[str, Any]:
    return gateway(box).get("status") or {}


def condition(box: DaemonSandbox, kind: str) -> dict[str, Any]:
    return next((c for c in status(box).get("conditions", []) if c["type"] == kind), {})


def applied(box: DaemonSandbox) -> bool:
    """The agent reports the object's current generation as applied, and is Ready."""
    obj = gateway(box)
    generation = (obj.get("metadata") or {}).get("generation")
    return generation is not None and status(box).get("observedGeneration") == generation \
        and condition(box, "Ready").get("status") == "True"


def set_spec(box: DaemonSandbox, spec: dict[str, Any]) -> None:
    """Write the spec as the controller would."""
    obj = gateway(box)
    box.api.put({**obj, "spec": spec})


def renew_time(box: DaemonSandbox) -> str | None:
    lease = box.api.get("leases", LEASE, NAMESPACE) or {}
    return (lease.get("spec") or {}).get("renewTime")


def start_with_spec(box: DaemonSandbox, **settings: Any) -> None:
    """The EgressGateway exists with a spec (peers and RULE) before the agent starts (with
    config(box) plus `settings`)."""
    box.api.put({
        "apiVersion": "egress.gatewayd.io/v1alpha1", "kind": "EgressGateway",
        "metadata": {"name": NAME}, "spec": {"peers": [PEER], "rules": [RULE]},
    })
    box.start("agent", {**config(box), **settings})


def test_joins_creates_its_gateway_and_reports_its_host(sandbox: DaemonSandbox) -> None:
    sandbox.start("agent", config(sandbox))
    sandbox.wait(lambda: applied(sandbox), TIMEOUT, "the agent to report generation 1")
    obj = gateway(sandbox)
    assert obj["metadata"]["labels"] == {"kubernetes.io/hostname": NAME, "site": "dc1"}
    found = status(sandbox)
    key_file = sandbox.directory / "state" / "wireguard.key"
    expected_key = subprocess.run(["wg", "pubkey"], input=key_file.read_text(), text=True,
                                  capture_output=True, check=True).stdout.strip()
    assert found["publicKey"] == expected_key
    assert found["endpoint"] == f"{HOST_ADDRESS}:51820"
    assert found["addresses"] == [{"type": "InternalIP", "address": HOST_ADDRESS}]
    assert {"name": "eth0", "addresses": [f"{HOST_ADDRESS}/24"], "defaultRouteV4": True} \
        in found["interfaces"]
    assert TUNNEL not in {i["name"] for i in found["interfaces"]}
    assert found["egressIPPools"] == [{"cidr": "198.51.100.64/27", "interface": "eth0"}]
    assert {c["type"]: c["status"] for c in found["conditions"]} == {
        "Ready": "True", "TunnelsUp": "True", "SNATProgrammed": "True",
        "EgressIPsPresent": "True", "StateSaved": "True"}


def test_adopts_its_gateway_keeps_other_labels_and_follows_the_spec(
    sandbox: DaemonSandbox,
) -> None:
    sandbox.api.put({
        "apiVersion": "egress.gatewayd.io/v1alpha1", "kind": "EgressGateway",
        "metadata": {"name": NAME, "labels": {"team": "payments", "site": "old"}},
        "spec": {"peers": [PEER], "rules": [RULE]},
    })
    sandbox.start("agent", config(sandbox))
    sandbox.wait(lambda: applied(sandbox), TIMEOUT, "the agent to apply the spec")
    assert gateway(sandbox)["metadata"]["labels"] == {
        "team": "payments", "site": "dc1", "kubernetes.io/hostname": NAME}
    table = sandbox.nft("list", "table", "inet", "gatewayd")
    assert "snat ip to 198.51.100.70" in table and "10.244.1.10" in table
    assert PEER["publicKey"] in sandbox.cmd("wg", "show", TUNNEL, "peers")
    routes = sandbox.cmd("ip", "route", "show", "dev", TUNNEL)
    assert "10.244.1.0/24" in routes and "100.127.0.2" in routes
    assert "100.127.0.1/32" in sandbox.cmd("ip", "-br", "addr", "show", "dev", TUNNEL)

    # A new peer is a new generation, applied and reported.
    second = {**PEER, "name": "node2", "publicKey": public_key("node2"),
              "allowedIPs": ["10.244.2.0/24"]}
    set_spec(sandbox, {"peers": [PEER, second], "rules": [RULE]})
    sandbox.wait(lambda: status(sandbox).get("observedGeneration") == 2, TIMEOUT,
                 "generation 2 to be reported")
    assert second["publicKey"] in sandbox.cmd("wg", "show", TUNNEL, "peers")
    assert {p["name"] for p in status(sandbox)["peers"]} == {"node1", "node2"}


def test_a_new_generation_with_the_same_plan_is_reported_without_programming(
    sandbox: DaemonSandbox,
) -> None:
    sandbox.start("agent", config(sandbox))
    sandbox.wait(lambda: applied(sandbox), TIMEOUT, "the agent to report generation 1")
    set_spec(sandbox, {"rules": [RULE]})
    sandbox.wait(lambda: status(sandbox).get("observedGeneration") == 2, TIMEOUT,
                 "generation 2")
    programmed = sandbox.events("plan-applied")
    set_spec(sandbox, {"rules": [RULE], "peers": []})  # generation 3, the same plan
    sandbox.wait(lambda: status(sandbox).get("observedGeneration") == 3, TIMEOUT,
                 "generation 3")
    assert sandbox.events("plan-applied") == programmed


def test_an_unusable_spec_keeps_the_plan_in_force(sandbox: DaemonSandbox) -> None:
    sandbox.start("agent", config(sandbox))
    sandbox.wait(lambda: applied(sandbox), TIMEOUT, "the agent to report generation 1")
    set_spec(sandbox, {"rules": [RULE]})
    sandbox.wait(lambda: status(sandbox).get("observedGeneration") == 2, TIMEOUT,
                 "generation 2")
    set_spec(sandbox, {"rules": [{**RULE, "egressIP": "not-an-ip"}]})
    sandbox.wait(lambda: sandbox.events("plan-invalid") > 0, TIMEOUT,
                 "the bad spec to be reported")
    assert status(sandbox)["observedGeneration"] == 2
    assert "snat ip to 198.51.100.70" in sandbox.nft("list", "table", "inet", "gatewayd")


def put_slices(box: DaemonSandbox, slices: list[SourceSlice], gateway: str = NAME) -> None:
    for piece in slices:
        box.api.put(slice_object(replace(piece, gateway=gateway)))


def test_sources_in_slices_are_applied_once_every_slice_the_spec_names_is_there(
    sandbox: DaemonSandbox,
) -> None:
    sandbox.start("agent", config(sandbox))
    sandbox.wait(lambda: applied(sandbox), TIMEOUT, "the agent to report generation 1")
    set_spec(sandbox, {"rules": [RULE]})  # the form before slices
    sandbox.wait(lambda: status(sandbox).get("observedGeneration") == 2, TIMEOUT,
                 "generation 2")
    assert status(sandbox)["features"] == ["sourceSlices"]
    # The same plan with its sources in a slice (the controller's next spec after an upgrade):
    # reported, nothing programmed again.
    programmed = sandbox.events("plan-applied")
    same, (piece,) = shard_rule(NAME, RULE, previous=0)
    put_slices(sandbox, [piece])
    set_spec(sandbox, {"rules": [same]})
    sandbox.wait(lambda: status(sandbox).get("observedGeneration") == 3, TIMEOUT,
                 "generation 3")
    assert sandbox.events("plan-applied") == programmed

    sources = [f"10.244.1.{i}" for i in range(10, 250)] + [f"10.244.2.{i}" for i in range(2, 250)]
    compact, slices = shard_rule(NAME, {**RULE, "sources": sources}, previous=2)
    assert len(slices) == 2
    # The spec arrives first, one slice is there, the other is another gateway's or stale.
    put_slices(sandbox, slices[:1])
    put_slices(sandbox, slices[1:], gateway="gw-other")
    set_spec(sandbox, {"rules": [compact]})
    sandbox.wait(lambda: "generation 4: waiting for" in sandbox.log(), TIMEOUT,
                 "the agent to wait for the slices")
    assert status(sandbox)["observedGeneration"] == 3
    assert "10.244.2.2" not in sandbox.nft("list", "table", "inet", "gatewayd")
    put_slices(sandbox, slices[1:])
    sandbox.wait(lambda: status(sandbox).get("observedGeneration") == 4, TIMEOUT,
                 "generation 4, once both slices are there")
    table = sandbox.nft("list", "table", "inet", "gatewayd")
    assert "10.244.2.249" in table and "10.244.1.10" in table
    # One pod less: one slice changes, then the spec names its new digest.
    fewer = [s for s in sources if s != "10.244.2.249"]
    compact, changed = shard_rule(NAME, {**RULE, "sources": fewer}, previous=2)
    put_slices(sandbox, [c for c, s in zip(changed, slices, strict=True) if c != s])
    set_spec(sandbox, {"rules": [compact]})
    sandbox.wait(lambda: status(sandbox).get("observedGeneration") == 5, TIMEOUT,
                 "generation 5")
    assert "10.244.2.249" not in sandbox.nft("list", "table", "inet", "gatewayd")


def test_renews_its_lease(sandbox: DaemonSandbox) -> None:
    sandbox.start("agent", config(sandbox))
    sandbox.wait(lambda: renew_time(sandbox) is not None, TIMEOUT, "the Lease")
    lease = sandbox.api.get("leases", LEASE, NAMESPACE)
    assert lease["spec"]["holderIdentity"] == NAME
    assert lease["spec"]["leaseDurationSeconds"] == 4
    first = renew_time(sandbox)
    sandbox.wait(lambda: renew_time(sandbox) != first, TIMEOUT, "a renewal")
    assert datetime.fromisoformat(renew_time(sandbox) or "") > datetime.fromisoformat(
        first or "")


def test_sigterm_reports_not_ready_first_and_leaves_the_data_plane(
    sandbox: DaemonSandbox,
) -> None:
    start_with_spec(sandbox)
    sandbox.wait(lambda: applied(sandbox), TIMEOUT, "the agent to apply the spec")
    assert sandbox.stop(signal.SIGTERM) == 0
    ready = condition(sandbox, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Stopping")
    assert "snat ip to 198.51.100.70" in sandbox.nft("list", "table", "inet", "gatewayd")
    assert PEER["publicKey"] in sandbox.cmd("wg", "show", TUNNEL, "peers")


def test_an_api_outage_changes_nothing_and_the_return_reprograms_nothing(
    sandbox: DaemonSandbox,
) -> None:
    start_with_spec(sandbox)
    sandbox.wait(lambda: applied(sandbox), TIMEOUT, "the agent to apply the spec")
    programmed = sandbox.events("plan-applied")
    table = sandbox.nft("-a", "list", "table", "inet", "gatewayd")  # with handles

    sandbox.api.go_down()
    # The agent notices (a renewal fails) and goes on: its repair passes keep running.
    sandbox.wait(lambda: "unreachable or refuses" in sandbox.log(), TIMEOUT,
                 "the agent to notice the outage")
    local = sandbox.directory / "state" / "status.json"
    written = local.stat().st_mtime_ns
    sandbox.wait(lambda: local.stat().st_mtime_ns != written, TIMEOUT, "a repair pass")
    assert sandbox.running and json.loads(local.read_text())["ready"] is True
    assert sandbox.nft("-a", "list", "table", "inet", "gatewayd") == table

    before = renew_time(sandbox)
    sandbox.api_up()
    sandbox.wait(lambda: renew_time(sandbox) != before, TIMEOUT, "renewals to resume")
    sandbox.wait(lambda: "answers again" in sandbox.log(), TIMEOUT, "the agent to reconnect")
    assert sandbox.events("plan-applied") == programmed
    assert sandbox.nft("-a", "list", "table", "inet", "gatewayd") == table
    assert applied(sandbox)


def test_starts_from_its_saved_plan_while_the_api_is_down(sandbox: DaemonSandbox) -> None:
    start_with_spec(sandbox)
    sandbox.wait(lambda: applied(sandbox), TIMEOUT, "the agent to apply the spec")
    assert sandbox.stop(signal.SIGTERM) == 0
    sandbox.nft("delete", "table", "inet", "gatewayd")  # as after a reboot
    sandbox.api.go_down()
    sandbox.log_path.unlink()

    sandbox.start("agent", config(sandbox))
    sandbox.wait(lambda: sandbox.events("plan-applied") == 1, TIMEOUT,
                 "the saved plan to be restored")
    assert "snat ip to 198.51.100.70" in sandbox.nft("list", "table", "inet", "gatewayd")
    sandbox.api_up()
    sandbox.wait(lambda: applied(sandbox), TIMEOUT, "the agent to report again")
    assert sandbox.events("plan-applied") == 1  # the restored plan is the spec's


class ProbingNode:
    """Probes the agent from inside the sandbox as a cloud node's steer does (every 50 ms,
    saying it sends `pay` here). With `has_standby`, when the agent answers that it is leaving
    (or after 3 unanswered probes) it moves `pay` to a standby and says so (`away`), as
    steer's fast failover would."""

    def __init__(self, box: DaemonSandbox, has_standby: bool) -> None:
        with entered(box.netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(0.05)
        self.has_standby = has_standby
        self.answered = 0
        self.moved = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProbingNode:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def _run(self) -> None:
        sequence, misses = 0, 0
        while not self._stop.is_set():
            sequence += 1
            moved = self.moved.is_set()
            request = ProbeRequest("node1", sequence, frozenset() if moved else {"pay"},
                                   {"pay"} if moved else frozenset())
            self.sock.sendto(encode_request(request), (str(GATEWAY_TUNNEL_ADDRESS), PROBE_PORT))
            try:
                leaving = decode_reply(self.sock.recv(2048)).leaving
                self.answered, misses = self.answered + 1, 0
            except TimeoutError:
                leaving, misses = False, misses + 1
            if (leaving or misses >= 3) and self.has_standby:
                self.moved.set()
            self._stop.wait(0.05)


def egress_ip_present(box: DaemonSandbox) -> bool:
    return "198.51.100.70/" in box.cmd("ip", "-br", "addr", "show", "dev", "eth0")


@pytest.mark.parametrize("has_standby", [True, False], ids=["standby", "no-standby"])
def test_sigterm_hands_over_the_egress_ips_the_nodes_move(
    sandbox: DaemonSandbox, has_standby: bool,
) -> None:
    """A stopping agent gives up the egress IP of a policy the nodes moved to a standby (so
    the standby can claim it), and keeps that of a policy that has nowhere else to go."""
    # Time enough for the node to notice and move on a busy machine; with a standby the
    # agent stops as soon as it holds nothing.
    start_with_spec(sandbox, failover={"handoverSeconds": 10 if has_standby else 1})
    sandbox.wait(lambda: applied(sandbox), TIMEOUT, "the agent to apply the spec")
    with ProbingNode(sandbox, has_standby) as node:
        sandbox.wait(lambda: egress_ip_present(sandbox) and node.answered > 0, TIMEOUT,
                     "the agent to hold the egress IP the node's traffic needs")
        assert sandbox.stop(signal.SIGTERM) == 0
        assert node.moved.is_set() == has_standby
        assert egress_ip_present(sandbox) != has_standby
        if not has_standby:
            # started again, it keeps the address until the probes have had their say
            answered = node.answered
            sandbox.start("agent", config(sandbox))
            sandbox.wait(lambda: node.answered > answered + 10, TIMEOUT, "answers again")
            assert egress_ip_present(sandbox)
            assert sandbox.events("egress-ip-removed") == 0, sandbox.log()
    # the SNAT rules stay either way (the data plane outlives the daemon)
    assert "snat ip to 198.51.100.70" in sandbox.nft("list", "table", "inet", "gatewayd")


def test_new_labels_reach_the_gateway_object_after_a_reload(sandbox: DaemonSandbox) -> None:
    sandbox.start("agent", config(sandbox))
    sandbox.wait(lambda: status(sandbox).get("publicKey") is not None, TIMEOUT, "the join")
    sandbox.write_config({**config(sandbox), "labels": {"site": "dc2", "tier": "gold"}})
    sandbox.signal(signal.SIGHUP)
    sandbox.wait(lambda: gateway(sandbox)["metadata"]["labels"] == {
        "kubernetes.io/hostname": NAME, "site": "dc2", "tier": "gold"}, TIMEOUT,
        "the new labels on the EgressGateway")
