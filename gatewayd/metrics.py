"""Prometheus metrics of the three daemons: one registry per process, served on `/metrics`.

Counters that follow events (drift repairs, failovers, input errors) are counted where the
event is recorded (`gatewayd.systemd.journal_event` calls `count_event`), so the journal and
the metrics never disagree. What describes the current state (peers up, egress IPs held,
plan generations, SNAT counters) is read by the daemon's loop after each pass into a
`StateMetrics` and served from there: a scrape never touches the kernel or races the loop.

Names follow Prometheus' conventions: the `gatewayd_` prefix, base units (seconds, bytes),
`_total` for counters, labels by policy and gateway, never by pod IP.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, write_to_textfile
from prometheus_client.exposition import MetricsHandler, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("gatewayd")

REGISTRY = CollectorRegistry()

EVENTS = Counter("gatewayd_events", "Journal events recorded, by GATEWAYD_EVENT kind.",
                 ["event"], registry=REGISTRY)
DRIFT_REPAIRS = Counter("gatewayd_drift_repairs", "Changes a repair pass had to make to the "
                        "data plane (drift), by what was repaired.", ["target"],
                        registry=REGISTRY)
INPUT_ERRORS = Counter("gatewayd_input_errors", "Input rejected (the last good one stays in "
                       "force), by kind: config, snapshot, policy, spec, state.", ["kind"],
                       registry=REGISTRY)
FAILOVERS = Counter("gatewayd_failovers", "Failovers of a policy away from a gateway: fast "
                    "(this node's probes, to the standby) or planned (the controller moved the "
                    "policy).", ["policy", "gateway", "kind"], registry=REGISTRY)
PROBES = Counter("gatewayd_probes", "Health probes sent to each gateway through its tunnel "
                 "(steer).", ["gateway"], registry=REGISTRY)
PROBES_LOST = Counter("gatewayd_probes_lost", "Health probes without an answer in time, by "
                      "gateway (steer).", ["gateway"], registry=REGISTRY)
PLAN_APPLY_SECONDS = Histogram("gatewayd_plan_apply_duration_seconds", "Time to program a "
                               "whole plan (nftables, addresses, tunnels, routes), by pass: "
                               "change (new input) or repair.", ["pass"],
                               buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                                        10, 30), registry=REGISTRY)
WATCH_RESTARTS = Counter("gatewayd_kube_watch_restarts", "Watches of the API server started "
                         "again, by resource and reason (ended, expired, error).",
                         ["resource", "reason"], registry=REGISTRY)
API_ERRORS = Counter("gatewayd_kube_api_errors", "Failed requests to the API server, by "
                     "resource and operation.", ["resource", "operation"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram("gatewayd_controller_reconcile_duration_seconds", "Time of one "
                              "reconcile of the leader: planning and writing.",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                              registry=REGISTRY)
OBJECTS_WRITTEN = Counter("gatewayd_controller_objects_written", "Objects the controller "
                          "wrote (spec, status, conditions, events).", registry=REGISTRY)

# Input error events and the kind they count as.
_INPUT_ERROR_KINDS = {
    "config-invalid": "config",
    "snapshot-invalid": "snapshot",
    "policy-invalid": "policy",
    "plan-invalid": "spec",
    "egressgateway-missing": "spec",
    "sources-missing": "spec",
    "egressnode-missing": "spec",
    "state-invalid": "state",
}


def count_event(event: str, fields: Mapping[str, str]) -> None:
    """Count one journal event (see gatewayd.systemd.journal_event)."""
    EVENTS.labels(event).inc()
    if event == "drift-repaired":
        DRIFT_REPAIRS.labels(fields.get("target", "")).inc()
    elif event == "failover":
        FAILOVERS.labels(fields.get("policy", ""), fields.get("gateway", ""), "fast").inc()
    elif event in _INPUT_ERROR_KINDS:
        INPUT_ERRORS.labels(_INPUT_ERROR_KINDS[event]).inc()


def count_planned_failover(policy: str, gateway: str) -> None:
    FAILOVERS.labels(policy, gateway, "planned").inc()


@dataclass(frozen=True)
class Sample:
    """One gauge or counter value of the current state."""

    name: str
    help: str
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)
    counter: bool = False  # `name` without `_total`; the exposition adds it


def plan_samples(role: str, desired: int, applied: int, ready: bool,
                 policies: int) -> list[Sample]:
    """What every daemon that follows a plan (agent, steer) reports about it."""
    labels = {"role": role}
    return [
        Sample("gatewayd_plan_generation_desired", "Generation of the plan the input asks for "
               "(0: none yet).", desired, labels),
        Sample("gatewayd_plan_generation_applied", "Generation of the plan last programmed "
               "without error (0: none yet).", applied, labels),
        Sample("gatewayd_ready", "1 when the last pass programmed everything.", float(ready),
               labels),
        Sample("gatewayd_policies", "Policies this host serves in the applied plan.", policies,
               labels),
    ]


class StateMetrics(Collector):
    """The daemon's current state, as its loop last read it; served as it is at scrape time."""

    def __init__(self) -> None:
        self._samples: tuple[Sample, ...] = ()

    def update(self, samples: Iterable[Sample]) -> None:
        self._samples = tuple(samples)  # one assignment: a scrape sees all old or all new

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for sample in self._samples:
            family = families.get(sample.name)
            if family is None:
                kind = CounterMetricFamily if sample.counter else GaugeMetricFamily
                family = kind(sample.name, sample.help, labels=sorted(sample.labels))
                families[sample.name] = family
            family.add_metric([sample.labels[key] for key in sorted(sample.labels)],
                              sample.value)
        yield from families.values()


STATE = StateMetrics()
REGISTRY.register(STATE)


def exposition() -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(REGISTRY)


def parse_address(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` of the metrics listener; ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: must be HOST:PORT, e.g. 127.0.0.1:9641")
    return host.strip("[]"), int(port)


class MetricsServer:
    """`/metrics` over plain HTTP in a thread of its own. A listener that cannot be opened is
    logged, never fatal: metrics must not keep a gateway from forwarding."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> bool:
        handler = MetricsHandler.factory(REGISTRY)
        try:
            self._server = ThreadingHTTPServer(self.address, handler)
        except OSError as exc:
            log.error("metrics: cannot listen on %s:%d: %s", *self.address, exc)
            return False
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.5,), name="metrics",
                         daemon=True).start()
        return True

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def write_textfile(path: Path) -> None:
    """For node_exporter's textfile collector: the whole registry, replaced atomically."""
    try:
        write_to_textfile(str(path), REGISTRY)
    except OSError as exc:
        log.warning("metrics: cannot write %s: %s", path, exc)


@dataclass(frozen=True)
class MetricsOptions:
    """Where a daemon publishes its metrics: an HTTP address (None: no listener) and a
    textfile for node_exporter (None: none)."""

    address: tuple[str, int] | None
    textfile: Path | None = None


class MetricsPublisher:
    """A daemon's metrics: the listener and the textfile its options ask for, with the state
    read from the daemon's loop (`publish`) at most every `interval` seconds."""

    def __init__(self, options: MetricsOptions, interval: float = 5.0) -> None:
        self.options = options
        self.interval = interval
        self.server = MetricsServer(options.address) if options.address else None
        self._published_at = -math.inf

    def start(self) -> None:
        if self.server is not None:
            self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def publish(self, read: Callable[[], Iterable[Sample]]) -> None:
        if self.server is None and self.options.textfile is None:
            return
        if time.monotonic() - self._published_at < self.interval:
            return
        self._published_at = time.monotonic()
        try:
            STATE.update(read())
        except Exception:  # metrics must never stop the daemon's loop
            log.exception("metrics: reading the state failed")
        if self.options.textfile is not None:
            write_textfile(self.options.textfile)


def metrics_options(address: str, textfile: Path | None) -> MetricsOptions:
    """From the daemon's flags; an empty address or `none` turns the listener off."""
    listen = None if address.lower() in ("", "none") else parse_address(address)
    return MetricsOptions(listen, textfile)


DEFAULT_ADDRESS = "127.0.0.1:9641"  # this host only


@dataclass(frozen=True)
class MetricsSettings:
    """The metrics choices of the daemon's flags or of its config file's `metrics:` section:
    `address` HOST:PORT or `none`, `textfile` a path; None where that source is silent."""

    address: str | None = None
    textfile: Path | None = None


def resolve_options(flags: MetricsSettings, config: MetricsSettings) -> MetricsOptions:
    """Each setting from the flags if given, else from the config file, else the default
    (a listener on `DEFAULT_ADDRESS`, no textfile)."""
    address = next((a for a in (flags.address, config.address) if a is not None),
                   DEFAULT_ADDRESS)
    textfile = flags.textfile if flags.textfile is not None else config.textfile
    return metrics_options(address, textfile)


def peer_samples(handshakes: Mapping[str, float], up: Iterable[str], now: float,
                 interface: str) -> list[Sample]:
    """Each peer's state: up (a handshake within the agent's limit) and the seconds since
    its last handshake (+Inf: never)."""
    up = set(up)
    samples: list[Sample] = []
    for peer, at in sorted(handshakes.items()):
        labels = {"interface": interface, "peer": peer}
        samples.append(Sample("gatewayd_wireguard_peer_up", "1 when the WireGuard peer "
                              "completed a handshake recently.", float(peer in up), labels))
        samples.append(Sample("gatewayd_wireguard_peer_last_handshake_age_seconds",
                              "Seconds since the peer's last WireGuard handshake (+Inf: never).",
                              max(0.0, now - at) if at else math.inf, labels))
    return samples
