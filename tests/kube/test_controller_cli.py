"""`gatewayd controller` as a process: kubeconfig, probes, leader Lease, and a clean stop on
SIGTERM that hands the Lease back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fakecluster.fakeapi import FakeApiServer, wait_until
from kubernetes.client import ApiClient
from test_controller_harness import NS, TIMEOUT, Agents, World, basic_cluster

pytestmark = pytest.mark.kube


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def test_the_controller_process_plans_answers_probes_and_stops_cleanly(
    fake_api: FakeApiServer, api: ApiClient, tmp_path: Path
) -> None:
    world = World(fake_api)
    basic_cluster(world)
    kubeconfig = fake_api.write_kubeconfig(tmp_path / "kubeconfig")
    port = free_port()
    command = [
        sys.executable, "-m", "gatewayd.cli.gatewayd", "controller",
        "--kubeconfig", str(kubeconfig), "--namespace", NS, "--health-port", str(port),
        "--hold-down", "1", "--lease-duration", "2",
    ]  # fmt: skip
    env = {**os.environ, "GATEWAYD_POD_NAME": "controller-0"}
    with Agents(fake_api, api):
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_until(
                lambda: answers(f"http://127.0.0.1:{port}/readyz") == 200, TIMEOUT, "/readyz"
            )
            assert answers(f"http://127.0.0.1:{port}/healthz") == 200
            wait_until(
                lambda: world.condition("pay", "Ready").get("status") == "True", TIMEOUT, "Ready"
            )
            lease = fake_api.get("leases", "gatewayd-controller", NS) or {}
            assert lease["spec"]["holderIdentity"] == "controller-0"
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 0, stderr
    lease = fake_api.get("leases", "gatewayd-controller", NS) or {}
    assert "holderIdentity" not in lease["spec"]  # handed back for the other replica
    assert "controller controller-0 starting" in stderr


def test_unusable_credentials_are_reported(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gatewayd.cli.gatewayd", "controller",
         "--kubeconfig", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{tmp_path / 'missing'}: kubeconfig file not found" in result.stderr
