"""gatewayd.systemd against real AF_UNIX datagram sockets, bound here as systemd would."""

from __future__ import annotations

import ast
import io
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gatewayd import systemd
from gatewayd.runtime import DaemonLoop

pytestmark = pytest.mark.unit


class NotifySocket:
    """A bound datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str, bind_to: str) -> None:
        self.address = address  # as $NOTIFY_SOCKET names it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(2)

    def received(self) -> list[str]:
        """Every datagram waiting, oldest first (the first one waited for)."""
        messages = [self.sock.recv(4096).decode()]
        self.sock.setblocking(False)
        try:
            while True:
                messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return messages
        finally:
            self.sock.settimeout(2)


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    path = str(tmp_path / "notify")
    listener = NotifySocket(path, path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield listener
    listener.sock.close()


@pytest.fixture(params=["fallback", "systemd-python"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the socket protocol fallback, then with systemd-python's sd_notify."""
    if request.param == "fallback":
        monkeypatch.setattr(systemd, "_daemon", None)
    elif systemd._daemon is None:
        pytest.fail("systemd-python is not installed (pip install systemd-python)")
    return str(request.param)


def test_datagram_reaches_a_path_socket(notify_socket: NotifySocket) -> None:
    assert systemd.send_to_notify_socket("READY=1\nSTATUS=ok", notify_socket.address)
    assert notify_socket.received() == ["READY=1\nSTATUS=ok"]


def test_datagram_reaches_an_abstract_socket() -> None:
    name = f"gatewayd-test-{os.getpid()}"
    listener = NotifySocket(f"@{name}", f"\0{name}")
    try:
        assert systemd.send_to_notify_socket("WATCHDOG=1", listener.address)
        assert listener.received() == ["WATCHDOG=1"]
    finally:
        listener.sock.close()


@pytest.mark.parametrize("address", [None, "", "relative/path", "vsock:2:1234"])
def test_no_usable_socket_sends_nothing(address: str | None) -> None:
    assert systemd.send_to_notify_socket("READY=1", address) is False


def test_missing_socket_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(systemd, "_daemon", None)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    systemd.notify_stopping()
    assert "cannot notify systemd (STOPPING=1)" in caplog.text


def test_notifications_without_systemd_do_nothing(
    backend: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    systemd.notify_ready("1 policies")
    systemd.notify_watchdog()
    assert caplog.records == []


def test_each_notification_sends_its_assignments(
    backend: str, notify_socket: NotifySocket
) -> None:
    systemd.notify_ready("2 policies")
    systemd.notify_status("2 policies,\n1 error")
    systemd.notify_watchdog()
    systemd.notify_stopping()
    assert notify_socket.received() == [
        "READY=1\nSTATUS=2 policies",
        "STATUS=2 policies, 1 error",
        "WATCHDOG=1",
        "STOPPING=1",
    ]


def test_reloading_carries_the_monotonic_time(backend: str, notify_socket: NotifySocket) -> None:
    systemd.notify_reloading()
    [message] = notify_socket.received()
    reloading, monotonic = message.split("\n")
    assert reloading == "RELOADING=1"
    key, value = monotonic.split("=")
    assert key == "MONOTONIC_USEC"
    assert abs(int(value) - time.monotonic_ns() // 1000) < 5_000_000


def test_service_notifier_sequence(backend: str, notify_socket: NotifySocket) -> None:
    notifier = systemd.ServiceNotifier()
    notifier.pass_done(ready=False, status="0 policies; error: snapshot unusable")
    notifier.pass_done(ready=True, status="2 policies")
    notifier.pass_done(ready=True, status="2 policies")
    notifier.pass_done(ready=True, status="3 policies")
    notifier.reloading()
    notifier.pass_done(ready=True, status="3 policies")
    notifier.stopping()
    messages = notify_socket.received()
    messages[7] = messages[7].split("\n")[0]  # drop the reload's timestamp
    assert messages == [
        "WATCHDOG=1", "STATUS=0 policies; error: snapshot unusable",
        "WATCHDOG=1", "READY=1\nSTATUS=2 policies",
        "WATCHDOG=1",
        "WATCHDOG=1", "STATUS=3 policies",
        "RELOADING=1",
        "WATCHDOG=1", "READY=1\nSTATUS=3 policies",
        "STOPPING=1",
    ]


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [("3000000", None, 3.0), ("500000", "self", 0.5), ("3000000", "1", None),
     ("0", None, None), ("soon", None, None), (None, None, None)],
)
def test_watchdog_interval(
    usec: str | None, pid: str | None, expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (("WATCHDOG_USEC", usec),
                        ("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert systemd.watchdog_interval() == expected


def formatted(handler: logging.Handler, emit: Callable[[], None]) -> str:
    """What `handler` wrote to its stream while `emit` logged to the gatewayd logger."""
    stream = io.StringIO()
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    logger = logging.getLogger("gatewayd")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        emit()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return stream.getvalue()


def drift_event() -> None:
    systemd.journal_event("drift-repaired", "drift repaired: nftables", systemd.Priority.WARNING,
                          target="nftables table inet gatewayd", generation="4")


def test_event_goes_to_the_log_when_stderr_is_not_the_journal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    caplog.set_level(logging.INFO, logger="gatewayd")
    drift_event()
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "drift repaired: nftables [event=drift-repaired generation=4 "
        "target=nftables table inet gatewayd]"
    )
    text = formatted(systemd.log_handler(), drift_event)
    assert text.endswith(" WARNING gatewayd: drift repaired: nftables [event=drift-repaired "
                         "generation=4 target=nftables table inet gatewayd]\n")
    assert not text.startswith("<")


def journal_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make stderr a file that $JOURNAL_STREAM names, as systemd does with its stream."""
    stream = (tmp_path / "stderr").open("w")
    monkeypatch.setattr("sys.stderr", stream)
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")


def test_without_systemd_python_every_line_on_the_journal_stream_has_its_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal_stderr(tmp_path, monkeypatch)
    monkeypatch.setattr(systemd, "_journal", None)
    log = logging.getLogger("gatewayd.test")

    def emit() -> None:
        log.info("configuration changed; applying it")
        log.warning("snapshot/31.yaml is invalid now;\nits last valid version stays in force")
        log.error("cannot follow nftables events")
        systemd.journal_event("plan-applied", "plan generation 3 applied: 2 rules",
                              systemd.Priority.NOTICE, generation="3", rules="2")
        drift_event()

    assert formatted(systemd.log_handler(), emit).splitlines() == [
        "<6>INFO gatewayd.test: configuration changed; applying it",
        "<4>WARNING gatewayd.test: snapshot/31.yaml is invalid now;",
        "<4>its last valid version stays in force",
        "<3>ERROR gatewayd.test: cannot follow nftables events",
        "<5>INFO gatewayd: plan generation 3 applied: 2 rules [event=plan-applied "
        "generation=3 rules=2]",
        "<4>WARNING gatewayd: drift repaired: nftables [event=drift-repaired generation=4 "
        "target=nftables table inet gatewayd]",
    ]


def test_journal_handler_sends_each_record_with_priority_and_event_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal_stderr(tmp_path, monkeypatch)
    handler = systemd.log_handler()
    assert isinstance(handler, systemd.JournalHandler)  # systemd-python is here
    # systemd-python's own send() checks and formats the fields; only its last step, the
    # datagram to journald (absent on this host), is caught here.
    entries: list[dict[str, str]] = []
    monkeypatch.setattr(handler.journal, "sendv", lambda *args: entries.append(
        dict(arg.split("=", 1) for arg in args)))
    logger = logging.getLogger("gatewayd")
    logger.addHandler(handler)
    try:
        logging.getLogger("gatewayd.test").warning("peer %s: %s", "node1",
                                                   "no handshake\nfor 180 s")
        drift_event()
    finally:
        logger.removeHandler(handler)
    warning, drift = entries
    assert warning["MESSAGE"] == "peer node1: no handshake\nfor 180 s"  # one entry, two lines
    assert warning["PRIORITY"] == "4" and warning["SYSLOG_IDENTIFIER"] == "gatewayd"
    assert warning["LOGGER"] == "gatewayd.test" and "MESSAGE_ID" not in warning
    assert warning["CODE_FILE"] == __file__ and warning["CODE_FUNC"] == (
        "test_journal_handler_sends_each_record_with_priority_and_event_fields")
    assert int(warning["CODE_LINE"]) > 0
    assert drift["MESSAGE"] == "drift repaired: nftables"
    assert drift["PRIORITY"] == "4" and drift["GATEWAYD_EVENT"] == "drift-repaired"
    assert drift["MESSAGE_ID"] == systemd.EVENT_MESSAGE_IDS["drift-repaired"]
    assert drift["GATEWAYD_TARGET"] == "nftables table inet gatewayd"
    assert drift["CODE_FUNC"] == "drift_event"  # the caller of journal_event, not it


def test_a_record_the_journal_refuses_goes_to_stderr_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal_stderr(tmp_path, monkeypatch)
    handler = systemd.log_handler()
    assert isinstance(handler, systemd.JournalHandler)

    def refuse(*args: str) -> None:
        raise OSError("journald is gone")

    monkeypatch.setattr(handler.journal, "sendv", refuse)
    record = logging.LogRecord("gatewayd", logging.ERROR, __file__, 1, "lost %s", ("it",), None)
    handler.emit(record)
    import sys
    sys.stderr.flush()
    assert (tmp_path / "stderr").read_text() == "<3>ERROR gatewayd: lost it\n"


def event_kinds_in_the_code() -> set[str]:
    """The first argument of every journal_event(...) and InputError(...) in gatewayd/; an
    f-string kind (`{kind}-missing`) is expanded over the kinds the code passes to it."""
    kinds: set[str] = set()
    for path in Path(systemd.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name not in ("journal_event", "InputError"):
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                kinds.add(first.value)
            elif isinstance(first, ast.JoinedStr):
                kinds.update({"egressgateway-missing", "egressnode-missing"})
            elif name == "journal_event" and path.name != "follower.py":
                pytest.fail(f"{path}:{node.lineno}: event kind is not a literal")
    return kinds


def test_every_event_kind_has_a_message_id_and_is_documented() -> None:
    kinds = event_kinds_in_the_code()
    assert kinds == set(systemd.EVENT_MESSAGE_IDS)
    ids = list(systemd.EVENT_MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    repo = Path(systemd.__file__).parents[1]
    table = (repo / "systemd" / "README.md").read_text()
    overview = " ".join((repo / "README.md").read_text().split())
    assert {k for k in kinds if f"`{k}`" not in table} == set(), "missing in systemd/README.md"
    assert {k for k in kinds if f"`{k}`" not in overview} == set(), "missing in README.md"
    assert {k for k in kinds if systemd.EVENT_MESSAGE_IDS[k] not in table} == set()


def test_stderr_is_journal_compares_the_stream_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = (tmp_path / "stderr").open("w")
    monkeypatch.setattr("sys.stderr", stream)
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert systemd.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not systemd.stderr_is_journal()
    stream.close()


def test_daemon_loop_runs_after_pass_every_heartbeat() -> None:
    """With hour-long intervals, only the heartbeat bound lets the loop ping the watchdog."""
    loop = DaemonLoop(poll_seconds=3600, repair_seconds=3600, heartbeat_seconds=0.01)
    passes: list[float] = []

    def after_pass() -> None:
        passes.append(time.monotonic())
        loop.stopping = len(passes) >= 5

    runner = threading.Thread(
        target=loop.run, args=(lambda forced: None, lambda: None, after_pass), daemon=True)
    runner.start()
    runner.join(timeout=10)
    assert not runner.is_alive() and len(passes) == 5
