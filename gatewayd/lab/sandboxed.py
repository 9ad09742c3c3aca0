"""One daemon in Kubernetes mode in a throwaway network namespace, with its API server.

For the daemons' Kubernetes tests: the host namespace has an `eth0` (a veth to a second
namespace) with 198.51.100.2/24 and a default route, and the API server the caller provides
listens inside the host namespace on its loopback, so the daemon reaches it and nothing
outside the sandbox sees it. The daemon programs only the sandbox.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from gatewayd.lab.kubelab import ApiServer
from gatewayd.lab.netns import Sandbox, entered, run, stop_process, wait_for

HOST_ADDRESS = "198.51.100.2"
ROUTER_ADDRESS = "198.51.100.1"
WIREGUARD_SOCKETS = Path("/var/run/wireguard")


class DaemonSandbox:
    def __init__(self, prefix: str, directory: Path, api: ApiServer) -> None:
        self.box = Sandbox(prefix)
        self.directory = directory
        self.api = api
        self.netns = ""
        self.interfaces: set[str] = set()  # WireGuard interfaces to clean up after
        self._daemon: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DaemonSandbox:
        try:
            self.netns = self.box.netns("host")
            other = self.box.netns("net")
            self.box.veth(self.netns, "eth0", other, "eth0")
            run(["ip", "addr", "add", f"{HOST_ADDRESS}/24", "dev", "eth0"], self.netns)
            run(["ip", "addr", "add", f"{ROUTER_ADDRESS}/24", "dev", "eth0"], other)
            run(["ip", "route", "add", "default", "via", ROUTER_ADDRESS], self.netns)
            self.api_up()
            self.box.on_close("API server", self.api.stop)
            self.kubeconfig.write_text(yaml.safe_dump(self.api.kubeconfig_dict()))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._daemon is not None:
            stop_process(self._daemon)
        try:
            self.box.close()
        finally:
            for name in self.interfaces:
                (WIREGUARD_SOCKETS / f"{name}.sock").unlink(missing_ok=True)

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    @property
    def log_path(self) -> Path:
        return self.directory / "daemon.log"

    def api_up(self) -> None:
        with entered(self.netns):  # the listening socket belongs to the sandbox
            self.api.start()

    def write_config(self, config: dict[str, Any]) -> Path:
        path = self.directory / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self, role: str, config: dict[str, Any]) -> subprocess.Popen[bytes]:
        """Start `gatewayd ROLE` with `config` (written to config.yaml) in the sandbox."""
        if self._daemon is not None and self._daemon.poll() is None:
            raise RuntimeError("the daemon is already running")
        path = self.write_config(config)
        self._daemon = self.box.spawn(
            self.netns, [sys.executable, "-m", "gatewayd.cli.gatewayd", role, "--config",
                         str(path)],
            self.log_path, {"PYTHONUNBUFFERED": "1"},
        )
        return self._daemon

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15) -> int | None:
        """Signal the daemon only (its wireguard-go must survive) and wait for its exit."""
        daemon, self._daemon = self._daemon, None
        if daemon is None or daemon.poll() is not None:
            return daemon.returncode if daemon else None
        daemon.send_signal(sig)
        return daemon.wait(timeout)

    def signal(self, sig: signal.Signals) -> None:
        """Send the running daemon `sig` (SIGHUP: what `systemctl reload` does)."""
        if self._daemon is None or self._daemon.poll() is not None:
            raise RuntimeError("the daemon is not running")
        self._daemon.send_signal(sig)

    @property
    def running(self) -> bool:
        return self._daemon is not None and self._daemon.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def events(self, event: str) -> int:
        """How many journal events of kind `event` the daemon logged (events go to its log)."""
        text = self.log()
        return text.count(f"[event={event} ") + text.count(f"[event={event}]")

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll `condition` with a deadline; the daemon's log tail is in the error."""
        try:
            return wait_for(condition, timeout, what, 0.05)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; daemon log:\n{self.log()[-3000:]}") from None

    def nft(self, *args: str) -> str:
        return run(["nft", *args], self.netns, check=False).stdout

    def cmd(self, *argv: str) -> str:
        return run(list(argv), self.netns, check=False).stdout
