"""The agent on a gateway host that goes wrong under it: a full state directory, and a
teardown (package removal) with a config that no longer loads.

The agent runs in Kubernetes mode in a throwaway network namespace with the fake API server,
as in test_agent_kubernetes.py; the full disk is a real one (a small tmpfs as the state
directory, filled up).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from fakecluster.fakeapi import FakeApiServer
from test_agent_kubernetes import PEER

from gatewayd.dataplane.addresses import AddressDriver
from gatewayd.lab.netns import entered
from gatewayd.lab.sandboxed import HOST_ADDRESS, DaemonSandbox

pytestmark = [pytest.mark.kube, pytest.mark.lab]  # the daemons run in network namespaces

NAME = "gw-faults"
TUNNEL = "kfgw0"  # unique on the machine: wireguard-go's sockets are shared by namespaces
TIMEOUT = 20.0
EGRESS_IP = "198.51.100.70"


def rule(destination: str) -> dict[str, Any]:
    return {"policy": "pay", "role": "active", "egressIP": EGRESS_IP,
            "sources": ["10.244.1.10"], "destinations": [destination]}


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[DaemonSandbox]:
    if os.geteuid() != 0:
        pytest.skip("the agent needs root (a network namespace of its own)")
    with DaemonSandbox("gwdkfault-", tmp_path, FakeApiServer()) as box:
        box.interfaces.add(TUNNEL)
        yield box


def state_directory(box: DaemonSandbox) -> Path:
    return box.directory / "state"


def config(box: DaemonSandbox) -> dict[str, Any]:
    return {
        "name": NAME,
        "kubernetes": {"kubeconfig": str(box.kubeconfig), "namespace": "gatewayd-system",
                       "leaseDurationSeconds": 4, "leaseRenewSeconds": 0.5},
        "stateDirectory": str(state_directory(box)),
        "uplink": "eth0",
        "egressIPPools": [{"cidr": "198.51.100.64/27"}],
        "tunnel": {"interface": TUNNEL, "listenPort": 51820},
        "reconcile": {"pollSeconds": 0.2, "repairSeconds": 1},
    }


def gateway(box: DaemonSandbox) -> dict[str, Any]:
    return box.api.get("egressgateways", NAME) or {}


def condition(box: DaemonSandbox, kind: str) -> dict[str, Any]:
    status = gateway(box).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


def reports(box: DaemonSandbox, generation: int) -> bool:
    """The agent reports `generation` as applied, and is Ready."""
    status = gateway(box).get("status") or {}
    return status.get("observedGeneration") == generation \
        and condition(box, "Ready").get("status") == "True"


def set_rules(box: DaemonSandbox, *rules: dict[str, Any]) -> int:
    """Write the spec as the controller would; returns the new generation."""
    obj = box.api.put({**gateway(box), "spec": {"peers": [PEER], "rules": list(rules)}})
    return int(obj["metadata"]["generation"])


def start(box: DaemonSandbox) -> None:
    box.api.put({
        "apiVersion": "egress.gatewayd.io/v1alpha1", "kind": "EgressGateway",
        "metadata": {"name": NAME},
        "spec": {"peers": [PEER], "rules": [rule("198.51.100.10/32")]},
    })
    box.start("agent", config(box))
    box.wait(lambda: reports(box, 1), TIMEOUT, "the agent to report generation 1")


def saved_generation(box: DaemonSandbox) -> int | None:
    try:
        return int(json.loads((state_directory(box) / "plan.json").read_text())["generation"])
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture
def small_disk(sandbox: DaemonSandbox) -> Iterator[Path]:
    """The state directory on a tmpfs of 1 MiB, mounted before the agent starts."""
    directory = state_directory(sandbox)
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0750", "gwdkfault", directory],
                   check=True)
    try:
        yield directory
    finally:
        sandbox.stop()
        subprocess.run(["umount", "-l", directory], check=True)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; returns it."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    with filler.open("wb", buffering=0) as out:
        while True:
            try:
                out.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return filler


def test_a_full_disk_does_not_stop_the_status_and_the_plan_is_saved_later(
    sandbox: DaemonSandbox, small_disk: Path,
) -> None:
    start(sandbox)
    assert saved_generation(sandbox) == 1
    filler = fill(small_disk)

    generation = set_rules(sandbox, rule("198.51.100.20/32"))
    # The kernel is programmed, so the controller hears of it (make-before-break goes on) ...
    sandbox.wait(lambda: reports(sandbox, generation), TIMEOUT,
                 "the new generation reported despite the full disk")
    assert "198.51.100.20" in sandbox.nft("list", "table", "inet", "gatewayd")
    # ... with the disk error, in the status and the journal.
    sandbox.wait(lambda: condition(sandbox, "StateSaved").get("status") == "False",
                 TIMEOUT, "StateSaved=False")
    saved = condition(sandbox, "StateSaved")
    assert saved["reason"] == "WriteFailed"
    assert "plan.json" in saved["message"] and "No space left on device" in saved["message"]
    assert sandbox.events("state-write-failed") >= 1
    assert saved_generation(sandbox) == 1
    assert sandbox.running
    # A half-written temporary file would hold the space that the retry needs.
    assert sorted(p.name for p in small_disk.iterdir() if p.name.endswith(".tmp")) == []

    filler.unlink()
    sandbox.wait(lambda: saved_generation(sandbox) == generation, TIMEOUT,
                 "the plan saved once the disk has room")
    sandbox.wait(lambda: condition(sandbox, "StateSaved").get("status") == "True",
                 TIMEOUT, "StateSaved=True again")
    status = json.loads((small_disk / "status.json").read_text())
    assert status["generation"] == generation and status["stateError"] is None


# --- teardown ------------------------------------------------------------------------------


def sysctl(box: DaemonSandbox, key: str) -> str:
    return box.cmd("sysctl", "-n", key).strip()


FORWARDING = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")


def teardown(
    box: DaemonSandbox, config_path: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", box.netns, sys.executable, "-m", "gatewayd.cli.gatewayctl",
         "teardown", "--config", str(config_path), *extra],
        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("broken", [True, False], ids=["broken-config", "valid-config"])
def test_teardown_removes_the_tunnel_first_and_restores_the_sysctls(
    sandbox: DaemonSandbox, broken: bool,
) -> None:
    """With a broken config (package removal after a bad edit) from what the state directory
    records; the order and the restored values are the same with a valid one."""
    # A new namespace may inherit the host's values: this host does not forward.
    sandbox.cmd("sysctl", "-qw", *(f"{key}=0" for key in FORWARDING))
    before = {key: sysctl(sandbox, key) for key in FORWARDING}
    assert before == {key: "0" for key in FORWARDING}
    start(sandbox)
    assert {key: sysctl(sandbox, key) for key in FORWARDING} == {key: "1" for key in FORWARDING}
    assert sandbox.stop(signal.SIGTERM) == 0
    # An egress IP the agent held (with no node probing, this one holds none), added as the
    # agent adds them: with its owner mark.
    with entered(sandbox.netns):
        assert AddressDriver().ensure("eth0", {ip_address(EGRESS_IP)}).added
    assert EGRESS_IP in sandbox.cmd("ip", "-br", "addr")
    assert all("blackhole" in sandbox.cmd("ip", f"-{v}", "rule") for v in (4, 6))  # the guard
    if broken:
        path = sandbox.write_config({**config(sandbox), "uplink": 7, "tunnel": "broken"})
        extra: tuple[str, ...] = ("--state-directory", str(state_directory(sandbox)))
    else:
        path, extra = sandbox.directory / "config.yaml", ()

    result = teardown(sandbox, path, *extra)
    assert result.returncode == 0, result.stderr
    assert ("the config is unusable" in result.stderr) == broken
    removed = [line.removeprefix("removed ") for line in result.stdout.splitlines()]
    # Tunnel first: no traffic arrives any more when the filter goes.
    assert removed[:2] == [f"wireguard interface {TUNNEL}", "nftables table inet gatewayd"]
    assert [line.split(" rule ")[0] for line in removed[2:4]] == \
        ["routing guard ipv4", "routing guard ipv6"]
    assert removed[4] == f"egress IP {EGRESS_IP}"
    assert not any("blackhole" in sandbox.cmd("ip", f"-{v}", "rule") for v in (4, 6))
    assert {key: sysctl(sandbox, key) for key in FORWARDING} == before
    assert {f"sysctl {key} (restored)" for key in FORWARDING} <= set(removed)
    assert TUNNEL not in sandbox.cmd("ip", "-br", "link")
    assert sandbox.nft("list", "table", "inet", "gatewayd") == ""
    assert EGRESS_IP not in sandbox.cmd("ip", "-br", "addr")
    assert HOST_ADDRESS in sandbox.cmd("ip", "-br", "addr")  # not the agent's: stays
    assert not (state_directory(sandbox) / "plan.json").exists()
    # Nothing is left for a second one.
    again = teardown(sandbox, path, *extra)
    assert again.returncode == 0 and again.stdout == "", again.stdout
