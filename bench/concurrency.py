#!/usr/bin/env python3
"""Many probes at once against a server that accepts and never answers.

Starts ws_exporter.py as a subprocess, a silent TCP server, and N client threads that each
scrape /probe once with a 2 s scrape timeout (so each probe runs under a 1.5 s deadline), all at
the same moment.  Prints the slowest answer, the status codes, and the exporter's peak thread
count and peak RSS.  Loopback only; the run ends by itself.

    python3 bench/concurrency.py [--probes 1000] [--max-concurrent 1000]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
EXPORTER = os.path.join(HERE, "..", "ws_exporter.py")


def silent_server() -> Tuple[int, threading.Event]:
    """Accept every connection, keep it open, never send a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    stop = threading.Event()
    held: List[socket.socket] = []

    def run() -> None:
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        while not stop.is_set():
            for _ in selector.select(0.1):
                try:
                    held.append(listener.accept()[0])
                except BlockingIOError:
                    pass
        for sock in held:
            sock.close()
        listener.close()

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1], stop


def start_exporter(max_concurrent: int) -> Tuple[subprocess.Popen, int]:  # type: ignore[type-arg]
    proc = subprocess.Popen(
        [sys.executable, EXPORTER, "--web.listen-address=127.0.0.1:0", "--log.level=warn",
         "--probe.max-concurrent=%d" % max_concurrent, "--web.max-connections=%d" % (max_concurrent + 64),
         # One process: this measures how one interpreter copes with a thousand probes at once
         # (its threads and memory), and finds the port among that process's listening sockets.
         "--web.workers=1"],
        stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    # The exporter logs its address at info; at warn it logs nothing, so find the port in /proc.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        port = listening_port(proc.pid)
        if port:
            return proc, port
        time.sleep(0.01)
    proc.kill()
    raise SystemExit("the exporter did not start listening")


def listening_port(pid: int) -> int:
    inodes = set()
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        with open("/proc/%d/net/tcp" % pid) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    return int(fields[1].split(":")[1], 16)
    except OSError:
        pass
    return 0


def sample(pid: int, peaks: Dict[str, int], stop: threading.Event) -> None:
    while not stop.wait(0.01):
        try:
            with open("/proc/%d/status" % pid) as f:
                status = f.read()
        except OSError:
            return
        threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        peaks["threads"] = max(peaks.get("threads", 0), threads)
        peaks["rss_kb"] = max(peaks.get("rss_kb", 0), hwm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--max-concurrent", type=int, default=1000)
    args = parser.parse_args()

    silent_port, stop_silent = silent_server()
    proc, port = start_exporter(args.max_concurrent)
    peaks: Dict[str, int] = {}
    stop_sampling = threading.Event()
    sampler = threading.Thread(target=sample, args=(proc.pid, peaks, stop_sampling))
    sampler.start()
    barrier = threading.Barrier(args.probes + 1)
    answers: List[Tuple[int, float]] = []
    lock = threading.Lock()
    path = "/probe?target=ws://127.0.0.1:%d/" % silent_port

    def scrape() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.connect()
        barrier.wait()
        start = time.monotonic()
        try:
            conn.request("GET", path, headers={"X-Prometheus-Scrape-Timeout-Seconds": "2"})
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except OSError:
            status = 0
        with lock:
            answers.append((status, time.monotonic() - start))
        conn.close()

    threads = [threading.Thread(target=scrape) for _ in range(args.probes)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join(60)
    stop_sampling.set()
    sampler.join()
    proc.terminate()
    proc.wait(10)
    stop_silent.set()

    statuses = collections.Counter(status for status, _ in answers)
    slowest = max(elapsed for _, elapsed in answers)
    print("probes: %d at once, silent server, scrape timeout 2 s (probe deadline 1.5 s), --probe.max-concurrent=%d"
          % (args.probes, args.max_concurrent))
    print("answers: %s" % ", ".join("%s x%d" % (s or "no answer", n) for s, n in sorted(statuses.items())))
    print("slowest answer: %.3f s" % slowest)
    print("peak exporter threads: %d" % peaks.get("threads", 0))
    print("peak exporter RSS: %.1f MB" % (peaks.get("rss_kb", 0) / 1024))


if __name__ == "__main__":
    main()
