"""Lease renewal against the fake API server, and the pure expiry rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fixtures.fakeapi import FakeApiServer, RecordedRequest
from kubernetes.client import ApiClient

from gatewayd.kube.leases import lease_expired, micro_time, renew_lease

pytestmark = pytest.mark.kube

NAMESPACE = "gatewayd"
# Whole seconds on purpose: datetime.isoformat() would drop the fraction MicroTime requires.
T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def stored(fake_api: FakeApiServer) -> dict[str, Any]:
    found = fake_api.get("leases", "gw1", NAMESPACE)
    assert found is not None
    spec: dict[str, Any] = found["spec"]
    return spec


def test_first_renewal_creates_the_lease(api: ApiClient, fake_api: FakeApiServer) -> None:
    assert renew_lease(api, NAMESPACE, "gw1", "gw1", 15, now=T0)
    assert stored(fake_api) == {
        "holderIdentity": "gw1",
        "leaseDurationSeconds": 15,
        "leaseTransitions": 0,
        "acquireTime": "2030-01-02T03:04:05.000000Z",
        "renewTime": "2030-01-02T03:04:05.000000Z",
    }


def test_renewal_moves_only_the_renew_time(api: ApiClient, fake_api: FakeApiServer) -> None:
    renew_lease(api, NAMESPACE, "gw1", "gw1", 15, now=T0)
    later = T0 + timedelta(seconds=5, microseconds=250)
    assert renew_lease(api, NAMESPACE, "gw1", "gw1", 15, now=later)
    spec = stored(fake_api)
    assert spec["renewTime"] == "2030-01-02T03:04:10.000250Z"
    assert spec["acquireTime"] == "2030-01-02T03:04:05.000000Z"
    assert spec["leaseTransitions"] == 0


def test_a_valid_lease_of_another_holder_is_not_taken(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    renew_lease(api, NAMESPACE, "gw1", "controller-a", 15, now=T0)
    assert not renew_lease(
        api, NAMESPACE, "gw1", "controller-b", 15, now=T0 + timedelta(seconds=14)
    )
    assert stored(fake_api)["holderIdentity"] == "controller-a"


def test_an_expired_lease_is_taken_over(api: ApiClient, fake_api: FakeApiServer) -> None:
    renew_lease(api, NAMESPACE, "gw1", "controller-a", 15, now=T0)
    takeover = T0 + timedelta(seconds=15)
    assert renew_lease(api, NAMESPACE, "gw1", "controller-b", 15, now=takeover)
    spec = stored(fake_api)
    assert spec["holderIdentity"] == "controller-b"
    assert spec["acquireTime"] == micro_time(takeover)
    assert spec["leaseTransitions"] == 1


def test_losing_a_write_race_is_not_holding(api: ApiClient, fake_api: FakeApiServer) -> None:
    renew_lease(api, NAMESPACE, "gw1", "controller-a", 15, now=T0)

    def another_controller_writes_first(request: RecordedRequest) -> None:
        if request.method == "PATCH":
            fake_api.before_request = None
            current = fake_api.get("leases", "gw1", NAMESPACE)
            assert current is not None
            current["spec"]["holderIdentity"] = "controller-c"
            fake_api.put(current)

    fake_api.before_request = another_controller_writes_first
    assert not renew_lease(
        api, NAMESPACE, "gw1", "controller-b", 15, now=T0 + timedelta(seconds=20)
    )
    assert stored(fake_api)["holderIdentity"] == "controller-c"


def test_api_errors_other_than_conflicts_are_raised(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    fake_api.fail_requests(status=500, count=1)
    with pytest.raises(Exception, match="500"):
        renew_lease(api, NAMESPACE, "gw1", "gw1", 15, now=T0)
    assert fake_api.get("leases", "gw1", NAMESPACE) is None


def lease(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": spec}


VALID = {"holderIdentity": "gw1", "leaseDurationSeconds": 10, "renewTime": micro_time(T0)}


@pytest.mark.parametrize(
    ("spec", "seconds_later", "expired"),
    [
        (VALID, 0, False),
        (VALID, 9.999, False),
        (VALID, 10, True),
        ({**VALID, "renewTime": "2030-01-02T03:04:05Z"}, 5, False),
        ({**VALID, "holderIdentity": ""}, 0, True),
        ({k: v for k, v in VALID.items() if k != "renewTime"}, 0, True),
        ({k: v for k, v in VALID.items() if k != "leaseDurationSeconds"}, 0, True),
        ({**VALID, "renewTime": "yesterday"}, 0, True),
        ({**VALID, "renewTime": "2030-01-02T03:04:05"}, 0, True),  # no zone: unknowable
        ({**VALID, "leaseDurationSeconds": "10"}, 0, True),
    ],
)
def test_lease_expired(spec: dict[str, Any], seconds_later: float, expired: bool) -> None:
    assert lease_expired(lease(spec), T0 + timedelta(seconds=seconds_later)) is expired


def test_a_lease_without_spec_is_expired() -> None:
    assert lease_expired({"kind": "Lease"}, T0)
