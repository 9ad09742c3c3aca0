"""What differs between steer's two modes: where the plan and the gateways come from, whether
the node moves traffic by itself, and where the reports go. The daemon (`daemon.py`) is one,
and composes one of the two:

- `StandaloneNode` (`standalone.py`): snapshot files and the config's gateways; nothing moves
  but by a new plan; status.json and the journal.
- `ClusterNode` (`cluster_node.py`): the EgressNode's spec (gateways, tunnel address), the fast
  failover path (probes through every tunnel, failovers, established connections that follow
  their policy), and the EgressNode's status and Events.
"""

from __future__ import annotations

from typing import Protocol

from gatewayd.follower import PlanSource
from gatewayd.policy.model import SteerRule
from gatewayd.probe import Failover, Steering
from gatewayd.steer.config import GatewayTunnelEnd
from gatewayd.steer.target import NodeTarget


class NodeMode(Protocol):
    name: str  # status.json's "mode"

    def plan_source(self) -> PlanSource[NodeTarget]: ...

    def default_ends(self) -> tuple[GatewayTunnelEnd, ...]:
        """The gateways to keep tunnels to while the plan names none."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def steering(
        self, target: NodeTarget, ends: tuple[GatewayTunnelEnd, ...],
        rules: tuple[SteerRule, ...],
    ) -> Steering:
        """Take a new plan in; the failovers and handovers in force with it."""

    def steered(self, rules: tuple[SteerRule, ...], steering: Steering) -> None:
        """After the table changed: report the failovers, move connections with them."""

    def repair(self) -> None: ...

    def reachable(self) -> dict[str, bool | None]:
        """Each gateway's health as the probes see it (empty: not probed)."""

    def failovers_in_force(self) -> tuple[Failover, ...]: ...

    def publish(self) -> None:
        """Hand the status to the cluster, if there is one."""
