"""The fake API server answers the real `kubernetes` client's requests as a real server would:
resource versions, conflicts, selectors, patches and the status subresource."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fakecluster.fakeapi import FakeApiServer
from kubernetes.client import (
    ApiClient,
    CoordinationV1Api,
    CoreV1Api,
    CustomObjectsApi,
    V1DeleteOptions,
    V1Lease,
    V1LeaseSpec,
    V1Namespace,
    V1ObjectMeta,
    V1Preconditions,
)
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config_dict

pytestmark = pytest.mark.kube

GROUP, VERSION = "egress.gatewayd.io", "v1alpha1"


def pod(name: str, namespace: str = "default", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    }


def gateway(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "EgressGateway",
        "metadata": {"name": name, "labels": {"site": "a"}},
        "spec": spec if spec is not None else {"rules": []},
    }


def api_error(call: Any) -> ApiException:
    with pytest.raises(ApiException) as raised:
        call()
    return raised.value


def custom(api: ApiClient) -> CustomObjectsApi:
    return CustomObjectsApi(api)


def create_gateway(api: ApiClient, name: str, **fields: Any) -> dict[str, Any]:
    body = {**gateway(name), **fields}
    created: dict[str, Any] = custom(api).create_cluster_custom_object(
        GROUP, VERSION, "egressgateways", body
    )
    return created


# --- create, read, list ----------------------------------------------------------------------


def test_create_sets_identity_and_a_growing_resource_version(api: ApiClient) -> None:
    core = CoreV1Api(api)
    first = core.create_namespace(V1Namespace(metadata=V1ObjectMeta(name="one")))
    second = core.create_namespace(V1Namespace(metadata=V1ObjectMeta(name="two")))
    assert first.metadata.uid and first.metadata.uid != second.metadata.uid
    assert first.metadata.creation_timestamp is not None
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    listed = core.list_namespace()
    assert listed.metadata.resource_version == second.metadata.resource_version
    assert [ns.metadata.name for ns in listed.items] == ["one", "two"]


def test_create_twice_is_409_already_exists(api: ApiClient) -> None:
    core = CoreV1Api(api)
    core.create_namespaced_pod("default", pod("web"))
    error = api_error(lambda: core.create_namespaced_pod("default", pod("web")))
    assert error.status == 409
    assert json.loads(error.body)["reason"] == "AlreadyExists"


def test_generate_name_makes_unique_names(api: ApiClient) -> None:
    core = CoreV1Api(api)
    body = {"metadata": {"generateName": "gw-"}, "involvedObject": {"name": "x"}, "reason": "R"}
    names = {core.create_namespaced_event("default", body).metadata.name for _ in range(3)}
    assert len(names) == 3
    assert all(name.startswith("gw-") for name in names)


def test_read_of_a_missing_object_is_404(api: ApiClient) -> None:
    error = api_error(lambda: CoreV1Api(api).read_namespaced_pod("nope", "default"))
    assert error.status == 404
    assert json.loads(error.body)["reason"] == "NotFound"


def test_create_ignores_status_where_it_is_a_subresource(api: ApiClient) -> None:
    created = create_gateway(api, "gw1", status={"publicKey": "forged"})
    assert "status" not in created
    assert created["metadata"]["generation"] == 1


def test_label_and_field_selectors_filter_lists(api: ApiClient) -> None:
    core = CoreV1Api(api)
    core.create_namespaced_pod("a", pod("web", "a", app="web", tier="front"))
    core.create_namespaced_pod("a", pod("db", "a", app="db"))
    core.create_namespaced_pod("b", pod("web", "b", app="web"))

    def names(**selectors: str) -> list[str]:
        items = core.list_pod_for_all_namespaces(**selectors).items
        return [f"{p.metadata.namespace}/{p.metadata.name}" for p in items]

    assert names() == ["a/db", "a/web", "b/web"]
    assert names(label_selector="app=web") == ["a/web", "b/web"]
    assert names(label_selector="app!=web") == ["a/db"]
    assert names(label_selector="app in (db, cache)") == ["a/db"]
    assert names(label_selector="app notin (db),!tier") == ["b/web"]
    assert names(label_selector="tier") == ["a/web"]
    assert names(field_selector="metadata.name=web") == ["a/web", "b/web"]
    assert names(field_selector="metadata.namespace=a,metadata.name!=web") == ["a/db"]
    assert [p.metadata.namespace for p in core.list_namespaced_pod("b").items] == ["b"]


def test_pods_select_by_node_name(api: ApiClient, fake_api: FakeApiServer) -> None:
    fake_api.put({**pod("on-a"), "spec": {"nodeName": "node-a", "containers": []}})
    fake_api.put({**pod("on-b"), "spec": {"nodeName": "node-b", "containers": []}})
    items = CoreV1Api(api).list_pod_for_all_namespaces(field_selector="spec.nodeName=node-b").items
    assert [p.metadata.name for p in items] == ["on-b"]


def test_unsupported_field_selector_is_400(api: ApiClient) -> None:
    error = api_error(lambda: CoreV1Api(api).list_node(field_selector="spec.podCIDR=x"))
    assert error.status == 400


def test_built_in_list_items_lack_kind_but_custom_ones_keep_it(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    fake_api.put(pod("web"))
    fake_api.put(gateway("gw1"))
    raw = CoreV1Api(api).list_namespaced_pod("default", _preload_content=False)
    assert "kind" not in json.loads(raw.data)["items"][0]
    gateways = custom(api).list_cluster_custom_object(GROUP, VERSION, "egressgateways")
    assert gateways["items"][0]["kind"] == "EgressGateway"


def test_cluster_scoped_custom_resources_are_not_served_in_a_namespace(api: ApiClient) -> None:
    error = api_error(
        lambda: custom(api).list_namespaced_custom_object(
            GROUP, VERSION, "default", "egressgateways"
        )
    )
    assert error.status == 404


# --- replace and optimistic concurrency ------------------------------------------------------


def test_replace_with_a_stale_resource_version_is_409_conflict(api: ApiClient) -> None:
    created = create_gateway(api, "gw1")
    fresh = custom(api).replace_cluster_custom_object(
        GROUP, VERSION, "egressgateways", "gw1", {**created, "spec": {"rules": ["p1"]}}
    )
    assert fresh["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]
    error = api_error(
        lambda: custom(api).replace_cluster_custom_object(
            GROUP, VERSION, "egressgateways", "gw1", {**created, "spec": {"rules": ["p2"]}}
        )
    )
    assert error.status == 409
    assert json.loads(error.body)["reason"] == "Conflict"


def test_replacing_a_custom_resource_requires_a_resource_version(api: ApiClient) -> None:
    created = create_gateway(api, "gw1")
    del created["metadata"]["resourceVersion"]
    error = api_error(
        lambda: custom(api).replace_cluster_custom_object(
            GROUP, VERSION, "egressgateways", "gw1", created
        )
    )
    assert error.status == 422


def test_a_write_that_changes_nothing_keeps_the_resource_version(api: ApiClient) -> None:
    created = create_gateway(api, "gw1")
    again = custom(api).replace_cluster_custom_object(
        GROUP, VERSION, "egressgateways", "gw1", created
    )
    assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


# --- generation and the status subresource ----------------------------------------------------


def test_spec_changes_bump_generation_but_metadata_and_status_do_not(api: ApiClient) -> None:
    objects = custom(api)
    create_gateway(api, "gw1")
    labelled = objects.patch_cluster_custom_object(
        GROUP, VERSION, "egressgateways", "gw1", {"metadata": {"labels": {"site": "b"}}}
    )
    assert labelled["metadata"]["generation"] == 1
    with_status = objects.patch_cluster_custom_object_status(
        GROUP, VERSION, "egressgateways", "gw1", {"status": {"observedGeneration": 1}}
    )
    assert with_status["metadata"]["generation"] == 1
    respecced = objects.patch_cluster_custom_object(
        GROUP, VERSION, "egressgateways", "gw1", {"spec": {"rules": ["p1"]}}
    )
    assert respecced["metadata"]["generation"] == 2
    assert respecced["status"] == {"observedGeneration": 1}


def test_main_resource_writes_keep_status_and_status_writes_keep_the_rest(api: ApiClient) -> None:
    objects = custom(api)
    create_gateway(api, "gw1")
    current = objects.patch_cluster_custom_object_status(
        GROUP, VERSION, "egressgateways", "gw1", {"status": {"publicKey": "real"}}
    )
    replaced = objects.replace_cluster_custom_object(
        GROUP,
        VERSION,
        "egressgateways",
        "gw1",
        {**current, "spec": {"rules": ["p1"]}, "status": {"publicKey": "forged"}},
    )
    assert replaced["status"] == {"publicKey": "real"}
    assert replaced["spec"] == {"rules": ["p1"]}
    status_put = objects.replace_cluster_custom_object_status(
        GROUP,
        VERSION,
        "egressgateways",
        "gw1",
        {**replaced, "spec": {"rules": []}, "status": {"publicKey": "new"}},
    )
    assert status_put["spec"] == {"rules": ["p1"]}
    assert status_put["status"] == {"publicKey": "new"}
    assert status_put["metadata"]["generation"] == 2


def test_types_without_a_status_subresource_have_no_status_path(api: ApiClient) -> None:
    body = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumEgressGatewayPolicy",
        "metadata": {"name": "p"},
        "spec": {"destinationCIDRs": ["0.0.0.0/0"]},
    }
    custom(api).create_cluster_custom_object("cilium.io", "v2", "ciliumegressgatewaypolicies", body)
    error = api_error(
        lambda: custom(api).patch_cluster_custom_object_status(
            "cilium.io", "v2", "ciliumegressgatewaypolicies", "p", {"status": {}}
        )
    )
    assert error.status == 404


# --- patches ---------------------------------------------------------------------------------


def test_merge_patch_merges_maps_deletes_nulls_and_replaces_lists(api: ApiClient) -> None:
    create_gateway(api, "gw1", spec={"rules": ["a", "b"], "peers": {"n1": 1, "n2": 2}})
    patched = custom(api).patch_cluster_custom_object(
        GROUP,
        VERSION,
        "egressgateways",
        "gw1",
        {"spec": {"rules": ["c"], "peers": {"n1": None}}},
    )
    assert patched["spec"] == {"rules": ["c"], "peers": {"n2": 2}}


def test_json_patch_applies_operations_in_order(api: ApiClient) -> None:
    create_gateway(api, "gw1", spec={"rules": ["a"]})
    patched = custom(api).patch_cluster_custom_object(
        GROUP,
        VERSION,
        "egressgateways",
        "gw1",
        [
            {"op": "test", "path": "/spec/rules/0", "value": "a"},
            {"op": "add", "path": "/spec/rules/-", "value": "b"},
            {"op": "replace", "path": "/metadata/labels/site", "value": "z"},
            {"op": "remove", "path": "/spec/rules/0"},
        ],
        _content_type="application/json-patch+json",
    )
    assert patched["spec"] == {"rules": ["b"]}
    assert patched["metadata"]["labels"] == {"site": "z"}


def test_a_failed_json_patch_test_changes_nothing(api: ApiClient) -> None:
    created = create_gateway(api, "gw1", spec={"rules": ["a"]})
    error = api_error(
        lambda: custom(api).patch_cluster_custom_object(
            GROUP,
            VERSION,
            "egressgateways",
            "gw1",
            [
                {"op": "replace", "path": "/spec/rules", "value": []},
                {"op": "test", "path": "/spec/rules/0", "value": "x"},
            ],
            _content_type="application/json-patch+json",
        )
    )
    assert error.status == 422
    now = custom(api).get_cluster_custom_object(GROUP, VERSION, "egressgateways", "gw1")
    assert now == created


def test_patch_with_a_stale_resource_version_is_409(api: ApiClient) -> None:
    created = create_gateway(api, "gw1")
    stale = created["metadata"]["resourceVersion"]
    patch = {"metadata": {"resourceVersion": stale}, "spec": {"rules": ["p1"]}}
    custom(api).patch_cluster_custom_object(GROUP, VERSION, "egressgateways", "gw1", patch)
    patch = {"metadata": {"resourceVersion": stale}, "spec": {"rules": ["p2"]}}
    error = api_error(
        lambda: custom(api).patch_cluster_custom_object(
            GROUP, VERSION, "egressgateways", "gw1", patch
        )
    )
    assert error.status == 409


def test_core_patches_are_strategic_merge_and_custom_ones_refuse_it(api: ApiClient) -> None:
    core = CoreV1Api(api)
    core.create_namespaced_pod("default", pod("web", app="web"))
    patched = core.patch_namespaced_pod("web", "default", {"metadata": {"labels": {"v": "2"}}})
    assert patched.metadata.labels == {"app": "web", "v": "2"}
    create_gateway(api, "gw1")
    error = api_error(
        lambda: custom(api).patch_cluster_custom_object(
            GROUP,
            VERSION,
            "egressgateways",
            "gw1",
            {"spec": {}},
            _content_type="application/strategic-merge-patch+json",
        )
    )
    assert error.status == 415


def test_strategic_merge_directives_are_refused_not_misapplied(api: ApiClient) -> None:
    core = CoreV1Api(api)
    core.create_namespaced_pod("default", pod("web"))
    directive = {"spec": {"containers": [{"name": "app", "$patch": "delete"}]}}
    error = api_error(lambda: core.patch_namespaced_pod("web", "default", directive))
    assert error.status == 400


# --- delete ----------------------------------------------------------------------------------


def test_delete_removes_and_honours_preconditions(api: ApiClient) -> None:
    core = CoreV1Api(api)
    created = core.create_namespaced_pod("default", pod("web"))
    wrong = V1DeleteOptions(preconditions=V1Preconditions(uid="not-the-uid"))
    error = api_error(lambda: core.delete_namespaced_pod("web", "default", body=wrong))
    assert error.status == 409
    right = V1DeleteOptions(preconditions=V1Preconditions(uid=created.metadata.uid))
    core.delete_namespaced_pod("web", "default", body=right)
    assert api_error(lambda: core.read_namespaced_pod("web", "default")).status == 404


# --- leases ----------------------------------------------------------------------------------


def test_lease_times_must_be_micro_time(api: ApiClient) -> None:
    leases = CoordinationV1Api(api)
    leases.create_namespaced_lease(
        "gatewayd",
        V1Lease(metadata=V1ObjectMeta(name="gw1"), spec=V1LeaseSpec(holder_identity="gw1")),
    )
    good = leases.patch_namespaced_lease(
        "gw1", "gatewayd", {"spec": {"renewTime": "2030-01-02T03:04:05.000000Z"}}
    )
    assert good.spec.renew_time is not None
    error = api_error(
        lambda: leases.patch_namespaced_lease(
            "gw1", "gatewayd", {"spec": {"renewTime": "2030-01-02T03:04:05Z"}}
        )
    )
    assert error.status == 400


# --- test-side access and authentication -----------------------------------------------------


def test_objects_put_by_the_test_are_served_with_their_status(
    api: ApiClient, fake_api: FakeApiServer
) -> None:
    fake_api.put({**pod("web"), "status": {"podIP": "10.0.0.5"}})
    served = CoreV1Api(api).read_namespaced_pod("web", "default")
    assert served.status.pod_ip == "10.0.0.5"
    CoreV1Api(api).delete_namespaced_pod("web", "default")
    assert fake_api.get("pods", "web", "default") is None


def test_a_required_token_is_checked() -> None:
    with FakeApiServer(token="s3cret") as server:
        with server.api_client() as client:
            assert CoreV1Api(client).list_namespace().items == []
        anonymous = {**server.kubeconfig_dict(), "users": [{"name": "fake", "user": {}}]}
        with new_client_from_config_dict(anonymous, persist_config=False) as client:
            error = api_error(lambda: CoreV1Api(client).list_namespace())
    assert error.status == 401


def test_injected_errors_answer_the_next_requests(api: ApiClient, fake_api: FakeApiServer) -> None:
    core = CoreV1Api(api)
    fake_api.fail_requests(status=500, count=2)
    assert api_error(core.list_namespace).status == 500
    assert api_error(core.list_namespace).status == 500
    assert core.list_namespace().items == []


def test_fields_the_crd_does_not_declare_are_dropped(api: ApiClient) -> None:
    """As on a real server, where a client that asks for no Strict field validation (the
    `kubernetes` client) gets unknown fields pruned: a daemon writing a field its CRD lacks
    would lose it silently in a real cluster, so it does here."""
    created = create_gateway(api, "gw1", spec={"rules": [], "madeUp": 1}, extra={"a": 1})
    assert created["spec"] == {"rules": []} and "extra" not in created
    patched = custom(api).patch_cluster_custom_object_status(
        GROUP, VERSION, "egressgateways", "gw1",
        {"status": {"version": "1", "madeUp": True,
                    "conditions": [{"type": "Ready", "status": "True", "extra": 1}]}},
    )
    assert patched["status"] == {"version": "1", "conditions": [{"type": "Ready",
                                                                  "status": "True"}]}
    # A map the schema declares with additionalProperties keeps its keys.
    policy = custom(api).create_cluster_custom_object(GROUP, VERSION, "egressgatewaypolicies", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "EgressGatewayPolicy",
        "metadata": {"name": "pay"},
        "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                 "destinationCIDRs": ["0.0.0.0/0"], "madeUp": 1},
    })
    assert policy["spec"] == {"selectors": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                              "destinationCIDRs": ["0.0.0.0/0"]}


def test_a_client_that_resets_its_connection_is_not_reported_but_a_fault_is(
    fake_api: FakeApiServer, capfd: pytest.CaptureFixture[str],
) -> None:
    """A real API server prints nothing when a node cut off resets its connection; the fake
    printed a traceback for each into the bench's output."""
    server = fake_api._server
    assert server is not None
    try:
        raise ConnectionResetError(104, "Connection reset by peer")
    except ConnectionResetError:
        server.handle_error(None, ("192.0.2.21", 33818))
    assert capfd.readouterr().err == ""
    try:
        raise ValueError("a fault of the fake's")
    except ValueError:
        server.handle_error(None, ("192.0.2.21", 33818))
    assert "ValueError: a fault of the fake's" in capfd.readouterr().err
