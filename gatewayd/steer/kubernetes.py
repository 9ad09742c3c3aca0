"""steer in Kubernetes mode: its EgressNode, and its status.

- Join: steer creates its EgressNode (owned by its Node, so it goes with it) or adopts it.
- Plan: `spec.rules` + `spec.clusterInternal` (planio's shapes) with `metadata.generation`,
  `spec.gateways` (the gateways to keep tunnels to) and `spec.tunnelAddress` (this node's own
  address on every tunnel, allocated by the controller), through a list+watch of that one
  object (`fieldSelector=metadata.name=<node>`: RBAC cannot pin steer to it).
- Status: observedGeneration (once the data plane matches that generation), public key,
  endpoint, the WireGuard port per gateway, conditions, what the probes see of each gateway,
  and the fast-path failovers in force; the failovers also as Events. Written on changes only
  (no handshake times: they change at every rekey), as a merge patch in which a field that
  became unknown is null; the controller's `PeerAccepted` condition is kept.

Endpoints: the node listens on one port per gateway (`tunnel.listenPort` + the gateway's
slot). `status.endpoint` is `<address>:<tunnel.listenPort>`; `status.gatewayPorts` maps each
gateway to its port, and the controller gives gateway G the peer endpoint
`<address>:<gatewayPorts[G]>` for this node.
A gateway that dials the wrong port anyway is corrected by WireGuard itself: the node's probes
(and keepalives) reach the gateway, which learns the node's real endpoint from them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from gatewayd.clusterlink import (
    REQUEST_TIMEOUT,
    Condition,
    CustomObject,
    OwnObjectSource,
    PendingEvent,
    Reporter,
    Status,
    Timeout,
    api_client,
    conditions,
    status_patch,
)
from gatewayd.follower import InputError, Part, StepFailure, failures_of
from gatewayd.kube.resources import EGRESS_NODES
from gatewayd.policy.planio import PlanFormatError
from gatewayd.probe import Failover
from gatewayd.steer.config import GatewayTunnelEnd, SteerConfig
from gatewayd.steer.target import NodeTarget, target_from_dict
from gatewayd.version import VERSION

log = logging.getLogger("gatewayd.steer")

COMPONENT = "gatewayd-steer"


def target_from_object(obj: Mapping[str, Any]) -> NodeTarget:
    metadata = obj.get("metadata") or {}
    name = str(metadata.get("name"))
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise InputError("plan-invalid", f"EgressNode {name}: spec must be a mapping, keeping "
                         "the last applied plan", object=f"EgressNode/{name}")
    try:
        return target_from_dict({
            **spec,
            "node": name,
            "generation": int(metadata.get("generation") or 0),
            "gateways": spec.get("gateways") or [],
        })
    except PlanFormatError as exc:
        raise InputError("plan-invalid", f"EgressNode {name}: spec unusable, keeping the last "
                         f"applied plan: {exc}", object=f"EgressNode/{name}") from exc


@dataclass(frozen=True)
class NodeState:
    """What the status reports, gathered by steer after a pass."""

    public_key: str | None
    address: str | None  # where gateways reach this node
    listen_port: int
    tunnels: tuple[GatewayTunnelEnd, ...]
    generation: int
    ready: bool
    errors: tuple[StepFailure, ...]
    last_error: str | None
    reachable: Mapping[str, bool | None]  # gateway -> what the probes see
    failovers: Sequence[Failover]
    probing: bool  # the node has a tunnel address, so it can probe


def node_status(state: NodeState, previous: Mapping[str, Any], now: str) -> Status:
    failed = {error.part for error in state.errors}
    tunnels_ok = Part.TUNNEL not in failed
    steering_ok = not {Part.FILTER, Part.ROUTING} & failed
    reachable = sum(1 for t in state.tunnels if state.reachable.get(t.name))
    new = [
        Condition("Ready", state.ready, "PlanApplied" if state.ready else "ApplyFailed",
                  state.last_error or f"plan generation {state.generation} applied"),
        Condition("TunnelsUp", tunnels_ok, "Probing" if state.probing else "NoTunnelAddress",
                  f"{reachable}/{len(state.tunnels)} gateways answer probes" if state.probing
                  else "no spec.tunnelAddress yet: gateways are not probed"),
        Condition("SteeringProgrammed", steering_ok,
                  "Programmed" if steering_ok else "ProgrammingFailed",
                  failures_of(state.errors, Part.FILTER, Part.ROUTING)),
    ]
    status: Status = {
        "observedGeneration": state.generation,
        "version": VERSION,
        "publicKey": state.public_key,
        "endpoint": _endpoint(state.address, state.listen_port) if state.address else None,
        "gatewayPorts": _ports(state.tunnels, previous.get("gatewayPorts")),
        "conditions": conditions(new, previous.get("conditions") or [], state.generation, now),
        "gateways": [
            {
                "name": t.name,
                "reachable": state.reachable.get(t.name) is True,
            }
            for t in state.tunnels
        ],
        "failovers": [
            {"policy": f.policy, "from": f.gateway, "to": f.standby, "time": f.at}
            for f in sorted(state.failovers, key=lambda f: (f.policy, f.gateway))
        ],
    }
    return {key: value for key, value in status.items() if value is not None}


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _ports(tunnels: Sequence[GatewayTunnelEnd], previous: object) -> dict[str, int | None]:
    """The port per gateway; a gateway that left gets null, which removes it (the status is
    written as a merge patch, where a map is merged, not replaced)."""
    ports: dict[str, int | None] = {t.name: t.listen_port for t in tunnels}
    if isinstance(previous, Mapping):
        for name, port in previous.items():
            if name not in ports and port is not None:
                ports[name] = None
    return ports


class SteerCluster:
    """Everything steer does with the cluster, started once the saved plan is restored."""

    def __init__(self, config: SteerConfig) -> None:
        if config.kubernetes is None:
            raise ValueError("SteerCluster needs a config in Kubernetes mode")
        self.config = config
        self.api = api_client(config.kubernetes)
        self.object = CustomObject(self.api, "egressnodes", "EgressNode", config.node)
        self.source = OwnObjectSource(self.api, EGRESS_NODES, config.node, target_from_object)
        self.reporter = Reporter(
            f"EgressNode {config.node}", self._join, self._write_status, self._record_event,
            recorder=lambda: self.object.recorder,
        )
        self.source.joined = self.reporter.joined.is_set

    def start(self) -> None:
        self.reporter.start()

    def stop(self) -> None:
        self.reporter.stop()

    def previous_status(self) -> Mapping[str, Any]:
        """The status written last, or the one found on the object (after a restart)."""
        written = self.reporter.written
        return written if written is not None else self.source.status()

    def _join(self) -> None:
        if self.object.get() is not None:
            log.info("joined as EgressNode %s", self.config.node)
            return
        metadata: dict[str, Any] = {}
        owner = self._node_reference()
        if owner is not None:
            metadata["ownerReferences"] = [owner]
        self.object.create(metadata)
        log.info("created EgressNode %s", self.config.node)

    def _node_reference(self) -> dict[str, Any] | None:
        """An owner reference to this node's Node, so the EgressNode goes with it."""
        try:
            node = CoreV1Api(self.api).read_node(self.config.node,
                                                 _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status in (HTTPStatus.NOT_FOUND, HTTPStatus.FORBIDDEN):
                log.warning("Node %s not readable (%s); its EgressNode has no owner",
                            self.config.node, exc.status)
                return None
            raise
        uid = node.metadata.uid if node.metadata else None
        if not uid:
            return None
        return {"apiVersion": "v1", "kind": "Node", "name": self.config.node, "uid": uid}

    def _write_status(self, status: Status, timeout: Timeout) -> None:
        patch = status_patch(status, self.reporter.written, self.source.status())
        self.object.patch_status(patch, timeout)

    def _record_event(self, event: PendingEvent) -> None:
        obj = self.source.informer.get(self.config.node) or {}
        uid = (obj.get("metadata") or {}).get("uid")
        self.object.record_event(COMPONENT, event.reason, event.message, event.warning, uid)
