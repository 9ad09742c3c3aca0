"""`gatewayctl status`, `teardown` and `check-config`: commands run on a gateway or cloud node."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import IO, Any

from gatewayd.agent.config import AgentConfig, load_agent_config
from gatewayd.agent.footprint import GatewayFootprint
from gatewayd.configfile import ConfigError, read_config, read_config_stream
from gatewayd.follower import pid_file
from gatewayd.footprint import Footprint
from gatewayd.policy.safeload import STDIN, STDIN_NAME
from gatewayd.runtime import read_json
from gatewayd.steer.config import SteerConfig, load_steer_config
from gatewayd.steer.footprint import NodeFootprint

DEFAULT_CONFIG = Path("/etc/gatewayd/gatewayd.yaml")
DEFAULT_STATE_DIRECTORY = Path("/var/lib/gatewayd")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser("status", help="what this host's daemon serves, live")
    status.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    status.add_argument("-o", "--output", choices=("text", "json"), default="text")
    status.add_argument("--wait-ready", action="store_true",
                        help="wait until the daemon reports ready (exit 1 on timeout)")
    status.add_argument("--timeout", type=float, default=60.0, help="for --wait-ready, seconds")
    status.set_defaults(func=run_status)

    teardown = commands.add_parser(
        "teardown", help="remove everything the daemon programmed (stop the daemon first)")
    teardown.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    teardown.add_argument("--force", action="store_true", help="even if the daemon runs")
    teardown.add_argument(
        "--state-directory", type=Path, default=DEFAULT_STATE_DIRECTORY,
        help="a gateway's state directory, used when the config cannot be read")
    teardown.set_defaults(func=run_teardown)

    check = commands.add_parser("check-config", help="validate a gatewayd or steer config file")
    check.add_argument("path", type=Path, nargs="?", default=DEFAULT_CONFIG,
                       help=f"the file, or - for standard input (default {DEFAULT_CONFIG})")
    check.set_defaults(func=run_check_config)


def load_host_config(path: Path) -> AgentConfig | SteerConfig:
    """A steer config names its `node`; a gateway config names itself with `name`."""
    if "node" in read_config(path).data:  # raises ConfigError for a file it cannot read
        return load_steer_config(path)
    return load_agent_config(path)


def load_piped_config(stdin: IO[bytes]) -> AgentConfig | SteerConfig:
    """`load_host_config` of a config piped in: standard input is read once."""
    top = read_config_stream(stdin)
    if "node" in top.data:
        return load_steer_config(top.file, top)
    return load_agent_config(top.file, top)


def footprint_of(config: AgentConfig | SteerConfig) -> Footprint:
    """What the daemon of `config` programs on this host."""
    if isinstance(config, SteerConfig):
        return NodeFootprint(config)
    return GatewayFootprint.of(config)


def run_check_config(args: argparse.Namespace) -> int:
    piped = str(args.path) == STDIN
    try:
        config = load_piped_config(sys.stdin.buffer) if piped else load_host_config(args.path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{STDIN_NAME if piped else args.path}: valid {footprint_of(config).kind} "
          "configuration")
    return 0


def _config_or_exit(path: Path) -> AgentConfig | SteerConfig | None:
    try:
        return load_host_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


# --- status -------------------------------------------------------------------------------


def collect_status(footprint: Footprint) -> dict[str, Any]:
    """The daemon's own report plus what the kernel says right now."""
    from gatewayd.dataplane.nftables import NftablesDriver
    from gatewayd.dataplane.wireguard import WireGuardDriver

    state = footprint.state_directory
    try:
        report: dict[str, Any] = read_json(state / "status.json")
    except (OSError, ValueError):
        report = {"ready": False, "lastError": "no status yet: the daemon has not run"}
    report["running"] = pid_file(state, footprint.role).running_pid() is not None
    report["counters"] = {
        name: {"packets": packets, "bytes": size}
        for name, (packets, size) in sorted(NftablesDriver(*footprint.table).counters().items())
    }
    wireguard = WireGuardDriver()
    peers = []
    for interface in footprint.tunnel_interfaces():
        observed = wireguard.observe(interface)
        for peer in observed.peers if observed else ():
            peers.append({
                "interface": interface,
                "publicKey": peer.public_key,
                "endpoint": peer.endpoint,
                "latestHandshake": peer.latest_handshake,
                "rxBytes": peer.rx_bytes,
                "txBytes": peer.tx_bytes,
            })
    report["peers"] = peers
    report.update(footprint.observe())
    return report


def format_status(report: dict[str, Any]) -> str:
    who = report.get("name") or report.get("node") or "?"
    lines = [
        f"{report.get('role', '?')} {who}: {'ready' if report.get('ready') else 'NOT READY'}, "
        f"daemon {report.get('version', '(version unknown)')} "
        f"{'running' if report.get('running') else 'not running'}, "
        f"plan generation {report.get('generation', 0)} applied {report.get('appliedAt') or '-'}",
        "policies: " + (", ".join(report.get("policies", [])) or "none"),
    ]
    if "egressIPs" in report:
        present = set(report.get("egressIPsPresent", []))
        lines.append("egress IPs: " + (", ".join(
            f"{ip} ({'present' if ip in present else 'MISSING'})" for ip in report["egressIPs"]
        ) or "none"))
    now = time.time()
    for peer in report.get("peers", []):
        handshake = peer["latestHandshake"]
        ago = f"{now - handshake:.0f}s ago" if handshake else "never"
        lines.append(f"peer {peer['publicKey'][:10]}… on {peer['interface']} "
                     f"endpoint {peer['endpoint'] or '-'}: handshake {ago}, "
                     f"rx {peer['rxBytes']} B, tx {peer['txBytes']} B")
    for name, value in report.get("counters", {}).items():
        lines.append(f"counter {name}: {value['packets']} packets, {value['bytes']} bytes")
    lines.append(f"drift repaired: {report.get('driftRepaired', 0)} times"
                 + (f", last at {report['lastDriftAt']}" if report.get("lastDriftAt") else ""))
    api = report.get("apiServer")
    if isinstance(api, dict):
        lines.append(f"API server {api.get('server')}: " + (
            "connected" if api.get("connected") else f"NOT CONNECTED: {api.get('error')}"))
    for problem in report.get("inputProblems", []):
        lines.append(f"input problem: {problem}")
    if report.get("lastError"):
        lines.append(f"last error: {report['lastError']}")
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    config = _config_or_exit(args.config)
    if config is None:
        return 2
    deadline = time.monotonic() + args.timeout
    footprint = footprint_of(config)
    report = collect_status(footprint)
    while args.wait_ready and not report.get("ready") and time.monotonic() < deadline:
        time.sleep(0.5)
        report = collect_status(footprint)
    if args.output == "json":
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_status(report))
    if args.wait_ready and not report.get("ready"):
        print(f"not ready after {args.timeout:.0f}s", file=sys.stderr)
        return 1
    return 0


# --- teardown -----------------------------------------------------------------------------


def run_teardown(args: argparse.Namespace) -> int:
    """A config that cannot be read does not stop a teardown (package removal runs it): a
    gateway's state directory records what was programmed."""
    try:
        config: AgentConfig | SteerConfig | None = load_host_config(args.config)
    except ConfigError as exc:
        print(f"{exc}\nthe config is unusable: removing what {args.state_directory} records",
              file=sys.stderr)
        config = None
    footprint = footprint_of(config) if config is not None else \
        GatewayFootprint(args.state_directory)
    pid = pid_file(footprint.state_directory, footprint.role).running_pid()
    if pid is not None and not args.force:
        print(f"the {footprint.role} daemon runs (pid {pid}) and would program everything "
              "again; stop it first (systemctl stop gatewayd) or pass --force", file=sys.stderr)
        return 1
    removed = footprint.teardown()
    for item in removed:
        print(f"removed {item}")
    return 0
