"""`systemctl restart nftables` on a gateway (Debian's unit runs `flush ruleset`, then loads
/etc/nftables.conf): the agent's table is gone for a moment. The routing guard stays in place
the whole time, so no tunnel packet can be forwarded without the table; the agent sees the
flush from nftables events and puts its table back at once, and reports the drift.
"""

from __future__ import annotations

import pytest
from nspawn import Container
from test_service import UNIT, events, has_table, start_gateway

from gatewayd.lab.netns import wait_for

pytestmark = pytest.mark.system

WAIT = 30  # generous: a condition, never a timing target


def guard(host: Container) -> str:
    return host.run("ip", "rule", "show", "priority", "50").stdout


def test_restarting_nftables_never_leaves_the_gateway_without_its_filter(
    container: Container,
) -> None:
    start_gateway(container)
    assert has_table(container)
    assert "iif egress0" in guard(container) and "blackhole" in guard(container)
    assert container.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"

    container.systemctl("restart", "nftables")
    assert "table inet filter" in container.run("nft", "list", "tables").stdout  # loaded
    wait_for(lambda: has_table(container), WAIT, "the agent to put its table back")
    wait_for(lambda: any("nftables" in e.get("MESSAGE", "")
                         for e in events(container, "drift-repaired")),
             WAIT, "the repaired table reported")
    # Repaired from the events, not on the repair timer: the watcher names the process.
    log = container.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat").stdout
    assert "changed table inet gatewayd" in log
    # The guard was never touched: without the table's mark, tunnel traffic was blackholed.
    assert "iif egress0" in guard(container) and "blackhole" in guard(container)
    assert container.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
