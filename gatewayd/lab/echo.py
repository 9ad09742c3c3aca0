"""The lab's external hosts: they tell every client which source address they saw.

Two servers in one process: HTTP (every GET is answered with the client's address as plain
text, like ifconfig.me) and a line echo over TCP (each line comes back prefixed with the
client's address), which lets the tests hold one connection open across agent restarts.
`GET /download?rate=BYTES` is a download that never ends: the client's address on a line,
then `rate` bytes a second in chunks every 20 ms, until the client closes it.

    python -m gatewayd.lab.echo --http-port 8080 --line-port 9000
"""

from __future__ import annotations

import argparse
import signal
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv6Address, ip_address
from types import FrameType
from urllib.parse import parse_qs, urlsplit

CHUNK_SECONDS = 0.02  # a download's pace


def client_source(client_address: tuple[str, int]) -> bytes:
    """The client's address as it sent it: the servers listen on both families at once, and
    an IPv4 client arrives as an IPv4-mapped IPv6 address."""
    address = ip_address(client_address[0])
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address).encode()


class SourceAddressHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/download":
            self._download(parse_qs(url.query))
            return
        body = client_source(self.client_address)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _download(self, query: dict[str, list[str]]) -> None:
        try:
            rate = int(query.get("rate", [""])[0])
        except ValueError:
            self.send_error(400, "rate: bytes a second, an integer")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")  # no length: the body ends with the connection
        self.end_headers()
        chunk = bytes(max(1, int(rate * CHUNK_SECONDS)))
        try:
            self.wfile.write(client_source(self.client_address) + b"\n")
            due = time.monotonic()
            while True:
                self.wfile.write(chunk)
                # On at the pace after a write that blocked (a failover), not in a burst.
                due = max(due + CHUNK_SECONDS, time.monotonic())
                time.sleep(max(0.0, due - time.monotonic()))  # the pace, not a wait for a state
        except OSError:  # the client went away
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the verify matrix would flood the log with one line per probe."""


class LineEchoHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        source = client_source(self.client_address)
        for line in self.rfile:
            self.wfile.write(source + b" " + line)
            self.wfile.flush()


class LineEchoServer(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6  # with IPV6_V6ONLY off (Linux's default): both families
    daemon_threads = True
    allow_reuse_address = True


class SourceAddressServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    # Probing clients open many connections a second; with the default backlog of 5 a busy
    # moment drops SYNs, which would look like lost traffic.
    request_queue_size = 256


def serve(http_port: int, line_port: int) -> None:
    """Serve both until SIGTERM or SIGINT."""
    http_server = SourceAddressServer(("::", http_port), SourceAddressHandler)
    line_server = LineEchoServer(("::", line_port), LineEchoHandler)
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
