#!/usr/bin/env python3
"""GETs /k/0 .. /k/N-1 on 127.0.0.1:PORT over THREADS keep-alive connections and prints
how the answers were served: "HIT 123 MISS 4 ... seconds 1.23" (X-Cache values).

    disk_keys.py PORT N [THREADS]
"""
import http.client
import sys
import threading
import time
from collections import Counter

port, n = int(sys.argv[1]), int(sys.argv[2])
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
counts = Counter()
lock = threading.Lock()


def run(start):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    mine = Counter()
    for i in range(start, n, threads):
        conn.request("GET", f"/k/{i}")
        r = conn.getresponse()
        r.read()
        mine[r.getheader("x-cache", "none") if r.status == 200 else f"status-{r.status}"] += 1
    with lock:
        counts.update(mine)


t0 = time.monotonic()
workers = [threading.Thread(target=run, args=(s,)) for s in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
took = time.monotonic() - t0
print(" ".join(f"{k} {v}" for k, v in sorted(counts.items())), f"seconds {took:.2f}")
