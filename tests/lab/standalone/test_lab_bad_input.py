"""Bad input never tears the data plane down: the agent says what is wrong (log and
status.json lastError, naming the file) and traffic keeps its egress IP."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gatewayd.lab.netns import wait_for
from gatewayd.lab.topology import GATEWAYS, NODES, Lab
from gatewayd.lab.verify import probe

pytestmark = pytest.mark.lab

ACTIVE = GATEWAYS[0]
CHECKOUT = NODES[0].pods[0]
PAYMENT_GATEWAY, EGRESS_IP = "198.51.100.10", "198.51.100.70"
BROKEN_FILE = "40-broken.yaml"


def break_snapshot(lab: Lab) -> tuple[Path, Callable[[], None]]:
    """A YAML syntax error in a file of the snapshot directory."""
    lab.write_snapshot_file(BROKEN_FILE, "apiVersion: v1\nkind: Pod\nmetadata: {name: [oops\n")
    return lab.snapshot_dir / BROKEN_FILE, (lab.snapshot_dir / BROKEN_FILE).unlink


def break_config(lab: Lab) -> tuple[Path, Callable[[], None]]:
    """An egress IP pool that is not a CIDR."""
    path = lab.config_path(ACTIVE.name)
    original = path.read_text()
    broken = original.replace("cidr: 198.51.100.64/27", "cidr: 198.51.100.64/33")
    assert broken != original
    path.write_text(broken)
    return path, lambda: path.write_text(original)


@pytest.mark.parametrize("sabotage", [break_snapshot, break_config], ids=lambda s: s.__name__)
def test_bad_input_is_reported_and_the_data_plane_stays(
    lab: Lab, sabotage: Callable[[Lab], tuple[Path, Callable[[], None]]]
) -> None:
    log = lab.log_path(ACTIVE.name)
    log_before = log.stat().st_size
    broken, restore = sabotage(lab)
    try:
        wait_for(lambda: str(broken) in ((lab.status(ACTIVE.name) or {}).get("lastError") or ""),
                 10, f"status.json lastError to name {broken}")
        error = (lab.status(ACTIVE.name) or {})["lastError"]
        print(f"lastError: {error}")
        new_log = log.read_text(errors="replace")[log_before:]
        assert str(broken) in new_log
        assert probe(CHECKOUT.netns, PAYMENT_GATEWAY) == EGRESS_IP
    finally:
        restore()
    wait_for(lambda: (lab.status(ACTIVE.name) or {}).get("lastError") is None, 10,
             "lastError to clear once the input is fixed")
    assert probe(CHECKOUT.netns, PAYMENT_GATEWAY) == EGRESS_IP
