"""A few-second run of the whole benchmark suite, so the benchmark code cannot rot."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks import bench_workers, loadclient, nginx, procstat, rig, wrk

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("W1", "W2", "W4", "W7:invalid", "W5@10")


def _module(*argv: str) -> str:
    """Run `python -m <argv>` from the checkout; its stdout, after asserting it succeeded."""
    done = subprocess.run(  # noqa: S603 - our own interpreter running our own module
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=55,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run `python -m benchmarks.run --smoke` once and return its summary.json."""
    out = tmp_path_factory.mktemp("bench")
    _module("benchmarks.run", "--smoke", "--out", str(out))
    (session,) = [p for p in out.iterdir() if p.is_dir()]
    summary: dict[str, Any] = json.loads((session / "summary.json").read_text())
    summary["_dir"] = str(session)
    return summary


def _runs(summary: dict[str, Any], group: str, target: str) -> list[dict[str, Any]]:
    session = Path(summary["_dir"])
    name = f"{group.replace(':', '-').replace('@', '-')}-{target}-run0.json"
    data: dict[str, Any] = json.loads((session / name).read_text())
    return [data]


def _assert_clean(summary: dict[str, Any], target: str) -> None:
    for group in GROUPS:
        (run,) = _runs(summary, group, target)
        assert "error" not in run, run.get("error")
        res = run["result"]
        assert res["ok"] > 0, (group, target, res)
        assert res["errors"] == 0, (group, target, res)
        assert res["latency_us"]["p50"] > 0
    (w4,) = _runs(summary, "W4", target)
    assert w4["result"]["gap_us"]["n"] > 0
    assert w4["result"]["events"] >= w4["result"]["ok"] * 8


def test_direct_connection_runs_every_workload(smoke: dict[str, Any]) -> None:
    """Every workload completes against the mock provider directly, without errors."""
    _assert_clean(smoke, "direct")
    assert (Path(smoke["_dir"]) / "RESULTS.md").read_text().startswith("# proxyd benchmark")


def test_nginx_column_when_nginx_is_installed(smoke: dict[str, Any]) -> None:
    """With nginx installed, the nginx column runs too and its CPU is read from /proc."""
    if nginx.find_binary() is None:
        pytest.skip("nginx is not installed (make bench installs it)")
    _assert_clean(smoke, "nginx")
    (w2,) = _runs(smoke, "W2", "nginx")
    assert w2["derived"]["limit"]


def test_proxyd_column(smoke: dict[str, Any]) -> None:
    """proxyd serves every workload with billing and metrics on, and rejects as W7 expects."""
    if not rig.proxyd_available():
        pytest.skip("proxyd does not import in this checkout")
    assert "W1" in smoke["summary"], smoke["notes"]
    assert "proxyd" in smoke["summary"]["W1"], smoke["notes"]
    _assert_clean(smoke, "proxyd")
    (limited,) = _runs(smoke, "W7:limited", "proxyd")
    assert limited["result"]["status"].get("429", 0) > 0
    (forbidden,) = _runs(smoke, "W7:forbidden", "proxyd")
    assert forbidden["result"]["status"] == {"403": forbidden["result"]["requests"]}


def test_chunked_parser_handles_split_reads() -> None:
    """The load client's HTTP parser completes a chunked response fed one byte at a time."""
    loop = asyncio.new_event_loop()
    try:
        resp = loadclient._Resp(loop.create_future(), [])
        wire = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"6\r\ndata:\n\n\r\n7\r\ndata: x\n\r\n1\r\n\n\r\n0\r\n\r\n"
        )
        done = [resp.feed(wire[i : i + 1], float(i)) for i in range(len(wire))]
    finally:
        loop.close()
    assert done[-1] is True
    assert done.count(True) == 1
    assert resp.status == 200
    assert resp.events == 2


def test_timeline_stamps_every_segment_of_a_request() -> None:
    """`python -m benchmarks.timeline` runs W1 against a stamped proxyd and prints each segment."""
    if not rig.proxyd_available():
        pytest.skip("proxyd does not import in this checkout")
    head, *segments = _module("benchmarks.timeline", "--seconds", "0.3").strip().splitlines()
    assert head.startswith("W1 through proxyd: p50 ")
    assert int(head.split(", ")[1].split()[0]) > 0  # requests stamped
    assert len(segments) == 10
    for line in segments:
        assert float(line.split()[0]) >= 0, line


WRK_REPORT = """\
Running 2s test @ http://127.0.0.1:8080/v1/chat/completions
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     9.81ms    2.01ms  30.12ms   80.00%
    Req/Sec     6.52k   301.22     7.01k    70.00%
  13050 requests in 2.00s, 9.61MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 40
Requests/sec:   6524.11
Transfer/sec:      4.80MB
"""


def test_wrk_report_counts_only_2xx_answers_as_served() -> None:
    """wrk's request count includes non-2xx answers: they and the socket errors are errors."""
    burst = wrk.parse(WRK_REPORT, 2.0)
    assert (burst.ok, burst.errors) == (13050 - 40, 40 + 3 + 2)
    assert burst.rps == (13050 - 40) / 2.0
    with pytest.raises(ValueError, match="no request count"):
        wrk.parse("unable to connect to 127.0.0.1:1 Connection refused\n", 1.0)


def test_c_rig_serves_a_priced_completion_through_proxyd(tmp_path: Path) -> None:
    """`bench_workers --c-rig`: nginx answers the fixed completion, wrk drives proxyd in front
    of it, and every answer is a 200 (the completion is one proxyd accepts and prices)."""
    binary, wrk_binary = nginx.find_binary(), wrk.find_binary()
    if binary is None or wrk_binary is None or not rig.proxyd_available():
        pytest.skip("needs nginx, wrk (make tools installs both) and an importable proxyd")
    provider = rig.start_static_provider(binary, orjson.dumps(bench_workers.COMPLETION), tmp_path)
    try:
        proc, port = bench_workers._start(tmp_path, provider.port, workers=1, redis=False)
        try:
            lua = wrk.script(bench_workers.BODY, {"Authorization": f"Bearer {rig.BENCH_SECRET}"})
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            burst = wrk.run(wrk_binary, url, lua, connections=4, seconds=1)
            assert burst.ok > 50, burst
            assert burst.errors == 0, burst
        finally:
            bench_workers._stop(proc)
    finally:
        rig.stop(provider)


def test_nginx_reference_shares_its_port_between_workers() -> None:
    """With two worker processes the reference nginx listens with SO_REUSEPORT, as proxyd's
    workers do (without it one nginx worker takes almost every connection)."""
    one = nginx.write_config({8001: 8002}, workers=1)
    two = nginx.write_config({8001: 8002}, workers=2)
    try:
        assert "reuseport" not in (one / "nginx.conf").read_text()
        assert "backlog=4096 reuseport;" in (two / "nginx.conf").read_text()
    finally:
        for d in (one, two):
            shutil.rmtree(d, ignore_errors=True)


def test_the_python_floor_proxies_with_two_processes(tmp_path: Path) -> None:
    """`bench_workers --with-aiohttp`: the smallest Python proxy, forked twice on one socket,
    answers every request through the provider (both processes serve)."""
    binary, wrk_binary = nginx.find_binary(), wrk.find_binary()
    if binary is None or wrk_binary is None:
        pytest.skip("needs nginx and wrk (make tools installs both)")
    provider = rig.start_static_provider(binary, orjson.dumps(bench_workers.COMPLETION), tmp_path)
    try:
        proc, port = bench_workers._start_bare(tmp_path, provider.port, 2)
        try:
            workers = procstat.children(proc.pid)
            assert len(workers) == 2
            before = [procstat.cpu_seconds(pid) for pid in workers]
            lua = wrk.script(bench_workers.BODY, {"Authorization": "Bearer x"})
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            burst = wrk.run(wrk_binary, url, lua, connections=8, seconds=1)
            assert burst.ok > 50, burst
            assert burst.errors == 0, burst
            assert all(procstat.cpu_seconds(p) > b for p, b in zip(workers, before, strict=True))
        finally:
            bench_workers._stop(proc)
    finally:
        rig.stop(provider)
