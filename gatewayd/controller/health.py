"""Whether each gateway may carry traffic: the one place that decides gateway health.

A gateway is usable iff its EgressGateway reports `Ready=True`, its Lease
`<namespace>/egressgateway-<name>` is not expired (this controller saw it renewed less than
leaseDurationSeconds ago, on its own monotonic clock: `kube.leases.LeaseObserver`), and,
if it was usable once and failed, it has been healthy again without a break for the hold-down
time, so a flapping gateway is not handed traffic back and forth. A gateway that has not been
usable since the tracker first saw it (a new gateway still starting, or any gateway after a
controller restart) needs no hold-down: it carried no traffic, so it cannot flap.

An expired Lease proves the gateway dead only if the controller could have seen it renewed: while
the controller's view of the API is broken (its watches fail, or it cannot reach the API server),
Leases look expired because nobody can renew them, not because gateways died. So while the view
is broken, and for one lease duration after it is restored, an expired Lease does not take a
gateway's usability away; Ready and a live Lease still count at once.

Times are seconds on the controller's monotonic clock. The gateway's `renewTime` is written with
the gateway's own clock and is never compared with ours: a gateway whose clock runs behind
would look dead forever, one whose clock runs ahead would look alive after it died.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gatewayd.kube.leases import Freshness

LEASE_PREFIX = "egressgateway-"


def lease_name(gateway: str) -> str:
    """The Lease a gateway's agent renews as its heartbeat."""
    return LEASE_PREFIX + gateway


@dataclass(frozen=True)
class GatewaySignals:
    """What the API says about one gateway's health at one moment."""

    ready: bool  # status.conditions[type=Ready].status == "True"
    ready_detail: str  # the Ready condition, for messages
    lease_expires_at: float | None  # None: no Lease, or one that proves nothing
    lease_duration: float  # its leaseDurationSeconds (0 when unknown)


def read_signals(gateway: Mapping[str, Any], lease: Freshness | None) -> GatewaySignals:
    """Signals of an EgressGateway (a JSON object as the API serves it) and of what the
    controller saw of its Lease (None: no Lease)."""
    ready, detail = False, "no Ready condition"
    status = gateway.get("status")
    conditions = status.get("conditions") if isinstance(status, Mapping) else None
    for condition in conditions if isinstance(conditions, list) else []:
        if isinstance(condition, Mapping) and condition.get("type") == "Ready":
            ready = condition.get("status") == "True"
            detail = f"Ready={condition.get('status')}"
            if condition.get("reason"):
                detail += f" ({condition['reason']}: {condition.get('message', '')})"
    if lease is None or lease.valid_until is None:
        return GatewaySignals(ready, detail, None, 0.0)
    return GatewaySignals(ready, detail, lease.valid_until, lease.duration)


@dataclass(frozen=True)
class Health:
    usable: bool
    reason: str  # why it is (not) usable, for status messages, Events and logs


@dataclass
class _State:
    usable: bool
    healthy_since: float | None  # start of the current unbroken healthy stretch
    was_usable: bool  # usable at some time since the tracker first saw it


class HealthTracker:
    """Gateway health over time: Ready, Lease and hold-down (see the module docstring)."""

    def __init__(self, hold_down: float) -> None:
        self.hold_down = hold_down
        self._states: dict[str, _State] = {}
        self._next_change: float | None = None

    def update(
        self, signals: Mapping[str, GatewaySignals], now: float, trusted_since: float | None
    ) -> dict[str, Health]:
        """The verdict for every gateway in `signals` at `now`.

        `trusted_since`: since when the controller's view of Leases has been unbroken, or None
        while it is broken.
        """
        verdicts: dict[str, Health] = {}
        wake: list[float] = []
        for name, signal in signals.items():
            state = self._states.get(name)
            lease_ok, lease_reason = self._lease_ok(name, signal, state, now, trusted_since, wake)
            healthy = signal.ready and lease_ok
            if not healthy:
                why = signal.ready_detail if not signal.ready else lease_reason
                self._states[name] = _State(False, None, state is not None and state.was_usable)
                verdicts[name] = Health(False, why)
                continue
            if state is None or state.usable or not state.was_usable:
                self._states[name] = _State(usable=True, healthy_since=now, was_usable=True)
                verdicts[name] = Health(True, f"{signal.ready_detail}, {lease_reason}")
                continue
            since = state.healthy_since if state.healthy_since is not None else now
            usable = now - since >= self.hold_down
            self._states[name] = _State(usable=usable, healthy_since=since, was_usable=True)
            if usable:
                verdicts[name] = Health(True, f"{signal.ready_detail}, {lease_reason}")
            else:
                wake.append(since + self.hold_down)
                verdicts[name] = Health(
                    False,
                    f"healthy again for {now - since:.1f}s, in hold-down for "
                    f"{since + self.hold_down - now:.1f}s more",
                )
        for gone in set(self._states) - set(signals):
            del self._states[gone]
        self._next_change = min(wake) if wake else None
        return verdicts

    @property
    def next_change(self) -> float | None:
        """When a verdict of the last update may change with no new signal (a Lease expiring,
        a hold-down ending, the grace after a broken view ending); None if never."""
        return self._next_change

    def _lease_ok(
        self,
        name: str,
        signal: GatewaySignals,
        state: _State | None,
        now: float,
        trusted_since: float | None,
        wake: list[float],
    ) -> tuple[bool, str]:
        lease = lease_name(name)
        if signal.lease_expires_at is not None and now < signal.lease_expires_at:
            wake.append(signal.lease_expires_at)
            return True, f"Lease {lease} valid for {signal.lease_expires_at - now:.1f}s"
        if signal.lease_expires_at is None:
            why = f"no valid Lease {lease}"
        else:
            why = f"Lease {lease} expired {now - signal.lease_expires_at:.1f}s ago"
        was_usable = state is not None and state.usable
        if was_usable and trusted_since is None:
            return True, f"{why}, but the controller's view of the API is broken"
        if was_usable and trusted_since is not None:
            grace_end = trusted_since + max(signal.lease_duration, 1.0)
            if now < grace_end:
                wake.append(grace_end)
                return True, f"{why}, but the controller's view of the API was only just restored"
        return False, why
