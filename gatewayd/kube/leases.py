"""Lease helpers: gateways renew one Lease each as their heartbeat; the controller reads them.

Freshness is judged the way client-go's leader election judges it: a Lease is valid until one
lease duration after *this process* saw its record change, on this process's monotonic clock
(`LeaseObserver`). Its `renewTime` was written with the writer's clock (an off-cluster gateway
whose clock runs seconds off), so it is never compared with the local clock to decide anything;
it only serves to measure how far the writer's clock is off (`Freshness.skew`). A Lease seen
for the first time counts as renewed at first sight (a restarted controller cannot know better).

Every delay between the writer's clock reading and our sighting (a slow write, a watch that
reconnects after an API outage) makes the writer look behind by that much, never ahead. So the
skew is the largest of the last `SKEW_SAMPLES` measurements, as NTP trusts its least-delayed
sample: one late sighting does not report a clock as off.

Lease times are MicroTime on the wire: the API server parses exactly six fractional digits, and
`datetime.isoformat()` (what the client sends for datetime fields) drops them when they are
zero. So times are written here as formatted strings, in patches, never as datetime fields.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from kubernetes.client import ApiClient, CoordinationV1Api, V1Lease, V1LeaseSpec, V1ObjectMeta
from kubernetes.client.exceptions import ApiException

SKEW_SAMPLES = 8


def micro_time(moment: datetime) -> str:
    """`moment` as a Kubernetes MicroTime: UTC, six fractional digits."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def renew_lease(
    api: ApiClient,
    namespace: str,
    name: str,
    holder: str,
    duration_seconds: int,
    observer: LeaseObserver,
    *,
    now: datetime | None = None,
) -> bool:
    """Create or renew Lease `namespace/name` for `holder`; True when `holder` holds it now.

    A Lease held by someone else is taken over only once `observer` (the caller's, kept across
    calls) has seen it unchanged for a whole lease duration: the other holder's clock says
    nothing. Every write carries the resourceVersion it was computed from, so of two writers
    racing, one gets a 409 Conflict and returns False rather than overwriting the other: try
    again at the next renewal. `now` is the time written into the Lease (the wall clock).
    """
    leases = CoordinationV1Api(api)
    try:
        lease = leases.read_namespaced_lease(name, namespace)
    except ApiException as error:
        if error.status != HTTPStatus.NOT_FOUND:
            raise
        try:
            # Times are set by the patch below (see the module docstring).
            lease = leases.create_namespaced_lease(
                namespace,
                V1Lease(
                    metadata=V1ObjectMeta(name=name, namespace=namespace),
                    spec=V1LeaseSpec(
                        holder_identity=holder,
                        lease_duration_seconds=duration_seconds,
                        lease_transitions=0,
                    ),
                ),
            )
        except ApiException as create_error:
            if create_error.status == HTTPStatus.CONFLICT:
                return False
            raise
    spec = lease.spec or V1LeaseSpec()
    freshness = observer.observe(name, {"spec": _spec_object(spec)})
    # Read after the GET: a read that waited for the API server must not date the renewal.
    moment = now if now is not None else datetime.now(UTC)
    update: dict[str, Any] = {
        "holderIdentity": holder,
        "leaseDurationSeconds": duration_seconds,
        "renewTime": micro_time(moment),
    }
    if spec.holder_identity != holder:
        if spec.holder_identity and freshness.valid:
            return False
        update["acquireTime"] = micro_time(moment)
        if spec.holder_identity:
            update["leaseTransitions"] = (spec.lease_transitions or 0) + 1
    elif spec.acquire_time is None:
        update["acquireTime"] = micro_time(moment)
    resource_version = lease.metadata.resource_version if lease.metadata else None
    try:
        leases.patch_namespaced_lease(
            name,
            namespace,
            {"metadata": {"resourceVersion": resource_version}, "spec": update},
        )
    except ApiException as error:
        if error.status == HTTPStatus.CONFLICT:
            return False
        raise
    return True


def _spec_object(spec: V1LeaseSpec) -> dict[str, Any]:
    """A Lease spec as the API serves it (JSON), from the client's model."""
    times = {
        key: micro_time(value)
        for key, value in (("acquireTime", spec.acquire_time), ("renewTime", spec.renew_time))
        if value is not None
    }
    return {
        "holderIdentity": spec.holder_identity,
        "leaseDurationSeconds": spec.lease_duration_seconds,
        "leaseTransitions": spec.lease_transitions,
        **times,
    }


@dataclass(frozen=True)
class Freshness:
    """What this process knows of one Lease's holder."""

    holder: str | None  # None: nobody holds it, or it proves nothing (no duration)
    valid: bool  # seen renewed less than one lease duration ago (this process's clock)
    valid_until: float | None  # on the observer's monotonic clock; None when not held
    duration: float  # leaseDurationSeconds (0 when unknown)
    # How far the writer's clock is ahead of ours (negative: behind), in seconds: renewTime
    # minus our wall clock when we saw it, the largest of the last renewals' (see the module
    # docstring). None until a renewal was seen.
    skew: float | None


@dataclass
class _Sighting:
    record: str  # the spec as seen; any change proves a write
    changed_at: float  # monotonic
    skews: tuple[float, ...]  # the last SKEW_SAMPLES measurements, newest last

    @property
    def skew(self) -> float | None:
        return max(self.skews) if self.skews else None


class LeaseObserver:
    """When this process saw each Lease change, on its own monotonic clock (thread-safe).

    `monotonic` and `wall` are this process's clocks (injected by tests).
    """

    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        self._seen: dict[str, _Sighting] = {}

    def observe(self, name: str, lease: Mapping[str, Any] | None) -> Freshness:
        """Note what Lease `name` holds now (a JSON object as the API serves it; None when it
        does not exist) and judge it."""
        spec = lease.get("spec") if lease is not None else None
        spec = spec if isinstance(spec, Mapping) else {}
        record = json.dumps(spec, sort_keys=True, default=str)
        now = self._monotonic()
        with self._lock:
            seen = self._seen.get(name)
            if seen is None:  # first sight: fresh for one duration, as client-go does
                seen = self._seen[name] = _Sighting(record, now, ())
            elif seen.record != record:
                renewed = _parse_time(spec.get("renewTime"))
                skews = seen.skews
                if renewed is not None:
                    skews = (*skews, renewed - self._wall())[-SKEW_SAMPLES:]
                seen = self._seen[name] = _Sighting(record, now, skews)
        holder = spec.get("holderIdentity")
        duration = spec.get("leaseDurationSeconds")
        if not isinstance(holder, str) or not holder or not isinstance(duration, int):
            return Freshness(None, False, None, 0.0, seen.skew)
        until = seen.changed_at + duration
        return Freshness(holder, now < until, until, float(duration), seen.skew)

    def forget_all_but(self, names: Iterable[str]) -> None:
        """Drop what was seen of Leases not in `names` (deleted ones)."""
        keep = set(names)
        with self._lock:
            for name in set(self._seen) - keep:
                del self._seen[name]


def _parse_time(value: object) -> float | None:
    """A Lease time (RFC 3339 with a zone) as a POSIX timestamp; None when unusable."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None
