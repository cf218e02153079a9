"""`python -m benchmarks.timeline`: where a W1 request's time goes inside proxyd, step by step.

Starts the instant mock and a proxyd whose steps are wrapped to stamp `perf_counter_ns`, runs
W1 (one request at a time) against it, and prints the median time between the stamps. The
stamps cost a little themselves; read the segments against each other, not as absolutes.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAMPS = (
    ("recv", "request bytes in (aiohttp's data_received)"),
    ("handler", "the handler starts"),
    ("read", "body read and parsed"),
    ("admit", "admission starts"),
    ("admitted", "admitted"),
    ("relay", "relay starts"),
    ("send", "the upstream request is written"),
    ("sent", "write returned"),
    ("answer", "upstream answer in (h1 data_received)"),
    ("write", "the client's answer is written"),
    ("end", "the handler ends (record step done)"),
)


def _serve(out: str) -> int:
    """proxyd serve with its steps stamped; the medians go to `out` at exit."""
    from aiohttp import web_protocol

    from proxyd import cli
    from proxyd.admission.admit import Admission
    from proxyd.server import handlers, respond
    from proxyd.upstream.h1 import wire

    now = time.perf_counter_ns
    current: dict[str, int] = {}
    done: list[dict[str, int]] = []

    def stamp_before(owner: Any, name: str, mark: str, *, if_data: bool = False) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(original)
        def wrapped(*args: Any, **kw: Any) -> Any:
            if not if_data or args[-1]:
                current[mark] = now()
            return original(*args, **kw)

        setattr(owner, name, wrapped)

    def stamp_around(owner: Any, name: str, before: str, after: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(original)
        async def wrapped(*args: Any, **kw: Any) -> Any:
            if before:
                current[before] = now()
            try:
                return await original(*args, **kw)
            finally:
                if after:
                    current[after] = now()

        setattr(owner, name, wrapped)

    stamp_before(web_protocol.RequestHandler, "data_received", "recv", if_data=True)
    stamp_around(handlers.ClientHandlers, "completion", "handler", "end")
    stamp_around(handlers, "read_call", "", "read")
    stamp_around(Admission, "admit", "admit", "admitted")
    stamp_around(handlers, "relay", "relay", "")
    stamp_before(wire.Connection, "data_received", "answer")
    send = wire.Connection.send

    def stamped_send(self: wire.Connection, *args: Any, **kw: Any) -> Any:
        current["send"] = now()
        try:
            return send(self, *args, **kw)
        finally:
            current["sent"] = now()

    wire.Connection.send = stamped_send  # type: ignore[method-assign]
    prepare = respond.WholeResponse.prepare

    async def stamped_prepare(self: respond.WholeResponse, request: Any) -> None:
        if not self._eof_sent:  # aiohttp calls it again, as a no-op, after the handler
            current["write"] = now()
        await prepare(self, request)

    respond.WholeResponse.prepare = stamped_prepare  # type: ignore[method-assign]
    completion = handlers.ClientHandlers.completion

    async def collected(self: handlers.ClientHandlers, request: Any, endpoint: Any) -> Any:
        try:
            return await completion(self, request, endpoint)
        finally:
            done.append(dict(current))
            current.clear()

    handlers.ClientHandlers.completion = collected  # type: ignore[method-assign]

    def report() -> None:
        names = [n for n, _ in STAMPS]
        rows = [r for r in done if all(n in r for n in names)][len(done) // 10 :]  # skip warm-up
        medians = {
            f"{a} -> {b}": statistics.median((r[b] - r[a]) / 1000 for r in rows)
            for a, b in itertools.pairwise(names)
        }
        Path(out).write_text(json.dumps({"requests": len(rows), "median_us": medians}))

    atexit.register(report)
    return cli.main(["serve"])


def main(argv: list[str] | None = None) -> int:
    """Run W1 against a stamped proxyd and print the median of each segment."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.timeline", description=__doc__)
    p.add_argument("--seconds", type=float, default=4.0, help="how long W1 runs")
    p.add_argument(
        "--redis", metavar="URL", help="share admission through this Redis (a fresh key prefix)"
    )
    p.add_argument("--serve", metavar="OUT", help=argparse.SUPPRESS)  # the stamped child
    args = p.parse_args(argv)
    if args.serve:
        return _serve(args.serve)

    from dataclasses import replace

    from benchmarks import rig, workloads

    logdir = Path(tempfile.mkdtemp(prefix="proxyd-timeline-"))
    out = logdir / "timeline.json"
    mock = rig.start_mock(logdir, instant=True, chunks=16, interval=0.02)
    argv_of_proxyd = rig.proxyd_argv
    rig.proxyd_argv = lambda: [sys.executable, "-m", "benchmarks.timeline", "--serve", str(out)]
    try:
        extra = ""
        if args.redis:
            prefix = f"timeline-{os.getpid()}-{time.time_ns()}:"
            extra = f'[redis]\nurl = "{args.redis}"\nprefix = "{prefix}"\n'
        proxyd = rig.start_proxyd(
            logdir, mock.port, mock.port, rig.DATABASE_URL, extra_config=extra
        )
    finally:
        rig.proxyd_argv = argv_of_proxyd
    try:
        from benchmarks.run import _wait_ready

        _wait_ready(proxyd.port)
        target = workloads.Target(
            "proxyd", proxyd.port, proxyd.port, [proxyd.pid], [mock.pid], own_auth=True
        )
        scale = replace(workloads.SCALES["quick"], w1_s=args.seconds)
        run = workloads.w1(target, scale)
    finally:
        rig.stop(proxyd)
        rig.stop(mock)
    for _ in range(50):
        if out.exists():
            break
        time.sleep(0.1)
    found = json.loads(out.read_text())
    latency = run["result"]["latency_us"]
    print(f"W1 through proxyd: p50 {latency['p50']} µs, {found['requests']} requests stamped")
    labels = dict(STAMPS)
    for segment, us in found["median_us"].items():
        a, b = segment.split(" -> ")
        print(f"  {us:7.1f} µs  {labels[a]} -> {labels[b]}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
