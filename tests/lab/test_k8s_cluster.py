"""End to end in Kubernetes mode: the fake API server, the controller, two gateways (agents)
and two cloud nodes (steer) in the lab's namespaces, with real traffic.

The controller and steer run from the container image's root file system
(scripts/build-image, unpacked; see gatewayd/lab/image.py), the agents from this tree, as the
.deb ships them.

A policy created through the API gives the selected pods their egress IP; a gateway that
loses power (or its network) is replaced by the standby within a second, with the SAME egress
IP, which is never held by both gateways at once; its return does not take traffic back; the
controller's plans converge to what the nodes chose; unselected pods never notice; an API
server outage changes nothing. Failover times are printed here and measured in
bench/bench_failover.py; tests assert no timings.

GATEWAYD_LAB_API_OUTAGE_SECONDS sets the API outage (default 10; the bench/README documents
the 60 s run).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from fakecluster.fakeapi import FakeApiServer
from fakecluster.fakeauth import MANIFESTS, ClusterAuth, LabIdentities
from kubernetes.client.exceptions import ApiException

from gatewayd.clusterlink import CustomObject
from gatewayd.kube.client import client_from_kubeconfig
from gatewayd.lab.holder import Held, read_held
from gatewayd.lab.image import ImageRoot
from gatewayd.lab.kubelab import (
    CONTROLLER_HEALTH_PORT,
    EgressIPWatch,
    KubeLab,
    daemon_events,
    holding,
    kube_lab_session,
    pinging,
    policy_status,
)
from gatewayd.lab.netns import entered, run, wait_for
from gatewayd.lab.observe import has_address
from gatewayd.lab.pinger import Attempt, join_host_port, outage, read_attempts
from gatewayd.lab.scrape import METRICS_PORT, metrics_text, parse_samples, promtool_check, value
from gatewayd.lab.topology import (
    API_SERVER,
    EXAMPLE_SNAPSHOT,
    EXTERNAL,
    GATEWAYS,
    LINE_PORT,
    NODES,
    CloudNode,
    GatewayHost,
    PodHost,
    router_netns,
)
from gatewayd.lab.verify import probe
from gatewayd.probe import PROBE_PORT

pytestmark = pytest.mark.lab

PAYMENT, BATCH, REPORTS = "payment-gateway", "batch-all", "reports-ipv6"
PAYMENT_IP, BATCH_IP, REPORTS_IP6 = "198.51.100.70", "198.51.100.71", "2001:db8:100::72"
CHECKOUT_1, BATCH_1, WEB_1 = NODES[0].pods
CHECKOUT_2, BATCH_2, WEB_2 = NODES[1].pods
PAYMENT_HOST, _, PAYMENT_HOST6, _ = EXTERNAL.addresses
TARGET = join_host_port(PAYMENT_HOST, 8080)
TARGET6 = join_host_port(PAYMENT_HOST6, 8080)
# Each policy with an explicit egress IP that moves with its active gateway.
EGRESS_IPS = {PAYMENT: PAYMENT_IP, BATCH: BATCH_IP, REPORTS: REPORTS_IP6}
NODE_IPS = {NODES[0].name: "192.0.2.21", NODES[1].name: "192.0.2.22"}
HOLD_DOWN = 3.0
# The fast path's timing, scaled up from the product's (3 probes of 0.1 s, 0.4 s hold, 0.1 s
# ARP probe) with the README's rule kept (hold < interval x (misses + 1) + ARP probe): on two
# busy cores, userspace WireGuard and the daemons' threads can be late by more than 0.3 s, and
# the tests that expect nothing to happen must see neither a needless failover nor a gateway
# fencing itself (a CI run saw gw1 drop an egress IP, no probe having arrived for 0.4 s). The
# agents' hand-over outlasts the nodes' detection.
PROBE_INTERVAL = 0.1
PROBE_MISSES = 8
EGRESS_IP_HOLD = 0.8
ARP_PROBE = 0.2
HANDOVER = 2.0
TIMEOUT = 30.0
DIAGNOSTIC_LINES = 40
API_OUTAGE_SECONDS = float(os.environ.get("GATEWAYD_LAB_API_OUTAGE_SECONDS", "10"))


@pytest.fixture(scope="module")
def klab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
         ) -> Iterator[KubeLab]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces)")
    image_root: ImageRoot = request.getfixturevalue("image_root")  # root builds it
    # Every daemon with its own identity, RBAC and admission from packaging/kubernetes; the
    # controller and steer run from the container image, as a cluster runs them.
    fake = FakeApiServer(auth=ClusterAuth())
    with kube_lab_session(tmp_path_factory.mktemp("k8slab"), fake,
                          timing={"hold_down": HOLD_DOWN, "probe_interval": PROBE_INTERVAL,
                                  "probe_misses": PROBE_MISSES, "egress_ip_hold": EGRESS_IP_HOLD,
                                  "arp_probe": ARP_PROBE, "handover": HANDOVER},
                          identities=LabIdentities(fake), image=image_root) as lab:
        for name in ("30-policy-payment-gateway.yaml", "31-policy-batch-all.yaml",
                     "32-policy-reports-ipv6.yaml"):
            lab.create(yaml.safe_load((EXAMPLE_SNAPSHOT / name).read_text()))
        for pod, destination, expected in (
                (CHECKOUT_1, PAYMENT_HOST, PAYMENT_IP), (CHECKOUT_2, PAYMENT_HOST, PAYMENT_IP),
                (BATCH_1, PAYMENT_HOST, BATCH_IP), (BATCH_2, PAYMENT_HOST, BATCH_IP),
                (WEB_1, PAYMENT_HOST6, REPORTS_IP6), (WEB_2, PAYMENT_HOST6, REPORTS_IP6)):
            wait_for(lambda p=pod, d=destination, e=expected: probe(p.netns, d) == e,
                     TIMEOUT, f"{pod.name} to leave with {expected}", interval=0.2)
        yield lab


@pytest.fixture(autouse=True)
def _from_a_settled_cluster(klab: KubeLab, request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts from the steady state, whatever the one before left behind. A failed
    test shows what the daemons warned about and which events they logged meanwhile: a CI
    run's lab is gone when its output is read."""
    settled(klab)
    logs = [klab.directory / "controller.log"] + [
        klab.log_path(host.name) for host in (*GATEWAYS, *NODES)]
    sizes = {path: path.stat().st_size if path.exists() else 0 for path in logs}
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for path, size in sizes.items():
            with path.open(errors="replace") as log:
                log.seek(size)
                said = [line for line in log if "[event=" in line or " WARNING " in line]
            print(f"--- {path.parent.name}/{path.name}: events and warnings during the test "
                  f"({len(said)}, the last {DIAGNOSTIC_LINES}) ---")
            print("".join(said[-DIAGNOSTIC_LINES:]), end="")


def active(lab: KubeLab, policy: str) -> str | None:
    return next((g["name"] for g in policy_status(lab, policy).get("gateways", [])
                 if g["role"] == "active"), None)


def roles(lab: KubeLab, policy: str) -> set[tuple[str, str]]:
    return {(g["name"], g["role"]) for g in policy_status(lab, policy).get("gateways", [])}


def node_routes(lab: KubeLab, node: str, policy: str) -> set[tuple[str | None, str | None]]:
    rules = (lab.object("egressnodes", node).get("spec") or {}).get("rules", [])
    return {(r.get("gateway"), r.get("standby")) for r in rules if r["policy"] == policy}


def reachable(lab: KubeLab, node: str) -> dict[str, bool]:
    status = lab.object("egressnodes", node).get("status") or {}
    return {g["name"]: g["reachable"] for g in status.get("gateways", [])}


def gateway_host(name: str) -> GatewayHost:
    return next(g for g in GATEWAYS if g.name == name)


def events(lab: KubeLab, reason: str) -> list[dict[str, Any]]:
    return [e for e in lab.api.list("events.events.k8s.io") if e.get("reason") == reason]


def occurrences(lab: KubeLab, reason: str) -> int:
    """How often Events of `reason` happened: repeats are counted in an Event's series."""
    return sum(int((e.get("series") or {}).get("count", 1)) for e in events(lab, reason))


def planned_failovers(lab: KubeLab) -> float:
    """The controller's count of the times it moved a policy off a gateway, at once (an
    Event's series is written up to 30 s after a repeat)."""
    samples = parse_samples(metrics_text(API_SERVER.netns, CONTROLLER_HEALTH_PORT))
    return sum(v for (name, labels), v in samples.items()
               if name == "gatewayd_failovers_total" and ("kind", "planned") in labels)


def test_a_policy_created_through_the_api_gives_selected_pods_the_egress_ip(
    klab: KubeLab,
) -> None:
    assert roles(klab, PAYMENT) == {("gw1", "active"), ("gw2", "standby")}
    assert policy_status(klab, PAYMENT)["selectedPods"] == 2
    ready = next(c for c in policy_status(klab, PAYMENT)["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    # unselected pods, excluded and cluster-internal destinations leave with the node's IP
    assert probe(WEB_1.netns, EXTERNAL.addresses[0]) == NODE_IPS[NODES[0].name]
    assert probe(BATCH_1.netns, EXTERNAL.addresses[1]) == NODE_IPS[NODES[0].name]
    assert probe(BATCH_2.netns, "198.51.100.6") == NODE_IPS[NODES[1].name]
    # the active gateway holds both egress IPs, the standby none, and reports them (the
    # status is written after the addresses change)
    wait_for(lambda: has_address(GATEWAYS[0].netns, "eth0", PAYMENT_IP)
             and not has_address(GATEWAYS[1].netns, "eth0", PAYMENT_IP), TIMEOUT,
             "gw1 alone to hold the payment egress IP")
    wait_for(lambda: sorted(klab.object("egressgateways", "gw1")["status"]["egressIPs"])
             == [PAYMENT_IP, BATCH_IP, REPORTS_IP6], TIMEOUT, "gw1 to report its egress IPs")
    # a policy with destinations of both families and an IPv4 egressIP: IPv6 traffic leaves
    # with the IPv6 address of the egress IP's interface, IPv4 is not black-holed
    for pod in (CHECKOUT_1, CHECKOUT_2):
        assert probe(pod.netns, PAYMENT_HOST) == PAYMENT_IP
        assert probe(pod.netns, PAYMENT_HOST6) == GATEWAYS[0].address6


def test_the_controller_and_steer_run_from_the_image(klab: KubeLab, image_root: ImageRoot
                                                    ) -> None:
    """What the other tests prove, they prove of the image: its root file system, its
    entrypoint, and the controller under the image's user (not root)."""
    def process(pid: int | None) -> tuple[str, str, str]:
        assert pid is not None
        status = Path(f"/proc/{pid}/status").read_text()
        uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return os.readlink(f"/proc/{pid}/root"), uid, command[1].decode()

    root, entrypoint = str(image_root.root), image_root.entrypoint[0]
    assert process(klab.controller_pid) == (root, image_root.user.split(":")[0], entrypoint)
    for node in NODES:
        assert process(klab.daemon_pid(node.name)) == (root, "0", entrypoint)


def check_failover(lab: KubeLab, power_loss: bool, directory: Path) -> None:
    """Cut the payment policy's active gateway; the standby takes over with the same egress
    IPs; bring the gateway back; nothing flaps; the controller converges."""
    old = active(lab, PAYMENT)
    assert old is not None and active(lab, BATCH) == old and active(lab, REPORTS) == old
    new = next(g.name for g in GATEWAYS if g.name != old)
    with ExitStack() as stack:
        watch = stack.enter_context(EgressIPWatch(EGRESS_IPS.values()))
        files = {
            pod.name: stack.enter_context(pinging(pod.netns, target, directory / pod.name))
            for pod, target in ((CHECKOUT_1, TARGET), (BATCH_2, TARGET), (WEB_1, TARGET),
                                (WEB_2, TARGET6))
        }
        time.sleep(1.0)  # a stretch of normal traffic first
        cut = lab.cut(gateway_host(old), power_loss=power_loss)
        # a connection attempt under way at the failure: its first SYN goes to the dead
        # gateway; a retransmission must complete it through the standby
        pending = subprocess.Popen(
            ["ip", "netns", "exec", CHECKOUT_2.netns, "curl", "-sS", "--max-time", "8",
             f"http://{TARGET}/"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def answered_after(pod: str) -> bool:
            return any(a.ok and a.start > cut for a in read_attempts(files[pod]))

        for pod in (CHECKOUT_1, BATCH_2, WEB_2):
            wait_for(lambda p=pod.name: answered_after(p), TIMEOUT,
                     f"{pod.name}'s traffic to come back")
        # the slow path: the controller promotes the standby, the nodes' plans follow
        wait_for(lambda: all(active(lab, policy) == new for policy in EGRESS_IPS), TIMEOUT,
                 "the controller to promote the standby")
        for node in NODES:
            wait_for(lambda n=node.name: {g for g, _ in node_routes(lab, n, PAYMENT)} == {new},
                     TIMEOUT, f"{node.name}'s plan to send {PAYMENT} to {new}")
        lab.restore(gateway_host(old))
        print(f"{old} restored {time.time() - cut:.3f}s after the cut")
        # every node reaches it again (after a power loss it has lost its WireGuard sessions)
        for node in NODES:
            wait_for(lambda n=node.name: reachable(lab, n).get(old) is True, TIMEOUT,
                     f"{node.name} to reach {old} again")
        # back, healthy for the hold-down: the standby of the steady state, not the active
        wait_for(lambda: roles(lab, PAYMENT) == {(new, "active"), (old, "standby")},
                 TIMEOUT, f"{old} to become the standby")
        for node in NODES:
            wait_for(lambda n=node.name: node_routes(lab, n, PAYMENT) == {(new, old)},
                     TIMEOUT, f"{node.name}'s plan to name {old} as the standby")
        time.sleep(1.0)  # traffic after the steady state is reached
        attempts = {pod: read_attempts(path) for pod, path in files.items()}
        answer, error = pending.communicate(timeout=10)
        assert answer == PAYMENT_IP, f"curl started at the cut: {error.strip()}"

    for client, expected in ((CHECKOUT_1.name, PAYMENT_IP), (BATCH_2.name, BATCH_IP),
                             (WEB_2.name, REPORTS_IP6)):
        gap = outage(attempts[client], cut)
        assert gap is not None, f"{client}: no answer after the cut"
        print(f"{client}: {'power loss' if power_loss else 'partition'} of {old}: no answers "
              f"for {gap.seconds:.3f}s ({gap.failed} requests failed)")
        # requests in flight while traffic resumed may fail; none that start afterwards
        after = [a for a in attempts[client] if a.start >= gap.first_after.end]
        # the SAME egress IP through the standby, and no flap when the gateway returned
        assert {a.source for a in attempts[client] if a.ok} == {expected}
        assert all(a.ok for a in after), f"{client}: {failures(after, cut)}"
    web: list[Attempt] = attempts[WEB_1.name]
    assert web and all(a.ok and a.source == NODE_IPS[NODES[0].name] for a in web), \
        failures(web, cut)
    assert watch.checks > 1 and watch.overlaps == [], watch.overlaps[:5]
    for egress_ip in (PAYMENT_IP, REPORTS_IP6):
        assert has_address(gateway_host(new).netns, "eth0", egress_ip)
        assert not has_address(gateway_host(old).netns, "eth0", egress_ip)


def failures(attempts: list[Attempt], since: float) -> str:
    bad = [f"{a.start - since:+.3f}s ({a.error}, {a.end - a.start:.3f}s)"
           for a in attempts if not a.ok]
    return f"{len(bad)} of {len(attempts)} failed, started at {', '.join(bad[:10])}"


def test_power_loss_of_the_active_gateway(klab: KubeLab, tmp_path: Path) -> None:
    started = occurrences(klab, "FastFailover")
    check_failover(klab, power_loss=True, directory=tmp_path)
    # the nodes moved the traffic themselves, before the controller, and said so (a repeat
    # of an Event is counted in its series, written at most every 30 s)
    wait_for(lambda: occurrences(klab, "FastFailover") > started, 2 * TIMEOUT,
             "a FastFailover Event")


def test_network_partition_of_the_active_gateway(klab: KubeLab, tmp_path: Path) -> None:
    check_failover(klab, power_loss=False, directory=tmp_path)


def carrying(lab: KubeLab) -> str:
    """The gateway that carries the payment policy's traffic now: the one holding its egress
    IP (cutting it cuts the traffic)."""
    holders: list[str] = []

    def one_holder() -> bool:
        holders[:] = [g.name for g in GATEWAYS if has_address(g.netns, "eth0", PAYMENT_IP)]
        return len(holders) == 1

    wait_for(one_holder, TIMEOUT, f"one gateway to hold {PAYMENT_IP}")
    return holders[0]


def broken(held: list[Held]) -> str:
    return "; ".join(f"{h.kind} connection {h.index} (port {h.local_port}): {h.error}, last echo "
                     f"{h.last_echo:.3f}" for h in held if h.error) or "none broken"


@pytest.mark.parametrize("power_loss", [True, False], ids=["power-loss", "partition"])
def test_connections_held_open_survive_a_failover(
    klab: KubeLab, tmp_path: Path, power_loss: bool,
) -> None:
    """Long-lived connections through the active gateway (a line echo every 50 ms, and an
    HTTP download) go on through the standby while the failed gateway is still down: the
    standby has their state (the gateways' conntrack sync) and the nodes give them the
    standby's mark."""
    old = carrying(klab)
    new = next(g.name for g in GATEWAYS if g.name != old)
    target = f"{EXTERNAL.addresses[0]}:{LINE_PORT}"
    with holding(CHECKOUT_1.netns, target, tmp_path / "held.json", connections=5,
                 download=TARGET) as path:
        wait_for(lambda: synced_connections(gateway_host(new).netns, CHECKOUT_1.address,
                                            EXTERNAL.addresses[0]) >= 5
                 and synced_connections(gateway_host(new).netns, CHECKOUT_1.address,
                                        EXTERNAL.addresses[0], 8080) >= 1,
                 TIMEOUT, f"{new}'s kernel to have the connections' state (conntrack sync)")
        cut = klab.cut(gateway_host(old), power_loss=power_loss)

        def all_echo_again_or_one_broke() -> bool:
            held = read_held(path)
            return any(h.error for h in held) or all(h.last_echo > cut + 0.5 for h in held)

        try:
            wait_for(all_echo_again_or_one_broke, TIMEOUT,
                     f"the connections to echo again through {new}")
            held = read_held(path)
        finally:
            klab.restore(gateway_host(old))
        wait_for(lambda: roles(klab, PAYMENT) == {(new, "active"), (old, "standby")},
                 TIMEOUT, f"{old} to become the standby")
        time.sleep(1.0)  # the connections after the steady state is reached
        after = read_held(path)
    assert not any(h.error for h in held), broken(held)
    assert {h.source for h in held} == {PAYMENT_IP}
    assert [h.kind for h in held].count("download") == 1
    assert not any(h.error for h in after), broken(after)
    for h in after:
        print(f"{h.kind} connection {h.index}: {h.echoes} echoes, longest stall "
              f"{h.longest_gap:.3f}s from {h.gap_from - cut:+.3f}s")


def synced_connections(netns: str, source: str, destination: str, port: int = LINE_PORT
                       ) -> int:
    """Established TCP connections from `source` to `destination`'s `port` that the kernel
    in `netns` has an entry for."""
    listed = run(["conntrack", "-L", "-p", "tcp", "-s", source, "-d", destination,
                  "--dport", str(port)], netns, check=False).stdout
    return sum("ESTABLISHED" in line for line in listed.splitlines())


def conntrack_id(netns: str, flow: list[str]) -> str | None:
    """The id of the kernel's entry for `flow` in `netns`, or None."""
    listed = run(["conntrack", "-L", *flow, "-o", "id"], netns, check=False).stdout
    found = re.search(r"\bid=(\d+)", listed)
    return found.group(1) if found else None


def synced(source: str, destination: str, flow: list[str]) -> None:
    """Everything `source`'s conntrackd sent before now has reached `destination`: a new entry
    made in `source`, then its end, both arrive there in order."""
    run(["conntrack", "-I", *flow, "--state", "ESTABLISHED", "--timeout", "60"], source)
    wait_for(lambda: conntrack_id(destination, flow) is not None, TIMEOUT,
             f"a new entry in {source} to be synced to {destination}")
    run(["conntrack", "-D", *flow], source)
    wait_for(lambda: conntrack_id(destination, flow) is None, TIMEOUT,
             f"its end to be synced to {destination}")


def connect_from(pod: PodHost, server: str, port: int, local_port: int) -> socket.socket:
    """A TCP connection from `pod`'s `local_port`."""
    with entered(pod.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((pod.address, local_port))
    sock.connect((server, port))
    return sock


def http_answer(sock: socket.socket) -> str:
    """Send a request and read the answer until the server closes: its end closes first, so
    this side leaves no TIME_WAIT and the port can be used again at once."""
    with sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return b"".join(iter(lambda: sock.recv(4096), b"")).decode(errors="replace")


def start_as_standby(lab: KubeLab, stopped: str, active_now: str) -> None:
    """Start a stopped gateway's agent; it becomes the standby of the gateway now active."""
    started = time.time()
    lab.start_daemon(stopped)
    lab.wait_ready([stopped], since=started)
    wait_for(lambda: roles(lab, PAYMENT) == {(active_now, "active"), (stopped, "standby")},
             TIMEOUT, f"{stopped} to become the standby")


def test_a_stale_copy_of_a_flow_does_not_end_a_new_connection_on_the_new_gateway(
    klab: KubeLab,
) -> None:
    """The gateways share connection state, and a gateway that gave an egress IP up keeps its
    kernel's entries for the flows it carried. When one of them ends there (TIME_WAIT runs out
    after 2 minutes; here it is deleted), the gateway that carries the policy now must keep a
    connection that reuses the same addresses and ports, as a client that reuses its source
    port makes. Seen before the fix: that end was synced, deleted the new connection's entry,
    and its SYN-ACK was dropped."""
    old = active(klab, PAYMENT)
    assert old is not None
    new = next(g.name for g in GATEWAYS if g.name != old)
    server, port = EXTERNAL.addresses[0], 47123
    flow = ["-p", "tcp", "-s", CHECKOUT_1.address, "-d", server, "--sport", str(port),
            "--dport", "8080"]
    old_netns, new_netns = gateway_host(old).netns, gateway_host(new).netns
    assert PAYMENT_IP in http_answer(connect_from(CHECKOUT_1, server, 8080, port))
    wait_for(lambda: conntrack_id(new_netns, flow) is not None, TIMEOUT,
             f"{new} to have the flow from the sync")
    # The policy moves to the standby: `systemctl restart` of the active gateway's agent.
    assert klab.stop_daemon(old, signal.SIGTERM) == 0
    wait_for(lambda: active(klab, PAYMENT) == new, TIMEOUT, "the controller to promote")
    start_as_standby(klab, old, new)
    client = connect_from(CHECKOUT_1, server, 8080, port)
    carried = conntrack_id(new_netns, flow)
    assert carried is not None
    run(["conntrack", "-D", *flow], old_netns)  # the old gateway's copy ends
    synced(old_netns, new_netns, ["-p", "tcp", "-s", CHECKOUT_1.address, "-d", server,
                                  "--sport", str(port + 1), "--dport", "8080"])
    assert conntrack_id(new_netns, flow) == carried
    answer = http_answer(client)
    assert PAYMENT_IP in answer, answer


def test_stopping_the_active_agent_hands_its_traffic_and_egress_ip_over(
    klab: KubeLab, tmp_path: Path,
) -> None:
    """`systemctl stop` on the active gateway: it writes Ready=False and answers probes
    saying it is leaving; the nodes move to the standby, the stopping agent gives the egress
    IP up and the standby claims it; started again, the gateway becomes the standby.
    Connections held open through it all the while go on (a `systemctl restart` or a package
    upgrade)."""
    old = active(klab, PAYMENT)
    assert old is not None
    new = next(g.name for g in GATEWAYS if g.name != old)
    with ExitStack() as stack:
        watch = stack.enter_context(EgressIPWatch(EGRESS_IPS.values()))
        held_path = stack.enter_context(holding(
            CHECKOUT_1.netns, f"{EXTERNAL.addresses[0]}:{LINE_PORT}", tmp_path / "held.json",
            connections=5, download=TARGET))
        files = {pod.name: stack.enter_context(pinging(pod.netns, TARGET, tmp_path / pod.name))
                 for pod in (CHECKOUT_1, WEB_1)}
        time.sleep(1.0)  # a stretch of normal traffic first
        stopped = time.time()
        assert klab.stop_daemon(old, signal.SIGTERM) == 0
        print(f"agent of {old} stopped in {time.time() - stopped:.3f}s")
        wait_for(lambda: any(a.ok and a.start > stopped
                             for a in read_attempts(files[CHECKOUT_1.name])),
                 TIMEOUT, "checkout-1's traffic to come back")
        assert not has_address(gateway_host(old).netns, "eth0", PAYMENT_IP)
        wait_for(lambda: active(klab, PAYMENT) == new, TIMEOUT, "the controller to promote")
        start_as_standby(klab, old, new)
        time.sleep(1.0)  # traffic after the steady state is reached
        attempts = {pod: read_attempts(path) for pod, path in files.items()}
        held = read_held(held_path)
    assert not any(h.error for h in held), broken(held)
    checkout = attempts[CHECKOUT_1.name]
    # the stopping agent serves until the nodes move: the gap starts at the first failure
    failed = [a for a in checkout if not a.ok and a.start >= stopped]
    gap = outage(checkout, failed[0].start if failed else stopped)
    assert gap is not None, "no answer after the stop"
    print(f"{CHECKOUT_1.name}: agent of {old} stopped: no answers for {gap.seconds:.3f}s "
          f"({gap.failed} requests failed)")
    after = [a for a in checkout if a.start >= gap.first_after.end]
    assert {a.source for a in checkout if a.ok} == {PAYMENT_IP}
    assert all(a.ok for a in after), failures(after, stopped)
    web = attempts[WEB_1.name]
    assert web and all(a.ok for a in web), failures(web, stopped)
    assert watch.overlaps == [], watch.overlaps[:5]
    assert has_address(gateway_host(new).netns, "eth0", PAYMENT_IP)


def node_applied(lab: KubeLab, node: str) -> bool:
    obj = lab.object("egressnodes", node)
    return (obj.get("status") or {}).get("observedGeneration") == \
        (obj.get("metadata") or {}).get("generation")


def test_a_policy_moved_by_the_controller_takes_unanswered_handshakes_along(
    klab: KubeLab,
) -> None:
    """A connection attempt the active gateway never answered keeps its conntrack mark on the
    node. When the controller moves the policy to the other gateway (no failover: both are
    healthy), a client that tries again from the same source port must reach the new one."""
    old = active(klab, PAYMENT)
    assert old is not None
    new = next(g.name for g in GATEWAYS if g.name != old)
    port = 40123
    hold = (f"table inet gwdlab-hold {{\n chain forward {{ type filter hook forward priority "
            f"-10; ip saddr {CHECKOUT_1.address} tcp dport 8080 drop; }}\n}}\n")
    policy = klab.api.get("egressgatewaypolicies", PAYMENT)
    only_new = {**policy, "spec": {**policy["spec"], "egressGateway": {
        **policy["spec"]["egressGateway"],
        "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": new}}}}}
    run(["nft", "-f", "-"], gateway_host(old).netns, input=hold)
    try:
        # its SYN goes unanswered
        assert probe(CHECKOUT_1.netns, EXTERNAL.addresses[0], local_port=port, seconds=1) is None
        klab.api.put(only_new)
        wait_for(lambda: node_routes(klab, NODES[0].name, PAYMENT) == {(new, None)}
                 and node_applied(klab, NODES[0].name), TIMEOUT,
                 f"{NODES[0].name} to send {PAYMENT} to {new} only")
        wait_for(lambda: has_address(gateway_host(new).netns, "eth0", PAYMENT_IP), TIMEOUT,
                 f"{new} to claim {PAYMENT_IP}")
        assert probe(CHECKOUT_1.netns, EXTERNAL.addresses[0], local_port=port) == PAYMENT_IP
    finally:
        run(["nft", "delete", "table", "inet", "gwdlab-hold"], gateway_host(old).netns)
        klab.api.put({**klab.api.get("egressgatewaypolicies", PAYMENT),
                      "spec": policy["spec"]})
    wait_for(lambda: roles(klab, PAYMENT) == {(new, "active"), (old, "standby")}, TIMEOUT,
             "the policy to have both gateways again")


def steer_mark(node: CloudNode, gateway: str) -> str:
    """The conntrack mark (value/mask, as conntrack(8) takes it) steer gives connections
    through `gateway` on `node`, read from its table."""
    listing = run(["nft", "list", "chain", "inet", "gatewayd-steer", "prerouting"],
                  node.netns).stdout
    for line in listing.splitlines():
        if f'comment "established via {gateway}"' in line:
            found = re.search(r"ct mark & (0x[0-9a-f]+) == (0x[0-9a-f]+)", line)
            if found:
                return f"{int(found[2], 16):#x}/{int(found[1], 16):#x}"
    raise AssertionError(f"no mark for {gateway} in {node}'s steer table:\n{listing}")


def test_an_unanswered_connection_left_on_the_failed_gateway_goes_to_the_standby(
    klab: KubeLab,
) -> None:
    """A SYN marked for the active gateway just before the nodes fail it over can leave a
    connection entry with the dead gateway's mark and no reply (the race between the
    failover and its cleanup). A client that retries it, or reuses its port while it lives
    (2 minutes), must reach the standby, not the dead gateway."""
    old = carrying(klab)
    new = next(g.name for g in GATEWAYS if g.name != old)
    port = 40125
    mark = steer_mark(NODES[0], old)
    cut = klab.cut(gateway_host(old), power_loss=True)
    try:
        wait_for(lambda: probe(CHECKOUT_1.netns, EXTERNAL.addresses[0]) == PAYMENT_IP, TIMEOUT,
                 f"checkout-1 to leave through {new}", interval=0.2)
        # what the race leaves behind: unanswered, marked for the dead gateway (replacing
        # an entry a client that picked the same port at random may have left)
        flow = ["-p", "tcp", "-s", CHECKOUT_1.address, "-d", EXTERNAL.addresses[0],
                "--sport", str(port), "--dport", "8080"]
        run(["conntrack", "-D", *flow], NODES[0].netns, check=False)
        run(["conntrack", "-I", *flow, "--state", "SYN_SENT", "--timeout", "120",
             "--mark", mark], NODES[0].netns)
        answer = probe(CHECKOUT_1.netns, EXTERNAL.addresses[0], local_port=port, seconds=3)
        # the slow path too, before the gateway returns (as after a real failure)
        wait_for(lambda: active(klab, PAYMENT) == new, TIMEOUT,
                 "the controller to promote the standby")
    finally:
        klab.restore(gateway_host(old))
    print(f"{old} powered off {time.time() - cut:.1f}s")
    wait_for(lambda: roles(klab, PAYMENT) == {(new, "active"), (old, "standby")}, TIMEOUT,
             f"{old} to become the standby")
    assert answer == PAYMENT_IP, f"a connection from port {port} got {answer!r}"


def node_failovers(lab: KubeLab, node: str) -> set[tuple[str, str, str]]:
    status = lab.object("egressnodes", node).get("status") or {}
    return {(f["policy"], f["from"], f["to"]) for f in status.get("failovers", [])}


def test_a_node_that_cannot_reach_the_active_gateway_never_makes_two_holders(
    klab: KubeLab, tmp_path: Path,
) -> None:
    """node1 loses its path to the active gateway, node2 does not: node1 moves to the
    standby, whose ARP probe finds the active still holding the egress IP, so it does not take
    it (node1's connections for the policy fail meanwhile: the documented price). node2 never
    notices; once node1's path is back, node1 returns to the active gateway."""
    old = active(klab, PAYMENT)
    assert old is not None
    standby = next(g.name for g in GATEWAYS if g.name != old)
    blocked = gateway_host(old)
    block = (f"table inet gwdlab-block {{\n chain output {{ type filter hook output priority 0; "
             f"ip daddr {blocked.address} udp dport 51820 drop; }}\n}}\n")
    with ExitStack() as stack:
        watch = stack.enter_context(EgressIPWatch(EGRESS_IPS.values()))
        other = stack.enter_context(pinging(CHECKOUT_2.netns, TARGET, tmp_path / "checkout-2"))
        run(["nft", "-f", "-"], NODES[0].netns, input=block)
        try:
            wait_for(lambda: (PAYMENT, old, standby) in node_failovers(klab, NODES[0].name),
                     TIMEOUT, f"{NODES[0].name} to move {PAYMENT} to {standby}")
            time.sleep(3.0)  # longer than the standby's grace to claim the address
            assert has_address(blocked.netns, "eth0", PAYMENT_IP)
            assert not has_address(gateway_host(standby).netns, "eth0", PAYMENT_IP)
            assert node_failovers(klab, NODES[1].name) == set()
        finally:
            run(["nft", "delete", "table", "inet", "gwdlab-block"], NODES[0].netns)
        wait_for(lambda: node_failovers(klab, NODES[0].name) == set(), TIMEOUT,
                 f"{NODES[0].name} to return to {old}")
        wait_for(lambda: probe(CHECKOUT_1.netns, EXTERNAL.addresses[0]) == PAYMENT_IP,
                 TIMEOUT, "checkout-1's traffic to come back")
        time.sleep(0.5)
        attempts = read_attempts(other)
    assert attempts and all(a.ok and a.source == PAYMENT_IP for a in attempts), \
        failures(attempts, attempts[0].start)
    assert watch.overlaps == [], watch.overlaps[:5]
    assert active(klab, PAYMENT) == old  # the controller saw a healthy gateway throughout


def test_a_failover_every_node_made_becomes_the_controllers_plan(
    klab: KubeLab, tmp_path: Path,
) -> None:
    """The active gateway's probes are lost on the way in: every node moves to the standby,
    though the controller sees a healthy gateway (its Lease is renewed). The nodes never move
    back on their own, so the controller makes the standby active; the cluster settles with
    the roles swapped and no failover left."""
    old = active(klab, PAYMENT)
    assert old is not None
    new = next(g.name for g in GATEWAYS if g.name != old)
    lose_probes = (f"table inet gwdlab-block {{\n chain input {{ type filter hook input "
                   f"priority 0; udp dport {PROBE_PORT} drop; }}\n}}\n")
    with EgressIPWatch(EGRESS_IPS.values()) as watch:
        run(["nft", "-f", "-"], gateway_host(old).netns, input=lose_probes)
        try:
            wait_for(lambda: all((PAYMENT, old, new) in node_failovers(klab, n.name)
                                 for n in NODES), TIMEOUT, f"every node to move {PAYMENT}")
            wait_for(lambda: active(klab, PAYMENT) == new, TIMEOUT,
                     f"the controller to make {new} active")
        finally:
            run(["nft", "delete", "table", "inet", "gwdlab-block"], gateway_host(old).netns)
        settled(klab)
        assert roles(klab, PAYMENT) == {(new, "active"), (old, "standby")}
    assert watch.overlaps == [], watch.overlaps[:5]


def test_gateways_that_cannot_see_each_other_change_nothing(
    klab: KubeLab, tmp_path: Path,
) -> None:
    before = roles(klab, PAYMENT)
    isolate = ("table bridge gwdlab-l2 {\n chain forward { type filter hook forward priority 0; "
               'iifname "gw1" oifname "gw2" drop; iifname "gw2" oifname "gw1" drop; }\n}\n')
    with ExitStack() as stack:
        watch = stack.enter_context(EgressIPWatch(EGRESS_IPS.values()))
        files = {pod.name: stack.enter_context(pinging(pod.netns, TARGET, tmp_path / pod.name))
                 for pod in (CHECKOUT_1, BATCH_2)}
        run(["nft", "-f", "-"], router_netns(), input=isolate)
        try:
            time.sleep(5.0)
        finally:
            run(["nft", "delete", "table", "bridge", "gwdlab-l2"], router_netns())
        attempts = {pod: read_attempts(path) for pod, path in files.items()}
    for pod, found in attempts.items():
        assert found and all(a.ok for a in found), f"{pod}: {failures(found, found[0].start)}"
    assert watch.overlaps == [] and roles(klab, PAYMENT) == before
    assert all(node_failovers(klab, n.name) == set() for n in NODES)


def test_an_active_agent_kept_off_the_cpu_changes_nothing(klab: KubeLab, tmp_path: Path) -> None:
    """The active gateway's agent is stopped (SIGSTOP), as on a host too busy to run it, for
    twice as long as the nodes give a silent gateway and as the gateway holds an egress IP
    without probes. Its responder process answers meanwhile, and the agent then decides on when
    the probes came: no node fails over, the egress IP stays, and no request fails."""
    old = carrying(klab)
    pid = klab.daemon_pid(old)
    assert pid is not None
    hosts = [g.name for g in GATEWAYS] + [n.name for n in NODES]
    counted = {(h, e): daemon_events(klab, h, e) for h in hosts
               for e in ("failover", "egress-ip-removed", "egress-ip-added")}
    with ExitStack() as stack:
        watch = stack.enter_context(EgressIPWatch(EGRESS_IPS.values()))
        files = {pod.name: stack.enter_context(pinging(pod.netns, TARGET, tmp_path / pod.name))
                 for pod in (CHECKOUT_1, CHECKOUT_2)}
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(2 * max(PROBE_INTERVAL * PROBE_MISSES, EGRESS_IP_HOLD))
        finally:
            os.kill(pid, signal.SIGCONT)
        time.sleep(1.0)  # long enough for what the agent does once it runs again to show
        attempts = {pod: read_attempts(path) for pod, path in files.items()}
    for pod, found in attempts.items():
        assert found and all(a.ok for a in found), f"{pod}: {failures(found, found[0].start)}"
    assert {(h, e): daemon_events(klab, h, e) for h, e in counted} == counted
    assert watch.overlaps == [] and has_address(gateway_host(old).netns, "eth0", PAYMENT_IP)


def test_an_api_server_outage_changes_nothing(klab: KubeLab, tmp_path: Path) -> None:
    hosts = [g.name for g in GATEWAYS] + [n.name for n in NODES]
    programmed = {h: daemon_events(klab, h, "plan-applied") for h in hosts}
    before = {p: roles(klab, p) for p in (PAYMENT, BATCH)}
    with ExitStack() as stack:
        files = {
            pod.name: stack.enter_context(pinging(pod.netns, TARGET, tmp_path / pod.name))
            for pod in (CHECKOUT_1, BATCH_2, WEB_2)
        }
        klab.api_down()
        down_at = time.time()
        try:
            time.sleep(API_OUTAGE_SECONDS)
        finally:
            klab.api_up()
        # the agents renew their Leases again; the controller sees a healthy cluster
        wait_for(lambda: all(_renewed_since(klab, g.name, down_at + API_OUTAGE_SECONDS)
                             for g in GATEWAYS), TIMEOUT, "the Leases to be renewed")
        time.sleep(HOLD_DOWN + 2)  # long enough for a needless move to show
        attempts = {pod: read_attempts(path) for pod, path in files.items()}
    for pod, found in attempts.items():
        assert found and all(a.ok for a in found), f"{pod}: {failures(found, down_at)}"
    assert {p: roles(klab, p) for p in (PAYMENT, BATCH)} == before
    assert {h: daemon_events(klab, h, "plan-applied") for h in hosts} == programmed
    print(f"API server down {API_OUTAGE_SECONDS:.0f}s: "
          f"{sum(len(a) for a in attempts.values())} requests, all answered")


def _renewed_since(lab: KubeLab, gateway: str, moment: float) -> bool:
    lease = lab.api.get("leases", f"egressgateway-{gateway}", "gatewayd-system") or {}
    renewed = (lease.get("spec") or {}).get("renewTime")
    return renewed is not None and datetime.fromisoformat(renewed).timestamp() > moment


# --- gateways whose clocks run off ---------------------------------------------------------------

# gw1's clock runs 30 s behind, gw2's 30 s ahead: the fake API server shifts the Lease times
# each writes, by the address it connects from (libfaketime breaks a Python daemon's sleeps).
CLOCK_OFFSETS = {"gw1": -30.0, "gw2": 30.0}
# A failover driven by the Lease takes a lease duration (4 s here) plus a reconcile: well
# under the 30 s by which a Lease judged on the gateway's clock would be late.
LEASE_FAILOVER_TIMEOUT = 20.0


def set_clock_offsets(lab: KubeLab, offsets: dict[str, float]) -> None:
    api = cast(FakeApiServer, lab.api)
    for gateway in GATEWAYS:
        api.set_clock_offset(gateway.address, offsets.get(gateway.name, 0.0))


def settled(lab: KubeLab) -> None:
    """Each policy has one active and one standby gateway, and only the active holds its
    egress IP; every node reaches every gateway and has no failover in force."""
    def steady() -> bool:
        for policy, egress_ip in EGRESS_IPS.items():
            if sorted(r for _, r in roles(lab, policy)) != ["active", "standby"]:
                return False
            holders = {g.name for g in GATEWAYS if has_address(g.netns, "eth0", egress_ip)}
            if holders != {active(lab, policy)}:
                return False
        return all(reachable(lab, n.name) == {g.name: True for g in GATEWAYS}
                   and node_failovers(lab, n.name) == set() for n in NODES)

    try:
        wait_for(steady, TIMEOUT, "the cluster to settle")
    except TimeoutError as error:
        state = {n.name: (reachable(lab, n.name), node_failovers(lab, n.name)) for n in NODES}
        raise AssertionError(f"{error}: roles {[roles(lab, p) for p in EGRESS_IPS]}, "
                             f"nodes {state}") from None


def lease_record(lab: KubeLab, gateway: str) -> dict[str, Any]:
    lease = lab.api.get("leases", f"egressgateway-{gateway}", "gatewayd-system") or {}
    return dict(lease.get("spec") or {})


def renewals(lab: KubeLab, count: int) -> Any:
    """A condition: every gateway's Lease was seen renewed `count` times since it was made."""
    seen: dict[str, list[str]] = {g.name: [] for g in GATEWAYS}

    def renewed() -> bool:
        for gateway, times in seen.items():
            renew_time = lease_record(lab, gateway).get("renewTime")
            if renew_time and (not times or times[-1] != renew_time):
                times.append(renew_time)
        return all(len(times) > count for times in seen.values())

    return renewed


def clock_skew(lab: KubeLab, gateway: str) -> Any:
    return (lab.object("egressgateways", gateway).get("status") or {}).get("clockSkewSeconds")


def test_gateways_whose_clocks_run_off_are_judged_on_the_controllers_clock(
    klab: KubeLab,
) -> None:
    """Both are healthy while they renew their Leases, and each is failed over within a lease
    duration or so after it stops (a power loss)."""
    steady = roles(klab, PAYMENT)
    failovers = planned_failovers(klab)
    try:
        set_clock_offsets(klab, CLOCK_OFFSETS)
        for name, offset in CLOCK_OFFSETS.items():
            wait_for(lambda n=name, o=offset: isinstance(clock_skew(klab, n), int)
                     and abs(clock_skew(klab, n) - o) <= 2, TIMEOUT,
                     f"{name}'s clock skew in its status")
            renew_time = lease_record(klab, name)["renewTime"]
            lag = datetime.fromisoformat(renew_time).timestamp() - time.time()
            assert abs(lag - offset) < 5, f"{name}'s Lease was renewed at {renew_time}"
        wait_for(lambda: {e["regarding"]["name"] for e in events(klab, "ClockSkew")}
                 >= set(CLOCK_OFFSETS), TIMEOUT, "a ClockSkew Warning about each")

        # Healthy while renewing: three lease durations and more, nothing moves.
        wait_for(renewals(klab, 3 * int(klab.timing["lease_duration"])), TIMEOUT,
                 "the Leases to be renewed for three durations")
        assert roles(klab, PAYMENT) == steady
        assert planned_failovers(klab) == failovers

        # Each stops (power loss): the other takes over within the usual time.
        for _ in CLOCK_OFFSETS:
            old = active(klab, PAYMENT)
            assert old is not None
            new = next(g.name for g in GATEWAYS if g.name != old)
            cut = klab.cut(gateway_host(old), power_loss=True)
            wait_for(lambda n=new: active(klab, PAYMENT) == n, LEASE_FAILOVER_TIMEOUT,
                     f"the controller to fail {old} (clock {CLOCK_OFFSETS[old]:+.0f}s) over")
            print(f"{old}, clock {CLOCK_OFFSETS[old]:+.0f}s: failed over by the controller "
                  f"{time.time() - cut:.1f}s after its power loss")
            klab.restore(gateway_host(old))
            settled(klab)
    finally:
        set_clock_offsets(klab, {})


def test_a_steer_daemon_with_its_nodes_credentials_cannot_write_another_node(
    klab: KubeLab,
) -> None:
    """node1's steer credentials (its kubeconfig, with the token projected into its pod)
    write node1's EgressNode and are refused for node2's, from node1's own host."""
    node1, node2 = NODES[0].name, NODES[1].name
    forged = {"publicKey": "A" * 43 + "=", "endpoint": "192.0.2.21:1"}
    with entered(NODES[0].netns):
        api = client_from_kubeconfig(klab.daemon_kubeconfig(node1))
        try:
            own = CustomObject(api, "egressnodes", "EgressNode", node1)
            other = CustomObject(api, "egressnodes", "EgressNode", node2)
            assert own.get() is not None
            with pytest.raises(ApiException) as raised:
                other.patch_status({"publicKey": "A" * 43 + "=", "endpoint": "192.0.2.21:1"})
        finally:
            api.close()
    assert raised.value.status == 403
    assert f"may write only the EgressNode {node1}, not {node2}" in str(raised.value.body)
    # node2's own steer keeps writing its status meanwhile: only the forged values matter
    status = klab.object("egressnodes", node2).get("status") or {}
    assert all(status.get(key) != value for key, value in forged.items())
    assert klab.api.auth is not None
    assert all(node2 in refusal for refusal in klab.api.auth.refusals), \
        "the daemons' own requests were refused"


def test_metrics_count_a_failover_and_the_peer_going_down(klab: KubeLab) -> None:
    """Every daemon's /metrics passes promtool; cutting the active gateway counts a fast
    failover on the nodes and a planned one at the controller, and its peer-up gauge drops."""
    controller = API_SERVER.netns, CONTROLLER_HEALTH_PORT
    daemons = [(g.netns, METRICS_PORT) for g in GATEWAYS] + [(n.netns, METRICS_PORT)
                                                            for n in NODES]
    for netns, port in [*daemons, controller]:
        assert promtool_check(metrics_text(netns, port)) == "", netns
    old = active(klab, PAYMENT)
    assert old is not None
    node = NODES[0]

    def node_value(name: str, **labels: str) -> float:
        return value(parse_samples(metrics_text(node.netns)), name, **labels) or 0.0

    def planned() -> float:
        return value(parse_samples(metrics_text(*controller)), "gatewayd_failovers_total",
                     policy=PAYMENT, gateway=old, kind="planned") or 0.0

    fast = dict(policy=PAYMENT, gateway=old, kind="fast")
    peer = dict(peer=old)
    wait_for(lambda: node_value("gatewayd_wireguard_peer_up", **peer) == 1.0, TIMEOUT,
             f"{old} up on {node.name}")
    fast_before, planned_before = node_value("gatewayd_failovers_total", **fast), planned()
    klab.cut(gateway_host(old))
    try:
        wait_for(lambda: node_value("gatewayd_failovers_total", **fast) > fast_before, TIMEOUT,
                 "the node's fast failover to be counted")
        wait_for(lambda: node_value("gatewayd_wireguard_peer_up", **peer) == 0.0, TIMEOUT,
                 f"{old}'s peer-up gauge to drop")
        assert node_value("gatewayd_gateway_up", gateway=old) == 0.0
        wait_for(lambda: planned() > planned_before, TIMEOUT,
                 "the controller's failover to be counted")
    finally:
        klab.restore(gateway_host(old))
    new = next(g.name for g in GATEWAYS if g.name != old)
    wait_for(lambda: roles(klab, PAYMENT) == {(new, "active"), (old, "standby")}, TIMEOUT,
             f"{old} to become the standby")
    wait_for(lambda: node_value("gatewayd_wireguard_peer_up", **peer) == 1.0, TIMEOUT,
             f"{old} up again on {node.name}")


# --- uninstalling the cluster side --------------------------------------------------------------


def steer_footprint(node: CloudNode) -> dict[str, Any]:
    """What steer programs on the node, as the node's kernel shows it."""
    tables = run(["nft", "list", "tables"], node.netns).stdout.split()
    rules = [line for line in run(["ip", "rule", "list"], node.netns).stdout.splitlines()
             if "fwmark" in line]
    # wg lists every userspace tunnel of the host (their sockets are not per namespace)
    links = {link["ifname"] for link in
             json.loads(run(["ip", "-j", "link", "show"], node.netns).stdout)}
    tunnels = sorted(links & set(run(["wg", "show", "interfaces"], node.netns).stdout.split()))
    return {"table": "gatewayd-steer" in tables, "rules": rules, "tunnels": tunnels}


def test_the_cleanup_daemonset_removes_what_steer_programmed(klab: KubeLab) -> None:
    """With the steer DaemonSet gone, the cleanup DaemonSet's command (as its manifest says it)
    removes steer's table, policy routing and tunnels from the node; steer started again
    programs the node as before."""
    node = NODES[0]
    cleanup = yaml.safe_load_all(
        (MANIFESTS / "cleanup" / "steer-cleanup.yaml").read_text())
    (teardown,) = next(d for d in cleanup if d)["spec"]["template"]["spec"]["initContainers"]
    programmed = steer_footprint(node)
    assert programmed["table"] and programmed["rules"] and programmed["tunnels"], programmed
    klab.stop_daemon(node.name)  # the steer pod is deleted; what it programmed stays
    try:
        assert steer_footprint(node) == programmed
        # The pod reads the node's name from its environment; the lab's steer has a config.
        assert klab.image is not None
        removed = run(klab.image.argv([*teardown["args"], "--config",
                                       str(klab.config_path(node.name))],
                                      binds=[klab.directory], user="0:0"), node.netns).stdout
        assert steer_footprint(node) == {"table": False, "rules": [], "tunnels": []}
        assert "removed nftables table inet gatewayd-steer" in removed.splitlines()
    finally:
        klab.start_daemon(node.name)
    settled(klab)
