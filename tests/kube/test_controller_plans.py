"""The controller against the fake API server: the specs and statuses it writes for a policy,
tunnel addresses, what a pod change rewrites, Cilium policies, probes."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakecluster.fakeapi import FakeApiServer, wait_until
from kubernetes.client import ApiClient
from prometheus_client.parser import text_string_to_metric_families
from test_controller_harness import (
    API_VERSION,
    NS,
    TIMEOUT,
    Agents,
    World,
    basic_cluster,
    controller_writes,
    options,
    public_key,
    running,
    settled,
)

from gatewayd.api.sourceslices import rule_slice_prefix
from gatewayd.controller.daemon import probe_server
from gatewayd.healthz import HealthServer

pytestmark = pytest.mark.kube

CRDS = Path(__file__).parents[2] / "packaging" / "kubernetes" / "crds"


def test_a_policy_with_pods_and_two_gateways(fake_api: FakeApiServer, api: ApiClient) -> None:
    world = World(fake_api)
    basic_cluster(world)
    world.pod("web-2", 1, 11, app="web")
    world.pod("db-1", 1, 12, app="db")  # not selected
    with Agents(fake_api, api), running(api, options()):
        wait_until(
            lambda: world.condition("pay", "Ready").get("status") == "True", TIMEOUT, "Ready"
        )
        active = {
            "policy": "pay",
            "role": "active",
            "egressIP": "192.0.2.1",
            "sources": ["10.244.1.10", "10.244.1.11"],
            "destinations": ["198.51.100.0/24"],
        }
        peer = {
            "name": "node-1",
            "publicKey": public_key("node-1"),
            "endpoint": "10.0.0.1:51820",
            "allowedIPs": ["10.244.1.0/24", "100.127.0.2/32"],
        }
        assert world.spec("egressgateways", "gw-1") == {"peers": [peer], "rules": [active]}
        assert world.spec("egressgateways", "gw-2") == {
            "peers": [{**peer, "endpoint": "10.0.0.1:51822"}],
            "rules": [{**active, "role": "standby", "egressIP": "192.0.2.2"}],
        }
        assert world.spec("egressnodes", "node-1") == {
            "gateways": [
                {
                    "name": f"gw-{i}",
                    "publicKey": public_key(f"gw-{i}"),
                    "endpoint": f"192.0.2.{i}:51820",
                }
                for i in (1, 2)
            ],
            "clusterInternal": ["10.0.0.1/32", "10.244.1.0/24"],
            "rules": [
                {
                    "policy": "pay",
                    "action": "tunnel",
                    "gateway": "gw-1",
                    "standby": "gw-2",
                    "sources": ["10.244.1.10", "10.244.1.11"],
                    "destinations": ["198.51.100.0/24"],
                }
            ],
            "tunnelAddress": "100.127.0.2",
        }
        status = world.status("pay")
        assert {k: v for k, v in status.items() if k != "conditions"} == {
            "observedGeneration": 1,
            "gateways": [
                {"entry": 0, "name": "gw-1", "role": "active", "egressIPs": ["192.0.2.1"]},
                {"entry": 0, "name": "gw-2", "role": "standby", "egressIPs": ["192.0.2.2"]},
            ],
            "activeGateways": "gw-1",
            "egressIPs": "192.0.2.1",
            "selectedPods": 2,
        }
        assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
            ("Accepted", "True", "Accepted"),
            ("Ready", "True", "Ready"),
        ]
        (promoted,) = world.events("GatewayPromoted")
        assert promoted["regarding"]["name"] == "pay"
        assert promoted["metadata"]["namespace"] == "default"
        assert promoted["note"] == "entry 0: gw-1 is active"


def slices_of(fake: FakeApiServer, gateway: str) -> list[dict[str, Any]]:
    return [
        s for s in fake.list("egresssourceslices")
        if s["metadata"]["labels"]["egress.gatewayd.io/gateway"] == gateway
    ]


def test_the_sources_move_to_slices_when_the_agent_reads_them(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    """An upgrade: the controller of this version takes over specs an older one wrote (sources
    in the rules) and an agent from before slices; it goes on writing sources in the spec to
    that agent, and moves them to slices once its status says it reads them (the new agent's
    first status), then deletes the slices of a rule that went away."""
    world = World(fake_api)
    basic_cluster(world)
    world.pod("web-2", 1, 11, app="web")
    world.gateway(1, features=())
    old_form = {
        "policy": "pay", "role": "active", "egressIP": "192.0.2.1",
        "sources": ["10.244.1.10", "10.244.1.11"], "destinations": ["198.51.100.0/24"],
    }
    gateway = fake_api.get("egressgateways", "gw-1")
    assert gateway is not None
    fake_api.put({**gateway, "spec": {"rules": [old_form]}})  # the old controller's
    with Agents(fake_api, api), running(api, options()) as controller:
        wait_until(lambda: world.condition("pay", "Ready").get("status") == "True", TIMEOUT,
                   "Ready")
        settled(fake_api, controller)
        assert world.raw_spec("egressgateways", "gw-1")["rules"] == [old_form]
        assert slices_of(fake_api, "gw-1") == []

        world.gateway(1)  # the upgraded agent's status
        wait_until(lambda: "sourceSlices" in str(world.raw_spec("egressgateways", "gw-1")),
                   TIMEOUT, "the spec to name slices")
        (rule,) = world.raw_spec("egressgateways", "gw-1")["rules"]
        assert "sources" not in rule
        assert [s["spec"] for s in slices_of(fake_api, "gw-1")] == [
            {"gateway": "gw-1", "policy": "pay", "addresses": ["10.244.1.10", "10.244.1.11"]}
        ]
        assert world.spec("egressgateways", "gw-1")["rules"] == [old_form]

        fake_api.delete("egressgatewaypolicies", "pay")
        wait_until(lambda: slices_of(fake_api, "gw-1") == [], TIMEOUT, "the slice deleted")
        assert world.raw_spec("egressgateways", "gw-1")["rules"] == []


def test_ready_waits_for_the_gateway_to_report_the_plan(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world)
    with Agents(fake_api, api) as agents, running(api, options()):
        agents.hold("gw-1")
        wait_until(lambda: world.gateway_roles("gw-1", "pay") == {"active"}, TIMEOUT, "gw-1 plan")
        wait_until(
            lambda: world.condition("pay", "Ready").get("reason") == "GatewayNotProgrammed",
            TIMEOUT,
            "Ready=False GatewayNotProgrammed",
        )
        assert "gw-1" in world.condition("pay", "Ready")["message"]
        agents.release("gw-1")
        wait_until(
            lambda: world.condition("pay", "Ready").get("status") == "True", TIMEOUT, "Ready"
        )


def _printer_column(crd: dict[str, Any], name: str, obj: dict[str, Any]) -> Any:
    """Evaluate a printer column's jsonPath (the two shapes the policy CRD uses)."""
    (column,) = [
        c for c in crd["spec"]["versions"][0]["additionalPrinterColumns"] if c["name"] == name
    ]
    path = column["jsonPath"]
    if match := re.fullmatch(r'\.status\.conditions\[\?\(@\.type=="(\w+)"\)\]\.status', path):
        return next(
            (c["status"] for c in obj["status"]["conditions"] if c["type"] == match[1]), None
        )
    value: Any = obj
    for part in path.strip(".").split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def test_the_printer_columns_show_gateway_egress_ip_pods_and_ready(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world)
    world.policy("pay", egress_ip="203.0.113.5")
    crd = yaml.safe_load((CRDS / "egressgatewaypolicies.yaml").read_text())
    with Agents(fake_api, api), running(api, options()):
        wait_until(
            lambda: world.condition("pay", "Ready").get("status") == "True", TIMEOUT, "Ready"
        )
        obj = fake_api.get("egressgatewaypolicies", "pay") or {}
        columns = {
            name: _printer_column(crd, name, obj)
            for name in ("Gateway", "Egress-IP", "Pods", "Ready")
        }
    assert columns == {"Gateway": "gw-1", "Egress-IP": "203.0.113.5", "Pods": 1, "Ready": "True"}


def test_tunnel_addresses_are_unique_and_survive_a_restart(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world)
    world.node(2)
    # node-3 claims node-2's address (say, restored from a backup): the first by name keeps it.
    world.node(3)
    node_3 = fake_api.get("egressnodes", "node-3") or {}
    fake_api.put({**node_3, "spec": {"tunnelAddress": "100.127.0.9"}})
    node_2 = fake_api.get("egressnodes", "node-2") or {}
    fake_api.put({**node_2, "spec": {"tunnelAddress": "100.127.0.9"}})

    def addresses() -> dict[str, str]:
        return {
            n["metadata"]["name"]: (n.get("spec") or {}).get("tunnelAddress")
            for n in fake_api.list("egressnodes")
        }

    with Agents(fake_api, api), running(api, options()) as controller:
        expected = {"node-1": "100.127.0.2", "node-2": "100.127.0.9", "node-3": "100.127.0.3"}
        wait_until(lambda: addresses() == expected, TIMEOUT, "tunnel addresses")
        settled(fake_api, controller)
    start = len(fake_api.requests)
    world.node(4)
    fake_api.delete("egressnodes", "node-1")
    with Agents(fake_api, api), running(api, options(identity="c2")) as controller:
        wait_until(lambda: "node-4" in addresses() and addresses()["node-4"], TIMEOUT, "node-4")
        settled(fake_api, controller)
        # A new controller keeps every address; the freed .2 goes to the new node.
        assert addresses() == {
            "node-2": "100.127.0.9",
            "node-3": "100.127.0.3",
            "node-4": "100.127.0.2",
        }
        addressed = {
            r.path.rpartition("/")[2]: r.body["spec"]["tunnelAddress"]
            for r in controller_writes(fake_api, start)
            if "/egressnodes/" in r.path and not r.path.endswith("/status")
        }
        assert addressed == {
            "node-2": "100.127.0.9",  # rewritten: node-4 is cluster-internal now
            "node-3": "100.127.0.3",
            "node-4": "100.127.0.2",
        }


def test_a_pod_change_rewrites_only_what_it_touches(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world)
    world.node(2)
    world.pod("web-2", 2, 10, app="web")
    world.policy("other", app="db", destinations=("203.0.113.0/24",))
    with Agents(fake_api, api), running(api, options()) as controller:
        wait_until(
            lambda: world.roles("pay") == {("gw-1", "active"), ("gw-2", "standby")},
            TIMEOUT,
            "pay's gateways",
        )
        settled(fake_api, controller)
        start = len(fake_api.requests)
        world.pod("web-3", 2, 11, app="web")
        wait_until(
            lambda: "10.244.2.11" in str(world.spec("egressnodes", "node-2")), TIMEOUT, "web-3"
        )
        settled(fake_api, controller)
        written = sorted(
            r.path.removeprefix(f"/apis/{API_VERSION}/") for r in controller_writes(fake_api, start)
        )
    # node-1 and the policy "other" are untouched; pay's pod count changed; of each gateway
    # one source slice and the digest its spec names.
    touched = [f"{rule_slice_prefix(g, {'policy': 'pay', 'egressIP': '192.0.2.1'})}.0"
               for g in ("gw-1", "gw-2")]
    assert written == [
        "egressgatewaypolicies/pay/status",
        "egressgateways/gw-1",
        "egressgateways/gw-2",
        "egressnodes/node-2",
        *sorted(f"egresssourceslices/{name}" for name in touched),
    ]
    assert world.status("pay")["selectedPods"] == 3


def test_cilium_policies_are_followed_only_when_asked(
    fake_api: FakeApiServer, api: ApiClient
) -> None:
    world = World(fake_api)
    basic_cluster(world)
    world.pod("db-1", 1, 20, app="db")
    spec = {
        "selectors": [{"podSelector": {"matchLabels": {"app": "db"}}}],
        "destinationCIDRs": ["192.0.2.128/25"],
        "egressGateway": {"nodeSelector": {"matchLabels": {"role": "gateway"}}},
    }
    fake_api.put(
        {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumEgressGatewayPolicy",
            "metadata": {"name": "legacy"},
            "spec": spec,
        }
    )

    def node_policies() -> set[str]:
        return {r["policy"] for r in world.spec("egressnodes", "node-1").get("rules", [])}

    with Agents(fake_api, api):
        with running(api, options()) as controller:
            wait_until(lambda: node_policies() == {"pay"}, TIMEOUT, "pay on node-1")
            settled(fake_api, controller)
            assert node_policies() == {"pay"}
        with running(api, options(identity="c2", cilium_policies=True)):
            wait_until(lambda: node_policies() == {"legacy", "pay"}, TIMEOUT, "legacy too")
            # A Cilium policy has no status subresource: the controller only records Events.
            assert (fake_api.get("ciliumegressgatewaypolicies", "legacy") or {}).get(
                "status"
            ) is None


def test_probes_report_health_and_synced_caches(fake_api: FakeApiServer, api: ApiClient) -> None:
    world = World(fake_api)
    basic_cluster(world)
    with running(api, options()) as controller:
        probes = probe_server(controller, "127.0.0.1", 0)
        probes.start()
        try:
            for path in ("/healthz", "/readyz"):
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{probes.port}{path}", timeout=5
                ) as r:
                    assert (r.status, r.read()) == (200, b"ok\n")
            # Prometheus metrics beside the probes: the leader, its reconciles and writes, and
            # the policy's active gateways.
            wait_until(lambda: controller.reconciles > 0, TIMEOUT, "a reconcile")

            def scrape() -> dict[str, float]:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{probes.port}/metrics", timeout=5
                ) as r:
                    assert r.status == 200
                    text = r.read().decode()
                return {
                    sample.name + str(sorted(sample.labels.items())): sample.value
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                }

            wait_until(lambda: scrape().get("gatewayd_controller_leader[]") == 1.0, TIMEOUT,
                       "the leader gauge")
            got = scrape()
            written = (fake_api.get("egressgatewaypolicies", "pay") or {}).get("status") or {}
            active = [g for g in written.get("gateways") or [] if g["role"] == "active"]
            assert got["gatewayd_policy_active_gateways[('policy', 'pay')]"] == len(active)
            assert got["gatewayd_controller_objects_written_total[]"] >= 1
            assert got["gatewayd_controller_reconcile_duration_seconds_count[]"] >= 1
        finally:
            probes.stop()
    assert not controller.healthy  # stopped


def test_probes_answer_503_when_not_ready() -> None:
    probes = HealthServer("127.0.0.1", 0, lambda: True, lambda: False)
    probes.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(f"http://127.0.0.1:{probes.port}/readyz", timeout=5)
        assert raised.value.code == 503
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(f"http://127.0.0.1:{probes.port}/nothing", timeout=5)
        assert raised.value.code == 404
    finally:
        probes.stop()


def test_leases_live_in_the_controller_namespace(fake_api: FakeApiServer, api: ApiClient) -> None:
    world = World(fake_api)
    basic_cluster(world)
    with running(api, options()):
        lease = fake_api.get("leases", "gatewayd-controller", NS) or {}
        assert lease["spec"]["holderIdentity"] == "c1"
