"""Tests for ws_exporter.py: a specification of its behaviour, run with ``make test``.

The shared helpers come first; then one banner for each section of ws_exporter.py, in its order,
over the test classes of that section; the system tests come last.  Local servers listen on
127.0.0.1 port 0 only.  The system tests need real peers installed by ``.ci/peers`` (paths in
the environment); under CI=true a missing peer fails instead of skipping.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import gc
import hashlib
import http.client
import io
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import xml.etree.ElementTree
from typing import IO, Callable, Dict, Iterator, List, NoReturn, Optional, Set, Tuple
from unittest import mock

import ws_exporter as wx

HERE = os.path.dirname(os.path.abspath(__file__))
IN_CI = os.environ.get("CI") == "true"


# ==============================================================================================
# Shared helpers: what the test classes below have in common
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Frames and handshakes as a server writes and reads them; metrics as a scraper reads them
# ----------------------------------------------------------------------------------------------


def server_frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0) -> bytes:
    """An unmasked frame, as a server sends it."""
    first = (0x80 if fin else 0) | rsv | opcode
    size = len(payload)
    if size <= 125:
        return struct.pack("!BB", first, size) + payload
    if size <= 0xFFFF:
        return struct.pack("!BBH", first, 126, size) + payload
    return struct.pack("!BBQ", first, 127, size) + payload


def server_close(code: int = 1000, reason: bytes = b"") -> bytes:
    return server_frame(wx.Opcode.CLOSE, struct.pack("!H", code) + reason)


def parse_metrics(text: str) -> Dict[str, float]:
    """Sample lines of an exposition, keyed by name{labels} exactly as written."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def failure_of(metrics: Dict[str, float]) -> Optional[Tuple[str, str]]:
    for key in metrics:
        match = re.fullmatch(r'probe_failure_info\{phase="(\w+)",reason="(\w+)"\}', key)
        if match:
            return match.group(1), match.group(2)
    return None


def read_request_head(sock: socket.socket) -> Tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def request_key(head: bytes) -> str:
    match = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)", head)
    assert match is not None
    return match.group(1).decode()


def switching_response(key: str, extra: str = "") -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Accept: %s\r\n%s\r\n" % (wx.expected_accept(key), extra)
    ).encode()


def read_client_frame(sock: socket.socket, buffered: bytes = b"") -> Tuple[int, bytes, bytes]:
    """One masked client frame: (opcode, unmasked payload, bytes left over)."""
    data = buffered
    while True:
        if len(data) >= 2:
            size = data[1] & 0x7F
            offset = 2
            if size == 126:
                size, offset = struct.unpack_from("!H", data, 2)[0], 4
            elif size == 127:
                size, offset = struct.unpack_from("!Q", data, 2)[0], 10
            end = offset + 4 + size
            if len(data) >= end:
                key = data[offset : offset + 4]
                return data[0] & 0x0F, wx.apply_mask(data[offset + 4 : end], key), data[end:]
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk


# ----------------------------------------------------------------------------------------------
# Scripted servers: a behaviour for each connection, run by LocalServer
# ----------------------------------------------------------------------------------------------

Behaviour = Callable[[socket.socket], None]


def good_server(sock: socket.socket) -> None:
    """Accept the upgrade, echo our close."""
    head, rest = read_request_head(sock)
    sock.sendall(switching_response(request_key(head)))
    opcode, payload, _ = read_client_frame(sock, rest)
    if opcode == wx.Opcode.CLOSE:
        sock.sendall(server_frame(wx.Opcode.CLOSE, payload))


def good_server_after_head(sock: socket.socket, head: bytes) -> None:
    sock.sendall(switching_response(request_key(head)))
    opcode, payload, _ = read_client_frame(sock)
    if opcode == wx.Opcode.CLOSE:
        sock.sendall(server_frame(wx.Opcode.CLOSE, payload))


def upgrade_then(*after: bytes, extra: str = "") -> Behaviour:
    """Accept the upgrade, then send ``after`` once our close arrives."""

    def behave(sock: socket.socket) -> None:
        head, rest = read_request_head(sock)
        sock.sendall(switching_response(request_key(head), extra))
        read_client_frame(sock, rest)
        for data in after:
            sock.sendall(data)

    return behave


def answer(raw: bytes) -> Behaviour:
    """Answer the upgrade request with ``raw`` and hang up."""

    def behave(sock: socket.socket) -> None:
        read_request_head(sock)
        sock.sendall(raw)
        sock.close()

    return behave


def silent(sock: socket.socket) -> None:
    """Accept and never say anything."""


class LocalServer:
    """A TCP server on 127.0.0.1:0 running ``behaviour`` for each connection, in threads.
    ``hold`` keeps connections open until the test ends (for silent servers)."""

    def __init__(self, behaviour: Behaviour, tls: Optional[ssl.SSLContext] = None) -> None:
        self.behaviour = behaviour
        self.tls = tls
        self.release = threading.Event()
        self.requests: List[bytes] = []
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock = self.request
                sock.settimeout(10)
                try:
                    if outer.tls is not None:
                        sock = outer.tls.wrap_socket(sock, server_side=True)
                    outer.behaviour(sock)
                    outer.release.wait(10)
                except (OSError, ssl.SSLError, ConnectionError):
                    pass
                finally:
                    sock.close()

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


RpcHandlers = Dict[str, Callable[[Dict[str, object]], List[bytes]]]


def text_frame(message: object) -> bytes:
    return server_frame(wx.Opcode.TEXT, json.dumps(message).encode())


def rpc_reply(request: Dict[str, object], result: object) -> bytes:
    return text_frame({"jsonrpc": "2.0", "id": request["id"], "result": result})


def rpc_error(request_id: object, code: int, message: str) -> bytes:
    return text_frame({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}})


def rpc_notification(method: str, result: object, subscription: object = 7) -> bytes:
    return text_frame({"jsonrpc": "2.0", "method": method, "params": {"subscription": subscription, "result": result}})


def rpc_server(handlers: RpcHandlers, seen: Optional[List[Dict[str, object]]] = None, paths: Tuple[str, ...] = ()) -> Behaviour:
    """Accept the upgrade (with ``paths``, on those paths only: 404 elsewhere); answer each request
    with the frames handlers[method] returns (nothing for other methods), a pong from the client
    with handlers["<pong>"], pings with pongs; echo our close."""

    def behave(sock: socket.socket) -> None:
        head, rest = read_request_head(sock)
        if paths and head.split(b" ")[1].decode() not in paths:
            sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        sock.sendall(switching_response(request_key(head)))
        while True:
            opcode, payload, rest = read_client_frame(sock, rest)
            if opcode == wx.Opcode.CLOSE:
                sock.sendall(server_frame(wx.Opcode.CLOSE, payload))
                return
            if opcode == wx.Opcode.PING:
                sock.sendall(server_frame(wx.Opcode.PONG, payload))
                continue
            request = json.loads(payload) if opcode == wx.Opcode.TEXT else {"method": "<pong>"}
            if seen is not None:
                seen.append(request)
            handler = handlers.get(str(request.get("method")))
            for frame in handler(request) if handler else []:
                sock.sendall(frame)

    return behave


def rpc_series(metrics: Dict[str, float]) -> List[str]:
    """The labels of every probe_rpc_duration_seconds series, sorted."""
    return sorted(k[len("probe_rpc_duration_seconds"):] for k in metrics if k.startswith("probe_rpc_duration_seconds{"))


def replies(result: object) -> Callable[[Dict[str, object]], List[bytes]]:
    return lambda request: [rpc_reply(request, result)]


SOLANA_SLOT = {"parent": 41, "root": 9, "slot": 42}
SUBSTRATE_HEADER = {"number": "0x1b4", "parentHash": "0x00", "stateRoot": "0x00", "extrinsicsRoot": "0x00", "digest": {"logs": []}}


def cometbft_event(request_id: object, height: str, time_text: str) -> bytes:
    header = {"chain_id": "test-1", "height": height, "time": time_text}
    data = {"type": "tendermint/event/NewBlockHeader", "value": {"header": header}}
    return text_frame({"jsonrpc": "2.0", "id": request_id, "result": {"query": "tm.event='NewBlockHeader'", "data": data, "events": {}}})


def evm_block(number: int, timestamp: float) -> Dict[str, object]:
    return {"number": hex(number), "timestamp": hex(int(timestamp)), "hash": "0x00"}


# ----------------------------------------------------------------------------------------------
# The exporter in a thread and as a process
# ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ExporterFixture:
    """The exporter's HTTP server on 127.0.0.1:0 in a thread, with its log captured."""

    def __init__(self, web: Optional[wx.WebConfig] = None, **settings: object) -> None:
        self.log = io.StringIO()
        opts = dict(listen_address="127.0.0.1:0", log_level="debug")
        opts.update(settings)  # type: ignore[arg-type]
        self.exporter = wx.Exporter(wx.Settings(**opts), wx.Logger("debug", "logfmt", self.log))  # type: ignore[arg-type]
        self.server = wx.make_server(self.exporter, web)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def get(self, path: str, headers: Optional[Dict[str, str]] = None, method: str = "GET") -> Tuple[int, Dict[str, str], str]:
        conn = self.connection()
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            body = resp.read().decode("utf-8")
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
        finally:
            conn.close()

    def probe(self, target: str, scrape_timeout: Optional[str] = None, **params: str) -> Dict[str, float]:
        status, headers, body = self.probe_raw(target, scrape_timeout, **params)
        assert status == 200, (status, body)
        assert headers["content-type"] == wx.EXPOSITION_CONTENT_TYPE
        return parse_metrics(body)

    def probe_raw(self, target: str, scrape_timeout: Optional[str] = None, **params: str) -> Tuple[int, Dict[str, str], str]:
        query = wx.urllib.parse.urlencode(dict(target=target, **params))
        headers = {wx.SCRAPE_TIMEOUT_HEADER: scrape_timeout} if scrape_timeout else {}
        return self.get("/probe?" + query, headers)


class ExporterProcess:
    """ws_exporter.py as a subprocess on 127.0.0.1:0; learns its port from the log."""

    def __init__(self, *flags: str, python: str = sys.executable) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [python, os.path.join(HERE, "ws_exporter.py"), "--web.listen-address=127.0.0.1:0", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stderr is not None
        self.first_line = self.proc.stderr.readline()
        match = re.search(r"address[=:\" ]+127\.0\.0\.1:(\d+)", self.first_line)
        if match is None:
            self.proc.kill()
            raise AssertionError("no listen line: %r" % self.first_line)
        self.port = int(match.group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        finally:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream:
                    stream.close()


def http_status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass (for counts that settle as threads
    finish, which no event announces)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def write_config(directory: str, config: object, name: str = "config.json") -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(config if isinstance(config, str) else json.dumps(config))
    return path


# ----------------------------------------------------------------------------------------------
# Certificates, and the exporter behind a protected listener
# ----------------------------------------------------------------------------------------------


def make_pki(directory: str) -> Dict[str, str]:
    """A CA and certificates signed by it (openssl CLI): good (localhost, 127.0.0.1), wrong
    name, expired; plus a self-signed one nobody trusts."""
    paths = {name: os.path.join(directory, name) for name in ("ca.key", "ca.pem", "ext.cnf")}

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "30",
        "-subj", "/CN=ws-exporter test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, san, dates in (
        ("good", "DNS:localhost,IP:127.0.0.1", ("-days", "30")),
        ("wrongname", "DNS:other.example", ("-days", "30")),
        ("expired", "DNS:localhost,IP:127.0.0.1", ()),
    ):
        with open(os.path.join(directory, name + ".cnf"), "w") as f:
            f.write("subjectAltName=%s\nbasicConstraints=CA:FALSE\n" % san)
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", name + ".key", "-out", name + ".csr", "-subj", "/CN=" + name)
        if dates:
            run("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", name + ".pem", "-extfile", name + ".cnf", *dates)
        else:
            _sign_expired(directory, name)
        paths[name + ".pem"] = os.path.join(directory, name + ".pem")
        paths[name + ".key"] = os.path.join(directory, name + ".key")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "self.key", "-out", "self.pem", "-days", "30",
        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    paths["self.pem"] = os.path.join(directory, "self.pem")
    paths["self.key"] = os.path.join(directory, "self.key")
    return paths


def _sign_expired(directory: str, name: str) -> None:
    """openssl ca accepts explicit start and end dates, both in the past."""
    os.makedirs(os.path.join(directory, "db"), exist_ok=True)
    open(os.path.join(directory, "db", "index.txt"), "w").close()
    with open(os.path.join(directory, "db", "serial"), "w") as f:
        f.write("1000\n")
    with open(os.path.join(directory, "ca.cnf"), "w") as f:
        f.write(
            "[ca]\ndefault_ca=test\n[test]\ndir=db\ndatabase=db/index.txt\nserial=db/serial\n"
            "new_certs_dir=db\ndefault_md=sha256\npolicy=any\ncopy_extensions=none\n"
            "[any]\ncommonName=supplied\n"
        )
    subprocess.run(
        ["openssl", "ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key",
         "-in", name + ".csr", "-out", name + ".pem", "-startdate", "20200101000000Z",
         "-enddate", "20200201000000Z", "-extfile", name + ".cnf", "-notext"],
        check=True, capture_output=True, cwd=directory,
    )


def server_tls(paths: Dict[str, str], name: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(paths[name + ".pem"], paths[name + ".key"])
    return context


_PKI_DIR: Optional[str] = None
_PKI: Optional[Dict[str, str]] = None


def shared_pki() -> Dict[str, str]:
    global _PKI, _PKI_DIR
    if _PKI is None:
        _PKI_DIR = tempfile.mkdtemp(prefix="wsx-pki-")
        _PKI = make_pki(_PKI_DIR)
    return _PKI


def tearDownModule() -> None:
    if _PKI_DIR:
        shutil.rmtree(_PKI_DIR, ignore_errors=True)


@contextlib.contextmanager
def trusting(cafile: str) -> Iterator[None]:
    """Probes trust ``cafile`` (through SSL_CERT_FILE, as a user would set it)."""
    with mock.patch.dict(os.environ, {"SSL_CERT_FILE": cafile}):
        wx._TLS_CONTEXT = None
        try:
            yield
        finally:
            wx._TLS_CONTEXT = None


def openssl(directory: str, *args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)


def issue_cert(directory: str, name: str, common_name: str, extensions: str) -> Dict[str, str]:
    """An EC key and a certificate for ``common_name`` signed by the shared test CA, written as
    NAME.key and NAME.pem in ``directory``; each call has a fresh serial."""
    pki = shared_pki()
    with open(os.path.join(directory, name + ".cnf"), "w") as f:
        f.write(extensions)
    openssl(directory, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", name + ".key", "-out", name + ".csr", "-subj", "/CN=" + common_name)
    openssl(directory, "x509", "-req", "-in", name + ".csr", "-CA", pki["ca.pem"], "-CAkey", pki["ca.key"],
            "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "30",
            "-out", name + ".pem", "-extfile", name + ".cnf")
    return {"pem": os.path.join(directory, name + ".pem"), "key": os.path.join(directory, name + ".key")}


SERVER_EXTENSIONS = "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
CLIENT_EXTENSIONS = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"


def client_pki() -> Dict[str, str]:
    """The shared PKI plus client.pem/client.key: a client certificate (CN vmagent) from its CA.
    self.pem, self-signed, serves as a client certificate from a CA nobody configured."""
    pki = shared_pki()
    if "client.pem" not in pki:
        issued = issue_cert(os.path.dirname(pki["ca.pem"]), "client", "vmagent", CLIENT_EXTENSIONS)
        pki["client.pem"], pki["client.key"] = issued["pem"], issued["key"]
    return pki


def basic(user: str, password: str) -> Dict[str, str]:
    token = base64.b64encode(("%s:%s" % (user, password)).encode("utf-8")).decode("ascii")
    return {"Authorization": "Basic " + token}


PASSWORD = "correct horse battery staple"
PROBE_DOWN = "/probe?target=ws://127.0.0.1:1/"


class WatchedLog(io.StringIO):
    """A captured log a test can wait on: the exporter logs a refused handshake in its own
    thread, which may run after the client has already seen the refusal."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = threading.Condition()

    def write(self, text: str) -> int:
        with self.changed:
            count = super().write(text)
            self.changed.notify_all()
        return count

    def wait_for(self, text: str, count: int = 1, timeout: float = 10.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.getvalue().count(text) >= count, timeout)


class ProtectedExporter(ExporterFixture):
    """The exporter behind a web config; requests go over TLS with ``client`` when it is given."""

    def __init__(self, web: wx.WebConfig, client: Optional[ssl.SSLContext] = None) -> None:
        self.client = client
        super().__init__(web)
        self.log = WatchedLog()
        self.exporter.logger.stream = self.log

    def connection(self) -> http.client.HTTPConnection:
        if self.client is None:
            return super().connection()
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=30, context=self.client)


# ----------------------------------------------------------------------------------------------
# Base test cases, and the peers a test needs
# ----------------------------------------------------------------------------------------------


class ProbeTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.exporter = ExporterFixture()
        self.addCleanup(self.exporter.close)

    def serve(self, behaviour: Behaviour, tls: Optional[ssl.SSLContext] = None) -> LocalServer:
        server = LocalServer(behaviour, tls)
        self.addCleanup(server.close)
        return server

    def probe_local(self, behaviour: Behaviour, scheme: str = "ws", scrape_timeout: Optional[str] = "5", tls: Optional[ssl.SSLContext] = None) -> Dict[str, float]:
        server = self.serve(behaviour, tls)
        return self.exporter.probe("%s://127.0.0.1:%d/path" % (scheme, server.port), scrape_timeout)

    def recording_server(self) -> Tuple[LocalServer, List[bytes]]:
        """A good server that keeps the head of every upgrade request it gets."""
        seen: List[bytes] = []

        def record(sock: socket.socket) -> None:
            head, _ = read_request_head(sock)
            seen.append(head)
            good_server_after_head(sock, head)

        return self.serve(record), seen

    def assert_failed(self, metrics: Dict[str, float], phase: str, reason: str, up: int = 0) -> None:
        self.assertEqual(failure_of(metrics), (phase, reason))
        self.assertEqual(metrics["probe_success"], 0)
        self.assertEqual(metrics["probe_websocket_up"], up)


class ChecksTestCase(ProbeTestCase):
    def probe_rpc(self, handlers: RpcHandlers, module: str, scrape_timeout: str = "5", seen: Optional[List[Dict[str, object]]] = None) -> Dict[str, float]:
        server = self.serve(rpc_server(handlers, seen))
        return self.exporter.probe("ws://127.0.0.1:%d/" % server.port, scrape_timeout, module=module)

    def use_config(self, config: Dict[str, object]) -> None:
        self.exporter.exporter.config = wx.parse_config(config)

    def assert_check_failed(self, metrics: Dict[str, float], reason: str) -> None:
        self.assert_failed(metrics, "check", reason, up=1)
        self.assertEqual(metrics["probe_websocket_close_code"], 1000)  # the clean close still ran


def require_peer(case: unittest.TestCase, *names: str) -> None:
    """Skip loudly when a peer is missing, or fail under CI=true, where skips must not hide."""
    missing = [n for n in names if not os.environ.get(n)]
    if not missing:
        return
    message = "peer missing (%s): run .ci/peers and source .cache/peers/env.sh" % ", ".join(missing)
    if IN_CI:
        case.fail(message)
    sys.stderr.write("\n!!! SKIPPING: %s\n" % message)
    case.skipTest(message)


# ==============================================================================================
# RFC 6455 codec (pure: bytes in, bytes out)
# ==============================================================================================


class TestHandshakeCodec(unittest.TestCase):
    KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3

    def response(self, extra: str = "", status: str = "101 Switching Protocols", accept: Optional[str] = None) -> wx.HandshakeResponse:
        accept = wx.expected_accept(self.KEY) if accept is None else accept
        raw = "HTTP/1.1 %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" % status
        raw += ("Sec-WebSocket-Accept: %s\r\n" % accept if accept else "") + extra + "\r\n"
        parsed = wx.ResponseParser().feed(raw.encode())
        assert parsed is not None
        return parsed

    def assert_handshake_error(self, reason: str, response: wx.HandshakeResponse, protocols: Tuple[str, ...] = ()) -> None:
        with self.assertRaises(wx.HandshakeError) as caught:
            wx.validate_handshake(response, self.KEY, protocols)
        self.assertEqual(caught.exception.reason, reason)
        self.assertEqual(caught.exception.phase, "upgrade")

    def test_accept_value_is_the_rfc_example(self) -> None:
        self.assertEqual(wx.expected_accept(self.KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")

    def test_new_key_is_16_random_bytes_in_base64(self) -> None:
        keys = {wx.new_key() for _ in range(50)}
        self.assertEqual(len(keys), 50)
        self.assertTrue(all(len(base64.b64decode(k)) == 16 for k in keys))

    def test_upgrade_request_is_the_rfc_shape(self) -> None:
        request = wx.build_upgrade_request("server.example.com", "/chat?x=1", self.KEY, [("Origin", "http://example.com")])
        self.assertEqual(
            request.decode(),
            "GET /chat?x=1 HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\nUser-Agent: ws-exporter/%s\r\nOrigin: http://example.com\r\n\r\n" % wx.__version__,
        )

    def test_valid_handshake_passes(self) -> None:
        self.assertIsNone(wx.validate_handshake(self.response(), self.KEY))

    def test_parser_keeps_bytes_after_the_head(self) -> None:
        raw = self.response().__class__  # for type checkers
        data = b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n\r\n\x81\x02hi"
        parsed = wx.ResponseParser().feed(data)
        assert parsed is not None and raw
        self.assertEqual(parsed.rest, b"\x81\x02hi")
        self.assertEqual(parsed.headers, (("upgrade", "websocket"),))

    def test_parser_accepts_bytes_one_at_a_time(self) -> None:
        data = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nX: y\r\n\r\n"
        parser = wx.ResponseParser()
        results = [parser.feed(data[i : i + 1]) for i in range(len(data))]
        self.assertTrue(all(r is None for r in results[:-1]))
        self.assertEqual(results[-1], wx.HandshakeResponse(101, "Switching Protocols", (("upgrade", "websocket"), ("x", "y")), b""))

    def test_parser_accepts_bare_lf_line_ends(self) -> None:
        parsed = wx.ResponseParser().feed(b"HTTP/1.1 101 OK\nUpgrade: websocket\n\n")
        assert parsed is not None
        self.assertEqual(parsed.status, 101)

    def test_parser_limits(self) -> None:
        cases = [
            b"HTTP/1.1 101 " + b"x" * (wx.MAX_HANDSHAKE_LINE + 1),
            b"HTTP/1.1 101 OK\r\n" + b"X: y\r\n" * (wx.MAX_HANDSHAKE_HEADERS + 2),
            b"HTTP/1.1 101 OK\r\n" + (b"X: " + b"y" * 4000 + b"\r\n") * 17,
        ]
        for data in cases:
            with self.subTest(size=len(data)), self.assertRaises(wx.HandshakeError) as caught:
                wx.ResponseParser().feed(data)
            self.assertEqual(caught.exception.reason, "response_too_large")

    def test_parser_rejects_malformed_heads(self) -> None:
        for data in (b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 1O1 OK\r\n\r\n", b"HTTP/1.1 101 OK\r\n folded\r\n\r\n", b"HTTP/1.1 101 OK\r\nX : y\r\n\r\n", b"HTTP/1.1 101 OK\r\nnocolon\r\n\r\n"):
            with self.subTest(data=data), self.assertRaises(wx.HandshakeError) as caught:
                wx.ResponseParser().feed(data)
            self.assertEqual(caught.exception.reason, "bad_response")

    def test_non_101_is_http_status_unauthorized_or_rate_limited(self) -> None:
        self.assert_handshake_error("http_status", self.response(status="404 Not Found"))
        self.assert_handshake_error("unauthorized", self.response(status="403 Forbidden"))
        self.assert_handshake_error("unauthorized", self.response(status="401 Unauthorized"))
        self.assert_handshake_error("rate_limited", self.response(status="429 Too Many Requests"))

    def test_missing_or_wrong_upgrade_and_connection(self) -> None:
        for raw in (
            b"HTTP/1.1 101 OK\r\nConnection: Upgrade\r\n\r\n",
            b"HTTP/1.1 101 OK\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
            b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n\r\n",
            b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: close\r\n\r\n",
        ):
            parsed = wx.ResponseParser().feed(raw)
            assert parsed is not None
            with self.subTest(raw=raw):
                self.assert_handshake_error("bad_upgrade", parsed)

    def test_connection_is_a_token_list_and_case_insensitive(self) -> None:
        parsed = wx.ResponseParser().feed(
            ("HTTP/1.1 101 OK\r\nUpgrade: WebSocket\r\nConnection: keep-alive, UPGRADE\r\n"
             "Sec-WebSocket-Accept: %s\r\n\r\n" % wx.expected_accept(self.KEY)).encode()
        )
        assert parsed is not None
        self.assertIsNone(wx.validate_handshake(parsed, self.KEY))

    def test_accept_must_match_exactly(self) -> None:
        good = wx.expected_accept(self.KEY)
        for accept in ("", good.lower(), good + "=", " x" + good):
            with self.subTest(accept=accept):
                self.assert_handshake_error("bad_accept", self.response(accept=accept or ""))
        self.assert_handshake_error("bad_accept", self.response(extra="Sec-WebSocket-Accept: %s\r\n" % good))

    def test_extension_not_offered_is_refused(self) -> None:
        self.assert_handshake_error("unexpected_extension", self.response(extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"))

    def test_subprotocol_must_be_one_offered(self) -> None:
        self.assert_handshake_error("unexpected_subprotocol", self.response(extra="Sec-WebSocket-Protocol: graphql-ws\r\n"))
        self.assert_handshake_error("unexpected_subprotocol", self.response(extra="Sec-WebSocket-Protocol: a, b\r\n"), ("a", "b"))
        chosen = wx.validate_handshake(self.response(extra="Sec-WebSocket-Protocol: B\r\n"), self.KEY, ("a", "b"))
        self.assertEqual(chosen, "b")


class TestFrameCodec(unittest.TestCase):
    def reader_events(self, data: bytes, max_message: int = wx.MAX_MESSAGE_BYTES) -> List[wx.Event]:
        return wx.FrameReader(max_message).feed(data)

    def assert_frame_error(self, data: bytes, reason: str = "protocol_error", max_message: int = wx.MAX_MESSAGE_BYTES) -> None:
        with self.assertRaises(wx.FrameError) as caught:
            self.reader_events(data, max_message)
        self.assertEqual(caught.exception.reason, reason)

    def test_masked_hello_is_the_rfc_example(self) -> None:
        # RFC 6455 §5.7: a single-frame masked text message "Hello".
        frame = wx.encode_frame(wx.Opcode.TEXT, b"Hello", mask_key=b"\x37\xfa\x21\x3d")
        self.assertEqual(frame, bytes.fromhex("818537fa213d7f9f4d5158"))

    def test_each_frame_gets_a_fresh_mask(self) -> None:
        keys = {wx.encode_frame(wx.Opcode.TEXT, b"x")[2:6] for _ in range(50)}
        self.assertGreater(len(keys), 45)

    def test_extended_lengths(self) -> None:
        self.assertEqual(wx.encode_frame(wx.Opcode.BINARY, b"\0" * 256, mask_key=b"\0" * 4)[:4], bytes.fromhex("82fe0100"))
        self.assertEqual(wx.encode_frame(wx.Opcode.BINARY, b"\0" * 65536, mask_key=b"\0" * 4)[:10], bytes.fromhex("82ff0000000000010000"))
        self.assertEqual(self.reader_events(bytes.fromhex("827e0100") + b"a" * 256), [wx.Message(wx.Opcode.BINARY, b"a" * 256)])
        self.assertEqual(self.reader_events(bytes.fromhex("827f0000000000010000") + b"a" * 65536), [wx.Message(wx.Opcode.BINARY, b"a" * 65536)])

    def test_masking_round_trips(self) -> None:
        payload = os.urandom(1001)
        self.assertEqual(wx.apply_mask(wx.apply_mask(payload, b"abcd"), b"abcd"), payload)
        self.assertEqual(wx.apply_mask(b"", b"abcd"), b"")

    def test_unmasked_text_and_fragments_are_the_rfc_examples(self) -> None:
        self.assertEqual(self.reader_events(bytes.fromhex("810548656c6c6f")), [wx.Message(wx.Opcode.TEXT, b"Hello")])
        self.assertEqual(self.reader_events(bytes.fromhex("010348656c80026c6f")), [wx.Message(wx.Opcode.TEXT, b"Hello")])

    def test_ping_in_the_middle_of_a_fragmented_message(self) -> None:
        data = server_frame(wx.Opcode.TEXT, b"He", fin=False) + server_frame(wx.Opcode.PING, b"p") + server_frame(wx.Opcode.CONTINUATION, b"llo")
        self.assertEqual(self.reader_events(data), [wx.Ping(b"p"), wx.Message(wx.Opcode.TEXT, b"Hello")])

    def test_ping_is_answered_with_a_masked_pong_echoing_it(self) -> None:
        pong = wx.encode_pong(wx.Ping(b"abc"))
        self.assertEqual(pong[0], 0x8A)
        self.assertEqual(pong[1], 0x80 | 3)
        self.assertEqual(wx.apply_mask(pong[6:], pong[2:6]), b"abc")

    def test_frames_split_at_every_byte(self) -> None:
        data = server_frame(wx.Opcode.TEXT, b"x" * 300) + server_close(1001, b"bye")
        reader = wx.FrameReader()
        events: List[wx.Event] = []
        for i in range(len(data)):
            events += reader.feed(data[i : i + 1])
        self.assertEqual(events, [wx.Message(wx.Opcode.TEXT, b"x" * 300), wx.Close(1001, "bye")])

    def test_nothing_is_read_after_close(self) -> None:
        reader = wx.FrameReader()
        self.assertEqual(reader.feed(server_close(1000) + b"\xff\xff garbage"), [wx.Close(1000, "")])
        self.assertEqual(reader.feed(b"more"), [])

    def test_close_payloads(self) -> None:
        self.assertEqual(self.reader_events(server_frame(wx.Opcode.CLOSE)), [wx.Close(wx.CloseCode.NO_STATUS_RECEIVED, "")])
        for code in (1000, 1001, 1003, 1007, 1011, 1012, 1014, 3000, 4999):
            self.assertEqual(self.reader_events(server_close(code)), [wx.Close(code, "")])
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000):
            with self.subTest(code=code):
                self.assert_frame_error(server_close(code))
        self.assert_frame_error(server_frame(wx.Opcode.CLOSE, b"\x03"))
        self.assert_frame_error(server_close(1000, b"\xff"))

    def test_protocol_violations(self) -> None:
        cases = {
            "masked": b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58",
            "rsv1": server_frame(wx.Opcode.TEXT, b"x", rsv=0x40),
            "opcode 3": server_frame(3, b""),
            "opcode 0xB": server_frame(0xB, b""),
            "fragmented ping": server_frame(wx.Opcode.PING, b"x", fin=False),
            "long ping": server_frame(wx.Opcode.PING, b"x" * 126),
            "2^63 length": b"\x82\x7f\x80\x00\x00\x00\x00\x00\x00\x00",
            "non-minimal 16": b"\x82\x7e\x00\x05hello",
            "non-minimal 64": b"\x82\x7f" + struct.pack("!Q", 100),
            "lonely continuation": server_frame(wx.Opcode.CONTINUATION, b"x"),
            "text during fragments": server_frame(wx.Opcode.TEXT, b"a", fin=False) + server_frame(wx.Opcode.TEXT, b"b"),
            "invalid utf-8": server_frame(wx.Opcode.TEXT, b"\xc3\x28"),
            "truncated utf-8 at end": server_frame(wx.Opcode.TEXT, b"\xe2\x82"),
            "utf-8 surrogate": server_frame(wx.Opcode.TEXT, b"\xed\xa0\x80"),
        }
        for name, data in cases.items():
            with self.subTest(name):
                self.assert_frame_error(data)

    def test_invalid_utf8_fails_before_the_message_ends(self) -> None:
        reader = wx.FrameReader()
        with self.assertRaises(wx.FrameError):
            reader.feed(server_frame(wx.Opcode.TEXT, b"ok\xff", fin=False))

    def test_utf8_split_across_fragments_is_valid(self) -> None:
        euro = "\u20ac".encode()
        data = server_frame(wx.Opcode.TEXT, euro[:1], fin=False) + server_frame(wx.Opcode.CONTINUATION, euro[1:])
        self.assertEqual(self.reader_events(data), [wx.Message(wx.Opcode.TEXT, euro)])

    def test_message_size_limit_counts_all_fragments(self) -> None:
        self.assert_frame_error(server_frame(wx.Opcode.BINARY, b"x" * 101), "message_too_large", 100)
        data = server_frame(wx.Opcode.BINARY, b"x" * 60, fin=False) + server_frame(wx.Opcode.CONTINUATION, b"x" * 60)
        self.assert_frame_error(data, "message_too_large", 100)
        # A huge claimed length fails on the header alone, before any payload is buffered.
        self.assert_frame_error(b"\x82\x7f" + struct.pack("!Q", 2**40), "message_too_large")

    def test_close_frame_encoding(self) -> None:
        frame = wx.encode_close(1000)
        self.assertEqual(frame[0], 0x88)
        self.assertEqual(wx.apply_mask(frame[6:], frame[2:6]), b"\x03\xe8")


def fuzz_handshake(data: bytearray, step: int) -> str:
    """Feed ``data`` to a ResponseParser ``step`` bytes at a time; say how it ended.  Any
    exception but the codec's own fails the test."""
    parser = wx.ResponseParser()
    for i in range(0, len(data), step):
        try:
            response = parser.feed(bytes(data[i : i + step]))
        except wx.HandshakeError as err:
            assert err.reason in wx.FAILURE_REASONS
            return "parser"
        if response is not None:
            try:
                wx.validate_handshake(response, "dGhlIHNhbXBsZSBub25jZQ==")
            except wx.HandshakeError:
                return "validation"
            return "accepted"
    return "incomplete"


class TestCodecFuzz(unittest.TestCase):
    """Random inputs for the two parsers: nothing but the codec's own errors may escape."""

    def test_handshake_parser(self) -> None:
        rng = random.Random(6455)
        outcomes: Dict[str, int] = collections.Counter()
        valid = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n"
        for _ in range(3000):
            data = bytearray(valid)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.3:
                data = bytearray(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
            outcomes[fuzz_handshake(data, rng.randint(1, 40))] += 1
        # Each path was reached many times: incomplete heads, heads the parser refused, and heads
        # that parsed and then failed validation (the accept value "x" is never right).
        self.assertGreater(min(outcomes.values()), 100, outcomes)
        self.assertEqual(set(outcomes), {"incomplete", "parser", "validation"})

    def test_frame_reader(self) -> None:
        rng = random.Random(1337)
        seeds = [server_frame(wx.Opcode.TEXT, b"hello"), server_frame(wx.Opcode.BINARY, b"x" * 300),
                 server_frame(wx.Opcode.PING, b"p"), server_close(1000, b"bye"),
                 server_frame(wx.Opcode.TEXT, b"a", fin=False) + server_frame(wx.Opcode.CONTINUATION, b"b")]
        for _ in range(3000):
            data = bytearray(b"".join(rng.choice(seeds) for _ in range(rng.randint(1, 4))))
            for _ in range(rng.randint(0, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            reader = wx.FrameReader(max_message=4096)
            try:
                for i in range(0, len(data), rng.randint(1, 64)):
                    for event in reader.feed(bytes(data[i : i + 64])):
                        self.assertIsInstance(event, (wx.Message, wx.Ping, wx.Pong, wx.Close))
            except wx.ProbeError as err:
                self.assertIn(err.reason, wx.FAILURE_REASONS)


# ==============================================================================================
# Probe (I/O: one deadline, timed phases)
# ==============================================================================================


class TestTargets(unittest.TestCase):
    def test_forms(self) -> None:
        cases = {
            "wss://node.example/KEY": wx.Target(True, "node.example", 443, "/KEY", ""),
            "ws://node.example": wx.Target(False, "node.example", 80, "/", ""),
            "https://Node.Example:8443/a?b=c": wx.Target(True, "node.example", 8443, "/a?b=c", ""),
            "http://10.0.0.1:8546": wx.Target(False, "10.0.0.1", 8546, "/", ""),
            "node.example:8546/ws": wx.Target(False, "node.example", 8546, "/ws", ""),
            "localhost:8545": wx.Target(False, "localhost", 8545, "/", ""),
            "ws://[::1]:8546/": wx.Target(False, "::1", 8546, "/", ""),
            "wss://user:p%40ss@h.example/": wx.Target(True, "h.example", 443, "/", "user:p@ss"),
            "ws://b\u00fccher.example/": wx.Target(False, "xn--bcher-kva.example", 80, "/", ""),
        }
        for raw, target in cases.items():
            self.assertEqual(wx.parse_target(raw), target, raw)

    def test_host_header_has_port_only_when_not_default(self) -> None:
        self.assertEqual(wx.parse_target("wss://a.example/").host_header(), "a.example")
        self.assertEqual(wx.parse_target("wss://a.example:80/").host_header(), "a.example:80")
        self.assertEqual(wx.parse_target("ws://[::1]:81/").host_header(), "[::1]:81")

    def test_bad_targets(self) -> None:
        for raw in ("", "ws://", "ws://:80/", "ws://h:99999/", "ws://h:0/", "ws://h:x/", "ftp://h/", "file:///etc/passwd", "javascript:alert(1)",
                    "ws://::1/", "localhost", "anvil-secrt", "[::1]", "node.example/ws", "ws://h/a b", "ws://h/\x00", "ws://h/#frag", "ws://h!x/", "ws://a..b/" + "x" * 0, "ws://-\u0000/"):
            with self.subTest(raw=raw), self.assertRaises(wx.ProbeError) as caught:
                wx.parse_target(raw)
            self.assertEqual((caught.exception.phase, caught.exception.reason), ("target", "bad_target"))

    def test_a_bare_word_is_not_probed_as_a_host_it_may_be_a_misspelled_alias(self) -> None:
        with self.assertRaises(wx.ProbeError) as caught:
            wx.parse_target("anvil-secrt")
        self.assertIn("no target alias by that name", caught.exception.detail)

    def test_redaction_hides_path_query_and_userinfo(self) -> None:
        target = wx.parse_target("wss://u:secret@node.example/v3/TOKEN123?key=abc")
        shown = target.redacted()
        self.assertRegex(shown, r"^wss://node\.example:443/<[0-9a-f]{8}>$")
        self.assertEqual(shown, wx.parse_target("wss://u:secret@node.example/v3/TOKEN123?key=abc").redacted())
        self.assertNotEqual(shown, wx.parse_target("wss://node.example/v3/TOKEN124?key=abc").redacted())
        self.assertEqual(wx.parse_target("ws://node.example").redacted(), "ws://node.example:80/")


class TestProbe(ProbeTestCase):
    def test_good_server_succeeds_with_every_phase(self) -> None:
        metrics = self.probe_local(good_server)
        self.assertEqual(metrics["probe_success"], 1)
        self.assertEqual(metrics["probe_websocket_up"], 1)
        self.assertEqual(metrics["probe_websocket_status_code"], 101)
        self.assertEqual(metrics["probe_websocket_close_code"], 1000)
        self.assertEqual(metrics["probe_ip_protocol"], 4)
        self.assertIsNone(failure_of(metrics))
        for phase in ("connect", "upgrade", "close"):
            self.assertGreater(metrics['probe_websocket_duration_seconds{phase="%s"}' % phase], 0, phase)
        self.assertEqual(metrics['probe_websocket_duration_seconds{phase="tls"}'], 0)
        phases = sum(metrics['probe_websocket_duration_seconds{phase="%s"}' % p] for p in ("resolve", "connect", "tls", "upgrade"))
        self.assertAlmostEqual(metrics["probe_websocket_connection_duration_seconds"], phases, places=6)
        self.assertGreaterEqual(metrics["probe_duration_seconds"], metrics["probe_websocket_connection_duration_seconds"])
        self.assertLess(metrics["probe_duration_seconds"], 1.0)
        self.assertNotIn("probe_tls_version_info", " ".join(metrics))

    def test_request_carries_host_key_version_and_user_agent(self) -> None:
        server, seen = self.recording_server()
        self.exporter.probe("ws://localhost:%d/a/b?c=d" % server.port)
        head = seen[0].decode()
        self.assertTrue(head.startswith("GET /a/b?c=d HTTP/1.1\r\n"))
        self.assertIn("\r\nHost: localhost:%d\r\n" % server.port, head)
        self.assertIn("\r\nSec-WebSocket-Version: 13\r\n", head)
        self.assertIn("\r\nUser-Agent: ws-exporter/%s\r\n" % wx.__version__, head + "\r\n")
        self.assertEqual(len(base64.b64decode(request_key(seen[0]))), 16)

    def test_userinfo_becomes_basic_auth(self) -> None:
        server, seen = self.recording_server()
        metrics = self.exporter.probe("ws://alice:s3cret@127.0.0.1:%d/" % server.port)
        self.assertEqual(metrics["probe_success"], 1)
        self.assertIn(b"Authorization: Basic " + base64.b64encode(b"alice:s3cret"), seen[0])

    def test_frames_sent_with_the_101_are_kept(self) -> None:
        def eager(sock: socket.socket) -> None:
            head, rest = read_request_head(sock)
            sock.sendall(switching_response(request_key(head)) + server_frame(wx.Opcode.TEXT, b"hello") + server_close(1001))

        metrics = self.probe_local(eager)
        self.assertEqual(metrics["probe_success"], 1)
        self.assertEqual(metrics["probe_websocket_close_code"], 1001)

    def test_closed_port_is_connect_refused(self) -> None:
        metrics = self.exporter.probe("ws://127.0.0.1:%d/" % free_port())
        self.assert_failed(metrics, "connect", "connect_refused")
        self.assertEqual(metrics["probe_websocket_connection_duration_seconds"], 0)
        self.assertEqual(metrics["probe_websocket_status_code"], 0)

    def test_unresolvable_name_is_dns_error(self) -> None:
        def no_such_name(host: str, port: int, flags: int) -> List[wx.AddrInfo]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        with mock.patch.object(wx, "_getaddrinfo", no_such_name):
            metrics = self.exporter.probe("wss://no-such-node.example/")
        self.assert_failed(metrics, "resolve", "dns_error")

    def test_a_hanging_resolver_obeys_the_deadline(self) -> None:
        release = threading.Event()
        self.addCleanup(release.set)

        def hang(host: str, port: int, flags: int) -> List[wx.AddrInfo]:
            release.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "late")

        with mock.patch.object(wx, "_getaddrinfo", hang):
            start = time.monotonic()
            metrics = self.exporter.probe("wss://slow-dns.example/", scrape_timeout="1.5")
            elapsed = time.monotonic() - start
        self.assert_failed(metrics, "resolve", "timeout")
        self.assertLess(elapsed, 2.5)
        self.assertAlmostEqual(metrics["probe_timeout_seconds"], 1.0)

    def test_silent_server_fails_inside_the_scrape_timeout(self) -> None:
        server = self.serve(silent)
        start = time.monotonic()
        metrics = self.exporter.probe("ws://127.0.0.1:%d/" % server.port, scrape_timeout="2")
        elapsed = time.monotonic() - start
        self.assert_failed(metrics, "upgrade", "timeout")
        self.assertEqual(metrics["probe_timeout_seconds"], 1.5)
        self.assertLessEqual(metrics["probe_duration_seconds"], 1.6)
        self.assertLess(elapsed, 2.0)

    def test_non_101_answers_fail_with_their_reason_and_keep_the_status(self) -> None:
        reasons = {200: "http_status", 301: "http_status", 401: "unauthorized", 403: "unauthorized",
                   429: "rate_limited", 503: "http_status"}
        for status, reason in reasons.items():
            with self.subTest(status=status):
                raw = b"HTTP/1.1 %d Nope\r\nContent-Length: 0\r\nRetry-After: 5\r\nLocation: /x\r\n\r\n" % status
                metrics = self.probe_local(answer(raw))
                self.assert_failed(metrics, "upgrade", reason)
                self.assertEqual(metrics["probe_websocket_status_code"], status)

    def test_a_close_with_1008_or_1013_is_rate_limited(self) -> None:
        for code in (1008, 1013):
            closing = server_frame(wx.Opcode.CLOSE, struct.pack("!H", code))
            with self.subTest(code=code):
                metrics = self.probe_local(upgrade_then(closing))
                self.assert_failed(metrics, "close", "rate_limited", up=1)
                self.assertEqual(metrics["probe_websocket_close_code"], code)
        metrics = self.probe_local(upgrade_then(server_frame(wx.Opcode.CLOSE, struct.pack("!H", 1001))))
        self.assertEqual(metrics["probe_success"], 1)

    def test_handshake_failures(self) -> None:
        key_free = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: bm9wZQ==\r\n\r\n"
        cases = {
            "bad_accept": answer(key_free),
            "bad_response": answer(b"garbage garbage\r\n\r\n"),
            "unexpected_extension": upgrade_then(extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"),
            "unexpected_subprotocol": upgrade_then(extra="Sec-WebSocket-Protocol: wamp\r\n"),
            "connection_closed": answer(b"HTTP/1.1 101 Swi"),
        }
        for reason, behaviour in cases.items():
            with self.subTest(reason=reason):
                self.assert_failed(self.probe_local(behaviour), "upgrade", reason)

    def test_protocol_errors_after_the_upgrade_fail_in_close(self) -> None:
        cases = {
            "masked": b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58",
            "2^63": b"\x82\x7f\x80\x00\x00\x00\x00\x00\x00\x00",
            "fragmented control": server_frame(wx.Opcode.PING, b"x", fin=False),
            "bad utf-8": server_frame(wx.Opcode.TEXT, b"\xff"),
            "bad close code": server_close(1005),
        }
        for name, data in cases.items():
            with self.subTest(name):
                metrics = self.probe_local(upgrade_then(data))
                self.assert_failed(metrics, "close", "protocol_error", up=1)
                self.assertEqual(metrics["probe_websocket_status_code"], 101)

    def test_server_that_never_answers_the_close_still_succeeds(self) -> None:
        start = time.monotonic()
        metrics = self.probe_local(upgrade_then())
        self.assertEqual(metrics["probe_success"], 1)
        self.assertEqual(metrics["probe_websocket_close_code"], 0)
        self.assertLess(time.monotonic() - start, wx.CLOSE_WAIT_SECONDS + 1.5)

    def test_server_hanging_up_without_close_still_succeeds(self) -> None:
        def hang_up(sock: socket.socket) -> None:
            head, rest = read_request_head(sock)
            sock.sendall(switching_response(request_key(head)))
            read_client_frame(sock, rest)
            sock.close()

        metrics = self.probe_local(hang_up)
        self.assertEqual(metrics["probe_success"], 1)
        self.assertEqual(metrics["probe_websocket_close_code"], 0)

    def test_each_probe_has_its_own_result(self) -> None:
        good = self.serve(good_server)
        dead = free_port()
        outcomes: Dict[str, List[float]] = {"good": [], "dead": []}

        def run(name: str, url: str) -> None:
            for _ in range(5):
                metrics = self.exporter.probe(url)
                outcomes[name].append(metrics["probe_success"] + 10 * (failure_of(metrics) is not None))

        threads = [threading.Thread(target=run, args=("good", "ws://127.0.0.1:%d/" % good.port)),
                   threading.Thread(target=run, args=("dead", "ws://127.0.0.1:%d/" % dead))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(outcomes, {"good": [1.0] * 5, "dead": [10.0] * 5})


def tcp_aborts() -> Optional[int]:
    """Resets this host's TCP sent for data that arrived at a socket closed, or closed unread
    (TcpExt TCPAbortOnData and TCPAbortOnClose in /proc/net/netstat); None where unreadable."""
    try:
        with open("/proc/net/netstat") as f:
            lines = [line.split() for line in f if line.startswith("TcpExt:")]
        figures = dict(zip(lines[0][1:], map(int, lines[1][1:])))
        return figures["TCPAbortOnData"] + figures["TCPAbortOnClose"]
    except (OSError, IndexError, KeyError, ValueError):
        return None


class TestProbeTLS(ProbeTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.pki = shared_pki()

    def test_trusted_certificate_succeeds_with_tls_metrics(self) -> None:
        with trusting(self.pki["ca.pem"]):
            metrics = self.probe_local(good_server, "wss", tls=server_tls(self.pki, "good"))
        self.assertEqual(metrics["probe_success"], 1)
        self.assertGreater(metrics['probe_websocket_duration_seconds{phase="tls"}'], 0)
        self.assertTrue(any(k.startswith('probe_tls_version_info{version="TLS 1.') for k in metrics))
        self.assertEqual(len([k for k in metrics if k.startswith("probe_tls_cipher_info{cipher=")]), 1)
        expiry = metrics["probe_ssl_earliest_cert_expiry"]
        self.assertGreater(expiry, time.time() + 20 * 86400)
        self.assertLess(expiry, time.time() + 40 * 86400)

    def test_the_tls_phase_ends_when_the_servers_handshake_arrived(self) -> None:
        """An exporter busy elsewhere finishes the handshake late; the phase is the server's."""
        original = wx.certificate_expiry

        def slow(tls: ssl.SSLObject) -> Optional[float]:
            time.sleep(0.3)  # the exporter's own delay, simulated: not synchronisation
            return original(tls)

        with trusting(self.pki["ca.pem"]), mock.patch.object(wx, "certificate_expiry", slow):
            metrics = self.probe_local(good_server, "wss", tls=server_tls(self.pki, "good"))
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertLess(metrics['probe_websocket_duration_seconds{phase="tls"}'], 0.25)
        self.assertGreater(metrics["probe_duration_seconds"], 0.3)

    def test_the_servers_close_notify_is_read_so_the_connection_ends_without_a_reset(self) -> None:
        """RFC 6455 §7.1.1 (the server closes first) over TLS: a client that closed with the
        server's close_notify unread, or arriving, would answer it with a reset."""
        ended: List[bool] = []

        def close_then_notify(sock: socket.socket) -> None:
            good_server(sock)
            assert isinstance(sock, ssl.SSLSocket)
            with contextlib.suppress(ssl.SSLError, OSError):
                sock.unwrap()  # our close_notify, after the close frame; then wait for the client's end
            ended.append(True)

        before = tcp_aborts()
        with trusting(self.pki["ca.pem"]):
            for _ in range(3):
                metrics = self.probe_local(close_then_notify, "wss", tls=server_tls(self.pki, "good"))
                self.assertEqual(metrics["probe_websocket_close_code"], 1000, failure_of(metrics))
        deadline = time.monotonic() + 10
        while len(ended) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # the server's thread notes the end after the probe's answer
        self.assertEqual(len(ended), 3)
        if before is not None:
            self.assertEqual(tcp_aborts(), before, "connections reset on this host")

    def test_certificate_problems_are_tls_verify(self) -> None:
        with trusting(self.pki["ca.pem"]):
            for name in ("self", "wrongname", "expired"):
                with self.subTest(name=name):
                    metrics = self.probe_local(good_server, "wss", tls=server_tls(self.pki, name))
                    self.assert_failed(metrics, "tls", "tls_verify")
                    self.assertNotIn("probe_ssl_earliest_cert_expiry", metrics)

    def test_plain_http_on_a_wss_target_is_a_tls_error(self) -> None:
        def plain_http(sock: socket.socket) -> None:
            sock.recv(1024)  # the ClientHello, which a plain HTTP server reads as garbage
            sock.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            sock.close()

        metrics = self.probe_local(plain_http, "wss")
        self.assert_failed(metrics, "tls", "tls_error")

    def test_answers_in_many_small_tls_records_are_put_together(self) -> None:
        def one_byte_per_record(sock: socket.socket) -> None:
            head, rest = read_request_head(sock)
            for byte in switching_response(request_key(head)):
                sock.sendall(bytes([byte]))  # each send is a TLS record of its own
            opcode, payload, _ = read_client_frame(sock, rest)
            for byte in server_frame(wx.Opcode.CLOSE, payload):
                sock.sendall(bytes([byte]))

        with trusting(self.pki["ca.pem"]):
            metrics = self.probe_local(one_byte_per_record, "wss", tls=server_tls(self.pki, "good"))
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual(metrics["probe_websocket_close_code"], 1000)

    def test_a_server_silent_after_the_client_hello_is_a_tls_timeout_within_the_deadline(self) -> None:
        def silent(sock: socket.socket) -> None:
            sock.recv(4096)  # the ClientHello
            sock.recv(1)  # until the exporter gives up and closes

        metrics = self.probe_local(silent, "wss", scrape_timeout="2")
        self.assert_failed(metrics, "tls", "timeout")
        self.assertLess(metrics["probe_duration_seconds"], 2.0)

    def test_a_server_closing_during_the_handshake_is_a_tls_error(self) -> None:
        def hang_up(sock: socket.socket) -> None:
            sock.recv(4096)  # the ClientHello
            sock.close()

        metrics = self.probe_local(hang_up, "wss")
        self.assert_failed(metrics, "tls", "tls_error")

    def test_tls_on_a_ws_target_fails_the_upgrade(self) -> None:
        with trusting(self.pki["ca.pem"]):
            metrics = self.probe_local(good_server, "ws", scrape_timeout="2", tls=server_tls(self.pki, "good"))
        self.assertEqual(failure_of(metrics)[0], "upgrade")  # type: ignore[index]
        self.assertEqual(metrics["probe_success"], 0)


class TestCertificateExpiry(unittest.TestCase):
    def test_each_certificate_is_decoded_once_and_the_cache_is_bounded(self) -> None:
        decoded: List[bytes] = []

        class Peer:
            def __init__(self, der: bytes) -> None:
                self.der = der

            def getpeercert(self, binary_form: bool = False) -> object:
                if binary_form:
                    return self.der
                decoded.append(self.der)
                return {"notAfter": "Jan  2 03:04:05 2030 GMT"}

        with mock.patch.object(wx, "_EXPIRIES", collections.OrderedDict()), mock.patch.object(wx, "MAX_CACHED_CERTIFICATES", 2):
            for der in (b"a", b"a", b"b", b"a", b"c", b"b"):
                self.assertEqual(wx.certificate_expiry(Peer(der)), 1893553445.0)  # type: ignore[arg-type]
            self.assertEqual(decoded, [b"a", b"b", b"c", b"b"])  # "b" was the oldest when "c" came
            self.assertEqual(list(wx._EXPIRIES), [b"c", b"b"])


class TestArrivalStamps(unittest.TestCase):
    def stamp(self, seconds_ago: float) -> List[Tuple[int, int, bytes]]:
        wall = time.time() - seconds_ago
        payload = wx._TIMESPEC.pack(int(wall), int((wall % 1) * 1e9))
        return [(socket.SOL_SOCKET, wx.SO_TIMESTAMPNS, payload)]

    def test_a_stamp_moves_the_arrival_back_to_when_the_kernel_received_the_data(self) -> None:
        if not wx.SO_TIMESTAMPNS:
            self.skipTest("no SO_TIMESTAMPNS on this platform")
        before = time.perf_counter()
        arrived = wx.arrival_time(self.stamp(0.5))
        self.assertAlmostEqual(before - arrived, 0.5, delta=0.05)

    def test_without_a_usable_stamp_the_arrival_is_now(self) -> None:
        for ancillary in ([], self.stamp(-5.0), self.stamp(3600.0)):
            before = time.perf_counter()
            arrived = wx.arrival_time(ancillary)
            self.assertGreaterEqual(arrived, before)
            self.assertLessEqual(arrived, time.perf_counter())

    def test_upgrade_phase_spans_the_servers_delay(self) -> None:
        delay = 0.2

        def handler(conn: socket.socket) -> None:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            key = re.search(rb"Sec-WebSocket-Key: (\S+)", request).group(1).decode()  # type: ignore[union-attr]
            time.sleep(delay)
            conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          "Sec-WebSocket-Accept: %s\r\n\r\n" % wx.expected_accept(key)).encode())
            conn.recv(4096)
            conn.sendall(server_close())

        server = LocalServer(handler)
        self.addCleanup(server.close)
        result = wx.ProbeResult("connect", 5.0)
        log = wx.ProbeLog(wx.Logger("error", "logfmt", io.StringIO()))
        wx.run_probe("ws://127.0.0.1:%d/" % server.port, wx.Module("connect"), wx.Deadline(5.0), result, log)
        self.assertTrue(result.success, result.failure)
        self.assertGreaterEqual(result.durations["upgrade"], delay)
        self.assertLess(result.durations["upgrade"], delay + 0.1)


class TestSendWithin(unittest.TestCase):
    def test_a_client_reading_slowly_cannot_stretch_a_response_past_the_write_timeout(self) -> None:
        """Over TLS too, where sendall would give every chunk the whole timeout again."""
        pki = shared_pki()
        server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_side.load_cert_chain(pki["good.pem"], pki["good.key"])
        client_side = ssl.create_default_context(cafile=pki["ca.pem"])
        for tls in (False, True):
            with self.subTest(tls=tls):
                ours, theirs = socket.socketpair()
                self.addCleanup(ours.close)
                self.addCleanup(theirs.close)
                if tls:
                    client: List[socket.socket] = []
                    handshake = threading.Thread(
                        target=lambda: client.append(client_side.wrap_socket(theirs, server_hostname="localhost"))
                    )
                    handshake.start()
                    ours = server_side.wrap_socket(ours, server_side=True)
                    handshake.join(5)
                    theirs = client[0]
                    self.addCleanup(theirs.close)
                stop = threading.Event()

                def drip() -> None:  # 16 KB every 50 ms: progress all along, far too slow
                    while not stop.wait(0.05):
                        try:
                            theirs.recv(16384)
                        except OSError:
                            return

                reader = threading.Thread(target=drip)
                reader.start()
                ours.setblocking(False)  # as the handler's connections are
                start = time.monotonic()
                with self.assertRaises(socket.timeout):
                    wx.send_within(ours, b"x" * (8 * 1024 * 1024), 0.5)
                stop.set()
                reader.join(5)
                self.assertLess(time.monotonic() - start, 3.0)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class TestModuleTransport(ChecksTestCase):
    def test_origin_and_headers_are_sent(self) -> None:
        self.use_config({"modules": {"o": {"origin": "https://app.example", "headers": {"X-Api-Key": "k1"}}}})
        heads: List[bytes] = []

        def record(sock: socket.socket) -> None:
            head, rest = read_request_head(sock)
            heads.append(head)
            good_server_after_head(sock, head)

        server = self.serve(record)
        self.assertEqual(self.exporter.probe("ws://127.0.0.1:%d/" % server.port, module="o")["probe_success"], 1)
        self.assertIn(b"\r\nOrigin: https://app.example", heads[0])
        self.assertIn(b"\r\nX-Api-Key: k1", heads[0])

    def test_ip_protocol_without_fallback(self) -> None:
        self.use_config({"modules": {"v6": {"ip_protocol": "ip6", "ip_protocol_fallback": False}, "v6f": {"ip_protocol": "ip6"}}})
        server = self.serve(good_server)
        self.assertEqual(failure_of(self.exporter.probe("ws://127.0.0.1:%d/" % server.port, module="v6")), ("resolve", "dns_error"))
        self.assertEqual(self.exporter.probe("ws://127.0.0.1:%d/" % server.port, module="v6f")["probe_success"], 1)

    def test_tls_options(self) -> None:
        pki = shared_pki()
        self.use_config({"modules": {
            "ca": {"tls": {"ca_file": pki["ca.pem"], "min_version": "TLS12"}},
            "named": {"tls": {"ca_file": pki["ca.pem"], "server_name": "other.example"}},
            "insecure": {"tls": {"insecure_skip_verify": True}},
        }})
        good = self.serve(good_server, server_tls(pki, "good"))
        wrong = self.serve(good_server, server_tls(pki, "wrongname"))
        self.assertEqual(self.exporter.probe("wss://127.0.0.1:%d/" % good.port, module="ca")["probe_success"], 1)
        self.assertEqual(self.exporter.probe("wss://127.0.0.1:%d/" % wrong.port, module="named")["probe_success"], 1)
        self.assertEqual(self.exporter.probe("wss://127.0.0.1:%d/" % wrong.port, module="insecure")["probe_success"], 1)
        self.assertEqual(failure_of(self.exporter.probe("wss://127.0.0.1:%d/" % wrong.port, module="ca")), ("tls", "tls_verify"))

    def test_proxy_connect(self) -> None:
        requests: List[bytes] = []

        def proxy(sock: socket.socket) -> None:
            head, rest = read_request_head(sock)
            requests.append(head)
            host, _, port = head.split(b" ")[1].decode().rpartition(":")
            upstream = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            upstream.sendall(rest)
            pump = threading.Thread(target=lambda: _pipe(upstream, sock), daemon=True)
            pump.start()
            _pipe(sock, upstream)
            pump.join(5)
            upstream.close()

        server = self.serve(good_server)
        proxy_server = self.serve(proxy)
        self.use_config({"modules": {"p": {"proxy_url": "http://user:pw@127.0.0.1:%d" % proxy_server.port}}})
        metrics = self.exporter.probe("ws://127.0.0.1:%d/secret" % server.port, module="p")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertTrue(requests[0].startswith(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n" % server.port))
        self.assertIn(b"Proxy-Authorization: Basic " + base64.b64encode(b"user:pw"), requests[0])
        page = self.exporter.probe_raw("ws://127.0.0.1:%d/" % server.port, module="p", debug="true")[2]
        self.assertIn('"proxy_url": "http://127.0.0.1:%d"' % proxy_server.port, page)
        with mock.patch.dict(os.environ, {"http_proxy": "http://127.0.0.1:%d" % free_port(), "no_proxy": ""}):
            self.assertEqual(failure_of(self.exporter.probe("ws://127.0.0.1:%d/" % server.port)), ("connect", "connect_refused"))
            with mock.patch.dict(os.environ, {"no_proxy": "localhost,127.0.0.1"}):
                self.assertEqual(self.exporter.probe("ws://127.0.0.1:%d/" % server.port)["probe_success"], 1)


class TestGuards(ProbeTestCase):
    def test_public_and_private_addresses(self) -> None:
        private = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
                   "::1", "fe80::1%eth0", "fd00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::a00:1", "2002:a00:1::", "224.0.0.1", "::"]
        public = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
        for address in private:
            self.assertFalse(wx.is_public_address(address), address)
        for address in public:
            self.assertTrue(wx.is_public_address(address), address)

    def test_deny_private_checks_the_resolved_addresses(self) -> None:
        fixture = ExporterFixture(deny_private=True)
        self.addCleanup(fixture.close)
        server = self.serve(good_server)

        def rebinding(host: str, port: int, flags: int) -> List[wx.AddrInfo]:
            return [(socket.AF_INET, ("127.0.0.1", port))]

        with mock.patch.object(wx, "_getaddrinfo", rebinding):
            for target in ("ws://127.0.0.1:%d/" % server.port, "ws://public-looking.example:%d/" % server.port):
                metrics = fixture.probe(target)
                self.assertEqual(failure_of(metrics), ("resolve", "blocked_target"), target)
        self.assertEqual(self.exporter.probe("ws://127.0.0.1:%d/" % server.port)["probe_success"], 1)
        counted = parse_metrics(fixture.get("/metrics")[2])
        self.assertEqual(counted['ws_exporter_probes_failed_total{module="connect",reason="blocked_target"}'], 2)

    def test_allow_target_patterns(self) -> None:
        fixture = ExporterFixture(allow_targets=("localhost", "*.example.net"))
        self.addCleanup(fixture.close)
        server = self.serve(good_server)
        self.assertEqual(fixture.probe("ws://localhost:%d/" % server.port)["probe_success"], 1)
        self.assertEqual(failure_of(fixture.probe("ws://127.0.0.1:%d/" % server.port)), ("target", "blocked_target"))
        self.assertEqual(failure_of(fixture.probe("ws://evil.example.net.attacker.example/")), ("target", "blocked_target"))

    def test_guard_flags(self) -> None:
        settings = wx.parse_flags(["--probe.allow-target=*.Example.net", "-probe.allow-target", "localhost", "--probe.deny-private",
                                   "--probe.max-concurrent=7", "--web.max-connections", "9"])
        self.assertEqual((settings.allow_targets, settings.deny_private, settings.max_concurrent, settings.max_connections),
                         (("*.example.net", "localhost"), True, 7, 9))
        for argv in (["--probe.max-concurrent=0"], ["--probe.allow-target=a/b"]):
            with self.assertRaises(wx.FlagError):
                wx.parse_flags(argv)


class TestProxyPolicy(unittest.TestCase):
    def test_deny_private_still_checks_the_target_behind_a_proxy(self) -> None:
        fixture = ExporterFixture(deny_private=True)
        self.addCleanup(fixture.close)
        fixture.exporter.config = wx.parse_config({"modules": {"p": {"proxy_url": "http://127.0.0.1:%d" % free_port()}}})
        self.assertEqual(failure_of(fixture.probe("ws://127.0.0.1:1/", module="p")), ("resolve", "blocked_target"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class TestHostileServers(ProbeTestCase):
    def test_headers_dripped_a_byte_at_a_time_still_work(self) -> None:
        def drip(sock: socket.socket) -> None:
            head, rest = read_request_head(sock)
            for byte in switching_response(request_key(head)):
                sock.sendall(bytes([byte]))
            opcode, payload, _ = read_client_frame(sock, rest)
            sock.sendall(server_frame(wx.Opcode.CLOSE, payload))

        metrics = self.probe_local(drip)
        self.assertEqual(metrics["probe_success"], 1)

    def test_dripping_past_the_deadline_times_out_in_upgrade(self) -> None:
        stop = threading.Event()
        self.addCleanup(stop.set)

        def slow_drip(sock: socket.socket) -> None:
            read_request_head(sock)
            for byte in b"HTTP/1.1 101 Switching Protocols\r\n" * 100:
                if stop.wait(0.05):  # the hostile server's pace, not synchronisation
                    return
                sock.sendall(bytes([byte]))

        start = time.monotonic()
        metrics = self.probe_local(slow_drip, scrape_timeout="1.5")
        self.assert_failed(metrics, "upgrade", "timeout")
        self.assertLess(time.monotonic() - start, 2.5)

    def test_a_tls_handshake_dripped_past_the_deadline_times_out_in_tls(self) -> None:
        context = server_tls(shared_pki(), "good")
        stop = threading.Event()
        self.addCleanup(stop.set)

        def drip_handshake(sock: socket.socket) -> None:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = context.wrap_bio(incoming, outgoing, server_side=True)
            incoming.write(sock.recv(65536))  # the ClientHello
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.do_handshake()
            for byte in outgoing.read():
                if stop.wait(0.05):  # the hostile server's pace, not synchronisation
                    return
                sock.sendall(bytes([byte]))

        start = time.monotonic()
        with trusting(shared_pki()["ca.pem"]):
            metrics = self.probe_local(drip_handshake, "wss", scrape_timeout="1.5")
        self.assert_failed(metrics, "tls", "timeout")
        self.assertLess(time.monotonic() - start, 2.5)

    def test_an_upgrade_answer_dripped_over_tls_past_the_deadline_times_out(self) -> None:
        stop = threading.Event()
        self.addCleanup(stop.set)

        def slow_drip(sock: socket.socket) -> None:
            read_request_head(sock)
            for byte in b"HTTP/1.1 101 Switching Protocols\r\n" * 100:
                if stop.wait(0.05):
                    return
                sock.sendall(bytes([byte]))  # a TLS record for each byte

        start = time.monotonic()
        with trusting(shared_pki()["ca.pem"]):
            metrics = self.probe_local(slow_drip, "wss", scrape_timeout="1.5", tls=server_tls(shared_pki(), "good"))
        self.assert_failed(metrics, "upgrade", "timeout")
        self.assertLess(time.monotonic() - start, 2.5)

    def test_a_frame_dripped_past_the_deadline_fails_the_check_in_time(self) -> None:
        stop = threading.Event()
        self.addCleanup(stop.set)

        def drip_pong(sock: socket.socket) -> None:
            head, rest = read_request_head(sock)
            sock.sendall(switching_response(request_key(head)))
            _, payload, _ = read_client_frame(sock, rest)  # the ping
            for byte in server_frame(wx.Opcode.PONG, payload):  # 18 bytes: 1.8 s, past the deadline
                if stop.wait(0.1):
                    return
                sock.sendall(bytes([byte]))

        start = time.monotonic()
        server = self.serve(drip_pong)
        metrics = self.exporter.probe("ws://127.0.0.1:%d/" % server.port, "1.5", module="ping")
        self.assertEqual(failure_of(metrics)[1], "no_response")  # the pong was still arriving
        self.assertLess(time.monotonic() - start, 2.5)

    def test_endless_and_oversized_heads_hit_the_limits(self) -> None:
        def endless(sock: socket.socket) -> None:
            read_request_head(sock)
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\n")
            for i in range(100000):
                sock.sendall(b"X-Filler-%d: yes\r\n" % i)

        cases = {
            "endless headers": endless,
            "long status line": answer(b"HTTP/1.1 101 " + b"a" * 20000),
            "long header": answer(b"HTTP/1.1 101 OK\r\nX: " + b"a" * 20000 + b"\r\n\r\n"),
        }
        for name, behaviour in cases.items():
            with self.subTest(name):
                self.assert_failed(self.probe_local(behaviour), "upgrade", "response_too_large")

    def test_reset_mid_handshake_is_connection_closed(self) -> None:
        def reset(sock: socket.socket) -> None:
            read_request_head(sock)
            sock.sendall(b"HTTP/1.1 101 Swit")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

        self.assert_failed(self.probe_local(reset), "upgrade", "connection_closed")

    def test_threads_and_files_return_to_where_they_were(self) -> None:
        behaviours = [silent, good_server, answer(b"garbage\r\n\r\n"), upgrade_then(), upgrade_then(b"\x81\xff")]
        self.exporter.get("/-/healthy")
        threads, fds = threading.active_count(), open_fds()
        servers = [self.serve(b) for b in behaviours]
        for server in servers:
            self.exporter.probe("ws://127.0.0.1:%d/" % server.port, scrape_timeout="1")
        for server in servers:
            server.close()
        self.assertTrue(wait_until(lambda: threading.active_count() <= threads), (threading.active_count(), threads))
        self.assertTrue(wait_until(lambda: open_fds() <= fds), (open_fds(), fds))


    def test_a_server_quoting_the_key_does_not_put_it_in_logs_or_pages(self) -> None:
        key = "k3yThatMustNotLeak"
        server = self.serve(answer(b"HTTP/1.1 403 invalid project id " + key.encode() + b"\r\n\r\n"))
        target = "ws://127.0.0.1:%d/v3/%s?apikey=%s" % (server.port, key, "Q" + key)
        status, _, page = self.exporter.probe_raw(target, "2", debug="true")
        self.assertEqual(status, 200)
        self.assertIn('probe_failure_info{phase="upgrade",reason="unauthorized"} 1', page)
        self.assertIn("invalid project id <redacted>", page)
        for text in (page, self.exporter.log.getvalue()):
            self.assertNotIn(key, text)

    def test_secret_parts_of_a_target(self) -> None:
        self.assertEqual(wx.secret_parts("wss://user:pa%24%24word@h.example/v3/abcdefgh12?key=ZZZZZZZZ&x=1"),
                         ("pa%24%24word", "abcdefgh12", "ZZZZZZZZ", "pa$$word"))
        self.assertEqual(wx.secret_parts("ws://h.example/ws"), ())


class TestFailureEdges(unittest.TestCase):
    """Rare failures stay probe failures that leak nothing and hold nothing."""

    def test_a_malformed_request_line_logs_no_word_of_its_query(self) -> None:
        fixture = ExporterFixture()
        self.addCleanup(fixture.close)
        with socket.create_connection(("127.0.0.1", fixture.port), timeout=10) as conn:
            conn.sendall(b"GET /probe?target=wss://h/KEY1 KEY2 KEY3 HTTP/1.1\r\n\r\n")
            self.assertRegex(conn.makefile("rb").readline(), rb"^HTTP/1\.[01] 400 ")
        self.assertTrue(wait_until(lambda: "HTTP server" in fixture.log.getvalue()))
        self.assertNotRegex(fixture.log.getvalue(), "KEY[123]")

    def test_an_overlong_request_line_gets_414(self) -> None:
        fixture = ExporterFixture()
        self.addCleanup(fixture.close)
        with socket.create_connection(("127.0.0.1", fixture.port), timeout=10) as conn:
            line = b"GET /probe?target="
            conn.sendall(line + b"a" * (65537 - len(line)))  # what http.server reads: nothing left to reset
            self.assertRegex(conn.makefile("rb").readline(), rb"^HTTP/1\.[01] 414 ")

    def test_a_proxy_with_a_bad_port_fails_the_connect_phase_without_quoting_it(self) -> None:
        fixture = ExporterFixture()
        self.addCleanup(fixture.close)
        with mock.patch.dict(os.environ, {"http_proxy": "http://u:p@127.0.0.1:PORTKEY", "no_proxy": ""}):
            metrics = fixture.probe("ws://127.0.0.1:1/")
        self.assertEqual(failure_of(metrics), ("connect", "connect_error"))
        self.assertNotIn("PORTKEY", fixture.log.getvalue())

    def test_a_refused_resolver_thread_leaves_the_resolver_able_to_start_one_later(self) -> None:
        resolver = wx.Resolver()
        with mock.patch.object(wx.threading.Thread, "start", side_effect=RuntimeError("can't start new thread")):
            for _ in range(wx.MAX_RESOLVER_THREADS + 1):
                with self.assertRaises(RuntimeError):
                    resolver.submit("localhost", 80)
        self.assertEqual((resolver.threads, resolver.busy), (0, 0))
        self.assertTrue(resolver.submit("localhost", 80).done.acquire(timeout=5))

    def test_resolver_threads_stay_for_the_next_lookup_and_are_capped(self) -> None:
        resolver = wx.Resolver()
        for _ in range(5):
            lookup = resolver.submit("localhost", 80)
            self.assertTrue(lookup.done.acquire(timeout=5))
            self.assertIsInstance(lookup.outcome, list)
        self.assertEqual(resolver.threads, 1)  # one thread served all five, one after the other
        release = threading.Event()
        self.addCleanup(release.set)
        started = threading.Semaphore(0)

        def hang(host: str, port: int, flags: int) -> List[wx.AddrInfo]:
            started.release()
            release.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "late")

        with mock.patch.object(wx, "_getaddrinfo", hang):
            lookups = [resolver.submit("hung.example", 80) for _ in range(wx.MAX_RESOLVER_THREADS + 5)]
            for _ in range(wx.MAX_RESOLVER_THREADS):
                self.assertTrue(started.acquire(timeout=10))
            self.assertEqual((resolver.threads, resolver.busy), (wx.MAX_RESOLVER_THREADS, wx.MAX_RESOLVER_THREADS + 5))
            release.set()
            for lookup in lookups:
                self.assertTrue(lookup.done.acquire(timeout=10))
        self.assertEqual((resolver.threads, resolver.busy), (wx.MAX_RESOLVER_THREADS, 0))


# ==============================================================================================
# Checks (modules)
# ==============================================================================================


class TestCheckParsing(unittest.TestCase):
    def test_rfc3339_with_nanoseconds_and_offsets(self) -> None:
        self.assertEqual(wx.rfc3339_seconds("2024-01-02T03:04:05.5Z"), 1704164645.5)
        self.assertEqual(wx.rfc3339_seconds("2024-01-02T03:04:05.123456789Z"), 1704164645.123456789)
        self.assertEqual(wx.rfc3339_seconds("2024-01-02T05:04:05+02:00"), 1704164645)
        with self.assertRaises(wx.CheckError) as caught:
            wx.rfc3339_seconds("yesterday")
        self.assertEqual(caught.exception.reason, "bad_json")

    def test_numbers_as_chains_write_them(self) -> None:
        self.assertEqual([wx.as_number(v, "n") for v in ("0x1b4", "436", 436)], [436, 436, 436])
        for bad in ("0xzz", None, True, 1.5):
            with self.assertRaises(wx.CheckError):
                wx.as_number(bad, "n")

    def test_json_path(self) -> None:
        doc = {"result": {"list": [1, {"x": "y"}]}}
        self.assertEqual(wx.json_at(doc, "result.list.1.x"), "y")
        self.assertEqual(wx.json_at(doc, ""), doc)
        with self.assertRaises(KeyError):
            wx.json_at(doc, "result.list.2")

    def test_rpc_errors_tell_rate_limits_apart(self) -> None:
        result = wx.ProbeResult("evm", 1.0)
        cases = [({"code": 429, "message": "slow down"}, "rate_limited"), ({"code": -32005, "message": "x"}, "rate_limited"),
                 ({"code": -32000, "message": "Rate limit exceeded"}, "rate_limited"), ({"code": -32601, "message": "no such method"}, "method_not_found"),
                 ({"code": -32000, "message": "the method eth_x does not exist/is not available"}, "method_not_found"),
                 ("not an object", "rpc_error")]
        for error, reason in cases:
            self.assertEqual(wx.rpc_failure(("m", ""), error, result).reason, reason, error)
        self.assertEqual(result.rpc_error_codes, {("m", ""): -32000})

    def test_builtin_modules_need_no_config(self) -> None:
        self.assertEqual(set(wx.DEFAULT_MODULES), set(wx.PRESETS))
        self.assertLessEqual(set(wx.PRESET_KEYS), set(wx._MODULE_KEYS))
        for name, preset in wx.PRESETS.items():
            self.assertLessEqual(set(preset.keys), set(wx.PRESET_KEYS), name)
            self.assertEqual(preset.subscription is not None, preset.check is wx.check_subscription, name)
        self.assertEqual(wx.Module("connect").preset, "connect")
        self.assertFalse(wx.Module("connect").runs_checks())


class TestChecks(ChecksTestCase):
    def test_connect_module_adds_no_check_phase(self) -> None:
        metrics = self.probe_local(good_server)
        self.assertNotIn('probe_websocket_duration_seconds{phase="check"}', metrics)

    def test_ping_waits_for_the_pong_that_echoes_its_payload(self) -> None:
        def behave(sock: socket.socket) -> None:
            head, rest = read_request_head(sock)
            sock.sendall(switching_response(request_key(head)))
            opcode, payload, rest = read_client_frame(sock, rest)
            self.assertEqual((opcode, len(payload)), (wx.Opcode.PING, wx.PING_PAYLOAD_BYTES))
            sock.sendall(server_frame(wx.Opcode.PONG, b"unsolicited") + server_frame(wx.Opcode.PING, b"srv"))
            opcode, answer, rest = read_client_frame(sock, rest)
            self.assertEqual((opcode, answer), (wx.Opcode.PONG, b"srv"))  # the server's ping is answered
            sock.sendall(server_frame(wx.Opcode.PONG, payload))
            opcode, payload, rest = read_client_frame(sock, rest)
            sock.sendall(server_frame(wx.Opcode.CLOSE, payload))

        server = self.serve(behave)
        metrics = self.exporter.probe("ws://127.0.0.1:%d/" % server.port, "5", module="ping")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertGreater(metrics["probe_websocket_ping_rtt_seconds"], 0)
        self.assertGreater(metrics['probe_websocket_duration_seconds{phase="check"}'], 0)

    def test_ping_without_pong_fails_inside_the_deadline(self) -> None:
        start = time.monotonic()
        metrics = self.probe_rpc({}, "ping", scrape_timeout="1.5")  # pings are answered, but...
        self.assertEqual(metrics["probe_success"], 1)
        self.assertLess(time.monotonic() - start, 1.0)

        def no_pong(sock: socket.socket) -> None:
            head, rest = read_request_head(sock)
            sock.sendall(switching_response(request_key(head)))
            while True:
                opcode, payload, rest = read_client_frame(sock, rest)
                if opcode == wx.Opcode.CLOSE:
                    sock.sendall(server_frame(wx.Opcode.CLOSE, payload))
                    return

        server = self.serve(no_pong)
        metrics = self.exporter.probe("ws://127.0.0.1:%d/" % server.port, "1.5", module="ping")
        self.assert_check_failed(metrics, "no_response")
        self.assertLess(metrics["probe_duration_seconds"], 1.0)

    def test_evm_reports_chain_id_and_head(self) -> None:
        now = time.time()
        seen: List[Dict[str, object]] = []
        handlers = {"eth_chainId": replies("0x1"), "eth_getBlockByNumber": replies(evm_block(1234, now - 3))}
        metrics = self.probe_rpc(handlers, "evm", seen=seen)
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual((metrics["probe_chain_id"], metrics["probe_chain_head_number"]), (1, 1234))
        self.assertEqual(metrics["probe_chain_head_timestamp_seconds"], int(now - 3))
        self.assertTrue(3 <= metrics["probe_chain_head_age_seconds"] < 10)
        self.assertGreater(metrics['probe_rpc_duration_seconds{block="latest",method="eth_getBlockByNumber"}'], 0)
        self.assertEqual(seen[1]["params"], ["latest", False])
        self.assertEqual([r["jsonrpc"] for r in seen], ["2.0", "2.0"])

    def test_evm_expectations_fail_but_keep_their_metrics(self) -> None:
        self.use_config({"modules": {"eth": {"preset": "evm", "expect_chain_id": 1}, "fresh": {"preset": "evm", "max_head_age": "60s"}}})
        handlers = {"eth_chainId": replies("0x89"), "eth_getBlockByNumber": replies(evm_block(5, time.time() - 600))}
        metrics = self.probe_rpc(handlers, "eth")
        self.assert_check_failed(metrics, "chain_id_mismatch")
        self.assertEqual(metrics["probe_chain_id"], 137)
        metrics = self.probe_rpc(handlers, "fresh")
        self.assert_check_failed(metrics, "head_too_old")
        self.assertGreaterEqual(metrics["probe_chain_head_age_seconds"], 600)

    def test_solana_notification_before_the_subscription_answer(self) -> None:
        handlers = {
            "slotSubscribe": lambda r: [rpc_notification("slotNotification", SOLANA_SLOT), rpc_reply(r, 7)],
            "slotUnsubscribe": replies(True),
        }
        seen: List[Dict[str, object]] = []
        metrics = self.probe_rpc(handlers, "solana_slot", seen=seen)
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual(metrics["probe_chain_head_number"], 42)
        self.assertEqual(metrics["probe_subscription_notifications"], 1)
        self.assertGreater(metrics["probe_subscription_first_notification_seconds"], 0)
        self.assertNotIn("probe_chain_head_age_seconds", metrics)
        self.assertEqual([(r["method"], r["params"]) for r in seen], [("slotSubscribe", []), ("slotUnsubscribe", [7])])

    def test_substrate_new_heads(self) -> None:
        handlers = {
            "chain_subscribeNewHeads": lambda r: [rpc_reply(r, "sub-1"), rpc_notification("chain_newHead", SUBSTRATE_HEADER, "sub-1")],
            "chain_unsubscribeNewHeads": replies(True),
        }
        seen: List[Dict[str, object]] = []
        metrics = self.probe_rpc(handlers, "substrate_newheads", seen=seen)
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual(metrics["probe_chain_head_number"], 0x1B4)
        self.assertEqual(seen[-1]["params"], ["sub-1"])

    def test_cometbft_event_shares_the_ack_id_and_server_pings_are_answered(self) -> None:
        stamp = "2024-05-06T07:08:09.123456789Z"
        handlers = {
            "subscribe": lambda r: [rpc_reply(r, {}), server_frame(wx.Opcode.PING, b"are you there")],
            "<pong>": lambda _: [cometbft_event(1, "1000", stamp)],
            "unsubscribe": replies({}),
        }
        seen: List[Dict[str, object]] = []
        metrics = self.probe_rpc(handlers, "cometbft_newblock", seen=seen)
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual(metrics["probe_chain_head_number"], 1000)
        self.assertAlmostEqual(metrics["probe_chain_head_timestamp_seconds"], wx.rfc3339_seconds(stamp), places=3)
        self.assertEqual(seen[0]["params"], {"query": "tm.event='NewBlockHeader'"})
        self.assertEqual(seen[1], {"method": "<pong>"})
        self.assertEqual(seen[2]["method"], "unsubscribe")

    def test_cometbft_event_before_its_ack(self) -> None:
        handlers = {"subscribe": lambda r: [cometbft_event(r["id"], "7", "2024-05-06T07:08:09Z"), rpc_reply(r, {})], "unsubscribe": replies({})}
        metrics = self.probe_rpc(handlers, "cometbft_newblock")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual(metrics["probe_chain_head_number"], 7)

    def test_silent_subscription_fails_as_no_notification_inside_the_deadline(self) -> None:
        start = time.monotonic()
        metrics = self.probe_rpc({"slotSubscribe": replies(3)}, "solana_slot", scrape_timeout="1.5")
        self.assertLess(time.monotonic() - start, 1.5)
        self.assert_check_failed(metrics, "no_notification")
        self.assertEqual(metrics["probe_subscription_notifications"], 0)
        self.assertNotIn("probe_subscription_first_notification_seconds", metrics)

    def test_a_hold_longer_than_the_scrape_allows_is_cut_short_and_the_probe_still_succeeds(self) -> None:
        self.use_config({"modules": {"held": {"preset": "substrate_newheads", "timeout": "8s", "hold": "5s"}}})
        handlers = {
            "chain_subscribeNewHeads": lambda r: [rpc_reply(r, "s"), rpc_notification("chain_newHead", SUBSTRATE_HEADER, "s")],
            "chain_unsubscribeNewHeads": replies(True),
        }
        seen: List[Dict[str, object]] = []
        server = self.serve(rpc_server(handlers, seen))
        # The deadline is 3 - 0.5 s: the 5 s hold must end early enough for the unsubscribe and the close.
        page = self.exporter.probe_raw("ws://127.0.0.1:%d/" % server.port, "3", module="held", debug="true")[2]
        metrics = parse_metrics(page.partition("returned:\n")[2].partition("\nModule configuration:")[0])
        self.assertEqual(metrics["probe_success"], 1, page)
        self.assertEqual(metrics["probe_websocket_close_code"], 1000)
        self.assertEqual([r["method"] for r in seen], ["chain_subscribeNewHeads", "chain_unsubscribeNewHeads"])
        held = re.search(r'msg="Hold cut short by the probe deadline" .*held=([0-9.]+) asked=5\b', page)
        assert held, page
        # The silence after the one notification is measured up to when the hold really ended.
        self.assertAlmostEqual(metrics["probe_subscription_max_gap_seconds"], float(held.group(1)), delta=0.1)
        self.assertLess(float(held.group(1)), 2.5)

    def test_too_few_notifications(self) -> None:
        self.use_config({"modules": {"three": {"preset": "substrate_newheads", "min_notifications": 3}}})
        handlers = {"chain_subscribeNewHeads": lambda r: [rpc_reply(r, "s"), rpc_notification("chain_newHead", SUBSTRATE_HEADER)]}
        metrics = self.probe_rpc(handlers, "three", scrape_timeout="1.5")
        self.assert_check_failed(metrics, "too_few_notifications")
        self.assertEqual(metrics["probe_subscription_notifications"], 1)

    def test_error_answers(self) -> None:
        cases = [
            ("subscription_unsupported", -32601, lambda r: [rpc_error(r["id"], -32601, "Method not found")]),
            ("subscription_unsupported", -32000, lambda r: [rpc_error(r["id"], -32000, "notifications not supported")]),
            ("rpc_error", -32000, lambda r: [rpc_error(r["id"], -32000, "header not found")]),
            ("rate_limited", -32005, lambda r: [rpc_error(r["id"], -32005, "limit exceeded")]),
            ("rpc_error", None, lambda r: [rpc_error(None, -32700, "Parse error")]),  # no id: fails the pending request
            ("rate_limited", None, lambda r: [text_frame({"jsonrpc": "2.0", "error": {"code": 429, "message": "Too Many Requests"}})]),
        ]
        for reason, code, handler in cases:
            with self.subTest(reason=reason, code=code):
                metrics = self.probe_rpc({"chain_subscribeNewHeads": handler}, "substrate_newheads")
                self.assert_check_failed(metrics, reason)
                if code is not None:
                    self.assertEqual(metrics['probe_rpc_error_code{method="chain_subscribeNewHeads"}'], code)

    def test_bad_json(self) -> None:
        for frame in (server_frame(wx.Opcode.TEXT, b"{not json"), text_frame([1, 2])):
            with self.subTest(frame=frame):
                metrics = self.probe_rpc({"eth_chainId": lambda r, f=frame: [f]}, "evm")  # type: ignore[misc]
                self.assert_check_failed(metrics, "bad_json")
        metrics = self.probe_rpc({"eth_chainId": replies("0x1"), "eth_getBlockByNumber": replies({"hash": "0x0"})}, "evm")
        self.assert_check_failed(metrics, "bad_json")

    def test_a_failed_probe_leaves_no_cycle_for_the_garbage_collector(self) -> None:
        """A frame that raised while holding an exception is a cycle: the probe's connection,
        buffers and session would wait for a collection, all the more with every failure."""
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        self.addCleanup(gc.set_debug, 0)
        self.addCleanup(gc.garbage.clear)
        refused = self.exporter.probe("ws://127.0.0.1:%d/" % free_port(), "5")
        self.assert_failed(refused, "connect", "connect_refused")
        error = self.probe_rpc({"eth_chainId": lambda r: [rpc_error(r["id"], -32000, "boom")]}, "evm")
        self.assert_check_failed(error, "rpc_error")
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if getattr(getattr(o, "f_code", None), "co_filename", "") == wx.__file__
                or type(o).__module__ == wx.__name__]
        self.assertEqual(left, [])

    def test_server_closing_during_the_check(self) -> None:
        metrics = self.probe_rpc({"eth_chainId": lambda r: [server_close(1001)]}, "evm")
        self.assert_failed(metrics, "check", "connection_closed", up=1)

    def test_a_value_error_in_a_check_is_an_internal_error_not_a_connect_error(self) -> None:
        handlers = {"eth_chainId": replies("0x1"), "eth_getBlockByNumber": replies(evm_block(5, time.time()))}
        with mock.patch.object(wx, "evm_head", side_effect=ValueError("a bug in the check")):
            metrics = self.probe_rpc(handlers, "evm")
        self.assert_check_failed(metrics, "internal_error")
        self.assertRegex(self.exporter.log.getvalue(), r"Traceback.*\\n.*ValueError: a bug in the check")

    def test_generic_steps(self) -> None:
        config = {"modules": {
            "hello": {"steps": [{"send": "hello ${env:WSX_TEST_NAME}"}, {"expect": {"regex": "^welcome"}},
                                {"send": "{\"q\": 1}"}, {"expect": {"path": "data.height", "at_least": 10, "at_most": 20}},
                                {"expect": {"path": "data.ok", "equals": True}}]},
            "wrong": {"steps": [{"send": "x"}, {"expect": {"path": "data.ok", "equals": False}}]},
            "never": {"steps": [{"expect": {"regex": "never"}}]},
        }}
        with mock.patch.dict(os.environ, {"WSX_TEST_NAME": "node"}):
            self.use_config(config)
        sent: List[bytes] = []

        def behave(sock: socket.socket) -> None:
            head, rest = read_request_head(sock)
            sock.sendall(switching_response(request_key(head)))
            while True:
                opcode, payload, rest = read_client_frame(sock, rest)
                if opcode == wx.Opcode.CLOSE:
                    sock.sendall(server_frame(wx.Opcode.CLOSE, payload))
                    return
                sent.append(payload)
                for reply in (b"noise", b"welcome node", b'{"data": {}}', b'{"data": {"height": "0xf", "ok": true}}'):
                    sock.sendall(server_frame(wx.Opcode.TEXT, reply))

        server = self.serve(behave)
        target = "ws://127.0.0.1:%d/" % server.port
        metrics = self.exporter.probe(target, "5", module="hello")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual(sent, [b"hello node", b'{"q": 1}'])
        self.assert_check_failed(self.exporter.probe(target, "5", module="wrong"), "expectation_failed")
        start = time.monotonic()
        self.assert_check_failed(self.exporter.probe(target, "1", module="never"), "expectation_failed")
        self.assertLess(time.monotonic() - start, 1.0)


class TestNodeModules(ChecksTestCase):
    """solana_node, substrate_node and cometbft_node against local servers that answer as those
    nodes document (evm_node runs against ganache and anvil in TestCheckInterop)."""

    GENESIS = "5eykt4UsFv8P8NJdTREpY1vzqKqZKvdpKuc147dw2N9d"

    def solana(self, health: Callable[[Dict[str, object]], List[bytes]]) -> RpcHandlers:
        slots = {"processed": 1000, "confirmed": 990, "finalized": 968}
        return {
            "getHealth": health,
            "getGenesisHash": replies(self.GENESIS),
            "getSlot": lambda r: [rpc_reply(r, slots[r["params"][0]["commitment"]])],  # type: ignore[index]
            "getBlockTime": replies(int(time.time())),
            "getVersion": replies({"solana-core": "1.18.22", "feature-set": 3469865029}),
        }

    def test_solana_node(self) -> None:
        metrics = self.probe_rpc(self.solana(replies("ok")), "solana_node")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual((metrics["probe_chain_head_number"], metrics["probe_chain_finalized_head_number"]), (1000, 968))
        self.assertIn('probe_node_info{client="",version="1.18.22"}', metrics)
        self.assertIn('probe_chain_info{genesis="%s"}' % self.GENESIS, metrics)
        self.assertEqual(rpc_series(metrics), ['{block="confirmed",method="getSlot"}', '{block="finalized",method="getSlot"}',
                                               '{block="processed",method="getSlot"}', '{method="getBlockTime"}', '{method="getGenesisHash"}',
                                               '{method="getHealth"}', '{method="getVersion"}'])
        behind = text_frame({"jsonrpc": "2.0", "id": 1, "error": {
            "code": -32005, "message": "Node is behind by 42 slots", "data": {"numSlotsBehind": 42}}})
        metrics = self.probe_rpc(self.solana(lambda r: [behind]), "solana_node")
        self.assert_check_failed(metrics, "node_unhealthy")  # not rate_limited, though -32005
        self.assertEqual(metrics["probe_node_behind_slots"], 42)
        self.use_config({"modules": {"lag": {"preset": "solana_node", "max_finality_lag": 31},
                                     "other": {"preset": "solana_node", "expect_genesis_hash": "EtWTRABZaYq6iMfeYKouRu166VU2xqa1wcaWoxPkrZBG"}}})
        self.assert_check_failed(self.probe_rpc(self.solana(replies("ok")), "lag"), "finality_lag")
        self.assert_check_failed(self.probe_rpc(self.solana(replies("ok")), "other"), "wrong_chain")

    def substrate(self, syncing: bool) -> RpcHandlers:
        headers = {"": dict(SUBSTRATE_HEADER, number="0x10"), "0xf1": dict(SUBSTRATE_HEADER, number="0xc")}
        return {
            "system_health": replies({"peers": 5, "isSyncing": syncing, "shouldHavePeers": True}),
            "chain_getBlockHash": replies("0x91b171bb158e2d3848fa23a9f1c25182fb8e20313b2c1eb49219da7a70ce90c3"),
            "chain_getHeader": lambda r: [rpc_reply(r, headers[(r["params"] or [""])[0]])],  # type: ignore[index]
            "chain_getFinalizedHead": replies("0xf1"),
            "system_version": replies("1.10.0-7049c3c9883"),
            "state_getStorage": replies(None),
        }

    def test_substrate_node(self) -> None:
        metrics = self.probe_rpc(self.substrate(False), "substrate_node")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual((metrics["probe_node_peers"], metrics["probe_node_syncing"]), (5, 0))
        self.assertEqual((metrics["probe_chain_head_number"], metrics["probe_chain_finalized_head_number"]), (16, 12))
        self.assertIn('probe_node_info{client="",version="1.10.0-7049c3c9883"}', metrics)
        self.assertEqual(rpc_series(metrics), ['{block="finalized",method="chain_getHeader"}', '{block="latest",method="chain_getHeader"}',
                                               '{method="chain_getBlockHash"}', '{method="chain_getFinalizedHead"}',
                                               '{method="state_getStorage"}', '{method="system_health"}', '{method="system_version"}'])
        self.assert_check_failed(self.probe_rpc(self.substrate(True), "substrate_node"), "node_syncing")
        self.use_config({"modules": {"strict": {"preset": "substrate_node", "min_peers": 8},
                                     "lag": {"preset": "substrate_node", "max_finality_lag": 2}}})
        self.assert_check_failed(self.probe_rpc(self.substrate(False), "strict"), "too_few_peers")
        self.assert_check_failed(self.probe_rpc(self.substrate(False), "lag"), "finality_lag")

    def test_evm_node_times_each_block_it_asks_for_apart(self) -> None:
        blocks = {"0x0": evm_block(0, 0), "latest": evm_block(100, time.time()), "finalized": evm_block(36, time.time() - 800)}
        handlers = {
            "eth_chainId": replies("0x1"), "eth_syncing": replies(False), "net_peerCount": replies("0x3"),
            "web3_clientVersion": replies("Geth/v1.14.0/linux-amd64/go1.22"),
            "eth_getBlockByNumber": lambda r: [rpc_reply(r, blocks[r["params"][0]])],  # type: ignore[index]
        }
        metrics = self.probe_rpc(handlers, "evm_node")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual(rpc_series(metrics), [
            '{block="finalized",method="eth_getBlockByNumber"}', '{block="genesis",method="eth_getBlockByNumber"}',
            '{block="latest",method="eth_getBlockByNumber"}', '{method="eth_chainId"}', '{method="eth_syncing"}',
            '{method="net_peerCount"}', '{method="web3_clientVersion"}'])
        self.assertEqual((metrics["probe_chain_head_number"], metrics["probe_chain_finalized_head_number"]), (100, 36))

    def cometbft(self, catching_up: bool) -> RpcHandlers:
        now = time.strftime("%Y-%m-%dT%H:%M:%S.123456789Z", time.gmtime())
        status = {"node_info": {"network": "cosmoshub-4", "version": "0.37.2"},
                  "sync_info": {"latest_block_height": "19000000", "latest_block_time": now, "catching_up": catching_up}}
        return {"status": replies(status), "net_info": replies({"listening": True, "n_peers": "7", "peers": []})}

    def test_cometbft_node(self) -> None:
        metrics = self.probe_rpc(self.cometbft(False), "cometbft_node")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual((metrics["probe_node_peers"], metrics["probe_chain_head_number"]), (7, 19000000))
        self.assertIn('probe_chain_info{network="cosmoshub-4"}', metrics)
        self.assertLess(metrics["probe_chain_head_age_seconds"], 5)
        self.assert_check_failed(self.probe_rpc(self.cometbft(True), "cometbft_node"), "node_syncing")
        self.use_config({"modules": {"osmosis": {"preset": "cometbft_node", "expect_network": "osmosis-1"}}})
        self.assert_check_failed(self.probe_rpc(self.cometbft(False), "osmosis"), "wrong_chain")

    def test_node_keys_only_where_a_preset_uses_them(self) -> None:
        for module in ({"preset": "evm", "min_peers": 1}, {"preset": "solana_node", "min_peers": 1},
                       {"preset": "evm_node", "expect_network": "x"}, {"preset": "evm", "hold": "5s"},
                       {"preset": "evm_newheads", "max_gap": "5s"}):
            with self.subTest(module=module), self.assertRaises(wx.ConfigError):
                wx.parse_config({"modules": {"m": module}})


class TestDeepJson(unittest.TestCase):
    def test_a_deeply_nested_answer_fails_the_probe_and_the_exporter_lives(self) -> None:
        """In the exporter as it runs (its thread stacks sized at start): Python 3.13's JSON
        decoder recurses in C thousands of levels deep before it gives up."""
        nested = server_frame(wx.Opcode.TEXT, b"[" * 100000 + b"]" * 100000)
        rpc = LocalServer(rpc_server({"eth_chainId": lambda request: [nested]}))
        self.addCleanup(rpc.close)
        proc = ExporterProcess()
        self.addCleanup(proc.stop)
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("GET", "/probe?module=evm&target=ws://127.0.0.1:%d/" % rpc.port)
        metrics = parse_metrics(conn.getresponse().read().decode())
        self.assertEqual(failure_of(metrics), ("check", "bad_json"))
        conn.request("GET", "/-/healthy")
        self.assertEqual(conn.getresponse().read(), b"Healthy\n")


# ----------------------------------------------------------------------------------------------
# Is the head fresh? Head age on every node preset, Substrate's new JSON-RPC API (chainHead_v1),
# heads skipped in held subscriptions, CometBFT's /v1/ paths, and Hardhat's node
# ----------------------------------------------------------------------------------------------

def evm_node_at(block_time: float) -> RpcHandlers:
    """An EVM node whose latest block was made at ``block_time``."""
    blocks = {"0x0": evm_block(0, 0), "latest": evm_block(100, block_time), "finalized": evm_block(90, block_time - 120)}
    return {
        "eth_chainId": replies("0x1"), "eth_syncing": replies(False), "net_peerCount": replies("0x9"),
        "web3_clientVersion": replies("Geth/v1.14.0/linux-amd64/go1.22"),
        "eth_getBlockByNumber": lambda r: [rpc_reply(r, blocks[r["params"][0]])],  # type: ignore[index]
    }


SOLANA_SLOTS = {"processed": 1000, "confirmed": 990, "finalized": 968}


def solana_node_at(block_time: Optional[float]) -> RpcHandlers:
    """A Solana node whose getBlockTime answers for confirmed blocks only, -32004 "Block not
    available for slot N" past them, and null when it has no time for a block."""

    def block_time_of(request: Dict[str, object]) -> List[bytes]:
        slot = request["params"][0]  # type: ignore[index]
        if slot > SOLANA_SLOTS["confirmed"]:
            return [rpc_error(request["id"], -32004, "Block not available for slot %d" % slot)]
        return [rpc_reply(request, None if block_time is None else int(block_time))]

    return {
        "getHealth": replies("ok"), "getGenesisHash": replies(TestNodeModules.GENESIS),
        "getSlot": lambda r: [rpc_reply(r, SOLANA_SLOTS[r["params"][0]["commitment"]])],  # type: ignore[index]
        "getBlockTime": block_time_of, "getVersion": replies({"solana-core": "2.0.8"}),
    }


def substrate_node_at(block_time: Optional[float]) -> RpcHandlers:
    """A Substrate node whose Timestamp.Now (SCALE u64 milliseconds) says ``block_time``; null
    (storage absent) for any other key, and on a chain without pallet_timestamp."""
    stamp = None if block_time is None else "0x" + int(block_time * 1000).to_bytes(8, "little").hex()
    return {
        "system_health": replies({"peers": 5, "isSyncing": False, "shouldHavePeers": True}),
        "chain_getBlockHash": replies(CHAINHEAD_GENESIS),
        "chain_getHeader": lambda r: [rpc_reply(r, dict(SUBSTRATE_HEADER, number="0x10" if not r["params"] else "0xc"))],
        "chain_getFinalizedHead": replies("0xf1"),
        "state_getStorage": lambda r: [rpc_reply(r, stamp if r["params"] == [wx.SUBSTRATE_TIMESTAMP_KEY] else None)],
        "system_version": replies("1.10.0-7049c3c9883"),
    }


def rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.123456789Z", time.gmtime(seconds))


def cometbft_node_at(block_time: float) -> RpcHandlers:
    status = {"node_info": {"network": "cosmoshub-4", "version": "1.0.1"},
              "sync_info": {"latest_block_height": "19000000", "latest_block_time": rfc3339(block_time), "catching_up": False}}
    return {"status": replies(status), "net_info": replies({"listening": True, "n_peers": "7", "peers": []})}


def node_presets_at(block_time: float) -> Dict[str, RpcHandlers]:
    """One node of each family, its newest block made at ``block_time``, by node preset."""
    return {"evm_node": evm_node_at(block_time), "solana_node": solana_node_at(block_time),
            "substrate_node": substrate_node_at(block_time), "cometbft_node": cometbft_node_at(block_time)}


class TestHeadAge(ChecksTestCase):
    """Every node preset reports the age of the newest block, and max_head_age fails a node whose
    blocks are old, on all four chain families."""

    def test_every_node_preset_reports_the_time_of_its_newest_block(self) -> None:
        made = int(time.time()) - 5
        stamps = {"evm_node": made, "solana_node": made, "substrate_node": made, "cometbft_node": wx.rfc3339_seconds(rfc3339(made))}
        for preset, handlers in node_presets_at(made).items():
            with self.subTest(preset=preset):
                metrics = self.probe_rpc(handlers, preset)
                self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
                self.assertAlmostEqual(metrics["probe_chain_head_timestamp_seconds"], stamps[preset], places=3)
                self.assertTrue(4 < metrics["probe_chain_head_age_seconds"] < 60, metrics["probe_chain_head_age_seconds"])

    def test_max_head_age_fails_a_node_whose_blocks_are_ten_minutes_old_on_all_four_families(self) -> None:
        presets = node_presets_at(int(time.time()) - 600)  # whole seconds: rfc3339() adds a fraction of one
        self.use_config({"modules": {"fresh_" + p: {"preset": p, "max_head_age": "60s"} for p in presets}})
        for preset, handlers in presets.items():
            with self.subTest(preset=preset):
                lenient = self.probe_rpc(handlers, preset)  # the node still answers: without max_head_age it passes
                self.assertEqual(lenient["probe_success"], 1, failure_of(lenient))
                self.assertGreater(lenient["probe_chain_head_age_seconds"], 599)
                frozen = self.probe_rpc(handlers, "fresh_" + preset)
                self.assert_check_failed(frozen, "head_too_old")
                self.assertGreater(frozen["probe_chain_head_age_seconds"], 599)

    def test_solana_asks_the_time_of_the_confirmed_slot(self) -> None:
        seen: List[Dict[str, object]] = []
        metrics = self.probe_rpc(solana_node_at(time.time()), "solana_node", seen=seen)
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))  # the processed slot would get -32004
        self.assertEqual([r["params"] for r in seen if r["method"] == "getBlockTime"], [[SOLANA_SLOTS["confirmed"]]])
        self.assertEqual(metrics["probe_chain_head_number"], SOLANA_SLOTS["processed"])
        self.assertIn('probe_rpc_duration_seconds{block="confirmed",method="getSlot"}', metrics)

    def test_no_block_time_is_no_age_rather_than_a_failure(self) -> None:
        self.use_config({"modules": {"sol": {"preset": "solana_node", "max_head_age": "60s"},
                                     "dot": {"preset": "substrate_node", "max_head_age": "60s"}}})
        seen: List[Dict[str, object]] = []
        for module, handlers in (("sol", solana_node_at(None)), ("dot", substrate_node_at(None))):
            with self.subTest(module=module):
                metrics = self.probe_rpc(handlers, module, seen=seen)
                self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
                self.assertNotIn("probe_chain_head_age_seconds", metrics)
                self.assertNotIn("probe_chain_head_timestamp_seconds", metrics)
                self.assertIn("probe_chain_head_number", metrics)
        self.assertIn({"jsonrpc": "2.0", "id": 4, "method": "state_getStorage", "params": [wx.SUBSTRATE_TIMESTAMP_KEY]}, seen)

    def test_max_head_age_is_refused_where_no_block_time_is_read(self) -> None:
        for preset in ("solana_slot", "substrate_newheads", "substrate_chainhead", "ping"):
            with self.subTest(preset=preset), self.assertRaisesRegex(wx.ConfigError, "reports no block time"):
                wx.parse_config({"modules": {"m": {"preset": preset, "max_head_age": "1m"}}})


class TestScale(unittest.TestCase):
    """SCALE, as Substrate encodes headers and storage: compact integers in their four modes."""

    def test_compact_integers_in_each_mode(self) -> None:
        cases = [
            ("00", 0), ("04", 1), ("a8", 42), ("fc", 63),  # single-byte mode: value << 2
            ("0101", 64), ("1501", 69), ("fdff", 16383),  # two-byte mode: (value << 2) | 0b01
            ("02000100", 16384), ("feff0300", 65535), ("feffffff", 2**30 - 1),  # four-byte mode: | 0b10
            ("0300000040", 2**30), ("03ffffffff", 2**32 - 1), ("0b00407a10f35a", 100000000000000),  # big-integer mode
        ]
        for encoded, value in cases:
            with self.subTest(encoded=encoded):
                self.assertEqual(wx.scale_compact(bytes.fromhex(encoded) + b"\xee"), value)  # what follows is not read

    def test_a_truncated_compact_integer_is_bad_json(self) -> None:
        for encoded in ("", "01", "020001", "03ffffff", "0b00407a10f3"):
            with self.subTest(encoded=encoded), self.assertRaises(wx.CheckError) as caught:
                wx.scale_compact(bytes.fromhex(encoded))
            self.assertEqual(caught.exception.reason, "bad_json")

    def test_header_number_and_timestamp(self) -> None:
        self.assertEqual(wx.substrate_header_number(scale_header(20000002)), 20000002)
        self.assertEqual(wx.substrate_header_number("0x" + "11" * 32 + "a8"), 42)
        self.assertEqual(wx.substrate_timestamp("0x" + (1700000000123).to_bytes(8, "little").hex()), 1700000000.123)
        self.assertIsNone(wx.substrate_timestamp(None))
        for bad in ("11" * 33, "0x" + "11" * 32, "0xzz", 7):
            with self.subTest(bad=bad), self.assertRaises(wx.CheckError):
                wx.substrate_header_number(bad)
        with self.assertRaises(wx.CheckError):
            wx.substrate_timestamp("0x0102")


CHAINHEAD_GENESIS = "0x91b171bb158e2d3848fa23a9f1c25182fb8e20313b2c1eb49219da7a70ce90c3"
FINALIZED, BLOCK_1, BLOCK_2 = ("0x" + byte * 32 for byte in ("f0", "b1", "b2"))
CHAINHEAD_NUMBERS = {FINALIZED: 20000000, BLOCK_1: 20000001, BLOCK_2: 20000002}


def scale_header(number: int) -> str:
    """A SCALE-encoded header: the parent hash, the number as a Compact<u32> (four-byte mode below
    2**30), the state and extrinsics roots, an empty digest."""
    return "0x" + "11" * 32 + ((number << 2) | 0b10).to_bytes(4, "little").hex() + "22" * 64 + "00"


def follow_events(*events: Dict[str, object]) -> List[bytes]:
    return [rpc_notification("chainHead_v1_followEvent", event, "follow-1") for event in events]


INITIALIZED = {"event": "initialized", "finalizedBlockHashes": [FINALIZED]}
HEALTHY_FOLLOW = (
    INITIALIZED,
    {"event": "newBlock", "blockHash": BLOCK_1, "parentBlockHash": FINALIZED},
    {"event": "newBlock", "blockHash": BLOCK_2, "parentBlockHash": BLOCK_1},
    {"event": "bestBlockChanged", "bestBlockHash": BLOCK_2},
)


def chainhead_node(follow: Callable[[Dict[str, object]], List[bytes]]) -> RpcHandlers:
    """A node serving the new JSON-RPC API: headers of the blocks it reported, null for a follow
    subscription it does not know."""

    def header(request: Dict[str, object]) -> List[bytes]:
        subscription, block = request["params"]  # type: ignore[misc]
        known = subscription == "follow-1" and block in CHAINHEAD_NUMBERS
        return [rpc_reply(request, scale_header(CHAINHEAD_NUMBERS[block]) if known else None)]

    return {"chainSpec_v1_genesisHash": replies(CHAINHEAD_GENESIS), "chainHead_v1_follow": follow,
            "chainHead_v1_header": header, "chainHead_v1_unfollow": replies(None)}


def following(*events: Dict[str, object]) -> Callable[[Dict[str, object]], List[bytes]]:
    return lambda request: [rpc_reply(request, "follow-1")] + follow_events(*events)


class TestSubstrateChainHead(ChecksTestCase):
    """substrate_chainhead against a node that answers as the new JSON-RPC spec says."""

    def test_a_healthy_follow(self) -> None:
        seen: List[Dict[str, object]] = []
        metrics = self.probe_rpc(chainhead_node(following(*HEALTHY_FOLLOW)), "substrate_chainhead", seen=seen)
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual((metrics["probe_chain_head_number"], metrics["probe_chain_finalized_head_number"]), (20000002, 20000000))
        self.assertIn('probe_chain_info{genesis="%s"}' % CHAINHEAD_GENESIS, metrics)
        self.assertEqual(metrics["probe_subscription_notifications"], 4)
        self.assertNotIn("probe_chain_head_age_seconds", metrics)
        self.assertEqual([(r["method"], r["params"]) for r in seen], [
            ("chainSpec_v1_genesisHash", []), ("chainHead_v1_follow", [False]),
            ("chainHead_v1_header", ["follow-1", BLOCK_2]), ("chainHead_v1_header", ["follow-1", FINALIZED]),
            ("chainHead_v1_unfollow", ["follow-1"])])
        self.assertIn('probe_rpc_duration_seconds{block="latest",method="chainHead_v1_header"}', metrics)
        self.assertIn('probe_rpc_duration_seconds{block="finalized",method="chainHead_v1_header"}', metrics)

    def test_the_best_block_is_awaited_when_initialized_comes_alone(self) -> None:
        handlers = chainhead_node(lambda r: [rpc_reply(r, "follow-1")] + follow_events(INITIALIZED) + [server_frame(wx.Opcode.PING, b"x")])
        handlers["<pong>"] = lambda _: follow_events({"event": "bestBlockChanged", "bestBlockHash": FINALIZED})
        metrics = self.probe_rpc(handlers, "substrate_chainhead")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual((metrics["probe_chain_head_number"], metrics["probe_chain_finalized_head_number"]), (20000000, 20000000))
        self.assertEqual(metrics["probe_subscription_notifications"], 2)

    def test_a_silent_follow_fails_as_no_notification(self) -> None:
        metrics = self.probe_rpc(chainhead_node(following()), "substrate_chainhead", scrape_timeout="1.5")
        self.assert_check_failed(metrics, "no_notification")
        self.assertEqual(metrics["probe_subscription_notifications"], 0)

    def test_a_stop_event_fails_as_subscription_stopped(self) -> None:
        metrics = self.probe_rpc(chainhead_node(following(INITIALIZED, {"event": "stop"})), "substrate_chainhead")
        self.assert_check_failed(metrics, "subscription_stopped")

    def test_a_header_answered_null_means_the_follow_is_gone(self) -> None:
        handlers = chainhead_node(following(*HEALTHY_FOLLOW))
        handlers["chainHead_v1_header"] = replies(None)
        self.assert_check_failed(self.probe_rpc(handlers, "substrate_chainhead"), "subscription_stopped")

    def test_a_node_without_the_new_api_fails_as_subscription_unsupported(self) -> None:
        handlers = chainhead_node(lambda r: [rpc_error(r["id"], -32601, "Method not found")])
        metrics = self.probe_rpc(handlers, "substrate_chainhead")
        self.assert_check_failed(metrics, "subscription_unsupported")
        self.assertEqual(metrics['probe_rpc_error_code{method="chainHead_v1_follow"}'], -32601)

    def test_hold_max_gap_finality_and_genesis_work_as_on_the_other_subscriptions(self) -> None:
        self.use_config({"modules": {
            "held": {"preset": "substrate_chainhead", "hold": "0.5s", "max_gap": "5s"},
            "stalled": {"preset": "substrate_chainhead", "hold": "1s", "max_gap": "0.5s"},
            "lag": {"preset": "substrate_chainhead", "max_finality_lag": 1},
            "kusama": {"preset": "substrate_chainhead", "expect_genesis_hash": "0x" + "b0" * 32},
            "five": {"preset": "substrate_chainhead", "min_notifications": 5},
        }})
        handlers = chainhead_node(following(*HEALTHY_FOLLOW))
        held = self.probe_rpc(handlers, "held")
        self.assertEqual(held["probe_success"], 1, failure_of(held))
        self.assertGreater(held["probe_subscription_max_gap_seconds"], 0.25)  # the silence after the last event
        self.assertNotIn("probe_subscription_head_skips", held)  # events name blocks by hash only
        self.assertNotIn("probe_subscription_head_regressions", held)
        stalled = self.probe_rpc(handlers, "stalled")
        self.assert_check_failed(stalled, "subscription_stalled")
        self.assertGreater(stalled["probe_subscription_max_gap_seconds"], 0.5)
        self.assert_check_failed(self.probe_rpc(handlers, "lag"), "finality_lag")
        self.assert_check_failed(self.probe_rpc(handlers, "kusama"), "wrong_chain")
        self.assert_check_failed(self.probe_rpc(handlers, "five", scrape_timeout="1.5"), "too_few_notifications")


HEAD_NUMBERS = (10, 11, 14, 13, 15)  # 12 never comes (13 comes late): two skipped past the highest, one regression


class TestHeadSkips(ChecksTestCase):
    """probe_subscription_head_skips: heads a held subscription jumped over."""

    def held(self, preset: str, handlers: RpcHandlers) -> Dict[str, float]:
        self.use_config({"modules": {"held": {"preset": preset, "hold": "0.3s"}}})
        metrics = self.probe_rpc(handlers, "held")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual(metrics["probe_subscription_notifications"], len(HEAD_NUMBERS))
        self.assertEqual(metrics["probe_subscription_head_regressions"], 1)
        return metrics

    def test_skipped_heads_of_evm_substrate_and_cometbft(self) -> None:
        now = time.time()
        subscriptions = {
            "evm_newheads": {"eth_chainId": replies("0x1"), "eth_unsubscribe": replies(True), "eth_subscribe": lambda r: [rpc_reply(r, "0x9")] + [
                rpc_notification("eth_subscription", evm_block(n, now), "0x9") for n in HEAD_NUMBERS]},
            "substrate_newheads": {"chain_unsubscribeNewHeads": replies(True), "chain_subscribeNewHeads": lambda r: [rpc_reply(r, "s")] + [
                rpc_notification("chain_newHead", dict(SUBSTRATE_HEADER, number=hex(n)), "s") for n in HEAD_NUMBERS]},
            "cometbft_newblock": {"unsubscribe": replies({}), "subscribe": lambda r: [rpc_reply(r, {})] + [
                cometbft_event(r["id"], str(n), rfc3339(now)) for n in HEAD_NUMBERS]},
        }
        for preset, handlers in subscriptions.items():
            with self.subTest(preset=preset):
                metrics = self.held(preset, handlers)
                self.assertEqual(metrics["probe_subscription_head_skips"], 2)
                self.assertEqual(metrics["probe_chain_head_number"], 15)

    def test_solana_slots_are_skipped_by_design_and_not_counted(self) -> None:
        handlers = {"slotUnsubscribe": replies(True), "slotSubscribe": lambda r: [rpc_reply(r, 3)] + [
            rpc_notification("slotNotification", dict(SOLANA_SLOT, slot=n), 3) for n in HEAD_NUMBERS]}
        self.assertNotIn("probe_subscription_head_skips", self.held("solana_slot", handlers))

    def test_only_a_held_subscription_counts_them(self) -> None:
        handlers = {"chain_unsubscribeNewHeads": replies(True), "chain_subscribeNewHeads": lambda r: [rpc_reply(r, "s")] + [
            rpc_notification("chain_newHead", dict(SUBSTRATE_HEADER, number=hex(n)), "s") for n in (10, 12)]}
        metrics = self.probe_rpc(handlers, "substrate_newheads")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertNotIn("probe_subscription_head_skips", metrics)


COMETBFT_PATHS = ("/websocket", "/v1/websocket")  # CometBFT v1 serves its RPC under /v1/ and still accepts the old paths


class TestCometBFTPaths(ChecksTestCase):
    def test_node_and_newblock_on_the_old_and_the_v1_path(self) -> None:
        handlers = cometbft_node_at(time.time())
        handlers.update({"subscribe": lambda r: [rpc_reply(r, {}), cometbft_event(r["id"], "19000001", rfc3339(time.time()))],
                         "unsubscribe": replies({})})
        server = self.serve(rpc_server(handlers, paths=COMETBFT_PATHS))
        for path in COMETBFT_PATHS:
            for module in ("cometbft_node", "cometbft_newblock"):
                with self.subTest(path=path, module=module):
                    metrics = self.exporter.probe("ws://127.0.0.1:%d%s" % (server.port, path), "5", module=module)
                    self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
                    self.assertLess(metrics["probe_chain_head_age_seconds"], 60)
        elsewhere = self.exporter.probe("ws://127.0.0.1:%d/v2/websocket" % server.port, "5", module="cometbft_node")
        self.assert_failed(elsewhere, "upgrade", "http_status")
        self.assertEqual(elsewhere["probe_websocket_status_code"], 404)



# ==============================================================================================
# Exposition (Prometheus text format 0.0.4, OpenMetrics 1.0)
# ==============================================================================================


class TestExposition(unittest.TestCase):
    def test_escaping(self) -> None:
        self.assertEqual(wx.escape_help('a\\b\n"c"'), 'a\\\\b\\n"c"')
        self.assertEqual(wx.escape_label_value('a\\b\n"c"'), 'a\\\\b\\n\\"c\\"')

    def test_values(self) -> None:
        cases = [(1, "1"), (0, "0"), (1.0, "1"), (0.25, "0.25"), (1e-07, "1e-07"), (float("inf"), "+Inf"), (float("-inf"), "-Inf"), (float("nan"), "NaN"), (1700000000.0, "1700000000"), (123456.789, "123456.789")]
        for value, text in cases:
            self.assertEqual(wx.format_value(value), text)

    def test_families_render_once_with_sorted_escaped_labels(self) -> None:
        samples = [
            wx.Sample("probe_success", (), 1),
            wx.Sample("probe_failure_info", (("reason", 'x"y'), ("phase", "tls")), 1),
            wx.Sample("probe_failure_info", (("phase", "a\\b"), ("reason", "n\nl")), 1),
        ]
        self.assertEqual(
            wx.render_samples(samples),
            "# HELP probe_success Displays whether or not the probe was a success\n"
            "# TYPE probe_success gauge\n"
            "probe_success 1\n"
            "# HELP probe_failure_info Why the probe failed: the phase and a reason from a fixed set\n"
            "# TYPE probe_failure_info gauge\n"
            'probe_failure_info{phase="tls",reason="x\\"y"} 1\n'
            'probe_failure_info{phase="a\\\\b",reason="n\\nl"} 1\n',
        )

    def test_the_original_four_keep_their_help_text(self) -> None:
        self.assertEqual(wx.METRICS["probe_success"][1], "Displays whether or not the probe was a success")
        self.assertEqual(wx.METRICS["probe_duration_seconds"][1], "Returns how long the probe took to complete in seconds")
        self.assertEqual(wx.METRICS["probe_websocket_up"][1], "Displays whether the WebSocket connection was successful")
        self.assertEqual(wx.METRICS["probe_websocket_connection_duration_seconds"][1], "Duration of the WebSocket connection establishment")

    def test_counters_end_in_total(self) -> None:
        for name, (kind, _) in wx.METRICS.items():
            self.assertEqual(kind == "counter", name.endswith("_total"), name)

    def test_failed_probe_result_renders_every_family(self) -> None:
        result = wx.ProbeResult("connect", 5.0)
        result.failure = ("connect", "connect_refused")
        text = wx.render_samples(wx.probe_samples(result))
        metrics = parse_metrics(text)
        self.assertEqual(metrics["probe_success"], 0)
        self.assertEqual(metrics["probe_websocket_up"], 0)
        self.assertEqual(metrics["probe_timeout_seconds"], 5)
        self.assertEqual(metrics['probe_failure_info{phase="connect",reason="connect_refused"}'], 1)
        self.assertEqual(sorted(k for k in metrics if k.startswith("probe_websocket_duration_seconds")),
                         sorted('probe_websocket_duration_seconds{phase="%s"}' % p for p in wx.PHASES))
        self.assertEqual(text.count("# TYPE probe_websocket_duration_seconds"), 1)
        self.assertTrue(text.endswith("\n"))


PROMETHEUS_ACCEPT = (  # what Prometheus 2.42 sends by default
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


class TestOpenMetrics(unittest.TestCase):
    SAMPLES = [
        wx.Sample("probe_success", (), 0),
        wx.Sample("probe_failure_info", (("reason", "timeout"), ("phase", "upgrade")), 1),
        wx.Sample("ws_exporter_probes_total", (("module", "connect"),), 3),
    ]

    def test_text_format_of_a_small_example(self) -> None:
        self.assertEqual(
            wx.render_samples(self.SAMPLES),
            "# HELP probe_success Displays whether or not the probe was a success\n"
            "# TYPE probe_success gauge\n"
            "probe_success 0\n"
            "# HELP probe_failure_info Why the probe failed: the phase and a reason from a fixed set\n"
            "# TYPE probe_failure_info gauge\n"
            'probe_failure_info{phase="upgrade",reason="timeout"} 1\n'
            "# HELP ws_exporter_probes_total Probes run, by module\n"
            "# TYPE ws_exporter_probes_total counter\n"
            'ws_exporter_probes_total{module="connect"} 3\n',
        )

    def test_openmetrics_of_the_same_example(self) -> None:
        self.assertEqual(
            wx.render_openmetrics(self.SAMPLES),
            "# HELP probe_success Displays whether or not the probe was a success\n"
            "# TYPE probe_success gauge\n"
            "probe_success 0\n"
            "# HELP probe_failure_info Why the probe failed: the phase and a reason from a fixed set\n"
            "# TYPE probe_failure_info gauge\n"
            'probe_failure_info{phase="upgrade",reason="timeout"} 1\n'
            "# HELP ws_exporter_probes Probes run, by module\n"
            "# TYPE ws_exporter_probes counter\n"
            'ws_exporter_probes_total{module="connect"} 3\n'
            "# EOF\n",
        )

    def test_openmetrics_help_escapes_double_quotes(self) -> None:
        with mock.patch.dict(wx.METRICS, {"probe_success": ("gauge", 'say "hi"\\')}):
            text = wx.render_openmetrics([wx.Sample("probe_success", (), 1)])
        self.assertEqual(text.splitlines()[0], '# HELP probe_success say \\"hi\\"\\\\')

    def test_negotiation(self) -> None:
        cases = [
            (None, wx.TEXT_FORMAT),
            ("", wx.TEXT_FORMAT),
            ("*/*", wx.TEXT_FORMAT),
            ("text/plain;version=0.0.4", wx.TEXT_FORMAT),
            (PROMETHEUS_ACCEPT, wx.OPENMETRICS_FORMAT),
            ("application/openmetrics-text", wx.OPENMETRICS_FORMAT),
            ("Application/OpenMetrics-Text; version=0.0.1", wx.OPENMETRICS_FORMAT),
            ("text/plain, application/openmetrics-text;q=0.2", wx.OPENMETRICS_FORMAT),
            ("application/openmetrics-text;q=0, text/plain", wx.TEXT_FORMAT),
            ("application/openmetrics-text;q=zero", wx.OPENMETRICS_FORMAT),
        ]
        for accept, expected in cases:
            self.assertEqual(wx.negotiate_format(accept), expected, accept)
        self.assertEqual(wx.OPENMETRICS_FORMAT.content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8")

    def test_probe_and_metrics_answer_in_the_format_asked_for(self) -> None:
        fixture = ExporterFixture()
        self.addCleanup(fixture.close)
        target = "/probe?target=ws://127.0.0.1:%d/" % free_port()
        for path in (target, "/metrics"):
            with self.subTest(path):
                status, headers, body = fixture.get(path, {"Accept": PROMETHEUS_ACCEPT})
                self.assertEqual((status, headers["content-type"]), (200, wx.OPENMETRICS_CONTENT_TYPE))
                self.assertTrue(body.endswith("\n# EOF\n"), body[-100:])
                self.assertEqual(body.count("# EOF"), 1)
                status, headers, body = fixture.get(path, {"Accept": "text/plain;version=0.0.4"})
                self.assertEqual((status, headers["content-type"]), (200, wx.EXPOSITION_CONTENT_TYPE))
                self.assertNotIn("# EOF", body)
        _, _, body = fixture.get("/metrics", {"Accept": PROMETHEUS_ACCEPT})
        self.assertIn("# TYPE ws_exporter_probes counter\n", body)
        self.assertIn('ws_exporter_probes_total{module="connect"} 2\n', body)

    def test_debug_page_stays_plain_text(self) -> None:
        fixture = ExporterFixture()
        self.addCleanup(fixture.close)
        path = "/probe?debug=true&target=ws://127.0.0.1:%d/" % free_port()
        status, headers, body = fixture.get(path, {"Accept": PROMETHEUS_ACCEPT})
        self.assertEqual((status, headers["content-type"]), (200, "text/plain; charset=utf-8"))
        self.assertIn("# TYPE probe_success gauge", body)
        self.assertNotIn("# EOF", body)

    def test_promtool_accepts_the_text_format(self) -> None:
        require_peer(self, "WS_PROMTOOL")
        fixture = ExporterFixture()
        self.addCleanup(fixture.close)
        fixture.probe("ws://127.0.0.1:%d/" % free_port())
        for path in ("/metrics", "/probe?target=ws://127.0.0.1:%d/" % free_port()):
            _, _, body = fixture.get(path, {"Accept": "text/plain;version=0.0.4;q=1,*/*;q=0.1"})
            check = subprocess.run([os.environ["WS_PROMTOOL"], "check", "metrics"], input=body,
                                   capture_output=True, text=True, timeout=30)
            self.assertEqual((check.returncode, check.stdout + check.stderr), (0, ""), body)


# ==============================================================================================
# HTTP server
# ==============================================================================================


def _peer_closed(conn: socket.socket) -> bool:
    conn.setblocking(False)
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        conn.setblocking(True)
        conn.settimeout(5)


class TestHTTP(unittest.TestCase):
    def setUp(self) -> None:
        self.exporter = ExporterFixture()
        self.addCleanup(self.exporter.close)

    def test_missing_target_is_400(self) -> None:
        for path in ("/probe", "/probe?target=", "/probe?module=connect"):
            status, _, body = self.exporter.get(path)
            self.assertEqual((status, body), (400, "Target parameter is missing\n"), path)

    def test_unknown_module_is_400(self) -> None:
        status, _, body = self.exporter.get("/probe?target=ws://127.0.0.1:1/&module=nope")
        self.assertEqual((status, body), (400, 'Unknown module "nope"\n'))

    def test_bad_scrape_timeout_header_is_400(self) -> None:
        for value in ("abc", "-1", "0", "nan", "inf"):
            status, _, body = self.exporter.probe_raw("ws://127.0.0.1:1/", value)
            self.assertEqual(status, 400, value)
            self.assertTrue(body.startswith("Invalid X-Prometheus-Scrape-Timeout-Seconds header"), body)

    def test_duplicated_target_is_400(self) -> None:
        status, _, body = self.exporter.get("/probe?target=ws://a.example/&target=ws://b.example/")
        self.assertEqual((status, body), (400, "Parameter target is given more than once\n"))

    def test_bad_target_is_a_failed_probe_not_an_error(self) -> None:
        metrics = self.exporter.probe("ftp://x.example/")
        self.assertEqual(failure_of(metrics), ("target", "bad_target"))

    def test_a_misspelled_alias_fails_as_bad_target_and_says_so(self) -> None:
        metrics = self.exporter.probe("anvil-secrt")
        self.assertEqual(failure_of(metrics), ("target", "bad_target"))
        self.assertEqual(metrics["probe_dns_lookup_time_seconds"], 0)  # no lookup of "anvil-secrt"
        page = self.exporter.probe_raw("anvil-secrt", debug="true")[2]
        self.assertIn("no target alias by that name", page)

    def test_debug_is_true_or_false_anything_else_is_400(self) -> None:
        target = "ws://127.0.0.1:%d/" % free_port()
        self.assertIn("Logs for the probe:", self.exporter.probe_raw(target, debug="true")[2])
        self.assertTrue(self.exporter.probe_raw(target, debug="false")[2].startswith("# HELP probe_success"))
        for value in ("1", "yes", "True", ""):
            status, _, body = self.exporter.probe_raw(target, debug=value)
            self.assertEqual((status, body), (400, 'Parameter debug must be "true" or "false"\n'), value)

    def test_counters_are_exported_from_the_start(self) -> None:
        metrics = parse_metrics(self.exporter.get("/metrics")[2])
        for module in wx.PRESET_NAMES:
            self.assertEqual(metrics['ws_exporter_probes_total{module="%s"}' % module], 0, module)
            for reason in wx.FAILURE_REASONS:
                self.assertEqual(metrics['ws_exporter_probes_failed_total{module="%s",reason="%s"}' % (module, reason)], 0)
        for reason in ("connections", "overloaded"):
            self.assertEqual(metrics['ws_exporter_requests_rejected_total{reason="%s"}' % reason], 0)

    def test_timeout_is_the_smaller_of_flag_and_scrape_header(self) -> None:
        port = free_port()
        self.assertEqual(self.exporter.probe("ws://127.0.0.1:%d/" % port)["probe_timeout_seconds"], 10)
        self.assertEqual(self.exporter.probe("ws://127.0.0.1:%d/" % port, "4")["probe_timeout_seconds"], 3.5)
        self.assertEqual(self.exporter.probe("ws://127.0.0.1:%d/" % port, "60")["probe_timeout_seconds"], 10)
        self.assertEqual(self.exporter.probe("ws://127.0.0.1:%d/" % port, "0.2")["probe_timeout_seconds"], wx.MIN_PROBE_TIMEOUT_SECONDS)

    def test_healthy_landing_404_405(self) -> None:
        self.assertEqual(self.exporter.get("/-/healthy")[::2], (200, "Healthy\n"))
        status, headers, body = self.exporter.get("/")
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/html"))
        for link in ('href="/metrics"', 'href="/probe?target=', "debug=true"):
            self.assertIn(link, body)
        self.assertEqual(self.exporter.get("/nope")[0], 404)
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"):
            status, headers, _ = self.exporter.get("/probe?target=x", method=method)
            self.assertEqual(status, 405, method)
            self.assertEqual(headers["allow"], "GET, HEAD")

    def test_head_has_headers_and_no_body(self) -> None:
        status, headers, body = self.exporter.get("/metrics", method="HEAD")
        self.assertEqual((status, body), (200, ""))
        self.assertEqual(headers["server"], "ws-exporter/%s" % wx.__version__)
        self.assertGreater(int(headers["content-length"]), 100)

    def test_keep_alive_serves_several_requests_on_one_connection(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.exporter.port, timeout=10)
        self.addCleanup(conn.close)
        ports = set()
        for path in ("/-/healthy", "/metrics", "/probe?target=ws://127.0.0.1:1/", "/-/healthy"):
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            self.assertEqual(resp.status, 200, path)
            assert conn.sock is not None
            ports.add(conn.sock.getsockname()[1])
        self.assertEqual(len(ports), 1)

    def test_keep_alive_responses_are_not_held_back_by_nagle(self) -> None:
        # Head and body in two segments would cost ~40 ms a response (Nagle + delayed ACK).
        conn = http.client.HTTPConnection("127.0.0.1", self.exporter.port, timeout=10)
        self.addCleanup(conn.close)
        start = time.monotonic()
        for _ in range(50):
            conn.request("GET", "/-/healthy")
            conn.getresponse().read()
        self.assertLess(time.monotonic() - start, 1.0)

    def test_metrics_are_the_exporters_own(self) -> None:
        self.exporter.probe("ws://127.0.0.1:%d/" % free_port())
        self.exporter.probe("ftp://bad.example/")
        status, headers, body = self.exporter.get("/metrics")
        self.assertEqual(headers["content-type"], wx.EXPOSITION_CONTENT_TYPE)
        metrics = parse_metrics(body)
        self.assertEqual(metrics['ws_exporter_probes_total{module="connect"}'], 2)
        self.assertEqual(metrics['ws_exporter_probes_failed_total{module="connect",reason="connect_refused"}'], 1)
        self.assertEqual(metrics['ws_exporter_probes_failed_total{module="connect",reason="bad_target"}'], 1)
        self.assertEqual(metrics["ws_exporter_probes_in_flight"], 0)
        python = "%d.%d.%d" % sys.version_info[:3]
        self.assertEqual(metrics['ws_exporter_build_info{python_version="%s",version="%s"}' % (python, wx.__version__)], 1)
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes", "process_start_time_seconds", "process_open_fds", "process_max_fds"):
            self.assertGreater(metrics[name], 0, name)
        self.assertLess(abs(metrics["process_start_time_seconds"] - time.time()), 3600)
        self.assertFalse(any(k.startswith("probe_") for k in metrics))

    def test_metrics_carry_the_gc_counters_by_generation_and_the_os_thread_count(self) -> None:
        families = {"python_gc_objects_collected": "counter", "python_gc_objects_uncollectable": "counter",
                    "python_gc_collections": "counter", "process_threads": "gauge"}
        text = self.exporter.get("/metrics")[2]
        openmetrics = self.exporter.get("/metrics", {"Accept": wx.OPENMETRICS_MEDIA_TYPE})[2]
        for family, kind in families.items():
            self.assertIn("# TYPE %s %s\n" % (family + "_total" if kind == "counter" else family, kind), text)
            self.assertIn("# TYPE %s %s\n" % (family, kind), openmetrics)
        self.assertIn("# HELP python_gc_objects_uncollectable_total Uncollectable objects found during GC\n", text)
        before = parse_metrics(text)
        generations = sorted(k for k in before if k.startswith("python_gc_collections_total"))
        self.assertEqual(generations, ['python_gc_collections_total{generation="%d"}' % g for g in range(3)])
        self.assertGreaterEqual(before["process_threads"], threading.active_count())
        cycle: List[object] = []
        cycle.append(cycle)
        del cycle
        gc.collect()
        after = parse_metrics(self.exporter.get("/metrics")[2])
        for name in ("python_gc_collections_total", "python_gc_objects_collected_total"):
            key = '%s{generation="2"}' % name
            self.assertGreater(after[key], before[key], key)

    def test_debug_page_has_logs_metrics_and_module_without_secrets(self) -> None:
        status, headers, body = self.exporter.get("/probe?" + wx.urllib.parse.urlencode(
            {"target": "ws://u:pw@127.0.0.1:%d/v1/SECRETTOKEN?apikey=SECRETKEY" % free_port(), "debug": "true"}))
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/plain"))
        self.assertIn("Logs for the probe:", body)
        self.assertIn("msg=\"Probe failed\"", body)
        self.assertIn("probe_success 0", body)
        self.assertIn('"name": "connect"', body)
        for secret in ("SECRETTOKEN", "SECRETKEY", "pw@", "apikey"):
            self.assertNotIn(secret, body)
            self.assertNotIn(secret, self.exporter.log.getvalue())

    def test_logs_never_carry_the_target_path_or_query(self) -> None:
        self.exporter.get("/probe?target=wss://127.0.0.1:1/TOKENPATH%3Fkey%3DTOKENQUERY&debug=false")
        self.exporter.get("/probe?target=ftp://TOKENHOST/TOKENPATH")
        self.exporter.get("/probe?target=ws://127.0.0.1:1/TOKENPATH&module=nope")
        conn = socket.create_connection(("127.0.0.1", self.exporter.port))
        conn.sendall(b"GET /probe?target=ws://h/TOKENPATH HTTP/1.1 extra\r\n\r\n")
        conn.recv(1000)
        conn.close()
        log = self.exporter.log.getvalue()
        self.assertIn("Probe failed", log)
        for secret in ("TOKENPATH", "TOKENQUERY", "TOKENHOST"):
            self.assertNotIn(secret, log)

    def test_a_client_dripping_its_request_is_cut_off(self) -> None:
        with mock.patch.object(wx, "REQUEST_READ_SECONDS", 0.5):
            conn = socket.create_connection(("127.0.0.1", self.exporter.port))
            self.addCleanup(conn.close)
            conn.settimeout(5)
            start = time.monotonic()
            closed = False
            for _ in range(40):
                try:
                    conn.sendall(b"G")
                    time.sleep(0.1)  # the slow client itself, not synchronisation
                except OSError:
                    closed = True
                    break
                if _peer_closed(conn):
                    closed = True
                    break
            self.assertTrue(closed)
            self.assertLess(time.monotonic() - start, 3.0)


class TestOriginalVMProbe(unittest.TestCase):
    def test_a_vmprobe_without_module_sends_an_empty_one_which_means_connect(self) -> None:
        # The Go exporter's VMProbe has no spec.module; the operator still sends module=.
        server = LocalServer(good_server)
        self.addCleanup(server.close)
        fixture = ExporterFixture()
        self.addCleanup(fixture.close)
        metrics = fixture.probe("ws://127.0.0.1:%d/" % server.port, module="")
        self.assertEqual(metrics["probe_success"], 1)
        self.assertIn("<td>connect</td>", fixture.get("/")[2])


class TestRecentProbes(unittest.TestCase):
    def setUp(self) -> None:
        self.fixture = ExporterFixture()
        self.addCleanup(self.fixture.close)

    def landing_rows(self) -> List[str]:
        status, _, body = self.fixture.get("/")
        self.assertEqual(status, 200)
        return re.findall(r"<tr><td>.*?</tr>", body)

    def test_landing_page_lists_probes_newest_first_with_a_working_logs_link(self) -> None:
        server = LocalServer(good_server)
        self.addCleanup(server.close)
        self.assertIn("No probes yet.", self.fixture.get("/")[2])
        self.fixture.probe("ws://127.0.0.1:%d/" % free_port())
        self.fixture.probe("ws://127.0.0.1:%d/" % server.port)
        newest, oldest = self.landing_rows()
        self.assertRegex(
            newest,
            r"<tr><td>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d</td><td>connect</td><td>ws://127\.0\.0\.1:%d/</td>"
            r"<td>success</td><td></td><td>\d+\.\d{3}s</td><td><a href=\"/logs\?id=1\">logs</a></td></tr>" % server.port,
        )
        self.assertIn("<td>failure</td><td>connect: connect_refused</td>", oldest)
        status, headers, body = self.fixture.get("/logs?id=0")
        self.assertEqual((status, headers["content-type"]), (200, "text/plain; charset=utf-8"))
        self.assertIn("reason=connect_refused", body)
        self.assertIn("probe_success 0\n", body)
        self.assertIn("probe_success 1\n", self.fixture.get("/logs?id=1")[2])

    def test_logs_of_an_evicted_or_unknown_probe_are_404_and_a_bad_id_400(self) -> None:
        with mock.patch.object(self.fixture.exporter, "recent", wx.RecentProbes(3)):
            for _ in range(5):
                self.fixture.probe("ws://127.0.0.1:%d/" % free_port())
            self.assertEqual(len(self.landing_rows()), 3)
            self.assertEqual([self.fixture.get("/logs?id=%d" % i)[0] for i in range(6)], [404, 404, 200, 200, 200, 404])
        for query in ("", "?id=", "?id=x", "?id=1&id=2"):
            self.assertEqual(self.fixture.get("/logs" + query)[0], 400, query)

    def test_the_default_bound_holds(self) -> None:
        recent = wx.RecentProbes()
        result = wx.ProbeResult("connect", 1.0)
        log = wx.ProbeLog(wx.Logger(stream=io.StringIO()))
        for _ in range(wx.RECENT_PROBES + 20):
            recent.add(0.0, wx.DEFAULT_MODULES["connect"], "ws://x/", result, log)
        probes = recent.newest_first()
        self.assertEqual(len(probes), wx.RECENT_PROBES)
        self.assertEqual((probes[0].id, probes[-1].id), (wx.RECENT_PROBES + 19, 20))

    def test_no_secret_and_no_markup_from_a_target_reaches_the_page(self) -> None:
        port = free_port()
        secret = "s3cr3t-%3Cscript%3E"
        self.fixture.probe("ws://user:pw@127.0.0.1:%d/<b>/%s?key=%s" % (port, secret, secret))
        self.fixture.probe("<script>alert(1)</script>")
        status, _, page = self.fixture.get("/")
        logs = self.fixture.get("/logs?id=0")[2] + self.fixture.get("/logs?id=1")[2]
        for text in (page, logs):
            for leak in ("s3cr3t", "pw@", "<b>", "<script>", "key="):
                self.assertNotIn(leak, text)
        self.assertRegex(page, r"<td>ws://127\.0\.0\.1:%d/&lt;[0-9a-f]{8}&gt;</td>" % port)
        self.assertIn("<td>&lt;unparsable:", page)


def read_responses(sock: socket.socket, count: int) -> List[Tuple[int, str]]:
    """``count`` HTTP/1.1 responses (status, body) read from a raw socket, one after another."""
    reader = sock.makefile("rb")
    try:
        answers = []
        for _ in range(count):
            status = int(reader.readline().split()[1])
            length = 0
            for line in iter(reader.readline, b"\r\n"):
                name, _, value = line.decode("iso-8859-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            answers.append((status, reader.read(length).decode("utf-8")))
        return answers
    finally:
        reader.close()


def probe_request_bytes(target: str, extra: str = "") -> bytes:
    query = wx.urllib.parse.urlencode({"target": target})
    return ("GET /probe?%s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (query, extra)).encode("ascii")


class TestKeepAlive(unittest.TestCase):
    """A client connection carries request after request, pipelined or not, probes included."""

    def setUp(self) -> None:
        self.exporter = ExporterFixture()
        self.addCleanup(self.exporter.close)
        self.server = LocalServer(good_server)
        self.addCleanup(self.server.close)
        self.good = "ws://127.0.0.1:%d/" % self.server.port

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.exporter.port), timeout=10)
        self.addCleanup(sock.close)
        return sock

    def test_pipelined_probes_are_answered_in_order(self) -> None:
        sock = self.connect()
        sock.sendall(probe_request_bytes(self.good) + probe_request_bytes("ws://127.0.0.1:%d/" % free_port()))
        (first_status, first), (second_status, second) = read_responses(sock, 2)
        self.assertEqual((first_status, second_status), (200, 200))
        self.assertEqual(parse_metrics(first)["probe_success"], 1)
        self.assertEqual(failure_of(parse_metrics(second)), ("connect", "connect_refused"))

    def test_probes_with_checks_on_one_connection(self) -> None:
        rpc = LocalServer(rpc_server({"eth_chainId": replies("0x1"), "eth_getBlockByNumber": replies(
            {"number": "0x10", "timestamp": hex(int(time.time()))})}))
        self.addCleanup(rpc.close)
        sock = self.connect()
        for _ in range(2):
            sock.sendall(probe_request_bytes("ws://127.0.0.1:%d/" % rpc.port).replace(b" HTTP", b"&module=evm HTTP", 1))
            [(status, body)] = read_responses(sock, 1)
            metrics = parse_metrics(body)
            self.assertEqual((status, metrics["probe_success"], metrics["probe_chain_head_number"]), (200, 1, 16))

    def test_rpc_durations_end_when_the_answer_arrived_not_when_it_was_read(self) -> None:
        """An exporter busy elsewhere reads an answer late; the duration is the server's."""
        rpc = LocalServer(rpc_server({"eth_chainId": replies("0x1"), "eth_getBlockByNumber": replies(
            {"number": "0x10", "timestamp": hex(int(time.time()))})}))
        self.addCleanup(rpc.close)
        original = wx.parse_json_object

        def slow(data: bytes) -> Dict[str, object]:
            time.sleep(0.3)  # the exporter's own delay, simulated: not synchronisation
            return original(data)

        with mock.patch.object(wx, "parse_json_object", slow):
            metrics = self.exporter.probe("ws://127.0.0.1:%d/" % rpc.port, module="evm")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertLess(metrics['probe_rpc_duration_seconds{method="eth_chainId"}'], 0.25)
        self.assertLess(metrics['probe_rpc_duration_seconds{block="latest",method="eth_getBlockByNumber"}'], 0.25)

    def test_a_remembered_request_follows_a_new_config(self) -> None:
        """A reload changes what the next request on a kept-alive connection means."""
        sock = self.connect()
        request = probe_request_bytes(self.good).replace(b" HTTP", b"&module=m HTTP", 1)
        timeouts = []
        for seconds in (3, 4):
            self.exporter.exporter.config = wx.parse_config({"modules": {"m": {"timeout": "%ds" % seconds}}})
            for _ in range(2):
                sock.sendall(request)
                [(_, body)] = read_responses(sock, 1)
                timeouts.append(parse_metrics(body)["probe_timeout_seconds"])
        self.assertEqual(timeouts, [3, 3, 4, 4])

    def test_many_pipelined_requests_answered_at_once(self) -> None:
        """Probes that fail before any wait, answered one after another."""
        sock = self.connect()
        count = 400
        sock.sendall(probe_request_bytes("ftp://x.example/") * count)
        answers = read_responses(sock, count)
        self.assertEqual({status for status, _ in answers}, {200})
        self.assertEqual({failure_of(parse_metrics(body)) for _, body in answers}, {("target", "bad_target")})
        self.assertEqual(self.exporter.exporter.stats.in_flight, 0)

    def test_a_request_head_in_pieces_is_served(self) -> None:
        sock = self.connect()
        request = probe_request_bytes(self.good)
        for start in range(0, len(request), 7):
            sock.sendall(request[start : start + 7])
            time.sleep(0.005)  # a client writing in pieces, not synchronisation
        [(status, body)] = read_responses(sock, 1)
        self.assertEqual(status, 200)
        self.assertEqual(parse_metrics(body)["probe_success"], 1)

    def test_connection_close_is_honoured(self) -> None:
        sock = self.connect()
        sock.sendall(probe_request_bytes(self.good, "Connection: close\r\n"))
        [(status, _)] = read_responses(sock, 1)
        self.assertEqual(status, 200)
        self.assertEqual(sock.recv(1), b"")

    def test_an_idle_keep_alive_connection_is_closed(self) -> None:
        with mock.patch.object(wx, "KEEPALIVE_IDLE_SECONDS", 0.3):
            sock = self.connect()
            sock.sendall(probe_request_bytes(self.good))
            read_responses(sock, 1)
            start = time.monotonic()
            self.assertEqual(sock.recv(1), b"")  # the socket's 10 s timeout would raise instead
            self.assertLess(time.monotonic() - start, 3.0)

    def test_a_client_that_leaves_mid_probe_gives_its_connection_back(self) -> None:
        silent_server = LocalServer(silent)
        self.addCleanup(silent_server.close)
        fixture = ExporterFixture(max_connections=1)
        self.addCleanup(fixture.close)
        sock = socket.create_connection(("127.0.0.1", fixture.port), timeout=10)
        sock.sendall(probe_request_bytes("ws://127.0.0.1:%d/" % silent_server.port, "X-Prometheus-Scrape-Timeout-Seconds: 1\r\n"))
        self.assertTrue(wait_until(lambda: fixture.exporter.stats.in_flight == 1))
        sock.close()
        # Its probe runs out its 0.5 s; then the one connection allowed is free again.
        self.assertTrue(wait_until(lambda: fixture.get("/-/healthy")[0] == 200))
        self.assertEqual(fixture.exporter.stats.in_flight, 0)


class TestHostileRequests(unittest.TestCase):
    def setUp(self) -> None:
        self.exporter = ExporterFixture()
        self.addCleanup(self.exporter.close)

    def test_malformed_targets_are_failed_probes(self) -> None:
        targets = ["ws://", "ws://:8080/", "ws://host:99999/", "ws://host:-1/", "ws://" + "a" * 10000 + "/",
                   "ws://h/\x01", "ws://h\u00e9\u4e2d:1/", "ws://user:pass@", "file:///etc/passwd",
                   "javascript:alert(1)", "ws://::1/", "ws://[::1/", "ws://[zz::1]/", "%%%", "ws://h/%zz"]
        for raw in targets:
            with self.subTest(raw=raw[:40]):
                status, headers, body = self.exporter.probe_raw(raw, "1")
                self.assertEqual(status, 200)
                metrics = parse_metrics(body)
                self.assertEqual(metrics["probe_success"], 0)
                self.assertIsNotNone(failure_of(metrics))

    def test_huge_request_headers_get_a_client_error(self) -> None:
        conn = socket.create_connection(("127.0.0.1", self.exporter.port), timeout=10)
        self.addCleanup(conn.close)
        conn.sendall(b"GET /-/healthy HTTP/1.1\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n")
        status_line = conn.makefile("rb").readline()
        self.assertRegex(status_line, rb"^HTTP/1\.[01] 4\d\d ")

    def test_too_many_request_headers_get_a_client_error(self) -> None:
        conn = socket.create_connection(("127.0.0.1", self.exporter.port), timeout=10)
        self.addCleanup(conn.close)
        conn.sendall(b"GET /-/healthy HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n")
        self.assertRegex(conn.makefile("rb").readline(), rb"^HTTP/1\.[01] 4\d\d ")

    def test_client_leaving_mid_probe_frees_its_thread(self) -> None:
        server = LocalServer(silent)
        self.addCleanup(server.close)
        self.exporter.get("/-/healthy")
        threads = threading.active_count()
        conn = socket.create_connection(("127.0.0.1", self.exporter.port), timeout=10)
        conn.sendall(b"GET /probe?target=ws://127.0.0.1:%d/ HTTP/1.1\r\nX-Prometheus-Scrape-Timeout-Seconds: 1\r\n\r\n" % server.port)
        self.assertTrue(wait_until(lambda: self.exporter.exporter.stats.in_flight == 1))
        conn.close()
        self.assertTrue(wait_until(lambda: self.exporter.exporter.stats.in_flight == 0))
        self.assertTrue(wait_until(lambda: threading.active_count() <= threads + 1))  # + the silent server's
        self.assertEqual(self.exporter.get("/-/healthy")[0], 200)


# ----------------------------------------------------------------------------------------------
# Protecting the listener: TLS, password hashes, basic auth
# ----------------------------------------------------------------------------------------------


def client_context(cert: Optional[str] = None, key: Optional[str] = None, max_version: Optional[ssl.TLSVersion] = None) -> ssl.SSLContext:
    """What a scraper holds: the test CA trusted, optionally a client certificate."""
    context = ssl.create_default_context(cafile=shared_pki()["ca.pem"])
    if cert is not None:
        context.load_cert_chain(cert, key)
    if max_version is not None:
        context.maximum_version = max_version
    return context


def served_common_name(port: int, context: ssl.SSLContext) -> str:
    """The CN of the certificate the listener presents to a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            cert = tls.getpeercert()
    assert cert is not None
    return dict(pair[0] for pair in cert["subject"])["commonName"]  # type: ignore[misc]


# Refused at the handshake, or at the first read after it (TLS 1.3 checks the client's
# certificate after the client has finished its side of the handshake).
REFUSED = (ssl.SSLError, ConnectionError, http.client.HTTPException)


class TestListenerTLS(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.pki = client_pki()

    def tls(self, **options: str) -> wx.TLSServerConfig:
        return wx.TLSServerConfig(self.pki["good.pem"], self.pki["good.key"], **options)

    def protected(self, web: wx.WebConfig, client: Optional[ssl.SSLContext] = None) -> ProtectedExporter:
        exporter = ProtectedExporter(web, client or client_context())
        self.addCleanup(exporter.close)
        return exporter

    def require_client_cert(self) -> ProtectedExporter:
        return self.protected(wx.WebConfig(self.tls(client_ca_file=self.pki["ca.pem"], client_auth_type="RequireAndVerifyClientCert")))

    def test_https_with_basic_auth(self) -> None:
        users = (("prom", wx.parse_password_hash(wx.hash_password(PASSWORD))),)
        exporter = self.protected(wx.WebConfig(self.tls(), users))
        self.assertEqual(exporter.get("/metrics", basic("prom", PASSWORD))[0], 200)
        self.assertEqual(exporter.get(PROBE_DOWN + "&debug=true", basic("prom", PASSWORD))[0], 200)
        self.assertEqual(exporter.get(PROBE_DOWN, basic("prom", "wrong"))[0], 401)

    def test_plain_http_is_refused(self) -> None:
        exporter = self.protected(wx.WebConfig(self.tls()))
        plain = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=10)
        self.addCleanup(plain.close)
        with self.assertRaises(REFUSED):
            plain.request("GET", "/metrics")
            plain.getresponse()
        self.assertTrue(exporter.log.wait_for("TLS handshake failed"))
        self.assertEqual(exporter.get("/metrics")[0], 200)

    def test_a_silent_client_does_not_hold_up_others(self) -> None:
        exporter = self.protected(wx.WebConfig(self.tls()))
        silent_client = socket.create_connection(("127.0.0.1", exporter.port), timeout=10)
        self.addCleanup(silent_client.close)
        start = time.monotonic()
        self.assertEqual(exporter.get("/-/healthy")[0], 200)
        self.assertLess(time.monotonic() - start, 5)

    def test_a_handshake_not_finished_in_time_is_dropped(self) -> None:
        with mock.patch.object(wx, "TLS_HANDSHAKE_SECONDS", 0.3):
            exporter = self.protected(wx.WebConfig(self.tls()))
            silent_client = socket.create_connection(("127.0.0.1", exporter.port), timeout=10)
            self.addCleanup(silent_client.close)
            self.assertEqual(silent_client.recv(100), b"")  # the exporter hung up

    def test_a_client_certificate_from_the_configured_ca_is_accepted(self) -> None:
        exporter = self.require_client_cert()
        exporter.client = client_context(self.pki["client.pem"], self.pki["client.key"])
        self.assertEqual(exporter.get("/metrics")[0], 200)

    def test_no_client_certificate_is_refused_when_required(self) -> None:
        exporter = self.require_client_cert()
        with self.assertRaises(REFUSED):
            exporter.get("/metrics")
        self.assertTrue(exporter.log.wait_for("TLS handshake failed"))

    def test_a_client_certificate_from_another_ca_is_refused(self) -> None:
        exporter = self.require_client_cert()
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            exporter.client = client_context(self.pki["self.pem"], self.pki["self.key"], max_version=version)
            with self.assertRaises(REFUSED):
                exporter.get("/metrics")
        self.assertTrue(exporter.log.wait_for("TLS handshake failed", count=2))

    def test_a_client_certificate_is_optional_with_verify_if_given(self) -> None:
        exporter = self.protected(wx.WebConfig(self.tls(client_ca_file=self.pki["ca.pem"], client_auth_type="VerifyClientCertIfGiven")))
        self.assertEqual(exporter.get("/metrics")[0], 200)
        exporter.client = client_context(self.pki["self.pem"], self.pki["self.key"])
        with self.assertRaises(REFUSED):
            exporter.get("/metrics")

    def test_the_minimum_version_is_enforced(self) -> None:
        exporter = self.protected(wx.WebConfig(self.tls(min_version="TLS13")), client_context(max_version=ssl.TLSVersion.TLSv1_2))
        with self.assertRaises(REFUSED):
            exporter.get("/metrics")

    def test_rotated_certificate_files_are_served_without_a_restart(self) -> None:
        directory = tempfile.mkdtemp(prefix="wsx-rotate-")
        self.addCleanup(shutil.rmtree, directory, True)
        live = issue_cert(directory, "live", "before-rotation", SERVER_EXTENSIONS)
        client = client_context()
        with mock.patch.object(wx, "CERT_RECHECK_SECONDS", 0.05):
            exporter = self.protected(wx.WebConfig(wx.TLSServerConfig(live["pem"], live["key"])))
            self.assertEqual(served_common_name(exporter.port, client), "before-rotation")
            renewed = issue_cert(directory, "renewed", "after-rotation", SERVER_EXTENSIONS)
            os.replace(renewed["key"], live["key"])  # the key first: a moment of mismatch must not hurt
            os.replace(renewed["pem"], live["pem"])
            self.assertEqual(self.wait_for_name(exporter.port, client, "after-rotation"), "after-rotation")
            self.assertIn("TLS files reloaded", exporter.log.getvalue())
            with open(live["pem"], "w") as f:
                f.write("half written")
            self.wait_for_log(exporter, "TLS files changed but do not load")
            self.assertEqual(served_common_name(exporter.port, client), "after-rotation")

    def wait_for_name(self, port: int, client: ssl.SSLContext, name: str) -> str:
        deadline = time.monotonic() + 10
        seen = served_common_name(port, client)
        while seen != name and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the listener for an observable change
            seen = served_common_name(port, client)
        return seen

    def wait_for_log(self, exporter: ProtectedExporter, text: str) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            served_common_name(exporter.port, client_context())  # each connection looks at the files
            if exporter.log.wait_for(text, timeout=0.05):
                return
        self.fail("never logged: %s" % text)


class TestPasswordHash(unittest.TestCase):
    def hash_flag(self, stdin: bytes) -> "subprocess.CompletedProcess[bytes]":
        return subprocess.run([sys.executable, os.path.join(HERE, "ws_exporter.py"), "--web.hash-password"],
                              input=stdin, capture_output=True, timeout=30)

    def test_the_flag_prints_a_hash_that_verifies_its_password(self) -> None:
        result = self.hash_flag(PASSWORD.encode() + b"\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        text = result.stdout.decode("ascii")
        self.assertRegex(text, r"^scrypt\$n=16384,r=8,p=1\$[A-Za-z0-9+/]{22}==\$[A-Za-z0-9+/]{43}=\n$")
        stored = wx.parse_password_hash(text.strip())
        self.assertTrue(wx.verify_password(PASSWORD, stored))
        self.assertFalse(wx.verify_password(PASSWORD + "\n", stored))
        self.assertFalse(wx.verify_password("correct horse", stored))
        self.assertEqual(stored.text(), text.strip())

    def test_no_password_exits_2(self) -> None:
        result = self.hash_flag(b"")
        self.assertEqual((result.returncode, result.stderr), (2, b"ws_exporter: --web.hash-password: no password on standard input\n"))

    def test_one_line_is_read_and_only_its_line_break_removed(self) -> None:
        self.assertEqual(wx.password_from(io.BytesIO(b" p w \r\nsecond line\n")), " p w ")
        self.assertEqual(wx.password_from(io.BytesIO("p\u00e4ss".encode("utf-8"))), "p\u00e4ss")

    def test_each_hash_has_its_own_salt(self) -> None:
        self.assertNotEqual(wx.hash_password(PASSWORD), wx.hash_password(PASSWORD))

    def test_basic_credentials(self) -> None:
        encode = lambda text: base64.b64encode(text.encode("utf-8")).decode("ascii")  # noqa: E731
        self.assertEqual(wx.parse_basic_credentials("Basic " + encode("prom:a:b")), ("prom", "a:b"))
        self.assertEqual(wx.parse_basic_credentials("bAsIc  " + encode("prom:")), ("prom", ""))
        for header in (None, "", "Bearer x", "Basic", "Basic !!!", "Basic " + encode("no colon"), "Basic " + base64.b64encode(b"\xff:x").decode()):
            self.assertIsNone(wx.parse_basic_credentials(header), header)


class TestBasicAuth(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.users = (("prom", wx.parse_password_hash(wx.hash_password(PASSWORD))),)

    def protected(self, **web: object) -> ProtectedExporter:
        exporter = ProtectedExporter(wx.WebConfig(users=self.users, **web))  # type: ignore[arg-type]
        self.addCleanup(exporter.close)
        return exporter

    def test_probe_metrics_and_debug_page_need_the_right_password(self) -> None:
        exporter = self.protected()
        paths = (PROBE_DOWN, PROBE_DOWN + "&debug=true", "/metrics", "/", "/-/healthy")
        for path in paths:
            status, _, body = exporter.get(path, basic("prom", PASSWORD))
            self.assertEqual(status, 200, path)
        self.assertIn("Logs for the probe:", exporter.get(PROBE_DOWN + "&debug=true", basic("prom", PASSWORD))[2])
        for headers in ({}, basic("prom", "wrong"), basic("nobody", PASSWORD), basic("prom", PASSWORD + " "), {"Authorization": "Bearer " + PASSWORD}):
            for path in paths:
                status, answer, body = exporter.get(path, headers)
                self.assertEqual((status, body), (401, "Unauthorized\n"), (path, headers))
                self.assertEqual(answer["www-authenticate"], 'Basic realm="ws-exporter"')
        metrics = parse_metrics(exporter.get("/metrics", basic("prom", PASSWORD))[2])
        self.assertEqual(metrics['ws_exporter_probes_total{module="connect"}'], 3)  # refused requests probed nothing

    def test_healthy_is_open_when_configured(self) -> None:
        exporter = self.protected(healthy_unauthenticated=True)
        self.assertEqual(exporter.get("/-/healthy")[::2], (200, "Healthy\n"))
        self.assertEqual(exporter.get("/metrics")[0], 401)
        self.assertEqual(exporter.get("/-/healthy?x")[0], 200)

    def test_right_passwords_are_remembered_as_digests_only(self) -> None:
        exporter = self.protected()
        with mock.patch.object(wx, "verify_password", wraps=wx.verify_password) as verify:
            for _ in range(3):
                self.assertEqual(exporter.get("/metrics", basic("prom", PASSWORD))[0], 200)
            for _ in range(2):
                self.assertEqual(exporter.get("/metrics", basic("prom", "wrong"))[0], 401)
        self.assertEqual(verify.call_count, 1 + 2)  # once for the right password, every time for a wrong one
        assert exporter.server.auth is not None
        remembered = exporter.server.auth._verified
        self.assertEqual([len(d) for d in remembered], [32])
        self.assertFalse(any(PASSWORD.encode() in d for d in remembered))

    def test_password_hashing_is_bounded_and_the_excess_gets_429(self) -> None:
        entered, release = threading.Event(), threading.Event()
        running, most = [0], [0]
        lock = threading.Lock()

        def slow_verify(password: str, stored: wx.PasswordHash) -> bool:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            entered.set()
            release.wait(20)
            with lock:
                running[0] -= 1
            return False

        with mock.patch.multiple(wx, AUTH_MAX_HASHING=1, AUTH_HASH_WAIT_SECONDS=0.2, verify_password=slow_verify):
            exporter = self.protected()
            statuses: List[int] = []
            first = threading.Thread(target=lambda: statuses.append(exporter.get("/metrics", basic("prom", "guess0"))[0]))
            first.start()
            self.assertTrue(entered.wait(10))
            for n in (1, 2):
                status, headers, body = exporter.get("/metrics", basic("prom", "guess%d" % n))
                self.assertEqual((status, body, headers["retry-after"]), (429, "Too Many Requests\n", "1"))
            release.set()
            first.join(10)
        self.assertEqual((statuses, most[0]), ([401], 1))


# ==============================================================================================
# Configuration and flags
# ==============================================================================================


class TestFlags(unittest.TestCase):
    def test_defaults_are_the_originals(self) -> None:
        settings = wx.parse_flags([])
        self.assertEqual((settings.listen_address, settings.telemetry_path, settings.probe_path, settings.timeout, settings.timeout_offset, settings.log_level),
                         (":9095", "/metrics", "/probe", 10.0, 0.5, "info"))

    def test_go_style_spellings(self) -> None:
        for argv in (["-timeout", "5s"], ["-timeout=5s"], ["--timeout", "5s"], ["--timeout=5s"]):
            self.assertEqual(wx.parse_flags(argv).timeout, 5.0, argv)

    def test_durations(self) -> None:
        cases = {"500ms": 0.5, "5s": 5, "1m30s": 90, "1h": 3600, "2": 2, "1.5": 1.5, "1.5s": 1.5, "250us": 0.00025, "10ns": 1e-8}
        for text, seconds in cases.items():
            self.assertAlmostEqual(wx.parse_duration(text), seconds, msg=text)
        for text in ("", "5x", "s", "-1s", "1e3", "nan", "5 s", "1m30"):
            with self.subTest(text=text), self.assertRaises(ValueError):
                wx.parse_duration(text)

    def test_debug_is_log_level_debug(self) -> None:
        self.assertEqual(wx.parse_flags(["--debug"]).log_level, "debug")
        self.assertEqual(wx.parse_flags(["-debug=false"]).log_level, "info")
        self.assertEqual(wx.parse_flags(["--log.level=warn", "--debug"]).log_level, "debug")

    def test_bad_values_name_the_flag(self) -> None:
        cases = {
            ("--timeout=abc",): 'invalid value "abc" for flag --timeout',
            ("--timeout=0s",): 'invalid value "0s" for flag --timeout: must be greater than zero',
            ("--log.level=trace",): 'invalid value "trace" for flag --log.level',
            ("--log.format", "xml"): 'invalid value "xml" for flag --log.format',
            ("--web.listen-address=9095",): 'invalid value "9095" for flag --web.listen-address',
            ("--web.listen-address=::1:9095",): "for flag --web.listen-address",
            ("--web.probe-path=probe",): "for flag --web.probe-path",
            ("--nope",): "flag provided but not defined: --nope",
            ("--timeout",): "flag needs an argument: --timeout",
            ("stray",): "unexpected argument 'stray'",
        }
        for argv, message in cases.items():
            with self.subTest(argv=argv), self.assertRaises(wx.FlagError) as caught:
                wx.parse_flags(list(argv))
            self.assertIn(message, str(caught.exception))

    def test_listen_address_forms(self) -> None:
        self.assertEqual(wx.split_listen_address(":9095"), ("", 9095))
        self.assertEqual(wx.split_listen_address("127.0.0.1:1"), ("127.0.0.1", 1))
        self.assertEqual(wx.split_listen_address("[::1]:9095"), ("::1", 9095))
        self.assertEqual(wx.split_listen_address("localhost:0"), ("localhost", 0))


class TestConfig(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="wsx-config-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def error_of(self, config: object) -> str:
        with self.assertRaises(wx.ConfigError) as caught:
            wx.parse_config(config)
        return str(caught.exception)

    def test_errors_name_the_key(self) -> None:
        cases = [
            ({"modules": {"eth": {"tls": {"ca_fle": "x"}}}}, "modules.eth.tls.ca_fle: unknown key"),
            ({"modules": {"eth": {"timeout": 5}}}, "modules.eth.timeout: want a string, got number"),
            ({"modules": {"eth": {"timeout": "soon"}}}, "modules.eth.timeout: not a duration (examples: 500ms, 5s, 1m30s)"),
            ({"modules": {"eth": {"expect_chain_id": "1"}}}, "modules.eth.expect_chain_id: want an integer, got string"),
            ({"modules": {"eth": {"preset": "bitcoin"}}}, "modules.eth.preset: want one of: %s" % ", ".join(wx.PRESET_NAMES)),
            ({"modules": {"eth": {"subprotocols": ["a", 1]}}}, "modules.eth.subprotocols[1]: want a string, got number"),
            ({"modules": {"eth": {"steps": [{"expect": {"path": "a", "at_least": "1"}}]}}}, "modules.eth.steps[0].expect.at_least: want a number, got string"),
            ({"modules": {"s": {"preset": "solana_slot", "max_head_age": "1m"}}}, "modules.s.max_head_age: preset solana_slot reports no block time"),
            ({"modules": {"p": {"preset": "ping", "expect_chain_id": 1}}}, "modules.p.expect_chain_id: preset ping reports no chain id"),
            ({"modules": {"h": {"preset": "evm_newheads", "timeout": "3s", "hold": "20s"}}},
             "modules.h.hold: 20s does not fit in the module's timeout of 3s: the unsubscribe and the close need its last 0.6s"),
            ({"modules": []}, "modules: want an object, got array"),
            ({"module": {}}, "module: unknown key"),
            ({"targets": {"x": {"url": "ftp://h/", "module": "evm"}}}, "targets.x.url: not a probe target: unsupported scheme"),
            ({"targets": {"x": {"url": "ws://h/", "module": "nope"}}}, 'targets.x.module: unknown module "nope"'),
            ({"modules": {"eth": {"headers": {"Bad Name": "v"}}}}, "modules.eth.headers.Bad Name: not a valid header name"),
            ({"modules": {"eth": {"tls": {"ca_file": os.path.join(self.dir, "missing.pem")}}}}, "modules.eth.tls: cannot load certificates: No such file or directory"),
        ]
        for config, message in cases:
            with self.subTest(message):
                self.assertEqual(self.error_of(config), message)

    def test_the_config_keys_are_the_module_fields_and_the_debug_page_shows_them_all(self) -> None:
        self.assertEqual(set(wx._MODULE_KEYS), set(wx.Module._fields) - {"name", "tls_context"})
        self.assertEqual(list(wx.Module("m").settings()), [f for f in wx.Module._fields if f != "tls_context"])

    def test_every_error_in_a_file_is_reported_one_per_line_at_start_and_on_reload(self) -> None:
        config = {"modules": {"a": {"timeout": 5, "colour": "red"}, "b": {"preset": "bitcoin"}},
                  "targets": {"x": {"url": "ftp://h/", "module": "a"}, "y": {"url": "ws://h/", "module": "a"}}}
        errors = [
            "modules.a.timeout: want a string, got number",
            "modules.a.colour: unknown key",
            "modules.b.preset: want one of: %s" % ", ".join(wx.PRESET_NAMES),
            "targets.x.url: not a probe target: unsupported scheme",
        ]  # targets.y is no error: module a is there, only in error itself
        self.assertEqual(self.error_of(config).splitlines(), errors)
        path = write_config(self.dir, config)
        result = subprocess.run([sys.executable, os.path.join(HERE, "ws_exporter.py"), "--config.file", path],
                                capture_output=True, text=True, timeout=30)
        self.assertEqual((result.returncode, result.stderr.splitlines()), (2, ["ws_exporter: config file %s: %s" % (path, e) for e in errors]))
        fixture = ExporterFixture(config_file=path)
        self.addCleanup(fixture.close)
        status, _, body = fixture.get("/-/reload", method="POST")
        self.assertEqual((status, body), (500, "Config reload failed: %s\n" % "\n".join(errors)))
        logged = [line for line in fixture.log.getvalue().splitlines() if "Config reload failed" in line]
        self.assertEqual(len(logged), 1)
        self.assertIn(json.dumps("\n".join(errors)), logged[0])

    def test_env_and_file_substitution(self) -> None:
        secret = os.path.join(self.dir, "key")
        with open(secret, "w") as f:
            f.write("from-file\n")
        config = {"modules": {"m": {"headers": {"X-Key": "${env:WSX_KEY}", "Authorization": "Bearer ${file:%s}" % secret}}}}
        with mock.patch.dict(os.environ, {"WSX_KEY": "from-env"}):
            module = wx.parse_config(config).modules["m"]
        self.assertEqual(module.headers, (("X-Key", "from-env"), ("Authorization", "Bearer from-file")))
        self.assertEqual(module.settings()["headers"], {"X-Key": "<redacted>", "Authorization": "<redacted>"})
        with mock.patch.dict(os.environ, {}, clear=True):
            self.assertEqual(self.error_of(config), "modules.m.headers.X-Key: environment variable WSX_KEY is not set")

    def test_modules_override_presets_and_default_to_connect(self) -> None:
        config = wx.parse_config({"modules": {"evm": {"expect_chain_id": 1}, "plain": {"timeout": "2s"}}})
        self.assertEqual((config.modules["evm"].preset, config.modules["evm"].expect_chain_id), ("evm", 1))
        self.assertEqual((config.modules["plain"].preset, config.modules["plain"].timeout), ("connect", 2.0))
        self.assertEqual(config.modules["ping"], wx.DEFAULT_MODULES["ping"])

    def test_bad_file_at_start_exits_2_with_one_line(self) -> None:
        for content in ('{"modules": {"eth": {"tls": {"ca_fle": "x"}}}}', "{not json"):
            path = write_config(self.dir, content)
            result = subprocess.run([sys.executable, os.path.join(HERE, "ws_exporter.py"), "--config.file", path],
                                    capture_output=True, text=True, timeout=30)
            self.assertEqual(result.returncode, 2)
            self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn("modules.eth.tls.ca_fle: unknown key", subprocess.run(
            [sys.executable, os.path.join(HERE, "ws_exporter.py"), "--config.file", write_config(self.dir, '{"modules": {"eth": {"tls": {"ca_fle": 1}}}}')],
            capture_output=True, text=True, timeout=30).stderr)


class TestConfigFiles(unittest.TestCase):
    """--config.file and --web.config.file are read by the same JSON checks."""

    def test_a_key_twice_in_one_object_is_refused_in_either_file(self) -> None:
        directory = tempfile.mkdtemp(prefix="wsx-config-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = write_config(directory, '{"modules": {"m": {"timeout": "1s"}, "m": {"timeout": "2s"}}}')
        for load in (wx.load_config, wx.load_web_config):
            with self.subTest(load.__name__), self.assertRaises(wx.ConfigError) as caught:
                load(path)
            self.assertEqual(str(caught.exception), "key 'm' appears twice in one object")

    def test_json_nested_too_deep_is_a_config_error(self) -> None:
        directory = tempfile.mkdtemp(prefix="wsx-config-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = write_config(directory, "[" * 100000 + "]" * 100000)
        with self.assertRaises(wx.ConfigError) as caught:
            wx.load_config(path)
        self.assertTrue(str(caught.exception).startswith("%s is not valid JSON: " % path), caught.exception)


class TestWebConfig(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="wsx-web-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.hash = wx.hash_password(PASSWORD)

    def load(self, config: object) -> wx.WebConfig:
        path = os.path.join(self.dir, "web.json")
        with open(path, "w") as f:
            f.write(config if isinstance(config, str) else json.dumps(config))
        return wx.load_web_config(path)

    def error(self, config: object) -> str:
        with self.assertRaises(wx.ConfigError) as caught:
            self.load(config)
        return str(caught.exception)

    def test_a_full_config_loads_with_paths_relative_to_its_directory(self) -> None:
        pki = shared_pki()
        for name in ("good.pem", "good.key", "ca.pem"):
            shutil.copy(pki[name], self.dir)
        config = self.load({
            "tls_server_config": {"cert_file": "good.pem", "key_file": "good.key", "client_ca_file": "ca.pem",
                                  "client_auth_type": "RequireAndVerifyClientCert", "min_version": "TLS13"},
            "basic_auth_users": {"prom": self.hash},
            "healthy_unauthenticated": True,
        })
        join = lambda name: os.path.join(self.dir, name)  # noqa: E731
        self.assertEqual(config.tls, wx.TLSServerConfig(join("good.pem"), join("good.key"), join("ca.pem"), "RequireAndVerifyClientCert", "TLS13"))
        self.assertEqual(config.users, (("prom", wx.parse_password_hash(self.hash)),))
        self.assertTrue(config.healthy_unauthenticated)
        self.assertEqual(self.load({}), wx.WebConfig())

    def test_unknown_keys_are_refused_with_their_path(self) -> None:
        self.assertEqual(self.error({"tls_config": {}}), "tls_config: unknown key")
        self.assertEqual(self.error({"tls_server_config": {"cert_file": "a", "key_file": "b", "cipher_suites": []}}),
                         "tls_server_config.cipher_suites: unknown key")

    def test_bad_values_name_their_key(self) -> None:
        tls = {"cert_file": "a", "key_file": "b"}
        cases = [
            ([], "top level: want an object, got array"),
            ('{"healthy_unauthenticated": true, "healthy_unauthenticated": false}', "key 'healthy_unauthenticated' appears twice in one object"),
            ({"healthy_unauthenticated": "yes"}, "healthy_unauthenticated: want true or false, got string"),
            ({"tls_server_config": {"cert_file": "a"}}, "tls_server_config.key_file: required"),
            ({"tls_server_config": dict(tls, min_version="TLS11")}, "tls_server_config.min_version: want one of: TLS12, TLS13"),
            ({"tls_server_config": dict(tls, client_auth_type="RequireAnyClientCert")},
             "tls_server_config.client_auth_type: want one of: NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert"),
            ({"tls_server_config": dict(tls, client_auth_type="RequireAndVerifyClientCert")},
             "tls_server_config.client_ca_file: required when client_auth_type is RequireAndVerifyClientCert"),
            ({"tls_server_config": dict(tls, client_ca_file="ca.pem")},
             "tls_server_config.client_auth_type: client_ca_file is set, so choose VerifyClientCertIfGiven or RequireAndVerifyClientCert"),
            ({"basic_auth_users": {"alice": 1}}, "basic_auth_users.alice: want a string, got number"),
            ({"basic_auth_users": {"a:b": self.hash}}, "basic_auth_users: 'a:b' is not a user name"),
            ({"basic_auth_users": {"alice": "$2y$10$mDwo.lAisC94iLAyP81MCesa29IzH37oigHC/42V2pdJlUprsJPze"}},
             "basic_auth_users.alice: bcrypt is not in Python's standard library; make an scrypt hash with --web.hash-password"),
            ({"basic_auth_users": {"alice": self.hash.replace("n=16384", "n=1000")}},
             "basic_auth_users.alice: scrypt parameters out of range (n a power of two, p <= 16, at most 64 MiB)"),
            ({"basic_auth_users": {"alice": "hunter2"}},
             "basic_auth_users.alice: not a hash made by --web.hash-password (scrypt$n=N,r=R,p=P$salt$key)"),
        ]
        for config, message in cases:
            self.assertEqual(self.error(config), message)

    def test_tls_files_that_do_not_load_stop_the_start(self) -> None:
        message = self.error({"tls_server_config": {"cert_file": "missing.pem", "key_file": "missing.key"}})
        self.assertTrue(message.startswith("tls_server_config: the files do not load: "), message)

    def test_a_bad_file_exits_2_with_one_line(self) -> None:
        path = os.path.join(self.dir, "web.json")
        for text in ('{"basic_auth_users": {"alice": "x"}', '{"basic_auth_user": {}}'):
            with open(path, "w") as f:
                f.write(text)
            result = subprocess.run([sys.executable, os.path.join(HERE, "ws_exporter.py"), "--web.config.file", path],
                                    capture_output=True, text=True, timeout=30)
            self.assertEqual(result.returncode, 2, text)
            self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
            self.assertTrue(result.stderr.startswith("ws_exporter: --web.config.file=%s: " % path), result.stderr)


class TestAliasesAndReload(ChecksTestCase):
    TOKEN = "s3cr3t-t0ken-zz"

    def setUp(self) -> None:
        super().setUp()
        self.dir = tempfile.mkdtemp(prefix="wsx-config-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_alias_probes_its_url_and_module_without_showing_the_token(self) -> None:
        handlers = {"eth_chainId": replies("0x1"), "eth_getBlockByNumber": replies(evm_block(9, time.time()))}
        paths: List[bytes] = []

        def recording(sock: socket.socket) -> None:
            head, rest = read_request_head(sock)
            paths.append(head.split(b"\r\n")[0])
            sock.sendall(switching_response(request_key(head)))
            opcode, payload, rest = read_client_frame(sock, rest)
            sock.sendall(server_frame(wx.Opcode.CLOSE, payload))

        rpc = self.serve(rpc_server(handlers))
        plain = self.serve(recording)
        config = {"targets": {
            "eth-mainnet": {"url": "ws://127.0.0.1:%d/v3/${env:WSX_TOKEN}" % rpc.port, "module": "evm"},
            "other": {"url": "ws://127.0.0.1:%d/key/${env:WSX_TOKEN}?k=${env:WSX_TOKEN}" % plain.port},
            "down": {"url": "ws://127.0.0.1:%d/${env:WSX_TOKEN}" % free_port(), "module": "ping"},
        }}
        with mock.patch.dict(os.environ, {"WSX_TOKEN": self.TOKEN}):
            self.use_config(config)
        metrics = self.exporter.probe("eth-mainnet")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual(metrics["probe_chain_head_number"], 9)
        metrics = self.exporter.probe("eth-mainnet", module="connect")  # an explicit module wins
        self.assertNotIn("probe_chain_id", metrics)
        self.assertEqual(self.exporter.probe("other")["probe_success"], 1)
        self.assertEqual(paths, [("GET /key/%s?k=%s HTTP/1.1" % (self.TOKEN, self.TOKEN)).encode()])
        self.assertEqual(failure_of(self.exporter.probe("down")), ("connect", "connect_refused"))
        pages = [self.exporter.probe_raw(name, debug="true")[2] for name in ("eth-mainnet", "other", "down")]
        self.assertIn("target=eth-mainnet", pages[0])
        for text in pages + [self.exporter.log.getvalue()]:
            self.assertNotIn(self.TOKEN, text)
        self.assertIn("target=down", self.exporter.log.getvalue())

    def test_post_reload_swaps_config_and_a_bad_file_keeps_the_old(self) -> None:
        path = write_config(self.dir, {"modules": {"mine": {"preset": "ping"}}})
        fixture = ExporterFixture(config_file=path)
        self.addCleanup(fixture.close)
        self.assertEqual(fixture.get("/-/reload")[0], 405)
        self.assertEqual(fixture.get("/-/reload", method="POST")[0], 200)
        self.assertEqual(fixture.exporter.modules["mine"].preset, "ping")
        metrics = parse_metrics(fixture.get("/metrics")[2])
        self.assertEqual(metrics["ws_exporter_config_last_reload_successful"], 1)
        good_time = metrics["ws_exporter_config_last_reload_success_timestamp_seconds"]
        write_config(self.dir, {"modules": {"mine": {"preset": "pong"}}})
        status, _, body = fixture.get("/-/reload", method="POST")
        self.assertEqual((status, body), (500, "Config reload failed: modules.mine.preset: want one of: %s\n" % ", ".join(wx.PRESET_NAMES)))
        self.assertEqual(fixture.exporter.modules["mine"].preset, "ping")
        metrics = parse_metrics(fixture.get("/metrics")[2])
        self.assertEqual(metrics["ws_exporter_config_last_reload_successful"], 0)
        self.assertEqual(metrics["ws_exporter_config_last_reload_success_timestamp_seconds"], good_time)
        self.assertIn("Config reload failed", fixture.log.getvalue())
        self.assertEqual(fixture.get("/probe?target=x&module=mine")[0], 200)

    def test_reload_needs_the_password_when_basic_auth_is_on(self) -> None:
        users = (("prom", wx.parse_password_hash(wx.hash_password(PASSWORD))),)
        fixture = ExporterFixture(wx.WebConfig(users=users), config_file=write_config(self.dir, {}))
        self.addCleanup(fixture.close)
        self.assertEqual(fixture.get("/-/reload", method="POST")[0], 401)
        self.assertEqual(fixture.get("/-/reload", basic("prom", PASSWORD), method="POST")[0], 200)

    def test_sighup_reloads_and_a_bad_file_keeps_the_old(self) -> None:
        path = write_config(self.dir, {"modules": {"first": {}}})
        proc = ExporterProcess("--config.file=" + path)
        self.addCleanup(proc.stop)

        def status_of(module: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=10)
            conn.request("GET", "/probe?target=ws://127.0.0.1:%d/&module=%s" % (free_port(), module))
            status = conn.getresponse().status
            conn.close()
            return status

        self.assertEqual((status_of("first"), status_of("second")), (200, 400))
        assert proc.proc.stderr is not None
        self.assertIn("msg=\"Config loaded\" file=%s" % path, proc.proc.stderr.readline())  # the start's
        for content, expect in ({"modules": {"second": {}}}, "Config loaded"), ("{broken", "Config reload failed"):
            write_config(self.dir, content)
            proc.proc.send_signal(signal.SIGHUP)
            line = ""
            while "msg=Config" not in line and 'msg="Config' not in line:
                line = proc.proc.stderr.readline()  # probe lines come first; a dead process gives ""
                self.assertTrue(line, "exporter exited")
            self.assertIn(expect, line)
        self.assertEqual((status_of("first"), status_of("second")), (400, 200))
        self.assertEqual(proc.stop(), 0)


# ==============================================================================================
# main
# ==============================================================================================


class TestProgram(unittest.TestCase):
    def run_exporter(self, *args: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
        return subprocess.run([sys.executable, os.path.join(HERE, "ws_exporter.py"), *args], capture_output=True, text=True, timeout=30)

    def test_help_and_version(self) -> None:
        result = self.run_exporter("--help")
        self.assertEqual(result.returncode, 0)
        for flag in ("--web.listen-address=:9095", "--web.telemetry-path", "--web.probe-path", "--timeout=10s", "--timeout-offset", "--debug", "--log.level", "--log.format"):
            self.assertIn(flag, result.stdout)
        result = self.run_exporter("-version")
        self.assertEqual(result.returncode, 0)
        self.assertIn(wx.__version__, result.stdout)

    @unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
    def test_the_process_that_runs_is_the_one_started(self) -> None:
        script = os.path.join(HERE, "ws_exporter.py")
        proc = ExporterProcess()
        self.addCleanup(proc.stop)
        with open("/proc/%d/cmdline" % proc.proc.pid, "rb") as f:
            argv = f.read().decode().split("\0")[:-1]
        self.assertEqual(argv, [sys.executable, script, "--web.listen-address=127.0.0.1:0"])
        with open("/proc/%d/task/%d/children" % (proc.proc.pid, proc.proc.pid)) as f:
            self.assertEqual(f.read(), "")  # no other process
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=10)
        conn.request("GET", "/-/healthy")
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()

    def test_probe_command_prints_the_debug_page_and_exits_with_the_result(self) -> None:
        server = LocalServer(good_server)
        self.addCleanup(server.close)
        good = self.run_exporter("probe", "ws://127.0.0.1:%d/" % server.port, "--module", "connect", "--timeout=5s")
        self.assertEqual(good.returncode, 0, good.stderr)
        self.assertTrue(good.stdout.startswith("Logs for the probe:\n"), good.stdout[:200])
        self.assertIn("probe_success 1\n", good.stdout)
        self.assertIn("\"preset\": \"connect\"", good.stdout)
        bad = self.run_exporter("probe", "ws://127.0.0.1:%d/" % free_port(), "--timeout", "2s")
        self.assertEqual(bad.returncode, 1)
        self.assertIn('probe_failure_info{phase="connect",reason="connect_refused"} 1', bad.stdout)
        for args in ((), ("--module", "ping"), ("ws://x/", "--module"), ("ws://x/", "--module=nope"), ("ws://x/", "--timeout=soon"),
                     ("ws://x/", "ws://y/")):
            with self.subTest(args=args):
                usage = self.run_exporter("probe", *args)
                self.assertEqual((usage.returncode, usage.stdout, usage.stderr.count("\n")), (2, "", 1))

    def test_probe_command_takes_its_flags_before_or_after_the_target(self) -> None:
        target = "ws://127.0.0.1:%d/" % free_port()
        for args in (("--module", "ping", "--timeout=2s", target), (target, "--module=ping", "--timeout", "2s"),
                     ("--module=ping", target, "--probe.deny-private=false", "--timeout=2s")):
            with self.subTest(args=args):
                result = self.run_exporter("probe", *args)
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertIn('"preset": "ping"', result.stdout)
                self.assertIn("probe_timeout_seconds 2\n", result.stdout)

    def test_probe_command_refuses_flags_that_mean_nothing_to_one_probe(self) -> None:
        for args in (("--web.listen-address=:9095", "ws://x/"), ("ws://x/", "--probe.max-concurrent", "5"),
                     ("ws://x/", "--web.config.file", "w.json"), ("--log.level=debug", "ws://x/")):
            with self.subTest(args=args):
                result = self.run_exporter("probe", *args)
                self.assertEqual((result.returncode, result.stdout, result.stderr.count("\n")), (2, "", 1))
                flag = args[0 if args[0] != "ws://x/" else 1].partition("=")[0]
                self.assertIn("flag provided but not defined: %s; usage: ws_exporter.py probe" % flag, result.stderr)

    def test_bad_flag_exits_2_with_one_line(self) -> None:
        result = self.run_exporter("--timeout=soon")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.count("\n"), 1)
        self.assertIn("--timeout", result.stderr)

    def test_sigterm_and_sigint_exit_0_within_a_second(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            proc = ExporterProcess()
            conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=5)
            conn.request("GET", "/-/healthy")
            self.assertEqual(conn.getresponse().read(), b"Healthy\n")  # keeps a keep-alive connection open
            start = time.monotonic()
            proc.proc.send_signal(signum)
            code = proc.stop()
            conn.close()
            self.assertEqual(code, 0)
            self.assertLess(time.monotonic() - start, 1.5)

    def probe_in_flight(self, *flags: str) -> Tuple[ExporterProcess, http.client.HTTPConnection, threading.Event]:
        """An exporter answering a scraper's ping probe, whose server holds the pong back until
        the returned event is set."""
        pinged, pong = threading.Event(), threading.Event()

        def late_pong(sock: socket.socket) -> None:
            head, rest = read_request_head(sock)
            sock.sendall(switching_response(request_key(head)))
            _, payload, rest = read_client_frame(sock, rest)
            pinged.set()
            pong.wait(30)
            sock.sendall(server_frame(wx.Opcode.PONG, payload))
            _, payload, _ = read_client_frame(sock, rest)
            sock.sendall(server_frame(wx.Opcode.CLOSE, payload))

        server = LocalServer(late_pong)
        self.addCleanup(server.close)
        self.addCleanup(pong.set)
        proc = ExporterProcess(*flags)
        self.addCleanup(proc.stop)
        scraper = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=30)
        self.addCleanup(scraper.close)
        scraper.request("GET", "/probe?module=ping&target=ws://127.0.0.1:%d/" % server.port)
        self.assertTrue(pinged.wait(10))
        return proc, scraper, pong

    def log_line(self, proc: ExporterProcess, msg: str) -> str:
        """The next line of the exporter's log with this message."""
        assert proc.proc.stderr is not None
        line = ""
        while "msg=%s" % json.dumps(msg) not in line and "msg=%s " % msg not in line:
            line = proc.proc.stderr.readline()
            self.assertTrue(line, "the log ended before %r" % msg)
        return line

    def test_sigterm_stops_accepting_answers_the_probe_in_flight_then_exits_0(self) -> None:
        proc, scraper, pong = self.probe_in_flight()
        idle = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=10)
        self.addCleanup(idle.close)
        idle.request("GET", "/-/healthy")
        self.assertEqual(idle.getresponse().read(), b"Healthy\n")  # kept alive
        proc.proc.send_signal(signal.SIGTERM)
        self.assertIn("in_flight=1", self.log_line(proc, "Shutting down"))
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proc.port), 5).close()
        idle.request("GET", "/-/healthy")
        answer = idle.getresponse()
        self.assertEqual((answer.status, answer.getheader("Connection"), answer.read()), (503, "close", b"Shutting down\n"))
        pong.set()
        answer = scraper.getresponse()
        self.assertEqual(answer.status, 200)
        self.assertEqual(parse_metrics(answer.read().decode())["probe_success"], 1)
        self.assertIn("unanswered=0", self.log_line(proc, "Shut down"))
        self.assertEqual(proc.proc.wait(10), 0)

    def test_a_second_stop_signal_exits_0_at_once(self) -> None:
        proc, scraper, _ = self.probe_in_flight("--timeout=60s")
        proc.proc.send_signal(signal.SIGTERM)
        self.log_line(proc, "Shutting down")
        proc.proc.send_signal(signal.SIGINT)
        self.assertIn("unanswered=1", self.log_line(proc, "Stopped by a second signal"))
        self.assertEqual(proc.proc.wait(10), 0)  # not the 25 s of --web.shutdown-timeout, nor the probe's minute
        with self.assertRaises((http.client.RemoteDisconnected, ConnectionError)):
            scraper.getresponse()

    def test_a_stop_signal_as_the_exporter_exits_still_ends_it_with_0(self) -> None:
        """A second SIGTERM after the drain, while the process exits: neither a KeyboardInterrupt
        outside the drain (exit by SIGINT) nor the default action restored at exit (by SIGTERM)."""
        for _ in range(10):  # the window is short: one try in about eight fell in it
            proc = ExporterProcess()
            self.addCleanup(proc.stop)
            proc.proc.send_signal(signal.SIGTERM)
            self.log_line(proc, "Shut down")
            with contextlib.suppress(ProcessLookupError):
                proc.proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.proc.wait(10), 0)

    def test_the_shutdown_timeout_bounds_the_wait_for_probes_in_flight(self) -> None:
        proc, _, _ = self.probe_in_flight("--timeout=60s", "--web.shutdown-timeout=1s")
        proc.proc.send_signal(signal.SIGTERM)
        self.assertIn("unanswered=1", self.log_line(proc, "Shut down"))
        self.assertEqual(proc.proc.wait(10), 0)

    def test_a_restart_after_kill_9_listens_on_the_same_port_at_once(self) -> None:
        port = free_port()
        first = ExporterProcess("--web.listen-address=127.0.0.1:%d" % port)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        self.addCleanup(conn.close)
        conn.request("GET", "/-/healthy")
        self.assertEqual(conn.getresponse().read(), b"Healthy\n")  # a connection left open
        first.proc.kill()
        first.stop()
        assert conn.sock is not None
        self.assertEqual(conn.sock.recv(1), b"")  # the kernel closed the killed process's end first...
        conn.close()  # ...so after this one, that end waits in TIME_WAIT on the port
        second = ExporterProcess("--web.listen-address=127.0.0.1:%d" % port)
        self.addCleanup(second.stop)
        self.assertIn("msg=Listening", second.first_line)  # not "Cannot listen ... Address already in use"

    def test_json_logs_carry_numbers_and_booleans_as_json_types(self) -> None:
        proc = ExporterProcess("--log.format=json", "--debug")
        self.addCleanup(proc.stop)
        record = json.loads(proc.first_line)
        self.assertEqual((record["level"], record["msg"]), ("info", "Listening"))
        self.assertIs(record["tls"], False)
        self.assertIs(record["basic_auth"], False)
        self.assertIsInstance(record["max_connections"], int)
        self.assertEqual(http_status(proc.port, "/-/healthy"), 200)
        assert proc.proc.stderr is not None
        while record["msg"] != "HTTP request":
            record = json.loads(proc.proc.stderr.readline())
        self.assertEqual((record["path"], record["code"]), ("/-/healthy", 200))
        self.assertEqual(proc.stop(), 0)

    def test_the_start_logs_the_config_in_force_as_a_reload_does(self) -> None:
        directory = tempfile.mkdtemp(prefix="wsx-config-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = write_config(directory, {"modules": {"mine": {}}, "targets": {"t": {"url": "ws://h/"}}})
        builtin = len(wx.DEFAULT_MODULES)
        for flags, expected in (((), ("", builtin, 0)), (("--config.file=" + path,), (path, builtin + 1, 1))):
            proc = ExporterProcess("--log.format=json", *flags)
            self.addCleanup(proc.stop)
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.stderr is not None
            record = json.loads(proc.proc.stderr.readline())  # the line after Listening
            self.assertEqual(tuple(record.get(k) for k in ("msg", "file", "modules", "targets")), ("Config loaded",) + expected)
            self.assertEqual(proc.stop(), 0)

    def test_logfmt_writes_booleans_and_numbers_bare(self) -> None:
        line = wx.format_logfmt("info", "Listening", {"tls": False, "auth": True, "code": 200, "seconds": 0.5}, 0.0)
        self.assertEqual(line, "ts=1970-01-01T00:00:00.000Z level=info msg=Listening tls=false auth=true code=200 seconds=0.5")

    def test_listens_on_ipv4_and_ipv6_for_a_bare_port(self) -> None:
        if not socket.has_dualstack_ipv6():
            self.skipTest("this host has no dual-stack IPv6")
        port = free_port()
        exporter = wx.Exporter(wx.Settings(listen_address=":%d" % port), wx.Logger("error", "logfmt", io.StringIO()))
        server = wx.make_server(exporter)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            for host in ("127.0.0.1", "::1"):
                conn = http.client.HTTPConnection(host, port, timeout=5)
                conn.request("GET", "/-/healthy")
                self.assertEqual(conn.getresponse().status, 200, host)
                conn.close()
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)


# ==============================================================================================
# System tests: real peers, scrapers, deploy files, soak and bench
#
# Each starts programs from outside this repository (installed by .ci/peers; paths in WS_*
# environment variables), reads the files shipped under deploy/ and docs/, or runs the
# exporter as a process under load; a missing peer skips loudly, or fails under CI=true.
# ==============================================================================================

# .ci/test runs the suite with each interpreter, and tests of a tool rather than of the language
# with the last one only.
RUN_ONCE = os.environ.get("WS_RUN_ONCE", "1") == "1"

# ----------------------------------------------------------------------------------------------
# Real peers nobody here wrote (installed by .ci/peers; paths in WS_* environment variables).
# Each peer listens on 127.0.0.1 port 0 and prints its port as its first stdout line; each exits
# when its stdin closes, so none outlives the test process.
# ----------------------------------------------------------------------------------------------

PEER_START_TIMEOUT = 30.0  # seconds; ganache takes ~1 s, the others ~0.2 s


class PeerError(RuntimeError):
    pass


def _env_path(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise PeerError("%s is not set: run .ci/peers and source .cache/peers/env.sh" % name)
    return value


def _drain(stream: "IO[bytes]") -> None:
    # Keep reading the peer's stdout so it can never block on a full pipe.
    try:
        while stream.read(65536):
            pass
    except (OSError, ValueError):
        pass


def _read_port(proc: "subprocess.Popen[bytes]", errlog: "IO[bytes]",
               what: str, timeout: float = PEER_START_TIMEOUT) -> int:
    """Read the first stdout line of `proc` (its port) before the deadline."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            _fail_start(proc, errlog, what, "no port line within %.0fs" % timeout)
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:  # EOF: the peer died
            _fail_start(proc, errlog, what, "exited (%s) before listening" % proc.wait(5))
        buf += chunk
    line, _, _rest = buf.partition(b"\n")
    try:
        port = int(line.strip())
    except ValueError:
        _fail_start(proc, errlog, what, "unexpected first line %r" % line)
    threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
    return port


def _fail_start(proc: "subprocess.Popen[bytes]", errlog: "IO[bytes]",
                what: str, why: str) -> NoReturn:
    stop(proc)
    errlog.seek(0)
    tail = errlog.read()[-4000:].decode("utf-8", "replace")
    errlog.close()
    raise PeerError("%s: %s\n--- peer stderr ---\n%s" % (what, why, tail))


def _spawn(argv: List[str], env_extra: Dict[str, str],
           what: str) -> Tuple["subprocess.Popen[bytes]", int]:
    env = dict(os.environ)
    env.update(env_extra)
    errlog = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=errlog, env=env, close_fds=True)
    port = _read_port(proc, errlog, what)
    errlog.close()  # the child keeps its own descriptor
    return proc, port


def wait_tcp(port: int, host: str = "127.0.0.1", timeout: float = PEER_START_TIMEOUT) -> None:
    """Wait until host:port accepts a TCP connection."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise PeerError("%s:%d does not accept connections" % (host, port))
            time.sleep(0.05)


def stop(proc: "subprocess.Popen[bytes]", timeout: float = 10.0) -> None:
    """Terminate a peer and wait for it (kill if it does not exit in time)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


# --- python `websockets` echo server ----------------------------------------
_WEBSOCKETS_SERVER = r"""
import asyncio, os, ssl, sys, threading
from websockets.asyncio.server import serve

def _watch_stdin():
    sys.stdin.buffer.read()
    os._exit(0)

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    ctx = None
    if len(sys.argv) > 2:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    async with serve(echo, "127.0.0.1", 0, ssl=ctx) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

threading.Thread(target=_watch_stdin, daemon=True).start()
asyncio.run(main())
"""


def start_websockets_server(tls_cert: Optional[str] = None,
                            tls_key: Optional[str] = None) -> Tuple["subprocess.Popen[bytes]", int]:
    """Echo server (python websockets); wss:// when tls_cert/tls_key are given."""
    argv = [_env_path("WS_PEER_PYTHON"), "-c", _WEBSOCKETS_SERVER]
    return _spawn(argv + _tls_args(tls_cert, tls_key), {"PYTHONPATH": _env_path("WS_PEER_PYTHONPATH")}, "websockets server")


def _tls_args(tls_cert: Optional[str], tls_key: Optional[str]) -> List[str]:
    return [tls_cert, tls_key] if tls_cert and tls_key else []


# --- node `ws` echo server (bench/node_echo_server.js, shared with the benchmark) -------------
NODE_ECHO_SERVER = os.path.join(HERE, "bench", "node_echo_server.js")


def start_node_ws_server(tls_cert: Optional[str] = None,
                         tls_key: Optional[str] = None) -> Tuple["subprocess.Popen[bytes]", int]:
    """Echo server (node ws); wss:// (https server) when tls_cert/tls_key are given."""
    argv = [_env_path("WS_PEER_NODE"), NODE_ECHO_SERVER]
    return _spawn(argv + _tls_args(tls_cert, tls_key), {"NODE_PATH": _env_path("WS_PEER_NODE_PATH")}, "node ws server")


# --- ganache (Ethereum JSON-RPC over HTTP and WebSocket, same port) ---------
# The ganache CLI rejects --server.port 0 ("Invalid port number '0'"), but the
# programmatic server accepts listen(0) and reports the port via address().
# listen() resolves only once the chain is initialised, so the port line means
# ready; wait_tcp() double-checks. ws://127.0.0.1:PORT and http://... both work.
_GANACHE_SERVER = r"""
const ganache = require('ganache');
const server = ganache.server({
  chain: { chainId: 1337 },
  miner: { blockTime: 1 },
  logging: { quiet: true },
});
server.listen(0, '127.0.0.1').then(
  () => console.log(String(server.address().port)),
  (err) => { console.error(err); process.exit(1); });
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
"""


def start_ganache() -> Tuple["subprocess.Popen[bytes]", int]:
    """Ganache dev chain (chainId 1337, a block every second) on ws://127.0.0.1:PORT."""
    _env_path("WS_GANACHE")  # installed?
    argv = [_env_path("WS_PEER_NODE"), "-e", _GANACHE_SERVER]
    return _listening(*_spawn(argv, {"NODE_PATH": _env_path("WS_PEER_NODE_PATH")}, "ganache"))


def _listening(proc: "subprocess.Popen[bytes]", port: int) -> Tuple["subprocess.Popen[bytes]", int]:
    """``proc`` once its port accepts connections; stopped when it never does."""
    try:
        wait_tcp(port)
    except PeerError:
        stop(proc)
        raise
    return proc, port


def promtool_accepts(case: unittest.TestCase, body: str) -> None:
    require_peer(case, "WS_PROMTOOL")
    check = subprocess.run([os.environ["WS_PROMTOOL"], "check", "metrics"], input=body, capture_output=True, text=True, timeout=30)
    case.assertEqual((check.returncode, check.stdout + check.stderr), (0, ""), body)


ANVIL_VERSION = "1.7.1"  # as .ci/peers installs it


def start_anvil() -> Tuple["subprocess.Popen[bytes]", int]:
    """anvil (a Rust EVM node: chainId 31337), mining a block every second, on 127.0.0.1:PORT."""
    port = free_port()
    proc = subprocess.Popen([_env_path("WS_ANVIL"), "--port", str(port), "--block-time", "1", "--silent"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _listening(proc, port)


def anvil_rpc(port: int, method: str, params: List[object]) -> object:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        conn.request("POST", "/", body, {"Content-Type": "application/json"})
        return json.loads(conn.getresponse().read())["result"]
    finally:
        conn.close()


def anvil_block_number(port: int) -> int:
    return int(str(anvil_rpc(port, "eth_blockNumber", [])), 16)


class TestWebSocketServerInterop(unittest.TestCase):
    """Probes of real WebSocket servers, and promtool reading every page the exporter serves."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.pki = shared_pki()

    def setUp(self) -> None:
        self.exporter = ExporterFixture()
        self.addCleanup(self.exporter.close)

    def start(self, starter: Callable[..., Tuple["subprocess.Popen[bytes]", int]], *args: str) -> int:
        proc, port = starter(*args)
        self.addCleanup(stop, proc)
        return port

    def assert_clean_success(self, metrics: Dict[str, float], tls: bool) -> None:
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual(metrics["probe_websocket_up"], 1)
        self.assertEqual(metrics["probe_websocket_status_code"], 101)
        self.assertEqual(metrics["probe_websocket_close_code"], 1000)
        for phase in ("connect", "upgrade", "close") + (("tls",) if tls else ()):
            self.assertGreater(metrics['probe_websocket_duration_seconds{phase="%s"}' % phase], 0, phase)
        self.assertEqual(any(k.startswith("probe_tls_version_info") for k in metrics), tls)

    def probe_peer(self, starter: Callable[..., Tuple["subprocess.Popen[bytes]", int]], tls: bool) -> Dict[str, float]:
        args = (self.pki["good.pem"], self.pki["good.key"]) if tls else ()
        port = self.start(starter, *args)
        with trusting(self.pki["ca.pem"]):
            return self.exporter.probe("%s://localhost:%d/some/path?key=k" % ("wss" if tls else "ws", port))

    def probe_cleanly(self, peer: str, tls: bool) -> None:
        starter, variables = {
            "websockets": (start_websockets_server, ("WS_PEER_PYTHON", "WS_PEER_PYTHONPATH")),
            "ws": (start_node_ws_server, ("WS_PEER_NODE", "WS_PEER_NODE_PATH")),
        }[peer]
        require_peer(self, *variables)
        self.assert_clean_success(self.probe_peer(starter, tls), tls)

    def test_python_websockets(self) -> None:
        self.probe_cleanly("websockets", tls=False)

    def test_python_websockets_tls(self) -> None:
        self.probe_cleanly("websockets", tls=True)

    def test_node_ws(self) -> None:
        self.probe_cleanly("ws", tls=False)

    def test_node_ws_tls(self) -> None:
        self.probe_cleanly("ws", tls=True)

    def test_untrusted_certificate_of_a_real_server(self) -> None:
        require_peer(self, "WS_PEER_NODE", "WS_PEER_NODE_PATH")
        port = self.start(start_node_ws_server, self.pki["self.pem"], self.pki["self.key"])
        with trusting(self.pki["ca.pem"]):
            metrics = self.exporter.probe("wss://localhost:%d/" % port)
        self.assertEqual(failure_of(metrics), ("tls", "tls_verify"))

    def test_promtool_accepts_every_page(self) -> None:
        require_peer(self, "WS_PROMTOOL", "WS_PEER_NODE", "WS_PEER_NODE_PATH")
        port = self.start(start_node_ws_server)
        pages = {
            "probe success": "/probe?target=ws://127.0.0.1:%d/" % port,
            "probe failure": "/probe?target=ws://127.0.0.1:%d/" % free_port(),
            "probe bad target": "/probe?target=ftp://x/",
            "metrics": "/metrics",
        }
        for name, path in pages.items():
            with self.subTest(name):
                status, _, body = self.exporter.get(path)
                self.assertEqual(status, 200)
                promtool_accepts(self, body)


@unittest.skipUnless(RUN_ONCE, "runs with one interpreter: ganache and anvil are under test (about 15 s), not the language")
class TestCheckInterop(unittest.TestCase):
    """Modules against real nodes: ganache (an EVM dev chain: chainId 1337, a block a second)
    and node's ws server for pings."""

    def setUp(self) -> None:
        self.exporter = ExporterFixture()
        self.addCleanup(self.exporter.close)

    def start(self, starter: Callable[[], Tuple["subprocess.Popen[bytes]", int]]) -> int:
        proc, port = starter()
        self.addCleanup(stop, proc)
        return port

    def test_ganache_evm_and_new_heads(self) -> None:
        require_peer(self, "WS_GANACHE", "WS_PEER_NODE", "WS_PEER_NODE_PATH")
        target = "ws://127.0.0.1:%d/" % self.start(start_ganache)
        heads = self.exporter.probe(target, module="evm_newheads")
        self.assertEqual(heads["probe_success"], 1, failure_of(heads))
        self.assertLess(heads["probe_subscription_first_notification_seconds"], 2.5)
        self.assertGreaterEqual(heads["probe_subscription_notifications"], 1)
        latest = self.exporter.probe(target, module="evm")
        self.assertEqual(latest["probe_success"], 1, failure_of(latest))
        for metrics in heads, latest:
            self.assertEqual(metrics["probe_chain_id"], 1337)
            self.assertGreaterEqual(metrics["probe_chain_head_number"], 1)
            self.assertLess(metrics["probe_chain_head_age_seconds"], 5)
            self.assertEqual(metrics["probe_websocket_close_code"], 1000)
        self.exporter.exporter.config = wx.parse_config({"modules": {"mainnet": {"preset": "evm", "expect_chain_id": 1}}})
        wrong = self.exporter.probe(target, module="mainnet")
        self.assertEqual(failure_of(wrong), ("check", "chain_id_mismatch"))
        self.assertEqual((wrong["probe_websocket_up"], wrong["probe_chain_id"]), (1, 1337))

    def test_evm_node_against_ganache_and_anvil(self) -> None:
        require_peer(self, "WS_GANACHE", "WS_PEER_NODE", "WS_PEER_NODE_PATH", "WS_ANVIL")
        ganache = self.exporter.probe("ws://127.0.0.1:%d/" % self.start(start_ganache), module="evm_node")
        self.assertEqual(ganache["probe_success"], 1, failure_of(ganache))
        self.assertEqual((ganache["probe_node_syncing"], ganache["probe_node_peers"]), (0, 0))
        self.assertIn('probe_node_info{client="Ganache",version="v7.9.2"}', ganache)
        self.assertEqual(ganache["probe_chain_finalized_head_number"], ganache["probe_chain_head_number"])
        anvil_port = self.start(start_anvil)
        target = "ws://127.0.0.1:%d/" % anvil_port
        anvil = self.exporter.probe(target, module="evm_node")
        self.assertEqual(anvil["probe_success"], 1, failure_of(anvil))
        self.assertEqual((anvil["probe_chain_id"], anvil["probe_node_syncing"]), (31337, 0))
        self.assertNotIn("probe_node_peers", anvil)  # anvil does not serve net_peerCount: left out
        self.assertEqual([s for s in rpc_series(anvil) if "eth_getBlockByNumber" in s], [
            '{block="finalized",method="eth_getBlockByNumber"}', '{block="genesis",method="eth_getBlockByNumber"}',
            '{block="latest",method="eth_getBlockByNumber"}'])
        self.assertIn('probe_node_info{client="anvil",version="v%s"}' % ANVIL_VERSION, anvil)
        genesis = [k for k in anvil if k.startswith("probe_chain_info{genesis=")]
        self.assertEqual(len(genesis), 1)
        status, _, page = self.exporter.probe_raw(target, debug="true", module="evm_node")
        self.assertIn("method=net_peerCount", page)  # the debug page names what was not served
        promtool_accepts(self, self.exporter.probe_raw(target, module="evm_node")[2])
        self.exporter.exporter.config = wx.parse_config({"modules": {
            "peers": {"preset": "evm_node", "min_peers": 1},
            "final": {"preset": "evm_node", "max_finality_lag": 0},
            "other": {"preset": "evm_node", "expect_genesis_hash": "0x" + "ab" * 32},
        }})
        self.assertEqual(failure_of(self.exporter.probe(target, module="other")), ("check", "wrong_chain"))
        self.assertTrue(wait_until(lambda: anvil_block_number(anvil_port) >= 2))  # anvil's finalized: 0 for 64 blocks
        self.assertEqual(failure_of(self.exporter.probe(target, module="final")), ("check", "finality_lag"))
        ganache_target = "ws://127.0.0.1:%d/" % self.start(start_ganache)
        self.assertEqual(failure_of(self.exporter.probe(ganache_target, module="peers")), ("check", "too_few_peers"))

    def test_a_held_subscription_on_anvil_and_a_miner_stopped_during_the_hold(self) -> None:
        require_peer(self, "WS_ANVIL", "WS_PROMTOOL")
        port = self.start(start_anvil)
        self.exporter.exporter.config = wx.parse_config({"modules": {
            "held": {"preset": "evm_newheads", "hold": "3s", "max_gap": "2.5s", "timeout": "8s"},
            "long": {"preset": "evm_newheads", "hold": "7s", "max_gap": "2.5s", "timeout": "10s"},
        }})
        body = self.exporter.probe_raw("ws://127.0.0.1:%d/" % port, module="held")[2]
        promtool_accepts(self, body)
        held = parse_metrics(body)
        self.assertEqual(held["probe_success"], 1, failure_of(held))
        self.assertGreaterEqual(held["probe_subscription_notifications"], 2)
        self.assertLess(held["probe_subscription_max_gap_seconds"], 2.5)
        self.assertEqual(held["probe_subscription_head_regressions"], 0)
        results: List[Dict[str, float]] = []
        prober = threading.Thread(target=lambda: results.append(self.exporter.probe("ws://127.0.0.1:%d/" % port, module="long")))
        first = anvil_block_number(port)
        prober.start()
        # Two more blocks: the probe has subscribed and heard at least one; then the miner stops.
        self.assertTrue(wait_until(lambda: anvil_block_number(port) >= first + 2))
        anvil_rpc(port, "evm_setIntervalMining", [0])
        prober.join(15)
        [stalled] = results
        self.assertEqual(failure_of(stalled), ("check", "subscription_stalled"))
        self.assertGreater(stalled["probe_subscription_max_gap_seconds"], 2.5)
        self.assertGreaterEqual(stalled["probe_subscription_notifications"], 1)

    def test_ping_a_real_server(self) -> None:
        require_peer(self, "WS_PEER_NODE", "WS_PEER_NODE_PATH")
        metrics = self.exporter.probe("ws://127.0.0.1:%d/" % self.start(start_node_ws_server), module="ping")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertGreater(metrics["probe_websocket_ping_rtt_seconds"], 0)


HARDHAT_VERSION = "2.28.6"  # as .ci/peers installs it
# Hardhat runs only inside a project; this one mines a block a second (by default it mines one
# per transaction, so nothing would ever come to a newHeads subscription).
HARDHAT_CONFIG = "module.exports = {networks: {hardhat: {chainId: 31337, mining: {auto: false, interval: 1000}}}};\n"


def start_hardhat(workdir: str) -> Tuple["subprocess.Popen[bytes]", int]:
    """`hardhat node` (EDR) on 127.0.0.1:PORT, HTTP and WebSocket, in a project made in ``workdir``."""
    with open(os.path.join(workdir, "hardhat.config.js"), "w") as f:
        f.write(HARDHAT_CONFIG)
    os.symlink(_env_path("WS_PEER_NODE_PATH"), os.path.join(workdir, "node_modules"))  # a "local installation"
    port = free_port()
    argv = [_env_path("WS_PEER_NODE"), _env_path("WS_HARDHAT"), "node", "--hostname", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _listening(proc, port)


HARDHAT_PEERS = ("WS_HARDHAT", "WS_PEER_NODE", "WS_PEER_NODE_PATH")


@unittest.skipUnless(RUN_ONCE, "runs with one interpreter: the node is under test (about 4 s), not the language")
class TestHardhatInterop(unittest.TestCase):
    """evm, evm_node and evm_newheads against Hardhat's node, a third real EVM node next to
    ganache and anvil; one node for the class."""

    port = 0

    @classmethod
    def setUpClass(cls) -> None:
        if all(os.environ.get(name) for name in HARDHAT_PEERS):
            workdir = tempfile.mkdtemp(prefix="wsx-hardhat-")
            cls.addClassCleanup(shutil.rmtree, workdir, True)
            proc, cls.port = start_hardhat(workdir)
            cls.addClassCleanup(stop, proc)

    def setUp(self) -> None:
        require_peer(self, *HARDHAT_PEERS)
        self.exporter = ExporterFixture()
        self.addCleanup(self.exporter.close)
        self.target = "ws://127.0.0.1:%d/" % self.port

    def test_evm(self) -> None:
        metrics = self.exporter.probe(self.target, module="evm")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual(metrics["probe_chain_id"], 31337)
        self.assertLess(metrics["probe_chain_head_age_seconds"], 5)

    def test_evm_node(self) -> None:
        metrics = self.exporter.probe(self.target, module="evm_node")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual((metrics["probe_node_syncing"], metrics["probe_node_peers"]), (0, 0))
        self.assertIn('probe_node_info{client="HardhatNetwork",version="%s"}' % HARDHAT_VERSION, metrics)
        self.assertEqual(len([k for k in metrics if k.startswith("probe_chain_info{genesis=")]), 1)
        self.assertIn('probe_rpc_duration_seconds{block="finalized",method="eth_getBlockByNumber"}', metrics)
        self.assertGreaterEqual(metrics["probe_chain_finalized_head_number"], 0)

    def test_evm_newheads_held(self) -> None:
        self.exporter.exporter.config = wx.parse_config({"modules": {
            "held": {"preset": "evm_newheads", "hold": "2.5s", "max_gap": "2s", "timeout": "6s"}}})
        metrics = self.exporter.probe(self.target, module="held")
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertGreaterEqual(metrics["probe_subscription_notifications"], 2)
        self.assertEqual((metrics["probe_subscription_head_skips"], metrics["probe_subscription_head_regressions"]), (0, 0))
        self.assertEqual(metrics["probe_chain_id"], 31337)


# ----------------------------------------------------------------------------------------------
# Real proxies (installed by .ci/peers; paths in WS_NGINX, WS_HAPROXY, WS_TINYPROXY): nginx and
# haproxy in front of a node as operators put them, tinyproxy between the exporter and a node.
# None of them can report a port it chose, so each gets a free port; none watches its stdin, so
# each runs under a small guard that ends it when the guard's stdin closes or it gets SIGTERM.
# ----------------------------------------------------------------------------------------------

_PEER_GUARD = r"""
import os, signal, subprocess, sys, threading
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)

def end(*_):
    if child.poll() is None:
        child.terminate()
        killer = threading.Timer(5, lambda: child.poll() is None and child.kill())
        killer.daemon = True
        killer.start()

def watch_stdin():
    while os.read(0, 4096):
        pass
    end()

signal.signal(signal.SIGTERM, end)
threading.Thread(target=watch_stdin, daemon=True).start()
os._exit(1 if child.wait() else 0)
"""


def start_guarded(argv: List[str], port: int, workdir: str, what: str) -> "subprocess.Popen[bytes]":
    """Run a peer that listens on 127.0.0.1:``port``, once it accepts connections; its output
    goes to ``workdir``/output.log, quoted if it does not start."""
    env = dict(os.environ)
    if os.environ.get("WS_DEB_LD_LIBRARY_PATH"):
        env["LD_LIBRARY_PATH"] = os.environ["WS_DEB_LD_LIBRARY_PATH"]
    output = os.path.join(workdir, "output.log")
    with open(output, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _PEER_GUARD, *argv], stdin=subprocess.PIPE,
                                stdout=out, stderr=out, env=env, cwd=workdir, close_fds=True)
    deadline = time.monotonic() + PEER_START_TIMEOUT
    while proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                break
        time.sleep(0.02)
    code = proc.poll()
    why = "exited (%s) before listening" % code if code is not None else \
        "not listening on port %d after %.0fs" % (port, PEER_START_TIMEOUT)
    stop(proc)
    with open(output, "rb") as f:
        tail = f.read()[-4000:].decode("utf-8", "replace")
    raise PeerError("%s: %s\n--- peer output ---\n%s" % (what, why, tail))


def certificate_not_after(path: str) -> float:
    """A PEM certificate's notAfter in unix seconds (openssl x509 -enddate)."""
    out = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", path],
                         check=True, capture_output=True, text=True).stdout
    return float(ssl.cert_time_to_seconds(out.strip().split("=", 1)[1]))


class ProxyInteropCase(unittest.TestCase):
    """An exporter, a temporary directory for the proxy's files, and peers stopped at the end."""

    def setUp(self) -> None:
        self.pki = shared_pki()
        self.exporter = ExporterFixture()
        self.addCleanup(self.exporter.close)
        self.dir = tempfile.mkdtemp(prefix="wsx-proxy-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def node(self, tls: bool = False) -> Tuple["subprocess.Popen[bytes]", int]:
        """The node ws echo server, as the backend; stopped at the end (stop is idempotent)."""
        args = (self.pki["good.pem"], self.pki["good.key"]) if tls else ()
        proc, port = start_node_ws_server(*args)
        self.addCleanup(stop, proc)
        return proc, port

    def run_peer(self, argv: List[str], port: int, what: str) -> None:
        self.addCleanup(stop, start_guarded(argv, port, self.dir, what))

    def peer_output(self) -> str:
        with open(os.path.join(self.dir, "output.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def assert_proxied_success(self, metrics: Dict[str, float], tls: bool) -> None:
        self.assertEqual(metrics["probe_success"], 1, failure_of(metrics))
        self.assertEqual(metrics["probe_websocket_status_code"], 101)
        self.assertEqual(metrics["probe_websocket_close_code"], 1000)
        self.assertEqual(any(k.startswith("probe_tls_version_info{") for k in metrics), tls)


# nginx as the operators of nodes configure it for WebSocket (nginx.org/en/docs/http/websocket.html).
# Every path nginx writes is in the test's directory; no `user` directive, so any user can run it
# (as root its workers run as nobody, and need no file of the directory).
NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location /ws {{
            proxy_pass http://127.0.0.1:{backend};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_read_timeout 60s;
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""

# haproxy in mode http: it sees the Upgrade, forwards the 101 and then tunnels (timeout tunnel).
# One frontend in plain ws, one terminating TLS (haproxy wants the certificate and key in one file).
# retries 0: a refused connection to the node is a 503 at once, not after 3 tries a second apart.
HAPROXY_CFG = """\
global
    maxconn 100
defaults
    mode http
    retries 0
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout tunnel 1h
frontend plain
    bind 127.0.0.1:{port}
    default_backend node
frontend tls
    bind 127.0.0.1:{tls_port} ssl crt {pem}
    default_backend node
backend node
    server node1 127.0.0.1:{backend}
"""


class TestReverseProxyInterop(ProxyInteropCase):
    """Probes of a node behind nginx and haproxy, configured as node operators configure them."""

    def start_nginx(self, backend: int) -> int:
        port = free_port()
        conf = self.write("nginx.conf", NGINX_CONF.format(
            dir=self.dir, port=port, backend=backend, cert=self.pki["good.pem"], key=self.pki["good.key"]))
        self.run_peer([os.environ["WS_NGINX"], "-p", self.dir + "/", "-c", conf, "-e", "stderr",
                       "-g", "daemon off;"], port, "nginx")
        return port

    def test_nginx_terminating_tls_in_front_of_node_ws(self) -> None:
        require_peer(self, "WS_NGINX", "WS_PEER_NODE", "WS_PEER_NODE_PATH")
        _, backend = self.node()
        port = self.start_nginx(backend)
        with trusting(self.pki["ca.pem"]):
            metrics = self.exporter.probe("wss://127.0.0.1:%d/ws" % port)
        self.assert_proxied_success(metrics, tls=True)
        self.assertGreater(metrics['probe_websocket_duration_seconds{phase="tls"}'], 0)
        self.assertEqual(metrics["probe_ssl_earliest_cert_expiry"], certificate_not_after(self.pki["good.pem"]))
        with open(os.path.join(self.dir, "access.log")) as f:
            self.assertIn('"GET /ws HTTP/1.1" 101 ', f.read())

    def test_nginx_answers_502_when_the_node_is_down_and_404_off_its_routes(self) -> None:
        require_peer(self, "WS_NGINX", "WS_PEER_NODE", "WS_PEER_NODE_PATH")
        node, backend = self.node()
        port = self.start_nginx(backend)
        with trusting(self.pki["ca.pem"]):
            unrouted = self.exporter.probe("wss://127.0.0.1:%d/other" % port)
            stop(node)
            down = self.exporter.probe("wss://127.0.0.1:%d/ws" % port)
        for metrics, status in ((unrouted, 404), (down, 502)):
            with self.subTest(status=status):
                self.assertEqual(failure_of(metrics), ("upgrade", "http_status"))
                self.assertEqual(metrics["probe_websocket_status_code"], status)
                self.assertEqual(metrics["probe_websocket_up"], 0)
                self.assertIn('probe_tls_version_info{version="TLS 1.3"}', metrics)  # TLS was fine
        self.assertIn("connect() failed (111: Connection refused) while connecting to upstream", self.peer_output())

    def test_haproxy_http_mode_in_front_of_node_ws_plain_and_tls(self) -> None:
        require_peer(self, "WS_HAPROXY", "WS_PEER_NODE", "WS_PEER_NODE_PATH")
        node, backend = self.node()
        port, tls_port = free_port(), free_port()
        with open(self.pki["good.pem"]) as cert, open(self.pki["good.key"]) as key:
            pem = self.write("haproxy.pem", cert.read() + key.read())
        cfg = self.write("haproxy.cfg", HAPROXY_CFG.format(port=port, tls_port=tls_port, pem=pem, backend=backend))
        self.run_peer([os.environ["WS_HAPROXY"], "-db", "-f", cfg], port, "haproxy")
        wait_tcp(tls_port)
        self.assert_proxied_success(self.exporter.probe("ws://127.0.0.1:%d/" % port), tls=False)
        with trusting(self.pki["ca.pem"]):
            metrics = self.exporter.probe("wss://localhost:%d/some/path" % tls_port)
        self.assert_proxied_success(metrics, tls=True)
        self.assertEqual(metrics["probe_ssl_earliest_cert_expiry"], certificate_not_after(self.pki["good.pem"]))
        stop(node)
        down = self.exporter.probe("ws://127.0.0.1:%d/" % port)
        self.assertEqual(failure_of(down), ("upgrade", "http_status"))
        self.assertEqual(down["probe_websocket_status_code"], 503)  # haproxy: no server available


# tinyproxy as a forward proxy with basic auth; ConnectPort lines limit the ports CONNECT may
# reach (none: every port). Its log goes to its standard output (no LogFile, no Syslog).
TINYPROXY_CONF = """\
Port {port}
Listen 127.0.0.1
Timeout 30
MaxClients 20
LogLevel Info
BasicAuth user {password}
{connect_ports}
"""
PROXY_PASSWORD = "secret-pass-123"


class TestForwardProxyInterop(ProxyInteropCase):
    """wss:// probes tunnelled through tinyproxy with CONNECT, by module proxy_url and by
    https_proxy; the proxy's credentials never show."""

    def start_tinyproxy(self, connect_ports: str = "") -> str:
        port = free_port()
        conf = self.write("tinyproxy.conf", TINYPROXY_CONF.format(
            port=port, password=PROXY_PASSWORD, connect_ports=connect_ports))
        self.run_peer([os.environ["WS_TINYPROXY"], "-d", "-c", conf], port, "tinyproxy")
        return "http://user:%s@127.0.0.1:%d" % (PROXY_PASSWORD, port)

    def use_proxy(self, proxy_url: str) -> None:
        self.exporter.exporter.config = wx.parse_config({"modules": {
            "proxied": {"proxy_url": proxy_url},
            "wrong_password": {"proxy_url": proxy_url.replace(PROXY_PASSWORD, "not-" + PROXY_PASSWORD)},
        }})

    def assert_no_credentials(self, *texts: str) -> None:
        for text in texts:
            self.assertNotIn(PROXY_PASSWORD, text)
            self.assertNotIn(base64.b64encode(("user:" + PROXY_PASSWORD).encode()).decode(), text)

    def test_wss_through_connect_by_module_and_by_https_proxy(self) -> None:
        require_peer(self, "WS_TINYPROXY", "WS_PEER_NODE", "WS_PEER_NODE_PATH")
        _, backend = self.node(tls=True)
        proxy_url = self.start_tinyproxy()
        self.use_proxy(proxy_url)
        target = "wss://127.0.0.1:%d/" % backend
        with trusting(self.pki["ca.pem"]):
            by_module = self.exporter.probe(target, module="proxied")
            with mock.patch.dict(os.environ, {"https_proxy": proxy_url, "no_proxy": "", "NO_PROXY": ""}):
                by_env = self.exporter.probe(target)
                page = self.exporter.probe_raw(target, debug="true")[2]
            refused = self.exporter.probe(target, module="wrong_password")
        for metrics in by_module, by_env:
            self.assert_proxied_success(metrics, tls=True)
            self.assertEqual(metrics["probe_ssl_earliest_cert_expiry"], certificate_not_after(self.pki["good.pem"]))
        self.assertIn("Connecting through a proxy", page)
        self.assertEqual(failure_of(refused), ("connect", "connect_error"))
        # tinyproxy 1.11 answers a CONNECT with wrong credentials 401, not 407.
        self.assertRegex(self.exporter.log.getvalue(), "proxy answered CONNECT with status 40[17]")
        self.assertEqual(self.peer_output().count("Established connection to host \"127.0.0.1\""), 3)
        self.assert_no_credentials(page, self.exporter.log.getvalue())

    def test_a_port_the_proxy_refuses_is_a_connect_error_with_its_403(self) -> None:
        require_peer(self, "WS_TINYPROXY", "WS_PEER_NODE", "WS_PEER_NODE_PATH")
        _, backend = self.node(tls=True)
        proxy_url = self.start_tinyproxy("ConnectPort %d" % free_port())
        self.use_proxy(proxy_url)
        target = "wss://127.0.0.1:%d/" % backend
        with trusting(self.pki["ca.pem"]):
            metrics = self.exporter.probe(target, module="proxied")
            page = self.exporter.probe_raw(target, module="proxied", debug="true")[2]
        self.assertEqual(failure_of(metrics), ("connect", "connect_error"))
        self.assertEqual(metrics["probe_websocket_up"], 0)
        self.assertFalse([k for k in metrics if k.startswith("probe_tls_")])  # the tunnel never opened
        self.assertIn("proxy answered CONNECT with status 403", page)
        self.assertIn("Refused CONNECT method on port %d" % backend, self.peer_output())
        self.assert_no_credentials(page, self.exporter.log.getvalue())


# ----------------------------------------------------------------------------------------------
# Files shipped beside the code: deploy/ (the rules, checked by promtool; the dashboard) and the
# documentation, whose tables name what the code defines
# ----------------------------------------------------------------------------------------------

DEPLOY_DIR = os.path.join(HERE, "deploy")
RULES_FILE = "rules/ws-exporter.rules.yml"
RULES_TEST_FILE = "rules/ws-exporter.rules.test.yml"
RULE_CRD_FILES = ("victoriametrics/vmrule.yaml", "prometheus/prometheusrule.yaml")
PROMETHEUS_CONFIG_FILE = "prometheus/prometheus.yml"
VMPROBE_FILE = "victoriametrics/vmprobe.yaml"
DASHBOARD_FILE = "grafana/ws-exporter-dashboard.json"

# What Grafana's variables become when a test runs a dashboard query.
GRAFANA_SUBSTITUTIONS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h", "job": ".*", "instance": ".*"}
_GRAFANA_VARIABLE = re.compile(r"\$(?:\{(%s)\}|(%s)\b)" % (("|".join(GRAFANA_SUBSTITUTIONS),) * 2))


def deploy_text(name: str) -> str:
    with open(os.path.join(DEPLOY_DIR, name), encoding="utf-8") as f:
        return f.read()


def groups_block(text: str, indent: int) -> List[str]:
    """The `groups:` block at ``indent`` spaces, running to the end of the file, de-indented; the
    rule file has it at column 0, the VMRule and PrometheusRule as the last key of `spec:`."""
    prefix = " " * indent
    lines = text.splitlines()
    start = lines.index(prefix + "groups:")
    if indent and lines[start - 1] != "spec:":
        raise ValueError("`groups:` does not follow `spec:` directly")
    block = []
    for number, line in enumerate(lines[start:], start + 1):
        if line.strip() and not line.startswith(prefix):
            raise ValueError("line %d is outside the groups block: %r" % (number, line))
        block.append(line[indent:])
    while block and not block[-1]:
        block.pop()
    return block


def dashboard_exprs() -> List[str]:
    def panels(items: List[Dict[str, object]]) -> Iterator[Dict[str, object]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))  # type: ignore[arg-type]

    dashboard = json.loads(deploy_text(DASHBOARD_FILE))
    targets = [t for p in panels(dashboard["panels"]) for t in p.get("targets", [])]  # type: ignore[attr-defined]
    return [t["expr"] for t in targets if "expr" in t]


def substitute_grafana_variables(expr: str) -> str:
    return _GRAFANA_VARIABLE.sub(lambda m: GRAFANA_SUBSTITUTIONS[m.group(1) or m.group(2)], expr)


def run_promtool(*args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([os.environ["WS_PROMTOOL"], *args], cwd=DEPLOY_DIR, capture_output=True,
                          text=True, timeout=60)


class TestDeployRules(unittest.TestCase):
    """The alert rules: one source, three copies, checked and unit-tested by promtool."""

    def test_rule_crds_carry_the_rule_files_groups_unchanged(self) -> None:
        expected = groups_block(deploy_text(RULES_FILE), 0)
        self.assertGreater(len(expected), 10)
        for name in RULE_CRD_FILES:
            self.assertEqual(groups_block(deploy_text(name), 2), expected, name)

    def test_promtool_checks_every_rule_file_and_the_crds_groups(self) -> None:
        require_peer(self, "WS_PROMTOOL")
        tmp = tempfile.mkdtemp(prefix="wsx-rules-")
        self.addCleanup(shutil.rmtree, tmp, True)
        files = [os.path.join(DEPLOY_DIR, RULES_FILE)]
        for name in RULE_CRD_FILES:
            files.append(os.path.join(tmp, os.path.basename(name)))
            with open(files[-1], "w", encoding="utf-8") as f:
                f.write("\n".join(groups_block(deploy_text(name), 2)) + "\n")
        check = run_promtool("check", "rules", *files)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.assertEqual(check.stdout.count("SUCCESS"), len(files), check.stdout)

    def test_promtool_unit_tests_of_the_rules_pass(self) -> None:
        require_peer(self, "WS_PROMTOOL")
        check = run_promtool("test", "rules", RULES_TEST_FILE)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)

    def test_promtool_check_config_passes_for_the_plain_prometheus_config(self) -> None:
        require_peer(self, "WS_PROMTOOL")
        check = run_promtool("check", "config", PROMETHEUS_CONFIG_FILE)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)

    def test_every_alert_has_a_promtool_unit_test(self) -> None:
        alerts = set(re.findall(r"(?m)^      - alert: (\w+)$", deploy_text(RULES_FILE)))
        tested = set(re.findall(r"(?m)^        alertname: (\w+)$", deploy_text(RULES_TEST_FILE)))
        self.assertEqual(alerts, tested)
        self.assertLessEqual({"WebSocketConnectionDown", "WebSocketHighConnectionLatency", "WebSocketEndpointDown"}, alerts)


class TestDeployDashboard(unittest.TestCase):
    def test_dashboard_parses_and_every_query_filters_by_job(self) -> None:
        exprs = dashboard_exprs()
        self.assertGreater(len(exprs), 5)
        for expr in exprs:
            self.assertIn('job=~"$job"', expr)
            self.assertNotIn("$", substitute_grafana_variables(expr))


# The reference documentation, read as tables: each documented name is the backquoted first cell
# of a table row (`| `name` | ... |`) under a known heading.
DOCS_DIR = os.path.join(HERE, "docs")
CONFIGMAP_FILE = "kubernetes/configmap.yaml"
_DOC_ROW = re.compile(r"\| `([^`]+)`[^|]*\|(.*)\|$")
_ALERT = re.compile(r"(?m)^      - alert: (\w+)$")
_RECORD = re.compile(r"(?m)^      - record: (\S+)$")


def docs_text(name: str) -> str:
    with open(os.path.join(DOCS_DIR, name), encoding="utf-8") as f:
        return f.read()


def doc_section(text: str, heading: str) -> List[str]:
    """The lines under the Markdown heading ``heading`` (a whole line, e.g. "## Flags") up to the
    next heading; lines of fenced code blocks are not headings."""
    lines = text.splitlines()
    assert heading in lines, "no heading %r" % heading
    section: List[str] = []
    fenced = False
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            break
        section.append(line)
    return section


def doc_rows(text: str, *headings: str) -> List[Tuple[str, List[str]]]:
    """(name, the other cells) of each table row under ``headings`` whose first cell begins with
    a backquoted name."""
    rows = []
    for heading in headings:
        for line in doc_section(text, heading):
            match = _DOC_ROW.match(line)
            if match:
                rows.append((match.group(1), [cell.strip() for cell in match.group(2).split(" | ")]))
    return rows


def rule_alerts() -> Dict[str, str]:
    """Alert name -> severity label, from the rule file."""
    text = deploy_text(RULES_FILE)
    starts = [m.start() for m in re.finditer(r"(?m)^      - (?:alert|record): ", text)] + [len(text)]
    alerts = {}
    for start, end in zip(starts, starts[1:]):
        name = _ALERT.match(text, start)
        if name:
            severity = re.search(r"(?m)^          severity: (\w+)$", text[start:end])
            alerts[name.group(1)] = severity.group(1) if severity else ""
    return alerts


def markdown_anchors(name: str) -> Set[str]:
    """The anchors GitHub makes of a Markdown file's headings: lower case, punctuation dropped,
    spaces as hyphens."""
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"(?ms)^```.*?^```", "", text)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"(?m)^#{1,6} (.+)$", text)}


class TestDocs(unittest.TestCase):
    """The documentation names exactly what the code and the rule file define: a metric, failure
    reason, flag, module key, preset or alert without its line, or a line without its thing,
    fails here, and the message names them."""

    def assertSameNames(self, documented: List[str], defined: object, where: str) -> None:
        wanted = set(defined)  # type: ignore[call-overload]
        missing = sorted(wanted - set(documented))
        extra = sorted(set(documented) - wanted)
        twice = sorted({name for name in documented if documented.count(name) > 1})
        self.assertEqual(
            (missing, extra, twice), ([], [], []),
            "%s: missing (defined, not documented): %s; extra (documented, not defined): %s; "
            "listed more than once: %s" % (where, missing, extra, twice))

    def test_metrics_md_lists_every_metric_with_its_type(self) -> None:
        rows = doc_rows(docs_text("metrics.md"), "## Probe metrics", "## Check metrics", "## Exporter metrics")
        self.assertSameNames([name for name, _ in rows], wx.METRICS, "docs/metrics.md metric tables")
        wrong = [(name, cells[0]) for name, cells in rows if name in wx.METRICS and cells[0] != wx.METRICS[name][0]]
        self.assertEqual(wrong, [], "docs/metrics.md: metrics documented with the wrong type")

    def test_metrics_md_lists_every_failure_reason_with_known_phases(self) -> None:
        rows = doc_rows(docs_text("metrics.md"), "## Failure reasons")
        self.assertSameNames([name for name, _ in rows], wx.FAILURE_REASONS, "docs/metrics.md Failure reasons")
        phases = {name: set(cells[0].split(", ")) for name, cells in rows}
        wrong = sorted(name for name, named in phases.items() if not named <= wx.FAILURE_PHASES | {"any"})
        self.assertEqual(wrong, [], "docs/metrics.md: reasons with a phase that does not exist")

    def test_configuration_md_lists_every_flag_with_its_default(self) -> None:
        rows = doc_rows(docs_text("configuration.md"), "## Flags")
        self.assertSameNames([name for name, _ in rows], ["--" + spec.name for spec in wx.FLAG_SPECS],
                             "docs/configuration.md Flags")
        documented = dict(rows)
        wrong = [("--" + spec.name, spec.default) for spec in wx.FLAG_SPECS
                 if not spec.boolean and spec.default and "--" + spec.name in documented
                 and documented["--" + spec.name][0] != "`%s`" % spec.default]
        self.assertEqual(wrong, [], "docs/configuration.md: flags whose documented default is not the code's")

    def test_configuration_md_lists_every_module_key(self) -> None:
        rows = doc_rows(docs_text("configuration.md"), "### Module keys")
        self.assertSameNames([name for name, _ in rows], wx._MODULE_KEYS, "docs/configuration.md Module keys")

    def test_configuration_md_lists_every_builtin_module(self) -> None:
        rows = doc_rows(docs_text("configuration.md"), "## Modules")
        self.assertSameNames([name for name, _ in rows], wx.PRESET_NAMES, "docs/configuration.md Modules")

    def test_configmap_comment_lists_every_builtin_module(self) -> None:
        comment = " ".join(line.lstrip("#").strip() for line in deploy_text(CONFIGMAP_FILE).splitlines()
                           if line.startswith("#"))
        match = re.search(r"built-in ones, one per preset \(([^)]*)\)", comment)
        assert match is not None, "deploy/%s: no list of the built-in modules" % CONFIGMAP_FILE
        self.assertSameNames(re.split(r",\s*", match.group(1)), wx.PRESET_NAMES, "deploy/" + CONFIGMAP_FILE)

    def test_deploy_readme_lists_every_alert_with_its_severity(self) -> None:
        alerts = rule_alerts()
        self.assertGreaterEqual(len(alerts), 13)
        rows = doc_rows(deploy_text("README.md"), "### Alert list")
        self.assertSameNames([name for name, _ in rows], alerts, "deploy/README.md Alert list")
        wrong = [(name, cells[-1]) for name, cells in rows if name in alerts and cells[-1] != alerts[name]]
        self.assertEqual(wrong, [], "deploy/README.md: alerts listed with another severity than the rule file's")

    def test_deploy_readme_lists_every_recording_rule(self) -> None:
        records = _RECORD.findall(deploy_text(RULES_FILE))
        rows = doc_rows(deploy_text("README.md"), "### Fleet recording rules")
        self.assertSameNames([name for name, _ in rows], records, "deploy/README.md Fleet recording rules")

    def test_inhibit_rule_lets_each_critical_probe_alert_mute_endpoint_down(self) -> None:
        """WebSocketEndpointDown fires for any failed probe. Every other critical alert about a
        probe says why it failed, so it mutes the general one; WebSocketExporterDown is per job
        (no instance to match), so it stays out."""
        block = "\n".join(doc_section(deploy_text("README.md"), "### Paging once"))
        sources = re.search(r"source_matchers: \['alertname=~\"([\w|]+)\"'\]", block)
        target = re.search(r"target_matchers: \['alertname=\"(\w+)\"'\]", block)
        assert sources is not None and target is not None, "deploy/README.md: no inhibit rule under Paging once"
        self.assertEqual(target.group(1), "WebSocketEndpointDown")
        self.assertIn("equal: [job, instance]", block)
        critical = [name for name, severity in rule_alerts().items() if severity == "critical"]
        intended = set(critical) - {"WebSocketEndpointDown", "WebSocketExporterDown"}
        self.assertSameNames(sources.group(1).split("|"), intended, "deploy/README.md inhibit rule sources")

    def test_relative_links_between_the_documents_resolve(self) -> None:
        files = ["README.md", "deploy/README.md"] + ["docs/" + name for name in sorted(os.listdir(DOCS_DIR)) if name.endswith(".md")]
        broken = []
        for name in files:
            with open(os.path.join(HERE, name), encoding="utf-8") as f:
                text = f.read()
            for link in re.findall(r"\]\(([^)\s]+)\)", text):
                if re.match(r"[a-z]+:", link):
                    continue
                path, _, anchor = link.partition("#")
                target = os.path.normpath(os.path.join(os.path.dirname(name), path)) if path else name
                if not os.path.exists(os.path.join(HERE, target)):
                    broken.append((name, link))
                elif anchor and target.endswith(".md") and anchor not in markdown_anchors(target):
                    broken.append((name, link))
        self.assertEqual(broken, [], "links whose file or heading does not exist")


# ----------------------------------------------------------------------------------------------
# Real scrapers (VictoriaMetrics, Prometheus) running the shipped jobs against the exporter
# ----------------------------------------------------------------------------------------------

SCRAPE_DEADLINE = 20.0  # seconds for a scraper to start and store its first samples


def vmprobe_spec(name: str) -> Dict[str, object]:
    """The fields of the shipped VMProbe ``name`` that the operator's scrape job is built from
    (read with patterns: the file's layout is fixed, and no YAML library is at hand)."""
    for document in deploy_text(VMPROBE_FILE).split("\n---\n"):
        if re.search(r"(?m)^  name: %s$" % re.escape(name), document):
            def field(pattern: str) -> str:
                match = re.search(r"(?m)^%s: (\S+)$" % pattern, document)
                assert match is not None, (name, pattern)
                return match.group(1)

            labels = re.search(r"(?m)^      labels:\n((?:        \w+: \S+\n?)+)", document)
            assert labels is not None, name
            return {
                "jobName": field("  jobName"), "module": field("  module"), "path": field("    path"),
                "url": field("    url"), "labels": dict(re.findall(r"(\w+): (\S+)", labels.group(1))),
            }
    raise AssertionError("no VMProbe %s in %s" % (name, VMPROBE_FILE))


def operator_probe_job(name: str, spec: Dict[str, object], targets: List[str], interval: str) -> Dict[str, object]:
    """The scrape job the VictoriaMetrics operator generates for a VMProbe with static targets
    (job name probe/NAMESPACE/NAME/0, module param, then its relabeling in its order)."""
    return {
        "job_name": "probe/monitoring/%s/0" % name,
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "params": {"module": [spec["module"]]},
        "metrics_path": spec["path"],
        "static_configs": [{"targets": targets, "labels": spec["labels"]}],
        "relabel_configs": [
            {"source_labels": ["__address__"], "target_label": "__param_target"},
            {"target_label": "job", "replacement": spec["jobName"]},
            {"source_labels": ["__param_target"], "target_label": "instance"},
            {"target_label": "__address__", "replacement": spec["url"]},
        ],
    }


def replace_once(text: str, pattern: str, replacement: str) -> str:
    """``text`` with the one match of ``pattern`` replaced; fails when the shipped file changed
    so that the pattern matches no more (or more than once)."""
    result, count = re.subn(pattern, lambda _: replacement, text, flags=re.M)
    assert count == 1, (pattern, count)
    return result


def prometheus_test_config(exporter: str, targets: List[str]) -> str:
    """The shipped prometheus.yml with its exporter address, probe targets, intervals and rule
    path rewritten for a test; its jobs and relabeling stay as shipped."""
    text = deploy_text(PROMETHEUS_CONFIG_FILE)
    for key in ("scrape_interval", "scrape_timeout", "evaluation_interval"):
        text = replace_once(text, r"^  %s: \S+$" % key, "  %s: 1s" % key)
    text = replace_once(text, r"^  - \.\./rules/ws-exporter\.rules\.yml$", "  - " + os.path.join(DEPLOY_DIR, RULES_FILE))
    text = replace_once(text, r"^      - targets:\n(?:          - wss://\S+\n)+",
                        "      - targets:\n" + "".join("          - %s\n" % t for t in targets))
    text = replace_once(text, r"^        replacement: 127\.0\.0\.1:9095$", "        replacement: " + exporter)
    return replace_once(text, r"^          - 127\.0\.0\.1:9095$", "          - " + exporter)


# Runs a program that knows nothing of stdin, and ends it when stdin closes: when the test ends it,
# or when the test process dies, so that no scraper outlives the tests.
_STDIN_WATCH = '"$@" </dev/null & child=$!; read _; kill $child; wait $child'


class Scraper:
    """A real Prometheus or VictoriaMetrics on 127.0.0.1, its data in a temporary directory."""

    def __init__(self, case: unittest.TestCase, argv: List[str], port: int, flush_path: str = "") -> None:
        self.port = port
        self.flush_path = flush_path
        self.log = tempfile.TemporaryFile()
        case.addCleanup(self.log.close)
        self.proc = subprocess.Popen(["/bin/sh", "-c", _STDIN_WATCH, "sh", *argv], stdin=subprocess.PIPE,
                                     stdout=self.log, stderr=self.log)
        case.addCleanup(self.close)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            stop(self.proc)

    def get_raw(self, path: str, **params: str) -> Tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path + ("?" + wx.urllib.parse.urlencode(params) if params else ""))
            response = conn.getresponse()
            return response.status, response.read().decode("utf-8")
        finally:
            conn.close()

    def get(self, path: str, **params: str) -> Dict[str, object]:
        status, body = self.get_raw(path, **params)
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise AssertionError("%s: %d %s" % (path, status, body[:500]))
        return answer  # type: ignore[no-any-return]

    def query(self, expr: str) -> List[Dict[str, str]]:
        """The label sets of an instant query's answer.  VictoriaMetrics buffers fresh samples
        for seconds unless asked to flush, and caches answers unless told nocache."""
        if self.flush_path:
            self.get_raw(self.flush_path)
        result = self.get("/api/v1/query", query=expr, nocache="1")["data"]["result"]  # type: ignore[index]
        return [dict(r["metric"], value=r["value"][1]) for r in result]

    def wait_for(self, expr: str, count: int) -> List[Dict[str, str]]:
        """Poll ``expr`` until it has ``count`` series, within SCRAPE_DEADLINE; each series'
        labels and its value (as "value")."""
        deadline = time.monotonic() + SCRAPE_DEADLINE
        while True:
            try:
                values = self.query(expr)
            except (OSError, AssertionError, ValueError):
                values = []
            if len(values) >= count:
                return values
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.log.seek(0)
                raise AssertionError("%s: %r after %.0fs\n%s" % (expr, values, SCRAPE_DEADLINE,
                                                              self.log.read()[-3000:].decode("utf-8", "replace")))
            time.sleep(0.2)

    def active_targets(self, job: str) -> List[Dict[str, object]]:
        targets = self.get("/api/v1/targets")["data"]["activeTargets"]  # type: ignore[index]
        return [t for t in targets if t["labels"].get("job") == job]


@unittest.skipUnless(RUN_ONCE, "runs with one interpreter: the scrapers are under test (about 11 s), not the language")
class ScrapeTestCase(unittest.TestCase):
    """The exporter in a thread probing a good local WebSocket server and a closed port, with
    every exposition format it answers in recorded."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="wsx-scraper-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.server = LocalServer(good_server)
        self.addCleanup(self.server.close)
        self.exporter = ExporterFixture(self.web_config())
        self.addCleanup(self.exporter.close)
        self.good = "ws://127.0.0.1:%d/" % self.server.port
        self.dead = "ws://127.0.0.1:%d/" % free_port()
        self.accepts: List[Optional[str]] = []
        self.negotiate = wx.negotiate_format

        def recording(accept: Optional[str]) -> wx.ExpositionFormat:
            self.accepts.append(accept)
            return self.negotiate(accept)

        patcher = mock.patch.object(wx, "negotiate_format", recording)
        patcher.start()
        self.addCleanup(patcher.stop)

    def web_config(self) -> Optional[wx.WebConfig]:
        """How the exporter's listener is protected (it is written before the exporter starts)."""
        return None

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def start_victoria_metrics(self, jobs: List[Dict[str, object]]) -> Scraper:
        config = self.write("scrape.json", json.dumps({"scrape_configs": jobs}, indent=2))
        port = free_port()
        return Scraper(self, [
            os.environ["WS_VICTORIA_METRICS"], "-httpListenAddr=127.0.0.1:%d" % port,
            "-storageDataPath=" + os.path.join(self.tmp, "data"), "-promscrape.config=" + config,
            "-search.latencyOffset=1s", "-loggerLevel=WARN",
        ], port, flush_path="/internal/force_flush")

    def assert_probe_results(self, scraper: Scraper, job: str) -> None:
        values = scraper.wait_for('probe_success{job="%s"}' % job, 2)
        self.assertEqual({v["instance"]: v["value"] for v in values}, {self.good: "1", self.dead: "0"})
        failure = scraper.wait_for('probe_failure_info{job="%s"}' % job, 1)
        self.assertEqual([(f["instance"], f["phase"], f["reason"]) for f in failure], [(self.dead, "connect", "connect_refused")])
        targets = scraper.active_targets(job)
        self.assertEqual(sorted(t["labels"]["instance"] for t in targets), sorted([self.good, self.dead]))  # type: ignore[index]
        for target in targets:
            self.assertEqual((target["health"], target["lastError"]), ("up", ""), target)


class TestVictoriaMetricsScrape(ScrapeTestCase):
    def test_the_operators_job_for_the_shipped_vmprobe_scrapes_cleanly(self) -> None:
        require_peer(self, "WS_VICTORIA_METRICS")
        spec = vmprobe_spec("ws-exporter-connect")
        self.assertEqual((spec["url"], spec["path"], spec["module"]), ("ws-exporter.monitoring.svc:9095", "/probe", "connect"))
        spec["url"] = "127.0.0.1:%d" % self.exporter.port
        job = operator_probe_job("ws-exporter-connect", spec, [self.good, self.dead], "1s")
        scraper = self.start_victoria_metrics([job])
        self.assert_probe_results(scraper, "ws-exporter-connect")
        labels = scraper.get("/api/v1/series", **{"match[]": 'probe_success{instance="%s"}' % self.good})["data"]
        self.assertEqual(labels, [{"__name__": "probe_success", "job": "ws-exporter-connect",
                                   "instance": self.good, "chain_family": "generic"}])
        # VictoriaMetrics 1.79 asks for the text format only.
        accepts = list(self.accepts)
        self.assertTrue(accepts and all(self.negotiate(a) == wx.TEXT_FORMAT for a in accepts), accepts)


class TestVictoriaMetricsScrapeProtected(ScrapeTestCase):
    """The exporter behind a web config file requiring TLS, a client certificate and basic auth;
    VictoriaMetrics scrapes it as vmagent does for a VMProbe with tlsConfig and basicAuth."""

    def web_config(self) -> wx.WebConfig:
        pki = client_pki()
        return wx.load_web_config(self.write("web.json", json.dumps({
            "tls_server_config": {"cert_file": pki["good.pem"], "key_file": pki["good.key"],
                                  "client_ca_file": pki["ca.pem"], "client_auth_type": "RequireAndVerifyClientCert"},
            "basic_auth_users": {"vmagent": wx.hash_password(PASSWORD)},
        })))

    def job(self, name: str, targets: List[str], client_cert: bool = True,
            basic_auth: Optional[Dict[str, str]] = None) -> Dict[str, object]:
        """The operator's job for the shipped VMProbe, renamed to ``name`` (its job label too),
        over https with the test CA trusted and the exporter's certificate checked against its
        SAN localhost, plus the client certificate and basic_auth when given."""
        pki = client_pki()
        spec = dict(vmprobe_spec("ws-exporter-connect"), jobName=name, url="127.0.0.1:%d" % self.exporter.port)
        job = operator_probe_job(name, spec, targets, "1s")
        tls = {"ca_file": pki["ca.pem"], "server_name": "localhost"}
        if client_cert:
            tls.update(cert_file=pki["client.pem"], key_file=pki["client.key"])
        job.update(scheme="https", tls_config=tls)
        if basic_auth is not None:
            job["basic_auth"] = basic_auth
        return job

    def wait_down(self, scraper: Scraper, job: str) -> str:
        """The lastError of ``job``'s one target once a scrape has failed (VictoriaMetrics 1.79
        lists a target not yet scraped as down too, with no error)."""
        targets: List[Dict[str, object]] = []

        def down() -> bool:
            targets[:] = scraper.active_targets(job)
            return len(targets) == 1 and targets[0]["health"] == "down" and targets[0]["lastError"] != ""

        self.assertTrue(wait_until(down, SCRAPE_DEADLINE), targets)
        return str(targets[0]["lastError"])

    def test_tls_client_certificate_and_basic_auth_as_vmagent_sends_them(self) -> None:
        require_peer(self, "WS_VICTORIA_METRICS")
        password_file = self.write("password", PASSWORD + "\n")  # as a Secret or `echo` leaves it
        vmagent = {"username": "vmagent", "password_file": password_file}
        log = self.exporter.exporter.logger.stream = WatchedLog()
        scraper = self.start_victoria_metrics([
            self.job("ws-exporter-connect", [self.good, self.dead], basic_auth=vmagent),
            self.job("no-basic-auth", [self.good]),
            self.job("wrong-password", [self.good], basic_auth={"username": "vmagent", "password": "wrong"}),
            self.job("no-client-cert", [self.good], client_cert=False, basic_auth=vmagent),
        ])
        self.assert_probe_results(scraper, "ws-exporter-connect")
        # The status after the scraped URL (whose ports may hold the digits 401 too).
        unauthorized = r'": 401; expecting 200; response body: "Unauthorized\\n"$'
        for job in ("no-basic-auth", "wrong-password"):
            self.assertRegex(self.wait_down(scraper, job), unauthorized, job)
        # Go sees the refused handshake as a closed connection; the exporter says why.
        self.assertNotRegex(self.wait_down(scraper, "no-client-cert"), r'": \d{3}; expecting 200')
        self.assertTrue(log.wait_for("PEER_DID_NOT_RETURN_A_CERTIFICATE"), log.getvalue()[-2000:])
        for job in ("no-basic-auth", "wrong-password", "no-client-cert"):
            self.assertEqual(scraper.query('probe_success{job="%s"}' % job), [], job)


class TestPrometheusScrape(ScrapeTestCase):
    def test_the_shipped_config_scrapes_cleanly_in_openmetrics_and_every_query_runs(self) -> None:
        require_peer(self, "WS_PROMETHEUS")
        exporter = "127.0.0.1:%d" % self.exporter.port
        config = self.write("prometheus.yml", prometheus_test_config(exporter, [self.good, self.dead]))
        port = free_port()
        scraper = Scraper(self, [
            os.environ["WS_PROMETHEUS"], "--config.file=" + config, "--web.listen-address=127.0.0.1:%d" % port,
            "--storage.tsdb.path=" + os.path.join(self.tmp, "data"), "--log.level=warn",
        ], port)
        self.assert_probe_results(scraper, "ws-exporter")
        # The exporter's own job, read through OpenMetrics: counters keep their _total name.
        probes = scraper.wait_for('ws_exporter_probes_total{job="ws-exporter-self",module="connect"}', 1)
        self.assertEqual([p["instance"] for p in probes], [exporter])
        self.assertEqual(scraper.active_targets("ws-exporter-self")[0]["lastError"], "")
        collections = scraper.wait_for('python_gc_collections_total{job="ws-exporter-self"}', 3)
        self.assertEqual(sorted(c["generation"] for c in collections), ["0", "1", "2"])
        self.assertTrue(self.accepts)
        accepts = list(self.accepts)
        self.assertTrue(all(self.negotiate(a) == wx.OPENMETRICS_FORMAT for a in accepts), accepts)
        groups = scraper.get("/api/v1/rules")["data"]["groups"]  # type: ignore[index]
        self.assertEqual([g["name"] for g in groups], ["ws-exporter"])
        # The shipped rules on real series: the closed port is pending in both down alerts.
        pending = scraper.wait_for('ALERTS{alertstate="pending"}', 2)
        self.assertEqual(sorted((labels["alertname"], labels["instance"]) for labels in pending),
                         [("WebSocketConnectionDown", self.dead), ("WebSocketEndpointDown", self.dead)])
        for expr in dashboard_exprs():
            with self.subTest(expr=expr):
                scraper.get("/api/v1/query", query=substitute_grafana_variables(expr))


# ----------------------------------------------------------------------------------------------
# The exporter as a process under load: caps, and running out of descriptors
# ----------------------------------------------------------------------------------------------


class TestLoad(unittest.TestCase):
    def test_over_the_probe_cap_requests_get_a_quick_503(self) -> None:
        fixture = ExporterFixture(max_concurrent=2)
        self.addCleanup(fixture.close)
        server = LocalServer(silent)
        self.addCleanup(server.close)
        results: List[int] = []

        def slow_probe() -> None:
            results.append(fixture.probe_raw("ws://127.0.0.1:%d/" % server.port, "3")[0])

        threads = [threading.Thread(target=slow_probe) for _ in range(2)]
        for t in threads:
            t.start()
        self.assertTrue(wait_until(lambda: fixture.exporter.stats.in_flight == 2))
        start = time.monotonic()
        status, headers, body = fixture.probe_raw("ws://127.0.0.1:%d/" % server.port, "3")
        self.assertEqual((status, body), (503, "Too many probes in flight\n"))
        self.assertLess(time.monotonic() - start, 1.0)
        self.assertEqual(headers["retry-after"], "1")
        for t in threads:
            t.join(10)
        self.assertEqual(results, [200, 200])
        metrics = parse_metrics(fixture.get("/metrics")[2])
        self.assertEqual(metrics['ws_exporter_requests_rejected_total{reason="overloaded"}'], 1)

    def test_over_the_connection_cap_connections_get_a_quick_503(self) -> None:
        fixture = ExporterFixture(max_connections=2)
        self.addCleanup(fixture.close)
        held = [socket.create_connection(("127.0.0.1", fixture.port), timeout=5) for _ in range(2)]
        for conn in held:
            self.addCleanup(conn.close)
        self.assertTrue(wait_until(lambda: fixture.server.connections == 2))
        extra = socket.create_connection(("127.0.0.1", fixture.port), timeout=5)
        self.addCleanup(extra.close)
        answer = extra.makefile("rb").read()  # the whole answer: the exporter closes after it
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer)
        for field in (b"Retry-After: 1", b"Connection: close", b"Content-Length: %d" % len(body)):
            self.assertIn(b"\r\n" + field, head)
        self.assertEqual(body, b"Too many connections\n")
        for conn in held:
            conn.close()
        self.assertTrue(wait_until(lambda: fixture.server.connections == 0))  # their threads saw them close
        metrics = parse_metrics(fixture.get("/metrics")[2])
        self.assertGreaterEqual(metrics['ws_exporter_requests_rejected_total{reason="connections"}'], 1)

    def test_200_concurrent_probes_of_a_silent_server_answer_within_the_scrape_timeout(self) -> None:
        # The exporter runs in its own process, as in production; the silent server is a listening
        # socket that never accepts: the kernel completes each TCP handshake, nobody answers.
        exporter = ExporterProcess()
        self.addCleanup(exporter.stop)
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        url = "/probe?target=ws://127.0.0.1:%d/" % listener.getsockname()[1]
        elapsed: List[float] = []
        statuses: List[int] = []
        sent = threading.Semaphore(0)

        def request(path: str, headers: Dict[str, str]) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=30)
            try:
                conn.request("GET", path, headers=headers)
                return conn.getresponse().status
            finally:
                conn.close()

        def scrape() -> None:
            start = time.monotonic()
            sent.release()
            statuses.append(request(url, {wx.SCRAPE_TIMEOUT_HEADER: "2"}))
            elapsed.append(time.monotonic() - start)

        threads = [threading.Thread(target=scrape) for _ in range(200)]
        for t in threads:
            t.start()
        for _ in threads:
            sent.acquire()

        def in_flight() -> float:
            conn = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=30)
            try:
                conn.request("GET", "/metrics")
                return parse_metrics(conn.getresponse().read().decode())["ws_exporter_probes_in_flight"]
            finally:
                conn.close()

        self.assertTrue(wait_until(lambda: in_flight() == 200, 1.5))
        side = time.monotonic()  # all 200 probes are waiting on the silent server now
        self.assertEqual(request("/-/healthy", {}), 200)
        self.assertEqual(request("/metrics", {}), 200)
        side_elapsed = time.monotonic() - side
        for t in threads:
            t.join(30)
        self.assertEqual(statuses, [200] * 200)
        self.assertLess(max(elapsed), 2.0)  # what each scraper saw: within its scrape timeout
        self.assertLess(side_elapsed, 1.0)


def process_threads(pid: int) -> int:
    return len(os.listdir("/proc/%d/task" % pid))


class TestOutOfDescriptors(unittest.TestCase):
    """ulimit -n 128 and 400 probes at once with the caps at their defaults: each request gets a
    200 or a quick 503, none is reset or left waiting, and the process recovers."""

    def start(self, limit: int) -> Tuple["subprocess.Popen[str]", int, str]:
        import resource

        proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "ws_exporter.py"), "--web.listen-address=127.0.0.1:0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
        )
        assert proc.stderr is not None
        self.addCleanup(proc.stderr.close)
        self.addCleanup(proc.wait, 10)
        self.addCleanup(proc.kill)  # first: the reader below then sees the end of the pipe
        line = proc.stderr.readline()
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # a full pipe would block its logs
        return proc, int(re.search(r"address=127\.0\.0\.1:(\d+)", line).group(1)), line  # type: ignore[union-attr]

    def test_every_request_is_answered_and_the_process_recovers(self) -> None:
        proc, port, line = self.start(128)
        self.assertIn("max_connections=24 max_concurrent=24", line)  # (128 - 80 reserved) / 2
        server = LocalServer(silent)
        self.addCleanup(server.close)

        def figures() -> Tuple[int, int]:
            return len(os.listdir("/proc/%d/fd" % proc.pid)), process_threads(proc.pid)

        self.assertEqual(http_status(port, "/-/healthy"), 200)  # the accepting thread runs
        self.assertTrue(wait_until(lambda: figures()[1] == 2))  # the main thread and the accepting one
        baseline = figures()
        request = ("GET /probe?target=ws://127.0.0.1:%d/ HTTP/1.1\r\nHost: x\r\n"
                   "X-Prometheus-Scrape-Timeout-Seconds: 1.5\r\n\r\n" % server.port).encode()
        statuses: List[object] = []

        def scrape() -> None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(request)
                    statuses.append(int(sock.makefile("rb").readline().split()[1]))
            except (OSError, IndexError) as err:  # a reset, no answer within 10 s, or an empty one
                statuses.append(type(err).__name__)

        clients = [threading.Thread(target=scrape) for _ in range(400)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(30)
        self.assertEqual(len(statuses), 400)
        self.assertEqual(set(statuses) - {200, 503}, set(), collections.Counter(map(str, statuses)))
        self.assertGreaterEqual(statuses.count(200), 24)
        self.assertTrue(wait_until(lambda: figures() == baseline), (figures(), baseline))
        good = LocalServer(good_server)
        self.addCleanup(good.close)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/probe?target=ws://127.0.0.1:%d/" % good.port)
        self.assertEqual(parse_metrics(conn.getresponse().read().decode())["probe_success"], 1)
        conn.close()

    def test_out_of_descriptors_a_waiting_client_gets_a_503_not_silence(self) -> None:
        """The limit lowered after start, below what the caps were worked out for: the spare
        descriptor answers each client that finds none left, and the accept loop does not spin."""
        import resource

        proc, port, _ = self.start(4096)
        limit = 48
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (limit, 4096))  # type: ignore[attr-defined]
        idle = []
        self.addCleanup(lambda: [c.close() for c in idle])
        for _ in range(limit + 8):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        answers = [c.recv(64) for c in idle[-4:]]  # the last ones found no descriptor left
        self.assertTrue(all(a.startswith(b"HTTP/1.1 503") for a in answers), answers)
        with open("/proc/%d/stat" % proc.pid) as f:
            before = sum(int(n) for n in f.read().rpartition(")")[2].split()[11:13])
        time.sleep(1.0)  # an interval to measure CPU over, not a synchronisation
        with open("/proc/%d/stat" % proc.pid) as f:
            spent = (sum(int(n) for n in f.read().rpartition(")")[2].split()[11:13]) - before) / os.sysconf("SC_CLK_TCK")
        self.assertLess(spent, 0.5, "the accept loop spins")
        for conn in idle:
            conn.close()
        self.assertTrue(wait_until(lambda: http_status(port, "/-/healthy") == 200))


# ----------------------------------------------------------------------------------------------
# The short soak and the bench's smoke run
# ----------------------------------------------------------------------------------------------

@unittest.skipUnless(RUN_ONCE, "runs with one interpreter: the exporter as a process is under test")
class TestShortSoak(unittest.TestCase):
    """bench/soak.py for 60 s: a real VictoriaMetrics scraping ~200 targets through faults; any
    floor missed fails it (its report is in the output)."""

    def test_a_minute_of_soak_meets_every_floor(self) -> None:
        if not (IN_CI or os.environ.get("WS_SOAK")):
            self.skipTest("the short soak runs under CI=true (or with WS_SOAK=1)")
        require_peer(self, "WS_VICTORIA_METRICS", "WS_PEER_NODE", "WS_PEER_NODE_PATH", "WS_GANACHE", "WS_ANVIL")
        reports = tempfile.mkdtemp(prefix="ws-soak-report-")
        self.addCleanup(shutil.rmtree, reports, True)
        result = subprocess.run([sys.executable, os.path.join(HERE, "bench", "soak.py"), "--seconds", "60",
                                 "--report-dir", reports], capture_output=True, text=True, timeout=240)
        self.assertEqual(result.returncode, 0, result.stdout[-6000:] + result.stderr[-2000:])
        self.assertIn("floors:", result.stdout)
        with open(os.path.join(reports, "report.txt")) as f:
            self.assertIn("RSS last half", f.read())
        picture = xml.etree.ElementTree.parse(os.path.join(reports, "resources.svg")).getroot()
        lines = picture.findall("{http://www.w3.org/2000/svg}polyline")
        self.assertEqual(len(lines), 6, "RSS, threads and fds, each for the process killed and the one restarted")
        self.assertGreater(min(len(line.get("points", "").split()) for line in lines), 2)


@unittest.skipUnless(RUN_ONCE, "runs with one interpreter: the bench is under test, not the language")
class TestBenchSmoke(unittest.TestCase):
    """bench/run.py --smoke: every piece starts and a few probes go through both exporters."""

    def test_smoke_run_prints_one_table(self) -> None:
        require_peer(self, "WS_PEER_NODE", "WS_PEER_NODE_PATH", "WS_BLACKBOX_EXPORTER", "WS_WRK")
        if shutil.which("openssl") is None:
            self.skipTest("no openssl CLI")
        result = subprocess.run([sys.executable, os.path.join(HERE, "bench", "run.py"), "--smoke"],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:] + result.stdout[-2000:])
        self.assertIn("ws c=16 probes/s", result.stdout)
        self.assertIn("wss c=16 probes/s", result.stdout)
        self.assertIn("wss upgrade error c=16 p99", result.stdout)
        self.assertIn("spawn to first 200", result.stdout)


if __name__ == "__main__":
    unittest.main()
