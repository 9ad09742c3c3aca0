"""The gateway's state for `/metrics`: WireGuard peers, egress IPs, SNAT and drop counters,
connections per egress IP and destination.

Read in the agent's loop thread (see PlanFollower.metric_samples); pure except for the kernel
reads it is handed (nft counters, the addresses the host holds).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

from gatewayd.dataplane.natstats import NatFlow, snat_flows
from gatewayd.dataplane.nft_render import snat_counter_rules
from gatewayd.metrics import Sample
from gatewayd.policy.model import GatewayPlan, IPAddress, address_order


def egress_ip_samples(expected: Iterable[IPAddress], held: Iterable[IPAddress],
                      conflicts: Iterable[IPAddress]) -> list[Sample]:
    """Per egress IP the plan gives this gateway (and any it still holds): expected, held,
    and whether another host answers for it."""
    expected, held, conflicts = set(expected), set(held), set(conflicts)
    samples: list[Sample] = []
    for ip in sorted(expected | held, key=address_order):
        labels = {"egress_ip": str(ip)}
        samples += [
            Sample("gatewayd_egress_ip_expected", "1 when the applied plan has this gateway "
                   "hold the egress IP.", float(ip in expected), labels),
            Sample("gatewayd_egress_ip_held", "1 when this host holds the egress IP.",
                   float(ip in held), labels),
            Sample("gatewayd_egress_ip_conflict", "1 when another host answers for the egress "
                   "IP, so this one cannot claim it.", float(ip in conflicts), labels),
        ]
    return samples


def counter_samples(plan: GatewayPlan | None,
                    counters: Mapping[str, tuple[int, int]]) -> list[Sample]:
    """Packets and bytes each policy's traffic was accepted for SNAT (the rule's named
    counter, summed over the policy's rules), and packets dropped by reason."""
    per_policy: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    if plan is not None:
        for name, rule in snat_counter_rules(plan).items():
            if name in counters:
                totals = per_policy[(rule.policy, str(rule.egress_ip))]
                totals[0] += counters[name][0]
                totals[1] += counters[name][1]
    samples: list[Sample] = []
    for (policy, egress_ip), (packets, size) in sorted(per_policy.items()):
        labels = {"policy": policy, "egress_ip": egress_ip}
        samples += [
            Sample("gatewayd_snat_packets", "Packets forwarded for SNAT by the policy's rules.",
                   packets, labels, counter=True),
            Sample("gatewayd_snat_bytes", "Bytes forwarded for SNAT by the policy's rules.",
                   size, labels, counter=True),
        ]
    for name, (packets, _) in sorted(counters.items()):
        if name.startswith("drop_"):
            samples.append(Sample("gatewayd_dropped_packets", "Forwarded packets the gateway "
                                  "table dropped, by reason.", packets,
                                  {"reason": name.removeprefix("drop_")}, counter=True))
    return samples


# Destinations named per egress IP: the busiest ones, where source ports run out first.
NAT_TOP_DESTINATIONS = 5


def nat_samples(flows: Iterable[NatFlow], egress_ips: Iterable[str]) -> list[Sample]:
    """Connections SNATed to each egress IP, and the busiest destinations (address, port,
    protocol) of each: one egress IP has about 64,000 source ports per destination and port,
    so a count near that means new connections to it are about to be dropped."""
    per_ip: Counter[str] = Counter({ip: 0 for ip in egress_ips})
    per_destination: Counter[tuple[str, str, str, str]] = Counter()
    for flow in flows:
        per_ip[flow.egress_ip] += 1
        port = "" if flow.port is None else str(flow.port)
        per_destination[(flow.egress_ip, flow.destination, port, flow.protocol)] += 1
    samples = [
        Sample("gatewayd_nat_connections", "Connections in conntrack SNATed to the egress IP.",
               count, {"egress_ip": ip})
        for ip, count in sorted(per_ip.items())
    ]
    for ip in sorted(per_ip):
        busiest = sorted(((count, key) for key, count in per_destination.items() if key[0] == ip),
                         key=lambda item: (-item[0], item[1]))[:NAT_TOP_DESTINATIONS]
        samples += [
            Sample("gatewayd_nat_destination_connections", "Connections SNATed to the egress "
                   f"IP per destination, port and protocol (its {NAT_TOP_DESTINATIONS} busiest "
                   "destinations).", count,
                   {"egress_ip": ip, "destination": destination, "port": port,
                    "protocol": protocol})
            for count, (_, destination, port, protocol) in busiest
        ]
    return samples


class NatUse:
    """`nat_samples` of the live conntrack table, read at most every `interval` seconds (the
    whole table is read: costly on a busy gateway)."""

    def __init__(self, interval: float = 30.0) -> None:
        self.interval = interval
        self._read_at = -math.inf
        self._samples: list[Sample] = []

    def samples(self, egress_ips: Iterable[str], now: float) -> list[Sample]:
        if now - self._read_at >= self.interval:
            ips = sorted(set(egress_ips))
            self._samples = nat_samples(snat_flows(ips), ips)
            self._read_at = now
        return self._samples
