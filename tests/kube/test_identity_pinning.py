"""Who may write what, with the real manifests of packaging/kubernetes loaded into the fake API
server (RBAC evaluated from their roles and bindings, the ValidatingAdmissionPolicies' CEL
with cel-python): the daemons' own writes go through; a steer pod writing another node's
EgressNode, a gateway writing another gateway's object or its own labels, are refused as a
real API server refuses them."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakecluster.fakeapi import FakeApiServer, wait_until
from fakecluster.fakeauth import (
    ClusterAuth,
    client_as,
    gateway_credentials,
    install,
    kubeconfig_as,
    manifest_objects,
    service_account_user,
)
from kubernetes.client import CoordinationV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from test_controller_harness import (
    GROUP,
    TIMEOUT,
    VERSION,
    Agents,
    World,
    basic_cluster,
    options,
    running,
)

from gatewayd.agent.config import load_agent_config
from gatewayd.agent.daemon import GatewayAgent
from gatewayd.agent.kubernetes import AgentCluster
from gatewayd.clusterlink import CustomObject, OwnObjectSource
from gatewayd.kube.leases import LeaseObserver, renew_lease
from gatewayd.kube.resources import EGRESS_GATEWAYS

pytestmark = pytest.mark.kube

NS = "gatewayd-system"
JsonObject = dict[str, Any]


@pytest.fixture
def cluster() -> Iterator[FakeApiServer]:
    """The fake with the manifests applied, two gateways' credentials, two nodes."""
    auth = ClusterAuth()
    with FakeApiServer(auth=auth) as fake:
        install(fake, manifest_objects() + gateway_credentials("gw-1")
                + gateway_credentials("gw-2"))
        world = World(fake)
        for index in (1, 2):
            world.node(index)
            world.gateway(index)
        yield fake


def auth_of(fake: FakeApiServer) -> ClusterAuth:
    assert fake.auth is not None
    return fake.auth


def steer_token(fake: FakeApiServer, node: str | None) -> str:
    """The token the kubelet projects into the steer pod on `node` (None: a token of the same
    service account without the node claim, as before Kubernetes 1.30)."""
    user = service_account_user(NS, "gatewayd-steer", pod=f"gatewayd-steer-{node or 'x'}",
                                node=node)
    return auth_of(fake).tokens.issue(user, ttl_seconds=3600)


def gateway_token(fake: FakeApiServer, gateway: str) -> str:
    """What `kubectl create token gateway-<name>` hands out."""
    user = service_account_user(NS, f"gateway-{gateway}")
    return auth_of(fake).tokens.issue(user, ttl_seconds=3600)


def refused(action: Any) -> ApiException:
    with pytest.raises(ApiException) as raised:
        action()
    return raised.value


def message(error: ApiException) -> str:
    """The message of the Status object the server answered."""
    return str(json.loads(error.body)["message"])


STATUS = {"observedGeneration": 1}


# --- steer ----------------------------------------------------------------------------------------


def test_steer_writes_its_own_node_egress_node(cluster: FakeApiServer) -> None:
    cluster.delete("egressnodes", "node-1")
    with client_as(cluster, steer_token(cluster, "node-1")) as api:
        node = CustomObject(api, "egressnodes", "EgressNode", "node-1")
        assert node.create({}) is not None
        node.patch_status(STATUS)
        node.record_event("gatewayd-steer", "Failover", "gw-1 -> gw-2", warning=True)
        assert node.get() is not None
    assert (cluster.get("egressnodes", "node-1") or {})["status"] == STATUS
    assert auth_of(cluster).refusals == []


def test_steer_may_not_write_another_nodes_egress_node(cluster: FakeApiServer) -> None:
    before = cluster.get("egressnodes", "node-2")
    with client_as(cluster, steer_token(cluster, "node-1")) as api:
        other = CustomObject(api, "egressnodes", "EgressNode", "node-2")
        denial = refused(lambda: other.patch_status({"publicKey": "A" * 43 + "="}))
        assert denial.status == 403
        assert ("ValidatingAdmissionPolicy 'gatewayd-steer-own-egressnode' with binding "
                "'gatewayd-steer-own-egressnode' denied request: steer on node node-1 may "
                "write only the EgressNode node-1, not node-2") in message(denial)
        cluster.delete("egressnodes", "node-2")
        assert refused(lambda: other.create({})).status == 403
    assert cluster.get("egressnodes", "node-2") is None
    assert before is not None


def test_a_steer_token_without_the_node_claim_writes_nothing(cluster: FakeApiServer) -> None:
    with client_as(cluster, steer_token(cluster, None)) as api:
        own = CustomObject(api, "egressnodes", "EgressNode", "node-1")
        denial = refused(lambda: own.patch_status(STATUS))
    assert denial.status == 403
    assert "carries no node-name claim" in message(denial)


def test_steer_may_not_write_the_plan(cluster: FakeApiServer) -> None:
    with client_as(cluster, steer_token(cluster, "node-1")) as api:
        denial = refused(lambda: CustomObjectsApi(api).patch_cluster_custom_object(
            GROUP, VERSION, "egressnodes", "node-1", {"spec": {"rules": []}}))
    assert denial.status == 403
    assert message(denial) == (
        'egressnodes.egress.gatewayd.io "node-1" is forbidden: User '
        '"system:serviceaccount:gatewayd-system:gatewayd-steer" cannot patch resource '
        '"egressnodes" in API group "egress.gatewayd.io" at the cluster scope')


# --- gateways -------------------------------------------------------------------------------------


def test_a_gateway_follows_its_spec_writes_its_status_and_renews_its_lease(
    cluster: FakeApiServer,
) -> None:
    cluster.put({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": "egressgateway-gw-1", "namespace": NS}, "spec": {}})
    with client_as(cluster, gateway_token(cluster, "gw-1")) as api:
        source = OwnObjectSource(api, EGRESS_GATEWAYS, "gw-1", lambda obj: obj)
        source.start(lambda: None)
        try:
            wait_until(lambda: source.informer.synced, TIMEOUT, "the list+watch of gw-1")
            assert source.informer.last_error is None
        finally:
            source.stop()
        CustomObject(api, "egressgateways", "EgressGateway", "gw-1").patch_status(STATUS)
        assert renew_lease(api, NS, "egressgateway-gw-1", "gw-1", 6, LeaseObserver())
    assert (cluster.get("egressgateways", "gw-1") or {})["status"]["observedGeneration"] == 1
    assert (cluster.get("leases", "egressgateway-gw-1", NS) or {})["spec"]["holderIdentity"] \
        == "gw-1"
    assert auth_of(cluster).refusals == []


def test_a_gateway_may_not_write_another_gateway_or_its_lease(cluster: FakeApiServer) -> None:
    with client_as(cluster, gateway_token(cluster, "gw-1")) as api:
        other = CustomObject(api, "egressgateways", "EgressGateway", "gw-2")
        assert refused(lambda: other.patch_status(STATUS)).status == 403
        assert refused(other.get).status == 403
        assert refused(lambda: CoordinationV1Api(api).read_namespaced_lease(
            "egressgateway-gw-2", NS)).status == 403


def test_a_gateway_may_not_change_its_own_labels(cluster: FakeApiServer) -> None:
    labels = (cluster.get("egressgateways", "gw-1") or {})["metadata"]["labels"]
    with client_as(cluster, gateway_token(cluster, "gw-1")) as api:
        own = CustomObject(api, "egressgateways", "EgressGateway", "gw-1")
        assert refused(lambda: own.patch_labels({"role": "payments"})).status == 403
        # Through the status subresource, labels are not written either (the status
        # strategy keeps everything but the status).
        CustomObjectsApi(api).patch_cluster_custom_object_status(
            GROUP, VERSION, "egressgateways", "gw-1",
            {"metadata": {"labels": {"role": "payments"}}, "status": STATUS})
    assert (cluster.get("egressgateways", "gw-1") or {})["metadata"]["labels"] == labels


def test_admission_pins_a_gateway_even_where_rbac_is_broader(cluster: FakeApiServer) -> None:
    """An administrator who binds a broad role to a gateway (one role for every gateway) still
    cannot let it write another gateway or its own labels: the policy refuses."""
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "all-gateways"},
            "rules": [{"apiGroups": [GROUP], "resources": ["egressgateways",
                                                           "egressgateways/status"],
                       "verbs": ["get", "update", "patch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "all-gateways"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                           "name": "all-gateways"},
               "subjects": [{"kind": "ServiceAccount", "name": "gateway-gw-1",
                             "namespace": NS}]}
    install(cluster, [role, binding])
    with client_as(cluster, gateway_token(cluster, "gw-1")) as api:
        other = CustomObject(api, "egressgateways", "EgressGateway", "gw-2")
        own = CustomObject(api, "egressgateways", "EgressGateway", "gw-1")
        assert other.get() is not None  # RBAC lets it read now
        denial = refused(lambda: other.patch_status(STATUS))
        assert denial.status == 403
        assert ("system:serviceaccount:gatewayd-system:gateway-gw-1 may write only its own "
                "EgressGateway, not gw-2") in message(denial)
        denial = refused(lambda: own.patch_labels({"role": "payments"}))
        assert "a gateway writes only its EgressGateway's status" in message(denial)
        own.patch_status(STATUS)


def test_the_agent_joins_beats_and_reports_with_its_own_token(
    cluster: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The agent's own join, heartbeat and status write, with its gateway's token. Its
    configured labels differ from the administrator's: it says so once and goes on."""
    cluster.put({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": "egressgateway-gw-1", "namespace": NS}, "spec": {}})
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(kubeconfig_as(cluster, gateway_token(cluster, "gw-1"))))
    config_file = tmp_path / "agent.yaml"
    config_file.write_text(yaml.safe_dump({
        "name": "gw-1", "labels": {"site": "dc9"},
        "kubernetes": {"kubeconfig": str(kubeconfig), "namespace": NS},
        "stateDirectory": str(tmp_path / "state"), "uplink": "eth0",
        "tunnel": {"interface": "idtest0", "listenPort": 51820},
    }))
    agent = GatewayAgent(load_agent_config(config_file)).mode
    assert isinstance(agent, AgentCluster)
    with caplog.at_level(logging.WARNING, "gatewayd.agent"):
        agent._join()
        agent._beat()
        agent._beat()
        agent._write_status(STATUS, (3.0, 5.0))
    warnings = [r.getMessage() for r in caplog.records if "refuses" in r.getMessage()]
    assert len(warnings) == 1
    assert "kubectl label egressgateway gw-1 site=dc9" in warnings[0]
    assert (cluster.get("leases", "egressgateway-gw-1", NS) or {})["spec"]["holderIdentity"] \
        == "gw-1"
    assert (cluster.get("egressgateways", "gw-1") or {})["status"]["observedGeneration"] == 1
    # Only the label write was refused.
    assert len(auth_of(cluster).refusals) == 1


# --- the controller -------------------------------------------------------------------------------


def test_the_controller_service_account_does_what_the_controller_does(
    cluster: FakeApiServer,
) -> None:
    world = World(cluster)
    basic_cluster(world)
    cluster.put({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                 "metadata": {"name": "kubernetes", "namespace": "default",
                              "labels": {"kubernetes.io/service-name": "kubernetes"}},
                 "addressType": "IPv4",
                 "endpoints": [{"addresses": ["192.0.2.100"]}],
                 "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]})
    token = auth_of(cluster).tokens.issue(
        service_account_user(NS, "gatewayd-controller", pod="gatewayd-controller-0",
                             node="node-1"), ttl_seconds=3600)
    with (cluster.api_client() as admin, client_as(cluster, token) as api,
          Agents(cluster, admin), running(api, options())):
        wait_until(lambda: bool(world.spec("egressgateways", "gw-1").get("rules"))
                   and bool(world.spec("egressnodes", "node-1").get("rules")),
                   TIMEOUT, "the controller's plans")
        wait_until(lambda: bool(world.status("pay").get("conditions")), TIMEOUT,
                   "the policy's status")
        nodes = world.spec("egressnodes", "node-1")
    assert auth_of(cluster).refusals == []
    assert "192.0.2.100/32" in str(nodes.get("clusterInternal"))
