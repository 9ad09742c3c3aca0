"""Lease helpers: gateways renew one Lease each as their heartbeat; the controller reads them.

Lease times are MicroTime on the wire: the API server parses exactly six fractional digits, and
`datetime.isoformat()` (what the client sends for datetime fields) drops them when they are
zero. So times are written here as formatted strings, in patches, never as datetime fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any

from kubernetes.client import ApiClient, CoordinationV1Api, V1Lease, V1LeaseSpec, V1ObjectMeta
from kubernetes.client.exceptions import ApiException


def micro_time(moment: datetime) -> str:
    """`moment` as a Kubernetes MicroTime: UTC, six fractional digits."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def renew_lease(
    api: ApiClient,
    namespace: str,
    name: str,
    holder: str,
    duration_seconds: int,
    *,
    now: datetime | None = None,
) -> bool:
    """Create or renew Lease `namespace/name` for `holder`; True when `holder` holds it now.

    A Lease held by someone else is taken over only once it has expired. Every write carries the
    resourceVersion it was computed from, so of two writers racing, one gets a 409 Conflict and
    returns False rather than overwriting the other: try again at the next renewal.
    """
    moment = now if now is not None else datetime.now(UTC)
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
    update: dict[str, Any] = {
        "holderIdentity": holder,
        "leaseDurationSeconds": duration_seconds,
        "renewTime": micro_time(moment),
    }
    if spec.holder_identity != holder:
        if spec.holder_identity and not _expired(
            spec.renew_time, spec.lease_duration_seconds, moment
        ):
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


def lease_expired(lease: Mapping[str, Any], now: datetime) -> bool:
    """Whether a Lease, as the API serves it (a JSON object), no longer proves its holder alive.

    A Lease without a holder, renew time or duration, or with times that do not parse, proves
    nothing and counts as expired.
    """
    spec = lease.get("spec")
    if not isinstance(spec, Mapping) or not spec.get("holderIdentity"):
        return True
    renew_time = spec.get("renewTime")
    duration = spec.get("leaseDurationSeconds")
    try:
        renewed = datetime.fromisoformat(renew_time) if isinstance(renew_time, str) else None
    except ValueError:
        return True
    return _expired(renewed, duration if isinstance(duration, int) else None, now)


def _expired(renewed: datetime | None, duration_seconds: int | None, now: datetime) -> bool:
    if renewed is None or duration_seconds is None or renewed.tzinfo is None:
        return True
    return renewed + timedelta(seconds=duration_seconds) <= now
