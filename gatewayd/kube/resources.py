"""The resource types gatewayd reads and writes: group, version, plural, kind and scope."""

from __future__ import annotations

from dataclasses import dataclass

EGRESS_GROUP = "egress.gatewayd.io"
EGRESS_VERSION = "v1alpha1"


@dataclass(frozen=True)
class Resource:
    """One Kubernetes resource type, as the REST API names it."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        """`v1` for core types, `GROUP/VERSION` for the others, as in an object's apiVersion."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def name(self) -> str:
        """kubectl's name for the type: `pods`, `leases.coordination.k8s.io`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


EGRESS_GATEWAY_POLICIES = Resource(
    EGRESS_GROUP, EGRESS_VERSION, "egressgatewaypolicies", "EgressGatewayPolicy", namespaced=False
)
EGRESS_GATEWAYS = Resource(
    EGRESS_GROUP, EGRESS_VERSION, "egressgateways", "EgressGateway", namespaced=False
)
EGRESS_NODES = Resource(EGRESS_GROUP, EGRESS_VERSION, "egressnodes", "EgressNode", namespaced=False)
EGRESS_SOURCE_SLICES = Resource(
    EGRESS_GROUP, EGRESS_VERSION, "egresssourceslices", "EgressSourceSlice", namespaced=False
)
CILIUM_EGRESS_GATEWAY_POLICIES = Resource(
    "cilium.io", "v2", "ciliumegressgatewaypolicies", "CiliumEgressGatewayPolicy", namespaced=False
)

PODS = Resource("", "v1", "pods", "Pod", namespaced=True)
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
NODES = Resource("", "v1", "nodes", "Node", namespaced=False)
EVENTS = Resource("", "v1", "events", "Event", namespaced=True)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", namespaced=True)
ENDPOINT_SLICES = Resource(
    "discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", namespaced=True
)

CUSTOM_RESOURCES = (
    EGRESS_GATEWAY_POLICIES,
    EGRESS_GATEWAYS,
    EGRESS_NODES,
    EGRESS_SOURCE_SLICES,
    CILIUM_EGRESS_GATEWAY_POLICIES,
)
