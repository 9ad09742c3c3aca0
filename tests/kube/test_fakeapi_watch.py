"""Watch streams of the fake API server, read by the real `kubernetes.watch.Watch`: versions,
bookmarks, 410 Gone, selectors, and the test's controls over streams and reachability."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
import urllib3
from fakecluster.fakeapi import FakeApiServer, wait_until
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from kubernetes.watch import Watch

pytestmark = pytest.mark.kube

GROUP, VERSION = "egress.gatewayd.io", "v1alpha1"


def pod(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"containers": []},
    }


def lease(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": "gatewayd"},
        "spec": {"holderIdentity": name},
    }


def summary(event: dict[str, Any]) -> tuple[str, str]:
    metadata = event["raw_object"]["metadata"]
    return event["type"], metadata.get("name", metadata["resourceVersion"])


def collect(
    func: Callable[..., Any], *args: Any, count: int, timeout: int = 5, **kwargs: Any
) -> list[dict[str, Any]]:
    """The first `count` events of a watch (fewer if the stream times out first)."""
    watch = Watch()
    events: list[dict[str, Any]] = []
    for event in watch.stream(func, *args, timeout_seconds=timeout, **kwargs):
        events.append(event)
        if len(events) == count:
            watch.stop()
    return events


def list_version(api: ApiClient) -> str:
    return CoreV1Api(api).list_namespaced_pod("default").metadata.resource_version


def in_background(action: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def test_a_watch_without_version_starts_with_what_exists(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    fake_api.put(pod("b"))
    fake_api.put(pod("a"))
    events = collect(CoreV1Api(api).list_namespaced_pod, "default", count=2)
    assert [summary(e) for e in events] == [("ADDED", "a"), ("ADDED", "b")]


def test_a_watch_from_a_listed_version_sees_exactly_the_later_changes(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    core = CoreV1Api(api)
    fake_api.put(pod("a"))
    version = list_version(api)
    core.create_namespaced_pod("default", pod("b"))
    core.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"v": "2"}}})
    core.delete_namespaced_pod("b", "default")
    events = collect(core.list_namespaced_pod, "default", count=3, resource_version=version)
    assert [summary(e) for e in events] == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    versions = [int(e["raw_object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and versions[0] > int(version)
    assert events[1]["object"].metadata.labels == {"v": "2"}


def test_bookmarks_advance_the_version_past_other_types_changes(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    version = list_version(api)

    def change_another_type() -> None:
        wait_until(lambda: fake_api.open_watches == 1, what="the watch to open")
        fake_api.put(lease("gw1"))
        fake_api.send_bookmarks()

    in_background(change_another_type)
    watch = Watch()
    stream = watch.stream(
        CoreV1Api(api).list_namespaced_pod,
        "default",
        resource_version=version,
        allow_watch_bookmarks=True,
        timeout_seconds=5,
    )
    event = next(stream)
    watch.stop()
    assert event["type"] == "BOOKMARK"
    assert event["raw_object"]["metadata"]["resourceVersion"] == str(fake_api.resource_version)
    assert int(watch.resource_version) > int(version)


def test_a_watch_that_times_out_ends_with_a_bookmark(api: ApiClient) -> None:
    events = collect(
        CoreV1Api(api).list_namespaced_pod,
        "default",
        count=99,
        timeout=1,
        resource_version=list_version(api),
        allow_watch_bookmarks=True,
    )
    assert [e["type"] for e in events] == ["BOOKMARK"]


def test_no_bookmarks_unless_asked(api: ApiClient, fake_api: FakeApiServer) -> None:
    def bookmark_then_change() -> None:
        wait_until(lambda: fake_api.open_watches == 1, what="the watch to open")
        fake_api.send_bookmarks()
        fake_api.put(pod("a"))

    in_background(bookmark_then_change)
    events = collect(
        CoreV1Api(api).list_namespaced_pod, "default", count=1, resource_version=list_version(api)
    )
    assert [summary(e) for e in events] == [("ADDED", "a")]


def test_a_version_older_than_the_history_is_410_and_a_relist_recovers(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    core = CoreV1Api(api)
    old_version = list_version(api)
    fake_api.put(pod("a"))
    fake_api.expire_history()
    with pytest.raises(ApiException) as raised:
        collect(core.list_namespaced_pod, "default", count=1, resource_version=old_version)
    assert raised.value.status == 410

    relisted = core.list_namespaced_pod("default")
    assert [p.metadata.name for p in relisted.items] == ["a"]
    fake_api.put(pod("b"))
    events = collect(
        core.list_namespaced_pod,
        "default",
        count=1,
        resource_version=relisted.metadata.resource_version,
    )
    assert [summary(e) for e in events] == [("ADDED", "b")]


def test_410_comes_as_an_error_event_in_a_200_stream(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    old_version = list_version(api)
    fake_api.put(pod("a"))
    fake_api.expire_history()
    response = CoreV1Api(api).list_namespaced_pod(
        "default", watch=True, resource_version=old_version, _preload_content=False
    )
    assert response.status == 200
    lines = response.data.decode().splitlines()
    event = json.loads(lines[0])
    assert len(lines) == 1
    assert event["type"] == "ERROR"
    assert event["object"]["kind"] == "Status"
    assert event["object"]["code"] == 410


def test_history_keeps_only_the_last_changes_of_each_type() -> None:
    with FakeApiServer(history_limit=2) as fake, fake.api_client() as api:
        core = CoreV1Api(api)
        before = list_version(api)
        for name in ("a", "b", "c"):
            fake.put(pod(name))
        after_first = fake.get("pods", "a")["metadata"]["resourceVersion"]
        fake.put(lease("gw1"))  # another type's changes do not push pods out
        with pytest.raises(ApiException) as raised:
            collect(core.list_namespaced_pod, "default", count=1, resource_version=before)
        assert raised.value.status == 410
        events = collect(core.list_namespaced_pod, "default", count=2, resource_version=after_first)
        assert [summary(e) for e in events] == [("ADDED", "b"), ("ADDED", "c")]


def test_objects_entering_and_leaving_a_selector_are_added_and_deleted(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    version = list_version(api)
    fake_api.put(pod("a", app="web"))
    fake_api.put(pod("a", app="db"))
    fake_api.put(pod("other", app="db"))
    fake_api.put(pod("a", app="web"))
    events = collect(
        CoreV1Api(api).list_namespaced_pod,
        "default",
        count=3,
        resource_version=version,
        label_selector="app=web",
    )
    assert [summary(e) for e in events] == [("ADDED", "a"), ("DELETED", "a"), ("ADDED", "a")]


def test_a_custom_resource_watched_by_name(api: ApiClient, fake_api: FakeApiServer) -> None:
    objects = CustomObjectsApi(api)
    for name in ("gw1", "gw2"):
        objects.create_cluster_custom_object(
            GROUP,
            VERSION,
            "egressgateways",
            {"kind": "EgressGateway", "metadata": {"name": name}, "spec": {"rules": []}},
        )
    version = objects.list_cluster_custom_object(GROUP, VERSION, "egressgateways")["metadata"][
        "resourceVersion"
    ]
    for name in ("gw2", "gw1"):
        objects.patch_cluster_custom_object(
            GROUP, VERSION, "egressgateways", name, {"spec": {"rules": ["p"]}}
        )
    events = collect(
        objects.list_cluster_custom_object,
        GROUP,
        VERSION,
        "egressgateways",
        count=1,
        resource_version=version,
        field_selector="metadata.name=gw1",
    )
    assert [summary(e) for e in events] == [("MODIFIED", "gw1")]
    assert events[0]["object"]["metadata"]["generation"] == 2


def test_end_watches_ends_open_streams(api: ApiClient, fake_api: FakeApiServer) -> None:
    thread = in_background(
        lambda: collect(CoreV1Api(api).list_namespaced_pod, "default", count=1, timeout=60)
    )
    wait_until(lambda: fake_api.open_watches == 1, what="the watch to open")
    fake_api.end_watches()
    thread.join(10)
    assert not thread.is_alive()


def test_a_client_that_stops_watching_frees_its_stream(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    watch = Watch()
    stream = watch.stream(CoreV1Api(api).list_namespaced_pod, "default", timeout_seconds=60)
    in_background(lambda: (wait_until(lambda: fake_api.open_watches == 1), fake_api.put(pod("a"))))
    assert summary(next(stream)) == ("ADDED", "a")
    watch.stop()
    stream.close()
    wait_until(lambda: fake_api.open_watches == 0, what="the server to notice")


def test_going_down_refuses_and_cuts_connections_and_coming_up_keeps_everything(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    core = CoreV1Api(api)
    fake_api.put(pod("a"))
    url, version = fake_api.url, list_version(api)
    outcome: list[BaseException | None] = []

    def watch_until_cut() -> None:
        try:
            collect(core.list_namespaced_pod, "default", count=99, timeout=60)
            outcome.append(None)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            outcome.append(error)

    thread = in_background(watch_until_cut)
    wait_until(lambda: fake_api.open_watches == 1, what="the watch to open")
    fake_api.go_down()
    thread.join(10)
    assert len(outcome) == 1 and outcome[0] is not None, "the stream should break, not end"
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        core.list_namespaced_pod("default")

    fake_api.come_up()
    assert fake_api.url == url
    assert list_version(api) == version
    assert [p.metadata.name for p in core.list_namespaced_pod("default").items] == ["a"]


def test_down_for_comes_back_by_itself(api: ApiClient, fake_api: FakeApiServer) -> None:
    fake_api.down_for(0.3)
    assert not fake_api.is_up
    wait_until(lambda: fake_api.is_up, what="the server to come back")
    assert CoreV1Api(api).list_namespace().items == []


def test_history_replays_each_version_as_it_was(api: ApiClient) -> None:
    objects = CustomObjectsApi(api)
    version = list_version(api)
    created = objects.create_cluster_custom_object(
        GROUP,
        VERSION,
        "egressgateways",
        {"kind": "EgressGateway", "metadata": {"name": "gw1"}, "spec": {"rules": []}},
    )
    patched = objects.patch_cluster_custom_object(
        GROUP, VERSION, "egressgateways", "gw1", {"spec": {"rules": ["p"]}}
    )
    events = collect(
        objects.list_cluster_custom_object,
        GROUP,
        VERSION,
        "egressgateways",
        count=2,
        resource_version=version,
    )
    assert [e["raw_object"] for e in events] == [created, patched]
