"""`gatewayd`: the daemons (`agent` on a gateway host, `steer` on a cloud node)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gatewayd.runtime import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatewayd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    roles = parser.add_subparsers(dest="role", required=True)
    agent = roles.add_parser("agent", help="run the gateway daemon (standalone mode)")
    agent.add_argument("--config", type=Path, default=Path("/etc/gatewayd/gatewayd.yaml"))
    steer = roles.add_parser("steer", help="run the cloud-node daemon (standalone mode)")
    steer.add_argument("--config", type=Path, default=Path("/etc/gatewayd/steer.yaml"))
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    # Imported here so `gatewayd --help` works without the data plane libraries.
    if args.role == "agent":
        from gatewayd.agent.daemon import run_agent

        return run_agent(args.config)
    from gatewayd.steer.daemon import run_steer

    return run_steer(args.config)


if __name__ == "__main__":
    sys.exit(main())
