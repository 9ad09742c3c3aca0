"""The controller at the size of a large cluster: 100,000 pods, 2,000 policies, 1,000 nodes.

Usage: .venv/bin/python bench/bench_scale.py [--pods N] [--policies N] [--nodes N] [--seed N]
                                             [--profile] [--memory-profile]

The cluster of bench_engine.py's generator (20 pods per Deployment, 500 pods per namespace, 8
gateways, one of them not Ready) written as the API serves it: real-sized pods (containers,
volumes, tolerations, conditions, container statuses) with the managedFields a server keeps,
about 5 KB of JSON each, cut by the controller's own informer transform (`cached.py`) to what
it caches. Timed over in-memory caches, as bench_controller.py does: `Reconciler.plan` (the
one reconcile function) plus comparing its result with what the cluster holds:

- cold reconcile: a controller's first reconcile;
- one pod's labels change (an unselected pod takes the labels of a selected one), after the
  agents reported their plans;
- one new pod (with its IP: the kubelet's status update is the event that counts).

Then the largest object the controller wrote (its JSON, as etcd stores it, status included)
and this process's peak RSS (VmHWM), which includes the generator's objects (about a tenth).
Prints exactly five lines; progress goes to stderr, with the RSS after each step (where the
memory goes). `--profile` also prints, to stderr, where the cold and the one-pod reconciles
spend their time (cProfile, the functions with the most time of their own and the most time
below them); profiling slows them, so their figures are then not the ones to record.
`--memory-profile` prints the lines of code that allocated most of what the cold reconcile
keeps (tracemalloc; slower still, and the RSS grows by the tracing's own memory).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import sys
import time
import tracemalloc
from typing import Any

from bench_controller import (
    CIDR,
    cluster_objects,
    one_pod_changes,
    real_sized,
    reconcile,
    with_pods,
)
from bench_engine import make_snapshot
from procstatus import status_kib
from realistic import with_managed_fields

from gatewayd.controller.cached import pod_fields
from gatewayd.controller.reconcile import Reconciler
from gatewayd.controller.snapshots import Cluster


def progress(message: str) -> None:
    rss = status_kib("VmRSS")
    print(f"[{time.strftime('%H:%M:%S')}] {message} (RSS {rss / 1024:,.0f} MiB)",
          file=sys.stderr, flush=True)


def profiled(profile: bool, what: str, reconciler: Reconciler, cluster: Cluster
             ) -> tuple[Cluster, int, float]:
    """`reconcile`, under cProfile when `profile`: the top functions go to stderr."""
    if not profile:
        return reconcile(reconciler, cluster)
    profiler = cProfile.Profile()
    result = profiler.runcall(reconcile, reconciler, cluster)
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(15)
        listing = out.getvalue()
        table = listing[listing.index("   ncalls"):].rstrip()
        progress(f"profile of {what}, by {order}:\n{table}\n")
    return result


def generated(pods: int, policies: int, nodes: int, gateways: int, seed: int) -> Cluster:
    """The cluster as the controller's informers cache it."""
    snapshot = make_snapshot(
        pods=pods,
        policies=policies,
        deployments=max(1, pods // 20),
        namespaces=max(1, pods // 500),
        nodes=nodes,
        seed=seed,
        gateways=gateways,
    )
    cluster = cluster_objects(snapshot, gateways=gateways)
    del snapshot
    cached, served = [], 0
    for index, pod in enumerate(cluster.pods):
        full = with_managed_fields(real_sized(pod, index))
        served += len(json.dumps(full))
        cached.append(pod_fields(full))
    progress(f"{len(cached):,} pods of {served / len(cached) / 1024:.1f} KB JSON each as served")
    return with_pods(cluster, cached)


def largest_kib(cluster: Cluster) -> float:
    """The largest object of ours in `cluster`, in KiB of JSON (which one: on stderr)."""
    objects: list[Any] = [
        *cluster.gateways, *cluster.egress_nodes, *cluster.policies,
        *cluster.source_slices.values(),
    ]
    size, kind, name = max(
        (len(json.dumps(o, separators=(",", ":"))), o["kind"], o["metadata"]["name"])
        for o in objects
    )
    progress(f"largest object: {kind} {name}, {size / 1024:.0f} KiB")
    return size / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=100_000)
    parser.add_argument("--policies", type=int, default=2_000)
    parser.add_argument("--nodes", type=int, default=1_000)
    parser.add_argument("--gateways", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true",
                        help="where the cold and one-pod reconciles spend their time (stderr)")
    parser.add_argument("--memory-profile", action="store_true",
                        help="what the cold reconcile's memory is (stderr)")
    args = parser.parse_args()

    cluster = generated(args.pods, args.policies, args.nodes, args.gateways, args.seed)
    gc.collect()
    progress("caches filled")
    reconciler = Reconciler(hold_down=30, tunnel_cidr=CIDR)
    if args.memory_profile:
        tracemalloc.start()
    cluster, writes, cold = profiled(args.profile, "the cold reconcile", reconciler, cluster)
    if args.memory_profile:
        top = tracemalloc.take_snapshot().statistics("lineno")[:15]
        tracemalloc.stop()
        lines = "\n".join(f"{s.size / 2**20:8.1f} MiB {s.count:>10,} blocks  {s.traceback}"
                          for s in top)
        progress(f"memory the cold reconcile allocated and keeps, by line:\n{lines}\n")
    largest = largest_kib(cluster)
    progress(f"cold reconcile {cold:.2f} s, {writes} objects to write")
    gc.freeze()  # as the daemon does after its first reconcile
    cluster, writes, reported = reconcile(reconciler, cluster)
    largest = max(largest, largest_kib(cluster))
    progress(f"agents reported: {reported:.2f} s, {writes} objects to write")

    try:
        pods, new_pod = one_pod_changes(cluster)
    except ValueError as error:
        parser.error(str(error))
    cluster, writes, one_pod = profiled(args.profile, "one pod's labels change", reconciler,
                                        with_pods(cluster, pods))
    largest = max(largest, largest_kib(cluster))
    progress(f"one pod's labels change: {writes} objects to write")

    cluster, writes, added = reconcile(reconciler, with_pods(cluster, [*pods, new_pod]))
    largest = max(largest, largest_kib(cluster))
    progress(f"one new pod: {writes} objects to write")

    print(f"cold reconcile: {cold:.1f} s")
    print(f"one pod's labels change: {one_pod * 1000:.0f} ms")
    print(f"one new pod: {added * 1000:.0f} ms")
    print(f"largest object written: {largest:.0f} KiB")
    print(f"controller peak RSS: {status_kib('VmHWM') / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
