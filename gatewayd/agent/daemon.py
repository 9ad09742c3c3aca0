"""`gatewayd agent`: the gateway host daemon in standalone mode.

It follows this gateway's plan (SNAT rules, egress IPs) and keeps the WireGuard tunnel to the
cloud nodes up. Order within a pass: tunnel, sysctls, egress IPs, then the nftables table, so
an SNAT rule never points at an address that is not there yet.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from gatewayd.agent.config import AgentConfig, load_agent_config
from gatewayd.dataplane.addresses import AddressConflict, AddressDriver
from gatewayd.dataplane.nft_render import GatewayTableSettings, render_gateway_table
from gatewayd.dataplane.nftables import NftablesDriver
from gatewayd.dataplane.sysctl import ensure_sysctls
from gatewayd.dataplane.wireguard import Peer, WireGuardConfig, WireGuardDriver
from gatewayd.dataplane.wireguard import generate_private_key as ensure_private_key
from gatewayd.follower import PlanFollower, PlanSource, SnapshotSource, run_follower
from gatewayd.policy.engine import EgressPlan
from gatewayd.policy.model import GatewayPlan, IPAddress
from gatewayd.policy.planio import gateway_plan_from_dict, gateway_plan_to_dict
from gatewayd.systemd import Priority, journal_event

log = logging.getLogger("gatewayd.agent")

TABLE_FAMILY, TABLE_NAME = "inet", "gatewayd"
# WireGuard rejects a session 180 s after its handshake; a live peer re-handshakes before that.
PEER_UP_SECONDS = 180


class GatewayAgent(PlanFollower[AgentConfig, GatewayPlan]):
    role = "agent"
    load_config = staticmethod(load_agent_config)
    plan_to_dict = staticmethod(gateway_plan_to_dict)
    plan_from_dict = staticmethod(gateway_plan_from_dict)

    def __init__(self, config: AgentConfig) -> None:
        super().__init__(config)
        self.nftables = NftablesDriver(TABLE_FAMILY, TABLE_NAME)
        self.addresses = AddressDriver()
        self.wireguard = WireGuardDriver()
        self.peers_up: set[str] = set()  # names of tunnel peers with a recent handshake

    def make_source(self) -> PlanSource[GatewayPlan]:
        return SnapshotSource(self.config.snapshot, self.memory, self.plan_from)

    def plan_from(self, plan: EgressPlan, generation: int) -> GatewayPlan:
        mine = plan.gateway_plan(self.config.name)
        return GatewayPlan(gateway=mine.gateway, rules=mine.rules, generation=generation)

    def program(self, plan: GatewayPlan, errors: list[str]) -> None:
        if not self.host_settled():
            self.step(errors, "wireguard", self._ensure_tunnel)
            self.step(errors, "sysctl", self._ensure_sysctls)
        self.step(errors, "egress IPs", lambda: self._ensure_egress_ips(plan))
        self.step(errors, "nftables", lambda: self._ensure_table(plan))

    def repair(self) -> None:
        super().repair()
        self._check_peers()

    def health_summary(self) -> str:
        plan = self.applied
        policies = len({r.policy for r in plan.rules}) if plan else 0
        peers = f"{len(self.peers_up)}/{len(self.config.tunnel.peers)}"
        egress_ips = len(plan.egress_ips) if plan else 0
        return f"{policies} policies, {peers} peers up, {egress_ips} egress IPs"

    def _check_peers(self) -> None:
        """Record peers coming up or going down, judged by their latest handshake."""
        tunnel = self.config.tunnel
        state = self.wireguard.observe(tunnel.interface)
        handshakes = {p.public_key: p.latest_handshake or 0 for p in state.peers} if state else {}
        recent = time.time() - PEER_UP_SECONDS
        up = {p.name for p in tunnel.peers if handshakes.get(p.public_key, 0) > recent}
        for peer in tunnel.peers:
            if peer.name in up - self.peers_up:
                journal_event("peer-up", f"peer {peer.name} is up", Priority.NOTICE,
                              peer=peer.name, public_key=peer.public_key)
            elif peer.name in self.peers_up - up:
                journal_event("peer-down", f"peer {peer.name} is down: no handshake for "
                              f"{PEER_UP_SECONDS} s", Priority.WARNING,
                              peer=peer.name, public_key=peer.public_key)
        self.peers_up = up

    def status_details(self) -> dict[str, Any]:
        plan = self.applied
        return {
            "name": self.config.name,
            "policies": sorted({f"{r.policy} ({r.role.value})" for r in plan.rules})
            if plan else [],
            "egressIPs": sorted(str(ip) for ip in plan.egress_ips) if plan else [],
        }

    def _ensure_tunnel(self) -> None:
        tunnel = self.config.tunnel
        ensure_private_key(tunnel.private_key_file)
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
                    for p in tunnel.peers
                ),
                addresses=(tunnel.address,),
                mtu=tunnel.mtu,
                # Replies to pods go back through the tunnel: route every peer's pod CIDRs.
                routes=tuple(net for peer in tunnel.peers for net in peer.allowed_ips),
            )
        )
        self.drift(f"wireguard {tunnel.interface}", changes)

    def _ensure_sysctls(self) -> None:
        changes = ensure_sysctls({
            "net.ipv4.ip_forward": "1",
            "net.ipv6.conf.all.forwarding": "1",
            # Replies to pods come back in through the tunnel from addresses routed elsewhere.
            f"net.ipv4.conf.{self.config.tunnel.interface}.rp_filter": "2",
        })
        self.drift("sysctl", changes)

    def _ensure_egress_ips(self, plan: GatewayPlan) -> None:
        """Provision the plan's egress IPs that lie in our pools, on each pool's interface."""
        wanted: dict[str, set[IPAddress]] = defaultdict(set)
        for pool in self.config.egress_ip_pools:
            wanted[pool.interface]  # also an interface with none wanted: stale ones go
            for ip in plan.egress_ips:
                if ip.version == pool.cidr.version and ip in pool.cidr:
                    wanted[pool.interface].add(ip)
        conflicts: list[AddressConflict] = []
        for interface, ips in sorted(wanted.items()):
            changes = self.addresses.ensure(interface, ips)
            for ip in changes.added:
                journal_event("egress-ip-added", f"egress IP {ip} added on {interface}",
                              Priority.NOTICE, egress_ip=str(ip), interface=interface)
            for ip in changes.removed:
                journal_event("egress-ip-removed", f"egress IP {ip} removed from {interface}",
                              Priority.NOTICE, egress_ip=str(ip), interface=interface)
            self.drift(f"egress IPs on {interface}", changes)
            conflicts += changes.conflicts
        if conflicts:
            # The SNAT rules are still installed (the address may be freed later and is
            # retried); the gateway is not ready while another host answers for its IP.
            raise RuntimeError("; ".join(map(str, conflicts)))

    def _ensure_table(self, plan: GatewayPlan) -> None:
        settings = GatewayTableSettings(
            tunnel_interface=self.config.tunnel.interface,
            uplink_interfaces=tuple(sorted(
                {self.config.uplink, *(p.interface for p in self.config.egress_ip_pools)}
            )),
            tunnel_mtu=self.config.tunnel.mtu,
        )
        result = self.nftables.ensure(render_gateway_table(plan, settings),
                                       verify=self.repairing)
        if result.drift:
            self.drift(f"nftables table {TABLE_FAMILY} {TABLE_NAME}", result)


def run_agent(config_path: Path) -> int:
    return run_follower(GatewayAgent, config_path)
