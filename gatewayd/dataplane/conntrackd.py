"""Connection state shared between gateways: conntrackd (conntrack-tools) in sync mode.

Every gateway runs one conntrackd, a child of the agent, in FTFW mode with the external cache
disabled: the flows the gateway forwards are sent to the other gateways on the uplink's L2
segment (multicast), and the flows they send are written straight into this gateway's kernel
conntrack table, NAT binding included. A gateway that becomes active for a policy (a fast
failover, a planned stop) therefore has the state of the connections it takes over before
their first packet arrives, and no commit step is needed at takeover (see README.md,
"Connections that survive a failover", for the choice).

Only the flows gatewayd SNATs are shared: TCP and UDP whose original source is in the
tunnel peers' allowed IPs (the pod CIDRs), and only TCP states worth keeping.

`render_conntrackd_config` is pure; `ConntrackdDriver` writes the file and runs the daemon.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from gatewayd.policy.model import IPNetwork

log = logging.getLogger("gatewayd.agent")

# One group per segment: every gatewayd gateway on it shares state with the others.
MULTICAST_GROUP = IPv4Address("225.0.0.51")
MULTICAST_PORT = 3781
# Socket buffers of the sync link (bytes), as conntrack-tools' examples suggest for busy hosts.
SYNC_SOCKET_BUFFER = 1249280
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class SyncSettings:
    interface: str  # the uplink: the gateways of a policy share its L2 segment
    interface_address: IPv4Address
    sources: tuple[IPNetwork, ...]  # the pod CIDRs: only flows from these are shared
    directory: Path  # config, lock file, control socket, log


def config_path(directory: Path) -> Path:
    return directory / "conntrackd.conf"


def render_conntrackd_config(settings: SyncSettings) -> str:
    """conntrackd.conf for `settings`."""
    directory = settings.directory
    addresses = "\n".join(
        f"            IPv{n.version}_address {n}" for n in _ordered(settings.sources)
    )
    return f"""# Written by gatewayd agent; changes are overwritten.
Sync {{
    Mode FTFW {{
        DisableExternalCache On
    }}
    Multicast {{
        IPv4_address {MULTICAST_GROUP}
        Group {MULTICAST_PORT}
        IPv4_interface {settings.interface_address}
        Interface {settings.interface}
        SndSocketBuffer {SYNC_SOCKET_BUFFER}
        RcvSocketBuffer {SYNC_SOCKET_BUFFER}
        Checksum on
    }}
}}
General {{
    HashSize 8192
    HashLimit 262144
    LogFile {directory / "conntrackd.log"}
    Syslog off
    LockFile {directory / "conntrackd.lock"}
    UNIX {{
        Path {directory / "conntrackd.ctl"}
    }}
    NetlinkBufferSize 2097152
    NetlinkBufferSizeMaxGrowth 8388608
    Filter From Userspace {{
        Protocol Accept {{
            TCP
            UDP
        }}
        Address Accept {{
{addresses}
        }}
        State Accept {{
            ESTABLISHED CLOSED TIME_WAIT CLOSE_WAIT for TCP
        }}
    }}
}}
"""


def _ordered(networks: Iterable[IPNetwork]) -> list[IPNetwork]:
    return sorted(set(networks), key=lambda n: (n.version, int(n.network_address), n.prefixlen))


class ConntrackdDriver:
    """Runs conntrackd with the rendered config; restarts it when the config changes or it
    died. The daemon is the agent's child and dies with it (a gateway that loses power
    loses it too; the other gateways keep the state it shared)."""

    def __init__(self, binary: str = "conntrackd") -> None:
        self.binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._config: str | None = None
        self._settings: SyncSettings | None = None

    def available(self) -> bool:
        return shutil.which(self.binary) is not None

    def ensure(self, settings: SyncSettings) -> bool:
        """Run conntrackd for `settings`; True when it was (re)started."""
        text = render_conntrackd_config(settings)
        if self.running() and text == self._config:
            return False
        self.stop()
        settings.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = config_path(settings.directory)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        # A lock file left by a daemon that was killed would stop the new one from starting.
        (settings.directory / "conntrackd.lock").unlink(missing_ok=True)
        self._process = subprocess.Popen(
            [self.binary, "-C", str(path)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        self._config, self._settings = text, settings
        log.info("conntrackd started (pid %d) with %s", self._process.pid, path)
        return True

    def resync(self, settings: SyncSettings) -> None:
        """After a (re)start: forget the flows conntrackd read from this gateway's kernel (see
        `forget_own_flows`; a restarted agent has handed its egress IPs over), then ask the
        other gateways for the flows they carry."""
        self._request(settings, "-f", "internal")
        self._request(settings, "-n")

    def forget_own_flows(self) -> None:
        """This gateway gave egress IPs up: another gateway carries their connections now, with
        the state it got from us. conntrackd forgets the flows it has sent (its internal cache;
        nothing is sent, the kernel keeps its entries). Otherwise, when our stale copy of such
        a flow expires, conntrackd sends its end to the other gateways, and one whose client
        reused the port meanwhile deletes that new connection's entry (seen in the lab: the
        server's SYN-ACK then found no NAT state and was dropped). Flows this gateway still
        carries are sent again at their next change of state."""
        if self.running() and self._settings is not None:
            self._request(self._settings, "-f", "internal")

    def _request(self, settings: SyncSettings, *argv: str) -> None:
        subprocess.run([self.binary, "-C", str(config_path(settings.directory)), *argv],
                       check=False, timeout=5, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        process, self._process = self._process, None
        self._config = None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _die_with_parent() -> None:
    """In the child: SIGKILL when the agent dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)
