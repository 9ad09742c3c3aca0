"""What the agent programmed on this host, recorded in its state directory, so that teardown
(`gatewayctl teardown`, removing the package) removes it without the config, which may be
invalid or gone by then.

- `programmed.json`: the tunnel interfaces the agent created (every one, until teardown);
- `sysctl-originals.json`: the kernel parameters the agent changed and their values before
  (written by `dataplane.sysctl.ensure_sysctls`);
- the nftables table and the egress IPs need no record: the table's name is fixed, and the
  egress IPs carry the agent's owner mark (`dataplane.netlink.OWNER_PROTOCOL`).
"""

from __future__ import annotations

import json
from pathlib import Path

from gatewayd.runtime import write_json_atomic

PROGRAMMED_FILE = "programmed.json"
SYSCTL_ORIGINALS_FILE = "sysctl-originals.json"


def programmed_path(state_directory: Path) -> Path:
    return state_directory / PROGRAMMED_FILE


def sysctl_originals_path(state_directory: Path) -> Path:
    return state_directory / SYSCTL_ORIGINALS_FILE


def recorded_tunnels(state_directory: Path) -> tuple[str, ...]:
    """The tunnel interfaces recorded so far; none when the record is missing or damaged."""
    try:
        data = json.loads(programmed_path(state_directory).read_text())
    except (OSError, ValueError):
        return ()
    tunnels = data.get("tunnels") if isinstance(data, dict) else None
    if not isinstance(tunnels, list):
        return ()
    return tuple(sorted({name for name in tunnels if isinstance(name, str)}))


def record_tunnel(state_directory: Path, interface: str) -> None:
    """Add `interface` to the record (before it is created: a crash in between still leaves
    it known). Raises OSError when the record cannot be written."""
    tunnels = recorded_tunnels(state_directory)
    if interface in tunnels:
        return
    write_json_atomic(programmed_path(state_directory),
                      {"tunnels": sorted({*tunnels, interface})}, mode=0o600)
