#!/usr/bin/env python3
"""Benchmark ws_exporter.py against blackbox_exporter on this machine, in one run.

    bash .ci/peers && . .cache/peers/env.sh && python3 bench/run.py [--smoke] [--rounds N] [--duration S]

Starts a node ``ws`` server (plain and TLS, certificates from the openssl CLI in a temp dir),
ws_exporter.py and blackbox_exporter (a ``tcp`` module that sends the upgrade request and expects
``^HTTP/1.1 101``; its http prober cannot, it waits for a body after the 101), then loads each
exporter with wrk over keep-alive connections, alternating A B A B, and reports medians:
probes/s, latency p50/p99, exporter CPU per probe, peak RSS.  Then timing truth (the ``upgrade``
phase against a server that holds its 101 for exactly 50 ms), RSS idle and with 256 probes in
flight, 1,000 probes at once to a silent target (one that accepts and never answers) under a 2 s
scrape timeout, and the time from spawn to the first answered request.  Each figure with a floor
is marked ok or MISSED; the exit status reports errors (failed probes, non-2xx answers under
load), not missed floors.

Ours is started as users start it, ``python3 ws_exporter.py ARGS`` in its own directory, and is
one process: RSS is VmRSS of /proc/PID/status, peak RSS its VmHWM (reset at the start of each
case through /proc/PID/clear_refs) or the largest VmRSS sampled, threads its Threads, CPU the
utime + stime of /proc/PID/stat.  blackbox_exporter is measured the same way.

Installs nothing: every peer comes from the WS_* environment variables of .cache/peers/env.sh.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import http.client
import os
import re
import resource
import select
import selectors
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from types import TracebackType
from typing import IO, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Type

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXPORTER = os.path.join(ROOT, "ws_exporter.py")
EXPORTER_ARGS: List[str] = []  # --exporter-arg, appended to our exporter's command line
HOLD_SERVER = os.path.join(HERE, "hold_server.py")
REFERENCE = os.path.join(HERE, "reference_exporter.py")
METRICS_POLLER = os.path.join(HERE, "metrics_poller.py")
NODE_ECHO_SERVER = os.path.join(HERE, "node_echo_server.js")
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0
NAN = float("nan")

TIMING_DELAY = 0.050
HOLD_DELAY = 2.0
IN_FLIGHT = 256
WARMUP_SECONDS = 2  # of load through each exporter before each case's measured rounds (--smoke: 1; wrk wants whole seconds)

# The silent case: SILENT_PROBES scrapes of /probe at once, each with a scrape timeout of
# SILENT_SCRAPE_TIMEOUT s (a probe deadline of 1.5 s after the default --timeout-offset), to a
# target that accepts and never answers; ours started with SILENT_ARGS.
SILENT_PROBES = 1000
SILENT_PROBES_SMOKE = 100
SILENT_SCRAPE_TIMEOUT = 2.0
SILENT_ARGS = ["--probe.max-concurrent=1100", "--web.max-connections=1200"]
SILENT_THREADS_WAIT = 3.0  # s after the last answer for the exporter's threads to be back to their count before

# Floors (ours, or ours against blackbox_exporter); see the table the bench prints.
FLOOR_WS_RATE = 0.8  # ws:// probes/s, c=16 and c=64, >= this times blackbox's
FLOOR_WSS_RATE = 0.85  # wss:// probes/s, c=16
FLOOR_WSS_CPU = 1.25  # wss:// exporter CPU per probe, <= this times blackbox's
FLOOR_REFERENCE_CPU = 1.25  # exporter CPU per probe, c=16, ws:// and wss://, <= this times the design reference's
FLOOR_UPGRADE_P99_MS = 2.0  # upgrade-phase error p99, c=64
FLOOR_SILENT_LAST_S = 2.3
FLOOR_SILENT_METRICS_S = 0.2
FLOOR_SILENT_RSS_MB = 150.0
FLOOR_IDLE_RSS_MB = 32.0
FLOOR_START_MS = 200.0

# blackbox's tcp prober writes each `send` followed by "\n": the request ends in "\r" so that
# every line ends in CRLF.
UPGRADE_REQUEST = (
    "GET / HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\nSec-WebSocket-Version: 13\\r\\n\\r"
)
BLACKBOX_CONFIG = """modules:
  ws:
    prober: tcp
    timeout: 10s
    tcp:
      query_response:
        - send: "%(request)s"
        - expect: "^HTTP/1.1 101"
  wss:
    prober: tcp
    timeout: 10s
    tcp:
      tls: true
      tls_config:
        ca_file: "%(ca)s"
      query_response:
        - send: "%(request)s"
        - expect: "^HTTP/1.1 101"
"""


def env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        sys.exit("bench: %s is not set: run `bash .ci/peers && . .cache/peers/env.sh` first" % name)
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile_limit() -> int:
    """Raises this process's RLIMIT_NOFILE to its hard limit, and returns the new soft limit.
    Every child started afterwards (the exporters, the servers, wrk) inherits it: a thousand
    probes at once take a thousand client sockets here, and two descriptors each in an exporter."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # an unlimited hard limit cannot be the soft one
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ----------------------------------------------------------------------------------------------
# One process's figures, from /proc
# ----------------------------------------------------------------------------------------------


class Status(NamedTuple):
    rss_mb: float  # VmRSS
    hwm_mb: float  # VmHWM: the peak RSS since start, or since the last reset_peak
    threads: int


def status(pid: int) -> Status:
    """/proc/PID/status; raises OSError once the process is gone."""
    found: Dict[str, int] = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                found[key] = int(value.split()[0])
    return Status(found.get("VmRSS", 0) / 1024, found.get("VmHWM", 0) / 1024, found.get("Threads", 0))


def stat_fields(pid: int) -> List[bytes]:
    """/proc/PID/stat after the command name: index 0 is the state (field 3), 1 the ppid."""
    with open("/proc/%d/stat" % pid, "rb") as f:
        return f.read().rpartition(b")")[2].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, all its threads."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def reset_peak(pid: int) -> bool:
    """Sets the process's VmHWM back to its current RSS (clear_refs 5, Linux 4.0+); False where
    that is not allowed, and VmHWM is the peak since start."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_pids(pid: int) -> List[int]:
    """Processes whose parent is ``pid``: ours is measured as one process, and should start none."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):  # exited meanwhile
                if int(stat_fields(int(name))[1]) == pid:
                    found.append(int(name))
    return found


class Peaks:
    """The peak RSS and thread count of one process while a ``with`` block runs: its VmHWM, reset
    on entry, and VmRSS and Threads sampled every ``interval`` s (the samples alone give the
    RSS peak where the reset is not allowed)."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.rss_mb = 0.0
        self.threads = 0
        self._exact = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Peaks":
        self._exact = reset_peak(self.pid)
        self._take()
        self._thread.start()
        return self

    def __exit__(self, kind: Optional[Type[BaseException]], value: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def _take(self) -> None:
        with contextlib.suppress(OSError):
            now = status(self.pid)
            self.rss_mb = max(self.rss_mb, now.rss_mb, now.hwm_mb if self._exact else 0.0)
            self.threads = max(self.threads, now.threads)


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------


class Peer(NamedTuple):
    proc: "subprocess.Popen[bytes]"
    port: int


def spawn_port_printer(argv: List[str], extra_env: Dict[str, str]) -> Peer:
    """A child that prints its port as the first stdout line and exits when stdin closes."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, **extra_env))
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline() if ready else b""
    if not line.strip().isdigit():
        proc.kill()
        sys.exit("bench: %s did not print its port" % argv[0])
    return Peer(proc, int(line))


def start_node(tls: Optional[Tuple[str, str]]) -> Peer:
    argv = [env("WS_PEER_NODE"), NODE_ECHO_SERVER] + (list(tls) if tls else [])
    peer = spawn_port_printer(argv, {"NODE_PATH": env("WS_PEER_NODE_PATH")})
    threading.Thread(target=_drain, args=(peer.proc.stdout,), daemon=True).start()
    return peer


def _drain(stream: Optional[IO[bytes]]) -> None:
    try:
        while stream is not None and stream.read(65536):
            pass
    except (OSError, ValueError):
        pass


class HoldServer:
    """hold_server.py in a child process; collects its (resource, delay) records.  ``delay``
    "never": a silent server, it accepts and reads, and never answers."""

    def __init__(self, delay: str, cert_and_key: Tuple[str, ...] = ()) -> None:
        self.tls = bool(cert_and_key)  # wss://
        self.peer = spawn_port_printer([sys.executable, HOLD_SERVER, delay, *cert_and_key], {})
        self.port = self.peer.port
        self.records: Dict[str, float] = {}  # resource -> real delay (s), the last one per resource
        self.delays: List[float] = []  # every real delay, in order
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.peer.proc.stdout is not None
        for raw in self.peer.proc.stdout:
            resource_name, _, ns = raw.decode().strip().partition(" ")
            with self._lock:
                self.records[resource_name] = int(ns) / 1e9
                self.delays.append(int(ns) / 1e9)
                self._done.notify_all()

    def wait_count(self, count: int, timeout: float = 5.0) -> None:
        with self._lock:
            self._done.wait_for(lambda: len(self.delays) >= count, timeout)

    def stop(self) -> None:
        stop(self.peer.proc)


def stop(proc: "subprocess.Popen[bytes]") -> None:
    if proc.poll() is None:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Exporter(NamedTuple):
    name: str
    proc: "subprocess.Popen[bytes]"
    port: int
    spawned: float  # time.monotonic() just before Popen
    probe_url: Callable[[str, int, bool], str]  # (resource, server port, tls) -> request path
    stderr: str  # the file its standard error goes to

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str) -> str:
        return "http://127.0.0.1:%d%s" % (self.port, path)


def ours_probe_path(resource_name: str, port: int, tls: bool) -> str:
    return "/probe?target=%s://127.0.0.1:%d%s" % ("wss" if tls else "ws", port, resource_name)


def blackbox_probe_path(resource_name: str, port: int, tls: bool) -> str:
    # The tcp module's request line is fixed ("GET /"): the resource cannot vary per probe.
    return "/probe?target=127.0.0.1:%d&module=%s" % (port, "wss" if tls else "ws")


def ours_argv(port: int, extra: Sequence[str] = ()) -> List[str]:
    """``python3 ws_exporter.py ARGS``, run in the exporter's directory."""
    return ([sys.executable, os.path.basename(EXPORTER), "--web.listen-address=127.0.0.1:%d" % port,
             "--log.level=warn"] + list(extra) + EXPORTER_ARGS)


def start_ours(ca: str, tmp: str, extra: Sequence[str] = ()) -> Exporter:
    """``ca``: trusted for wss:// probes (SSL_CERT_FILE), "" for the system's store."""
    port = free_port()
    fd, log = tempfile.mkstemp(prefix="ours-", suffix=".log", dir=tmp)
    with os.fdopen(fd, "wb") as stderr:
        spawned = time.monotonic()
        proc = subprocess.Popen(ours_argv(port, extra), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr, env=dict(os.environ, **({"SSL_CERT_FILE": ca} if ca else {})),
                                cwd=os.path.dirname(EXPORTER))
    return Exporter("ours", proc, port, spawned, ours_probe_path, log)


def start_reference(ca: str, tmp: str) -> Exporter:
    """bench/reference_exporter.py: the smallest exporter of our design, the floor under ours."""
    port = free_port()
    fd, log = tempfile.mkstemp(prefix="reference-", suffix=".log", dir=tmp)
    with os.fdopen(fd, "wb") as stderr:
        spawned = time.monotonic()
        proc = subprocess.Popen([sys.executable, REFERENCE, str(port)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr, env=dict(os.environ, SSL_CERT_FILE=ca))
    return Exporter("reference", proc, port, spawned, ours_probe_path, log)


def start_blackbox(config: str, tmp: str) -> Exporter:
    port = free_port()
    argv = [env("WS_BLACKBOX_EXPORTER"), "--config.file=" + config, "--web.listen-address=127.0.0.1:%d" % port,
            "--log.level=warn"]
    fd, log = tempfile.mkstemp(prefix="blackbox-", suffix=".log", dir=tmp)
    with os.fdopen(fd, "wb") as stderr:
        spawned = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    return Exporter("blackbox", proc, port, spawned, blackbox_probe_path, log)


def wait_healthy(exporter: Exporter) -> float:
    """Milliseconds from spawn to the first 200 on /-/healthy."""
    deadline = exporter.spawned + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=2)
            conn.request("GET", "/-/healthy")
            if conn.getresponse().status == 200:
                conn.close()
                return (time.monotonic() - exporter.spawned) * 1000
            conn.close()
        except OSError:
            pass
        if exporter.proc.poll() is not None:
            break
        time.sleep(0.002)
    with open(exporter.stderr, errors="replace") as f:
        tail = f.read()[-2000:]
    sys.exit("bench: %s did not become healthy; its stderr ends:\n%s" % (exporter.name, tail))


def idle_status(exporter: Exporter, quiet: float = 0.5) -> Status:
    """The process's figures ``quiet`` s after its first answer."""
    time.sleep(quiet)
    return status(exporter.pid)


# ----------------------------------------------------------------------------------------------
# Load (wrk)
# ----------------------------------------------------------------------------------------------


class LoadResult(NamedTuple):
    rate: float  # probes/s
    p50_ms: float
    p99_ms: float
    cpu_ms: float  # the exporter's CPU ms per probe
    peak_rss_mb: float
    errors: int  # non-2xx answers and socket errors
    server_cpu_ms: float  # the probed node ws server's CPU ms per probe


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if match is None:
        print("bench: unparsable wrk latency %r" % text, file=sys.stderr)
        return float("nan")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _search(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.M)
    if match is None:
        sys.exit("bench: no %r in wrk's output:\n%s" % (pattern, text))
    return match.group(1)


def run_wrk(url: str, connections: int, duration: float, threads: int = 2) -> Tuple[int, float, float, float, int]:
    """(requests, requests/s, p50 ms, p99 ms, errors) of one wrk run."""
    argv = [env("WS_WRK"), "-t%d" % min(threads, connections), "-c%d" % connections, "-d%gs" % duration,
            "--timeout", "10s", "--latency", url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                         env=dict(os.environ, LD_LIBRARY_PATH=env("WS_WRK_LD_LIBRARY_PATH"))).stdout
    requests = int(_search(r"(\d+) requests in", out))
    rate = float(_search(r"Requests/sec:\s+([0-9.]+)", out))
    p50 = _ms(_search(r"^\s+50%\s+(\S+)", out))
    p99 = _ms(_search(r"^\s+99%\s+(\S+)", out))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return requests, rate, p50, p99, errors


def load(exporter: Exporter, path: str, connections: int, duration: float, server: int) -> LoadResult:
    """One wrk run; ``server`` is the probed server's pid: the machine's cores are shared by
    wrk, the exporter and the server, so what a probe costs the server counts too."""
    before, server_before = cpu_seconds(exporter.pid), cpu_seconds(server)
    with Peaks(exporter.pid, 0.05) as peaks:
        requests, rate, p50, p99, errors = run_wrk(exporter.url(path), connections, duration)
    used, server_used = cpu_seconds(exporter.pid) - before, cpu_seconds(server) - server_before
    per_probe_ms = 1000 / max(requests, 1)
    return LoadResult(rate, p50, p99, used * per_probe_ms, peaks.rss_mb, errors, server_used * per_probe_ms)


def check_probe(exporter: Exporter, path: str) -> bool:
    """One probe through the exporter answers probe_success 1."""
    conn = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=15)
    try:
        conn.request("GET", path)
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    return re.search(r"^probe_success 1$", body, re.M) is not None


# ----------------------------------------------------------------------------------------------
# Timing truth
# ----------------------------------------------------------------------------------------------


_UPGRADE = re.compile(r'^probe_websocket_duration_seconds\{phase="upgrade"\} (\S+)$', re.M)
_DURATION = re.compile(r"^probe_duration_seconds (\S+)$", re.M)


def scrape_many(exporter: Exporter, paths: Sequence[str]) -> Dict[str, str]:
    """GET every path over one keep-alive connection; path -> body."""
    conn = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=30)
    bodies = {}
    try:
        for path in paths:
            conn.request("GET", path)
            bodies[path] = conn.getresponse().read().decode()
    finally:
        conn.close()
    return bodies


def timing_errors(exporter: Exporter, server: HoldServer, concurrency: int, per_client: int, tag: str) -> List[float]:
    """Milliseconds by which the exporter's measurement exceeds the server's real delay.

    Ours: the upgrade phase, matched to the server's record by a unique resource per probe.
    Blackbox: its tcp module has a fixed request line and no phase timings, so its whole
    probe_duration_seconds is compared with the median real delay of the same run."""
    plans = [["/%s-%d-%d" % (tag, c, i) for i in range(per_client)] for c in range(concurrency)]
    results: List[Dict[str, str]] = [{} for _ in plans]
    start_count = len(server.delays)

    def client(index: int) -> None:
        paths = [exporter.probe_url(resource_name, server.port, server.tls) for resource_name in plans[index]]
        results[index] = dict(zip(plans[index], scrape_many(exporter, paths).values()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.wait_count(start_count + concurrency * per_client)
    errors = []
    real_median = statistics.median(server.delays[start_count:] or [TIMING_DELAY])
    for bodies in results:
        for resource_name, body in bodies.items():
            if exporter.name == "ours":
                match, real = _UPGRADE.search(body), server.records.get(resource_name)
            else:
                match, real = _DURATION.search(body), real_median
            if match is not None and real is not None:
                errors.append((float(match.group(1)) - real) * 1000)
    return errors


def in_flight_rss(exporter: Exporter, server: HoldServer) -> float:
    """The peak RSS (MB) while IN_FLIGHT probes wait for a 101 that takes HOLD_DELAY s."""
    url = exporter.url(exporter.probe_url("/hold", server.port, False))
    with Peaks(exporter.pid) as peaks:
        run_wrk(url, IN_FLIGHT, HOLD_DELAY + 1.0, threads=2)
    return peaks.rss_mb


# ----------------------------------------------------------------------------------------------
# Many probes at once to a silent target
# ----------------------------------------------------------------------------------------------


class Answer(NamedTuple):
    status: int  # 0: no complete answer (refused, reset, or still open at the bench's own timeout)
    seconds: float  # from the burst's first connect to the answer's last byte, or to the failure
    body: bytes
    sent_s: float  # from the burst's first connect to sending this request; nan: never sent


def _parse_answer(data: bytes, eof: bool) -> Optional[Tuple[int, bytes]]:
    """(status, body) once ``data`` holds a whole HTTP/1.1 answer; None while it does not.  At
    ``eof`` an answer without Content-Length ends there, an incomplete one counts as status 0."""
    head_end = data.find(b"\r\n\r\n")
    if head_end >= 0:
        head = data[:head_end].decode("latin-1").split("\r\n")
        parts = head[0].split(" ")
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        length = None
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length" and value.strip().isdigit():
                length = int(value.strip())
        body = data[head_end + 4:]
        if length is not None and len(body) >= length:
            return code, body[:length]
        if eof:
            return (code, body) if length is None else (0, body)
    return (0, b"") if eof else None


def burst(port: int, path: str, count: int, headers: Dict[str, str], timeout: float = 20.0) -> List[Answer]:
    """``count`` GETs of ``path`` at once, each on its own connection (Connection: close), from
    this one thread: non-blocking sockets and a selector, so the client is never the bottleneck
    (sending a request takes a few microseconds), and every request is sent as soon as its
    connection is open."""
    request = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%sConnection: close\r\n\r\n"
               % (path, port, "".join("%s: %s\r\n" % item for item in headers.items()))).encode("latin-1")
    sel = selectors.DefaultSelector()
    received: Dict[socket.socket, bytearray] = {}
    sent: Dict[socket.socket, float] = {}
    answers: List[Answer] = []
    start = time.monotonic()

    def finish(sock: socket.socket, code: int, body: bytes) -> None:
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(sock)
        sock.close()
        received.pop(sock, None)
        answers.append(Answer(code, time.monotonic() - start, body, sent.pop(sock, NAN)))

    def send(sock: socket.socket) -> None:
        try:
            sock.send(request)  # a new socket's buffer takes the whole request
        except OSError:
            finish(sock, 0, b"")
            return
        sent[sock] = time.monotonic() - start
        received[sock] = bytearray()
        sel.register(sock, selectors.EVENT_READ)

    for _ in range(count):
        new = socket.socket()
        new.setblocking(False)
        err = new.connect_ex(("127.0.0.1", port))
        if err == 0:
            send(new)
        elif err == errno.EINPROGRESS:
            sel.register(new, selectors.EVENT_WRITE)
        else:
            finish(new, 0, b"")
    deadline = start + timeout
    while sel.get_map() and time.monotonic() < deadline:
        for key, events in sel.select(max(0.0, deadline - time.monotonic())):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if events & selectors.EVENT_WRITE:
                sel.unregister(sock)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    finish(sock, 0, b"")
                else:
                    send(sock)
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            buffer = received[sock]
            buffer += data
            parsed = _parse_answer(bytes(buffer), eof=not data)
            if parsed is not None:
                finish(sock, *parsed)
    for key in list(sel.get_map().values()):
        assert isinstance(key.fileobj, socket.socket)
        finish(key.fileobj, 0, b"")
    return answers


class MetricsPoller:
    """metrics_poller.py in a child process while a ``with`` block runs: GET /metrics every
    ``interval`` s, each on a new connection; the latency of each (a failed one's counts until its
    failure) and the failures."""

    def __init__(self, port: int, interval: float = 0.05) -> None:
        self.argv = [sys.executable, "-S", METRICS_POLLER, str(port), "/metrics", str(interval)]
        self.latencies: List[float] = []
        self.failures = 0
        self.proc: Optional["subprocess.Popen[bytes]"] = None

    def __enter__(self) -> "MetricsPoller":
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline() != b"ready\n":
            sys.exit("bench: metrics_poller.py did not start")
        return self

    def __exit__(self, kind: Optional[Type[BaseException]], value: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        assert self.proc is not None
        out, _ = self.proc.communicate(timeout=30)  # closes its stdin: it stops after the request under way
        for line in out.decode().splitlines():
            latency, code = line.split()
            self.latencies.append(float(latency))
            self.failures += code != "200"


class SilentResult(NamedTuple):
    probes: int
    statuses: Dict[int, int]  # status -> answers; 0: no answer
    failed_probes: int  # answers 200 with probe_success 0, as every one should be
    last_sent_s: float  # from the first connect: how long the client took to send every request
    first_answer_s: float  # from the first connect
    last_answer_s: float  # from the first connect
    metrics_max_s: float  # the slowest GET /metrics meanwhile
    metrics_count: int
    metrics_failures: int
    peak_rss_mb: float
    cpu_ms: float  # the exporter's CPU ms per probe, the wait for its threads included
    threads_before: int
    threads_peak: int
    threads_after: int
    threads_back_s: float  # s after the last answer until the threads were back to before; nan: not within the wait


def silent_probes(exporter: Exporter, target_port: int, count: int,
                  threads_wait: float = SILENT_THREADS_WAIT) -> SilentResult:
    """``count`` probes at once of a target that accepts and never answers, each scraped with a
    scrape timeout of SILENT_SCRAPE_TIMEOUT s, while /metrics is scraped every 50 ms and the
    exporter's RSS and threads are sampled every 20 ms; then up to ``threads_wait`` s for its
    threads to be back to their count before."""
    path = exporter.probe_url("/", target_port, False)
    headers = {"X-Prometheus-Scrape-Timeout-Seconds": "%g" % SILENT_SCRAPE_TIMEOUT}
    threads_before = status(exporter.pid).threads
    cpu_before = cpu_seconds(exporter.pid)
    with Peaks(exporter.pid) as peaks:
        with MetricsPoller(exporter.port) as poller:
            answers = burst(exporter.port, path, count, headers)
        after, waited = threads_before, 0.0
        last = time.monotonic()
        while waited <= threads_wait:
            after = status(exporter.pid).threads
            if after <= threads_before:
                break
            time.sleep(0.05)
            waited = time.monotonic() - last
    statuses = collections.Counter(a.status for a in answers)
    failed = sum(1 for a in answers if a.status == 200 and re.search(rb"^probe_success 0$", a.body, re.M))
    return SilentResult(
        count, dict(statuses), failed, max((a.sent_s for a in answers), default=NAN),
        min((a.seconds for a in answers), default=NAN), max((a.seconds for a in answers), default=NAN),
        max(poller.latencies, default=NAN), len(poller.latencies), poller.failures, peaks.rss_mb,
        (cpu_seconds(exporter.pid) - cpu_before) * 1000 / count, threads_before, peaks.threads, after,
        waited if after <= threads_before else NAN)


# ----------------------------------------------------------------------------------------------
# PKI and configuration
# ----------------------------------------------------------------------------------------------


def make_pki(directory: str) -> Dict[str, str]:
    """A CA and a server certificate for 127.0.0.1 and localhost, with the openssl CLI."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # Python 3.13 verifies strictly (X509 strict)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    with open(os.path.join(directory, "ext.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return {name: os.path.join(directory, name) for name in ("ca.pem", "server.pem", "server.key")}


def write_blackbox_config(directory: str, ca: str) -> str:
    path = os.path.join(directory, "blackbox.yml")
    with open(path, "w") as f:
        f.write(BLACKBOX_CONFIG % {"request": UPGRADE_REQUEST, "ca": ca})
    return path


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------



def ratio(ours: float, theirs: float) -> str:
    if theirs == 0 or ours != ours or theirs != theirs:
        return "-"
    return "%.2fx" % (ours / theirs)


class Table:
    """The report's lines, and the floors met and missed."""

    HEAD = "%-46s %12s %12s %7s %12s %7s  %-12s %s"

    def __init__(self) -> None:
        self.lines: List[str] = []
        self.missed: List[str] = []
        self.met = 0

    def text(self, line: str = "") -> None:
        self.lines.append(line)

    def cells(self, label: str, ours: str, theirs: str, ratio_text: str = "", floor: str = "",
              met: Optional[bool] = None, reference: str = "", reference_ratio: str = "") -> None:
        """One row; ``met`` None: no floor, True or False: the floor's verdict for ours."""
        verdict = "" if met is None else "ok" if met else "MISSED"
        if met is not None:
            self.met += met
            if not met:
                self.missed.append("%s: %s%s, floor %s" % (label, ours.strip(), ratio_text and " (%s)" % ratio_text, floor))
        self.lines.append((self.HEAD % (label, ours, theirs, ratio_text, reference, reference_ratio, floor, verdict)).rstrip())

    def row(self, label: str, ours: float, theirs: float, fmt: str = "%.1f", floor: str = "",
            met: Optional[bool] = None, show_ratio: bool = True, reference: Optional[float] = None) -> None:
        """``reference``: the design reference's figure (bench/reference_exporter.py), when measured."""
        shown = ("", "") if reference is None else (fmt % reference, ratio(ours, reference))
        self.cells(label, fmt % ours, fmt % theirs, ratio(ours, theirs) if show_ratio else "", floor, met, *shown)


def at_least(ours: float, theirs: float, factor: float) -> bool:
    return ours >= factor * theirs  # False when either is nan


def at_most(ours: float, theirs: float, factor: float) -> bool:
    return ours <= factor * theirs


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return NAN
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else NAN


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


SECTIONS = ("load", "timing", "memory", "silent", "start")


def main(argv: Optional[Sequence[str]] = None) -> int:
    global EXPORTER, EXPORTER_ARGS
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="one short round of each case, %d silent probes, one table, < 30 s" % SILENT_PROBES_SMOKE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per wrk run")
    parser.add_argument("--only", default="", help="comma-separated sections: " + ",".join(SECTIONS))
    parser.add_argument("--silent-probes", type=int, default=0, metavar="N",
                        help="probes at once in the silent case (default %d, --smoke %d)"
                        % (SILENT_PROBES, SILENT_PROBES_SMOKE))
    parser.add_argument("--exporter", default=EXPORTER, help="the ws_exporter.py to measure (for A/B runs)")
    parser.add_argument("--exporter-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for our exporter, repeatable; written with '=' when it starts "
                             "with '-': --exporter-arg=--probe.max-concurrent=1000.  It runs in the directory of --exporter")
    args = parser.parse_args(argv)
    EXPORTER, EXPORTER_ARGS = os.path.abspath(args.exporter), list(args.exporter_arg)
    if args.smoke:
        args.rounds, args.duration = 1, 1.0
    if not args.silent_probes:
        args.silent_probes = SILENT_PROBES_SMOKE if args.smoke else SILENT_PROBES
    sections = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error("unknown section(s) %s; choose from %s" % (",".join(sorted(unknown)), ",".join(SECTIONS)))
    for name in ("WS_PEER_NODE", "WS_PEER_NODE_PATH", "WS_BLACKBOX_EXPORTER", "WS_WRK", "WS_WRK_LD_LIBRARY_PATH"):
        env(name)
    nofile = raise_nofile_limit()
    if "silent" in sections and nofile < args.silent_probes + 100:
        sys.exit("bench: RLIMIT_NOFILE is %d, too low for %d probes at once" % (nofile, args.silent_probes))
    tmp = tempfile.mkdtemp(prefix="wsx-bench-")
    children: List["subprocess.Popen[bytes]"] = []
    try:
        return run(args, sections, tmp, children)
    finally:
        for proc in children:
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, sections: Set[str], tmp: str, children: List["subprocess.Popen[bytes]"]) -> int:
    started = time.monotonic()
    pki = make_pki(tmp)
    config = write_blackbox_config(tmp, pki["ca.pem"])
    plain = start_node(None)
    children.append(plain.proc)
    secure = start_node((pki["server.pem"], pki["server.key"]))
    children.append(secure.proc)
    exporters = [start_ours(pki["ca.pem"], tmp), start_blackbox(config, tmp)]
    reference = start_reference(pki["ca.pem"], tmp)
    children.extend(e.proc for e in exporters + [reference])
    wait_healthy(reference)
    first_answer = {e.name: [wait_healthy(e)] for e in exporters}
    idle = {e.name: idle_status(e) for e in exporters}
    ok = True
    for e in exporters + [reference]:
        for tls, peer in ((False, plain), (True, secure)):
            if not check_probe(e, e.probe_url("/", peer.port, tls)):
                print("bench: %s %s probe did not succeed" % (e.name, "wss" if tls else "ws"), file=sys.stderr)
                ok = False
    if not ok:
        return 1
    table = Table()
    table.text("ws-exporter vs blackbox_exporter 0.23 (tcp + query_response) and, under load, the design reference "
               "(bench/reference_exporter.py), %s, %d CPUs, Python %s"
               % (time.strftime("%Y-%m-%d %H:%M"), os.cpu_count() or 0, sys.version.split()[0]))
    table.text("medians of %d alternating rounds, %gs per wrk run, after a warm-up load per exporter and case"
               % (args.rounds, args.duration))
    table.text("ours: %s   (in %s)" % (describe_ours(), os.path.dirname(EXPORTER)))
    table.text("each exporter is one process: RSS = VmRSS, peak = VmHWM since the case began, CPU = utime + stime")
    table.text()
    table.text((Table.HEAD % ("", "ours", "blackbox", "ratio", "reference", "ratio", "floor", "")).rstrip())
    if "load" in sections:
        ok &= report_load(args, exporters + [reference], plain, secure, table)
    if "timing" in sections:
        timing = HoldServer("%g" % TIMING_DELAY)
        children.append(timing.peer.proc)
        secure_timing = HoldServer("%g" % TIMING_DELAY, (pki["server.pem"], pki["server.key"]))
        children.append(secure_timing.peer.proc)
        report_timing(args, exporters, timing, table)
        report_tls_timing(args, exporters[0], secure_timing, table)
        timing.stop()
        secure_timing.stop()
    if "memory" in sections:
        report_memory(exporters, idle, table, children)
    if "silent" in sections:
        report_silent(args, pki["ca.pem"], config, tmp, table, children)
    if "start" in sections:
        report_start(args, pki["ca.pem"], config, tmp, first_answer, table, children)
    strays = child_pids(exporters[0].pid)
    if strays:
        table.text("!! ours started %d child process(es), which these figures leave out" % len(strays))
    table.text()
    table.text("floors: %d met, %d missed%s" % (table.met, len(table.missed), "" if not table.missed else ":"))
    table.lines.extend("  MISSED " + line for line in table.missed)
    table.text("bench took %.0f s" % (time.monotonic() - started))
    print("\n".join(table.lines), flush=True)
    return 0 if ok else 1


def describe_ours() -> str:
    """Our exporter's command line as the bench runs it, for the header."""
    argv = ["python3"] + ours_argv(0)[1:]
    return " ".join(shlex.quote(word) for word in argv).replace("127.0.0.1:0", "127.0.0.1:PORT")


def report_load(args: argparse.Namespace, exporters: List[Exporter], plain: Peer, secure: Peer, table: Table) -> bool:
    connections = (16,) if args.smoke else (16, 64)
    cases = [(tls, c) for tls in (False, True) for c in connections]
    results: Dict[Tuple[str, bool, int], List[LoadResult]] = {}
    # The first load on a fresh node server runs slower (V8 compiles its hot paths meanwhile), and
    # so, often, does the first after it sat idle for half a minute while other cases ran (its
    # CPU per probe 10-15% higher): unwarmed, that fell on whichever exporter came first, ~8-11%
    # below its other rounds.  So each case starts with an unmeasured load by each exporter, and
    # its rounds follow at once.
    for tls, c in cases:
        peer = secure if tls else plain
        for e in exporters:
            run_wrk(e.url(e.probe_url("/", peer.port, tls)), c, 1 if args.smoke else WARMUP_SECONDS)
        for round_no in range(args.rounds):
            for e in exporters if round_no % 2 == 0 else exporters[::-1]:
                result = load(e, e.probe_url("/", peer.port, tls), c, args.duration, peer.proc.pid)
                results.setdefault((e.name, tls, c), []).append(result)
    errors = 0
    for tls, c in cases:
        errors += report_load_case(tls, c, *(results[(name, tls, c)] for name in ("ours", "blackbox", "reference")), table)
    if errors:
        table.text("!! %d non-2xx answers or socket errors during load" % errors)
    return errors == 0


def report_load_case(tls: bool, c: int, ours: List[LoadResult], theirs: List[LoadResult], reference: List[LoadResult],
                     table: Table) -> int:
    """One case's rows; its count of errors."""
    scheme = "wss" if tls else "ws"
    table.text()

    def figures(pick: Callable[[LoadResult], float], merge: Callable[[List[float]], float] = med) -> Tuple[float, float]:
        return merge([pick(r) for r in ours]), merge([pick(r) for r in theirs])

    def ref(pick: Callable[[LoadResult], float], merge: Callable[[List[float]], float] = med) -> float:
        return merge([pick(r) for r in reference])

    rate, rate_floor = figures(lambda r: r.rate), FLOOR_WSS_RATE if tls else FLOOR_WS_RATE
    floor = ("", None) if tls and c != 16 else (">= %gx" % rate_floor, at_least(*rate, rate_floor))
    table.row("%s c=%d probes/s" % (scheme, c), *rate, "%.0f", *floor, reference=ref(lambda r: r.rate))
    table.row("%s c=%d latency p50 (ms)" % (scheme, c), *figures(lambda r: r.p50_ms), "%.2f", reference=ref(lambda r: r.p50_ms))
    table.row("%s c=%d latency p99 (ms)" % (scheme, c), *figures(lambda r: r.p99_ms), "%.2f", reference=ref(lambda r: r.p99_ms))
    cpu, ref_cpu = figures(lambda r: r.cpu_ms), ref(lambda r: r.cpu_ms)
    floor = ("<= %gx" % FLOOR_WSS_CPU, at_most(*cpu, FLOOR_WSS_CPU)) if tls else ("", None)
    table.row("%s c=%d exporter CPU ms / probe" % (scheme, c), *cpu, "%.3f", *floor, reference=ref_cpu)
    if c == 16:
        table.cells("%s c=%d exporter CPU / the reference's" % (scheme, c), ratio(cpu[0], ref_cpu), "", "",
                    "<= %gx" % FLOOR_REFERENCE_CPU, at_most(cpu[0], ref_cpu, FLOOR_REFERENCE_CPU))
    table.row("%s c=%d server CPU ms / probe" % (scheme, c), *figures(lambda r: r.server_cpu_ms), "%.3f",
              reference=ref(lambda r: r.server_cpu_ms))
    table.row("%s c=%d peak RSS (MB)" % (scheme, c), *figures(lambda r: r.peak_rss_mb, max),
              reference=ref(lambda r: r.peak_rss_mb, max))
    table.cells("%s c=%d rounds probes/s" % (scheme, c), "/".join("%.0f" % r.rate for r in ours),
                "/".join("%.0f" % r.rate for r in theirs), reference="/".join("%.0f" % r.rate for r in reference))
    return sum(r.errors for r in ours + theirs + reference)


def report_timing(args: argparse.Namespace, exporters: List[Exporter], server: HoldServer, table: Table) -> None:
    table.text()
    table.text("timing truth: server holds its 101 for %d ms; error = measured - real delay (ours: upgrade "
               "phase, per probe; blackbox: probe_duration_seconds vs median real delay)" % (TIMING_DELAY * 1000))
    levels = ((1, 5), (16, 2)) if args.smoke else ((1, 40), (16, 10), (64, 5))
    collected: Dict[Tuple[str, int], List[float]] = {}
    for round_no in range(1 if args.smoke else 2):
        for concurrency, per_client in levels:
            for e in exporters:
                tag = "r%d-c%d" % (round_no, concurrency)
                collected.setdefault((e.name, concurrency), []).extend(
                    timing_errors(e, server, concurrency, per_client, tag))
    for concurrency, _ in levels:
        ours, theirs = collected[("ours", concurrency)], collected[("blackbox", concurrency)]
        table.row("upgrade error c=%d median (ms)" % concurrency, med(ours), med(theirs), "%.2f", show_ratio=False)
        p99 = percentile(ours, 99)
        label = "upgrade error c=%d p99 (ms), n=%d" % (concurrency, len(ours))
        if concurrency == 64:
            table.row(label, p99, percentile(theirs, 99), "%.2f", "<= %g ms" % FLOOR_UPGRADE_P99_MS,
                      met=p99 <= FLOOR_UPGRADE_P99_MS, show_ratio=False)
        else:
            table.row(label, p99, percentile(theirs, 99), "%.2f", show_ratio=False)


def report_tls_timing(args: argparse.Namespace, ours: Exporter, server: HoldServer, table: Table) -> None:
    """The same over wss://, ours only: blackbox's whole probe includes the TLS handshake."""
    table.text("the same over wss:// (ours only: blackbox's probe_duration_seconds includes the handshake)")
    concurrency, per_client = (16, 2) if args.smoke else (64, 5)
    errors = [e for round_no in range(1 if args.smoke else 2)
              for e in timing_errors(ours, server, concurrency, per_client, "tls-r%d" % round_no)]
    table.cells("wss upgrade error c=%d median (ms)" % concurrency, "%.2f" % med(errors), "-")
    table.cells("wss upgrade error c=%d p99 (ms), n=%d" % (concurrency, len(errors)),
                "%.2f" % percentile(errors, 99), "-")


def report_memory(exporters: List[Exporter], idle: Dict[str, Status], table: Table,
                  children: List["subprocess.Popen[bytes]"]) -> None:
    hold = HoldServer("%g" % HOLD_DELAY)
    children.append(hold.peer.proc)
    table.text()
    ours, theirs = idle["ours"].rss_mb, idle["blackbox"].rss_mb
    table.row("idle RSS (MB)", ours, theirs, "%.1f", "<= %g MB" % FLOOR_IDLE_RSS_MB, met=ours <= FLOOR_IDLE_RSS_MB)
    table.cells("idle threads", "%d" % idle["ours"].threads, "%d" % idle["blackbox"].threads)
    in_flight = {e.name: in_flight_rss(e, hold) for e in exporters}
    table.row("peak RSS, %d probes in flight (MB)" % IN_FLIGHT, in_flight["ours"], in_flight["blackbox"])
    after = {e.name: status(e.pid) for e in exporters}
    table.row("RSS at the end, idle (MB)", after["ours"].rss_mb, after["blackbox"].rss_mb)
    table.cells("threads at the end, idle", "%d" % after["ours"].threads, "%d" % after["blackbox"].threads)
    hold.stop()


def report_silent(args: argparse.Namespace, ca: str, config: str, tmp: str, table: Table,
                  children: List["subprocess.Popen[bytes]"]) -> None:
    """Fresh exporters (ours with SILENT_ARGS), each given ``--silent-probes`` probes at once to a
    silent target, alternating for ``--rounds`` rounds; the worst round of each counts."""
    silent = HoldServer("never")
    children.append(silent.peer.proc)
    exporters = [start_ours(ca, tmp, SILENT_ARGS), start_blackbox(config, tmp)]
    children.extend(e.proc for e in exporters)
    for e in exporters:
        wait_healthy(e)
        time.sleep(0.5)
    results: Dict[str, List[SilentResult]] = {"ours": [], "blackbox": []}
    wait = 1.0 if args.smoke else SILENT_THREADS_WAIT
    for round_no in range(args.rounds):
        for e in exporters if round_no % 2 == 0 else exporters[::-1]:
            results[e.name].append(silent_probes(e, silent.port, args.silent_probes, wait))
    for e in exporters:
        stop(e.proc)
    silent.stop()
    n = args.silent_probes
    ours, theirs = results["ours"], results["blackbox"]
    table.text()
    table.text("%d probes at once to a silent target, scrape timeout %g s, /metrics scraped every 50 ms meanwhile; "
               "worst of %d round(s); ours with %s" % (n, SILENT_SCRAPE_TIMEOUT, args.rounds, " ".join(SILENT_ARGS)))
    sent = max(r.last_sent_s for r in ours) * 1000, max(r.last_sent_s for r in theirs) * 1000
    table.row("silent: last request sent, ms from the first connect", *sent, fmt="%.1f", show_ratio=False)
    first = min(r.first_answer_s for r in ours), min(r.first_answer_s for r in theirs)
    table.row("silent: first answer, s from the first connect", *first, fmt="%.3f")
    last = max(r.last_answer_s for r in ours), max(r.last_answer_s for r in theirs)
    table.row("silent: last answer, s from the first connect", *last, fmt="%.3f",
              floor="<= %g s" % FLOOR_SILENT_LAST_S, met=last[0] <= FLOOR_SILENT_LAST_S)
    failed = min(r.failed_probes for r in ours), min(r.failed_probes for r in theirs)
    table.row("silent: answers 200 with probe_success 0", *failed, fmt="%d", floor="= %d" % n,
              met=failed[0] == n, show_ratio=False)
    for name, runs in results.items():
        others: "collections.Counter[int]" = collections.Counter()
        for r in runs:
            others.update({code: k for code, k in r.statuses.items() if code != 200})
        if others:
            table.text("   %s answered otherwise: %s" % (name, ", ".join(
                "%s x%d" % (code or "no answer", k) for code, k in sorted(others.items()))))
    metrics = max(r.metrics_max_s for r in ours) * 1000, max(r.metrics_max_s for r in theirs) * 1000
    table.row("silent: /metrics slowest (ms), n=%d" % sum(r.metrics_count for r in ours), *metrics, fmt="%.1f",
              floor="< %g ms" % (FLOOR_SILENT_METRICS_S * 1000),
              met=metrics[0] < FLOOR_SILENT_METRICS_S * 1000 and all(r.metrics_failures == 0 for r in ours))
    failures = sum(r.metrics_failures for r in ours), sum(r.metrics_failures for r in theirs)
    if any(failures):
        table.cells("silent: /metrics failed", "%d" % failures[0], "%d" % failures[1])
    rss = max(r.peak_rss_mb for r in ours), max(r.peak_rss_mb for r in theirs)
    table.row("silent: peak RSS (MB)", *rss, floor="<= %g MB" % FLOOR_SILENT_RSS_MB, met=rss[0] <= FLOOR_SILENT_RSS_MB)
    table.row("silent: exporter CPU ms / probe", med([r.cpu_ms for r in ours]), med([r.cpu_ms for r in theirs]),
              "%.3f")

    def threads(runs: List[SilentResult]) -> str:
        worst = max(runs, key=lambda r: (r.threads_after - r.threads_before, r.threads_peak))
        return "%d/%d/%d" % (worst.threads_before, worst.threads_peak, worst.threads_after)

    table.cells("silent: threads before/peak/after", threads(ours), threads(theirs), "",
                "after = before", all(r.threads_after <= r.threads_before for r in ours))

    def back(runs: List[SilentResult]) -> str:
        worst = max(r.threads_back_s for r in runs)  # nan (never back) counts as the worst
        return "not in %gs" % wait if any(r.threads_back_s != r.threads_back_s for r in runs) \
            else "%.2f" % worst

    table.cells("silent: threads back to before, s after", back(ours), back(theirs))
    table.cells("silent: rounds, last answer (s)", "/".join("%.2f" % r.last_answer_s for r in ours),
                "/".join("%.2f" % r.last_answer_s for r in theirs))


def report_start(args: argparse.Namespace, ca: str, config: str, tmp: str, first_answer: Dict[str, List[float]],
                 table: Table, children: List["subprocess.Popen[bytes]"]) -> None:
    starts: Tuple[Callable[[], Exporter], ...] = (lambda: start_ours(ca, tmp), lambda: start_blackbox(config, tmp))
    for _ in range(1 if args.smoke else 5):
        for start in starts:
            exporter = start()
            children.append(exporter.proc)
            first_answer[exporter.name].append(wait_healthy(exporter))
            stop(exporter.proc)
    ours, theirs = med(first_answer["ours"]), med(first_answer["blackbox"])
    table.text()
    table.row("spawn to first 200 on /-/healthy (ms), n=%d" % len(first_answer["ours"]), ours, theirs, "%.0f",
              "<= %g ms" % FLOOR_START_MS, met=ours <= FLOOR_START_MS)
    bare = [bare_interpreter() for _ in range(1 if args.smoke else 5)]
    table.cells("bare interpreter, spawn to exit (ms)", "%.0f" % med([b[0] for b in bare]), "",
                "", "(reference: the floor under ours)")
    table.cells("bare interpreter, RSS (MB)", "%.1f" % med([b[1] for b in bare]), "")


_OWN_RSS = "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')][0])"


def bare_interpreter() -> Tuple[float, float]:
    """(ms from spawn to exit, RSS in MB) of an interpreter that only reads its own RSS, started
    like ours (site on)."""
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", _OWN_RSS], capture_output=True, text=True, check=True).stdout
    return (time.monotonic() - start) * 1000, int(out) / 1024


if __name__ == "__main__":
    sys.exit(main())
