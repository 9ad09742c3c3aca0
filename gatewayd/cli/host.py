"""`gatewayctl status`, `teardown` and `check-config`: commands run on a gateway or cloud node."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import IO, Any

from gatewayd.agent.config import AgentConfig, load_agent_config
from gatewayd.configfile import ConfigError, read_config, read_config_stream
from gatewayd.follower import pid_file
from gatewayd.policy.safeload import STDIN, STDIN_NAME
from gatewayd.runtime import read_json
from gatewayd.steer.config import SteerConfig, load_steer_config
from gatewayd.steer.slots import slots_path, tunnel_interfaces

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


def run_check_config(args: argparse.Namespace) -> int:
    piped = str(args.path) == STDIN
    try:
        config = load_piped_config(sys.stdin.buffer) if piped else load_host_config(args.path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    role = "steer" if isinstance(config, SteerConfig) else "gateway"
    print(f"{STDIN_NAME if piped else args.path}: valid {role} configuration")
    return 0


def _config_or_exit(path: Path) -> AgentConfig | SteerConfig | None:
    try:
        return load_host_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


# --- status -------------------------------------------------------------------------------


def collect_status(config: AgentConfig | SteerConfig) -> dict[str, Any]:
    """The daemon's own report plus what the kernel says right now."""
    from gatewayd.dataplane.nftables import NftablesDriver
    from gatewayd.dataplane.wireguard import WireGuardDriver

    state = config.state_directory
    try:
        report: dict[str, Any] = read_json(state / "status.json")
    except (OSError, ValueError):
        report = {"ready": False, "lastError": "no status yet: the daemon has not run"}
    report["running"] = pid_file(state, "steer" if isinstance(config, SteerConfig) else
                                 "agent").running_pid() is not None
    if isinstance(config, AgentConfig):
        table, interfaces = ("inet", "gatewayd"), [config.tunnel.interface]
    else:
        table, interfaces = ("inet", "gatewayd-steer"), tunnel_interfaces(config)
    report["counters"] = {
        name: {"packets": packets, "bytes": size}
        for name, (packets, size) in sorted(NftablesDriver(*table).counters().items())
    }
    wireguard = WireGuardDriver()
    peers = []
    for interface in interfaces:
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
    if isinstance(config, AgentConfig):
        from gatewayd.dataplane.addresses import AddressDriver

        present = set()
        for interface in {config.uplink, *(p.interface for p in config.egress_ip_pools)}:
            present |= {str(ip) for ip in AddressDriver().observe(interface)}
        report["egressIPsPresent"] = sorted(present)
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
    report = collect_status(config)
    while args.wait_ready and not report.get("ready") and time.monotonic() < deadline:
        time.sleep(0.5)
        report = collect_status(config)
    if args.output == "json":
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_status(report))
    if args.wait_ready and not report.get("ready"):
        print(f"not ready after {args.timeout:.0f}s", file=sys.stderr)
        return 1
    return 0


# --- teardown -----------------------------------------------------------------------------


def teardown(config: AgentConfig | SteerConfig) -> list[str]:
    """Remove what the daemon of `config` programmed; returns what was removed."""
    if isinstance(config, AgentConfig):
        return teardown_gateway(config.state_directory, config.tunnel.interface)
    return _teardown_steer(config)


def teardown_gateway(state: Path, configured_tunnel: str | None = None) -> list[str]:
    """Remove what the agent programmed, as its state directory records it (the config's
    tunnel too, if there is a config): first the tunnel, so that no more traffic arrives,
    then the table (filter and SNAT) and its routing guard, the egress IPs, and the kernel
    parameters go back to their values before the agent changed them. Then the saved plan and
    the records go, so a later start does not restore the plan. Returns what was removed, in
    that order."""
    from gatewayd.agent.footprint import programmed_path, recorded_tunnels, sysctl_originals_path
    from gatewayd.dataplane.addresses import AddressDriver
    from gatewayd.dataplane.forward_guard import remove_forward_guard
    from gatewayd.dataplane.nftables import NftablesDriver
    from gatewayd.dataplane.sysctl import restore_sysctls
    from gatewayd.dataplane.wireguard import WireGuardDriver

    removed = []
    wireguard = WireGuardDriver()
    tunnels = {*recorded_tunnels(state), *([configured_tunnel] if configured_tunnel else [])}
    for interface in sorted(tunnels):
        if wireguard.delete(interface):
            removed.append(f"wireguard interface {interface}")
    if NftablesDriver("inet", "gatewayd").delete():
        removed.append("nftables table inet gatewayd")
    removed += [f"routing guard {rule}" for rule in remove_forward_guard()]
    changes = AddressDriver().remove_all()
    removed += [f"egress IP {ip}" for ip in sorted(map(str, changes.removed))]
    removed += [f"sysctl {key} (restored)"
                for key in restore_sysctls(sysctl_originals_path(state))]
    for path in (state / "plan.json", programmed_path(state)):
        if path.exists():
            path.unlink()
            removed.append(str(path))
    return removed


def _teardown_steer(config: SteerConfig) -> list[str]:
    from gatewayd.dataplane.nftables import NftablesDriver
    from gatewayd.dataplane.routing import PolicyRoutingDriver
    from gatewayd.dataplane.wireguard import WireGuardDriver

    removed = []
    if NftablesDriver("inet", "gatewayd-steer").delete():
        removed.append("nftables table inet gatewayd-steer")
    if PolicyRoutingDriver(mark_mask=config.mark_mask).ensure({}):
        removed.append("policy routing rules")
    wireguard = WireGuardDriver()
    for interface in tunnel_interfaces(config):
        if wireguard.delete(interface):
            removed.append(f"wireguard interface {interface}")
    # The slots go too: no tunnel is left to keep its slot for.
    for path in (config.state_directory / "plan.json", slots_path(config)):
        if path.exists():
            path.unlink()
            removed.append(str(path))
    return removed


def run_teardown(args: argparse.Namespace) -> int:
    """A config that cannot be read does not stop a teardown (package removal runs it): a
    gateway's state directory records what was programmed."""
    try:
        config: AgentConfig | SteerConfig | None = load_host_config(args.config)
    except ConfigError as exc:
        print(f"{exc}\nthe config is unusable: removing what {args.state_directory} records",
              file=sys.stderr)
        config = None
    role = "steer" if isinstance(config, SteerConfig) else "agent"
    state = config.state_directory if config is not None else args.state_directory
    pid = pid_file(state, role).running_pid()
    if pid is not None and not args.force:
        print(f"the {role} daemon runs (pid {pid}) and would program everything again; "
              "stop it first (systemctl stop gatewayd) or pass --force", file=sys.stderr)
        return 1
    removed = teardown(config) if config is not None else teardown_gateway(state)
    for item in removed:
        print(f"removed {item}")
    return 0
