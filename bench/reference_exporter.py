#!/usr/bin/env python3
"""The smallest exporter of ws_exporter.py's design, for the benchmark only (never shipped):
ThreadingHTTPServer, a thread per request, and in that thread a blocking connect, TLS by
SSLContext.wrap_socket, the upgrade, a close frame and its answer; three hand-formatted gauges.
No checks, no phases, no limits: the distance from it to ws_exporter.py is what the features cost.

    python3 bench/reference_exporter.py PORT      (SSL_CERT_FILE names the CA for wss://)
"""
import base64
import http.server
import os
import socket
import ssl
import sys
import time
import urllib.parse

CONTEXT = ssl.create_default_context()
CLOSE_FRAME = b"\x88\x82" + b"\x00\x00\x00\x00" + b"\x03\xe8"  # masked close 1000, zero mask key


def probe(target: str, timeout: float) -> tuple:
    url = urllib.parse.urlsplit(target)
    start = time.perf_counter()
    with socket.create_connection((url.hostname, url.port), timeout) as raw:
        sock = CONTEXT.wrap_socket(raw, server_hostname=url.hostname) if url.scheme == "wss" else raw
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                      % (url.path or "/", url.netloc, key)).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not data:
                return 0, time.perf_counter() - start, 0.0
            head += data
        connected = time.perf_counter() - start
        ok = head.startswith(b"HTTP/1.1 101")
        if ok:
            sock.sendall(CLOSE_FRAME)
            sock.recv(65536)
        if sock is not raw:
            sock.close()
    return int(ok), time.perf_counter() - start, connected


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        try:
            success, duration, connected = probe(query["target"][0], 10.0)
        except (OSError, ValueError, KeyError):
            success, duration, connected = 0, 0.0, 0.0
        body = ("# HELP probe_success Displays whether or not the probe was a success\n"
                "# TYPE probe_success gauge\nprobe_success %d\n"
                "# HELP probe_duration_seconds Returns how long the probe took to complete in seconds\n"
                "# TYPE probe_duration_seconds gauge\nprobe_duration_seconds %r\n"
                "# HELP probe_websocket_connection_duration_seconds Duration of the WebSocket connection establishment\n"
                "# TYPE probe_websocket_connection_duration_seconds gauge\n"
                "probe_websocket_connection_duration_seconds %r\n" % (success, duration, connected)).encode()
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # one write: no Nagle wait

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # a scraper that hangs up is no news
    server.serve_forever()
