"""Failover time in the Kubernetes-mode lab: from the last reply through the failed gateway to
the first reply through the standby, as a client in a selected pod sees it.

    .venv/bin/python bench/bench_failover.py [--runs 20] [--stops 10] [--api-outage 60]
                                             [--keep DIR]

Builds the Kubernetes-mode lab (the fake API server of testkit/fakecluster, the controller, two
gateways, two cloud nodes) in a temporary directory, creates the `payment-gateway` policy
(explicit egress IP 198.51.100.70) and `reports-ipv6` (explicit IPv6 egress IP
2001:db8:100::72, measured by a client in web-1 beside the IPv4 one), and then, `--runs` times,
cuts the policy's active gateway off (eth0 and its tunnel down; every other run a power loss,
which also kills its agent and wireguard-go), measures, brings it back and waits for the steady
state (the standby active, the returned gateway its standby, both reached by every node),
alternating between the two gateways. A client in checkout-1 starts one HTTP request (a new
connection) every 20 ms with a 0.9 s timeout. Also measured: the time from the cut to the
controller's promotion of the standby (at once when every node failed over; else the slow path,
Lease expiry, 4 s here), and whether the egress IP was ever on both gateways' live uplinks
(checked at every change of their links and addresses). During every failover and stop, 20
long-lived TCP connections from checkout-1 echo a line every 50 ms, and an HTTP download from
the same host runs at 1 MiB/s (`gatewayd.lab.holder`): how many survived, and their longest
stall (for the download: the longest time without a chunk).

With `--stops N` it then stops the active gateway's agent N times as `systemctl stop` does
(SIGTERM; the agent hands its egress IP over) and starts it again: measured from the last
reply before the first failed request to the first reply through the standby.

With `--api-outage SECONDS` it then runs the client that long with the API server up (the
baseline), takes the API server down for as long, and counts failed requests in both stretches
and the plans the daemons programmed because of the outage.

`--timing KEY=SECONDS` (repeatable) changes the fast path's timing from the product's defaults:
`probe_interval`, `probe_misses`, `egress_ip_hold`, `arp_probe`, `handover` (the keys of
`gatewayd.lab.kubelab.DEFAULT_TIMING`).

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import yaml
from fakecluster.fakeapi import FakeApiServer

from gatewayd.lab.holder import Held, read_held
from gatewayd.lab.kubelab import (
    DEFAULT_TIMING,
    EgressIPWatch,
    KubeLab,
    daemon_events,
    holding,
    kube_lab_session,
    pinging,
    policy_status,
)
from gatewayd.lab.netns import wait_for
from gatewayd.lab.pinger import Attempt, join_host_port, outage, read_attempts
from gatewayd.lab.topology import EXAMPLE_SNAPSHOT, EXTERNAL, GATEWAYS, LINE_PORT, NODES

POLICY = "payment-gateway"
EGRESS_IP = "198.51.100.70"
CLIENT = NODES[0].pods[0]  # checkout-1
TARGET = f"{EXTERNAL.addresses[0]}:8080"
LINE_TARGET = f"{EXTERNAL.addresses[0]}:{LINE_PORT}"
# An IPv6 egress IP moves beside the IPv4 one: web-1 to the payment gateway's IPv6 address.
POLICY6 = "reports-ipv6"
EGRESS_IP6 = "2001:db8:100::72"
CLIENT6 = NODES[0].pods[2]  # web-1
TARGET6 = join_host_port(EXTERNAL.addresses[2], 8080)
HELD_CONNECTIONS = 20
HOLD_DOWN = 3.0
TIMEOUT = 60.0


def roles(lab: KubeLab, policy: str = POLICY) -> set[tuple[str, str]]:
    return {(g["name"], g["role"]) for g in policy_status(lab, policy).get("gateways", [])}


def active(lab: KubeLab) -> str:
    return next(name for name, role in roles(lab) if role == "active")


def steady(lab: KubeLab) -> bool:
    """One gateway active, the other its standby, and every node reaches both with no
    failover left: a node whose tunnel to the returned gateway is not up yet could not fail
    over to it. Which one is active does not matter: after a restore the nodes may fail over
    back to it once more, and the controller then follows them."""
    if sorted(role for _, role in roles(lab)) != ["active", "standby"]:
        return False
    for node in NODES:
        status = lab.object("egressnodes", node.name).get("status") or {}
        if status.get("failovers") or not all(
                g["reachable"] for g in status.get("gateways", [])) or len(
                status.get("gateways", [])) != len(GATEWAYS):
            return False
    return True


def wait_steady(lab: KubeLab, expected_active: str, what: str) -> None:
    """Wait for `steady`; say so when the active gateway is not `expected_active`."""
    try:
        wait_for(lambda: steady(lab), TIMEOUT, "one active and one standby gateway, "
                 "both reached by every node")
    except TimeoutError as error:
        nodes = {n.name: {k: (lab.object("egressnodes", n.name).get("status") or {}).get(k)
                          for k in ("gateways", "failovers")} for n in NODES}
        raise RuntimeError(f"{error}: roles {roles(lab)}, nodes {nodes}") from None
    if active(lab) != expected_active:
        print(f"  {what}: {active(lab)} is active again after the restore", file=sys.stderr)


def one_run(lab: KubeLab, number: int, power_loss: bool, directory: Path) -> dict[str, float]:
    old = active(lab)
    new = next(g.name for g in GATEWAYS if g.name != old)
    gateway = next(g for g in GATEWAYS if g.name == old)
    with ExitStack() as stack:
        watch = stack.enter_context(EgressIPWatch([EGRESS_IP, EGRESS_IP6]))
        held = stack.enter_context(holding(CLIENT.netns, LINE_TARGET,
                                           directory / f"held{number}.json", HELD_CONNECTIONS,
                                           download=TARGET))
        path = stack.enter_context(pinging(CLIENT.netns, TARGET, directory / f"run{number}"))
        path6 = stack.enter_context(pinging(CLIENT6.netns, TARGET6,
                                            directory / f"run{number}-ipv6"))
        time.sleep(1.0)
        cut = lab.cut(gateway, power_loss=power_loss)
        for client in (path, path6):
            wait_for(lambda c=client: any(a.ok and a.start > cut for a in read_attempts(c)),
                     TIMEOUT, "traffic to come back")
        wait_for(lambda: active(lab) == new, TIMEOUT, "the controller to promote the standby")
        promoted = time.time() - cut
        lab.restore(gateway)
        wait_steady(lab, new, f"run {number + 1}")
        time.sleep(1.0)
        attempts, attempts6 = read_attempts(path), read_attempts(path6)
        connections = read_held(held)
    what = f"run {number + 1}"
    return {**tally(attempts, cut, cut, watch, what), "promoted": promoted,
            **kept(connections, cut, what), **ipv6(tally(attempts6, cut, cut, watch, what,
                                                         EGRESS_IP6))}


def ipv6(results: dict[str, float]) -> dict[str, float]:
    """The IPv6 client's figures, beside the IPv4 client's."""
    return {f"{key}6": value for key, value in results.items() if key != "overlaps"}


def kept(connections: list[Held], since: float, what: str) -> dict[str, float]:
    """How many long-lived connections survived, and the longest stall of those that did."""
    for broken in (c for c in connections if c.error):
        print(f"  {what}: {broken.kind} connection {broken.index} (port {broken.local_port}) "
              f"broke: {broken.error}, last echo {broken.last_echo - since:+.3f}s",
              file=sys.stderr)
    alive = [c for c in connections if not c.error]
    downloads = [c for c in connections if c.kind == "download"]
    return {"held": float(len(connections)), "kept": float(len(alive)),
            "stall": max((c.longest_gap for c in alive), default=0.0),
            "downloads": float(len(downloads)),
            "downloads_kept": float(sum(not c.error for c in downloads)),
            "download_stall": max((c.longest_gap for c in downloads if not c.error),
                                  default=0.0)}


def tally(
    attempts: list[Attempt], failed_at: float, since: float, watch: EgressIPWatch, what: str,
    egress_ip: str = EGRESS_IP,
) -> dict[str, float]:
    """The outage around `failed_at`, and what went wrong after traffic resumed."""
    gap = outage(attempts, failed_at)
    if gap is None:
        raise RuntimeError(f"{what}: no answer after the failure")
    after = [a for a in attempts if a.start >= gap.first_after.end]
    for late in (a for a in after if not a.ok):
        print(f"  {what}: a request {late.start - since:+.3f}s after the failure failed "
              f"({late.error})", file=sys.stderr)
    for at, address, holders in watch.overlaps:
        print(f"  {what}: {address} on {' and '.join(holders)} at once, "
              f"{at - since:+.3f}s after the failure", file=sys.stderr)
    return {
        "outage": gap.seconds,
        "failed_after": float(sum(not a.ok for a in after)),
        "wrong_source": float(sum(a.ok and a.source != egress_ip for a in attempts)),
        "overlaps": float(len(watch.overlaps)),
    }


def one_stop(lab: KubeLab, number: int, directory: Path) -> dict[str, float]:
    old = active(lab)
    new = next(g.name for g in GATEWAYS if g.name != old)
    with ExitStack() as stack:
        watch = stack.enter_context(EgressIPWatch([EGRESS_IP, EGRESS_IP6]))
        held = stack.enter_context(holding(CLIENT.netns, LINE_TARGET,
                                           directory / f"held-stop{number}.json",
                                           HELD_CONNECTIONS, download=TARGET))
        path = stack.enter_context(pinging(CLIENT.netns, TARGET, directory / f"stop{number}"))
        time.sleep(1.0)
        stopped = time.time()
        lab.stop_daemon(old, signal.SIGTERM)
        took = time.time() - stopped
        wait_for(lambda: active(lab) == new, TIMEOUT, "the controller to promote the standby")
        started = time.time()
        lab.start_daemon(old)
        lab.wait_ready([old], since=started)
        wait_steady(lab, new, f"stop {number + 1}")
        time.sleep(1.0)
        attempts = read_attempts(path)
        connections = read_held(held)
    # the stopping agent serves until the nodes move: the gap starts at the first failure
    failed = [a for a in attempts if not a.ok and a.start >= stopped]
    first_failure = failed[0].start if failed else stopped
    return {**tally(attempts, first_failure, stopped, watch, f"stop {number + 1}"),
            "stop": took, **kept(connections, stopped, f"stop {number + 1}")}


def api_outage(lab: KubeLab, seconds: float, directory: Path) -> dict[str, float]:
    """The same client for `seconds` with the API server up (the baseline), then down."""
    hosts = [g.name for g in GATEWAYS] + [n.name for n in NODES]
    programmed = {h: daemon_events(lab, h, "plan-applied") for h in hosts}
    before = roles(lab)
    with pinging(CLIENT.netns, TARGET, directory / "api-outage") as path:
        baseline_from = time.time()
        time.sleep(seconds)
        lab.api_down()
        down_at = time.time()
        try:
            time.sleep(seconds)
        finally:
            lab.api_up()
        time.sleep(HOLD_DOWN + 5)
        attempts = read_attempts(path)
    for failed in (a for a in attempts if not a.ok):
        print(f"  API check: a request {failed.start - down_at:+.3f}s after the API went down "
              f"failed ({failed.error})", file=sys.stderr)
    baseline = [a for a in attempts if baseline_from <= a.start < down_at]
    outage = [a for a in attempts if a.start >= down_at]
    return {
        "baseline_requests": float(len(baseline)),
        "baseline_failed": float(sum(not a.ok for a in baseline)),
        "requests": float(len(outage)),
        "failed": float(sum(not a.ok for a in outage)),
        "reprogrammed": float(sum(daemon_events(lab, h, "plan-applied") - programmed[h]
                                  for h in hosts)),
        "moved": float(roles(lab) != before),
    }


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def print_connections(results: list[dict[str, float]]) -> None:
    """The lines issue 12 asks for."""
    stalls = [r["stall"] for r in results]
    outages = [r["outage"] for r in results]
    print(f"long-lived connections kept: {sum(r['kept'] for r in results):.0f}/"
          f"{sum(r['held'] for r in results):.0f}")
    download_stalls = [r["download_stall"] for r in results]
    print(f"  of them HTTP downloads: {sum(r['downloads_kept'] for r in results):.0f}/"
          f"{sum(r['downloads'] for r in results):.0f}, longest time without a chunk: "
          f"p50 {percentile(download_stalls, 0.5):.3f} s, "
          f"p99 {percentile(download_stalls, 0.99):.3f} s")
    print(f"longest stall of a kept connection: p50 {percentile(stalls, 0.5):.3f} s, "
          f"p99 {percentile(stalls, 0.99):.3f} s")
    print(f"new-connection outage: p50 {percentile(outages, 0.5):.3f} s, "
          f"p99 {percentile(outages, 0.99):.3f} s, max {max(outages):.3f} s")
    print(f"requests failed after traffic resumed: "
          f"{sum(r['failed_after'] for r in results):.0f}")


def print_failovers(results: list[dict[str, float]]) -> None:
    outages = [r["outage"] for r in results]
    outages6 = [r["outage6"] for r in results]
    promoted = [r["promoted"] for r in results]
    print(f"\n{len(results)} failovers (power loss and partition alternating), client request "
          "every 20 ms\n")
    print("| measure | p50 | p90 | max |\n|---|---|---|---|")
    for name, values in (("last reply via the failed gateway -> first via the standby", outages),
                         ("the same for the IPv6 client (IPv6 egress IP)", outages6),
                         ("cut -> controller promotes the standby (Lease 4 s)", promoted)):
        print(f"| {name} | {percentile(values, 0.5):.3f} s | {percentile(values, 0.9):.3f} s "
              f"| {max(values):.3f} s |")
    print(f"\nmean outage {statistics.mean(outages):.3f} s; under 1 s: "
          f"{sum(v < 1.0 for v in outages)}/{len(outages)}; requests failed after traffic "
          f"resumed (flaps): {sum(r['failed_after'] for r in results):.0f} "
          f"(IPv6: {sum(r['failed_after6'] for r in results):.0f}); replies with "
          f"another source IP: {sum(r['wrong_source'] + r['wrong_source6'] for r in results):.0f};"
          f" checks with an egress IP on both gateways: "
          f"{sum(r['overlaps'] for r in results):.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--stops", type=int, default=10,
                        help="planned stops of the active agent to measure afterwards")
    parser.add_argument("--api-outage", type=float, default=0,
                        help="seconds of API server outage to check afterwards (0: skip)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep the daemons' logs and the clients' records in DIR, a new "
                             "directory (default: a temporary one, removed at the end)")
    parser.add_argument("--timing", action="append", default=[], metavar="KEY=SECONDS",
                        help="a fast-path timing other than the product's default")
    args = parser.parse_args()
    if args.keep is not None and args.keep.exists():
        parser.error(f"--keep {args.keep}: already exists")
    timing = {"hold_down": HOLD_DOWN}
    for item in args.timing:
        key, _, value = item.partition("=")
        if key not in DEFAULT_TIMING or key == "hold_down":
            parser.error(f"--timing {item}: KEY is one of "
                         f"{', '.join(k for k in DEFAULT_TIMING if k != 'hold_down')}")
        try:
            timing[key] = float(value)
        except ValueError:
            parser.error(f"--timing {item}: SECONDS must be a number")
    results: list[dict[str, float]] = []
    with ExitStack() as stack:
        if args.keep is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="gwdlab-failover-"))
        else:
            args.keep.mkdir(parents=True)
            tmp = str(args.keep)
        lab = stack.enter_context(kube_lab_session(Path(tmp) / "lab", FakeApiServer(),
                                                   timing=timing))
        for name in (f"30-policy-{POLICY}.yaml", f"32-policy-{POLICY6}.yaml"):
            lab.create(yaml.safe_load((EXAMPLE_SNAPSHOT / name).read_text()))
        wait_for(lambda: len(roles(lab)) == 2 and len(roles(lab, POLICY6)) == 2, TIMEOUT,
                 "the policies to be planned")
        time.sleep(2.0)
        for number in range(args.runs):
            power_loss = number % 2 == 0
            result = one_run(lab, number, power_loss, Path(tmp))
            results.append(result)
            print(f"run {number + 1}: {'power loss' if power_loss else 'partition '}  "
                  f"outage {result['outage']:.3f}s, controller promoted the standby after "
                  f"{result['promoted']:.1f}s", file=sys.stderr, flush=True)
        stops = []
        for number in range(args.stops):
            stops.append(one_stop(lab, number, Path(tmp)))
            print(f"stop {number + 1}: outage {stops[-1]['outage']:.3f}s, the agent stopped "
                  f"in {stops[-1]['stop']:.2f}s", file=sys.stderr, flush=True)
        outage_result = api_outage(lab, args.api_outage, Path(tmp)) if args.api_outage else None

    if results:
        print_failovers(results)
        print()
        print_connections(results)
    if stops:
        gaps, took = [r["outage"] for r in stops], [r["stop"] for r in stops]
        print(f"\n{len(stops)} planned stops (SIGTERM) of the active agent\n")
        print("| measure | p50 | p90 | max |\n|---|---|---|---|")
        for name, values in (("last reply before the first failure -> first via the standby",
                              gaps), ("SIGTERM -> the agent exited (hand-over)", took)):
            print(f"| {name} | {percentile(values, 0.5):.3f} s | "
                  f"{percentile(values, 0.9):.3f} s | {max(values):.3f} s |")
        print(f"\nrequests failed after traffic resumed: "
              f"{sum(r['failed_after'] for r in stops):.0f}; replies with another source IP: "
              f"{sum(r['wrong_source'] for r in stops):.0f}; checks with the egress IP on "
              f"both gateways: {sum(r['overlaps'] for r in stops):.0f}\n")
        print_connections(stops)
    if outage_result is not None:
        print(f"\nAPI server down {args.api_outage:.0f} s (and the {HOLD_DOWN + 5:.0f} s "
              f"after): {outage_result['requests']:.0f} requests, "
              f"{outage_result['failed']:.0f} failed; the {args.api_outage:.0f} s before, API "
              f"up: {outage_result['baseline_requests']:.0f} requests, "
              f"{outage_result['baseline_failed']:.0f} failed; plans programmed because of "
              f"it: {outage_result['reprogrammed']:.0f}; policy moved: "
              f"{'yes' if outage_result['moved'] else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
