"""What a change of steering does to the connections the node tracks already: steer's job
beside programming the data plane and probing the gateways.

- A policy whose new connections left a gateway (a failover, or the controller's plan): that
  gateway's unanswered connections start over (`forget_unanswered`). A handshake under way
  keeps its conntrack mark, and so does a client that reuses its port while the entry lives
  (2 minutes for an unanswered SYN): both would go on into the gateway the policy left, whose
  replies no longer come back here.
- Established connections go where their policy's new connections go when the gateway they
  are on is down or no longer serves the policy (`Steering.follows`; the gateways share
  connection state, so the new one continues them). The steer table's rules move each one
  with its next packet, in the same transaction as the failover; here their conntrack marks
  are rewritten too (`move_answered`), once per follow while it holds, for the idle ones,
  whose next packet may come after those rules are gone.

Both run in threads of their own: a gateway's many conntrack entries take a while to read, and
the caller may be the fast failover's thread, which must not keep the probes waiting. A move
never waits, and a cleanup waits for the moves under way (in parallel they only slowed each
other down), while an unanswered connection's next packet is steered by the rules of now
anyway. They keep the raised priority of the failover's thread that starts them. Tried at
the daemon's own, a move of 3 connections took 0.8 s in the lab, a handover ended 0.3 s late
meanwhile and 8 requests went to a gateway that had given its egress IP up: most likely the
move's thread held the interpreter lock while the host kept it off the CPU, and the probe
thread and the table changes waited behind it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from gatewayd.policy.model import ConnectionFollow, SteerAction, SteerRule
from gatewayd.steer.config import GatewayTunnelEnd
from gatewayd.steer.conntrack import MarkMove, forget_unanswered, move_answered

log = logging.getLogger("gatewayd.steer")


class ConnectionFollower:
    def __init__(self, mark_mask: int) -> None:
        self.mark_mask = mark_mask
        self._steered: dict[str, set[str]] = {}  # policy -> gateways its rules tunnel to now
        self._marks: dict[str, int] = {}  # gateway -> fwmark, as last programmed
        # the follows whose established connections were moved, while they hold
        self._followed: frozenset[ConnectionFollow] = frozenset()
        self._moving = 0  # moves under way, under `_moves_done`
        self._moves_done = threading.Condition()

    def steering_changed(self, rules: Iterable[SteerRule],
                         ends: tuple[GatewayTunnelEnd, ...]) -> None:
        """After the table changed to `rules` (failovers applied): forget the unanswered
        connections of each gateway a policy left."""
        steered: dict[str, set[str]] = {}
        for rule in rules:
            if rule.action is SteerAction.TUNNEL and rule.gateway is not None:
                steered.setdefault(rule.policy, set()).add(rule.gateway)
        left = {g for policy, before in self._steered.items()
                for g in before - steered.get(policy, set())}
        now_marks = {e.name: e.mark for e in ends}
        marks = {**self._marks, **now_marks}  # a departed gateway's mark too
        self._steered, self._marks = steered, now_marks
        forget = sorted(marks[g] for g in left if g in marks)
        if forget:
            threading.Thread(target=self._forget_unanswered, args=(forget,),
                             name="forget-unanswered", daemon=True).start()

    def follow_policies(
        self,
        rules: tuple[SteerRule, ...],
        follows: frozenset[ConnectionFollow],
        ends: tuple[GatewayTunnelEnd, ...],
    ) -> None:
        """Move the established connections of `follows`, for the `rules` as steered now
        (failovers applied), once each."""
        marks = {e.name: e.mark for e in ends}
        new = follows - self._followed
        self._followed = follows
        moves = [
            MarkMove(marks[gone], marks[rule.gateway], rule.sources, rule.destinations)
            for gone, policy, to in sorted(new)
            if gone in marks and to in marks
            for rule in rules
            if rule.policy == policy and rule.gateway == to
            and rule.action is SteerAction.TUNNEL
        ]
        if moves:
            with self._moves_done:
                self._moving += 1  # before the thread runs: a cleanup started next waits
            threading.Thread(target=self._move_connections, args=(moves,),
                             name="follow-policies", daemon=True).start()

    def _move_connections(self, moves: list[MarkMove]) -> None:
        try:
            moved = move_answered(moves, self.mark_mask)
        except Exception:
            log.exception("moving established connections to the standby failed")
            return
        finally:
            with self._moves_done:
                self._moving -= 1
                self._moves_done.notify_all()
        if moved:
            log.info("%d established connections follow their policy to the standby", moved)

    def _forget_unanswered(self, marks: list[int]) -> None:
        for mark in marks:
            with self._moves_done:
                self._moves_done.wait_for(lambda: self._moving == 0)
            try:
                forgotten = forget_unanswered(mark, self.mark_mask)
            except Exception:
                log.exception("forgetting unanswered connections marked %#x failed", mark)
                continue
            if forgotten:
                log.info("%d unanswered connections marked %#x start over", forgotten, mark)
