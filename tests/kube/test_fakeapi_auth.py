"""The fake API server's authentication, RBAC, admission and size limits behave as a real API
server's (testkit/fakecluster/fakeauth.py): what the identity tests rely on."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fakecluster.fakeapi import MAX_OBJECT_BYTES, MAX_REQUEST_BODY_BYTES, FakeApiServer
from fakecluster.fakeauth import ClusterAuth, client_as, install, service_account_user
from kubernetes.client import CoreV1Api, CustomObjectsApi, DiscoveryV1Api
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.kube

RBAC = "rbac.authorization.k8s.io/v1"


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer(auth=ClusterAuth()) as server:
        yield server


def tokens(fake: FakeApiServer) -> ClusterAuth:
    assert fake.auth is not None
    return fake.auth


def reader_of_one_slice(fake: FakeApiServer) -> str:
    """A service account that may read only the EndpointSlice `kubernetes` (in any
    namespace), as the controller's ClusterRole says."""
    install(fake, [
        {"apiVersion": RBAC, "kind": "ClusterRole", "metadata": {"name": "one-slice"},
         "rules": [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                    "resourceNames": ["kubernetes"], "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": RBAC, "kind": "ClusterRoleBinding", "metadata": {"name": "one-slice"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "one-slice"},
         "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "ops"}]},
    ])
    for name in ("kubernetes", "other"):
        fake.put({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                  "metadata": {"name": name, "namespace": "default"}, "addressType": "IPv4",
                  "endpoints": []})
    return tokens(fake).tokens.issue(service_account_user("ops", "reader"))


def message(error: ApiException) -> str:
    """The message of the Status object the server answered."""
    return str(json.loads(error.body)["message"])


def test_unknown_expired_and_revoked_tokens_are_401(fake: FakeApiServer) -> None:
    auth = tokens(fake).tokens
    user = service_account_user("ops", "reader")
    expired = auth.issue(user, ttl_seconds=-1)
    revoked = auth.issue(user)
    auth.revoke(revoked)
    for token in ("nonsense", expired, revoked):
        with client_as(fake, token) as api, pytest.raises(ApiException) as raised:
            CoreV1Api(api).list_namespace()
        assert raised.value.status == 401
    with fake.api_client() as admin:  # the tests' own admin: system:masters
        CoreV1Api(admin).list_namespace()


def test_rbac_refuses_with_the_real_message(fake: FakeApiServer) -> None:
    token = reader_of_one_slice(fake)
    with client_as(fake, token) as api, pytest.raises(ApiException) as raised:
        CoreV1Api(api).list_namespaced_pod("default")
    assert raised.value.status == 403
    assert message(raised.value) == (
        'pods is forbidden: User "system:serviceaccount:ops:reader" cannot list resource '
        '"pods" in API group "" in the namespace "default"')


def test_resource_names_limit_get_list_and_watch_by_name(fake: FakeApiServer) -> None:
    token = reader_of_one_slice(fake)
    with client_as(fake, token) as api:
        slices = DiscoveryV1Api(api)
        assert slices.read_namespaced_endpoint_slice("kubernetes", "default").metadata.name \
            == "kubernetes"
        listed = slices.list_namespaced_endpoint_slice(
            "default", field_selector="metadata.name=kubernetes")
        assert [s.metadata.name for s in listed.items] == ["kubernetes"]
        for forbidden in (
            lambda: slices.read_namespaced_endpoint_slice("other", "default"),
            lambda: slices.list_namespaced_endpoint_slice("default"),
            lambda: slices.list_namespaced_endpoint_slice(
                "default", label_selector="kubernetes.io/service-name=kubernetes"),
        ):
            with pytest.raises(ApiException) as raised:
                forbidden()
            assert raised.value.status == 403


def test_an_admission_denial_without_a_reason_is_422(fake: FakeApiServer) -> None:
    install(fake, [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": "no-prod"},
         "spec": {"matchConstraints": {"resourceRules": [
             {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
              "resources": ["namespaces"]}]},
             "validations": [{"expression": "object.metadata.name != 'prod'"}]}},
        {"apiVersion": "admissionregistration.k8s.io/v1",
         "kind": "ValidatingAdmissionPolicyBinding", "metadata": {"name": "no-prod"},
         "spec": {"policyName": "no-prod", "validationActions": ["Deny"]}},
    ])
    with fake.api_client() as admin:
        namespaces = CoreV1Api(admin)
        namespaces.create_namespace({"metadata": {"name": "dev"}})
        with pytest.raises(ApiException) as raised:
            namespaces.create_namespace({"metadata": {"name": "prod"}})
    assert raised.value.status == 422
    assert message(raised.value) == (
        'namespaces "prod" is forbidden: ValidatingAdmissionPolicy \'no-prod\' with binding '
        "'no-prod' denied request: failed expression: object.metadata.name != 'prod'")


def node(name: str, padding: int) -> dict[str, object]:
    return {"apiVersion": "egress.gatewayd.io/v1alpha1", "kind": "EgressNode",
            "metadata": {"name": name, "annotations": {"pad": "x" * padding}}, "spec": {}}


def test_a_body_over_3_mib_is_413(fake: FakeApiServer) -> None:
    with fake.api_client() as admin, pytest.raises(ApiException) as raised:
        CustomObjectsApi(admin).create_cluster_custom_object(
            "egress.gatewayd.io", "v1alpha1", "egressnodes",
            node("big", MAX_REQUEST_BODY_BYTES))
    assert raised.value.status == 413
    assert message(raised.value) == f"Request entity too large: limit is {MAX_REQUEST_BODY_BYTES}"
    assert fake.get("egressnodes", "big") is None


def test_an_object_over_1_5_mib_is_refused_as_etcd_refuses_it(fake: FakeApiServer) -> None:
    objects = None
    with fake.api_client() as admin:
        objects = CustomObjectsApi(admin)
        objects.create_cluster_custom_object("egress.gatewayd.io", "v1alpha1", "egressnodes",
                                             node("n1", 1000))
        with pytest.raises(ApiException) as raised:
            objects.create_cluster_custom_object(
                "egress.gatewayd.io", "v1alpha1", "egressnodes", node("n2", MAX_OBJECT_BYTES))
        # A patch that is small itself but grows the object past the limit, too.
        for _ in range(2):
            with pytest.raises(ApiException) as grown:
                objects.patch_cluster_custom_object_status(
                    "egress.gatewayd.io", "v1alpha1", "egressnodes", "n1",
                    {"status": {"publicKey": "k" * (MAX_OBJECT_BYTES // 2 + 1),
                                "endpoint": "e" * (MAX_OBJECT_BYTES // 2 + 1)}})
    assert (raised.value.status, grown.value.status) == (500, 500)
    assert message(raised.value) == message(grown.value) == "etcdserver: request is too large"
    assert fake.get("egressnodes", "n2") is None
    assert "status" not in (fake.get("egressnodes", "n1") or {})
