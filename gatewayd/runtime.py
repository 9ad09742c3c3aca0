"""What both daemons share: the loop, change detection, state files, logging.

The loop follows the level-triggered pattern: inputs (config, snapshot) are only checked for
changes; when something changed, or on the repair timer, the daemon's reconcile runs again
from the whole desired state. Signals only set flags.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any

from inotify_simple import INotify, flags

from gatewayd.dataplane.durable import fsync_directory
from gatewayd.systemd import log_handler

log = logging.getLogger("gatewayd")


def setup_logging(verbose: bool = False) -> None:
    # Every record with its syslog priority: see gatewayd.systemd.log_handler.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        handlers=[log_handler()])
    # Every retry of a request to an unreachable API server would be a warning; the daemons
    # report an outage once, and its end, themselves.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def fingerprint(paths: Iterable[Path]) -> tuple[tuple[str, int, int], ...]:
    """Name, mtime and size of every file under `paths` (directories one level deep)."""
    entries = []
    for path in paths:
        candidates = sorted(path.iterdir()) if path.is_dir() else [path]
        for candidate in candidates:
            try:
                st = candidate.stat()
            except OSError:
                entries.append((str(candidate), -1, -1))
                continue
            entries.append((str(candidate), st.st_mtime_ns, st.st_size))
    return tuple(entries)


def write_json_atomic(path: Path, data: Any, mode: int = 0o644) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file must not hold the space of a full disk
        raise
    fsync_directory(path.parent)


def set_aside(path: Path) -> str:
    """Move a damaged state file to `<name>.bad` (replacing an older one), so that the next
    start does not trip over it again; says where it went, for the report."""
    aside = path.with_name(f"{path.name}.bad")
    try:
        os.replace(path, aside)
    except OSError as exc:
        return f"could not be moved aside ({exc.strerror or exc})"
    return f"moved to {aside}"


def read_json(path: Path) -> Any:
    with path.open() as f:
        return json.load(f)


def rfc3339(moment: float | None = None) -> str:
    """`moment` (default: now), a POSIX timestamp, as the API's and status files' UTC time."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


class PidFile:
    """`<state>/<name>.pid`, so `gatewayctl teardown` can refuse while the daemon runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def claim(self) -> None:
        other = self.running_pid()
        if other is not None and other != os.getpid():
            raise RuntimeError(f"another daemon (pid {other}) runs with {self.path}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(f"{os.getpid()}\n")
        except OSError as exc:  # a full disk must not keep the daemon from starting
            log.warning("cannot write %s (%s): teardown will not see the daemon run",
                        self.path, exc.strerror or exc)

    def release(self) -> None:
        if self.running_pid() == os.getpid():
            self.path.unlink(missing_ok=True)

    def running_pid(self) -> int | None:
        try:
            pid = int(self.path.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid


class ChangeWatcher:
    """Wakes the loop as soon as a file under `paths` changes (inotify), so an input change
    reaches the data plane in milliseconds instead of at the next poll. Polling stays the
    safety net: a path that does not exist yet, or a missed event, is caught by the poll."""

    MASK = (flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.CREATE
            | flags.DELETE | flags.ATTRIB)

    def __init__(self, paths: Iterable[Path], on_change: Callable[[], None]) -> None:
        self._inotify = INotify()
        for path in paths:
            directory = path if path.is_dir() else path.parent
            try:
                self._inotify.add_watch(directory, self.MASK)
            except OSError as exc:
                log.warning("cannot watch %s for changes (%s); polling only", directory, exc)
        self._on_change = on_change
        threading.Thread(target=self._run, name="change-watcher", daemon=True).start()

    def _run(self) -> None:
        while True:
            if self._inotify.read():
                self._on_change()


class DaemonLoop:
    """Runs `check_inputs` every poll interval and `repair` every repair interval until a
    SIGTERM/SIGINT; SIGHUP forces an immediate reload. Exceptions in a pass are logged and
    the loop goes on: a daemon that forwards traffic must not die of one bad pass.
    `heartbeat_seconds` bounds every wait, so `after_pass` (which pings systemd's watchdog)
    runs at least that often while the loop is healthy, and never when a pass hangs."""

    def __init__(
        self, poll_seconds: float, repair_seconds: float, heartbeat_seconds: float | None = None
    ) -> None:
        self.poll_seconds = poll_seconds
        self.repair_seconds = repair_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self._wake = threading.Event()
        self.stopping = False
        self.reload_requested = False
        self.inputs_changed = False

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        self._wake.set()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True
        self._wake.set()

    def watch(self, paths: Iterable[Path]) -> None:
        """Check inputs at once when a file under `paths` changes, not only every poll."""
        ChangeWatcher(paths, self._on_inputs_changed)

    def _on_inputs_changed(self) -> None:
        self.inputs_changed = True
        self._wake.set()

    def notify(self) -> None:
        """Check inputs at once (from any thread): an input outside files changed, e.g. the
        daemon's object in the Kubernetes API."""
        self._on_inputs_changed()

    def run(
        self,
        check_inputs: Callable[[bool], None],
        repair: Callable[[], None],
        after_pass: Callable[[], None] = lambda: None,
    ) -> None:
        next_poll = next_repair = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            if self.reload_requested or self.inputs_changed or now >= next_poll:
                forced, self.reload_requested = self.reload_requested, False
                self.inputs_changed = False
                self._guarded("input check", functools.partial(check_inputs, forced))
                next_poll = time.monotonic() + self.poll_seconds
            if now >= next_repair:
                self._guarded("repair pass", repair)
                next_repair = time.monotonic() + self.repair_seconds
            after_pass()
            wait = max(0.0, min(next_poll, next_repair) - time.monotonic())
            if self.heartbeat_seconds is not None:
                wait = min(wait, self.heartbeat_seconds)
            self._wake.wait(wait)
            self._wake.clear()

    @staticmethod
    def _guarded(what: str, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:
            log.exception("%s failed; the data plane stays as it is", what)
