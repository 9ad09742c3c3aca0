"""The part both daemons share: follow a plan from a source, never lose the last good one.

A `PlanFollower` asks its `PlanSource` (snapshot files in standalone mode, the daemon's own
object in Kubernetes mode) for the desired plan when the source or the config changed, and
programs the whole plan through idempotent drivers (`program`). A repair pass programs the
target plan again, so drift is repaired. Bad input (config, snapshot, policy) is reported and
leaves the last plan in force; that plan is saved under the state directory and restored at
start before any input is read (and before the API server is reachable).

A plan whose content equals the one in force but whose generation is newer is not programmed
again: the follower only adopts its generation, which is then the one it reports as applied.
"""

from __future__ import annotations

import enum
import faulthandler
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from gatewayd import metrics
from gatewayd.configfile import ConfigError, ReconcileSettings
from gatewayd.policy.engine import EgressPlan, build_plan
from gatewayd.policy.lastgood import PolicyMemory
from gatewayd.policy.planio import PlanFormatError
from gatewayd.policy.safeload import DOCUMENT_LIMITS, load_json_file
from gatewayd.policy.snapshot import SnapshotError, load_snapshot
from gatewayd.runtime import (
    DaemonLoop,
    PidFile,
    fingerprint,
    rfc3339,
    set_aside,
    write_json_atomic,
)
from gatewayd.systemd import Priority, ServiceNotifier, journal_event, watchdog_interval
from gatewayd.version import VERSION

log = logging.getLogger("gatewayd")


class Part(enum.Enum):
    """The parts of a programming pass, by what a failure there breaks (the daemons'
    conditions are derived from these, never from error text)."""

    TUNNEL = "wireguard"
    FILTER = "nftables"
    ROUTING = "policy routing"
    SYSCTL = "sysctl"
    FORWARD_GUARD = "forward guard"
    EGRESS_IPS = "egress IPs"
    FORWARDING = "forwarding"
    CONNTRACK_SYNC = "conntrack sync"


@dataclass(frozen=True)
class StepFailure:
    """One part of a programming pass that failed; `subject` names which one of several (an
    interface), empty when there is one."""

    part: Part
    detail: str
    subject: str = ""

    @property
    def where(self) -> str:
        return f"{self.part.value} {self.subject}" if self.subject else self.part.value

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"


def failures_of(errors: tuple[StepFailure, ...], *parts: Part) -> str:
    """The failures of `parts`, as the status conditions' messages show them."""
    return "; ".join(str(e) for e in errors if e.part in parts)


class FollowerConfig(Protocol):
    @property
    def path(self) -> Path: ...
    @property
    def state_directory(self) -> Path: ...
    @property
    def reconcile(self) -> ReconcileSettings: ...
    @property
    def metrics(self) -> metrics.MetricsSettings: ...


class Plan(Protocol):
    @property
    def generation(self) -> int: ...
    @property
    def rules(self) -> tuple[Any, ...]: ...


ConfigT = TypeVar("ConfigT", bound=FollowerConfig)
PlanT = TypeVar("PlanT", bound=Plan)


class InputError(Exception):
    """Input that cannot be used now; the plan in force stays. `event` names it in the journal."""

    def __init__(self, event: str, message: str, **fields: str) -> None:
        super().__init__(message)
        self.event = event
        self.fields = fields


class PlanSource(ABC, Generic[PlanT]):
    """Where a daemon's desired plan comes from."""

    problems: list[str]  # problems in the input that did not stop a plan (invalid policies)

    @abstractmethod
    def changed(self) -> bool:
        """Cheap check whether `desired` may answer differently now (true the first time)."""

    @abstractmethod
    def desired(self, previous: PlanT | None) -> PlanT:
        """The plan the input asks for now; raises InputError when the input is unusable."""

    def watched_paths(self) -> tuple[Path, ...]:
        """Files whose change should wake the daemon at once (see runtime.ChangeWatcher)."""
        return ()

    def start(self, wake: Callable[[], None]) -> None:
        """Begin following the input; call `wake` (from any thread) when it changed."""

    def stop(self) -> None:
        """Stop following the input (the source is being replaced, or the daemon stops)."""


class SnapshotSource(PlanSource[PlanT]):
    """Standalone mode: Kubernetes-object YAML files, turned into a plan by the engine.

    The generation counts plans of different content: a snapshot change that leaves this
    host's plan as it is keeps the generation.
    """

    def __init__(
        self,
        paths: tuple[Path, ...],
        memory: PolicyMemory,
        plan_for: Callable[[EgressPlan, int], PlanT],
        same_content: Callable[[PlanT, PlanT], bool],
    ) -> None:
        self.paths = paths
        self.memory = memory
        self.plan_for = plan_for
        self.same_content = same_content
        self.problems = []
        self._seen: object = None

    def watched_paths(self) -> tuple[Path, ...]:
        return self.paths

    def changed(self) -> bool:
        seen = fingerprint(self.paths)
        changed, self._seen = seen != self._seen, seen
        return changed

    def desired(self, previous: PlanT | None) -> PlanT:
        try:
            loaded = load_snapshot(self.paths)
        except SnapshotError as exc:
            raise InputError("snapshot-invalid",
                             f"snapshot unusable, keeping the last applied plan: {exc}",
                             file=exc.file) from exc
        resolved = self.memory.resolve(loaded)
        reported, self.problems = set(self.problems), [str(p) for p in loaded.problems]
        for problem in loaded.problems:
            if str(problem) in reported:
                continue  # the same problem read again (a reload, another file changed)
            journal_event("policy-invalid", f"invalid policy ignored: {problem}", Priority.ERR,
                          policy=f"{problem.kind}/{problem.name}", file=problem.file)
        for name in resolved.kept:
            log.warning("%s is invalid now; its last valid version stays in force", name)
        plan = build_plan(resolved.snapshot)
        if previous is None:
            return self.plan_for(plan, 1)
        candidate = self.plan_for(plan, previous.generation)
        if self.same_content(candidate, previous):
            return candidate
        return self.plan_for(plan, previous.generation + 1)


@dataclass
class FollowerStatus:
    generation: int = 0
    applied_at: str | None = None
    ready: bool = False
    last_error: str | None = None
    input_problems: list[str] = field(default_factory=list)
    drift_repaired: int = 0
    last_drift_at: str | None = None
    # Why the state directory cannot be written (disk full, read-only, I/O error); the data
    # plane is programmed all the same, and the write is retried every pass.
    state_error: str | None = None


class PlanFollower(ABC, Generic[ConfigT, PlanT]):
    role: str  # "agent" or "steer": names the pid file and the status

    def __init__(self, config: ConfigT) -> None:
        self.config = config
        self.memory = PolicyMemory()
        # `target` is the plan to keep in force (latest valid input, or the restored one);
        # `applied` the last one that was programmed without any error.
        self.target: PlanT | None = None
        self.applied: PlanT | None = None
        self.status = FollowerStatus()
        self.repairing = False  # true while a repair pass re-programs an unchanged plan
        self._host_programmed_for: object = None  # host_inputs() of the last clean apply
        self._config_seen: object = fingerprint([config.path])
        self._config_error: str | None = None  # why the config on disk is not the running one
        self._plan_unsaved = False  # `applied` differs from the saved plan.json
        self._write_errors: dict[Path, str] = {}  # state files that could not be written
        self._wake: Callable[[], None] | None = None  # set by attach()
        self.source = self.make_source()

    # --- what each daemon provides ----------------------------------------------------------

    @staticmethod
    @abstractmethod
    def load_config(path: Path) -> ConfigT: ...

    @abstractmethod
    def make_source(self) -> PlanSource[PlanT]:
        """The source of plans for the current config."""

    @abstractmethod
    def same_content(self, a: PlanT, b: PlanT) -> bool:
        """Whether two plans program the same data plane (generations aside)."""

    def attach(self, wake: Callable[[], None]) -> None:
        """Start following inputs that do not live in files; `wake` makes the loop check
        inputs at once. Called once the saved plan is restored."""
        self._wake = wake
        self.source.start(wake)

    def shutdown(self) -> None:
        """The daemon stops (its data plane stays): stop following inputs."""
        self.source.stop()

    def after_pass(self) -> None:
        """Runs after every pass of the loop (input check and/or repair), in the loop's thread."""

    @abstractmethod
    def plan_from(self, plan: EgressPlan, generation: int) -> PlanT: ...

    @abstractmethod
    def program(self, plan: PlanT, errors: list[StepFailure]) -> None:
        """Program every part of `plan`, recording failures with `self.step`."""

    @staticmethod
    @abstractmethod
    def plan_to_dict(plan: PlanT) -> dict[str, Any]: ...

    @staticmethod
    @abstractmethod
    def plan_from_dict(data: dict[str, Any]) -> PlanT: ...

    @abstractmethod
    def status_details(self) -> dict[str, Any]: ...

    # --- the shared behaviour --------------------------------------------------------------

    @property
    def plan_path(self) -> Path:
        return self.config.state_directory / "plan.json"

    @property
    def status_path(self) -> Path:
        return self.config.state_directory / "status.json"

    def check_inputs(self, forced: bool) -> None:
        """Reload the config and the plan when they changed (or on SIGHUP) and apply them."""
        config_changed = self._reload_config(forced)
        if config_changed:
            source = self.make_source()
            if source is not self.source:
                self.source.stop()
                self.source = source
                if self._wake is not None:
                    source.start(self._wake)
        if not (self.source.changed() or forced or config_changed):
            return
        try:
            plan = self.source.desired(self.target)
        except InputError as exc:
            self._input_error(exc.event, str(exc), **exc.fields)
            return
        self.status.input_problems = self.source.problems
        if self.target is None or not self.same_content(plan, self.target) or config_changed:
            self.apply(plan)
            return
        # Same content, maybe a newer generation: the data plane already matches it.
        self.target = plan
        if self.applied is not None and self.same_content(plan, self.applied):
            self.applied = plan
            self.status.generation = plan.generation
        if self.status.ready:
            self.status.last_error = self._config_error
        self.write_status()

    def watched_paths(self) -> tuple[Path, ...]:
        return self.source.watched_paths()

    def _reload_config(self, forced: bool) -> bool:
        """True when a changed, valid config was taken; an invalid one is reported and left."""
        seen = fingerprint([self.config.path])
        if seen == self._config_seen and not forced:
            return False
        self._config_seen = seen
        try:
            config = self.load_config(self.config.path)
        except ConfigError as exc:
            # Reported until a valid config is read; the snapshot is still followed meanwhile.
            message = f"config invalid, keeping the running one: {exc}"
            if message != self._config_error:
                journal_event("config-invalid", message, Priority.ERR,
                              config=str(self.config.path))
            self._config_error = message
            self.status.last_error = message
            self.write_status()
            return False
        self._config_error = None
        if config == self.config:
            return False
        log.info("configuration changed; applying it")
        self.config = config
        return True

    def _input_error(self, event: str, message: str, **fields: str) -> None:
        # Inotify and a following `systemctl reload` read the same bad input twice: say it once.
        if message != self.status.last_error:
            journal_event(event, message, Priority.ERR, **fields)
        self.status.last_error = message
        self.write_status()

    def restore_saved_plan(self) -> bool:
        """Re-apply the plan saved by the last run, before reading any input."""
        if not self.plan_path.exists():
            return False
        try:
            plan = self.plan_from_dict(load_json_file(self.plan_path, DOCUMENT_LIMITS))
        except (OSError, ValueError, PlanFormatError) as exc:
            self._set_aside_saved_plan(exc)
            return False
        log.info("restoring saved plan generation %d", plan.generation)
        self.apply(plan)
        return True

    def _set_aside_saved_plan(self, problem: Exception) -> None:
        """A damaged plan.json is moved to plan.json.bad (replacing an older one) and
        reported; the daemon goes on from its inputs instead of failing at every start."""
        message = (f"saved plan {self.plan_path} unusable, {set_aside(self.plan_path)}; "
                   f"waiting for inputs: {problem}")
        journal_event("state-invalid", message, Priority.ERR, file=str(self.plan_path))
        self.status.last_error = message
        self.write_status()

    def apply(self, plan: PlanT) -> None:
        self.target = plan
        errors: list[StepFailure] = []
        started = time.monotonic()
        self.program(plan, errors)
        metrics.PLAN_APPLY_SECONDS.labels("repair" if self.repairing else "change").observe(
            time.monotonic() - started)
        if not errors:
            self._host_programmed_for = self.host_inputs(plan)
            if self.applied is None or not self.same_content(plan, self.applied):
                self._plan_unsaved = True
                journal_event("plan-applied",
                              f"plan generation {plan.generation} applied: {len(plan.rules)} rules",
                              Priority.NOTICE, generation=str(plan.generation),
                              rules=str(len(plan.rules)))
                self.status.applied_at = rfc3339()
            self.applied = plan
            self.status.generation = plan.generation
        self.status.ready = not errors
        self.status.last_error = "; ".join(map(str, errors)) or self._config_error
        self.write_status()  # saves the plan first

    def save_plan(self) -> None:
        """Save the applied plan if it is not saved yet. The kernel is programmed already:
        a failed write is reported and retried on later passes, never fatal."""
        if self._plan_unsaved and self.applied is not None:
            path, applied = self.plan_path, self.plan_to_dict(self.applied)
            if self._write_state(path, lambda: write_json_atomic(path, applied)):
                self._plan_unsaved = False

    def _write_state(self, path: Path, write: Callable[[], None]) -> bool:
        """Run `write` of a state file; record (and report once) or clear its failure."""
        try:
            write()
        except OSError as exc:
            message = f"cannot write {path}: {exc.strerror or exc}"
            if self._write_errors.get(path) != message:
                journal_event("state-write-failed",
                              f"{message}; the data plane is programmed, the write is retried",
                              Priority.ERR, file=str(path))
            self._write_errors[path] = message
            self.status.state_error = "; ".join(self._write_errors.values())
            return False
        if self._write_errors.pop(path, None) is not None:
            log.warning("%s written again", path)
            self.status.state_error = "; ".join(self._write_errors.values()) or None
        return True

    def host_inputs(self, plan: PlanT) -> object:
        """What the host's own setup (tunnels, sysctls, routing) is made from."""
        return self.config

    def host_settled(self, plan: PlanT) -> bool:
        """True when only the rules changed: the host's own setup was programmed for these
        very inputs without error, and this is not a repair pass (which checks everything).
        Lets a one-pod change reach nftables in milliseconds."""
        return not self.repairing and self._host_programmed_for == self.host_inputs(plan)

    def repair(self) -> None:
        """Program the target plan again: repairs drift, and retries what failed last time."""
        if self.target is None:
            if self._write_errors:
                self.write_status()  # retries the failed write
            return
        self.repairing = True
        try:
            self.apply(self.target)
        finally:
            self.repairing = False

    @staticmethod
    def step(errors: list[StepFailure], part: Part, action: Callable[[], object],
             subject: str = "") -> bool:
        """Run one part of programming; log and record a failure, then go on with the rest
        (parts that depend on this one ask the result: True when it worked)."""
        try:
            action()
        except Exception as exc:
            failure = StepFailure(part, str(exc), subject)
            log.exception("%s failed", failure.where)
            errors.append(failure)
            return False
        return True

    def drift(self, what: str, changes: object) -> None:
        """Report a change a driver had to make; during a repair pass that is drift."""
        if self.repairing and changes:
            journal_event("drift-repaired", f"drift repaired: {what}: {changes}",
                          Priority.WARNING, target=what)
            self.status.drift_repaired += 1
            self.status.last_drift_at = rfc3339()

    def metric_samples(self) -> list[metrics.Sample]:
        """The state for `/metrics`, read in the loop's thread after a pass; each daemon adds
        its own (peers, egress IPs, counters) to these."""
        return metrics.plan_samples(
            self.role,
            desired=self.target.generation if self.target else 0,
            applied=self.applied.generation if self.applied else 0,
            ready=self.status.ready,
            policies=len({r.policy for r in self.applied.rules}) if self.applied else 0,
        )

    def health_summary(self) -> str:
        """One line for `systemctl status`, refreshed after every loop pass."""
        policies = {rule.policy for rule in self.applied.rules} if self.applied else set()
        return f"{len(policies)} policies"

    def service_status(self) -> str:
        error = self.status.last_error or self.status.state_error
        summary = self.health_summary()
        return f"{summary}; error: {error.splitlines()[0]}" if error else summary

    def write_status(self) -> None:
        """Write status.json (and retry a plan that could not be saved); a failed write is
        reported, never raised: the daemon's other reports must go out all the same."""
        self.save_plan()
        status = {
            "role": self.role,
            "version": VERSION,
            "generation": self.status.generation,
            "appliedAt": self.status.applied_at,
            "ready": self.status.ready,
            "lastError": self.status.last_error,
            "inputProblems": self.status.input_problems,
            "driftRepaired": self.status.drift_repaired,
            "lastDriftAt": self.status.last_drift_at,
            **self.status_details(),
        }
        # Other state files that cannot be written (status.json is read back only if written).
        status["stateError"] = "; ".join(
            message for path, message in self._write_errors.items() if path != self.status_path
        ) or None
        self._write_state(self.status_path, lambda: write_json_atomic(self.status_path, status))


def pid_file(state_directory: Path, role: str) -> PidFile:
    return PidFile(state_directory / f"{role}.pid")


def run_follower(
    follower_class: type[PlanFollower[Any, Any]], config_path: Path,
    metrics_flags: metrics.MetricsSettings | None = None,
) -> int:
    """Load the config, then follow inputs until SIGTERM; the data plane stays in place after.
    The metrics go where the flags say, else where the config's `metrics:` says (read once,
    at start)."""
    try:
        config = follower_class.load_config(config_path)
    except ConfigError as exc:
        journal_event("config-invalid", f"configuration invalid:\n{exc}", Priority.ERR,
                      config=str(config_path))
        return 2
    pids = pid_file(config.state_directory, follower_class.role)
    pids.claim()
    try:
        follower = follower_class(config)
    except ConfigError as exc:
        pids.release()
        journal_event("config-invalid", f"configuration unusable:\n{exc}", Priority.ERR,
                      config=str(config_path))
        return 2
    # A watchdog abort (SIGABRT) then logs where the loop hung.
    faulthandler.enable()
    watchdog = watchdog_interval()
    loop = DaemonLoop(config.reconcile.poll_seconds, config.reconcile.repair_seconds,
                      heartbeat_seconds=watchdog / 2 if watchdog else None)
    loop.install_signal_handlers()
    loop.watch([config.path, *follower.watched_paths()])
    service = ServiceNotifier()
    # The state behind /metrics is read every 5 s at most (the SNAT counters list the table).
    publisher = metrics.MetricsPublisher(metrics.resolve_options(
        metrics_flags or metrics.MetricsSettings(), config.metrics))

    def check_inputs(forced: bool) -> None:
        if forced:  # SIGHUP: `systemctl reload`
            service.reloading()
        follower.check_inputs(forced)

    def after_pass() -> None:
        follower.after_pass()
        # READY=1 only once a plan is in place (restored or applied); WATCHDOG=1 every pass.
        service.pass_done(follower.applied is not None, follower.service_status())
        publisher.publish(follower.metric_samples)

    publisher.start()
    try:
        follower.restore_saved_plan()
        follower.attach(loop.notify)
        loop.run(check_inputs, follower.repair, after_pass)
        service.stopping()
        follower.shutdown()
    finally:
        pids.release()
        publisher.stop()
    log.info("stopping; the data plane stays in place")
    return 0
