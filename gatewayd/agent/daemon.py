"""`gatewayd agent`: the gateway host daemon, in standalone or Kubernetes mode.

It follows this gateway's plan (SNAT rules, egress IPs) and keeps the WireGuard tunnel to the
cloud nodes up. Order within a pass: tunnel and routing guard, egress IPs, the nftables table,
and only then forwarding. The table SNATs only to egress IPs the host holds (Kubernetes mode:
to provisioned ones no other host holds); a rule whose address is missing drops instead.
Forwarding is switched on only once the table is in place, and off whenever the table is
gone and cannot be installed (a render error, the kernel refusing it). Another process
changing or removing the table (`nft flush ruleset`, `systemctl restart nftables`) is noticed
from nftables events and repaired at once; until then the routing guard
(`dataplane/forward_guard.py`) drops the tunnel's traffic.

What differs between the modes is one object the daemon composes (`mode.py`). Standalone mode
(`standalone.py`): the plan comes from snapshot files, the tunnel's peers from the config, and
the plan's active rules decide which provisioned egress IPs the host holds. Kubernetes mode
(`kubernetes.py`): plan and peers come from the EgressGateway's spec; the provisioned egress
IPs follow the cloud nodes' traffic, as their probes report it (`egress.py`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gatewayd.agent import metrics as gateway_metrics
from gatewayd.agent.config import AgentConfig, TunnelPeer, load_agent_config
from gatewayd.agent.footprint import GatewayFootprint, record_tunnel, sysctl_originals_path
from gatewayd.agent.kubernetes import AgentCluster
from gatewayd.agent.mode import GatewayMode
from gatewayd.agent.standalone import StandaloneGateway
from gatewayd.agent.target import GatewayTarget, target_from_dict, target_to_dict
from gatewayd.configfile import ConfigError
from gatewayd.dataplane.addresses import host_addresses
from gatewayd.dataplane.forward_guard import ensure_forward_guard
from gatewayd.dataplane.nft_render import (
    GatewayTableSettings,
    RenderedTable,
    render_gateway_table,
)
from gatewayd.dataplane.nftables import NftablesDriver, TableWatcher
from gatewayd.dataplane.sysctl import ensure_sysctls, observe_sysctls
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
from gatewayd.kube.client import KubeConfigError
from gatewayd.metrics import MetricsSettings, Sample, peer_samples
from gatewayd.policy.engine import EgressPlan
from gatewayd.policy.model import GatewayPlan, IPAddress, in_pools
from gatewayd.probe import PROBE_PORT
from gatewayd.systemd import Priority, journal_event

log = logging.getLogger("gatewayd.agent")

TABLE_FAMILY, TABLE_NAME = GatewayFootprint.table


class GatewayAgent(PlanFollower[AgentConfig, GatewayTarget]):
    role = "agent"
    load_config = staticmethod(load_agent_config)
    plan_to_dict = staticmethod(target_to_dict)
    plan_from_dict = staticmethod(target_from_dict)

    def __init__(self, config: AgentConfig) -> None:
        self.config = config  # the mode reads it, and PlanFollower asks the mode for a source
        self.mode: GatewayMode = StandaloneGateway(self)
        if config.kubernetes is not None:
            try:
                self.mode = AgentCluster(self)
            except KubeConfigError as exc:
                raise ConfigError([f"{config.path}: kubernetes: {exc}"]) from exc
        super().__init__(config)
        self.nftables = NftablesDriver(TABLE_FAMILY, TABLE_NAME)
        self._rendered: RenderedTable | None = None  # the base of the next render
        self._table_changed = threading.Event()  # another process touched the table
        self.table_watcher = TableWatcher(TABLE_FAMILY, TABLE_NAME, self._on_table_changed)
        self._forwarding: bool | None = None  # as this agent last set it
        self._held_in_table: frozenset[IPAddress] | None = None  # egress IPs SNATed to
        self.wireguard = WireGuardDriver()
        self.peers_up: set[str] = set()  # names of tunnel peers with a recent handshake
        self.handshakes: dict[str, int] = {}  # peer name -> unix time of its latest handshake
        self.nat_use = gateway_metrics.NatUse()  # connections per egress IP, for metrics
        self.errors: tuple[StepFailure, ...] = ()  # of the last programming pass
        self.public_key: str | None = None
        self._status_dirty = threading.Event()  # set by the egress IP keeper's thread

    def make_source(self) -> PlanSource[GatewayTarget]:
        return self.mode.plan_source()

    def same_content(self, a: GatewayTarget, b: GatewayTarget) -> bool:
        return a.rules == b.rules and a.peers == b.peers

    def plan_from(self, plan: EgressPlan, generation: int) -> GatewayTarget:
        mine = plan.gateway_plan(self.config.name)
        return GatewayTarget(GatewayPlan(gateway=mine.gateway, rules=mine.rules,
                                         generation=generation))

    def peers(self, target: GatewayTarget | None) -> tuple[TunnelPeer, ...]:
        if target is not None and target.peers is not None:
            return target.peers
        return self.mode.default_peers()

    # --- the loop ---------------------------------------------------------------------------

    def attach(self, wake: Callable[[], None]) -> None:
        super().attach(wake)
        self.table_watcher.start()
        self.mode.start()

    def shutdown(self) -> None:
        self.table_watcher.stop()
        self.mode.stop()
        super().shutdown()

    def host_inputs(self, target: GatewayTarget) -> object:
        return self.config, self.peers(target)

    def program(self, target: GatewayTarget, errors: list[StepFailure]) -> None:
        settled = self.host_settled(target)
        if not settled:
            self.step(errors, Part.TUNNEL, lambda: self._ensure_tunnel(target))
            self.step(errors, Part.FORWARD_GUARD, self._ensure_guard)
        self.step(errors, Part.EGRESS_IPS, lambda: self.mode.provision(target))
        self._filter_then_forward(target.plan, errors, settled)
        self.step(errors, Part.CONNTRACK_SYNC, lambda: self.mode.share_connections(target))
        self.errors = tuple(errors)

    def _filter_then_forward(
        self, plan: GatewayPlan, errors: list[StepFailure], settled: bool
    ) -> None:
        """The table first; forwarding on only once it is in place, off while it is gone."""
        if self.step(errors, Part.FILTER, lambda: self._ensure_table(plan)):
            if not settled or self._forwarding is not True:
                self.step(errors, Part.SYSCTL, lambda: self._ensure_sysctls(forwarding=True))
            return
        try:
            intact = self.nftables.intact()
        except Exception as exc:
            log.warning("cannot read table %s %s back: %s", TABLE_FAMILY, TABLE_NAME, exc)
            intact = False
        if intact:
            return  # the table last installed still filters: the last good plan stays
        self.step(errors, Part.SYSCTL, lambda: self._ensure_sysctls(forwarding=False))
        errors.append(StepFailure(
            Part.FORWARDING, f"off until table {TABLE_FAMILY} {TABLE_NAME} is in place"))

    def _on_table_changed(self) -> None:
        self._table_changed.set()
        if self._wake is not None:
            self._wake()

    def repair(self) -> None:
        super().repair()
        self._check_peers()
        self.publish_status()

    def after_pass(self) -> None:
        if self._table_changed.is_set():
            self._table_changed.clear()
            self._refilter(verify=True)
        elif self._held_changed():
            self._refilter(verify=False)
        if self._status_dirty.is_set():
            self._status_dirty.clear()
            self.publish_status()
        if self.mode.connection_changed():
            self.write_status()

    def _held_changed(self) -> bool:
        if self.target is None or self._held_in_table is None:
            return False
        return self.mode.egress_ips_moved(self.target, self._held_in_table)

    def _dedicated_egress_ips(
        self, plan: GatewayPlan, others: frozenset[IPAddress]
    ) -> frozenset[IPAddress]:
        """The plan's egress IPs the agent provisions, unless the administrator or another
        tool put that address on the host (`others`; then it may serve something there)."""
        pooled = {ip for ip in plan.egress_ips if in_pools(ip, self.config.egress_ip_pools)}
        return frozenset(pooled - others)

    def _refilter(self, verify: bool) -> None:
        """Put the table back (`verify`: it was changed by someone else) or follow the egress
        IPs held, at once, not on the repair timer; a full repair pass when that fails, so
        the failure is reported."""
        if self.target is None:
            return
        errors: list[StepFailure] = []
        self.repairing = verify  # re-read the kernel; what differs is drift, and reported
        try:
            self._filter_then_forward(self.target.plan, errors, settled=True)
        finally:
            self.repairing = False
        if errors:
            self.repair()
        elif self.status.drift_repaired:
            self.write_status()

    def egress_ips_changed(self) -> None:
        """The egress IP keeper's thread (Kubernetes mode): report the change."""
        self._status_dirty.set()
        if self._wake is not None:
            self._wake()

    def health_summary(self) -> str:
        target = self.applied
        policies = len({r.policy for r in target.rules}) if target else 0
        peers = f"{len(self.peers_up)}/{len(self.peers(target))}"
        egress_ips = len(self.mode.egress_ips(target.plan if target else None).listed)
        return f"{policies} policies, {peers} peers up, {egress_ips} egress IPs"

    def _check_peers(self) -> None:
        """Record peers coming up or going down, judged by their latest handshake."""
        tunnel = self.config.tunnel
        peers = self.peers(self.target)
        state = self.wireguard.observe(tunnel.interface)
        handshakes = {p.public_key: p.latest_handshake or 0 for p in state.peers} if state else {}
        self.handshakes = {p.name: handshakes.get(p.public_key, 0) for p in peers}
        recent = time.time() - PEER_UP_SECONDS
        up = {p.name for p in peers if handshakes.get(p.public_key, 0) > recent}
        for peer in peers:
            if peer.name in up - self.peers_up:
                journal_event("peer-up", f"peer {peer.name} is up", Priority.NOTICE,
                              peer=peer.name, public_key=peer.public_key)
            elif peer.name in self.peers_up - up:
                journal_event("peer-down", f"peer {peer.name} is down: no handshake for "
                              f"{PEER_UP_SECONDS} s", Priority.WARNING,
                              peer=peer.name, public_key=peer.public_key)
        self.peers_up = up

    # --- status -----------------------------------------------------------------------------

    def metric_samples(self) -> list[Sample]:
        plan = self.applied.plan if self.applied else None
        egress_ips = self.mode.egress_ips(plan)
        return [
            *super().metric_samples(),
            *peer_samples(self.handshakes, self.peers_up, time.time(),
                          self.config.tunnel.interface),
            *gateway_metrics.egress_ip_samples(egress_ips.expected, egress_ips.held,
                                               egress_ips.conflicts),
            *gateway_metrics.counter_samples(plan, self.nftables.counters()),
            *self.nat_use.samples(map(str, egress_ips.held), time.monotonic()),
        ]

    def status_details(self) -> dict[str, Any]:
        target = self.applied
        return {
            "name": self.config.name,
            "mode": self.mode.name,
            "policies": sorted({f"{r.policy} ({r.role.value})" for r in target.rules})
            if target else [],
            "egressIPs": list(self.mode.egress_ips(target.plan if target else None).listed),
            **self.mode.details(),
        }

    def write_status(self) -> None:
        super().write_status()
        self.publish_status()

    def publish_status(self) -> None:
        self.mode.publish()

    # --- the data plane ---------------------------------------------------------------------

    def _ensure_tunnel(self, target: GatewayTarget) -> None:
        tunnel = self.config.tunnel
        self.public_key = ensure_private_key(tunnel.private_key_file)
        try:
            record_tunnel(self.config.state_directory, tunnel.interface)
        except OSError as exc:  # only teardown needs it; retried with the next full pass
            log.warning("cannot record tunnel %s for teardown: %s", tunnel.interface, exc)
        peers = self.peers(target)
        changes = self.wireguard.ensure(
            WireGuardConfig(
                interface=tunnel.interface,
                private_key_path=tunnel.private_key_file,
                listen_port=tunnel.listen_port,
                peers=tuple(
                    Peer(
                        public_key=p.public_key,
                        allowed_ips=p.allowed_ips,
                        endpoint=p.endpoint,
                        persistent_keepalive=p.persistent_keepalive,
                    )
                    for p in peers
                ),
                addresses=(tunnel.address,),
                mtu=tunnel.mtu,
                # Replies to pods go back through the tunnel: route every peer's pod CIDRs.
                routes=tuple(net for peer in peers for net in peer.allowed_ips),
            )
        )
        self.drift(f"wireguard {tunnel.interface}", changes)

    def _ensure_sysctls(self, forwarding: bool) -> None:
        originals = sysctl_originals_path(self.config.state_directory)
        if not forwarding:
            changes = ensure_sysctls({"net.ipv4.ip_forward": "0",
                                      "net.ipv6.conf.all.forwarding": "0"}, originals=originals)
            if changes:
                journal_event("forwarding-off", f"forwarding switched off: table {TABLE_FAMILY} "
                              f"{TABLE_NAME} is not in place", Priority.ERR)
            self._forwarding = False
            return
        values = {
            # Replies to pods come back in through the tunnel from addresses routed elsewhere.
            f"net.ipv4.conf.{self.config.tunnel.interface}.rp_filter": "2",
            # The reverse-path check of traffic into the tunnel uses the table's GUARD_MARK,
            # so that the routing guard lets it pass (see forward_guard.py).
            "net.ipv4.conf.all.src_valid_mark": "1",
        }
        # A forwarding host ignores router advertisements unless accept_ra is 2: keep an
        # uplink that learns its IPv6 default route by SLAAC learning it (0 stays 0).
        accept_ra = f"net.ipv6.conf.{self.config.uplink}.accept_ra"
        if observe_sysctls([accept_ra])[accept_ra] == "1":
            values[accept_ra] = "2"
        changes = ensure_sysctls(values, originals=originals)
        changes += ensure_sysctls({"net.ipv4.ip_forward": "1",
                                   "net.ipv6.conf.all.forwarding": "1"}, originals=originals)
        self._forwarding = True
        self.drift("sysctl", changes)

    def _ensure_guard(self) -> None:
        self.drift("forward guard", ensure_forward_guard(self.config.tunnel.interface))

    def _ensure_table(self, plan: GatewayPlan) -> None:
        addresses = host_addresses()
        settings = GatewayTableSettings(
            tunnel_interface=self.config.tunnel.interface,
            uplink_interfaces=tuple(sorted(
                {self.config.uplink, *(p.interface for p in self.config.egress_ip_pools)}
            )),
            tunnel_mtu=self.config.tunnel.mtu,
            probe_port=PROBE_PORT,
            dedicated_egress_ips=self._dedicated_egress_ips(plan, addresses.others),
        )
        held = self.mode.table_egress_ips(plan, addresses.held)
        self._rendered = render_gateway_table(plan, settings, held=held, previous=self._rendered)
        result = self.nftables.ensure(self._rendered, verify=self.repairing)
        self._held_in_table = held
        if result.drift:
            self.drift(f"nftables table {TABLE_FAMILY} {TABLE_NAME}", result)


def run_agent(config_path: Path, metrics: MetricsSettings | None = None) -> int:
    return run_follower(GatewayAgent, config_path, metrics)
