"""GET a path every INTERVAL seconds, each time on a new connection, until stdin closes.

    python3 metrics_poller.py PORT PATH INTERVAL

Prints ``ready`` once started, then, when stdin closes, one line per request: its latency in
seconds and its status (0: no answer).  A process of its own, so that the latencies it measures
are not the bench's: in the bench process its thread would wait for the GIL behind the thread
that reads a thousand answers (up to the 5 ms switch interval at each of its blocking calls,
about 100 ms per request in all).  127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import os
import select
import sys
import time
from typing import List, Tuple


def main() -> None:
    port, path, interval = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    results: List[Tuple[float, int]] = []
    print("ready", flush=True)
    due = time.monotonic()
    while True:
        began = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path)
            answer = conn.getresponse()
            answer.read()
            code = answer.status
        except OSError:
            code = 0
        finally:
            conn.close()
        results.append((time.monotonic() - began, code))
        due = max(due + interval, time.monotonic())
        ready, _, _ = select.select([sys.stdin], [], [], max(0.0, due - time.monotonic()))
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
    sys.stdout.write("".join("%.6f %d\n" % result for result in results))


if __name__ == "__main__":
    main()
