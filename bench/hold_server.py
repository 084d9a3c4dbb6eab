"""A WebSocket server that holds its 101 for a fixed delay, for timing-truth measurements.

    python3 hold_server.py DELAY_SECONDS|never [CERT_FILE KEY_FILE]

Prints its port (127.0.0.1, port 0) as the first stdout line, then one line per upgrade it
answered: ``RESOURCE DELAY_NS``, where DELAY_NS is the time from the moment the last bytes of the request
head reached this host (the kernel's receive timestamp, so this process's own scheduling delays
do not count) to the moment the 101 was handed to the kernel: what the server really did.
After the 101 it answers a close frame with a close frame.  One thread, epoll: no GIL contention,
so its own clock reads are not delayed by other threads.  Exits when stdin closes.

With a certificate and key it serves wss:// instead: TLS through memory buffers, so the request
head's arrival is still the kernel's stamp of the read that completed it, and the 101 counts as
sent once its encrypted record was handed to the kernel.

With ``never`` for the delay it is a silent server: it accepts and reads, never answers, and
keeps each connection until the client closes it.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import os
import selectors
import socket
import ssl
import struct
import sys
import time
from typing import Dict, List, Optional, Tuple

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SO_TIMESTAMPNS = 35  # Linux socket(7); the socket module does not name it
TIMESPEC = struct.Struct("@ll")
_SEQ = 0


class Conn:
    def __init__(self, sock: socket.socket, context: Optional[ssl.SSLContext]) -> None:
        self.sock = sock
        self.buf = b""
        self.upgraded = False
        self.closed = False
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True) if context else None
        self.handshaken = False

    def send(self, data: bytes) -> None:
        """``data`` (encrypted over TLS) and whatever TLS has queued, to the kernel."""
        if self.tls is not None:
            if data:
                self.tls.write(data)
            data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def plaintext(self, data: bytes) -> bytes:
        """What ``data`` from the socket carries for the application; raises ssl.SSLError."""
        if self.tls is None:
            return data
        self.incoming.write(data)
        if not self.handshaken:
            try:
                self.tls.do_handshake()
                self.handshaken = True
            except ssl.SSLWantReadError:
                pass
            self.send(b"")
        out = b""
        while self.handshaken:
            try:
                out += self.tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
        return out


def accept_value(head: bytes) -> Tuple[str, str]:
    lines = head.decode("latin-1").split("\r\n")
    resource = lines[0].split(" ")[1] if " " in lines[0] else "?"
    key = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "sec-websocket-key":
            key = value.strip()
    digest = hashlib.sha1(key.encode("ascii") + GUID).digest()
    return resource, base64.b64encode(digest).decode("ascii")


def main() -> None:
    delay_ns = -1 if sys.argv[1] == "never" else int(float(sys.argv[1]) * 1e9)
    context = None
    if len(sys.argv) > 3:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[2], sys.argv[3])
    sel = selectors.DefaultSelector()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    out = sys.stdout
    out.write("%d\n" % listener.getsockname()[1])
    out.flush()
    due: List[Tuple[int, int, Conn, str, bytes, int]] = []  # (when, seq, conn, resource, response, arrived)
    conns: Dict[int, Conn] = {}
    while True:
        timeout = None if not due else max(0.0, (due[0][0] - time.perf_counter_ns()) / 1e9)
        for key, _ in sel.select(timeout):
            if key.data == "stdin":
                if not os.read(sys.stdin.fileno(), 4096):
                    return
            elif key.data is None:
                accept_all(listener, sel, conns, context)
            else:
                on_readable(conns, key.data, sel, due, delay_ns)
        now = time.perf_counter_ns()
        while due and due[0][0] <= now:
            _, _, conn, resource, response, arrived = heapq.heappop(due)
            if conn.closed:
                continue
            try:
                conn.send(response)
            except OSError:
                drop(conns, conn.sock.fileno(), sel)
                continue
            sent = time.perf_counter_ns()
            conn.upgraded = True
            out.write("%s %d\n" % (resource, sent - arrived))
            now = sent
        out.flush()


def accept_all(listener: socket.socket, sel: selectors.BaseSelector, conns: Dict[int, Conn],
               context: Optional[ssl.SSLContext]) -> None:
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        conns[sock.fileno()] = Conn(sock, context)
        sel.register(sock, selectors.EVENT_READ, sock.fileno())


def on_readable(conns: Dict[int, Conn], fd: int, sel: selectors.BaseSelector, due: list, delay_ns: int) -> None:  # type: ignore[type-arg]
    conn = conns[fd]
    try:
        data, ancillary, _, _ = conn.sock.recvmsg(65536, socket.CMSG_SPACE(TIMESPEC.size))
    except OSError:
        data, ancillary = b"", []
    if not data:
        drop(conns, fd, sel)
        return
    arrived = arrival_ns(ancillary)
    try:
        data = conn.plaintext(data)
    except (ssl.SSLError, OSError):
        drop(conns, fd, sel)
        return
    if conn.upgraded:
        # A client close frame (masked): answer it with close 1000 and hang up.
        if len(data) >= 2 and data[0] & 0x0F == 0x8:
            try:
                conn.send(struct.pack("!BBH", 0x88, 2, 1000))
            except OSError:
                pass
            drop(conns, fd, sel)
        return
    if delay_ns < 0:  # silent
        return
    conn.buf += data
    end = conn.buf.find(b"\r\n\r\n")
    if end < 0:
        return
    resource, accept = accept_value(conn.buf[:end])
    response = (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Accept: %s\r\n\r\n" % accept
    ).encode("ascii")
    conn.buf = b""
    global _SEQ
    _SEQ += 1
    heapq.heappush(due, (arrived + delay_ns, _SEQ, conn, resource, response, arrived))


def arrival_ns(ancillary: list) -> int:  # type: ignore[type-arg]
    """The kernel's receive timestamp (wall clock) mapped onto perf_counter_ns()."""
    now = time.perf_counter_ns()
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= TIMESPEC.size:
            seconds, nanoseconds = TIMESPEC.unpack_from(payload)
            return now - (time.time_ns() - (int(seconds) * 1_000_000_000 + int(nanoseconds)))
    return now


def drop(conns: Dict[int, Conn], fd: int, sel: selectors.BaseSelector) -> None:
    conn = conns.pop(fd, None)
    if conn is not None:
        conn.closed = True
        sel.unregister(conn.sock)
        conn.sock.close()


if __name__ == "__main__":
    main()
