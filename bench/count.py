#!/usr/bin/env python3
"""What one probe costs an exporter in system calls, context switches and releases of the
interpreter's lock, for ws_exporter.py and bench/reference_exporter.py side by side.

    . .cache/peers/env.sh && python3 bench/count.py [--probes N] [--host 127.0.0.1|localhost] [--exporter PATH]

Each exporter runs as a process of its own; after a warm-up over one keep-alive connection,
``perf stat`` attaches to it (every thread) while N more probes go over that connection, one at
a time, to a node ``ws`` echo server (ws:// and wss://).  Counted: raw_syscalls:sys_enter,
context-switches, a uprobe on libpython's PyEval_SaveThread (each call is one release of
the lock) and uprobes on libc's malloc, calloc and realloc (the native allocations, which
fragment malloc's arenas: docs/internals.md, "Memory").  ``strace -f -c`` then gives the system calls by name for one more run.  Then the
same counts and the CPU per probe while wrk keeps --load probes in flight (default 16), where
each release of the lock is a hand-off to another thread.  Needs perf
with uprobes (run as root) and strace; prints what it cannot measure instead of a number.
"""
import argparse
import http.client
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402  (the benchmark's helpers: node server, certificates, processes)

LIBPYTHON = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
GIL_EVENT = "probe_libpython3:PyEval_SaveThread"  # perf names the group after the library
ALLOC_EVENTS = ["probe_libc:malloc", "probe_libc:calloc", "probe_libc:realloc"]
EVENTS = ["raw_syscalls:sys_enter", "context-switches", GIL_EVENT] + ALLOC_EVENTS


def add_uprobe(library: str, event: str) -> bool:
    if not os.path.exists(library):
        return False
    subprocess.run(["perf", "probe", "-q", "-d", event], capture_output=True)
    added = subprocess.run(["perf", "probe", "-q", "-x", library, "--add", event.split(":")[1]], capture_output=True)
    return added.returncode == 0


def start(kind: str, port: int, ca: str) -> "subprocess.Popen[bytes]":
    if kind == "ours":
        argv = run.ours_argv(port)
        cwd = os.path.dirname(run.EXPORTER)
    else:
        argv = [sys.executable, os.path.join(HERE, "reference_exporter.py"), str(port)]
        cwd = HERE
    return subprocess.Popen(argv, cwd=cwd, env=dict(os.environ, SSL_CERT_FILE=ca),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def probe_loop(port: int, path: str, count: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(count):
        conn.request("GET", path)
        body = conn.getresponse().read()
        if b"probe_success 1" not in body:
            sys.exit("count: a probe failed: %s" % body[:400])
    conn.close()


def measure(tool: list, pid: int, port: int, path: str, count: int) -> str:
    """Warm up, attach ``tool`` to ``pid``, run ``count`` probes, stop the tool; its report."""
    probe_loop(port, path, 20)
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as out:
        proc = subprocess.Popen(tool + ["-o", out.name, "-p", str(pid)], stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attaching takes a moment; nothing runs meanwhile
        probe_loop(port, path, count)
        proc.send_signal(2)
        proc.wait(30)
        return out.read()


def cpu_ms(pid: int, port: int, path: str, count: int) -> float:
    """The exporter's CPU ms per probe, nothing attached to it."""
    probe_loop(port, path, 20)
    before = run.cpu_seconds(pid)
    probe_loop(port, path, count)
    return (run.cpu_seconds(pid) - before) * 1000 / count


def measure_load(pid: int, url: str, connections: int, events: List[str]) -> Tuple[List[float], float]:
    """perf stat over one wrk run of 3 s: per-probe counts and the exporter's CPU ms per probe."""
    run.run_wrk(url, connections, 1)  # every handler thread started
    settle(pid)
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as out:
        proc = subprocess.Popen(["perf", "stat", "-e", ",".join(events), "-o", out.name, "-p", str(pid)], stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        before = run.cpu_seconds(pid)
        requests = run.run_wrk(url, connections, 3)[0]
        cpu = (run.cpu_seconds(pid) - before) * 1000 / max(requests, 1)
        proc.send_signal(2)
        proc.wait(30)
        return perf_counts(out.read(), requests), cpu


def settle(pid: int, seconds: float = 10.0) -> None:
    """Until the warm-up's handler threads have ended: perf cannot attach to a thread that ends
    while it does, and gives up on the whole process."""
    def threads() -> int:
        return len(os.listdir("/proc/%d/task" % pid))

    deadline, last = time.monotonic() + seconds, -1
    while time.monotonic() < deadline and threads() != last:
        last = threads()
        time.sleep(0.3)


def perf_counts(report: str, count: int) -> List[float]:
    found = []
    for event in EVENTS:
        match = re.search(r"^\s*([\d,]+)\s+%s" % re.escape(event), report, re.M)
        found.append(int(match.group(1).replace(",", "")) / count if match else float("nan"))
    return found


def columns(counts: List[float]) -> str:
    """System calls, context switches, lock releases, and malloc + calloc + realloc as one."""
    return "%.1f | %.1f | %.1f | %.1f" % (*counts[:3], sum(counts[3:]))


def strace_top(report: str, count: int, top: int = 8) -> str:
    rows = []
    for line in report.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1].isidentifier() and fields[3].isdigit() and fields[-1] != "total":
            rows.append((int(fields[3]) / count, fields[-1]))
    return ", ".join("%s %.1f" % (name, n) for n, name in sorted(rows, reverse=True)[:top])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--load", type=int, default=16, help="wrk connections for the counts under load")
    parser.add_argument("--exporter", default=run.EXPORTER, help="the ws_exporter.py to count (for before/after)")
    args = parser.parse_args()
    run.EXPORTER = os.path.abspath(args.exporter)
    tmp = tempfile.mkdtemp(prefix="ws-count-")
    pki = run.make_pki(tmp)
    ca, cert, key = pki["ca.pem"], pki["server.pem"], pki["server.key"]
    uprobe = add_uprobe(LIBPYTHON, GIL_EVENT) and all([add_uprobe(LIBC, event) for event in ALLOC_EVENTS])
    servers = {"ws": run.start_node(None), "wss": run.start_node((cert, key))}
    print("per probe, %d probes, target host %s%s" % (args.probes, args.host, "" if uprobe else " (no uprobes: lock releases and allocations not counted)"))
    print("| exporter | scheme | probes | CPU ms | system calls | context switches | lock releases | native allocations | system calls by name |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in ("reference", "ours"):
        for scheme, server in servers.items():
            port = run.free_port()
            proc = start(kind, port, ca)
            try:
                time.sleep(1.0)
                path = "/probe?target=%s://%s:%d/" % (scheme, args.host, server.port)
                events = EVENTS if uprobe else EVENTS[:2]
                counts = perf_counts(measure(["perf", "stat", "-e", ",".join(events)], proc.pid, port, path, args.probes), args.probes)
                names = strace_top(measure(["strace", "-f", "-c"], proc.pid, port, path, args.probes), args.probes)
                cpu = cpu_ms(proc.pid, port, path, max(args.probes, 1000))
                print("| %s | %s | one at a time | %.2f | %s | %s |" % (kind, scheme, cpu, columns(counts), names))
                loaded, cpu = measure_load(proc.pid, "http://127.0.0.1:%d%s" % (port, path), args.load, events)
                print("| %s | %s | %d at once | %.2f | %s | |" % (kind, scheme, args.load, cpu, columns(loaded)))
            finally:
                proc.kill()
                proc.wait()
    for server in servers.values():
        run.stop(server.proc)


if __name__ == "__main__":
    main()
