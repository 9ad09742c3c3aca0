"""`gatewayd steer`: the cloud-node daemon, in standalone or Kubernetes mode.

It keeps one WireGuard interface per gateway, one routing table per gateway (selected by
fwmark), and the `inet gatewayd-steer` table that marks new connections from local pods to
their policy's destinations (or drops them when the plan says so).

Standalone mode: the plan comes from snapshot files, the gateways from the config.
Kubernetes mode (see `kubernetes.py`): plan, gateways and this node's tunnel address come from
the EgressNode's spec; each gateway gets a stable slot (`slots.py`); the fast failover path
(`failover.py`) probes every gateway through its tunnel and moves a policy's new connections to
its standby on its own when the gateway stops answering.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from gatewayd.configfile import DEFAULT_TUNNEL_ADDRESS, ConfigError
from gatewayd.dataplane.host import first_ipv4, observe_interfaces
from gatewayd.dataplane.nft_render import SteerTableSettings, render_steer_table
from gatewayd.dataplane.nftables import NftablesDriver
from gatewayd.dataplane.probe import ProbeTarget
from gatewayd.dataplane.routing import PolicyRoutingDriver
from gatewayd.dataplane.sysctl import ensure_sysctls
from gatewayd.dataplane.wireguard import (
    PEER_UP_SECONDS,
    Peer,
    WireGuardConfig,
    WireGuardDriver,
)
from gatewayd.dataplane.wireguard import generate_private_key as ensure_private_key
from gatewayd.follower import (
    Part,
    PlanFollower,
    PlanSource,
    SnapshotSource,
    StepFailure,
    run_follower,
)
from gatewayd.healthz import HealthServer
from gatewayd.kube.client import KubeConfigError
from gatewayd.metrics import MetricsSettings, Sample, exposition, peer_samples
from gatewayd.policy.engine import EgressPlan
from gatewayd.policy.model import NodePlan, SteerAction, SteerRule
from gatewayd.probe import GATEWAY_TUNNEL_ADDRESS, PROBE_PORT, Failover, effective_rules
from gatewayd.runtime import rfc3339
from gatewayd.steer.config import GatewayTunnelEnd, SteerConfig, load_steer_config
from gatewayd.steer.connections import ConnectionFollower
from gatewayd.steer.failover import FastFailover
from gatewayd.steer.footprint import NodeFootprint
from gatewayd.steer.kubernetes import NodeState, SteerCluster, node_status
from gatewayd.steer.metrics import gateway_samples
from gatewayd.steer.slots import (
    SlotsFullError,
    SlotTable,
    interface_name,
    slots_path,
    tunnel_end,
)
from gatewayd.steer.target import NodeTarget, target_from_dict, target_to_dict
from gatewayd.systemd import Priority, journal_event

log = logging.getLogger("gatewayd.steer")

TABLE_FAMILY, TABLE_NAME = NodeFootprint.table
# /healthz fails when the loop has not come round for this long (it does every poll interval).
STALL_SECONDS = 60.0
# How often the WireGuard session with a gateway that does not answer probes is renewed.
REHANDSHAKE_SECONDS = 5.0
# Through a gateway tunnel any destination may be reached, and any source may reply.
EVERYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


class SteerAgent(PlanFollower[SteerConfig, NodeTarget]):
    role = "steer"
    load_config = staticmethod(load_steer_config)
    plan_to_dict = staticmethod(target_to_dict)
    plan_from_dict = staticmethod(target_from_dict)

    def __init__(self, config: SteerConfig) -> None:
        self.cluster: SteerCluster | None = None
        self.failover: FastFailover | None = None
        if config.kubernetes is not None:
            try:
                self.cluster = SteerCluster(config)
            except KubeConfigError as exc:
                raise ConfigError([f"{config.path}: kubernetes: {exc}"]) from exc
            self.failover = FastFailover(config.node, config.failover, self._probes_changed)
        super().__init__(config)
        self.nftables = NftablesDriver(TABLE_FAMILY, TABLE_NAME)
        self.routing = PolicyRoutingDriver(mark_mask=config.mark_mask)
        self.wireguard = WireGuardDriver()
        self.slots = SlotTable(slots_path(config), config.mark_mask)
        # The data plane is programmed from the loop's thread and from the fast failover's.
        self._dataplane = threading.Lock()
        self.errors: tuple[StepFailure, ...] = ()
        self.public_key: str | None = None
        self.ends: tuple[GatewayTunnelEnd, ...] = ()  # the tunnels of the last programming
        self._last_pass = time.monotonic()
        self._health: HealthServer | None = None
        self._rehandshaken: dict[str, float] = {}  # gateway -> when its session was dropped
        self._reported_failovers: dict[tuple[str, str], Failover] = {}
        self.connections = ConnectionFollower(config.mark_mask)

    def make_source(self) -> PlanSource[NodeTarget]:
        if self.cluster is not None:
            # Kubernetes settings are read at start only: the same source stays.
            return self.cluster.source
        return SnapshotSource(self.config.snapshot, self.memory, self.plan_from,
                              self.same_content)

    def same_content(self, a: NodeTarget, b: NodeTarget) -> bool:
        return (a.rules, a.cluster_internal, a.gateways, a.tunnel_address) == (
            b.rules, b.cluster_internal, b.gateways, b.tunnel_address)

    def plan_from(self, plan: EgressPlan, generation: int) -> NodeTarget:
        mine = plan.node_plan(self.config.node)
        return NodeTarget(NodePlan(
            node=mine.node, rules=mine.rules, cluster_internal=mine.cluster_internal,
            generation=generation,
        ))

    def tunnel_ends(self, target: NodeTarget | None) -> tuple[GatewayTunnelEnd, ...]:
        """The gateways to keep tunnels to: the config's, or the plan's with their slots."""
        if target is None or target.gateways is None:
            return self.config.gateways if self.cluster is None else ()
        slots = self.slots.assign(g.name for g in target.gateways)
        address = target.tunnel_address or DEFAULT_TUNNEL_ADDRESS
        return tuple(
            tunnel_end(self.config, g.name, slots[g.name], g.public_key, g.endpoint, address)
            for g in target.gateways
        )

    # --- the loop ---------------------------------------------------------------------------

    def attach(self, wake: Callable[[], None]) -> None:
        super().attach(wake)
        if self.cluster is not None and self.failover is not None:
            self.cluster.start()
            self.failover.start()
        if self.config.health_port:
            # The kubelet's probes: alive while the loop comes round, ready with a plan in force;
            # and /metrics, for a Prometheus in the cluster (the port is opened on the node).
            self._health = HealthServer(
                "", self.config.health_port,
                healthy=lambda: time.monotonic() - self._last_pass < STALL_SECONDS,
                ready=lambda: self.applied is not None,
                metrics=exposition,
            )
            self._health.start()

    def shutdown(self) -> None:
        if self._health is not None:
            self._health.stop()
        if self.cluster is not None and self.failover is not None:
            self.failover.stop()
            self.cluster.stop()
        super().shutdown()

    def after_pass(self) -> None:
        self._last_pass = time.monotonic()

    def program(self, target: NodeTarget, errors: list[StepFailure]) -> None:
        with self._dataplane:
            try:
                ends = self.tunnel_ends(target)
            except SlotsFullError as exc:
                errors.append(StepFailure(Part.TUNNEL, str(exc)))
                return
            self.ends = ends
            if not self.host_settled(target):
                self._program_host(ends, target.gateways is not None, errors)
            rules = self._steerable(target.plan, ends)
            failovers = self._follow_failovers(target, ends, rules)
            self.step(errors, Part.FILTER,
                      lambda: self._ensure_table(target.plan, rules, ends, failovers))
            self._failovers_applied(failovers)
            self._follow_policies(rules, failovers)
            self.errors = tuple(errors)

    def host_inputs(self, target: NodeTarget) -> object:
        return self.config, target.gateways, target.tunnel_address

    def _program_host(
        self, ends: tuple[GatewayTunnelEnd, ...], from_plan: bool, errors: list[StepFailure]
    ) -> None:
        for gateway in ends:
            self.step(errors, Part.TUNNEL, functools.partial(self._ensure_tunnel, gateway),
                      gateway.interface)
        if from_plan:
            self.step(errors, Part.TUNNEL, lambda: self._remove_departed(ends),
                      "(departed gateways)")
        self.step(errors, Part.SYSCTL, lambda: self._ensure_sysctls(ends))
        self.step(errors, Part.ROUTING, lambda: self._ensure_routing(ends))

    def repair(self) -> None:
        super().repair()
        self._rehandshake_unreachable()
        self.publish_status()

    def _rehandshake_unreachable(self) -> None:
        """A gateway that does not answer may have restarted and lost its WireGuard session:
        it cannot always start a new one itself (it may not know this node's port for it),
        and this node would only after 15 s of silence. Re-adding the peer drops the stale
        session, so the next probe starts a handshake at once."""
        if self.failover is None:
            return
        now = time.monotonic()
        reachable = self.failover.reachable()
        for end in self.ends:
            if reachable.get(end.name) is not False:
                self._rehandshaken.pop(end.name, None)
                continue
            if now - self._rehandshaken.get(end.name, 0.0) < REHANDSHAKE_SECONDS:
                continue
            self._rehandshaken[end.name] = now
            with self._dataplane:
                try:
                    self.wireguard.ensure(self._tunnel_config(end, with_peer=False))
                    self.wireguard.ensure(self._tunnel_config(end))
                except Exception as exc:
                    log.warning("new handshake with %s: %s", end.name, exc)

    def write_status(self) -> None:
        super().write_status()
        self.publish_status()

    def status_details(self) -> dict[str, Any]:
        target = self.applied
        failovers = self.failover.failovers if self.failover else {}
        return {
            "node": self.config.node,
            "mode": "standalone" if self.cluster is None else "kubernetes",
            "policies": sorted({r.policy for r in target.rules}) if target else [],
            "gateways": [g.name for g in self.ends],
            "failovers": [
                {"policy": f.policy, "from": f.gateway, "to": f.standby, "time": f.at}
                for f in failovers.values()
            ],
        }

    def metric_samples(self) -> list[Sample]:
        samples = super().metric_samples()
        now = time.time()
        reachable = self.failover.reachable() if self.failover is not None else {}
        for end in self.ends:
            with self._dataplane:
                state = self.wireguard.observe(end.interface)
            at = {p.public_key: p.latest_handshake or 0 for p in state.peers} if state else {}
            handshake = at.get(end.public_key, 0)
            # The probes through the tunnel know within a second; a handshake stays recent
            # for minutes after the gateway is gone.
            up = reachable.get(end.name)
            if up is None:
                up = handshake > now - PEER_UP_SECONDS
            samples += peer_samples({end.name: handshake}, [end.name] if up else [], now,
                                    end.interface)
        if self.failover is not None:
            samples += gateway_samples(reachable, self.failover.failovers.values())
        return samples

    # --- fast failover ----------------------------------------------------------------------

    def _follow_failovers(
        self, target: NodeTarget, ends: tuple[GatewayTunnelEnd, ...],
        rules: tuple[SteerRule, ...],
    ) -> dict[tuple[str, str], Failover]:
        """Hand the new plan to the fast failover path; the failovers that stay in force."""
        if self.failover is None:
            return {}
        source = None
        if target.tunnel_address is not None:
            source = IPv4Address(target.tunnel_address.split("/")[0])
        self.failover.set_plan(rules, [
            ProbeTarget(e.name, e.mark, GATEWAY_TUNNEL_ADDRESS, PROBE_PORT) for e in ends
        ], source)
        failovers, _ = self.failover.decide()
        return failovers

    def _probes_changed(self) -> None:
        """A gateway's health changed (the fast failover's thread): decide again and, if the
        failovers changed, re-render the table at once."""
        if self.failover is None:
            return
        with self._dataplane:
            target = self.applied
            if target is None:
                return
            failovers, changed = self.failover.decide()
            rules = self._steerable(target.plan, self.ends)
            # First, also without a failover (a gateway that stopped serving a policy): the
            # established connections' retransmissions are already under way.
            self._follow_policies(rules, failovers)
            if changed:
                try:
                    self._ensure_table(target.plan, rules, self.ends, failovers)
                except Exception:
                    log.exception("re-rendering the steer table for a failover failed; the "
                                  "repair pass retries")
                self._failovers_applied(failovers)
        self.publish_status()

    def _failovers_applied(self, failovers: dict[tuple[str, str], Failover]) -> None:
        """After the table changed: new and ended failovers are reported."""
        before = self._reported_failovers
        if failovers == before:
            return
        for key, failover in failovers.items():
            if key not in before:
                message = (f"policy {failover.policy}: gateway {failover.gateway} does not "
                           f"answer probes through its tunnel; new connections go to the "
                           f"standby {failover.standby}")
                journal_event("failover", message, Priority.WARNING, policy=failover.policy,
                              gateway=failover.gateway, standby=failover.standby)
                if self.cluster is not None:
                    self.cluster.reporter.event("FastFailover", message, warning=True)
        for key, failover in before.items():
            if key not in failovers:
                message = (f"policy {failover.policy}: failover from {failover.gateway} to "
                           f"{failover.standby} ended; the rule follows the plan again")
                journal_event("failover-ended", message, Priority.NOTICE,
                              policy=failover.policy, gateway=failover.gateway)
                if self.cluster is not None:
                    self.cluster.reporter.event("FailoverEnded", message)
        self._reported_failovers = dict(failovers)

    def _follow_policies(
        self, rules: tuple[SteerRule, ...], failovers: dict[tuple[str, str], Failover]
    ) -> None:
        """Established connections follow their policy (see `ConnectionFollower`)."""
        if self.failover is None:
            return
        self.connections.follow_policies(effective_rules(rules, failovers),
                                         self.failover.reachable(), self.failover.serving(),
                                         self.ends)

    # --- status -----------------------------------------------------------------------------

    def publish_status(self) -> None:
        if self.cluster is None or self.failover is None:
            return
        target = self.target
        ends = self.ends
        if self.public_key is None:
            try:
                self.public_key = ensure_private_key(self.config.private_key_file)
            except Exception as exc:
                log.warning("no public key yet: %s", exc)
        state = NodeState(
            public_key=self.public_key,
            address=self.config.advertise_address or self._default_address(),
            listen_port=self.config.listen_port,
            tunnels=ends,
            generation=self.status.generation,
            ready=self.status.ready and self.applied is not None,
            errors=self.errors,
            last_error=self.status.last_error,
            reachable=self.failover.reachable(),
            failovers=tuple(self.failover.failovers.values()),
            probing=target is not None and target.tunnel_address is not None,
        )
        self.cluster.reporter.publish(
            node_status(state, self.cluster.previous_status(), rfc3339())
        )

    @staticmethod
    def _default_address() -> str | None:
        """The first IPv4 address of the interface holding the default route."""
        try:
            interfaces = observe_interfaces()
        except Exception:
            return None
        for interface in interfaces:
            if interface.default_route_v4:
                return first_ipv4(interfaces, interface.name)
        return None

    # --- the data plane ---------------------------------------------------------------------

    def _steerable(
        self, plan: NodePlan, ends: tuple[GatewayTunnelEnd, ...]
    ) -> tuple[SteerRule, ...]:
        """A rule for a gateway this node has no tunnel to cannot be steered: drop its traffic
        (as Cilium does when no gateway is found) rather than let it leave with the node IP."""
        known = {g.name for g in ends}
        rules = []
        for rule in plan.rules:
            if rule.action is SteerAction.TUNNEL and rule.gateway not in known:
                if not self.repairing:
                    log.error("policy %s uses gateway %s, which this node has no tunnel to; "
                              "dropping its traffic", rule.policy, rule.gateway)
                rule = replace(rule, action=SteerAction.DROP, gateway=None, standby=None)
            elif rule.standby is not None and rule.standby not in known:
                rule = replace(rule, standby=None)
            rules.append(rule)
        return tuple(rules)

    def _ensure_tunnel(self, gateway: GatewayTunnelEnd) -> None:
        self.public_key = ensure_private_key(self.config.private_key_file)
        changes = self.wireguard.ensure(self._tunnel_config(gateway))
        self.drift(f"wireguard {gateway.interface}", changes)

    def _tunnel_config(self, gateway: GatewayTunnelEnd, with_peer: bool = True) -> WireGuardConfig:
        peer = Peer(
            public_key=gateway.public_key,
            allowed_ips=EVERYWHERE,
            endpoint=gateway.endpoint,
            persistent_keepalive=gateway.persistent_keepalive,
        )
        return WireGuardConfig(
            interface=gateway.interface,
            private_key_path=self.config.private_key_file,
            listen_port=gateway.listen_port,
            peers=(peer,) if with_peer else (),
            addresses=(gateway.address,),
            mtu=self.config.mtu,
        )

    def _remove_departed(self, ends: tuple[GatewayTunnelEnd, ...]) -> None:
        """Kubernetes mode: remove the tunnels of gateways that left the plan."""
        current = {e.name for e in ends}
        keep = {e.interface for e in ends}
        for gateway, slot in sorted(self.slots.slots.items()):
            interface = interface_name(self.config.interface_prefix, gateway, slot)
            if gateway in current or interface in keep:
                continue
            if self.wireguard.delete(interface):
                journal_event("tunnel-removed", f"gateway {gateway} left the plan: tunnel "
                              f"{interface} removed", Priority.NOTICE, gateway=gateway)

    def _ensure_sysctls(self, ends: tuple[GatewayTunnelEnd, ...]) -> None:
        values = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
        for gateway in ends:
            # Replies from the world arrive on the tunnel: only a loose check accepts them.
            values[f"net.ipv4.conf.{gateway.interface}.rp_filter"] = "2"
        self.drift("sysctl", ensure_sysctls(values, self.config.proc_sys))

    def _ensure_routing(self, ends: tuple[GatewayTunnelEnd, ...]) -> None:
        changes = self.routing.ensure({g.mark: (g.table, g.interface) for g in ends})
        self.drift("policy routing", changes)

    def _ensure_table(
        self,
        plan: NodePlan,
        rules: tuple[SteerRule, ...],
        ends: tuple[GatewayTunnelEnd, ...],
        failovers: dict[tuple[str, str], Failover],
    ) -> None:
        settings = SteerTableSettings(
            gateway_marks={g.name: g.mark for g in ends},
            tunnel_interfaces={g.name: g.interface for g in ends},
            mark_mask=self.config.mark_mask,
        )
        steered = replace(plan, rules=effective_rules(rules, failovers))
        result = self.nftables.ensure(render_steer_table(steered, settings),
                                       verify=self.repairing)
        if result.drift:
            self.drift(f"nftables table {TABLE_FAMILY} {TABLE_NAME}", result)
        self.connections.steering_changed(steered.rules, ends)


def run_steer(config_path: Path, metrics: MetricsSettings | None = None) -> int:
    return run_follower(SteerAgent, config_path, metrics)
