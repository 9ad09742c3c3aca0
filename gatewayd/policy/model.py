"""Typed objects of the policy engine: what a snapshot holds and what a plan says.

Everything here is plain, immutable data. Parsing lives in `snapshot.py` / `validation.py`,
decisions in `engine.py`; the data plane drivers and the daemons consume the plan types.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import NamedTuple

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


def address_order(address: IPAddress) -> tuple[int, int]:
    """Sort key of addresses of both families: IPv4 first, then by number."""
    return (address.version, int(address))


# --- label selectors -------------------------------------------------------------------------


class Operator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        if self.operator is Operator.IN:
            return present and labels[self.key] in self.values
        if self.operator is Operator.NOT_IN:
            return not present or labels[self.key] not in self.values
        if self.operator is Operator.EXISTS:
            return present
        return not present


@dataclass(frozen=True)
class LabelSelector:
    """A compiled, valid selector: all requirements ANDed; no requirement matches everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)


# --- policies ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewaySpec:
    """One entry of `egressGateway` / `egressGateways[]`."""

    node_selector: LabelSelector
    interface: str | None = None
    egress_ip: IPAddress | None = None


@dataclass(frozen=True)
class Policy:
    """A validated EgressGatewayPolicy or CiliumEgressGatewayPolicy (same spec)."""

    name: str
    kind: str  # "EgressGatewayPolicy" or "CiliumEgressGatewayPolicy"
    # One selector per `selectors[]` entry, namespace and pod selector already merged (OR across).
    endpoint_selectors: tuple[LabelSelector, ...]
    # Every entry's `nodeSelector`, collected policy-wide (Cilium quirk; OR across, empty = any).
    node_selectors: tuple[LabelSelector, ...]
    destinations: tuple[IPNetwork, ...]  # host bits masked
    exclusions: tuple[IPNetwork, ...]
    gateways: tuple[GatewaySpec, ...]  # egressGateways if non-empty, else (egressGateway,)
    generation: int = 0


@dataclass(frozen=True)
class FieldError:
    """A problem with one input field, named by its path (`spec.egressGateways[1].nodeSelector`)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


# --- other snapshot objects --------------------------------------------------------------------


# Pod phases after which the pod never runs again (Cilium's `IsPodRunning` is false for them).
TERMINAL_POD_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    uid: str
    labels: dict[str, str] = field(hash=False, compare=True)
    node_name: str | None = None
    host_network: bool = False
    service_account: str | None = None
    ips: tuple[IPAddress, ...] = ()
    phase: str | None = None  # status.phase: Pending, Running, Succeeded, Failed, Unknown
    deleting: bool = False  # metadata.deletionTimestamp is set: in its grace period

    @property
    def finished(self) -> bool:
        """Its containers have terminated for good (phase Succeeded or Failed): its IP is free
        and the CNI hands it to the next pod, while the Pod object may stay for a long time."""
        return self.phase in TERMINAL_POD_PHASES


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: dict[str, str] = field(hash=False, compare=True)


@dataclass(frozen=True)
class NodeAddress:
    type: str  # InternalIP, ExternalIP, Hostname, ...
    address: str


@dataclass(frozen=True)
class Node:
    name: str
    labels: dict[str, str] = field(hash=False, compare=True)
    addresses: tuple[NodeAddress, ...] = ()
    pod_cidrs: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class InterfaceAddress:
    """An address with its prefix length, as `ip addr` shows it (`192.0.2.5/24`)."""

    address: IPAddress
    prefixlen: int


@dataclass(frozen=True)
class GatewayInterface:
    name: str
    altnames: tuple[str, ...] = ()
    addresses: tuple[InterfaceAddress, ...] = ()  # in the order the host lists them
    default_route_v4: bool = False
    default_route_v6: bool = False


@dataclass(frozen=True)
class EgressIPPool:
    """Addresses a gateway may provision itself, and the interface it puts them on."""

    cidr: IPNetwork
    interface: str


def in_pools(address: IPAddress, pools: Iterable[EgressIPPool]) -> bool:
    """Whether `address` lies in one of `pools`: an egress IP the gateway provisions itself."""
    return any(address.version == p.cidr.version and address in p.cidr for p in pools)


@dataclass(frozen=True)
class EgressGateway:
    """An `egress.gatewayd.io/v1alpha1` EgressGateway: one gateway host."""

    name: str
    labels: dict[str, str] = field(hash=False, compare=True)
    addresses: tuple[NodeAddress, ...] = ()
    interfaces: tuple[GatewayInterface, ...] = ()
    egress_ip_pools: tuple[EgressIPPool, ...] = ()
    ready: bool = False  # status.conditions[type=Ready].status == "True"


@dataclass(frozen=True)
class Snapshot:
    """Everything the engine reads. Policies here are the valid ones only."""

    policies: tuple[Policy, ...] = ()
    pods: tuple[Pod, ...] = ()
    namespaces: tuple[Namespace, ...] = ()
    nodes: tuple[Node, ...] = ()
    gateways: tuple[EgressGateway, ...] = ()
    api_server_addresses: tuple[IPAddress, ...] = ()
    cluster_name: str = "default"


# --- decisions ---------------------------------------------------------------------------------


class Verdict(StrEnum):
    SNAT = "snat"
    EXCLUDED = "excluded"
    NO_POLICY = "no-policy"
    DROP = "drop"


class DropReason(StrEnum):
    NO_EGRESS_GATEWAY = "no-egress-gateway"
    NO_EGRESS_IP = "no-egress-ip"


class Role(StrEnum):
    ACTIVE = "active"
    STANDBY = "standby"


@dataclass(frozen=True, order=True)
class Outcome:
    """What happens to a new connection that falls into one destination range of one source."""

    verdict: Verdict
    policy: str
    gateway: str | None = None  # the active gateway (for snat, and for drop no-egress-ip)
    egress_ip: IPAddress | None = None
    reason: DropReason | None = None
    standby: str | None = None  # pre-programmed gateway for fast failover, when one exists
    standby_egress_ip: IPAddress | None = None


# --- plans: what each host programs ------------------------------------------------------------


@dataclass(frozen=True)
class SnatRule:
    """On a gateway: new connections from `sources` to `destinations` leave with `egress_ip`.

    One family per rule. `destinations` are disjoint and already resolved by longest-prefix
    match across all policies (exclusions and other policies' longer prefixes carved out), so
    the gateway needs no exclusion logic of its own.
    """

    policy: str
    role: Role
    sources: frozenset[IPAddress]
    destinations: tuple[IPNetwork, ...]
    egress_ip: IPAddress


@dataclass(frozen=True)
class GatewayPlan:
    gateway: str
    rules: tuple[SnatRule, ...] = ()
    generation: int = 0

    @property
    def egress_ips(self) -> frozenset[IPAddress]:
        """Egress IPs of the rules this gateway serves as active gateway; the agent provisions
        those inside its pools. A standby's explicit egress IP moves to it only on failover."""
        return frozenset(r.egress_ip for r in self.rules if r.role is Role.ACTIVE)


class SteerAction(StrEnum):
    TUNNEL = "tunnel"  # send through the active gateway's tunnel
    DROP = "drop"


@dataclass(frozen=True)
class SteerRule:
    """On a cloud node: new connections from local `sources` to `destinations` (disjoint,
    LPM-resolved) are sent to `gateway` (or `standby` after a fast failover) or dropped."""

    policy: str
    action: SteerAction
    sources: frozenset[IPAddress]
    destinations: tuple[IPNetwork, ...]
    gateway: str | None = None
    standby: str | None = None
    reason: DropReason | None = None  # for drops


class ConnectionFollow(NamedTuple):
    """On a cloud node: the policy's established connections on gateway `gone` go on
    through gateway `to`, where its new connections go now (the gateways share their
    connection state)."""

    gone: str
    policy: str
    to: str


@dataclass(frozen=True)
class NodePlan:
    node: str
    rules: tuple[SteerRule, ...] = ()
    # Pod CIDRs, pod IPs, node addresses, API server addresses: never steered, whatever a
    # policy's destinationCIDRs say (0.0.0.0/0 must not cut pods off the API server).
    cluster_internal: tuple[IPNetwork, ...] = ()
    generation: int = 0
