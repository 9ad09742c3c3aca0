"""Kubernetes mode: each gateway in the node's plan gets a slot, and keeps it.

A slot numbers the gateway's fwmark, routing table, WireGuard listen port and (for long names)
interface. Slots must not move while a gateway stays: a connection's conntrack mark names its
gateway's fwmark for the connection's whole life. So they are kept in `<state>/slots.json`
across restarts, a new gateway takes the lowest free slot, and the slot of a gateway that left
the plan is reused only when every slot is taken.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from gatewayd.policy.safeload import DOCUMENT_LIMITS, DocumentError, load_json_file
from gatewayd.runtime import set_aside, write_json_atomic
from gatewayd.steer.config import FIRST_TABLE, GatewayTunnelEnd, SteerConfig
from gatewayd.systemd import Priority, journal_event

INTERFACE_NAME_MAX = 15


class SlotsFullError(Exception):
    pass


def mark_step(mask: int) -> int:
    """The lowest bit of the mask: slot i's mark is (i + 1) * step."""
    return mask & -mask


def capacity(mask: int) -> int:
    """How many slots the mark mask holds (the marks that lie inside it)."""
    step = mark_step(mask)
    count = 0
    while (count + 1) * step & ~mask == 0 and (count + 1) * step <= mask:
        count += 1
    return count


def slots_path(config: SteerConfig) -> Path:
    return config.state_directory / "slots.json"


class SlotTable:
    def __init__(self, path: Path, mask: int) -> None:
        self.path = path
        self.capacity = capacity(mask)
        self._slots: dict[str, int] = self._load()

    def _load(self) -> dict[str, int]:
        if not self.path.exists():
            return {}
        try:
            data = load_json_file(self.path, DOCUMENT_LIMITS)
            if not isinstance(data, dict):
                raise DocumentError(str(self.path), None, "must be a JSON object")
        except DocumentError as exc:
            journal_event("state-invalid", f"slot table {self.path} unusable, "
                          f"{set_aside(self.path)}; gateways get new slots: {exc}",
                          Priority.ERR, file=str(self.path))
            return {}
        return {
            name: index for name, index in data.items()
            if isinstance(name, str) and isinstance(index, int) and 0 <= index < self.capacity
        }

    @property
    def slots(self) -> dict[str, int]:
        return dict(self._slots)

    def assign(self, gateways: Iterable[str]) -> dict[str, int]:
        """The slot of every gateway in `gateways`, assigning new ones (saved at once)."""
        wanted = sorted(set(gateways))
        changed = False
        for name in wanted:
            if name in self._slots:
                continue
            used = set(self._slots.values())
            free = [i for i in range(self.capacity) if i not in used]
            if not free:
                departed = sorted(
                    (index, gone) for gone, index in self._slots.items() if gone not in wanted
                )
                if not departed:
                    raise SlotsFullError(
                        f"more gateways ({len(wanted)}) than the mark mask has slots "
                        f"({self.capacity}); widen tunnel.markMask"
                    )
                index, gone = departed[0]
                del self._slots[gone]
                free = [index]
            self._slots[name] = free[0]
            changed = True
        if changed:
            write_json_atomic(self.path, self._slots)
        return {name: self._slots[name] for name in wanted}


def interface_name(prefix: str, gateway: str, slot: int) -> str:
    """`<prefix><gateway>`, or, when that is too long for the kernel, a shortened name made
    unique by the slot number."""
    name = f"{prefix}{gateway}"
    if len(name) <= INTERFACE_NAME_MAX:
        return name
    tag = f"-{slot}"
    return f"{prefix}{gateway}"[: INTERFACE_NAME_MAX - len(tag)] + tag


def tunnel_interfaces(config: SteerConfig) -> list[str]:
    """Every WireGuard interface steer may have made: the config's gateways' (standalone) and
    those of the gateways that hold a slot (Kubernetes mode; departed ones included)."""
    names = [g.interface for g in config.gateways]
    slots = SlotTable(slots_path(config), config.mark_mask).slots
    for gateway, slot in sorted(slots.items(), key=lambda item: item[1]):
        name = interface_name(config.interface_prefix, gateway, slot)
        if name not in names:
            names.append(name)
    return names


def tunnel_end(
    config: SteerConfig,
    gateway: str,
    slot: int,
    public_key: str,
    endpoint: str | None,
    address: str,
) -> GatewayTunnelEnd:
    return GatewayTunnelEnd(
        name=gateway,
        interface=interface_name(config.interface_prefix, gateway, slot),
        listen_port=config.listen_port + slot,
        public_key=public_key,
        endpoint=endpoint,
        persistent_keepalive=config.persistent_keepalive or None,
        mark=(slot + 1) * mark_step(config.mark_mask),
        table=FIRST_TABLE + slot,
        address=address,
    )
