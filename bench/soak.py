#!/usr/bin/env python3
"""Soak test: ws_exporter.py scraped by a real VictoriaMetrics, ~200 targets of known truth.

    bash .ci/peers && . .cache/peers/env.sh && python3 bench/soak.py [--seconds N]   (or: make soak)

Starts the exporter as users start it (``python3 ws_exporter.py --config.file=F
--web.listen-address=127.0.0.1:PORT``), the target servers (node ``ws`` echo servers over ws://
and wss://, bench/soak_server.py for slow, silent, refusing, hanging-up and flapping servers,
ganache for the EVM modules, anvil too when $WS_ANVIL is set), reserved ports nothing listens on,
names under .invalid, and a VictoriaMetrics single-node that scrapes /probe for every target every
5 s (scrape timeout 4 s) with the relabeling a VMProbe generates, one job per target class.

While it runs: a SIGHUP reload every 30 s with a changed config (two modules' timeouts
alternate, which flips the truth of some slow targets), flapping servers killed and started again
every 30-60 s, and one ``kill -9`` of the exporter followed by a restart.  Every change is kept in
a timeline (monotonic and wall time), so each target's truth is known at every moment.

At the end it reads every sample back from VictoriaMetrics (/api/v1/export) and prints a report
with floors, each ok or MISSED; the exit status is 1 when a floor is missed.  Answers are judged
field by field against the truth at their scrape's time, skipping a field whose truth changed
within one scrape interval of it.  Each target class has its own module with its own timeout
(probe_timeout_seconds), and the servers of bench/soak_server.py answer with the target's own
close code (3000 + id) or status code: an answer carrying another target's result shows.

The exporter's RSS, threads and open fds come from /proc every 10 s; the RSS floor compares the
medians of the first and last quarters of the restarted process's samples, its first quarter of
life (warm-up) left out, and a run of two hours or more must grow by at most 1 MB over its last
hour (median of its last 10 minutes against its first 10); threads and fds must be back to their
idle level of the start once the scraper is stopped.  The samples go to resources.tsv and are
drawn, by hand, as resources.svg; with --report-dir the report and the picture are written there
too (``make soak`` writes docs/soak/, which the README shows).  --draw DIR draws the picture again
from a kept work directory.

Length: --seconds, else $SOAK_S, else 600.  Runs under 300 s scale the fault schedule (reloads
every seconds/4, flaps every seconds/5 to seconds/3.5, resources sampled every seconds/30), and
--seconds 60 finishes in about 75 s.  127.0.0.1 only (the .invalid names fail at the resolver).
Every child runs in its own process group and dies with this process (PR_SET_PDEATHSIG); all are
stopped on exit, Ctrl-C or an exception.  The work directory (exporter log, VictoriaMetrics data
and log, timeline.jsonl, resources.tsv, configs) is removed after a clean run and kept when a
floor is missed or with --keep.
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import http.client
import json
import math
import os
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import IO, Any, Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXPORTER = os.path.join(ROOT, "ws_exporter.py")
SOAK_SERVER = os.path.join(HERE, "soak_server.py")
NODE_ECHO_SERVER = os.path.join(HERE, "node_echo_server.js")

SCRAPE_INTERVAL = 5.0
SCRAPE_TIMEOUT = 4.0
DEFAULT_SECONDS = 600.0
START_TIMEOUT = 30.0
# The environment the shipped Dockerfile and systemd unit give the exporter: glibc's cache of
# freed blocks for each thread off (docs/internals.md, "Memory").
EXPORTER_ENV = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
RESTART_PAUSE = 1.0  # s between the exporter's kill -9 and its restart, as a supervisor would wait
CLOSE_BASE = 3000  # bench/soak_server.py answers a close with 3000 + the target's id

# Floors
FLOOR_SCRAPES_DONE = 0.90  # of the scrapes the schedule should have made
FLOOR_RSS_GROWTH = 1.10  # last-quarter median RSS <= this times the first quarter's
FLOOR_THREADS_TOLERANCE = 1  # idle threads at the end <= idle threads at the start + this
FLOOR_FDS_TOLERANCE = 2
FLOOR_RESTART_S = 10.0  # kill -9 to answering /-/healthy again
FLOOR_LAST_HOUR_MB = 1.0  # RSS growth over the last hour of a run of 2 h or more: the median of its
LAST_HOUR_S = 3600.0  # last 10 minutes against the median of its first 10
HOUR_ENDS_S = 600.0
IDLE_WAIT = 20.0  # s to wait, once the scraper is stopped, for threads and fds to drop

NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# Target classes and modules
# ----------------------------------------------------------------------------------------------

class ModuleSpec(NamedTuple):
    preset: str
    timeouts_ms: Tuple[int, int]  # in config version 0 and version 1 (reloads alternate them)
    extra: Dict[str, Any]


class ClassSpec(NamedTuple):
    name: str
    module: str
    size: int  # targets
    what: str


# Every class has its own module, and every module its own timeout: probe_timeout_seconds says
# which module (so which class) an answer was made for.  All stay under the 3.5 s the 4 s scrape
# timeout allows (the exporter's --timeout-offset is 0.5 s), so the module's value is the one used.
MODULES: Dict[str, ModuleSpec] = {
    "soak_ws": ModuleSpec("connect", (3400, 3400), {}),
    "soak_wss": ModuleSpec("connect", (3350, 3350), {}),  # + tls.ca_file, set at run time
    "soak_ping": ModuleSpec("ping", (3300, 3300), {}),
    "soak_ok": ModuleSpec("connect", (3250, 3250), {}),
    "soak_slow": ModuleSpec("connect", (3200, 1900), {}),  # flips the slow targets of SLOW_FLIP_MS
    "soak_silent": ModuleSpec("connect", (2000, 2500), {}),
    "soak_refused": ModuleSpec("connect", (3150, 3150), {}),
    "soak_dns": ModuleSpec("connect", (3100, 3100), {}),
    "soak_429": ModuleSpec("connect", (3050, 3050), {}),
    "soak_status": ModuleSpec("connect", (3000, 3000), {}),
    "soak_hangup": ModuleSpec("connect", (2950, 2950), {}),
    "soak_partial": ModuleSpec("connect", (2925, 2925), {}),
    "soak_flap": ModuleSpec("connect", (2900, 2900), {}),
    "soak_evm": ModuleSpec("evm", (2850, 2850), {"expect_chain_id": 1337}),
    "soak_newheads": ModuleSpec("evm_newheads", (3450, 3450), {"expect_chain_id": 1337}),
    "soak_anvil_evm": ModuleSpec("evm", (2800, 2800), {"expect_chain_id": 31337}),
    "soak_anvil_newheads": ModuleSpec("evm_newheads", (3425, 3425), {"expect_chain_id": 31337}),
}

CLASSES: List[ClassSpec] = [
    ClassSpec("ws", "soak_ws", 20, "node ws echo server, ws://, module connect"),
    ClassSpec("wss", "soak_wss", 20, "node ws echo server, wss:// (own CA in the module's tls.ca_file)"),
    ClassSpec("ping", "soak_ping", 10, "node ws echo server, module ping"),
    ClassSpec("ok", "soak_ok", 20, "soak_server /ok: 101 at once, close code 3000+id"),
    ClassSpec("slow", "soak_slow", 20, "soak_server /slow: 101 after 1.0-2.7 s (timeout alternates 3.2/1.9 s)"),
    ClassSpec("silent", "soak_silent", 15, "soak_server /silent: accepts, never answers"),
    ClassSpec("refused", "soak_refused", 15, "a reserved port nothing listens on"),
    ClassSpec("dns", "soak_dns", 10, "ws://nope-N.invalid/"),
    ClassSpec("429", "soak_429", 15, "soak_server /status/ID/429: rate_limited"),
    ClassSpec("status", "soak_status", 10, "soak_server /status: a status of its own (500+k): http_status"),
    ClassSpec("hangup", "soak_hangup", 5, "soak_server /hangup: closes once the request is in"),
    ClassSpec("partial", "soak_partial", 5, "soak_server /partial: half a 101 head, then closes"),
    ClassSpec("flap", "soak_flap", 20, "4 soak_servers killed and started again, 5 targets each"),
    ClassSpec("evm", "soak_evm", 8, "ganache (block time 1 s), module evm"),
    ClassSpec("newheads", "soak_newheads", 8, "ganache, module evm_newheads"),
    ClassSpec("anvil_evm", "soak_anvil_evm", 4, "anvil --block-time 1, module evm ($WS_ANVIL)"),
    ClassSpec("anvil_newheads", "soak_anvil_newheads", 4, "anvil, module evm_newheads ($WS_ANVIL)"),
]
FLAPPERS = 4
SLOW_STEADY_MS = (1000, 1250)  # always under both of soak_slow's timeouts
SLOW_FLIP_MS = (2400, 2700)  # under 3.2 s, over 1.9 s: success in version 0 only


class Target(NamedTuple):
    id: int
    cls: str
    url: str
    module: str
    flapper: int  # index into the flappers, -1 for none
    arg: int  # slow: delay in ms; status: the status code


class Expect(NamedTuple):
    """What an answer for a target must say at one moment.  None: not checked."""
    success: bool
    failure: FrozenSet[Tuple[str, str]]  # the (phase, reason) pairs allowed; empty with success
    status: int  # probe_websocket_status_code
    close: Optional[int]  # probe_websocket_close_code
    timeout: float  # probe_timeout_seconds
    chain_id: Optional[int]


def expect(target: Target, version: int, flap_up: bool) -> Expect:
    timeout = MODULES[target.module].timeouts_ms[version] / 1000.0
    cls = target.cls

    def ok(close: Optional[int], chain: Optional[int] = None) -> Expect:
        return Expect(True, frozenset(), 101, close, timeout, chain)

    def failed(phase: str, reason: str, status: int = 0, *others: Tuple[str, str]) -> Expect:
        return Expect(False, frozenset(((phase, reason),) + others), status, 0, timeout, None)

    if cls in ("ws", "wss", "ping"):
        return ok(1000)
    if cls == "ok":
        return ok(CLOSE_BASE + target.id)
    if cls == "slow":
        return ok(CLOSE_BASE + target.id) if target.arg / 1000.0 < timeout else failed("upgrade", "timeout")
    if cls == "silent":
        return failed("upgrade", "timeout")
    if cls == "refused":
        return failed("connect", "connect_refused")
    if cls == "dns":  # a resolver that does not answer in time: a timeout, still in phase resolve
        return failed("resolve", "dns_error", 0, ("resolve", "timeout"))
    if cls == "429":  # docs/metrics.md, Failure reasons: an upgrade answered 429 is rate_limited
        return failed("upgrade", "rate_limited", 429)
    if cls == "status":
        return failed("upgrade", "http_status", target.arg)
    if cls in ("hangup", "partial"):
        return failed("upgrade", "connection_closed")
    if cls == "flap":
        return ok(CLOSE_BASE + target.id) if flap_up else failed("connect", "connect_refused")
    if cls in ("evm", "newheads"):
        return ok(1000, 1337)
    if cls in ("anvil_evm", "anvil_newheads"):
        return ok(None, 31337)
    raise ValueError(cls)


def config_text(version: int, ca_file: str) -> str:
    modules: Dict[str, Dict[str, Any]] = {}
    for name, spec in MODULES.items():
        module: Dict[str, Any] = {"preset": spec.preset, "timeout": "%dms" % spec.timeouts_ms[version]}
        module.update(spec.extra)
        if name == "soak_wss":
            module["tls"] = {"ca_file": ca_file}
        modules[name] = module
    return json.dumps({"modules": modules}, indent=2) + "\n"


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------

try:
    _LIBC: Optional[ctypes.CDLL] = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:
    _LIBC = None
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the soak dies, even by kill -9.  (The children are
    all started from the main thread, which lives until the end.)"""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


class Children:
    """Every process the soak starts, each in a process group of its own."""

    def __init__(self) -> None:
        self.procs: List["subprocess.Popen[bytes]"] = []

    def spawn(self, argv: List[str], stdout: Any = subprocess.DEVNULL, stderr: Any = subprocess.DEVNULL,
              stdin: Any = subprocess.DEVNULL, env: Optional[Dict[str, str]] = None,
              cwd: Optional[str] = None) -> "subprocess.Popen[bytes]":
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd,
                                env=dict(os.environ, **(env or {})), start_new_session=True,
                                preexec_fn=_die_with_parent)
        self.procs.append(proc)
        return proc

    @staticmethod
    def signal(proc: "subprocess.Popen[bytes]", signum: int) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signum)
            except OSError:
                pass

    def stop(self, proc: "subprocess.Popen[bytes]", grace: float = 5.0) -> None:
        for stream in (proc.stdin,):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        if proc.poll() is None:
            self.signal(proc, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(proc, signal.SIGKILL)
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc, 3.0)


def read_port_line(proc: "subprocess.Popen[bytes]", timeout: float) -> int:
    """The port a child prints as its first line; 0 when it does not within ``timeout``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    return int(line) if line.strip().isdigit() else 0


def wait_tcp(port: int, timeout: float, proc: Optional["subprocess.Popen[bytes]"] = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            if proc is not None and proc.poll() is not None:
                return False
            time.sleep(0.1)
    return False


def http_get(port: int, path: str, timeout: float = 10.0, headers: Optional[Dict[str, str]] = None) -> Tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stable_port(rng: random.Random) -> int:
    """A free port below the ephemeral range, so that no outgoing connection takes it while its
    server is down (a flapper, the exporter during its restart); a port from the system when the
    range starts too low."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if low > 12000:
        for _ in range(100):
            port = rng.randrange(low - 10000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                    return port
                except OSError:
                    continue
    return free_port()


def proc_figures(pid: int) -> Tuple[float, int, int]:
    """(VmRSS in MB, threads, open fds) of a process; raises OSError once it is gone."""
    rss, threads = 0.0, 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                rss = int(value.split()[0]) / 1024.0
            elif key == "Threads":
                threads = int(value.split()[0])
    return rss, threads, len(os.listdir("/proc/%d/fd" % pid))


def make_pki(directory: str) -> Dict[str, str]:
    """A CA and a server certificate for 127.0.0.1 (IP SAN), with the openssl CLI."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=soak CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    with open(os.path.join(directory, "ext.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return {name: os.path.join(directory, name) for name in ("ca.pem", "server.pem", "server.key")}


# ----------------------------------------------------------------------------------------------
# Timeline: every change of truth, and the exporter's restart
# ----------------------------------------------------------------------------------------------

class Timeline:
    def __init__(self, path: str) -> None:
        self.file: IO[str] = open(path, "w")
        self.start_wall = time.time()
        self.start_mono = time.monotonic()
        self.version_walls: List[float] = [-math.inf]
        self.versions: List[int] = [0]
        self.flap_walls: Dict[int, List[float]] = {}
        self.flap_states: Dict[int, List[bool]] = {}
        self.kills: List[float] = []  # wall times of kill -9
        self.healthy: List[float] = []  # wall times the restarted exporter answered again
        self.crashes: List[float] = []  # wall times the exporter was found dead without a kill
        self.restart_attempts = 0
        self.reloads = 0
        self.flap_downs = 0
        self.flap_ups = 0

    def record(self, kind: str, **detail: Any) -> float:
        wall, mono = time.time(), time.monotonic()
        self.file.write(json.dumps(dict(wall=round(wall, 3), mono=round(mono, 3),
                                        at=round(wall - self.start_wall, 3), kind=kind, **detail)) + "\n")
        self.file.flush()
        return wall

    def set_start(self) -> None:
        self.start_wall, self.start_mono = time.time(), time.monotonic()
        self.record("start")

    def version_change(self, version: int) -> None:
        self.version_walls.append(self.record("reload", version=version))
        self.versions.append(version)
        self.reloads += 1

    def flap(self, flapper: int, up: bool, **detail: Any) -> None:
        wall = self.record("flap_up" if up else "flap_down", flapper=flapper, **detail)
        self.flap_walls.setdefault(flapper, [-math.inf]).append(wall)
        self.flap_states.setdefault(flapper, [True]).append(up)
        if up:
            self.flap_ups += 1
        else:
            self.flap_downs += 1

    def version_at(self, wall: float) -> int:
        return self.versions[bisect.bisect_right(self.version_walls, wall) - 1]

    def flap_up_at(self, flapper: int, wall: float) -> bool:
        if flapper < 0 or flapper not in self.flap_walls:
            return True
        return self.flap_states[flapper][bisect.bisect_right(self.flap_walls[flapper], wall) - 1]

    def expect_at(self, target: Target, wall: float) -> Expect:
        return expect(target, self.version_at(wall), self.flap_up_at(target.flapper, wall))

    def expectations_around(self, target: Target, wall: float, margin: float) -> List[Expect]:
        """The truths a target had from ``wall - margin`` to ``wall + margin``."""
        changes = self.version_walls[1:] + (self.flap_walls.get(target.flapper, [])[1:] if target.flapper >= 0 else [])
        times = [wall - margin] + [w for w in changes if wall - margin < w <= wall + margin]
        return [self.expect_at(target, w) for w in times]

    def restart_windows(self) -> List[Tuple[float, float]]:
        """From one scrape interval before each kill -9 to one after the exporter answered again
        (to the end of time when it never did)."""
        windows = []
        for i, kill in enumerate(self.kills):
            back = self.healthy[i] if i < len(self.healthy) else math.inf
            windows.append((kill - SCRAPE_INTERVAL, back + SCRAPE_INTERVAL))
        return windows

    def close(self) -> None:
        self.file.close()


# ----------------------------------------------------------------------------------------------
# The pieces: target servers, exporter, VictoriaMetrics
# ----------------------------------------------------------------------------------------------

class Flapper:
    """A soak_server.py on a fixed port, stopped (SIGKILL or SIGTERM, alternately) and started
    again on the same port."""

    def __init__(self, index: int, port: int, children: Children, log: IO[bytes]) -> None:
        self.index = index
        self.port = port
        self.children = children
        self.log = log
        self.proc: Optional["subprocess.Popen[bytes]"] = None
        self.up = False
        self.stops = 0

    def start(self) -> bool:
        proc = self.children.spawn([sys.executable, SOAK_SERVER, str(self.port)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=self.log)
        if read_port_line(proc, 10.0) != self.port:
            self.children.stop(proc, 1.0)
            return False
        self.proc, self.up = proc, True
        return True

    def stop(self) -> str:
        assert self.proc is not None
        signum = signal.SIGKILL if self.stops % 2 == 0 else signal.SIGTERM
        self.stops += 1
        Children.signal(self.proc, signum)
        self.proc.wait()
        self.children.stop(self.proc)  # closes its pipes
        self.proc, self.up = None, False
        return signal.Signals(signum).name


class Exporter:
    def __init__(self, path: str, port: int, config: str, log_path: str, children: Children) -> None:
        self.path = path
        self.port = port
        self.config = config
        self.log_path = log_path
        self.children = children
        self.proc: Optional["subprocess.Popen[bytes]"] = None
        self.pids: List[int] = []

    @property
    def address(self) -> str:
        return "127.0.0.1:%d" % self.port

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = self.children.spawn(
                [sys.executable, os.path.basename(self.path), "--config.file=" + self.config,
                 "--web.listen-address=" + self.address],
                stderr=log, cwd=os.path.dirname(self.path), env=EXPORTER_ENV)
        self.pids.append(self.proc.pid)

    def healthy(self) -> bool:
        try:
            return http_get(self.port, "/-/healthy", timeout=1.0)[0] == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return True
            if self.proc is None or self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def start_port_printer(children: Children, argv: List[str], env: Dict[str, str], log: IO[bytes], what: str) -> int:
    proc = children.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)
    port = read_port_line(proc, START_TIMEOUT)
    if not port:
        raise SystemExit("soak: %s did not start (see its log)" % what)
    return port


def start_evm_node(children: Children, argv: List[str], port: int, log: IO[bytes], what: str) -> bool:
    proc = children.spawn(argv, stdout=log, stderr=log, env={"NODE_PATH": os.environ.get("WS_PEER_NODE_PATH", "")})
    if wait_tcp(port, START_TIMEOUT, proc):
        return True
    print("soak: !!! %s did not start; its targets are left out" % what, flush=True)
    children.stop(proc, 1.0)
    return False


def scrape_config(targets: List[Target], exporter: str) -> Dict[str, Any]:
    """One job per class, as the VictoriaMetrics operator builds it for a VMProbe (module
    parameter, __address__ -> __param_target -> instance, __address__ = the exporter), each
    target with its truth_id and truth_class labels; and the exporter's own /metrics."""
    jobs: List[Dict[str, Any]] = []
    for spec in CLASSES:
        members = [t for t in targets if t.cls == spec.name]
        if not members:
            continue
        job = "soak-%s" % spec.name
        jobs.append({
            "job_name": "probe/soak/%s/0" % job,
            "scrape_interval": "%gs" % SCRAPE_INTERVAL,
            "scrape_timeout": "%gs" % SCRAPE_TIMEOUT,
            "metrics_path": "/probe",
            "params": {"module": [spec.module]},
            "static_configs": [{"targets": [t.url], "labels": {"truth_id": str(t.id), "truth_class": t.cls}}
                               for t in members],
            "relabel_configs": [
                {"source_labels": ["__address__"], "target_label": "__param_target"},
                {"target_label": "job", "replacement": job},
                {"source_labels": ["__param_target"], "target_label": "instance"},
                {"target_label": "__address__", "replacement": exporter},
            ],
        })
    jobs.append({
        "job_name": "ws-exporter-self",
        "scrape_interval": "%gs" % SCRAPE_INTERVAL,
        "scrape_timeout": "%gs" % SCRAPE_TIMEOUT,
        "static_configs": [{"targets": [exporter], "labels": {"truth_id": "self", "truth_class": "self"}}],
    })
    return {"scrape_configs": jobs}


# ----------------------------------------------------------------------------------------------
# Reading the answers back
# ----------------------------------------------------------------------------------------------

_ANSWER_FIELDS = {
    "up": "up", "scrape_duration_seconds": "duration", "probe_success": "success",
    "probe_websocket_status_code": "status", "probe_websocket_close_code": "close",
    "probe_timeout_seconds": "timeout", "probe_chain_id": "chain_id",
}


class Answer:
    """One scrape of one target, as VictoriaMetrics stored it."""

    def __init__(self, ts: float) -> None:
        self.ts = ts
        self.up: Optional[float] = None
        self.duration: Optional[float] = None
        self.success: Optional[float] = None
        self.failures: List[Tuple[str, str]] = []
        self.status: Optional[float] = None
        self.close: Optional[float] = None
        self.timeout: Optional[float] = None
        self.chain_id: Optional[float] = None

    def record(self, name: str, value: float, labels: Dict[str, str]) -> None:
        """One sample of this scrape, by metric name (others are ignored)."""
        if name == "probe_failure_info":
            if value == 1:
                self.failures.append((labels.get("phase", ""), labels.get("reason", "")))
        elif name in _ANSWER_FIELDS:
            setattr(self, _ANSWER_FIELDS[name], value)

    def describe(self) -> str:
        parts = ["success=%s" % _num(self.success)]
        if self.failures:
            parts.append("failure=%s" % ",".join("%s/%s" % f for f in self.failures))
        parts.append("status=%s close=%s timeout=%s" % (_num(self.status), _num(self.close), _num(self.timeout)))
        if self.chain_id is not None:
            parts.append("chain_id=%s" % _num(self.chain_id))
        parts.append("scrape %.3fs" % (self.duration if self.duration is not None else NAN))
        return " ".join(parts)


def _num(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "%d" % value if value == int(value) else "%g" % value


def describe_expect(e: Expect) -> str:
    parts = ["success=%d" % e.success]
    if e.failure:
        parts.append("failure=%s" % " or ".join("%s/%s" % f for f in sorted(e.failure)))
    parts.append("status=%d close=%s timeout=%g" % (e.status, "-" if e.close is None else e.close, e.timeout))
    if e.chain_id is not None:
        parts.append("chain_id=%d" % e.chain_id)
    return " ".join(parts)


EXPORTED = ("up", "scrape_duration_seconds", "probe_success", "probe_failure_info", "probe_websocket_status_code",
            "probe_websocket_close_code", "probe_timeout_seconds", "probe_chain_id")


def export_answers(vm_port: int, start: float, end: float) -> Dict[Tuple[str, int], Answer]:
    """Every sample of EXPORTED from ``start`` to ``end`` (wall s), grouped by (truth_id, ms)."""
    http_get(vm_port, "/internal/force_flush", timeout=30)
    query = urllib.parse.urlencode({
        "match[]": '{__name__=~"%s",truth_id!=""}' % "|".join(EXPORTED),
        "start": "%.3f" % start, "end": "%.3f" % end,
    })
    status, body = http_get(vm_port, "/api/v1/export?" + query, timeout=120)
    if status != 200:
        raise SystemExit("soak: /api/v1/export answered %d: %s" % (status, body[:300].decode("utf-8", "replace")))
    answers: Dict[Tuple[str, int], Answer] = {}
    for line in body.decode("utf-8").splitlines():
        if not line.strip():
            continue
        series = json.loads(line)
        labels: Dict[str, str] = series["metric"]
        name, truth_id = labels["__name__"], labels["truth_id"]
        for value, ms in zip(series["values"], series["timestamps"]):
            if value is None or not math.isfinite(float(value)):  # staleness markers
                continue
            key = (truth_id, int(ms))
            answer = answers.get(key)
            if answer is None:
                answer = answers[key] = Answer(ms / 1000.0)
            answer.record(name, float(value), labels)
    return answers


class Verdict(NamedTuple):
    success_checked: bool
    success_wrong: bool
    values_checked: bool
    value_issues: List[str]


def judge(target: Target, answer: Answer, timeline: Timeline) -> Verdict:
    """An answer (up == 1) against its target's truth, field by field; a field whose truth
    changed within one scrape interval of the scrape is not judged."""
    truths = timeline.expectations_around(target, answer.ts, SCRAPE_INTERVAL)
    truth = timeline.expect_at(target, answer.ts)

    def steady(field: str) -> bool:
        return all(getattr(t, field) == getattr(truths[0], field) for t in truths)

    if not steady("success"):
        return Verdict(False, False, False, [])
    if answer.success is None:
        return Verdict(True, True, False, ["no probe_success"])
    if (answer.success == 1) != truth.success:
        return Verdict(True, True, False, [])
    issues = []
    if steady("failure"):
        if not (len(answer.failures) == 1 and answer.failures[0] in truth.failure if truth.failure else not answer.failures):
            issues.append("failure %s, want %s" % (answer.failures or "none", sorted(truth.failure) or "none"))
    if steady("status") and answer.status != truth.status:
        issues.append("status %s, want %d" % (_num(answer.status), truth.status))
    if steady("close") and truth.close is not None and answer.close != truth.close:
        issues.append("close %s, want %d" % (_num(answer.close), truth.close))
    if steady("timeout") and (answer.timeout is None or abs(answer.timeout - truth.timeout) > 1e-3):
        issues.append("timeout %s, want %g" % (_num(answer.timeout), truth.timeout))
    if steady("chain_id") and truth.chain_id is not None and answer.chain_id != truth.chain_id:
        issues.append("chain_id %s, want %d" % (_num(answer.chain_id), truth.chain_id))
    return Verdict(True, False, True, issues)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

class Report:
    def __init__(self) -> None:
        self.lines: List[str] = []
        self.missed: List[str] = []
        self.met = 0

    def text(self, line: str = "") -> None:
        self.lines.append(line)

    def floor(self, label: str, value: str, floor: str, met: bool) -> None:
        self.met += met
        if not met:
            self.missed.append("%s: %s (floor %s)" % (label, value, floor))
        self.lines.append("%-58s %-26s %-22s %s" % (label, value, floor, "ok" if met else "MISSED"))

    def info(self, label: str, value: str) -> None:
        self.lines.append(("%-58s %s" % (label, value)).rstrip())


def last_hour_ends(samples: Sequence[Tuple[float, float, int, float, int, int]], begin: float,
                   end: float) -> Tuple[float, float]:
    """Median RSS of the first and of the last sixth (10 minutes of an hour) of [begin, end]."""
    span = (end - begin) * HOUR_ENDS_S / LAST_HOUR_S
    return (med([s[3] for s in samples if begin <= s[1] < begin + span]),
            med([s[3] for s in samples if end - span <= s[1] <= end]))


# ----------------------------------------------------------------------------------------------
# The picture: RSS, threads and open fds over the run, an SVG drawn by hand
# ----------------------------------------------------------------------------------------------

SVG_WIDTH, SVG_PANEL, SVG_LEFT, SVG_TOP = 860, 150, 70, 40


def draw_resources(work: str) -> str:
    """resources.svg from the work directory's resources.tsv and timeline.jsonl; its path."""
    with open(os.path.join(work, "resources.tsv")) as f:
        rows = [line.split("\t") for line in f.read().splitlines()[1:]]
    samples = [(float(at) / 60, int(pid), float(rss), int(threads), int(fds)) for at, pid, rss, threads, fds in rows]
    with open(os.path.join(work, "timeline.jsonl")) as f:
        kills = [event["at"] / 60 for event in map(json.loads, f) if event["kind"] == "exporter_kill"]
    minutes = max([s[0] for s in samples] + [1.0])
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">'
             % (SVG_WIDTH, SVG_TOP + 3 * (SVG_PANEL + 30) + 20),
             '<rect width="100%" height="100%" fill="white"/>',
             '<text x="%d" y="20" font-size="14">ws_exporter under the soak, %.0f minutes: from /proc, the kill -9 dashed</text>'
             % (SVG_LEFT, minutes)]
    for index, (column, title) in enumerate(((2, "RSS (MB)"), (3, "threads"), (4, "open fds"))):
        top = SVG_TOP + index * (SVG_PANEL + 30)
        parts += _svg_panel(top, title, minutes, [(s[0], s[1], s[column]) for s in samples], kills)
    parts.append("</svg>")
    path = os.path.join(work, "resources.svg")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")
    return path


def _svg_panel(top: int, title: str, minutes: float, points: List[Tuple[float, int, float]],
               kills: List[float]) -> List[str]:
    """One panel: axes, value ticks at 1, 2 or 5 times a power of ten, minute ticks, a line per
    process, the kills."""
    width = SVG_WIDTH - SVG_LEFT - 20
    values = [p[2] for p in points] or [0.0]
    rough = max((max(values) - min(values)) / 4, 0.5)
    decade = 10.0 ** math.floor(math.log10(rough))
    tick = next(m * decade for m in (1, 2, 5, 10) if m * decade >= rough)  # 1, 2 or 5 times a power of ten
    low, high = math.floor(min(values) / tick) * tick, math.ceil(max(values) / tick) * tick
    high = max(high, low + tick)

    def x(minute: float) -> float:
        return SVG_LEFT + width * minute / minutes

    def y(value: float) -> float:
        return top + SVG_PANEL - SVG_PANEL * (value - low) / (high - low)

    out = ['<text x="%d" y="%d" font-weight="bold">%s</text>' % (SVG_LEFT, top - 6, title),
           '<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#999"/>' % (SVG_LEFT, top, width, SVG_PANEL)]
    for i in range(int(round((high - low) / tick)) + 1):
        value = low + tick * i
        out.append('<text x="%d" y="%.1f" text-anchor="end">%g</text>' % (SVG_LEFT - 6, y(value) + 4, round(value, 1)))
        out.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#eee"/>' % (SVG_LEFT, SVG_LEFT + width, y(value), y(value)))
    step = max(1, int(minutes / 12 / 5 + 1) * 5) if minutes > 12 else 1
    for minute in range(0, int(minutes) + 1, step):
        out.append('<text x="%.1f" y="%d" text-anchor="middle">%d min</text>' % (x(minute), top + SVG_PANEL + 14, minute))
    for kill in kills:
        out.append('<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="#c00" stroke-dasharray="4 3"/>'
                   % (x(kill), x(kill), top, top + SVG_PANEL))
    for pid in sorted(set(p[1] for p in points), key=[p[1] for p in points].index):
        line = " ".join("%.1f,%.1f" % (x(m), y(v)) for m, owner, v in points if owner == pid)
        out.append('<polyline points="%s" fill="none" stroke="#1f5fbf" stroke-width="1.2"/>' % line)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return NAN
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.ceil(q / 100.0 * len(ordered))) - 1)]


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else NAN


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

class Soak:
    def __init__(self, args: argparse.Namespace, work: str, children: Children) -> None:
        self.args = args
        self.seconds: float = args.seconds
        self.work = work
        self.children = children
        self.rng = random.Random(args.seed)  # the fault schedule
        self.port_rng = random.Random()  # ports: another soak may run at the same time
        self.timeline = Timeline(os.path.join(work, "timeline.jsonl"))
        self.servers_log = open(os.path.join(work, "servers.log"), "ab")
        self.targets: List[Target] = []
        self.flappers: List[Flapper] = []
        self.reserved: List[socket.socket] = []
        self.version = 0
        self.ca = ""
        self.config_path = os.path.join(work, "config.json")
        self.exporter: Optional[Exporter] = None
        self.vm_proc: Optional["subprocess.Popen[bytes]"] = None
        self.vm_port = 0
        self.samples: List[Tuple[float, float, int, float, int, int]] = []  # mono, wall, pid, rss, threads, fds
        self.sample_every = 10.0
        self.idle_start: Tuple[float, int, int] = (NAN, 0, 0)
        self.warmup_bad: List[str] = []

    # --- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        env = os.environ
        pki = make_pki(self.work)
        self.ca = pki["ca.pem"]
        node_env = {"NODE_PATH": env["WS_PEER_NODE_PATH"]}
        ws_port = start_port_printer(self.children, [env["WS_PEER_NODE"], NODE_ECHO_SERVER], node_env,
                                     self.servers_log, "node ws echo server")
        wss_port = start_port_printer(self.children, [env["WS_PEER_NODE"], NODE_ECHO_SERVER, pki["server.pem"],
                                                      pki["server.key"]], node_env, self.servers_log,
                                      "node wss echo server")
        py_port = start_port_printer(self.children, [sys.executable, SOAK_SERVER, "0"], {}, self.servers_log,
                                     "soak_server.py")
        for index in range(FLAPPERS):
            flapper = Flapper(index, stable_port(self.port_rng), self.children, self.servers_log)
            if not flapper.start():
                raise SystemExit("soak: flapper %d did not start on port %d" % (index, flapper.port))
            self.flappers.append(flapper)
        ganache_port = anvil_port = 0
        if env.get("WS_GANACHE"):
            port = free_port()
            if start_evm_node(self.children, [env["WS_PEER_NODE"], env["WS_GANACHE"], "--miner.blockTime", "1",
                                              "--server.host", "127.0.0.1", "--server.port", str(port),
                                              "--chain.chainId", "1337", "--logging.quiet"],
                              port, self.servers_log, "ganache"):
                ganache_port = port
        else:
            print("soak: !!! WS_GANACHE is not set: no EVM targets", flush=True)
        if env.get("WS_ANVIL"):
            port = free_port()
            if start_evm_node(self.children, [env["WS_ANVIL"], "--host", "127.0.0.1", "--port", str(port),
                                              "--block-time", "1", "--chain-id", "31337", "--silent"],
                              port, self.servers_log, "anvil"):
                anvil_port = port
        self.make_targets(ws_port, wss_port, py_port, ganache_port, anvil_port)

    def make_targets(self, ws_port: int, wss_port: int, py_port: int, ganache_port: int, anvil_port: int) -> None:
        next_id = 1
        status_codes = iter(range(500, 600))
        py = "ws://127.0.0.1:%d" % py_port
        for spec in CLASSES:
            if spec.name in ("evm", "newheads") and not ganache_port:
                continue
            if spec.name.startswith("anvil") and not anvil_port:
                continue
            for k in range(spec.size):
                tid, flapper, arg = next_id, -1, 0
                next_id += 1
                if spec.name in ("ws", "ping"):
                    url = "ws://127.0.0.1:%d/%s/%d" % (ws_port, spec.name, tid)
                elif spec.name == "wss":
                    url = "wss://127.0.0.1:%d/wss/%d" % (wss_port, tid)
                elif spec.name == "ok":
                    url = "%s/ok/%d" % (py, tid)
                elif spec.name == "slow":
                    low, high = SLOW_STEADY_MS if k % 2 == 0 else SLOW_FLIP_MS
                    arg = low + (high - low) * (k // 2) // max(1, (spec.size + 1) // 2 - 1)
                    url = "%s/slow/%d/%d" % (py, tid, arg)
                elif spec.name == "silent":
                    url = "%s/silent/%d" % (py, tid)
                elif spec.name == "refused":
                    sock = socket.socket()
                    sock.bind(("127.0.0.1", 0))  # bound, never listening: the port stays refused
                    self.reserved.append(sock)
                    url = "ws://127.0.0.1:%d/" % sock.getsockname()[1]
                elif spec.name == "dns":
                    url = "ws://nope-%d.invalid/" % tid
                elif spec.name == "429":
                    arg = 429
                    url = "%s/status/%d/429" % (py, tid)
                elif spec.name == "status":
                    arg = next(status_codes)
                    url = "%s/status/%d/%d" % (py, tid, arg)
                elif spec.name in ("hangup", "partial"):
                    url = "%s/%s/%d" % (py, spec.name, tid)
                elif spec.name == "flap":
                    flapper = k % FLAPPERS
                    url = "ws://127.0.0.1:%d/ok/%d" % (self.flappers[flapper].port, tid)
                elif spec.name in ("evm", "newheads"):
                    url = "ws://127.0.0.1:%d/?soak=%d" % (ganache_port, tid)
                else:
                    url = "ws://127.0.0.1:%d/?soak=%d" % (anvil_port, tid)
                self.targets.append(Target(tid, spec.name, url, spec.module, flapper, arg))

    def write_config(self, version: int) -> None:
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(config_text(version, self.ca))
        os.replace(tmp, self.config_path)

    def start_exporter(self) -> None:
        self.write_config(0)
        self.exporter = Exporter(os.path.abspath(self.args.exporter), stable_port(self.port_rng), self.config_path,
                                 os.path.join(self.work, "exporter.log"), self.children)
        self.exporter.spawn()
        if not self.exporter.wait_healthy(START_TIMEOUT):
            raise SystemExit("soak: the exporter did not start; its log:\n" + tail(self.exporter.log_path))

    def warm_up(self) -> None:
        """One probe per class straight to the exporter (not through the scraper), at once; then
        the exporter's idle figures, the level its threads and fds must come back to."""
        assert self.exporter is not None
        firsts: Dict[str, Target] = {}
        for t in self.targets:
            firsts.setdefault(t.cls, t)
        results: Dict[str, str] = {}

        def probe(target: Target) -> None:
            assert self.exporter is not None
            query = urllib.parse.urlencode({"target": target.url, "module": target.module})
            try:
                status, body = http_get(self.exporter.port, "/probe?" + query, timeout=15,
                                        headers={"X-Prometheus-Scrape-Timeout-Seconds": "%g" % SCRAPE_TIMEOUT})
            except OSError as err:
                results[target.cls] = "no answer: %s" % err
                return
            if status != 200:
                results[target.cls] = "HTTP %d" % status
                return
            answer = parse_probe(body.decode("utf-8", "replace"))
            verdict = judge(target, answer, self.timeline)
            if verdict.success_wrong or verdict.value_issues:
                results[target.cls] = "got %s; want %s" % (answer.describe(), describe_expect(self.timeline.expect_at(target, time.time())))

        threads = [threading.Thread(target=probe, args=(t,)) for t in firsts.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for cls, problem in sorted(results.items()):
            self.warmup_bad.append("%s (%s): %s" % (cls, firsts[cls].url, problem))
            print("soak: !!! warm-up probe of class %s: %s" % (cls, problem), flush=True)
        time.sleep(1.0)
        self.idle_start = proc_figures(self.exporter.pid)

    def start_vm(self) -> None:
        assert self.exporter is not None
        path = os.path.join(self.work, "scrape.json")
        with open(path, "w") as f:
            json.dump(scrape_config(self.targets, self.exporter.address), f, indent=2)
        self.vm_port = free_port()
        log = open(os.path.join(self.work, "victoria-metrics.log"), "ab")
        self.vm_proc = self.children.spawn([
            os.environ["WS_VICTORIA_METRICS"], "-httpListenAddr=127.0.0.1:%d" % self.vm_port,
            "-storageDataPath=" + os.path.join(self.work, "vmdata"), "-promscrape.config=" + path,
            "-promscrape.config.strictParse=false", "-loggerLevel=WARN", "-search.latencyOffset=1s",
        ], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if http_get(self.vm_port, "/health", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            if self.vm_proc.poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit("soak: VictoriaMetrics did not start; its log:\n" +
                         tail(os.path.join(self.work, "victoria-metrics.log")))

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> None:
        assert self.exporter is not None
        exporter = self.exporter
        seconds = self.seconds
        t0 = self.timeline.start_mono
        end = t0 + seconds
        long_run = seconds >= 300
        reload_every = 30.0 if long_run else max(3 * SCRAPE_INTERVAL, seconds / 4)
        flap_range = (30.0, 60.0) if long_run else (max(3 * SCRAPE_INTERVAL, seconds / 5),
                                                     max(3 * SCRAPE_INTERVAL + 2, seconds / 3.5))
        sample_every = self.sample_every = 10.0 if long_run else max(1.0, seconds / 30)
        kill_at = t0 + max(12.0, seconds / 8)
        next_reload = t0 + reload_every
        next_flap = [t0 + self.rng.uniform(*flap_range) for _ in self.flappers]
        next_sample = t0
        state = "up"  # "up", "restarting"
        restart_due = 0.0
        after_kill = True  # restarting after our kill -9, not after a crash
        last_progress = t0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if state == "up" and not exporter.alive():
                assert exporter.proc is not None
                self.timeline.crashes.append(self.timeline.record("exporter_died", pid=exporter.pid,
                                                                  status=exporter.proc.returncode))
                print("soak: !!! the exporter exited by itself (status %s); starting it again"
                      % exporter.proc.returncode, flush=True)
                state, restart_due, after_kill = "restarting", now + RESTART_PAUSE, False
            if state == "up" and now >= kill_at and not self.timeline.kills:
                pid = exporter.pid
                self.timeline.kills.append(self.timeline.record("exporter_kill", pid=pid))
                os.kill(pid, signal.SIGKILL)
                assert exporter.proc is not None
                exporter.proc.wait()
                state, restart_due, after_kill = "restarting", now + RESTART_PAUSE, True
            elif state == "restarting":
                if not exporter.alive() and now >= restart_due:
                    if exporter.proc is not None and exporter.proc.returncode not in (None, -signal.SIGKILL):
                        self.timeline.record("exporter_exit", pid=exporter.pid, status=exporter.proc.returncode)
                    exporter.spawn()
                    self.timeline.restart_attempts += 1
                    self.timeline.record("exporter_spawn", pid=exporter.pid, attempt=self.timeline.restart_attempts)
                    restart_due = now + RESTART_PAUSE
                elif exporter.alive() and exporter.healthy():
                    back = self.timeline.record("exporter_healthy", pid=exporter.pid)
                    if after_kill:
                        self.timeline.healthy.append(back)
                    state = "up"
            if state == "up" and now >= next_reload:
                self.version = 1 - self.version
                self.write_config(self.version)
                try:
                    os.kill(exporter.pid, signal.SIGHUP)
                except ProcessLookupError:  # died meanwhile: the restart reads the new file
                    pass
                self.timeline.version_change(self.version)
                next_reload += reload_every
            for flapper in self.flappers:
                if now < next_flap[flapper.index]:
                    continue
                if flapper.up:
                    how = flapper.stop()
                    self.timeline.flap(flapper.index, False, signal=how)
                    next_flap[flapper.index] = now + self.rng.uniform(*flap_range)
                elif flapper.start():
                    self.timeline.flap(flapper.index, True)
                    next_flap[flapper.index] = now + self.rng.uniform(*flap_range)
                else:
                    self.timeline.record("flap_start_failed", flapper=flapper.index)
                    next_flap[flapper.index] = now + 1.0
            if now >= next_sample:
                if state == "up":
                    try:
                        rss, threads, fds = proc_figures(exporter.pid)
                        self.samples.append((now, time.time(), exporter.pid, rss, threads, fds))
                    except OSError:
                        pass
                next_sample = max(next_sample + sample_every, now)
            if self.vm_proc is not None and self.vm_proc.poll() is not None:
                raise SystemExit("soak: VictoriaMetrics exited during the run (status %s)" % self.vm_proc.returncode)
            if now - last_progress >= 60:
                last_progress = now
                print("soak: +%.0fs of %.0fs, %s" % (now - t0, seconds, self.progress()), flush=True)
            time.sleep(0.2)
        self.timeline.record("end", state=state)

    def progress(self) -> str:
        return "%d reloads, %d flapper stops, exporter %s" % (
            self.timeline.reloads, self.timeline.flap_downs,
            "restarted" if self.timeline.healthy else ("killed, not back" if self.timeline.kills else "up"))

    # --- after the run ----------------------------------------------------------------------

    def idle_end(self) -> Tuple[float, int, int, float]:
        """Stops the scraper, then waits up to IDLE_WAIT s for the exporter's threads and fds to
        be back to their level at the start: (rss, threads, fds, seconds waited)."""
        assert self.vm_proc is not None and self.exporter is not None
        self.children.stop(self.vm_proc, 10.0)
        _, threads0, fds0 = self.idle_start
        began = time.monotonic()
        figures = (NAN, 0, 0)
        while True:
            try:
                figures = proc_figures(self.exporter.pid)
            except OSError:
                return NAN, -1, -1, time.monotonic() - began
            waited = time.monotonic() - began
            if (figures[1] <= threads0 + FLOOR_THREADS_TOLERANCE and figures[2] <= fds0 + FLOOR_FDS_TOLERANCE) \
                    or waited >= IDLE_WAIT:
                return figures[0], figures[1], figures[2], waited
            time.sleep(0.5)


def parse_probe(text: str) -> Answer:
    """An Answer from a /probe page (the warm-up probes)."""
    answer = Answer(time.time())
    answer.up = 1
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value_text = line.rpartition(" ")
        name, _, labels_text = name_labels.partition("{")
        labels = dict(part.split("=", 1) for part in labels_text.rstrip("}").split(",") if "=" in part)
        answer.record(name, float(value_text), {k: v.strip('"') for k, v in labels.items()})
    return answer


def tail(path: str, size: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def exporter_log_problems(path: str) -> Tuple[int, int, List[str]]:
    """(error-level lines, tracebacks, a few of those lines) of the exporter's log."""
    errors, tracebacks = 0, 0
    examples: List[str] = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if "level=error" in line or "Traceback" in line:
                    errors += "level=error" in line
                    tracebacks += "Traceback" in line
                    if len(examples) < 5:
                        examples.append(line.strip()[:300])
    except OSError:
        pass
    return errors, tracebacks, examples


def analyse(soak: Soak, answers: Dict[Tuple[str, int], Answer], start: float, end: float,
            idle_end: Tuple[float, int, int, float], reload_ok: str) -> Report:
    timeline = soak.timeline
    targets = {str(t.id): t for t in soak.targets}
    report = Report()
    counts = ", ".join("%s %d" % (spec.name, sum(1 for t in soak.targets if t.cls == spec.name))
                       for spec in CLASSES if any(t.cls == spec.name for t in soak.targets))
    report.text("ws-exporter soak: %.0f s, %s, %d CPUs, Python %s, seed %d" % (
        soak.seconds, time.strftime("%Y-%m-%d %H:%M", time.localtime(start)), os.cpu_count() or 0,
        sys.version.split()[0], soak.args.seed))
    report.text("%d targets (%s) + the exporter's /metrics; VictoriaMetrics scrapes each every %gs, timeout %gs"
                % (len(soak.targets), counts, SCRAPE_INTERVAL, SCRAPE_TIMEOUT))
    windows = timeline.restart_windows()
    kill = timeline.kills[0] - start if timeline.kills else NAN
    back = timeline.healthy[0] - start if timeline.healthy else NAN
    report.text("faults: %d SIGHUP reloads; %d flapper stops, %d starts; exporter kill -9 at +%.1fs, %s"
                % (timeline.reloads, timeline.flap_downs, timeline.flap_ups, kill,
                   "answering again at +%.1fs after %d start(s)" % (back, timeline.restart_attempts)
                   if timeline.healthy else "NOT answering again by the end (%d start(s) tried)" % timeline.restart_attempts))
    report.text()

    def in_window(ts: float) -> bool:
        return any(lo <= ts <= hi for lo, hi in windows)

    in_run = [a for (tid, _), a in answers.items() if start <= a.ts <= end and a.up is not None]
    per_target: Dict[str, int] = {}
    for (tid, _), a in answers.items():
        if start <= a.ts <= end and a.up is not None:
            per_target[tid] = per_target.get(tid, 0) + 1
    scraped = len(soak.targets) + 1
    expected = scraped * int((end - start) // SCRAPE_INTERVAL)
    least = min([per_target.get(str(t.id), 0) for t in soak.targets] + [per_target.get("self", 0)])
    report.floor("scrapes done (least for one target)", "%d (%d)" % (len(in_run), least),
                 ">= %d%% of %d, each > 0" % (FLOOR_SCRAPES_DONE * 100, expected),
                 len(in_run) >= FLOOR_SCRAPES_DONE * expected and least > 0)
    failed = [(tid, a) for (tid, _), a in answers.items() if start <= a.ts <= end and a.up == 0]
    outside = [(tid, a) for tid, a in failed if not in_window(a.ts)]
    report.floor("scrapes failed (up == 0) outside the restart window", "%d" % len(outside), "= 0", not outside)
    report.info("scrapes failed inside the restart window", "%d" % (len(failed) - len(outside)))

    success_checked = success_wrong = values_checked = 0
    wrong: List[str] = []
    mixed: List[str] = []
    by_class: Dict[str, List[int]] = {}  # class -> [answers, success checked, wrong success, values checked, wrong values, successes]
    for (tid, _), a in sorted(answers.items(), key=lambda item: item[1].ts):
        target = targets.get(tid)
        if target is None or a.up != 1 or not start <= a.ts <= end:
            continue
        row = by_class.setdefault(target.cls, [0, 0, 0, 0, 0, 0])
        row[0] += 1
        row[5] += a.success == 1
        verdict = judge(target, a, timeline)
        success_checked += verdict.success_checked
        row[1] += verdict.success_checked
        values_checked += verdict.values_checked
        row[3] += verdict.values_checked
        where = "+%.1fs id=%d %s %s" % (a.ts - start, target.id, target.cls, target.url)
        if verdict.success_wrong:
            success_wrong += 1
            row[2] += 1
            wrong.append("%s: got %s; want %s%s" % (where, a.describe(), describe_expect(timeline.expect_at(target, a.ts)),
                                                   "; " + "; ".join(verdict.value_issues) if verdict.value_issues else ""))
        elif verdict.value_issues:
            row[4] += 1
            mixed.append("%s: %s; got %s" % (where, "; ".join(verdict.value_issues), a.describe()))
    report.info("answers judged (probe_success / values)", "%d / %d of %d answered scrapes" % (
        success_checked, values_checked, sum(r[0] for r in by_class.values())))
    report.floor("probe_success disagreeing with the truth", "%d" % success_wrong, "= 0", success_wrong == 0)
    report.floor("answers with values not their target's", "%d" % len(mixed), "= 0", not mixed)
    report.text("  (checked: failure phase/reason, status code (own code per 'status' target), close code "
                "(3000+id on soak_server targets), module timeout, chain id)")
    if soak.warmup_bad:
        report.floor("warm-up probes (one per class) as expected", "%d wrong" % len(soak.warmup_bad), "= 0", False)

    durations = [a.duration for (tid, _), a in answers.items()
                 if tid != "self" and start <= a.ts <= end and a.duration is not None and not in_window(a.ts)]
    p99 = percentile(durations, 99)
    report.floor("scrape duration p99 (s), outside the restart window",
                 "%.3f (p50 %.3f, max %.3f)" % (p99, percentile(durations, 50), max(durations) if durations else NAN),
                 "< %g (scrape timeout)" % SCRAPE_TIMEOUT, p99 < SCRAPE_TIMEOUT)

    restart_s = (timeline.healthy[0] - timeline.kills[0]) if timeline.healthy and timeline.kills else math.inf
    report.floor("exporter answering again after kill -9 (s)", "%.1f" % restart_s,
                 "<= %g" % FLOOR_RESTART_S, restart_s <= FLOOR_RESTART_S)

    assert soak.exporter is not None
    final_pid = soak.exporter.pid
    # The restarted process warms up first (a thread per scraper connection, its stack and malloc
    # arenas growing as the probes run): its first quarter, at least two scrape intervals, is left out.
    restarted = timeline.healthy[0] if timeline.healthy else math.inf
    warm_from = restarted + max(2 * SCRAPE_INTERVAL, (end - restarted) / 4)
    steady = [s for s in soak.samples if s[2] == final_pid and s[1] >= warm_from]
    with open(os.path.join(soak.work, "resources.tsv"), "w") as f:
        f.write("at_s\tpid\trss_mb\tthreads\tfds\n")
        f.writelines("%.1f\t%d\t%.2f\t%d\t%d\n" % (s[1] - start, s[2], s[3], s[4], s[5]) for s in soak.samples)
    draw_resources(soak.work)
    quarter = len(steady) // 4
    if quarter >= 1:
        first = [s[3] for s in steady[:quarter]]
        last = [s[3] for s in steady[-quarter:]]
        first_rss, last_rss = med(first), med(last)
        report.text("exporter resources every %.0fs from /proc, the restarted process from %.0fs after its restart:"
                    % (soak.sample_every, warm_from - restarted))
        report.floor("RSS median first / last quarter (MB), n=%d each" % quarter, "%.1f / %.1f" % (first_rss, last_rss),
                     "last <= %.2fx first" % FLOOR_RSS_GROWTH, last_rss <= first_rss * FLOOR_RSS_GROWTH)
        report.info("threads median first / last quarter", "%g / %g" % (med([s[4] for s in steady[:quarter]]),
                                                                        med([s[4] for s in steady[-quarter:]])))
        report.info("open fds median first / last quarter", "%g / %g" % (med([s[5] for s in steady[:quarter]]),
                                                                         med([s[5] for s in steady[-quarter:]])))
        tenths = [med([s[3] for s in steady[len(steady) * i // 10:max(len(steady) * (i + 1) // 10, len(steady) * i // 10 + 1)]])
                  for i in range(10)] if len(steady) >= 10 else [s[3] for s in steady]
        report.info("RSS by tenth of that window (MB)", " ".join("%.1f" % v for v in tenths))
        report.info("RSS / threads / fds max under load", "%.1f MB / %d / %d" % (
            max(s[3] for s in steady), max(s[4] for s in steady), max(s[5] for s in steady)))
    else:
        report.floor("RSS median first / last quarter", "%d samples after the restart" % len(steady),
                     ">= 4 samples", False)
    first_rss, last_rss = last_hour_ends([s for s in soak.samples if s[2] == final_pid], end - min(LAST_HOUR_S, (end - start) / 2), end)
    if end - start >= 2 * LAST_HOUR_S:
        report.floor("RSS last hour: median first / last 10 min (MB)", "%.1f / %.1f" % (first_rss, last_rss),
                     "last <= first + %g" % FLOOR_LAST_HOUR_MB, last_rss <= first_rss + FLOOR_LAST_HOUR_MB)
    else:
        report.info("RSS last half: median of its first / last sixth (MB)", "%.1f / %.1f" % (first_rss, last_rss))
    rss0, threads0, fds0 = soak.idle_start
    rss1, threads1, fds1, waited = idle_end
    report.floor("threads idle: start / end (%.1fs after the scraper stopped)" % waited, "%d / %d" % (threads0, threads1),
                 "end <= start + %d" % FLOOR_THREADS_TOLERANCE, 0 <= threads1 <= threads0 + FLOOR_THREADS_TOLERANCE)
    report.floor("open fds idle: start / end", "%d / %d" % (fds0, fds1), "end <= start + %d" % FLOOR_FDS_TOLERANCE,
                 0 <= fds1 <= fds0 + FLOOR_FDS_TOLERANCE)
    report.info("RSS idle: start / end (MB)", "%.1f / %.1f" % (rss0, rss1))
    report.floor("exporter still running at the end, exits by itself", "%s, %d" % (
        "yes" if soak.exporter.alive() else "NO", len(timeline.crashes)), "yes, 0",
                 soak.exporter.alive() and not timeline.crashes)
    report.floor("last config reload successful (/metrics)", reload_ok, "= 1", reload_ok == "1")
    errors, tracebacks, examples = exporter_log_problems(soak.exporter.log_path)
    report.floor("exporter log: error lines / tracebacks", "%d / %d" % (errors, tracebacks), "= 0 / 0",
                 errors == 0 and tracebacks == 0)

    report.text()
    report.text("%-15s %7s %9s %6s %9s %6s %9s" % ("class", "answers", "succeeded", "judged", "wrong", "values", "wrong"))
    for spec in CLASSES:
        if spec.name in by_class:
            r = by_class[spec.name]
            report.text("%-15s %7d %9d %6d %9d %6d %9d" % (spec.name, r[0], r[5], r[1], r[2], r[3], r[4]))
    for title, lines in (("probe_success disagreeing with the truth", wrong), ("values not their target's", mixed)):
        if lines:
            report.text()
            report.text("%s, first %d of %d:" % (title, min(10, len(lines)), len(lines)))
            report.lines.extend("  " + line for line in lines[:10])
    if outside:
        report.text()
        report.text("failed scrapes outside the restart window, first %d of %d:" % (min(10, len(outside)), len(outside)))
        for tid, a in outside[:10]:
            target = targets.get(tid)
            report.text("  +%.1fs id=%s %s: scrape %.3fs" % (a.ts - start, tid, target.url if target else "(exporter /metrics)",
                                                           a.duration if a.duration is not None else NAN))
    if examples:
        report.text()
        report.text("exporter log, first error lines:")
        report.lines.extend("  " + line for line in examples)
    if soak.warmup_bad:
        report.text()
        report.text("warm-up probes not as expected:")
        report.lines.extend("  " + line for line in soak.warmup_bad)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_S") or DEFAULT_SECONDS),
                        help="length of the scraped run (default $SOAK_S, else %g)" % DEFAULT_SECONDS)
    parser.add_argument("--seed", type=int, default=1, help="for the fault schedule")
    parser.add_argument("--exporter", default=EXPORTER, help="the ws_exporter.py to soak (for A/B runs)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory even after a clean run")
    parser.add_argument("--report-dir", help="also write report.txt and resources.svg here")
    parser.add_argument("--draw", metavar="DIR", help="only draw DIR/resources.svg again, from a kept work directory")
    args = parser.parse_args(argv)
    if args.draw:
        print(draw_resources(args.draw))
        return 0
    if args.seconds < 30:
        parser.error("--seconds must be at least 30")
    missing = [name for name in ("WS_VICTORIA_METRICS", "WS_PEER_NODE", "WS_PEER_NODE_PATH") if not os.environ.get(name)]
    if missing or shutil.which("openssl") is None:
        print("soak: missing %s: run `bash .ci/peers && . .cache/peers/env.sh` first"
              % ", ".join(missing or ["the openssl CLI"]), file=sys.stderr)
        return 2

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even when started in the background
    work = tempfile.mkdtemp(prefix="wsx-soak-")
    children = Children()
    keep = args.keep
    began = time.monotonic()
    try:
        soak = Soak(args, work, children)
        soak.setup()
        soak.start_exporter()
        soak.warm_up()
        print("soak: %d targets, exporter pid %d on %s, work directory %s; running %.0f s"
              % (len(soak.targets), soak.exporter.pid if soak.exporter else 0,
                 soak.exporter.address if soak.exporter else "?", work, args.seconds), flush=True)
        soak.timeline.set_start()
        soak.start_vm()
        start = soak.timeline.start_wall
        soak.run()
        end = time.time()
        time.sleep(SCRAPE_TIMEOUT + 1.5)  # the last scrapes begun before the end are stored
        answers = export_answers(soak.vm_port, start, end)
        reload_ok = "?"
        assert soak.exporter is not None
        try:
            metrics = http_get(soak.exporter.port, "/metrics", timeout=5)[1].decode("utf-8", "replace")
            for line in metrics.splitlines():
                if line.startswith("ws_exporter_config_last_reload_successful "):
                    reload_ok = line.split()[1]
        except OSError:
            reload_ok = "no answer"
        idle = soak.idle_end()
        report = analyse(soak, answers, start, end, idle, reload_ok)
        report.text()
        report.text("floors: %d met, %d missed%s" % (report.met, len(report.missed), ":" if report.missed else ""))
        report.lines.extend("  MISSED " + line for line in report.missed)
        report.text("soak took %.0f s; timeline, logs and data in %s%s" % (
            time.monotonic() - began, work, " (kept)" if (keep or report.missed) else " (removed)"))
        print("\n".join(report.lines), flush=True)
        if args.report_dir:
            os.makedirs(args.report_dir, exist_ok=True)
            with open(os.path.join(args.report_dir, "report.txt"), "w") as f:
                f.write("\n".join(report.lines) + "\n")
            shutil.copy(os.path.join(work, "resources.svg"), args.report_dir)
        keep = keep or bool(report.missed)
        soak.timeline.close()
        return 1 if report.missed else 0
    except KeyboardInterrupt:
        keep = True
        print("soak: interrupted; work directory kept: %s" % work, file=sys.stderr, flush=True)
        return 130
    except BaseException:
        keep = True
        print("soak: stopped by an exception; work directory kept: %s" % work, file=sys.stderr, flush=True)
        raise
    finally:
        children.stop_all()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
