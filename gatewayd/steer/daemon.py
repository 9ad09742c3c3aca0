"""`gatewayd steer`: the cloud-node daemon in standalone mode.

It keeps one WireGuard interface per gateway, one routing table per gateway (selected by
fwmark), and the `inet gatewayd-steer` table that marks new connections from local pods to
their policy's destinations (or drops them when the plan says so).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from gatewayd.dataplane.nft_render import SteerTableSettings, render_steer_table
from gatewayd.dataplane.nftables import NftablesDriver
from gatewayd.dataplane.routing import PolicyRoutingDriver
from gatewayd.dataplane.sysctl import ensure_sysctls
from gatewayd.dataplane.wireguard import Peer, WireGuardConfig, WireGuardDriver
from gatewayd.dataplane.wireguard import generate_private_key as ensure_private_key
from gatewayd.follower import PlanFollower, PlanSource, SnapshotSource, run_follower
from gatewayd.policy.engine import EgressPlan
from gatewayd.policy.model import NodePlan, SteerAction
from gatewayd.policy.planio import node_plan_from_dict, node_plan_to_dict
from gatewayd.steer.config import GatewayTunnelEnd, SteerConfig, load_steer_config

log = logging.getLogger("gatewayd.steer")

TABLE_FAMILY, TABLE_NAME = "inet", "gatewayd-steer"
# Through a gateway tunnel any destination may be reached, and any source may reply.
EVERYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


class SteerAgent(PlanFollower[SteerConfig, NodePlan]):
    role = "steer"
    load_config = staticmethod(load_steer_config)
    plan_to_dict = staticmethod(node_plan_to_dict)
    plan_from_dict = staticmethod(node_plan_from_dict)

    def __init__(self, config: SteerConfig) -> None:
        super().__init__(config)
        self.nftables = NftablesDriver(TABLE_FAMILY, TABLE_NAME)
        self.routing = PolicyRoutingDriver(mark_mask=config.mark_mask)
        self.wireguard = WireGuardDriver()

    def make_source(self) -> PlanSource[NodePlan]:
        return SnapshotSource(self.config.snapshot, self.memory, self.plan_from)

    def plan_from(self, plan: EgressPlan, generation: int) -> NodePlan:
        mine = plan.node_plan(self.config.node)
        return NodePlan(
            node=mine.node,
            rules=tuple(self._without_unknown_gateways(mine)),
            cluster_internal=mine.cluster_internal,
            generation=generation,
        )

    def _without_unknown_gateways(self, plan: NodePlan) -> list[Any]:
        """A rule for a gateway this node has no tunnel to cannot be steered: drop its traffic
        (as Cilium does when no gateway is found) rather than let it leave with the node IP."""
        known = {g.name for g in self.config.gateways}
        rules = []
        for rule in plan.rules:
            if rule.action is SteerAction.TUNNEL and rule.gateway not in known:
                log.error("policy %s uses gateway %s, which is not in this node's config; "
                          "dropping its traffic", rule.policy, rule.gateway)
                rule = replace(rule, action=SteerAction.DROP, gateway=None, standby=None)
            elif rule.standby is not None and rule.standby not in known:
                rule = replace(rule, standby=None)
            rules.append(rule)
        return rules

    def program(self, plan: NodePlan, errors: list[str]) -> None:
        if not self.host_settled():
            for gateway in self.config.gateways:
                self.step(errors, f"wireguard {gateway.interface}",
                          functools.partial(self._ensure_tunnel, gateway))
            self.step(errors, "sysctl", self._ensure_sysctls)
            self.step(errors, "policy routing", self._ensure_routing)
        self.step(errors, "nftables", lambda: self._ensure_table(plan))

    def status_details(self) -> dict[str, Any]:
        plan = self.applied
        return {
            "node": self.config.node,
            "policies": sorted({r.policy for r in plan.rules}) if plan else [],
            "gateways": [g.name for g in self.config.gateways],
        }

    def _ensure_tunnel(self, gateway: GatewayTunnelEnd) -> None:
        ensure_private_key(self.config.private_key_file)
        changes = self.wireguard.ensure(
            WireGuardConfig(
                interface=gateway.interface,
                private_key_path=self.config.private_key_file,
                listen_port=gateway.listen_port,
                peers=(
                    Peer(
                        public_key=gateway.public_key,
                        allowed_ips=EVERYWHERE,
                        endpoint=gateway.endpoint,
                        persistent_keepalive=gateway.persistent_keepalive,
                    ),
                ),
                addresses=(gateway.address,),
                mtu=self.config.mtu,
            )
        )
        self.drift(f"wireguard {gateway.interface}", changes)

    def _ensure_sysctls(self) -> None:
        values = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
        for gateway in self.config.gateways:
            # Replies from the world arrive on the tunnel: only a loose check accepts them.
            values[f"net.ipv4.conf.{gateway.interface}.rp_filter"] = "2"
        self.drift("sysctl", ensure_sysctls(values))

    def _ensure_routing(self) -> None:
        changes = self.routing.ensure(
            {g.mark: (g.table, g.interface) for g in self.config.gateways}
        )
        self.drift("policy routing", changes)

    def _ensure_table(self, plan: NodePlan) -> None:
        settings = SteerTableSettings(
            gateway_marks={g.name: g.mark for g in self.config.gateways},
            tunnel_interfaces={g.name: g.interface for g in self.config.gateways},
            mark_mask=self.config.mark_mask,
        )
        result = self.nftables.ensure(render_steer_table(plan, settings),
                                       verify=self.repairing)
        if result.drift:
            self.drift(f"nftables table {TABLE_FAMILY} {TABLE_NAME}", result)


def run_steer(config_path: Path) -> int:
    return run_follower(SteerAgent, config_path)
