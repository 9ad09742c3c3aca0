"""`gatewayctl lab verify`: does every lab pod leave with the source IP the policies promise?

Expectations come from the engine, not from a table written by hand: for each pod and each
echo address, in both families (the pod's address of the echo address's family), the engine's
verdict says which source the far end must see (the egress IP for snat; the pod's node IP of
that family otherwise, since the node masquerades its pods; nothing for a drop). The probe is
what a user would run: curl -4 or -6 inside the pod's namespace.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from ipaddress import ip_address
from pathlib import Path

from gatewayd.lab.netns import run
from gatewayd.lab.pinger import join_host_port
from gatewayd.lab.topology import ECHO_HOSTS, HTTP_PORT, PODS, PodHost
from gatewayd.policy.engine import build_plan
from gatewayd.policy.model import Node, Snapshot, Verdict
from gatewayd.policy.snapshot import load_snapshot

CURL_SECONDS = 3
NO_REPLY = "no reply"


@dataclass(frozen=True)
class Expectation:
    pod: str
    netns: str
    source: str  # the pod's address of the destination's family
    destination: str
    expected: str | None  # the source address the echo host must see; None: no reply
    why: str  # the engine's verdict and policy


@dataclass(frozen=True)
class Row:
    pod: str
    destination: str
    expected: str | None
    seen: str | None
    why: str

    @property
    def ok(self) -> bool:
        return self.seen == self.expected


def expectations(
    snapshot: Snapshot, pods: Iterable[PodHost] = PODS, destinations: Sequence[str] | None = None
) -> list[Expectation]:
    """What every lab pod must see at every echo address, decided by the engine."""
    if destinations is None:
        destinations = [address for host in ECHO_HOSTS for address in host.addresses]
    plan = build_plan(snapshot)
    nodes = {node.name: node for node in snapshot.nodes}
    result = []
    for pod in pods:
        known = next((p for p in snapshot.pods if ip_address(pod.address) in p.ips), None)
        node = nodes.get(known.node_name) if known and known.node_name else None
        for destination in destinations:
            version = ip_address(destination).version
            source = pod.address_of(version)
            node_ip = _internal_ip(node, version) if node else None
            explanation = plan.explain(ip_address(source), ip_address(destination))
            expected: str | None
            if explanation.verdict is Verdict.SNAT:
                expected = str(explanation.egress_ip) if explanation.egress_ip else None
            elif explanation.verdict is Verdict.DROP:
                expected = None
            else:
                expected = node_ip
            why = explanation.verdict.value
            if explanation.policy:
                why += f" ({explanation.policy})"
            elif explanation.reason:
                why += f": {explanation.reason}"
            result.append(Expectation(pod.name, pod.netns, source, destination, expected, why))
    return result


def _internal_ip(node: Node, version: int) -> str | None:
    """The node's first InternalIP of the family: the source its masquerade gives pods."""
    return next((a.address for a in node.addresses
                 if a.type == "InternalIP" and ip_address(a.address).version == version), None)


def probe(
    netns: str, destination: str, port: int = HTTP_PORT, *,
    local_port: int | None = None, seconds: float = CURL_SECONDS,
) -> str | None:
    """The source address the echo server at `destination` reports for a request from
    `netns` (from `local_port` if given), or None when no answer came back in `seconds`."""
    pinned = ["--local-port", str(local_port)] if local_port is not None else []
    family = f"-{ip_address(destination).version}"
    try:
        proc = run(
            ["curl", "-s", family, *pinned, "--max-time", str(seconds),
             f"http://{join_host_port(destination, port)}/"],
            netns,
            check=False,
            timeout=seconds + 5,
        )
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def verify(snapshot_dir: Path, pods: Iterable[PodHost] = PODS) -> list[Row]:
    """Probe every (pod, echo address) pair in parallel against the engine's expectations."""
    snapshot = load_snapshot([snapshot_dir]).snapshot
    wanted = expectations(snapshot, pods)
    with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
        seen = list(pool.map(lambda e: probe(e.netns, e.destination), wanted))
    return [Row(e.pod, e.destination, e.expected, s, e.why) for e, s in zip(wanted, seen,
                                                                              strict=True)]


def render_text(rows: Sequence[Row]) -> str:
    header = ("POD", "DESTINATION", "EXPECTED SOURCE", "SEEN SOURCE", "RESULT", "WHY")
    lines = [header] + [
        (r.pod, r.destination, r.expected or NO_REPLY, r.seen or NO_REPLY,
         "OK" if r.ok else "FAIL", r.why)
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
    failed = sum(not r.ok for r in rows)
    summary = f"{len(rows) - failed}/{len(rows)} OK" + (f", {failed} FAILED" if failed else "")
    return f"{text}\n{summary}\n"


def render_json(rows: Sequence[Row]) -> str:
    return json.dumps(
        {"ok": all(r.ok for r in rows), "rows": [{**asdict(r), "ok": r.ok} for r in rows]},
        indent=2,
    ) + "\n"
