"""steer in Kubernetes mode: the EgressNode (`kubernetes.py`: spec, status, Events) and the fast
failover path (`failover.py`: probes through every tunnel, and the failovers they decide), wired
into the daemon's data plane.

- A gateway's health changes on the probes' thread: the failovers are decided again, the
  established connections of a policy that moved follow it (`connections.py`), and the table
  is changed at once, not at the next pass.
- Failovers are reported when they start and end, in the journal and as Events.
- A gateway that does not answer gets a new WireGuard session every few seconds: it may have
  restarted and lost its own.

The standalone mode is `standalone.py`; the daemon composes one of the two (`daemon.py`).
"""

from __future__ import annotations

import logging
import time
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from gatewayd.dataplane.probe import ProbeTarget
from gatewayd.dataplane.wireguard import generate_private_key as ensure_private_key
from gatewayd.follower import PlanSource
from gatewayd.policy.model import SteerRule
from gatewayd.probe import (
    GATEWAY_TUNNEL_ADDRESS,
    PROBE_PORT,
    Failover,
    Steering,
    effective_rules,
)
from gatewayd.runtime import rfc3339
from gatewayd.steer.config import GatewayTunnelEnd
from gatewayd.steer.failover import FastFailover
from gatewayd.steer.kubernetes import NodeState, SteerCluster, node_status
from gatewayd.steer.target import NodeTarget
from gatewayd.systemd import Priority, journal_event

if TYPE_CHECKING:
    from gatewayd.steer.daemon import SteerAgent

log = logging.getLogger("gatewayd.steer")

# How often the WireGuard session with a gateway that does not answer probes is renewed.
REHANDSHAKE_SECONDS = 5.0


class ClusterNode:
    """The Kubernetes mode of `NodeMode` (mode.py)."""

    name = "kubernetes"

    def __init__(self, steer: SteerAgent) -> None:
        config = steer.config
        self.steer = steer
        self.cluster = SteerCluster(config)
        self.failover = FastFailover(config.node, config.failover, self._probes_changed)
        self._rehandshaken: dict[str, float] = {}  # gateway -> when its session was dropped
        self._reported = Steering()

    def plan_source(self) -> PlanSource[NodeTarget]:
        return self.cluster.source  # Kubernetes settings are read at start only

    def default_ends(self) -> tuple[GatewayTunnelEnd, ...]:
        return ()

    def start(self) -> None:
        self.cluster.start()
        self.failover.start()

    def stop(self) -> None:
        self.failover.stop()
        self.cluster.stop()

    def reachable(self) -> dict[str, bool | None]:
        return self.failover.reachable()

    def failovers_in_force(self) -> tuple[Failover, ...]:
        return tuple(self.failover.failovers.values())

    def steering(
        self, target: NodeTarget, ends: tuple[GatewayTunnelEnd, ...],
        rules: tuple[SteerRule, ...],
    ) -> Steering:
        """Hand the new plan to the fast failover path; the failovers and handovers in force
        with it."""
        source = None
        if target.tunnel_address is not None:
            source = IPv4Address(target.tunnel_address.split("/")[0])
        self.failover.set_plan(rules, [
            ProbeTarget(e.name, e.mark, GATEWAY_TUNNEL_ADDRESS, PROBE_PORT) for e in ends
        ], source)
        steering, _ = self.failover.take()
        return steering

    def steered(self, rules: tuple[SteerRule, ...], steering: Steering) -> None:
        self._report(steering)
        self._follow_policies(rules, steering)

    def repair(self) -> None:
        """A gateway that does not answer may have restarted and lost its WireGuard session:
        it cannot always start a new one itself (it may not know this node's port for it),
        and this node would only after 15 s of silence. Re-adding the peer drops the stale
        session, so the next probe starts a handshake at once."""
        now = time.monotonic()
        reachable = self.failover.reachable()
        steer = self.steer
        for end in steer.ends:
            if reachable.get(end.name) is not False:
                self._rehandshaken.pop(end.name, None)
                continue
            if now - self._rehandshaken.get(end.name, 0.0) < REHANDSHAKE_SECONDS:
                continue
            self._rehandshaken[end.name] = now
            with steer.dataplane:
                try:
                    steer.wireguard.ensure(steer.tunnel_config(end, with_peer=False))
                    steer.wireguard.ensure(steer.tunnel_config(end))
                except Exception as exc:
                    log.warning("new handshake with %s: %s", end.name, exc)

    def publish(self) -> None:
        steer = self.steer
        target = steer.target
        if steer.public_key is None:
            try:
                steer.public_key = ensure_private_key(steer.config.private_key_file)
            except Exception as exc:
                log.warning("no public key yet: %s", exc)
        state = NodeState(
            public_key=steer.public_key,
            address=steer.config.advertise_address or steer.default_address(),
            listen_port=steer.config.listen_port,
            tunnels=steer.ends,
            generation=steer.status.generation,
            ready=steer.status.ready and steer.applied is not None,
            errors=steer.errors,
            last_error=steer.status.last_error,
            reachable=self.failover.reachable(),
            failovers=tuple(self.failover.failovers.values()),
            probing=target is not None and target.tunnel_address is not None,
        )
        self.cluster.reporter.publish(
            node_status(state, self.cluster.previous_status(), rfc3339())
        )

    def _probes_changed(self) -> None:
        """A gateway's health changed (the fast failover's thread): decide again and, if the
        failovers changed, change the table at once."""
        steer = self.steer
        with steer.steering:
            target = steer.steered_target
            if target is None:
                return
            steering, changed = self.failover.take()
            rules = steer.steerable(target.plan, steer.ends)
            if changed:
                try:
                    steer.ensure_table(target.plan, rules, steer.ends, steering)
                except Exception:
                    log.exception("re-rendering the steer table for a failover failed; the "
                                  "repair pass retries")
            # After the table, whose rules moved the connections that send: the listing
            # moves the idle ones too, which may next send after those rules are gone.
            self._follow_policies(rules, steering)
            if changed:
                self._report(steering)
        self.publish()

    def _report(self, steering: Steering) -> None:
        """After the table changed: new and ended failovers are reported (journal and
        Events), and handovers (journal)."""
        before = self._reported
        if steering == before:
            return
        leaving = self.failover.leaving()
        for key, failover in steering.failovers.items():
            if key not in before.failovers:
                why = ("is stopping" if failover.gateway in leaving
                       else "does not answer probes through its tunnel")
                message = (f"policy {failover.policy}: gateway {failover.gateway} {why}; new "
                           f"connections go to the standby {failover.standby}")
                journal_event("failover", message, Priority.WARNING, policy=failover.policy,
                              gateway=failover.gateway, standby=failover.standby)
                self.cluster.reporter.event("FastFailover", message, warning=True)
        for key, failover in before.failovers.items():
            if key not in steering.failovers:
                message = (f"policy {failover.policy}: failover from {failover.gateway} to "
                           f"{failover.standby} ended; the rule follows the plan again")
                journal_event("failover-ended", message, Priority.NOTICE,
                              policy=failover.policy, gateway=failover.gateway)
                self.cluster.reporter.event("FailoverEnded", message)
        for policy, handover in steering.handovers.items():
            if before.handovers.get(policy) != handover:
                journal_event(
                    "handover", f"policy {policy}: moves to {handover.gateway}, which does not "
                    f"serve it yet; new connections stay on {handover.previous} until it does",
                    Priority.NOTICE, policy=policy, gateway=handover.gateway,
                    previous=handover.previous)
        for policy, handover in before.handovers.items():
            if policy not in steering.handovers:
                journal_event(
                    "handover-ended", f"policy {policy}: new connections leave "
                    f"{handover.previous} for {handover.gateway}", Priority.NOTICE,
                    policy=policy, gateway=handover.gateway, previous=handover.previous)
        self._reported = steering

    def _follow_policies(self, rules: tuple[SteerRule, ...], steering: Steering) -> None:
        """Established connections follow their policy (see `ConnectionFollower`)."""
        self.steer.connections.follow_policies(
            effective_rules(rules, steering), steering.follows, self.steer.ends)
