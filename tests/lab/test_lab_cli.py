"""`gatewayctl lab up|verify|down`, each run as its own process, as an operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns as pyroute2_netns

from gatewayd.lab.topology import (
    DAEMON_HOSTS,
    ECHO_HOSTS,
    NODES,
    PODS,
    PREFIX,
    TUNNEL_INTERFACES,
    Lab,
)

pytestmark = pytest.mark.lab


def gatewayctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gatewayd.cli.gatewayctl", *args],
                          capture_output=True, text=True, timeout=180)


def lab_namespaces() -> list[str]:
    return [n for n in pyroute2_netns.listnetns() if n.startswith(PREFIX)]


def processes_mentioning(text: str) -> list[str]:
    """Command lines (arguments joined by spaces) of running processes that contain `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, UnicodeDecodeError):
                continue
            if text in cmdline:
                found.append(cmdline.strip())
    return found


def lab_tunnel_processes() -> list[str]:
    return [c for c in processes_mentioning("wireguard-go")
            if any(c.endswith(f" {name}") for name in TUNNEL_INTERFACES)]


@pytest.fixture
def lab_dir(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces)")
    directory = tmp_path / "lab"
    try:
        yield directory
    finally:
        Lab(directory).down(remove_directory=False)  # after a failed test; no-op otherwise


def test_without_daemons_only_the_rows_the_gateway_must_serve_fail(lab_dir: Path) -> None:
    """The lab catches a missing data plane: selected pods then leak out with their node IP."""
    up = gatewayctl("lab", "up", "--dir", str(lab_dir), "--no-daemons")
    assert up.returncode == 0, up.stderr
    result = gatewayctl("lab", "verify", "--dir", str(lab_dir), "-o", "json")
    assert result.returncode == 1, result.stderr
    rows = json.loads(result.stdout)["rows"]
    snat = [r for r in rows if r["why"].startswith("snat")]
    # to the payment gateway's addresses: checkout-* and batch-* (IPv4 and IPv6), web-* (IPv6)
    assert len(snat) == 10
    for row in rows:
        assert row["ok"] is (row not in snat), row
    leaked = {node.address for node in NODES} | {node.address6 for node in NODES}
    assert {r["seen"] for r in snat} == leaked  # masqueraded by the node


def test_up_verify_down_each_from_its_own_process(lab_dir: Path, tmp_path: Path) -> None:
    up = gatewayctl("lab", "up", "--dir", str(lab_dir))
    assert up.returncode == 0, up.stderr
    created = lab_namespaces()
    assert len(created) == 1 + len(ECHO_HOSTS) + len(DAEMON_HOSTS) + len(PODS)  # 1: router

    second = gatewayctl("lab", "up", "--dir", str(tmp_path / "second"))
    assert second.returncode == 1
    assert "already exist" in second.stderr
    assert lab_namespaces() == created

    verified = gatewayctl("lab", "verify", "--dir", str(lab_dir))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    rows = len(PODS) * sum(len(host.addresses) for host in ECHO_HOSTS)
    assert f"{rows}/{rows} OK" in verified.stdout

    daemon_configs = [str(lab_dir / host / "config.yaml") for host in DAEMON_HOSTS]
    assert all(processes_mentioning(config) for config in daemon_configs)
    assert lab_tunnel_processes()
    down = gatewayctl("lab", "down", "--dir", str(lab_dir))
    assert down.returncode == 0, down.stderr
    assert lab_namespaces() == []
    assert [processes_mentioning(config) for config in daemon_configs] == [[]] * 4
    assert lab_tunnel_processes() == []
    assert not lab_dir.exists()

    again = gatewayctl("lab", "down", "--dir", str(lab_dir))
    assert again.returncode == 0
    assert "no lab" in again.stdout
