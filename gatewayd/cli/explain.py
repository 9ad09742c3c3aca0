"""`gatewayctl explain -f SNAPSHOT --src IP --dst IP`: what happens to one new connection.

Runs the same engine as the controller on a snapshot (Kubernetes objects as `kubectl get -o
yaml` prints them) and prints the verdict: snat (through which gateway, with which egress IP),
excluded, drop (no-egress-gateway or no-egress-ip) or no-policy, and why.

Exit status: 0 for any verdict; 2 when the input is unusable (unreadable snapshot, bad --src or
--dst). Invalid policies are reported on stderr and left out, as the controller does.

With `--live` instead of `-f`, the answer comes from this host's kernel (see `explain_live`).
"""

from __future__ import annotations

import argparse
import json
import sys
from ipaddress import ip_address
from pathlib import Path

from gatewayd.cli.host import DEFAULT_CONFIG
from gatewayd.policy.engine import Explanation, build_plan
from gatewayd.policy.model import IPAddress, Verdict
from gatewayd.policy.snapshot import SnapshotError, load_snapshot

PROG = "gatewayctl explain"
DESCRIPTION = (
    "Explain what the egress policies of a snapshot do to a new connection from a pod IP"
    " (--src) to a destination (--dst): snat through a gateway, excluded, drop or no-policy."
)
EXIT_OK = 0
EXIT_UNUSABLE = 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "explain", help="explain the verdict for one connection", description=DESCRIPTION
    )
    _add_arguments(parser)
    parser.set_defaults(func=run)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--filename",
        action="append",
        metavar="SNAPSHOT",
        help="a snapshot file, a directory of *.yaml, *.yml and *.json files, or - for "
        "standard input (YAML, or JSON when it starts with { or [); repeatable",
    )
    parser.add_argument("--src", required=True, metavar="IP", help="source: a pod's IP")
    parser.add_argument("--dst", required=True, metavar="IP", help="destination IP")
    parser.add_argument(
        "-o", "--output", choices=("text", "json"), default="text", help="output format"
    )
    parser.add_argument(
        "--live", action="store_true",
        help="instead of a snapshot: what this host's kernel does now (its nftables sets), "
        "and whether that differs from the plan the daemon saved",
    )
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG,
        help=f"with --live: this host's gatewayd or steer config (default {DEFAULT_CONFIG})",
    )


def run(args: argparse.Namespace) -> int:
    src = _address(args.src, "--src")
    dst = _address(args.dst, "--dst")
    if src is None or dst is None:
        return EXIT_UNUSABLE
    if src.version != dst.version:
        _error(
            f"--src {src} is IPv{src.version} but --dst {dst} is IPv{dst.version}; "
            "give two addresses of the same family"
        )
        return EXIT_UNUSABLE
    if args.live == bool(args.filename):
        _error("give a snapshot (-f SNAPSHOT) or --live for this host's kernel, one of them")
        return EXIT_UNUSABLE
    if args.live:
        from gatewayd.cli.explain_live import run_live

        return run_live(args, src, dst)
    try:
        loaded = load_snapshot(args.filename, stdin=sys.stdin.buffer)
    except SnapshotError as e:
        _error(str(e))
        return EXIT_UNUSABLE
    for problem in loaded.problems:
        print(f"{PROG}: warning: policy left out: {problem}", file=sys.stderr)
    explanation = build_plan(loaded.snapshot).explain(src, dst)
    if args.output == "json":
        print(json.dumps(to_json(explanation), indent=2))
    else:
        print(to_text(explanation, src, dst))
    return EXIT_OK


def _address(text: str, option: str) -> IPAddress | None:
    try:
        return ip_address(text)
    except ValueError:
        _error(f"{option}: {text!r} is not an IP address; expected e.g. 10.0.1.5 or fd00::5")
        return None


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _text(value: object | None) -> str | None:
    return None if value is None else str(value)


def to_json(explanation: Explanation) -> dict[str, object]:
    """The `-o json` object: verdict, gateway, egressIP, policy, reason, then the extras."""
    return {
        "verdict": explanation.verdict.value,
        "gateway": explanation.gateway,
        "egressIP": _text(explanation.egress_ip),
        "policy": explanation.policy,
        "reason": explanation.reason,
        "standby": explanation.standby,
        "cidr": _text(explanation.cidr),
        "pod": explanation.pod,
        "details": list(explanation.details),
    }


def to_text(explanation: Explanation, src: IPAddress, dst: IPAddress) -> str:
    """A short human explanation: the verdict line, then the reasoning."""
    e = explanation
    if e.verdict is Verdict.SNAT:
        standby = f" (standby {e.standby})" if e.standby else ""
        headline = (
            f"SNAT: {src} -> {dst} leaves through gateway {e.gateway}{standby} as {e.egress_ip}"
        )
    elif e.verdict is Verdict.DROP:
        via = f" at gateway {e.gateway}" if e.gateway else ""
        headline = f"DROP ({e.reason}): {src} -> {dst} is dropped{via}"
    elif e.verdict is Verdict.EXCLUDED:
        headline = f"EXCLUDED: {src} -> {dst} is not redirected ({e.reason})"
    else:
        headline = f"NO POLICY: {src} -> {dst} is not redirected ({e.reason})"
    lines = [headline]
    if e.policy:
        lines.append(f"  policy: {e.policy}" + (f", CIDR {e.cidr}" if e.cidr else ""))
    lines += [f"  - {line}" for line in e.details]
    return "\n".join(lines)
