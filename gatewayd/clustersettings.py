"""The `kubernetes:` section both daemons' configs share (Kubernetes mode).

Parsing only: importing this does not load the Kubernetes client (gatewayctl reads configs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gatewayd.configfile import Section, parse_path, read_snapshot_paths

DEFAULT_NAMESPACE = "gatewayd-system"


@dataclass(frozen=True)
class KubernetesSettings:
    """How to reach the API server, and the heartbeat's timing (gateways only)."""

    kubeconfig: Path | None = None
    server: str | None = None
    token_file: Path | None = None
    ca_file: Path | None = None
    namespace: str = DEFAULT_NAMESPACE
    lease_duration_seconds: int = 6
    lease_renew_seconds: float = 2.0

    @property
    def in_cluster(self) -> bool:
        return self.kubeconfig is None and self.server is None


def read_kubernetes(section: Section, *, in_cluster_allowed: bool) -> KubernetesSettings:
    """The `kubernetes:` section: `kubeconfig`, or `server` + `tokenFile` + `caFile` (a join
    token); with neither, the pod's service account where `in_cluster_allowed`."""
    kubeconfig = section.parsed("kubeconfig", parse_path, "a path", None)
    server = section.optional_string("server")
    token_file = section.parsed("tokenFile", parse_path, "a path", None)
    ca_file = section.parsed("caFile", parse_path, "a path", None)
    settings = KubernetesSettings(
        kubeconfig=kubeconfig,
        server=server,
        token_file=token_file,
        ca_file=ca_file,
        namespace=section.string(
            "namespace", os.environ.get("GATEWAYD_NAMESPACE", DEFAULT_NAMESPACE)
        ),
        lease_duration_seconds=section.integer("leaseDurationSeconds", 6, 2, 3600),
        lease_renew_seconds=section.number("leaseRenewSeconds", 2.0, 0.1, 1800),
    )
    if kubeconfig and (server or token_file or ca_file):
        section.error("kubeconfig", "give either kubeconfig or server + tokenFile + caFile")
    elif server or token_file or ca_file:
        for key, value in (("server", server), ("tokenFile", token_file), ("caFile", ca_file)):
            if not value:
                section.error(key, "required with a join token (server + tokenFile + caFile)")
    elif not kubeconfig and not in_cluster_allowed:
        section.error("kubeconfig", "required: give kubeconfig, or server + tokenFile + caFile")
    duration, renew = settings.lease_duration_seconds, settings.lease_renew_seconds
    if isinstance(duration, int) and isinstance(renew, float) and renew * 2 > duration:
        section.error("leaseRenewSeconds", f"must be at most half of leaseDurationSeconds "
                                           f"({duration}), got {renew:g}")
    section.finish()
    return settings


def read_mode(top: Section, *, in_cluster_allowed: bool) -> KubernetesSettings | None:
    """Kubernetes settings in Kubernetes mode, None in standalone mode (`snapshot:`)."""
    if "kubernetes" not in top.data:
        return None
    if "snapshot" in top.data:
        top.error("snapshot", "give either snapshot (standalone mode) or kubernetes, not both")
        read_snapshot_paths(top)  # read, so it is not reported as unknown too
    return read_kubernetes(top.section("kubernetes"), in_cluster_allowed=in_cluster_allowed)


def reject_outside_kubernetes(section: Section, kubernetes_mode: bool) -> None:
    """A section (such as `failover:`) that only Kubernetes mode uses: an error otherwise."""
    if section.data and not kubernetes_mode:
        section.error(next(iter(section.data)), f"{section.path} settings are used in "
                                                "Kubernetes mode only")
