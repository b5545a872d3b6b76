#!/usr/bin/env python3
"""Idle keep-alive connections: what they cost the gateway, and whether it lets them go.

    loadtest/idle_conns.py http://127.0.0.1:8080/products/the_odyssey --pid PID \
        --connections 2000 --idle 70

Opens N connections, sends one request on each (keep-alive), reads the answer, then leaves
them idle. Reads the gateway's resident memory (VmRSS of --pid) before, with all of them idle,
after --idle seconds (by then a gateway with an idle timeout below --idle has closed them),
and after the client closed whatever was left. Standard library only (asyncio).

Prints one line of key=value pairs:
    connections=2000 answered=2000 rss_before_kib=... rss_idle_kib=... per_conn_kib=...
    closed_by_server=2000 rss_after_idle_kib=... rss_after_close_kib=...
Needs `ulimit -n` above N plus some.
"""

import argparse
import asyncio
import sys
import time
import urllib.parse


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def one(host, port, request, timeout):
    """Connects, sends one request, reads its answer; returns the open (reader, writer)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    writer.write(request)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    length = 0
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    await asyncio.wait_for(reader.readexactly(length), timeout)
    return reader, writer


async def closed_by_server(reader) -> bool:
    """True when the server closed the connection (EOF or reset), without waiting."""
    try:
        data = await asyncio.wait_for(reader.read(1), 0.05)
        return data == b""
    except asyncio.TimeoutError:
        return False
    except (ConnectionError, OSError):
        return True


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--pid", type=int, required=True, help="the gateway's process id")
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--idle", type=float, default=70.0, help="seconds to stay idle")
    p.add_argument("--batch", type=int, default=200, help="connections opened at once")
    args = p.parse_args()
    u = urllib.parse.urlsplit(args.url)
    host, port = u.hostname, u.port or 80
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    request = f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\n\r\n".encode()

    before = rss_kib(args.pid)
    conns = []
    for start in range(0, args.connections, args.batch):
        n = min(args.batch, args.connections - start)
        results = await asyncio.gather(
            *(one(host, port, request, 10.0) for _ in range(n)), return_exceptions=True
        )
        conns.extend(r for r in results if not isinstance(r, BaseException))
    time.sleep(1.0)
    idle = rss_kib(args.pid)
    await asyncio.sleep(args.idle)
    closed = sum(await asyncio.gather(*(closed_by_server(r) for r, _ in conns)))
    after_idle = rss_kib(args.pid)
    for _, w in conns:
        w.close()
    await asyncio.sleep(2.0)
    after_close = rss_kib(args.pid)
    per_conn = (idle - before) / max(1, len(conns))
    print(
        f"connections={args.connections} answered={len(conns)} rss_before_kib={before} "
        f"rss_idle_kib={idle} per_conn_kib={per_conn:.1f} closed_by_server={closed} "
        f"rss_after_idle_kib={after_idle} rss_after_close_kib={after_close}"
    )
    return 0 if len(conns) == args.connections else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
