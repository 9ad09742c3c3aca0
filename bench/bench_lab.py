"""Lab benchmarks: what the gateway costs, and how fast a snapshot change reaches the kernel.

    .venv/bin/python bench/bench_lab.py [--dir LAB_DIR] [--seconds 5] [--repeats 3] [--changes 50]

Uses the lab in LAB_DIR when there is one (it must be as `gatewayctl lab up` left it), else
builds one in a temporary directory and removes it afterwards. Prints a Markdown table.

* Throughput through the gateway: iperf3 from a selected pod (WireGuard to the gateway, SNAT
  there) to the external host, as a ratio to an unselected pod on the same node (plain routing
  and the node's masquerade over the same namespaces); for IPv6 the same pod to the external
  host's address its policy selects and to one it does not.
* SNAT-only overhead: iperf3 from a cloud node to the external host through the router, with an
  nft SNAT rule on the router vs plain forwarding. Expect a ratio >= 0.95.
* Latency from a snapshot change of one pod (a new dual-stack checkout pod added, then removed
  again) to the data plane updated: each of the pod's IPs appears in (disappears from) a set
  of the gateway's table `inet gatewayd` and of the node's steer table, read with the nft
  binding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gatewayd.lab.netns import run, start_process, stop_process, wait_for
from gatewayd.lab.observe import GATEWAY_TABLE, NftReader, covers, set_addresses
from gatewayd.lab.topology import (
    EXTERNAL,
    GATEWAYS,
    NODES,
    POLL_SECONDS,
    Lab,
    LabError,
    lab_session,
    router_netns,
)

STEER_TABLE = ("inet", "gatewayd-steer")
IPERF_PORT = 5201
BENCH_POD_FILE = "90-bench-pod.yaml"
BENCH_SNAT_TABLE = "gwdlab-bench-snat"


@contextmanager
def some_lab(directory: Path | None) -> Iterator[Lab]:
    if directory is not None:
        lab = Lab(directory)
        if not lab.exists():
            raise LabError(f"no lab in {directory}")
        yield lab
        return
    with tempfile.TemporaryDirectory(prefix="gwdlab-bench-") as tmp, \
            lab_session(Path(tmp) / "lab") as lab:
        yield lab


@contextmanager
def iperf_server() -> Iterator[None]:
    server = start_process(EXTERNAL.netns, ["iperf3", "-s", "-p", str(IPERF_PORT)])
    try:
        wait_for(lambda: bool(run(["ss", "-Htln", f"sport = :{IPERF_PORT}"],
                                  EXTERNAL.netns).stdout), 10, "iperf3 to listen")
        yield
    finally:
        stop_process(server)


def iperf(netns: str, destination: str, seconds: float) -> float:
    """Gbit/s received by the server at `destination` from a TCP stream started in `netns`."""
    proc = run(["iperf3", "-c", destination, "-p", str(IPERF_PORT),
                "-t", str(seconds), "--connect-timeout", "5000", "-J"], netns,
               timeout=seconds + 30)
    bits: float = json.loads(proc.stdout)["end"]["sum_received"]["bits_per_second"]
    return bits / 1e9


def alternating(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """The median of each measurement, taken in turns so that drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, measure in runs.items():
            samples[name].append(measure())
    return {name: statistics.median(values) for name, values in samples.items()}


@contextmanager
def router_snat() -> Iterator[None]:
    """The router SNATs the cloud subnet to its own on-prem address: only nft SNAT."""
    ruleset = f"""
table ip {BENCH_SNAT_TABLE} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr 192.0.2.0/24 oifname "br-onprem" snat to 198.51.100.1
    }}
}}
"""
    run(["nft", "-f", "-"], router_netns(), input=ruleset)
    try:
        yield
    finally:
        run(["nft", "delete", "table", "ip", BENCH_SNAT_TABLE], router_netns())


def throughput(seconds: float, repeats: int) -> dict[str, float]:
    selected, _, unselected = NODES[0].pods
    node = NODES[0]
    # checkout's policy selects the first IPv6 address, not the second (see examples/lab)
    payment, _, payment6, other6 = EXTERNAL.addresses

    def through_router(snat: bool) -> float:
        if not snat:
            return iperf(node.netns, payment, seconds)
        with router_snat():
            return iperf(node.netns, payment, seconds)

    with iperf_server():
        return alternating({
            "gateway": lambda: iperf(selected.netns, payment, seconds),
            "plain": lambda: iperf(unselected.netns, payment, seconds),
            "gateway6": lambda: iperf(selected.netns, payment6, seconds),
            "plain6": lambda: iperf(selected.netns, other6, seconds),
            "forwarding": lambda: through_router(snat=False),
            "snat": lambda: through_router(snat=True),
        }, repeats)


def bench_pod(number: int) -> tuple[tuple[str, str], str]:
    """(its IPv4 and IPv6 address, YAML) of one more checkout pod on node1."""
    addresses = (f"10.244.1.{100 + number}", f"fd00:10:244:1::{100 + number:x}")
    text = f"""apiVersion: v1
kind: Pod
metadata:
  name: bench-{number}
  namespace: shop
  uid: 00000000-bench-4000-8000-{number:012d}
  labels: {{app: checkout}}
spec: {{nodeName: {NODES[0].name}}}
status:
  podIPs: [{{ip: {addresses[0]}}}, {{ip: "{addresses[1]}"}}]
"""
    return addresses, text


class SetWatch:
    """Whether an address is in a table's sets, beyond what the sets held at the start."""

    def __init__(self, netns: str, table: tuple[str, str]) -> None:
        self.reader = NftReader(netns)
        self.table = table
        self.baseline = self.elements()

    def elements(self) -> set[str]:
        objects = self.reader.table(*self.table)
        if objects is None:
            raise RuntimeError(f"no table {' '.join(self.table)} in {self.reader.netns}")
        return set(set_addresses(objects))

    def holds(self, address: str) -> bool:
        return covers(iter(self.elements() - self.baseline), address)


def change_latency(lab: Lab, changes: int) -> dict[tuple[str, str], list[float]]:
    """Seconds from a snapshot file replaced to each table updated for each of the pod's
    addresses, per change; keyed by (table, family)."""
    watches = {
        "gateway": SetWatch(GATEWAYS[0].netns, GATEWAY_TABLE),
        "node": SetWatch(NODES[0].netns, STEER_TABLE),
    }
    latencies: dict[tuple[str, str], list[float]] = {
        (name, family): [] for name in watches for family in ("IPv4", "IPv6")}
    target = lab.snapshot_dir / BENCH_POD_FILE
    try:
        for number in range(changes):
            addresses, text = bench_pod(number // 2)
            adding = number % 2 == 0
            start = time.monotonic()
            if adding:
                lab.write_snapshot_file(BENCH_POD_FILE, text)
            else:
                target.unlink()
            pending = {(name, family): (watch, address) for name, watch in watches.items()
                       for family, address in zip(("IPv4", "IPv6"), addresses, strict=True)}
            while pending:
                for key, (watch, address) in list(pending.items()):
                    if watch.holds(address) == adding:
                        latencies[key].append(time.monotonic() - start)
                        del pending[key]
                if time.monotonic() - start > 30:
                    raise TimeoutError(f"{pending} did not see change {number} "
                                       f"({'add' if adding else 'remove'} {addresses}) in 30s")
                time.sleep(0.002)
    finally:
        target.unlink(missing_ok=True)
    return latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="use the running lab in this directory")
    parser.add_argument("--seconds", type=float, default=5, help="per iperf3 run")
    parser.add_argument("--repeats", type=int, default=3, help="iperf3 runs per measurement")
    parser.add_argument("--changes", type=int, default=50, help="snapshot changes to time")
    args = parser.parse_args()
    with some_lab(args.dir) as lab:
        rates = throughput(args.seconds, args.repeats)
        latencies = change_latency(lab, args.changes)
    rows = [
        ("throughput through the gateway (selected pod, WireGuard + SNAT)",
         f"{rates['gateway']:.2f} Gbit/s"),
        ("throughput, plain routing (unselected pod, same namespaces)",
         f"{rates['plain']:.2f} Gbit/s"),
        ("gateway / plain", f"{rates['gateway'] / rates['plain']:.3f}"),
        ("IPv6 throughput through the gateway (selected destination)",
         f"{rates['gateway6']:.2f} Gbit/s"),
        ("IPv6 throughput, plain routing (same pod, unselected destination)",
         f"{rates['plain6']:.2f} Gbit/s"),
        ("IPv6 gateway / plain", f"{rates['gateway6'] / rates['plain6']:.3f}"),
        ("router forwarding only", f"{rates['forwarding']:.2f} Gbit/s"),
        ("router with nft SNAT", f"{rates['snat']:.2f} Gbit/s"),
        ("SNAT / forwarding (expect >= 0.95)", f"{rates['snat'] / rates['forwarding']:.3f}"),
    ]
    for (name, family), values in latencies.items():
        rows.append((f"snapshot change -> {name} nft updated, {family}, p50 / p99 "
                     f"({len(values)} changes)",
                     f"{percentile(values, 0.5) * 1000:.0f} ms / "
                     f"{percentile(values, 0.99) * 1000:.0f} ms"))
    print(f"\niperf3 {args.seconds:g} s x {args.repeats} (median); "
          f"daemons poll their inputs every {POLL_SECONDS:g} s\n")
    print("| measure | value |\n|---|---|")
    for measure, value in rows:
        print(f"| {measure} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
