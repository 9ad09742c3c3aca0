"""Identity labels (cilium-egress-semantics.md §3.1): what pod selectors are matched against."""

from __future__ import annotations

import pytest
from engine_fixtures import pod

from gatewayd.policy.identity import identity_labels, is_identity_label
from gatewayd.policy.model import Namespace

pytestmark = pytest.mark.unit

SHOP = Namespace("shop", {"kubernetes.io/metadata.name": "shop", "team": "payments"})


def test_pod_labels_namespace_labels_namespace_service_account_and_cluster() -> None:
    p = pod("a", ["10.0.0.1"], namespace="shop", labels={"app": "checkout"}, service_account="sa")
    assert identity_labels(p, SHOP, "prod") == {
        "app": "checkout",
        "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "shop",
        "io.cilium.k8s.namespace.labels.team": "payments",
        "io.kubernetes.pod.namespace": "shop",
        "io.cilium.k8s.policy.serviceaccount": "sa",
        "io.cilium.k8s.policy.cluster": "prod",
    }


def test_no_service_account_label_without_a_service_account() -> None:
    labels = identity_labels(pod("a", [], namespace="shop"), SHOP, "default")
    assert "io.cilium.k8s.policy.serviceaccount" not in labels
    assert labels["io.cilium.k8s.policy.cluster"] == "default"


def test_pod_cannot_spoof_namespace_labels_or_service_account() -> None:
    spoofing = {
        "io.cilium.k8s.namespace.labels.team": "admins",
        "io.cilium.k8s.policy.serviceaccount": "admin",
        "io.cilium.k8s.policy.cluster": "other",
        "io.cilium.k8s.anything": "x",
    }
    labels = identity_labels(pod("a", [], namespace="shop", labels=spoofing), SHOP, "default")
    assert labels["io.cilium.k8s.namespace.labels.team"] == "payments"
    assert "io.cilium.k8s.policy.serviceaccount" not in labels
    assert labels["io.cilium.k8s.policy.cluster"] == "default"
    assert "io.cilium.k8s.anything" not in labels


def test_pod_label_claiming_another_namespace_is_overwritten() -> None:
    p = pod("a", [], namespace="shop", labels={"io.kubernetes.pod.namespace": "kube-system"})
    assert identity_labels(p, SHOP, "default")["io.kubernetes.pod.namespace"] == "shop"


def test_namespace_name_label_is_there_even_when_the_snapshot_omits_it() -> None:
    labels = identity_labels(pod("a", [], namespace="web"), None, "default")
    assert labels["io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"] == "web"
    bare = Namespace("web", {"team": "x"})
    labels = identity_labels(pod("a", [], namespace="web"), bare, "default")
    assert labels["io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"] == "web"
    assert labels["io.cilium.k8s.namespace.labels.team"] == "x"


@pytest.mark.parametrize(
    "key",
    [
        "pod-template-hash",
        "pod-template-generation",
        "controller-revision-hash",
        "controller-uid",
        "statefulset.kubernetes.io/pod-name",
        "apps.kubernetes.io/pod-index",
        "batch.kubernetes.io/job-completion-index",
        "batch.kubernetes.io/controller-uid",
        "kubernetes.io/hostname",
        "io.kubernetes.container.name",
        "beta.kubernetes.io/arch",
        "failure-domain.beta.kubernetes.io/zone",
        "k8s.io/anything",
        "annotation.example.com/x",
        "annotations",
        "etcd_node",
    ],
)
def test_filter_drops_non_identity_labels(key: str) -> None:
    assert not is_identity_label(key)
    labels = identity_labels(pod("a", [], labels={key: "v", "app": "x"}), None, "default")
    assert key not in labels
    assert labels["app"] == "x"


@pytest.mark.parametrize(
    "key",
    [
        "app",
        "tier",
        "app.kubernetes.io/name",  # include prefix
        "io.kubernetes.pod.namespace",  # include prefix longer than the io.kubernetes ignore
        "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
        "io.cilium.k8s.policy.serviceaccount",
        "io.cilium.k8s.policy.cluster",
        "example.com/team",
        "topology.kubernetes.io/zone",  # ignore patterns are anchored at the start of the key
    ],
)
def test_filter_keeps_identity_labels(key: str) -> None:
    assert is_identity_label(key)
