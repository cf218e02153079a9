"""Streams' CPU per chunk of proxyd revisions side by side, in alternating rounds.

W5's cells (`benchmarks.run`) run each target three times, one after another; on this shared
host a cell moved by several percent between runs. Here every revision's proxyd runs at once
(pinned to the proxy core; the mock provider and this load client on the rig core) and the
revisions take turns, round after round, so the host's drift hits them alike. Each stream is
16 chunks 20 ms apart from the paced mock, over a new client connection each unless
`--keep-alive` (W5's load client keeps its connections alive: the two show what a connection
itself costs). Reported per revision: the proxyd process's user
and system CPU (`/proc/PID/stat`) over all its rounds, divided by the chunks it relayed.

    .venv/bin/python -m benchmarks.bench_streams --rev 0e9a317 --rev WORKTREE [--streams 400]
        [--per-round 1500] [--rounds 6] [--keep-alive]

Loopback only; every process it starts it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import rig
from benchmarks.instructions import _send

CHUNKS = 16
INTERVAL = 0.02


def _cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    hz = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / hz, int(fields[12]) / hz


def _start(rev: str, mock_port: int) -> tuple[subprocess.Popen[bytes], int]:
    workdir = Path(tempfile.mkdtemp(prefix="proxyd-bench-streams-"))
    tree = rig.CHECKOUT if rev == "WORKTREE" else rig.export_tree(rev, workdir)[0]
    config = workdir / "proxyd.toml"
    config.write_text(rig.proxyd_config(mock_port, mock_port, workdir))
    port, control = rig.free_port(), rig.free_port()
    env = rig.proxyd_env(config, port, control, rig.DATABASE_URL, tree)
    argv = rig.pinned(rig.PROXY_CORE, rig.proxyd_argv())
    proc = subprocess.Popen(
        argv, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    rig.wait_port(port, proc, timeout=60.0)
    return proc, port


def run(
    revs: list[str], streams: int, per_round: int, rounds: int, keep_alive: bool
) -> dict[str, Any]:
    """CPU-µs per chunk (user, system, total) of each revision over alternating rounds."""
    os.sched_setaffinity(0, {int(rig.RIG_CORE)})
    mock = rig.start_mock(Path(tempfile.mkdtemp()), instant=False, chunks=CHUNKS, interval=INTERVAL)
    started = {rev: _start(rev, mock.port) for rev in revs}
    try:
        for _, port in started.values():  # warm-up
            asyncio.run(_send(port, min(200, per_round), streams, True, not keep_alive))
        totals = {rev: [0.0, 0.0, 0] for rev in revs}
        for _ in range(rounds):
            for rev, (proc, port) in started.items():
                user, system = _cpu(proc.pid)
                ok = asyncio.run(_send(port, per_round, streams, True, not keep_alive))
                user2, system2 = _cpu(proc.pid)
                t = totals[rev]
                t[0] += user2 - user
                t[1] += system2 - system
                t[2] += ok
    finally:
        for proc, _ in started.values():
            proc.terminate()
            proc.wait(30)
        rig.stop(mock)
    out: dict[str, Any] = {}
    for rev, (user_s, system_s, served) in totals.items():
        chunks = max(1, int(served) * (CHUNKS + 1))  # 16 content chunks and the final one
        out[rev] = {
            "streams": int(served),
            "user_us_per_chunk": round(user_s * 1e6 / chunks, 2),
            "system_us_per_chunk": round(system_s * 1e6 / chunks, 2),
            "cpu_us_per_chunk": round((user_s + system_s) * 1e6 / chunks, 2),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", action="append", required=True, help="a commit, or WORKTREE")
    parser.add_argument("--streams", type=int, default=400, help="streams in flight")
    parser.add_argument("--per-round", type=int, default=1500, help="streams per revision a round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--keep-alive", action="store_true", help="reuse client connections")
    args = parser.parse_args(argv)
    result = run(args.rev, args.streams, args.per_round, args.rounds, args.keep_alive)
    first = result[args.rev[0]]["cpu_us_per_chunk"]
    for rev, figures in result.items():
        change = figures["cpu_us_per_chunk"] / first - 1 if first else 0.0
        print(
            f"{rev:>10}  {figures['cpu_us_per_chunk']:6.2f} CPU-µs/chunk "
            f"(user {figures['user_us_per_chunk']:.2f}, sys {figures['system_us_per_chunk']:.2f}; "
            f"{figures['streams']} streams)  {change:+.1%} vs {args.rev[0]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
