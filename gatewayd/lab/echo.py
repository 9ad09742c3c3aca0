"""The lab's external hosts: they tell every client which source address they saw.

Two servers in one process: HTTP (every GET is answered with the client's address as plain
text, like ifconfig.me) and a line echo over TCP (each line comes back prefixed with the
client's address), which lets the tests hold one connection open across agent restarts.

    python -m gatewayd.lab.echo --http-port 8080 --line-port 9000
"""

from __future__ import annotations

import argparse
import signal
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType


class SourceAddressHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the verify matrix would flood the log with one line per probe."""


class LineEchoHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        source = self.client_address[0].encode()
        for line in self.rfile:
            self.wfile.write(source + b" " + line)
            self.wfile.flush()


class LineEchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class SourceAddressServer(ThreadingHTTPServer):
    daemon_threads = True
    # Probing clients open many connections a second; with the default backlog of 5 a busy
    # moment drops SYNs, which would look like lost traffic.
    request_queue_size = 256


def serve(http_port: int, line_port: int) -> None:
    """Serve both until SIGTERM or SIGINT."""
    http_server = SourceAddressServer(("0.0.0.0", http_port), SourceAddressHandler)
    line_server = LineEchoServer(("0.0.0.0", line_port), LineEchoHandler)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threads = [
        threading.Thread(target=server.serve_forever, daemon=True)
        for server in (http_server, line_server)
    ]
    for thread in threads:
        thread.start()
    print(f"echo: http on :{http_port}, line echo on :{line_port}", flush=True)
    stop.wait()
    http_server.shutdown()
    line_server.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gatewayd.lab.echo", description=__doc__)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--line-port", type=int, required=True)
    args = parser.parse_args(argv)
    serve(args.http_port, args.line_port)


if __name__ == "__main__":
    main()
