"""The gateway agent's memory at one size: `bench_nftables.py --agent-memory` runs this in a
fresh process, in its throwaway namespace.

    python bench/agent_memory.py OBJECTS.json

It imports the agent daemon (so its libraries: the Kubernetes client, pyroute2, libnftables),
decodes the EgressGateway and its EgressSourceSlices from OBJECTS.json as the client decodes a
list response, reads them into the plan as the agent does (`target_from_object`), renders and
applies the table, then runs the repair pass's check (`ensure(verify=True)`: the table listed
back and parsed). Everything stays referenced to the end, as the agent keeps its caches, its
parsed slices, its plan and its last table. Prints the RSS after each step and the peak.
It is the agent's data path, not the whole daemon: no WireGuard, no threads, no HTTP.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from procstatus import status_kib


def memory(key: str = "VmRSS") -> float:
    """This process's `key` line of /proc/self/status, in MiB."""
    return status_kib(key) / 1024


def main(path: str) -> None:
    steps = [("python started", memory())]
    import gatewayd.agent.daemon  # noqa: F401  (the daemon's own imports)
    from gatewayd.agent.kubernetes import target_from_object
    from gatewayd.api.sourceslices import ParsedSlices
    from gatewayd.dataplane.nft_render import GatewayTableSettings, render_gateway_table
    from gatewayd.dataplane.nftables import NftablesDriver

    steps.append(("the agent's modules imported", memory()))
    objects = json.loads(Path(path).read_text())
    slices = {s["metadata"]["name"]: s for s in objects["slices"]}
    steps.append((f"spec and {len(slices)} slices decoded", memory()))
    parsed = ParsedSlices()
    target = target_from_object(objects["gateway"], slices.get, parsed)
    held = {rule.egress_ip for rule in target.plan.rules}
    table = render_gateway_table(target.plan, GatewayTableSettings("egress0", ("eth0",)),
                                 held=held)
    steps.append(("plan read, table rendered", memory()))
    driver = NftablesDriver("inet", "gatewayd")
    driver.ensure(table)
    steps.append(("table applied", memory()))
    driver.ensure(table, verify=True)
    steps.append(("repair pass (table listed back)", memory()))
    driver.delete()
    for name, value in steps:
        print(f"  {name}: {value:.0f} MiB")
    print(f"  peak: {memory('VmHWM'):.0f} MiB")


if __name__ == "__main__":
    main(sys.argv[1])
