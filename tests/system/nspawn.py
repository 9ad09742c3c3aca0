"""Debian systemd containers booted with systemd-nspawn, for the system tests.

The host's PID 1 is not systemd, so each container runs with `--register=no --keep-unit` in a
cgroup of its own that we create, and commands get in with `nsenter` into its PID 1 (see
shared/notes/test-hosts.md). A `Container` registers every step it took with a `Sandbox`;
closing that powers the container off and removes its cgroups and veth even after a failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from gatewayd.lab.netns import CommandError, Sandbox, run, wait_for

CGROUP_HIERARCHIES = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))


class Container:
    """One booted container; the root file system is shared read-only, writes go to a tmpfs."""

    def __init__(self, sandbox: Sandbox, name: str, rootfs: Path, log: Path,
                 binds: Sequence[tuple[Path, str]] = ()) -> None:
        if len(name) > 12:
            raise ValueError(f"container name {name!r}: at most 12 characters (ve-NAME is a link)")
        self.name = name
        self.log = log
        self.host_veth = f"ve-{name}"
        self.cgroups = [hierarchy / f"nspawn-{name}" for hierarchy in CGROUP_HIERARCHIES]
        for cgroup in self.cgroups:
            cgroup.mkdir()  # fails if it exists: never adopt someone else's
            sandbox.on_close(f"cgroup {cgroup}", lambda c=cgroup: remove_cgroup(c))
        enter_cgroups = " && ".join(f"echo $$ > {c}/cgroup.procs" for c in self.cgroups)
        nspawn = [
            "systemd-nspawn", "--boot", f"--directory={rootfs}", f"--machine={name}",
            "--register=no", "--keep-unit", "--volatile=overlay", "--network-veth",
            "--console=read-only", "--quiet",
            *(f"--bind-ro={host}:{inside}" for host, inside in binds),
        ]
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                ["sh", "-c", f'{enter_cgroups} && exec "$@"', "sh", *nspawn],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        sandbox.on_close(f"container {name}", self.power_off)
        sandbox.on_close(f"veth {self.host_veth}", self._remove_veth)
        self.leader = self._wait_for_leader()
        self.wait_booted()

    # --- getting in ------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command in the container with the host's privileges (like a root shell)."""
        return run(["nsenter", "-t", str(self.leader), "-a", "--", *argv],
                   check=check, input=input, timeout=timeout)

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> str:
        return self.run("sh", "-c", script, check=check, timeout=timeout).stdout

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run("sh", "-c", f'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod {mode} "$1"',
                 "sh", path, input=text)

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check)

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "--value", "-p", prop, unit).stdout.strip()

    def address_veth(self, host_address: str, container_address: str) -> None:
        """Addresses (with prefix) on both ends of the veth, so that the host reaches the
        container (e.g. over SSH); they go away with the veth."""
        run(["ip", "addr", "add", host_address, "dev", self.host_veth])
        run(["ip", "link", "set", self.host_veth, "up"])
        self.run("ip", "addr", "add", container_address, "dev", "host0")
        self.run("ip", "link", "set", "host0", "up")

    # --- life cycle --------------------------------------------------------------------------

    def _wait_for_leader(self) -> int:
        """The container's PID 1 as the host sees it: nspawn's descendant named systemd."""
        def find() -> int | None:
            if self.process.poll() is not None:
                raise CommandError(f"systemd-nspawn exited {self.process.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            pending = [self.process.pid]
            while pending:
                pid = pending.pop()
                with contextlib.suppress(OSError):
                    if pid != self.process.pid and comm(pid) == "systemd":
                        return pid
                    pending += children(pid)
            return None

        deadline = time.monotonic() + 30
        while (leader := find()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {self.name}: systemd did not start in 30 s")
            time.sleep(0.05)
        return leader

    def wait_booted(self, timeout: float = 60) -> None:
        def booted() -> bool:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            return state in ("running", "degraded")

        wait_for(booted, timeout, f"container {self.name} to boot", interval=0.2)

    def power_off(self, timeout: float = 20) -> None:
        """SIGTERM to nspawn is a clean poweroff; SIGKILL the group if it hangs."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)

    def _remove_veth(self) -> None:
        if Path(f"/sys/class/net/{self.host_veth}").exists():
            run(["ip", "link", "del", self.host_veth])


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def remove_cgroup(cgroup: Path, timeout: float = 10) -> None:
    """Kill whatever is still inside, then remove the cgroup and its children, deepest first."""
    if not cgroup.exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        pids = [int(p) for procs in cgroup.rglob("cgroup.procs") for p in procs.read_text().split()]
        if not pids:
            break
        if time.monotonic() > deadline:
            raise CommandError(f"{cgroup}: processes {pids} do not die")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    for directory in sorted((p for p in cgroup.rglob("*") if p.is_dir()),
                            key=lambda p: len(p.parts), reverse=True):
        directory.rmdir()
    cgroup.rmdir()
