"""Instructions per request, counted by valgrind's callgrind: a figure that does not move with
the machine's load, so commits can be compared on a shared 2-core host where CPU seconds vary by
±25 % between runs of one commit.

    python -m benchmarks.instructions --rev WORKTREE --rev a39d9a1 [--requests 400]
        [--concurrency 1]   # W1's pattern (default 8 in flight, W2's non-stream body)
        [--stream]          # streamed calls of 16 chunks 20 ms apart (W4/W5's pattern)

For each revision, proxyd (that commit's tree, this checkout's virtualenv, the W2 config: billing
into PostgreSQL, metrics on) runs under callgrind with instrumentation off; after a warm-up,
instrumentation is switched on, `--requests` more are sent, and the counters are dumped. The
figure is the instructions proxyd's process executed (every thread: the event loop, the billing
writer) divided by the requests. It counts instructions, not time: cache misses and syscalls'
kernel time are not in it, and Python under valgrind runs ~50x slower, so it is for comparing
commits, never a latency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import rig
from benchmarks.workloads import _body

STREAM_CHUNKS = 16


def _start(
    tree: Path, workdir: Path, mock_port: int, out: Path, extra: str = "", credentials: int = 1
) -> tuple[subprocess.Popen[bytes], int]:
    config = workdir / "proxyd.toml"
    text = rig.proxyd_config(mock_port, mock_port, workdir, credentials=credentials)
    config.write_text(text + extra)
    port, control = rig.free_port(), rig.free_port()
    env = rig.proxyd_env(config, port, control, rig.DATABASE_URL, tree)
    env["PYTHONHASHSEED"] = "0"  # the same dict and set layouts run to run
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        *rig.proxyd_argv(),
    ]
    log = (workdir / "proxyd.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tree)
    rig.wait_port(port, proc, timeout=300.0)
    return proc, port


async def _send(
    port: int, count: int, concurrency: int = 8, stream: bool = False, fresh: bool = False
) -> int:
    """`count` calls, `concurrency` at a time, over kept-alive connections (`fresh`: a new
    connection per call); how many answered 200."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {rig.BENCH_SECRET}"}
    body = _body(rig.STREAM_MODEL if stream else rig.INSTANT_MODEL, stream=stream)
    left = count
    ok = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal left, ok
        while left > 0:
            left -= 1
            async with session.post(url, json=body, headers=headers) as resp:
                await resp.read()
                ok += resp.status == 200

    connector = aiohttp.TCPConnector(force_close=fresh, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session) for _ in range(concurrency)))
    return ok


def _callgrind(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def _total(out: Path) -> int:
    """The instructions counted between switching instrumentation on and the dump (the
    `<out>.1` part; the file written at exit covers nothing measured and is ignored)."""
    total = 0
    for part in out.parent.glob(out.name + ".*"):
        text = part.read_text(errors="replace")
        match = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
        if match:
            total += int(match.group(1))
    return total


def measure(
    rev: str,
    requests: int,
    warmup: int,
    mock_port: int,
    concurrency: int = 8,
    stream: bool = False,
    extra: str = "",
    credentials: int = 1,
    fresh: bool = False,
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="proxyd-instr-"))
    try:
        if rev == "WORKTREE":
            tree, short = rig.CHECKOUT, "worktree"
        else:
            tree, short = rig.export_tree(rev, workdir)
        out = workdir / "callgrind.out"
        started = time.monotonic()
        proc, port = _start(tree, workdir, mock_port, out, extra, credentials)
        try:
            warm = asyncio.run(_send(port, warmup, concurrency, stream, fresh))
            time.sleep(1.0)  # the billing writer's flush of the warm-up rows
            _callgrind("--instr=on", str(proc.pid))
            ok = asyncio.run(_send(port, requests, concurrency, stream, fresh))
            time.sleep(1.0)  # their rows' flush is part of their cost
            _callgrind("--dump", str(proc.pid))
            _callgrind("--instr=off", str(proc.pid))
        finally:
            proc.terminate()
            proc.wait(60)
        instructions = _total(out)
        return {
            "rev": short,
            "requests": requests,
            "ok": ok,
            "warmup_ok": warm,
            "instructions": instructions,
            "per_request": round(instructions / max(ok, 1)),
            "wall_s": round(time.monotonic() - started, 1),
        }
    finally:
        if os.environ.get("PROXYD_INSTR_KEEP"):  # to read the callgrind files afterwards
            print(f"kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def add_shape_options(parser: argparse.ArgumentParser) -> None:
    """The request-shape options this tool and `benchmarks.bytecodes` share."""
    parser.add_argument(
        "--credentials",
        type=int,
        default=1,
        help="API keys on the non-stream channel (more than one: sticky sessions have a choice)",
    )
    parser.add_argument(
        "--fresh-connections",
        action="store_true",
        help="a new client connection per request (the load clients keep theirs alive): "
        "prices a connection's own cost",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", action="append", required=True, help="a commit, or WORKTREE")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight (1: W1's pattern)"
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help=f"streamed calls of {STREAM_CHUNKS} chunks 20 ms apart instead (per chunk: divide)",
    )
    parser.add_argument(
        "--config",
        default="",
        help="TOML appended to the config, e.g. '[sticky]\\nenabled = false' to price a feature",
    )
    add_shape_options(parser)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (callgrind) is not installed", file=sys.stderr)
        return 2
    mock = rig.start_mock(
        Path(tempfile.mkdtemp()), instant=not args.stream, chunks=STREAM_CHUNKS, interval=0.02
    )
    try:
        for rev in args.rev:
            result = measure(
                rev,
                args.requests,
                args.warmup,
                mock.port,
                args.concurrency,
                args.stream,
                "\n" + args.config.replace("\\n", "\n") + "\n",
                args.credentials,
                args.fresh_connections,
            )
            print(
                f"{result['rev']:>10}  {result['per_request']:>12,} instructions per request"
                f"  ({result['ok']}/{result['requests']} ok, {result['wall_s']} s)",
                flush=True,
            )
    finally:
        rig.stop(mock)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
