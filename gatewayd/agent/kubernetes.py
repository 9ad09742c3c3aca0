"""The agent in Kubernetes mode: its EgressGateway, its Lease, and its status.

- Join: the agent adopts its EgressGateway (pre-created with its credentials; created when it is
  missing and RBAC allows), with the configured labels and `kubernetes.io/hostname` merged into
  `metadata.labels`.
- Plan: `spec.rules` (planio's rule dicts) with `metadata.generation`, and `spec.peers`, the
  WireGuard peers, followed through a list+watch limited to this one object.
- Heartbeat: the Lease `<namespace>/egressgateway-<name>`, renewed every `leaseRenewSeconds`;
  with it the configured labels are put back on the EgressGateway if they differ (a reload).
- Status: observedGeneration (once the data plane matches that generation), public key,
  endpoint, addresses, interfaces, egress IP pools, the egress IPs held now, conditions and
  whether each peer is up; written when it changes, as a merge patch in which a field that
  became unknown is null (removed). No handshake times: they change at every WireGuard rekey
  (every two minutes per peer) and would make every gateway write its status all the time.
- Fast failover: answers the cloud nodes' probes, and moves provisioned egress IPs with the
  nodes' traffic (`egress.py`).

On SIGTERM the agent writes Ready=False first (best effort, a short timeout), so that the
controller moves traffic away, then exits; the data plane stays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from http import HTTPStatus
from ipaddress import IPv4Address, ip_interface
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from gatewayd.agent.config import AgentConfig
from gatewayd.agent.egress import EgressIPKeeper, EgressIPReport
from gatewayd.agent.responder import ProbeResponder
from gatewayd.agent.target import GatewayTarget, usable_peers
from gatewayd.api.sourceslices import (
    GATEWAY_LABEL,
    SLICES_FEATURE,
    ParsedSlices,
    SliceLookup,
    names_slices,
    waiting_slices,
)
from gatewayd.clusterlink import (
    Condition,
    CustomObject,
    OwnObjectSource,
    Reporter,
    Status,
    Timeout,
    api_client,
    conditions,
    status_patch,
)
from gatewayd.dataplane.host import first_ipv4, observe_interfaces
from gatewayd.follower import InputError, Part, StepFailure, failures_of
from gatewayd.kube.informer import Informer
from gatewayd.kube.leases import LeaseObserver, renew_lease
from gatewayd.kube.resources import EGRESS_GATEWAYS, EGRESS_SOURCE_SLICES
from gatewayd.policy.model import GatewayInterface
from gatewayd.policy.planio import PlanFormatError, gateway_plan_from_dict
from gatewayd.probe import PROBE_PORT
from gatewayd.version import VERSION

log = logging.getLogger("gatewayd.agent")

LEASE_PREFIX = "egressgateway-"
HOSTNAME_LABEL = "kubernetes.io/hostname"


def object_labels(config: AgentConfig) -> dict[str, str]:
    return {HOSTNAME_LABEL: config.name, **config.labels}


def target_from_object(
    obj: Mapping[str, Any],
    slice_named: SliceLookup = lambda name: None,
    parsed: ParsedSlices | None = None,
) -> GatewayTarget:
    """The plan an EgressGateway's spec holds, its rules' sources read from their
    EgressSourceSlices (`slice_named`; `parsed`: the slices parsed before, reused); InputError
    names the field that is wrong, or says that a slice the spec names is not there yet."""
    metadata = obj.get("metadata") or {}
    name = str(metadata.get("name"))
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise InputError("plan-invalid", f"EgressGateway {name}: spec must be a mapping, keeping "
                         "the last applied plan", object=f"EgressGateway/{name}")
    parsed = parsed if parsed is not None else ParsedSlices()
    parsed.next_spec()
    try:
        rules = _rules(spec)
        waiting = waiting_slices(rules, slice_named)
        if waiting:
            raise InputError(
                "sources-missing", f"EgressGateway {name}: {len(waiting)} EgressSourceSlices the "
                f"spec names are missing or not yet as it names them ({', '.join(waiting[:3])}), "
                "keeping the last applied plan", object=f"EgressGateway/{name}")
        # Sources that are in slices are put in after the rest of the rule is read.
        plan = gateway_plan_from_dict({
            "gateway": name,
            "generation": int(metadata.get("generation") or 0),
            "rules": [{**r, "sources": []} if names_slices(r) else r for r in rules],
        })
        plan = replace(plan, rules=tuple(
            replace(rule, sources=parsed.sources(raw, slice_named)) if names_slices(raw)
            else rule
            for rule, raw in zip(plan.rules, rules, strict=True)
        ))
        peers, problems = usable_peers(spec.get("peers") or [], "spec.peers")
    except (PlanFormatError, ValueError) as exc:
        raise InputError("plan-invalid", f"EgressGateway {name}: spec unusable, keeping the "
                         f"last applied plan: {exc}", object=f"EgressGateway/{name}") from exc
    for problem in problems:
        log.warning("EgressGateway %s: peer left out, the others are applied: %s", name, problem)
    return GatewayTarget(plan, peers)


def _rules(spec: Mapping[str, Any]) -> list[object]:
    rules = spec.get("rules") or []
    if not isinstance(rules, list):
        raise ValueError("spec.rules must be a list")
    return rules


class GatewaySpecSource(OwnObjectSource[GatewayTarget]):
    """The agent's EgressGateway, and the EgressSourceSlices labelled with its name that hold
    its rules' sources. A spec whose slices have not all arrived is not news yet: the agent
    keeps its plan until they have (the watches of the two types are not ordered)."""

    def __init__(self, api: ApiClient, name: str) -> None:
        super().__init__(api, EGRESS_GATEWAYS, name, self._parse)
        self.slices = Informer(api, EGRESS_SOURCE_SLICES, self._changed,
                               label_selector=f"{GATEWAY_LABEL}={name}")
        self._waiting_for: object = None  # the spec generation a wait was logged for
        self._parsed = ParsedSlices()

    def start(self, wake: Callable[[], None]) -> None:
        super().start(wake)
        self.slices.start()

    def stop(self) -> None:
        super().stop()
        self.slices.stop(timeout=2)

    def changed(self) -> bool:
        if not self.slices.synced or not super().changed():
            return False
        obj = self.informer.get(self.name)
        spec = obj.get("spec") if obj is not None else None
        try:
            waiting = waiting_slices(_rules(spec) if isinstance(spec, Mapping) else [],
                                     self.slices.get)
        except ValueError:
            return True  # malformed: desired() reports it
        if not waiting:
            return True
        generation = (obj or {}).get("metadata", {}).get("generation")
        if self._waiting_for != generation:
            self._waiting_for = generation
            log.info("EgressGateway %s generation %s: waiting for %d of its EgressSourceSlices",
                     self.name, generation, len(waiting))
        self._dirty.set()  # looked at again when a slice arrives
        return False

    def _parse(self, obj: Mapping[str, Any]) -> GatewayTarget:
        return target_from_object(obj, self.slices.get, self._parsed)


@dataclass(frozen=True)
class AgentState:
    """What the status reports, gathered by the agent after a pass."""

    config: AgentConfig
    public_key: str | None
    generation: int  # of the plan applied without error
    ready: bool
    errors: tuple[StepFailure, ...]  # of the last programming pass
    last_error: str | None
    peers_up: frozenset[str]
    peers: tuple[str, ...]
    egress_ips: EgressIPReport
    interfaces: tuple[GatewayInterface, ...]
    stopping: bool = False
    state_error: str | None = None  # the state directory cannot be written (disk full, ...)


def gateway_status(state: AgentState, previous: Mapping[str, Any], now: str) -> Status:
    """The EgressGateway status for `state`; `previous` is the status written before (its
    conditions keep their transition times)."""
    config = state.config
    uplink_ip = first_ipv4(state.interfaces, config.uplink)
    endpoint = config.tunnel.advertise_endpoint or (
        f"{uplink_ip}:{config.tunnel.listen_port}" if uplink_ip else None
    )
    failed = {error.part for error in state.errors}
    peers = len(state.peers)
    up = len(state.peers_up)
    tunnel_ok = Part.TUNNEL not in failed
    snat_ok = Part.FILTER not in failed
    new = [
        Condition("Ready", state.ready and not state.stopping,
                  "Stopping" if state.stopping else ("PlanApplied" if state.ready
                                                     else "ApplyFailed"),
                  "the agent is stopping; its data plane stays" if state.stopping
                  else (state.last_error or f"plan generation {state.generation} applied")),
        Condition("TunnelsUp", tunnel_ok and (up > 0 or peers == 0),
                  "Handshakes" if tunnel_ok else "TunnelFailed",
                  f"{up}/{peers} peers have a recent handshake" if tunnel_ok
                  else failures_of(state.errors, Part.TUNNEL)),
        Condition("SNATProgrammed", snat_ok, "Programmed" if snat_ok else "NftablesFailed",
                  failures_of(state.errors, Part.FILTER)),
        Condition("EgressIPsPresent", state.egress_ips.present, state.egress_ips.reason,
                  state.egress_ips.message),
        # The data plane is programmed either way; a plan not saved is lost at a reboot.
        Condition("StateSaved", state.state_error is None,
                  "Saved" if state.state_error is None else "WriteFailed",
                  state.state_error or ""),
    ]
    status: Status = {
        "observedGeneration": state.generation,
        "version": VERSION,
        "features": [SLICES_FEATURE],
        "publicKey": state.public_key,
        "endpoint": endpoint,
        "addresses": [{"type": "InternalIP", "address": uplink_ip}] if uplink_ip else [],
        "interfaces": [_interface(i) for i in state.interfaces],
        "egressIPPools": [
            {"cidr": str(p.cidr), "interface": p.interface} for p in config.egress_ip_pools
        ],
        "egressIPs": [str(ip) for ip in state.egress_ips.held],
        "conditions": conditions(new, previous.get("conditions") or [], state.generation, now),
        "peers": [{"name": name, "up": name in state.peers_up} for name in state.peers],
    }
    return {key: value for key, value in status.items() if value is not None}


def _interface(interface: GatewayInterface) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": interface.name,
        "addresses": [f"{a.address}/{a.prefixlen}" for a in interface.addresses],
    }
    if interface.altnames:
        data["altnames"] = list(interface.altnames)
    if interface.default_route_v4:
        data["defaultRouteV4"] = True
    if interface.default_route_v6:
        data["defaultRouteV6"] = True
    return data


class AgentCluster:
    """Everything the agent does with the cluster, started once the saved plan is restored."""

    def __init__(
        self, config: AgentConfig, changed: Callable[[], None], released: Callable[[], None]
    ) -> None:
        settings = config.kubernetes
        if settings is None:
            raise ValueError("AgentCluster needs a config in Kubernetes mode")
        self.config = config
        self.api = api_client(settings)
        self.object = CustomObject(self.api, "egressgateways", "EgressGateway", config.name)
        self.source = GatewaySpecSource(self.api, config.name)
        self._lease_observer = LeaseObserver()
        self.keeper = EgressIPKeeper(config.name, config.egress_ip_pools, config.failover,
                                     changed, released)
        # A gateway's credentials may not create Events (its journal has them): none here.
        self.reporter = Reporter(
            f"EgressGateway {config.name}", self._join, self._write_status,
            heartbeat=self._beat, heartbeat_seconds=settings.lease_renew_seconds,
        )
        self.source.joined = self.reporter.joined.is_set
        self._responder: ProbeResponder | None = None
        self._labels_refused: dict[str, str] | None = None

    def start(self) -> None:
        address = ip_interface(self.config.tunnel.address).ip
        if not isinstance(address, IPv4Address):
            raise ValueError(f"tunnel.address {self.config.tunnel.address}: the probes need "
                             "an IPv4 address")
        self._responder = ProbeResponder(self.config.name, address, PROBE_PORT)
        self._responder.start()
        self.keeper.start(self._responder)
        self.reporter.start()

    def stop(self, final: Status | None) -> None:
        """Write `final` (Ready=False) first, so the controller moves traffic away; hand the
        egress IPs the nodes move elsewhere over (see egress.py); then stop following. The
        rest of the data plane stays."""
        written = self.reporter.stop(final, timeout=2.0)
        if final is not None:
            log.info("Ready=False %s", "written" if written else "NOT written (API unreachable)")
        kept = self.keeper.hand_over(self.config.failover.handover_seconds)
        if kept:
            log.info("egress IPs kept, no node could move their policies elsewhere: %s",
                     ", ".join(map(str, kept)))
        self.keeper.stop()
        if self._responder is not None:
            self._responder.stop()

    def connection(self) -> dict[str, Any]:
        """Whether this gateway is in touch with the API server: its EgressGateway and its
        source slices listed and watched, joined, and the last write and Lease renewal went
        through. For status.json, where the rollout's health check reads it: a gateway that
        serves its saved plan but cannot reach the API server is ready, and still must not
        pass a rollout."""
        settings = self.config.kubernetes
        assert settings is not None
        informers = (self.source.informer, self.source.slices)
        error = next((i.last_error for i in informers if i.last_error), None)
        error = error or self.reporter.failing
        if error is None and not all(i.synced for i in informers):
            error = "no answer yet"
        return {
            "server": settings.server or f"kubeconfig {settings.kubeconfig}",
            "connected": error is None and self.reporter.joined.is_set(),
            "error": error,
        }

    def previous_status(self) -> Mapping[str, Any]:
        """The status written last, or the one found on the object (after a restart)."""
        written = self.reporter.written
        return written if written is not None else self.source.status()

    # --- the reporter's calls (its thread) -----------------------------------------------------

    def _join(self) -> None:
        obj = self.object.get()
        if obj is None:
            obj = self.object.create({"labels": object_labels(self.config)}) \
                or self.object.get() or {}
            log.info("created EgressGateway %s", self.config.name)
        self._keep_labels(obj)
        log.info("joined as EgressGateway %s", self.config.name)

    def _beat(self) -> None:
        self._renew_lease()
        obj = self.source.informer.get(self.config.name)
        if obj is not None:
            self._keep_labels(obj)

    def _keep_labels(self, obj: Mapping[str, Any]) -> None:
        """The config's labels on the EgressGateway: a reload may have changed them, and
        someone may have removed one of ours (other labels are left alone). Where the cluster
        pins labels to the administrator (RBAC or the ValidatingAdmissionPolicy of
        packaging/kubernetes), the refusal is logged once per label set, not retried."""
        labels = object_labels(self.config)
        current = (obj.get("metadata") or {}).get("labels") or {}
        if not any(current.get(k) != v for k, v in labels.items()):
            return
        if self._labels_refused == labels:
            return
        try:
            self.object.patch_labels(labels)
        except ApiException as exc:
            if exc.status not in (HTTPStatus.FORBIDDEN, HTTPStatus.UNPROCESSABLE_ENTITY):
                raise
            self._labels_refused = labels
            missing = ", ".join(f"{k}={v}" for k, v in labels.items() if current.get(k) != v)
            log.warning("EgressGateway %s: the cluster refuses this gateway's label writes "
                        "(HTTP %s); labels are the administrator's: kubectl label "
                        "egressgateway %s %s", self.config.name, exc.status, self.config.name,
                        missing)

    def _renew_lease(self) -> None:
        settings = self.config.kubernetes
        assert settings is not None
        name = LEASE_PREFIX + self.config.name
        if not renew_lease(self.api, settings.namespace, name, self.config.name,
                           settings.lease_duration_seconds, self._lease_observer):
            log.warning("Lease %s/%s is held by someone else or changed concurrently; "
                        "retrying at the next renewal", settings.namespace, name)

    def _write_status(self, status: Status, timeout: Timeout) -> None:
        patch = status_patch(status, self.reporter.written, self.source.status())
        self.object.patch_status(patch, timeout)


def observe_host(config: AgentConfig) -> tuple[GatewayInterface, ...]:
    return observe_interfaces(skip=frozenset({config.tunnel.interface}))
