"""API clients for the three ways gatewayd meets a cluster: a kubeconfig file, a join token with
the API server's URL and CA certificate, or the service account of an in-cluster pod.

Tokens are short-lived (TokenRequest; the kubelet rotates a pod's), so the credential files are
re-read when they change: before each request a client stats its files (the kubeconfig and the
`tokenFile` it names, or the join token file) and, when one changed, takes the token from them
again. The next request carries the new token; nothing restarts. A file caught half-written
(empty, or a kubeconfig that does not parse) is ignored until it changes again: the old token
stays in use. Only the token is re-read: a new server address or CA needs a restart.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
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

from gatewayd.policy.safeload import CONFIG_LIMITS, DocumentError, load_yaml_file

# TCP keepalive on every connection to the API server: probes after 30 s idle, every 10 s,
# 3 unanswered ones close it, so a connection a NAT dropped silently is found within a minute.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES = 30, 10, 3

log = logging.getLogger("gatewayd")

FileStamp = tuple[int, int, int] | None


class KubeConfigError(Exception):
    """Credentials that cannot be used; the message names the file or setting and the fix."""


class CredentialReload:
    """Re-reads a client's bearer token when one of its files changes (see the module
    docstring); installed as the configuration's `refresh_api_key_hook`, which the client
    calls before every request."""

    def __init__(
        self, files: Callable[[], Sequence[Path]], read_token: Callable[[], str], what: str
    ) -> None:
        self._files = files  # the first one names the others (a kubeconfig its tokenFile)
        self._read_token = read_token
        self._what = what
        self._lock = threading.Lock()
        self._paths = list(files())
        self._first = _stamp(self._paths[0])
        self._seen = self._stamps()
        self._token: str | None = None  # None: the token read at start is still current

    def install(self, configuration: Configuration) -> None:
        """Replaces the hook the kubeconfig loader set (which re-sets the token read at start,
        and itself, before every request)."""
        configuration.refresh_api_key_hook = self.refresh  # type: ignore[assignment]

    def refresh(self, configuration: Configuration) -> None:
        with self._lock:
            stamps = self._stamps()
            if stamps != self._seen:
                self._reread(stamps)
            if self._token is not None:
                configuration.api_key["BearerToken"] = self._token

    def _reread(self, stamps: tuple[FileStamp, ...]) -> None:
        try:
            token = self._read_token().strip()
        except (KubeConfigError, OSError) as error:
            log.warning("%s changed but cannot be used yet (%s); keeping the token in use",
                        self._what, error)
            return
        if not token:
            return  # caught half-written: the next change brings the rest
        self._token = token
        self._seen = stamps
        log.info("%s changed: its new token is used from now on", self._what)

    def _stamps(self) -> tuple[FileStamp, ...]:
        first = _stamp(self._paths[0])
        if first != self._first:  # it may name other files now
            self._paths, self._first = list(self._files()), first
        return tuple(_stamp(path) for path in self._paths)


def _stamp(path: Path) -> FileStamp:
    try:
        found = path.stat()
    except OSError:
        return None
    return (found.st_ino, found.st_size, found.st_mtime_ns)


def _kubeconfig_configuration(path: Path, context: str | None) -> Configuration:
    if not path.is_file():
        raise KubeConfigError(f"{path}: kubeconfig file not found")
    try:  # the client's own YAML loader trusts its input: bound it first (see safeload)
        load_yaml_file(path, CONFIG_LIMITS)
    except DocumentError as error:
        where = f"line {error.line}: " if error.line is not None else ""
        raise KubeConfigError(f"{path}: not a usable kubeconfig: {where}{error.message}") \
            from error
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
    return configuration


def _kubeconfig_user(path: Path, context: str | None) -> dict[str, Any]:
    """The `user` entry of the context's user, or {} when the file does not say."""
    try:
        config: Any = yaml.safe_load(path.read_text())
        name = context or config["current-context"]
        (user_name,) = [c["context"]["user"] for c in config["contexts"] if c["name"] == name]
        (user,) = [u["user"] for u in config["users"] if u["name"] == user_name]
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError):
        return {}
    return user if isinstance(user, dict) else {}


def _kubeconfig_files(path: Path, context: str | None) -> list[Path]:
    """The kubeconfig and the `tokenFile` its user names, if any."""
    token_file = _kubeconfig_user(path, context).get("tokenFile")
    if isinstance(token_file, str) and token_file:
        return [path, path.parent / token_file]
    return [path]


def client_from_kubeconfig(path: Path, context: str | None = None) -> ApiClient:
    """A client for the cluster (and user) of `context`, or of the file's current context;
    its token is re-read when the kubeconfig or its tokenFile changes."""
    configuration = _kubeconfig_configuration(path, context)
    user = _kubeconfig_user(path, context)
    # Exec plugins and auth providers renew their tokens themselves (the loader's hook).
    if ("token" in user or "tokenFile" in user) and "exec" not in user \
            and "auth-provider" not in user:
        CredentialReload(
            lambda: _kubeconfig_files(path, context),
            lambda: str(_kubeconfig_configuration(path, context).api_key.get("BearerToken", "")),
            f"kubeconfig {path}",
        ).install(configuration)
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


def client_from_token_file(server: str, token_file: Path, ca_file: Path) -> ApiClient:
    """`client_from_token` with the token read from `token_file`, and read again when the
    file changes."""
    client = client_from_token(server, _read_join_token(token_file), ca_file)
    CredentialReload(lambda: [token_file], lambda: _read_join_token(token_file),
                     f"join token {token_file}").install(client.configuration)
    return client


def _read_join_token(token_file: Path) -> str:
    try:
        return token_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise KubeConfigError(f"{token_file}: cannot read the join token: "
                              f"{reason or exc}") from exc


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
