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
- Fast failover: answers the cloud nodes' probes (`responder.py`), and moves provisioned egress
  IPs with the nodes' traffic (`egress.py`).
- Connections: conntrackd shares the SNATed flows with the other gateways, so that a standby
  that takes a policy over continues them.

On SIGTERM the agent writes Ready=False first (best effort, a short timeout), so that the
controller moves traffic away, then exits; the data plane stays.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from http import HTTPStatus
from ipaddress import IPv4Address, ip_interface
from typing import TYPE_CHECKING, Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from gatewayd.agent.config import AgentConfig, TunnelPeer
from gatewayd.agent.egress import EgressIPKeeper, EgressIPReport
from gatewayd.agent.mode import EgressIPView
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
from gatewayd.dataplane.conntrackd import ConntrackdDriver, SyncSettings, config_path
from gatewayd.dataplane.host import first_ipv4, observe_interfaces
from gatewayd.dataplane.priority import raise_process_priority
from gatewayd.dataplane.wireguard import generate_private_key as ensure_private_key
from gatewayd.follower import InputError, Part, PlanSource, StepFailure, failures_of
from gatewayd.kube.informer import Informer
from gatewayd.kube.leases import LeaseObserver, renew_lease
from gatewayd.kube.resources import EGRESS_GATEWAYS, EGRESS_SOURCE_SLICES
from gatewayd.policy.model import GatewayInterface, GatewayPlan, IPAddress
from gatewayd.policy.planio import PlanFormatError, gateway_plan_from_dict
from gatewayd.probe import PROBE_PORT
from gatewayd.runtime import rfc3339
from gatewayd.systemd import Priority, journal_event
from gatewayd.version import VERSION

if TYPE_CHECKING:
    from gatewayd.agent.daemon import GatewayAgent

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
    """The Kubernetes mode of `GatewayMode` (mode.py): everything the agent does with the
    cluster and with the other gateways, started once the saved plan is restored."""

    name = "kubernetes"

    def __init__(self, agent: GatewayAgent) -> None:
        config = agent.config
        settings = config.kubernetes
        if settings is None:
            raise ValueError("AgentCluster needs a config in Kubernetes mode")
        self.agent = agent
        self.api = api_client(settings)
        self.object = CustomObject(self.api, "egressgateways", "EgressGateway", config.name)
        self.source = GatewaySpecSource(self.api, config.name)
        self._lease_observer = LeaseObserver()
        self.keeper = EgressIPKeeper(config.name, config.egress_ip_pools, config.failover,
                                     agent.egress_ips_changed, self._egress_ips_released)
        # The connection state shared with the other gateways.
        self.conntrack_sync = ConntrackdDriver()
        self._sync_missing_reported = False
        self._connection: dict[str, Any] | None = None  # as status.json last reported it
        # A gateway's credentials may not create Events (its journal has them): none here.
        self.reporter = Reporter(
            f"EgressGateway {config.name}", self._join, self._write_status,
            heartbeat=self._beat, heartbeat_seconds=settings.lease_renew_seconds,
        )
        self.source.joined = self.reporter.joined.is_set
        self._responder: ProbeResponder | None = None
        self._labels_refused: dict[str, str] | None = None

    @property
    def config(self) -> AgentConfig:
        return self.agent.config  # a reload may change labels

    def plan_source(self) -> PlanSource[GatewayTarget]:
        return self.source  # Kubernetes settings are read at start only: the same one stays

    def default_peers(self) -> tuple[TunnelPeer, ...]:
        return ()

    def start(self) -> None:
        # Claims and fences must not wait for the CPU (see gatewayd.dataplane.priority).
        raise_process_priority("the agent")
        address = ip_interface(self.config.tunnel.address).ip
        if not isinstance(address, IPv4Address):
            raise ValueError(f"tunnel.address {self.config.tunnel.address}: the probes need "
                             "an IPv4 address")
        self._responder = ProbeResponder(
            self.config.name, address, PROBE_PORT,
            hold_seconds=self.config.failover.egress_ip_hold_seconds,
            fence_interfaces={p.interface for p in self.config.egress_ip_pools},
        )
        self._responder.start()
        self.keeper.start(self._responder)
        self.reporter.start()

    def stop(self) -> None:
        """Write Ready=False first, so the controller moves traffic away; hand the egress IPs
        the nodes move elsewhere over (see egress.py); then stop following, and the conntrack
        sync last: the standby had our flows all along, and gets the last ones. The rest of
        the data plane stays."""
        written = self.reporter.stop(self._status(stopping=True), timeout=2.0)
        log.info("Ready=False %s", "written" if written else "NOT written (API unreachable)")
        kept = self.keeper.hand_over(self.config.failover.handover_seconds)
        if kept:
            log.info("egress IPs kept, no node could move their policies elsewhere: %s",
                     ", ".join(map(str, kept)))
        self.keeper.stop()
        if self._responder is not None:
            self._responder.stop()
        self.conntrack_sync.stop()

    def provision(self, target: GatewayTarget) -> None:
        self.keeper.set_rules(target.rules)  # the keeper's thread follows the probes

    def table_egress_ips(
        self, plan: GatewayPlan, held: frozenset[IPAddress]
    ) -> frozenset[IPAddress]:
        """A provisioned one unless another host holds it (the keeper claims and releases them
        as the traffic moves, and a failover must not wait for a table change); any other
        one while the host holds it."""
        rule_ips = {rule.egress_ip for rule in plan.rules}
        keeper = self.keeper
        claimable = {ip for ip in rule_ips if keeper.provisioned(ip)} - keeper.refused()
        present = held & rule_ips
        return frozenset(claimable | {ip for ip in present if not keeper.provisioned(ip)})

    def egress_ips_moved(self, target: GatewayTarget, in_table: frozenset[IPAddress]) -> bool:
        """The egress IPs the keeper refuses are not those the table drops."""
        keeper = self.keeper
        rule_ips = {r.egress_ip for r in target.rules if keeper.provisioned(r.egress_ip)}
        return rule_ips - keeper.refused() != {ip for ip in in_table if keeper.provisioned(ip)}

    def egress_ips(self, plan: GatewayPlan | None) -> EgressIPView:
        keeper = self.keeper
        held = keeper.report().held
        return EgressIPView(
            expected=frozenset(ip for ip in (plan.egress_ips if plan else ())
                               if keeper.provisioned(ip)),
            held=frozenset(held), conflicts=keeper.refused(), listed=tuple(map(str, held)))

    def details(self) -> dict[str, Any]:
        self._connection = self.connection()
        return {"apiServer": self._connection}

    def connection_changed(self) -> bool:
        """Losing or regaining the API server changes no plan: status.json says so anyway."""
        return self.connection() != self._connection

    def publish(self) -> None:
        """Hand the EgressGateway status to the reporter (written if it changed)."""
        self.reporter.publish(self._status())

    def _status(self, stopping: bool = False) -> Status:
        agent = self.agent
        if agent.public_key is None:
            try:
                agent.public_key = ensure_private_key(self.config.tunnel.private_key_file)
            except Exception as exc:  # reported through Ready via the tunnel step anyway
                log.warning("no public key yet: %s", exc)
        try:
            interfaces = observe_host(self.config)
        except Exception:
            log.exception("reading the host's interfaces failed")
            interfaces = ()
        state = AgentState(
            config=self.config,
            public_key=agent.public_key,
            generation=agent.status.generation,
            ready=agent.status.ready and agent.applied is not None,
            errors=agent.errors,
            last_error=agent.status.last_error,
            peers_up=frozenset(agent.peers_up),
            peers=tuple(p.name for p in agent.peers(agent.target)),
            egress_ips=self.keeper.report(),
            interfaces=interfaces,
            stopping=stopping,
            state_error=agent.status.state_error,
        )
        return gateway_status(state, self.previous_status(), rfc3339())

    # --- the conntrack sync ---------------------------------------------------------------------

    def share_connections(self, target: GatewayTarget) -> None:
        """Share the SNATed flows with the other gateways on the uplink's segment (conntrackd),
        so that a standby that takes a policy over continues its connections."""
        sources = tuple(net for peer in self.agent.peers(target) for net in peer.allowed_ips)
        if not sources:
            self.conntrack_sync.stop()
            return
        if not self.conntrack_sync.available():
            if not self._sync_missing_reported:
                self._sync_missing_reported = True
                journal_event("conntrack-sync-missing", "conntrackd is not installed: "
                              "connections through this gateway do not survive a failover",
                              Priority.WARNING)
            return
        address = self._sync_address()
        if address is None:
            raise RuntimeError(f"uplink {self.config.uplink} has no IPv4 address for the "
                               "conntrack sync")
        settings = SyncSettings(self.config.uplink, IPv4Address(address), sources,
                                self.config.state_directory / "conntrackd")
        if self.conntrack_sync.ensure(settings):
            threading.Thread(target=self._resync, args=(settings,), name="conntrack-resync",
                             daemon=True).start()

    def _sync_address(self) -> str | None:
        """The uplink's own IPv4 address: not an egress IP, which moves between gateways."""
        for interface in observe_interfaces():
            if interface.name != self.config.uplink:
                continue
            for item in interface.addresses:
                ip = item.address
                if ip.version == 4 and not any(ip in pool.cidr
                                               for pool in self.config.egress_ip_pools):
                    return str(ip)
        return None

    def _resync(self, settings: SyncSettings) -> None:
        """A (re)started conntrackd: swap flows with the other gateways once it listens."""
        control = settings.directory / "conntrackd.ctl"
        deadline = time.monotonic() + 10
        while not control.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            self.conntrack_sync.resync(settings)
        except Exception as exc:
            log.warning("conntrack resync with %s: %s", config_path(settings.directory), exc)

    def _egress_ips_released(self) -> None:
        """The keeper's thread: this gateway gave egress IPs up, so another gateway carries
        their connections now."""
        self.conntrack_sync.forget_own_flows()

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
