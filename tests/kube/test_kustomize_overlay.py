"""A user's kustomize overlay of packaging/kubernetes that moves it to another namespace and
image, rendered by `kubectl kustomize`, valid for every Kubernetes version from 1.30 on, and
still working: applied to the fake API server, the controller's service account in the new
namespace reads the API server's EndpointSlice in `default` and holds its Lease, and steer is
still pinned to its node's EgressNode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fakecluster.fakeapi import FakeApiServer
from fakecluster.fakeauth import MANIFESTS, ClusterAuth, client_as, install, service_account_user
from kubernetes.client import CoordinationV1Api, CustomObjectsApi, DiscoveryV1Api, V1Lease
from kubernetes.client.exceptions import ApiException
from kubernetes_validate.utils import all_versions
from packaging.version import Version

pytestmark = pytest.mark.kube

NAMESPACE = "egress-ops"
IMAGE = "registry.example.com/platform/gatewayd:0.1.0-site"
VERSIONS = [v for v in dict.fromkeys(all_versions()) if Version(v) >= Version("1.30")]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: it renders the overlay (kubectl kustomize)")
    overlay = tmp_path_factory.mktemp("overlay")
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": NAMESPACE,
        "resources": [os.path.relpath(MANIFESTS, overlay)],
        # The name the base kustomization gave it (packaging/kubernetes/kustomization.yaml).
        "images": [{"name": "ghcr.io/gatewayd/gatewayd",
                    "newName": IMAGE.rsplit(":", 1)[0], "newTag": IMAGE.rsplit(":", 1)[1]}],
    }))
    built = subprocess.run([kubectl, "kustomize", str(overlay)], check=True,
                           capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(built) if doc]


@pytest.fixture
def cluster(rendered: list[dict[str, Any]]) -> Iterator[FakeApiServer]:
    with FakeApiServer(auth=ClusterAuth()) as fake:
        install(fake, rendered)
        fake.put({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                  "metadata": {"name": "kubernetes", "namespace": "default"},
                  "addressType": "IPv4", "endpoints": [{"addresses": ["192.0.2.100"]}]})
        yield fake


def token(fake: FakeApiServer, account: str, node: str | None = None) -> str:
    assert fake.auth is not None
    user = service_account_user(NAMESPACE, account, pod=f"{account}-0", node=node)
    return fake.auth.tokens.issue(user, ttl_seconds=3600)


def test_the_overlay_is_valid_for_every_version(rendered: list[dict[str, Any]]) -> None:
    problems = []
    for version in VERSIONS:
        for doc in rendered:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                problems.append(f"{version} {doc['kind']}/{doc['metadata']['name']}: "
                                f"{error.message}")
    assert problems == []
    namespaces = {d["metadata"].get("namespace") for d in rendered} - {None}
    assert namespaces == {NAMESPACE}
    images = {c["image"] for d in rendered if d["kind"] in ("Deployment", "DaemonSet")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {IMAGE}
    (steer,) = [d for d in rendered if d["kind"] == "DaemonSet"]
    assert steer["spec"]["template"]["spec"]["priorityClassName"] == "system-node-critical"


def test_the_controller_reads_the_api_server_endpoints_from_the_new_namespace(
    cluster: FakeApiServer,
) -> None:
    with client_as(cluster, token(cluster, "gatewayd-controller")) as api:
        slices = DiscoveryV1Api(api).list_namespaced_endpoint_slice(
            "default", field_selector="metadata.name=kubernetes")
        assert [s.metadata.name for s in slices.items] == ["kubernetes"]
        leases = CoordinationV1Api(api)
        leases.create_namespaced_lease(NAMESPACE, V1Lease(
            metadata={"name": "gatewayd-controller", "namespace": NAMESPACE}, spec={}))
        leases.patch_namespaced_lease("gatewayd-controller", NAMESPACE,
                                      {"spec": {"holderIdentity": "c1"}})
        with pytest.raises(ApiException) as raised:  # still only that one slice
            DiscoveryV1Api(api).list_namespaced_endpoint_slice("default")
    assert raised.value.status == 403


def test_steer_is_pinned_to_its_node_in_the_new_namespace(cluster: FakeApiServer) -> None:
    with client_as(cluster, token(cluster, "gatewayd-steer", node="node-1")) as api:
        objects = CustomObjectsApi(api)
        body = {"apiVersion": "egress.gatewayd.io/v1alpha1", "kind": "EgressNode", "spec": {}}
        objects.create_cluster_custom_object("egress.gatewayd.io", "v1alpha1", "egressnodes",
                                             {**body, "metadata": {"name": "node-1"}})
        with pytest.raises(ApiException) as raised:
            objects.create_cluster_custom_object("egress.gatewayd.io", "v1alpha1",
                                                 "egressnodes",
                                                 {**body, "metadata": {"name": "node-2"}})
    assert raised.value.status == 403
    assert "may write only the EgressNode node-1" in json.loads(raised.value.body)["message"]
