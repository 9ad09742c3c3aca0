"""`/healthz` (the process works) and `/readyz` (it is ready) over plain HTTP, for the kubelet's
probes of the daemons that run in the cluster (the controller, steer on the cloud nodes); a
controller replica that does not lead is ready too: it is ready to take over. `/metrics`, when
given, answers Prometheus beside them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Prometheus' text format, version 0.0.4.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], checks: dict[str, Callable[[], bool]],
                 metrics: Callable[[], bytes] | None) -> None:
        self.checks = checks
        self.metrics = metrics
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/metrics" and self.server.metrics is not None:
            self._answer(HTTPStatus.OK, self.server.metrics(), METRICS_CONTENT_TYPE)
            return
        check = self.server.checks.get(path)
        if check is None:
            code, text = HTTPStatus.NOT_FOUND, "not found\n"
        elif check():
            code, text = HTTPStatus.OK, "ok\n"
        else:
            code, text = HTTPStatus.SERVICE_UNAVAILABLE, "not ok\n"
        self._answer(code, text.encode(), "text/plain; charset=utf-8")

    def _answer(self, code: HTTPStatus, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would drown the log


class HealthServer:
    def __init__(
        self, host: str, port: int, healthy: Callable[[], bool], ready: Callable[[], bool],
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        self._server = _Server((host, port), {"/healthz": healthy, "/readyz": ready}, metrics)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.2,), name="probes", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
