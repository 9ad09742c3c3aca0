"""Throwaway network namespaces with a cleanup registry, for the lab and the tests.

Everything a `Sandbox` creates (namespaces, links, processes, files) is registered and removed
again by `close()`, in reverse order, even when a step in between failed. It removes only what
it created: names carry the sandbox's prefix, and existing namespaces are never adopted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pyroute2 import netns as pyroute2_netns


class CommandError(RuntimeError):
    pass


def run(
    argv: Sequence[str],
    netns: str | None = None,
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run a command, inside `netns` when given; raise CommandError with its stderr on failure."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(full)} -> exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> float:
    """Poll `condition` until it is true; return the seconds it took, raise TimeoutError after."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def entered(netns: str) -> Iterator[None]:
    """Move the calling thread into `netns` for the block (drivers act on the caller's netns)."""
    pyroute2_netns.pushns(netns)
    try:
        yield
    finally:
        pyroute2_netns.popns()


class Sandbox:
    """Owns namespaces, links and processes; `close()` tears down exactly those."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def on_close(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def netns(self, name: str) -> str:
        """Create namespace `<prefix><name>` with loopback up; returns its full name."""
        full = f"{self.prefix}{name}"
        if full in pyroute2_netns.listnetns():
            raise CommandError(f"network namespace {full} already exists; not adopting it")
        run(["ip", "netns", "add", full])
        self.on_close(f"netns {full}", lambda: delete_netns(full))
        run(["ip", "link", "set", "lo", "up"], full)
        return full

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        """A veth pair between two of our namespaces, both ends up. Removed with the netns."""
        run(["ip", "link", "add", if_a, "netns", ns_a, "type", "veth",
             "peer", "name", if_b, "netns", ns_b])
        run(["ip", "link", "set", if_a, "up"], ns_a)
        run(["ip", "link", "set", if_b, "up"], ns_b)

    def spawn(
        self,
        netns: str | None,
        argv: Sequence[str],
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process (in `netns`); it is stopped on close."""
        proc = start_process(netns, argv, log, env)
        self._processes.append(proc)
        self.on_close(f"process {argv[0]} ({proc.pid})", lambda: stop_process(proc))
        return proc

    def release(self) -> None:
        """Hand everything created so far over to the caller: `close()` no longer removes it.

        For a lab that must outlive this process; it keeps its own record of what to remove.
        """
        self._undo.clear()
        self._processes.clear()

    def close(self) -> None:
        errors = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # keep going: the rest must still be cleaned up
                errors.append(f"{what}: {exc}")
        if errors:
            raise CommandError("cleanup failed: " + "; ".join(errors))


def delete_netns(name: str) -> None:
    """Kill every process inside namespace `name`, then delete it; no-op when it is gone."""
    # Processes left inside (e.g. a wireguard-go the daemon detached) would keep links
    # alive; whoever owns the namespace owns them too, so end them first.
    for pid in pyroute2_netns.ns_pids().get(name, []):
        if pid == os.getpid():  # our main thread never left it: a bug, not a leftover
            raise CommandError(f"this process ({pid}) is inside namespace {name} itself, "
                               "so it was not deleted")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run(["ip", "netns", "del", name], check=False)


def start_process(
    netns: str | None,
    argv: Sequence[str],
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running process (in `netns`) in its own session, output to `log`."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed by the child
    proc = subprocess.Popen(
        full, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    if log:
        out.close()  # type: ignore[union-attr]
    return proc


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5) -> None:
    """SIGTERM the process group, then SIGKILL if it does not exit in time."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
