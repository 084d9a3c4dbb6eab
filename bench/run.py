#!/usr/bin/env python3
"""Benchmark ws_exporter.py against blackbox_exporter on this machine, in one run.

    bash .ci/peers && . .cache/peers/env.sh && python3 bench/run.py [--smoke] [--rounds N] [--duration S]

Starts a node ``ws`` server (plain and TLS, certificates from the openssl CLI in a temp dir),
ws_exporter.py and blackbox_exporter (a ``tcp`` module that sends the upgrade request and expects
``^HTTP/1.1 101``; its http prober cannot, it waits for a body after the 101), then loads each
exporter with wrk over keep-alive connections, alternating A B A B, and reports medians:
probes/s, latency p50/p99, CPU seconds per 1,000 probes, peak memory.  Then timing truth (the
``upgrade`` phase against a server that holds its 101 for exactly 50 ms), memory idle and with
256 probes in flight, and the time from spawn to the first answered request.

Ours runs as the container image runs it (``python3 -S -m ws_exporter``), and may start workers
under load: CPU and memory cover each exporter's process group, the spawned process and its
descendants, found again at every sample.  Memory counts the pages its processes share once, as
their cgroup would be charged (see GroupMemory).

Installs nothing: every peer comes from the WS_* environment variables of .cache/peers/env.sh.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import py_compile
import re
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXPORTER = os.path.join(ROOT, "ws_exporter.py")
EXPORTER_ARGS: List[str] = []  # --exporter-arg, appended to our exporter's command line
APP_DIR = ""  # where install_like_image put the exporter, as /app in the image
HOLD_SERVER = os.path.join(HERE, "hold_server.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0

TIMING_DELAY = 0.050
HOLD_DELAY = 2.0
IN_FLIGHT = 256
WARMUP_SECONDS = 2  # of load through each exporter before each case's measured rounds (--smoke: 1; wrk wants whole seconds)

NODE_ECHO_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node_echo_server.js")

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


def _drain(stream: Optional["IO[bytes]"]) -> None:  # type: ignore[name-defined]
    try:
        while stream is not None and stream.read(65536):
            pass
    except (OSError, ValueError):
        pass


class HoldServer:
    """hold_server.py in a child process; collects its (resource, delay) records."""

    def __init__(self, delay: float, cert_and_key: Tuple[str, ...] = ()) -> None:
        self.tls = bool(cert_and_key)  # wss://
        self.peer = spawn_port_printer([sys.executable, HOLD_SERVER, str(delay), *cert_and_key], {})
        self.port = self.peer.port
        self.records: Dict[str, float] = {}  # resource -> real delay (s), the last one per resource
        self.delays: List[float] = []  # every real delay, in order
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.peer.proc.stdout is not None
        for raw in self.peer.proc.stdout:
            resource, _, ns = raw.decode().strip().partition(" ")
            with self._lock:
                self.records[resource] = int(ns) / 1e9
                self.delays.append(int(ns) / 1e9)
                self._done.notify_all()

    def wait_count(self, count: int, timeout: float = 5.0) -> None:
        with self._lock:
            self._done.wait_for(lambda: len(self.delays) >= count, timeout)

    def stop(self) -> None:
        stop(self.peer.proc)


def stop(proc: "subprocess.Popen[bytes]") -> None:
    if proc.poll() is None:
        descendants = identities(group_pids(proc.pid)[1:])
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        kill_strays(descendants)


def identities(pids: Sequence[int]) -> List[Tuple[int, bytes]]:
    """(pid, start time) of each running pid: the start time tells a reused pid from the
    original; zombies are left out, they hold nothing and only their parent can clear them."""
    found = []
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            fields = stat_fields(pid)
            if fields[0] != b"Z":
                found.append((pid, fields[19]))
    return found


def kill_strays(members: Sequence[Tuple[int, bytes]], grace: float = 2.0) -> None:
    """SIGKILLs the workers still running ``grace`` seconds after their parent exited (a parent
    killed after its stop timeout leaves them behind), so none outlives the bench."""
    deadline = time.monotonic() + grace
    while members and time.monotonic() < deadline:
        time.sleep(0.05)
        running = set(identities([pid for pid, _ in members]))
        members = [m for m in members if m in running]  # exited, or its pid reused: dropped
    for pid, _ in members:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class GroupPeak:
    """The field-wise peak of every memory sample taken of one exporter's group."""

    def __init__(self) -> None:
        self.value = GroupMemory(0.0, 0, 0.0, 0.0)


class Exporter(NamedTuple):
    name: str
    proc: "subprocess.Popen[bytes]"  # the spawned process: the root of the measured group
    port: int
    spawned: float  # time.monotonic() just before Popen
    probe_url: Callable[[str, int, bool], str]  # (resource, server port, tls) -> request path
    seen: GroupPeak

    def url(self, path: str) -> str:
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def sample(self) -> GroupMemory:
        """The group's memory now, also folded into ``seen``."""
        now = group_memory(self.proc.pid)
        self.seen.value = self.seen.value.peak(now)
        return now


def ours_probe_path(resource: str, port: int, tls: bool) -> str:
    return "/probe?target=%s://127.0.0.1:%d%s" % ("wss" if tls else "ws", port, resource)


def blackbox_probe_path(resource: str, port: int, tls: bool) -> str:
    # The tcp module's request line is fixed ("GET /"): the resource cannot vary per probe.
    return "/probe?target=127.0.0.1:%d&module=%s" % (port, "wss" if tls else "ws")


def install_like_image(directory: str) -> str:
    """Copy the exporter into ``directory`` and compile it there as the Dockerfile does in /app."""
    os.makedirs(directory)
    target = os.path.join(directory, os.path.basename(EXPORTER))
    shutil.copyfile(EXPORTER, target)
    py_compile.compile(target, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    return directory


def ours_command(script: bool = False) -> Tuple[List[str], Dict[str, str]]:
    """The interpreter part of our argv, and its environment.  By default as the container image
    runs it: a module from APP_DIR, compiled ahead, with the Dockerfile's environment, and -S: the
    image has no site-packages, while this host's carry a .pth that imports certifi (~5 MB) into
    every interpreter.  ``script``: ``python3 ws_exporter.py``, site on, for comparison."""
    if script:
        return [sys.executable, EXPORTER], {}
    module = os.path.splitext(os.path.basename(EXPORTER))[0]
    return [sys.executable, "-S", "-m", module], {
        "PYTHONPATH": APP_DIR, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}


def start_ours(ca: str, script: bool = False) -> Exporter:
    port = free_port()
    command, extra_env = ours_command(script)
    argv = command + ["--web.listen-address=127.0.0.1:%d" % port, "--log.level=warn"] + EXPORTER_ARGS
    spawned = time.monotonic()
    # cwd: -m puts the current directory first on sys.path, ahead of PYTHONPATH; started from
    # elsewhere, another ws_exporter.py there would be the one measured.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, SSL_CERT_FILE=ca, **extra_env),
                            cwd=APP_DIR if not script else os.path.dirname(EXPORTER))
    return Exporter("ours", proc, port, spawned, ours_probe_path, GroupPeak())


def start_blackbox(config: str) -> Exporter:
    port = free_port()
    argv = [env("WS_BLACKBOX_EXPORTER"), "--config.file=" + config, "--web.listen-address=127.0.0.1:%d" % port,
            "--log.level=warn"]
    spawned = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Exporter("blackbox", proc, port, spawned, blackbox_probe_path, GroupPeak())


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
    sys.exit("bench: %s did not become healthy" % exporter.name)


# ----------------------------------------------------------------------------------------------
# /proc readings, over a process group: the spawned pid and its live descendants
# ----------------------------------------------------------------------------------------------


def stat_fields(pid: int) -> List[bytes]:
    """/proc/PID/stat after the command name: index 0 is the state (field 3), 1 the ppid."""
    with open("/proc/%d/stat" % pid, "rb") as f:
        return f.read().rpartition(b")")[2].split()


def group_pids(root: int) -> List[int]:
    """root and its live descendants, found afresh on every call: workers fork after start and
    may be respawned.  Walks the ppid of every /proc/*/stat (/proc/PID/task/TID/children needs
    CONFIG_PROC_CHILDREN, which this kind of host lacks); empty once root has exited."""
    children: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):  # it exited meanwhile
                children.setdefault(int(stat_fields(int(name))[1]), []).append(int(name))
    if not os.path.exists("/proc/%d" % root):
        return []
    group, todo = [], [root]
    while todo:
        pid = todo.pop()
        group.append(pid)
        todo.extend(children.get(pid, ()))
    return group


def cpu_seconds(root: int) -> float:
    """CPU seconds of the group: utime+stime of each live member, plus its cutime+cstime, the
    time of the children it has reaped (a worker that exited and was waited for keeps counting
    that way; one not reaped by a member loses its ticks)."""
    ticks = 0
    for pid in group_pids(root):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ticks += sum(int(n) for n in stat_fields(pid)[11:15])
    return ticks / CLK_TCK


def kb_fields(path: str, keys: Sequence[str]) -> Dict[str, int]:
    """The ``Key:  123 kB`` lines of a /proc file whose key is one of ``keys``."""
    with open(path) as f:
        return {key: int(value.split()[0]) for key, _, value in (line.partition(":") for line in f) if key in keys}


class MemberMemory(NamedTuple):  # one process, in MB
    anon_pss: float  # anonymous pages, each split between the processes that share it
    file_rss: float  # file-backed and shmem pages, in full
    rss: float
    pss: float


def member_memory(pid: int) -> MemberMemory:
    """Anonymous pages come from smaps_rollup's Pss_Anon; where that is unreadable, RssAnon
    counts them in full (an overestimate for forked workers, never an underestimate)."""
    status = kb_fields("/proc/%d/status" % pid, ("VmRSS", "RssAnon", "RssFile", "RssShmem"))
    try:
        rollup = kb_fields("/proc/%d/smaps_rollup" % pid, ("Pss", "Pss_Anon"))
    except OSError:
        rollup = {}
    rss = status.get("VmRSS", 0)  # a zombie has none
    anon = rollup.get("Pss_Anon", status.get("RssAnon", rss))
    return MemberMemory(anon / 1024, (status.get("RssFile", 0) + status.get("RssShmem", 0)) / 1024, rss / 1024,
                        rollup.get("Pss", rss) / 1024)


class GroupMemory(NamedTuple):
    # What a cgroup holding only the group would be charged.  Anonymous pages are shared only
    # through fork, so within the group: the sum of their PSS counts each once.  File-backed pages
    # (the interpreter, libc, extension modules) are also split by PSS with every unrelated
    # process mapping them, here the bench's own Python helpers: 17 MB became 14 MB for an
    # unchanged exporter when three more interpreters started.  So they count in full, once: the
    # largest member's, as forked workers map the same files.  One process: exactly its RSS.
    mb: float
    processes: int
    largest_rss_mb: float  # the largest single member's RSS
    pss_mb: float  # plain sum of PSS, for reference

    def peak(self, other: "GroupMemory") -> "GroupMemory":
        """Field-wise maximum."""
        return GroupMemory(max(self.mb, other.mb), max(self.processes, other.processes),
                           max(self.largest_rss_mb, other.largest_rss_mb), max(self.pss_mb, other.pss_mb))


def group_memory(root: int) -> GroupMemory:
    members = []
    for pid in group_pids(root):
        with contextlib.suppress(OSError):  # it exited meanwhile
            members.append(member_memory(pid))
    return GroupMemory(sum(m.anon_pss for m in members) + max((m.file_rss for m in members), default=0.0),
                       len(members), max((m.rss for m in members), default=0.0), sum(m.pss for m in members))


def settle(root: int, quiet: float = 0.5, timeout: float = 5.0) -> None:
    """Waits until the group's membership has not changed for ``quiet`` seconds: workers may fork
    a few hundred ms after the first answer, and idle memory must include them."""
    deadline = time.monotonic() + timeout
    members, since = sorted(group_pids(root)), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.05)
        now = sorted(group_pids(root))
        if now != members:
            members, since = now, time.monotonic()


@contextlib.contextmanager
def peak_memory(exporter: "Exporter", out: List[GroupMemory], interval: float = 0.05) -> Iterator[None]:
    """Samples the group's memory while the block runs; appends the field-wise peak to ``out``.

    One sample scans all of /proc (~2 ms): every 50 ms keeps that off the two cores under load."""
    stop_event = threading.Event()
    peak = [exporter.sample()]

    def sample() -> None:
        while not stop_event.wait(interval):
            peak[0] = peak[0].peak(exporter.sample())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop_event.set()
        thread.join()
        out.append(peak[0].peak(exporter.sample()))


# ----------------------------------------------------------------------------------------------
# Load (wrk)
# ----------------------------------------------------------------------------------------------


class LoadResult(NamedTuple):
    rate: float  # probes/s
    p50_ms: float
    p99_ms: float
    cpu_per_1k: float  # CPU seconds of the exporter's process group per 1,000 probes
    peak_mb: float  # the group's memory, see GroupMemory
    errors: int  # non-2xx answers and socket errors
    server_cpu_per_1k: float  # CPU seconds of the probed node ws server per 1,000 probes


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if match is None:
        print("bench: unparsable wrk latency %r" % text, file=sys.stderr)
        return float("nan")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, connections: int, duration: float, threads: int = 2) -> Tuple[int, float, float, float, int]:
    """(requests, requests/s, p50 ms, p99 ms, errors) of one wrk run."""
    argv = [env("WS_WRK"), "-t%d" % min(threads, connections), "-c%d" % connections, "-d%gs" % duration,
            "--timeout", "10s", "--latency", url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                         env=dict(os.environ, LD_LIBRARY_PATH=env("WS_WRK_LD_LIBRARY_PATH"))).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return requests, rate, p50, p99, errors


def load(exporter: Exporter, path: str, connections: int, duration: float, server: int) -> LoadResult:
    """One wrk run; ``server`` is the probed server's pid: the machine's two cores are shared by
    wrk, the exporter and the server, so what a probe costs the server counts too."""
    pid = exporter.proc.pid
    peaks: List[GroupMemory] = []
    before, server_before = cpu_seconds(pid), cpu_seconds(server)
    with peak_memory(exporter, peaks):
        requests, rate, p50, p99, errors = run_wrk(exporter.url(path), connections, duration)
    used, server_used = cpu_seconds(pid) - before, cpu_seconds(server) - server_before
    per_1k = 1000 / max(requests, 1)
    return LoadResult(rate, p50, p99, used * per_1k, peaks[0].mb, errors, server_used * per_1k)


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
        paths = [exporter.probe_url(resource, server.port, server.tls) for resource in plans[index]]
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
        for resource, body in bodies.items():
            if exporter.name == "ours":
                match, real = _UPGRADE.search(body), server.records.get(resource)
            else:
                match, real = _DURATION.search(body), real_median
            if match is not None and real is not None:
                errors.append((float(match.group(1)) - real) * 1000)
    return errors


def in_flight_memory(exporter: Exporter, server: HoldServer) -> float:
    """The group's peak memory (MB) while IN_FLIGHT probes wait for a 101 that takes HOLD_DELAY s."""
    peaks: List[GroupMemory] = []
    url = exporter.url(exporter.probe_url("/hold", server.port, False))
    with peak_memory(exporter, peaks, 0.02):
        run_wrk(url, IN_FLIGHT, HOLD_DELAY + 1.0, threads=2)
    return peaks[0].mb


# ----------------------------------------------------------------------------------------------
# PKI and configuration
# ----------------------------------------------------------------------------------------------


def make_pki(directory: str) -> Dict[str, str]:
    """A CA and a server certificate for 127.0.0.1 (IP SAN), with the openssl CLI."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # Python 3.13 verifies strictly (X509 strict)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    with open(os.path.join(directory, "ext.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
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


def row(label: str, ours: float, theirs: float, fmt: str = "%.1f", floor: str = "") -> str:
    return "%-44s %12s %12s %8s  %s" % (label, fmt % ours, fmt % theirs, ratio(ours, theirs), floor)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    global EXPORTER, EXPORTER_ARGS, APP_DIR
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a handful of probes each, one table, < 20 s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per wrk run")
    parser.add_argument("--only", default="", help="comma-separated sections: load,timing,memory,start")
    parser.add_argument("--exporter", default=EXPORTER, help="the ws_exporter.py to measure (for A/B runs)")
    parser.add_argument("--exporter-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for our exporter, repeatable; written with '=' when it starts "
                             "with '-': --exporter-arg=--web.workers=1.  It runs in the directory of --exporter")
    args = parser.parse_args(argv)
    EXPORTER, EXPORTER_ARGS = os.path.abspath(args.exporter), list(args.exporter_arg)
    if args.smoke:
        args.rounds, args.duration = 1, 1.0
    sections = set(args.only.split(",")) if args.only else {"load", "timing", "memory", "start"}
    for name in ("WS_PEER_NODE", "WS_PEER_NODE_PATH", "WS_BLACKBOX_EXPORTER", "WS_WRK", "WS_WRK_LD_LIBRARY_PATH"):
        env(name)
    tmp = tempfile.mkdtemp(prefix="wsx-bench-")
    APP_DIR = install_like_image(os.path.join(tmp, "app"))
    children: List["subprocess.Popen[bytes]"] = []
    try:
        return run(args, sections, tmp, children)
    finally:
        for proc in children:
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, sections: set, tmp: str, children: list) -> int:  # type: ignore[type-arg]
    pki = make_pki(tmp)
    plain = start_node(None)
    children.append(plain.proc)
    secure = start_node((pki["server.pem"], pki["server.key"]))
    children.append(secure.proc)
    timing = HoldServer(TIMING_DELAY)
    children.append(timing.peer.proc)
    secure_timing = HoldServer(TIMING_DELAY, (pki["server.pem"], pki["server.key"]))
    children.append(secure_timing.peer.proc)
    exporters = [start_ours(pki["ca.pem"]), start_blackbox(write_blackbox_config(tmp, pki["ca.pem"]))]
    children.extend(e.proc for e in exporters)
    first_answer = {e.name: [wait_healthy(e)] for e in exporters}
    idle = {e.name: idle_memory(e) for e in exporters}
    ok = True
    for e in exporters:
        for tls, peer in ((False, plain), (True, secure)):
            if not check_probe(e, e.probe_url("/", peer.port, tls)):
                print("bench: %s %s probe did not succeed" % (e.name, "wss" if tls else "ws"), file=sys.stderr)
                ok = False
    if not ok:
        return 1
    lines = ["ws-exporter vs blackbox_exporter 0.23 (tcp + query_response), %s, %d CPUs, Python %s"
             % (time.strftime("%Y-%m-%d %H:%M"), os.cpu_count() or 0, sys.version.split()[0]),
             "medians of %d alternating rounds, %gs per wrk run, after a warm-up load per exporter and case"
             % (args.rounds, args.duration),
             "ours: %s" % describe_ours(),
             "CPU and memory cover each exporter's process group (the spawned process and its descendants);",
             "memory = anonymous PSS of all members + file-backed RSS of the largest: pages shared within the",
             "group count once, pages shared with other processes on this host in full", "",
             "%-44s %12s %12s %8s  %s" % ("", "ours", "blackbox", "ratio", "floor")]
    if "load" in sections:
        ok &= report_load(args, exporters, plain, secure, lines)
    if "timing" in sections:
        report_timing(args, exporters, timing, lines)
        report_tls_timing(args, exporters[0], secure_timing, lines)
    if "memory" in sections:
        report_memory(exporters, idle, pki["ca.pem"], lines, children)
    if "start" in sections:
        report_start(args, pki, tmp, first_answer, lines, children)
    report_groups(exporters, idle, lines)
    print("\n".join(lines), flush=True)
    return 0 if ok else 1


def report_load(args: argparse.Namespace, exporters: List[Exporter], plain: Peer, secure: Peer, lines: List[str]) -> bool:
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
                run = load(e, e.probe_url("/", peer.port, tls), c, args.duration, peer.proc.pid)
                results.setdefault((e.name, tls, c), []).append(run)
    errors = 0
    for tls, c in cases:
        ours, theirs = results[("ours", tls, c)], results[("blackbox", tls, c)]
        scheme = "wss" if tls else "ws"
        lines.append("")
        lines.append(row("%s c=%d probes/s" % (scheme, c), med([r.rate for r in ours]), med([r.rate for r in theirs]), "%.0f", ">= 1.0x"))
        lines.append(row("%s c=%d latency p50 (ms)" % (scheme, c), med([r.p50_ms for r in ours]), med([r.p50_ms for r in theirs]), "%.2f"))
        lines.append(row("%s c=%d latency p99 (ms)" % (scheme, c), med([r.p99_ms for r in ours]), med([r.p99_ms for r in theirs]), "%.2f"))
        lines.append(row("%s c=%d CPU s / 1000 probes" % (scheme, c), med([r.cpu_per_1k for r in ours]), med([r.cpu_per_1k for r in theirs]), "%.3f"))
        lines.append(row("%s c=%d server CPU s / 1000 probes" % (scheme, c), med([r.server_cpu_per_1k for r in ours]),
                         med([r.server_cpu_per_1k for r in theirs]), "%.3f"))
        lines.append(row("%s c=%d peak memory (group, MB)" % (scheme, c), med([r.peak_mb for r in ours]), med([r.peak_mb for r in theirs])))
        lines.append("%-44s %12s %12s" % ("%s c=%d rounds probes/s" % (scheme, c), "/".join("%.0f" % r.rate for r in ours),
                                          "/".join("%.0f" % r.rate for r in theirs)))
        errors += sum(r.errors for r in ours + theirs)
    if errors:
        lines.append("!! %d non-2xx answers or socket errors during load" % errors)
    return errors == 0


def report_timing(args: argparse.Namespace, exporters: List[Exporter], server: HoldServer, lines: List[str]) -> None:
    lines.append("")
    lines.append("timing truth: server holds its 101 for %d ms; error = measured - real delay (ours: upgrade "
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
        floor = "p99 <= 2 ms" if concurrency == 64 else ""
        lines.append(row("upgrade error c=%d median (ms)" % concurrency, med(ours), med(theirs), "%.2f"))
        lines.append(row("upgrade error c=%d p99 (ms), n=%d" % (concurrency, len(ours)), percentile(ours, 99),
                         percentile(theirs, 99), "%.2f", floor))


def report_tls_timing(args: argparse.Namespace, ours: Exporter, server: HoldServer, lines: List[str]) -> None:
    """The same over wss://, ours only: blackbox's whole probe includes the TLS handshake."""
    lines.append("the same over wss:// (ours only: blackbox's probe_duration_seconds includes the handshake)")
    concurrency, per_client = (16, 2) if args.smoke else (64, 5)
    errors = [e for round_no in range(1 if args.smoke else 2)
              for e in timing_errors(ours, server, concurrency, per_client, "tls-r%d" % round_no)]
    for label, value in (("wss upgrade error c=%d median (ms)" % concurrency, med(errors)),
                         ("wss upgrade error c=%d p99 (ms), n=%d" % (concurrency, len(errors)), percentile(errors, 99))):
        lines.append("%-44s %12.2f %12s" % (label, value, "-"))


def describe_ours() -> str:
    """Our exporter's command line as the bench runs it, for the header."""
    command, extra_env = ours_command()
    words = " ".join(shlex.quote(word) for word in ["python3"] + command[1:] + EXPORTER_ARGS)
    return "%s   (cwd and PYTHONPATH: %s, a copy compiled as in the image%s)" % (
        words, extra_env["PYTHONPATH"], "" if EXPORTER_ARGS else "; no --exporter-arg")


def idle_memory(exporter: Exporter) -> GroupMemory:
    """The group's memory once its membership is stable after the first answer."""
    settle(exporter.proc.pid)
    return exporter.sample()


def script_idle_memory(ca: str, children: list) -> float:  # type: ignore[type-arg]
    """Idle memory (MB) of the group of ``python3 ws_exporter.py``: script mode, site on, for comparison."""
    exporter = start_ours(ca, script=True)
    children.append(exporter.proc)
    wait_healthy(exporter)
    idle = idle_memory(exporter).mb
    stop(exporter.proc)
    return idle


def report_memory(exporters: List[Exporter], idle: Dict[str, GroupMemory], ca: str, lines: List[str],
                  children: list) -> None:  # type: ignore[type-arg]
    hold = HoldServer(HOLD_DELAY)
    children.append(hold.peer.proc)
    lines.append("")
    lines.append(row("idle memory (group, MB)", idle["ours"].mb, idle["blackbox"].mb, "%.1f", "<= 20 MB"))
    lines.append("%-44s %12.1f   (info: `python3 %s`, site on)" % ("idle memory, script mode (group, MB)",
                                                                   script_idle_memory(ca, children),
                                                                   os.path.basename(EXPORTER)))
    in_flight = {e.name: in_flight_memory(e, hold) for e in exporters}
    lines.append(row("memory, %d in flight (group, MB)" % IN_FLIGHT, in_flight["ours"], in_flight["blackbox"], "%.1f", "<= 60 MB"))
    after = {e.name: e.sample().mb for e in exporters}
    lines.append(row("memory at the end, idle (group, MB)", after["ours"], after["blackbox"]))
    hold.stop()


def report_groups(exporters: List[Exporter], idle: Dict[str, GroupMemory], lines: List[str]) -> None:
    """Info lines: how many processes make up each group, and its largest single member."""
    lines.append("")
    for label, fmt, field in (("processes in group, idle / most seen", "%d / %d", "processes"),
                              ("largest member RSS (MB), idle / peak", "%.1f / %.1f", "largest_rss_mb"),
                              ("plain sum of PSS (MB), idle / peak", "%.1f / %.1f", "pss_mb")):
        cells = [fmt % (getattr(idle[e.name], field), getattr(e.seen.value, field)) for e in exporters]
        lines.append("%-44s %12s %12s" % (label, cells[0], cells[1]))


def report_start(args: argparse.Namespace, pki: Dict[str, str], tmp: str, first_answer: Dict[str, List[float]],
                 lines: List[str], children: list) -> None:  # type: ignore[type-arg]
    config = os.path.join(tmp, "blackbox.yml")
    starts: Tuple[Callable[[], Exporter], ...] = (lambda: start_ours(pki["ca.pem"]), lambda: start_blackbox(config))
    for _ in range(1 if args.smoke else 5):
        for start in starts:
            exporter = start()
            children.append(exporter.proc)
            first_answer[exporter.name].append(wait_healthy(exporter))
            stop(exporter.proc)
    lines.append("")
    lines.append(row("spawn to first 200 on /-/healthy (ms), n=%d" % len(first_answer["ours"]),
                     med(first_answer["ours"]), med(first_answer["blackbox"]), "%.0f", "<= 150 ms"))
    bare = [bare_interpreter() for _ in range(1 if args.smoke else 5)]
    lines.append("%-44s %12.0f   (for reference: the floor under ours)" % ("bare interpreter -S, spawn to exit (ms)", med([b[0] for b in bare])))
    lines.append("%-44s %12.1f" % ("bare interpreter -S, RSS (MB)", med([b[1] for b in bare])))


_OWN_RSS = "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')][0])"


def bare_interpreter() -> Tuple[float, float]:
    """(ms from spawn to exit, RSS in MB) of an interpreter that only reads its own RSS, started
    without site like ours."""
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-S", "-c", _OWN_RSS], capture_output=True, text=True, check=True).stdout
    return (time.monotonic() - start) * 1000, int(out) / 1024


if __name__ == "__main__":
    sys.exit(main())
