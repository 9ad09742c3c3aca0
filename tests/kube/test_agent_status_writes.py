"""What the agent writes to its EgressGateway's status, and when: on transitions only (never
because a WireGuard session was rekeyed), and a field that became unknown is removed."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent_kubernetes import (
    HOST_ADDRESS,
    NAME,
    PEER,
    RULE,
    TIMEOUT,
    applied,
    config,
    sandbox,
    status,
)

from gatewayd.lab.sandboxed import DaemonSandbox

__all__ = ["sandbox"]  # the fixture, used by name

pytestmark = [pytest.mark.kube, pytest.mark.lab]  # the daemons run in network namespaces

NODE_TUNNEL = "ktnode0"  # a second WireGuard interface in the sandbox plays the cloud node
NODE_PORT = 51899


def wg_key_pair(directory: Path) -> tuple[Path, str]:
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    path = directory / "node.key"
    path.write_text(private)
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                            check=True).stdout.strip()
    return path, public


@pytest.fixture
def node_tunnel(sandbox: DaemonSandbox) -> Iterator[tuple[Path, str]]:
    """A userspace WireGuard interface in the sandbox for the node's end; (key file, public
    key)."""
    key_file, public = wg_key_pair(sandbox.directory)
    sandbox.interfaces.add(NODE_TUNNEL)
    process = subprocess.Popen(
        ["ip", "netns", "exec", sandbox.netns, "env", "WG_PROCESS_FOREGROUND=1", "wireguard-go",
         NODE_TUNNEL],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        sandbox.wait(lambda: NODE_TUNNEL in sandbox.cmd("ip", "-br", "link"), TIMEOUT,
                     "the node's WireGuard interface")
        yield key_file, public
    finally:
        process.terminate()
        process.wait(10)


def latest_handshake(box: DaemonSandbox, public_key: str) -> int:
    for line in box.cmd("wg", "show", "ktgw0", "latest-handshakes").splitlines():
        key, _, when = line.partition("\t")
        if key == public_key:
            return int(when)
    return 0


def dial_the_gateway(box: DaemonSandbox, key_file: Path, gateway_key: str) -> None:
    """(Re)add the gateway as the node's peer: a new session, so a new handshake at once."""
    box.cmd("wg", "set", NODE_TUNNEL, "peer", gateway_key, "remove")
    box.cmd("wg", "set", NODE_TUNNEL, "private-key", str(key_file), "listen-port", str(NODE_PORT),
            "peer", gateway_key, "endpoint", "127.0.0.1:51820", "allowed-ips", "100.127.0.1/32",
            "persistent-keepalive", "1")
    box.cmd("ip", "link", "set", NODE_TUNNEL, "up")


def test_a_rekey_writes_no_status(
    sandbox: DaemonSandbox, node_tunnel: tuple[Path, str]
) -> None:
    key_file, node_key = node_tunnel
    peer = {**PEER, "publicKey": node_key, "endpoint": f"127.0.0.1:{NODE_PORT}"}
    sandbox.api.put({
        "apiVersion": "egress.gatewayd.io/v1alpha1", "kind": "EgressGateway",
        "metadata": {"name": NAME}, "spec": {"peers": [peer], "rules": [RULE]},
    })
    sandbox.start("agent", config(sandbox))
    sandbox.wait(lambda: applied(sandbox), TIMEOUT, "the agent to apply the spec")
    gateway_key = status(sandbox)["publicKey"]
    dial_the_gateway(sandbox, key_file, gateway_key)
    sandbox.wait(lambda: sandbox.events("peer-up") == 1, TIMEOUT, "node1 up")
    sandbox.wait(lambda: status(sandbox)["conditions"][1]["message"].startswith("1/1 peers"),
                 TIMEOUT, "node1 up in the status")

    first = latest_handshake(sandbox, node_key)
    start = len(sandbox.api.requests)
    redialed = time.monotonic()

    def rekeyed() -> bool:
        nonlocal redialed
        if latest_handshake(sandbox, node_key) > first:
            return True
        if time.monotonic() - redialed > 1.5:  # the handshake times have a 1 s resolution
            dial_the_gateway(sandbox, key_file, gateway_key)
            redialed = time.monotonic()
        return False

    sandbox.wait(rekeyed, TIMEOUT, "a new handshake")
    rekey = len(sandbox.api.requests)
    lease = f"/leases/egressgateway-{NAME}"

    def renewals() -> int:
        return sum(1 for r in sandbox.api.requests[rekey:] if r.path.endswith(lease))

    # The reporter renews the Lease every 0.5 s and writes a changed status after each
    # renewal; the agent looks at the handshakes every second: six renewals give it time.
    sandbox.wait(lambda: renewals() >= 6, TIMEOUT, "six Lease renewals after the rekey")
    written = [r for r in sandbox.api.requests[start:] if r.path.endswith(f"/{NAME}/status")]
    assert written == []
    assert status(sandbox)["peers"] == [{"name": "node1", "up": True}]


def test_an_endpoint_that_became_unknown_is_removed(sandbox: DaemonSandbox) -> None:
    sandbox.start("agent", config(sandbox))
    sandbox.wait(lambda: applied(sandbox), TIMEOUT, "the agent to report generation 1")
    assert status(sandbox)["endpoint"] == f"{HOST_ADDRESS}:51820"
    sandbox.cmd("ip", "addr", "del", f"{HOST_ADDRESS}/24", "dev", "eth0")
    sandbox.wait(lambda: status(sandbox).get("addresses") == [], TIMEOUT,
                 "the uplink's address gone from the status")
    assert "endpoint" not in status(sandbox)
