"""WebSocket target server for bench/soak.py: one behaviour per path, and answers that name
their target, so that a result delivered to the wrong target shows.

    python3 soak_server.py PORT        (0: a port chosen by the system)

Listens on 127.0.0.1:PORT (with SO_REUSEADDR, so that a server killed and started again gets
its port back at once), prints the port as its first line of output, and exits when its
standard input closes (so it never outlives the soak that started it).  One thread, a selector.

Paths (ID a number below 2000):

    /ok/ID            101 at once
    /slow/ID/MS       101 MS milliseconds after the request head arrived
    /silent/ID        reads the request and never answers (the connection stays open until
                      the client closes it)
    /status/ID/CODE   answers HTTP CODE (429 with Retry-After: 1) and closes
    /hangup/ID        closes the connection as soon as the request head is in
    /partial/ID       sends a 101 status line and one header, then closes
    anything else     404

After a 101 the server answers a ping with its pong and the client's close frame with a close
frame of code 3000 + ID, then closes the connection: the close code the exporter reports
(probe_websocket_close_code) is the target's own.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import os
import selectors
import socket
import struct
import sys
import time
from typing import Dict, List, Optional, Tuple

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 65536
CLOSE_BASE = 3000


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.upgraded = False
        self.silent = False
        self.target_id = 0
        self.closed = False


class Server:
    def __init__(self, port: int) -> None:
        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(1024)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "listener")
        self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
        self.conns: Dict[int, Conn] = {}
        self.due: List[Tuple[float, int, Conn, bytes]] = []  # (when, seq, conn, 101 response)
        self.seq = 0

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def run(self) -> None:
        while True:
            timeout = 1.0 if not self.due else max(0.0, min(1.0, self.due[0][0] - time.monotonic()))
            for key, _ in self.sel.select(timeout):
                if key.data == "stdin":
                    if not os.read(sys.stdin.fileno(), 4096):
                        return
                elif key.data == "listener":
                    self.accept_all()
                else:
                    conn = self.conns.get(key.data)
                    if conn is not None:
                        self.on_readable(conn)
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                _, _, conn, response = heapq.heappop(self.due)
                if not conn.closed:
                    self.upgrade(conn, response)

    def accept_all(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors and the like: try again at the next event
                return
            sock.setblocking(False)
            conn = Conn(sock)
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, sock.fileno())

    def drop(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.conns.pop(conn.sock.fileno(), None)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def send(self, conn: Conn, data: bytes) -> bool:
        try:
            conn.sock.sendall(data)  # small writes to a fresh socket: its buffer takes them
            return True
        except OSError:
            self.drop(conn)
            return False

    def on_readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop(conn)
            return
        if conn.silent:
            return
        conn.buf += data
        if conn.upgraded:
            self.on_frames(conn)
            return
        end = conn.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.buf) > MAX_HEAD:
                self.drop(conn)
            return
        head, conn.buf = conn.buf[:end], conn.buf[end + 4:]
        self.on_request(conn, head)

    def on_request(self, conn: Conn, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        path = parts[1] if len(parts) > 1 else "/"
        key = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-key":
                key = value.strip()
        words = path.split("?")[0].strip("/").split("/")
        kind = words[0]
        try:
            conn.target_id = int(words[1]) if len(words) > 1 else 0
            arg = int(words[2]) if len(words) > 2 else 0
        except ValueError:
            kind, arg = "", 0
        accept = base64.b64encode(hashlib.sha1(key.encode("latin-1") + GUID).digest()).decode("ascii")
        response = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Accept: %s\r\n\r\n" % accept).encode("ascii")
        if kind == "ok":
            self.upgrade(conn, response)
        elif kind == "slow":
            self.seq += 1
            heapq.heappush(self.due, (time.monotonic() + arg / 1000.0, self.seq, conn, response))
        elif kind == "silent":
            conn.silent = True
        elif kind == "status" and 100 <= arg <= 599:
            extra = "Retry-After: 1\r\n" if arg == 429 else ""
            self.send(conn, ("HTTP/1.1 %d Soak\r\nContent-Length: 0\r\n%sConnection: close\r\n\r\n"
                             % (arg, extra)).encode("ascii"))
            self.drop(conn)
        elif kind == "hangup":
            self.drop(conn)
        elif kind == "partial":
            self.send(conn, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n")
            self.drop(conn)
        else:
            self.send(conn, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.drop(conn)

    def upgrade(self, conn: Conn, response: bytes) -> None:
        if self.send(conn, response):
            conn.upgraded = True
            if conn.buf:
                self.on_frames(conn)

    def on_frames(self, conn: Conn) -> None:
        """Client frames (masked): a ping gets its pong, a close the target's close code."""
        while not conn.closed:
            frame = parse_frame(conn.buf)
            if frame is None:
                return
            opcode, payload, used = frame
            conn.buf = conn.buf[used:]
            if opcode == 0x9:  # ping
                self.send(conn, bytes([0x8A, len(payload)]) + payload if len(payload) < 126 else b"")
            elif opcode == 0x8:  # close
                code = CLOSE_BASE + conn.target_id
                self.send(conn, struct.pack("!BBH", 0x88, 2, code))
                self.drop(conn)


def parse_frame(buf: bytes) -> Optional[Tuple[int, bytes, int]]:
    """(opcode, unmasked payload, bytes used) of the first whole frame in ``buf``, or None."""
    if len(buf) < 2:
        return None
    opcode, length, pos = buf[0] & 0x0F, buf[1] & 0x7F, 2
    if length == 126:
        if len(buf) < 4:
            return None
        length, pos = struct.unpack("!H", buf[2:4])[0], 4
    elif length == 127:
        if len(buf) < 10:
            return None
        length, pos = struct.unpack("!Q", buf[2:10])[0], 10
    mask = b""
    if buf[1] & 0x80:
        if len(buf) < pos + 4:
            return None
        mask, pos = buf[pos:pos + 4], pos + 4
    if len(buf) < pos + length:
        return None
    payload = buf[pos:pos + length]
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return opcode, payload, pos + length


def main() -> None:
    server = Server(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    sys.stdout.write("%d\n" % server.port)
    sys.stdout.flush()
    server.run()


if __name__ == "__main__":
    main()
