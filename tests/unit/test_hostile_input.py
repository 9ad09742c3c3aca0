"""Hostile and careless input to every reader: each ends in the project's clear error (file,
line, key), never a traceback; configs that cannot run are refused; a damaged state file is
set aside and the daemon goes on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gatewayd.agent.config import load_agent_config
from gatewayd.agent.daemon import GatewayAgent
from gatewayd.agent.target import target_from_dict as gateway_target_from_dict
from gatewayd.configfile import ConfigError
from gatewayd.dataplane.wireguard import WireGuardError, generate_private_key
from gatewayd.follower import InputError, SnapshotSource
from gatewayd.policy.lastgood import PolicyMemory
from gatewayd.policy.planio import PlanFormatError, gateway_plan_from_dict, node_plan_from_dict
from gatewayd.policy.snapshot import SnapshotError, load_snapshot
from gatewayd.steer.config import load_steer_config
from gatewayd.steer.target import target_from_dict as node_target_from_dict

pytestmark = pytest.mark.unit

KEY = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
KEY2 = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="

AGENT = f"""\
name: gw1
snapshot: /etc/gatewayd/snapshot
uplink: eth0
egressIPPools:
  - cidr: 198.51.100.64/27
tunnel:
  interface: egress0
  listenPort: 51820
  peers:
    - name: node1
      publicKey: "{KEY}"
      endpoint: "192.0.2.21:51821"
      allowedIPs: ["10.244.1.0/24"]
    - name: node2
      publicKey: "{KEY2}"
      allowedIPs: ["10.244.2.0/24"]
reconcile:
  pollSeconds: 0.5
  repairSeconds: 10
"""

STEER = f"""\
node: node1
snapshot: /etc/gatewayd/snapshot
tunnel:
  gateways:
    - name: gw1
      publicKey: "{KEY}"
      endpoint: "198.51.100.2:51820"
    - name: gw2
      publicKey: "{KEY2}"
      endpoint: "198.51.100.3:51820"
reconcile:
  pollSeconds: 0.5
"""

POD = """\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: "1"}
status: {podIP: 10.244.1.5}
"""


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def config_problems(path: Path, steer: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        (load_steer_config if steer else load_agent_config)(path)
    return raised.value.problems


# --- parser bombs and crashes (item 3) ---------------------------------------------------


HOSTILE_YAML = {
    "deep nesting": ("[" * 25_000 + "]" * 25_000, ":1: nested deeper than 100 levels"),
    "alias bomb": (
        "a: &a [x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, "
                  f"*{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(20)),
        ":1: anchors (&a) are not accepted",
    ),
    "merge key": ("base: {name: x}\nmetadata:\n  <<: {name: y}\n",
                  ":3: merge keys (<<) are not accepted"),
    "self-referencing alias": ("kind: &a [*a]\n", ":1: anchors (&a) are not accepted"),
    "timestamp tag": ("kind: !!timestamp tomorrow\n", ":1: the tag '!!timestamp' is not"),
    "int tag": ("kind: !!int abc\n", ":1: the tag '!!int' is not accepted"),
    "python tag": ("kind: !!python/object:os.system ls\n", ":1: the tag"),
    "huge integer": ("kind: Pod\nspec: {x: " + "9" * 5000 + "}\n",
                     ":2: a number of more than 100 characters"),
    "duplicate key": ("kind: Pod\nmetadata: {}\nkind: Node\n",
                      ":3: duplicate key 'kind' (first on line 1)"),
    "complex key": ("? [a, b]\n: c\n", ":1: a mapping key must be a single value"),
    "control character": ("kind: Pod\nx: \x07\n", ":2: the character U+0007 is not allowed"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_YAML))
def test_hostile_snapshot_yaml_is_a_clear_error(tmp_path: Path, case: str) -> None:
    text, expected = HOSTILE_YAML[case]
    path = write(tmp_path, "snapshot.yaml", text)
    with pytest.raises(SnapshotError) as raised:
        load_snapshot([path])
    assert str(raised.value).startswith(f"{path}{expected}"), str(raised.value)
    assert len(str(raised.value)) < 300  # never a structure expanded into the message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 100 levels"),
        ('{"kind": ' + "9" * 5000 + "}", "JSON: unusable value"),
        ('{"kind": NaN}', "JSON: NaN is not a number JSON allows"),
        ('{"kind": 1e999}', "JSON: a number out of range"),
        ('{"kind": "Pod", "kind": "Node"}', "JSON: duplicate key 'kind'"),
    ],
)
def test_hostile_snapshot_json_is_a_clear_error(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "snapshot.json", text)
    with pytest.raises(SnapshotError, match=expected):
        load_snapshot([path])


def test_a_huge_snapshot_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as out:
        out.truncate(33 * 2**20)  # sparse: costs no disk
    with pytest.raises(SnapshotError, match=r"larger than 33554432 bytes: refused"):
        load_snapshot([path])


def test_a_list_keeps_the_line_of_each_item(tmp_path: Path) -> None:
    text = "apiVersion: v1\nkind: List\nitems:\n- " + POD.replace("\n", "\n  ") + "\n- kind: Pod\n"
    with pytest.raises(SnapshotError) as raised:
        load_snapshot([write(tmp_path, "list.yaml", text)])
    assert raised.value.line == 9  # the second item, which lacks an apiVersion


def test_the_daemon_reports_a_hostile_snapshot_as_snapshot_invalid(tmp_path: Path) -> None:
    """Every parse failure reaches the snapshot source as the error it handles: the daemon
    then sends `snapshot-invalid`, turns not ready and keeps its last plan."""
    path = write(tmp_path, "snapshot.yaml", POD)
    source = SnapshotSource((path,), PolicyMemory(), lambda plan, generation: plan,
                            lambda a, b: a == b)
    source.desired(None)
    for text, _ in HOSTILE_YAML.values():
        path.write_text(text)
        with pytest.raises(InputError) as raised:
            source.desired(None)
        assert raised.value.event == "snapshot-invalid"
        assert raised.value.fields == {"file": str(path)}
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match=r"nested deeper than 100 levels"):
        source.desired(None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"name: gw1\nuplink: \xff\n", ":2: not UTF-8 text (byte 18)"),
        ("name: gw1\nuplink: !!int 5\n", ":2: the tag '!!int' is not accepted"),
        ("name: gw1\nlabels: &l {a: b}\nx: *l\n", ":2: anchors (&l) are not accepted"),
        ("name: gw1\nuplink: " + "9" * 5000 + "\n", ":2: a number of more than 100"),
        ("name: gw1\n" + "a:\n" + "".join("  " * i + "- \n" for i in range(1, 60)),
         "nested deeper than 32 levels"),
        ("name: gw1\n---\nname: gw2\n", ":3: one YAML document expected"),
    ],
)
def test_hostile_config_is_a_clear_error(tmp_path: Path, text: str | bytes,
                                         expected: str) -> None:
    path = write(tmp_path, "gatewayd.yaml", text)
    found = config_problems(path)
    assert len(found) == 1 and found[0].startswith(str(path)) and expected in found[0], found


def test_a_section_that_is_not_a_mapping_is_a_clear_error(tmp_path: Path) -> None:
    text = "name: gw1\nkubernetes: 5\nuplink: eth0\ntunnel: {}\n"
    found = config_problems(write(tmp_path, "gatewayd.yaml", text))
    assert f"{tmp_path / 'gatewayd.yaml'}:2: kubernetes: must be a mapping, got 5" in found
    steer = config_problems(write(tmp_path, "steer.yaml", "node: n1\nkubernetes: [a]\n"), True)
    assert any(":2: kubernetes: must be a mapping, got a list" in p for p in steer), steer


# --- configs that cannot run (items 1 and 4) ---------------------------------------------


AGENT_CASES = [
    ("uplink: eth0", 'uplink: "eth0\\n"', ":3: uplink: must be an interface name"),
    ("uplink: eth0", 'uplink: "eth\\0"', ":3: uplink: must be an interface name"),
    ("uplink: eth0", "uplink: abcdefghijklmnop", ":3: uplink: must be an interface name"),
    ("uplink: eth0", "uplink: ethé1234567890", ":3: uplink: must be an interface name"),
    ("uplink: eth0", "uplink: '..'", ":3: uplink: must be an interface name"),
    ("name: gw1", 'name: "gw1\\n"', ":1: name: must be the name of an EgressGateway"),
    ("snapshot: /etc/gatewayd/snapshot", 'snapshot: "/etc/\\0"', ":2: snapshot: must be a path"),
    ("  interface: egress0", '  interface: egress0\n  privateKeyFile: ""',
     ":8: tunnel.privateKeyFile: must be a path"),
    ("  interface: egress0", '  interface: "eg\\tress"', ":7: tunnel.interface: must be"),
    ("  pollSeconds: 0.5", "  pollSeconds: .nan",
     ":18: reconcile.pollSeconds: must be a number from 0.01 to 3600, got nan"),
    ("  pollSeconds: 0.5", "  pollSeconds: 1.0e-300",
     ":18: reconcile.pollSeconds: must be a number from 0.01 to 3600, got 1e-300"),
    ("  pollSeconds: 0.5", "  pollSeconds: 1e-300",  # YAML 1.1: a string
     ":18: reconcile.pollSeconds: must be a number, got '1e-300'"),
    ("  repairSeconds: 10", "  repairSeconds: .inf",
     ":19: reconcile.repairSeconds: must be a number from 0.1 to 86400, got inf"),
    ("  repairSeconds: 10", "  repairSeconds: -.inf", ":19: reconcile.repairSeconds: must be"),
    ('      endpoint: "192.0.2.21:51821"',
     '      endpoint: "192.0.2.21:\uff15\uff11\uff18\uff12\uff11"',  # fullwidth digits
     ":12: tunnel.peers[0].endpoint: must be HOST:PORT"),
    ('      endpoint: "192.0.2.21:51821"', '      endpoint: "192.0.2.21\\n:51821"',
     ":12: tunnel.peers[0].endpoint: must be HOST:PORT"),
    (f'      publicKey: "{KEY2}"', f'      publicKey: "{KEY}"',
     ":9: tunnel.peers: 'publicKey " + KEY + "' is used twice"),
    (f'      publicKey: "{KEY2}"', f'      publicKey: "{KEY[:42]}l="',  # the same 32 bytes
     ":9: tunnel.peers: 'publicKey " + KEY + "' is used twice"),
    (f'      publicKey: "{KEY2}"', '      publicKey: "AAAA"',
     ":15: tunnel.peers[1].publicKey: must be a WireGuard public key"),
    ('      allowedIPs: ["10.244.2.0/24"]', '      allowedIPs: ["10.244.1.128/25"]',
     ":9: tunnel.peers: allowedIPs: 10.244.1.128/25 of 'node2' overlaps 10.244.1.0/24 of"),
    ('      allowedIPs: ["10.244.1.0/24"]', '      allowedIPs: ["0.0.0.0/0"]',
     ":13: tunnel.peers[0].allowedIPs: item 0 must be a CIDR"),
    ('      allowedIPs: ["10.244.1.0/24"]', '      allowedIPs: ["::/0"]',
     ":13: tunnel.peers[0].allowedIPs: item 0 must be a CIDR"),
    ("  - cidr: 198.51.100.64/27", "  - cidr: ::/0", ":5: egressIPPools[0].cidr: must be"),
    ("  - cidr: 198.51.100.64/27", "  - cidr: 0.0.0.0/0", ":5: egressIPPools[0].cidr: must be"),
    ("  listenPort: 51820", "  listenPort: 51820\n  listenPort: 51821",
     ":9: tunnel.listenPort: duplicate key"),  # the loader's message: file:line: text
]


@pytest.mark.parametrize(("old", "new", "expected"), AGENT_CASES)
def test_agent_config_that_cannot_run_is_refused(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in AGENT
    path = write(tmp_path, "gatewayd.yaml", AGENT.replace(old, new, 1))
    found = config_problems(path)
    if "duplicate key" in expected:
        expected = ":9: duplicate key 'listenPort' (first on line 8)"
    assert any(p.startswith(f"{path}{expected}") for p in found), found


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (f'      publicKey: "{KEY2}"', f'      publicKey: "{KEY}"',
         ":4: tunnel.gateways: 'publicKey " + KEY + "' is used twice"),
        ('      endpoint: "198.51.100.3:51820"',
         '      endpoint: "198.51.100.3:\u0665\u0661\u0668\u0662\u0660"',  # Arabic-Indic
         ":10: tunnel.gateways[1].endpoint: must be HOST:PORT"),
        ("    - name: gw2", '    - name: gw2\n      interface: "egw\\0x"',
         ":9: tunnel.gateways[1].interface: must be an interface name"),
        ("  pollSeconds: 0.5", "  pollSeconds: .nan", ":12: reconcile.pollSeconds: must be"),
        ("    - name: gw2", "    - name: gw/2", ":8: tunnel.gateways[1].name: must be the name"),
        ("node: node1", "node: Node1", ":1: node: must be the name of a Node"),
        ("node: node1", "node: node1\nnode: node2", ":2: duplicate key 'node' (first on line 1)"),
    ],
)
def test_steer_config_that_cannot_run_is_refused(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in STEER
    path = write(tmp_path, "steer.yaml", STEER.replace(old, new, 1))
    found = config_problems(path, steer=True)
    assert any(p.startswith(f"{path}{expected}") for p in found), found


def test_kubernetes_mode_timings_must_be_finite(tmp_path: Path) -> None:
    text = textwrap.dedent("""\
        name: gw1
        kubernetes: {kubeconfig: /etc/k, leaseRenewSeconds: .nan}
        uplink: eth0
        tunnel: {}
        failover: {egressIPHoldSeconds: .inf, arpProbeSeconds: 1e-300}
        """)
    path = write(tmp_path, "gatewayd.yaml", text)
    found = config_problems(path)
    assert f"{path}:2: kubernetes.leaseRenewSeconds: must be a number from 0.1 to 1800, " \
           "got nan" in found
    assert any(p.startswith(f"{path}:5: failover.egressIPHoldSeconds: must be") for p in found)
    assert any(p.startswith(f"{path}:5: failover.arpProbeSeconds: must be") for p in found)
    steer = write(tmp_path, "steer.yaml",
                  "node: n1\nkubernetes: {}\nfailover: {probeIntervalSeconds: .nan}\n")
    assert any(":3: failover.probeIntervalSeconds: must be" in p
               for p in config_problems(steer, steer=True))


# --- plans as saved and as received (items 3 and 5) ----------------------------------------


@pytest.mark.parametrize(
    "data",
    [[], "plan", 5, None, {"gateway": "gw1", "generation": float("inf"), "rules": []},
     {"gateway": "gw1", "generation": 1e300, "rules": []},
     {"gateway": "gw1", "generation": True, "rules": []},
     {"gateway": "gw1", "generation": 2**70, "rules": []},
     {"gateway": "gw1", "generation": "3", "rules": []}],
)
def test_a_malformed_plan_is_a_plan_format_error(data: object) -> None:
    with pytest.raises(PlanFormatError):
        gateway_plan_from_dict(data)  # type: ignore[arg-type]
    with pytest.raises(PlanFormatError):
        node_plan_from_dict(data)  # type: ignore[arg-type]
    with pytest.raises(PlanFormatError):
        gateway_target_from_dict(data)  # type: ignore[arg-type]
    with pytest.raises(PlanFormatError):
        node_target_from_dict(data)  # type: ignore[arg-type]


def test_received_peers_may_not_take_the_default_route_or_overlap() -> None:
    plan = {"gateway": "gw1", "generation": 1, "rules": []}
    default = {**plan, "peers": [{"name": "n1", "publicKey": KEY, "allowedIPs": ["0.0.0.0/0"]}]}
    with pytest.raises(PlanFormatError, match=r"peers\[0\]: .*default route"):
        gateway_target_from_dict(default)
    overlapping = {**plan, "peers": [
        {"name": "n1", "publicKey": KEY, "allowedIPs": ["10.244.0.0/16"]},
        {"name": "n2", "publicKey": KEY2, "allowedIPs": ["10.244.3.0/24"]},
    ]}
    with pytest.raises(PlanFormatError,
                       match=r"10\.244\.3\.0/24 of 'n2' overlaps 10\.244\.0\.0/16"):
        gateway_target_from_dict(overlapping)


def agent_config(tmp_path: Path) -> Path:
    snapshot = write(tmp_path, "snapshot.yaml", POD)
    text = AGENT.replace("/etc/gatewayd/snapshot", str(snapshot))
    return write(tmp_path, "gatewayd.yaml", text + f"stateDirectory: {tmp_path / 'state'}\n")


@pytest.mark.parametrize(
    "saved",
    ["[]", '{"gateway": "gw1", "generation": 1e999, "rules": []}',
     '{"gateway": "gw1", "generation": 1.5, "rules": []}', '{"gateway": "gw1", "rul',
     "[" * 100_000 + "]" * 100_000, '{"gateway": "gw1", "generation": 1, "rules": {"a": 1}}'],
)
def test_a_damaged_saved_plan_is_set_aside_and_reported(tmp_path: Path, saved: str) -> None:
    agent = GatewayAgent(load_agent_config(agent_config(tmp_path)))
    agent.plan_path.parent.mkdir(parents=True)
    agent.plan_path.write_text(saved)
    old_bad = agent.plan_path.with_name("plan.json.bad")
    old_bad.write_text("an older damaged plan")

    assert agent.restore_saved_plan() is False
    assert not agent.plan_path.exists()
    assert old_bad.read_text() == saved  # the newer one replaced it
    status = json.loads(agent.status_path.read_text())
    assert status["ready"] is False
    assert status["lastError"].startswith(
        f"saved plan {agent.plan_path} unusable, moved to {old_bad}; waiting for inputs: ")
    assert agent.restore_saved_plan() is False  # nothing left to trip over


def test_a_damaged_steer_slot_table_is_set_aside(tmp_path: Path) -> None:
    from gatewayd.steer.slots import SlotTable

    path = write(tmp_path, "slots.json", "[" * 100_000 + "]" * 100_000)
    assert SlotTable(path, 0xF0).slots == {}
    assert (tmp_path / "slots.json.bad").exists() and not path.exists()


# --- the private key (item 5) --------------------------------------------------------------


def test_a_private_key_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wireguard.key"
    path.write_text("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n")
    path.chmod(0o644)
    with pytest.raises(WireGuardError) as raised:
        generate_private_key(path)
    assert str(raised.value) == (
        f"private key {path} is readable by others (mode 0644): run `chmod 600 {path}`, and "
        "replace the key if others may have read it")
    path.chmod(0o640)
    with pytest.raises(WireGuardError, match="chmod 600"):
        generate_private_key(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_a_private_key_of_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wireguard.key"
    path.write_text("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n")
    path.chmod(0o600)
    os.chown(path, 65534, -1)
    with pytest.raises(WireGuardError, match=f"belongs to uid 65534, not to this daemon's "
                                             f"uid {os.geteuid()}"):
        generate_private_key(path)


def test_addresses_in_a_plan_are_strings() -> None:
    """ipaddress takes integers too: 5 would be 0.0.0.5, and True 0.0.0.1."""
    rule = {"policy": "p", "role": "active", "egressIP": 5, "sources": [], "destinations": []}
    with pytest.raises(PlanFormatError, match="an address must be a string, got 5"):
        gateway_plan_from_dict({"gateway": "gw1", "generation": 1, "rules": [rule]})
    node = {"node": "n1", "generation": 1, "clusterInternal": [167772160], "rules": []}
    with pytest.raises(PlanFormatError, match="a CIDR must be a string, got 167772160"):
        node_plan_from_dict(node)


def test_a_hostile_kubeconfig_is_a_kube_config_error(tmp_path: Path) -> None:
    """The kubernetes client's own loader would recurse (and crash) on this."""
    from gatewayd.kube.client import KubeConfigError, client_from_kubeconfig

    path = write(tmp_path, "kubeconfig", "clusters: " + "[" * 25_000 + "]" * 25_000 + "\n")
    with pytest.raises(KubeConfigError, match=r"kubeconfig: not a usable kubeconfig: line 1: "
                                              r"nested deeper than 32 levels"):
        client_from_kubeconfig(path)


def test_a_join_token_that_is_not_text_is_a_kube_config_error(tmp_path: Path) -> None:
    from gatewayd.clusterlink import api_client
    from gatewayd.clustersettings import KubernetesSettings
    from gatewayd.kube.client import KubeConfigError

    token = write(tmp_path, "join-token", b"\xff\xfe token")
    settings = KubernetesSettings(server="https://192.0.2.1:6443", token_file=token,
                                  ca_file=write(tmp_path, "ca.crt", "x"))
    with pytest.raises(KubeConfigError, match="join-token: cannot read the join token: not UTF-8"):
        api_client(settings)


def test_a_private_key_that_is_not_text_is_a_wireguard_error(tmp_path: Path) -> None:
    path = write(tmp_path, "wireguard.key", b"\xff" * 44 + b"\n")
    path.chmod(0o600)
    with pytest.raises(WireGuardError, match="cannot read private key"):
        generate_private_key(path)


def test_state_files_and_a_new_key_are_fsynced_with_their_directory(tmp_path: Path) -> None:
    """A rename is durable only once its directory is: strace shows the fsync of each."""
    state, keys = tmp_path / "state", tmp_path / "keys"
    script = (
        "from pathlib import Path\n"
        "from gatewayd.runtime import write_json_atomic\n"
        "from gatewayd.dataplane.wireguard import generate_private_key\n"
        f"write_json_atomic(Path({str(state / 'plan.json')!r}), {{'generation': 1}})\n"
        f"generate_private_key(Path({str(keys / 'wireguard.key')!r}))\n"
    )
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat,fsync,close", "-o", str(trace),
                    sys.executable, "-c", script], check=True, timeout=120)
    opened: dict[str, str] = {}  # fd -> directory, as the trace shows them
    synced = set()
    for line in trace.read_text().splitlines():
        found = re.search(r'openat\(AT_FDCWD, "([^"]+)", [^)]*O_DIRECTORY[^)]*\) = (\d+)', line)
        if found:
            opened[found[2]] = found[1]
        found = re.search(r"(fsync|close)\((\d+)\) += 0", line)
        if found and found[2] in opened:
            directory = opened.pop(found[2])
            if found[1] == "fsync":
                synced.add(directory)
    assert {str(state), str(keys)} <= synced, synced
