"""Drift: someone changes the gateway's kernel state by hand; the agent's repair pass puts it
back, and traffic is as the policies say again."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from gatewayd.lab.netns import run, wait_for
from gatewayd.lab.observe import GATEWAY_TABLE, has_address, nft_table, wireguard_peers
from gatewayd.lab.topology import GATEWAYS, NODES, Lab
from gatewayd.lab.verify import render_text, verify

pytestmark = pytest.mark.lab

ACTIVE = GATEWAYS[0]
REPAIR_DEADLINE = 15  # generous: the lab's repair pass runs every second
EGRESS_IP = "198.51.100.70"


def node_public_key(lab: Lab) -> str:
    private = lab.key_path(NODES[0].name).read_text()
    return run(["wg", "pubkey"], input=private).stdout.strip()


# Each sabotage succeeds (run() checks) and returns what shows the repair. The repair pass
# may come before the test could look, so none asserts the broken state in between.


def table_handle() -> int | None:
    found = nft_table(ACTIVE.netns, *GATEWAY_TABLE)
    return None if found is None else int(next(o["table"]["handle"] for o in found
                                               if "table" in o))


def delete_table(lab: Lab) -> Callable[[], bool]:
    before = table_handle()
    assert before is not None
    run(["nft", "delete", "table", *GATEWAY_TABLE], ACTIVE.netns)
    return lambda: table_handle() not in (None, before)  # a new table: the agent's


def delete_egress_ip(lab: Lab) -> Callable[[], bool]:
    run(["ip", "addr", "del", f"{EGRESS_IP}/32", "dev", "eth0"], ACTIVE.netns)
    return lambda: has_address(ACTIVE.netns, "eth0", EGRESS_IP)


def remove_wireguard_peer(lab: Lab) -> Callable[[], bool]:
    key = node_public_key(lab)
    assert key in wireguard_peers(ACTIVE.netns, ACTIVE.tunnel_interface)
    run(["wg", "set", ACTIVE.tunnel_interface, "peer", key, "remove"], ACTIVE.netns)
    return lambda: key in wireguard_peers(ACTIVE.netns, ACTIVE.tunnel_interface)


@pytest.fixture
def restored_lab(lab: Lab) -> Iterator[Lab]:
    """After a repair that failed, restart the agent (it restores its saved plan), so that
    the next test starts from a working lab instead of failing for the same reason."""
    yield lab
    if not all(row.ok for row in verify(lab.snapshot_dir)):
        lab.stop_daemon(ACTIVE.name)
        started = time.time()
        lab.start_daemon(ACTIVE.name)
        lab.wait_ready([ACTIVE.name], since=started)


@pytest.mark.parametrize("sabotage", [delete_table, delete_egress_ip, remove_wireguard_peer],
                         ids=lambda s: s.__name__)
def test_the_repair_pass_undoes_drift(restored_lab: Lab,
                                      sabotage: Callable[[Lab], Callable[[], bool]]) -> None:
    lab = restored_lab
    repaired = sabotage(lab)
    took = wait_for(repaired, REPAIR_DEADLINE, f"the agent to repair ({sabotage.__name__})")
    print(f"{sabotage.__name__}: repaired after {took:.2f}s")
    rows = verify(lab.snapshot_dir)
    assert [row for row in rows if not row.ok] == [], render_text(rows)
