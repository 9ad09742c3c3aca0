"""Kubernetes mode of the daemons, pure parts: the `kubernetes:` config sections, steer's gateway
slots, plans read from specs and saved on disk, and the statuses the daemons publish."""

from __future__ import annotations

import base64
import hashlib
import json
import textwrap
from importlib import metadata
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakecluster.crdcheck import CustomResourceValidator

from gatewayd.agent.config import load_agent_config
from gatewayd.agent.egress import EgressIPReport
from gatewayd.agent.kubernetes import AgentState, gateway_status, target_from_object
from gatewayd.agent.target import target_from_dict as gateway_target_from_dict
from gatewayd.agent.target import target_to_dict as gateway_target_to_dict
from gatewayd.clusterlink import status_patch
from gatewayd.configfile import ConfigError
from gatewayd.controller.specs import node_endpoint
from gatewayd.follower import InputError, Part, StepFailure
from gatewayd.policy.model import GatewayInterface, InterfaceAddress
from gatewayd.probe import Failover
from gatewayd.steer.config import FIRST_TABLE, load_steer_config
from gatewayd.steer.kubernetes import NodeState, node_status
from gatewayd.steer.kubernetes import target_from_object as node_target_from_object
from gatewayd.steer.slots import SlotsFullError, SlotTable, capacity, interface_name, tunnel_end
from gatewayd.steer.target import target_from_dict as node_target_from_dict
from gatewayd.steer.target import target_to_dict as node_target_to_dict

pytestmark = pytest.mark.unit


def key(name: str) -> str:
    return base64.b64encode(hashlib.sha256(name.encode()).digest()).decode()


AGENT = """\
name: gw1
labels: {site: dc1}
kubernetes:
  kubeconfig: /etc/gatewayd/kubeconfig
uplink: eth0
egressIPPools:
  - cidr: 198.51.100.64/27
tunnel:
  listenPort: 51820
"""

STEER = """\
node: node1
kubernetes:
  server: https://192.0.2.1:6443
  tokenFile: /etc/gatewayd/token
  caFile: /etc/gatewayd/ca.crt
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path, loader=load_agent_config) -> list[str]:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        loader(path)
    return info.value.problems


# --- configs ----------------------------------------------------------------------------------


def test_agent_kubernetes_mode_defaults(tmp_path: Path) -> None:
    config = load_agent_config(write(tmp_path, AGENT))
    assert config.kubernetes is not None and config.snapshot == ()
    assert config.kubernetes.kubeconfig == Path("/etc/gatewayd/kubeconfig")
    assert config.kubernetes.namespace == "gatewayd-system"
    assert (config.kubernetes.lease_duration_seconds,
            config.kubernetes.lease_renew_seconds) == (6, 2.0)
    assert config.tunnel.address == "100.127.0.1/32"  # every gateway's: the probes' target
    assert config.tunnel.advertise_endpoint is None
    assert config.failover.egress_ip_hold_seconds == 0.2


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("kubernetes:\n", "snapshot: /s\nkubernetes:\n",
     "snapshot: give either snapshot (standalone mode) or kubernetes, not both"),
    ("  kubeconfig: /etc/gatewayd/kubeconfig\n", "  namespace: x\n",
     "kubernetes.kubeconfig: required: give kubeconfig, or server + tokenFile + caFile"),
    ("  kubeconfig: /etc/gatewayd/kubeconfig\n",
     "  kubeconfig: /k\n  server: https://a:6443\n",
     "kubernetes.kubeconfig: give either kubeconfig or server + tokenFile + caFile"),
    ("  kubeconfig: /etc/gatewayd/kubeconfig\n", "  server: https://a:6443\n",
     "kubernetes.tokenFile: required with a join token"),
    ("  kubeconfig: /etc/gatewayd/kubeconfig\n",
     "  kubeconfig: /k\n  leaseDurationSeconds: 4\n  leaseRenewSeconds: 3\n",
     "kubernetes.leaseRenewSeconds: must be at most half of leaseDurationSeconds (4), got 3"),
    ("  listenPort: 51820\n", "  listenPort: 51820\n  peers: []\n",
     "tunnel.peers: not used in Kubernetes mode"),
    ("  listenPort: 51820\n", "  listenPort: 51820\n  advertiseEndpoint: 10.0.0.1\n",
     "tunnel.advertiseEndpoint: must be HOST:PORT"),
])
def test_agent_kubernetes_mode_errors(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in AGENT
    found = problems(write(tmp_path, AGENT.replace(old, new)))
    assert any(expected in p for p in found), found


def test_failover_settings_need_kubernetes_mode(tmp_path: Path) -> None:
    text = "name: gw1\nsnapshot: /s\nuplink: eth0\ntunnel: {}\nfailover:\n  arpProbeSeconds: 1\n"
    found = problems(write(tmp_path, text))
    assert any("failover.arpProbeSeconds: failover settings are used in Kubernetes mode only"
               in p for p in found), found


def test_steer_kubernetes_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_steer_config(write(tmp_path, STEER))
    assert config.kubernetes is not None and config.kubernetes.server == "https://192.0.2.1:6443"
    assert config.gateways == () and config.interface_prefix == "egw-"
    assert config.listen_port == 51821 and config.failover.misses == 3
    assert config.health_port == 9441  # the DaemonSet's probes
    # the node's name from the DaemonSet's environment
    monkeypatch.setenv("GATEWAYD_NODE_NAME", "node-7")
    assert load_steer_config(write(tmp_path, STEER.replace("node: node1\n", ""))).node == "node-7"


def test_steer_in_cluster_without_credentials_settings(tmp_path: Path) -> None:
    config = load_steer_config(write(tmp_path, "node: n\nkubernetes: {namespace: x}\n"))
    assert config.kubernetes is not None and config.kubernetes.in_cluster
    assert config.kubernetes.namespace == "x"


@pytest.mark.parametrize(("text", "expected"), [
    ("node: n\nsnapshot: /s\ntunnel:\n  interfacePrefix: a-\n  gateways: []\n",
     "tunnel.interfacePrefix: only used in Kubernetes mode"),
    ("node: n\nkubernetes: {}\ntunnel:\n  gateways: []\n",
     "tunnel.gateways: not used in Kubernetes mode"),
    ("node: n\nkubernetes: {}\ntunnel:\n  interfacePrefix: waytoolong-\n",
     "tunnel.interfacePrefix: must be 1 to 8 characters"),
    ("node: n\nkubernetes: {}\nfailover:\n  missesBeforeDown: 0\n",
     "failover.missesBeforeDown: must be between 1 and 100"),
])
def test_steer_kubernetes_mode_errors(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(write(tmp_path, text), load_steer_config)
    assert any(expected in p for p in found), found


# --- slots ------------------------------------------------------------------------------------


def test_slots_are_stable_across_plans_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "slots.json"
    table = SlotTable(path, 0xF0)
    assert table.assign(["gw2", "gw1"]) == {"gw1": 0, "gw2": 1}
    # a new gateway sorting first does not move the others
    assert table.assign(["gw0", "gw1", "gw2"]) == {"gw0": 2, "gw1": 0, "gw2": 1}
    assert SlotTable(path, 0xF0).assign(["gw2"]) == {"gw2": 1}
    assert json.loads(path.read_text()) == {"gw0": 2, "gw1": 0, "gw2": 1}


def test_slots_of_departed_gateways_are_reused_only_when_full(tmp_path: Path) -> None:
    table = SlotTable(tmp_path / "slots.json", 0x30)  # three marks: 0x10, 0x20, 0x30
    assert capacity(0x30) == 3 and capacity(0xF0) == 15 and capacity(0x300) == 3
    table.assign(["a", "b", "c"])
    assert table.assign(["b", "c", "d"]) == {"b": 1, "c": 2, "d": 0}
    with pytest.raises(SlotsFullError, match=r"widen tunnel\.markMask"):
        table.assign(["b", "c", "d", "e"])


def test_interface_names_fit_the_kernel_limit() -> None:
    assert interface_name("egw-", "gw1", 0) == "egw-gw1"
    long_a = interface_name("egw-", "gateway-east-1a", 3)
    long_b = interface_name("egw-", "gateway-east-1b", 4)
    assert len(long_a) == len(long_b) == 15 and long_a != long_b


def test_tunnel_end_of_a_slot(tmp_path: Path) -> None:
    config = load_steer_config(write(tmp_path, STEER + "tunnel:\n  interfacePrefix: n1-\n"))
    end = tunnel_end(config, "gw2", 1, key("gw2"), "198.51.100.3:51820", "100.127.0.5/32")
    assert (end.interface, end.mark, end.table, end.listen_port) == (
        "n1-gw2", 0x20, FIRST_TABLE + 1, 51822)


# --- plans from specs ---------------------------------------------------------------------------


RULE = {"policy": "pay", "role": "active", "egressIP": "198.51.100.70",
        "sources": ["10.244.1.10"], "destinations": ["198.51.100.10/32"]}
PEER = {"name": "node1", "publicKey": key("node1"), "endpoint": "192.0.2.21:51821",
        "allowedIPs": ["10.244.1.0/24", "100.127.0.2/32"]}


def gateway_object(spec: dict[str, object]) -> dict[str, object]:
    return {"metadata": {"name": "gw1", "generation": 4}, "spec": spec}


def test_gateway_plan_from_the_spec_and_back_from_disk() -> None:
    target = target_from_object(gateway_object({"rules": [RULE], "peers": [PEER]}))
    assert target.generation == 4 and target.rules[0].egress_ip == ip_address("198.51.100.70")
    assert target.peers is not None and target.peers[0].endpoint == "192.0.2.21:51821"
    assert gateway_target_from_dict(json.loads(json.dumps(gateway_target_to_dict(target)))) \
        == target
    empty = target_from_object({"metadata": {"name": "gw1", "generation": 1}})
    assert empty.rules == () and empty.peers == ()


@pytest.mark.parametrize(("peers", "kept"), [
    ([{**PEER, "name": "node0", "publicKey": "x"}, PEER], ["node1"]),
    ([{**PEER, "name": "node0", "endpoint": "192.0.2.21:0"}, PEER], ["node1"]),
    ([PEER, {**PEER, "name": "node2"}, {**PEER, "name": "node3", "publicKey": key("node3")}],
     ["node3"]),
])
def test_a_bad_peer_is_left_out_and_the_others_applied(
    peers: list[dict[str, object]], kept: list[str]
) -> None:
    """A controller older than peer validation may copy one node's bad key or endpoint."""
    target = target_from_object(gateway_object({"rules": [RULE], "peers": peers}))
    assert target.peers is not None and [p.name for p in target.peers] == kept
    assert target.rules[0].policy == "pay"


@pytest.mark.parametrize(("spec", "expected"), [
    ({"rules": [{**RULE, "role": "boss"}]}, "not a valid gateway plan"),
    ({"peers": {"name": "node1"}}, "spec.peers: must be a list"),
])
def test_unusable_gateway_specs_are_input_errors(spec: dict[str, object], expected: str) -> None:
    with pytest.raises(InputError, match="EgressGateway gw1: spec unusable") as info:
        target_from_object(gateway_object(spec))
    assert expected in str(info.value)


def test_node_plan_from_the_spec_and_back_from_disk() -> None:
    spec = {
        "gateways": [{"name": "gw1", "publicKey": key("gw1"), "endpoint": "198.51.100.2:51820"},
                     {"name": "gw2", "publicKey": key("gw2")}],
        "tunnelAddress": "100.127.0.2",
        "clusterInternal": ["10.244.0.0/16"],
        "rules": [{"policy": "pay", "action": "tunnel", "gateway": "gw1", "standby": "gw2",
                   "sources": ["10.244.1.10"], "destinations": ["198.51.100.10/32"]}],
    }
    target = node_target_from_object({"metadata": {"name": "node1", "generation": 3},
                                      "spec": spec})
    assert target.generation == 3 and target.tunnel_address == "100.127.0.2/32"
    assert target.gateways is not None and [g.name for g in target.gateways] == ["gw1", "gw2"]
    assert node_target_from_dict(json.loads(json.dumps(node_target_to_dict(target)))) == target


def test_an_unusable_tunnel_address_is_an_input_error() -> None:
    with pytest.raises(InputError, match="tunnelAddress"):
        node_target_from_object({"metadata": {"name": "node1"},
                                 "spec": {"tunnelAddress": "100.127.0.0/24"}})


# --- statuses ---------------------------------------------------------------------------------


def agent_state(tmp_path: Path, **changes: object) -> AgentState:
    values: dict[str, object] = {
        "config": load_agent_config(write(tmp_path, AGENT)),
        "public_key": key("gw1"),
        "generation": 4,
        "ready": True,
        "errors": (),
        "last_error": None,
        "peers_up": frozenset({"node1"}),
        "peers": ("node1", "node2"),
        "egress_ips": EgressIPReport((ip_address("198.51.100.70"),), True, "Held", "1 held"),
        "interfaces": (GatewayInterface("eth0", (), (
            InterfaceAddress(ip_address("198.51.100.2"), 24),), default_route_v4=True),),
    }
    values.update(changes)
    return AgentState(**values)  # type: ignore[arg-type]


def conditions(status: dict[str, object]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}  # type: ignore[attr-defined]


def crd_errors(plural: str, kind: str, status: dict[str, Any]) -> list[str]:
    """What the CRD's schema says of `status` written as the object's status."""
    crd = yaml.safe_load((Path(__file__).parents[2] / "packaging/kubernetes/crds"
                          / f"{plural}.yaml").read_text())
    obj = {"apiVersion": "egress.gatewayd.io/v1alpha1", "kind": kind,
           "metadata": {"name": "x"}, "status": status}
    return CustomResourceValidator(crd).errors(obj, status_update=True)


def test_gateway_status(tmp_path: Path) -> None:
    status = gateway_status(agent_state(tmp_path), {}, "2026-01-01T00:00:00Z")
    assert status["observedGeneration"] == 4
    assert status["version"] == metadata.version("gatewayd")  # for the controller's skew check
    assert status["endpoint"] == "198.51.100.2:51820"
    assert status["addresses"] == [{"type": "InternalIP", "address": "198.51.100.2"}]
    assert status["interfaces"] == [{"name": "eth0", "addresses": ["198.51.100.2/24"],
                                     "defaultRouteV4": True}]
    assert status["egressIPPools"] == [{"cidr": "198.51.100.64/27", "interface": "eth0"}]
    assert status["egressIPs"] == ["198.51.100.70"]
    assert conditions(status) == {"Ready": "True", "TunnelsUp": "True",
                                  "SNATProgrammed": "True", "EgressIPsPresent": "True",
                                  "StateSaved": "True"}
    # Up or down, never the handshake time: that changes at every rekey (every 2 minutes).
    assert status["peers"] == [{"name": "node1", "up": True}, {"name": "node2", "up": False}]
    # It reads rules whose sources are in slices (the controller writes them only then).
    assert status["features"] == ["sourceSlices"]
    # Every field is in the CRD's schema: a real API server drops one that is not.
    assert crd_errors("egressgateways", "EgressGateway", status) == []


def test_gateway_status_when_stopping_or_failing(tmp_path: Path) -> None:
    before = gateway_status(agent_state(tmp_path), {}, "2026-01-01T00:00:00Z")
    stopping = gateway_status(agent_state(tmp_path, stopping=True), before,
                              "2026-01-01T00:01:00Z")
    ready = next(c for c in stopping["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"], ready["lastTransitionTime"]) == (
        "False", "Stopping", "2026-01-01T00:01:00Z")
    unchanged = next(c for c in stopping["conditions"] if c["type"] == "SNATProgrammed")
    assert unchanged["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    failing = gateway_status(agent_state(
        tmp_path, ready=False, errors=(StepFailure(Part.FILTER, "refused"),),
        last_error="nftables: refused"),
        before, "2026-01-01T00:02:00Z")
    assert conditions(failing) == {"Ready": "False", "TunnelsUp": "True",
                                   "SNATProgrammed": "False", "EgressIPsPresent": "True",
                                   "StateSaved": "True"}


def test_gateway_status_with_a_full_disk_is_ready_and_says_so(tmp_path: Path) -> None:
    error = "cannot write /var/lib/gatewayd/plan.json: No space left on device"
    status = gateway_status(agent_state(tmp_path, state_error=error), {}, "2026-01-01T00:00:00Z")
    assert status["observedGeneration"] == 4
    saved = next(c for c in status["conditions"] if c["type"] == "StateSaved")
    assert (saved["status"], saved["reason"], saved["message"]) == ("False", "WriteFailed", error)
    assert conditions(status)["Ready"] == "True"


def test_node_status(tmp_path: Path) -> None:
    config = load_steer_config(write(tmp_path, STEER))
    ends = (tunnel_end(config, "gw1", 0, key("gw1"), None, "100.127.0.2/32"),
            tunnel_end(config, "gw2", 1, key("gw2"), None, "100.127.0.2/32"))
    state = NodeState(
        public_key=key("node1"), address="192.0.2.21", listen_port=51821, tunnels=ends,
        generation=3, ready=True, errors=(), last_error=None,
        reachable={"gw1": False, "gw2": True},
        failovers=(Failover("pay", "gw1", "gw2", 1.0, "2026-01-01T00:00:00Z"),), probing=True,
    )
    status = node_status(state, {}, "2026-01-01T00:00:00Z")
    assert status["version"] == metadata.version("gatewayd")
    assert status["endpoint"] == "192.0.2.21:51821"
    assert status["gatewayPorts"] == {"gw1": 51821, "gw2": 51822}
    assert status["gateways"] == [{"name": "gw1", "reachable": False},
                                  {"name": "gw2", "reachable": True}]
    assert status["failovers"] == [{"policy": "pay", "from": "gw1", "to": "gw2",
                                    "time": "2026-01-01T00:00:00Z"}]
    # a gateway gone from the plan is removed from the port map (a merge patch merges maps)
    later = node_status(NodeState(**{**state.__dict__, "tunnels": ends[1:]}), status,
                        "2026-01-01T00:00:01Z")
    assert later["gatewayPorts"] == {"gw1": None, "gw2": 51822}
    assert conditions(status) == {"Ready": "True", "TunnelsUp": "True",
                                  "SteeringProgrammed": "True"}
    # Every field is in the CRD's schema: a real API server drops one that is not.
    assert crd_errors("egressnodes", "EgressNode", status) == []
    v6 = node_status(NodeState(**{**state.__dict__, "address": "2001:db8::21"}), {},
                     "2026-01-01T00:00:00Z")
    assert v6["endpoint"] == "[2001:db8::21]:51821"
    # each failed part turns the condition it belongs to, with its own message
    routing = StepFailure(Part.ROUTING, "RTNETLINK answers: File exists")
    tunnel = StepFailure(Part.TUNNEL, "wg set failed", "n1-gw1")
    failing = node_status(NodeState(**{**state.__dict__, "ready": False,
                                       "errors": (routing, tunnel)}), status,
                          "2026-01-01T00:00:02Z")
    assert conditions(failing) == {"Ready": "False", "TunnelsUp": "False",
                                   "SteeringProgrammed": "False"}
    steering = next(c for c in failing["conditions"] if c["type"] == "SteeringProgrammed")
    assert steering["message"] == "policy routing: RTNETLINK answers: File exists"
    assert str(tunnel) == "wireguard n1-gw1: wg set failed"


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({"endpoint": "10.0.0.1:51820", "gatewayPorts": {"gw1": 51821}}, "10.0.0.1:51821"),
        ({"endpoint": "[2001:db8::1]:51820", "gatewayPorts": {"gw1": 51823}},
         "[2001:db8::1]:51823"),
        ({"endpoint": "10.0.0.1:51820", "gatewayPorts": {"gw2": 51822}}, "10.0.0.1:51820"),
        ({"endpoint": "10.0.0.1:51820", "gatewayPorts": {"gw1": None}}, "10.0.0.1:51820"),
        ({"endpoint": "10.0.0.1:51820"}, "10.0.0.1:51820"),
        ({"gatewayPorts": {"gw1": 51821}}, None),
    ],
)
def test_a_gateway_dials_the_port_the_node_listens_on_for_it(
    status: dict[str, object], expected: str | None
) -> None:
    assert node_endpoint(status, "gw1") == expected


def test_the_status_patch_removes_what_became_unknown_and_keeps_others_conditions() -> None:
    ready = {"type": "Ready", "status": "True"}
    peer = {"type": "PeerAccepted", "status": "False", "reason": "InvalidEndpoint"}
    written = {"endpoint": "192.0.2.21:51821", "gatewayPorts": {"gw1": 51821},
               "conditions": [ready]}
    live = {**written, "publicKey": key("node1"), "conditions": [ready, peer]}
    new = {"gatewayPorts": {"gw2": 51822}, "conditions": [ready]}
    assert status_patch(new, written, live) == {
        "endpoint": None,  # unknown now: removed, not left stale
        "publicKey": None,  # written by an older version, unknown now
        "gatewayPorts": {"gw1": None, "gw2": 51822},
        "conditions": [ready, peer],  # the controller's condition stays
    }
