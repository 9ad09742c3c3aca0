"""Benchmark of the controller's reconcile (gatewayd/controller/) on a generated cluster.

Usage: .venv/bin/python bench/bench_controller.py [--seed N] [--end-to-end | --memory [--pods N]]

10,000 pods, 500 policies, 50 nodes (each with its EgressNode), 4 gateways: the cluster of
bench_engine.py's generator, written as the API serves it (JSON objects). Timed, over in-memory
caches (`Reconciler.plan`, the one reconcile function, plus deciding what to write):

1. cold: a controller's first reconcile (every object parsed, the engine run, every spec);
2. full resync, nothing changed (the periodic resync, or a re-list that brought nothing new);
3. one pod's labels change (it joins other policies), then one new pod;
4. a full resync after a re-list in which every object is new (new resourceVersions: every
   object parsed again), and a new leader's first reconcile (fresh memory, same caches).

With --end-to-end, also against the fake API server over HTTP: the time from a pod's creation
to the node spec that steers it, through the watch, the reconcile and the write.

With --memory, only this: the peak RSS of a controller process (a fresh interpreter, nothing
else in it) that lists and watches the cluster from the fake API server (in another process)
with real-sized pods (containers, volumes, tolerations, conditions and the managedFields a real
server keeps: about 5 KB of JSON each) until its first reconcile is written and the writes
have settled. Run it with PYTHONPATH pointing at another checkout's code to measure that one.
"""

from __future__ import annotations

import argparse
import base64
import copy
import gc
import hashlib
import json
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from ipaddress import IPv4Network, ip_network
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

from bench_engine import make_snapshot
from procstatus import status_kib

from gatewayd.api.sourceslices import GATEWAY_LABEL, SLICES_FEATURE, with_sources
from gatewayd.controller.reconcile import Decisions, Reconciler
from gatewayd.controller.slicing import slice_object
from gatewayd.controller.snapshots import Cluster
from gatewayd.kube.leases import micro_time
from gatewayd.policy.model import LabelSelector, Policy, Snapshot

T = TypeVar("T")
Obj = dict[str, Any]
GROUP = "egress.gatewayd.io/v1alpha1"
CIDR = IPv4Network("100.127.0.0/16")
KEY = "A" * 43 + "="
NS_PREFIX = "io.cilium.k8s.namespace.labels."


def node_key(name: str) -> str:
    """A well-formed WireGuard public key of its own per node (the controller leaves out nodes
    that share one)."""
    return base64.b64encode(hashlib.sha256(name.encode()).digest()).decode()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _selector(selector: LabelSelector) -> Obj:
    return {
        "matchExpressions": [
            {
                "key": r.key,
                "operator": r.operator.value,
                **({"values": sorted(r.values)} if r.values else {}),
            }
            for r in selector.requirements
        ]
    }


def policy_object(policy: Policy) -> Obj:
    """The EgressGatewayPolicy a generated Policy comes from (namespace requirements written
    with their identity-label keys, which a podSelector may use)."""
    selectors = []
    for selector in policy.endpoint_selectors:
        entry: Obj = {"podSelector": _selector(selector)}
        if policy.node_selectors:
            entry["nodeSelector"] = _selector(policy.node_selectors[0])
        selectors.append(entry)
    gateways = []
    for spec in policy.gateways:
        gateway: Obj = {"nodeSelector": _selector(spec.node_selector)}
        if spec.egress_ip is not None:
            gateway["egressIP"] = str(spec.egress_ip)
        if spec.interface is not None:
            gateway["interface"] = spec.interface
        gateways.append(gateway)
    spec_obj: Obj = {
        "selectors": selectors,
        "destinationCIDRs": [str(d) for d in policy.destinations],
        "egressGateway": gateways[0],
    }
    if policy.exclusions:
        spec_obj["excludedCIDRs"] = [str(x) for x in policy.exclusions]
    if len(gateways) > 1:
        spec_obj["egressGateways"] = gateways
    return {
        "apiVersion": GROUP,
        "kind": "EgressGatewayPolicy",
        "metadata": {"name": policy.name, "generation": 1, "resourceVersion": "1"},
        "spec": spec_obj,
    }


def cluster_objects(snapshot: Snapshot, gateways: int) -> Cluster:
    now = micro_time(datetime.now(UTC))
    pods = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": p.name,
                "namespace": p.namespace,
                "uid": p.uid,
                "labels": dict(p.labels),
                "resourceVersion": "1",
            },
            "spec": {"nodeName": p.node_name, "serviceAccountName": p.service_account},
            "status": {"podIP": str(p.ips[0]), "podIPs": [{"ip": str(ip)} for ip in p.ips]},
        }
        for p in snapshot.pods
    ]
    namespaces = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": n.name, "labels": dict(n.labels), "resourceVersion": "1"},
        }
        for n in snapshot.namespaces
    ]
    nodes = [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": n.name, "labels": dict(n.labels), "resourceVersion": "1"},
            "spec": {"podCIDRs": [str(c) for c in n.pod_cidrs]},
            "status": {"addresses": [{"type": a.type, "address": a.address} for a in n.addresses]},
        }
        for n in snapshot.nodes
    ]
    gateway_objects = []
    for g in snapshot.gateways[:gateways]:
        gateway_objects.append(
            {
                "apiVersion": GROUP,
                "kind": "EgressGateway",
                "metadata": {
                    "name": g.name,
                    "uid": f"uid-{g.name}",
                    "labels": dict(g.labels),
                    "generation": 1,
                    "resourceVersion": "1",
                },
                "spec": {},
                "status": {
                    "observedGeneration": 1,
                    "features": [SLICES_FEATURE],  # an agent of this version
                    "publicKey": KEY,
                    "endpoint": f"{g.addresses[0].address}:51820",
                    "addresses": [{"type": a.type, "address": a.address} for a in g.addresses],
                    "interfaces": [
                        {
                            "name": i.name,
                            "altnames": list(i.altnames),
                            "addresses": [f"{a.address}/{a.prefixlen}" for a in i.addresses],
                            "defaultRouteV4": i.default_route_v4,
                            "defaultRouteV6": i.default_route_v6,
                        }
                        for i in g.interfaces
                    ],
                    "egressIPPools": [
                        {"cidr": str(p.cidr), "interface": p.interface} for p in g.egress_ip_pools
                    ],
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
        )
    egress_nodes = [
        {
            "apiVersion": GROUP,
            "kind": "EgressNode",
            "metadata": {
                "name": n.name,
                "uid": f"uid-{n.name}",
                "generation": 1,
                "resourceVersion": "1",
            },
            "spec": {},
            "status": {"observedGeneration": 1, "publicKey": node_key(n.name)},
        }
        for n in snapshot.nodes
    ]
    leases = {
        f"egressgateway-{g['metadata']['name']}": {
            "spec": {
                "holderIdentity": g["metadata"]["name"],
                "leaseDurationSeconds": 3600,
                "renewTime": now,
            }
        }
        for g in gateway_objects
    }
    return Cluster(
        policies=[policy_object(p) for p in snapshot.policies],
        pods=pods,
        namespaces=namespaces,
        nodes=nodes,
        gateways=gateway_objects,
        egress_nodes=egress_nodes,
        leases=leases,
    )


def _bump(obj: Mapping[str, Any], part: str, content: Any, report: bool) -> Obj:
    """`obj` after the controller wrote `part`, as the API (and the agent) would have it."""
    new = dict(obj)
    metadata = dict(obj["metadata"])
    metadata["resourceVersion"] = str(int(metadata["resourceVersion"]) + 1)
    if part == "spec":
        metadata["generation"] = metadata["generation"] + 1
    new["metadata"] = metadata
    new[part] = content
    if report:
        new["status"] = {**obj.get("status", {}), "observedGeneration": metadata["generation"]}
    return new


def written(cluster: Cluster, decisions: Decisions) -> tuple[Cluster, int]:
    """The cluster after the controller's writes (agents reporting at once), and how many
    objects it had to write: what the Writer compares before writing anything."""
    count = 0
    gateways, nodes, policies = [], [], []
    for g in cluster.gateways:
        spec = decisions.gateway_specs[g["metadata"]["name"]]
        changed = g.get("spec") != spec
        count += changed
        gateways.append(_bump(g, "spec", spec, True) if changed else g)
    for n in cluster.egress_nodes:
        spec = decisions.node_specs[n["metadata"]["name"]]
        changed = n.get("spec") != spec
        count += changed
        nodes.append(_bump(n, "spec", spec, True) if changed else n)
    for p in cluster.policies:
        status = decisions.policy_statuses[p["metadata"]["name"]]
        changed = p.get("status") != status
        count += changed
        policies.append(_bump(p, "status", status, False) if changed else p)
    slices = {}
    for name, piece in decisions.source_slices.items():
        cached = cluster.source_slices.get(name)
        if cached is not None and cached["spec"] == piece.spec():
            slices[name] = cached
            continue
        count += 1
        version = int(cached["metadata"]["resourceVersion"]) + 1 if cached is not None else 1
        written = slice_object(piece)
        written["metadata"]["resourceVersion"] = str(version)
        slices[name] = written
    count += len(cluster.source_slices.keys() - slices.keys())  # deleted
    return replace(
        cluster, policies=policies, gateways=gateways, egress_nodes=nodes, source_slices=slices
    ), count


def selected_pods(cluster: Cluster) -> set[str]:
    """IPs that node plans steer."""
    return {
        source
        for node in cluster.egress_nodes
        for rule in node["spec"]["rules"]
        for source in rule["sources"]
    }


def reconcile(reconciler: Reconciler, cluster: Cluster) -> tuple[Cluster, int, float]:
    """One reconcile, timed (plan + deciding what to write); the cluster after its writes."""
    now = time.monotonic()  # the clock the reconciler's LeaseObserver judges Leases on
    start = time.perf_counter()
    decisions = reconciler.plan(cluster, now, float("-inf"), "2026-11-01T00:00:00Z")
    after, writes = written(cluster, decisions)
    return after, writes, time.perf_counter() - start


def one_pod_changes(cluster: Cluster) -> tuple[list[Obj], Obj]:
    """Two of the smallest changes that move a pod: the cluster's pods with one that no policy
    selects given the labels and namespace of one that is selected; and a new pod like that
    selected one, on its node, with a free address of the node's pod CIDR."""
    pods = list(cluster.pods)
    steered = selected_pods(cluster)
    first = next((i for i, p in enumerate(pods) if p["status"]["podIP"] not in steered), None)
    template = next((p for p in pods if p["status"]["podIP"] in steered), None)
    if first is None or template is None:
        selected = sum(1 for p in pods if p["status"]["podIP"] in steered)
        raise ValueError(f"of {len(pods)} pods, {selected} are selected: the changes need a "
                         "selected pod and one that is not (change the pod or policy count)")
    changed = copy.deepcopy(pods[first])
    changed["metadata"]["labels"] = dict(template["metadata"]["labels"])
    changed["metadata"]["namespace"] = template["metadata"]["namespace"]
    changed["metadata"]["resourceVersion"] = "2"
    pods[first] = changed

    new_pod = copy.deepcopy(template)
    node = next(n for n in cluster.nodes if n["metadata"]["name"] == new_pod["spec"]["nodeName"])
    ip = str(ip_network(node["spec"]["podCIDRs"][0])[-2])
    new_pod["metadata"] |= {"name": "new-pod", "uid": "uid-new-pod", "resourceVersion": "1"}
    new_pod["status"] = {**new_pod["status"], "podIP": ip, "podIPs": [{"ip": ip}]}
    return pods, new_pod


def with_pods(cluster: Cluster, pods: list[Obj]) -> Cluster:
    return replace(cluster, pods=pods)


def relisted(cluster: Cluster) -> Cluster:
    """Every object again, with a new resourceVersion (a re-list after 410 Gone)."""

    def fresh(objects: Any) -> list[Obj]:
        result = []
        for obj in objects:
            new = copy.deepcopy(obj)
            new["metadata"]["resourceVersion"] += "0"
            result.append(new)
        return result

    return replace(
        cluster,
        policies=fresh(cluster.policies),
        pods=fresh(cluster.pods),
        namespaces=fresh(cluster.namespaces),
        nodes=fresh(cluster.nodes),
        gateways=fresh(cluster.gateways),
        egress_nodes=fresh(cluster.egress_nodes),
        source_slices={o["metadata"]["name"]: o for o in fresh(cluster.source_slices.values())},
    )


def bench_in_memory(seed: int) -> tuple[Cluster, Cluster]:
    """Returns the generated cluster, and the same after the controller's writes."""
    snapshot, generate = timed(
        lambda: make_snapshot(
            pods=10_000, policies=500, deployments=500, namespaces=50, nodes=50, seed=seed
        )
    )
    cluster = generated = cluster_objects(snapshot, gateways=4)
    print("reconcile over in-memory caches: 10,000 pods, 500 policies, 50 nodes, 4 gateways")
    print(f"  generate cluster                {generate:7.3f} s")
    gc.collect()
    reconciler = Reconciler(hold_down=30, tunnel_cidr=CIDR)
    cluster, writes, cold = reconcile(reconciler, cluster)
    selected = sum(s["selectedPods"] for s in (p["status"] for p in cluster.policies))
    print(
        f"  cold: the first reconcile       {cold:7.3f} s   {writes} objects to write "
        f"({selected} pod-policy selections)"
    )
    gc.freeze()  # as the daemon does after its first reconcile
    cluster, writes, reported = reconcile(reconciler, cluster)
    print(
        f"  the agents reported their plans {reported:7.3f} s   {writes} objects to write "
        "(policies become Ready)"
    )
    cluster, writes, resync = reconcile(reconciler, cluster)
    print(f"  full resync, nothing changed    {resync:7.3f} s   {writes} objects to write")

    pods, new_pod = one_pod_changes(cluster)
    cluster, writes, one_pod = reconcile(reconciler, with_pods(cluster, pods))
    print(f"  one pod's labels change         {one_pod:7.3f} s   {writes} objects to write")

    cluster, writes, added = reconcile(reconciler, with_pods(cluster, [*pods, new_pod]))
    print(f"  one new pod                     {added:7.3f} s   {writes} objects to write")

    _, writes, relist = reconcile(reconciler, relisted(cluster))
    print(
        f"  full resync after a re-list     {relist:7.3f} s   {writes} objects to write "
        "(every object parsed again)"
    )
    _, writes, leader = reconcile(Reconciler(hold_down=30, tunnel_cidr=CIDR), cluster)
    print(f"  a new leader's first reconcile  {leader:7.3f} s   {writes} objects to write")
    return generated, cluster


def _serve(fake: Any, connection: Connection) -> None:
    """In a child process: serve the fake API until the parent says stop."""
    fake.start()
    connection.send(fake.url)
    connection.recv()
    fake.stop()


def filled_fake_api(cluster: Cluster) -> Any:
    """A fake API server (not started) holding `cluster`, its Leases renewed now."""
    from fakecluster.fakeapi import FakeApiServer

    fake = FakeApiServer()
    for obj in [
        *cluster.namespaces,
        *cluster.nodes,
        *cluster.pods,
        *cluster.policies,
        *cluster.gateways,
        *cluster.egress_nodes,
    ]:
        fake.put(obj)
    for name, lease in cluster.leases.items():
        renewed = {**lease["spec"], "renewTime": micro_time(datetime.now(UTC))}
        fake.put(
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": "gatewayd-system"},
                "spec": renewed,
            }
        )
    return fake


def real_sized(pod: Obj, index: int) -> Obj:
    """`pod` with what a Deployment's pod carries besides the fields the controller reads
    (the fake API server adds the managedFields)."""
    name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
    app = next(iter(pod["metadata"]["labels"].values()), "app")
    container = {
        "name": "app",
        "image": f"registry.example.com/{namespace}/{app}:1.{index % 40}.3",
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "LOG_LEVEL", "value": "info"},
        ],
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "256Mi"},
        },
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 10},
        "volumeMounts": [
            {
                "name": "kube-api-access",
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                "readOnly": True,
            }
        ],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }
    started = "2026-11-01T10:00:00Z"
    return {
        **pod,
        "metadata": {
            **pod["metadata"],
            "generateName": f"{app}-7d9c5b6f8-",
            "annotations": {"kubectl.kubernetes.io/restartedAt": started},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{app}-7d9c5b6f8",
                    "uid": f"uid-rs-{namespace}-{app}",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            **pod["spec"],
            "containers": [container],
            "volumes": [
                {
                    "name": "kube-api-access",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                            {"configMap": {"name": "kube-root-ca.crt"}},
                        ]
                    },
                }
            ],
            "tolerations": [
                {
                    "key": f"node.kubernetes.io/{taint}",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                }
                for taint in ("not-ready", "unreachable")
            ],
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "terminationGracePeriodSeconds": 30,
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
        },
        "status": {
            **pod["status"],
            "phase": "Running",
            "hostIP": "10.0.0.10",
            "hostIPs": [{"ip": "10.0.0.10"}],
            "qosClass": "Burstable",
            "startTime": started,
            "conditions": [
                {"type": kind, "status": "True", "lastTransitionTime": started}
                for kind in (
                    "PodReadyToStartContainers",
                    "Initialized",
                    "Ready",
                    "ContainersReady",
                    "PodScheduled",
                )
            ],
            "containerStatuses": [
                {
                    "name": "app",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "image": container["image"],
                    "imageID": f"{container['image']}@sha256:{'0' * 64}",
                    "containerID": f"containerd://{hashlib.sha256(name.encode()).hexdigest()}",
                    "state": {"running": {"startedAt": started}},
                }
            ],
        },
    }


def _controller_peak_rss(kubeconfig: str, connection: Connection) -> None:
    """In a fresh process: run the controller until its first reconcile is written and the
    writes settled; send back (peak RSS in KiB, seconds to the first reconcile, writes)."""
    from gatewayd.controller.daemon import Controller, ControllerOptions
    from gatewayd.kube.client import client_from_kubeconfig

    controller = Controller(
        client_from_kubeconfig(Path(kubeconfig)),
        ControllerOptions(identity="bench", resync_interval=300, min_interval=0.5),
    )
    started = time.monotonic()
    controller.start()
    try:
        while controller.reconciles < 1:
            time.sleep(0.1)
        first = time.monotonic() - started
        writes = -1
        while controller.writes != writes:  # settled: no write for 15 s (retries included)
            writes = controller.writes
            time.sleep(15)
    finally:
        controller.stop()
    connection.send((status_kib("VmHWM"), first, controller.writes))


def bench_memory(seed: int, pods_wanted: int) -> None:
    snapshot = make_snapshot(
        pods=pods_wanted, policies=500, deployments=500, namespaces=50, nodes=50, seed=seed
    )
    cluster = cluster_objects(snapshot, gateways=4)
    pods = [real_sized(pod, index) for index, pod in enumerate(cluster.pods)]
    fake = filled_fake_api(with_pods(cluster, pods))
    served = fake.list("pods")
    size = sum(len(json.dumps(p)) for p in served) / len(served)
    managed = sum(len(json.dumps(p["metadata"]["managedFields"])) for p in served) / len(served)
    print(
        f"peak RSS of the controller: {len(served):,} pods of {size / 1024:.1f} KB JSON each "
        f"({managed / 1024:.1f} KB of it managedFields), 500 policies, 50 nodes, 4 gateways"
    )
    parent, child = multiprocessing.get_context("fork").Pipe()
    server = multiprocessing.get_context("fork").Process(target=_serve, args=(fake, child))
    server.start()
    try:
        url = parent.recv()
        config = fake.kubeconfig_dict()
        config["clusters"][0]["cluster"]["server"] = url
        with tempfile.NamedTemporaryFile("w", suffix=".kubeconfig") as kubeconfig:
            json.dump(config, kubeconfig)
            kubeconfig.flush()
            results, sent = multiprocessing.get_context("spawn").Pipe()
            controller = multiprocessing.get_context("spawn").Process(
                target=_controller_peak_rss, args=(kubeconfig.name, sent)
            )
            controller.start()
            peak, first, writes = results.recv()
            controller.join(30)
    finally:
        parent.send("stop")
        server.join(10)
    print(f"  first reconcile written after   {first:7.1f} s   ({writes} writes)")
    print(f"  peak RSS                        {peak / 1024:7.0f} MiB")


def bench_end_to_end(cluster: Cluster, planned: Cluster) -> None:
    """The controller in this process, the fake API server in another (so that the two do not
    share one interpreter lock), talking HTTP; `cluster` as generated (a fresh install),
    `planned` as the in-memory run left it (to pick a pod that policies select)."""
    print("end to end: the controller against the fake API server in another process (HTTP)")
    fake = filled_fake_api(cluster)
    from fakecluster.fakeapi import wait_until
    from kubernetes.client import CoreV1Api, CustomObjectsApi
    from kubernetes.config import new_client_from_config_dict

    from gatewayd.controller.daemon import Controller, ControllerOptions

    parent, child = multiprocessing.get_context("fork").Pipe()
    server = multiprocessing.get_context("fork").Process(target=_serve, args=(fake, child))
    server.start()
    try:
        url = parent.recv()
        config = fake.kubeconfig_dict()
        config["clusters"][0]["cluster"]["server"] = url
        api = new_client_from_config_dict(config, persist_config=False)
        core, objects = CoreV1Api(api), CustomObjectsApi(api)
        controller = Controller(api, ControllerOptions(identity="bench", resync_interval=300))
        started = time.perf_counter()
        controller.start()
        try:
            wait_until(lambda: controller.reconciles >= 1, 600, "the first reconcile")
            first = time.perf_counter() - started
            print(
                f"  start to the first reconcile written  {first:7.3f} s   "
                f"({controller.writes} writes: specs, statuses, Events)"
            )
            steered = selected_pods(planned)
            template = next(p for p in cluster.pods if p["status"]["podIP"] in steered)
            node = template["spec"]["nodeName"]
            node_obj = next(n for n in cluster.nodes if n["metadata"]["name"] == node)
            network = ip_network(node_obj["spec"]["podCIDRs"][0])
            to_node, to_gateway = [], []
            for i in range(20):
                ip = str(network[-3 - i])
                pod = copy.deepcopy(template)
                pod["metadata"] = {
                    "name": f"e2e-{i}",
                    "namespace": template["metadata"]["namespace"],
                    "labels": template["metadata"]["labels"],
                }
                pod["spec"]["containers"] = [{"name": "app", "image": "app"}]
                created = core.create_namespaced_pod(pod["metadata"]["namespace"], pod)
                # The kubelet reports the pod's IP.
                begin = time.perf_counter()
                core.patch_namespaced_pod_status(
                    created.metadata.name,
                    created.metadata.namespace,
                    {"status": {"podIP": ip, "podIPs": [{"ip": ip}]}},
                )
                gateways: set[str] = set()

                def steered(ip: str = ip, gateways: set[str] = gateways) -> bool:
                    spec = objects.get_cluster_custom_object(
                        "egress.gatewayd.io", "v1alpha1", "egressnodes", node
                    )["spec"]
                    rules = [r for r in spec["rules"] if ip in r["sources"]]
                    gateways.update(r["gateway"] for r in rules if r.get("gateway"))
                    return bool(rules)

                def snatted(ip: str = ip, gateways: set[str] = gateways) -> bool:
                    return all(_gateway_snats(objects, g, ip) for g in gateways)

                wait_until(steered, 120, "the new pod in its node's spec")
                to_node.append(time.perf_counter() - begin)
                wait_until(snatted, 120, "the new pod in its gateways' slices")
                to_gateway.append(time.perf_counter() - begin)
            for what, samples in (("its node's spec steers it", to_node),
                                  ("its gateways' specs and slices SNAT it", to_gateway)):
                print(f"  pod IP reported -> {what}: p50 {statistics.median(samples):.2f} s, "
                      f"p99 {max(samples):.2f} s (the largest of {len(samples)} pods)")
        finally:
            controller.stop()
    finally:
        parent.send("stop")
        server.join(10)


def _gateway_snats(objects: Any, gateway: str, ip: str) -> bool:
    """Whether the gateway's spec holds `ip` in a rule's sources, as its agent reads them."""
    spec = objects.get_cluster_custom_object(
        "egress.gatewayd.io", "v1alpha1", "egressgateways", gateway
    )["spec"]
    listed = objects.list_cluster_custom_object(
        "egress.gatewayd.io", "v1alpha1", "egresssourceslices",
        label_selector=f"{GATEWAY_LABEL}={gateway}",
    )["items"]
    by_name = {o["metadata"]["name"]: o for o in listed}
    rules, waiting = with_sources(spec.get("rules", []), by_name.get)
    return not waiting and any(ip in r["sources"] for r in rules if isinstance(r, dict))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--end-to-end", action="store_true", help="also against the fake API")
    parser.add_argument(
        "--memory", action="store_true", help="only the controller's peak RSS (real-sized pods)"
    )
    parser.add_argument("--pods", type=int, default=10_000, help="pods of the --memory run")
    args = parser.parse_args()
    if args.memory:
        bench_memory(args.seed, args.pods)
        return
    generated, planned = bench_in_memory(args.seed)
    if args.end_to_end:
        bench_end_to_end(generated, planned)


if __name__ == "__main__":
    main()
