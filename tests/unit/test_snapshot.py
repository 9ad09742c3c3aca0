"""Loading snapshots: every kind and field read, Lists and multi-document files, directories,
duplicates, policy problems, and every kind of SnapshotError."""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.policy.model import (
    EgressGateway,
    EgressIPPool,
    FieldError,
    GatewayInterface,
    InterfaceAddress,
    Namespace,
    Node,
    NodeAddress,
    Pod,
    Snapshot,
)
from gatewayd.policy.snapshot import (
    LoadedSnapshot,
    PolicyProblem,
    SnapshotError,
    load_snapshot,
    parse_objects,
    snapshot_files,
)

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address
net = ipaddress.ip_network


def pod(name: str = "web", namespace: str | None = "shop", **extra: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "uid": f"uid-{name}"}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, **extra}


def policy(name: str = "pay", kind: str = "EgressGatewayPolicy", **spec: Any) -> dict[str, Any]:
    api_version = "cilium.io/v2" if kind.startswith("Cilium") else "egress.gatewayd.io/v1alpha1"
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": name},
        "spec": {
            "selectors": [{"podSelector": {}}],
            "destinationCIDRs": ["192.0.2.0/24"],
            "egressGateway": {"nodeSelector": {}},
            **spec,
        },
    }


def load(*objects: dict[str, Any]) -> LoadedSnapshot:
    return parse_objects(("test.yaml", obj) for obj in objects)


def load_error(*objects: dict[str, Any]) -> str:
    with pytest.raises(SnapshotError) as raised:
        load(*objects)
    return str(raised.value)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


# --- each kind and the fields read -------------------------------------------------------------


def test_pod_fields() -> None:
    loaded = load(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web",
                "namespace": "shop",
                "uid": "u-1",
                "labels": {"app": "web"},
                "annotations": {"ignored": "yes"},
            },
            "spec": {
                "nodeName": "node-1",
                "hostNetwork": False,
                "serviceAccountName": "pay-sa",
                "containers": [{"name": "app"}],
            },
            "status": {
                "phase": "Running",
                "podIP": "10.0.0.5",
                "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}, {"ip": "10.0.0.5"}],
            },
        }
    )
    assert loaded.snapshot.pods == (
        Pod(
            name="web",
            namespace="shop",
            uid="u-1",
            labels={"app": "web"},
            node_name="node-1",
            host_network=False,
            service_account="pay-sa",
            ips=(ip("10.0.0.5"), ip("fd00::5")),
            phase="Running",
        ),
    )
    assert loaded.problems == ()


def test_pod_defaults_and_fallbacks() -> None:
    [minimal] = load(pod(namespace=None)).snapshot.pods
    assert minimal == Pod(name="web", namespace="default", uid="uid-web", labels={})

    [legacy] = load(
        pod(
            spec={"serviceAccount": "old-sa", "hostNetwork": True},
            status={"podIP": "10.0.0.9"},
        )
    ).snapshot.pods
    assert legacy.service_account == "old-sa"
    assert legacy.host_network is True
    assert legacy.ips == (ip("10.0.0.9"),)


def test_pod_service_account_name_wins_over_the_deprecated_alias() -> None:
    [p] = load(pod(spec={"serviceAccountName": "new", "serviceAccount": "old"})).snapshot.pods
    assert p.service_account == "new"


def test_pending_pod_without_ips() -> None:
    [p] = load(pod(status={"phase": "Pending", "podIP": "", "podIPs": []})).snapshot.pods
    assert p.ips == ()


def test_namespace_fields() -> None:
    loaded = load(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": "shop",
                "namespace": "ignored",
                "labels": {"kubernetes.io/metadata.name": "shop", "team": "pay"},
            },
        }
    )
    assert loaded.snapshot.namespaces == (
        Namespace("shop", {"kubernetes.io/metadata.name": "shop", "team": "pay"}),
    )


def test_node_fields() -> None:
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-1", "labels": {"zone": "a"}},
        "spec": {"podCIDR": "10.0.1.0/24", "podCIDRs": ["10.0.1.7/24", "fd00:1::/64"]},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": "192.0.2.11"},
                {"type": "Hostname", "address": "node-1"},
            ]
        },
    }
    assert load(node).snapshot.nodes == (
        Node(
            "node-1",
            {"zone": "a"},
            (NodeAddress("InternalIP", "192.0.2.11"), NodeAddress("Hostname", "node-1")),
            (net("10.0.1.0/24"), net("fd00:1::/64")),
        ),
    )


def test_node_pod_cidr_fallback_and_defaults() -> None:
    with_pod_cidr = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "n"},
        "spec": {"podCIDR": "10.0.2.0/24"},
    }
    assert load(with_pod_cidr).snapshot.nodes == (Node("n", {}, (), (net("10.0.2.0/24"),)),)
    bare = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}}
    assert load(bare).snapshot.nodes == (Node("n", {}),)


def gateway(name: str = "gw-1", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "egress.gatewayd.io/v1alpha1",
        "kind": "EgressGateway",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"peers": []},
        "status": status,
    }


def test_egress_gateway_fields() -> None:
    loaded = load(
        gateway(
            addresses=[{"type": "InternalIP", "address": "198.51.100.2"}],
            interfaces=[
                {
                    "name": "eth0",
                    "altnames": ["enp1s0"],
                    "addresses": ["198.51.100.2/24", "2001:db8::2/64", "fe80::1/64"],
                    "defaultRouteV4": True,
                    "defaultRouteV6": True,
                },
                {"name": "eth1"},
            ],
            egressIPPools=[{"cidr": "203.0.113.8/29", "interface": "eth0"}],
            conditions=[
                {"type": "TunnelsUp", "status": "True"},
                {"type": "Ready", "status": "True", "reason": "AllGood"},
            ],
            publicKey="abc=",
        )
    )
    assert loaded.snapshot.gateways == (
        EgressGateway(
            name="gw-1",
            labels={"kubernetes.io/hostname": "gw-1"},
            addresses=(NodeAddress("InternalIP", "198.51.100.2"),),
            interfaces=(
                GatewayInterface(
                    name="eth0",
                    altnames=("enp1s0",),
                    # Host bits are the address itself here: kept, not masked.
                    addresses=(
                        InterfaceAddress(ip("198.51.100.2"), 24),
                        InterfaceAddress(ip("2001:db8::2"), 64),
                        InterfaceAddress(ip("fe80::1"), 64),
                    ),
                    default_route_v4=True,
                    default_route_v6=True,
                ),
                GatewayInterface(name="eth1"),
            ),
            egress_ip_pools=(EgressIPPool(net("203.0.113.8/29"), "eth0"),),
            ready=True,
        ),
    )


@pytest.mark.parametrize(
    "conditions",
    [
        [],
        [{"type": "Ready", "status": "False"}],
        [{"type": "Ready", "status": "Unknown"}],
        [{"type": "TunnelsUp", "status": "True"}],
    ],
)
def test_egress_gateway_is_ready_only_with_ready_true(conditions: list[dict[str, str]]) -> None:
    [gw] = load(gateway(conditions=conditions)).snapshot.gateways
    assert gw.ready is False


def test_egress_gateway_without_status() -> None:
    obj = gateway()
    del obj["status"]
    assert load(obj).snapshot.gateways == (
        EgressGateway("gw-1", {"kubernetes.io/hostname": "gw-1"}),
    )


def endpoint_slice(
    addresses: list[str],
    namespace: str = "default",
    service: str = "kubernetes",
    name: str = "kubernetes-x1",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": addresses, "conditions": {"ready": True}}],
        "ports": [{"port": 6443}],
    }


def endpoints(ips: list[str], name: str = "kubernetes") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": name, "namespace": "default"},
        "subsets": [{"addresses": [{"ip": a} for a in ips], "ports": [{"port": 6443}]}],
    }


def test_api_server_addresses_from_slices_and_endpoints_deduplicated_and_sorted() -> None:
    loaded = load(
        endpoint_slice(["192.0.2.20", "192.0.2.10"]),
        endpoint_slice(["2001:db8::20"], name="kubernetes-v6"),
        endpoints(["192.0.2.10", "192.0.2.9"]),
    )
    assert loaded.snapshot.api_server_addresses == (
        ip("192.0.2.9"),
        ip("192.0.2.10"),
        ip("192.0.2.20"),
        ip("2001:db8::20"),
    )


def test_other_endpoints_are_ignored_unread() -> None:
    loaded = load(
        endpoint_slice(["not an ip"], service="web"),
        endpoint_slice(["not an ip"], namespace="kube-system"),
        endpoints(["not an ip"], name="web"),
    )
    assert loaded.snapshot.api_server_addresses == ()


def test_unknown_kinds_and_other_api_groups_are_ignored() -> None:
    loaded = load(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": 1}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kubernetes"}},
        {"apiVersion": "cilium.io/v2alpha1", "kind": "CiliumEgressNATPolicy", "spec": 5},
        # Another project's EgressGateway kind, and a policy kind of another group.
        {"apiVersion": "egressgateway.spidernet.io/v1beta1", "kind": "EgressGateway", "spec": 1},
        {"apiVersion": "example.com/v1", "kind": "EgressGatewayPolicy", "spec": 1},
        {"apiVersion": "egress.gatewayd.io/v1alpha1", "kind": "EgressNode", "spec": 1},
    )
    assert loaded == LoadedSnapshot(Snapshot(), ())


# --- policies ----------------------------------------------------------------------------------


def test_valid_policies_of_both_kinds_sorted_by_name() -> None:
    loaded = load(policy("zeta"), policy("alpha", "CiliumEgressGatewayPolicy"), policy("mid"))
    assert [(p.name, p.kind) for p in loaded.snapshot.policies] == [
        ("alpha", "CiliumEgressGatewayPolicy"),
        ("mid", "EgressGatewayPolicy"),
        ("zeta", "EgressGatewayPolicy"),
    ]
    assert loaded.problems == ()


def test_invalid_policies_become_problems_and_are_left_out() -> None:
    bad = policy("bad", destinationCIDRs=["10.0.0.0/33"], excludeCIDRs=[])
    unnamed = policy("x", "CiliumEgressGatewayPolicy")
    unnamed["metadata"] = {}
    loaded = parse_objects([("a.yaml", policy("good")), ("b.yaml", bad), ("c.yaml", unnamed)])
    assert [p.name for p in loaded.snapshot.policies] == ["good"]
    assert [str(p) for p in loaded.problems] == [
        "b.yaml: EgressGatewayPolicy/bad: spec.excludeCIDRs: Forbidden: unknown field; did you"
        ' mean "excludedCIDRs"?',
        'b.yaml: EgressGatewayPolicy/bad: spec.destinationCIDRs[0]: Invalid value: "10.0.0.0/33":'
        " not a valid CIDR (prefix length 33 out of range 0-32 for IPv4); expected an IPv4 or"
        ' IPv6 prefix such as "192.0.2.0/24" or "2001:db8::/32"',
        "c.yaml: CiliumEgressGatewayPolicy/<unnamed>: metadata.name: Required value",
    ]
    assert loaded.problems[2] == PolicyProblem(
        "c.yaml",
        "CiliumEgressGatewayPolicy",
        "<unnamed>",
        FieldError("metadata.name", "Required value"),
    )


def test_policy_with_wrong_version_of_its_group_is_a_problem() -> None:
    obj = policy()
    obj["apiVersion"] = "egress.gatewayd.io/v1"
    [problem] = load(obj).problems
    assert problem.error.path == "apiVersion"


def test_policy_without_api_version_is_a_problem() -> None:
    obj = policy()
    del obj["apiVersion"]
    [problem] = load(obj).problems
    assert str(problem) == "test.yaml: EgressGatewayPolicy/pay: apiVersion: Required value"


# --- Lists and files ---------------------------------------------------------------------------


def test_kind_list_as_kubectl_prints_it() -> None:
    loaded = load(
        {
            "apiVersion": "v1",
            "kind": "List",
            "metadata": {"resourceVersion": ""},
            "items": [pod("a"), policy("pay"), pod("b")],
        }
    )
    assert [p.name for p in loaded.snapshot.pods] == ["a", "b"]
    assert [p.name for p in loaded.snapshot.policies] == ["pay"]


def test_typed_list_items_take_kind_and_api_version_from_the_list() -> None:
    items = [{"metadata": {"name": "n1"}}, {"metadata": {"name": "n2"}}]
    loaded = load({"apiVersion": "v1", "kind": "NodeList", "items": items})
    assert [n.name for n in loaded.snapshot.nodes] == ["n1", "n2"]
    policies = {
        "apiVersion": "egress.gatewayd.io/v1alpha1",
        "kind": "EgressGatewayPolicyList",
        "items": [{k: v for k, v in policy().items() if k not in ("kind", "apiVersion")}],
    }
    assert [p.kind for p in load(policies).snapshot.policies] == ["EgressGatewayPolicy"]


def test_nested_and_empty_lists() -> None:
    inner = {"apiVersion": "v1", "kind": "List", "items": [pod("inner")]}
    loaded = load(
        {"apiVersion": "v1", "kind": "List", "items": [inner, pod("outer")]},
        {"apiVersion": "v1", "kind": "List", "items": []},
        {"apiVersion": "v1", "kind": "List", "items": None},
    )
    assert [p.name for p in loaded.snapshot.pods] == ["inner", "outer"]


def test_multi_document_yaml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "dump.yaml",
        """\
        ---
        apiVersion: v1
        kind: Namespace
        metadata:
          name: shop
          labels: {team: pay}
        ---
        # an empty document, as editors and kubectl leave them
        ---
        apiVersion: egress.gatewayd.io/v1alpha1
        kind: EgressGatewayPolicy
        metadata:
          name: pay
        spec:
          selectors:
          - namespaceSelector: {matchLabels: {team: pay}}
          destinationCIDRs: [203.0.113.0/24]
          egressGateway:
            nodeSelector: {}
        ---
        apiVersion: v1
        kind: List
        items:
        - apiVersion: v1
          kind: Pod
          metadata: {name: web, namespace: shop, uid: "1"}
        ---
        """,
    )
    loaded = load_snapshot([path])
    assert [n.name for n in loaded.snapshot.namespaces] == ["shop"]
    assert [p.name for p in loaded.snapshot.policies] == ["pay"]
    assert [p.name for p in loaded.snapshot.pods] == ["web"]


def test_json_file(tmp_path: Path) -> None:
    doc = {"apiVersion": "v1", "kind": "List", "items": [pod("web"), policy("pay")]}
    path = tmp_path / "dump.json"
    path.write_text(json.dumps(doc, indent="\t"))  # tabs: fine in JSON, not in YAML
    loaded = load_snapshot([path])
    assert [p.name for p in loaded.snapshot.pods] == ["web"]
    assert [p.name for p in loaded.snapshot.policies] == ["pay"]


def test_directory_reads_yaml_yml_json_in_name_order_not_recursively(tmp_path: Path) -> None:
    write(tmp_path, "b.yml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n")
    write(tmp_path, "a.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
    (tmp_path / "c.json").write_text(
        json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "c"}})
    )
    write(tmp_path, "README.md", "not: [yaml")
    write(tmp_path, "notes.txt", "kind: Namespace")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "d.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: d}\n")
    (tmp_path / "dir.yaml").mkdir()  # a directory named like a file is skipped
    assert [p.name for p in snapshot_files([tmp_path])] == ["a.yaml", "b.yml", "c.json"]
    assert [n.name for n in load_snapshot([tmp_path]).snapshot.namespaces] == ["a", "b", "c"]


def test_files_and_directories_mixed(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    write(tmp_path / "d", "x.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n")
    single = write(tmp_path, "policies.txt", json.dumps(policy("pay")))
    loaded = load_snapshot([str(tmp_path / "d"), single])
    assert [n.name for n in loaded.snapshot.namespaces] == ["x"]
    assert [p.name for p in loaded.snapshot.policies] == ["pay"]


def test_empty_directory_is_an_empty_snapshot(tmp_path: Path) -> None:
    assert load_snapshot([tmp_path]) == LoadedSnapshot(Snapshot(), ())


def test_problems_name_the_file_they_came_from(tmp_path: Path) -> None:
    write(tmp_path, "1.yaml", json.dumps(policy("ok")))
    write(tmp_path, "2.yaml", json.dumps(policy("bad", egressGateway=None)))
    loaded = load_snapshot([tmp_path])
    assert [str(p) for p in loaded.problems] == [
        f"{tmp_path / '2.yaml'}: EgressGatewayPolicy/bad: spec.egressGateway: Required value:"
        " required when spec.egressGateways is empty"
    ]


def test_same_input_in_any_order_gives_the_same_snapshot() -> None:
    objects = [
        pod("a", "x"),
        pod("b", "x"),
        pod("a", "y"),
        policy("p1"),
        policy("p2", "CiliumEgressGatewayPolicy"),
        gateway("gw-2"),
        gateway("gw-1"),
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "y"}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}},
        endpoints(["192.0.2.2", "2001:db8::1", "192.0.2.1"]),
    ]
    expected = load(*objects).snapshot
    assert [(p.namespace, p.name) for p in expected.pods] == [("x", "a"), ("x", "b"), ("y", "a")]
    assert [g.name for g in expected.gateways] == ["gw-1", "gw-2"]
    assert [n.name for n in expected.nodes] == ["n1", "n2"]
    assert [n.name for n in expected.namespaces] == ["x", "y"]
    shuffler = random.Random(7)
    for _ in range(5):
        shuffler.shuffle(objects)
        assert load(*objects).snapshot == expected


# --- duplicates --------------------------------------------------------------------------------


def test_duplicate_object_in_two_files_names_both(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "---\n" + json.dumps(pod("web")) + "\n")
    write(tmp_path, "b.yaml", "# comment\n\n" + json.dumps(pod("web")) + "\n")
    with pytest.raises(SnapshotError) as raised:
        load_snapshot([tmp_path])
    error = raised.value
    assert (error.file, error.line) == (str(tmp_path / "b.yaml"), 3)
    assert error.message == f"Pod/shop/web: defined twice (first in {tmp_path / 'a.yaml'}:2)"


def test_duplicate_policy_is_an_error_even_when_invalid() -> None:
    message = load_error(policy("pay"), policy("pay", destinationCIDRs=[]))
    assert message == "test.yaml: EgressGatewayPolicy/pay: defined twice (first in test.yaml)"


@pytest.mark.parametrize(
    "objects",
    [
        [gateway("gw"), gateway("gw")],
        [
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}},
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}},
        ],
        [pod("web", None), pod("web", "default")],  # no namespace means "default"
    ],
)
def test_duplicates_of_each_kind(objects: list[dict[str, Any]]) -> None:
    assert "defined twice" in load_error(*objects)


def test_same_name_in_other_namespace_or_kind_is_not_a_duplicate() -> None:
    loaded = load(
        pod("web", "a"),
        pod("web", "b"),
        gateway("n1"),
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n1"}},
    )
    assert len(loaded.snapshot.pods) == 2
    assert len(loaded.snapshot.nodes) == len(loaded.snapshot.gateways) == 1


# --- unusable input ----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError) as raised:
        load_snapshot([tmp_path / "nope.yaml"])
    assert str(raised.value) == f"{tmp_path / 'nope.yaml'}: no such file or directory"


@pytest.fixture
def unreadable_file(tmp_path: Path) -> Iterator[Path]:
    """A path that exists but cannot be read even by root: a UNIX socket."""
    path = tmp_path / "socket.yaml"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    yield path
    server.close()


def test_unreadable_file(unreadable_file: Path) -> None:
    with pytest.raises(SnapshotError) as raised:
        load_snapshot([unreadable_file])
    assert raised.value.file == str(unreadable_file)
    assert raised.value.line is None
    assert raised.value.message.startswith("cannot read: ")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(b"kind: \xff\n")
    with pytest.raises(SnapshotError, match=r"x\.yaml:1: not UTF-8 text \(byte 6\)"):
        load_snapshot([path])


def test_yaml_syntax_error_has_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: [web\n")
    with pytest.raises(SnapshotError) as raised:
        load_snapshot([path])
    assert raised.value.file == str(path)
    assert raised.value.line == 4
    assert raised.value.message.startswith("YAML syntax error: ")


def test_yaml_tab_indentation_error_has_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", "kind: Pod\nmetadata:\n\tname: web\n")
    with pytest.raises(SnapshotError) as raised:
        load_snapshot([path])
    assert raised.value.line == 3


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "x.yaml",
        """\
        kind: EgressGatewayPolicy
        spec:
          destinationCIDRs: [10.0.0.0/8]
          destinationCIDRs: [0.0.0.0/0]
        """,
    )
    with pytest.raises(SnapshotError) as raised:
        load_snapshot([path])
    assert raised.value.line == 4
    assert raised.value.message == "duplicate key 'destinationCIDRs' (first on line 3)"


def test_yaml_merge_keys_and_aliases_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "x.yaml",
        """\
        x-base: &base {name: base, uid: "1"}
        apiVersion: v1
        kind: Pod
        metadata:
          <<: *base
          name: web
        """,
    )
    with pytest.raises(SnapshotError, match=r"x\.yaml:1: anchors \(&base\) are not accepted"):
        load_snapshot([path])


def test_json_syntax_error_has_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{\n  "kind": "Pod",\n  "metadata": {,}\n}\n')
    with pytest.raises(SnapshotError) as raised:
        load_snapshot([path])
    assert (raised.value.line, raised.value.message.startswith("JSON syntax error: ")) == (3, True)


def test_json_duplicate_key(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"kind": "Pod", "kind": "Node"}')
    with pytest.raises(SnapshotError, match="JSON: duplicate key 'kind'"):
        load_snapshot([path])


@pytest.mark.parametrize(
    ("text", "line", "found"),
    [
        ("- a\n- b\n", 1, "array"),
        ("42\n", 1, "integer"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\njust text\n", 6, "string"),
    ],
)
def test_document_that_is_not_a_mapping(tmp_path: Path, text: str, line: int, found: str) -> None:
    path = write(tmp_path, "x.yaml", text)
    with pytest.raises(SnapshotError) as raised:
        load_snapshot([path])
    assert raised.value.line == line
    assert raised.value.message == (
        f"expected a Kubernetes object (a mapping with apiVersion and kind), found {found}"
    )


def test_list_item_that_is_not_a_mapping_has_its_own_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "x.yaml",
        """\
        apiVersion: v1
        kind: List
        items:
        - kind: Namespace
          metadata: {name: a}
          apiVersion: v1
        - oops
        """,
    )
    with pytest.raises(SnapshotError) as raised:
        load_snapshot([path])
    assert raised.value.line == 7


def test_object_error_points_at_its_list_item(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "x.yaml",
        """\
        apiVersion: v1
        kind: List
        items:
        - apiVersion: v1
          kind: Pod
          metadata: {name: a, namespace: shop, uid: "1"}
        - apiVersion: v1
          kind: Pod
          metadata: {name: b, namespace: shop}
        """,
    )
    with pytest.raises(SnapshotError) as raised:
        load_snapshot([path])
    assert str(raised.value) == f"{path}:7: Pod/shop/b: metadata.uid: Required value"


def test_list_items_not_a_list() -> None:
    message = load_error({"apiVersion": "v1", "kind": "List", "items": {"a": 1}})
    assert message == "test.yaml: List: items: must be a list, found object"


@pytest.mark.parametrize("kind", [None, "", 5])
def test_object_without_kind(kind: object) -> None:
    obj: dict[str, Any] = {"apiVersion": "v1", "metadata": {"name": "x"}}
    if kind is not None:
        obj["kind"] = kind
    assert load_error(obj) == "test.yaml: kind: Required value: not an object"


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "shop", "uid": "1"}},
            "Pod/shop/<unnamed>: metadata.name: Required value",
        ),
        (
            {"apiVersion": "v1", "kind": "Pod"},
            "Pod/default/<unnamed>: metadata.name: Required value",
        ),
        (
            {"kind": "Pod", "metadata": {"name": "web", "uid": "1"}},
            "Pod/default/web: apiVersion: Required value",
        ),
        (
            {"apiVersion": "v2", "kind": "Pod", "metadata": {"name": "web", "uid": "1"}},
            'Pod/default/web: apiVersion: Unsupported value: "v2": supported values: "v1"',
        ),
        (
            {
                "apiVersion": "egress.gatewayd.io/v1beta1",
                "kind": "EgressGateway",
                "metadata": {"name": "gw"},
            },
            'EgressGateway/gw: apiVersion: Unsupported value: "egress.gatewayd.io/v1beta1":'
            ' supported values: "egress.gatewayd.io/v1alpha1"',
        ),
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"}},
            "Pod/default/web: metadata.uid: Required value",
        ),
        (
            pod(status={"podIPs": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.300"}]}),
            'Pod/shop/web: status.podIPs[1].ip: Invalid value: "10.0.0.300": not a valid IP'
            " address (Octet 300 (> 255) not permitted in '10.0.0.300'); expected e.g."
            " 192.0.2.1 or 2001:db8::1",
        ),
        (
            pod(status={"podIPs": [{"address": "10.0.0.1"}]}),
            'Pod/shop/web: status.podIPs[0].ip: Invalid value: "null": must be of type string',
        ),
        (
            pod(status={"podIP": "fe80::1%eth0"}),
            'Pod/shop/web: status.podIP: Invalid value: "fe80::1%eth0": not a valid IP address'
            " (zones (%) are not allowed); expected e.g. 192.0.2.1 or 2001:db8::1",
        ),
        (
            pod(status={"podIPs": "10.0.0.1"}),
            'Pod/shop/web: status.podIPs: Invalid value: "string": must be of type array',
        ),
        (
            pod(spec={"hostNetwork": "yes"}),
            'Pod/shop/web: spec.hostNetwork: Invalid value: "string": must be of type boolean',
        ),
        (
            pod(spec={"nodeName": 7}),
            'Pod/shop/web: spec.nodeName: Invalid value: "integer": must be of type string',
        ),
        (
            pod(spec=["containers"]),
            'Pod/shop/web: spec: Invalid value: "array": must be of type object',
        ),
        (
            pod() | {"metadata": {"name": "web", "uid": "1", "labels": {"app": 1}}},
            'Pod/default/web: metadata.labels[app]: Invalid value: "integer": must be of type'
            " string",
        ),
        (
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x", "labels": []}},
            'Namespace/x: metadata.labels: Invalid value: "array": must be of type object',
        ),
        (
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": "n"},
                "spec": {"podCIDRs": ["10.0.0.0/24", "10.0.1.0/33"]},
            },
            'Node/n: spec.podCIDRs[1]: Invalid value: "10.0.1.0/33": not a valid CIDR (prefix'
            " length 33 out of range 0-32 for IPv4); expected an IPv4 or IPv6 prefix such as"
            ' "192.0.2.0/24" or "2001:db8::/32"',
        ),
        (
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": "n"},
                "spec": {"podCIDR": "x"},
            },
            "Node/n: spec.podCIDR: Invalid value: \"x\": not a valid CIDR (missing '/' and prefix"
            ' length); expected an IPv4 or IPv6 prefix such as "192.0.2.0/24" or "2001:db8::/32"',
        ),
        (
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": "n"},
                "status": {"addresses": [{"address": "192.0.2.1"}, "x"]},
            },
            "Node/n: status.addresses[0].type: Required value; status.addresses[1]: Invalid"
            ' value: "string": must be of type object',
        ),
        (
            gateway(interfaces=[{"name": "eth0", "addresses": ["192.0.2.1"]}]),
            'EgressGateway/gw-1: status.interfaces[0].addresses[0]: Invalid value: "192.0.2.1":'
            " not an address/prefix-length (missing '/' and prefix length)",
        ),
        (
            gateway(interfaces=[{"addresses": []}]),
            "EgressGateway/gw-1: status.interfaces[0].name: Required value",
        ),
        (
            gateway(interfaces=[{"name": "eth0", "defaultRouteV4": "true"}]),
            'EgressGateway/gw-1: status.interfaces[0].defaultRouteV4: Invalid value: "string":'
            " must be of type boolean",
        ),
        (
            gateway(interfaces=[{"name": "eth0", "altnames": "enp1s0"}]),
            'EgressGateway/gw-1: status.interfaces[0].altnames: Invalid value: "string": must be'
            " of type array",
        ),
        (
            gateway(egressIPPools=[{"interface": "eth0"}]),
            "EgressGateway/gw-1: status.egressIPPools[0].cidr: Required value",
        ),
        (
            gateway(egressIPPools=[{"cidr": "203.0.113.0/24"}]),
            "EgressGateway/gw-1: status.egressIPPools[0].interface: Required value",
        ),
        (
            gateway(egressIPPools=[{"cidr": "203.0.113.0/99", "interface": "eth0"}]),
            'EgressGateway/gw-1: status.egressIPPools[0].cidr: Invalid value: "203.0.113.0/99":'
            " not a valid CIDR (prefix length 99 out of range 0-32 for IPv4); expected an IPv4 or"
            ' IPv6 prefix such as "192.0.2.0/24" or "2001:db8::/32"',
        ),
        (
            gateway(conditions=[{"type": "Ready"}]),
            "EgressGateway/gw-1: status.conditions[0].status: Required value",
        ),
        (
            gateway(conditions={"Ready": "True"}),
            'EgressGateway/gw-1: status.conditions: Invalid value: "object": must be of type array',
        ),
        (
            endpoint_slice(["192.0.2.1", "192.0.2.999"]),
            "EndpointSlice/default/kubernetes-x1: endpoints[0].addresses[1]: Invalid value:"
            ' "192.0.2.999": not a valid IP address (Octet 999 (> 255) not permitted in'
            " '192.0.2.999'); expected e.g. 192.0.2.1 or 2001:db8::1",
        ),
        (
            endpoints(["kube-apiserver"]),
            "Endpoints/default/kubernetes: subsets[0].addresses[0].ip: Invalid value:"
            ' "kube-apiserver": not a valid IP address (unexpected character "k"); expected e.g.'
            " 192.0.2.1 or 2001:db8::1",
        ),
    ],
)
def test_unusable_object(obj: dict[str, Any], message: str) -> None:
    assert load_error(obj) == f"test.yaml: {message}"


def test_snapshot_error_str_with_and_without_line() -> None:
    assert str(SnapshotError("a.yaml", 3, "bad")) == "a.yaml:3: bad"
    assert str(SnapshotError("a.yaml", None, "bad")) == "a.yaml: bad"
    error = SnapshotError("a.yaml", 3, "bad")
    assert (error.file, error.line, error.message) == ("a.yaml", 3, "bad")


def test_cilium_policy_shadowed_by_egress_gateway_policy_of_the_same_name() -> None:
    def policy(kind: str, api: str, cidr: str) -> dict[str, object]:
        return {
            "apiVersion": api, "kind": kind, "metadata": {"name": "pay"},
            "spec": {
                "selectors": [{"podSelector": {}}],
                "destinationCIDRs": [cidr],
                "egressGateway": {"nodeSelector": {}},
            },
        }

    loaded = parse_objects([
        ("cilium.yaml", policy("CiliumEgressGatewayPolicy", "cilium.io/v2", "10.0.0.0/8")),
        ("ours.yaml", policy("EgressGatewayPolicy", "egress.gatewayd.io/v1alpha1", "10.1.0.0/16")),
    ])
    assert [(p.kind, str(p.destinations[0])) for p in loaded.snapshot.policies] == [
        ("EgressGatewayPolicy", "10.1.0.0/16")
    ]
    assert [str(p) for p in loaded.problems] == [
        "cilium.yaml: CiliumEgressGatewayPolicy/pay: metadata.name: Duplicate value: 'pay': an "
        "EgressGatewayPolicy of the same name is in force; rename one of them"
    ]
