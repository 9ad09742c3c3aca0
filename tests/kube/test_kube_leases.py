"""Lease renewal against the fake API server, and freshness judged on our own clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fakecluster.fakeapi import FakeApiServer, RecordedRequest
from kubernetes.client import ApiClient

from gatewayd.kube.leases import SKEW_SAMPLES, LeaseObserver, micro_time, renew_lease

pytestmark = pytest.mark.kube

NAMESPACE = "gatewayd"
# Whole seconds on purpose: datetime.isoformat() would drop the fraction MicroTime requires.
T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def observer(clock: Clock | None = None, wall: float | None = None) -> LeaseObserver:
    wall_now = T0.timestamp() if wall is None else wall
    return LeaseObserver(monotonic=clock or Clock(), wall=lambda: wall_now)


def stored(fake_api: FakeApiServer) -> dict[str, Any]:
    found = fake_api.get("leases", "gw1", NAMESPACE)
    assert found is not None
    spec: dict[str, Any] = found["spec"]
    return spec


def test_first_renewal_creates_the_lease(api: ApiClient, fake_api: FakeApiServer) -> None:
    assert renew_lease(api, NAMESPACE, "gw1", "gw1", 15, observer(), now=T0)
    assert stored(fake_api) == {
        "holderIdentity": "gw1",
        "leaseDurationSeconds": 15,
        "leaseTransitions": 0,
        "acquireTime": "2030-01-02T03:04:05.000000Z",
        "renewTime": "2030-01-02T03:04:05.000000Z",
    }


def test_renewal_moves_only_the_renew_time(api: ApiClient, fake_api: FakeApiServer) -> None:
    renew_lease(api, NAMESPACE, "gw1", "gw1", 15, observer(), now=T0)
    later = T0 + timedelta(seconds=5, microseconds=250)
    assert renew_lease(api, NAMESPACE, "gw1", "gw1", 15, observer(), now=later)
    spec = stored(fake_api)
    assert spec["renewTime"] == "2030-01-02T03:04:10.000250Z"
    assert spec["acquireTime"] == "2030-01-02T03:04:05.000000Z"
    assert spec["leaseTransitions"] == 0


def test_a_lease_of_another_holder_is_taken_only_after_we_saw_it_unchanged_for_its_duration(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    """Its holder's clock runs an hour behind ours: its renewTime proves nothing either way."""
    renew_lease(api, NAMESPACE, "gw1", "controller-a", 15, observer(),
                now=T0 - timedelta(hours=1))
    clock = Clock()
    ours = observer(clock)
    assert not renew_lease(api, NAMESPACE, "gw1", "controller-b", 15, ours, now=T0)
    clock.now += 14.9
    assert not renew_lease(api, NAMESPACE, "gw1", "controller-b", 15, ours, now=T0)
    assert stored(fake_api)["holderIdentity"] == "controller-a"
    clock.now += 0.1
    takeover = T0 + timedelta(seconds=15)
    assert renew_lease(api, NAMESPACE, "gw1", "controller-b", 15, ours, now=takeover)
    spec = stored(fake_api)
    assert spec["holderIdentity"] == "controller-b"
    assert spec["acquireTime"] == micro_time(takeover)
    assert spec["leaseTransitions"] == 1


def test_a_renewal_we_see_restarts_the_wait(api: ApiClient, fake_api: FakeApiServer) -> None:
    """Its holder's clock runs an hour ahead: it is still only as fresh as its last renewal."""
    ahead = T0 + timedelta(hours=1)
    renew_lease(api, NAMESPACE, "gw1", "controller-a", 15, observer(), now=ahead)
    clock = Clock()
    ours = observer(clock)
    assert not renew_lease(api, NAMESPACE, "gw1", "controller-b", 15, ours, now=T0)
    clock.now += 10
    renew_lease(api, NAMESPACE, "gw1", "controller-a", 15, observer(),
                now=ahead + timedelta(seconds=10))
    clock.now += 10
    assert not renew_lease(api, NAMESPACE, "gw1", "controller-b", 15, ours, now=T0)
    clock.now += 15
    assert renew_lease(api, NAMESPACE, "gw1", "controller-b", 15, ours, now=T0)


def test_losing_a_write_race_is_not_holding(api: ApiClient, fake_api: FakeApiServer) -> None:
    renew_lease(api, NAMESPACE, "gw1", "controller-a", 15, observer(), now=T0)
    clock = Clock()
    ours = observer(clock)
    assert not renew_lease(api, NAMESPACE, "gw1", "controller-b", 15, ours, now=T0)
    clock.now += 20  # controller-a stopped renewing

    def another_controller_writes_first(request: RecordedRequest) -> None:
        if request.method == "PATCH":
            fake_api.before_request = None
            current = fake_api.get("leases", "gw1", NAMESPACE)
            assert current is not None
            current["spec"]["holderIdentity"] = "controller-c"
            fake_api.put(current)

    fake_api.before_request = another_controller_writes_first
    assert not renew_lease(
        api, NAMESPACE, "gw1", "controller-b", 15, ours, now=T0 + timedelta(seconds=20)
    )
    assert stored(fake_api)["holderIdentity"] == "controller-c"


def test_api_errors_other_than_conflicts_are_raised(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    fake_api.fail_requests(status=500, count=1)
    with pytest.raises(Exception, match="500"):
        renew_lease(api, NAMESPACE, "gw1", "gw1", 15, observer(), now=T0)
    assert fake_api.get("leases", "gw1", NAMESPACE) is None


def lease(renew_time: datetime, holder: str = "gw1", seconds: int = 4) -> dict[str, Any]:
    spec = {"holderIdentity": holder, "leaseDurationSeconds": seconds,
            "renewTime": micro_time(renew_time)}
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": spec}


@pytest.mark.parametrize("writer_offset", [-30.0, -4.0, 0.0, 4.0, 30.0])
def test_freshness_does_not_depend_on_the_writers_clock(writer_offset: float) -> None:
    """A gateway renewing every second with its clock `writer_offset` s off ours: valid while
    it renews, expired one duration after its last renewal, whatever the offset."""
    clock = Clock()
    wall = [T0.timestamp()]
    seen = LeaseObserver(monotonic=clock, wall=lambda: wall[0])
    for _ in range(10):
        clock.now += 1
        wall[0] += 1
        written = datetime.fromtimestamp(wall[0] + writer_offset, UTC)
        freshness = seen.observe("gw1", lease(written))
        assert freshness.valid and freshness.holder == "gw1"
    assert freshness.skew == pytest.approx(writer_offset)
    last_renewal = clock.now
    clock.now = last_renewal + 3.9
    assert seen.observe("gw1", lease(written)).valid
    clock.now = last_renewal + 4
    assert not seen.observe("gw1", lease(written)).valid


def test_a_lease_seen_for_the_first_time_is_fresh_for_one_duration() -> None:
    """As client-go: a restarted controller cannot know when it was renewed last."""
    clock = Clock()
    seen = LeaseObserver(monotonic=clock, wall=lambda: T0.timestamp())
    long_ago = lease(T0 - timedelta(days=1))
    first = seen.observe("gw1", long_ago)
    assert first.valid and first.skew is None  # no renewal seen: no skew measured
    clock.now += 4
    assert not seen.observe("gw1", long_ago).valid


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"holderIdentity": "", "leaseDurationSeconds": 4},
        {"holderIdentity": "gw1"},
        {"holderIdentity": "gw1", "leaseDurationSeconds": "4"},
    ],
)
def test_a_lease_without_holder_or_duration_proves_nothing(spec: dict[str, Any]) -> None:
    freshness = LeaseObserver().observe("gw1", {"kind": "Lease", "spec": spec})
    assert (freshness.holder, freshness.valid, freshness.valid_until) == (None, False, None)


def test_one_late_sighting_does_not_report_a_clock_as_off() -> None:
    """After an API outage the watch sees a renewal seconds after it was written: the writer
    looks behind by that delay. The skew stays what the prompt sightings measured."""
    clock = Clock()
    wall = [T0.timestamp()]
    seen = LeaseObserver(monotonic=clock, wall=lambda: wall[0])
    for delay in (0.01, 0.02, 0.01, 0.02, 5.0):
        clock.now += 1
        wall[0] += 1
        written = datetime.fromtimestamp(wall[0] - delay, UTC)
        skew = seen.observe("gw1", lease(written)).skew
    assert skew == pytest.approx(-0.01)


def test_a_clock_that_was_set_right_is_measured_again() -> None:
    """The measurement follows a writer whose clock changed, once the older samples aged out."""
    clock = Clock()
    wall = [T0.timestamp()]
    seen = LeaseObserver(monotonic=clock, wall=lambda: wall[0])
    skews = []
    for offset in [30.0] * 3 + [0.0] * SKEW_SAMPLES:
        clock.now += 1
        wall[0] += 1
        skews.append(seen.observe("gw1", lease(datetime.fromtimestamp(wall[0] + offset, UTC))).skew)
    assert skews[2] == pytest.approx(30.0) and skews[-1] == pytest.approx(0.0)
