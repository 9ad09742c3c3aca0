"""gatewayd.kube.informer against the fake API server: it lists, follows watches, relists after
410 Gone, backs off on errors, recovers after outages, and marks its owner dirty only when the
cache really changed."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fakecluster.fakeapi import FakeApiServer, wait_until
from kubernetes.client import ApiClient

from gatewayd.kube import resources
from gatewayd.kube.informer import Backoff, Informer
from gatewayd.kube.resources import LEASES, PODS, Resource

pytestmark = pytest.mark.kube

FAST = Backoff(initial=0.05, maximum=0.2)
ALL_RESOURCES = [value for value in vars(resources).values() if isinstance(value, Resource)]


class Dirty:
    """The owner's side of on_change(): counts how often it was marked dirty."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def __call__(self) -> None:
        with self._lock:
            self._count += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._count


@contextmanager
def running(informer: Informer) -> Iterator[Informer]:
    informer.start()
    try:
        yield informer
    finally:
        informer.stop()


def obj(
    resource: Resource, name: str, namespace: str = "gatewayd", **labels: str
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if resource.namespaced:
        metadata["namespace"] = namespace
    return {"apiVersion": resource.api_version, "kind": resource.kind, "metadata": metadata}


def names(informer: Informer) -> list[str]:
    return [item["metadata"]["name"] for item in informer.objects()]


def lists_of(fake_api: FakeApiServer, path: str) -> int:
    """How many list (not watch) requests reached `path`."""
    return sum(
        1
        for request in fake_api.requests
        if request.method == "GET" and request.path == path and "watch" not in request.query
    )


def synced(informer: Informer, fake_api: FakeApiServer) -> None:
    """Wait until the informer has listed and has its watch open."""
    assert informer.wait_for_sync(10)
    wait_until(lambda: fake_api.open_watches == 1, what="the informer's watch")


def test_lists_then_follows_changes_and_marks_dirty_per_change(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    fake_api.put(obj(PODS, "a", "default"))
    fake_api.put(obj(PODS, "b", "other"))
    dirty = Dirty()
    with running(Informer(api, PODS, dirty, backoff=FAST)) as informer:
        synced(informer, fake_api)
        assert names(informer) == ["a", "b"]
        assert dirty.count == 1
        listed = informer.get("a", "default")
        assert listed is not None and (listed["kind"], listed["apiVersion"]) == ("Pod", "v1")

        fake_api.put(obj(PODS, "c", "default"))
        wait_until(lambda: names(informer) == ["a", "c", "b"], what="c to be added")
        fake_api.put(obj(PODS, "a", "default", app="web"))
        wait_until(
            lambda: (informer.get("a", "default") or {})["metadata"]["labels"] == {"app": "web"},
            what="a to be modified",
        )
        fake_api.delete("pods", "b", "other")
        wait_until(lambda: names(informer) == ["a", "c"], what="b to be deleted")
        assert dirty.count == 4
        assert informer.resource_version == str(fake_api.resource_version)


def test_namespace_and_selectors_limit_the_cache(api: ApiClient, fake_api: FakeApiServer) -> None:
    fake_api.put(obj(LEASES, "gw1", "gatewayd"))
    fake_api.put(obj(LEASES, "kube-scheduler", "kube-system"))
    fake_api.put(obj(PODS, "web", "default", app="web"))
    fake_api.put(obj(PODS, "db", "default", app="db"))
    leases = Informer(api, LEASES, Dirty(), namespace="gatewayd", backoff=FAST)
    web_pods = Informer(api, PODS, Dirty(), label_selector="app=web", backoff=FAST)
    with running(leases), running(web_pods):
        assert leases.wait_for_sync(10) and web_pods.wait_for_sync(10)
        assert names(leases) == ["gw1"]
        assert names(web_pods) == ["web"]
        fake_api.put(obj(PODS, "web", "default", app="cache"))
        wait_until(lambda: names(web_pods) == [], what="web to leave the selector")


def test_bookmarks_move_the_version_without_marking_dirty(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    dirty = Dirty()
    with running(Informer(api, PODS, dirty, backoff=FAST)) as informer:
        synced(informer, fake_api)
        fake_api.put(obj(LEASES, "gw1"))
        fake_api.send_bookmarks()
        wait_until(
            lambda: informer.resource_version == str(fake_api.resource_version),
            what="the bookmark's version",
        )
        assert dirty.count == 1


def test_a_new_stream_resumes_from_the_last_version_without_listing_again(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    dirty = Dirty()
    with running(Informer(api, PODS, dirty, backoff=FAST)) as informer:
        synced(informer, fake_api)
        fake_api.end_watches()
        fake_api.put(obj(PODS, "a", "default"))
        wait_until(lambda: names(informer) == ["a"], what="a to be added")
        assert lists_of(fake_api, "/api/v1/pods") == 1
        assert dirty.count == 2


def test_recovers_after_the_server_was_unreachable(api: ApiClient, fake_api: FakeApiServer) -> None:
    fake_api.put(obj(PODS, "a", "default"))
    dirty = Dirty()
    with running(Informer(api, PODS, dirty, backoff=FAST)) as informer:
        synced(informer, fake_api)
        fake_api.go_down()
        fake_api.put(obj(PODS, "b", "default"))
        wait_until(lambda: informer.last_error is not None, what="the outage to be noticed")
        assert names(informer) == ["a"], "the cache keeps serving during the outage"
        fake_api.come_up()
        wait_until(lambda: names(informer) == ["a", "b"], what="b to arrive after the outage")
        wait_until(lambda: informer.last_error is None, what="the error to clear")
        assert lists_of(fake_api, "/api/v1/pods") == 1, "the history replays the change"
        assert dirty.count == 2


def test_an_outage_is_logged_once_however_often_it_is_retried(
    api: ApiClient, fake_api: FakeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gatewayd.kube.informer")

    def said(level: int, text: str) -> int:
        return sum(1 for r in caplog.records if r.levelno == level and text in r.getMessage())

    with running(Informer(api, PODS, Dirty(), backoff=FAST)) as informer:
        synced(informer, fake_api)
        fake_api.go_down()
        wait_until(lambda: said(logging.DEBUG, "retrying") >= 3, what="three retries")
        fake_api.come_up()
        fake_api.put(obj(PODS, "a", "default"))
        wait_until(lambda: names(informer) == ["a"], what="the informer to be served again")
    assert said(logging.WARNING, "retrying") == 1
    assert said(logging.INFO, "served again after") == 1


def test_expired_history_makes_it_list_again(api: ApiClient, fake_api: FakeApiServer) -> None:
    fake_api.put(obj(PODS, "a", "default"))
    dirty = Dirty()
    with running(Informer(api, PODS, dirty, backoff=FAST)) as informer:
        synced(informer, fake_api)
        fake_api.go_down()
        fake_api.put(obj(PODS, "b", "default"))
        fake_api.delete("pods", "a", "default")
        fake_api.expire_history()
        fake_api.come_up()
        wait_until(lambda: names(informer) == ["b"], what="the relist after 410")
        assert lists_of(fake_api, "/api/v1/pods") == 2
        assert dirty.count == 2
        fake_api.put(obj(PODS, "c", "default"))
        wait_until(lambda: names(informer) == ["b", "c"], what="watching after the relist")


def test_a_relist_that_finds_nothing_new_does_not_mark_dirty(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    fake_api.put(obj(PODS, "a", "default"))
    dirty = Dirty()
    with running(Informer(api, PODS, dirty, backoff=FAST)) as informer:
        synced(informer, fake_api)
        fake_api.expire_history()
        fake_api.end_watches()
        wait_until(lambda: lists_of(fake_api, "/api/v1/pods") == 2, what="the relist")
        wait_until(lambda: fake_api.open_watches == 1, what="the new watch")
        assert names(informer) == ["a"]
        assert dirty.count == 1


def test_server_errors_back_off_until_they_stop(api: ApiClient, fake_api: FakeApiServer) -> None:
    fake_api.put(obj(PODS, "a", "default"))
    fake_api.fail_requests(status=503)
    with running(Informer(api, PODS, Dirty(), backoff=FAST)) as informer:
        wait_until(lambda: "503" in (informer.last_error or ""), what="the error to be reported")
        assert not informer.synced
        fake_api.clear_faults()
        assert informer.wait_for_sync(10)
        assert names(informer) == ["a"]
        assert informer.last_error is None


def test_stop_closes_the_watch(api: ApiClient, fake_api: FakeApiServer) -> None:
    informer = Informer(api, PODS, Dirty(), backoff=FAST)
    with running(informer):
        synced(informer, fake_api)
    wait_until(lambda: fake_api.open_watches == 0, what="the watch to close")


@pytest.mark.parametrize("resource", ALL_RESOURCES, ids=lambda resource: resource.name)
def test_every_resource_type_is_listed_and_watched_on_its_real_path(
    api: ApiClient, fake_api: FakeApiServer, resource: Resource
) -> None:
    fake_api.put(obj(resource, "first"))
    with running(Informer(api, resource, Dirty(), backoff=FAST)) as informer:
        synced(informer, fake_api)
        fake_api.put(obj(resource, "second"))
        wait_until(lambda: names(informer) == ["first", "second"], what="the watched object")
        listed = informer.objects()[0]
        assert (listed["apiVersion"], listed["kind"]) == (resource.api_version, resource.kind)


def test_a_namespace_for_a_cluster_scoped_type_is_a_mistake(api: ApiClient) -> None:
    with pytest.raises(
        ValueError, match=r"egressgateways\.egress\.gatewayd\.io are cluster-scoped"
    ):
        Informer(api, resources.EGRESS_GATEWAYS, Dirty(), namespace="default")


@pytest.mark.parametrize("failures", range(1, 12))
def test_backoff_grows_to_its_maximum_with_jitter(failures: int) -> None:
    backoff = Backoff(initial=0.5, maximum=30.0, factor=2.0)
    ceiling = min(30.0, 0.5 * 2 ** (failures - 1))
    delays = [backoff.delay(failures) for _ in range(50)]
    assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
