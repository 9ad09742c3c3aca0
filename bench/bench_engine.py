"""Benchmark of the policy engine (gatewayd/policy/engine.py) on generated clusters.

Usage: .venv/bin/python bench/bench_engine.py [--seed N] [--skip-large]

1. explain: 2,000 pods, 200 policies, 10,000 (src, dst) queries; plan build timed separately.
2. build_plan: 50,000 pods, 1,000 policies; then every gateway plan and every node plan.
   Peak RSS (getrusage) is that of the whole process, generator included; a second run under
   tracemalloc reports the peak of the engine's own allocations.

The generator imitates a real cluster: deployments (one identity each) spread over namespaces
and nodes, policies selecting by app / namespace labels (some by node), destinations from /8 to
/32, some exclusions, some multi-gateway policies, a mix of egress IP modes, 6 gateways of which
one is not Ready.
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import time
import tracemalloc
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TypeVar

from gatewayd.policy.engine import build_plan
from gatewayd.policy.identity import identity_labels
from gatewayd.policy.model import (
    EgressGateway,
    EgressIPPool,
    GatewayInterface,
    GatewaySpec,
    InterfaceAddress,
    IPAddress,
    IPNetwork,
    LabelSelector,
    Namespace,
    Node,
    NodeAddress,
    Operator,
    Pod,
    Policy,
    Requirement,
    Snapshot,
)

T = TypeVar("T")

NS_PREFIX = "io.cilium.k8s.namespace.labels."
ZONES = ("zone-a", "zone-b", "zone-c")
TEAMS = tuple(f"team-{i}" for i in range(20))
POOL = IPv4Network("203.0.113.0/24")


def _req(key: str, op: Operator, *values: str) -> Requirement:
    return Requirement(key, op, frozenset(values))


def _gateways(count: int) -> tuple[EgressGateway, ...]:
    gateways = []
    for i in range(1, count + 1):
        eth0 = GatewayInterface(
            "eth0",
            addresses=(
                InterfaceAddress(IPv4Address(f"192.0.2.{i}"), 24),
                InterfaceAddress(IPv6Address(f"2001:db8::{i}"), 64),
            ),
            default_route_v4=True,
            default_route_v6=True,
        )
        eth1 = GatewayInterface(
            "eth1", ("uplink",), (InterfaceAddress(IPv4Address(f"198.51.100.{i}"), 24),)
        )
        gateways.append(
            EgressGateway(
                name=f"gw-{i}",
                labels={"egress.gatewayd.io/role": "gateway", "zone": ZONES[i % 3]},
                addresses=(NodeAddress("InternalIP", f"192.0.2.{i}"),),
                interfaces=(eth0, eth1),
                egress_ip_pools=(EgressIPPool(POOL, "eth1"),),
                ready=i != count,  # one gateway is down
            )
        )
    return tuple(gateways)


def _destination(rng: random.Random) -> IPNetwork:
    prefix = rng.choice((8, 12, 16, 20, 24, 24, 28, 32, 32, 32))
    if prefix <= 8:
        base = rng.choice((11, 23, 45, 100))
        return IPv4Network(f"{base}.0.0.0/8")
    address = IPv4Address(rng.randrange(0x0B000000, 0x64000000))  # 11.0.0.0 .. 100.0.0.0
    return IPv4Network(f"{address}/{prefix}", strict=False)


def _policy(rng: random.Random, index: int, deployments: int, namespaces: int) -> Policy:
    role = LabelSelector((_req("egress.gatewayd.io/role", Operator.IN, "gateway"),))
    style = rng.random()
    node_selectors: tuple[LabelSelector, ...] = ()
    if style < 0.6:  # one to three apps of one namespace
        d = rng.randrange(deployments)
        apps = {f"app-{(d + k * namespaces) % deployments}" for k in range(rng.randint(1, 3))}
        selector = LabelSelector(
            (
                _req("app", Operator.IN, *apps),
                _req(
                    NS_PREFIX + "kubernetes.io/metadata.name", Operator.IN, f"ns-{d % namespaces}"
                ),
            )
        )
    elif style < 0.8:  # a whole namespace
        name = f"ns-{rng.randrange(namespaces)}"
        selector = LabelSelector(
            (_req(NS_PREFIX + "kubernetes.io/metadata.name", Operator.IN, name),)
        )
    elif style < 0.9:  # a tier across a team's namespaces, minus one app
        selector = LabelSelector(
            (
                _req("tier", Operator.IN, rng.choice(("web", "api", "batch"))),
                _req(NS_PREFIX + "team", Operator.IN, rng.choice(TEAMS)),
                _req("app", Operator.NOT_IN, f"app-{rng.randrange(deployments)}"),
            )
        )
    else:  # one app, only on the nodes of one zone
        selector = LabelSelector((_req("app", Operator.IN, f"app-{rng.randrange(deployments)}"),))
        node_selectors = (LabelSelector((_req("zone", Operator.IN, rng.choice(ZONES)),)),)
    destinations: set[IPNetwork] = {_destination(rng) for _ in range(rng.randint(1, 8))}
    if rng.random() < 0.1:
        destinations.add(IPv6Network(f"2001:db8:{rng.randrange(1, 0xFFFF):x}::/48"))
    exclusions: set[IPNetwork] = set()
    if rng.random() < 0.2:
        inside = rng.choice(
            sorted((d for d in destinations if isinstance(d, IPv4Network)), key=str)
        )
        if inside.prefixlen < 32:
            exclusions.add(next(iter(inside.subnets(new_prefix=min(inside.prefixlen + 4, 32)))))
    mode = rng.random()
    spec = GatewaySpec(role)
    if mode < 0.3:
        spec = GatewaySpec(role, egress_ip=POOL[rng.randrange(1, 255)])
    elif mode < 0.5:
        spec = GatewaySpec(role, interface="uplink")
    gateways: tuple[GatewaySpec, ...] = (spec,)
    if rng.random() < 0.15:  # multi-gateway: one entry per zone
        gateways = tuple(
            GatewaySpec(LabelSelector((_req("zone", Operator.IN, zone),))) for zone in ZONES[:2]
        )
    return Policy(
        name=f"policy-{index:04d}",
        kind="EgressGatewayPolicy",
        endpoint_selectors=(selector,),
        node_selectors=node_selectors,
        destinations=tuple(destinations),
        exclusions=tuple(exclusions),
        gateways=gateways,
    )


def make_snapshot(
    *,
    pods: int,
    policies: int,
    deployments: int,
    namespaces: int,
    nodes: int,
    seed: int,
    gateways: int = 6,
) -> Snapshot:
    rng = random.Random(seed)
    node_objs = tuple(
        Node(
            name=f"node-{i:03d}",
            labels={"zone": ZONES[i % 3], "kubernetes.io/hostname": f"node-{i:03d}"},
            addresses=(NodeAddress("InternalIP", f"172.16.{i // 250}.{i % 250 + 1}"),),
            pod_cidrs=(IPv4Network(f"10.{64 + i // 128}.{(i % 128) * 2}.0/23"),),
        )
        for i in range(nodes)
    )
    ns_objs = tuple(
        Namespace(f"ns-{i}", {"kubernetes.io/metadata.name": f"ns-{i}", "team": TEAMS[i % 20]})
        for i in range(namespaces)
    )
    next_host = [1] * nodes
    pod_objs = []
    for p in range(pods):
        d = p % deployments
        n = rng.randrange(nodes)
        while next_host[n] > 500:
            n = (n + 1) % nodes
        host = next_host[n]
        next_host[n] += 1
        base = int(node_objs[n].pod_cidrs[0].network_address)
        ips: tuple[IPAddress, ...] = (IPv4Address(base + host),)
        if d % 10 == 0:  # a tenth of the deployments is dual-stack
            ips = (*ips, IPv6Address(f"fd00:10:{n:x}::{host:x}"))
        pod_objs.append(
            Pod(
                name=f"app-{d}-{p // deployments:05d}",
                namespace=f"ns-{d % namespaces}",
                uid=f"{rng.getrandbits(128):032x}",
                labels={
                    "app": f"app-{d}",
                    "tier": ("web", "api", "batch")[d % 3],
                    "pod-template-hash": f"{d:08x}",
                },
                node_name=node_objs[n].name,
                service_account="default",
                ips=ips,
            )
        )
    return Snapshot(
        policies=tuple(_policy(rng, i, deployments, namespaces) for i in range(policies)),
        pods=tuple(pod_objs),
        namespaces=ns_objs,
        nodes=node_objs,
        gateways=_gateways(gateways),
        api_server_addresses=(IPv4Address("172.16.255.1"),),
    )


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _queries(
    snapshot: Snapshot, rng: random.Random, count: int
) -> list[tuple[IPAddress, IPAddress]]:
    """Mostly connections a policy is about: a selected pod to one of its policy's CIDRs
    (node selectors ignored); the rest to pod IPs and to addresses no policy names."""
    namespaces = {n.name: n for n in snapshot.namespaces}
    by_identity: dict[str, list[Policy]] = {}
    for pod in snapshot.pods:
        app = pod.labels["app"]
        if app not in by_identity:
            labels = identity_labels(pod, namespaces[pod.namespace], snapshot.cluster_name)
            by_identity[app] = [
                p for p in snapshot.policies if any(s.matches(labels) for s in p.endpoint_selectors)
            ]
    selected = [pod for pod in snapshot.pods if by_identity[pod.labels["app"]]]
    queries: list[tuple[IPAddress, IPAddress]] = []
    while len(queries) < count:
        pod = rng.choice(selected)
        src = pod.ips[0]
        kind = rng.random()
        if kind < 0.8:
            net = rng.choice([d for p in by_identity[pod.labels["app"]] for d in p.destinations])
            if net.version != src.version:
                continue
            dst: IPAddress = net[rng.randrange(net.num_addresses)]
        elif kind < 0.9:
            dst = rng.choice(snapshot.pods).ips[0]
        else:
            dst = IPv4Address(rng.randrange(0xC0000000, 0xDF000000))
        queries.append((src, dst))
    return queries


def bench_explain(seed: int) -> None:
    snapshot = make_snapshot(
        pods=2_000, policies=200, deployments=100, namespaces=20, nodes=20, seed=seed
    )
    rng = random.Random(seed)
    plan, build = timed(lambda: build_plan(snapshot))
    queries = _queries(snapshot, rng, 10_000)
    verdicts: dict[str, int] = {}

    def run() -> None:
        for src, dst in queries:
            verdict = plan.explain(src, dst).verdict.value
            verdicts[verdict] = verdicts.get(verdict, 0) + 1

    _, answer = timed(run)
    print("explain: 2,000 pods, 200 policies, 10,000 queries")
    print(f"  build_plan             {build:7.3f} s")
    print(f"  10,000 explain()       {answer:7.3f} s   ({answer / 10_000 * 1e6:.0f} us/query)")
    print(f"  total                  {build + answer:7.3f} s")
    print(f"  verdicts               {dict(sorted(verdicts.items()))}")


def bench_build(seed: int) -> None:
    snapshot, generate = timed(
        lambda: make_snapshot(
            pods=50_000, policies=1_000, deployments=1_000, namespaces=100, nodes=200, seed=seed
        )
    )
    rss_before = peak_rss_mib()
    gc.collect()
    plan, build = timed(lambda: build_plan(snapshot))
    rss_after_build = peak_rss_mib()
    gateway_plans, gw_time = timed(lambda: [plan.gateway_plan(g.name) for g in snapshot.gateways])
    node_plans, node_time = timed(lambda: [plan.node_plan(n.name) for n in snapshot.nodes])
    selected = sum(r.selected_pods for r in plan.policy_results.values())
    print("build_plan: 50,000 pods, 1,000 policies, 1,000 identities, 100 namespaces, 200 nodes")
    print(f"  generate snapshot      {generate:7.3f} s   (peak RSS then {rss_before:.0f} MiB)")
    print(f"  build_plan             {build:7.3f} s   (peak RSS then {rss_after_build:.0f} MiB)")
    print(
        f"  6 gateway plans        {gw_time:7.3f} s   "
        f"({sum(len(p.rules) for p in gateway_plans)} SNAT rules)"
    )
    print(
        f"  200 node plans         {node_time:7.3f} s   "
        f"({sum(len(p.rules) for p in node_plans)} steer rules)"
    )
    print(f"  peak RSS of process    {peak_rss_mib():7.0f} MiB")
    print(f"  selections             {selected} (pod, policy) pairs")
    print(f"  build_plan allocations {traced_peak_mib(snapshot):7.0f} MiB peak (tracemalloc)")


def traced_peak_mib(snapshot: Snapshot) -> float:
    """Peak of the memory build_plan allocates, measured on a fresh run."""
    gc.collect()
    tracemalloc.start()
    build_plan(snapshot)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-large", action="store_true", help="only the explain benchmark")
    args = parser.parse_args()
    bench_explain(args.seed)
    if not args.skip_large:
        bench_build(args.seed)


if __name__ == "__main__":
    main()
