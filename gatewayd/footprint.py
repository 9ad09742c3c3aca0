"""What a host daemon programmed, as `gatewayctl status` and `teardown` ask it of each daemon:
its nftables table, its tunnels, what else it reports live, and how it is removed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Footprint(Protocol):
    role: str  # the daemon's name in its pid file: "agent" or "steer"
    kind: str  # what the host is, for messages: "gateway" or "steer"
    table: tuple[str, str]  # nftables family and name

    @property
    def state_directory(self) -> Path: ...

    def tunnel_interfaces(self) -> list[str]:
        """The WireGuard interfaces the daemon programs."""
        ...

    def observe(self) -> dict[str, Any]:
        """What `gatewayctl status` adds to the daemon's own report, read from the kernel."""
        ...

    def teardown(self) -> list[str]:
        """Remove what the daemon programmed; returns what was removed, in order."""
        ...
