"""The harness of the controller's tests (tests/kube/test_controller_*.py), and its own tests.

A small cluster played on the fake API server: namespaces, nodes and pods as the kubelet would
write them; EgressGateways and EgressNodes with the status their agents publish; `Agents`, a
thread that plays every gateway agent and steer agent: it renews each gateway's Lease and
reports `status.observedGeneration` for every spec it "applies" (through the API, as a status
patch). Tests stop a heartbeat to kill a gateway and pause reports to hold a gateway or node back.
The controller runs in-process, in its own threads, against the same fake.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from fakecluster.fakeapi import FakeApiServer, RecordedRequest, wait_until
from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from gatewayd.api.sourceslices import SLICES_FEATURE, with_sources
from gatewayd.controller.daemon import Controller, ControllerOptions
from gatewayd.kube.informer import Backoff
from gatewayd.kube.leases import micro_time

pytestmark = pytest.mark.kube

NS = "gatewayd-system"
GROUP, VERSION = "egress.gatewayd.io", "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
LEASE_SECONDS = 2
HOLD_DOWN = 1.5
TIMEOUT = 20.0
JsonObject = dict[str, Any]


def public_key(name: str) -> str:
    """A well-formed WireGuard public key, distinct per name."""
    return base64.b64encode(hashlib.sha256(name.encode()).digest()).decode()


def pod_ip(node: int, host: int) -> str:
    return f"10.244.{node}.{host}"


class World:
    """Objects of a small cluster, written straight into the fake (as kubelets and agents)."""

    def __init__(self, fake: FakeApiServer) -> None:
        self.fake = fake

    def namespace(self, name: str, **labels: str) -> None:
        metadata = {"name": name, "labels": {"kubernetes.io/metadata.name": name, **labels}}
        self.fake.put({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata})

    def node(self, index: int) -> str:
        """Node `node-<index>` (pod CIDR 10.244.<index>.0/24) and its EgressNode, as steer
        publishes it."""
        name = f"node-{index}"
        self.fake.put(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                "spec": {"podCIDRs": [f"10.244.{index}.0/24"]},
                "status": {"addresses": [{"type": "InternalIP", "address": f"10.0.0.{index}"}]},
            }
        )
        self.fake.put(
            {
                "apiVersion": API_VERSION,
                "kind": "EgressNode",
                "metadata": {"name": name},
                # Steer listens for gw-2 on its own port; gw-1's is not published (yet).
                "status": {
                    "publicKey": public_key(name),
                    "endpoint": f"10.0.0.{index}:51820",
                    "gatewayPorts": {"gw-2": 51822},
                },
            }
        )
        return name

    def pod(
        self, name: str, node: int, host: int, namespace: str = "default", **labels: str
    ) -> str:
        ip = pod_ip(node, host)
        self.fake.put(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "uid": f"uid-{namespace}-{name}",
                    "labels": labels,
                },
                "spec": {"nodeName": f"node-{node}", "serviceAccountName": "default"},
                "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
            }
        )
        return ip

    def gateway(
        self, index: int, ready: bool = True, features: tuple[str, ...] = (SLICES_FEATURE,),
        **labels: str,
    ) -> str:
        """EgressGateway `gw-<index>` at 192.0.2.<index>, default route on eth0, as its agent
        publishes it (`features`: () for an agent from before source slices); labelled
        `role=gateway` and `labels`."""
        name = f"gw-{index}"
        address = f"192.0.2.{index}"
        obj = self.fake.get("egressgateways", name)
        status = {
            **(obj or {}).get("status", {}),
            "publicKey": public_key(name),
            "endpoint": f"{address}:51820",
            "addresses": [{"type": "InternalIP", "address": address}],
            "interfaces": [
                {"name": "eth0", "addresses": [f"{address}/24"], "defaultRouteV4": True}
            ],
            "egressIPPools": [{"cidr": "203.0.113.0/28", "interface": "eth0"}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        }
        if features:
            status["features"] = list(features)
        else:
            status.pop("features", None)
        metadata = {**(obj or {}).get("metadata", {}), "name": name}
        metadata["labels"] = {"role": "gateway", "kubernetes.io/hostname": name, **labels}
        self.fake.put(
            {
                "apiVersion": API_VERSION,
                "kind": "EgressGateway",
                "metadata": metadata,
                "spec": (obj or {}).get("spec", {}),
                "status": status,
            }
        )
        return name

    def policy(
        self,
        name: str,
        app: str = "web",
        destinations: tuple[str, ...] = ("198.51.100.0/24",),
        gateway_labels: Mapping[str, str] | None = None,
        egress_ip: str | None = None,
        **extra: Any,
    ) -> None:
        """A policy selecting pods labelled app=`app` through gateways labelled
        `gateway_labels` (role=gateway by default); `extra` spec fields as they are."""
        obj = self.fake.get("egressgatewaypolicies", name)
        gateway: JsonObject = {
            "nodeSelector": {"matchLabels": dict(gateway_labels or {"role": "gateway"})}
        }
        if egress_ip is not None:
            gateway["egressIP"] = egress_ip
        spec = {
            "selectors": [{"podSelector": {"matchLabels": {"app": app}}}],
            "destinationCIDRs": list(destinations),
            "egressGateway": gateway,
            **extra,
        }
        self.fake.put(
            {
                "apiVersion": API_VERSION,
                "kind": "EgressGatewayPolicy",
                "metadata": {**(obj or {}).get("metadata", {}), "name": name},
                "spec": spec,
                "status": (obj or {}).get("status", {}),
            }
        )

    def raw_spec(self, resource: str, name: str) -> JsonObject:
        return (self.fake.get(resource, name) or {}).get("spec") or {}

    def spec(self, resource: str, name: str) -> JsonObject:
        """The object's spec; an EgressGateway's with its rules' sources read back from their
        EgressSourceSlices, as the agent reads them (all of them must be there)."""
        spec: JsonObject = (self.fake.get(resource, name) or {}).get("spec") or {}
        if resource != "egressgateways":
            return spec
        assembled: JsonObject = {}

        def read_back() -> bool:
            # The controller writes a rule's slices just before the spec that names them.
            nonlocal spec
            spec = (self.fake.get(resource, name) or {}).get("spec") or {}
            rules, waiting = with_sources(
                spec.get("rules", []), lambda piece: self.fake.get("egresssourceslices", piece)
            )
            assembled.update({**spec, "rules": rules} if "rules" in spec else spec)
            return not waiting

        wait_until(read_back, 5.0, f"EgressGateway {name}'s slices as its spec names them")
        return assembled

    def status(self, name: str) -> JsonObject:
        return (self.fake.get("egressgatewaypolicies", name) or {}).get("status") or {}

    def node_routes(self, node: str, policy: str) -> set[tuple[str | None, str | None]]:
        """(gateway, standby) of the node's tunnel rules for `policy`."""
        return {
            (r.get("gateway"), r.get("standby"))
            for r in self.spec("egressnodes", node).get("rules", [])
            if r["policy"] == policy
        }

    def gateway_roles(self, gateway: str, policy: str) -> set[str]:
        return {
            r["role"]
            for r in self.spec("egressgateways", gateway).get("rules", [])
            if r["policy"] == policy
        }

    def roles(self, policy: str) -> set[tuple[str, str]]:
        """(gateway, role) pairs the policy's status reports."""
        return {(g["name"], g["role"]) for g in self.status(policy).get("gateways", [])}

    def condition(self, policy: str, kind: str) -> JsonObject:
        for condition in self.status(policy).get("conditions", []):
            if condition["type"] == kind:
                return dict(condition)
        return {}

    def events(self, reason: str | None = None) -> list[JsonObject]:
        return [
            e
            for e in self.fake.list("events.events.k8s.io")
            if reason is None or e["reason"] == reason
        ]


class Agents:
    """Every gateway agent and steer agent: Lease heartbeats and observedGeneration reports."""

    def __init__(self, fake: FakeApiServer, api: ApiClient) -> None:
        self.fake = fake
        self._objects = CustomObjectsApi(api)
        self._lock = threading.Lock()
        self._dead: set[str] = set()  # gateways whose heartbeat stopped
        self._held: set[str] = set()  # gateways and nodes that do not report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agents", daemon=True)

    def __enter__(self) -> Agents:
        self.heartbeat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def kill(self, gateway: str) -> None:
        """Stop renewing the gateway's Lease (it expires within LEASE_SECONDS)."""
        with self._lock:
            self._dead.add(gateway)

    def revive(self, gateway: str) -> None:
        with self._lock:
            self._dead.discard(gateway)
        self.heartbeat()

    def hold(self, name: str) -> None:
        """Stop reporting observedGeneration for gateway or node `name`."""
        with self._lock:
            self._held.add(name)

    def release(self, name: str) -> None:
        with self._lock:
            self._held.discard(name)

    def heartbeat(self) -> None:
        """Renew the Lease of every live gateway now."""
        if not self.fake.is_up:
            return  # agents cannot reach the API either
        with self._lock:
            dead = set(self._dead)
        now = micro_time(datetime.now(UTC))
        for gateway in self.fake.list("egressgateways"):
            name = gateway["metadata"]["name"]
            if name in dead:
                continue
            self.fake.put(
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": f"egressgateway-{name}", "namespace": NS},
                    "spec": {
                        "holderIdentity": name,
                        "leaseDurationSeconds": LEASE_SECONDS,
                        "renewTime": now,
                    },
                }
            )

    def report(self) -> None:
        """Report observedGeneration for every spec not yet reported (as applying it would)."""
        with self._lock:
            held = self._held | self._dead
        for plural in ("egressgateways", "egressnodes"):
            for obj in self.fake.list(plural):
                name, generation = obj["metadata"]["name"], obj["metadata"]["generation"]
                if (
                    name in held
                    or (obj.get("status") or {}).get("observedGeneration") == generation
                ):
                    continue
                with contextlib.suppress(ApiException, OSError):
                    self._objects.patch_cluster_custom_object_status(
                        GROUP,
                        VERSION,
                        plural,
                        name,
                        {"status": {"observedGeneration": generation}},
                        _request_timeout=5,
                    )

    def _run(self) -> None:
        beats = 0
        while not self._stop.wait(0.05):
            beats += 1
            if beats % 5 == 0:
                self.heartbeat()
            if self.fake.is_up:
                self.report()


def options(identity: str = "c1", **overrides: Any) -> ControllerOptions:
    values: dict[str, Any] = {
        "namespace": NS,
        "identity": identity,
        "lease_duration": 2,
        "hold_down": HOLD_DOWN,
        "min_interval": 0.05,
        "resync_interval": 0.5,
        "backoff": Backoff(initial=0.05, maximum=0.5),
    }
    values.update(overrides)
    return ControllerOptions(**values)


@contextlib.contextmanager
def running(api: ApiClient, opts: ControllerOptions, lead: bool = True) -> Iterator[Controller]:
    """A controller in threads; with `lead`, once it is ready and leads."""
    controller = Controller(api, opts)
    controller.start()
    try:
        if lead:
            wait_until(lambda: controller.ready and controller.is_leader, TIMEOUT, "leadership")
        yield controller
    finally:
        controller.stop()


def controller_writes(fake: FakeApiServer, start: int = 0) -> list[RecordedRequest]:
    """The controller's writes since request `start`: merge patches of specs and statuses (the
    agents' patches carry observedGeneration alone), and Events."""
    return [
        r
        for r in fake.requests[start:]
        if (r.method == "PATCH" and f"/apis/{GROUP}/" in r.path and not agent_report(r))
        or (r.method == "POST" and r.path.endswith("/events"))
    ]


def agent_report(request: RecordedRequest) -> bool:
    """Whether `request` is one of `Agents`' status reports."""
    body = request.body if isinstance(request.body, dict) else {}
    return set(body) == {"status"} and set(body["status"]) == {"observedGeneration"}


def settled(fake: FakeApiServer, controller: Controller, runs: int = 2) -> None:
    """Wait until the controller ran `runs` full reconciles in a row that wrote nothing."""
    quiet = 0
    last = (controller.reconciles, controller.writes)

    def quiet_enough() -> bool:
        nonlocal quiet, last
        now = (controller.reconciles, controller.writes)
        if now[1] != last[1]:
            quiet = 0
        elif now[0] != last[0]:
            quiet += now[0] - last[0]
        last = now
        return quiet >= runs

    wait_until(quiet_enough, TIMEOUT, "the controller to settle")


def basic_cluster(world: World, gateways: int = 2) -> None:
    """Namespace default, node-1 with pod web-1 (app=web), gateways gw-1.., policy pay."""
    world.namespace("default")
    world.node(1)
    world.pod("web-1", 1, 10, app="web")
    for index in range(1, gateways + 1):
        world.gateway(index)
    world.policy("pay")


# --- tests of the harness --------------------------------------------------------------------


def test_agents_renew_leases_and_report_what_they_applied(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    world.gateway(1)
    world.node(1)
    with Agents(fake_api, api) as agents:
        lease = fake_api.get("leases", "egressgateway-gw-1", NS)
        assert lease is not None and lease["spec"]["leaseDurationSeconds"] == LEASE_SECONDS
        wait_until(
            lambda: (
                (fake_api.get("egressnodes", "node-1") or {})["status"].get("observedGeneration")
                == 1
            ),
            TIMEOUT,
            "node-1 to report generation 1",
        )
        agents.hold("node-1")
        fake_api.put({**fake_api.get("egressnodes", "node-1"), "spec": {"rules": []}})
        agents.kill("gw-1")
        renewed = fake_api.get("leases", "egressgateway-gw-1", NS)
        agents.heartbeat()
        assert fake_api.get("leases", "egressgateway-gw-1", NS) == renewed
        node = fake_api.get("egressnodes", "node-1") or {}
        assert (node["metadata"]["generation"], node["status"]["observedGeneration"]) == (2, 1)
