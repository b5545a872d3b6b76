#!/usr/bin/env python3
"""Stampede client: N connections opened first, then one request fired on each at once.

    loadtest/stampede.py http://127.0.0.1:8080/restaurant/dufva?cold=1 --clients 1000

Every connection is established before the first request is written, so the numbers are
about what the proxy does with N simultaneous requests for one key (coalescing, waking
waiters), not about its accept queue. Each request's latency runs from the moment its
bytes are written to the last byte of its response. Standard library only (asyncio).

Prints one line of key=value pairs:
    ok=1000 failed=0 p50_ms=201.3 p99_ms=214.8 max_ms=215.0 statuses=200:1000 cache=HIT:3,COALESCED:997
Exits 1 if any request failed (connection error, timeout or non-2xx answer).
"""

import argparse
import asyncio
import collections
import math
import resource
import sys
import time
import urllib.parse


class OneRequest(asyncio.Protocol):
    """One connection carrying one request; parses just enough HTTP/1.1 to know the end."""

    def __init__(self, done: asyncio.Future):
        self.done = done
        self.transport = None
        self.buf = bytearray()
        self.sent_at = 0.0
        self.head = None  # (status, headers) once the head is in
        self.body_start = 0
        self.length = None
        self.chunked = False

    def connection_made(self, transport):
        self.transport = transport

    def fire(self, request: bytes):
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data):
        self.buf += data
        if self.head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.head = (status, headers)
            self.body_start = end + 4
            if "content-length" in headers:
                self.length = int(headers["content-length"])
            self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        body = len(self.buf) - self.body_start
        if self.length is not None and body >= self.length:
            self.finish()
        elif self.chunked and self.buf.endswith(b"0\r\n\r\n"):
            self.finish()
        elif self.length is None and not self.chunked and self.head[0] in (204, 304):
            self.finish()

    def finish(self):
        if not self.done.done():
            status, headers = self.head
            self.done.set_result((time.perf_counter() - self.sent_at, status, headers.get("x-cache", "-")))
        self.transport.close()

    def connection_lost(self, exc):
        if not self.done.done():
            if self.head is not None and self.length is None and not self.chunked:
                # Answer delimited by the end of the connection.
                self.finish()
            else:
                self.done.set_exception(ConnectionError(f"connection lost: {exc}"))


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


async def run(url, clients, method, body, content_type, timeout):
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: stoa-stampede\r\n"
    payload = body.encode() if body is not None else b""
    if body is not None:
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n"
    request = (head + "\r\n").encode() + payload

    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(clients)]
    protos = []

    async def connect(fut):
        _, proto = await loop.create_connection(lambda: OneRequest(fut), host, port)
        return proto

    # Connect in slices so the listener's accept queue is never the thing measured.
    for start in range(0, clients, 200):
        protos += await asyncio.wait_for(
            asyncio.gather(*(connect(f) for f in futures[start:start + 200])), timeout)
    for proto in protos:  # all connected: fire every request, back to back
        proto.fire(request)
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--method", default="GET")
    ap.add_argument("--body", help="request body (e.g. a JSON document)")
    ap.add_argument("--content-type", default="application/json")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds for the whole run")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.clients + 64
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))

    try:
        results = asyncio.run(run(args.url, args.clients, args.method, args.body,
                                  args.content_type, args.timeout))
    except (OSError, asyncio.TimeoutError) as exc:
        print(f"stampede: {args.url}: {exc!r}", file=sys.stderr)
        print(f"ok=0 failed={args.clients} p50_ms=nan p99_ms=nan max_ms=nan statuses=- cache=-")
        return 1
    lat, statuses, caches, failed = [], collections.Counter(), collections.Counter(), 0
    for r in results:
        if isinstance(r, BaseException):
            failed += 1
            continue
        seconds, status, cache = r
        statuses[status] += 1
        caches[cache] += 1
        if 200 <= status < 300:
            lat.append(seconds * 1000.0)
        else:
            failed += 1
    lat.sort()
    fmt = lambda c: ",".join(f"{k}:{v}" for k, v in sorted(c.items(), key=lambda kv: str(kv[0]))) or "-"
    print(f"ok={len(lat)} failed={failed} p50_ms={percentile(lat, 50):.1f} "
          f"p99_ms={percentile(lat, 99):.1f} max_ms={(lat[-1] if lat else float('nan')):.1f} "
          f"statuses={fmt(statuses)} cache={fmt(caches)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
