"""Tests for ws_exporter.py: a specification of its behaviour, run with ``make test``.

Local servers listen on 127.0.0.1 port 0 only.  The interop class needs real peers installed by
``.ci/peers`` (paths in the environment); under CI=true a missing peer fails instead of skipping.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import io
import json
import os
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
from typing import IO, Callable, Dict, Iterator, List, NoReturn, Optional, Tuple
from unittest import mock

import ws_exporter as wx

HERE = os.path.dirname(os.path.abspath(__file__))
IN_CI = os.environ.get("CI") == "true"


# ----------------------------------------------------------------------------------------------
# Helpers: server frames, metrics parsing, local servers, the exporter in a thread
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


Behaviour = Callable[[socket.socket], None]


def good_server(sock: socket.socket) -> None:
    """Accept the upgrade, echo our close."""
    head, rest = read_request_head(sock)
    sock.sendall(switching_response(request_key(head)))
    opcode, payload, _ = read_client_frame(sock, rest)
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


def silent(sock: socket.socket) -> None:
    """Accept and never say anything."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ExporterFixture:
    """The exporter's HTTP server on 127.0.0.1:0 in a thread, with its log captured."""

    def __init__(self, **settings: object) -> None:
        self.log = io.StringIO()
        opts = dict(listen_address="127.0.0.1:0", log_level="debug")
        opts.update(settings)  # type: ignore[arg-type]
        self.exporter = wx.Exporter(wx.Settings(**opts), wx.Logger("debug", "logfmt", self.log))  # type: ignore[arg-type]
        self.server = wx.make_server(self.exporter)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def get(self, path: str, headers: Optional[Dict[str, str]] = None, method: str = "GET") -> Tuple[int, Dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
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


def failure_of(metrics: Dict[str, float]) -> Optional[Tuple[str, str]]:
    for key in metrics:
        match = re.fullmatch(r'probe_failure_info\{phase="(\w+)",reason="(\w+)"\}', key)
        if match:
            return match.group(1), match.group(2)
    return None


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


# ----------------------------------------------------------------------------------------------
# RFC 6455 codec, without sockets
# ----------------------------------------------------------------------------------------------


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

    def test_non_101_is_http_status(self) -> None:
        self.assert_handshake_error("http_status", self.response(status="403 Forbidden"))

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


# ----------------------------------------------------------------------------------------------
# Exposition
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Flags and targets
# ----------------------------------------------------------------------------------------------


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


class TestTargets(unittest.TestCase):
    def test_forms(self) -> None:
        cases = {
            "wss://node.example/KEY": wx.Target(True, "node.example", 443, "/KEY", ""),
            "ws://node.example": wx.Target(False, "node.example", 80, "/", ""),
            "https://Node.Example:8443/a?b=c": wx.Target(True, "node.example", 8443, "/a?b=c", ""),
            "http://10.0.0.1:8546": wx.Target(False, "10.0.0.1", 8546, "/", ""),
            "node.example:8546/ws": wx.Target(False, "node.example", 8546, "/ws", ""),
            "localhost": wx.Target(False, "localhost", 80, "/", ""),
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
                    "ws://::1/", "ws://h/a b", "ws://h/\x00", "ws://h/#frag", "ws://h!x/", "ws://a..b/" + "x" * 0, "ws://-\u0000/"):
            with self.subTest(raw=raw), self.assertRaises(wx.ProbeError) as caught:
                wx.parse_target(raw)
            self.assertEqual((caught.exception.phase, caught.exception.reason), ("target", "bad_target"))

    def test_redaction_hides_path_query_and_userinfo(self) -> None:
        target = wx.parse_target("wss://u:secret@node.example/v3/TOKEN123?key=abc")
        shown = target.redacted()
        self.assertRegex(shown, r"^wss://node\.example:443/<[0-9a-f]{8}>$")
        self.assertEqual(shown, wx.parse_target("wss://u:secret@node.example/v3/TOKEN123?key=abc").redacted())
        self.assertNotEqual(shown, wx.parse_target("wss://node.example/v3/TOKEN124?key=abc").redacted())
        self.assertEqual(wx.parse_target("ws://node.example").redacted(), "ws://node.example:80/")


# ----------------------------------------------------------------------------------------------
# Probes against local servers
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

    def assert_failed(self, metrics: Dict[str, float], phase: str, reason: str, up: int = 0) -> None:
        self.assertEqual(failure_of(metrics), (phase, reason))
        self.assertEqual(metrics["probe_success"], 0)
        self.assertEqual(metrics["probe_websocket_up"], up)


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
        seen: List[bytes] = []

        def record(sock: socket.socket) -> None:
            head, _ = read_request_head(sock)
            seen.append(head)
            good_server_after_head(sock, head)

        server = self.serve(record)
        self.exporter.probe("ws://localhost:%d/a/b?c=d" % server.port)
        head = seen[0].decode()
        self.assertTrue(head.startswith("GET /a/b?c=d HTTP/1.1\r\n"))
        self.assertIn("\r\nHost: localhost:%d\r\n" % server.port, head)
        self.assertIn("\r\nSec-WebSocket-Version: 13\r\n", head)
        self.assertIn("\r\nUser-Agent: ws-exporter/%s\r\n" % wx.__version__, head + "\r\n")
        self.assertEqual(len(base64.b64decode(request_key(seen[0]))), 16)

    def test_userinfo_becomes_basic_auth(self) -> None:
        seen: List[bytes] = []

        def record(sock: socket.socket) -> None:
            head, _ = read_request_head(sock)
            seen.append(head)
            good_server_after_head(sock, head)

        server = self.serve(record)
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

    def test_non_101_answers_are_http_status(self) -> None:
        for status in (200, 301, 401, 403, 429, 503):
            with self.subTest(status=status):
                raw = b"HTTP/1.1 %d Nope\r\nContent-Length: 0\r\nRetry-After: 5\r\nLocation: /x\r\n\r\n" % status
                metrics = self.probe_local(answer(raw))
                self.assert_failed(metrics, "upgrade", "http_status")
                self.assertEqual(metrics["probe_websocket_status_code"], status)

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


def good_server_after_head(sock: socket.socket, head: bytes) -> None:
    sock.sendall(switching_response(request_key(head)))
    opcode, payload, _ = read_client_frame(sock)
    if opcode == wx.Opcode.CLOSE:
        sock.sendall(server_frame(wx.Opcode.CLOSE, payload))


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

    def test_tls_on_a_ws_target_fails_the_upgrade(self) -> None:
        with trusting(self.pki["ca.pem"]):
            metrics = self.probe_local(good_server, "ws", scrape_timeout="2", tls=server_tls(self.pki, "good"))
        self.assertEqual(failure_of(metrics)[0], "upgrade")  # type: ignore[index]
        self.assertEqual(metrics["probe_success"], 0)


# ----------------------------------------------------------------------------------------------
# The exporter's HTTP endpoints
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The program: flags, logs, signals
# ----------------------------------------------------------------------------------------------


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

    def test_json_logs(self) -> None:
        proc = ExporterProcess("--log.format=json")
        code = proc.stop()
        record = json.loads(proc.first_line)
        self.assertEqual((record["level"], record["msg"]), ("info", "Listening"))
        self.assertEqual(code, 0)

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


# ----------------------------------------------------------------------------------------------
# Truthful timings: phases end when the kernel received the answer
# ----------------------------------------------------------------------------------------------


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
        self.assertIn("spawn to first 200", result.stdout)


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
    if tls_cert and tls_key:
        argv += [tls_cert, tls_key]
    return _spawn(argv, {"PYTHONPATH": _env_path("WS_PEER_PYTHONPATH")}, "websockets server")


# --- node `ws` echo server ---------------------------------------------------
_NODE_WS_SERVER = r"""
const fs = require('fs');
const { WebSocketServer } = require('ws');
const [cert, key] = process.argv.slice(1);
const server = cert
  ? require('https').createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) })
  : require('http').createServer();
const wss = new WebSocketServer({ server });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
});
server.listen(0, '127.0.0.1', () => console.log(String(server.address().port)));
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
"""


def start_node_ws_server(tls_cert: Optional[str] = None,
                         tls_key: Optional[str] = None) -> Tuple["subprocess.Popen[bytes]", int]:
    """Echo server (node ws); wss:// (https server) when tls_cert/tls_key are given."""
    argv = [_env_path("WS_PEER_NODE"), "-e", _NODE_WS_SERVER]
    if tls_cert and tls_key:
        argv += [tls_cert, tls_key]
    return _spawn(argv, {"NODE_PATH": _env_path("WS_PEER_NODE_PATH")}, "node ws server")


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
    proc, port = _spawn(argv, {"NODE_PATH": _env_path("WS_PEER_NODE_PATH")}, "ganache")
    try:
        wait_tcp(port)
    except PeerError:
        stop(proc)
        raise
    return proc, port



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


class TestInterop(unittest.TestCase):
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

    def test_python_websockets(self) -> None:
        require_peer(self, "WS_PEER_PYTHON", "WS_PEER_PYTHONPATH")
        self.assert_clean_success(self.probe_peer(start_websockets_server, False), False)

    def test_python_websockets_tls(self) -> None:
        require_peer(self, "WS_PEER_PYTHON", "WS_PEER_PYTHONPATH")
        self.assert_clean_success(self.probe_peer(start_websockets_server, True), True)

    def test_node_ws(self) -> None:
        require_peer(self, "WS_PEER_NODE", "WS_PEER_NODE_PATH")
        self.assert_clean_success(self.probe_peer(start_node_ws_server, False), False)

    def test_node_ws_tls(self) -> None:
        require_peer(self, "WS_PEER_NODE", "WS_PEER_NODE_PATH")
        self.assert_clean_success(self.probe_peer(start_node_ws_server, True), True)

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
                check = subprocess.run([os.environ["WS_PROMTOOL"], "check", "metrics"], input=body, capture_output=True, text=True, timeout=30)
                self.assertEqual((check.returncode, check.stdout + check.stderr), (0, ""), body)


if __name__ == "__main__":
    unittest.main()
