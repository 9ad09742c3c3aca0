"""Telling systemd how the daemon is doing: readiness, status, watchdog, journal events.

systemd-python (`systemd.daemon.notify`, `systemd.journal.send`) does the work where it is
installed, as in the .deb. Where it cannot be imported, notifications speak the notify socket
protocol directly (one datagram per message) and log records and events go to stderr with a
`<N>` priority prefix that journald understands. Outside
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

from gatewayd import metrics

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

    CRIT = 2
    ERR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6
    DEBUG = 7


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

# One MESSAGE_ID per event kind (`journalctl MESSAGE_ID=...` finds every record of the kind,
# whatever its wording). Made once with uuid4; never change one, add new ones.
EVENT_MESSAGE_IDS: dict[str, str] = {
    "plan-applied": "a3181845a70146e89fdd8151a369207a",
    "egress-ip-added": "dc5f40baca8b44c197e3c81d432b0bd3",
    "egress-ip-removed": "d719b97c71694765a8354e9a09c8631f",
    "egress-ip-defended": "86b2f22c0f5148b6aa555e545f8e8c65",
    "egress-ip-yielded": "7f72d09e0f7841708c1db103f132f378",
    "peer-up": "dd2cece283ca4ac8a63232ce2906647a",
    "peer-down": "ccf520db4da24b38b39c1be198d1196a",
    "drift-repaired": "be27f2868ce44a0191adbde5725accae",
    "forwarding-off": "4d5e8e579f294e99a0c4fee982381b1f",
    "config-invalid": "7e1e90e5bc81419fa6817a25813e8597",
    "snapshot-invalid": "ca439ebc92eb4308a6c361ea95a71cae",
    "policy-invalid": "5747e5c9017b45119ed25ac09589464d",
    "plan-invalid": "f08933c346a146568bf449745aca6256",
    "egressgateway-missing": "88a05e9f749240c587735c77bd31b3c2",
    "sources-missing": "e55332b2a19b43dab4a2db0d3e8ac44d",
    "egressnode-missing": "953f2339ae1b4cec9b3a6cbf32f26f06",
    "state-invalid": "1a8784faf7084533bbc6b408c893aec8",
    "state-write-failed": "4cbc3077254447e9bf056bb6ccd0ebd9",
    "failover": "446e561c09a042c5a1b1d5f8f25f30f3",
    "failover-ended": "3dedad18d1ea4440a26b97ba002ccef9",
    "handover": "ccebcb38aebb4d0ca851f2e7c80f9632",
    "handover-ended": "86188fa1b6e348d3b6a0a049e1d98d0f",
    "tunnel-removed": "3d69bc435ddc478cb554dcc6d6ffb78a",
    "conntrack-sync-missing": "2f5290d78a8b4610b22ae8b7d4f9e088",
}

# The attribute of a LogRecord that carries an event's journal fields (PRIORITY, MESSAGE_ID,
# GATEWAYD_*), set by `journal_event`.
JOURNAL_FIELDS = "gatewayd_journal_fields"


def journal_event(event: str, message: str, priority: int, **fields: str) -> None:
    """Record one event: MESSAGE, PRIORITY, MESSAGE_ID of the kind, GATEWAYD_EVENT=`event` and
    GATEWAYD_<KEY> for each keyword (`policy="x"` becomes GATEWAYD_POLICY=x), so
    `journalctl GATEWAYD_EVENT=peer-down` finds it. It is a log record like any other: the
    handler `setup_logging` chose sends it to the journal (MESSAGE is `message`, the fields
    are fields), or to stderr as `message [event=peer-down peer=node1]`."""
    journal = {"MESSAGE": message, "PRIORITY": str(int(priority)), "GATEWAYD_EVENT": event}
    if event in EVENT_MESSAGE_IDS:
        journal["MESSAGE_ID"] = EVENT_MESSAGE_IDS[event]
    journal.update({f"GATEWAYD_{key.upper()}": str(value) for key, value in fields.items()})
    metrics.count_event(event, fields)
    details = "".join(f" {key}={value}" for key, value in sorted(fields.items()))
    log.log(_LOG_LEVELS.get(priority, logging.INFO), "%s [event=%s%s]", message, event, details,
            extra={JOURNAL_FIELDS: journal}, stacklevel=2)


def syslog_priority(record: logging.LogRecord) -> int:
    """The record's syslog priority: an event's own, else the one of its logging level."""
    journal: dict[str, str] = getattr(record, JOURNAL_FIELDS, {})
    if "PRIORITY" in journal:
        return int(journal["PRIORITY"])
    if record.levelno >= logging.CRITICAL:
        return Priority.CRIT
    if record.levelno >= logging.ERROR:
        return Priority.ERR
    if record.levelno >= logging.WARNING:
        return Priority.WARNING
    if record.levelno >= logging.INFO:
        return Priority.INFO
    return Priority.DEBUG


class StderrFormatter(logging.Formatter):
    """Log lines on stderr. With `priority_prefix` (stderr is the journal but systemd-python
    is missing) every line starts with `<N>`, which journald reads as the line's priority
    (`SyslogLevelPrefix=`, on by default), and there is no time stamp: the journal has its
    own."""

    def __init__(self, priority_prefix: bool) -> None:
        fmt = "%(levelname)s %(name)s: %(message)s"
        super().__init__(fmt if priority_prefix else "%(asctime)s " + fmt)
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.priority_prefix:
            return text
        prefix = f"<{syslog_priority(record)}>"
        return "\n".join(prefix + line for line in text.splitlines())


class JournalHandler(logging.Handler):
    """Each log record as one native journal entry with its PRIORITY, the logger and the code
    location, and an event's MESSAGE_ID and GATEWAYD_* fields. Unlike lines on the stderr
    stream, a multi-line message (a config error listing every problem, a traceback) stays one
    entry with one priority."""

    def __init__(self, journal: ModuleType) -> None:
        super().__init__()
        self.journal = journal
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        journal = dict(getattr(record, JOURNAL_FIELDS, {}))
        message = journal.pop("MESSAGE", None) or self.format(record)
        fields = {
            "PRIORITY": str(syslog_priority(record)),
            "SYSLOG_IDENTIFIER": "gatewayd",
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_FUNC": record.funcName,
            **journal,
        }
        try:
            self.journal.send(message, CODE_LINE=record.lineno, **fields)
        except Exception:
            # The journal socket is gone (shutdown), or a field it refused: logging must never
            # take the daemon down, and stderr still reaches journald's stream.
            fallback = StderrFormatter(priority_prefix=True)
            sys.stderr.write(fallback.format(record) + "\n")


def log_handler() -> logging.Handler:
    """Where the daemons' log records go: straight to the journal when systemd runs us (and
    systemd-python is there, as in the .deb), as `<N>`-prefixed lines when it runs us without
    systemd-python, plain lines with a time stamp in a terminal or a container's log."""
    if stderr_is_journal():
        if _journal is not None:
            return JournalHandler(_journal)
        handler = logging.StreamHandler()
        handler.setFormatter(StderrFormatter(priority_prefix=True))
        return handler
    handler = logging.StreamHandler()
    handler.setFormatter(StderrFormatter(priority_prefix=False))
    return handler


def stderr_is_journal() -> bool:
    """True when systemd connected our stderr to the journal ($JOURNAL_STREAM is `dev:inode`
    of that stream); a daemon started by hand in a terminal gets its events on the terminal."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"
