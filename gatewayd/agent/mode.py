"""What differs between the agent's two modes: where the plan and the tunnel's peers come from,
who holds the provisioned egress IPs, and where the reports go. The daemon (`daemon.py`) is
one, and composes one of the two:

- `StandaloneGateway` (`standalone.py`): snapshot files, the config's peers, the plan's egress
  IPs; status.json and the journal.
- `AgentCluster` (`kubernetes.py`): the EgressGateway's spec and peers, egress IPs that follow
  the cloud nodes' probes, connection state shared with the other gateways; the EgressGateway's
  status and Lease as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from gatewayd.agent.config import TunnelPeer
from gatewayd.agent.target import GatewayTarget
from gatewayd.follower import PlanSource
from gatewayd.policy.model import GatewayPlan, IPAddress


@dataclass(frozen=True)
class EgressIPView:
    """The plan's egress IPs as this gateway sees them, for metrics and status."""

    expected: frozenset[IPAddress]  # those this gateway provisions for its plan
    held: frozenset[IPAddress]
    conflicts: frozenset[IPAddress]  # another host answers for them
    listed: tuple[str, ...]  # what status.json and the health line report


class GatewayMode(Protocol):
    name: str  # status.json's "mode"

    def plan_source(self) -> PlanSource[GatewayTarget]: ...

    def default_peers(self) -> tuple[TunnelPeer, ...]:
        """The tunnel's peers while the plan names none."""

    def start(self) -> None: ...

    def stop(self) -> None:
        """At the daemon's stop; the data plane stays."""

    def provision(self, target: GatewayTarget) -> None:
        """Follow the plan's egress IPs (before the table, which SNATs to them)."""

    def share_connections(self, target: GatewayTarget) -> None:
        """Share the SNATed flows with the gateways that may take them over (after the
        table)."""

    def table_egress_ips(
        self, plan: GatewayPlan, held: frozenset[IPAddress]
    ) -> frozenset[IPAddress]:
        """The plan's egress IPs the table may SNAT to now; `held`: the host's addresses."""

    def egress_ips_moved(self, target: GatewayTarget, in_table: frozenset[IPAddress]) -> bool:
        """Whether the table must follow egress IPs that moved without a new plan."""

    def egress_ips(self, plan: GatewayPlan | None) -> EgressIPView: ...

    def details(self) -> dict[str, Any]:
        """status.json's part of this mode."""

    def connection_changed(self) -> bool:
        """Whether what `details` reported of the cluster link changed since."""

    def publish(self) -> None:
        """Hand the status to the cluster, if there is one."""
