"""API clients for the three ways gatewayd meets a cluster: a kubeconfig file, a join token with
the API server's URL and CA certificate, or the service account of an in-cluster pod."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from kubernetes.client import ApiClient, Configuration
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)
from kubernetes.config.kube_config import load_kube_config
from kubernetes.utils.keepalive import tcp_keepalive_socket_options

# TCP keepalive on every connection to the API server: probes after 30 s idle, every 10 s,
# 3 unanswered ones close it, so a connection a NAT dropped silently is found within a minute.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES = 30, 10, 3


class KubeConfigError(Exception):
    """Credentials that cannot be used; the message names the file or setting and the fix."""


def client_from_kubeconfig(path: Path, context: str | None = None) -> ApiClient:
    """A client for the cluster (and user) of `context`, or of the file's current context."""
    if not path.is_file():
        raise KubeConfigError(f"{path}: kubeconfig file not found")
    configuration = Configuration()
    try:
        # The loader is untyped; it fills `configuration` in place.
        load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(path),
            context=context,
            client_configuration=configuration,
            persist_config=False,
        )
    except (ConfigException, yaml.YAMLError, OSError) as error:
        raise KubeConfigError(f"{path}: not a usable kubeconfig: {error}") from error
    return _api_client(configuration)


def client_from_token(server: str, token: str, ca_file: Path) -> ApiClient:
    """A client that authenticates with a bearer (join) token over HTTPS verified by `ca_file`."""
    url = urlsplit(server)
    if url.scheme != "https" or not url.hostname:
        raise KubeConfigError(
            f"API server URL {server!r}: must be https://HOST[:PORT]; a join token is never sent "
            "over plain HTTP"
        )
    if not token.strip():
        raise KubeConfigError("join token: is empty")
    if not ca_file.is_file():
        raise KubeConfigError(f"{ca_file}: CA certificate file not found")
    configuration = Configuration(
        host=server.rstrip("/"),
        api_key={"BearerToken": token.strip()},
        api_key_prefix={"BearerToken": "Bearer"},
        ssl_ca_cert=str(ca_file),
    )
    return _api_client(configuration)


def client_in_cluster(
    token_file: Path = Path(SERVICE_TOKEN_FILENAME),
    ca_file: Path = Path(SERVICE_CERT_FILENAME),
    environ: Mapping[str, str] = os.environ,
) -> ApiClient:
    """A client with the pod's service account; the token is re-read as the kubelet rotates it."""
    configuration = Configuration()
    loader = InClusterConfigLoader(  # type: ignore[no-untyped-call]
        token_filename=str(token_file), cert_filename=str(ca_file), environ=environ
    )
    try:
        loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError) as error:
        raise KubeConfigError(
            f"in-cluster service account ({token_file}, {ca_file}, KUBERNETES_SERVICE_HOST/PORT): "
            f"{error}"
        ) from error
    return _api_client(configuration)


def _api_client(configuration: Configuration) -> ApiClient:
    """A client whose sockets use TCP keepalive (watches otherwise wait on a dead connection)."""
    configuration.socket_options = tcp_keepalive_socket_options(
        KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES
    )
    return ApiClient(configuration)
