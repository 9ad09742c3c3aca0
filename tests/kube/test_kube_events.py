"""The one Event recorder (events.k8s.io/v1, repeats as a series) against the fake API server."""

from __future__ import annotations

from typing import Any

import pytest
from fakecluster.fakeapi import FakeApiServer
from kubernetes.client import ApiClient

from gatewayd.clusterlink import CustomObject
from gatewayd.kube.events import EventRecorder

pytestmark = pytest.mark.kube

NODE = {
    "apiVersion": "egress.gatewayd.io/v1alpha1",
    "kind": "EgressNode",
    "metadata": {"name": "node-1", "uid": "uid-node-1"},
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def all_events(fake_api: FakeApiServer) -> list[dict[str, Any]]:
    """Event objects of both APIs: what a flapping daemon would pile up in etcd."""
    return fake_api.list("events") + fake_api.list("events.events.k8s.io")


def count(event: dict[str, Any]) -> int:
    return int((event.get("series") or {}).get("count", 1))


def test_a_thousand_repeats_make_one_event_with_a_series(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    """Steer reports a flapping gateway a thousand times, through its EgressNode."""
    node = CustomObject(api, "egressnodes", "EgressNode", "node-1")
    clock = Clock()
    node.recorder = EventRecorder(api, "gatewayd-steer", "node-1", monotonic=clock)
    for i in range(1000):
        node.record_event("gatewayd-steer", "FastFailover", f"flip {i}", True, "uid-node-1")
    (event,) = all_events(fake_api)
    assert 1 <= count(event) < 1000  # repeats are written at most every 30 s
    clock.now += 30
    assert node.recorder.flush()
    (event,) = all_events(fake_api)
    assert event["series"]["count"] == 1000
    assert (event["reason"], event["type"]) == ("FastFailover", "Warning")
    assert event["note"] == "flip 999"  # the latest
    assert event["regarding"] == {
        "apiVersion": "egress.gatewayd.io/v1alpha1", "kind": "EgressNode", "name": "node-1",
        "uid": "uid-node-1",
    }
    assert (event["reportingController"], event["reportingInstance"]) == (
        "gatewayd-steer", "node-1")


def test_writes_are_bounded_too(fake_api: FakeApiServer, api: ApiClient) -> None:
    clock = Clock()
    recorder = EventRecorder(api, "gatewayd-controller", "c1", monotonic=clock)
    start = len(fake_api.requests)
    for _ in range(100):  # 100 repeats a second for a minute
        for _ in range(100):
            recorder.record(NODE, "Warning", "BadPeer", "bad key")
        clock.now += 1
    writes = [r for r in fake_api.requests[start:] if r.method in ("POST", "PATCH")]
    assert len(writes) <= 2 + 100 // 30 + 1  # the create, the first repeat, one per 30 s
    clock.now += 30
    recorder.flush()
    (event,) = fake_api.list("events.events.k8s.io")
    assert event["series"]["count"] == 10_000


def test_other_reasons_and_objects_are_other_events(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    recorder = EventRecorder(api, "gatewayd-controller", "c1")
    other_node = {**NODE, "metadata": {"name": "node-2", "uid": "uid-node-2"}}
    recorder.record(NODE, "Warning", "BadPeer", "bad key")
    recorder.record(NODE, "Normal", "PeerAccepted", "good key")
    recorder.record(other_node, "Warning", "BadPeer", "bad key")
    assert sorted((e["regarding"]["name"], e["reason"]) for e in fake_api.list(
        "events.events.k8s.io")) == [
        ("node-1", "BadPeer"), ("node-1", "PeerAccepted"), ("node-2", "BadPeer")]
    assert all(e["metadata"]["namespace"] == "default" for e in fake_api.list(
        "events.events.k8s.io"))


def test_a_quiet_series_ends_and_the_next_occurrence_is_a_new_event(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    clock = Clock()
    recorder = EventRecorder(api, "gatewayd-controller", "c1", monotonic=clock)
    recorder.record(NODE, "Warning", "BadPeer", "bad key")
    recorder.record(NODE, "Warning", "BadPeer", "bad key")
    clock.now += 360  # client-go's six minutes
    recorder.record(NODE, "Warning", "BadPeer", "bad key")
    assert sorted(count(e) for e in fake_api.list("events.events.k8s.io")) == [1, 2]


def test_a_failed_write_is_kept_and_retried_with_its_count(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    recorder = EventRecorder(api, "gatewayd-controller", "c1")
    fake_api.fail_requests(status=503)
    assert not recorder.record(NODE, "Warning", "BadPeer", "bad key")
    assert not recorder.record(NODE, "Warning", "BadPeer", "bad key")
    assert recorder.pending
    fake_api.clear_faults()
    assert recorder.flush() and not recorder.pending
    (event,) = fake_api.list("events.events.k8s.io")
    assert event["series"]["count"] == 2


def test_the_fake_refuses_what_the_api_server_refuses(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    recorder = EventRecorder(api, "gatewayd-controller", "c1")
    assert not recorder.record(NODE, "Bad", "BadPeer", "bad key")  # type must be Normal/Warning
    assert fake_api.list("events.events.k8s.io") == []
