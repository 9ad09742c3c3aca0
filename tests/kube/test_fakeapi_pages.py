"""The fake API server's managedFields and pagination, as a real server's."""

from __future__ import annotations

import pytest
from fakecluster.fakeapi import FakeApiServer
from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.kube

GROUP, VERSION = "egress.gatewayd.io", "v1alpha1"


def gateway(name: str) -> dict[str, object]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "EgressGateway",
        "metadata": {"name": name, "labels": {"site": "dc1"}},
        "spec": {"rules": [{"policy": "pay", "role": "active"}]},
    }


def test_managed_fields_name_the_writer_of_each_part(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    objects = CustomObjectsApi(api)
    objects.create_cluster_custom_object(
        GROUP, VERSION, "egressgateways", gateway("gw-1"), field_manager="gatewayd-controller"
    )
    objects.patch_cluster_custom_object_status(
        GROUP, VERSION, "egressgateways", "gw-1", {"status": {"publicKey": "k"}},
        _content_type="application/merge-patch+json",
    )
    managed = (fake_api.get("egressgateways", "gw-1") or {})["metadata"]["managedFields"]
    main, status = managed
    assert main["manager"] == "gatewayd-controller" and "subresource" not in main
    assert main["fieldsV1"] == {
        "f:metadata": {"f:labels": {"f:site": {}}},
        "f:spec": {"f:rules": {}},
    }
    assert status["manager"] == "OpenAPI-Generator"  # the client's User-Agent
    assert status["subresource"] == "status"
    assert status["fieldsV1"] == {"f:status": {"f:publicKey": {}}}


def test_lists_come_in_pages_unless_read_from_the_watch_cache(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    for index in range(3):
        fake_api.put(gateway(f"gw-{index}"))
    objects = CustomObjectsApi(api)
    first = objects.list_cluster_custom_object(GROUP, VERSION, "egressgateways", limit=2)
    assert [o["metadata"]["name"] for o in first["items"]] == ["gw-0", "gw-1"]
    assert first["metadata"]["remainingItemCount"] == 1
    rest = objects.list_cluster_custom_object(
        GROUP, VERSION, "egressgateways", limit=2, _continue=first["metadata"]["continue"]
    )
    assert [o["metadata"]["name"] for o in rest["items"]] == ["gw-2"]
    assert "continue" not in rest["metadata"]
    assert rest["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    cached = objects.list_cluster_custom_object(
        GROUP, VERSION, "egressgateways", limit=2, resource_version="0"
    )
    assert len(cached["items"]) == 3 and "continue" not in cached["metadata"]

    fake_api.expire_history()
    with pytest.raises(ApiException) as expired:
        objects.list_cluster_custom_object(
            GROUP, VERSION, "egressgateways", limit=2, _continue=first["metadata"]["continue"]
        )
    assert expired.value.status == 410
