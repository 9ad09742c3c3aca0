"""Telling systemd how the daemon is doing: readiness, status, watchdog, journal events.

systemd-python (`systemd.daemon.notify`, `systemd.journal.send`) does the work where it is
installed, as in the .deb. Where it cannot be imported, notifications speak the notify socket
protocol directly (one datagram per message) and events go to the log on stderr. Outside
systemd (no `$NOTIFY_SOCKET`) notifications do nothing, so the daemon runs the same by hand.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
import time
from enum import IntEnum
from types import ModuleType

log = logging.getLogger("gatewayd")


def _import_optional(name: str) -> ModuleType | None:
    # Imported by name: systemd-python ships no type information for mypy to read.
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


_daemon = _import_optional("systemd.daemon")
_journal = _import_optional("systemd.journal")


class Priority(IntEnum):
    """syslog priorities, as the journal's PRIORITY field takes them."""

    ERR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6


_LOG_LEVELS: dict[int, int] = {
    Priority.ERR: logging.ERROR,
    Priority.WARNING: logging.WARNING,
    Priority.NOTICE: logging.INFO,
    Priority.INFO: logging.INFO,
}


# --- sd_notify ---------------------------------------------------------------------------------


def notify_ready(status: str) -> None:
    """The data plane is programmed: `systemctl start` returns and the unit is active."""
    _notify("READY=1", _status(status))


def notify_status(status: str) -> None:
    """The one-line summary `systemctl status` shows."""
    _notify(_status(status))


def notify_watchdog() -> None:
    _notify("WATCHDOG=1")


def notify_reloading() -> None:
    """A reload (SIGHUP) started; `notify_ready` must follow when it is done."""
    # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match this to the reload request.
    _notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def notify_stopping() -> None:
    _notify("STOPPING=1")


def watchdog_interval() -> float | None:
    """Seconds within which systemd expects WATCHDOG=1 (`WatchdogSec=`), or None when unset."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # inherited from the process systemd meant it for
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


def send_to_notify_socket(message: str, address: str | None) -> bool:
    """The sd_notify(3) protocol without libsystemd: one datagram of `KEY=VALUE` lines to the
    AF_UNIX socket named by `$NOTIFY_SOCKET` (`@name` is an abstract socket). Returns False
    when there is no socket to tell; the kernel adds our credentials for systemd to check."""
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode(), target)
    return True


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.split())  # one line: a newline would end the assignment


def _notify(*assignments: str) -> None:
    message = "\n".join(assignments)
    try:
        if _daemon is not None:
            _daemon.notify(message)
        else:
            send_to_notify_socket(message, os.environ.get("NOTIFY_SOCKET"))
    except OSError as exc:  # systemd gone (shutdown) must not take the data plane loop down
        log.warning("cannot notify systemd (%s): %s", message.replace("\n", " "), exc)


class ServiceNotifier:
    """What a daemon loop tells systemd after each pass: WATCHDOG=1 every time, READY=1 once
    the first plan is in place (and again to end a reload), STATUS= when the summary changed."""

    def __init__(self) -> None:
        self.ready_sent = False
        self._status: str | None = None

    def pass_done(self, ready: bool, status: str) -> None:
        notify_watchdog()
        if ready and not self.ready_sent:
            notify_ready(status)
            self.ready_sent = True
            self._status = status
        elif status != self._status:
            notify_status(status)
            self._status = status

    def reloading(self) -> None:
        notify_reloading()
        self.ready_sent = False

    def stopping(self) -> None:
        notify_stopping()


# --- journal -----------------------------------------------------------------------------------


def journal_event(event: str, message: str, priority: int, **fields: str) -> None:
    """Record one event: MESSAGE, PRIORITY, GATEWAYD_EVENT=`event` and GATEWAYD_<KEY> for each
    keyword (`policy="x"` becomes GATEWAYD_POLICY=x), so `journalctl GATEWAYD_EVENT=peer-down`
    finds it. Goes to the journal when stderr is the journal, else to the log on stderr."""
    extra = {f"GATEWAYD_{key.upper()}": str(value) for key, value in fields.items()}
    if _journal is not None and stderr_is_journal():
        caller = sys._getframe(1)
        try:
            _journal.send(
                message,
                PRIORITY=str(int(priority)),
                SYSLOG_IDENTIFIER="gatewayd",
                GATEWAYD_EVENT=event,
                CODE_FILE=caller.f_code.co_filename,
                CODE_LINE=caller.f_lineno,
                CODE_FUNC=caller.f_code.co_name,
                **extra,
            )
            return
        except OSError as exc:
            log.debug("journal unavailable (%s); logging the event instead", exc)
    details = "".join(f" {key}={value}" for key, value in sorted(fields.items()))
    log.log(_LOG_LEVELS.get(priority, logging.INFO), "%s [event=%s%s]", message, event, details)


def stderr_is_journal() -> bool:
    """True when systemd connected our stderr to the journal ($JOURNAL_STREAM is `dev:inode`
    of that stream); a daemon started by hand in a terminal gets its events on the terminal."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"
