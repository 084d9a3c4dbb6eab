#!/usr/bin/env python3
"""ws-exporter: a Prometheus multi-target exporter that probes WebSocket endpoints.

``GET /probe?target=wss://node.example/KEY`` resolves the host, connects, negotiates TLS,
performs the RFC 6455 opening handshake, runs the module's checks (ping, JSON-RPC, subscriptions),
closes the connection cleanly and answers with Prometheus metrics describing every phase.
``/metrics`` describes the exporter itself.

One file, Python standard library only, Python 3.8 or newer: copy it and run it.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "CloseCode",
    "Opcode",
    "ProbeError",
    "HandshakeError",
    "FrameError",
    "FlagError",
    "expected_accept",
    "build_upgrade_request",
    "ResponseParser",
    "validate_handshake",
    "encode_frame",
    "FrameReader",
    "parse_target",
    "run_probe",
    "render_samples",
    "parse_flags",
    "parse_duration",
    "make_server",
    "WebConfig",
    "ConfigError",
    "load_web_config",
    "hash_password",
    "verify_password",
    "main",
]

import base64
import codecs
import collections
import contextlib
import email.utils
import enum
import errno
import fnmatch
import functools
import gc
import hashlib
import hmac
import http
import http.server
import io
import ipaddress
import itertools
import json
import os
import re
import select
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from typing import (
    IO,
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    TypeVar,
    Union,
)

# ==============================================================================================
# Constants
# ==============================================================================================

EXPORTER_NAME = "ws-exporter"
USER_AGENT = "%s/%s" % (EXPORTER_NAME, __version__)
PYTHON_VERSION = "%d.%d.%d" % sys.version_info[:3]

DEFAULT_LISTEN_ADDRESS = ":9095"
DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_TIMEOUT_OFFSET_SECONDS = 0.5
MIN_PROBE_TIMEOUT_SECONDS = 0.1  # the floor when a scrape timeout minus the offset is tiny
SCRAPE_TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"
# RFC 6455 §3: ws and wss default to the ports of http and https (RFC 9110 §4.2), as does a proxy URL.
HTTP_PORT = 80
HTTPS_PORT = 443
REDACTED_DIGEST_CHARS = 8  # hex digits of the hash that stands for a target's secret parts
SECRET_MIN_CHARS = 8  # shorter pieces of a target's path or query ("v3", "ws") are words, not keys

# RFC 6455 §1.3: the GUID appended to Sec-WebSocket-Key before hashing.
ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# RFC 6455 §4.1: the only version this protocol defines.
WEBSOCKET_VERSION = "13"
# RFC 6455 §4.1: the key is 16 random bytes, base64-encoded.
KEY_BYTES = 16

# RFC 6455 §5.2: bits of the first two header bytes.
FIN_BIT = 0x80
RSV_BITS = 0x70
OPCODE_BITS = 0x0F
MASK_BIT = 0x80
PAYLOAD_LEN_BITS = 0x7F
# RFC 6455 §5.2: markers in the 7-bit length field for 16- and 64-bit extended lengths.
PAYLOAD_LEN_16 = 126
PAYLOAD_LEN_64 = 127
MAX_PAYLOAD_7 = 125
MAX_PAYLOAD_16 = 0xFFFF
# RFC 6455 §5.2: the most significant bit of a 64-bit length MUST be 0.
MAX_PAYLOAD_64 = 0x7FFFFFFFFFFFFFFF
MASK_KEY_BYTES = 4
# RFC 6455 §5.5: control frames carry at most 125 bytes and are never fragmented.
MAX_CONTROL_PAYLOAD = 125
MAX_CLOSE_REASON_BYTES = MAX_CONTROL_PAYLOAD - 2  # §5.5.1: the 2-byte code comes first

# Limits on what a server may send us.
MAX_HANDSHAKE_LINE = 8192  # one status or header line of the upgrade response
MAX_HANDSHAKE_HEADERS = 100
MAX_HANDSHAKE_BYTES = 65536  # the whole upgrade response head
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one (reassembled) message
MAX_CLOSE_FRAMES = 1000  # frames we read while waiting for the server's close
CLOSE_WAIT_SECONDS = 2.0  # how long a probe waits for the server to answer our close
TLS_CLOSE_WAIT_SECONDS = 0.05  # then how long for its close_notify (see tls_closed)
RECV_BYTES = 16384  # one read; RFC 8446 §5.1: a TLS record carries at most 2^14 bytes
MAX_RESOLVER_THREADS = 64  # lookups running at once; a hung resolver cannot pile up threads
# Linux socket(7) SO_TIMESTAMPNS (the socket module does not name it): the kernel stamps each
# received segment, so a phase can end when the answer arrived rather than when a thread got the
# GIL to read it.  The value is 35 on every architecture but alpha, mips, parisc and sparc.
_STAMPING_MACHINES = ("x86", "i686", "aarch64", "arm", "ppc", "s390", "riscv")
SO_TIMESTAMPNS = 35 if sys.platform == "linux" and os.uname().machine.startswith(_STAMPING_MACHINES) else 0
_TIMESPEC = struct.Struct("@ll")  # struct timespec {time_t tv_sec; long tv_nsec;}
CLOCK_STEP_SECONDS = 60.0  # a stamp this old or from the future means the wall clock moved

# The exporter's own HTTP server.
KEEPALIVE_IDLE_SECONDS = 90.0  # an idle keep-alive connection is closed after this
REQUEST_READ_SECONDS = 10.0  # a client must send a whole request within this
RESPONSE_WRITE_SECONDS = 30.0
LISTEN_BACKLOG = 1024
ACCEPT_RETRY_SECONDS = 0.1  # the accept loop's pause when the process is out of descriptors
# A thread's stack is reserved address space; only the pages it touches are resident.  Python
# 3.13's JSON decoder recurses up to 10,000 levels in C before it raises RecursionError: a
# hostile node's nested message needs about 1.5 MB of stack to fail cleanly rather than crash.
THREAD_STACK_BYTES = 2 * 1024 * 1024
RESERVED_DESCRIPTORS = 16 + MAX_RESOLVER_THREADS  # see fit_descriptor_limit
DEFAULT_MAX_CONCURRENT_PROBES = 512
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS = 25.0  # within Kubernetes' default 30 s grace period
MAX_RELOAD_BODY_BYTES = 65536  # POST /-/reload needs no body; a small one is read and dropped

# TLS and basic auth on the exporter's own listener (--web.config.file).
TLS_HANDSHAKE_SECONDS = 10.0  # a client must finish the TLS handshake within this
CERT_RECHECK_SECONDS = 1.0  # the certificate files' stamps are looked at no more often than this
AUTH_REALM = EXPORTER_NAME
AUTH_MAX_HASHING = 2  # password hashes computed at once: each one keeps a core busy
AUTH_HASH_WAIT_SECONDS = 1.0  # how long a request waits for a hashing slot before a 429
AUTH_CACHE_ENTRIES = 1024  # verified credentials remembered, as keyed digests
AUTH_CACHE_KEY_BYTES = 32  # the HMAC-SHA256 key of those digests: one hash output's length
# RFC 7914 §2: scrypt parameters of new password hashes (16 MiB, tens of milliseconds).
SCRYPT_N = 2 ** 14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_SALT_BYTES = 16
SCRYPT_KEY_BYTES = 32
SCRYPT_MAX_MEMORY = 64 * 1024 * 1024  # a configured hash may not ask for more
SCRYPT_MAX_P = 16
TLS_MIN_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# exporter-toolkit's client_auth_type names; Go's RequestClientCert and RequireAnyClientCert
# accept unverified certificates, which the ssl module cannot do, so they are refused.
CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}

EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_MEDIA_TYPE = "application/openmetrics-text"
OPENMETRICS_CONTENT_TYPE = OPENMETRICS_MEDIA_TYPE + "; version=1.0.0; charset=utf-8"
RECENT_PROBES = 100  # probes the landing page lists; older ones (and their /logs) are dropped

PHASES = ("resolve", "connect", "tls", "upgrade", "close")
CONNECTING_PHASES = frozenset(PHASES[:4])
FAILURE_PHASES = frozenset(("target", "resolve", "connect", "tls", "upgrade", "check", "close"))
FAILURE_REASONS = frozenset(
    (
        "bad_target",  # target: not a ws/wss/http/https URL we can probe
        "blocked_target",  # target: refused by the exporter's target policy
        "dns_error",  # resolve: the name does not resolve
        "timeout",  # any phase: the probe's deadline passed
        "connect_refused",  # connect: the port is closed
        "connect_error",  # connect: unreachable network or host, other socket errors
        "connection_closed",  # the peer closed or reset the connection
        "tls_verify",  # tls: the certificate chain or name did not verify
        "tls_error",  # tls: any other handshake failure
        "http_status",  # upgrade: an answer other than 101 (and other than those below)
        "unauthorized",  # upgrade: 401 or 403 (a token refused, an Origin not allowed)
        "bad_response",  # upgrade: not a well-formed HTTP response head
        "response_too_large",  # upgrade: a line, the header count or the head over its limit
        "bad_upgrade",  # upgrade: Upgrade or Connection header missing or wrong
        "bad_accept",  # upgrade: Sec-WebSocket-Accept missing or wrong
        "unexpected_extension",  # upgrade: an extension the client did not offer
        "unexpected_subprotocol",  # upgrade: a subprotocol the client did not offer
        "protocol_error",  # close/check: a frame that breaks RFC 6455
        "message_too_large",  # close/check: a message over the size limit
        "internal_error",  # a bug in the exporter; the traceback is logged at debug level
        "no_response",  # check: no pong or JSON-RPC response before the check's time ran out
        "rpc_error",  # check: the node answered a JSON-RPC request with an error
        "rate_limited",  # upgrade 429, a close with 1008 or 1013, or a JSON-RPC error saying rate limit
        "method_not_found",  # check: the node does not serve a method the module needs (-32601)
        "subscription_unsupported",  # check: the node refuses the subscription (-32601, "not supported")
        "bad_json",  # check: a text message that is not JSON, or JSON-RPC of the wrong shape
        "no_notification",  # check: subscribed, but no notification before the check's time ran out
        "too_few_notifications",  # check: some notifications, fewer than min_notifications
        "chain_id_mismatch",  # check: the node serves another chain than expect_chain_id
        "head_too_old",  # check: the newest block is older than max_head_age
        "node_syncing",  # check: the node says it is syncing
        "node_unhealthy",  # check: Solana's getHealth says the node is behind
        "too_few_peers",  # check: fewer peers than min_peers
        "finality_lag",  # check: the finalized head is more than max_finality_lag behind the head
        "wrong_chain",  # check: the genesis hash or network differs from expect_genesis_hash or expect_network
        "subscription_stalled",  # check: a held subscription went silent for longer than max_gap
        "subscription_stopped",  # check: the node ended the subscription (chainHead_v1_follow's stop event)
        "expectation_failed",  # check: a step's regex or JSON path expectation did not hold
    )
)
# Checks stop this long (at most this share of the probe's timeout) before the deadline, so that a
# silent node fails as no_notification and the close has time to run; a hold, as long again before.
CHECK_RESERVE_SECONDS = 0.5
CHECK_RESERVE_SHARE = 0.1
PING_PAYLOAD_BYTES = 16
MAX_INFO_CHARS = 256  # of a client name, version or genesis hash in a label
MAX_CHECK_MESSAGES = 10000  # messages a check reads before giving up on a chatty node
# JSON-RPC error codes that mean "slow down": HTTP's 429 as some gateways send it, and the
# -32005 "limit exceeded" of EIP-1474.
RATE_LIMIT_CODES = frozenset((429, -32005))
METHOD_NOT_FOUND = -32601  # JSON-RPC 2.0 §5.1
SOLANA_NODE_BEHIND = -32005  # getHealth's "Node is behind by N slots", not a rate limit
# Substrate's storage key of Timestamp.Now: twox128("Timestamp") ++ twox128("Now").
SUBSTRATE_TIMESTAMP_KEY = "0xf0c365c3cf59d671eb72da0e7a4113c49f1f0515f462cdcf84e0f1d6045dfcbb"
SUBSTRATE_HASH_BYTES = 32  # a block header starts with its parent's hash
RATE_LIMIT_CLOSE_CODES = frozenset((1008, 1013))  # RFC 6455 §7.4.1 policy violation, try again later
HTTP_STATUS_REASONS = {401: "unauthorized", 403: "unauthorized", 429: "rate_limited"}  # upgrade answers

MAIN_THREAD_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
LOG_LEVELS = {"debug": 10, "info": 20, "warn": 30, "error": 40}
LOG_FORMATS = ("logfmt", "json")


class Opcode(enum.IntEnum):
    """RFC 6455 §5.2 frame opcodes."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    """RFC 6455 §7.4.1 status codes, plus 1012-1014 from the IANA registry."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RECEIVED = 1005  # never on the wire: the close frame had no body
    ABNORMAL_CLOSURE = 1006  # never on the wire
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015  # never on the wire


# RFC 6455 §7.4.2: codes below 3000 that may appear in a close frame; 3000-4999 always may.
WIRE_CLOSE_CODES = frozenset(c for c in CloseCode if c not in (1005, 1006, 1015))
MIN_APPLICATION_CLOSE_CODE = 3000
MAX_APPLICATION_CLOSE_CODE = 4999


# ==============================================================================================
# Errors
# ==============================================================================================


class ProbeError(Exception):
    """A probe failed.  ``reason`` is one of FAILURE_REASONS; ``phase`` may be empty, meaning
    the phase the probe was in when the error was raised."""

    def __init__(self, reason: str, detail: str, phase: str = "") -> None:
        assert reason in FAILURE_REASONS, reason
        assert not phase or phase in FAILURE_PHASES, phase
        self.reason = reason
        self.detail = detail
        self.phase = phase
        super().__init__("%s: %s" % (reason, detail))


class HandshakeError(ProbeError):
    """The server's answer to the upgrade request is not a valid RFC 6455 handshake."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail, "upgrade")


class FrameError(ProbeError):
    """A frame from the server breaks RFC 6455 or a limit."""

    def __init__(self, detail: str, reason: str = "protocol_error") -> None:
        super().__init__(reason, detail)


class CheckError(ProbeError):
    """A module's check failed; always charged to the check phase."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail, "check")


class FlagError(Exception):
    """A command-line flag is unknown or has a bad value."""


class BadRequest(Exception):
    """A /probe request the exporter cannot serve; answered with 400 and this message."""


class Overloaded(Exception):
    """Too many probes in flight; answered with 503 and this message."""


class ConfigError(Exception):
    """A configuration file (--config.file or --web.config.file) cannot be read or is invalid;
    the message starts with the path of the offending key ("modules.eth.tls.ca_fle: unknown key")."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__("%s: %s" % (path, message) if path else message)


# ==============================================================================================
# RFC 6455 codec (pure: bytes in, bytes out)
# ==============================================================================================


def new_key() -> str:
    """RFC 6455 §4.1: a fresh random Sec-WebSocket-Key."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def expected_accept(key: str) -> str:
    """RFC 6455 §4.2.2: the Sec-WebSocket-Accept value a server must answer ``key`` with."""
    digest = hashlib.sha1(key.encode("ascii") + ACCEPT_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def http_head(start_line: str, headers: Iterable[Tuple[str, str]]) -> bytes:
    """RFC 9112 §2.1: a start line, then header fields, each line ending in CRLF, then an empty
    line.  Every HTTP head the exporter writes comes from here: the upgrade and CONNECT requests
    and the answers of its own server."""
    lines = [start_line]
    lines.extend("%s: %s" % header for header in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def build_upgrade_request(
    host_header: str, resource: str, key: str, headers: Sequence[Tuple[str, str]] = ()
) -> bytes:
    """RFC 6455 §4.1: the client's opening handshake."""
    fields = [
        ("Host", host_header),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", WEBSOCKET_VERSION),
        ("User-Agent", USER_AGENT),
    ]
    return http_head("GET %s HTTP/1.1" % resource, fields + list(headers))


class HandshakeResponse(NamedTuple):
    status: int
    reason: str
    headers: Tuple[Tuple[str, str], ...]  # names lower-cased, in arrival order
    rest: bytes  # bytes after the head: the start of the frame stream

    def values(self, name: str) -> List[str]:
        return [v for n, v in self.headers if n == name]


_STATUS_LINE = re.compile(r"HTTP/1\.[0-9] ([0-9]{3})(?: (.*))?")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 7230 §3.2.6 token


class ResponseParser:
    """Collects the server's upgrade response head, enforcing the size limits."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Optional[HandshakeResponse]:
        """Add received bytes; return the parsed response once the head is complete."""
        self._buffer += data
        end, sep_len = _find_head_end(self._buffer)
        if end < 0:
            self._check_incomplete()
            return None
        if end > MAX_HANDSHAKE_BYTES:
            raise HandshakeError("response_too_large", "response head over %d bytes" % MAX_HANDSHAKE_BYTES)
        head = bytes(self._buffer[:end])
        rest = bytes(self._buffer[end + sep_len :])
        return parse_response_head(head, rest)

    def _check_incomplete(self) -> None:
        if len(self._buffer) > MAX_HANDSHAKE_BYTES:
            raise HandshakeError("response_too_large", "response head over %d bytes" % MAX_HANDSHAKE_BYTES)
        last_line = self._buffer[self._buffer.rfind(b"\n") + 1 :]
        if len(last_line) > MAX_HANDSHAKE_LINE:
            raise HandshakeError("response_too_large", "response line over %d bytes" % MAX_HANDSHAKE_LINE)
        if self._buffer.count(b"\n") > MAX_HANDSHAKE_HEADERS + 1:
            raise HandshakeError("response_too_large", "more than %d headers" % MAX_HANDSHAKE_HEADERS)


def _find_head_end(buffer: bytearray) -> Tuple[int, int]:
    """Where the head ends (an empty line; RFC 7230 §3.5 lets a bare LF end a line)."""
    crlf = buffer.find(b"\r\n\r\n")
    lf = buffer.find(b"\n\n")
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, 2
    return crlf, 4 if crlf >= 0 else 0


def parse_response_head(head: bytes, rest: bytes = b"") -> HandshakeResponse:
    """Parse an HTTP/1.1 response head (status line and header fields, no trailing blank line)."""
    try:
        text = head.decode("iso-8859-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise HandshakeError("bad_response", "undecodable response head")
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if any(len(line) > MAX_HANDSHAKE_LINE for line in lines):
        raise HandshakeError("response_too_large", "response line over %d bytes" % MAX_HANDSHAKE_LINE)
    if len(lines) - 1 > MAX_HANDSHAKE_HEADERS:
        raise HandshakeError("response_too_large", "more than %d headers" % MAX_HANDSHAKE_HEADERS)
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise HandshakeError("bad_response", "not an HTTP/1.x status line: %r" % lines[0][:60])
    headers = tuple(_parse_header_line(line) for line in lines[1:])
    return HandshakeResponse(int(match.group(1)), match.group(2) or "", headers, rest)


def _parse_header_line(line: str) -> Tuple[str, str]:
    name, sep, value = line.partition(":")
    # RFC 7230 §3.2.4: obsolete line folding and whitespace before the colon are rejected.
    if not sep or _HEADER_NAME.fullmatch(name) is None:
        raise HandshakeError("bad_response", "malformed header line: %r" % line[:60])
    return name.lower(), value.strip(" \t")


def _tokens(values: Iterable[str]) -> List[str]:
    """RFC 7230 §7: the comma-separated tokens of one or more header values, lower-cased."""
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


def validate_handshake(
    response: HandshakeResponse, key: str, subprotocols: Sequence[str] = ()
) -> Optional[str]:
    """RFC 6455 §4.1: check the server's answer; return the subprotocol it chose, if any."""
    if response.status != 101:
        reason = HTTP_STATUS_REASONS.get(response.status, "http_status")
        raise HandshakeError(reason, "status %d %s" % (response.status, response.reason[:40]))
    if _tokens(response.values("upgrade")) != ["websocket"]:
        raise HandshakeError("bad_upgrade", "Upgrade header is not 'websocket'")
    if "upgrade" not in _tokens(response.values("connection")):
        raise HandshakeError("bad_upgrade", "Connection header lacks 'Upgrade'")
    accept = response.values("sec-websocket-accept")
    if accept != [expected_accept(key)]:
        raise HandshakeError("bad_accept", "Sec-WebSocket-Accept %s" % ("wrong" if accept else "missing"))
    if _tokens(response.values("sec-websocket-extensions")):
        # This client offers no extension, so any extension in the answer is one it did not ask for.
        raise HandshakeError("unexpected_extension", "server chose an extension the client did not offer")
    chosen = _tokens(response.values("sec-websocket-protocol"))
    if not chosen:
        return None
    offered = [p.lower() for p in subprotocols]
    if len(chosen) != 1 or chosen[0] not in offered:
        raise HandshakeError("unexpected_subprotocol", "server chose a subprotocol the client did not offer")
    return subprotocols[offered.index(chosen[0])]


def apply_mask(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 §5.3: XOR ``payload`` with the 4-byte ``key`` (masking and unmasking alike)."""
    size = len(payload)
    if size == 0:
        return b""
    stream = (key * (size // MASK_KEY_BYTES + 1))[:size]
    masked = int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")
    return masked.to_bytes(size, "little")


def encode_frame(opcode: int, payload: bytes = b"", fin: bool = True, mask_key: Optional[bytes] = None) -> bytes:
    """RFC 6455 §5.2: one client frame, masked (§5.3) with ``mask_key`` or a fresh random key."""
    key = os.urandom(MASK_KEY_BYTES) if mask_key is None else mask_key
    first = (FIN_BIT if fin else 0) | opcode
    size = len(payload)
    if size <= MAX_PAYLOAD_7:
        header = struct.pack("!BB", first, MASK_BIT | size)
    elif size <= MAX_PAYLOAD_16:
        header = struct.pack("!BBH", first, MASK_BIT | PAYLOAD_LEN_16, size)
    else:
        header = struct.pack("!BBQ", first, MASK_BIT | PAYLOAD_LEN_64, size)
    return header + key + apply_mask(payload, key)


def encode_close(code: int = CloseCode.NORMAL, reason: str = "") -> bytes:
    """RFC 6455 §5.5.1: a close frame carrying ``code`` and a UTF-8 reason."""
    return encode_frame(Opcode.CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:MAX_CLOSE_REASON_BYTES])


class Frame(NamedTuple):
    fin: bool
    opcode: int
    payload: bytes


class Message(NamedTuple):
    opcode: int  # Opcode.TEXT or Opcode.BINARY
    data: bytes


class Ping(NamedTuple):
    payload: bytes


class Pong(NamedTuple):
    payload: bytes


class Close(NamedTuple):
    code: int  # CloseCode.NO_STATUS_RECEIVED when the frame had no body
    reason: str


Event = Union[Message, Ping, Pong, Close]
_OPCODES = frozenset(Opcode)


def parse_frame(buffer: Union[bytes, bytearray], max_payload: int) -> Optional[Tuple[Frame, int]]:
    """RFC 6455 §5.2: one server frame from the start of ``buffer`` and the bytes it used, or
    None when more bytes are needed."""
    if len(buffer) < 2:
        return None
    first, second = buffer[0], buffer[1]
    if first & RSV_BITS:
        raise FrameError("reserved bits set without a negotiated extension")  # §5.2
    if second & MASK_BIT:
        raise FrameError("server frame is masked")  # §5.1
    opcode = first & OPCODE_BITS
    if opcode not in _OPCODES:
        raise FrameError("unknown opcode 0x%x" % opcode)
    fin = bool(first & FIN_BIT)
    size, offset = _payload_length(buffer, second & PAYLOAD_LEN_BITS)
    if size < 0:
        return None
    if opcode >= Opcode.CLOSE and (not fin or size > MAX_CONTROL_PAYLOAD):
        raise FrameError("control frame fragmented or over %d bytes" % MAX_CONTROL_PAYLOAD)  # §5.5
    if size > max_payload:
        raise FrameError("frame of %d bytes over the %d byte limit" % (size, max_payload), "message_too_large")
    end = offset + size
    if len(buffer) < end:
        return None
    return Frame(fin, opcode, bytes(buffer[offset:end])), end


def _payload_length(buffer: Union[bytes, bytearray], marker: int) -> Tuple[int, int]:
    """The payload length and where the payload starts; (-1, 0) when more bytes are needed."""
    if marker <= MAX_PAYLOAD_7:
        return marker, 2
    if marker == PAYLOAD_LEN_16:
        if len(buffer) < 4:
            return -1, 0
        size = struct.unpack_from("!H", buffer, 2)[0]
        minimum, offset = MAX_PAYLOAD_7, 4
    else:
        if len(buffer) < 10:
            return -1, 0
        size = struct.unpack_from("!Q", buffer, 2)[0]
        if size > MAX_PAYLOAD_64:
            raise FrameError("64-bit length with the most significant bit set")
        minimum, offset = MAX_PAYLOAD_16, 10
    if size <= minimum:
        raise FrameError("length not in its minimal encoding")  # §5.2
    return size, offset


def parse_close_payload(payload: bytes) -> Close:
    """RFC 6455 §5.5.1 and §7.4: the code and reason of a close frame body."""
    if not payload:
        return Close(CloseCode.NO_STATUS_RECEIVED, "")
    if len(payload) < 2:
        raise FrameError("close frame body of one byte")
    code = struct.unpack_from("!H", payload)[0]
    in_range = MIN_APPLICATION_CLOSE_CODE <= code <= MAX_APPLICATION_CLOSE_CODE
    if code not in WIRE_CLOSE_CODES and not in_range:
        raise FrameError("close code %d may not be sent" % code)
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("close reason is not valid UTF-8")
    return Close(code, reason)


class FrameReader:
    """Turns the server's byte stream into events: reassembles fragmented messages under a size
    limit, validates text as UTF-8 as it arrives, and stops at the first close frame."""

    def __init__(self, max_message: int = MAX_MESSAGE_BYTES) -> None:
        self.max_message = max_message
        self.closed: Optional[Close] = None
        self._buffer = bytearray()
        self._fragments: List[bytes] = []
        self._fragment_size = 0
        self._fragment_opcode = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")()

    def feed(self, data: bytes) -> List[Event]:
        """Add received bytes; return the events they complete."""
        self._buffer += data
        events: List[Event] = []
        while self.closed is None:
            parsed = parse_frame(self._buffer, self.max_message - self._fragment_size)
            if parsed is None:
                break
            frame, used = parsed
            del self._buffer[:used]
            event = self._on_frame(frame)
            if event is not None:
                events.append(event)
        return events

    def _on_frame(self, frame: Frame) -> Optional[Event]:
        if frame.opcode == Opcode.PING:
            return Ping(frame.payload)
        if frame.opcode == Opcode.PONG:
            return Pong(frame.payload)
        if frame.opcode == Opcode.CLOSE:
            self.closed = parse_close_payload(frame.payload)
            return self.closed
        return self._on_data(frame)

    def _on_data(self, frame: Frame) -> Optional[Message]:
        continuing = bool(self._fragment_opcode)
        if (frame.opcode == Opcode.CONTINUATION) != continuing:
            raise FrameError("continuation frame out of sequence")  # §5.4
        if not continuing:
            self._fragment_opcode = frame.opcode
            self._utf8.reset()
        if self._fragment_opcode == Opcode.TEXT:
            self._check_utf8(frame.payload, frame.fin)
        self._fragments.append(frame.payload)
        self._fragment_size += len(frame.payload)
        if not frame.fin:
            return None
        message = Message(self._fragment_opcode, b"".join(self._fragments))
        self._fragments, self._fragment_size, self._fragment_opcode = [], 0, 0
        return message

    def _check_utf8(self, payload: bytes, final: bool) -> None:
        try:
            self._utf8.decode(payload, final)
        except UnicodeDecodeError:
            raise FrameError("text message is not valid UTF-8")  # §8.1


def encode_pong(ping: Ping) -> bytes:
    """RFC 6455 §5.5.3: the answer to a ping echoes its payload."""
    return encode_frame(Opcode.PONG, ping.payload)


# ==============================================================================================
# Probe (I/O: one deadline, timed phases)
# ==============================================================================================


class Target(NamedTuple):
    secure: bool
    host: str  # IDNA-encoded name or IP literal without brackets
    port: int
    resource: str  # path and query, as sent in the request line
    userinfo: str  # "user:password" from the URL, "" when none

    @property
    def scheme(self) -> str:
        return "wss" if self.secure else "ws"

    @property
    def host_port(self) -> str:
        return "%s:%d" % (bracketed(self.host), self.port)

    def host_header(self) -> str:
        """RFC 6455 §4.1 / RFC 7230 §5.4: the port only when it is not the scheme's default."""
        return bracketed(self.host) if self.port == default_port(self.secure) else self.host_port

    def redacted(self) -> str:
        """scheme://host:port and, when the target has a path, query or userinfo, a short stable
        hash of them instead: the form every log line and page shows."""
        secret = self.resource if self.resource != "/" else ""
        secret += "@" + self.userinfo if self.userinfo else ""
        if not secret:
            return "%s://%s/" % (self.scheme, self.host_port)
        return "%s://%s/<%s>" % (self.scheme, self.host_port, short_digest(secret))


def bracketed(host: str) -> str:
    """RFC 3986 §3.2.2: an IPv6 literal is written in brackets next to a port."""
    return "[%s]" % host if ":" in host else host


def default_port(secure: bool) -> int:
    return HTTPS_PORT if secure else HTTP_PORT


def short_digest(secret: str) -> str:
    """A short stable hash that tells secrets apart in logs without revealing them."""
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()[:REDACTED_DIGEST_CHARS]


_SCHEMES = {"ws": False, "wss": True, "http": False, "https": True}
_SCHEME_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(?!\d*(?:/|$))")
_CONTROL_CHARS = re.compile(r"[\x00-\x20\x7f]")


@functools.lru_cache(maxsize=1024)  # a scraper asks for the same targets again and again
def parse_target(raw: str) -> Target:
    """Parse a probe target: ws://, wss://, http:// (as ws), https:// (as wss), or host:port
    (as ws).  Raises ProbeError(phase "target", reason "bad_target") for anything else: a bare
    word is most likely a misspelled target alias, and probing it as a host name would report
    an outage that is not there."""
    if not raw or _CONTROL_CHARS.search(raw):
        raise _bad_target("empty or holds spaces or control characters")
    bare = "://" not in raw
    if bare and _SCHEME_PREFIX.match(raw):
        raise _bad_target("unsupported scheme")
    try:
        parts = urllib.parse.urlsplit("ws://" + raw if bare else raw)
        port = parts.port
    except ValueError:
        raise _bad_target("malformed URL or port")
    if bare and port is None:
        raise _bad_target("no target alias by that name, and not a URL (ws://, wss://) or host:port")
    secure = _SCHEMES.get(parts.scheme.lower())
    if secure is None:
        raise _bad_target("unsupported scheme")
    if parts.fragment or raw.endswith("#"):
        raise _bad_target("a fragment is not allowed in a WebSocket URL")  # RFC 6455 §3
    host = _target_host(parts.hostname or "")
    if port == 0:
        raise _bad_target("port 0")
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    resource = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    return Target(secure, host, port or default_port(secure), resource, urllib.parse.unquote(userinfo))


def _target_host(host: str) -> str:
    if not host:
        raise _bad_target("no host")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise _bad_target("host is not a valid name")
    labels = encoded[:-1].split(".") if encoded.endswith(".") else encoded.split(".")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", encoded) or not all(labels):
        raise _bad_target("host is not a valid name")
    return encoded.lower()


def _bad_target(detail: str) -> ProbeError:
    return ProbeError("bad_target", detail, "target")


class TLSOptions(NamedTuple):
    """A module's TLS settings for wss targets; the defaults are the system trust store."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""  # SNI and the name the certificate must carry; "" is the target's host
    insecure_skip_verify: bool = False
    min_version: str = ""  # "TLS12" or "TLS13"; "" is the ssl module's default


class Step(NamedTuple):
    """One step of a generic check: send a text frame, or wait for a message that matches a
    regex or whose JSON value at ``path`` compares as asked."""

    send: Optional[str] = None
    regex: str = ""
    path: str = ""
    equals: Tuple[object, ...] = ()  # empty: no equality test; else the one value to equal
    at_least: Optional[float] = None
    at_most: Optional[float] = None


class Module(NamedTuple):
    """What a probe does and with which settings."""

    name: str
    timeout: Optional[float] = None  # seconds; None: the --timeout flag
    headers: Tuple[Tuple[str, str], ...] = ()
    subprotocols: Tuple[str, ...] = ()
    preset: str = "connect"  # the checks run after the upgrade: a key of PRESETS
    origin: str = ""
    tls: TLSOptions = TLSOptions()
    tls_context: Optional[ssl.SSLContext] = None  # built from ``tls`` when the config loads
    ip_protocol: str = ""  # "ip4" or "ip6": that family first; "" keeps the resolver's order
    ip_protocol_fallback: bool = True  # with ip_protocol: may the other family be used?
    proxy_url: str = ""  # http://[user:pass@]host:port, reached with HTTP CONNECT
    expect_chain_id: Optional[int] = None
    max_head_age: Optional[float] = None  # seconds
    min_notifications: int = 1
    steps: Tuple[Step, ...] = ()
    min_peers: Optional[int] = None
    max_finality_lag: Optional[int] = None  # blocks
    expect_genesis_hash: str = ""
    expect_network: str = ""
    hold: Optional[float] = None  # seconds a subscription is kept open
    max_gap: Optional[float] = None  # seconds of silence a held subscription may have

    def settings(self) -> Dict[str, object]:
        """The module as shown on the debug page: every field but the TLS context built from
        ``tls``, those that may carry secrets redacted (MODULE_FIELDS_SHOWN)."""
        fields = self._asdict()
        del fields["tls_context"]
        return {key: MODULE_FIELDS_SHOWN[key](value) if key in MODULE_FIELDS_SHOWN else value for key, value in fields.items()}

    def runs_checks(self) -> bool:
        return self.preset != "connect" or bool(self.steps)


def redact_proxy_url(url: str) -> str:
    """scheme://host:port of a proxy URL: its credentials never show."""
    if not url:
        return ""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return "%s://%s:%s" % (parts.scheme, bracketed(host), parts.port or HTTP_PORT)


def step_settings(step: Step) -> Dict[str, object]:
    """A step for the debug page; sent text may carry keys, so only its length shows."""
    if step.send is not None:
        return {"send": "<%d characters>" % len(step.send)}
    shown: Dict[str, object] = {"regex": step.regex} if step.regex else {"path": step.path}
    if step.equals:
        shown["equals"] = step.equals[0]
    shown.update((k, v) for k, v in (("at_least", step.at_least), ("at_most", step.at_most)) if v is not None)
    return {"expect": shown}


# How the debug page shows the Module fields that need more than their value.
MODULE_FIELDS_SHOWN: Dict[str, Callable[[Any], object]] = {
    "headers": lambda headers: {name: "<redacted>" for name, _ in headers},
    "subprotocols": list,
    "tls": TLSOptions._asdict,
    "proxy_url": redact_proxy_url,
    "steps": lambda steps: [step_settings(step) for step in steps],
}


class TargetPolicy(NamedTuple):
    """Which targets probes may reach.  The default allows every target, as the original did."""

    allow_hosts: Tuple[str, ...] = ()  # shell-style patterns on the host; empty: any host
    deny_private: bool = False  # refuse names that resolve to loopback, private or local space

    def check_host(self, host: str) -> None:
        if self.allow_hosts and not any(fnmatch.fnmatchcase(host, p.lower()) for p in self.allow_hosts):
            raise ProbeError("blocked_target", "host not matched by --probe.allow-target", "target")

    def check_addresses(self, addresses: List["AddrInfo"]) -> None:
        """Checked on the resolved addresses, so a public name pointing inside is refused too."""
        if self.deny_private and any(not is_public_address(str(sockaddr[0])) for _, sockaddr in addresses):
            raise ProbeError("blocked_target", "resolves to a non-public address", "resolve")


_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: embeds an IPv4 address


def is_public_address(text: str) -> bool:
    """False for loopback, RFC 1918, link-local (169.254.169.254 included), unique-local,
    shared, reserved and multicast space, also when an IPv4 address hides inside IPv6."""
    address = ipaddress.ip_address(text.partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(str(embedded))
    return address.is_global and not address.is_multicast


class Deadline:
    """One deadline for a whole probe, counted from ``start`` (a time.monotonic() value; by
    default now)."""

    def __init__(self, seconds: float, start: Optional[float] = None) -> None:
        self.seconds = seconds
        self.expires = (time.monotonic() if start is None else start) + seconds

    def remaining(self) -> float:
        """Seconds left; raises ProbeError(timeout) once none are."""
        left = self.expires - time.monotonic()
        if left <= 0:
            raise ProbeError("timeout", "probe deadline of %.3gs passed" % self.seconds)
        return left


class ProbeLog:
    """The log lines of one probe: kept for its debug page, written to the exporter's log.
    Lines are formatted only when read, since few probes ever have their debug page asked for.
    ``secrets_of`` is the raw URL probed, kept only to scrub its secrets out of text (``scrub``)."""

    def __init__(self, logger: "Logger", secrets_of: str = "", **fields: object) -> None:
        self.logger = logger
        self._target = secrets_of
        self.fields = fields
        # (time, level, msg, the line's own fields): the probe's fields are added when formatted
        self._records: List[Tuple[float, str, str, Dict[str, object]]] = []

    def log(self, level: str, msg: str, **fields: object) -> None:
        self._records.append((time.time(), level, msg, fields))
        if self.logger.enabled(level):
            self.logger.log(level, msg, **dict(self.fields, **fields))

    @property
    def lines(self) -> List[str]:
        return [format_logfmt(level, msg, dict(self.fields, **fields), when) for when, level, msg, fields in self._records]

    def scrub(self, text: str) -> str:
        """``text`` (say, a server's error message) without the target's secret parts: a node
        may quote the key it refuses."""
        for secret in secret_parts(self._target):
            text = text.replace(secret, "<redacted>")
        return text


@functools.lru_cache(maxsize=1024)
def secret_parts(raw: str) -> Tuple[str, ...]:
    """The pieces of a target URL that may be keys (user info, path segments, query names and
    values, as written and decoded), longest first."""
    try:
        parts = urllib.parse.urlsplit(raw)
    except ValueError:
        return (raw,)
    text = "%s/%s?%s" % (parts.netloc.rpartition("@")[0], parts.path, parts.query)
    pieces = {p for piece in re.split(r"[/?&=@:;,]", text) for p in (piece, urllib.parse.unquote(piece))}
    return tuple(sorted((p for p in pieces if len(p) >= SECRET_MIN_CHARS), key=lambda p: (-len(p), p)))


RpcCall = Tuple[str, str]  # (JSON-RPC method, the block it asked for where a check asks for several, else "")


class ProbeResult:
    """Everything one probe measured; filled during the probe, rendered once."""

    def __init__(self, module: str, timeout: float) -> None:
        self.module = module
        self.timeout = timeout
        self.phase = "target"  # the phase running now; a failure is charged to it
        self.durations: Dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.connected = False
        self.status_code = 0
        self.close_code = 0
        self.ip_protocol = 0
        self.tls_version = ""
        self.tls_cipher = ""
        self.cert_expiry: Optional[float] = None
        self.failure: Optional[Tuple[str, str]] = None  # (phase, reason)
        self.total = 0.0
        # What the module's checks measured; None or empty when it did not get that far.
        self.ping_rtt: Optional[float] = None
        self.rpc_durations: Dict[RpcCall, float] = {}
        self.rpc_error_codes: Dict[RpcCall, int] = {}
        self.notifications: Optional[int] = None
        self.first_notification: Optional[float] = None  # seconds from subscribing
        self.chain_id: Optional[int] = None
        self.head_number: Optional[int] = None
        self.head_timestamp: Optional[float] = None
        self.head_age: Optional[float] = None
        self.node_syncing: Optional[int] = None
        self.node_peers: Optional[int] = None
        self.node_info: Optional[Tuple[str, str]] = None  # (client, version)
        self.genesis = ""
        self.network = ""  # CometBFT's chain id, a name
        self.behind_slots: Optional[int] = None
        self.finalized_head: Optional[int] = None
        self.max_gap: Optional[float] = None  # the longest silence of a held subscription
        self.head_regressions: Optional[int] = None
        self.head_skips: Optional[int] = None

    @property
    def success(self) -> bool:
        return self.failure is None and self.connected

    def connection_duration(self) -> float:
        if not self.connected:
            return 0.0
        return sum(self.durations[p] for p in ("resolve", "connect", "tls", "upgrade"))


class _Phase:
    """Times one phase into the result and charges failures raised inside it to that phase.
    A block may set ``start`` and ``end`` to the moments its I/O really began and ended."""

    def __init__(self, result: ProbeResult, name: str) -> None:
        self.result = result
        self.name = name
        self.start = 0.0
        self.end: Optional[float] = None

    def __enter__(self) -> "_Phase":
        self.result.phase = self.name
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        end = time.perf_counter() if self.end is None else self.end
        self.result.durations[self.name] = max(end - self.start, 0.0)


class Connection:
    """An open socket with the frame reader that decodes what arrives on it; every send and
    receive ends by the probe's deadline.

    The socket blocks, with the time left set as the kernel's SO_RCVTIMEO or SO_SNDTIMEO before
    each call (a setsockopt keeps the interpreter lock, where settimeout's ioctl or a poll()
    would hand it to another thread): a read is one recvmsg, which also brings the kernel's
    arrival stamp.  TLS (``start_tls``) runs through memory buffers: OpenSSL never touches the
    socket, so TLS reads keep their stamps too, and the client's last handshake message leaves
    with the first request."""

    def __init__(self, sock: socket.socket, deadline: Deadline) -> None:
        self.sock = sock
        self.deadline = deadline
        self.reader = FrameReader()
        self.send_started = 0.0  # perf_counter() just before the last send went to the kernel
        self.arrived = 0.0  # perf_counter() when the bytes last received reached this host
        self.tls: Optional[ssl.SSLObject] = None
        self._incoming = ssl.MemoryBIO()  # TLS records received, for OpenSSL to decrypt
        self._outgoing = ssl.MemoryBIO()  # TLS records OpenSSL wrote, to send

    def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """The TLS handshake, with SNI and the context's certificate checks, within the deadline."""
        tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send(self._outgoing.read())
                if not self._feed_tls(self.deadline.remaining()):  # the server closed:
                    self._incoming.write_eof()  # do_handshake raises SSLEOFError next
        self.tls = tls

    def send(self, data: bytes) -> None:
        """All of ``data`` within the deadline, however slowly the peer reads."""
        if self.tls is not None:
            self.tls.write(data)
            data = self._outgoing.read()
        self.send_started = time.perf_counter()  # after encrypting, which may wait for the interpreter
        self._send(data)

    def receive(self, limit: Optional[float] = None) -> bytes:
        """Bytes from the peer within the deadline (and ``limit`` seconds when given)."""
        timeout = self.deadline.remaining()
        timeout = timeout if limit is None else min(timeout, limit)
        data = self._receive(timeout) if self.tls is None else self._receive_tls(time.monotonic() + timeout)
        if not data:
            raise ProbeError("connection_closed", "peer closed the connection")
        return data

    def _receive_tls(self, until: float) -> bytes:
        assert self.tls is not None
        while True:
            try:
                view = _THREAD.buffer  # what OpenSSL holds decrypted, or can decrypt
                count: int = self.tls.read(RECV_BYTES, view)  # type: ignore[assignment]  # a count, given a buffer
                return bytes(view[:count])
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                return b""
            if self._outgoing.pending:  # a handshake message still to go (TLS 1.3's Finished)
                self._send(self._outgoing.read())
            if not self._feed_tls(until - time.monotonic()):
                return b""

    def _send(self, data: bytes) -> None:
        send_within(self.sock, data, self.deadline.remaining())

    def _receive(self, timeout: float) -> bytes:
        """One read of what has arrived (b"" at the end of the stream); sets ``arrived``."""
        return bytes(_THREAD.buffer[: self._read(timeout)])

    def _feed_tls(self, timeout: float) -> int:
        """One read of TLS records straight into OpenSSL's buffer; 0 at the end of the stream."""
        count = self._read(timeout)
        if count:
            self._incoming.write(_THREAD.buffer[:count])
        return count

    def _read(self, timeout: float) -> int:
        """One read into the thread's buffer: how many bytes arrived (0 at the end of the
        stream); sets ``arrived``."""
        kernel_timeout(self.sock, socket.SO_RCVTIMEO, timeout)
        try:
            if not SO_TIMESTAMPNS:
                count = self.sock.recv_into(_THREAD.buffer)
                self.arrived = time.perf_counter()
                return count
            count, ancillary, _, _ = self.sock.recvmsg_into((_THREAD.buffer,), _ANCILLARY_BYTES)
        except BlockingIOError:  # SO_RCVTIMEO ran out
            raise socket.timeout("timed out")
        self.arrived = arrival_time(ancillary)
        return count


class _ThreadBuffer(threading.local):
    """Each thread's receive buffer, made once and read into by every probe the thread runs.

    A ``recv(n)`` makes a bytes object of n bytes and shrinks it to what arrived: with n = 64 KiB
    each read took a block of malloc's arena of this thread and freed most of it again.  Blocks
    cut that way, across a handler thread per scraper connection, left the arenas' free space
    in pieces too small for the next one, and the exporter's memory grew for hours: under 200
    scrapers (bench/arenas.py) the threads' arenas grew by 5.7 and then 3.6 MB a minute of load,
    against 0.4 and 0.3 MB reading into this buffer (docs/internals.md, "Memory").  A read now
    allocates only the bytes it returns, mostly few enough for Python's small-object allocator."""

    def __init__(self) -> None:
        self.buffer = memoryview(bytearray(RECV_BYTES))


_THREAD = _ThreadBuffer()


READABLE = select.POLLIN
WRITABLE = select.POLLOUT
_TIMEVAL = struct.Struct("@ll")  # struct timeval {time_t tv_sec; suseconds_t tv_usec;}


def kernel_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    """SO_RCVTIMEO or SO_SNDTIMEO: the kernel ends the next blocking read or write (connect too)
    of ``sock`` after ``seconds``; socket.timeout when none are left."""
    if seconds <= 0:
        raise socket.timeout("timed out")
    micro = max(int(seconds * 1e6), 1)  # zero would mean no limit
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(*divmod(micro, 1000000)))


def wait_ready(sock: socket.socket, events: int, seconds: float) -> None:
    """Until the non-blocking ``sock`` is ready for ``events`` (READABLE or WRITABLE); socket.timeout
    after ``seconds``.  An error or hang-up ends the wait too: the read or write that follows
    reports it."""
    if seconds <= 0:
        raise socket.timeout("timed out")
    poller = select.poll()
    poller.register(sock, events)
    if not poller.poll(seconds * 1000):
        raise socket.timeout("timed out")


def send_within(sock: socket.socket, data: bytes, seconds: float) -> None:
    """All of ``data`` on ``sock`` within ``seconds``, however slowly the peer reads (socket.timeout
    after): a blocking socket under SO_SNDTIMEO, a non-blocking one waiting in poll() for room."""
    view, end = memoryview(data), time.monotonic() + seconds
    blocking = sock.gettimeout() is None
    while view:
        try:
            if blocking:
                kernel_timeout(sock, socket.SO_SNDTIMEO, end - time.monotonic())
            view = view[sock.send(view) :]
        except (BlockingIOError, ssl.SSLWantWriteError):  # the send buffer is full: wait for room
            wait_ready(sock, WRITABLE, end - time.monotonic())


_ANCILLARY_BYTES = socket.CMSG_SPACE(_TIMESPEC.size) if SO_TIMESTAMPNS else 0


def arrival_time(ancillary: List[Tuple[int, int, bytes]]) -> float:
    """The perf_counter() reading at which the kernel stamped the data just received (a wall
    clock time), or now when it carries no stamp."""
    now = time.perf_counter()
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(payload)
            waited = time.time() - (seconds + nanoseconds * 1e-9)  # type: float
            if 0.0 <= waited < CLOCK_STEP_SECONDS:  # otherwise the wall clock was stepped meanwhile
                return now - waited
    return now


def enable_arrival_stamps(sock: socket.socket) -> None:
    """Ask the kernel to stamp what it receives, where it can; without stamps a phase ends when
    its thread got to read the answer."""
    if SO_TIMESTAMPNS:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:
            pass


def run_probe(
    raw_target: str,
    module: Module,
    deadline: Deadline,
    result: ProbeResult,
    log: ProbeLog,
    policy: TargetPolicy = TargetPolicy(),
) -> None:
    """Probe ``raw_target`` with ``module``, recording into ``result``.  Never raises: every
    failure ends up as ``result.failure``."""
    start = time.perf_counter()
    sock: Optional[socket.socket] = None
    try:
        target = parse_target(raw_target)
        policy.check_host(target.host)
        conn = open_websocket(target, module, deadline, result, log, policy)
        sock = conn.sock
        if module.runs_checks():
            run_checks(conn, module, result, log)
        close_websocket(conn, result, log)
    except Exception as err:  # whatever it was, a failed probe, never a 500
        _record_failure(result, as_probe_error(err, result, log), log)
        forget_frames(err)
    finally:
        if sock is not None:
            sock.close()
        result.total = time.perf_counter() - start


def forget_frames(err: Optional[BaseException]) -> None:
    """Clear the variables of the finished frames an exception's traceback holds, and those of
    the exceptions it was raised while handling.  A frame that raises from an ``except ... as e``
    block, or keeps an exception in a variable, holds the exception whose traceback holds the
    frame: a cycle that only the garbage collector frees, and with it the probe's connection,
    buffers and session.  A failed probe made one every time; cleared, its objects go at once."""
    while err is not None:
        trace = err.__traceback__
        while trace is not None:
            with contextlib.suppress(RuntimeError):  # a frame still running: run_probe's own
                trace.tb_frame.clear()
            trace = trace.tb_next
        err = err.__context__


def _record_failure(result: ProbeResult, err: ProbeError, log: ProbeLog) -> None:
    phase = err.phase or result.phase
    result.failure = (phase, err.reason)
    log.log("info", "Probe failed", phase=phase, reason=err.reason, detail=log.scrub(err.detail))


def as_probe_error(err: Exception, result: ProbeResult, log: ProbeLog) -> ProbeError:
    """The failure an exception means: a socket's by its kind; any other but a ProbeError is a
    bug, but for a name that idna or ssl refuse while connecting."""
    if isinstance(err, ProbeError):
        return err
    if isinstance(err, socket.timeout):
        return ProbeError("timeout", "timed out")
    if isinstance(err, ssl.SSLCertVerificationError):
        return ProbeError("tls_verify", err.verify_message or str(err), "tls")
    if isinstance(err, ssl.SSLError):
        return ProbeError("tls_error", err.reason or str(err), "tls")
    if isinstance(err, ConnectionRefusedError):
        return ProbeError("connect_refused", "connection refused")
    if isinstance(err, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return ProbeError("connection_closed", "connection reset by peer")
    if isinstance(err, OSError) or (isinstance(err, ValueError) and result.phase in CONNECTING_PHASES):
        return ProbeError("connect_error", str(err) or type(err).__name__)  # idna or ssl refusing a name
    log.log("debug", "Probe raised an unexpected exception", traceback=log.scrub(format_exception()))
    return ProbeError("internal_error", type(err).__name__)


def open_websocket(
    target: Target,
    module: Module,
    deadline: Deadline,
    result: ProbeResult,
    log: ProbeLog,
    policy: TargetPolicy = TargetPolicy(),
) -> Connection:
    """Resolve, connect, negotiate TLS and upgrade; return the open WebSocket."""
    log.log("debug", "Beginning probe", timeout=deadline.seconds)
    proxy = proxy_for(target, module)
    host, port = (proxy.hostname or "", proxy.port or HTTP_PORT) if proxy else (target.host, target.port)
    with _Phase(result, "resolve"):
        addresses = by_family(resolve(host, port, deadline), module)
        if proxy is None:
            policy.check_addresses(addresses)
        elif policy.deny_private:
            # The proxy resolves the target itself: check what the name means from here.
            policy.check_addresses(resolve(target.host, target.port, deadline))
    log.log("debug", "Resolved", addresses=len(addresses))
    if proxy:
        log.log("debug", "Connecting through a proxy", proxy=redact_proxy_url(proxy.geturl()))
    with _Phase(result, "connect"):
        sock = connect(addresses, deadline, result)
        if proxy:
            tunnel(sock, target, proxy, deadline)
    conn = Connection(sock, deadline)
    try:
        log.log("debug", "Connected", ip_protocol=result.ip_protocol)
        if target.secure:
            with _Phase(result, "tls") as phase:
                negotiate_tls(conn, target.host, result, module.tls_context, module.tls.server_name)
                phase.end = conn.arrived  # when the server's last handshake message reached this host
            log.log("debug", "TLS established", version=result.tls_version, cipher=result.tls_cipher)
        with _Phase(result, "upgrade") as phase:
            upgrade(conn, target, module, result)
            # The span the server and the network took, not the moments this thread held the GIL.
            phase.start, phase.end = conn.send_started, conn.arrived
    except BaseException:
        sock.close()
        raise
    result.connected = True
    log.log("debug", "Upgrade accepted", status=result.status_code)
    return conn


AddrInfo = Tuple[int, Tuple[object, ...]]  # (family, sockaddr)


def resolve(host: str, port: int, deadline: Deadline) -> List[AddrInfo]:
    """getaddrinfo under the deadline: it has no timeout of its own, so a name (not an IP
    literal) is looked up by a resolver thread that the probe stops waiting for."""
    try:
        return list(_literal_addresses(host, port))
    except ValueError:
        pass
    lookup = _RESOLVER.submit(host, port)
    if not lookup.done.acquire(timeout=deadline.remaining()):
        lookup.abandoned = True
        raise ProbeError("timeout", "name resolution did not finish before the deadline")
    if isinstance(lookup.outcome, socket.gaierror):
        raise ProbeError("dns_error", lookup.outcome.strerror or str(lookup.outcome))
    if isinstance(lookup.outcome, BaseException):
        raise lookup.outcome
    return lookup.outcome


class Lookup:
    """One name to resolve; ``done`` is released when ``outcome`` is set."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.done = threading.Lock()
        self.done.acquire()
        self.outcome: Union[List[AddrInfo], BaseException] = []
        self.abandoned = False  # the probe stopped waiting: a lookup not begun yet is skipped


class Resolver:
    """Threads that run getaddrinfo and stay for the next lookup, so that a lookup costs a
    hand-off rather than a thread.  One starts when every one is busy, up to
    MAX_RESOLVER_THREADS: a hung resolver cannot pile up threads, and lookups past that wait
    (under their probes' deadlines) for a thread to come free."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: Deque[Lookup] = collections.deque()
        self._ready = threading.Condition(self._lock)
        self.threads = 0
        self.busy = 0  # lookups submitted and not finished

    def submit(self, host: str, port: int) -> Lookup:
        lookup = Lookup(host, port)
        with self._lock:
            if self.busy >= self.threads and self.threads < MAX_RESOLVER_THREADS:
                threading.Thread(target=self._serve, name="resolve", daemon=True).start()  # RuntimeError: none
                self.threads += 1
            self.busy += 1
            self._queue.append(lookup)
            self._ready.notify()
        return lookup

    def _serve(self) -> None:
        block_signals()
        while True:
            with self._lock:
                while not self._queue:
                    self._ready.wait()
                lookup = self._queue.popleft()
            try:
                if not lookup.abandoned:
                    lookup.outcome = _getaddrinfo(lookup.host, lookup.port, 0)
            except BaseException as err:
                lookup.outcome = err
            finally:
                with self._lock:
                    self.busy -= 1
                lookup.done.release()


_RESOLVER = Resolver()


def block_signals() -> None:
    """Leave the stop and reload signals to the main thread, which waits for them: caught by
    this thread, one would interrupt a blocking call (EINTR), and CPython would begin its wait
    again, a blocking connect's without a limit."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)


def proxy_for(target: Target, module: Module) -> Optional[urllib.parse.SplitResult]:
    """The module's proxy_url, else https_proxy (wss) or http_proxy (ws) from the environment
    unless no_proxy names the host; None for a direct connection."""
    url = module.proxy_url or environment("https_proxy" if target.secure else "http_proxy")
    if not url or (not module.proxy_url and bypasses_proxy(target.host)):
        return None
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # a bad port raises ValueError here rather than later, with its text
        if parts.scheme == "http" and parts.hostname:
            return parts
    except ValueError:
        pass
    raise ProbeError("connect_error", "unsupported proxy URL", "connect")


def environment(name: str) -> str:
    """A proxy variable: the lower-case spelling wins, as in curl and urllib."""
    return os.environ.get(name) or os.environ.get(name.upper()) or ""


def bypasses_proxy(host: str) -> bool:
    """no_proxy: "*", or comma-separated names that match the host or a domain above it."""
    for entry in environment("no_proxy").split(","):
        name = entry.strip().lstrip(".").lower()
        if name == "*" or (name and (host == name or host.endswith("." + name))):
            return True
    return False


def tunnel(sock: socket.socket, target: Target, proxy: urllib.parse.SplitResult, deadline: Deadline) -> None:
    """RFC 9110 §9.3.6: ask an HTTP proxy to CONNECT to the target; the socket is closed on failure."""
    headers = [("Host", target.host_port), ("User-Agent", USER_AGENT)]
    if proxy.username:
        credentials = "%s:%s" % (urllib.parse.unquote(proxy.username), urllib.parse.unquote(proxy.password or ""))
        headers.append(("Proxy-Authorization", "Basic " + base64.b64encode(credentials.encode("utf-8")).decode("ascii")))
    try:
        conn = Connection(sock, deadline)
        conn.send(http_head("CONNECT %s HTTP/1.1" % target.host_port, headers))
        response = read_response_head(conn)
    except HandshakeError as err:
        sock.close()
        raise ProbeError("connect_error", "proxy: %s" % err.detail, "connect")
    except BaseException:
        sock.close()
        raise
    if response.status != 200 or response.rest:
        sock.close()
        raise ProbeError("connect_error", "proxy answered CONNECT with status %d" % response.status, "connect")


def by_family(addresses: List[AddrInfo], module: Module) -> List[AddrInfo]:
    """The addresses of the module's ip_protocol first, the others only with the fallback on."""
    if not module.ip_protocol:
        return addresses
    wanted = socket.AF_INET6 if module.ip_protocol == "ip6" else socket.AF_INET
    preferred = [a for a in addresses if a[0] == wanted]
    others = [a for a in addresses if a[0] != wanted] if module.ip_protocol_fallback else []
    if not preferred and not others:
        raise ProbeError("dns_error", "no %s address" % module.ip_protocol, "resolve")
    return preferred + others


@functools.lru_cache(maxsize=1024)  # a fleet's targets are probed again and again
def _literal_addresses(host: str, port: int) -> Tuple[AddrInfo, ...]:
    """The address of an IP literal, without a lookup; ValueError for a name."""
    ipaddress.ip_address(host)
    return tuple(_getaddrinfo(host, port, socket.AI_NUMERICHOST))


def _getaddrinfo(host: str, port: int, flags: int) -> List[AddrInfo]:
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP, flags)
    if not infos:
        raise socket.gaierror(socket.EAI_NONAME, "no addresses")
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def connect(addresses: List[AddrInfo], deadline: Deadline, result: ProbeResult) -> socket.socket:
    """Try each address in turn within the deadline; the first that connects wins, as a blocking
    socket (see Connection)."""
    last: Optional[Exception] = None
    for family, sockaddr in addresses:
        result.ip_protocol = 6 if family == socket.AF_INET6 else 4
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            connect_within(sock, sockaddr, deadline)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            enable_arrival_stamps(sock)
            return sock
        except (OSError, ProbeError) as err:
            sock.close()
            last = err
            if isinstance(err, (socket.timeout, ProbeError)):
                break
    assert last is not None
    raise last


def connect_within(sock: socket.socket, sockaddr: Tuple[object, ...], deadline: Deadline) -> None:
    """A blocking connect that the kernel ends at the deadline (SO_SNDTIMEO bounds connect too,
    which then answers EINPROGRESS).  Raises what a connect would (ConnectionRefusedError and
    the like; socket.timeout)."""
    kernel_timeout(sock, socket.SO_SNDTIMEO, deadline.remaining())
    err = sock.connect_ex(sockaddr)
    if err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
        raise socket.timeout("timed out")
    if err:
        raise OSError(err, os.strerror(err))


_TLS_CONTEXT: Optional[ssl.SSLContext] = None
_TLS_CONTEXT_LOCK = threading.Lock()


def default_tls_context() -> ssl.SSLContext:
    """One client context for all probes: the system trust store (OpenSSL's default paths
    honour SSL_CERT_FILE and SSL_CERT_DIR), hostname checks on."""
    global _TLS_CONTEXT
    with _TLS_CONTEXT_LOCK:
        if _TLS_CONTEXT is None:
            _TLS_CONTEXT = ssl.create_default_context()
        return _TLS_CONTEXT


def negotiate_tls(
    conn: Connection,
    host: str,
    result: ProbeResult,
    context: Optional[ssl.SSLContext] = None,
    server_name: str = "",
) -> None:
    """TLS on ``conn`` with SNI and certificate verification, within its deadline; ``context``
    and ``server_name`` come from a module's tls settings."""
    conn.start_tls(context or default_tls_context(), server_name or host)
    assert conn.tls is not None
    result.tls_version = (conn.tls.version() or "").replace("TLSv", "TLS ")
    cipher = conn.tls.cipher()
    result.tls_cipher = cipher[0] if cipher else ""
    result.cert_expiry = certificate_expiry(conn.tls)


_EXPIRIES: "collections.OrderedDict[bytes, Optional[float]]" = collections.OrderedDict()
_EXPIRIES_LOCK = threading.Lock()
MAX_CACHED_CERTIFICATES = 1024


def certificate_expiry(tls: ssl.SSLObject) -> Optional[float]:
    """The peer certificate's notAfter in unix seconds.  Decoding a certificate into a dict and
    parsing its date with strptime cost more than the rest of a TLS probe's Python work, and a
    fleet's servers show the same certificates again and again: they are remembered by their
    DER bytes."""
    der = tls.getpeercert(binary_form=True)
    if not der:
        return None
    with _EXPIRIES_LOCK:
        if der in _EXPIRIES:
            _EXPIRIES.move_to_end(der)
            return _EXPIRIES[der]
    cert = tls.getpeercert()
    not_after = cert.get("notAfter") if cert else None
    expiry = float(ssl.cert_time_to_seconds(not_after)) if isinstance(not_after, str) else None
    with _EXPIRIES_LOCK:
        _EXPIRIES[der] = expiry
        if len(_EXPIRIES) > MAX_CACHED_CERTIFICATES:
            _EXPIRIES.popitem(last=False)
    return expiry


def upgrade(conn: Connection, target: Target, module: Module, result: ProbeResult) -> None:
    """RFC 6455 §4.1: send the opening handshake and validate the answer."""
    key = new_key()
    conn.send(build_upgrade_request(target.host_header(), target.resource, key, upgrade_headers(target, module)))
    try:
        response = read_response_head(conn)
    except ProbeError as err:
        if err.reason == "connection_closed":
            raise HandshakeError("connection_closed", "connection closed before the upgrade response")
        raise
    result.status_code = response.status
    validate_handshake(response, key, module.subprotocols)
    conn.reader.feed(response.rest)


def read_response_head(conn: Connection) -> HandshakeResponse:
    """An HTTP response head from the peer (a proxy or the WebSocket server), within the deadline."""
    parser = ResponseParser()
    while True:
        response = parser.feed(conn.receive())
        if response is not None:
            return response


def upgrade_headers(target: Target, module: Module) -> List[Tuple[str, str]]:
    headers = list(module.headers)
    if module.origin:
        headers.append(("Origin", module.origin))
    if module.subprotocols:
        headers.append(("Sec-WebSocket-Protocol", ", ".join(module.subprotocols)))
    if target.userinfo:
        token = base64.b64encode(target.userinfo.encode("utf-8")).decode("ascii")
        headers.append(("Authorization", "Basic " + token))
    return headers


def close_websocket(conn: Connection, result: ProbeResult, log: ProbeLog) -> None:
    """RFC 6455 §7.1.2: send close 1000 and wait a while for the server's close.  A server
    that never answers leaves close code 0 but does not fail the probe; a protocol error does."""
    with _Phase(result, "close"):
        conn.send(encode_close(CloseCode.NORMAL))
        try:
            close = wait_for_close(conn)
        except ProbeError as err:
            if err.reason not in ("timeout", "connection_closed"):
                raise
            log.log("debug", "Server did not answer the close", reason=err.reason)
            return
        except (socket.timeout, ConnectionError) as err:
            log.log("debug", "Server did not answer the close", reason=type(err).__name__)
            return
    result.close_code = close.code
    log.log("debug", "Close answered", close_code=close.code)
    if close.code in RATE_LIMIT_CLOSE_CODES:
        raise ProbeError("rate_limited", "server closed with code %d" % close.code, "close")
    if conn.tls is not None:
        tls_closed(conn)


def tls_closed(conn: Connection) -> None:
    """RFC 6455 §7.1.1: after the closing handshake the server closes first, over TLS with a
    close_notify alert (RFC 8446 §6.1).  It is read before the socket closes, briefly: a socket
    closed with data unread ends in a reset, not a FIN."""
    limit = time.monotonic() + TLS_CLOSE_WAIT_SECONDS
    with contextlib.suppress(ProbeError, OSError):
        while True:  # until "connection_closed", or the time is up
            conn.receive(max(limit - time.monotonic(), 0.0))


def wait_for_close(conn: Connection) -> Close:
    limit = time.monotonic() + CLOSE_WAIT_SECONDS
    frames = 0
    while conn.reader.closed is None:
        left = limit - time.monotonic()
        if left <= 0:
            raise ProbeError("timeout", "no close frame within %gs" % CLOSE_WAIT_SECONDS)
        frames += len(conn.reader.feed(conn.receive(left)))
        if frames > MAX_CLOSE_FRAMES:
            raise FrameError("more than %d frames after our close" % MAX_CLOSE_FRAMES)
    return conn.reader.closed


# ==============================================================================================
# Checks (modules)
# ==============================================================================================


class Head(NamedTuple):
    """The newest block (or slot) a node reported, and its time when the chain gives one."""

    number: Optional[int]
    timestamp: Optional[float]  # unix seconds


JsonObject = Dict[str, object]
Expiry = Callable[[], CheckError]


class RpcSession:
    """JSON-RPC 2.0 over an open WebSocket: requests with increasing ids, answers matched by id,
    server pings answered (RFC 6455 §5.5.2), and subscription events set aside as they arrive,
    even before the answer to the subscribe request."""

    def __init__(self, conn: Connection, result: ProbeResult, log: ProbeLog, until: float) -> None:
        self.conn = conn
        self.result = result
        self.log = log
        self.until = until  # time.monotonic() by which the check must end
        self.events: Deque[Event] = collections.deque()
        self.messages = 0
        self.next_id = 0
        self.is_event: Callable[[JsonObject], Optional[object]] = lambda message: None
        # (perf_counter() when it reached this host, payload): see Connection.arrived
        self.notifications: List[Tuple[float, object]] = []
        self.last_error: object = None  # the error object of the last error answer

    def next_event(self, expired: Expiry) -> Union[Message, Pong]:
        """The next message or pong; raises ``expired()`` when the check's time runs out."""
        while True:
            while self.events:
                event = self.events.popleft()
                if isinstance(event, Ping):
                    self.conn.send(encode_pong(event))
                elif isinstance(event, Close):
                    reason = "rate_limited" if event.code in RATE_LIMIT_CLOSE_CODES else "connection_closed"
                    raise CheckError(reason, "server closed the connection (code %d)" % event.code)
                else:
                    self.messages += 1
                    if self.messages > MAX_CHECK_MESSAGES:
                        raise CheckError("expectation_failed", "more than %d messages during the check" % MAX_CHECK_MESSAGES)
                    return event
            left = self.until - time.monotonic()
            if left <= 0:
                raise expired()
            try:
                self.events.extend(self.conn.reader.feed(self.conn.receive(left)))
            except socket.timeout:
                continue

    def receive(self, expired: Expiry) -> Optional[JsonObject]:
        """The next JSON message; None for a pong or a subscription event (set aside)."""
        event = self.next_event(expired)
        if not isinstance(event, Message):
            return None
        message = parse_json_object(event.data)
        payload = self.is_event(message)
        if payload is None:
            return message
        self.notifications.append((self.conn.arrived, payload))
        return None

    def send_text(self, text: str) -> None:
        self.conn.send(encode_frame(Opcode.TEXT, text.encode("utf-8")))

    def call(self, method: str, params: object, not_served: str = "method_not_found", block: str = "") -> object:
        """Send a request and return its result; an error answer, or an error without an id
        (JSON-RPC 2.0 §5: the server could not tell which request failed), raises (see
        rpc_failure for ``not_served``).  ``block``: see RpcCall."""
        self.next_id += 1
        request_id = self.next_id
        self.send_text(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}))
        # From the send to the answer's arrival (as the upgrade phase), not to when it was read.
        start = self.conn.send_started
        while True:
            message = self.receive(lambda: CheckError("no_response", "no answer to %s" % method))
            if message is None:
                continue
            answer_id = message.get("id")
            if answer_id != request_id and not (answer_id is None and "error" in message):
                continue  # an answer to nobody we know, or a notification nobody subscribed to
            seconds = self.result.rpc_durations[method, block] = max(self.conn.arrived - start, 0.0)
            if "error" in message:
                self.last_error = message["error"]
                raise rpc_failure((method, block), message["error"], self.result, not_served)
            if "result" not in message:
                raise CheckError("bad_json", "the answer to %s has neither result nor error" % method)
            self.log.log("debug", "RPC answered", seconds=round(seconds, 6), **dict(rpc_labels((method, block))))
            return message["result"]


_RATE_LIMIT_TEXT = re.compile(r"rate.?limit|too many requests", re.IGNORECASE)
_NOT_SERVED_TEXT = re.compile(r"does not exist|not supported|method not found", re.IGNORECASE)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


def rpc_failure(call: RpcCall, error: object, result: ProbeResult, not_served: str = "method_not_found") -> CheckError:
    """The failure a JSON-RPC error object stands for: rate_limited; ``not_served`` when the node
    does not serve the method (-32601, or a message saying so); else rpc_error."""
    code = error.get("code") if isinstance(error, dict) else None
    text = str(error.get("message", "")) if isinstance(error, dict) else str(error)
    if isinstance(code, int) and not isinstance(code, bool):
        result.rpc_error_codes[call] = code
    detail = "%s answered error %s: %s" % (call[0], code, _UNPRINTABLE.sub(" ", text)[:100])
    if code in RATE_LIMIT_CODES or _RATE_LIMIT_TEXT.search(text):
        return CheckError("rate_limited", detail)
    if code == METHOD_NOT_FOUND or _NOT_SERVED_TEXT.search(text):
        return CheckError(not_served, detail)
    return CheckError("rpc_error", detail)


def parse_json_object(data: bytes) -> JsonObject:
    try:
        value = json.loads(data.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is a ValueError too
        raise CheckError("bad_json", "a message that is not JSON")
    except RecursionError:
        raise CheckError("bad_json", "a JSON message nested too deeply")
    if not isinstance(value, dict):
        raise CheckError("bad_json", "a JSON message that is not an object")
    return value


def json_at(value: object, path: str) -> object:
    """The value at a dotted path ("result.number", "params.result.0"); KeyError when absent."""
    for part in path.split(".") if path else ():
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(part)
    return value


def as_number(value: object, what: str) -> int:
    """An integer as chains write them: a JSON number, "0x…" hex or a decimal string."""
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            return int(value, 16) if value[:2].lower() == "0x" else int(value)
    except ValueError:
        pass
    raise CheckError("bad_json", "%s is not an integer" % what)


def field(value: object, path: str, what: str) -> object:
    try:
        return json_at(value, path)
    except KeyError:
        raise CheckError("bad_json", "%s lacks %s" % (what, path))


_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d+)?(?:[Zz]|([+-])(\d\d):(\d\d))")


def rfc3339_seconds(text: object) -> float:
    """RFC 3339 date-time to unix seconds; CometBFT writes nanoseconds, which fromisoformat
    refuses before Python 3.11."""
    match = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise CheckError("bad_json", "block time is not an RFC 3339 date-time")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    import calendar  # only here: few modules read a timestamp, and it brings datetime and locale along

    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)) + float(match.group(7) or 0)
    if match.group(8):
        offset = int(match.group(9)) * 3600 + int(match.group(10)) * 60
        seconds -= offset if match.group(8) == "+" else -offset
    return seconds


def evm_head(block: object) -> Head:
    """An Ethereum block header (eth_getBlockByNumber, newHeads): hex number and timestamp."""
    return Head(
        as_number(field(block, "number", "block"), "block number"),
        float(as_number(field(block, "timestamp", "block"), "block timestamp")),
    )


def solana_head(slot_info: object) -> Head:
    return Head(as_number(field(slot_info, "slot", "slotNotification"), "slot"), None)


def substrate_head(header: object) -> Head:
    return Head(as_number(field(header, "number", "chain_newHead"), "block number"), None)


def cometbft_head(data: object) -> Head:
    header = field(data, "value.header", "NewBlockHeader event")
    return Head(as_number(field(header, "height", "header"), "height"), rfc3339_seconds(field(header, "time", "header")))


def hex_bytes(value: object, what: str) -> bytes:
    """Substrate's "0x…" hex encoding of SCALE bytes."""
    if isinstance(value, str) and value[:2] == "0x":
        with contextlib.suppress(ValueError):
            return bytes.fromhex(value[2:])
    raise CheckError("bad_json", "%s is not 0x-prefixed hex" % what)


def scale_compact(data: bytes) -> int:
    """The SCALE compact integer that ``data`` starts with.  The low two bits of the first byte
    give the mode: 0b00, 0b01, 0b10 hold the value shifted left by two in 1, 2 or 4 little-endian
    bytes; 0b11 is followed by (upper six bits + 4) bytes of the value itself."""
    if data and data[0] & 0b11 != 0b11:
        size = 1 << (data[0] & 0b11)
        if len(data) >= size:
            return int.from_bytes(data[:size], "little") >> 2
    elif data:
        size = (data[0] >> 2) + 4
        if len(data) > size:
            return int.from_bytes(data[1 : size + 1], "little")
    raise CheckError("bad_json", "a truncated SCALE compact integer")


def substrate_header_number(header: object) -> int:
    """The number of a SCALE-encoded header (chainHead_v1_header): the parent hash, then a Compact<u32>."""
    return scale_compact(hex_bytes(header, "header")[SUBSTRATE_HASH_BYTES:])


def substrate_timestamp(value: object) -> Optional[float]:
    """Timestamp.Now, a SCALE u64 of milliseconds, in seconds; None on a chain without pallet_timestamp."""
    if value is None:
        return None
    data = hex_bytes(value, "Timestamp.Now")
    if len(data) != 8:
        raise CheckError("bad_json", "Timestamp.Now is not a u64")
    return int.from_bytes(data, "little") / 1000


def notification_of(method: str) -> Callable[[JsonObject], Optional[object]]:
    """JSON-RPC notifications of ``method`` carry the payload in params.result."""

    def event(message: JsonObject) -> Optional[object]:
        if message.get("method") != method:
            return None
        return field(message, "params.result", method + " notification")

    return event


def cometbft_event(message: JsonObject) -> Optional[object]:
    """CometBFT sends events as answers carrying the subscribe request's id; only the content
    tells them from the (empty) acknowledgement."""
    result = message.get("result")
    if "id" not in message or not isinstance(result, dict) or "data" not in result:
        return None
    data: object = result["data"]
    return data


_FOLLOW_EVENT = notification_of("chainHead_v1_followEvent")


def follow_event(message: JsonObject) -> Optional[object]:
    """A chainHead_v1_followEvent's payload; a ``stop`` event (the node dropped the follow, as
    it may when overloaded or when the client is slow) fails the check."""
    payload = _FOLLOW_EVENT(message)
    if isinstance(payload, dict) and payload.get("event") == "stop":
        raise CheckError("subscription_stopped", "the node stopped the chainHead_v1_follow subscription")
    return payload


def no_number(event: object) -> Head:
    """chainHead events name blocks by hash only: their numbers come from chainHead_v1_header."""
    return Head(None, None)


class Subscription(NamedTuple):
    """A preset that subscribes, waits for notifications and unsubscribes, as data."""

    subscribe: str
    params: object
    unsubscribe: str
    unsubscribe_params: Callable[[object], object]  # from the subscribe answer's result
    event: Callable[[JsonObject], Optional[object]]  # a message's payload when it is an event
    head: Callable[[object], Head]
    chain_id_method: str = ""  # asked first when the chain has a numeric id
    genesis_method: str = ""  # asked first when the chain names itself by its genesis hash
    # Heads come one number apart, so a jump is a head skipped; Solana's leaders skip slots by design.
    consecutive: bool = True
    # The newest head when the notifications do not carry it: (session, subscription id, module, result).
    last_head: Optional[Callable[[RpcSession, object, Module, ProbeResult], Head]] = None


_COMETBFT_QUERY = {"query": "tm.event='NewBlockHeader'"}


def check_reserve(seconds: float) -> float:
    return min(CHECK_RESERVE_SECONDS, seconds * CHECK_RESERVE_SHARE)


def run_checks(conn: Connection, module: Module, result: ProbeResult, log: ProbeLog) -> None:
    """Run the module's checks in the check phase.  When one fails while the connection is
    still usable, the clean close runs before the failure is raised."""
    try:
        with _Phase(result, "check"):
            session = RpcSession(conn, result, log, conn.deadline.expires - check_reserve(conn.deadline.seconds))
            PRESETS[module.preset].check(session, module, result)
            run_steps(session, module.steps)
    except Exception as err:
        failure = as_probe_error(err, result, log)
        if conn.reader.closed is None and failure.reason not in _CONNECTION_LOST:
            close_after_failure(conn, result, log)
        raise ProbeError(failure.reason, failure.detail, failure.phase or "check")
    log.log("debug", "Checks passed", preset=module.preset, steps=len(module.steps))


_CONNECTION_LOST = frozenset(("connection_closed", "protocol_error", "message_too_large", "timeout"))


def close_after_failure(conn: Connection, result: ProbeResult, log: ProbeLog) -> None:
    try:
        close_websocket(conn, result, log)
    except (ProbeError, OSError) as err:
        log.log("debug", "Close after a failed check failed too", err=type(err).__name__)


def check_nothing(session: RpcSession, module: Module, result: ProbeResult) -> None:
    """connect: the upgrade was the whole check."""


def check_ping(session: RpcSession, module: Module, result: ProbeResult) -> None:
    """RFC 6455 §5.5.2-3: a ping with a random payload, answered by a pong echoing it."""
    payload = os.urandom(PING_PAYLOAD_BYTES)
    session.conn.send(encode_frame(Opcode.PING, payload))
    start = session.conn.send_started
    while True:
        event = session.next_event(lambda: CheckError("no_response", "no pong to our ping"))
        if isinstance(event, Pong) and event.payload == payload:
            result.ping_rtt = max(session.conn.arrived - start, 0.0)
            return


def check_chain_id(session: RpcSession, method: str, module: Module, result: ProbeResult) -> None:
    result.chain_id = as_number(session.call(method, []), "chain id")
    if module.expect_chain_id is not None and result.chain_id != module.expect_chain_id:
        raise CheckError("chain_id_mismatch", "chain id %d, expected %d" % (result.chain_id, module.expect_chain_id))


def record_head(head: Head, module: Module, result: ProbeResult) -> None:
    result.head_number = head.number
    if head.timestamp is None:
        return
    result.head_timestamp = head.timestamp
    result.head_age = time.time() - head.timestamp
    if module.max_head_age is not None and result.head_age > module.max_head_age:
        raise CheckError("head_too_old", "head is %.1fs old, over %gs" % (result.head_age, module.max_head_age))


def check_evm(session: RpcSession, module: Module, result: ProbeResult) -> None:
    """The chain id, then the latest block's number and time."""
    check_chain_id(session, "eth_chainId", module, result)
    record_head(evm_head(session.call("eth_getBlockByNumber", ["latest", False], block="latest")), module, result)


def check_evm_node(session: RpcSession, module: Module, result: ProbeResult) -> None:
    """Whether an EVM node is fit to serve: its chain, sync state, peers, client, genesis, and
    its latest and finalized blocks."""
    check_chain_id(session, "eth_chainId", module, result)
    result.node_syncing = int(session.call("eth_syncing", []) is not False)  # false, or its progress
    peers = optional_call(session, "net_peerCount")
    result.node_peers = None if peers is None else as_number(peers, "peer count")
    version = optional_call(session, "web3_clientVersion")
    if isinstance(version, str):
        client, _, rest = version.partition("/")
        result.node_info = (client[:MAX_INFO_CHARS], rest.partition("/")[0][:MAX_INFO_CHARS])
    genesis = field(session.call("eth_getBlockByNumber", ["0x0", False], block="genesis"), "hash", "block 0")
    result.genesis = str(genesis)[:MAX_INFO_CHARS]
    latest = evm_head(session.call("eth_getBlockByNumber", ["latest", False], block="latest"))
    finalized = evm_head(session.call("eth_getBlockByNumber", ["finalized", False], block="finalized"))
    result.finalized_head, result.head_number = finalized.number, latest.number
    judge_node(module, result)
    record_head(latest, module, result)


def optional_call(session: RpcSession, method: str) -> object:
    """A fact the node may not serve: its result, or None when it answered with an error."""
    try:
        return session.call(method, [])
    except CheckError as err:
        if err.reason not in ("rpc_error", "method_not_found", "rate_limited"):
            raise
        session.log.log("debug", "Not served", method=method, answer=session.log.scrub(err.detail))
        return None


def judge_node(module: Module, result: ProbeResult) -> None:
    """Identity, sync state, peers and finality, failing in that order (the head's age is
    record_head's)."""
    if module.expect_genesis_hash and result.genesis.lower() != module.expect_genesis_hash.lower():
        raise CheckError("wrong_chain", "genesis %s, expected %s" % (result.genesis[:20], module.expect_genesis_hash[:20]))
    if module.expect_network and result.network != module.expect_network:
        raise CheckError("wrong_chain", "network %s, expected %s" % (result.network[:40], module.expect_network[:40]))
    if result.node_syncing:
        raise CheckError("node_syncing", "the node says it is syncing")
    if module.min_peers is not None and result.node_peers is not None and result.node_peers < module.min_peers:
        raise CheckError("too_few_peers", "%d peers, fewer than %d" % (result.node_peers, module.min_peers))
    lag = (result.head_number or 0) - (result.finalized_head or 0)
    if module.max_finality_lag is not None and result.finalized_head is not None and lag > module.max_finality_lag:
        raise CheckError("finality_lag", "finalized head %d behind, over %d" % (lag, module.max_finality_lag))


def check_solana_node(session: RpcSession, module: Module, result: ProbeResult) -> None:
    """getHealth, getGenesisHash, getSlot at processed, confirmed and finalized commitment,
    getBlockTime of the confirmed slot (it answers for confirmed blocks only), getVersion."""
    try:
        session.call("getHealth", [])
    except CheckError:
        if session.result.rpc_error_codes.get(("getHealth", "")) != SOLANA_NODE_BEHIND:
            raise
        with contextlib.suppress(KeyError):  # the node need not say by how much
            result.behind_slots = as_number(json_at(session.last_error, "data.numSlotsBehind"), "numSlotsBehind")
        raise CheckError("node_unhealthy", "getHealth: behind by %s slots" % result.behind_slots)
    result.genesis = str(session.call("getGenesisHash", []))[:MAX_INFO_CHARS]
    result.head_number = as_number(session.call("getSlot", [{"commitment": "processed"}], block="processed"), "slot")
    confirmed = as_number(session.call("getSlot", [{"commitment": "confirmed"}], block="confirmed"), "slot")
    result.finalized_head = as_number(session.call("getSlot", [{"commitment": "finalized"}], block="finalized"), "slot")
    block_time = session.call("getBlockTime", [confirmed])  # null when the node has no time for it
    version = optional_call(session, "getVersion")
    if isinstance(version, dict):
        result.node_info = ("", str(version.get("solana-core", ""))[:MAX_INFO_CHARS])
    judge_node(module, result)
    seconds = None if block_time is None else float(as_number(block_time, "block time"))
    record_head(Head(result.head_number, seconds), module, result)


def check_substrate_node(session: RpcSession, module: Module, result: ProbeResult) -> None:
    """system_health, chain_getBlockHash [0], chain_getHeader, Timestamp.Now at the best block
    (state_getStorage), chain_getFinalizedHead and its header, system_version."""
    health = session.call("system_health", [])
    result.node_syncing = int(bool(field(health, "isSyncing", "system_health")))
    result.node_peers = as_number(field(health, "peers", "system_health"), "peers")
    result.genesis = str(session.call("chain_getBlockHash", [0]))[:MAX_INFO_CHARS]
    result.head_number = substrate_head(session.call("chain_getHeader", [], block="latest")).number
    block_time = substrate_timestamp(session.call("state_getStorage", [SUBSTRATE_TIMESTAMP_KEY]))
    finalized = session.call("chain_getFinalizedHead", [])
    result.finalized_head = substrate_head(session.call("chain_getHeader", [finalized], block="finalized")).number
    version = optional_call(session, "system_version")
    if isinstance(version, str):
        result.node_info = ("", version[:MAX_INFO_CHARS])
    judge_node(module, result)
    record_head(Head(result.head_number, block_time), module, result)


def check_cometbft_node(session: RpcSession, module: Module, result: ProbeResult) -> None:
    """status (network, version, sync state, latest block) and net_info (peers)."""
    status = session.call("status", {})
    result.network = str(field(status, "node_info.network", "status"))[:MAX_INFO_CHARS]
    result.node_info = ("", str(field(status, "node_info.version", "status"))[:MAX_INFO_CHARS])
    result.node_syncing = int(bool(field(status, "sync_info.catching_up", "status")))
    head = Head(as_number(field(status, "sync_info.latest_block_height", "status"), "height"),
                rfc3339_seconds(field(status, "sync_info.latest_block_time", "status")))
    result.node_peers = as_number(field(session.call("net_info", {}), "n_peers", "net_info"), "n_peers")
    result.head_number = head.number
    judge_node(module, result)
    record_head(head, module, result)


def check_subscription(session: RpcSession, module: Module, result: ProbeResult) -> None:
    """Subscribe, wait for min_notifications notifications (and, with ``hold``, keep listening
    that long), unsubscribe."""
    sub = PRESETS[module.preset].subscription
    assert sub is not None
    if sub.chain_id_method:
        check_chain_id(session, sub.chain_id_method, module, result)
    if sub.genesis_method:
        result.genesis = str(session.call(sub.genesis_method, []))[:MAX_INFO_CHARS]
    session.is_event = sub.event
    start = time.perf_counter()
    try:
        subscription = session.call(sub.subscribe, sub.params, "subscription_unsupported")
        subscribed = session.conn.arrived
        wait_for_notifications(session, module.min_notifications)
        if module.hold:
            record_hold(session, subscribed, hold_subscription(session, subscribed, module.hold), sub, result)
    finally:
        result.notifications = len(session.notifications)
        if session.notifications:
            result.first_notification = max(session.notifications[0][0] - start, 0.0)
    last_head = sub.last_head(session, subscription, module, result) if sub.last_head else sub.head(session.notifications[-1][1])
    record_head(last_head, module, result)
    if module.max_gap is not None and result.max_gap is not None and result.max_gap > module.max_gap:
        raise CheckError("subscription_stalled", "silent for %.1fs, over %gs" % (result.max_gap, module.max_gap))
    session.call(sub.unsubscribe, sub.unsubscribe_params(subscription))
    result.notifications = len(session.notifications)


def hold_subscription(session: RpcSession, subscribed: float, hold: float) -> float:
    """Notifications for ``hold`` seconds from ``subscribed`` (a perf_counter() time), cut short
    when the unsubscribe would be left less than its reserve; returns when the hold ended."""
    started = time.perf_counter()
    to_monotonic = time.monotonic() - started  # session.until is a time.monotonic()
    end = min(subscribed + hold, session.until - check_reserve(session.conn.deadline.seconds) - to_monotonic)
    done = CheckError("timeout", "the hold is over")
    kept, session.until = session.until, end + to_monotonic
    try:
        while True:
            session.receive(lambda: done)
    except CheckError as err:
        if err is not done:
            raise
    finally:
        session.until = kept
    ended = max(min(time.perf_counter(), end), started)  # waiting for min_notifications may have passed ``end``
    if end < subscribed + hold:
        session.log.log("debug", "Hold cut short by the probe deadline", held=round(ended - subscribed, 3), asked=hold)
    return ended


def record_hold(session: RpcSession, subscribed: float, ended: float, sub: "Subscription", result: ProbeResult) -> None:
    """The longest silence (from the subscribe answer, between notifications, to the end of the
    hold, on arrival stamps), how many notifications brought no newer head, and how many heads
    never came (numbers past the highest so far, less one)."""
    moments = [subscribed] + [arrived for arrived, _ in session.notifications] + [ended]
    result.max_gap = max(later - earlier for earlier, later in zip(moments, moments[1:]))
    numbers = [number for number in (sub.head(payload).number for _, payload in session.notifications) if number is not None]
    if len(numbers) < len(session.notifications):
        return  # heads named by hash only
    result.head_regressions = sum(1 for old, new in zip(numbers, numbers[1:]) if new <= old)
    if sub.consecutive:
        highest = list(itertools.accumulate(numbers, max))
        result.head_skips = sum(max(new - top - 1, 0) for top, new in zip(highest, numbers[1:]))


def followed_blocks(session: RpcSession) -> Tuple[object, object]:
    """The best and the finalized block's hashes after the follow events so far; the best is
    None until the first bestBlockChanged (which follows initialized and its newBlock events)."""
    best: object = None
    finalized: object = None
    for _, payload in session.notifications:
        event = field(payload, "event", "chainHead_v1_followEvent")
        if event in ("initialized", "finalized"):
            hashes = field(payload, "finalizedBlockHashes", "%s event" % event)
            finalized = hashes[-1] if isinstance(hashes, list) and hashes else finalized
        elif event == "bestBlockChanged":
            best = field(payload, "bestBlockHash", "bestBlockChanged event")
    return best, finalized


def followed_head(session: RpcSession, subscription: object, module: Module, result: ProbeResult) -> Head:
    """substrate_chainhead: the best and the finalized block's numbers, from their headers."""
    best, finalized = followed_blocks(session)
    while best is None:
        session.receive(lambda: CheckError("no_notification", "no bestBlockChanged event"))
        best, finalized = followed_blocks(session)
    if finalized is None:
        raise CheckError("bad_json", "a bestBlockChanged event before the initialized event")
    numbers = []
    for block, block_hash in (("latest", best), ("finalized", finalized)):
        header = session.call("chainHead_v1_header", [subscription, block_hash], block=block)
        if header is None:  # the server dropped the follow (and unpinned its blocks)
            raise CheckError("subscription_stopped", "chainHead_v1_header answered null")
        numbers.append(substrate_header_number(header))
    result.head_number, result.finalized_head = numbers
    judge_node(module, result)
    return Head(result.head_number, None)


def wait_for_notifications(session: RpcSession, count: int) -> None:
    def expired() -> CheckError:
        got = len(session.notifications)
        if not got:
            return CheckError("no_notification", "no notification before the check's time ran out")
        return CheckError("too_few_notifications", "%d of %d notifications" % (got, count))

    while len(session.notifications) < count:
        session.receive(expired)


class Preset(NamedTuple):
    """What a preset runs, what it subscribes to (check_subscription), which PRESET_KEYS it honours."""

    check: Callable[[RpcSession, Module, ProbeResult], None]
    subscription: Optional[Subscription] = None
    keys: Tuple[str, ...] = ()


_HEADS = ("expect_chain_id", "max_head_age")  # a numeric chain id and a block time: EVM's
_HELD = ("min_notifications", "hold", "max_gap")
_FINALITY = ("max_finality_lag", "expect_genesis_hash")
_AGE = ("max_head_age",)
# Module keys only some presets honour, by why a preset without them refuses them.
_REFUSALS = (
    (("expect_chain_id",), "reports no chain id"),
    (("max_head_age",), "reports no block time"),
    (_HELD, "subscribes to nothing"),
    (_FINALITY + ("min_peers", "expect_network"), "does not ask the node for it"),
)
PRESET_KEYS = {key: why for keys, why in _REFUSALS for key in keys}
PRESETS: Dict[str, Preset] = {
    "connect": Preset(check_nothing),
    "ping": Preset(check_ping),
    "evm": Preset(check_evm, keys=_HEADS),
    "evm_node": Preset(check_evm_node, keys=_HEADS + _FINALITY + ("min_peers",)),
    "solana_node": Preset(check_solana_node, keys=_FINALITY + _AGE),
    "substrate_node": Preset(check_substrate_node, keys=_FINALITY + _AGE + ("min_peers",)),
    "cometbft_node": Preset(check_cometbft_node, keys=_AGE + ("min_peers", "expect_network")),
    "evm_newheads": Preset(check_subscription, Subscription(
        "eth_subscribe", ["newHeads"], "eth_unsubscribe", lambda sub: [sub],
        notification_of("eth_subscription"), evm_head, "eth_chainId"), _HELD + _HEADS),
    "solana_slot": Preset(check_subscription, Subscription(
        "slotSubscribe", [], "slotUnsubscribe", lambda sub: [sub],
        notification_of("slotNotification"), solana_head, consecutive=False), _HELD),
    "substrate_newheads": Preset(check_subscription, Subscription(
        "chain_subscribeNewHeads", [], "chain_unsubscribeNewHeads", lambda sub: [sub],
        notification_of("chain_newHead"), substrate_head), _HELD),
    "cometbft_newblock": Preset(check_subscription, Subscription(
        "subscribe", _COMETBFT_QUERY, "unsubscribe", lambda _: _COMETBFT_QUERY,
        cometbft_event, cometbft_head), _HELD + _AGE),
    "substrate_chainhead": Preset(check_subscription, Subscription(
        "chainHead_v1_follow", [False], "chainHead_v1_unfollow", lambda sub: [sub], follow_event, no_number,
        genesis_method="chainSpec_v1_genesisHash", last_head=followed_head), _HELD + _FINALITY),
}
PRESET_NAMES = tuple(PRESETS)
# The built-in modules: one per preset, each named after it.
DEFAULT_MODULES = {name: Module(name, preset=name) for name in PRESET_NAMES}


def preset_key_errors(module: Module, keys: Iterable[str]) -> List[Tuple[str, str]]:
    """(key, problem) for each of ``keys`` (those the config gave) the module's preset cannot honour."""
    preset = PRESETS[module.preset]
    errors = [(key, "preset %s %s" % (module.preset, PRESET_KEYS[key])) for key in keys if key in PRESET_KEYS and key not in preset.keys]
    if "max_gap" in preset.keys and module.max_gap is not None and module.hold is None:
        errors.append(("max_gap", "needs hold: gaps are measured while a subscription is held"))
    # Only the module's own timeout is known here.  Under --timeout, or a shorter scrape timeout,
    # hold_subscription cuts a hold that does not fit short, and says so in the probe's log.
    reserves = 2 * check_reserve(module.timeout or 0.0)  # the unsubscribe's and the close's
    if "hold" in preset.keys and module.hold and module.timeout and module.hold + reserves > module.timeout:
        fit = "%gs does not fit in the module's timeout of %gs: the unsubscribe and the close need its last %gs"
        errors.append(("hold", fit % (module.hold, module.timeout, reserves)))
    return errors


def run_steps(session: RpcSession, steps: Sequence[Step]) -> None:
    for index, step in enumerate(steps):
        if step.send is not None:
            session.send_text(step.send)
        else:
            expect(session, step, index)


def expect(session: RpcSession, step: Step, index: int) -> None:
    """Wait for a message the step accepts.  Messages that do not match the regex, or lack the
    JSON path, are skipped; one that has the path with a wrong value fails at once."""
    while True:
        event = session.next_event(lambda: CheckError("expectation_failed", "step %d: no matching message" % index))
        if not isinstance(event, Message):
            continue
        text = event.data.decode("utf-8", "replace")
        if step.regex:
            if re.search(step.regex, text):
                return
            continue
        try:
            value = json_at(json.loads(text), step.path)
        except (ValueError, KeyError, RecursionError):
            continue
        problem = mismatch(value, step)
        if problem:
            raise CheckError("expectation_failed", "step %d: %s %s" % (index, step.path, problem))
        return


def _json_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckError("expectation_failed", "not a number")
    return float(value)


def mismatch(value: object, step: Step) -> str:
    """Why ``value`` fails the step's comparisons; "" when it passes."""
    if step.equals and value != step.equals[0]:
        return "is %s, expected %s" % (json.dumps(value)[:60], json.dumps(step.equals[0])[:60])
    if step.at_least is None and step.at_most is None:
        return ""
    try:
        number = float(as_number(value, step.path) if isinstance(value, str) else _json_number(value))
    except CheckError:
        return "is not a number"
    if step.at_least is not None and number < step.at_least:
        return "is %g, expected at least %g" % (number, step.at_least)
    if step.at_most is not None and number > step.at_most:
        return "is %g, expected at most %g" % (number, step.at_most)
    return ""


# ==============================================================================================
# Exposition (Prometheus text format 0.0.4, OpenMetrics 1.0)
# ==============================================================================================

Labels = Tuple[Tuple[str, str], ...]


class Sample(NamedTuple):
    name: str
    labels: Labels
    value: float


# name -> (type, HELP).  The original exporter's four come first, with its HELP text.
METRICS: Dict[str, Tuple[str, str]] = {
    "probe_success": ("gauge", "Displays whether or not the probe was a success"),
    "probe_duration_seconds": ("gauge", "Returns how long the probe took to complete in seconds"),
    "probe_websocket_up": ("gauge", "Displays whether the WebSocket connection was successful"),
    "probe_websocket_connection_duration_seconds": ("gauge", "Duration of the WebSocket connection establishment"),
    "probe_timeout_seconds": ("gauge", "The deadline this probe ran under in seconds"),
    "probe_dns_lookup_time_seconds": ("gauge", "Returns the time taken for probe dns lookup in seconds"),
    "probe_ip_protocol": ("gauge", "Specifies whether probe ip protocol is IP4 or IP6"),
    "probe_websocket_duration_seconds": ("gauge", "Duration of each phase of the WebSocket probe in seconds"),
    "probe_websocket_status_code": ("gauge", "HTTP status code of the upgrade response, 0 when none arrived"),
    "probe_websocket_close_code": ("gauge", "Close code the server answered our close with, 0 when none"),
    "probe_tls_version_info": ("gauge", "Returns the TLS version used or NaN when unknown"),
    "probe_tls_cipher_info": ("gauge", "Returns the TLS cipher negotiated during handshake"),
    "probe_ssl_earliest_cert_expiry": ("gauge", "Returns last SSL chain expiry in unixtime"),
    "probe_failure_info": ("gauge", "Why the probe failed: the phase and a reason from a fixed set"),
    "probe_websocket_ping_rtt_seconds": ("gauge", "Time from our ping to the pong echoing it in seconds"),
    "probe_rpc_duration_seconds": ("gauge", "Time from a JSON-RPC request to its answer in seconds, by method"),
    "probe_rpc_error_code": ("gauge", "JSON-RPC error code the node answered a request with, by method"),
    "probe_subscription_first_notification_seconds": ("gauge", "Time from the subscribe request to the first notification in seconds"),
    "probe_subscription_notifications": ("gauge", "Notifications received during the probe"),
    "probe_chain_id": ("gauge", "Chain id the node reported"),
    "probe_chain_head_number": ("gauge", "Number of the newest block (or slot) the node reported"),
    "probe_chain_head_timestamp_seconds": ("gauge", "Time of the newest block the node reported in unix seconds"),
    "probe_chain_head_age_seconds": ("gauge", "Age of the newest block the node reported in seconds"),
    "probe_chain_finalized_head_number": ("gauge", "Number of the newest finalized block the node reported"),
    "probe_chain_info": ("gauge", "The chain the node serves, by its genesis hash or network name"),
    "probe_node_syncing": ("gauge", "Whether the node says it is syncing"),
    "probe_node_peers": ("gauge", "Peers the node is connected to"),
    "probe_node_behind_slots": ("gauge", "Slots the node says it is behind (Solana getHealth)"),
    "probe_node_info": ("gauge", "The node's client and version, as it names them"),
    "probe_subscription_max_gap_seconds": ("gauge", "Longest silence of a held subscription in seconds"),
    "probe_subscription_head_regressions": ("gauge", "Notifications of a held subscription whose head did not move forward"),
    "probe_subscription_head_skips": ("gauge", "Heads a held subscription never delivered: numbers it jumped over"),
    "ws_exporter_config_last_reload_successful": ("gauge", "Whether the last configuration reload attempt was successful"),
    "ws_exporter_config_last_reload_success_timestamp_seconds": ("gauge", "Timestamp of the last successful configuration reload"),
    "ws_exporter_build_info": ("gauge", "A metric with a constant '1' value labeled by version and python_version"),
    "ws_exporter_probes_total": ("counter", "Probes run, by module"),
    "ws_exporter_probes_failed_total": ("counter", "Probes that failed, by module and reason"),
    "ws_exporter_probes_in_flight": ("gauge", "Probes running now"),
    "ws_exporter_requests_rejected_total": ("counter", "Requests refused with 503, by reason"),
    "process_cpu_seconds_total": ("counter", "Total user and system CPU time spent in seconds."),
    "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes."),
    "process_virtual_memory_bytes": ("gauge", "Virtual memory size in bytes."),
    "process_start_time_seconds": ("gauge", "Start time of the process since unix epoch in seconds."),
    "process_open_fds": ("gauge", "Number of open file descriptors."),
    "process_max_fds": ("gauge", "Maximum number of open file descriptors."),
    "process_threads": ("gauge", "Number of OS threads in the process."),
    "python_info": ("gauge", "Python platform information"),
    "python_gc_objects_collected_total": ("counter", "Objects collected during gc"),
    "python_gc_objects_uncollectable_total": ("counter", "Uncollectable objects found during GC"),
    "python_gc_collections_total": ("counter", "Number of times this generation was collected"),
}


def escape_help(text: str) -> str:
    """HELP text escapes backslash and newline."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(text: str) -> str:
    """Label values escape backslash, double quote and newline."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_INF = float("inf")


def format_value(value: float) -> str:
    """A sample value Prometheus reads back exactly."""
    if isinstance(value, int):  # bools and IntEnums too
        return "%d" % value
    if value != value:
        return "NaN"
    if value == _INF or value == -_INF:
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return "%d" % value
    return repr(value)


def render_samples(samples: Iterable[Sample]) -> str:
    """Text exposition 0.0.4: families in first-seen order, HELP and TYPE once each, labels sorted."""
    return _render_families(samples, _text_family_header)


def render_openmetrics(samples: Iterable[Sample]) -> str:
    """OpenMetrics 1.0: the same families and samples, OpenMetrics headers, ``# EOF`` last."""
    return _render_families(samples, _openmetrics_family_header) + "# EOF\n"


def _render_families(samples: Iterable[Sample], header: Callable[[str, str, str], str]) -> str:
    listed = samples if isinstance(samples, list) else list(samples)
    template, order = _template(tuple([sample[:2] for sample in listed]), header)
    return template % tuple([format_value(listed[i].value) for i in order])


@functools.lru_cache(maxsize=256)  # every probe's answer has one of a few shapes
def _template(
    shape: Tuple[Tuple[str, Labels], ...], header: Callable[[str, str, str], str]
) -> Tuple[str, Tuple[int, ...]]:
    """The text of samples of this shape (name and labels of each), with %s where the values go,
    and which sample's value goes in each place: samples are grouped by family."""
    families: Dict[str, List[int]] = {}
    for index, (name, _) in enumerate(shape):
        families.setdefault(name, []).append(index)
    out: List[str] = []
    for name, members in families.items():
        kind, help_text = METRICS[name]
        out.append(header(name, kind, help_text).replace("%", "%%"))
        out.extend("%s %%s\n" % _series(name, shape[i][1]).replace("%", "%%") for i in members)
    return "".join(out), tuple(i for members in families.values() for i in members)


@functools.lru_cache(maxsize=256)  # every answer repeats the same HELP and TYPE lines
def _text_family_header(name: str, kind: str, help_text: str) -> str:
    return "# HELP %s %s\n# TYPE %s %s\n" % (name, escape_help(help_text), name, kind)


@functools.lru_cache(maxsize=256)
def _openmetrics_family_header(name: str, kind: str, help_text: str) -> str:
    # OpenMetrics 1.0: a counter family is named without the "_total" its samples carry, and
    # HELP escapes the double quote as well (the same three escapes as label values).
    family = name[: -len("_total")] if kind == "counter" and name.endswith("_total") else name
    return "# HELP %s %s\n# TYPE %s %s\n" % (family, escape_label_value(help_text), family, kind)


class ExpositionFormat(NamedTuple):
    content_type: str
    render: Callable[[Iterable[Sample]], str]


TEXT_FORMAT = ExpositionFormat(EXPOSITION_CONTENT_TYPE, render_samples)
OPENMETRICS_FORMAT = ExpositionFormat(OPENMETRICS_CONTENT_TYPE, render_openmetrics)


def negotiate_format(accept: Optional[str]) -> ExpositionFormat:
    """OpenMetrics 1.0 when the Accept header names application/openmetrics-text (whatever its
    version parameter) with a non-zero q; the text format otherwise (RFC 7231 §5.3.2)."""
    for media_range in (accept or "").split(","):
        media_type, *params = (part.strip().lower() for part in media_range.split(";"))
        if media_type == OPENMETRICS_MEDIA_TYPE and not any(_is_zero_q(p) for p in params):
            return OPENMETRICS_FORMAT
    return TEXT_FORMAT


def _is_zero_q(param: str) -> bool:
    name, _, value = param.partition("=")
    try:
        return name.strip() == "q" and float(value) == 0
    except ValueError:
        return False


@functools.lru_cache(maxsize=4096)  # every probe's answer renders the same few series again
def _series(name: str, labels: Labels) -> str:
    if not labels:
        return name
    return "%s{%s}" % (name, ",".join('%s="%s"' % (k, escape_label_value(v)) for k, v in sorted(labels)))


def probe_samples(result: ProbeResult) -> List[Sample]:
    """The metrics of one probe, in a fixed order (all gauges)."""
    samples = [
        Sample("probe_success", (), int(result.success)),
        Sample("probe_duration_seconds", (), result.total),
        Sample("probe_websocket_up", (), int(result.connected)),
        Sample("probe_websocket_connection_duration_seconds", (), result.connection_duration()),
        Sample("probe_timeout_seconds", (), result.timeout),
        Sample("probe_dns_lookup_time_seconds", (), result.durations["resolve"]),
        Sample("probe_ip_protocol", (), result.ip_protocol),
    ]
    samples += [Sample("probe_websocket_duration_seconds", (("phase", p),), d) for p, d in result.durations.items()]
    samples.append(Sample("probe_websocket_status_code", (), result.status_code))
    samples.append(Sample("probe_websocket_close_code", (), result.close_code))
    if result.tls_version:
        samples.append(Sample("probe_tls_version_info", (("version", result.tls_version),), 1))
        samples.append(Sample("probe_tls_cipher_info", (("cipher", result.tls_cipher),), 1))
    if result.cert_expiry is not None:
        samples.append(Sample("probe_ssl_earliest_cert_expiry", (), result.cert_expiry))
    samples += check_samples(result)
    if result.failure is not None:
        phase, reason = result.failure
        samples.append(Sample("probe_failure_info", (("phase", phase), ("reason", reason)), 1))
    return samples


def check_samples(result: ProbeResult) -> List[Sample]:
    """What the module's checks measured, each metric only when it was measured."""
    samples = [Sample("probe_rpc_duration_seconds", rpc_labels(call), d) for call, d in sorted(result.rpc_durations.items())]
    samples += [Sample("probe_rpc_error_code", rpc_labels(call), c) for call, c in sorted(result.rpc_error_codes.items())]
    optional: Tuple[Tuple[str, Optional[float]], ...] = (
        ("probe_websocket_ping_rtt_seconds", result.ping_rtt),
        ("probe_subscription_first_notification_seconds", result.first_notification),
        ("probe_subscription_notifications", result.notifications),
        ("probe_chain_id", result.chain_id),
        ("probe_chain_head_number", result.head_number),
        ("probe_chain_head_timestamp_seconds", result.head_timestamp),
        ("probe_chain_head_age_seconds", result.head_age),
        ("probe_chain_finalized_head_number", result.finalized_head),
        ("probe_node_syncing", result.node_syncing),
        ("probe_node_peers", result.node_peers),
        ("probe_node_behind_slots", result.behind_slots),
        ("probe_subscription_max_gap_seconds", result.max_gap),
        ("probe_subscription_head_regressions", result.head_regressions),
        ("probe_subscription_head_skips", result.head_skips),
    )
    samples += [Sample(name, (), value) for name, value in optional if value is not None]
    if result.node_info is not None:
        samples.append(Sample("probe_node_info", (("client", result.node_info[0]), ("version", result.node_info[1])), 1))
    if result.genesis or result.network:
        identity = ("genesis", result.genesis) if result.genesis else ("network", result.network)
        samples.append(Sample("probe_chain_info", (identity,), 1))
    return samples


def rpc_labels(call: RpcCall) -> Labels:
    return (("method", call[0]), ("block", call[1])) if call[1] else (("method", call[0]),)


class Stats:
    """The exporter's own counters; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.probes: Dict[str, int] = {}
        self.failed: Dict[Tuple[str, str], int] = {}
        self.rejected: Dict[str, int] = {"connections": 0, "overloaded": 0}
        self.in_flight = 0

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def begin(self, limit: int) -> bool:
        """Count a probe in, unless ``limit`` are running already (then count it rejected)."""
        with self._lock:
            if self.in_flight >= limit:
                self.rejected["overloaded"] += 1
                return False
            self.in_flight += 1
            return True

    def end(self, result: ProbeResult) -> None:
        with self._lock:
            self.in_flight -= 1
            self.probes[result.module] = self.probes.get(result.module, 0) + 1
            if result.failure is not None:
                key = (result.module, result.failure[1])
                self.failed[key] = self.failed.get(key, 0) + 1

    def samples(self, modules: Iterable[str]) -> List[Sample]:
        """The counters, each from the start: at 0 for every module and failure reason known
        (so that rate() and increase() see a module's first probe and first failure)."""
        with self._lock:
            probes = dict.fromkeys(modules, 0)
            probes.update(self.probes)
            failed = {(m, r): 0 for m in probes for r in FAILURE_REASONS}
            failed.update(self.failed)
            rejected, in_flight = sorted(self.rejected.items()), self.in_flight
        out = [Sample("ws_exporter_probes_total", (("module", m),), n) for m, n in sorted(probes.items())]
        out += [Sample("ws_exporter_probes_failed_total", (("module", m), ("reason", r)), n) for (m, r), n in sorted(failed.items())]
        out.append(Sample("ws_exporter_probes_in_flight", (), in_flight))
        out += [Sample("ws_exporter_requests_rejected_total", (("reason", r),), n) for r, n in rejected]
        return out


def build_samples() -> List[Sample]:
    info = (("version", __version__), ("python_version", PYTHON_VERSION))
    impl = sys.implementation.name
    py_labels = (
        ("implementation", impl),
        ("major", str(sys.version_info[0])),
        ("minor", str(sys.version_info[1])),
        ("patchlevel", str(sys.version_info[2])),
        ("version", PYTHON_VERSION),
    )
    return [Sample("ws_exporter_build_info", info, 1), Sample("python_info", py_labels, 1)]


# python_gc_* as client_python's GCCollector exports them: gc.get_stats() per generation.
_GC_FIGURES = (
    ("python_gc_objects_collected_total", "collected"),
    ("python_gc_objects_uncollectable_total", "uncollectable"),
    ("python_gc_collections_total", "collections"),
)


def gc_samples() -> List[Sample]:
    """The garbage collector's counters by generation; none outside CPython (as in client_python)."""
    if sys.implementation.name != "cpython":
        return []
    stats = gc.get_stats()
    return [Sample(name, (("generation", str(g)),), figures[key]) for name, key in _GC_FIGURES for g, figures in enumerate(stats)]


class ProcessFigures(NamedTuple):
    """What process_* report."""

    cpu_seconds: float
    virtual_bytes: int
    resident_bytes: int
    start_time: float
    open_fds: int
    max_fds: int
    threads: int

    def samples(self) -> List[Sample]:
        out = [
            Sample("process_cpu_seconds_total", (), self.cpu_seconds),
            Sample("process_virtual_memory_bytes", (), self.virtual_bytes),
            Sample("process_resident_memory_bytes", (), self.resident_bytes),
            Sample("process_start_time_seconds", (), self.start_time),
            Sample("process_open_fds", (), self.open_fds),
        ]
        if self.max_fds:
            out.append(Sample("process_max_fds", (), self.max_fds))
        out.append(Sample("process_threads", (), self.threads))
        return out


def process_figures() -> Optional[ProcessFigures]:
    """This process's figures from /proc where it exists (Linux); None elsewhere.  The fields
    of /proc/self/stat are counted after the command name, which may hold spaces and ")"."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime"))
        open_fds = len(os.listdir("/proc/self/fd"))
        import resource  # Unix only, as /proc is

        max_fds = max(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 0)  # RLIM_INFINITY is -1: none shown
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    ticks = float(os.sysconf("SC_CLK_TCK"))
    return ProcessFigures(
        (float(fields[11]) + float(fields[12])) / ticks,  # utime and stime
        int(fields[20]),
        int(fields[21]) * os.sysconf("SC_PAGE_SIZE"),
        boot + float(fields[19]) / ticks,
        open_fds,
        max_fds,
        # num_threads: OS threads, not threading.active_count(), so that threads the threading
        # module never sees (native code's, _thread's) count too: each has a stack and an arena.
        int(fields[17]),
    )


# ==============================================================================================
# Logging
# ==============================================================================================

_LOGFMT_BARE = re.compile(r"[A-Za-z0-9_.:/@<>+\-]+")


def _logfmt_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if value is None or isinstance(value, bool) else str(value)
    if _LOGFMT_BARE.fullmatch(text):
        return text
    return json.dumps(text)


def _timestamp(now: Optional[float] = None) -> str:
    now = time.time() if now is None else now
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%03dZ" % (int(now * 1000) % 1000)


def format_logfmt(level: str, msg: str, fields: Dict[str, object], when: Optional[float] = None) -> str:
    parts = ["ts=" + _timestamp(when), "level=" + level, "msg=" + _logfmt_value(msg)]
    parts.extend("%s=%s" % (k, _logfmt_value(v)) for k, v in fields.items())
    return " ".join(parts)


def format_json(level: str, msg: str, fields: Dict[str, object]) -> str:
    record: Dict[str, object] = {"ts": _timestamp(), "level": level, "msg": msg}
    record.update((k, v if isinstance(v, (int, float, bool)) or v is None else str(v)) for k, v in fields.items())
    return json.dumps(record)


def format_exception() -> str:
    """The exception being handled, with its traceback; imported only then (a bug, or a client
    that broke a connection in an unusual way): the module and its helpers take ~0.6 MB.  Out of
    descriptors the import itself fails: then the exception alone."""
    try:
        import traceback
    except ImportError:
        return repr(sys.exc_info()[1])
    return traceback.format_exc()


class Logger:
    """One line per event on a stream, logfmt or JSON, below a level dropped cheaply."""

    def __init__(self, level: str = "info", fmt: str = "logfmt", stream: Optional[IO[str]] = None) -> None:
        self.threshold = LOG_LEVELS[level]
        self.formatter = format_json if fmt == "json" else format_logfmt
        self.stream = stream
        self._lock = threading.Lock()

    def enabled(self, level: str) -> bool:
        return LOG_LEVELS[level] >= self.threshold

    def log(self, level: str, msg: str, **fields: object) -> None:
        if not self.enabled(level):
            return
        line = self.formatter(level, msg, fields) + "\n"
        stream = self.stream or sys.stderr
        with self._lock:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass


# ==============================================================================================
# HTTP server
# ==============================================================================================


class RecentProbe(NamedTuple):
    """One probe as the landing page lists it; its debug page is rendered only when asked for."""

    id: int
    started: float  # unix seconds
    module: Module
    target: str  # redacted
    result: ProbeResult
    log: ProbeLog

    def debug_text(self) -> str:
        return debug_page(self.log, self.result, self.module)


class RecentProbes:
    """The last RECENT_PROBES probes, newest first; thread-safe, bounded."""

    def __init__(self, size: int = RECENT_PROBES) -> None:
        self._lock = threading.Lock()
        self._probes: "collections.deque[RecentProbe]" = collections.deque(maxlen=size)
        self._next_id = 0

    def add(self, started: float, module: Module, target: str, result: ProbeResult, log: ProbeLog) -> int:
        with self._lock:
            probe = RecentProbe(self._next_id, started, module, target, result, log)
            self._next_id += 1
            self._probes.appendleft(probe)
        return probe.id

    def newest_first(self) -> List[RecentProbe]:
        with self._lock:
            return list(self._probes)

    def get(self, probe_id: int) -> Optional[RecentProbe]:
        with self._lock:
            return next((p for p in self._probes if p.id == probe_id), None)


def debug_requested(value: Optional[str]) -> bool:
    """/probe's debug parameter: "true" asks for the debug page, as blackbox_exporter reads it;
    any other value but "false" is refused rather than silently ignored."""
    if value is None or value == "false":
        return False
    if value == "true":
        return True
    raise BadRequest('Parameter debug must be "true" or "false"')


def single_param(query: Dict[str, List[str]], name: str) -> Optional[str]:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest("Parameter %s is given more than once" % name)
    return values[0]


LANDING_PAGE = """<!DOCTYPE html>
<html>
<head><meta charset="utf-8"><title>WebSocket Exporter</title></head>
<body>
<h1>WebSocket Exporter</h1>
<p>ws-exporter %(version)s: a Prometheus exporter that probes WebSocket endpoints.</p>
<ul>
<li><a href="%(metrics)s">Exporter metrics</a></li>
<li><a href="%(probe)s?target=wss://example.net/">Example probe</a>
 (<a href="%(probe)s?target=wss://example.net/&amp;debug=true">debug output</a>)</li>
<li><a href="/-/healthy">Health</a></li>
</ul>
<h2>Recent probes</h2>
%(recent)s
</body>
</html>
"""

RECENT_PROBES_HEADER = (
    "<table>\n<tr><th>Time (UTC)</th><th>Module</th><th>Target</th><th>Result</th>"
    "<th>Failure</th><th>Duration</th><th>Debug</th></tr>\n"
)


def recent_probes_table(rows: Sequence[str]) -> str:
    """The landing page's table of recent probes (rows from _recent_probe_row)."""
    if not rows:
        return "<p>No probes yet.</p>"
    return RECENT_PROBES_HEADER + "".join(rows) + "</table>"


_HTML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"})


def escape_html(text: str) -> str:
    """Text safe inside an HTML element or a quoted attribute."""
    return text.translate(_HTML_ESCAPES)


def _recent_probe_row(probe: RecentProbe) -> str:
    result = probe.result
    failure = "%s: %s" % result.failure if result.failure else ""
    cells = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(probe.started)),
        probe.module.name,
        probe.target,
        "success" if result.success else "failure",
        failure,
        "%.3fs" % result.total,
    )
    row = "".join("<td>%s</td>" % escape_html(cell) for cell in cells)
    return '<tr>%s<td><a href="/logs?id=%d">logs</a></td></tr>\n' % (row, probe.id)


def debug_page(log: ProbeLog, result: ProbeResult, module: Module) -> str:
    """The text a /probe?debug=true request answers with: log lines, metrics, module."""
    return "Logs for the probe:\n%s\n\nMetrics that would have been returned:\n%s\nModule configuration:\n%s\n" % (
        "\n".join(log.lines),
        render_samples(probe_samples(result)),
        json.dumps(module.settings(), indent=2, sort_keys=True),
    )


class _RequestReader(io.RawIOBase):
    """The socket as the handler reads it.  An idle keep-alive connection may wait
    KEEPALIVE_IDLE_SECONDS for its next request; once a request's first byte arrives, the rest
    of it must arrive within REQUEST_READ_SECONDS: a timeout per read alone would let a client
    that sends a byte a second hold its thread for ever."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.deadline: Optional[float] = None
        self.started = 0.0  # time.monotonic() when the current request arrived

    def next_request(self) -> None:
        """Before a request is read.  One already buffered (pipelined) arrives now."""
        self.deadline = None
        self.started = time.monotonic()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "bytearray | memoryview") -> int:  # type: ignore[override]
        count = self._receive_tls(buffer) if isinstance(self.sock, ssl.SSLSocket) else self._receive(buffer)
        if count and self.deadline is None:
            self.started = time.monotonic()
            self.deadline = self.started + REQUEST_READ_SECONDS
        return count

    def _receive(self, buffer: "bytearray | memoryview") -> int:
        """One recv on the blocking socket, which the kernel ends when the time left is up (see
        Connection)."""
        kernel_timeout(self.sock, socket.SO_RCVTIMEO, self.time_left())
        try:
            return self.sock.recv_into(buffer)
        except BlockingIOError:
            raise socket.timeout("timed out")

    def _receive_tls(self, buffer: "bytearray | memoryview") -> int:
        assert isinstance(self.sock, ssl.SSLSocket)
        while True:
            if not self.sock.pending():  # none decrypted already
                wait_ready(self.sock, READABLE, self.time_left())
            try:
                return self.sock.recv_into(buffer)
            except ssl.SSLWantReadError:  # part of a TLS record
                continue

    def time_left(self) -> float:
        return KEEPALIVE_IDLE_SECONDS if self.deadline is None else self.deadline - time.monotonic()


# From the first "?" to the end: a malformed request line quoted in a log message may hold a
# query with spaces, and every word of it may be part of a target.
_QUERY_IN_TEXT = re.compile(r"\?.*", re.DOTALL)
SERVER_HEADER = "%s/%s" % (EXPORTER_NAME, __version__)
OVERLOADED_HEADERS = (("Retry-After", "1"),)
TEXT_PLAIN = "text/plain; charset=utf-8"
ALLOWED_METHODS = frozenset(("GET", "HEAD", "POST"))


def reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


@functools.lru_cache(maxsize=1)  # formatted once a second, not once an answer
def http_date(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)


def response_bytes(status: int, body: str, content_type: str, headers: Sequence[Tuple[str, str]], close: bool) -> bytes:
    """A whole HTTP/1.1 response, head and body in one piece: sent in two, the body would meet
    Nagle's algorithm and the client's delayed ACK."""
    data = body.encode("utf-8")
    fields = [
        ("Server", SERVER_HEADER),
        ("Date", http_date(int(time.time()))),
        ("Content-Type", content_type),
        ("Content-Length", str(len(data))),
    ]
    fields.extend(headers)
    if close:
        fields.append(("Connection", "close"))  # RFC 7230 §6.6
    return http_head("HTTP/1.1 %d %s" % (status, reason_phrase(status)), fields) + data


class Handler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive on one client connection: http.server reads each request and
    enforces its limits; the handler routes it and answers, each answer whole in one write.
    /probe, the telemetry path, /, /logs and /-/healthy by GET or HEAD; /-/reload by POST;
    any other method is 405."""

    server: "ExporterServer"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):  # TLS waits in poll(), plain sockets under kernel timeouts
            self.connection.setblocking(False)
        self.rfile.close()  # replaced by a reader that keeps the request's deadline
        self.reader = _RequestReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        self.reader.next_request()
        try:
            super().handle_one_request()
        finally:
            self.server.answered(self)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        self.path = "/" + self.path.lstrip("/")  # never a scheme-relative URL
        if self.command not in ALLOWED_METHODS:
            self.method_not_allowed()
            return False
        if not self.server.admit(self):
            self.close_connection = True
            self.respond(503, "Shutting down\n")
            return False
        return True

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """An error in the request itself (http.server's 400, 414, 431, 505); the connection
        closes after it."""
        text = message or reason_phrase(code)
        self.log_message("code %d, message %s", code, text)
        self.close_connection = True
        self.respond(code, "%s\n" % _QUERY_IN_TEXT.sub("?<redacted>", text))

    def method_not_allowed(self, allow: str = "GET, HEAD") -> None:
        self.respond(405, "Method Not Allowed\n", headers=(("Allow", allow),))

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if not self.authorized(url.path):
            return
        route = self.server.routes.get(url.path)
        if route is None:
            self.respond(404, "Not Found\n")
            return
        route(self, url.query)

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path != "/-/reload":
            self.method_not_allowed()
            return
        if not self.discard_body() or not self.authorized(path):
            return
        error = self.server.exporter.reload()
        if error is None:
            self.respond(200, "Config reloaded\n")
        else:
            self.respond(500, "Config reload failed: %s\n" % error)

    def authorized(self, path: str) -> bool:
        """Basic auth, when configured, before any route; answers 401 or 429 itself."""
        auth = self.server.auth
        if auth is None or (path == "/-/healthy" and self.server.web.healthy_unauthenticated):
            return True
        outcome = auth.check(self.headers.get("Authorization"))
        if outcome is AuthOutcome.ALLOWED:
            return True
        self.server.exporter.logger.log("debug", "Request not authorized", path=path, outcome=outcome.value)
        if outcome is AuthOutcome.BUSY:
            self.respond(429, "Too Many Requests\n", headers=(("Retry-After", "1"),))
        else:
            self.respond(401, "Unauthorized\n", headers=(("WWW-Authenticate", 'Basic realm="%s"' % AUTH_REALM),))
        return False

    def serve_probe(self, query: str) -> None:
        exporter = self.server.exporter
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        try:
            target = single_param(params, "target")
            if not target:
                raise BadRequest("Target parameter is missing")
            debug = debug_requested(single_param(params, "debug"))
            request = exporter.probe_request(target, single_param(params, "module"), self.headers.get(SCRAPE_TIMEOUT_HEADER))
        except BadRequest as err:
            self.respond(400, "%s\n" % err)
            return
        try:
            # The deadline counts from the request's arrival: time it waited here is the scraper's too.
            result, log = exporter.probe(request.target, request.module, request.timeout, self.reader.started, request.alias)
        except Overloaded as err:
            self.close_connection = True
            self.respond(503, "%s\n" % err, headers=OVERLOADED_HEADERS)
            return
        if debug:
            self.respond(200, debug_page(log, result, request.module))
        else:
            self.respond_metrics(probe_samples(result))

    def serve_telemetry(self, query: str) -> None:
        self.respond_metrics(self.server.exporter.telemetry_samples())

    def serve_logs(self, query: str) -> None:
        """The debug page of a recent probe, by the id the landing page links to."""
        try:
            probe_id = int(single_param(urllib.parse.parse_qs(query), "id") or "")
        except (BadRequest, ValueError):
            self.respond(400, "Parameter id must be a probe number\n")
            return
        probe = self.server.exporter.recent.get(probe_id)
        if probe is None:
            self.respond(404, "Probe %d is not among the recent probes\n" % probe_id)
            return
        self.respond(200, probe.debug_text())

    def serve_landing(self, query: str) -> None:
        exporter = self.server.exporter
        page = LANDING_PAGE % {
            "version": __version__,
            "metrics": exporter.settings.telemetry_path,
            "probe": exporter.settings.probe_path,
            "recent": recent_probes_table([_recent_probe_row(p) for p in exporter.recent.newest_first()]),
        }
        self.respond(200, page, "text/html; charset=utf-8")

    def serve_healthy(self, query: str) -> None:
        self.respond(200, "Healthy\n")

    def serve_reload_get(self, query: str) -> None:
        self.method_not_allowed("POST")

    def discard_body(self) -> bool:
        """Read and drop a small request body so the connection can carry the next request."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_RELOAD_BODY_BYTES:
            self.close_connection = True
            self.respond(413, "Request body not accepted\n")
            return False
        self.rfile.read(length)
        return True

    def respond_metrics(self, samples: List[Sample]) -> None:
        """Samples in the exposition format the scraper's Accept header asks for."""
        fmt = negotiate_format(self.headers.get("Accept"))
        self.respond(200, fmt.render(samples), fmt.content_type)

    def respond(
        self,
        status: int,
        body: str,
        content_type: str = TEXT_PLAIN,
        headers: Sequence[Tuple[str, str]] = (),
    ) -> None:
        """The answer, whole, within RESPONSE_WRITE_SECONDS.  Not through http.server's
        send_response and end_headers: they write to ``wfile`` with no deadline, so a client
        that stops reading would hold this thread for ever."""
        data = response_bytes(status, body, content_type, headers, self.close_connection)
        if self.command == "HEAD":
            data = data[: data.index(b"\r\n\r\n") + 4]
        send_within(self.connection, data, RESPONSE_WRITE_SECONDS)
        path = (self.path or "").partition("?")[0]  # the query carries targets: never logged
        self.server.exporter.logger.log("debug", "HTTP request", method=self.command or "", path=path, code=status)

    def log_message(self, format: str, *args: object) -> None:
        detail = _QUERY_IN_TEXT.sub("?<redacted>", format % args)
        self.server.exporter.logger.log("debug", "HTTP server", detail=detail)


class ExporterServer(http.server.ThreadingHTTPServer):
    """A thread per client connection, up to --web.max-connections (then a quick 503); the
    threads never keep the process alive.  With TLS on the listener, the handshake runs in the
    connection's own thread, never in the one that accepts."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: Tuple[str, int], family: int, exporter: Exporter, web: Optional[WebConfig] = None) -> None:
        self.address_family = family
        self.exporter = exporter
        self.web = web if web is not None else WebConfig()
        self.auth = BasicAuth(self.web.users) if self.web.users else None
        self.tls = ServerTLS(self.web.tls, exporter.logger) if self.web.tls is not None else None
        self.connections = 0
        self.answering: Set[Handler] = set()  # the handlers answering a request now
        self.stopping = False  # no more requests are admitted: the process is shutting down
        self._lock = threading.Condition()  # guards the above; notified when a request is answered
        self.spare: Optional[int] = _spare_descriptor()  # closed to refuse a connection when none is left
        settings = exporter.settings
        self.routes: Dict[str, Callable[[Handler, str], None]] = {  # GET and HEAD
            settings.probe_path: Handler.serve_probe,
            settings.telemetry_path: Handler.serve_telemetry,
            "/": Handler.serve_landing,
            "/-/healthy": Handler.serve_healthy,
            "/logs": Handler.serve_logs,
            "/-/reload": Handler.serve_reload_get,
        }
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        """TCPServer's (SO_REUSEADDR: a restart binds while the last run's connections linger);
        HTTPServer's would also look up the host's name, which may hang."""
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # ":port" means every interface, IPv4 too: clear V6ONLY where the host allows it.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def get_request(self) -> Tuple[socket.socket, Any]:
        try:
            connection = self.socket.accept()
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.out_of_descriptors(err)
            raise  # the client left before accept (ECONNABORTED and the like), or handled above
        return connection

    def out_of_descriptors(self, err: OSError) -> None:
        """The waiting connection is answered 503 through the spare descriptor, so that no client
        waits in the listen queue; without one, the accept loop pauses rather than spin on a
        listening socket that stays readable."""
        if self.spare is not None:
            os.close(self.spare)
            try:
                self.refuse(self.socket.accept()[0])
                return
            except OSError:
                pass
            finally:
                self.spare = _spare_descriptor()
        self.exporter.logger.log("warn", "Cannot accept connections, pausing the accept loop", err=str(err))
        time.sleep(ACCEPT_RETRY_SECONDS)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the connection, up to --web.max-connections; past that, or when the
        system refuses a thread, a quick 503."""
        with self._lock:
            admitted = self.connections < self.exporter.settings.max_connections
            self.connections += admitted
        try:
            if admitted:
                super().process_request(request, client_address)
                return
        except RuntimeError:  # the system refused another thread
            self.release_connection()
        self.refuse(request)

    def admit(self, handler: Handler) -> bool:
        """Count ``handler`` as answering a request, unless the process is shutting down."""
        with self._lock:
            if not self.stopping:
                self.answering.add(handler)
            return not self.stopping

    def answered(self, handler: Handler) -> None:
        with self._lock:
            self.answering.discard(handler)
            if self.stopping:  # drain() is waiting
                self._lock.notify_all()

    def drain(self, seconds: float) -> int:
        """Wait up to ``seconds`` for the requests being answered; how many remain."""
        with self._lock:
            self._lock.wait_for(lambda: not self.answering, seconds)
            return len(self.answering)

    def refuse(self, request: socket.socket) -> None:
        self.exporter.stats.reject("connections")
        try:  # never blocking: this runs in the thread that accepts
            request.setblocking(False)
            request.send(response_bytes(503, "Too many connections\n", TEXT_PLAIN, OVERLOADED_HEADERS, True))
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        block_signals()
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.release_connection()

    def release_connection(self) -> None:
        with self._lock:
            self.connections -= 1

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        tls = self.tls.accept(request, client_address)
        if tls is None:
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            self.shutdown_request(tls)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.exporter.logger.log("debug", "HTTP connection error", traceback=format_exception())

    def server_close(self) -> None:
        super().server_close()
        if self.spare is not None:
            os.close(self.spare)
            self.spare = None


def _spare_descriptor() -> Optional[int]:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


def fit_descriptor_limit(settings: Settings) -> Settings:
    """The caps lowered to what the open-files limit holds: a connection and its probe take a
    descriptor each, and RESERVED_DESCRIPTORS stay for the rest (the listener, name lookups,
    /proc, the spare that refuses a connection when none are left)."""
    try:
        import resource  # Unix only

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return settings
    if soft == resource.RLIM_INFINITY:
        return settings
    connections = max(1, min(settings.max_connections, (soft - RESERVED_DESCRIPTORS) // 2))
    return settings._replace(max_connections=connections, max_concurrent=min(settings.max_concurrent, connections))


def split_listen_address(value: str) -> Tuple[str, int]:
    """":9095", "host:9095", "[::1]:9095" -> (host, port); host "" means every interface."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError("want [host]:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address needs brackets: [addr]:port")
    return host, int(port_text)


def make_server(exporter: Exporter, web: Optional[WebConfig] = None) -> ExporterServer:
    """Bind the listen address: ":port" is every IPv4 and IPv6 interface where the host has both.
    ``web`` adds TLS and basic auth; by default there is neither."""
    host, port = split_listen_address(exporter.settings.listen_address)
    if not host and socket.has_dualstack_ipv6():
        address, family = ("::", port), socket.AF_INET6
    elif not host:
        address, family = ("0.0.0.0", port), socket.AF_INET
    else:
        info = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
        address, family = (str(info[4][0]), port), info[0]
    return ExporterServer(address, family, exporter, web)


def format_address(address: Tuple[object, ...]) -> str:
    host = str(address[0])
    return "%s:%s" % (bracketed(host), address[1])


# --- Protecting the listener: TLS, password hashes, basic auth (--web.config.file) -------------


class TLSServerConfig(NamedTuple):
    """tls_server_config of the web config: paths already resolved against the file's directory."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"

    def files(self) -> Tuple[str, ...]:
        return (self.cert_file, self.key_file) + ((self.client_ca_file,) if self.client_ca_file else ())


class PasswordHash(NamedTuple):
    """An RFC 7914 scrypt hash, written scrypt$n=N,r=R,p=P$<salt>$<key> (standard base64)."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def text(self) -> str:
        encode = base64.b64encode
        return "scrypt$n=%d,r=%d,p=%d$%s$%s" % (
            self.n, self.r, self.p, encode(self.salt).decode("ascii"), encode(self.key).decode("ascii"))


class WebConfig(NamedTuple):
    """How the listener is protected; the default protects nothing."""

    tls: Optional[TLSServerConfig] = None
    users: Tuple[Tuple[str, PasswordHash], ...] = ()
    healthy_unauthenticated: bool = False  # /-/healthy answers without credentials (kubelet)


def build_server_context(config: TLSServerConfig) -> ssl.SSLContext:
    """The listener's SSLContext; OSError (ssl.SSLError among them) when a file does not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_MIN_VERSIONS[config.min_version]
    context.load_cert_chain(config.cert_file, config.key_file)
    context.verify_mode = CLIENT_AUTH_TYPES[config.client_auth_type]
    if config.client_ca_file:
        context.load_verify_locations(cafile=config.client_ca_file)
    return context


FileStamp = Optional[Tuple[int, int, int]]  # (mtime_ns, size, inode); None when unreadable


def file_stamps(paths: Iterable[str]) -> Tuple[FileStamp, ...]:
    """What tells a rewritten file apart.  The inode matters: a Kubernetes Secret volume swaps a
    symlink to a new directory, and the new file may carry an old mtime."""
    stamps: List[FileStamp] = []
    for path in paths:
        try:
            st = os.stat(path)
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            stamps.append(None)
    return tuple(stamps)


class ServerTLS:
    """The listener's TLS: a context rebuilt when the certificate, key or client CA file changes
    on disk (cert-manager renews them in place), looked at every CERT_RECHECK_SECONDS at most.
    Files that do not load (half written, key and certificate not yet matching) leave the
    previous context serving until the next change."""

    def __init__(self, config: TLSServerConfig, logger: Logger) -> None:
        self.config = config
        self.logger = logger
        self._lock = threading.Lock()
        self._stamps = file_stamps(config.files())  # before loading: a change in between is seen next time
        self._context = build_server_context(config)
        self._checked = time.monotonic()

    def context(self) -> ssl.SSLContext:
        with self._lock:
            now = time.monotonic()
            if now - self._checked < CERT_RECHECK_SECONDS:
                return self._context
            self._checked = now
            stamps = file_stamps(self.config.files())
            if stamps == self._stamps:
                return self._context
            self._stamps = stamps
            try:
                self._context = build_server_context(self.config)
            except OSError as err:
                self.logger.log("warn", "TLS files changed but do not load; serving the previous ones", err=str(err))
                return self._context
        self.logger.log("info", "TLS files reloaded", cert_file=self.config.cert_file)
        return self._context

    def accept(self, sock: socket.socket, client: Tuple[object, ...]) -> Optional[ssl.SSLSocket]:
        """The TLS connection over an accepted socket, its handshake done within
        TLS_HANDSHAKE_SECONDS; None when it failed (plain HTTP, an unverified client certificate)."""
        try:
            tls = self.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError as err:
            self.logger.log("debug", "TLS handshake failed", client=format_address(client), err=str(err))
            return None
        try:
            tls.settimeout(TLS_HANDSHAKE_SECONDS)  # for the whole handshake, not for each read
            tls.do_handshake()
        except OSError as err:  # ssl.SSLError and socket.timeout among them
            tls.close()
            self.logger.log("debug", "TLS handshake failed", client=format_address(client), err=str(err))
            return None
        return tls


_PASSWORD_HASH = re.compile(r"scrypt\$n=([0-9]{1,10}),r=([0-9]{1,10}),p=([0-9]{1,10})\$([A-Za-z0-9+/]+=*)\$([A-Za-z0-9+/]+=*)")


def parse_password_hash(text: str) -> PasswordHash:
    """A basic_auth_users value; ValueError saying what is wrong with it."""
    if text.startswith("$2"):
        raise ValueError("bcrypt is not in Python's standard library; make an scrypt hash with --web.hash-password")
    match = _PASSWORD_HASH.fullmatch(text)
    if match is None:
        raise ValueError("not a hash made by --web.hash-password (scrypt$n=N,r=R,p=P$salt$key)")
    n, r, p = int(match.group(1)), int(match.group(2)), int(match.group(3))
    salt, key = base64.b64decode(match.group(4)), base64.b64decode(match.group(5))
    if n < 2 or n & (n - 1) or r < 1 or not 1 <= p <= SCRYPT_MAX_P or scrypt_memory(n, r, p) > SCRYPT_MAX_MEMORY:
        raise ValueError("scrypt parameters out of range (n a power of two, p <= %d, at most %d MiB)" % (SCRYPT_MAX_P, SCRYPT_MAX_MEMORY >> 20))
    if len(salt) < 8 or not 16 <= len(key) <= 64:
        raise ValueError("salt under 8 bytes or key not 16 to 64 bytes")
    return PasswordHash(n, r, p, salt, key)


def scrypt_memory(n: int, r: int, p: int) -> int:
    """Bytes scrypt needs with these parameters (RFC 7914 §5; OpenSSL's maxmem check)."""
    return 128 * r * (n + p + 2)


def scrypt_key(password: str, params: PasswordHash) -> bytes:
    """The key ``password`` derives under the parameters and salt of ``params``."""
    return hashlib.scrypt(
        password.encode("utf-8"), salt=params.salt, n=params.n, r=params.r, p=params.p,
        maxmem=scrypt_memory(params.n, params.r, params.p) + 1024 * 1024, dklen=len(params.key),
    )


def hash_password(password: str) -> str:
    """A fresh basic_auth_users value for ``password``, with a random salt."""
    params = PasswordHash(SCRYPT_N, SCRYPT_R, SCRYPT_P, os.urandom(SCRYPT_SALT_BYTES), bytes(SCRYPT_KEY_BYTES))
    return params._replace(key=scrypt_key(password, params)).text()


def verify_password(password: str, stored: PasswordHash) -> bool:
    return hmac.compare_digest(scrypt_key(password, stored), stored.key)


def parse_basic_credentials(authorization: Optional[str]) -> Optional[Tuple[str, str]]:
    """RFC 7617 §2: (user, password) from an Authorization header, None when it holds none."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "basic":  # RFC 7235 §2.1: the scheme is case-insensitive
        return None
    try:
        user, colon, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except ValueError:  # binascii.Error and UnicodeDecodeError both are
        return None
    return (user, password) if colon else None


class AuthOutcome(enum.Enum):
    ALLOWED = "allowed"
    DENIED = "denied"  # 401
    BUSY = "busy"  # every hashing slot stayed taken: 429


class BasicAuth:
    """Basic auth against scrypt hashes.  A guess costs one scrypt, and at most AUTH_MAX_HASHING
    run at once: a request waits AUTH_HASH_WAIT_SECONDS for a slot, then gets a 429, so a flood
    of guesses cannot take every core.  Credentials that verified are remembered as an
    HMAC-SHA256 under a key drawn at start, never as text, so a scrape with the right password
    costs one HMAC; wrong ones are never remembered."""

    def __init__(self, users: Iterable[Tuple[str, PasswordHash]]) -> None:
        self._users = dict(users)
        self._key = os.urandom(AUTH_CACHE_KEY_BYTES)
        self._verified: Set[bytes] = set()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(AUTH_MAX_HASHING)
        # An unknown name is checked against this, so it costs what a wrong password costs.
        self._decoy = PasswordHash(SCRYPT_N, SCRYPT_R, SCRYPT_P, os.urandom(SCRYPT_SALT_BYTES), os.urandom(SCRYPT_KEY_BYTES))

    def check(self, authorization: Optional[str]) -> AuthOutcome:
        credentials = parse_basic_credentials(authorization)
        if credentials is None:
            return AuthOutcome.DENIED
        user, password = credentials
        # RFC 7617 §2: a user-id holds no colon, so "user:password" names one pair.
        digest = hmac.new(self._key, ("%s:%s" % credentials).encode("utf-8"), hashlib.sha256).digest()
        if self._remembered(digest):
            return AuthOutcome.ALLOWED
        if not self._slots.acquire(timeout=AUTH_HASH_WAIT_SECONDS):
            return AuthOutcome.BUSY
        try:
            if self._remembered(digest):  # verified by another request while this one waited
                return AuthOutcome.ALLOWED
            valid = verify_password(password, self._users.get(user, self._decoy)) and user in self._users
        finally:
            self._slots.release()
        if not valid:
            return AuthOutcome.DENIED
        with self._lock:
            if len(self._verified) >= AUTH_CACHE_ENTRIES:
                self._verified.clear()
            self._verified.add(digest)
        return AuthOutcome.ALLOWED

    def _remembered(self, digest: bytes) -> bool:
        with self._lock:
            return digest in self._verified


# ==============================================================================================
# Configuration and flags
# ==============================================================================================

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_BARE_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def parse_duration(text: str) -> float:
    """Go duration syntax ("500ms", "5s", "1m30s") or a bare number of seconds; >= 0."""
    if _BARE_SECONDS.fullmatch(text):
        return float(text)
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError("not a duration (examples: 500ms, 5s, 1m30s)")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0:
        raise ValueError("empty duration")
    return total


_Number = TypeVar("_Number", int, float)


def _positive(convert: Callable[[str], _Number]) -> Callable[[str], _Number]:
    """``convert``, refusing zero and negative values."""

    def checked(text: str) -> _Number:
        value = convert(text)
        if value <= 0:
            raise ValueError("must be greater than zero")
        return value

    return checked


positive_duration = _positive(parse_duration)


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "t", "true"):
        return True
    if lowered in ("0", "f", "false"):
        return False
    raise ValueError("want true or false")


def _listen_address(text: str) -> str:
    split_listen_address(text)
    return text


def _url_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError("must start with /")
    return text


def _choice(options: Iterable[str]) -> Callable[[str], str]:
    allowed = tuple(options)

    def convert(text: str) -> str:
        if text not in allowed:
            raise ValueError("want one of: %s" % ", ".join(allowed))
        return text

    return convert


def _host_pattern(text: str) -> str:
    if not text or _CONTROL_CHARS.search(text) or "/" in text:
        raise ValueError("want a host name or pattern such as *.example.net")
    return text.lower()


class Settings(NamedTuple):
    """What the command-line flags set."""

    listen_address: str = DEFAULT_LISTEN_ADDRESS
    telemetry_path: str = "/metrics"
    probe_path: str = "/probe"
    web_config_file: str = ""
    hash_password: bool = False
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    timeout_offset: float = DEFAULT_TIMEOUT_OFFSET_SECONDS
    log_level: str = "info"
    log_format: str = "logfmt"
    allow_targets: Tuple[str, ...] = ()
    deny_private: bool = False
    max_concurrent: int = DEFAULT_MAX_CONCURRENT_PROBES
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
    show_help: bool = False
    show_version: bool = False
    config_file: str = ""
    module: str = ""  # the probe subcommand's module


class FlagSpec(NamedTuple):
    name: str
    field: str  # the Settings field it sets
    default: str
    help: str
    convert: Callable[[str], object]
    boolean: bool = False
    repeatable: bool = False  # each use adds to a tuple


FLAG_SPECS = (
    FlagSpec("web.listen-address", "listen_address", DEFAULT_LISTEN_ADDRESS, "Address to listen on for the web interface, probes and telemetry.", _listen_address),
    FlagSpec("web.telemetry-path", "telemetry_path", "/metrics", "Path under which to expose the exporter's own metrics.", _url_path),
    FlagSpec("web.probe-path", "probe_path", "/probe", "Path under which to expose the probe endpoint.", _url_path),
    FlagSpec("web.config.file", "web_config_file", "", "JSON file with TLS and basic auth settings for this listener (exporter-toolkit's web config, as JSON).", str),
    FlagSpec("web.hash-password", "hash_password", "false", "Read a password line from standard input, print its hash for basic_auth_users and exit.", parse_bool, True),
    FlagSpec("timeout", "timeout", "10s", "Probe timeout (Go duration: 500ms, 5s, 1m30s; a bare number is seconds).", positive_duration),
    FlagSpec("timeout-offset", "timeout_offset", "0.5", "Subtracted from the scraper's X-Prometheus-Scrape-Timeout-Seconds (seconds or duration).", parse_duration),
    FlagSpec("config.file", "config_file", "", "JSON file with modules and target aliases; reloaded on SIGHUP and POST /-/reload.", str),
    FlagSpec("log.level", "log_level", "info", "Only log messages with the given severity or above: debug, info, warn, error.", _choice(LOG_LEVELS)),
    FlagSpec("log.format", "log_format", "logfmt", "Output format of log messages: logfmt or json.", _choice(LOG_FORMATS)),
    FlagSpec("probe.max-concurrent", "max_concurrent", str(DEFAULT_MAX_CONCURRENT_PROBES), "Probes allowed to run at once; more get a quick 503.", _positive(int)),
    FlagSpec("web.max-connections", "max_connections", str(DEFAULT_MAX_CONNECTIONS), "Client connections served at once; more get a quick 503.", _positive(int)),
    FlagSpec("web.shutdown-timeout", "shutdown_timeout", "25s", "On SIGTERM, how long probes in flight may take to finish and be answered before the exporter exits.", parse_duration),
    FlagSpec("probe.allow-target", "allow_targets", "", "Only probe hosts matching this pattern (e.g. *.example.net); repeatable. Default: any host.", _host_pattern, repeatable=True),
    FlagSpec("probe.deny-private", "deny_private", "false", "Refuse targets resolving to loopback, private, link-local or unique-local addresses.", parse_bool, True),
    FlagSpec("debug", "log_level", "false", "Enable debug logging (same as --log.level=debug).", lambda v: "debug" if parse_bool(v) else None, True),
    FlagSpec("version", "show_version", "false", "Print the version and exit.", parse_bool, True),
    FlagSpec("help", "show_help", "false", "Show this help and exit.", parse_bool, True),
)


def parse_flags(argv: Sequence[str], flag_specs: Sequence[FlagSpec] = FLAG_SPECS) -> Settings:
    """Go-style flags: -flag value, -flag=value, --flag value, --flag=value; booleans bare."""
    specs = {spec.name: spec for spec in flag_specs}
    values: Dict[str, object] = {}
    debug = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("-") or arg in ("-", "--") or arg.startswith("---"):
            raise FlagError("unexpected argument %r" % arg)
        name, eq, value = arg.lstrip("-").partition("=")
        spec = specs.get("help" if name == "h" else name)
        if spec is None:
            raise FlagError("flag provided but not defined: --%s" % name)
        if not eq:
            if not spec.boolean and not args:
                raise FlagError("flag needs an argument: --%s" % spec.name)
            value = "true" if spec.boolean else args.pop(0)
        try:
            converted = spec.convert(value)
        except ValueError as err:
            raise FlagError('invalid value "%s" for flag --%s: %s' % (value, spec.name, err))
        if spec.name == "debug":
            debug = debug or converted is not None
        elif spec.repeatable:
            values[spec.field] = tuple(values.get(spec.field, ())) + (converted,)  # type: ignore[arg-type]
        else:
            values[spec.field] = converted
    if debug:
        values["log_level"] = "debug"
    return Settings(**values)  # type: ignore[arg-type]


class Alias(NamedTuple):
    """A target alias: /probe?target=NAME probes ``url`` (which may hold a token) with ``module``."""

    name: str
    url: str
    module: str


class Config(NamedTuple):
    modules: Dict[str, Module]
    targets: Dict[str, Alias]


DEFAULT_CONFIG = Config(DEFAULT_MODULES, {})

_SUBSTITUTION = re.compile(r"\$\{(env|file):([^}]*)\}")
_JSON_TYPES = ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"), (list, "array"), (dict, "object"))


def load_config(path: str) -> Config:
    """Read and check a JSON config file: {"modules": {NAME: {...}}, "targets": {NAME: {...}}};
    no file ("") is the built-in modules."""
    return parse_config(read_json_file(path)) if path else DEFAULT_CONFIG


def log_config(logger: Logger, path: str, config: Config) -> None:
    """The line that says which config is in force: at start and after each reload."""
    logger.log("info", "Config loaded", file=path, modules=len(config.modules), targets=len(config.targets))


def read_json_file(path: str) -> object:
    """A configuration file's JSON, for both --config.file and --web.config.file."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"), object_pairs_hook=_unique_keys)
    except OSError as err:
        raise ConfigError("", "cannot read %s: %s" % (path, err.strerror or err))
    except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than the parser goes
        raise ConfigError("", "%s is not valid JSON: %s" % (path, err))


def _unique_keys(pairs: List[Tuple[str, object]]) -> Dict[str, object]:
    """A key given twice in one object is refused rather than silently overridden."""
    seen: Dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError("", "key %r appears twice in one object" % key)
        seen[key] = value
    return seen


def parse_config(data: object) -> Config:
    """The config, or a ConfigError naming every module and alias in error, one per line."""
    top = _object(data, "", ("modules", "targets"))
    modules, targets = dict(DEFAULT_MODULES), {}
    errors: List[ConfigError] = []
    for name, raw in _object(top.get("modules", {}), "modules").items():
        modules[name] = Module(name)  # stands in for a module in error, so aliases using it are not errors too
        with collecting(errors):
            modules[name] = parse_module(name, raw, _key_path("modules", name))
    for name, raw in _object(top.get("targets", {}), "targets").items():
        with collecting(errors):
            targets[name] = parse_alias(name, raw, _key_path("targets", name), modules)
    raise_collected(errors)
    return Config(modules, targets)


@contextlib.contextmanager
def collecting(errors: List[ConfigError]) -> Iterator[None]:
    """A ConfigError raised in the block is added to ``errors`` and checking goes on."""
    try:
        yield
    except ConfigError as err:
        errors.append(err)


def raise_collected(errors: List[ConfigError]) -> None:
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigError("", "\n".join(map(str, errors)))


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return next(name for kind, name in _JSON_TYPES if isinstance(value, kind))


def _key_path(path: str, key: str) -> str:
    return "%s.%s" % (path, key) if path else key


def _object(value: object, path: str, keys: Optional[Sequence[str]] = None) -> Dict[str, object]:
    if not isinstance(value, dict):
        raise ConfigError(path or "top level", "want an object, got %s" % _json_type(value))
    unknown = sorted(set(value) - set(keys)) if keys is not None else []
    if unknown:
        raise ConfigError(_key_path(path, unknown[0]), "unknown key")
    return value


def _string(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, "want a string, got %s" % _json_type(value))
    return value


def _boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, "want true or false, got %s" % _json_type(value))
    return value


def _integer(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, "want an integer, got %s" % _json_type(value))
    return value


def _number(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, "want a number, got %s" % _json_type(value))
    return float(value)


def _duration(value: object, path: str) -> float:
    try:
        return positive_duration(_string(value, path))
    except ValueError as err:
        raise ConfigError(path, str(err))


def _strings(value: object, path: str) -> Tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(path, "want an array of strings, got %s" % _json_type(value))
    return tuple(_string(item, "%s[%d]" % (path, i)) for i, item in enumerate(value))


def _one_of(*options: str) -> Callable[[object, str], str]:
    choose = _choice(options)

    def convert(value: object, path: str) -> str:
        try:
            return choose(_string(value, path))
        except ValueError as err:
            raise ConfigError(path, str(err))

    return convert


def expand(value: object, path: str) -> str:
    """A string with ${env:NAME} and ${file:/path} replaced (a file's trailing newline dropped),
    so that secrets stay out of the config file."""

    def substitute(match: "re.Match[str]") -> str:
        kind, name = match.group(1), match.group(2)
        if kind == "env":
            if name not in os.environ:
                raise ConfigError(path, "environment variable %s is not set" % name)
            return os.environ[name]
        try:
            with open(name, "r", encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        except (OSError, ValueError) as err:
            raise ConfigError(path, "cannot read %s: %s" % (name, getattr(err, "strerror", None) or type(err).__name__))

    return _SUBSTITUTION.sub(substitute, _string(value, path))


def _headers(value: object, path: str) -> Tuple[Tuple[str, str], ...]:
    headers = []
    for name, raw in _object(value, path).items():
        where = _key_path(path, name)
        if _HEADER_NAME.fullmatch(name) is None:
            raise ConfigError(where, "not a valid header name")
        text = expand(raw, where)
        if "\r" in text or "\n" in text:
            raise ConfigError(where, "header value holds a line break")  # RFC 7230 §3.2.4
        headers.append((name, text))
    return tuple(headers)


_TLS_KEYS: Dict[str, Callable[[object, str], object]] = {
    "ca_file": _string,
    "cert_file": _string,
    "key_file": _string,
    "server_name": _string,
    "insecure_skip_verify": _boolean,
    "min_version": _one_of(*TLS_MIN_VERSIONS),
}


def _tls(value: object, path: str) -> TLSOptions:
    fields = _object(value, path, tuple(_TLS_KEYS))
    options = TLSOptions(**{k: _TLS_KEYS[k](v, _key_path(path, k)) for k, v in fields.items()})  # type: ignore[arg-type]
    if options.key_file and not options.cert_file:
        raise ConfigError(_key_path(path, "key_file"), "needs cert_file")
    return options


def tls_context(options: TLSOptions, path: str) -> ssl.SSLContext:
    """A client context for a module's tls settings, built once when the config loads."""
    try:
        context = ssl.create_default_context(cafile=options.ca_file or None)
        if options.cert_file:
            context.load_cert_chain(options.cert_file, options.key_file or None)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(path, "cannot load certificates: %s" % (getattr(err, "strerror", None) or err))
    if options.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if options.min_version:
        context.minimum_version = TLS_MIN_VERSIONS[options.min_version]
    return context


def _proxy_url(value: object, path: str) -> str:
    text = expand(value, path)
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port
    except ValueError:
        raise ConfigError(path, "malformed URL")
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(path, "want http://host:port")
    return text


_STEP_KEYS = ("send", "expect")
_EXPECT_KEYS = ("regex", "path", "equals", "at_least", "at_most")


def _steps(value: object, path: str) -> Tuple[Step, ...]:
    if not isinstance(value, list):
        raise ConfigError(path, "want an array of steps, got %s" % _json_type(value))
    return tuple(_step(item, "%s[%d]" % (path, i)) for i, item in enumerate(value))


def _step(value: object, path: str) -> Step:
    fields = _object(value, path, _STEP_KEYS)
    if len(fields) != 1:
        raise ConfigError(path, "want exactly one of send, expect")
    if "send" in fields:
        return Step(send=expand(fields["send"], _key_path(path, "send")))
    where = _key_path(path, "expect")
    expect = _object(fields["expect"], where, _EXPECT_KEYS)
    if ("regex" in expect) == ("path" in expect):
        raise ConfigError(where, "want exactly one of regex, path")
    if "regex" in expect:
        if len(expect) > 1:
            raise ConfigError(where, "a regex takes no comparison")
        regex = _string(expect["regex"], _key_path(where, "regex"))
        try:
            re.compile(regex)
        except re.error as err:
            raise ConfigError(_key_path(where, "regex"), "bad regex: %s" % err)
        return Step(regex=regex)
    return Step(
        path=_string(expect["path"], _key_path(where, "path")),
        equals=(expect["equals"],) if "equals" in expect else (),
        at_least=_number(expect["at_least"], _key_path(where, "at_least")) if "at_least" in expect else None,
        at_most=_number(expect["at_most"], _key_path(where, "at_most")) if "at_most" in expect else None,
    )


def _min_notifications(value: object, path: str) -> int:
    count = _integer(value, path)
    if count < 1:
        raise ConfigError(path, "must be at least 1")
    return count


# A module's config keys are the Module fields they set (all but name and tls_context).
_MODULE_KEYS: Dict[str, Callable[[object, str], object]] = {
    "preset": _one_of(*PRESET_NAMES),
    "timeout": _duration,
    "headers": _headers,
    "subprotocols": _strings,
    "origin": expand,
    "tls": _tls,
    "ip_protocol": _one_of("ip4", "ip6"),
    "ip_protocol_fallback": _boolean,
    "proxy_url": _proxy_url,
    "expect_chain_id": _integer,
    "max_head_age": _duration,
    "min_notifications": _min_notifications,
    "steps": _steps,
    "min_peers": _integer,
    "max_finality_lag": _integer,
    "expect_genesis_hash": _string,
    "expect_network": _string,
    "hold": _duration,
    "max_gap": _duration,
}


def parse_module(name: str, raw: object, path: str) -> Module:
    """A module from the config; one named after a preset overrides that built-in module."""
    fields, values = _object(raw, path), {}
    errors: List[ConfigError] = []
    for key, value in fields.items():
        with collecting(errors):
            if key not in _MODULE_KEYS:
                raise ConfigError(_key_path(path, key), "unknown key")
            values[key] = _MODULE_KEYS[key](value, _key_path(path, key))
    if "tls" in values:
        with collecting(errors):
            values["tls_context"] = tls_context(values["tls"], _key_path(path, "tls"))  # type: ignore[arg-type]
    raise_collected(errors)
    values.setdefault("preset", name if name in PRESETS else "connect")
    module = Module(name, **values)  # type: ignore[arg-type]
    raise_collected([ConfigError(_key_path(path, key), problem) for key, problem in preset_key_errors(module, fields)])
    return module


def parse_alias(name: str, raw: object, path: str, modules: Dict[str, Module]) -> Alias:
    """A target alias.  Errors never quote the URL: it may hold a token."""
    fields = _object(raw, path, ("url", "module"))
    if "url" not in fields:
        raise ConfigError(_key_path(path, "url"), "missing")
    url = expand(fields["url"], _key_path(path, "url"))
    try:
        parse_target(url)
    except ProbeError as err:
        raise ConfigError(_key_path(path, "url"), "not a probe target: %s" % err.detail)
    module = _string(fields.get("module", "connect"), _key_path(path, "module"))
    if module not in modules:
        raise ConfigError(_key_path(path, "module"), 'unknown module "%s"' % module)
    return Alias(name, url, module)


def usage() -> str:
    lines = [
        "usage: ws_exporter.py [flags]",
        "       ws_exporter.py probe TARGET [flags]   one probe, its debug page; exit 0 ok, 1 failed, 2 usage",
        "",
        "%s %s: probes WebSocket endpoints for Prometheus." % (EXPORTER_NAME, __version__),
        "",
        "Flags:",
    ]
    for spec in FLAG_SPECS:
        shown = "" if spec.boolean else "=%s" % spec.default
        lines.append("  --%s%s\n      %s" % (spec.name, shown, spec.help))
    return "\n".join(lines) + "\n"


# --- --web.config.file and --web.hash-password -------------------------------------------------

WEB_CONFIG_KEYS = ("tls_server_config", "basic_auth_users", "healthy_unauthenticated")
TLS_CONFIG_KEYS = ("cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version")


def load_web_config(path: str) -> WebConfig:
    """--web.config.file: exporter-toolkit's web configuration written as JSON.  Relative file
    names are taken from the file's directory, as exporter-toolkit does; the TLS files are
    loaded once here so that a bad one stops the start rather than the first scrape."""
    config = parse_web_config(read_json_file(path), os.path.dirname(os.path.abspath(path)))
    if config.tls is not None:
        try:
            build_server_context(config.tls)
        except OSError as err:
            raise ConfigError("tls_server_config", "the files do not load: %s" % err)
    return config


def parse_web_config(raw: object, base_dir: str) -> WebConfig:
    """The web configuration from parsed JSON; ConfigError names the offending key."""
    top = _object(raw, "", WEB_CONFIG_KEYS)
    tls = None
    if "tls_server_config" in top:
        tls = _tls_server_config(_object(top["tls_server_config"], "tls_server_config", TLS_CONFIG_KEYS), base_dir)
    users = _basic_auth_users(_object(top.get("basic_auth_users", {}), "basic_auth_users"))
    healthy = _boolean(top.get("healthy_unauthenticated", False), "healthy_unauthenticated")
    return WebConfig(tls, users, healthy)


def _tls_server_config(obj: Dict[str, object], base_dir: str) -> TLSServerConfig:
    path = "tls_server_config"
    files = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        name = _string(obj.get(key, ""), _key_path(path, key))
        files[key] = os.path.join(base_dir, name) if name else ""
    for key in ("cert_file", "key_file"):
        if not files[key]:
            raise ConfigError(_key_path(path, key), "required")
    client_auth = _one_of(*CLIENT_AUTH_TYPES)(obj.get("client_auth_type", "NoClientCert"), _key_path(path, "client_auth_type"))
    min_version = _one_of(*TLS_MIN_VERSIONS)(obj.get("min_version", "TLS12"), _key_path(path, "min_version"))
    verifies = CLIENT_AUTH_TYPES[client_auth] != ssl.CERT_NONE
    if verifies and not files["client_ca_file"]:
        raise ConfigError(_key_path(path, "client_ca_file"), "required when client_auth_type is %s" % client_auth)
    if files["client_ca_file"] and not verifies:
        raise ConfigError(_key_path(path, "client_auth_type"),
                          "client_ca_file is set, so choose VerifyClientCertIfGiven or RequireAndVerifyClientCert")
    return TLSServerConfig(files["cert_file"], files["key_file"], files["client_ca_file"], client_auth, min_version)


def _basic_auth_users(obj: Dict[str, object]) -> Tuple[Tuple[str, PasswordHash], ...]:
    users = []
    for name in sorted(obj):
        if not name or ":" in name:  # RFC 7617 §2: a user-id cannot contain a colon
            raise ConfigError("basic_auth_users", "%r is not a user name" % name)
        where = _key_path("basic_auth_users", name)
        try:
            users.append((name, parse_password_hash(_string(obj[name], where))))
        except ValueError as err:
            raise ConfigError(where, str(err))
    return tuple(users)


def password_from(stream: IO[bytes]) -> str:
    """--web.hash-password: the first line of ``stream`` without its line break."""
    line = stream.readline()
    line = line[:-1] if line.endswith(b"\n") else line
    line = line[:-1] if line.endswith(b"\r") else line
    if not line:
        raise FlagError("--web.hash-password: no password on standard input")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise FlagError("--web.hash-password: the password is not UTF-8")


# ==============================================================================================
# main
# ==============================================================================================


class Exporter:
    """What the HTTP handlers share: settings, modules, counters and the log."""

    def __init__(self, settings: Settings, logger: Logger, modules: Optional[Dict[str, Module]] = None) -> None:
        self.settings = settings
        self.logger = logger
        # Replaced whole on reload: a request reads self.config once and sees one consistent
        # config, without a lock.
        self.config = Config(dict(DEFAULT_MODULES if modules is None else modules), {})
        self.stats = Stats()
        self.policy = TargetPolicy(settings.allow_targets, settings.deny_private)
        self.recent = RecentProbes()
        self.last_reload: Tuple[bool, float] = (True, time.time())  # (successful, last success)

    @property
    def modules(self) -> Dict[str, Module]:
        return self.config.modules

    def reload(self) -> Optional[str]:
        """Load --config.file again; on error keep the old config and return why."""
        path = self.settings.config_file
        try:
            self.config = load_config(path)
        except ConfigError as err:
            self.last_reload = (False, self.last_reload[1])
            self.logger.log("error", "Config reload failed, keeping the old config", file=path, err=str(err))
            return str(err)
        self.last_reload = (True, time.time())
        log_config(self.logger, path, self.config)
        return None

    def reload_samples(self) -> List[Sample]:
        successful, when = self.last_reload
        return [
            Sample("ws_exporter_config_last_reload_successful", (), int(successful)),
            Sample("ws_exporter_config_last_reload_success_timestamp_seconds", (), when),
        ]

    def probe_timeout(self, module: Module, scrape_timeout: Optional[str]) -> float:
        """The module's timeout (or --timeout), lowered to the scrape timeout minus the offset."""
        timeout = module.timeout or self.settings.timeout
        if scrape_timeout is not None:
            try:
                header = float(scrape_timeout)
            except ValueError:
                header = float("nan")
            if not (0 < header < float("inf")):
                raise BadRequest("Invalid %s header: %r" % (SCRAPE_TIMEOUT_HEADER, scrape_timeout[:40]))
            timeout = min(timeout, header - self.settings.timeout_offset)
        return max(timeout, MIN_PROBE_TIMEOUT_SECONDS)

    def probe(
        self, target: str, module: Module, timeout: float, start: Optional[float] = None, alias: str = ""
    ) -> Tuple[ProbeResult, ProbeLog]:
        """Run one probe whose deadline counts from ``start`` (when its request arrived);
        Overloaded when --probe.max-concurrent probes are already running.  Logs name the target
        by ``alias`` when given (its URL may hold a token)."""
        result = ProbeResult(module.name, timeout)
        redacted = alias or _redact_raw_target(target)
        log = ProbeLog(self.logger, target, module=module.name, target=redacted)
        if not self.stats.begin(self.settings.max_concurrent):
            raise Overloaded("Too many probes in flight")
        started = time.time()
        try:
            run_probe(target, module, Deadline(timeout, start), result, log, self.policy)
        finally:
            self.stats.end(result)
        if result.success:
            log.log("debug", "Probe succeeded", duration_seconds=round(result.total, 6))
        self.recent.add(started, module, redacted, result, log)
        return result, log

    def probe_request(self, target: str, module_name: Optional[str], scrape_timeout: Optional[str]) -> "ProbeRequest":
        """What a probe of ``target`` (a URL or an alias) with the named module (by default the
        alias's, else connect) runs; BadRequest when it cannot be served."""
        alias = self.config.targets.get(target)
        module = lookup_module(module_name or (alias.module if alias else "connect"), self.config.modules)
        timeout = self.probe_timeout(module, scrape_timeout)
        return ProbeRequest(alias.url if alias else target, module, timeout, alias.name if alias else "")

    def telemetry_samples(self) -> List[Sample]:
        figures = process_figures()
        counters = self.stats.samples(self.config.modules)
        return build_samples() + counters + self.reload_samples() + (figures.samples() if figures else []) + gc_samples()


class ProbeRequest(NamedTuple):
    target: str  # the URL to probe (an alias's own)
    module: Module
    timeout: float
    alias: str  # the alias name the request gave, "" for a URL


def _redact_raw_target(raw: str) -> str:
    try:
        return parse_target(raw).redacted()
    except ProbeError:
        return "<unparsable:%s>" % short_digest(raw)


def lookup_module(name: str, modules: Dict[str, Module]) -> Module:
    """The module a /probe request names; BadRequest when there is none by that name."""
    module = modules.get(name)
    if module is None:
        raise BadRequest('Unknown module "%s"' % name)
    return module


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNALS: Tuple[int, ...] = (signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()


def install_stop_signals() -> Tuple[socket.socket, socket.socket]:
    """SIGTERM, SIGINT (stop) and SIGHUP (reload) write their number to the first socket of the
    returned pair (keep both open).  The handlers do nothing: one that took a lock could deadlock
    against the main thread holding it."""
    receiver, sender = socket.socketpair()
    sender.setblocking(False)
    signal.set_wakeup_fd(sender.fileno())
    for signum in STOP_SIGNALS + RELOAD_SIGNALS:
        signal.signal(signum, lambda *_: None)
    return receiver, sender


def wait_for_stop(wakeup: socket.socket, exporter: Exporter) -> int:
    """Reload on SIGHUP until a stop signal arrives; return its number (0 if the pair broke)."""
    while True:
        signum = wakeup.recv(1)
        if not signum:
            return 0
        if signum[0] not in RELOAD_SIGNALS:
            return signum[0]
        exporter.reload()


def usage_error(message: str) -> int:
    """``message`` on stderr, each line prefixed; the exit status of a bad command line or config."""
    sys.stderr.write("".join("ws_exporter: %s\n" % line for line in message.splitlines()))
    return 2


def config_error(path: str, err: ConfigError) -> int:
    """The usage error of a --config.file in error: a line per error found."""
    return usage_error("\n".join("config file %s: %s" % (path, line) for line in str(err).splitlines()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["probe"]:
        return probe_command(args[1:])
    try:
        settings = parse_flags(args)
    except FlagError as err:
        return usage_error(str(err))
    if settings.show_help:
        sys.stdout.write(usage())
        return 0
    if settings.show_version:
        sys.stdout.write("%s %s (python %s)\n" % (EXPORTER_NAME, __version__, PYTHON_VERSION))
        return 0
    try:
        if settings.hash_password:
            sys.stdout.write(hash_password(password_from(sys.stdin.buffer)) + "\n")
            return 0
        web = load_web_config(settings.web_config_file) if settings.web_config_file else None
    except FlagError as err:
        return usage_error(str(err))
    except ConfigError as err:
        return usage_error("--web.config.file=%s: %s" % (settings.web_config_file, err))
    logger = Logger(settings.log_level, settings.log_format)
    exporter = Exporter(fit_descriptor_limit(settings), logger)
    try:
        exporter.config = load_config(settings.config_file)
    except ConfigError as err:
        return config_error(settings.config_file, err)
    try:
        server = make_server(exporter, web)
    except OSError as err:
        logger.log("error", "Cannot listen", address=settings.listen_address, err=str(err))
        return 1
    wakeup, _ = install_stop_signals()
    threading.stack_size(THREAD_STACK_BYTES)
    logger.log("info", "Listening", address=format_address(server.server_address), version=__version__,
               tls=server.tls is not None, basic_auth=server.auth is not None,
               max_connections=exporter.settings.max_connections, max_concurrent=exporter.settings.max_concurrent)
    log_config(logger, settings.config_file, exporter.config)
    return serve(server, exporter, wakeup)


# What a one-shot probe uses: the listener's flags and the caps on serving mean nothing to it.
PROBE_FLAG_SPECS = (FlagSpec("module", "module", "connect", "", str),) + tuple(
    spec for spec in FLAG_SPECS if spec.name in ("config.file", "timeout", "probe.allow-target", "probe.deny-private"))
PROBE_USAGE = "usage: ws_exporter.py probe TARGET, flags before or after it: --%s" % ", --".join(s.name for s in PROBE_FLAG_SPECS)


def probe_command(args: List[str]) -> int:
    """``probe TARGET [--module M] [flags]``: one probe in the foreground, its debug page on
    standard output; exit status 0 when it succeeded, 1 when it failed, 2 on a usage or config
    error."""
    targets, flags = probe_arguments(args)
    try:
        settings = parse_flags(flags, PROBE_FLAG_SPECS)
    except FlagError as err:
        return usage_error("%s; %s" % (err, PROBE_USAGE))
    if len(targets) != 1:
        return usage_error(PROBE_USAGE)
    exporter = Exporter(settings, Logger("error"))
    try:
        exporter.config = load_config(settings.config_file)
        request = exporter.probe_request(targets[0], settings.module, None)
    except BadRequest as err:
        return usage_error(str(err))
    except ConfigError as err:
        return config_error(settings.config_file, err)
    result, log = exporter.probe(request.target, request.module, request.timeout, alias=request.alias)
    sys.stdout.write(debug_page(log, result, request.module))
    return 0 if result.success else 1


def probe_arguments(args: List[str]) -> Tuple[List[str], List[str]]:
    """``probe``'s command line, flags before or after the target: (targets, flags)."""
    takes_value = {spec.name for spec in PROBE_FLAG_SPECS if not spec.boolean}
    targets: List[str] = []
    flags: List[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("-"):
            targets.append(arg)
        elif arg.lstrip("-") in takes_value and rest:  # --flag value
            flags += [arg, rest.pop(0)]
        else:
            flags.append(arg)
    return targets, flags


def serve(server: ExporterServer, exporter: Exporter, wakeup: socket.socket) -> int:
    """Serve until a stop signal arrives on ``wakeup``, reloading on SIGHUP.  Then stop
    accepting, give the requests being answered --web.shutdown-timeout to finish, and return 0
    (at once on a second stop signal, those answers lost)."""
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    signum = wait_for_stop(wakeup, exporter)
    draining = [True]

    def second_stop(*_: object) -> None:
        """Ends the drain, once and only while it runs: a KeyboardInterrupt raised anywhere else
        (as the process exits) would end the process by SIGINT rather than with 0."""
        if draining[0]:
            draining[0] = False
            raise KeyboardInterrupt

    for stop in STOP_SIGNALS:
        signal.signal(stop, second_stop)
    log = exporter.logger.log
    try:
        server.stopping = True  # a request on a kept-alive connection now gets a 503
        server.shutdown()
        server.server_close()
        log("info", "Shutting down", signal=signal.Signals(signum).name if signum else "", in_flight=exporter.stats.in_flight)
        unanswered = server.drain(exporter.settings.shutdown_timeout)
        draining[0] = False
    except KeyboardInterrupt:
        log("warn", "Stopped by a second signal", unanswered=len(server.answering))
        return 0
    finally:
        for stop in STOP_SIGNALS:  # exiting: Python would restore the default, death by the signal
            signal.signal(stop, signal.SIG_IGN)
    log("warn" if unanswered else "info", "Shut down", unanswered=unanswered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
