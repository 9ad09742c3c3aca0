"""An established connection through the gateway survives whatever the agent goes through:
the data plane outlives the daemon, and every apply replaces the table in one transaction."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator

import pytest

from gatewayd.lab.netns import run, wait_for
from gatewayd.lab.observe import LineConnection, has_address
from gatewayd.lab.topology import EXTERNAL, GATEWAYS, LINE_PORT, NODES, Lab

pytestmark = pytest.mark.lab

ACTIVE = GATEWAYS[0]
POD = NODES[0].pods[0]  # checkout-1: payment-gateway, egress IP .70 to the payment gateway
PAYMENT_GATEWAY = EXTERNAL.addresses[0]
EGRESS_IP = "198.51.100.70"
BATCH_POLICY_FILE = "31-policy-batch-all.yaml"


@pytest.fixture
def connection(lab: Lab) -> Iterator[LineConnection]:
    with LineConnection(POD.netns, PAYMENT_GATEWAY, LINE_PORT) as conn:
        assert conn.exchange("hello") == (EGRESS_IP, "hello")
        yield conn


def restart_agent(lab: Lab, sig: signal.Signals, conn: LineConnection) -> None:
    status = lab.stop_daemon(ACTIVE.name, sig)
    assert status == (0 if sig is signal.SIGTERM else -sig), f"agent exit status {status}"
    # no daemon now: the data plane alone carries the connection
    assert conn.exchange("agent stopped") == (EGRESS_IP, "agent stopped")
    started = time.time()
    lab.start_daemon(ACTIVE.name)
    lab.wait_ready([ACTIVE.name], since=started)


def agent_sigterm(lab: Lab, conn: LineConnection) -> None:
    restart_agent(lab, signal.SIGTERM, conn)


def agent_sigkill(lab: Lab, conn: LineConnection) -> None:
    restart_agent(lab, signal.SIGKILL, conn)


def unrelated_policy_change(lab: Lab, conn: LineConnection) -> None:
    original = (lab.snapshot_dir / BATCH_POLICY_FILE).read_text()
    changed = original.replace("excludedCIDRs: [198.51.100.11/32,",
                               "excludedCIDRs: [198.51.100.11/32, 198.51.100.12/32,")
    assert changed != original
    before = lab.generations([ACTIVE.name])
    lab.write_snapshot_file(BATCH_POLICY_FILE, changed)
    try:
        lab.wait_applied(before)
        assert conn.exchange("policy changed") == (EGRESS_IP, "policy changed")
    finally:
        before = lab.generations([ACTIVE.name])
        lab.write_snapshot_file(BATCH_POLICY_FILE, original)
        lab.wait_applied(before)


def egress_ip_removed_by_hand(lab: Lab, conn: LineConnection) -> None:
    run(["ip", "addr", "del", f"{EGRESS_IP}/32", "dev", "eth0"], ACTIVE.netns)
    took = wait_for(lambda: has_address(ACTIVE.netns, "eth0", EGRESS_IP), 15,
                    f"the agent to re-add {EGRESS_IP}")
    print(f"egress IP re-added after {took:.2f}s")


@pytest.mark.parametrize("disruption", [
    agent_sigterm, agent_sigkill, unrelated_policy_change, egress_ip_removed_by_hand,
], ids=lambda d: d.__name__)
def test_established_connection_survives(
    lab: Lab, connection: LineConnection, disruption: Callable[[Lab, LineConnection], None]
) -> None:
    disruption(lab, connection)
    assert connection.exchange("still here") == (EGRESS_IP, "still here")
