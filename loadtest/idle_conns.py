#!/usr/bin/env python3
"""Idle keep-alive connections: what they cost the gateway, and whether it lets them go.

    loadtest/idle_conns.py http://127.0.0.1:8080/products/the_odyssey --pid PID \
        --connections 2000 --idle 70
    loadtest/idle_conns.py https://127.0.0.1:8443/products/the_odyssey --pid PID   # TLS
    loadtest/idle_conns.py https://127.0.0.1:8443/products/the_odyssey --pid PID --h2

Opens N connections, sends one request on each (keep-alive), reads the answer, then leaves
them idle. Reads the gateway's resident memory (VmRSS of --pid, summed over every --pid:
nginx's workers) before, with all of them idle, after --idle seconds (by then a gateway with
an idle timeout below --idle has closed them), and after the client closed whatever was
left. With --warm W, also once the first W are idle: the slope from W to N is what one more
idle connection costs beside a warm set. Standard library only (asyncio, ssl).

An https URL speaks TLS (certificate not checked; ALPN `http/1.1`, or `h2` with --h2);
--h2 on an http URL is HTTP/2 with prior knowledge (h2c). The HTTP/2 client is minimal:
the preface, an empty SETTINGS, one GET on stream 1 (HPACK literals, no Huffman), an ACK
of the server's SETTINGS, and the frames read until the stream ends.

Prints one line of key=value pairs:
    connections=2000 answered=2000 rss_before_kib=... rss_idle_kib=... per_conn_kib=...
    closed_by_server=2000 rss_after_idle_kib=... rss_after_close_kib=...
(and rss_warm_kib=... slope_kib=... with --warm). Needs `ulimit -n` above N plus some.
"""

import argparse
import asyncio
import ssl
import struct
import sys
import time
import urllib.parse


def rss_kib(pids) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
            else:
                raise RuntimeError("no VmRSS")
    return total


def tls_context(alpn):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    return ctx


def hpack_string(value: bytes) -> bytes:
    """An HPACK string literal without Huffman coding (RFC 7541 §5.2)."""
    n = len(value)
    if n < 127:
        return bytes([n]) + value
    out, n = bytearray([127]), n - 127
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + value


def h2_request(path: str, authority: str, scheme: str) -> bytes:
    """The preface, an empty SETTINGS and a GET on stream 1 (END_STREAM, END_HEADERS)."""
    block = bytes([0x82])  # :method GET (static 2)
    block += bytes([0x87 if scheme == "https" else 0x86])  # :scheme (static 7 / 6)
    block += bytes([0x04]) + hpack_string(path.encode())  # :path, literal, name static 4
    block += bytes([0x01]) + hpack_string(authority.encode())  # :authority, name static 1
    settings = struct.pack(">I", 0)[1:] + bytes([0x4, 0x0]) + struct.pack(">I", 0)
    headers = struct.pack(">I", len(block))[1:] + bytes([0x1, 0x5]) + struct.pack(">I", 1)
    return b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + headers + block


SETTINGS_ACK = struct.pack(">I", 0)[1:] + bytes([0x4, 0x1]) + struct.pack(">I", 0)


async def h2_answer(reader, writer):
    """Reads frames until stream 1 ends, acknowledging the server's SETTINGS."""
    while True:
        head = await reader.readexactly(9)
        length = int.from_bytes(head[:3], "big")
        kind, flags = head[3], head[4]
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        await reader.readexactly(length)
        if kind == 0x4 and not flags & 0x1:
            writer.write(SETTINGS_ACK)
            await writer.drain()
        elif kind == 0x7:  # GOAWAY
            raise ConnectionError("GOAWAY")
        elif kind == 0x3 and stream == 1:  # RST_STREAM
            raise ConnectionError("RST_STREAM")
        elif stream == 1 and kind in (0x0, 0x1) and flags & 0x1:
            return


async def one(host, port, request, timeout, tls=None, h2=False):
    """Connects, sends one request, reads its answer; returns the open (reader, writer)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=tls), timeout
    )
    if h2:
        writer.write(request)
        await writer.drain()
        await asyncio.wait_for(h2_answer(reader, writer), timeout)
        return reader, writer
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
    p.add_argument(
        "--pid",
        type=int,
        required=True,
        action="append",
        help="the gateway's process id (again for each process to sum: nginx's workers)",
    )
    p.add_argument("--h2", action="store_true", help="HTTP/2 (TLS by ALPN, or h2c)")
    p.add_argument("--warm", type=int, default=0, help="idle connections before the slope")
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--idle", type=float, default=70.0, help="seconds to stay idle")
    p.add_argument("--batch", type=int, default=200, help="connections opened at once")
    args = p.parse_args()
    u = urllib.parse.urlsplit(args.url)
    https = u.scheme == "https"
    host, port = u.hostname, u.port or (443 if https else 80)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    if args.h2:
        request = h2_request(path, u.netloc, u.scheme)
    else:
        request = f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\n\r\n".encode()
    tls = tls_context("h2" if args.h2 else "http/1.1") if https else None

    async def open_until(total):
        while len(conns) < total and opened[0] < args.connections * 2:
            n = min(args.batch, total - len(conns))
            opened[0] += n
            results = await asyncio.gather(
                *(one(host, port, request, 10.0, tls, args.h2) for _ in range(n)),
                return_exceptions=True,
            )
            conns.extend(r for r in results if not isinstance(r, BaseException))

    before = rss_kib(args.pid)
    conns, opened = [], [0]
    warm = None
    if 0 < args.warm < args.connections:
        await open_until(args.warm)
        time.sleep(1.0)
        warm = (len(conns), rss_kib(args.pid))
    await open_until(args.connections)
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
    slope = ""
    if warm is not None:
        slope = (
            f" rss_warm_kib={warm[1]} slope_kib="
            f"{(idle - warm[1]) / max(1, len(conns) - warm[0]):.2f}"
        )
    print(
        f"connections={args.connections} answered={len(conns)} rss_before_kib={before} "
        f"rss_idle_kib={idle} per_conn_kib={per_conn:.1f} closed_by_server={closed} "
        f"rss_after_idle_kib={after_idle} rss_after_close_kib={after_close}{slope}",
        flush=True,
    )
    return 0 if len(conns) == args.connections else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
