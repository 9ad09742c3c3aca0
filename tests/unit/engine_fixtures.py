"""Small builders of model objects for the engine tests (no YAML, no validation)."""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import ip_address, ip_interface, ip_network

from gatewayd.policy.model import (
    EgressGateway,
    EgressIPPool,
    GatewayInterface,
    GatewaySpec,
    InterfaceAddress,
    IPAddress,
    IPNetwork,
    LabelSelector,
    Namespace,
    Node,
    NodeAddress,
    Operator,
    Pod,
    Policy,
    Requirement,
    Snapshot,
)

NS_LABEL = "io.cilium.k8s.namespace.labels."
ROLE = {"egress.gatewayd.io/role": "gateway"}


def ip(text: str) -> IPAddress:
    return ip_address(text)


def net(text: str) -> IPNetwork:
    return ip_network(text)


def sel(
    match_labels: dict[str, str] | None = None, *expressions: tuple[str, Operator, Iterable[str]]
) -> LabelSelector:
    """A compiled selector: matchLabels as `In` requirements plus `(key, operator, values)`."""
    requirements = [
        Requirement(k, Operator.IN, frozenset({v})) for k, v in (match_labels or {}).items()
    ]
    requirements += [Requirement(k, op, frozenset(values)) for k, op, values in expressions]
    return LabelSelector(tuple(requirements))


def in_namespace(name: str) -> LabelSelector:
    """What a namespaceSelector `{matchLabels: {kubernetes.io/metadata.name: NAME}}` becomes."""
    return sel({NS_LABEL + "kubernetes.io/metadata.name": name})


def policy(
    name: str,
    destinations: Iterable[str] = ("198.51.100.0/24",),
    *,
    selectors: Iterable[LabelSelector] = (LabelSelector(),),
    node_selectors: Iterable[LabelSelector] = (),
    exclusions: Iterable[str] = (),
    gateways: Iterable[GatewaySpec] | None = None,
    egress_ip: str | None = None,
    interface: str | None = None,
) -> Policy:
    """A policy; by default it selects every pod and uses every gateway labelled ROLE."""
    if gateways is None:
        gateways = (
            GatewaySpec(
                sel(ROLE),
                interface=interface,
                egress_ip=ip(egress_ip) if egress_ip is not None else None,
            ),
        )
    return Policy(
        name=name,
        kind="EgressGatewayPolicy",
        endpoint_selectors=tuple(selectors),
        node_selectors=tuple(node_selectors),
        destinations=tuple(net(d) for d in destinations),
        exclusions=tuple(net(x) for x in exclusions),
        gateways=tuple(gateways),
    )


def pod(
    name: str,
    ips: Iterable[str],
    *,
    namespace: str = "default",
    labels: dict[str, str] | None = None,
    node: str | None = "node-1",
    uid: str | None = None,
    host_network: bool = False,
    service_account: str | None = None,
    phase: str | None = "Running",
    deleting: bool = False,
) -> Pod:
    return Pod(
        name=name,
        namespace=namespace,
        uid=f"uid-{namespace}-{name}" if uid is None else uid,
        labels=labels or {},
        node_name=node,
        host_network=host_network,
        service_account=service_account,
        ips=tuple(ip(a) for a in ips),
        phase=phase,
        deleting=deleting,
    )


def iface(
    name: str,
    *addresses: str,
    altnames: Iterable[str] = (),
    v4_default: bool = False,
    v6_default: bool = False,
) -> GatewayInterface:
    parsed = [ip_interface(a) for a in addresses]
    return GatewayInterface(
        name=name,
        altnames=tuple(altnames),
        addresses=tuple(InterfaceAddress(a.ip, a.network.prefixlen) for a in parsed),
        default_route_v4=v4_default,
        default_route_v6=v6_default,
    )


def gateway(
    name: str,
    address: str | None = "192.0.2.1",
    *,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    interfaces: Iterable[GatewayInterface] | None = None,
    pools: Iterable[tuple[str, str]] = (),
    addresses: Iterable[NodeAddress] | None = None,
) -> EgressGateway:
    """A Ready gateway labelled ROLE whose eth0 holds `address` and the default route."""
    if interfaces is None:
        interfaces = (iface("eth0", f"{address}/24", v4_default=True),) if address else ()
    if addresses is None:
        addresses = (NodeAddress("InternalIP", address),) if address else ()
    return EgressGateway(
        name=name,
        labels=dict(ROLE) if labels is None else labels,
        addresses=tuple(addresses),
        interfaces=tuple(interfaces),
        egress_ip_pools=tuple(EgressIPPool(net(c), i) for c, i in pools),
        ready=ready,
    )


def node(
    name: str,
    *addresses: str,
    labels: dict[str, str] | None = None,
    pod_cidrs: Iterable[str] = (),
) -> Node:
    return Node(
        name=name,
        labels=labels or {},
        addresses=tuple(NodeAddress("InternalIP", a) for a in addresses),
        pod_cidrs=tuple(net(c) for c in pod_cidrs),
    )


def namespace(name: str, **labels: str) -> Namespace:
    return Namespace(name, {"kubernetes.io/metadata.name": name, **labels})


def snapshot(
    policies: Iterable[Policy] = (),
    pods: Iterable[Pod] = (),
    gateways: Iterable[EgressGateway] = (),
    *,
    namespaces: Iterable[Namespace] = (),
    nodes: Iterable[Node] = (),
    api_servers: Iterable[str] = (),
) -> Snapshot:
    return Snapshot(
        policies=tuple(policies),
        pods=tuple(pods),
        namespaces=tuple(namespaces),
        nodes=tuple(nodes),
        gateways=tuple(gateways),
        api_server_addresses=tuple(ip(a) for a in api_servers),
    )
