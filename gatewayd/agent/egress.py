"""Kubernetes mode: egress IPs the gateway provisions follow the cloud nodes' traffic.

The agent's responder process answers the nodes' probes with what the keeper says is served,
and passes on what each node said (`gatewayd.agent.responder`). The keeper thread then holds
exactly the provisioned egress IPs that `gatewayd.probe.egress_ips_to_hold` asks for: a new
one only after a probe found no other holder (AddressDriver's conflict probe: ARP, or IPv6
duplicate address detection), then announced with gratuitous ARP / unsolicited NA; one that
is no longer wanted at once. When another host claims an address this gateway holds (its
gratuitous ARP or neighbour advertisement reaches the ClaimWatcher), the gateway yields unless
`keep_when_contested` says otherwise, in which case it announces itself again.

Restarts: for `egressIPHoldSeconds` after the keeper starts it removes nothing, so the first
probes can say what to keep; and a stopping agent hands over (`hand_over`): its probe answers
say it is leaving, so the nodes move every policy that has a standby there (and keep sending
its new connections here until the standby serves it), and it gives up exactly the addresses
of those policies once every node reports the move (the standby claims them), keeping those of
policies that have nowhere else to go.

See README.md, "Egress IP failover and split brain".
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from gatewayd.agent.config import FailoverSettings
from gatewayd.agent.responder import ON_TIME, ProbeResponder
from gatewayd.dataplane.addresses import AddressConflict, AddressDriver
from gatewayd.dataplane.probe import ClaimWatcher
from gatewayd.policy.model import (
    EgressIPPool,
    IPAddress,
    Role,
    SnatRule,
    address_order,
    in_pools,
)
from gatewayd.probe import (
    Demand,
    Fenced,
    ResponderState,
    egress_ips_to_hold,
    keep_when_contested,
)
from gatewayd.systemd import Priority, journal_event

log = logging.getLogger("gatewayd.agent")

PASS_SECONDS = 0.05  # how often the keeper looks again without being woken
FULL_PASS_SECONDS = 1.0  # re-read the kernel at least this often (repairs deleted addresses)
FORGET_NODE_SECONDS = 600.0
ANNOUNCE_AGAIN_SECONDS = 1.0
# A new holder announces itself again after these delays: a Linux neighbour that updated its
# entry for the address less than `locktime` (1 s by default) before ignores an announcement.
REANNOUNCE_AFTER = (0.5, 1.1)


@dataclass(frozen=True)
class EgressIPReport:
    """For the EgressGateway status."""

    held: tuple[IPAddress, ...]
    present: bool  # EgressIPsPresent
    reason: str
    message: str


class EgressIPKeeper:
    def __init__(
        self,
        gateway: str,
        pools: tuple[EgressIPPool, ...],
        settings: FailoverSettings,
        changed: Callable[[], None],
        released: Callable[[], None],
    ) -> None:
        self.gateway = gateway
        self.pools = pools
        self.settings = settings
        self._changed = changed
        self._released = released
        self.addresses = AddressDriver(
            probe_seconds=settings.arp_probe_seconds,
            # The holder the nodes just left gives the address up within the hold time, often
            # at once: ask again soon, then less often (the driver doubles the pause).
            retry_conflicts_after=settings.egress_ip_hold_seconds / 4,
        )
        self._lock = threading.Lock()
        self._rules: tuple[SnatRule, ...] = ()
        self._demands: dict[str, Demand] = {}
        self._held: frozenset[IPAddress] = frozenset()
        self._wanted: frozenset[IPAddress] = frozenset()
        self._conflicts: tuple[AddressConflict, ...] = ()
        self._contested: dict[IPAddress, str] = {}  # address -> the other host's MAC
        self._announced: dict[IPAddress, float] = {}
        self._reannounce: dict[IPAddress, list[float]] = {}  # address -> when (monotonic)
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._responder: ProbeResponder | None = None
        self._stopping = threading.Event()
        self._leaving = threading.Event()  # handing over: the answers say so
        self._started_at = 0.0
        self._passes = 0  # keeper passes completed (under the lock)
        self._thread = threading.Thread(target=self._run, name="egress-ips", daemon=True)
        self._watcher = ClaimWatcher(
            {p.interface for p in pools}, self._held_addresses, self._claimed_elsewhere
        )

    # --- from other threads ------------------------------------------------------------------

    def start(self, responder: ProbeResponder) -> None:
        """Follow the demands `responder` passes on (this thread is its only user now)."""
        self._responder = responder
        held: set[IPAddress] = set()
        for interface in sorted({p.interface for p in self.pools}):
            try:
                held |= self.addresses.observe(interface)
            except Exception as exc:  # the first pass reports it
                log.warning("egress IPs on %s: %s", interface, exc)
        with self._lock:
            self._held = frozenset(held)  # what an earlier run left: kept until probes say
        self._started_at = time.monotonic()
        self._thread.start()
        self._watcher.start()

    def hand_over(self, seconds: float) -> tuple[IPAddress, ...]:
        """Answer that this gateway is leaving (the nodes move what they can) and follow what
        they report for up to `seconds`, or until nothing is held. Returns the addresses still
        held: those of policies no node could move elsewhere."""
        self._leaving.set()
        deadline = time.monotonic() + seconds
        with self._lock:
            started = self._passes
        self._poke()
        while True:
            with self._lock:
                held, passes = self._held, self._passes
            # Only a pass that began after `leaving` knows what is held: one still running
            # may be adding an address it has not recorded yet.
            settled = passes > started + 1 and not held
            if settled or time.monotonic() >= deadline or not self._thread.is_alive():
                return tuple(sorted(held, key=address_order))
            self._stopping.wait(PASS_SECONDS)

    def stop(self) -> None:
        """Stop following; the addresses held now stay (the data plane outlives the daemon)."""
        self._stopping.set()
        self._poke()
        self._thread.join(5)
        self._watcher.stop()
        if not self._thread.is_alive():
            os.close(self._wake)

    def set_rules(self, rules: tuple[SnatRule, ...]) -> None:
        """The rules of the plan in force (main thread, after each apply)."""
        with self._lock:
            self._rules = rules
        self._poke()

    def report(self) -> EgressIPReport:
        with self._lock:
            held, wanted, conflicts = self._held, self._wanted, self._conflicts
            rules, demands = self._rules, list(self._demands.values())
        now = time.monotonic()
        recent = [d for d in demands if now - d.received_at <= self.settings.egress_ip_hold_seconds]
        active = {r.egress_ip for r in rules if r.role is Role.ACTIVE and self.provisioned(
            r.egress_ip)}
        ordered = tuple(sorted(held, key=address_order))
        if conflicts:
            return EgressIPReport(ordered, False, "AddressConflict",
                                  "; ".join(str(c) for c in conflicts))
        if active and not recent:
            return EgressIPReport(
                ordered, False, "NoCloudNodeReachesThisGateway",
                f"no cloud node's probe arrived for {self.settings.egress_ip_hold_seconds:g}s; "
                "provisioned egress IPs are held only while the nodes reach this gateway",
            )
        missing = wanted - held
        if missing:
            waiting = ", ".join(map(str, sorted(missing, key=address_order)))
            return EgressIPReport(ordered, False, "Claiming", f"not yet held: {waiting}")
        return EgressIPReport(ordered, True, "Held",
                              f"{len(held)} egress IPs held" if held else "none needed here")

    def refused(self) -> frozenset[IPAddress]:
        """Addresses the last pass could not claim: another host answers for them."""
        with self._lock:
            return frozenset(c.address for c in self._conflicts)

    def provisioned(self, address: IPAddress) -> bool:
        return in_pools(address, self.pools)

    # --- the keeper thread -------------------------------------------------------------------

    def _poke(self) -> None:
        os.eventfd_write(self._wake, 1)

    def _responder_state(self) -> ResponderState:
        """Served: the policies whose rules are here with their egress IPs held."""
        ips: dict[str, set[IPAddress]] = defaultdict(set)
        with self._lock:
            for rule in self._rules:
                ips[rule.policy].add(rule.egress_ip)
            served = frozenset(
                p for p, addresses in ips.items()
                if all(ip in self._held or not self.provisioned(ip) for ip in addresses)
            )
        return ResponderState(served, leaving=self._leaving.is_set())

    def _take_demands(self) -> bool:
        """Record the demands the responder passed on; True when a node's changed, or when
        the responder fenced the gateway."""
        assert self._responder is not None
        changed = False
        for message in self._responder.messages():
            if isinstance(message, Fenced):
                self._fenced(message)
                changed = True
                continue
            with self._lock:
                before = self._demands.get(message.node)
                self._demands[message.node] = message
            changed = changed or before is None or (before.here, before.away) != (
                message.here, message.away)
        return changed

    def _fenced(self, fenced: Fenced) -> None:
        """Only what the responder removed itself: a removal the keeper's own pass made in the
        same moment is the keeper's to report (`AddressDriver` reports each once)."""
        with self._lock:
            self._held -= set(fenced.removed)
        ago = time.monotonic() - fenced.at
        for address in fenced.removed:
            interface = ", ".join(self._interfaces_of(address))
            journal_event("egress-ip-removed",
                          f"egress IP {address} removed from {interface}: no cloud node's "
                          f"probe arrived for {self.settings.egress_ip_hold_seconds:g}s (the "
                          f"probe responder fenced the gateway {ago:.3f}s before this entry)",
                          Priority.NOTICE, egress_ip=str(address), interface=interface)
            self._reannounce.pop(address, None)
        self._released()
        self._changed()

    def _wait(self, seconds: float) -> None:
        """Until `seconds` passed, the keeper was poked, or a node's demand changed."""
        assert self._responder is not None
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            sources = [self._wake, *([self._responder.fileno()] if self._responder.running
                                     else [])]
            ready = select.select(sources, [], [], left)[0]
            if self._wake in ready:
                os.eventfd_read(self._wake)
                return
            if ready and self._take_demands():
                return

    def _held_addresses(self) -> frozenset[IPAddress]:
        with self._lock:
            return self._held

    def _claimed_elsewhere(self, address: IPAddress, interface: str, mac: str) -> None:
        with self._lock:
            self._contested[address] = mac
        self._poke()

    def _run(self) -> None:
        last_full = 0.0
        last_wanted: frozenset[IPAddress] | None = None
        assert self._responder is not None
        while not self._stopping.is_set():
            # The clock first, then every probe that came before the pass: a thread kept off
            # the CPU in between makes the demands newer than `now`, never older.
            now = time.monotonic()
            self._take_demands()
            with self._lock:
                rules = self._rules
                self._demands = {
                    n: d for n, d in self._demands.items()
                    if now - d.received_at < FORGET_NODE_SECONDS
                }
                demands = list(self._demands.values())
                contested, self._contested = self._contested, {}
            wanted = egress_ips_to_hold(
                rules, self.provisioned, demands, now, self.settings.egress_ip_hold_seconds
            )
            recent_here = {
                p for d in demands if now - d.received_at <= self.settings.egress_ip_hold_seconds
                for p in d.here
            }
            wanted = self._settle_contests(wanted, contested, rules, recent_here)
            if now - self._started_at < self.settings.egress_ip_hold_seconds:
                with self._lock:  # just started: the first probes decide what goes
                    wanted |= self._held & {r.egress_ip for r in rules}
            with self._lock:
                refused = bool(self._conflicts)  # the driver asks again once it is time
            if (wanted != last_wanted or contested or refused
                    or now - last_full >= FULL_PASS_SECONDS):
                try:
                    self._ensure(wanted)
                    last_full, last_wanted = now, wanted
                except Exception:  # a netlink hiccup: try again at the next pass
                    log.exception("egress IPs: pass failed")
            self._responder.set_state(self._responder_state())  # nodes wait for a claim
            self._announce_again(time.monotonic())
            with self._lock:
                self._passes += 1
                held = bool(self._held)
            self._wait(min(self._until_fence(demands, held), self._until_retry()))

    def _until_fence(self, demands: list[Demand], held: bool) -> float:
        """How long until the next pass must run for the fence to come on time: the moment
        the newest probe gets older than the hold time, when every address goes (at most
        the usual pause). The nodes' timing leaves the fence no more slack than that."""
        if not held or not demands:
            return PASS_SECONDS
        newest = max(d.received_at for d in demands)
        left = newest + self.settings.egress_ip_hold_seconds - time.monotonic()
        return left + ON_TIME if 0 < left < PASS_SECONDS else PASS_SECONDS

    def _until_retry(self) -> float:
        """How long until a refused address may be claimed again (at most the usual pause):
        the holder the nodes left lets go at any moment, and each pause is outage."""
        due = self.addresses.next_retry()
        if due is None:
            return PASS_SECONDS
        return min(max(due - time.monotonic(), 0.0) + ON_TIME, PASS_SECONDS)

    def _settle_contests(
        self,
        wanted: frozenset[IPAddress],
        contested: dict[IPAddress, str],
        rules: tuple[SnatRule, ...],
        here: set[str],
    ) -> frozenset[IPAddress]:
        with self._lock:
            held = self._held
        keep = set(wanted)
        for address, mac in contested.items():
            if address not in held:
                continue
            policies = {r.policy for r in rules if r.egress_ip == address}
            if keep_when_contested(policies, rules, here):
                last = self._announced.get(address, 0.0)
                if time.monotonic() - last >= ANNOUNCE_AGAIN_SECONDS:
                    self._announced[address] = time.monotonic()
                    for interface in self._interfaces_of(address):
                        self.addresses.announce(interface, [address])
                    journal_event("egress-ip-defended",
                                  f"egress IP {address} is claimed by {mac} too; this gateway is "
                                  "active for it and serves its traffic, so it announces itself "
                                  "again", Priority.WARNING, egress_ip=str(address), other=mac)
                continue
            keep.discard(address)
            journal_event("egress-ip-yielded",
                          f"egress IP {address} is claimed by {mac}; this gateway gives it up",
                          Priority.WARNING, egress_ip=str(address), other=mac)
        return frozenset(keep)

    def _ensure(self, wanted: frozenset[IPAddress]) -> None:
        by_interface: dict[str, set[IPAddress]] = {p.interface: set() for p in self.pools}
        for pool in self.pools:
            by_interface[pool.interface] |= {
                ip for ip in wanted if ip.version == pool.cidr.version and ip in pool.cidr
            }
        held: set[IPAddress] = set()
        conflicts: list[AddressConflict] = []
        changed = any_removed = False
        for interface, addresses in sorted(by_interface.items()):
            changes = self.addresses.ensure(interface, addresses)
            for ip in changes.added:
                journal_event("egress-ip-added", f"egress IP {ip} added on {interface}",
                              Priority.NOTICE, egress_ip=str(ip), interface=interface)
                self._reannounce[ip] = [time.monotonic() + d for d in REANNOUNCE_AFTER]
            for ip in changes.removed:
                any_removed = True
                self._reannounce.pop(ip, None)
                journal_event("egress-ip-removed", f"egress IP {ip} removed from {interface}",
                              Priority.NOTICE, egress_ip=str(ip), interface=interface)
            changed = changed or bool(changes)
            conflicts += changes.conflicts
            for conflict in changes.conflicts:
                if conflict not in self._conflicts:
                    log.warning("egress IP %s not claimed: %s", conflict.address,
                                conflict.detail)
            held |= self.addresses.observe(interface)
        with self._lock:
            changed = changed or (frozenset(held), wanted, tuple(conflicts)) != (
                self._held, self._wanted, self._conflicts)
            self._held = frozenset(held)
            self._wanted = wanted
            self._conflicts = tuple(conflicts)
        if any_removed:
            self._released()
        if changed:
            self._changed()

    def _announce_again(self, now: float) -> None:
        for address, times in list(self._reannounce.items()):
            if times[0] > now:
                continue
            times.pop(0)
            if not times:
                del self._reannounce[address]
            for interface in self._interfaces_of(address):
                try:
                    self.addresses.announce(interface, [address])
                except OSError as exc:
                    log.warning("announcing %s again failed: %s", address, exc)

    def _interfaces_of(self, address: IPAddress) -> list[str]:
        """The interfaces of the pools `address` is in (one, unless pools overlap)."""
        return sorted({p.interface for p in self.pools if address in p.cidr})

