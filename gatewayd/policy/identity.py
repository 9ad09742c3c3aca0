"""Security-identity labels of a pod: the label set that policies' pod selectors match.

Follows Cilium (semantics spec §3.1): pod labels that could spoof a namespace or a service
account are dropped, namespace labels are added under a prefix, the real namespace, service
account and cluster are set, and Cilium's default identity-label filter is applied, so that
labels such as `pod-template-hash` never take part in a match.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache

from gatewayd.policy.model import Namespace, Pod

NAMESPACE_LABEL_PREFIX = "io.cilium.k8s.namespace.labels."
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
# The API server sets this label on every namespace; snapshots written by hand may omit it.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

# Pod labels under this prefix are dropped before anything else: they would let a pod claim
# another namespace's labels or another service account.
_RESERVED_PREFIX = "io.cilium.k8s"

# Cilium's default label filter: a label is an identity label unless an ignore pattern matches
# it and no longer include prefix matches it. Lengths are those of the pattern texts.
_INCLUDE_PREFIXES = (
    "io.kubernetes.pod.namespace",
    "io.cilium.k8s.namespace.labels",
    "app.kubernetes.io",
    "io.cilium.k8s.policy.cluster",
    "io.cilium.k8s.policy.serviceaccount",
)
_IGNORE_PATTERNS = tuple(
    (len(text), re.compile(text))
    for text in (
        r"io\.kubernetes",
        r"kubernetes\.io",
        r"statefulset\.kubernetes\.io/pod-name",
        r"apps\.kubernetes\.io/pod-index",
        r"batch\.kubernetes\.io/job-completion-index",
        r"batch\.kubernetes\.io/controller-uid",
        r".*beta\.kubernetes\.io",
        r"k8s\.io",
        r"pod-template-generation",
        r"pod-template-hash",
        r"controller-revision-hash",
        r"controller-uid",
        r"annotation.*",
        r"etcd_node",
    )
)


@lru_cache(maxsize=4096)  # few distinct keys, asked for every pod
def is_identity_label(key: str) -> bool:
    """Whether Cilium's default label filter keeps `key` as a security-identity label."""
    ignored = max((length for length, rx in _IGNORE_PATTERNS if rx.match(key)), default=0)
    if ignored == 0:
        return True
    included = max((len(p) for p in _INCLUDE_PREFIXES if key.startswith(p)), default=0)
    return included > ignored


def identity_labels(pod: Pod, namespace: Namespace | None, cluster_name: str) -> dict[str, str]:
    """The labels a pod selector of a policy is matched against (spec §3.1, steps 1 to 5)."""
    labels = {k: v for k, v in pod.labels.items() if not k.startswith(_RESERVED_PREFIX)}
    namespace_labels: Mapping[str, str] = namespace.labels if namespace is not None else {}
    for key, value in {NAMESPACE_NAME_LABEL: pod.namespace, **namespace_labels}.items():
        labels[NAMESPACE_LABEL_PREFIX + key] = value
    labels[POD_NAMESPACE_LABEL] = pod.namespace
    if pod.service_account:
        labels[SERVICE_ACCOUNT_LABEL] = pod.service_account
    labels[CLUSTER_LABEL] = cluster_name
    return {k: v for k, v in labels.items() if is_identity_label(k)}
