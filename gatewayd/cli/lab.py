"""`gatewayctl lab up|verify|down`: gatewayd end to end in network namespaces on this host."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gatewayd.lab.netns import CommandError
from gatewayd.lab.topology import DEFAULT_DIRECTORY, EXAMPLE_SNAPSHOT, Lab, LabError, lab_up
from gatewayd.lab.verify import render_json, render_text, verify
from gatewayd.policy.snapshot import SnapshotError


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = commands.add_parser(
        "lab", help="a throwaway lab (namespaces, gateways, cloud nodes, pods) on this host",
        description=__doc__,
    )
    actions = lab.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    directory = argparse.ArgumentParser(add_help=False)
    directory.add_argument("--dir", type=Path, default=DEFAULT_DIRECTORY,
                           help=f"the lab's directory (default {DEFAULT_DIRECTORY})")

    up = actions.add_parser("up", parents=[directory],
                            help="build the lab, start the daemons, wait until they are ready")
    up.add_argument("--snapshot", type=Path, default=EXAMPLE_SNAPSHOT,
                    help="snapshot file or directory to copy into the lab "
                         f"(default {EXAMPLE_SNAPSHOT})")
    up.add_argument("--no-daemons", action="store_true",
                    help="build the network only (verify then shows what fails without them)")
    up.add_argument("--timeout", type=float, default=60,
                    help="seconds to wait for the daemons to report ready (default 60)")

    check = actions.add_parser("verify", parents=[directory],
                               help="probe every pod against the policies; exit 0 iff all OK")
    check.add_argument("-o", "--output", choices=("text", "json"), default="text")

    actions.add_parser("down", parents=[directory],
                       help="stop the daemons and delete the lab's namespaces (idempotent)")
    lab.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.lab_command == "up":
            return _up(args)
        if args.lab_command == "verify":
            return _verify(args)
        return _down(args)
    except (LabError, CommandError, SnapshotError, TimeoutError) as exc:
        print(f"gatewayctl lab {args.lab_command}: {exc}", file=sys.stderr)
        return 1


def _up(args: argparse.Namespace) -> int:
    lab = lab_up(args.dir, args.snapshot, start_daemons=not args.no_daemons,
                 ready_timeout=args.timeout)
    print(f"lab up in {lab.directory}: snapshot {lab.snapshot_dir}, "
          f"logs {lab.directory}/*/daemon.log")
    print(f"next: gatewayctl lab verify --dir {lab.directory}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    lab = Lab(args.dir)
    if not lab.exists():
        raise LabError(f"no lab in {lab.directory}; start one with "
                       f"`gatewayctl lab up --dir {lab.directory}`")
    rows = verify(lab.snapshot_dir)
    print(render_json(rows) if args.output == "json" else render_text(rows), end="")
    return 0 if all(row.ok for row in rows) else 1


def _down(args: argparse.Namespace) -> int:
    deleted = Lab(args.dir).down()
    print(f"lab down: deleted {len(deleted)} namespaces" if deleted
          else f"lab down: no lab in {args.dir.absolute()}")
    return 0
