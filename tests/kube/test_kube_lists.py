"""What the controller's informers cost: lists read in pages (limit/continue, a new list when
the continue token expired), and only the fields the controller reads kept of each object."""

from __future__ import annotations

from typing import Any

import pytest
from fakecluster.fakeapi import FakeApiServer, RecordedRequest, wait_until
from kubernetes.client import ApiClient
from test_kube_informer import FAST, Dirty, running

from gatewayd.controller.cached import pod_fields, without_managed_fields
from gatewayd.kube.informer import Informer
from gatewayd.kube.resources import NODES, PODS

pytestmark = pytest.mark.kube

PODS_PATH = "/api/v1/pods"
TIMEOUT = 20.0


def pod(name: str, **status: Any) -> dict[str, Any]:
    """A pod with what a real one carries besides the fields the controller reads."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "labels": {"app": "web"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web"}],
        },
        "spec": {
            "nodeName": "node-1",
            "serviceAccountName": "web",
            "containers": [{"name": "app", "image": "registry.example/app:1", "env": [
                {"name": "MODE", "value": "production"}]}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}],
        },
        "status": {
            "podIP": "10.244.1.10",
            "podIPs": [{"ip": "10.244.1.10"}],
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "app", "ready": True, "restartCount": 0}],
            **status,
        },
    }


def test_pods_keep_only_what_the_controller_reads(fake_api: FakeApiServer, api: ApiClient) -> None:
    fake_api.put(pod("web-1", phase="Running"))
    informer = Informer(api, PODS, Dirty(), transform=pod_fields, backoff=FAST)
    with running(informer):
        assert informer.wait_for_sync(TIMEOUT)
        served = fake_api.get("pods", "web-1", "shop") or {}
        assert served["metadata"]["managedFields"]  # the fake serves them, as a real server
        fake_api.put({**served, "metadata": {**served["metadata"],
                                             "deletionTimestamp": "2026-01-01T00:00:10Z"}})
        wait_until(
            lambda: "deletionTimestamp" in (informer.get("web-1", "shop") or {})["metadata"],
            TIMEOUT,
            "the deletion",
        )
        cached = informer.get("web-1", "shop")
    version = (fake_api.get("pods", "web-1", "shop") or {})["metadata"]["resourceVersion"]
    assert cached == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-1",
            "namespace": "shop",
            "uid": served["metadata"]["uid"],
            "labels": {"app": "web"},
            "resourceVersion": version,
            "deletionTimestamp": "2026-01-01T00:00:10Z",
        },
        "spec": {"nodeName": "node-1", "serviceAccountName": "web"},
        "status": {"phase": "Running", "podIP": "10.244.1.10", "podIPs": [{"ip": "10.244.1.10"}]},
    }


def test_other_objects_lose_their_managed_fields(fake_api: FakeApiServer, api: ApiClient) -> None:
    fake_api.put({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
                  "spec": {"podCIDRs": ["10.244.1.0/24"]}})
    informer = Informer(api, NODES, Dirty(), transform=without_managed_fields, backoff=FAST)
    with running(informer):
        assert informer.wait_for_sync(TIMEOUT)
        node = informer.get("node-1") or {}
    assert "managedFields" not in node["metadata"]
    assert node["spec"] == {"podCIDRs": ["10.244.1.0/24"]}


def test_a_list_is_read_in_pages(fake_api: FakeApiServer, api: ApiClient) -> None:
    for index in range(5):
        fake_api.put(pod(f"web-{index}"))
    informer = Informer(api, PODS, Dirty(), transform=pod_fields, page_size=2, backoff=FAST)
    with running(informer):
        assert informer.wait_for_sync(TIMEOUT)
        assert len(informer.objects()) == 5
    lists = [r for r in fake_api.requests if r.path == PODS_PATH and "watch" not in r.query]
    assert [r.query.get("limit") for r in lists] == ["2", "2", "2"]
    assert [bool(r.query.get("continue")) for r in lists] == [False, True, True]


def test_an_expired_continue_token_lists_again(fake_api: FakeApiServer, api: ApiClient) -> None:
    for index in range(5):
        fake_api.put(pod(f"web-{index}"))
    compacted = False

    def compact_after_the_first_page(request: RecordedRequest) -> None:
        nonlocal compacted
        if request.path == PODS_PATH and request.query.get("continue") and not compacted:
            compacted = True
            fake_api.expire_history()  # the token handed out with page 1 is too old now
            fake_api.put(pod("web-9"))

    fake_api.before_request = compact_after_the_first_page
    informer = Informer(api, PODS, Dirty(), page_size=2, backoff=FAST)
    with running(informer):
        assert informer.wait_for_sync(TIMEOUT)
        names = sorted(o["metadata"]["name"] for o in informer.objects())
        assert informer.last_error is None
    assert names == ["web-0", "web-1", "web-2", "web-3", "web-4", "web-9"]
    lists = [r for r in fake_api.requests if r.path == PODS_PATH and "watch" not in r.query]
    assert [bool(r.query.get("continue")) for r in lists] == [False, True, False, True, True]
