"""Bytecodes per W2 request by Python function, two revisions side by side: where instructions go.

    python -m benchmarks.bytecodes --base 50b526d --rev WORKTREE [--requests 500] [--top 40]

`benchmarks.instructions` says how many instructions a request costs; this says which Python
functions run more of them. Each revision's proxyd (W2 config, as `benchmarks.instructions`)
runs with a `sys.settrace` opcode tracer switched on after a warm-up (SIGUSR1) and off after
`--requests` W2 requests (SIGUSR2, which writes the counts). The counts are the bytecodes each
function executed itself, divided by the requests: deterministic for a given revision (no
timer), blind to what C code (orjson, regular expressions, aiohttp's parser) does inside a
call, and traced proxyd is ~30x slower, so the figures are for finding functions, not timing.
Functions are matched by file name and function name, so moved modules still line up.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import rig
from benchmarks.instructions import _send, add_shape_options

# Run in proxyd's process: counts opcodes per (file name, function) between SIGUSR1 and SIGUSR2.
_TRACER = """
import pickle, signal, sys
out = sys.argv[1]
sys.argv = ["proxyd", "serve"]
counts = {}
def tracer(frame, event, arg):
    if event == "call":
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
    elif event == "opcode":
        code = frame.f_code
        key = (code.co_filename.rsplit("/", 1)[-1], code.co_name)
        counts[key] = counts.get(key, 0) + 1
    return tracer
def on(*_):
    sys.settrace(tracer)
def off(*_):
    sys.settrace(None)
    with open(out, "wb") as f:
        pickle.dump(counts, f)
signal.signal(signal.SIGUSR1, on)
signal.signal(signal.SIGUSR2, off)
from proxyd.cli import main
raise SystemExit(main())
"""

Counts = dict[tuple[str, str], int]


def count(
    rev: str,
    requests: int,
    warmup: int,
    mock_port: int,
    extra: str = "",
    credentials: int = 1,
    fresh: bool = False,
) -> Counts:
    """Bytecodes per function over `requests` W2 requests of revision `rev` (`extra`: TOML
    appended to its config)."""
    workdir = Path(tempfile.mkdtemp(prefix="proxyd-bytecodes-"))
    tree = rig.CHECKOUT if rev == "WORKTREE" else rig.export_tree(rev, workdir)[0]
    config = workdir / "proxyd.toml"
    config.write_text(
        rig.proxyd_config(mock_port, mock_port, workdir, credentials=credentials) + extra
    )
    out = workdir / "counts.pickle"
    port, control = rig.free_port(), rig.free_port()
    env = rig.proxyd_env(config, port, control, rig.DATABASE_URL, tree)
    env["PYTHONHASHSEED"] = "0"  # the same dict and set layouts run to run
    log = (workdir / "proxyd.log").open("wb")
    argv = [sys.executable, "-c", _TRACER, str(out)]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tree)
    try:
        rig.wait_port(port, proc, timeout=60.0)
        asyncio.run(_send(port, warmup, fresh=fresh))
        time.sleep(1.0)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        asyncio.run(_send(port, requests, fresh=fresh))
        time.sleep(1.0)  # their billing rows' flush
        proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # the pickle written whole
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    with out.open("rb") as f:
        counts: Counts = pickle.load(f)  # noqa: S301 - our own file, just written
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare against")
    parser.add_argument("--rev", default="WORKTREE", help="a commit, or WORKTREE (default)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--top", type=int, default=40, help="functions shown (largest change)")
    parser.add_argument(
        "--base-config",
        default="",
        help="TOML appended to the base's config, e.g. '[sticky]\\nenabled = false' with "
        "--base WORKTREE to see what a feature runs",
    )
    add_shape_options(parser)
    args = parser.parse_args(argv)
    extra = "\n" + args.base_config.replace("\\n", "\n") + "\n" if args.base_config else ""
    mock = rig.start_mock(Path(tempfile.mkdtemp()), instant=True, chunks=16, interval=0.02)
    try:
        shape = {"credentials": args.credentials, "fresh": args.fresh_connections}
        base = count(args.base, args.requests, args.warmup, mock.port, extra, **shape)
        new = count(args.rev, args.requests, args.warmup, mock.port, **shape)
    finally:
        rig.stop(mock)
    n = args.requests
    print(
        f"bytecodes per request: {args.base} {sum(base.values()) / n:,.0f}, "
        f"{args.rev} {sum(new.values()) / n:,.0f}"
    )
    keys = sorted(set(base) | set(new), key=lambda k: -abs(new.get(k, 0) - base.get(k, 0)))
    print(f"{args.base:>10} {args.rev:>10} {'change':>8}  function")
    for k in keys[: args.top]:
        a, b = base.get(k, 0) / n, new.get(k, 0) / n
        print(f"{a:10.1f} {b:10.1f} {b - a:+8.1f}  {k[0]}:{k[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
