"""`gatewayctl validate -f FILE...`: check policies before they reach a cluster or a gateway.

Exit status: 0 when every policy is valid, 1 when some policy is invalid (one line per problem
on stdout, `FILE: Kind/name: field.path: message`), 2 when the input cannot be read at all.
"""

from __future__ import annotations

import argparse
import sys

from gatewayd.policy.safeload import STDIN, STDIN_NAME
from gatewayd.policy.snapshot import SnapshotError, load_snapshot

PROG = "gatewayctl validate"
DESCRIPTION = (
    "Validate EgressGatewayPolicy and CiliumEgressGatewayPolicy objects in YAML or JSON files"
    " (multi-document, or a List as `kubectl get -o yaml` prints it). Other kinds are read"
    " only to check they are well-formed."
)
EXIT_VALID = 0
EXIT_INVALID = 1
EXIT_UNUSABLE = 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "validate", help="validate policy files", description=DESCRIPTION
    )
    _add_arguments(parser)
    parser.set_defaults(func=run)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE",
        help="a file, a directory whose *.yaml, *.yml and *.json files are read, or - for "
        "standard input (YAML, or JSON when it starts with { or [); repeatable",
    )


def run(args: argparse.Namespace) -> int:
    paths: list[str] = args.filename
    try:
        loaded = load_snapshot(paths, stdin=sys.stdin.buffer)
    except SnapshotError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_UNUSABLE
    valid = len(loaded.snapshot.policies)
    inputs = ", ".join(STDIN_NAME if path == STDIN else path for path in paths)
    if loaded.problems:
        for problem in loaded.problems:
            print(problem)
        invalid = len({(p.file, p.kind, p.name) for p in loaded.problems})
        print(
            f"{PROG}: {inputs}: {_count(invalid)} invalid, {_count(valid)} valid",
            file=sys.stderr,
        )
        return EXIT_INVALID
    if valid == 0:
        print(f"{inputs}: no policies found")
    else:
        print(f"{inputs}: {_count(valid)} valid")
    return EXIT_VALID


def _count(policies: int) -> str:
    return f"{policies} {'policy' if policies == 1 else 'policies'}"
