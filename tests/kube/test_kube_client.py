"""gatewayd.kube.client against the fake API server: kubeconfig, join token over verified TLS,
in-cluster service account, and the errors a user gets for unusable credentials."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3
from fakecluster.fakeapi import FakeApiServer, TlsFiles, make_test_certificates
from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from gatewayd.kube.client import (
    KubeConfigError,
    client_from_kubeconfig,
    client_from_token,
    client_in_cluster,
)

pytestmark = pytest.mark.kube

TOKEN = "join-token-gw1"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make test certificates (Debian: openssl)")
    return make_test_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_api(tls: TlsFiles) -> Iterator[FakeApiServer]:
    with FakeApiServer(token=TOKEN, tls=tls) as server:
        server.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "gatewayd"}})
        yield server


def namespaces(client: object) -> list[str]:
    return [ns.metadata.name for ns in CoreV1Api(client).list_namespace().items]


def test_kubeconfig_over_tls_with_a_token(tls_api: FakeApiServer, tmp_path: Path) -> None:
    kubeconfig = tls_api.write_kubeconfig(tmp_path / "kubeconfig")
    with client_from_kubeconfig(kubeconfig) as client:
        assert namespaces(client) == ["gatewayd"]


def test_kubeconfig_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(KubeConfigError, match=re.escape(f"{missing}: kubeconfig file not found")):
        client_from_kubeconfig(missing)
    broken = tmp_path / "broken"
    broken.write_text("clusters: [\n")
    with pytest.raises(KubeConfigError, match=re.escape(f"{broken}: not a usable kubeconfig")):
        client_from_kubeconfig(broken)
    no_context = tmp_path / "empty"
    no_context.write_text("apiVersion: v1\nkind: Config\n")
    with pytest.raises(KubeConfigError, match=re.escape(f"{no_context}: not a usable kubeconfig")):
        client_from_kubeconfig(no_context)


def test_join_token_with_the_server_ca(tls_api: FakeApiServer, tls: TlsFiles) -> None:
    with client_from_token(tls_api.url, TOKEN, tls.ca) as client:
        assert namespaces(client) == ["gatewayd"]
    with (
        client_from_token(tls_api.url, "wrong", tls.ca) as client,
        pytest.raises(ApiException) as raised,
    ):
        namespaces(client)
    assert raised.value.status == 401


def test_join_token_refuses_a_server_signed_by_another_ca(
    tls_api: FakeApiServer, tmp_path: Path
) -> None:
    other = make_test_certificates(tmp_path / "other")
    with (
        client_from_token(tls_api.url, TOKEN, other.ca) as client,
        pytest.raises(urllib3.exceptions.MaxRetryError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        namespaces(client)


def test_join_token_errors(tls: TlsFiles, tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="must be https://HOST"):
        client_from_token("http://127.0.0.1:6443", TOKEN, tls.ca)
    with pytest.raises(KubeConfigError, match="join token: is empty"):
        client_from_token("https://127.0.0.1:6443", " \n", tls.ca)
    with pytest.raises(KubeConfigError, match="CA certificate file not found"):
        client_from_token("https://127.0.0.1:6443", TOKEN, tmp_path / "ca.crt")


def test_in_cluster_service_account(tls_api: FakeApiServer, tls: TlsFiles, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    port = tls_api.url.rsplit(":", 1)[1]
    environ = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
    with client_in_cluster(token_file, tls.ca, environ) as client:
        assert namespaces(client) == ["gatewayd"]


def test_in_cluster_errors_say_what_is_missing(tls: TlsFiles, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with pytest.raises(KubeConfigError, match="Service host/port is not set"):
        client_in_cluster(token_file, tls.ca, {})
    environ = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"}
    with pytest.raises(KubeConfigError, match="token file does not exist"):
        client_in_cluster(tmp_path / "absent", tls.ca, environ)
