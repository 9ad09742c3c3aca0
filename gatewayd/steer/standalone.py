"""steer in standalone mode: the plan from snapshot files, the tunnels to the config's
gateways; traffic moves only with a new plan. Reports go to status.json and the journal only.
Kubernetes mode is `cluster_node.py`; the daemon composes one of the two (`daemon.py`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gatewayd.follower import PlanSource, SnapshotSource
from gatewayd.policy.model import SteerRule
from gatewayd.probe import Failover, Steering
from gatewayd.steer.config import GatewayTunnelEnd
from gatewayd.steer.target import NodeTarget

if TYPE_CHECKING:
    from gatewayd.steer.daemon import SteerAgent


class StandaloneNode:
    """The standalone mode of `NodeMode` (mode.py)."""

    name = "standalone"

    def __init__(self, steer: SteerAgent) -> None:
        self.steer = steer

    def plan_source(self) -> PlanSource[NodeTarget]:
        steer = self.steer
        return SnapshotSource(steer.config.snapshot, steer.memory, steer.plan_from,
                              steer.same_content)

    def default_ends(self) -> tuple[GatewayTunnelEnd, ...]:
        return self.steer.config.gateways

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def steering(
        self, target: NodeTarget, ends: tuple[GatewayTunnelEnd, ...],
        rules: tuple[SteerRule, ...],
    ) -> Steering:
        return Steering()

    def steered(self, rules: tuple[SteerRule, ...], steering: Steering) -> None:
        pass

    def repair(self) -> None:
        pass

    def reachable(self) -> dict[str, bool | None]:
        return {}

    def failovers_in_force(self) -> tuple[Failover, ...]:
        return ()

    def publish(self) -> None:
        pass
