"""`gatewayd steer`: the cloud-node daemon, in standalone or Kubernetes mode.

It keeps one WireGuard interface per gateway, one routing table per gateway (selected by
fwmark), and the `inet gatewayd-steer` table that marks new connections from local pods to
their policy's destinations (or drops them when the plan says so).

What differs between the modes is one object the daemon composes (`mode.py`). Standalone mode
(`standalone.py`): the plan comes from snapshot files, the gateways from the config. Kubernetes
mode (`cluster_node.py`): plan, gateways and this node's tunnel address come from the
EgressNode's spec; each gateway gets a stable slot (`slots.py`); the fast failover path
(`failover.py`) probes every gateway through its tunnel and moves a policy's new connections to
its standby on its own when the gateway stops answering or says it is leaving.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from gatewayd.configfile import DEFAULT_TUNNEL_ADDRESS, ConfigError
from gatewayd.dataplane.host import first_ipv4, observe_interfaces
from gatewayd.dataplane.nft_render import SteerTableSettings, render_steer_table
from gatewayd.dataplane.nftables import NftablesDriver
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
    StepFailure,
    run_follower,
)
from gatewayd.healthz import HealthServer
from gatewayd.kube.client import KubeConfigError
from gatewayd.metrics import MetricsSettings, Sample, exposition, peer_samples
from gatewayd.policy.engine import EgressPlan
from gatewayd.policy.model import NodePlan, SteerAction, SteerRule
from gatewayd.probe import Steering, effective_rules
from gatewayd.steer.cluster_node import ClusterNode
from gatewayd.steer.config import GatewayTunnelEnd, SteerConfig, load_steer_config
from gatewayd.steer.connections import ConnectionFollower
from gatewayd.steer.footprint import NodeFootprint
from gatewayd.steer.metrics import gateway_samples
from gatewayd.steer.mode import NodeMode
from gatewayd.steer.slots import (
    SlotsFullError,
    SlotTable,
    interface_name,
    slots_path,
    tunnel_end,
)
from gatewayd.steer.standalone import StandaloneNode
from gatewayd.steer.target import NodeTarget, target_from_dict, target_to_dict
from gatewayd.systemd import Priority, journal_event

log = logging.getLogger("gatewayd.steer")

TABLE_FAMILY, TABLE_NAME = NodeFootprint.table
# /healthz fails when the loop has not come round for this long (it does every poll interval).
STALL_SECONDS = 60.0
# Through a gateway tunnel any destination may be reached, and any source may reply.
EVERYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


class SteerAgent(PlanFollower[SteerConfig, NodeTarget]):
    role = "steer"
    load_config = staticmethod(load_steer_config)
    plan_to_dict = staticmethod(target_to_dict)
    plan_from_dict = staticmethod(target_from_dict)

    def __init__(self, config: SteerConfig) -> None:
        self.config = config  # the mode reads it, and PlanFollower asks the mode for a source
        self.mode: NodeMode = StandaloneNode(self)
        if config.kubernetes is not None:
            try:
                self.mode = ClusterNode(self)
            except KubeConfigError as exc:
                raise ConfigError([f"{config.path}: kubernetes: {exc}"]) from exc
        super().__init__(config)
        self.nftables = NftablesDriver(TABLE_FAMILY, TABLE_NAME)
        self.routing = PolicyRoutingDriver(mark_mask=config.mark_mask)
        self.wireguard = WireGuardDriver()
        self.slots = SlotTable(slots_path(config), config.mark_mask)
        # The data plane is programmed from the loop's thread (`dataplane`, whole passes) and
        # the steering table also from the fast failover's (`steering`, taken inside it).
        self.dataplane = threading.Lock()
        self.steering = threading.Lock()
        self.steered_target: NodeTarget | None = None  # the target the table was rendered from
        self.errors: tuple[StepFailure, ...] = ()
        self.public_key: str | None = None
        self.ends: tuple[GatewayTunnelEnd, ...] = ()  # the tunnels of the last programming
        self._last_pass = time.monotonic()
        self._health: HealthServer | None = None
        self.connections = ConnectionFollower(config.mark_mask)

    def make_source(self) -> PlanSource[NodeTarget]:
        return self.mode.plan_source()

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
            return self.mode.default_ends()
        slots = self.slots.assign(g.name for g in target.gateways)
        address = target.tunnel_address or DEFAULT_TUNNEL_ADDRESS
        return tuple(
            tunnel_end(self.config, g.name, slots[g.name], g.public_key, g.endpoint, address)
            for g in target.gateways
        )

    # --- the loop ---------------------------------------------------------------------------

    def attach(self, wake: Callable[[], None]) -> None:
        super().attach(wake)
        self.mode.start()
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
        self.mode.stop()
        super().shutdown()

    def after_pass(self) -> None:
        self._last_pass = time.monotonic()

    def program(self, target: NodeTarget, errors: list[StepFailure]) -> None:
        with self.dataplane:
            try:
                ends = self.tunnel_ends(target)
            except SlotsFullError as exc:
                errors.append(StepFailure(Part.TUNNEL, str(exc)))
                return
            if not self.host_settled(target):
                self._program_host(ends, target.gateways is not None, errors)
            # The fast failover waits for this part only: the host's tunnels, sysctls and
            # routes took 0.15-0.26 s in the lab while a gateway stopped, and a handover that
            # ended meanwhile kept new connections on the gateway that had let the egress IP go.
            with self.steering:
                self.ends, self.steered_target = ends, target
                rules = self.steerable(target.plan, ends)
                steering = self.mode.steering(target, ends, rules)
                self.step(errors, Part.FILTER,
                          lambda: self.ensure_table(target.plan, rules, ends, steering))
                self.mode.steered(rules, steering)
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
        self.mode.repair()
        self.publish_status()

    def write_status(self) -> None:
        super().write_status()
        self.publish_status()

    def status_details(self) -> dict[str, Any]:
        target = self.applied
        failovers = self.mode.failovers_in_force()
        return {
            "node": self.config.node,
            "mode": self.mode.name,
            "policies": sorted({r.policy for r in target.rules}) if target else [],
            "gateways": [g.name for g in self.ends],
            "failovers": [
                {"policy": f.policy, "from": f.gateway, "to": f.standby, "time": f.at}
                for f in failovers
            ],
        }

    def metric_samples(self) -> list[Sample]:
        samples = super().metric_samples()
        now = time.time()
        reachable = self.mode.reachable()
        for end in self.ends:
            with self.dataplane:
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
        return samples + gateway_samples(reachable, self.mode.failovers_in_force())

    # --- status -----------------------------------------------------------------------------

    def publish_status(self) -> None:
        self.mode.publish()

    @staticmethod
    def default_address() -> str | None:
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

    def steerable(
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
        changes = self.wireguard.ensure(self.tunnel_config(gateway))
        self.drift(f"wireguard {gateway.interface}", changes)

    def tunnel_config(self, gateway: GatewayTunnelEnd, with_peer: bool = True) -> WireGuardConfig:
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

    def ensure_table(
        self,
        plan: NodePlan,
        rules: tuple[SteerRule, ...],
        ends: tuple[GatewayTunnelEnd, ...],
        steering: Steering,
    ) -> None:
        settings = SteerTableSettings(
            gateway_marks={g.name: g.mark for g in ends},
            tunnel_interfaces={g.name: g.interface for g in ends},
            mark_mask=self.config.mark_mask,
        )
        steered = replace(plan, rules=effective_rules(rules, steering))
        result = self.nftables.ensure(
            render_steer_table(steered, settings, follows=steering.follows),
            verify=self.repairing)
        if result.drift:
            self.drift(f"nftables table {TABLE_FAMILY} {TABLE_NAME}", result)
        self.connections.steering_changed(steered.rules, ends)


def run_steer(config_path: Path, metrics: MetricsSettings | None = None) -> int:
    return run_follower(SteerAgent, config_path, metrics)
