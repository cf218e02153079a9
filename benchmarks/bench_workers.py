"""Scale-out figures of issue 18, side by side in one run: 1 and 2 workers, Redis-shared admission.

- req/s and the proxy's CPU-µs per request (supervisor and workers together) with `--workers 1`
  and `--workers 2`, unpinned on the two cores (the load client competes for them, so CPU per
  request is the figure that counts: target, it grows by at most 10 % from 1 to 2 workers);
- the added p50 of Redis-shared admission: one request at a time through one proxyd whose key
  has limits, with local limits and with `redis.url` (target: at most 0.3 ms on loopback);
- USS and PSS (`/proc/PID/smaps_rollup`) of the supervisor and of each worker after the load
  (target: each extra worker at most 40 MB unique).

The two proxyds of each comparison run side by side and are measured in alternating bursts
(`--rounds`, default 5, each of `--seconds / rounds`), so the machine's drift hits both alike;
one-shot cells moved by ±30 % between runs of one commit on this shared host.

    .venv/bin/python -m benchmarks.bench_workers [--seconds 10] [--rounds 5]
    .venv/bin/python -m benchmarks.bench_workers --admission-only --rev 0da40bb

`--rev` (repeatable) adds the Redis-shared proxyd of that commit (exported with `git archive`,
served with this venv) to the admission comparison, in the same alternating rounds: how a change
to the Redis path reports its added p50 against the commit before it. `--admission-only` skips
the 1-and-2-workers figures; `--with-redis` adds 1 and 2 workers sharing admission through Redis.
`--w2-against REV` (repeatable) measures only W2's CPU per request, one worker, of this checkout
and of each commit, in alternating rounds (how issue 15's "within 3 %" is checked).
`--pair-against REV` (repeatable) measures only the 1-and-2-workers figures, with 2 workers of
each commit in the same rounds: how a change to the workers' sharing reports its growth against
the commit before it. `--rate R` measures the same proxyds again at R requests a second (open
loop: the same offered load for each); `--with-nginx` adds nginx with 1 and 2 worker processes
to the same rounds, what two processes cost on these cores for a server in C, and
`--with-aiohttp` the smallest Python proxy (`benchmarks.bareproxy`) with 1 and 2 processes, what
they cost for Python doing none of proxyd's work. `--c-rig`: the provider is nginx answering a
fixed completion and the closed-loop load comes from wrk, so the cores go to the proxies rather
than to the Python mock and load client (each figure reports the rig's CPU per request too).

Loopback only; every process it starts it stops by its own pid; Redis keys under a fresh prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import orjson

from benchmarks import loadclient, nginx, procstat, rig, wrk

REDIS_URL = "redis://127.0.0.1:6379/0"
BODY = {"model": rig.INSTANT_MODEL, "messages": [{"role": "user", "content": "hello"}]}
# What the static provider of `--c-rig` answers: the mock's non-streamed completion, with usage.
COMPLETION = {
    "id": "chatcmpl-static",
    "object": "chat.completion",
    "created": 1796352082,
    "model": rig.INSTANT_MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": " The quick brown fox jumps over the dog"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 2, "completion_tokens": 9, "total_tokens": 11},
}


@dataclass(frozen=True)
class CClient:
    """wrk and its request script: the closed-loop load of `--c-rig`."""

    binary: str
    lua: Path


def memory(pid: int) -> dict[str, int]:
    """USS (private clean + dirty) and PSS of one process, in bytes, from smaps_rollup."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                name, _, rest = line.partition(b":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    fields[name.decode()] = int(parts[0]) * 1024
    except OSError:
        return {"uss": 0, "pss": 0, "rss": 0}
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"uss": uss, "pss": fields.get("Pss", 0), "rss": fields.get("Rss", 0)}


def _start(
    logdir: Path, mock_port: int, *, workers: int, redis: bool, rev: str | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    workdir = Path(tempfile.mkdtemp(prefix="proxyd-bench-workers-"))
    tree = rig.CHECKOUT if rev is None else rig.export_tree(rev, workdir)[0]
    config = rig.proxyd_config(mock_port, mock_port, workdir)
    if redis:  # appended: a table header before the top-level keys would swallow them
        config += f'\n[redis]\nurl = "{REDIS_URL}"\nprefix = "bench18-{uuid.uuid4().hex[:8]}:"\n'
    path = workdir / "proxyd.toml"
    path.write_text(config)
    port = rig.free_port()
    env = rig.proxyd_env(path, port, rig.free_port(), rig.DATABASE_URL, tree)
    argv = [*rig.proxyd_argv(), "--config", str(path), "--workers", str(workers)]
    with (logdir / f"proxyd-{workers}-{int(redis)}-{rev or 'this'}.log").open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tree)
    rig.wait_port(port, proc)  # the supervisor's socket: it accepts before workers exist
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        forked = procstat.children(proc.pid) if workers > 1 else [proc.pid]
        if len(forked) >= workers and _ready(port):
            return proc, port
        time.sleep(0.1)
    _stop(proc)
    raise RuntimeError(f"proxyd --workers {workers} did not become ready")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _load(
    port: int,
    pids: list[int],
    *,
    concurrency: int,
    seconds: float,
    warmup: float = 1.0,
    rate: float | None = None,
) -> dict[str, Any]:
    spec = loadclient.Spec(
        port=port,
        path="/v1/chat/completions",
        body=BODY,
        headers={"Authorization": f"Bearer {rig.BENCH_SECRET}"},
        mode="closed" if rate is None else "open",
        concurrency=concurrency,
        rate=rate or 0.0,
        duration=seconds,
        warmup=warmup,
        watch_pids=pids,
    )
    result: dict[str, Any] = asyncio.run(loadclient.run(spec))
    return result


def _burst(
    port: int, pids: list[int], seconds: float, rate: float | None, client: CClient | None
) -> dict[str, Any]:
    """One burst at 64 in flight from the Python load client, or from wrk when `client` is set
    (or `rate` requests a second, Poisson arrivals, from the Python client): ok, errors, rps."""
    if client is None:
        return _load(port, pids, concurrency=64, seconds=seconds, warmup=0, rate=rate)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    burst = wrk.run(client.binary, url, client.lua, connections=64, seconds=seconds)
    return {"ok": burst.ok, "errors": burst.errors, "rps": round(burst.rps, 1)}


def _cpu_cell(
    port: int,
    pids: list[int],
    seconds: float,
    rate: float | None = None,
    client: CClient | None = None,
    provider_pid: int | None = None,
) -> dict[str, Any]:
    """One measured burst (`_burst`): requests served, each process's CPU seconds, and what
    the rig spent beside them: the load client's CPU seconds (this process's, or wrk's) and
    the provider's (`provider_pid`)."""
    before = {pid: procstat.cpu_seconds(pid) for pid in pids}
    rig_before = _rig_cpu(provider_pid)
    r = _burst(port, pids, seconds, rate, client)
    cpu = {pid: procstat.cpu_seconds(pid) - t for pid, t in before.items()}
    rig_after = _rig_cpu(provider_pid)
    return {
        "ok": r["ok"],
        "errors": r["errors"],
        "rps": r["rps"],
        "cpu": cpu,
        "client_cpu": rig_after[0] - rig_before[0],
        "provider_cpu": rig_after[1] - rig_before[1],
    }


def _rig_cpu(provider_pid: int | None) -> tuple[float, float]:
    """CPU seconds so far of the load client (this process and the children it waited for:
    wrk) and of the provider (with its worker processes: nginx's)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = time.process_time() + children.ru_utime + children.ru_stime
    if not provider_pid:
        return client, 0.0
    return client, procstat.tree_cpu_seconds([provider_pid, *procstat.children(provider_pid)])


def growth(after: dict[str, Any], before: dict[str, Any]) -> float:
    """How much more CPU per request `after` took than `before` (0.12: 12 % more)."""
    ratio: float = after["cpu_us_per_request"] / before["cpu_us_per_request"]
    return round(ratio - 1, 3)


def alternating_cpu(
    started: list[tuple[subprocess.Popen[bytes], int]],
    seconds: float,
    rounds: int,
    rate: float | None = None,
    client: CClient | None = None,
    provider_pid: int | None = None,
) -> list[dict[str, Any]]:
    """The proxyds `started`, measured in alternating bursts at 64 in flight (`rounds` each of
    `seconds / rounds`): the machine's drift (other tenants, frequency) hits all alike. CPU per
    request is each one's CPU over all its bursts divided by all its requests. `rate`: at that
    many requests a second instead (open loop), the same offered load for every proxyd.
    `client`: wrk sends the load instead of the Python client (whole seconds per burst).
    `provider_pid`: the provider, whose CPU per request is reported beside the client's."""
    pids = [[proc.pid, *procstat.children(proc.pid)] for proc, _ in started]
    for (_, port), ps in zip(started, pids, strict=True):  # warm all up
        _burst(port, ps, min(1.0, seconds / 3), None, client)
    cells: list[list[dict[str, Any]]] = [[] for _ in started]
    for _ in range(rounds):
        for i, (_, port) in enumerate(started):
            cell = _cpu_cell(port, pids[i], seconds / rounds, rate, client, provider_pid)
            cells[i].append(cell)
    out = []
    for i in range(len(started)):
        served = max(1, sum(c["ok"] for c in cells[i]))
        per = {pid: sum(c["cpu"][pid] for c in cells[i]) for pid in pids[i]}
        processes = {
            str(pid): memory(pid) | {"cpu_us_per_request": round(t * 1e6 / served, 1)}
            for pid, t in per.items()
        }
        out.append(
            {
                "rps": round(statistics.median(c["rps"] for c in cells[i]), 1),
                "errors": sum(c["errors"] for c in cells[i]),
                "cpu_us_per_request": round(sum(per.values()) * 1e6 / served, 1),
                "cpu_us_per_request_by_round": [
                    round(sum(c["cpu"].values()) * 1e6 / max(1, c["ok"]), 1) for c in cells[i]
                ],
                "memory": processes,
                "rig_cpu_us_per_request": {
                    side: round(sum(c[f"{side}_cpu"] for c in cells[i]) * 1e6 / served, 1)
                    for side in ("client", "provider")
                },
            }
        )
    return out


def throughput_pair(
    logdir: Path,
    mock_port: int,
    seconds: float,
    rounds: int,
    *,
    redis: bool = False,
    revs: tuple[str, ...] = (),
    rate: float | None = None,
    with_nginx: bool = False,
    with_aiohttp: bool = False,
    client: CClient | None = None,
    provider_pid: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """1 and 2 workers side by side (`alternating_cpu`). `redis`: both share admission through
    Redis (the workers then never ask the supervisor); otherwise the two workers share it
    without Redis. `revs`: 2 workers of each of those commits too, in the same rounds (their
    growth is against this checkout's 1 worker). `rate`: the same proxyds are then measured
    again at that fixed rate (`at_rate` in each figure). References with 1 and 2 processes in
    front of the same provider, unpinned, in the same rounds (the last dict, by name): with
    `with_nginx` nginx's worker processes, what two processes cost per request on these cores
    for a server in C; with `with_aiohttp` the smallest Python proxy (`benchmarks.bareproxy`),
    what they cost for Python doing none of proxyd's work: the floors under proxyd's own
    growth. `client`: wrk sends the closed-loop load; `provider_pid`: the provider."""
    started = [_start(logdir, mock_port, workers=n, redis=redis) for n in (1, 2)]
    references: dict[str, list[tuple[subprocess.Popen[bytes], int]]] = {}
    binary = nginx.find_binary() if with_nginx else None
    try:
        started += [_start(logdir, mock_port, workers=2, redis=redis, rev=rev) for rev in revs]
        if binary is not None:
            references["nginx"] = [_start_nginx(logdir, binary, mock_port, n) for n in (1, 2)]
        if with_aiohttp:
            references["aiohttp"] = [_start_bare(logdir, mock_port, n) for n in (1, 2)]
        measured = started + [pair for pairs in references.values() for pair in pairs]
        one, two, *others = alternating_cpu(measured, seconds, rounds, None, client, provider_pid)
        if rate is not None:
            paced = alternating_cpu(measured, seconds, rounds, rate, None, provider_pid)
            for closed, at_rate in zip([one, two, *others], paced, strict=True):
                closed["at_rate"] = {"rate": rate} | at_rate
    finally:
        for proc, _ in started:
            _stop(proc)
        for name, pairs in references.items():
            stop = _stop_nginx if name == "nginx" else _stop
            for proc, _ in pairs:
                stop(proc)
    floors: dict[str, Any] = {}
    tail = others[len(revs) :]
    for i, name in enumerate(references):
        n1, n2 = tail[2 * i : 2 * i + 2]
        floors[name] = {
            "one_worker": n1,
            "two_workers": n2,
            "cpu_per_request_growth": growth(n2, n1),
        }
        if rate is not None:
            floors[name]["cpu_per_request_growth_at_rate"] = growth(n2["at_rate"], n1["at_rate"])
    if with_nginx and binary is None:
        floors["nginx"] = {"skipped": "no nginx binary (make tools installs it)"}
    at: dict[str, dict[str, Any]] = {}
    for rev, f in zip(revs, others[: len(revs)], strict=True):
        at[rev] = {"workers": 2, "cpu_per_request_growth": growth(f, one)}
        if rate is not None:
            at[rev]["cpu_per_request_growth_at_rate"] = growth(f["at_rate"], one["at_rate"])
        at[rev] |= f
    return {"workers": 1} | one, {"workers": 2} | two, at, floors


def _start_bare(logdir: Path, mock_port: int, workers: int) -> tuple[subprocess.Popen[bytes], int]:
    """`benchmarks.bareproxy` with `workers` processes in front of the provider, unpinned."""
    port = rig.free_port()
    argv = [sys.executable, "-m", "benchmarks.bareproxy", "--workers", str(workers)]
    argv += ["--port", str(port), "--upstream", str(mock_port)]
    with (logdir / f"aiohttp-{workers}.log").open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=rig.CHECKOUT)
    rig.wait_port(port, proc)
    deadline = time.monotonic() + 10
    while len(procstat.children(proc.pid)) < workers and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc, port


def _start_nginx(
    logdir: Path, binary: str, mock_port: int, workers: int
) -> tuple[subprocess.Popen[bytes], int]:
    """nginx with `workers` worker processes in front of the mock, unpinned (its config
    directory is removed when it stops: `_stop_nginx`)."""
    port = rig.free_port()
    workdir = nginx.write_config({port: mock_port}, workers=workers)
    with (logdir / f"nginx-{workers}.log").open("wb") as out:
        proc = subprocess.Popen(
            nginx.command(binary, workdir), stdout=out, stderr=subprocess.STDOUT, cwd=workdir
        )
    rig.wait_port(port, proc)
    deadline = time.monotonic() + 10
    while len(procstat.children(proc.pid)) < workers and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc, port


def _stop_nginx(proc: subprocess.Popen[bytes]) -> None:
    workdir = Path(cast(list[str], proc.args)[2])  # nginx -p <workdir> ...
    _stop(proc)
    shutil.rmtree(workdir, ignore_errors=True)


def against_revisions(
    logdir: Path, mock_port: int, seconds: float, rounds: int, revs: tuple[str, ...]
) -> dict[str, Any]:
    """W2's CPU per request (one worker, 64 in flight, non-streaming) of this checkout and of
    each commit of `revs`, side by side (`alternating_cpu`): how a request-path change reports
    its figure against the commit before it, in one run."""
    names = ["this", *revs]
    started = [_start(logdir, mock_port, workers=1, redis=False)]
    try:
        started += [_start(logdir, mock_port, workers=1, redis=False, rev=rev) for rev in revs]
        figures = alternating_cpu(started, seconds, rounds)
    finally:
        for proc, _ in started:
            _stop(proc)
    base = figures[0]["cpu_us_per_request"]
    return {
        name: {
            "cpu_us_per_request": f["cpu_us_per_request"],
            "cpu_us_per_request_by_round": f["cpu_us_per_request_by_round"],
            "this_against_it": round(base / f["cpu_us_per_request"] - 1, 4) if i else 0.0,
        }
        for i, (name, f) in enumerate(zip(names, figures, strict=True))
    }


def shared_admission(
    logdir: Path, mock_port: int, seconds: float, rounds: int, revs: tuple[str, ...] = ()
) -> dict[str, Any]:
    """p50 of one request at a time with local limits and with Redis-shared limits (and with
    the Redis-shared proxyd of each of `revs`), all started and measured in alternating bursts;
    an added p50 is the median of the rounds' differences to the local one (each round's bursts
    run back to back)."""
    names = ["local", "redis", *(f"redis@{rev}" for rev in revs)]
    started = [
        _start(logdir, mock_port, workers=1, redis=False),
        _start(logdir, mock_port, workers=1, redis=True),
        *(_start(logdir, mock_port, workers=1, redis=True, rev=rev) for rev in revs),
    ]
    try:
        p50s: list[list[float]] = [[] for _ in started]
        for _ in range(rounds):
            for i, (proc, port) in enumerate(started):
                r = _load(port, [proc.pid], concurrency=1, seconds=seconds / rounds, warmup=0.3)
                p50s[i].append(r["latency_us"]["p50"])
    finally:
        for proc, _ in started:
            _stop(proc)
    out: dict[str, Any] = {
        name: round(statistics.median(p50s[i]), 1) for i, name in enumerate(names)
    }
    for i, name in enumerate(names[1:], 1):
        added = [round(b - a, 1) for a, b in zip(p50s[0], p50s[i], strict=True)]
        suffix = name.removeprefix("redis")  # '' for this checkout, '@<rev>' for a commit
        out[f"added_p50_us{suffix}"] = statistics.median(added)
        out[f"added_p50_us{suffix}_by_round"] = added
    return out


def run(
    seconds: float,
    rounds: int = 5,
    *,
    revs: tuple[str, ...] = (),
    admission_only: bool = False,
    with_redis: bool = False,
    w2_against: tuple[str, ...] = (),
    pair_against: tuple[str, ...] = (),
    rate: float | None = None,
    with_nginx: bool = False,
    with_aiohttp: bool = False,
    c_rig: bool = False,
) -> dict[str, Any]:
    """Every figure of the file's docstring, in one session (`admission_only`: the Redis
    admission's only). `c_rig`: the provider is nginx answering a fixed completion and the
    closed-loop load comes from wrk, so the two cores go to the proxy, not to the Python rig."""
    logdir = Path(tempfile.mkdtemp(prefix="proxyd-bench-workers-logs-"))
    client: CClient | None = None
    if c_rig:
        binary, wrk_binary = nginx.install(), wrk.install()
        if binary is None or wrk_binary is None:
            raise SystemExit("--c-rig needs nginx and wrk (apt-get install nginx-light wrk)")
        mock = rig.start_static_provider(binary, orjson.dumps(COMPLETION), logdir)
        headers = {"Authorization": f"Bearer {rig.BENCH_SECRET}"}
        client = CClient(wrk_binary, wrk.script(BODY, headers))
    else:
        mock = rig.start_mock(logdir, instant=True, chunks=16, interval=0.02)
    try:
        if w2_against:
            return {"w2_against": against_revisions(logdir, mock.port, seconds, rounds, w2_against)}
        pair = (
            None
            if admission_only
            else throughput_pair(
                logdir,
                mock.port,
                seconds,
                rounds,
                revs=pair_against,
                rate=rate,
                with_nginx=with_nginx,
                with_aiohttp=with_aiohttp,
                client=client,
                provider_pid=mock.pid,
            )
        )
        admission: dict[str, Any] = {}
        if not pair_against:  # else the 1-and-2-workers figures only
            admission = shared_admission(logdir, mock.port, seconds, rounds, revs)
        redis_pair = (
            throughput_pair(logdir, mock.port, seconds, rounds, redis=True)
            if with_redis and not admission_only
            else None
        )
    finally:
        rig.stop(mock)
    targets: dict[str, bool] = {}
    if admission:
        targets["redis_added_p50_at_most_0.3ms"] = admission["added_p50_us"] <= 300
    if pair is None:
        return {"shared_admission": admission, "targets": targets}
    one, two, at_revs, floors = pair
    grew = growth(two, one)
    mem = list(two["memory"].values())
    extra_uss = [m["uss"] for m in mem[1:]]  # the supervisor first, then each worker
    targets["cpu_growth_at_most_10pct"] = grew <= 0.10
    targets["extra_worker_uss_at_most_40MB"] = bool(extra_uss) and max(extra_uss) <= 40 * 2**20
    out: dict[str, Any] = {
        "rig": "c (nginx provider, wrk load)" if c_rig else "python (mock provider, loadclient)",
        "one_worker": one,
        "two_workers": two,
        "cpu_per_request_growth": grew,
    }
    if rate is not None:
        paced = growth(two["at_rate"], one["at_rate"])
        out["cpu_per_request_growth_at_rate"] = paced
        targets["cpu_growth_at_rate_at_most_10pct"] = paced <= 0.10
    if at_revs:
        out["two_workers_at"] = at_revs
    out |= floors
    if redis_pair is not None:
        one_r, two_r, _, _ = redis_pair
        out["with_redis"] = {
            "one_worker": one_r,
            "two_workers": two_r,
            "cpu_per_request_growth": growth(two_r, one_r),
        }
    return out | {"shared_admission": admission, "targets": targets}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per cell")
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating bursts per cell (seconds split)"
    )
    parser.add_argument(
        "--rev", action="append", default=[], help="a commit whose Redis admission to add"
    )
    parser.add_argument(
        "--admission-only", action="store_true", help="skip the 1-and-2-workers figures"
    )
    parser.add_argument(
        "--w2-against",
        action="append",
        default=[],
        metavar="REV",
        help="only W2's CPU per request of this checkout against this commit (repeatable)",
    )
    parser.add_argument(
        "--with-redis",
        action="store_true",
        help="also measure 1 and 2 workers sharing admission through Redis",
    )
    parser.add_argument(
        "--pair-against",
        action="append",
        default=[],
        metavar="REV",
        help="only the 1-and-2-workers figures, with 2 workers of this commit in the same rounds",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="also measure 1 and 2 workers at this many requests a second (open loop)",
    )
    parser.add_argument(
        "--with-nginx",
        action="store_true",
        help="also measure nginx with 1 and 2 workers (the two-process floor on these cores)",
    )
    parser.add_argument(
        "--with-aiohttp",
        action="store_true",
        help="also measure the smallest Python proxy with 1 and 2 processes (benchmarks.bareproxy)",
    )
    parser.add_argument(
        "--c-rig",
        action="store_true",
        help="nginx as the provider (a fixed completion) and wrk as the closed-loop client",
    )
    args = parser.parse_args(argv)
    result = run(
        args.seconds,
        args.rounds,
        revs=tuple(args.rev),
        admission_only=args.admission_only,
        with_redis=args.with_redis,
        w2_against=tuple(args.w2_against),
        pair_against=tuple(args.pair_against),
        rate=args.rate,
        with_nginx=args.with_nginx,
        with_aiohttp=args.with_aiohttp,
        c_rig=args.c_rig,
    )
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")


if __name__ == "__main__":
    main()
