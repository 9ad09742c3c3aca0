"""How fast the gateway table reaches the kernel (run as root; uses a throwaway namespace).

For each size: render a gateway plan with N sources (one policy, plus D destination /24s),
apply it to an empty namespace (one transaction), change its rules while it is loaded (in
place: the sets stay, the chains are flushed and filled again in one transaction), read it
back, then apply C one-source changes through the fast path (element add / delete), reported
as p50/p99 of `ensure()` alone, of render + `ensure()`, and of the agent's whole path in
Kubernetes mode (one EgressSourceSlice changed: the spec and slices read into a plan,
rendered, applied): what it pays for one pod. Then, per size, the memory of the agent's data
path in a fresh process (bench/agent_memory.py).

    sudo .venv/bin/python bench/bench_nftables.py [--sizes 10000 100000] [--changes 200]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gatewayd.agent.kubernetes import target_from_object
from gatewayd.api.sourceslices import ParsedSlices, addresses_digest, shard_rule
from gatewayd.controller.slicing import slice_object
from gatewayd.dataplane.nft_render import (
    GatewayTableSettings,
    RenderedTable,
    render_gateway_table,
)
from gatewayd.dataplane.nftables import NftablesDriver
from gatewayd.lab.netns import Sandbox, entered
from gatewayd.policy.model import GatewayPlan, IPAddress, Role, SnatRule
from gatewayd.policy.planio import gateway_plan_to_dict

T = TypeVar("T")
SETTINGS = GatewayTableSettings("egress0", ("eth0",))
EGRESS = ipaddress.ip_address("198.51.100.10")


def sources(count: int) -> frozenset[IPAddress]:
    first = int(ipaddress.ip_address("10.0.0.1"))
    return frozenset(ipaddress.ip_address(first + i) for i in range(count))


def plan(source_set: frozenset[IPAddress], destinations: int) -> GatewayPlan:
    dests = tuple(ipaddress.ip_network(f"172.{16 + i // 256}.{i % 256}.0/24")
                  for i in range(destinations))
    return GatewayPlan("bench", rules=(
        SnatRule("bench", Role.ACTIVE, source_set, dests, EGRESS),))


def held_table(
    plan: GatewayPlan, settings: GatewayTableSettings, previous: RenderedTable | None = None
) -> RenderedTable:
    """The table of a host that holds the egress IP."""
    return render_gateway_table(plan, settings, held={EGRESS}, previous=previous)


def timed(action: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def bench(size: int, destinations: int, changes: int) -> dict[str, float]:
    base = sources(size)
    driver = NftablesDriver("inet", "gatewayd")
    render_s, table = timed(lambda: held_table(plan(base, destinations), SETTINGS))
    first_s, first = timed(lambda: driver.ensure(table))
    other = GatewayTableSettings("egress0", ("eth0",), tunnel_mtu=1400)  # other rules
    update_s, updated = timed(lambda: driver.ensure(
        held_table(plan(base, destinations), other)))
    assert (first.action, updated.action) == ("replace", "update")
    observe_s, observed = timed(driver.observe)
    assert observed is not None and len(observed.sets["rule0_src"].elements) == size

    extra = ipaddress.ip_address("10.255.255.254")
    ensure_only: list[float] = []
    end_to_end: list[float] = []
    for i in range(changes):
        wanted = base | {extra} if i % 2 == 0 else base
        start = time.perf_counter()
        desired = held_table(plan(wanted, destinations), other)
        result = driver.ensure(desired)
        end_to_end.append(time.perf_counter() - start)
        ensure_only.append(result.seconds)
        assert result.action == "elements", result
    verify_s, verified = timed(lambda: driver.ensure(desired, verify=True))
    assert verified.action == "none" and not verified.drift

    # The agent's own path in Kubernetes mode: the EgressGateway spec and its source slices
    # (one of them changed) -> the plan -> the table -> the kernel.
    spec_rule = gateway_plan_to_dict(plan(base, destinations))["rules"][0]
    compact, slices = shard_rule("bench", spec_rule, previous=0)
    objects = {p.name: {"metadata": {"name": p.name}, "spec": p.spec()} for p in slices}
    first_slice = slices[0].name
    agent_path: list[float] = []
    parsed = ParsedSlices()  # what the agent keeps between two reads of its spec
    rendered = held_table(plan(base, destinations), other)
    for i in range(changes):
        start = time.perf_counter()
        piece = objects[first_slice]["spec"]
        piece["addresses"] = (piece["addresses"] + [str(extra)] if i % 2 == 0
                              else [a for a in piece["addresses"] if a != str(extra)])
        rule = {**compact, "sourceSlices": [
            {**ref, "digest": addresses_digest(objects[ref["name"]]["spec"]["addresses"])}
            if ref["name"] == first_slice else ref for ref in compact["sourceSlices"]]}
        gateway = {"metadata": {"name": "bench", "generation": i + 2}, "spec": {"rules": [rule]}}
        target = target_from_object(gateway, objects.get, parsed)
        rendered = held_table(target.plan, other, rendered)
        result = driver.ensure(rendered)
        agent_path.append(time.perf_counter() - start)
        assert result.action == "elements", result
    driver.delete()
    return {
        "render": render_s, "apply to empty": first_s, "rules changed": update_s,
        "observe": observe_s, "verify (no drift)": verify_s,
        "one source, ensure p50": statistics.median(ensure_only),
        "one source, ensure p99": percentile(ensure_only, 0.99),
        "one source, render+ensure p50": statistics.median(end_to_end),
        "one source, render+ensure p99": percentile(end_to_end, 0.99),
        "one source, agent path p50": statistics.median(agent_path),
        "one source, agent path p99": percentile(agent_path, 0.99),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--destinations", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=200)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_nftables: needs root (a network namespace)", file=sys.stderr)
        return 2
    with Sandbox(f"bench{secrets.token_hex(2)}-") as box:
        netns = box.netns("nft")
        results = {}
        for size in args.sizes:
            with entered(netns):
                results[size] = bench(size, args.destinations, args.changes)
        names = list(next(iter(results.values())))
        print(f"gateway table, {args.destinations} destination /24s, {args.changes} one-source "
              "changes")
        print(f"{'':34}" + "".join(f"{f'{size:,} src':>16}" for size in results))
        for name in names:
            print(f"{name:34}"
                  + "".join(f"{results[s][name] * 1000:>13.1f} ms" for s in results))
        for size in args.sizes:
            print(f"the agent's data path at {size:,} sources, RSS (bench/agent_memory.py):")
            with entered(netns):
                print(agent_memory(size, args.destinations), end="")
    return 0


def agent_memory(size: int, destinations: int) -> str:
    """What bench/agent_memory.py prints for a gateway of `size` sources: run in a fresh
    process (in the caller's namespace), on the spec and slices the controller would write."""
    spec_rule = gateway_plan_to_dict(plan(sources(size), destinations))["rules"][0]
    compact, slices = shard_rule("bench", spec_rule, previous=0)
    objects = {
        "gateway": {"apiVersion": "egress.gatewayd.io/v1alpha1", "kind": "EgressGateway",
                    "metadata": {"name": "bench", "generation": 1},
                    "spec": {"rules": [compact]}},
        "slices": [slice_object(piece) for piece in slices],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(objects, file)
        file.flush()
        return subprocess.run(
            [sys.executable, str(Path(__file__).with_name("agent_memory.py")), file.name],
            check=True, capture_output=True, text=True,
        ).stdout


if __name__ == "__main__":
    sys.exit(main())
