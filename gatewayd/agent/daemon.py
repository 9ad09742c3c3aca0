"""`gatewayd agent`: the gateway host daemon in standalone mode.

It follows this gateway's plan (SNAT rules, egress IPs) and keeps the WireGuard tunnel to the
cloud nodes up. Order within a pass: tunnel, sysctls, egress IPs, then the nftables table, so
an SNAT rule never points at an address that is not there yet.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from gatewayd.agent.config import AgentConfig, load_agent_config
from gatewayd.dataplane.addresses import AddressDriver
from gatewayd.dataplane.nft_render import GatewayTableSettings, render_gateway_table
from gatewayd.dataplane.nftables import NftablesDriver
from gatewayd.dataplane.sysctl import ensure_sysctls
from gatewayd.dataplane.wireguard import Peer, WireGuardConfig, WireGuardDriver
from gatewayd.dataplane.wireguard import generate_private_key as ensure_private_key
from gatewayd.follower import PlanFollower, run_follower
from gatewayd.policy.engine import EgressPlan
from gatewayd.policy.model import GatewayPlan, IPAddress
from gatewayd.policy.planio import gateway_plan_from_dict, gateway_plan_to_dict

log = logging.getLogger("gatewayd.agent")

TABLE_FAMILY, TABLE_NAME = "inet", "gatewayd"


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

    def plan_from(self, plan: EgressPlan, generation: int) -> GatewayPlan:
        mine = plan.gateway_plan(self.config.name)
        return GatewayPlan(gateway=mine.gateway, rules=mine.rules, generation=generation)

    def program(self, plan: GatewayPlan, errors: list[str]) -> None:
        self.step(errors, "wireguard", self._ensure_tunnel)
        self.step(errors, "sysctl", self._ensure_sysctls)
        self.step(errors, "egress IPs", lambda: self._ensure_egress_ips(plan))
        self.step(errors, "nftables", lambda: self._ensure_table(plan))

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
                addresses=(tunnel.address,) if tunnel.address else (),
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
        for interface, ips in sorted(wanted.items()):
            self.drift(f"egress IPs on {interface}", self.addresses.ensure(interface, ips))

    def _ensure_table(self, plan: GatewayPlan) -> None:
        settings = GatewayTableSettings(
            tunnel_interface=self.config.tunnel.interface,
            uplink_interfaces=tuple(sorted(
                {self.config.uplink, *(p.interface for p in self.config.egress_ip_pools)}
            )),
            tunnel_mtu=self.config.tunnel.mtu,
        )
        result = self.nftables.ensure(render_gateway_table(plan, settings))
        if result.drift:
            self.drift(f"nftables table {TABLE_FAMILY} {TABLE_NAME}", result)


def run_agent(config_path: Path) -> int:
    return run_follower(GatewayAgent, config_path)
