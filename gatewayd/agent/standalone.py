"""The agent in standalone mode: the plan from snapshot files, the tunnel's peers from the
config, and the provisioned egress IPs are exactly the plan's. Reports go to status.json and
the journal only. Kubernetes mode is `kubernetes.py`'s `AgentCluster`; the daemon composes one
of the two (`daemon.py`)."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from gatewayd.agent.config import TunnelPeer
from gatewayd.agent.mode import EgressIPView
from gatewayd.agent.target import GatewayTarget
from gatewayd.dataplane.addresses import AddressConflict, AddressDriver, held_addresses
from gatewayd.follower import PlanSource, SnapshotSource
from gatewayd.policy.model import GatewayPlan, IPAddress
from gatewayd.systemd import Priority, journal_event

if TYPE_CHECKING:
    from gatewayd.agent.daemon import GatewayAgent


class StandaloneGateway:
    """The standalone mode of `GatewayMode` (mode.py)."""

    name = "standalone"

    def __init__(self, agent: GatewayAgent) -> None:
        self.agent = agent
        self.addresses = AddressDriver()
        self.conflicts: frozenset[IPAddress] = frozenset()  # another host answers for them

    def plan_source(self) -> PlanSource[GatewayTarget]:
        agent = self.agent
        return SnapshotSource(agent.config.snapshot, agent.memory, agent.plan_from,
                              agent.same_content)

    def default_peers(self) -> tuple[TunnelPeer, ...]:
        return self.agent.config.tunnel.peers

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def provision(self, target: GatewayTarget) -> None:
        """The plan's egress IPs that lie in our pools, on each pool's interface."""
        wanted: dict[str, set[IPAddress]] = defaultdict(set)
        for pool in self.agent.config.egress_ip_pools:
            wanted[pool.interface]  # also an interface with none wanted: stale ones go
            for ip in target.plan.egress_ips:
                if ip.version == pool.cidr.version and ip in pool.cidr:
                    wanted[pool.interface].add(ip)
        conflicts: list[AddressConflict] = []
        self.conflicts = frozenset()
        for interface, ips in sorted(wanted.items()):
            changes = self.addresses.ensure(interface, ips)
            for ip in changes.added:
                journal_event("egress-ip-added", f"egress IP {ip} added on {interface}",
                              Priority.NOTICE, egress_ip=str(ip), interface=interface)
            for ip in changes.removed:
                journal_event("egress-ip-removed", f"egress IP {ip} removed from {interface}",
                              Priority.NOTICE, egress_ip=str(ip), interface=interface)
            self.agent.drift(f"egress IPs on {interface}", changes)
            conflicts += changes.conflicts
        if conflicts:
            self.conflicts = frozenset(c.address for c in conflicts)
            # The SNAT rules are still installed (the address may be freed later and is
            # retried); the gateway is not ready while another host answers for its IP.
            raise RuntimeError("; ".join(map(str, conflicts)))

    def share_connections(self, target: GatewayTarget) -> None:
        pass  # no standby takes a standalone gateway's connections over

    def table_egress_ips(
        self, plan: GatewayPlan, held: frozenset[IPAddress]
    ) -> frozenset[IPAddress]:
        """Those the host holds."""
        return held & {rule.egress_ip for rule in plan.rules}

    def egress_ips_moved(self, target: GatewayTarget, in_table: frozenset[IPAddress]) -> bool:
        return False  # they change only with the plan

    def egress_ips(self, plan: GatewayPlan | None) -> EgressIPView:
        expected = frozenset(plan.egress_ips) if plan else frozenset()
        held = self.table_egress_ips(plan, held_addresses()) if plan else frozenset()
        return EgressIPView(expected, held, self.conflicts,
                            listed=tuple(sorted(map(str, expected))))

    def details(self) -> dict[str, Any]:
        return {}

    def connection_changed(self) -> bool:
        return False

    def publish(self) -> None:
        pass
