"""`gatewayd`: the daemons (`agent` on a gateway host, `steer` on a cloud node, `controller` in
the cluster)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from gatewayd.clustersettings import DEFAULT_NAMESPACE
from gatewayd.metrics import DEFAULT_ADDRESS as DEFAULT_METRICS_ADDRESS
from gatewayd.metrics import MetricsSettings
from gatewayd.runtime import setup_logging
from gatewayd.version import VERSION


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatewayd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    roles = parser.add_subparsers(dest="role", required=True)
    agent = roles.add_parser(
        "agent", help="run the gateway daemon (standalone mode with `snapshot:` in the config, "
        "Kubernetes mode with `kubernetes:`)")
    agent.add_argument("--config", type=Path, default=Path("/etc/gatewayd/gatewayd.yaml"))
    _add_metrics_arguments(agent)
    steer = roles.add_parser(
        "steer", help="run the cloud-node daemon (standalone or Kubernetes mode, as the config "
        "says; in a pod without the config file: Kubernetes mode with its service account)")
    steer.add_argument("--config", type=Path, default=Path("/etc/gatewayd/steer.yaml"))
    steer.add_argument(
        "--teardown", action="store_true",
        help="remove what steer programmed on this node (table, policy routing, tunnels, "
        "slots) and exit; the daemon must not run (packaging/kubernetes/cleanup runs this on "
        "every node once the steer DaemonSet is gone)")
    _add_metrics_arguments(steer)
    _add_controller_parser(roles)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    # Imported here so `gatewayd --help` works without the data plane libraries.
    if args.role == "agent":
        from gatewayd.agent.daemon import run_agent

        return run_agent(args.config, _metrics_options(args))
    if args.role == "controller":
        return _run_controller(args)
    if args.teardown:
        return _teardown_steer(args.config)
    from gatewayd.steer.daemon import run_steer

    return run_steer(args.config, _metrics_options(args))


def _teardown_steer(config_path: Path) -> int:
    """The steer config is read as the daemon reads it (in a pod without the file: from the
    pod's environment), so the cleanup removes what that node's daemon made."""
    from gatewayd.configfile import ConfigError
    from gatewayd.steer.config import load_steer_config
    from gatewayd.steer.footprint import NodeFootprint

    try:
        config = load_steer_config(config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    for item in NodeFootprint(config).teardown():
        print(f"removed {item}")
    return 0


def _add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-address", type=_metrics_address,
        help="HOST:PORT of the Prometheus /metrics listener, `none` for none; wins over the "
        f"config's metrics.address (default {DEFAULT_METRICS_ADDRESS}: this host only)")
    parser.add_argument(
        "--metrics-textfile", type=Path,
        help="also write the metrics to this file for node_exporter's textfile collector "
        "(a *.prom file in its --collector.textfile.directory); wins over the config's "
        "metrics.textfile")


def _metrics_address(text: str) -> str:
    from gatewayd.metrics import parse_address

    if text.lower() not in ("", "none"):
        try:
            parse_address(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _metrics_options(args: argparse.Namespace) -> MetricsSettings:
    """What the flags say; the daemon fills in the rest from its config file."""
    return MetricsSettings(args.metrics_address, args.metrics_textfile)


def _add_controller_parser(roles: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    controller = roles.add_parser(
        "controller",
        help="run the in-cluster controller (leader-elected; plans every gateway and node)",
    )
    controller.add_argument(
        "--kubeconfig",
        type=Path,
        help="kubeconfig file (default: the pod's service account, in the cluster)",
    )
    controller.add_argument(
        "--namespace",
        default=os.environ.get("GATEWAYD_NAMESPACE") or DEFAULT_NAMESPACE,
        help="namespace of the Leases: the controller's and the gateways' "
        "(default: $GATEWAYD_NAMESPACE, else gatewayd-system)",
    )
    controller.add_argument(
        "--cilium-policies",
        action="store_true",
        help="follow cilium.io/v2 CiliumEgressGatewayPolicies too",
    )
    controller.add_argument(
        "--lease-duration",
        type=_positive_int,
        default=15,
        help="seconds of the leader Lease; a standby replica takes over after that; the renew "
        "deadline and retry period are 10/15 and 2/15 of it, as client-go's (default 15)",
    )
    controller.add_argument(
        "--hold-down",
        type=_non_negative_float,
        default=30.0,
        help="seconds a recovered gateway must stay healthy before it is used again (default 30)",
    )
    controller.add_argument(
        "--health-port",
        type=_port,
        default=8081,
        help="port of /healthz and /readyz (default 8081)",
    )
    controller.add_argument(
        "--tunnel-cidr",
        type=_tunnel_cidr,
        default=ipaddress.IPv4Network("100.127.0.0/16"),
        help="IPv4 CIDR of the tunnel addresses; its first host address is every gateway's "
        "(default 100.127.0.0/16)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number of seconds >= 1")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of seconds >= 0")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a TCP port, 1-65535")
    return value


def _tunnel_cidr(text: str) -> ipaddress.IPv4Network:
    try:
        cidr = ipaddress.IPv4Network(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be an IPv4 network with its host bits zero, e.g. 100.127.0.0/16 "
            f"({error})"
        ) from None
    if cidr.prefixlen > 30:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must have a prefix length of 30 or less (a gateway address and nodes)"
        )
    return cidr


def _run_controller(args: argparse.Namespace) -> int:
    from gatewayd.controller.daemon import ControllerOptions, run_controller

    options = ControllerOptions(
        namespace=args.namespace,
        identity=os.environ.get("GATEWAYD_POD_NAME") or socket.gethostname(),
        cilium_policies=args.cilium_policies,
        lease_duration=args.lease_duration,
        hold_down=args.hold_down,
        tunnel_cidr=args.tunnel_cidr,
    )
    return run_controller(args.kubeconfig, options, args.health_port)


if __name__ == "__main__":
    sys.exit(main())
