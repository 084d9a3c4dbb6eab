#!/usr/bin/env python3
"""ws-exporter: a Prometheus multi-target exporter that probes WebSocket endpoints.

``GET /probe?target=wss://node.example/KEY`` resolves the host, connects, negotiates TLS,
performs the RFC 6455 opening handshake, closes the connection cleanly and answers with
Prometheus metrics describing every phase.  ``/metrics`` describes the exporter itself.

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
    "main",
]

import base64
import codecs
import enum
import hashlib
import http.server
import io
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
import urllib.parse
from typing import (
    IO,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

# ==============================================================================================
# Constants
# ==============================================================================================

EXPORTER_NAME = "ws-exporter"
USER_AGENT = "%s/%s" % (EXPORTER_NAME, __version__)

DEFAULT_LISTEN_ADDRESS = ":9095"
DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_TIMEOUT_OFFSET_SECONDS = 0.5
MIN_PROBE_TIMEOUT_SECONDS = 0.1  # the floor when a scrape timeout minus the offset is tiny
SCRAPE_TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"

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

# Limits on what a server may send us.
MAX_HANDSHAKE_LINE = 8192  # one status or header line of the upgrade response
MAX_HANDSHAKE_HEADERS = 100
MAX_HANDSHAKE_BYTES = 65536  # the whole upgrade response head
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one (reassembled) message
MAX_CLOSE_FRAMES = 1000  # frames we read while waiting for the server's close
CLOSE_WAIT_SECONDS = 2.0  # how long a probe waits for the server to answer our close
RECV_BYTES = 65536
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

EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

PHASES = ("resolve", "connect", "tls", "upgrade", "close")
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
        "http_status",  # upgrade: an answer other than 101
        "bad_response",  # upgrade: not a well-formed HTTP response head
        "response_too_large",  # upgrade: a line, the header count or the head over its limit
        "bad_upgrade",  # upgrade: Upgrade or Connection header missing or wrong
        "bad_accept",  # upgrade: Sec-WebSocket-Accept missing or wrong
        "unexpected_extension",  # upgrade: an extension the client did not offer
        "unexpected_subprotocol",  # upgrade: a subprotocol the client did not offer
        "protocol_error",  # close/check: a frame that breaks RFC 6455
        "message_too_large",  # close/check: a message over the size limit
        "internal_error",  # a bug in the exporter; the traceback is logged at debug level
    )
)

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


class FlagError(Exception):
    """A command-line flag is unknown or has a bad value."""


class BadRequest(Exception):
    """A /probe request the exporter cannot serve; answered with 400 and this message."""


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


def build_upgrade_request(
    host_header: str, resource: str, key: str, headers: Sequence[Tuple[str, str]] = ()
) -> bytes:
    """RFC 6455 §4.1: the client's opening handshake."""
    lines = [
        "GET %s HTTP/1.1" % resource,
        "Host: %s" % host_header,
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: %s" % key,
        "Sec-WebSocket-Version: %s" % WEBSOCKET_VERSION,
        "User-Agent: %s" % USER_AGENT,
    ]
    lines.extend("%s: %s" % (name, value) for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


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
        raise HandshakeError("http_status", "status %d %s" % (response.status, response.reason[:40]))
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
    return encode_frame(Opcode.CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:123])


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
    if opcode not in Opcode.__members__.values():
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
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s:%d" % (host, self.port)

    def host_header(self) -> str:
        """RFC 6455 §4.1 / RFC 7230 §5.4: the port only when it is not the scheme's default."""
        default = 443 if self.secure else 80
        host = "[%s]" % self.host if ":" in self.host else self.host
        return host if self.port == default else "%s:%d" % (host, self.port)

    def redacted(self) -> str:
        """scheme://host:port and, when the target has a path, query or userinfo, a short stable
        hash of them instead: the form every log line and page shows."""
        secret = self.resource if self.resource != "/" else ""
        secret += "@" + self.userinfo if self.userinfo else ""
        if not secret:
            return "%s://%s/" % (self.scheme, self.host_port)
        digest = hashlib.sha256(secret.encode("utf-8")).hexdigest()[:8]
        return "%s://%s/<%s>" % (self.scheme, self.host_port, digest)


_SCHEMES = {"ws": False, "wss": True, "http": False, "https": True}
_SCHEME_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(?!\d*(?:/|$))")
_CONTROL_CHARS = re.compile(r"[\x00-\x20\x7f]")


def parse_target(raw: str) -> Target:
    """Parse a probe target: ws://, wss://, http:// (as ws), https:// (as wss), or no scheme
    (as ws).  Raises ProbeError(phase "target", reason "bad_target") for anything else."""
    if not raw or _CONTROL_CHARS.search(raw):
        raise _bad_target("empty or holds spaces or control characters")
    if "://" not in raw:
        if _SCHEME_PREFIX.match(raw):
            raise _bad_target("unsupported scheme")
        raw = "ws://" + raw
    try:
        parts = urllib.parse.urlsplit(raw)
        port = parts.port
    except ValueError:
        raise _bad_target("malformed URL or port")
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
    return Target(secure, host, port or (443 if secure else 80), resource, urllib.parse.unquote(userinfo))


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


class Module(NamedTuple):
    """What a probe does and with which settings."""

    name: str
    timeout: Optional[float] = None  # seconds; None: the --timeout flag
    headers: Tuple[Tuple[str, str], ...] = ()
    subprotocols: Tuple[str, ...] = ()

    def settings(self) -> Dict[str, object]:
        """The module as shown on the debug page, header values redacted."""
        return {
            "name": self.name,
            "timeout": self.timeout,
            "headers": {name: "<redacted>" for name, _ in self.headers},
            "subprotocols": list(self.subprotocols),
        }


DEFAULT_MODULES = {"connect": Module("connect")}


class Deadline:
    """One deadline for a whole probe."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left; raises ProbeError(timeout) once none are."""
        left = self.expires - time.monotonic()
        if left <= 0:
            raise ProbeError("timeout", "probe deadline of %.3gs passed" % self.seconds)
        return left


class ProbeLog:
    """The log lines of one probe: kept for its debug page, written to the exporter's log.
    Lines are formatted only when read, since few probes ever have their debug page asked for."""

    def __init__(self, logger: "Logger", **fields: object) -> None:
        self.logger = logger
        self.fields = fields
        self._records: List[Tuple[float, str, str, Dict[str, object]]] = []  # (time, level, msg, fields)

    def log(self, level: str, msg: str, **fields: object) -> None:
        merged = dict(self.fields, **fields)
        self._records.append((time.time(), level, msg, merged))
        self.logger.log(level, msg, **merged)

    @property
    def lines(self) -> List[str]:
        return [format_logfmt(level, msg, fields, when) for when, level, msg, fields in self._records]


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
    """An open socket with the frame reader that decodes what arrives on it."""

    def __init__(self, sock: socket.socket, deadline: Deadline) -> None:
        self.sock = sock
        self.deadline = deadline
        self.reader = FrameReader()
        self.send_started = 0.0  # perf_counter() just before the last send went to the kernel
        self.arrived = 0.0  # perf_counter() when the bytes last received reached this host
        # TLS sockets decrypt through OpenSSL's own reads: their data carries no stamps.
        self._stamped = bool(SO_TIMESTAMPNS) and not isinstance(sock, ssl.SSLSocket)

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.deadline.remaining())
        self.send_started = time.perf_counter()
        self.sock.sendall(data)

    def recv(self, limit: Optional[float] = None) -> bytes:
        """Bytes from the peer within the deadline (and ``limit`` seconds when given)."""
        timeout = self.deadline.remaining()
        self.sock.settimeout(timeout if limit is None else min(timeout, limit))
        if self._stamped:
            data, ancillary, _, _ = self.sock.recvmsg(RECV_BYTES, _ANCILLARY_BYTES)
            self.arrived = arrival_time(ancillary)
        else:
            data = self.sock.recv(RECV_BYTES)
            self.arrived = time.perf_counter()
        if not data:
            raise ProbeError("connection_closed", "peer closed the connection")
        return data


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


def run_probe(raw_target: str, module: Module, deadline: Deadline, result: ProbeResult, log: ProbeLog) -> None:
    """Probe ``raw_target`` with ``module``, recording into ``result``.  Never raises: every
    failure ends up as ``result.failure``."""
    start = time.perf_counter()
    sock: Optional[socket.socket] = None
    try:
        target = parse_target(raw_target)
        conn = open_websocket(target, module, deadline, result, log)
        sock = conn.sock
        close_websocket(conn, result, log)
    except ProbeError as err:
        _record_failure(result, err, log)
    except (OSError, ValueError) as err:
        _record_failure(result, _classify_os_error(err), log)
    except Exception as err:  # a bug: report it as a failed probe, never as a 500
        log.log("debug", "Probe raised an unexpected exception", traceback=traceback.format_exc())
        _record_failure(result, ProbeError("internal_error", type(err).__name__), log)
    finally:
        if sock is not None:
            sock.close()
        result.total = time.perf_counter() - start


def _record_failure(result: ProbeResult, err: ProbeError, log: ProbeLog) -> None:
    phase = err.phase or result.phase
    result.failure = (phase, err.reason)
    log.log("info", "Probe failed", phase=phase, reason=err.reason, detail=err.detail)


def _classify_os_error(err: Exception) -> ProbeError:
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
    return ProbeError("connect_error", str(err) or type(err).__name__)


def open_websocket(target: Target, module: Module, deadline: Deadline, result: ProbeResult, log: ProbeLog) -> Connection:
    """Resolve, connect, negotiate TLS and upgrade; return the open WebSocket."""
    log.log("debug", "Beginning probe", timeout=deadline.seconds)
    with _Phase(result, "resolve"):
        addresses = resolve(target.host, target.port, deadline)
    log.log("debug", "Resolved", addresses=len(addresses))
    with _Phase(result, "connect"):
        sock = connect(addresses, deadline, result)
    try:
        log.log("debug", "Connected", ip_protocol=result.ip_protocol)
        if target.secure:
            with _Phase(result, "tls"):
                sock = start_tls(sock, target.host, deadline, result)
            log.log("debug", "TLS established", version=result.tls_version, cipher=result.tls_cipher)
        with _Phase(result, "upgrade") as phase:
            conn = Connection(sock, deadline)
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
    literal) is looked up in a helper thread that the probe stops waiting for."""
    flags = 0
    try:
        ipaddress.ip_address(host)
        return _getaddrinfo(host, port, socket.AI_NUMERICHOST)
    except ValueError:
        pass
    box: List[Union[List[AddrInfo], BaseException]] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            box.append(_getaddrinfo(host, port, flags))
        except BaseException as err:
            box.append(err)
        done.set()

    threading.Thread(target=lookup, name="resolve", daemon=True).start()
    if not done.wait(deadline.remaining()):
        raise ProbeError("timeout", "name resolution did not finish before the deadline")
    outcome = box[0]
    if isinstance(outcome, socket.gaierror):
        raise ProbeError("dns_error", outcome.strerror or str(outcome))
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _getaddrinfo(host: str, port: int, flags: int) -> List[AddrInfo]:
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP, flags)
    if not infos:
        raise socket.gaierror(socket.EAI_NONAME, "no addresses")
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def connect(addresses: List[AddrInfo], deadline: Deadline, result: ProbeResult) -> socket.socket:
    """Try each address in turn within the deadline; the first that connects wins."""
    last: Optional[Exception] = None
    for family, sockaddr in addresses:
        result.ip_protocol = 6 if family == socket.AF_INET6 else 4
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(deadline.remaining())
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            enable_arrival_stamps(sock)
            return sock
        except OSError as err:
            sock.close()
            last = err
            if isinstance(err, socket.timeout):
                break
    assert last is not None
    raise last


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


def start_tls(sock: socket.socket, host: str, deadline: Deadline, result: ProbeResult) -> ssl.SSLSocket:
    """TLS with SNI and certificate verification, within the deadline."""
    sock.settimeout(deadline.remaining())
    tls = default_tls_context().wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    try:
        tls.do_handshake()
    except BaseException:
        tls.close()  # wrap_socket took over the descriptor: the plain socket can no longer close it
        raise
    result.tls_version = (tls.version() or "").replace("TLSv", "TLS ")
    cipher = tls.cipher()
    result.tls_cipher = cipher[0] if cipher else ""
    cert = tls.getpeercert()
    not_after = cert.get("notAfter") if cert else None
    if isinstance(not_after, str):
        result.cert_expiry = float(ssl.cert_time_to_seconds(not_after))
    return tls


def upgrade(conn: Connection, target: Target, module: Module, result: ProbeResult) -> None:
    """RFC 6455 §4.1: send the opening handshake and validate the answer."""
    key = new_key()
    conn.send(build_upgrade_request(target.host_header(), target.resource, key, upgrade_headers(target, module)))
    parser = ResponseParser()
    response = None
    while response is None:
        try:
            data = conn.recv()
        except ProbeError as err:
            if err.reason == "connection_closed":
                raise HandshakeError("connection_closed", "connection closed before the upgrade response")
            raise
        response = parser.feed(data)
    result.status_code = response.status
    validate_handshake(response, key, module.subprotocols)
    conn.reader.feed(response.rest)


def upgrade_headers(target: Target, module: Module) -> List[Tuple[str, str]]:
    headers = list(module.headers)
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


def wait_for_close(conn: Connection) -> Close:
    limit = time.monotonic() + CLOSE_WAIT_SECONDS
    frames = 0
    while conn.reader.closed is None:
        left = limit - time.monotonic()
        if left <= 0:
            raise ProbeError("timeout", "no close frame within %gs" % CLOSE_WAIT_SECONDS)
        frames += len(conn.reader.feed(conn.recv(left)))
        if frames > MAX_CLOSE_FRAMES:
            raise FrameError("more than %d frames after our close" % MAX_CLOSE_FRAMES)
    return conn.reader.closed


# ==============================================================================================
# Checks (modules)
# ==============================================================================================


def lookup_module(name: str, modules: Dict[str, Module]) -> Module:
    """The module a /probe request names; BadRequest when there is none by that name."""
    module = modules.get(name)
    if module is None:
        raise BadRequest('Unknown module "%s"' % name)
    return module


# ==============================================================================================
# Exposition (Prometheus text format 0.0.4)
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
    "ws_exporter_build_info": ("gauge", "A metric with a constant '1' value labeled by version and python_version"),
    "ws_exporter_probes_total": ("counter", "Probes run, by module"),
    "ws_exporter_probes_failed_total": ("counter", "Probes that failed, by module and reason"),
    "ws_exporter_probes_in_flight": ("gauge", "Probes running now"),
    "process_cpu_seconds_total": ("counter", "Total user and system CPU time spent in seconds."),
    "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes."),
    "process_virtual_memory_bytes": ("gauge", "Virtual memory size in bytes."),
    "process_start_time_seconds": ("gauge", "Start time of the process since unix epoch in seconds."),
    "process_open_fds": ("gauge", "Number of open file descriptors."),
    "process_max_fds": ("gauge", "Maximum number of open file descriptors."),
    "python_info": ("gauge", "Python platform information"),
}


def escape_help(text: str) -> str:
    """HELP text escapes backslash and newline."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(text: str) -> str:
    """Label values escape backslash, double quote and newline."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value Prometheus reads back exactly."""
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e15):
        return "%d" % value
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def render_samples(samples: Iterable[Sample]) -> str:
    """Text exposition: families in first-seen order, HELP and TYPE once each, labels sorted."""
    families: Dict[str, List[Sample]] = {}
    for sample in samples:
        families.setdefault(sample.name, []).append(sample)
    out: List[str] = []
    for name, members in families.items():
        kind, help_text = METRICS[name]
        out.append("# HELP %s %s\n# TYPE %s %s\n" % (name, escape_help(help_text), name, kind))
        out.extend(_sample_line(sample) for sample in members)
    return "".join(out)


def _sample_line(sample: Sample) -> str:
    if not sample.labels:
        return "%s %s\n" % (sample.name, format_value(sample.value))
    labels = ",".join('%s="%s"' % (k, escape_label_value(v)) for k, v in sorted(sample.labels))
    return "%s{%s} %s\n" % (sample.name, labels, format_value(sample.value))


def probe_samples(result: ProbeResult) -> List[Sample]:
    """The metrics of one probe, in a fixed order."""

    def gauge(name: str, value: float, labels: Labels = ()) -> Sample:
        return Sample(name, labels, value)

    samples = [
        gauge("probe_success", int(result.success)),
        gauge("probe_duration_seconds", result.total),
        gauge("probe_websocket_up", int(result.connected)),
        gauge("probe_websocket_connection_duration_seconds", result.connection_duration()),
        gauge("probe_timeout_seconds", result.timeout),
        gauge("probe_dns_lookup_time_seconds", result.durations["resolve"]),
        gauge("probe_ip_protocol", result.ip_protocol),
    ]
    samples += [gauge("probe_websocket_duration_seconds", d, (("phase", p),)) for p, d in result.durations.items()]
    samples += [
        gauge("probe_websocket_status_code", result.status_code),
        gauge("probe_websocket_close_code", result.close_code),
    ]
    if result.tls_version:
        samples.append(gauge("probe_tls_version_info", 1, (("version", result.tls_version),)))
        samples.append(gauge("probe_tls_cipher_info", 1, (("cipher", result.tls_cipher),)))
    if result.cert_expiry is not None:
        samples.append(gauge("probe_ssl_earliest_cert_expiry", result.cert_expiry))
    if result.failure is not None:
        phase, reason = result.failure
        samples.append(gauge("probe_failure_info", 1, (("phase", phase), ("reason", reason))))
    return samples


class Stats:
    """The exporter's own counters; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.probes: Dict[str, int] = {}
        self.failed: Dict[Tuple[str, str], int] = {}
        self.in_flight = 0

    def begin(self) -> None:
        with self._lock:
            self.in_flight += 1

    def end(self, result: ProbeResult) -> None:
        with self._lock:
            self.in_flight -= 1
            self.probes[result.module] = self.probes.get(result.module, 0) + 1
            if result.failure is not None:
                key = (result.module, result.failure[1])
                self.failed[key] = self.failed.get(key, 0) + 1

    def samples(self) -> List[Sample]:
        with self._lock:
            probes = sorted(self.probes.items())
            failed = sorted(self.failed.items())
            in_flight = self.in_flight
        out = [Sample("ws_exporter_probes_total", (("module", m),), n) for m, n in probes]
        out += [Sample("ws_exporter_probes_failed_total", (("module", m), ("reason", r)), n) for (m, r), n in failed]
        out.append(Sample("ws_exporter_probes_in_flight", (), in_flight))
        return out


def build_samples() -> List[Sample]:
    python = "%d.%d.%d" % sys.version_info[:3]
    info = (("version", __version__), ("python_version", python))
    impl = sys.implementation.name
    py_labels = (
        ("implementation", impl),
        ("major", str(sys.version_info[0])),
        ("minor", str(sys.version_info[1])),
        ("patchlevel", str(sys.version_info[2])),
        ("version", python),
    )
    return [Sample("ws_exporter_build_info", info, 1), Sample("python_info", py_labels, 1)]


def process_samples() -> List[Sample]:
    """process_* read from /proc where it exists (Linux); nothing elsewhere."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime"))
        open_fds = len(os.listdir("/proc/self/fd"))
    except (OSError, StopIteration, IndexError, ValueError):
        return []
    ticks = float(os.sysconf("SC_CLK_TCK"))
    out = [
        Sample("process_cpu_seconds_total", (), (float(fields[11]) + float(fields[12])) / ticks),
        Sample("process_virtual_memory_bytes", (), int(fields[20])),
        Sample("process_resident_memory_bytes", (), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")),
        Sample("process_start_time_seconds", (), boot + float(fields[19]) / ticks),
        Sample("process_open_fds", (), open_fds),
    ]
    max_fds = _max_fds()
    if max_fds:
        out.append(Sample("process_max_fds", (), max_fds))
    return out


def _max_fds() -> int:
    try:
        with open("/proc/self/limits", "r") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return 0


# ==============================================================================================
# Logging
# ==============================================================================================

_LOGFMT_BARE = re.compile(r"[A-Za-z0-9_.:/@<>+\-]+")


def _logfmt_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if value is None else str(value)
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


class Settings(NamedTuple):
    listen_address: str = DEFAULT_LISTEN_ADDRESS
    telemetry_path: str = "/metrics"
    probe_path: str = "/probe"
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    timeout_offset: float = DEFAULT_TIMEOUT_OFFSET_SECONDS
    log_level: str = "info"
    log_format: str = "logfmt"
    show_help: bool = False
    show_version: bool = False


class Exporter:
    """What the HTTP handlers share: settings, modules, counters and the log."""

    def __init__(self, settings: Settings, logger: Logger, modules: Optional[Dict[str, Module]] = None) -> None:
        self.settings = settings
        self.logger = logger
        self.modules = dict(DEFAULT_MODULES if modules is None else modules)
        self.stats = Stats()

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

    def probe(self, target: str, module: Module, timeout: float) -> Tuple[ProbeResult, ProbeLog]:
        result = ProbeResult(module.name, timeout)
        log = ProbeLog(self.logger, module=module.name, target=_redact_raw_target(target))
        self.stats.begin()
        try:
            run_probe(target, module, Deadline(timeout), result, log)
        finally:
            self.stats.end(result)
        if result.success:
            log.log("debug", "Probe succeeded", duration_seconds=round(result.total, 6))
        return result, log

    def telemetry(self) -> str:
        return render_samples(build_samples() + self.stats.samples() + process_samples())


def _redact_raw_target(raw: str) -> str:
    try:
        return parse_target(raw).redacted()
    except ProbeError:
        digest = hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest()[:8]
        return "<unparsable:%s>" % digest


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
</body>
</html>
"""



def debug_page(log: ProbeLog, metrics: str, module: Module) -> str:
    """The text a /probe?debug=true request answers with: log lines, metrics, module."""
    return "Logs for the probe:\n%s\n\nMetrics that would have been returned:\n%s\nModule configuration:\n%s\n" % (
        "\n".join(log.lines),
        metrics,
        json.dumps(module.settings(), indent=2, sort_keys=True),
    )


class _RequestReader(io.RawIOBase):
    """The socket as the HTTP handler reads it.  An idle keep-alive connection may wait
    KEEPALIVE_IDLE_SECONDS for its next request; once the first byte of a request arrives, the
    rest must arrive within REQUEST_READ_SECONDS, however slowly it drips."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.deadline: Optional[float] = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "bytearray | memoryview") -> int:  # type: ignore[override]
        if self.deadline is None:
            timeout = KEEPALIVE_IDLE_SECONDS
        else:
            timeout = self.deadline - time.monotonic()
            if timeout <= 0:
                raise socket.timeout("request not received within %gs" % REQUEST_READ_SECONDS)
        self.sock.settimeout(timeout)
        count = self.sock.recv_into(buffer)
        if count and self.deadline is None:
            self.deadline = time.monotonic() + REQUEST_READ_SECONDS
        return count


class _SocketWriter(io.BufferedIOBase):
    """Writes go out whole (sendall), under the response write timeout."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: "bytes | bytearray | memoryview") -> int:  # type: ignore[override]
        self.sock.settimeout(RESPONSE_WRITE_SECONDS)
        self.sock.sendall(data)
        return len(data)


_QUERY_IN_TEXT = re.compile(r"\?[^\s'\"]*")


class Handler(http.server.BaseHTTPRequestHandler):
    """/probe, the telemetry path, / and /-/healthy; GET and HEAD only."""

    server: "ExporterServer"
    protocol_version = "HTTP/1.1"
    server_version = "%s/%s" % (EXPORTER_NAME, __version__)
    sys_version = ""

    def setup(self) -> None:
        self.connection = self.request
        # The status line and headers go out before the body: with Nagle's algorithm the body
        # would wait for the client's delayed ACK of the head (up to 40 ms on Linux).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = _RequestReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)
        self.wfile = _SocketWriter(self.connection)

    def handle_one_request(self) -> None:
        self._reader.deadline = None
        super().handle_one_request()

    def __getattr__(self, name: str) -> Callable[[], None]:
        # Every method but GET and HEAD is answered 405 (BaseHTTPRequestHandler would say 501).
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self) -> None:
        self.respond(405, "Method Not Allowed\n", headers=(("Allow", "GET, HEAD"),))

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        settings = self.server.exporter.settings
        routes: Dict[str, Callable[[str], None]] = {
            settings.probe_path: self.serve_probe,
            settings.telemetry_path: self.serve_telemetry,
            "/": self.serve_landing,
            "/-/healthy": self.serve_healthy,
        }
        route = routes.get(url.path)
        if route is None:
            self.respond(404, "Not Found\n")
            return
        route(url.query)

    def serve_probe(self, query: str) -> None:
        exporter = self.server.exporter
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        try:
            target = single_param(params, "target")
            if not target:
                raise BadRequest("Target parameter is missing")
            module = lookup_module(single_param(params, "module") or "connect", exporter.modules)
            timeout = exporter.probe_timeout(module, self.headers.get(SCRAPE_TIMEOUT_HEADER))
            debug = (single_param(params, "debug") or "").lower() == "true"
        except BadRequest as err:
            self.respond(400, "%s\n" % err)
            return
        result, log = exporter.probe(target, module, timeout)
        metrics = render_samples(probe_samples(result))
        if debug:
            self.respond(200, debug_page(log, metrics, module))
        else:
            self.respond(200, metrics, EXPOSITION_CONTENT_TYPE)

    def serve_telemetry(self, query: str) -> None:
        self.respond(200, self.server.exporter.telemetry(), EXPOSITION_CONTENT_TYPE)

    def serve_landing(self, query: str) -> None:
        settings = self.server.exporter.settings
        page = LANDING_PAGE % {
            "version": __version__,
            "metrics": settings.telemetry_path,
            "probe": settings.probe_path,
        }
        self.respond(200, page, "text/html; charset=utf-8")

    def serve_healthy(self, query: str) -> None:
        self.respond(200, "Healthy\n")

    def respond(
        self,
        status: int,
        body: str,
        content_type: str = "text/plain; charset=utf-8",
        headers: Sequence[Tuple[str, str]] = (),
    ) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_request(self, code: Union[int, str] = "-", size: Union[int, str] = "-") -> None:
        path = self.path.partition("?")[0]  # the query carries targets: never logged
        self.server.exporter.logger.log("debug", "HTTP request", method=self.command, path=path, code=str(code))

    def log_message(self, format: str, *args: object) -> None:
        detail = _QUERY_IN_TEXT.sub("?<redacted>", format % args)
        self.server.exporter.logger.log("debug", "HTTP server", detail=detail)


class ExporterServer(http.server.ThreadingHTTPServer):
    """A thread per connection; handler threads never keep the process alive."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: Tuple[str, int], family: int, exporter: Exporter) -> None:
        self.address_family = family
        self.exporter = exporter
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # ":port" means every interface, IPv4 too: clear V6ONLY where the host allows it.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # HTTPServer.server_bind would look the host name up in DNS; nothing here needs it.
        http.server.socketserver.TCPServer.server_bind(self)  # type: ignore[attr-defined]
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def handle_error(self, request: object, client_address: object) -> None:
        self.exporter.logger.log("debug", "HTTP connection error", traceback=traceback.format_exc())


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


def make_server(exporter: Exporter) -> ExporterServer:
    """Bind the listen address: ":port" is every IPv4 and IPv6 interface where the host has both."""
    host, port = split_listen_address(exporter.settings.listen_address)
    if not host:
        if socket.has_dualstack_ipv6():
            return ExporterServer(("::", port), socket.AF_INET6, exporter)
        return ExporterServer(("0.0.0.0", port), socket.AF_INET, exporter)
    info = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
    return ExporterServer((str(info[4][0]), port), info[0], exporter)


def format_address(address: Tuple[object, ...]) -> str:
    host = str(address[0])
    return "%s:%s" % ("[%s]" % host if ":" in host else host, address[1])


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


def positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


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


class FlagSpec(NamedTuple):
    name: str
    field: str  # the Settings field it sets
    default: str
    help: str
    convert: Callable[[str], object]
    boolean: bool = False


FLAG_SPECS = (
    FlagSpec("web.listen-address", "listen_address", DEFAULT_LISTEN_ADDRESS, "Address to listen on for the web interface, probes and telemetry.", _listen_address),
    FlagSpec("web.telemetry-path", "telemetry_path", "/metrics", "Path under which to expose the exporter's own metrics.", _url_path),
    FlagSpec("web.probe-path", "probe_path", "/probe", "Path under which to expose the probe endpoint.", _url_path),
    FlagSpec("timeout", "timeout", "10s", "Probe timeout (Go duration: 500ms, 5s, 1m30s; a bare number is seconds).", positive_duration),
    FlagSpec("timeout-offset", "timeout_offset", "0.5", "Subtracted from the scraper's X-Prometheus-Scrape-Timeout-Seconds (seconds or duration).", parse_duration),
    FlagSpec("log.level", "log_level", "info", "Only log messages with the given severity or above: debug, info, warn, error.", _choice(LOG_LEVELS)),
    FlagSpec("log.format", "log_format", "logfmt", "Output format of log messages: logfmt or json.", _choice(LOG_FORMATS)),
    FlagSpec("debug", "log_level", "false", "Enable debug logging (same as --log.level=debug).", lambda v: "debug" if parse_bool(v) else None, True),
    FlagSpec("version", "show_version", "false", "Print the version and exit.", parse_bool, True),
    FlagSpec("help", "show_help", "false", "Show this help and exit.", parse_bool, True),
)


def parse_flags(argv: Sequence[str]) -> Settings:
    """Go-style flags: -flag value, -flag=value, --flag value, --flag=value; booleans bare."""
    specs = {spec.name: spec for spec in FLAG_SPECS}
    specs["h"] = specs["help"]
    values: Dict[str, object] = {}
    debug = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("-") or arg in ("-", "--") or arg.startswith("---"):
            raise FlagError("unexpected argument %r" % arg)
        name, eq, value = arg.lstrip("-").partition("=")
        spec = specs.get(name)
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
        else:
            values[spec.field] = converted
    if debug:
        values["log_level"] = "debug"
    return Settings(**values)  # type: ignore[arg-type]


def usage() -> str:
    lines = ["usage: ws_exporter.py [flags]", "", "%s %s: probes WebSocket endpoints for Prometheus." % (EXPORTER_NAME, __version__), "", "Flags:"]
    for spec in FLAG_SPECS:
        shown = "" if spec.boolean else "=%s" % spec.default
        lines.append("  --%s%s\n      %s" % (spec.name, shown, spec.help))
    return "\n".join(lines) + "\n"


# ==============================================================================================
# main
# ==============================================================================================


def install_stop_signals() -> Tuple[socket.socket, socket.socket]:
    """SIGTERM and SIGINT write their number to the first socket of the returned pair (keep both
    open).  The handlers do nothing: one that took a lock could deadlock against the main thread
    holding it."""
    receiver, sender = socket.socketpair()
    sender.setblocking(False)
    signal.set_wakeup_fd(sender.fileno())
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    return receiver, sender


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        settings = parse_flags(sys.argv[1:] if argv is None else argv)
    except FlagError as err:
        sys.stderr.write("ws_exporter: %s\n" % err)
        return 2
    if settings.show_help:
        sys.stdout.write(usage())
        return 0
    if settings.show_version:
        sys.stdout.write("%s %s (python %s)\n" % (EXPORTER_NAME, __version__, "%d.%d.%d" % sys.version_info[:3]))
        return 0
    logger = Logger(settings.log_level, settings.log_format)
    exporter = Exporter(settings, logger)
    try:
        server = make_server(exporter)
    except OSError as err:
        logger.log("error", "Cannot listen", address=settings.listen_address, err=str(err))
        return 1
    wakeup, _sender = install_stop_signals()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True).start()
    logger.log("info", "Listening", address=format_address(server.server_address), version=__version__)
    signum = wakeup.recv(1)
    logger.log("info", "Shutting down", signal=signal.Signals(signum[0]).name if signum else "")
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
