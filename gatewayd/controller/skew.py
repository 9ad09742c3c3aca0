"""How far each gateway's clock is off the controller's, and when to report it.

Measured from its Lease renewals (`kube.leases.Freshness.skew`: the renewTime it wrote minus the
controller's wall clock when the renewal was seen, so watch latency makes it read a little
behind). Gateway health never depends on it (see `health.py`); it is reported because the
timestamps a skewed gateway writes (its status, its journal) mislead whoever reads them, and a
large skew usually means NTP is broken on that host.

Reported in the EgressGateway's `status.clockSkewSeconds` (whole seconds, positive: the gateway
is ahead), a key only the controller writes, with a JSON merge patch of that one key so the
agent's keys are never touched; rewritten only when the measurement moves a whole second away
from what the status holds, so measuring noise never churns the object. Above
`WARNING_SECONDS`, each such write also logs a warning and records a Warning Event. A gateway
whose clock is within a second of the controller's never gets the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SKEW_FIELD = "clockSkewSeconds"
WARNING_SECONDS = 2.0
CHANGE_SECONDS = 1.0


@dataclass(frozen=True)
class SkewReport:
    gateway: str
    seconds: int  # the new status.clockSkewSeconds
    warning: bool  # beyond WARNING_SECONDS

    @property
    def message(self) -> str:
        direction = "ahead of" if self.seconds > 0 else "behind"
        return (
            f"the clock of gateway {self.gateway} is about {abs(self.seconds)}s {direction} the "
            "controller's (measured from its Lease renewals); its health is judged on the "
            "controller's clock alone, but the times it writes are off: check NTP on that host"
        )


def skew_reports(
    gateways: Sequence[Mapping[str, Any]], measured: Mapping[str, float | None]
) -> list[SkewReport]:
    """What to write for each gateway (EgressGateway objects as cached) whose skew `measured`
    (by name) has moved a whole second from its `status.clockSkewSeconds` (0 when absent)."""
    reports = []
    for gateway in gateways:
        name = str(gateway["metadata"]["name"])
        skew = measured.get(name)
        if skew is None:
            continue
        status = gateway.get("status")
        reported = status.get(SKEW_FIELD) if isinstance(status, Mapping) else None
        if not isinstance(reported, int | float) or isinstance(reported, bool):
            reported = 0  # none yet: about right (most gateways never need the field)
        if abs(skew - reported) < CHANGE_SECONDS:
            continue
        reports.append(SkewReport(name, round(skew), abs(skew) > WARNING_SECONDS))
    return reports
