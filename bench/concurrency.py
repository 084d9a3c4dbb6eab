#!/usr/bin/env python3
"""Many probes at once against a server that accepts and never answers.

Starts ws_exporter.py as users start it (``python3 ws_exporter.py``, one process), a silent
server (hold_server.py never), and scrapes /probe N times at once, each with a 2 s scrape timeout
(so each probe runs under a 1.5 s deadline), while /metrics is scraped every 50 ms.  Prints the
slowest answer, the status codes, the slowest /metrics, and the exporter's threads and peak RSS.
Loopback only; the run ends by itself.  bench/run.py measures the same (its "silent" section)
side by side with blackbox_exporter; this needs no peers.

    python3 bench/concurrency.py [--probes 1000] [--max-concurrent 1000] [--exporter-arg=ARG ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
from typing import List, Optional, Sequence

import run as bench  # bench/run.py: this script's directory is first on sys.path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--max-concurrent", type=int, default=1000)
    parser.add_argument("--exporter", default=bench.EXPORTER, help="the ws_exporter.py to measure")
    parser.add_argument("--exporter-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for the exporter, repeatable, written with '='")
    args = parser.parse_args(argv)
    bench.EXPORTER, bench.EXPORTER_ARGS = os.path.abspath(args.exporter), list(args.exporter_arg)
    if bench.raise_nofile_limit() < args.probes + 100:
        sys.exit("concurrency: RLIMIT_NOFILE is too low for %d probes at once" % args.probes)
    tmp = tempfile.mkdtemp(prefix="wsx-concurrency-")
    silent = bench.HoldServer("never")
    flags = ["--probe.max-concurrent=%d" % args.max_concurrent,
             "--web.max-connections=%d" % (args.max_concurrent + 64)]
    exporter = bench.start_ours("", tmp, flags)
    try:
        bench.wait_healthy(exporter)
        result = bench.silent_probes(exporter, silent.port, args.probes)
    finally:
        bench.stop(exporter.proc)
        silent.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    others: List[str] = ["%s x%d" % (code or "no answer", n) for code, n in sorted(result.statuses.items())]
    print("probes: %d at once, silent server, scrape timeout 2 s (probe deadline 1.5 s), %s"
          % (args.probes, " ".join(flags + bench.EXPORTER_ARGS)))
    print("answers: %s; %d of them 200 with probe_success 0" % (", ".join(others), result.failed_probes))
    print("slowest answer: %.3f s after the first connect" % result.last_answer_s)
    print("slowest /metrics meanwhile: %.1f ms (%d scrapes, %d failed)"
          % (result.metrics_max_s * 1000, result.metrics_count, result.metrics_failures))
    print("exporter threads: %d before, %d at the peak, %d after%s"
          % (result.threads_before, result.threads_peak, result.threads_after,
             "" if result.threads_back_s != result.threads_back_s else " (back in %.2f s)" % result.threads_back_s))
    print("peak exporter RSS: %.1f MB" % result.peak_rss_mb)
    print("exporter CPU: %.3f ms per probe" % result.cpu_ms)
    return 0 if collections.Counter(result.statuses) == collections.Counter({200: args.probes}) else 1


if __name__ == "__main__":
    sys.exit(main())
