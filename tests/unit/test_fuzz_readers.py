"""Property tests of every reader a user or a peer can feed: snapshots (YAML and JSON), the
agent's and steer's configs in both modes, saved plans, the EgressGateway/EgressNode spec as
the daemons receive it, and the probe datagrams of tunnel peers. Whatever the input, the
reader returns a result or raises the project's clear error (SnapshotError, ConfigError,
PlanFormatError, InputError, ProbeFormatError); anything else is a bug.

The example counts keep `tests/unit` fast; a longer run:
`GATEWAYD_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/unit/test_fuzz_readers.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.agent.config import load_agent_config
from gatewayd.agent.kubernetes import target_from_object as gateway_target_from_object
from gatewayd.agent.target import target_from_dict as gateway_target_from_dict
from gatewayd.agent.target import target_to_dict as gateway_target_to_dict
from gatewayd.api.sourceslices import addresses_digest
from gatewayd.cli.host import load_host_config
from gatewayd.configfile import ConfigError
from gatewayd.follower import InputError
from gatewayd.policy.planio import PlanFormatError
from gatewayd.policy.safeload import DOCUMENT_LIMITS, DocumentError, load_json_file
from gatewayd.policy.snapshot import SnapshotError, load_snapshot
from gatewayd.probe import ProbeFormatError, decode_reply, decode_request
from gatewayd.steer.config import load_steer_config
from gatewayd.steer.kubernetes import target_from_object as node_target_from_object
from gatewayd.steer.target import target_from_dict as node_target_from_dict
from gatewayd.steer.target import target_to_dict as node_target_to_dict

# A deprecation warning once showed a bug (ipaddress taking True as 0.0.0.1): fail on one.
pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("error::DeprecationWarning")]

EXAMPLES = int(os.environ.get("GATEWAYD_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KEY = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
KEY2 = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="

# Strings the readers give meaning to, so that examples get past the first check.
MEANINGFUL = [
    "10.244.1.5", "10.244.1.0/24", "0.0.0.0/0", "::/0", "fd00::5", "198.51.100.70",
    "192.0.2.1:51820", "[fd00::1]:51820", "snat", "drop", "active", "standby", "Ready", "True",
    "no-egress-gateway", KEY, KEY2, "eth0", "egress0", "gw1", "node1", "default", "kubernetes",
    "v1", "egress.gatewayd.io/v1alpha1", "cilium.io/v2", "discovery.k8s.io/v1", "In", "Exists",
    "app", "kubernetes.io/service-name", "", " ", "\n", "\x00", "é", "<<", "*",
]
FIELDS = [
    "apiVersion", "kind", "metadata", "name", "namespace", "uid", "labels", "spec", "status",
    "podIP", "podIPs", "ip", "nodeName", "hostNetwork", "podCIDR", "podCIDRs", "addresses",
    "type", "address", "interfaces", "altnames", "egressIPPools", "cidr", "interface",
    "conditions", "selectors", "podSelector", "namespaceSelector", "matchLabels",
    "matchExpressions", "key", "operator", "values", "destinationCIDRs", "excludedCIDRs",
    "egressGateway", "egressGateways", "nodeSelector", "egressIP", "items", "endpoints",
    "subsets", "rules", "policy", "role", "sources", "destinations", "peers", "publicKey",
    "allowedIPs", "endpoint", "gateways", "gateway", "generation", "action", "reason",
    "clusterInternal", "tunnelAddress", "defaultRouteV4", "failover",
]
KINDS = ["Pod", "Namespace", "Node", "EgressGateway", "EgressGatewayPolicy",
         "CiliumEgressGatewayPolicy", "EndpointSlice", "Endpoints", "List", "PodList"]
API_VERSIONS = ["v1", "egress.gatewayd.io/v1alpha1", "cilium.io/v2", "discovery.k8s.io/v1"]

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=12) | st.sampled_from(MEANINGFUL))
keys = st.sampled_from(FIELDS) | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=30,
)
kubernetes_objects = st.fixed_dictionaries(
    {"apiVersion": st.sampled_from(API_VERSIONS), "kind": st.sampled_from(KINDS),
     "metadata": st.fixed_dictionaries({}, optional={
         "name": st.sampled_from(["web", "gw1", "node1", "kubernetes", ""]) | scalars,
         "namespace": st.sampled_from(["default", "shop"]),
         "uid": st.just("1"), "labels": values})},
    optional={"spec": values, "status": values, "items": st.lists(values, max_size=3)},
)
documents = st.lists(kubernetes_objects | values, min_size=1, max_size=4)

# YAML fragments that once broke a reader, and random text between them.
HOSTILE_YAML = [
    "kind: Pod", "apiVersion: v1", "metadata: {name: web, uid: '1'}", "- &a [*a]", "<<: *a",
    "x: !!int abc", "x: !!timestamp now", "x: !!binary aGk=", "x: !!python/none ~",
    "x: &b {a: 1}", "y: *b", "? [a]\n: b", "x: " + "9" * 200, "[" * 300, "{" * 300, "---",
    "...", "%YAML 1.1", "x: .nan", "x: .inf", "kind: List\nitems:\n- kind: Pod", "\t", "'",
    '"\\x00"', "x: 2024-01-01", "x: 0x_1", "x: 1:20:30", "x: 0b102", "\ufeff", "\x85",
]
yaml_texts = st.lists(st.sampled_from(HOSTILE_YAML) | st.text(max_size=30), max_size=12).map(
    "\n".join)

HOSTILE_VALUES = [
    ".nan", ".inf", "-.inf", "1e-300", "1.0e-300", "!!int x", "!!timestamp y", "&a x", "*a",
    "<<", "9" * 5000, '"eth0\\n"', '"eth\\0"', "[", "{", "~", "0x10", "1:30", "yes",
    "2024-01-01", "'a b'", "-1", "0", "70000", "[0.0.0.0/0]", "::/0", "abcdefghijklmnop",
    '"\\uff15"', "{a: 1, a: 2}", "[" * 50 + "]" * 50, "5",
]
config_values = (st.sampled_from(HOSTILE_VALUES) | st.text(max_size=20)
                 | values.map(lambda v: json.dumps(v, default=str)))

AGENT_STANDALONE = f"""\
name: gw1
labels: {{site: dc1}}
snapshot: /etc/gatewayd/snapshot
uplink: eth0
egressIPPools:
  - cidr: 198.51.100.64/27
    interface: eth1
tunnel:
  interface: egress0
  listenPort: 51820
  mtu: 1420
  address: 100.64.0.1/24
  peers:
    - name: node1
      publicKey: "{KEY}"
      endpoint: "192.0.2.21:51821"
      allowedIPs: ["10.244.1.0/24"]
      persistentKeepalive: 25
reconcile:
  pollSeconds: 0.5
  repairSeconds: 10
"""
AGENT_KUBERNETES = """\
name: gw1
kubernetes:
  server: https://10.0.0.1:6443
  tokenFile: /etc/gatewayd/join-token
  caFile: /etc/gatewayd/ca.crt
  leaseDurationSeconds: 6
  leaseRenewSeconds: 2
uplink: eth0
egressIPPools: [{cidr: 198.51.100.64/27}]
tunnel: {interface: egress0, listenPort: 51820, advertiseEndpoint: "192.0.2.1:51820"}
failover:
  egressIPHoldSeconds: 0.4
  arpProbeSeconds: 0.2
  handoverSeconds: 1.0
"""
STEER_STANDALONE = f"""\
node: node1
snapshot: [/a, /b]
stateDirectory: /var/lib/gatewayd-steer
tunnel:
  mtu: 1420
  markMask: 0xf0
  gateways:
    - name: gw1
      publicKey: "{KEY}"
      endpoint: "198.51.100.2:51820"
      mark: 0x10
      table: 26700
      address: 169.254.77.1/32
reconcile:
  pollSeconds: 0.5
"""
STEER_KUBERNETES = """\
node: node1
kubernetes: {kubeconfig: /etc/kubeconfig}
healthPort: 9441
tunnel:
  interfacePrefix: egw-
  listenPort: 51821
  advertiseAddress: 192.0.2.21
failover:
  probeIntervalSeconds: 0.1
  missesBeforeDown: 3
  answersBeforeUp: 3
  claimGraceSeconds: 2
"""


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


def mutate(text: str, line: int, value: str, extra: str | None) -> str:
    """Replace the value of one line of a config (keeping its key), maybe add a line."""
    lines = text.splitlines()
    target = lines[line % len(lines)]
    key, colon, _ = target.partition(":")
    lines[line % len(lines)] = f"{key}{colon} {value}" if colon else value
    if extra is not None:
        lines.insert(line % len(lines), extra)
    return "\n".join(lines) + "\n"


# --- snapshots ---------------------------------------------------------------------------


@FUZZ
@given(text=yaml_texts)
def test_any_yaml_text_is_a_snapshot_or_a_snapshot_error(scratch: Path, text: str) -> None:
    path = scratch / "snapshot.yaml"
    path.write_text(text, errors="surrogatepass")
    try:
        load_snapshot([path])
    except SnapshotError as error:
        assert error.file == str(path)


@FUZZ
@given(data=st.binary(max_size=300))
def test_any_bytes_are_a_snapshot_or_a_snapshot_error(scratch: Path, data: bytes) -> None:
    for name in ("snapshot.yaml", "snapshot.json"):
        (scratch / name).write_bytes(data)
        with contextlib.suppress(SnapshotError):
            load_snapshot([scratch / name])


@FUZZ
@given(objects=documents)
def test_any_objects_are_a_snapshot_or_a_snapshot_error(scratch: Path,
                                                        objects: list[Any]) -> None:
    """As YAML documents and as a JSON List (yaml.safe_dump writes NaN as .nan, JSON as NaN,
    which JSON itself does not allow)."""
    as_yaml, as_json = scratch / "objects.yaml", scratch / "objects.json"
    as_yaml.write_text(yaml.safe_dump_all(objects))
    as_json.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects},
                                  default=str))
    for path in (as_yaml, as_json):
        try:
            load_snapshot([path])
        except SnapshotError as error:
            assert error.file == str(path)


# --- host configs ------------------------------------------------------------------------


@FUZZ
@given(base=st.sampled_from([AGENT_STANDALONE, AGENT_KUBERNETES, STEER_STANDALONE,
                             STEER_KUBERNETES]),
       line=st.integers(0, 40), value=config_values,
       extra=st.none() | st.sampled_from(HOSTILE_YAML) | config_values)
def test_any_config_is_a_config_or_a_config_error(scratch: Path, base: str, line: int,
                                                  value: str, extra: str | None) -> None:
    path = scratch / "config.yaml"
    path.write_text(mutate(base, line, value, extra), errors="surrogatepass")
    loader = load_steer_config if base.startswith("node:") else load_agent_config
    for load in (loader, load_host_config):
        try:
            load(path)
        except ConfigError as error:
            assert all(p.startswith(str(path)) for p in error.problems), error.problems


def test_the_configs_the_fuzzer_starts_from_are_valid(scratch: Path) -> None:
    for base in (AGENT_STANDALONE, AGENT_KUBERNETES):
        (scratch / "config.yaml").write_text(base)
        load_agent_config(scratch / "config.yaml")
    for base in (STEER_STANDALONE, STEER_KUBERNETES):
        (scratch / "config.yaml").write_text(base)
        load_steer_config(scratch / "config.yaml")


# --- plans: saved on disk, and received as an object's spec ------------------------------

gateway_rules = st.lists(st.fixed_dictionaries({}, optional={
    "policy": st.sampled_from(["p1", "p2"]) | scalars,
    "role": st.sampled_from(["active", "standby"]) | scalars,
    "egressIP": st.sampled_from(["198.51.100.70", "fd00::70"]) | scalars,
    "sources": st.lists(st.sampled_from(["10.244.1.5", "fd00::5"]) | scalars, max_size=3),
    "destinations": st.lists(st.sampled_from(["0.0.0.0/0", "10.0.0.0/8"]) | scalars,
                             max_size=3),
    "sourceSlices": st.lists(st.fixed_dictionaries({}, optional={
        "name": st.sampled_from(["s0", "s1"]) | scalars,
        "digest": st.sampled_from([addresses_digest(["10.244.1.5"]), addresses_digest([])])
        | scalars,
    }) | values, max_size=3) | values,
}) | values, max_size=3)
# EgressSourceSlices as a gateway's watch may hold them, by name.
source_slices = st.dictionaries(st.sampled_from(["s0", "s1"]), st.fixed_dictionaries({}, optional={
    "spec": st.fixed_dictionaries({}, optional={
        "addresses": st.lists(st.sampled_from(["10.244.1.5", "fd00::5"]) | scalars, max_size=2)
        | values,
    }) | values,
}) | values, max_size=2)
peers = st.lists(st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["node1", "node2"]) | scalars,
    "publicKey": st.sampled_from([KEY, KEY2]) | scalars,
    "allowedIPs": st.lists(st.sampled_from(["10.244.1.0/24", "10.244.0.0/16", "0.0.0.0/0"])
                           | scalars, max_size=3),
    "endpoint": st.sampled_from(["192.0.2.1:51820", "x:0"]) | scalars,
}) | values, max_size=3)
gateway_specs = st.fixed_dictionaries({}, optional={
    "rules": gateway_rules | values, "peers": peers | values, "gateway": scalars,
    "generation": st.integers(-5, 2**64) | scalars,
}) | values
node_rules = st.lists(st.fixed_dictionaries({}, optional={
    "policy": st.sampled_from(["p1"]) | scalars,
    "action": st.sampled_from(["snat", "drop"]) | scalars,
    "gateway": st.sampled_from(["gw1"]) | scalars,
    "standby": st.sampled_from(["gw2"]) | scalars,
    "reason": st.sampled_from(["no-egress-gateway"]) | scalars,
    "sources": st.lists(st.sampled_from(["10.244.1.5"]) | scalars, max_size=3),
    "destinations": st.lists(st.sampled_from(["0.0.0.0/0"]) | scalars, max_size=3),
}) | values, max_size=3)
node_specs = st.fixed_dictionaries({}, optional={
    "rules": node_rules | values, "clusterInternal": st.lists(scalars, max_size=3) | values,
    "gateways": peers | values, "tunnelAddress": st.sampled_from(["100.64.0.2"]) | scalars,
    "node": scalars, "generation": st.integers(-5, 2**64) | scalars,
}) | values


@FUZZ
@given(spec=gateway_specs, generation=st.integers(0, 2**63 - 1), slices=source_slices)
def test_any_egress_gateway_spec_is_a_target_or_an_input_error(
    spec: Any, generation: int, slices: dict[str, Any]
) -> None:
    obj = {"metadata": {"name": "gw1", "generation": generation}, "spec": spec}
    try:
        target = gateway_target_from_object(obj, slices.get)
    except InputError as error:
        assert error.event in ("plan-invalid", "sources-missing")
    else:  # what is saved reads back the same
        assert gateway_target_from_dict(gateway_target_to_dict(target)) == target


@FUZZ
@given(spec=node_specs, generation=st.integers(0, 2**63 - 1))
def test_any_egress_node_spec_is_a_target_or_an_input_error(spec: Any,
                                                            generation: int) -> None:
    obj = {"metadata": {"name": "node1", "generation": generation}, "spec": spec}
    try:
        target = node_target_from_object(obj)
    except InputError as error:
        assert error.event == "plan-invalid"
    else:
        assert node_target_from_dict(node_target_to_dict(target)) == target


@FUZZ
@given(saved=gateway_specs | node_specs, text=st.none() | st.text(max_size=40))
def test_any_saved_plan_is_a_plan_or_a_clear_error(scratch: Path, saved: Any,
                                                   text: str | None) -> None:
    path = scratch / "plan.json"
    path.write_text(json.dumps(saved, default=str) if text is None else text,
                    errors="surrogatepass")
    for read in (gateway_target_from_dict, node_target_from_dict):
        with contextlib.suppress(DocumentError, PlanFormatError):
            read(load_json_file(path, DOCUMENT_LIMITS))


# --- probes: datagrams from tunnel peers ---------------------------------------------------


def test_a_datagram_of_nested_brackets_is_not_a_probe() -> None:
    for decode in (decode_request, decode_reply):
        with pytest.raises(ProbeFormatError, match="nested deeper than 4 levels"):
            decode(b"[" * 32_000 + b"]" * 32_000)


@FUZZ
@given(data=st.binary(max_size=200) | values.map(lambda v: json.dumps(
    {"v": 1, "seq": 1, "here": v, "away": v, "serving": v}, default=str).encode()))
def test_any_datagram_is_a_probe_or_a_probe_format_error(data: bytes) -> None:
    for decode in (decode_request, decode_reply):
        with contextlib.suppress(ProbeFormatError):
            decode(data)
