"""Kubernetes mode: steer's fast failover, without an API round trip.

A thread probes every gateway through its tunnel every `probeIntervalSeconds` (see
`gatewayd.probe` for the message and the rules). A probe is a miss when no answer, to it or to
one of the `misses - 1` probes before it, arrives before the next one is sent; each probe gets
a full interval, even when the thread itself was late. When a gateway's health or what it
serves changes, the thread decides the failovers again (`decide_failovers`) and, if they
changed, a second thread has the daemon re-render its nftables table with each failed-over
rule sent to its standby: one transaction, for new connections; the daemon then gives the
rule's answered
connections the standby's conntrack mark (`gatewayd.steer.conntrack`). The daemon reports each
change in its EgressNode status and as an Event.

A gateway whose answers say it is leaving (its agent is stopping) fails over like one that
is down, but makes before it breaks: while it still serves a policy and the standby does not
yet, the policy's new connections stay with it (`decide_handovers`). The same holds when the
controller's plan moves a policy between two working gateways.

A decision that changes the failovers or handovers sends the current round of probes again at
once, with what this node now sends where: the standby starts claiming the egress IP, and the
gateway left behind gives it up, without waiting for the next interval (up to one interval of
every failover's outage) nor for the table. The round's sequence number stays, so no probe
loses its interval.

The probes never wait for the table: the daemon applies a change under the lock its loop holds
while it changes the table, and a gateway that gets no probes for `egressIPHoldSeconds` gives
up its egress IPs, even the healthy standby the change just sent traffic to.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from ipaddress import IPv4Address

from gatewayd import metrics
from gatewayd.dataplane.priority import raise_priority
from gatewayd.dataplane.probe import ProbeSockets, ProbeTarget
from gatewayd.policy.model import SteerRule
from gatewayd.probe import (
    Failover,
    FailoverKey,
    ProbeFormatError,
    ProbeHistory,
    ProbeReply,
    Steering,
    answers_probe,
    connection_follows,
    decide_failovers,
    decide_handovers,
    decode_reply,
    effective_rules,
    encode_request,
    policy_gateways,
    probe_requests,
)
from gatewayd.runtime import rfc3339
from gatewayd.steer.config import FailoverSettings

log = logging.getLogger("gatewayd.steer")

# Before a gateway ever answered (tunnels coming up at start), this many intervals pass
# before it counts as down.
FIRST_MISSES_FACTOR = 10


class FastFailover:
    def __init__(
        self, node: str, settings: FailoverSettings, on_change: Callable[[], None]
    ) -> None:
        self.node = node
        self.settings = settings
        self._on_change = on_change
        self._lock = threading.Lock()
        self._rules: tuple[SteerRule, ...] = ()
        self._targets: tuple[ProbeTarget, ...] = ()
        self._source: IPv4Address | None = None
        self._history: dict[str, ProbeHistory] = {}
        self._steering = Steering()
        self._taken = Steering()  # what the daemon last took for its table
        self._sent_to: dict[str, str] = {}  # policy -> its new connections' gateway, as decided
        self._sequence = 0
        self._stopping = threading.Event()
        self._changed = threading.Event()
        # Written to send the round of probes again now; None once stopped (under the lock).
        self._wake: int | None = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="fast-failover", daemon=True)
        self._applier = threading.Thread(target=self._apply_changes,
                                         name="fast-failover-apply", daemon=True)

    # --- for the daemon (any thread) -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._applier.start()

    def stop(self) -> None:
        self._stopping.set()
        self._changed.set()
        with self._lock:
            wake, self._wake = self._wake, None
        if wake is not None:
            os.eventfd_write(wake, 1)
        self._thread.join(2)
        self._applier.join(2)
        if wake is not None and not self._thread.is_alive():
            os.close(wake)

    def set_plan(
        self,
        rules: tuple[SteerRule, ...],
        targets: Collection[ProbeTarget],
        source: IPv4Address | None,
    ) -> None:
        """The rules in force, where each gateway's probes go, and the node's tunnel address
        (None: not assigned yet, no probes)."""
        with self._lock:
            self._rules = rules
            self._targets = tuple(sorted(targets, key=lambda t: t.gateway))
            self._source = source
            for gateway in set(self._history) - {t.gateway for t in targets}:
                del self._history[gateway]

    def decide(self) -> tuple[Steering, bool]:
        """Decide the failovers and handovers again, and whether they changed since the last
        decision; when they did, the current round of probes goes again at once, with where
        this node now sends what."""
        now, grace = time.monotonic(), self.settings.claim_grace_seconds
        with self._lock:
            history = self._history
            serving = {g: h.serving for g, h in history.items()}
            failovers = decide_failovers(
                self._rules, {g: h.available for g, h in history.items()}, serving,
                self._steering.failovers, now, grace, at=rfc3339(),
            )
            moved_to = policy_gateways(effective_rules(self._rules, Steering(failovers)))
            handovers = decide_handovers(
                moved_to, self._sent_to, {g: h.up for g, h in history.items()}, serving,
                self._steering.handovers, now, grace,
            )
            up = self._reachable()
            follows = connection_follows(
                effective_rules(self._rules, Steering(failovers, handovers)), up, serving,
                frozenset(up))
            decided = Steering(failovers, handovers, follows)
            changed = decided != self._steering
            if changed and self._wake is not None:
                os.eventfd_write(self._wake, 1)
            self._steering = decided
            self._sent_to = {p: handovers[p].previous if p in handovers else gateway
                             for p, gateway in moved_to.items()}
        return decided, changed

    def take(self) -> tuple[Steering, bool]:
        """For the table: the steering decided now, and whether it changed since the last
        `take`."""
        decided, _ = self.decide()
        with self._lock:
            changed, self._taken = decided != self._taken, decided
        return decided, changed

    @property
    def failovers(self) -> dict[FailoverKey, Failover]:
        with self._lock:
            return dict(self._steering.failovers)

    def leaving(self) -> frozenset[str]:
        """The gateways whose last answer said they are leaving."""
        with self._lock:
            return frozenset(g for g, h in self._history.items() if h.up and h.leaving)

    def reachable(self) -> dict[str, bool | None]:
        """Each probed gateway's health: True (up), False (down), None (not known yet)."""
        with self._lock:
            return self._reachable()

    def _reachable(self) -> dict[str, bool | None]:
        """`reachable`, under the lock."""
        return {t.gateway: self._history[t.gateway].up if t.gateway in self._history
                else None for t in self._targets}

    def serving(self) -> dict[str, frozenset[str]]:
        """Of this node's policies, those each gateway said it serves in its last reply."""
        with self._lock:
            return {g: h.serving for g, h in self._history.items()}

    # --- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        # Each round waits for the thread: a thread kept off the CPU counts misses late.
        raise_priority(threading.get_native_id(), "the probe thread")
        sockets: ProbeSockets | None = None
        interval = self.settings.probe_interval_seconds
        next_send = time.monotonic()
        try:
            while not self._stopping.is_set():
                with self._lock:
                    source, targets = self._source, self._targets
                if source is None or not targets:
                    if sockets is not None:
                        sockets.close()
                        sockets = None
                    self._stopping.wait(interval)
                    continue
                if sockets is None or sockets.source != source:
                    if sockets is not None:
                        sockets.close()
                    sockets = ProbeSockets(source)
                try:
                    sockets.update(targets)
                except OSError as exc:
                    log.warning("probe sockets: %s; retrying", exc)
                    self._stopping.wait(1.0)
                    continue
                next_send = max(next_send + interval, time.monotonic() + interval)
                replies = self._probe_once(sockets, next_send)
                if self._record(replies, {t.gateway for t in targets}):
                    self._news()
                elif self._handing_over():
                    # A handover also ends when its grace is over, with nothing heard.
                    _, changed = self.decide()
                    if changed:
                        self._changed.set()
        except Exception:
            log.exception("fast failover stopped working; failovers wait for the controller")
        finally:
            if sockets is not None:
                sockets.close()

    def _apply_changes(self) -> None:
        """The daemon's `on_change`, once for any number of changes that came while it ran."""
        # New connections go to the failed gateway until the table changes.
        raise_priority(threading.get_native_id(), "the failover's table changes")
        while True:
            self._changed.wait()
            if self._stopping.is_set():
                return
            self._changed.clear()
            try:
                self._on_change()
            except Exception:
                log.exception("applying a probe change failed; the next change or the "
                              "daemon's repair pass retries")

    def _probe_once(self, sockets: ProbeSockets, until: float) -> dict[str, ProbeReply]:
        """Send one probe to every gateway, and again whenever the failovers change; the
        replies that come back before `until`."""
        with self._lock:
            self._sequence += 1
            sequence, wake = self._sequence, self._wake
        self._send(sockets, sequence)
        replies: dict[str, ProbeReply] = {}
        while (left := until - time.monotonic()) > 0 and not self._stopping.is_set():
            received, woken = sockets.receive(left, wake)
            if woken:
                self._send(sockets, sequence)
            for gateway, data in received:
                try:
                    reply = decode_reply(data)
                except ProbeFormatError:
                    continue
                if answers_probe(reply, gateway, sequence, self.settings.misses):
                    replies[gateway] = reply  # the latest says best what it serves
                    self._note_news(gateway, reply)
        return replies

    def _send(self, sockets: ProbeSockets, sequence: int) -> None:
        with self._lock:
            requests = probe_requests(self.node, sockets.gateways, self._rules,
                                      self._steering.failovers, sequence)
        sockets.send({gateway: encode_request(r) for gateway, r in requests.items()})

    def _note_news(self, gateway: str, reply: ProbeReply) -> None:
        """An answer that changes what an up gateway serves, or whether it leaves, counts at
        once, not at the end of the round: a handover waits for the new gateway to serve."""
        with self._lock:
            history = self._history.get(gateway)
            if history is None or history.up is not True or not history.hear(reply):
                return
        self._news()

    def _news(self) -> None:
        """Decide here, so that the gateways hear of a move at once (the probes go again),
        and have the daemon change its table (it may be in the middle of a pass)."""
        self.decide()
        self._changed.set()

    def _record(self, replies: dict[str, ProbeReply], gateways: set[str]) -> bool:
        """Count each gateway's outcome; True when a health, a `serving` set or `leaving`
        changed."""
        changed = False
        with self._lock:
            for gateway in sorted(gateways):
                history = self._history.setdefault(gateway, ProbeHistory(
                    misses=self.settings.misses,
                    recoveries=self.settings.recoveries,
                    first_misses=self.settings.misses * FIRST_MISSES_FACTOR,
                ))
                said = history.serving, history.leaving
                metrics.PROBES.labels(gateway).inc()
                if gateway not in replies:
                    metrics.PROBES_LOST.labels(gateway).inc()
                if history.record(replies.get(gateway)):
                    log.info("gateway %s is %s (probes through its tunnel)", gateway,
                             "up" if history.up else "DOWN")
                    changed = True
                changed = changed or (history.serving, history.leaving) != said
        return changed

    def _handing_over(self) -> bool:
        with self._lock:
            return bool(self._steering.handovers)
