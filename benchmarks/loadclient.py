"""The benchmark load client: raw HTTP/1.1 over asyncio with keep-alive, timing every event.

Closed-loop concurrency for request workloads, open-loop (Poisson) arrivals for streams. It keeps
timestamps and counts only: a response body is parsed for framing, never stored or printed.
"""

from __future__ import annotations

import asyncio
import gc
import random
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import uvloop

from benchmarks import procstat

perf = time.perf_counter


class _Resp:
    """One response being read: framing state and the times its bytes arrived."""

    __slots__ = (
        "cbuf",
        "chunked",
        "done",
        "events",
        "gaps",
        "head",
        "keep_alive",
        "last",
        "left",
        "nl",
        "status",
        "t_end",
        "t_first",
        "t_last_event",
    )

    def __init__(self, done: asyncio.Future[None], gaps: list[float] | None) -> None:
        self.done = done
        self.gaps = gaps
        self.head = b""
        self.status = 0
        self.chunked = False
        self.left = -1  # bytes left of the body (length mode) or of the current chunk + CRLF
        self.cbuf = b""
        self.last = False
        self.nl = False
        self.keep_alive = True
        self.events = 0
        self.t_first = 0.0
        self.t_last_event = 0.0
        self.t_end = 0.0

    def feed(self, data: bytes, now: float) -> bool:
        """Take bytes off the wire; True when the response is complete."""
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return False
            self._parse_head(self.head[:end].lower())
            data = self.head[end + 4 :]
            self.head = b""
            if self.left == 0 and not self.chunked:
                return True
            if not data:
                return False
        if not self.t_first:
            self.t_first = now
        events = data.count(b"\n\n")
        if self.nl and data[:1] == b"\n":
            events += 1  # an event's blank line split across two reads
        self.nl = data[-1:] == b"\n"
        if events:
            if self.gaps is not None and self.t_last_event:
                self.gaps.append(now - self.t_last_event)
            self.t_last_event = now
            self.events += events
        if self.chunked:
            return self._chunks(data)
        if self.left >= 0:
            self.left -= len(data)
            return self.left <= 0
        return False  # close-delimited: complete at EOF

    def _parse_head(self, head: bytes) -> None:
        self.status = int(head[9:12])
        self.keep_alive = b"\r\nconnection: close" not in head
        self.chunked = b"\r\ntransfer-encoding: chunked" in head
        at = head.find(b"\r\ncontent-length:")
        if self.chunked:
            self.left = 0
        elif at >= 0:
            end = head.find(b"\r\n", at + 2)
            self.left = int(head[at + 17 : end if end >= 0 else None])
        else:
            self.keep_alive = False  # body runs to EOF

    def _chunks(self, data: bytes) -> bool:
        buf = self.cbuf + data if self.cbuf else data
        self.cbuf = b""
        pos, n = 0, len(buf)
        while True:
            if self.left > 0:
                take = min(self.left, n - pos)
                pos += take
                self.left -= take
                if self.left:
                    return False
                if self.last:
                    return True
            if pos >= n:
                return False
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                self.cbuf = buf[pos:]
                return False
            size = int(buf[pos:nl].split(b";", 1)[0], 16)
            pos = nl + 2
            self.left = size + 2  # the chunk's data and its CRLF
            self.last = size == 0


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.resp: _Resp | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:
            return
        now = perf()
        if resp.feed(data, now):
            resp.t_end = now
            self.resp = None
            if not resp.done.done():
                resp.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self.resp
        if resp is not None:
            self.resp = None
            resp.t_end = perf()
            resp.keep_alive = False
            if resp.status > 0 and not resp.chunked and resp.left < 0:
                resp.done.set_result(None)  # close-delimited body ends here
            elif not resp.done.done():
                resp.done.set_exception(ConnectionResetError("connection lost mid-response"))


@dataclass
class Spec:
    """What to send, how and for how long (the driver passes it as JSON)."""

    port: int
    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    mode: str = "closed"  # "closed" (concurrency) or "open" (Poisson arrivals at `rate`)
    concurrency: int = 1
    rate: float = 10.0
    duration: float = 2.0
    warmup: float = 0.0
    stream: bool = False
    expect_status: list[int] = field(default_factory=lambda: [200])
    expect_events: int = 0
    timeout: float = 30.0
    seed: int = 1
    watch_pids: list[int] = field(default_factory=list)  # the proxy's processes: CPU and RSS
    rig_pids: list[int] = field(default_factory=list)  # the mock provider's processes: CPU
    tls_ca: str | None = None  # HTTPS to the target, trusting this CA file (proxyd-tls)


class _Run:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        body = orjson.dumps(spec.body)
        lines = [
            f"POST {spec.path} HTTP/1.1",
            f"Host: {spec.host}:{spec.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        lines += [f"{k}: {v}" for k, v in spec.headers.items()]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        self.loop = asyncio.get_running_loop()
        self.tls = ssl.create_default_context(cafile=spec.tls_ca) if spec.tls_ca else None
        self.pool: list[_Conn] = []
        self.latency: list[float] = []
        self.ttfb: list[float] = []  # request written -> first body byte
        self.lag: list[float] = []  # scheduled -> written: connect time plus the rig's own delay
        self.gaps: list[float] | None = [] if spec.stream else None
        self.status: dict[int, int] = {}
        self.ok = self.errors = self.events = self.open = self.open_peak = 0
        self.measuring = spec.warmup <= 0

    async def connect(self) -> _Conn:
        if self.tls is None:
            _, conn = await self.loop.create_connection(_Conn, self.spec.host, self.spec.port)
        else:
            _, conn = await self.loop.create_connection(
                _Conn, self.spec.host, self.spec.port, ssl=self.tls, server_hostname=self.spec.host
            )
        return conn

    async def one(self, conn: _Conn | None, t0: float) -> _Conn | None:
        """Send one request at scheduled time t0; returns the connection if reusable."""
        self.open += 1
        self.open_peak = max(self.open_peak, self.open)
        resp = _Resp(self.loop.create_future(), self.gaps if self.measuring else None)
        try:
            if conn is None or conn.closed:
                conn = await self.connect()
            conn.resp = resp
            assert conn.transport is not None
            t_send = perf()
            conn.transport.write(self.request)
            async with asyncio.timeout(self.spec.timeout):
                await resp.done
        except (OSError, TimeoutError):
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            if self.measuring:
                self.errors += 1
            return None
        finally:
            self.open -= 1
        if self.measuring:
            self.status[resp.status] = self.status.get(resp.status, 0) + 1
            good = resp.status in self.spec.expect_status and resp.events >= self.spec.expect_events
            if good:
                self.ok += 1
                self.events += resp.events
                self.latency.append(resp.t_end - t0)
                self.ttfb.append((resp.t_first or resp.t_end) - t_send)
                self.lag.append(t_send - t0)
            else:
                self.errors += 1
        return conn if resp.keep_alive and not conn.closed else None

    async def closed_worker(self, deadline: float) -> None:
        conn: _Conn | None = None
        while perf() < deadline:
            conn = await self.one(conn, perf())
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    async def open_one(self, t0: float) -> None:
        conn = self.pool.pop() if self.pool else None
        conn = await self.one(conn, t0)
        if conn is not None:
            self.pool.append(conn)

    async def arrivals(self, start: float, deadline: float) -> None:
        rng = random.Random(self.spec.seed)
        tasks: set[asyncio.Task[None]] = set()
        t = start
        while True:
            t += rng.expovariate(self.spec.rate)
            if t >= deadline:
                break
            delay = t - perf()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self.open_one(t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        for conn in self.pool:
            if conn.transport is not None:
                conn.transport.close()


def percentiles(xs: list[float], scale: float = 1e6) -> dict[str, float]:
    """p50/p90/p99/p99.9/max of a sample, scaled (seconds to microseconds by default)."""
    if not xs:
        return {}
    s = sorted(xs)
    n = len(s)

    def at(q: float) -> float:
        return round(s[min(n - 1, int(q * n))] * scale, 1)

    return {
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": round(s[-1] * scale, 1),
        "n": n,
    }


async def run(spec: Spec) -> dict[str, Any]:
    """Apply the load described by `spec` and summarise what was observed."""
    r = _Run(spec)
    rss_peak = 0
    stop = asyncio.Event()

    async def sample_rss() -> None:
        nonlocal rss_peak
        while not stop.is_set():
            rss_peak = max(rss_peak, sum(procstat.rss_bytes(p) for p in spec.watch_pids))
            await asyncio.sleep(0.05)

    if spec.warmup > 0:  # a short untimed phase so connections and caches exist
        await _drive(r, spec.warmup)
        r.measuring = True
        r.pool.clear()
    rss_start = sum(procstat.rss_bytes(p) for p in spec.watch_pids)
    sampler = asyncio.create_task(sample_rss())
    a = procstat.sample(spec.watch_pids)
    rig_a = procstat.tree_cpu_seconds(spec.rig_pids) + time.process_time()
    t0 = perf()
    await _drive(r, spec.duration)
    wall = perf() - t0
    b = procstat.sample(spec.watch_pids)
    rig_b = procstat.tree_cpu_seconds(spec.rig_pids) + time.process_time()
    stop.set()
    await sampler
    return {
        "requests": r.ok + r.errors,
        "ok": r.ok,
        "errors": r.errors,
        "status": r.status,
        "wall_s": round(wall, 4),
        "rps": round(r.ok / wall, 1) if wall else 0.0,
        "events": r.events,
        "open_peak": r.open_peak,
        "latency_us": percentiles(r.latency),
        "ttfb_us": percentiles(r.ttfb),
        "send_lag_us": percentiles(r.lag),
        "gap_us": percentiles(r.gaps or []),
        "proxy_cpu_s": round(b.proc_seconds - a.proc_seconds, 3),
        "rig_cpu_s": round(rig_b - rig_a, 3),
        "core_util": [round(u, 3) for u in procstat.core_utilisation(a, b)],
        "other_cpu_s": round(
            procstat.busy_seconds(a, b) - (b.proc_seconds - a.proc_seconds) - (rig_b - rig_a), 3
        ),
        "rss_start": rss_start,
        "rss_peak": max(rss_peak, rss_start),
    }


async def _drive(r: _Run, duration: float) -> None:
    start = perf()
    if r.spec.mode == "open":
        await r.arrivals(start, start + duration)
    else:
        workers = [r.closed_worker(start + duration) for _ in range(r.spec.concurrency)]
        await asyncio.gather(*workers)


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.loadclient '<Spec as JSON>'`: prints the result as one JSON line."""
    args = sys.argv[1:] if argv is None else argv
    spec = Spec(**orjson.loads(args[0]))
    gc.freeze()
    gc.disable()  # a bounded run: no collector pauses inside the measured gaps
    result = uvloop.run(run(spec))
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")


if __name__ == "__main__":
    main()
