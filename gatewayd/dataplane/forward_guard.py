"""The routing guard of the gateway: traffic from the tunnel is routed only while the
nftables table is in place.

One `ip rule` per family, `iif <tunnel> fwmark 0/GUARD_MARK blackhole`, ahead of the main
table: a packet from the tunnel that did not get GUARD_MARK from the table's prerouting chain
is dropped by routing. So when the table is gone (`nft flush ruleset`, `systemctl restart
nftables`), no pod packet is forwarded unfiltered or un-NATed even before the agent has put the
table back. Packets to the host itself are not affected (the `local` table comes first), so
the cloud nodes' probes keep their answers. The rules carry OWNER_PROTOCOL; only those are
ever changed or removed.

IPv4's reverse-path filter looks up the way back of a packet routed into the tunnel as if it
came from the tunnel: that lookup meets the guard too. The table therefore marks traffic into
the tunnel as well, and the agent sets `net.ipv4.conf.all.src_valid_mark`, so the lookup
carries the mark: replies to pods pass while the table is there, and stop when it is gone.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from pyroute2 import IPRoute

from gatewayd.dataplane.netlink import OWNER_PROTOCOL
from gatewayd.dataplane.nft_render import GUARD_MARK

GUARD_PRIORITY = 50  # ip rule preference: after `local` (0), before `main` (32766)
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_FR_ACT_BLACKHOLE = 6


@dataclass(frozen=True, order=True)
class _GuardRule:
    version: int
    interface: str

    def __str__(self) -> str:
        return (f"ipv{self.version} rule priority {GUARD_PRIORITY} iif {self.interface} "
                f"fwmark 0/{GUARD_MARK:#x} blackhole")


def ensure_forward_guard(tunnel_interface: str) -> tuple[str, ...]:
    """Install the guard for `tunnel_interface` (both families), remove guards of any other
    interface; returns the changes. The interface need not exist yet."""
    wanted = {_GuardRule(version, tunnel_interface) for version in _FAMILIES}
    with IPRoute() as ipr:
        present = _observe(ipr)
        for rule in sorted(present - wanted):
            _rule(ipr, "del", rule)
        for rule in sorted(wanted - present):
            _rule(ipr, "add", rule)
    return tuple(f"removed {r}" for r in sorted(present - wanted)) + tuple(
        f"added {r}" for r in sorted(wanted - present))


def remove_forward_guard() -> tuple[str, ...]:
    """Remove every guard rule (teardown); returns what was removed."""
    with IPRoute() as ipr:
        present = _observe(ipr)
        for rule in sorted(present):
            _rule(ipr, "del", rule)
    return tuple(str(r) for r in sorted(present))


def _observe(ipr: IPRoute) -> set[_GuardRule]:
    found = set()
    for version, family in _FAMILIES.items():
        for msg in ipr.get_rules(family=family):
            if (msg.get("FRA_PROTOCOL") == OWNER_PROTOCOL
                    and msg["action"] == _FR_ACT_BLACKHOLE
                    and msg.get("FRA_PRIORITY") == GUARD_PRIORITY
                    and msg.get("FRA_FWMASK") == GUARD_MARK and not msg.get("FRA_FWMARK")
                    and msg.get("FRA_IIFNAME")):
                found.add(_GuardRule(version, msg.get("FRA_IIFNAME")))
    return found


def _rule(ipr: IPRoute, command: str, rule: _GuardRule) -> None:
    ipr.rule(
        command, family=_FAMILIES[rule.version], priority=GUARD_PRIORITY,
        iifname=rule.interface, fwmark=0, fwmask=GUARD_MARK, action="FR_ACT_BLACKHOLE",
        protocol=OWNER_PROTOCOL,
    )
