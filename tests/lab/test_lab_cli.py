"""`gatewayctl lab up|verify|down`, each run as its own process, as an operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from pyroute2 import netns as pyroute2_netns

from gatewayd.lab.topology import (
    DAEMON_HOSTS,
    ECHO_HOSTS,
    NODES,
    PODS,
    Lab,
    tunnel_interfaces,
)

pytestmark = pytest.mark.lab


def gatewayctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gatewayd.cli.gatewayctl", *args],
                          capture_output=True, text=True, timeout=180)


def gatewayctl_started(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "gatewayd.cli.gatewayctl", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lab_namespaces(directory: Path) -> list[str]:
    """The namespaces the lab in `directory` created that exist now."""
    existing = set(pyroute2_netns.listnetns())
    return [n for n in Lab(directory).record()["namespaces"] if n in existing]


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


def tunnel_processes(names: Iterable[str]) -> list[str]:
    return [c for c in processes_mentioning("wireguard-go")
            if any(c.endswith(f" {name}") for name in names)]


@pytest.fixture
def lab_dir(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces)")
    directory = tmp_path / "lab"
    try:
        yield directory
    finally:
        Lab(directory).down(remove_directory=False)  # after a failed test; no-op otherwise


@pytest.fixture
def second_lab_dir(lab_dir: Path) -> Iterator[Path]:
    directory = lab_dir.with_name("second")
    try:
        yield directory
    finally:
        Lab(directory).down(remove_directory=False)


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


def test_two_labs_run_side_by_side_each_step_from_its_own_process(
    lab_dir: Path, second_lab_dir: Path,
) -> None:
    """Two developers' labs (or a test run and the demo) on one machine: each takes names of
    its own, both verify at the same time, and removing one leaves the other working."""
    dirs = (lab_dir, second_lab_dir)
    ups = [gatewayctl_started("lab", "up", "--dir", str(d)) for d in dirs]
    for up in ups:
        out, err = up.communicate(timeout=180)
        assert up.returncode == 0, err
    tags = [Lab(d).record()["tag"] for d in dirs]
    assert len(set(tags)) == 2
    namespaces = {d: lab_namespaces(d) for d in dirs}
    for created in namespaces.values():
        assert len(created) == 1 + len(ECHO_HOSTS) + len(DAEMON_HOSTS) + len(PODS)  # router
    assert not set(namespaces[lab_dir]) & set(namespaces[second_lab_dir])

    rows = len(PODS) * sum(len(host.addresses) for host in ECHO_HOSTS)
    verifies = [gatewayctl_started("lab", "verify", "--dir", str(d)) for d in dirs]
    for verify in verifies:
        out, err = verify.communicate(timeout=180)
        assert verify.returncode == 0, out + err
        assert f"{rows}/{rows} OK" in out

    tunnels = {}
    for directory in dirs:
        Lab(directory)  # its names
        tunnels[directory] = tunnel_interfaces()
        assert tunnel_processes(tunnels[directory])
    assert not set(tunnels[lab_dir]) & set(tunnels[second_lab_dir])
    daemon_configs = [str(lab_dir / host / "config.yaml") for host in DAEMON_HOSTS]
    assert all(processes_mentioning(config) for config in daemon_configs)

    down = gatewayctl("lab", "down", "--dir", str(lab_dir))
    assert down.returncode == 0, down.stderr
    existing = set(pyroute2_netns.listnetns())
    assert not set(namespaces[lab_dir]) & existing
    assert set(namespaces[second_lab_dir]) <= existing
    assert [processes_mentioning(config) for config in daemon_configs] == [[]] * 4
    assert tunnel_processes(tunnels[lab_dir]) == []
    assert not lab_dir.exists()
    still = gatewayctl("lab", "verify", "--dir", str(second_lab_dir))
    assert still.returncode == 0, still.stdout + still.stderr

    down = gatewayctl("lab", "down", "--dir", str(second_lab_dir))
    assert down.returncode == 0, down.stderr
    assert not set(namespaces[second_lab_dir]) & set(pyroute2_netns.listnetns())
    assert tunnel_processes(tunnels[second_lab_dir]) == []

    again = gatewayctl("lab", "down", "--dir", str(lab_dir))
    assert again.returncode == 0
    assert "no lab" in again.stdout
