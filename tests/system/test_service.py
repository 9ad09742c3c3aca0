"""The .deb on a booted Debian 12: systemctl, the watchdog, journald, reload, remove and purge.

Each test boots its own container, installs the package and (mostly) starts a gateway that
is active for two policies with egress IPs from its pool on host0 and a tunnel with one peer.
That peer's key is made up and it has no endpoint, so nothing is sent anywhere; only the
handshake test gives it a real node, in a network namespace inside the container.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from nspawn import Container

from gatewayd.lab.netns import wait_for

pytestmark = pytest.mark.system

UNIT = "gatewayd.service"
CONFIG = "/etc/gatewayd/gatewayd.yaml"
SNAPSHOT = "/etc/gatewayd/snapshot"
PAYMENT_IP, BATCH_IP, BATCH_IP_MOVED = "198.51.100.70", "198.51.100.71", "198.51.100.72"

# Made up: 32 bytes, base64. No traffic ever goes to it.
FAKE_PEER_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
GATEWAY_CONFIG = f"""\
name: gw1
snapshot: /etc/gatewayd/snapshot
uplink: host0
egressIPPools:
  - cidr: 198.51.100.64/27
tunnel:
  interface: egress0
  address: 10.255.0.1/24
  peers:
    - name: node1
      publicKey: {FAKE_PEER_KEY}
      allowedIPs: [10.244.1.0/24]
      persistentKeepalive: 0
reconcile:
  pollSeconds: 1
  repairSeconds: 2
"""

CLUSTER = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {kubernetes.io/metadata.name: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: batch, labels: {kubernetes.io/metadata.name: batch}}
---
apiVersion: v1
kind: Node
metadata: {name: node1, labels: {kubernetes.io/hostname: node1}}
spec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24]}
status:
  addresses: [{type: InternalIP, address: 192.0.2.21}]
---
apiVersion: v1
kind: Pod
metadata: {name: checkout-1, namespace: shop, uid: c0000000-0000-4000-8000-000000000001,
           labels: {app: checkout}}
spec: {nodeName: node1}
status: {phase: Running, podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: batch-1, namespace: batch, uid: c0000000-0000-4000-8000-000000000002,
           labels: {app: batch}}
spec: {nodeName: node1}
status: {phase: Running, podIP: 10.244.1.11, podIPs: [{ip: 10.244.1.11}]}
---
apiVersion: egress.gatewayd.io/v1alpha1
kind: EgressGateway
metadata: {name: gw1, labels: {egress.gatewayd.io/role: gateway, kubernetes.io/hostname: gw1}}
status:
  addresses: [{type: InternalIP, address: 198.51.100.2}]
  interfaces: [{name: host0, addresses: [198.51.100.2/24], defaultRouteV4: true}]
  egressIPPools: [{cidr: 198.51.100.64/27, interface: host0}]
  conditions: [{type: Ready, status: "True"}]
"""


def policy(name: str, app: str, destination: str, egress_ip: str) -> str:
    return f"""\
apiVersion: egress.gatewayd.io/v1alpha1
kind: EgressGatewayPolicy
metadata: {{name: {name}}}
spec:
  selectors: [{{podSelector: {{matchLabels: {{app: {app}}}}}}}]
  destinationCIDRs: [{destination}]
  egressGateway:
    nodeSelector: {{matchLabels: {{egress.gatewayd.io/role: gateway}}}}
    egressIP: {egress_ip}
"""


# --- helpers -------------------------------------------------------------------------------


def install(host: Container) -> None:
    host.run("dpkg", "-i", *host.sh("ls /mnt/dist/gatewayd_*.deb").split(), timeout=120)


def configure(host: Container, peer_key: str = FAKE_PEER_KEY) -> None:
    """Give host0 its address and write the gateway's config (node1's key: `peer_key`) and
    snapshot."""
    host.sh("ip link set host0 up && ip addr add 198.51.100.2/24 dev host0")
    host.write(CONFIG, GATEWAY_CONFIG.replace(FAKE_PEER_KEY, peer_key), "0640")
    host.write(f"{SNAPSHOT}/00-cluster.yaml", CLUSTER)
    host.write(f"{SNAPSHOT}/30-payment.yaml",
               policy("payment-gateway", "checkout", "198.51.100.10/32", PAYMENT_IP))
    host.write(f"{SNAPSHOT}/31-batch.yaml", policy("batch-all", "batch", "0.0.0.0/0", BATCH_IP))


def start_gateway(host: Container) -> None:
    install(host)
    configure(host)
    host.systemctl("enable", "--now", UNIT)


def main_pid(host: Container) -> int:
    return int(host.show(UNIT, "MainPID"))


def egress_ips(host: Container) -> set[str]:
    links = json.loads(host.run("ip", "-j", "addr", "show", "dev", "host0").stdout)
    return {a["local"] for link in links for a in link["addr_info"] if a["prefixlen"] == 32}


def has_table(host: Container) -> bool:
    return host.run("nft", "list", "table", "inet", "gatewayd", check=False).returncode == 0


def ruleset(host: Container) -> str:
    """The rules, without their counters (traffic changes those, not the rules)."""
    return host.run("nft", "--stateless", "list", "table", "inet", "gatewayd").stdout


def tunnel_pid(host: Container) -> int:
    """wireguard-go's PID: the same one before and after means the tunnel never went down."""
    return int(host.run("pidof", "wireguard-go").stdout.split()[0])


def data_plane(host: Container) -> tuple[bool, set[str], int, bool]:
    tunnel = host.run("ip", "link", "show", "egress0", check=False).returncode == 0
    return has_table(host), egress_ips(host), tunnel_pid(host), tunnel


def journal(host: Container, *matches: str) -> list[dict[str, Any]]:
    out = host.run("journalctl", "-u", UNIT, "-o", "json", "--no-pager", *matches).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def events(host: Container, event: str) -> list[dict[str, Any]]:
    return journal(host, f"GATEWAYD_EVENT={event}")


def status_page(host: Container) -> str:
    return host.systemctl("status", "--no-pager", "-n", "20", UNIT, check=False).stdout


def is_running(host: Container) -> bool:
    return (host.show(UNIT, "ActiveState"), host.show(UNIT, "SubState")) == ("active", "running")


# --- tests ---------------------------------------------------------------------------------


def test_package_installs_but_does_not_start_an_unconfigured_gateway(container: Container) -> None:
    install(container)
    assert container.systemctl("is-enabled", UNIT, check=False).stdout.strip() == "disabled"
    assert container.systemctl("is-active", UNIT, check=False).stdout.strip() == "inactive"
    # Root's config, readable by the agent's group; new files there get the group too.
    assert container.sh("stat -c '%a %U %G' /etc/gatewayd").strip() == "2750 root gatewayd"
    assert container.sh(f"stat -c '%a %U %G' {CONFIG}").strip() == "640 root gatewayd"
    assert container.sh("getent passwd gatewayd | cut -d: -f6,7").strip() == \
        "/var/lib/gatewayd:/usr/sbin/nologin"
    verify = container.run("systemd-analyze", "verify", UNIT, check=False)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    shipped = container.run("gatewayctl", "check-config", CONFIG, check=False)
    assert shipped.returncode == 1
    assert f"{CONFIG}:" in shipped.stderr and "name: required" in shipped.stderr
    # Starting it anyway is refused by ExecStartPre with the same words, and not retried.
    assert container.systemctl("start", UNIT, check=False).returncode != 0
    wait_for(lambda: "tunnel: required" in status_page(container), 10, "the reason in the status")
    assert "name: required" in status_page(container)
    assert container.show(UNIT, "ActiveState") == "failed"
    assert not has_table(container)


CAPABILITIES = "0000000000803000"  # bits 12, 13 and 23: NET_ADMIN, NET_RAW, SYS_NICE


def test_enable_now_is_running_only_after_the_plan_is_in_place(container: Container) -> None:
    start_gateway(container)
    assert is_running(container)
    # `systemctl start` of a Type=notify unit returns once READY=1 came: all is programmed.
    assert has_table(container)
    assert egress_ips(container) == {PAYMENT_IP, BATCH_IP}
    [applied] = events(container, "plan-applied")
    became_active = int(container.show(UNIT, "ActiveEnterTimestampMonotonic"))
    assert int(applied["__MONOTONIC_TIMESTAMP"]) < became_active
    status = container.systemctl("status", "--no-pager", UNIT).stdout
    assert 'Status: "2 policies, 0/1 peers up, 2 egress IPs"' in status
    # Runs with its three capabilities and nothing else.
    capabilities = container.sh(f"grep -E '^Cap(Eff|Bnd):' /proc/{main_pid(container)}/status")
    assert capabilities.split() == ["CapEff:", CAPABILITIES, "CapBnd:", CAPABILITIES]


def process_user(host: Container, pid: int) -> str:
    return host.run("ps", "-o", "user=", "-p", str(pid)).stdout.strip()


def capabilities(host: Container, pid: int) -> dict[str, str]:
    """CapInh, CapPrm, CapEff, CapBnd, CapAmb of a process, as hex masks."""
    lines = host.sh(f"grep ^Cap /proc/{pid}/status").splitlines()
    return dict(line.split(":\t") for line in lines)


def test_runs_as_its_own_user_with_three_capabilities_and_programs_everything(
    container: Container,
) -> None:
    start_gateway(container)
    pid = main_pid(container)
    assert process_user(container, pid) == "gatewayd"
    assert capabilities(container, pid) == {
        "CapInh": CAPABILITIES, "CapPrm": CAPABILITIES, "CapEff": CAPABILITIES,
        "CapBnd": CAPABILITIES, "CapAmb": CAPABILITIES}
    # wireguard-go, started by the agent, is no more than the agent.
    tunnel = tunnel_pid(container)
    assert process_user(container, tunnel) == "gatewayd"
    assert capabilities(container, tunnel)["CapEff"] == CAPABILITIES
    # And everything is programmed: the table, the egress IPs (and their ARP announcements,
    # packet sockets), the tunnel and the forwarding sysctls.
    assert has_table(container) and egress_ips(container) == {PAYMENT_IP, BATCH_IP}
    assert container.run("wg", "show", "egress0", "peers").stdout.split() == [FAKE_PEER_KEY]
    assert container.sh("sysctl -n net.ipv4.ip_forward net.ipv4.conf.egress0.rp_filter"
                        ).split() == ["1", "2"]
    assert "error" not in container.show(UNIT, "StatusText")
    # Its state and key are its own, and nobody else's.
    assert container.sh("stat -c '%a %U' /var/lib/gatewayd /var/lib/gatewayd/wireguard.key"
                        ).split() == ["750", "gatewayd", "600", "gatewayd"]
    # The wireguard-go sockets' directory stays when the daemon stops (the tunnel does).
    container.systemctl("stop", UNIT)
    assert container.sh("ls /run/wireguard").split() == ["egress0.sock"]
    assert container.run("wg", "show", "egress0", "public-key").returncode == 0


def test_exposure_is_at_most_2_0(container: Container) -> None:
    install(container)
    out = container.run("systemd-analyze", "security", "--offline=true", "--no-pager",
                        "/lib/systemd/system/gatewayd.service").stdout
    match = re.search(r"Overall exposure level for gatewayd.service: (\d+\.\d)", out)
    assert match, out[-2000:]
    assert float(match.group(1)) <= 2.0, out


def test_upgrade_from_the_root_run_package_keeps_the_tunnel_and_its_key(
    container: Container,
) -> None:
    """Before 0.x the agent ran as root: its state, key and wireguard-go were root's."""
    install(container)
    configure(container)
    container.write("/run/systemd/system/gatewayd.service.d/root.conf",
                    "[Service]\nUser=\nGroup=\n")
    container.systemctl("daemon-reload")
    container.systemctl("enable", "--now", UNIT)
    assert process_user(container, main_pid(container)) == "root"
    # What the older package left: no user, root's files (systemd made them root's too).
    container.sh("rm -r /run/systemd/system/gatewayd.service.d && userdel gatewayd"
                 " && chown -R root:root /etc/gatewayd /var/lib/gatewayd")
    assert container.sh("stat -c %U /var/lib/gatewayd/wireguard.key /run/wireguard/egress0.sock"
                        ).split() == ["root", "root"]
    before, table = data_plane(container), ruleset(container)
    key = container.run("wg", "show", "egress0", "public-key").stdout

    install(container)  # the upgrade: restarts the running agent
    assert is_running(container) and process_user(container, main_pid(container)) == "gatewayd"
    # SNAT and the egress IPs stayed. The tunnel is carried by a new wireguard-go, the agent's
    # (root's socket cannot be handed over: its owner change ends root's wireguard-go), with
    # the same key: the peers' next handshake finds it.
    assert data_plane(container)[:2] == before[:2] and ruleset(container) == table
    wait_for(lambda: container.run("wg", "show", "egress0", "public-key", check=False).stdout
             == key, 15, "the tunnel with the same key")
    assert process_user(container, tunnel_pid(container)) == "gatewayd"
    assert container.sh("stat -c %U /var/lib/gatewayd/wireguard.key /run/wireguard/egress0.sock"
                        ).split() == ["gatewayd", "gatewayd"]
    # It still reaches the old wireguard-go: a new peer from the config arrives there.
    container.write(CONFIG, GATEWAY_CONFIG.replace("persistentKeepalive: 0",
                                                   "persistentKeepalive: 7"), "0640")
    container.systemctl("reload", UNIT)
    wait_for(lambda: "7" in container.run("wg", "show", "egress0", "persistent-keepalive"
                                          ).stdout.split(), 15, "the reload to reach wireguard-go")
    assert "error" not in container.show(UNIT, "StatusText")


def test_journal_has_structured_events(container: Container) -> None:
    start_gateway(container)
    [applied] = events(container, "plan-applied")
    assert applied["PRIORITY"] == "5" and applied["SYSLOG_IDENTIFIER"] == "gatewayd"
    assert applied["GATEWAYD_GENERATION"] == "1" and applied["GATEWAYD_RULES"] == "2"
    assert applied["_SYSTEMD_UNIT"] == UNIT
    added = {e["GATEWAYD_EGRESS_IP"] for e in events(container, "egress-ip-added")}
    assert added == {PAYMENT_IP, BATCH_IP}

    container.run("ip", "addr", "del", f"{PAYMENT_IP}/32", "dev", "host0")
    wait_for(lambda: bool(events(container, "drift-repaired")), 15, "a drift-repaired event")
    [drift] = events(container, "drift-repaired")
    assert drift["PRIORITY"] == "4" and drift["GATEWAYD_TARGET"] == "egress IPs on host0"
    assert egress_ips(container) == {PAYMENT_IP, BATCH_IP}

    container.write(f"{SNAPSHOT}/31-batch.yaml",
                    policy("batch-all", "batch", "0.0.0.0/33", BATCH_IP))
    container.systemctl("reload", UNIT)
    wait_for(lambda: bool(events(container, "policy-invalid")), 15, "a policy-invalid event")
    [invalid] = events(container, "policy-invalid")
    assert invalid["PRIORITY"] == "3"
    assert invalid["GATEWAYD_POLICY"] == "EgressGatewayPolicy/batch-all"
    assert "destinationCIDRs" in invalid["MESSAGE"]
    # The last valid version stays in force.
    assert egress_ips(container) == {PAYMENT_IP, BATCH_IP}


def test_warnings_and_errors_reach_the_journal_with_their_priority(container: Container) -> None:
    start_gateway(container)
    container.write(f"{SNAPSHOT}/31-batch.yaml",
                    policy("batch-all", "batch", "0.0.0.0/33", BATCH_IP))
    container.systemctl("reload", UNIT)
    kept = "EgressGatewayPolicy/batch-all is invalid now; its last valid version stays in force"

    def warnings() -> list[dict[str, Any]]:
        return journal(container, "-p", "warning")

    # A plain log warning (not an event) is found by priority, as the README promises.
    wait_for(lambda: any(kept in e["MESSAGE"] for e in warnings()), 15, "the warning")
    # (said again by the reload after inotify saw the change first)
    warning = next(e for e in warnings() if kept in e["MESSAGE"])
    assert warning["PRIORITY"] == "4" and warning["SYSLOG_IDENTIFIER"] == "gatewayd"
    # Each event kind has its MESSAGE_ID.
    [invalid] = events(container, "policy-invalid")
    assert invalid["MESSAGE_ID"] == "5747e5c9017b45119ed25ac09589464d"
    assert invalid["PRIORITY"] == "3" and invalid in warnings()
    [applied] = journal(container, "MESSAGE_ID=a3181845a70146e89fdd8151a369207a")
    assert applied["GATEWAYD_EVENT"] == "plan-applied" and applied["PRIORITY"] == "5"
    # And plain information stays at info.
    container.systemctl("stop", UNIT)
    [stopping] = [e for e in journal(container) if e["MESSAGE"].startswith("stopping; ")]
    assert stopping["PRIORITY"] == "6" and stopping not in warnings()


def test_a_peer_handshake_shows_in_the_status_and_the_journal(container: Container) -> None:
    # A cloud node in a network namespace of the container, with its own wireguard-go.
    container.sh(
        "ip netns add node1 && ip -n node1 link set lo up"
        " && ip link add vnode1 type veth peer name eth0 netns node1"
        " && ip addr add 192.0.2.1/24 dev vnode1 && ip link set vnode1 up"
        " && ip -n node1 addr add 192.0.2.21/24 dev eth0 && ip -n node1 link set eth0 up"
        " && wg genkey > /root/node1.key")
    node_key = container.sh("wg pubkey < /root/node1.key").strip()
    install(container)
    configure(container)
    container.write(CONFIG, GATEWAY_CONFIG.replace(FAKE_PEER_KEY, node_key), "0640")
    container.systemctl("enable", "--now", UNIT)
    assert "0/1 peers up" in container.show(UNIT, "StatusText")
    gateway_key = container.run("wg", "show", "egress0", "public-key").stdout.strip()
    container.sh(
        "ip netns exec node1 wireguard-go wgnode1"
        f" && ip netns exec node1 wg set wgnode1 private-key /root/node1.key peer {gateway_key}"
        " endpoint 192.0.2.1:51820 allowed-ips 10.255.0.1/32 persistent-keepalive 1"
        " && ip -n node1 link set wgnode1 up")
    wait_for(lambda: bool(events(container, "peer-up")), 20, "a peer-up event")
    [up] = events(container, "peer-up")
    assert up["GATEWAYD_PEER"] == "node1" and up["GATEWAYD_PUBLIC_KEY"] == node_key
    assert up["PRIORITY"] == "5"
    wait_for(lambda: container.show(UNIT, "StatusText") == "2 policies, 1/1 peers up, "
             "2 egress IPs", 10, "the peer in the status line")


def test_watchdog_restarts_a_hung_daemon(container: Container) -> None:
    start_gateway(container)
    hung = main_pid(container)
    before = data_plane(container)
    container.run("kill", "-STOP", str(hung))
    wait_for(lambda: main_pid(container) not in (hung, 0) and is_running(container),
             60, "the watchdog to restart the daemon", interval=0.2)
    assert container.show(UNIT, "NRestarts") == "1"
    log = container.run("journalctl", "-u", UNIT, "--no-pager").stdout
    assert "Watchdog timeout" in log
    # faulthandler logged where the loop was when SIGABRT came.
    assert "Fatal Python error: Aborted" in log
    assert data_plane(container) == before


def test_restart_and_crash_leave_snat_in_place(container: Container) -> None:
    start_gateway(container)
    before = data_plane(container)
    assert before[:2] == (True, {PAYMENT_IP, BATCH_IP})
    table = ruleset(container)

    first = main_pid(container)
    container.systemctl("restart", UNIT)
    assert main_pid(container) != first
    assert data_plane(container) == before and ruleset(container) == table

    crashed = main_pid(container)
    container.run("kill", "-9", str(crashed))
    # RestartSec= keeps it down for a while: SNAT, the egress IPs and the tunnel stay.
    wait_for(lambda: container.show(UNIT, "SubState") == "auto-restart", 10, "the crash")
    assert data_plane(container) == before and ruleset(container) == table
    wait_for(lambda: is_running(container) and main_pid(container) != crashed, 30,
             "the restart after the crash", interval=0.2)
    assert data_plane(container) == before

    container.systemctl("stop", UNIT)
    assert container.systemctl("is-active", UNIT, check=False).stdout.strip() == "inactive"
    assert data_plane(container) == before


def test_broken_config_fails_the_start_and_keeps_the_data_plane(container: Container) -> None:
    start_gateway(container)
    before = data_plane(container)
    broken = GATEWAY_CONFIG.replace("uplink: host0", "uplink: host0 eth0")
    container.write(CONFIG, broken, "0640")

    # The reload fails (ExecReload checks the config first) and says why; the daemon keeps
    # running on the last good config, in the same process.
    pid = main_pid(container)
    reload = container.systemctl("reload", UNIT, check=False)
    assert reload.returncode != 0, reload.stdout + reload.stderr
    wait_for(lambda: f"{CONFIG}:3: uplink: must be an interface name" in status_page(container),
             10, "the reason in the status")
    # The daemon itself sees the changed file too, and reports it without applying it.
    wait_for(lambda: "config invalid" in container.show(UNIT, "StatusText"), 15,
             "the status line to report the config")
    [invalid] = events(container, "config-invalid")
    assert f"{CONFIG}:3: uplink: must be an interface name" in invalid["MESSAGE"]
    assert is_running(container) and main_pid(container) == pid
    assert data_plane(container) == before

    # A restart does not get past ExecStartPre, and systemctl status names the key.
    assert container.systemctl("restart", UNIT, check=False).returncode != 0
    reason = f"{CONFIG}:3: uplink: must be an interface name, got 'host0 eth0'"
    wait_for(lambda: reason in status_page(container), 10, "the reason in the status")
    assert container.show(UNIT, "ActiveState") == "failed"
    assert data_plane(container) == before

    container.write(CONFIG, GATEWAY_CONFIG, "0640")
    container.systemctl("start", UNIT)
    assert is_running(container) and data_plane(container) == before


def test_reload_applies_a_policy_change_in_the_same_process(container: Container) -> None:
    start_gateway(container)
    pid = main_pid(container)
    container.write(f"{SNAPSHOT}/31-batch.yaml",
                    policy("batch-all", "batch", "0.0.0.0/0", BATCH_IP_MOVED))
    container.systemctl("reload", UNIT)
    wait_for(lambda: egress_ips(container) == {PAYMENT_IP, BATCH_IP_MOVED}, 15,
             "the moved egress IP")
    wait_for(lambda: BATCH_IP_MOVED in ruleset(container), 15, "SNAT to the moved egress IP")
    assert BATCH_IP not in ruleset(container)
    assert main_pid(container) == pid and container.show(UNIT, "NRestarts") == "0"
    removed = {e["GATEWAYD_EGRESS_IP"] for e in events(container, "egress-ip-removed")}
    assert removed == {BATCH_IP}
    wait_for(lambda: is_running(container), 15, "the reload to finish")


def test_upgrade_restarts_a_running_agent_and_keeps_snat(container: Container) -> None:
    start_gateway(container)
    before, pid = data_plane(container), main_pid(container)
    install(container)  # the same version again takes the upgrade path of the scripts
    assert is_running(container) and main_pid(container) != pid
    assert data_plane(container) == before
    assert container.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"


def test_remove_with_a_broken_config_tears_down_from_the_state(container: Container) -> None:
    # The container's network namespace may inherit the host's values: this host does not forward.
    container.sh("sysctl -qw net.ipv4.ip_forward=0 net.ipv6.conf.all.forwarding=0")
    forwarding = container.sh("sysctl -n net.ipv4.ip_forward net.ipv6.conf.all.forwarding")
    assert forwarding.split() == ["0", "0"]
    start_gateway(container)
    assert container.sh("sysctl -n net.ipv4.ip_forward").strip() == "1"
    container.write(CONFIG, "name: [not, a, name\n", "0640")
    removal = container.run("dpkg", "--remove", "gatewayd", timeout=120)
    assert "the config is unusable" in removal.stderr
    assert container.run("pidof", "wireguard-go", check=False).stdout == ""
    assert container.run("ip", "link", "show", "egress0", check=False).returncode != 0
    assert not has_table(container) and egress_ips(container) == set()
    assert container.sh("sysctl -n net.ipv4.ip_forward net.ipv6.conf.all.forwarding"
                        ) == forwarding


def test_remove_stops_and_tears_down_purge_removes_state(container: Container) -> None:
    start_gateway(container)
    container.run("dpkg", "--remove", "gatewayd", timeout=120)
    assert container.run("pgrep", "-f", "gatewayd agent", check=False).stdout == ""
    assert container.run("pidof", "wireguard-go", check=False).stdout == ""
    assert container.systemctl("is-active", UNIT, check=False).stdout.strip() != "active"
    assert not has_table(container) and egress_ips(container) == set()
    # Removal keeps the configuration and state; purge removes them.
    assert container.sh("ls /var/lib/gatewayd /etc/gatewayd").strip() != ""

    container.run("dpkg", "--purge", "gatewayd", timeout=120)
    leftovers = container.sh(
        "ls -d /var/lib/gatewayd /etc/gatewayd /opt/gatewayd /lib/systemd/system/gatewayd.service"
        " /etc/systemd/system/multi-user.target.wants/gatewayd.service 2>/dev/null; true")
    assert leftovers == ""
    assert "gatewayd" not in container.systemctl("list-units", "--all", "--no-legend").stdout
