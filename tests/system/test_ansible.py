"""The Ansible role (ansible/) rolling gatewayd out to two booted Debian 12 hosts over SSH.

ansible-playbook runs on this host, as an operator's controller would, with an inventory and
an SSH key made by the test; the gateways are containers from the shared rootfs, reachable on
their veths. Both run in Kubernetes mode and really join a cluster: the in-repo fake API server
(testkit/fakecluster/fakeapi.py) serves HTTPS on this host's end of gw1's veth, and the real
`gatewayd controller` runs here against it. gw1 installs the .deb shipped from here and joins
with a token, the API server's URL and its CA; gw2 installs from an apt repository (a flat one,
bind-mounted) and joins with a kubeconfig. The tests after the lint checks are one rollout
story, in order, on the same two hosts: install and join, a run that changes nothing, --check,
a reload, a restart and a credential rotation rolled one host at a time, an API server a host
cannot reach and a broken variable that each stop at the first host, removal. Every run is
verbose with --diff, and no secret may appear in any of their output.

Standalone mode (no cluster credentials: a snapshot and hand-written tunnel peers) is a story of
its own, shorter and on one more host (gw3, installed from the .deb): install, a change of the
peers applied by a reload, a run that changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakecluster.fakeapi import FakeApiServer, make_test_certificates
from nspawn import Container

from gatewayd.lab.netns import Sandbox, run, wait_for

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
PLUGINS = Path(__file__).resolve().parent / "ansible_plugins"
TOOLS = Path(sys.executable).parent  # ansible-playbook and ansible-lint, from the test extra

UNIT = "gatewayd.service"
CONFIG = "/etc/gatewayd/gatewayd.yaml"
PRIVATE_KEY = "/var/lib/gatewayd/wireguard.key"
# Made up: 32 bytes each, base64. No traffic ever goes to them (no endpoints).
NODE1_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
NODE2_KEY = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="
PEER_NODE1 = {"name": "node1", "public_key": NODE1_KEY, "allowed_ips": ["10.244.1.0/24"],
              "persistent_keepalive": 0}
PEER_NODE2 = {"name": "node2", "public_key": NODE2_KEY, "allowed_ips": ["10.244.2.0/24"],
              "persistent_keepalive": 0}
STRAY_EGRESS_IP = "198.51.100.75"
STANDALONE_EGRESS_IP = "198.51.100.71"
# Management /30s for the veths; 10.250.0.0/16 is ours (see shared/notes: private ranges only).
MANAGEMENT = ipaddress.ip_network("10.250.0.0/16")


# --- what the cluster holds ----------------------------------------------------------------------

NAMESPACE = "gatewayd-system"
GROUP_VERSION = "egress.gatewayd.io/v1alpha1"


def cluster_objects() -> list[dict[str, Any]]:
    """What kubelets and the scheduler would have written, and one policy through any gateway
    (as `kubectl apply` would): the controller plans from these."""
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop"}}},
        {"apiVersion": "v1", "kind": "Node",
         "metadata": {"name": "node1", "labels": {"kubernetes.io/hostname": "node1"}},
         "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
         "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.21"}]}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "checkout-1", "namespace": "shop",
                      "uid": "c0000000-0000-4000-8000-000000000001",
                      "labels": {"app": "checkout"}},
         "spec": {"nodeName": "node1"},
         "status": {"phase": "Running", "podIP": "10.244.1.10",
                    "podIPs": [{"ip": "10.244.1.10"}]}},
        {"apiVersion": GROUP_VERSION, "kind": "EgressGatewayPolicy",
         "metadata": {"name": "payment-gateway"},
         "spec": {
             "selectors": [{"podSelector": {"matchLabels": {"app": "checkout"}}}],
             "destinationCIDRs": ["198.51.100.10/32"],
             "egressGateway": {
                 "nodeSelector": {"matchLabels": {"egress.gatewayd.io/role": "gateway"}},
                 "egressIP": "198.51.100.70"}}},
    ]


def kubeconfig(server: str, ca: bytes, token: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca).decode()}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    })


def free_port() -> int:
    """A TCP port nobody listens on now (for the controller's health endpoint)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- what a standalone gateway follows ----------------------------------------------------------


def snapshot(name: str, egress_ip: str) -> dict[str, list[dict[str, Any]]]:
    """A standalone snapshot: this gateway, one node with one pod, one policy through it."""
    cluster = cluster_objects()[:3]  # the namespace, the node and its pod
    return {
        "00-cluster.yaml": [
            *cluster,
            {"apiVersion": GROUP_VERSION, "kind": "EgressGateway",
             "metadata": {"name": name, "labels": {"egress.gatewayd.io/role": "gateway",
                                                   "kubernetes.io/hostname": name}},
             "status": {
                 "addresses": [{"type": "InternalIP", "address": "198.51.100.2"}],
                 "interfaces": [{"name": "host0", "addresses": ["198.51.100.2/24"],
                                 "defaultRouteV4": True}],
                 "egressIPPools": [{"cidr": "198.51.100.64/27", "interface": "host0"}],
                 "conditions": [{"type": "Ready", "status": "True"}]}},
        ],
        "30-payment.yaml": [policy("payment-gateway", "198.51.100.10/32", egress_ip)],
    }


def policy(name: str, destination: str, egress_ip: str) -> dict[str, Any]:
    """Checkout pods to `destination` leave through any gateway from `egress_ip`."""
    return {
        "apiVersion": GROUP_VERSION, "kind": "EgressGatewayPolicy",
        "metadata": {"name": name},
        "spec": {
            "selectors": [{"podSelector": {"matchLabels": {"app": "checkout"}}}],
            "destinationCIDRs": [destination],
            "egressGateway": {
                "nodeSelector": {"matchLabels": {"egress.gatewayd.io/role": "gateway"}},
                "egressIP": egress_ip}},
    }


# --- the hosts and the controller --------------------------------------------------------------


@dataclass
class Gateway:
    name: str
    container: Container
    address: str  # where SSH reaches it


@dataclass
class Play:
    returncode: int
    output: str
    recap: dict[str, dict[str, int]]
    timeline: list[dict[str, Any]]

    def tail(self) -> str:
        return self.output[-6000:]

    def results(self, host: str, task: str) -> list[dict[str, Any]]:
        """The timeline entries of `task` (its name without the role prefix) on `host`."""
        return [e for e in self.timeline
                if e["host"] == host and e["task"].rpartition(" : ")[2] == task]

    def span(self, host: str) -> tuple[float, float]:
        """From the start of the first task on `host` to the end of its last one."""
        mine = [e for e in self.timeline if e["host"] == host]
        return min(e["start"] for e in mine), max(e["end"] for e in mine)


RECAP_LINE = re.compile(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", re.MULTILINE)


@dataclass
class Playbook:
    """Gateways and a controller that runs ansible/site.yml against them."""

    directory: Path
    gateways: list[Gateway]
    inventory: Path
    overrides: dict[str, Any] = field(default_factory=dict)  # extra vars every run keeps
    outputs: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    runs: int = 0

    def play(self, *options: str, **extra_vars: Any) -> Play:
        self.runs += 1
        variables = self.directory / f"vars-{self.runs}.json"
        variables.write_text(json.dumps({**self.overrides, **extra_vars}))
        timeline = self.directory / f"timeline-{self.runs}.jsonl"
        proc = subprocess.run(
            [str(TOOLS / "ansible-playbook"), "-i", str(self.inventory), "--diff", "-v",
             "-e", f"@{variables}", *options, str(ANSIBLE_DIR / "site.yml")],
            cwd=self.directory, env=ansible_environment(self.directory, timeline),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
        )
        output = proc.stdout + proc.stderr
        self.outputs.append(output)
        (self.directory / f"output-{self.runs}.log").write_text(output)
        recap = {host: {k: int(v) for k, v in (pair.split("=") for pair in counts.split())}
                 for host, counts in RECAP_LINE.findall(output)}
        entries = ([json.loads(line) for line in timeline.read_text().splitlines()]
                   if timeline.exists() else [])
        return Play(proc.returncode, output, recap, entries)


class Standalone(Playbook):
    """One gateway in standalone mode: a snapshot and hand-written tunnel peers."""


@dataclass(kw_only=True)
class Rollout(Playbook):
    """Two gateways in Kubernetes mode, the API server they join and its CA."""

    api: FakeApiServer
    ca: bytes  # the API server's CA certificate (PEM)
    spare_tokens: list[str]  # accepted by the API server, for a rotation


def ansible_environment(directory: Path, timeline: Path) -> dict[str, str]:
    config = directory / "ansible.cfg"
    config.touch()  # empty: no /etc/ansible/ansible.cfg or ~/.ansible.cfg of this host
    return {
        **os.environ,
        "PATH": f"{TOOLS}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_CONFIG": str(config),
        "ANSIBLE_HOME": str(directory / "home"),
        "ANSIBLE_LOCAL_TEMP": str(directory / "tmp"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(directory / "cp"),
        "ANSIBLE_PIPELINING": "true",
        "ANSIBLE_NOCOLOR": "true",
        "ANSIBLE_RETRY_FILES_ENABLED": "false",
        "ANSIBLE_CALLBACK_PLUGINS": str(PLUGINS),
        "ANSIBLE_CALLBACKS_ENABLED": "timeline",
        "GATEWAYD_TIMELINE": str(timeline),
    }


def flat_repository(deb: Path, directory: Path) -> None:
    """An apt repository of one .deb, as `deb [trusted=yes] file:DIR ./` reads it."""
    directory.mkdir()
    shutil.copy(deb, directory / deb.name)
    control = run(["dpkg-deb", "--field", str(deb)]).stdout.rstrip("\n")
    data = deb.read_bytes()
    (directory / "Packages").write_text(
        f"{control}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
        f"SHA256: {hashlib.sha256(data).hexdigest()}\n")


def management_addresses(index: int) -> tuple[str, str]:
    """The host's and the container's address on one /30, distinct per test process."""
    subnets = MANAGEMENT.num_addresses // 4
    base = MANAGEMENT.network_address + 4 * ((os.getpid() * 4 + index) % subnets)
    return f"{base + 1}/30", f"{base + 2}/30"


def ssh_works(directory: Path, address: str) -> bool:
    return subprocess.run(
        ["ssh", *ssh_options(directory), f"root@{address}", "true"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
    ).returncode == 0


def ssh_options(directory: Path) -> list[str]:
    return ["-i", str(directory / "id_ed25519"), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5"]


def close_ssh_master(directory: Path, address: str) -> None:
    """Ansible's ControlPersist leaves an ssh master per host running for a while: ours."""
    subprocess.run(["ssh", *ssh_options(directory), "-o", f"ControlPath={directory}/cp/%C",
                    "-O", "exit", f"root@{address}"],
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


def controller_directory(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A directory for one story's runs, with the SSH key its hosts will trust."""
    for tool in ("ansible-playbook", "ansible-lint"):
        if not (TOOLS / tool).exists():
            pytest.fail(f"{TOOLS / tool} is missing: install the test extra (pip install .[test])")
    directory = tmp_path_factory.mktemp(name)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / "id_ed25519")])
    return directory


def boot_gateway(sandbox: Sandbox, directory: Path, rootfs: Path, container_name: str,
                 name: str, index: int, binds: list[tuple[Path, str]]) -> tuple[Gateway, str]:
    """A booted host that trusts `directory`'s SSH key, reachable on its veth; returns it and
    this host's address on that veth."""
    container = Container(sandbox, container_name, rootfs, directory / f"console-{name}.log",
                          binds=binds)
    host_address, address = management_addresses(index)
    container.address_veth(host_address, address)
    container.write("/root/.ssh/authorized_keys", (directory / "id_ed25519.pub").read_text(),
                    "0600")
    # No route out of here: the apt sources are the role's and nothing else.
    container.run("rm", "-f", "/etc/apt/sources.list")
    gateway = Gateway(name, container, address.split("/")[0])
    sandbox.on_close(f"ssh master for {name}",
                     lambda a=gateway.address: close_ssh_master(directory, a))
    wait_for(lambda a=gateway.address: ssh_works(directory, a), 30, f"sshd on {name}")
    return gateway, host_address.split("/")[0]


def common_vars(directory: Path) -> dict[str, Any]:
    """What every gateway of both stories gets: how to reach it, its uplink, its pool."""
    return {
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(directory / "id_ed25519"),
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                                   "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        "ansible_python_interpreter": "/usr/bin/python3",
        "gatewayd_apt_cache_valid_time": 0,  # no network: nothing to refresh from
        "gatewayd_extra_packages": ["wireguard-go"],
        "gatewayd_uplink": "host0",
        "gatewayd_labels": {"egress.gatewayd.io/role": "gateway", "site": "test"},
        "gatewayd_egress_ip_pools": [{"cidr": "198.51.100.64/27"}],
        "gatewayd_reconcile_repair_seconds": 2,
    }


@pytest.fixture(scope="module")
def rollout(rootfs: Path, deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rollout]:
    directory = controller_directory(tmp_path_factory, "ansible")
    flat_repository(deb, directory / "repo")
    join_token, kube_token, *spare_tokens = (f"gwjoin.{os.urandom(16).hex()}" for _ in range(4))
    admin_token = f"admin.{os.urandom(16).hex()}"
    prefix = f"gwa{os.getpid() % 100000}"
    with Sandbox(prefix) as sandbox:
        gateways = []
        host_addresses = []
        for index, name in enumerate(["gw1", "gw2"]):
            gateway, host_address = boot_gateway(sandbox, directory, rootfs,
                                                 f"{prefix}-{index + 1}", name, index,
                                                 [(directory / "repo", "/mnt/repo")])
            gateways.append(gateway)
            host_addresses.append(host_address)
        gw1, gw2 = gateways

        # The API server listens on this host's end of gw1's veth (nowhere else), with a
        # certificate for that address; gw2 reaches it through its own veth. It checks the
        # bearer tokens (one per gateway, one for the controller) but, unlike a real cluster,
        # not RBAC: packaging/kubernetes's per-gateway Role is not exercised here.
        api_address = host_addresses[0]
        gw2.container.run("ip", "route", "add", f"{api_address}/32", "via", host_addresses[1])
        tls = make_test_certificates(directory / "tls", [api_address])
        api = FakeApiServer(host=api_address, tls=tls,
                            accepted_tokens=[join_token, kube_token, *spare_tokens, admin_token])
        api.start()
        sandbox.on_close("API server", api.stop)
        for obj in cluster_objects():
            api.put(obj)
        ca = tls.ca.read_bytes()
        admin = directory / "admin.kubeconfig"
        admin.write_text(kubeconfig(api.url, ca, admin_token))
        sandbox.spawn(None, [sys.executable, "-m", "gatewayd.cli.gatewayd", "controller",
                             "--kubeconfig", str(admin), "--namespace", NAMESPACE,
                             "--hold-down", "0", "--health-port", str(free_port())],
                      directory / "controller.log", {"PYTHONUNBUFFERED": "1"})

        common = {
            **common_vars(directory),
            "gatewayd_cluster_namespace": NAMESPACE,
            "gatewayd_cluster_lease_duration_seconds": 4,
            "gatewayd_cluster_lease_renew_seconds": 1,
        }
        hosts = {
            "gw1": {
                "ansible_host": gw1.address,
                "gatewayd_deb_path": str(deb),
                "gatewayd_cluster_join_token": join_token,
                "gatewayd_cluster_api_server": api.url,
                "gatewayd_cluster_ca_certificate": ca.decode(),
            },
            "gw2": {
                "ansible_host": gw2.address,
                "gatewayd_apt_repository": {"uris": ["file:/mnt/repo"], "suites": ["./"],
                                            "trusted": True},
                "gatewayd_cluster_kubeconfig": kubeconfig(api.url, ca, kube_token),
            },
        }
        inventory = directory / "inventory.yml"
        # JSON is YAML.
        inventory.write_text(json.dumps({"gateways": {"vars": common, "hosts": hosts}}))
        yield Rollout(directory, gateways, inventory, api=api, ca=ca, spare_tokens=spare_tokens,
                      secrets=[join_token, kube_token, admin_token])


@pytest.fixture(scope="module")
def standalone(rootfs: Path, deb: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standalone]:
    """One more host, gw3, for a standalone rollout from the shipped .deb: no credentials, a
    snapshot whose policy makes it the active gateway for STANDALONE_EGRESS_IP, node1's peer."""
    directory = controller_directory(tmp_path_factory, "ansible-standalone")
    prefix = f"gws{os.getpid() % 100000}"
    with Sandbox(prefix) as sandbox:
        # Index 2: the management /30s of this process after gw1's and gw2's.
        gateway, _ = boot_gateway(sandbox, directory, rootfs, f"{prefix}-1", "gw3", 2, [])
        hosts = {"gw3": {
            "ansible_host": gateway.address,
            "gatewayd_deb_path": str(deb),
            "gatewayd_tunnel_address": "10.255.0.1/24",
            "gatewayd_tunnel_peers": [PEER_NODE1],
            "gatewayd_snapshot_objects": snapshot("gw3", STANDALONE_EGRESS_IP),
        }}
        inventory = directory / "inventory.yml"
        inventory.write_text(json.dumps({"gateways": {"vars": common_vars(directory),
                                                      "hosts": hosts}}))
        yield Standalone(directory, [gateway], inventory)


# --- what a host shows -------------------------------------------------------------------------


def main_pid(host: Container) -> int:
    return int(host.show(UNIT, "MainPID"))


def egress_ips(host: Container) -> set[str]:
    links = json.loads(host.run("ip", "-j", "addr", "show", "dev", "host0").stdout)
    return {a["local"] for link in links for a in link["addr_info"] if a["prefixlen"] == 32}


def has_table(host: Container) -> bool:
    return host.run("nft", "list", "table", "inet", "gatewayd", check=False).returncode == 0


def tunnel_pids(host: Container) -> str:
    return host.run("pidof", "wireguard-go", check=False).stdout.strip()


def data_plane(host: Container) -> tuple[bool, set[str], str, set[str]]:
    """SNAT table, egress IPs, the tunnel's process and peers: equal means untouched."""
    tunnel_peers = host.run("wg", "show", "egress0", "peers", check=False).stdout.split()
    return has_table(host), egress_ips(host), tunnel_pids(host), set(tunnel_peers)


def peers(host: Container) -> set[str]:
    return set(host.run("wg", "show", "egress0", "peers").stdout.split())


def tunnel_mtu(host: Container) -> int:
    mtu: int = json.loads(host.run("ip", "-j", "link", "show", "egress0").stdout)[0]["mtu"]
    return mtu


def status(host: Container) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(host.run("gatewayctl", "status", "-o", "json").stdout)
    return report


def gateway_object(api: FakeApiServer, name: str) -> dict[str, Any]:
    return api.get("egressgateways", name) or {}


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    found = [c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind]
    return found[0] if found else {}


def plan_applied(api: FakeApiServer, name: str) -> bool:
    """The controller wrote the gateway's spec, and the agent reports that generation applied."""
    obj = gateway_object(api, name)
    generation = (obj.get("metadata") or {}).get("generation")
    return ("spec" in obj and condition(obj, "Ready").get("status") == "True"
            and (obj.get("status") or {}).get("observedGeneration") == generation)


def planned_policies(api: FakeApiServer, name: str) -> set[str]:
    return {r.get("policy") for r in (gateway_object(api, name).get("spec") or {}).get("rules")
            or []}


def lease_renewed(api: FakeApiServer, name: str) -> str | None:
    lease = api.get("leases", f"egressgateway-{name}", NAMESPACE) or {}
    renewed: str | None = (lease.get("spec") or {}).get("renewTime")
    return renewed


def file_state(host: Container, path: str) -> str:
    """Mode, owner and checksum; "" when the file is missing."""
    return host.sh(f"test -e {path} && stat -c '%a %U' {path} && sha256sum < {path}; true")


def reload_times(host: Container) -> list[float]:
    """When systemd started a reload of the unit (its journal record), as Unix time."""
    out = host.run("journalctl", "-u", UNIT, "-o", "json", "--no-pager").stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [int(r["__REALTIME_TIMESTAMP"]) / 1e6 for r in records
            if str(r.get("MESSAGE", "")).startswith("Reloading")]


def assert_one_at_a_time(play: Play, handler: str) -> None:
    """Each host went through `handler` and its health check before the next host began."""
    spans = []
    for host in ("gw1", "gw2"):
        [done] = play.results(host, handler)
        [healthy] = play.results(host, "Check that gatewayd is healthy")
        assert done["changed"] and healthy["outcome"] == "ok", (done, healthy)
        assert done["end"] <= healthy["start"]
        spans.append(play.span(host))
    (_, first_end), (second_start, _) = spans
    assert first_end <= second_start, f"gw2 began before gw1 was proven healthy: {spans}"


# --- tests that need no host ---------------------------------------------------------------------


def test_role_passes_ansible_lint_production_profile() -> None:
    proc = subprocess.run(
        [str(TOOLS / "ansible-lint"), "--offline", "--profile", "production", "--nocolor", "."],
        cwd=ANSIBLE_DIR, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PATH": f"{TOOLS}:{os.environ.get('PATH', '/usr/bin:/bin')}"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


def test_playbook_passes_syntax_check(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(TOOLS / "ansible-playbook"), "--syntax-check", "-i", "inventory.example.yml",
         "site.yml"],
        cwd=ANSIBLE_DIR, capture_output=True, text=True, timeout=120,
        env=ansible_environment(tmp_path, tmp_path / "timeline.jsonl"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "playbook: site.yml" in proc.stdout


# --- the rollout, in order -----------------------------------------------------------------------


def test_first_run_installs_starts_and_joins_both_gateways(rollout: Rollout) -> None:
    play = rollout.play()
    assert play.returncode == 0, play.tail()
    gw1, gw2 = rollout.gateways
    api = rollout.api
    for gateway in rollout.gateways:
        host = gateway.container
        counts = play.recap[gateway.name]
        assert counts["failed"] == 0 and counts["changed"] > 0, counts
        assert host.show(UNIT, "ActiveState") == "active"
        assert host.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"
        report = status(host)
        assert report["ready"] and report["running"] and report["name"] == gateway.name
        assert report["mode"] == "kubernetes" and report["apiServer"]["connected"], report
        config = yaml.safe_load(host.sh(f"cat {CONFIG}"))
        assert "snapshot" not in config and "peers" not in config["tunnel"], config
        # Its probe responder, a process of the agent's, answers at a higher CPU priority.
        (responder,) = host.sh(
            f"for c in $(cat /proc/{main_pid(host)}/task/*/children); do "
            "grep -qa gatewayd.agent.responder /proc/$c/cmdline && echo $c; done; true").split()
        assert host.sh(f"cut -d' ' -f19 /proc/{responder}/stat").strip() == "-10"
        # The key was made on the host; the fact carries only its public half.
        assert file_state(host, PRIVATE_KEY).startswith("600 gatewayd\n")
        public = host.sh(f"wg pubkey < {PRIVATE_KEY}").strip()
        assert host.run("wg", "show", "egress0", "public-key").stdout.strip() == public
        assert f"gateway {gateway.name}: WireGuard public key {public}" in play.output
        rollout.secrets.append(host.sh(f"cat {PRIVATE_KEY}").strip())
        # Joined: its EgressGateway carries its public key and says Ready.
        obj = gateway_object(api, gateway.name)
        assert obj["status"]["publicKey"] == public, obj
        assert condition(obj, "Ready")["status"] == "True", obj
        assert obj["metadata"]["labels"]["site"] == "test"
        # Its heartbeat goes on after the play: the Lease is renewed.
        renewed = lease_renewed(api, gateway.name)
        assert renewed is not None
        wait_for(lambda n=gateway.name, r=renewed: lease_renewed(api, n) not in (None, r), 10,
                 f"the Lease of {gateway.name} to be renewed")
    # The controller planned the policy onto a gateway, and the agents applied its specs.
    wait_for(lambda: all(plan_applied(api, g.name) for g in rollout.gateways)
             and planned_policies(api, "gw1") | planned_policies(api, "gw2")
             == {"payment-gateway"}, 30, "the controller's plans to be applied")
    for gateway in rollout.gateways:
        if planned_policies(api, gateway.name):
            assert [p for p in status(gateway.container)["policies"]
                    if p.startswith("payment-gateway")], status(gateway.container)
            assert has_table(gateway.container)
    # One way of joining each, as root's secrets (readable by group gatewayd); the other
    # way's file is absent.
    assert file_state(gw1.container, "/etc/gatewayd/join-token").startswith("640 root\n")
    assert gw1.container.sh("cat /etc/gatewayd/join-token") == rollout.secrets[0]
    assert gw1.container.sh("cat /etc/gatewayd/cluster-ca.crt") == rollout.ca.decode()
    assert file_state(gw1.container, "/etc/gatewayd/kubeconfig") == ""
    assert file_state(gw2.container, "/etc/gatewayd/kubeconfig").startswith("640 root\n")
    assert rollout.secrets[1] in gw2.container.sh("cat /etc/gatewayd/kubeconfig")
    assert file_state(gw2.container, "/etc/gatewayd/join-token") == ""
    # gw1 from the shipped .deb, gw2 from the repository.
    assert file_state(gw1.container, "/var/cache/gatewayd/gatewayd.deb") != ""
    assert file_state(gw2.container, "/var/cache/gatewayd/gatewayd.deb") == ""
    assert "file:/mnt/repo" in gw2.container.sh("cat /etc/apt/sources.list.d/gatewayd.sources")
    # Rolled one host at a time: gw1 was healthy before gw2 was touched.
    assert play.span("gw1")[1] <= play.span("gw2")[0]


def test_second_run_changes_nothing(rollout: Rollout) -> None:
    pids = [main_pid(g.container) for g in rollout.gateways]
    play = rollout.play()
    assert play.returncode == 0, play.tail()
    for gateway in rollout.gateways:
        counts = play.recap[gateway.name]
        assert counts["changed"] == 0 and counts["failed"] == 0, (counts, play.tail())
        assert play.results(gateway.name, "Check that gatewayd is healthy")[0]["outcome"] == "ok"
    assert [main_pid(g.container) for g in rollout.gateways] == pids


def test_check_mode_reports_a_change_without_making_it(rollout: Rollout) -> None:
    before = {g.name: (file_state(g.container, CONFIG), main_pid(g.container),
                       data_plane(g.container), reload_times(g.container))
              for g in rollout.gateways}
    play = rollout.play("--check", gatewayd_tunnel_mtu=1400)
    assert play.returncode == 0, play.tail()
    # The diff shows the new MTU, and each host says it would reload.
    assert re.search(r"^\+\s+mtu: 1400$", play.output, re.MULTILINE), play.tail()
    for gateway in rollout.gateways:
        assert play.recap[gateway.name]["changed"] > 0
        assert play.results(gateway.name, "Write the configuration")[0]["changed"]
        assert play.results(gateway.name, "Reload gatewayd")[0]["changed"]
        host = gateway.container
        after = (file_state(host, CONFIG), main_pid(host), data_plane(host), reload_times(host))
        assert after == before[gateway.name]


def test_config_change_reloads_one_host_at_a_time(rollout: Rollout) -> None:
    pids = {g.name: main_pid(g.container) for g in rollout.gateways}
    rollout.overrides["gatewayd_tunnel_mtu"] = 1400
    play = rollout.play()
    assert play.returncode == 0, play.tail()
    assert_one_at_a_time(play, "Reload gatewayd")
    for gateway in rollout.gateways:
        host = gateway.container
        assert not play.results(gateway.name, "Restart gatewayd")[0]["changed"]
        # Applied by the same process, still joined.
        assert tunnel_mtu(host) == 1400
        assert main_pid(host) == pids[gateway.name]
        report = status(host)
        assert report["ready"] and report["apiServer"]["connected"], report
        # systemd itself saw the reload inside this host's turn, not in the other's.
        start, end = play.span(gateway.name)
        assert [t for t in reload_times(host) if start <= t <= end], reload_times(host)


def test_reconcile_change_restarts_one_host_at_a_time_keeping_snat(rollout: Rollout) -> None:
    before = {g.name: (main_pid(g.container), data_plane(g.container))
              for g in rollout.gateways}
    rollout.overrides["gatewayd_reconcile_repair_seconds"] = 3
    play = rollout.play()
    assert play.returncode == 0, play.tail()
    assert_one_at_a_time(play, "Restart gatewayd")
    for gateway in rollout.gateways:
        host = gateway.container
        pid, plane = before[gateway.name]
        assert main_pid(host) != pid and status(host)["ready"]
        assert data_plane(host) == plane  # the tunnel process and SNAT stayed
        assert not play.results(gateway.name, "Reload gatewayd")[0]["changed"]


def test_rotated_credentials_restart_one_host_at_a_time(rollout: Rollout) -> None:
    # The agent reads its credentials only at start: new ones need a restart, not a reload.
    before = {g.name: main_pid(g.container) for g in rollout.gateways}
    join_token, kube_token = rollout.spare_tokens
    rollout.secrets += [join_token, kube_token]
    hosts = yaml.safe_load(rollout.inventory.read_text())["gateways"]["hosts"]
    hosts["gw1"]["gatewayd_cluster_join_token"] = join_token
    hosts["gw2"]["gatewayd_cluster_kubeconfig"] = kubeconfig(rollout.api.url, rollout.ca,
                                                             kube_token)
    inventory = yaml.safe_load(rollout.inventory.read_text())
    inventory["gateways"]["hosts"] = hosts
    rollout.inventory.write_text(json.dumps(inventory))
    play = rollout.play()
    assert play.returncode == 0, play.tail()
    assert_one_at_a_time(play, "Restart gatewayd")
    gw1, gw2 = rollout.gateways
    assert gw1.container.sh("cat /etc/gatewayd/join-token") == join_token
    assert kube_token in gw2.container.sh("cat /etc/gatewayd/kubeconfig")
    for gateway in rollout.gateways:
        host = gateway.container
        assert main_pid(host) != before[gateway.name]
        assert not play.results(gateway.name, "Write the configuration")[0]["changed"]
        assert not play.results(gateway.name, "Reload gatewayd")[0]["changed"]
        assert status(host)["apiServer"]["connected"]
        renewed = lease_renewed(rollout.api, gateway.name)
        wait_for(lambda n=gateway.name, r=renewed: lease_renewed(rollout.api, n) != r, 10,
                 f"the Lease of {gateway.name} to be renewed with the new credentials")


def test_unreachable_api_server_stops_at_the_first_host(rollout: Rollout) -> None:
    gw1, gw2 = rollout.gateways
    before = (file_state(gw2.container, CONFIG), main_pid(gw2.container))
    # Nothing listens there: gw1 restarts, restores its saved plan (ready), but cannot join.
    nowhere = rollout.api.url.rsplit(":", 1)[0] + ":1"
    play = rollout.play(gatewayd_cluster_api_server=nowhere, gatewayd_health_timeout=10)
    assert play.returncode != 0
    assert play.recap["gw1"]["failed"] == 1 and "gw2" not in play.recap, play.tail()
    assert f"it cannot reach the API server {nowhere}: " in play.output, play.tail()
    assert "is not healthy after 10 s" in play.output
    assert status(gw1.container)["ready"]  # it goes on serving its saved plan meanwhile
    assert (file_state(gw2.container, CONFIG), main_pid(gw2.container)) == before
    # Back to the right address: a restart, and it joins again.
    pid = main_pid(gw1.container)
    again = rollout.play()
    assert again.returncode == 0, again.tail()
    assert again.results("gw1", "Restart gatewayd")[0]["changed"]
    assert main_pid(gw1.container) != pid and status(gw1.container)["apiServer"]["connected"]


def test_broken_variable_stops_at_the_first_host(rollout: Rollout) -> None:
    before = {g.name: (file_state(g.container, CONFIG), main_pid(g.container),
                       data_plane(g.container)) for g in rollout.gateways}
    # Host bits set: only gatewayctl check-config, on the host, can tell.
    play = rollout.play(gatewayd_egress_ip_pools=[{"cidr": "198.51.100.65/27"}])
    assert play.returncode != 0
    assert "egressIPPools[0].cidr: must be a CIDR without host bits" in play.output, play.tail()
    assert play.recap["gw1"]["failed"] == 1
    # gw2 was never touched: not one task ran there.
    assert "gw2" not in play.recap and play.results("gw2", "Write the configuration") == []
    assert not [e for e in play.timeline if e["host"] == "gw2"]
    for gateway in rollout.gateways:
        host = gateway.container
        after = (file_state(host, CONFIG), main_pid(host), data_plane(host))
        assert after == before[gateway.name]
        report = status(host)
        assert report["ready"] and report["running"]


def test_standalone_inputs_with_credentials_are_refused(rollout: Rollout) -> None:
    play = rollout.play(gatewayd_tunnel_peers=[{"name": "node1", "public_key": "x" * 43 + "=",
                                                "allowed_ips": ["10.244.1.0/24"]}])
    assert play.returncode != 0
    assert "gatewayd_tunnel_peers: not used in Kubernetes mode" in play.output, play.tail()
    assert "gw2" not in play.recap


def test_absent_asks_for_consent_then_removes_everything(rollout: Rollout) -> None:
    refused = rollout.play(gatewayd_state="absent")
    assert refused.returncode != 0
    assert "Set gatewayd_allow_teardown=true" in refused.output
    assert "gw2" not in refused.recap
    assert all(status(g.container)["running"] for g in rollout.gateways)

    play = rollout.play(gatewayd_state="absent", gatewayd_allow_teardown=True)
    assert play.returncode == 0, play.tail()
    for gateway in rollout.gateways:
        host = gateway.container
        assert play.recap[gateway.name]["changed"] > 0
        assert host.run("dpkg-query", "-W", "gatewayd", check=False).returncode != 0
        assert host.run("pgrep", "-f", "gatewayd agent", check=False).stdout == ""
        assert data_plane(host) == (False, set(), "", set())
        leftovers = host.sh(
            "ls -d /etc/gatewayd /var/lib/gatewayd /var/cache/gatewayd /usr/bin/gatewayctl"
            " /etc/apt/sources.list.d/gatewayd.sources /lib/systemd/system/gatewayd.service"
            " 2>/dev/null; true")
        assert leftovers == ""
    again = rollout.play(gatewayd_state="absent", gatewayd_allow_teardown=True)
    assert again.returncode == 0, again.tail()
    assert [again.recap[g.name]["changed"] for g in rollout.gateways] == [0, 0]


def test_check_mode_on_a_bare_host_reports_the_install_without_doing_it(rollout: Rollout) -> None:
    play = rollout.play("--check")
    assert play.returncode == 0, play.tail()
    assert play.results("gw1", "Ship the .deb to the host")[0]["changed"]
    assert play.results("gw2", "Add the apt source of gatewayd")[0]["changed"]
    for gateway in rollout.gateways:
        host = gateway.container
        counts = play.recap[gateway.name]
        assert counts["changed"] > 0 and counts["failed"] == 0, counts
        assert play.results(gateway.name, "Write the configuration")[0]["changed"]
        assert host.run("dpkg-query", "-W", "gatewayd", check=False).returncode != 0
        leftovers = host.sh("ls -d /etc/gatewayd /var/lib/gatewayd /var/cache/gatewayd"
                            " /etc/apt/sources.list.d/gatewayd.sources 2>/dev/null; true")
        assert leftovers == ""


def test_no_secret_in_any_output(rollout: Rollout) -> None:
    # The join secrets (first and rotated), the controller's token and the two private keys,
    # against every run of this module.
    assert len(rollout.secrets) == 7 and len(rollout.outputs) >= 10
    # The runs were verbose: module results (the config's path, a diff) are in the output.
    everything = "\n".join(rollout.outputs)
    assert '"dest": "/etc/gatewayd/gatewayd.yaml"' in everything
    for secret in rollout.secrets:
        assert secret not in everything


# --- standalone mode, on its own host --------------------------------------------------------


def test_standalone_first_run_installs_with_the_snapshot_and_peers(standalone: Standalone) -> None:
    play = standalone.play()
    assert play.returncode == 0, play.tail()
    [gateway] = standalone.gateways
    host = gateway.container
    counts = play.recap["gw3"]
    assert counts["failed"] == 0 and counts["changed"] > 0, counts
    assert host.show(UNIT, "ActiveState") == "active"
    config = yaml.safe_load(host.sh(f"cat {CONFIG}"))
    assert "kubernetes" not in config, config
    assert config["snapshot"] == "/etc/gatewayd/snapshot", config
    assert [p["publicKey"] for p in config["tunnel"]["peers"]] == [NODE1_KEY], config
    assert sorted(host.sh("ls /etc/gatewayd/snapshot").split()) == ["00-cluster.yaml",
                                                                    "30-payment.yaml"]
    for credentials in ("kubeconfig", "join-token", "cluster-ca.crt"):
        assert file_state(host, f"/etc/gatewayd/{credentials}") == ""
    report = status(host)
    assert report["ready"] and report["running"] and report["name"] == "gw3", report
    assert report["mode"] == "standalone" and "apiServer" not in report, report
    assert [p for p in report["policies"] if p.startswith("payment-gateway")], report
    # The snapshot's policy makes it the active gateway: it holds the egress IP, with SNAT.
    assert egress_ips(host) == {STANDALONE_EGRESS_IP}
    assert has_table(host)
    assert peers(host) == {NODE1_KEY}
    public = host.sh(f"wg pubkey < {PRIVATE_KEY}").strip()
    assert f"gateway gw3: WireGuard public key {public}" in play.output
    standalone.secrets.append(host.sh(f"cat {PRIVATE_KEY}").strip())


def test_standalone_peers_change_is_a_reload(standalone: Standalone) -> None:
    [gateway] = standalone.gateways
    host = gateway.container
    # A policy put into the snapshot by hand is served, until the role removes it again.
    host.write("/etc/gatewayd/snapshot/99-by-hand.yaml", yaml.safe_dump(
        policy("by-hand", "198.51.100.11/32", STRAY_EGRESS_IP)))
    wait_for(lambda: STRAY_EGRESS_IP in egress_ips(host), 15, "the policy put by hand on gw3")
    pid = main_pid(host)
    standalone.overrides["gatewayd_tunnel_peers"] = [PEER_NODE1, PEER_NODE2]
    play = standalone.play()
    assert play.returncode == 0, play.tail()
    # The diff shows the new peer; the handler reloaded, and systemd saw it in this run.
    assert re.search(rf"^\+\s+publicKey: \"{re.escape(NODE2_KEY)}\"$", play.output,
                     re.MULTILINE), play.tail()
    assert play.results("gw3", "Reload gatewayd")[0]["changed"]
    assert not play.results("gw3", "Restart gatewayd")[0]["changed"]
    assert play.results("gw3", "Check that gatewayd is healthy")[0]["outcome"] == "ok"
    start, end = play.span("gw3")
    assert [t for t in reload_times(host) if start <= t <= end], reload_times(host)
    # Applied by the same process: the new peer is on the tunnel, the stray policy and its
    # egress IP are gone, the snapshot's egress IP stays.
    assert main_pid(host) == pid
    assert peers(host) == {NODE1_KEY, NODE2_KEY}
    assert egress_ips(host) == {STANDALONE_EGRESS_IP}
    assert file_state(host, "/etc/gatewayd/snapshot/99-by-hand.yaml") == ""
    assert status(host)["ready"]


def test_standalone_second_run_changes_nothing(standalone: Standalone) -> None:
    [gateway] = standalone.gateways
    host = gateway.container
    before = (main_pid(host), data_plane(host), reload_times(host))
    play = standalone.play()
    assert play.returncode == 0, play.tail()
    counts = play.recap["gw3"]
    assert counts["changed"] == 0 and counts["failed"] == 0, (counts, play.tail())
    assert play.results("gw3", "Check that gatewayd is healthy")[0]["outcome"] == "ok"
    assert (main_pid(host), data_plane(host), reload_times(host)) == before
    # The private key never left the host: not in any run's output.
    assert len(standalone.secrets) == 1 and len(standalone.outputs) == 3
    everything = "\n".join(standalone.outputs)
    assert '"dest": "/etc/gatewayd/gatewayd.yaml"' in everything
    assert standalone.secrets[0] not in everything
