"""A watch whose connection dies without a word (a NAT forgot it: no reset, no more bytes) is
noticed within the informer's read timeout and resumed from the last resourceVersion, without
a list; and the clients' sockets use TCP keepalive."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from fakecluster.fakeapi import FakeApiServer, wait_until
from kubernetes.client import CoreV1Api
from test_kube_informer import FAST, Dirty, obj, running

from gatewayd.kube.client import client_from_kubeconfig
from gatewayd.kube.informer import WATCH_READ_TIMEOUT_SECONDS, Informer
from gatewayd.kube.resources import PODS

pytestmark = pytest.mark.kube

PODS_PATH = "/api/v1/pods"
TIMEOUT = 20.0


def test_a_silent_watch_is_resumed_from_the_last_version_without_a_list(
    tmp_path: Path,
) -> None:
    # Bookmarks every 0.2 s, as a real server's every minute: a live watch is never silent
    # for the informer's 2 s read timeout (90 s by default), a dead one is.
    with FakeApiServer(bookmark_interval=0.2) as fake:
        fake.put(obj(PODS, "web-1"))
        api = client_from_kubeconfig(fake.write_kubeconfig(tmp_path / "kubeconfig"))
        informer = Informer(api, PODS, Dirty(), read_timeout=2.0, backoff=FAST)
        with running(informer):
            assert informer.wait_for_sync(TIMEOUT)
            wait_until(lambda: fake.open_watches == 1, TIMEOUT, "the watch")
            fake.send_bookmarks()
            wait_until(
                lambda: informer.resource_version == str(fake.resource_version),
                TIMEOUT,
                "the bookmark",
            )
            seen = int(informer.resource_version or 0)
            start = len(fake.requests)

            fake.silence_watches()
            fake.put(obj(PODS, "web-2"))  # made while the informer hears nothing
            wait_until(lambda: informer.get("web-2", "gatewayd") is not None, TIMEOUT, "web-2")
            assert informer.last_error is None  # a silent watch is dropped, not an API error

        requests = [r for r in fake.requests[start:] if r.path == PODS_PATH]
        assert requests and all(r.query.get("watch") == "true" for r in requests), "no list"
        assert int(requests[0].query["resourceVersion"]) >= seen
    assert WATCH_READ_TIMEOUT_SECONDS <= 90


def test_the_clients_sockets_use_tcp_keepalive(tmp_path: Path) -> None:
    with FakeApiServer() as fake:
        api = client_from_kubeconfig(fake.write_kubeconfig(tmp_path / "kubeconfig"))
        CoreV1Api(api).list_namespace()
        pool = api.rest_client.pool_manager.connection_from_url(fake.url)
        connection = pool.pool.get_nowait()  # the one the list used, back in the pool
        sock = connection.sock
        assert sock is not None
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) <= 60
