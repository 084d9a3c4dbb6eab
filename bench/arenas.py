#!/usr/bin/env python3
"""Where the exporter's memory goes under a steady load: glibc malloc's own accounting of the
running process, and its resident memory split by kind of mapping.

    . .cache/peers/env.sh && python3 bench/arenas.py [--exporter PATH] [--rounds 3] [--seconds 60]

The exporter runs under this file (``--inside``), which starts a thread that samples every 5 s:
RSS; from mallinfo2(), the bytes malloc holds from the system outside mmap'ed blocks ("arena"),
how much of them is in use and how much free; and from /proc/self/smaps, the resident pages of
the main heap, of the threads' malloc arenas (mappings aligned to glibc's 64 MiB heap size) and
of all other anonymous memory (Python's object arenas, thread stacks).  wrk keeps --connections
keep-alive connections (a handler thread each, as a fleet of scrapers does) probing ws, wss and
ping targets on node ``ws`` echo servers and a refused port, in rounds separated by idle pauses.

Memory in use at each pause says whether anything is leaked (it comes back to the same level);
what the arenas keep free and resident, and how much the threads' arenas grow from one round to
the next, says whether freed memory is left in pieces that no later request can reuse.
"""
import argparse
import ctypes
import json
import os
import re
import runpy
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402  (the benchmark's helpers: node server, certificates, processes)

SAMPLE_EVERY = 5.0
IDLE_SECONDS = 11.0
GLIBC_HEAP_BYTES = 64 << 20  # HEAP_MAX_SIZE on 64-bit: a thread arena's heaps are aligned to it
FIELDS = ("rss", "arena", "in_use", "free", "heap", "thread_arenas", "other_anon", "threads")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def resident_by_kind() -> Dict[str, float]:
    """MB resident in the main heap, the threads' malloc arenas and other anonymous mappings."""
    kinds = {"heap": 0, "thread_arenas": 0, "other_anon": 0, "file": 0}
    kind = "file"
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                fields = line.split()
                start = int(head.split("-")[0], 16)
                name = fields[5] if len(fields) > 5 else ""
                kind = ("heap" if name == "[heap]" else "file" if name else
                        "thread_arenas" if start % GLIBC_HEAP_BYTES == 0 else "other_anon")
            elif head == "Rss:":
                kinds[kind] += int(line.split()[1])
    return {name: kb / 1024.0 for name, kb in kinds.items()}


def sample_forever(path: str) -> None:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    with open(path, "w", buffering=1) as out:
        while True:
            info = libc.mallinfo2()
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
            row = dict(resident_by_kind(), t=time.monotonic(), rss=rss, arena=info.arena / 2 ** 20,
                       in_use=info.uordblks / 2 ** 20, free=info.fordblks / 2 ** 20, threads=threading.active_count())
            out.write(json.dumps(row) + "\n")
            time.sleep(SAMPLE_EVERY)


def inside(samples: str, argv: List[str]) -> None:
    """Run the exporter as __main__ in this process, sampled by a daemon thread."""
    threading.Thread(target=sample_forever, args=(samples,), daemon=True).start()
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


def wait_answering(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit("arenas: the exporter did not start")


def wrk(port: int, paths: List[str], connections: int, seconds: float, script: str) -> float:
    with open(script, "w") as f:
        f.write("paths = {%s}\ni = 0\nrequest = function()\n  i = i + 1\n  return wrk.format('GET', paths[i %% #paths + 1])\nend\n"
                % ", ".join(json.dumps(p) for p in paths))
    out = subprocess.run([run.env("WS_WRK"), "-t2", "-c%d" % connections, "-d%ds" % seconds, "--timeout", "10s", "-s",
                          script, "http://127.0.0.1:%d/" % port], capture_output=True, text=True,
                         env=dict(os.environ, LD_LIBRARY_PATH=run.env("WS_WRK_LD_LIBRARY_PATH"))).stdout
    rate = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    return float(rate.group(1)) if rate else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--exporter", default=run.EXPORTER)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=60, help="of load in each round")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--inside", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        return inside(args.inside[0], args.inside[1:])
    tmp = tempfile.mkdtemp(prefix="ws-arenas-")
    pki = run.make_pki(tmp)
    servers = [run.start_node(None), run.start_node((pki["server.pem"], pki["server.key"]))]
    config = os.path.join(tmp, "config.json")
    with open(config, "w") as f:
        json.dump({"modules": {"ws": {"preset": "connect"}, "ping": {"preset": "ping"},
                               "wss": {"preset": "connect", "tls": {"ca_file": pki["ca.pem"]}}}}, f)
    port, samples = run.free_port(), os.path.join(tmp, "samples.jsonl")
    exporter = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--inside", samples, os.path.abspath(args.exporter),
                                 "--config.file=" + config, "--web.listen-address=127.0.0.1:%d" % port],
                                stderr=subprocess.DEVNULL)
    try:
        wait_answering(port)
        ws, wss = servers[0].port, servers[1].port
        paths = ["/probe?module=ws&target=ws://127.0.0.1:%d/" % ws, "/probe?module=wss&target=wss://127.0.0.1:%d/" % wss,
                 "/probe?module=ping&target=ws://127.0.0.1:%d/" % ws,
                 "/probe?module=ws&target=ws://127.0.0.1:%d/" % run.free_port()]
        marks: List[Tuple[float, float, float]] = []
        for _ in range(args.rounds):
            rate = wrk(port, paths, args.connections, args.seconds, os.path.join(tmp, "mix.lua"))
            loaded = time.monotonic()
            time.sleep(IDLE_SECONDS)
            marks.append((rate, loaded, time.monotonic()))
        report(samples, marks, args)
    finally:
        exporter.kill()
        exporter.wait()
        for server in servers:
            run.stop(server.proc)


def report(samples: str, marks: List[Tuple[float, float, float]], args: argparse.Namespace) -> None:
    with open(samples) as f:
        rows = [json.loads(line) for line in f]
    print("%s: %d keep-alive connections, %d s of load a round (probes/s), then idle; MB"
          % (os.path.basename(args.exporter), args.connections, args.seconds))
    print("| round | probes/s | when | RSS | malloc arena | in use | free | main heap | thread arenas | other anon |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for index, (rate, loaded, idle) in enumerate(marks, 1):
        for when, at in (("end of load", loaded), ("idle", idle)):
            row = [r for r in rows if r["t"] <= at][-1]  # the last sample before that moment
            print("| %d | %.0f | %s | %s |" % (index, rate, when, " | ".join("%.1f" % row[k] for k in FIELDS[:-1])))
    growth = [r["thread_arenas"] for r in rows if marks[-1][1] - args.seconds <= r["t"] <= marks[-1][1]]
    if len(growth) >= 2:
        print("thread arenas' RSS during the last round's load: %.1f -> %.1f MB (median %.1f)"
              % (growth[0], growth[-1], statistics.median(growth)))


if __name__ == "__main__":
    main()
