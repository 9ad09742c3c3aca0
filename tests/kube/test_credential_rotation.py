"""Short-lived credentials: a client re-reads its token file (a kubeconfig's `tokenFile`, the
kubeconfig itself, or a join token file) when it changes, and the gateway agent keeps renewing
its Lease and writing its status across a rotation that revokes the old token, without a
restart. The fake API server answers 401 for a revoked or expired token, as a real one does."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakecluster.fakeapi import FakeApiServer, TlsFiles, make_test_certificates
from fakecluster.fakeauth import (
    ClusterAuth,
    gateway_credentials,
    install,
    kubeconfig_as,
    manifest_objects,
    service_account_user,
)
from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException
from test_agent_kubernetes import PEER, RULE, applied, config, gateway, renew_time, set_spec

from gatewayd.kube.client import client_from_kubeconfig, client_from_token_file
from gatewayd.lab.sandboxed import DaemonSandbox

pytestmark = pytest.mark.kube

NS = "gatewayd-system"
TIMEOUT = 30.0
TUNNEL = "ktrot0"  # unique on the machine: wireguard-go's sockets are shared by namespaces


def auth_of(fake: FakeApiServer) -> ClusterAuth:
    assert fake.auth is not None
    return fake.auth


def write_atomically(path: Path, text: str) -> None:
    """As a renewal job should: a new file renamed over the old one."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    new.chmod(0o600)
    os.replace(new, path)


def new_token(fake: FakeApiServer, account: str = "gateway-gw-kube") -> str:
    return auth_of(fake).tokens.issue(service_account_user(NS, account), ttl_seconds=600)


def cluster() -> FakeApiServer:
    """The fake (not started) with the manifests applied and gw-kube's credentials."""
    server = FakeApiServer(auth=ClusterAuth())
    install(server, manifest_objects() + gateway_credentials("gw-kube"))
    return server


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with cluster() as server:
        yield server


def namespaces_listable(client: Any) -> bool:
    """A request the gateway's role refuses (403) once it is authenticated (not 401)."""
    try:
        CoreV1Api(client).list_namespace()
    except ApiException as exc:
        if exc.status == 401:
            return False
        assert exc.status == 403
    return True


def test_a_kubeconfig_token_file_is_read_again_when_it_changes(
    fake: FakeApiServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(old := new_token(fake))
    kubeconfig = tmp_path / "kubeconfig"
    config_dict = kubeconfig_as(fake, "unused")
    config_dict["users"][0]["user"] = {"tokenFile": "token"}  # relative to the kubeconfig
    kubeconfig.write_text(yaml.safe_dump(config_dict))
    with client_from_kubeconfig(kubeconfig) as client:
        assert namespaces_listable(client)
        auth_of(fake).tokens.revoke(old)
        assert not namespaces_listable(client)
        write_atomically(token_file, "")  # caught half-written: ignored
        assert not namespaces_listable(client)
        write_atomically(token_file, new_token(fake) + "\n")
        assert namespaces_listable(client)


def test_a_kubeconfig_with_the_token_inline_is_read_again(
    fake: FakeApiServer, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(kubeconfig_as(fake, old := new_token(fake))))
    with client_from_kubeconfig(kubeconfig) as client:
        auth_of(fake).tokens.revoke(old)
        assert not namespaces_listable(client)
        write_atomically(kubeconfig, "clusters: [\n")  # broken: the old token stays
        assert not namespaces_listable(client)
        write_atomically(kubeconfig, yaml.safe_dump(kubeconfig_as(fake, new_token(fake))))
        assert namespaces_listable(client)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make test certificates (Debian: openssl)")
    return make_test_certificates(tmp_path_factory.mktemp("tls"))


def test_a_join_token_file_is_read_again_when_it_changes(tls: TlsFiles, tmp_path: Path) -> None:
    with FakeApiServer(auth=ClusterAuth(), tls=tls) as server:
        token_file = tmp_path / "join-token"
        token_file.write_text(old := new_token(server))
        with client_from_token_file(server.url, token_file, tls.ca) as client:
            assert namespaces_listable(client)
            auth_of(server).tokens.revoke(old)
            assert not namespaces_listable(client)
            write_atomically(token_file, new_token(server))
            assert namespaces_listable(client)


# --- the agent, as a process ------------------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[DaemonSandbox]:
    if os.geteuid() != 0:
        pytest.skip("the agent needs root (a network namespace of its own)")
    # The sandbox serves the fake inside its network namespace.
    with DaemonSandbox("gwdkrot-", tmp_path, cluster()) as box:
        box.interfaces.add(TUNNEL)
        yield box


@pytest.mark.lab  # the agent runs in network namespaces
def test_the_agent_keeps_renewing_and_reporting_across_a_token_rotation(
    sandbox: DaemonSandbox,
) -> None:
    fake = sandbox.api
    assert isinstance(fake, FakeApiServer)
    token_file = sandbox.directory / "token"
    token_file.write_text(old := new_token(fake))
    kubeconfig = sandbox.directory / "gateway-kubeconfig"
    config_dict = kubeconfig_as(fake, "unused")
    config_dict["users"][0]["user"] = {"tokenFile": str(token_file)}
    kubeconfig.write_text(yaml.safe_dump(config_dict))
    agent_config = config(sandbox)
    agent_config["name"] = "gw-kube"
    agent_config["labels"] = {}
    agent_config["kubernetes"]["kubeconfig"] = str(kubeconfig)
    agent_config["tunnel"]["interface"] = TUNNEL
    set_spec(sandbox, {"peers": [PEER], "rules": [RULE]})
    sandbox.start("agent", agent_config)
    sandbox.wait(lambda: applied(sandbox), TIMEOUT, "the agent to apply generation 2")
    sandbox.wait(lambda: renew_time(sandbox) is not None, TIMEOUT, "a Lease renewal")

    # The renewal job: a new token in the file, then the old one revoked.
    write_atomically(token_file, new_token(fake))
    auth_of(fake).tokens.revoke(old)
    renewed = renew_time(sandbox)
    sandbox.wait(lambda: renew_time(sandbox) != renewed, TIMEOUT,
                 "a Lease renewal with the new token")
    set_spec(sandbox, {"peers": [PEER], "rules": []})
    generation = gateway(sandbox)["metadata"]["generation"]
    sandbox.wait(lambda: applied(sandbox) and gateway(sandbox)["status"][
        "observedGeneration"] == generation, TIMEOUT, "a status write with the new token")
    assert sandbox.running
    assert auth_of(fake).refusals == []
