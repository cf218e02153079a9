"""The workloads (W1, W2, W4, W5, W7) and the measurement of one run against one target.

Each run is a load-client process on the rig core; what it saw plus the proxy's CPU and RSS become
one JSON-ready dict. Nothing here starts or stops a server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from benchmarks import rig

PROMPT = (
    "You are a careful assistant. Summarise the following paragraph in two sentences and keep "
    "every number exactly as written. The relay measured its own overhead against a direct "
    "connection and against nginx on the same machine, in the same run, and reported the "
    "differences rather than absolute figures, because absolute figures depend on the machine."
)
STALL_S = 0.040  # W5: a gap over this is a stall
MAX_ERROR_RATE = 0.001


@dataclass(frozen=True)
class Scale:
    """How long and how hard each workload runs."""

    name: str
    runs: int
    w1_s: float
    w2_s: float
    w4_s: float
    w4_streams: int
    w5_s: float
    w5_levels: tuple[int, ...]
    w7_s: float
    billing_s: float
    chunks: int = 64
    interval: float = 0.02
    warmup: float = 0.3


SCALES = {
    "full": Scale(
        "full",
        3,
        4.0,
        4.0,
        4.0,
        100,
        4.0,
        (100, 200, 400, 600, 800, 1000, 1200, 1600, 2000),
        4.0,
        5.0,
    ),
    "quick": Scale("quick", 1, 2.0, 2.0, 2.5, 100, 2.5, (100, 300, 600, 900), 2.0, 2.0),
    "smoke": Scale(
        "smoke", 1, 0.15, 0.15, 0.3, 10, 0.3, (10,), 0.15, 0.3, chunks=8, interval=0.01, warmup=0.05
    ),
}


@dataclass
class Target:
    """Where the load goes: a direct connection, nginx or proxyd."""

    name: str
    instant_port: int
    paced_port: int
    proxy_pids: list[int] = field(default_factory=list)
    rig_pids: list[int] = field(default_factory=list)
    auth: dict[str, str] = field(
        default_factory=lambda: {"Authorization": f"Bearer {rig.BENCH_SECRET}"}
    )
    own_auth: bool = False  # True when the target checks keys itself (proxyd)
    tls_ca: str | None = None  # the target speaks HTTPS with a certificate from this CA


def _body(model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    else:
        body["max_tokens"] = 16
    return body


def client(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one load-client process on the rig core and return what it reports."""
    argv = rig.pinned(
        rig.RIG_CORE, [sys.executable, "-m", "benchmarks.loadclient", json.dumps(spec)]
    )
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"load client failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def limit_of(core_util: list[float], proxied: bool) -> str:
    """Which core bounded the figure: the proxy's (0), the rig's (1), or neither."""
    proxy = core_util[0] if core_util else 0.0
    rigc = core_util[1] if len(core_util) > 1 else 0.0
    names = []
    if proxied and proxy >= 0.9:
        names.append("proxy core")
    if rigc >= 0.9:
        names.append("rig core")
    return " + ".join(names) or "neither (offered load)"


def _spec(t: Target, stream: bool, headers: dict[str, str], s: Scale) -> dict[str, Any]:
    model = rig.STREAM_MODEL if stream else rig.INSTANT_MODEL
    return {
        "port": t.paced_port if stream else t.instant_port,
        "path": "/v1/chat/completions",
        "body": _body(model, stream),
        "headers": headers,
        "stream": stream,
        "warmup": s.warmup,
        "watch_pids": t.proxy_pids,
        "rig_pids": t.rig_pids,
        "tls_ca": t.tls_ca,
    }


def _derive(res: dict[str, Any], t: Target) -> dict[str, Any]:
    proxied = bool(t.proxy_pids)
    ok = max(res["ok"], 1)
    out = {
        "limit": limit_of(res["core_util"], proxied),
        "other_tenants_cores": round(max(0.0, res.get("other_cpu_s", 0.0)) / res["wall_s"], 2)
        if res.get("wall_s")
        else 0.0,
        "error_rate": res["errors"] / max(res["requests"], 1),
    }
    if proxied:
        out["cpu_us_per_request"] = round(res["proxy_cpu_s"] * 1e6 / max(res["requests"], 1), 1)
        out["proxy_util"] = round(res["proxy_cpu_s"] / res["wall_s"], 3) if res["wall_s"] else 0
        if res["events"]:
            out["cpu_us_per_chunk"] = round(res["proxy_cpu_s"] * 1e6 / res["events"], 2)
        out["rss_peak_mb"] = round(res["rss_peak"] / 2**20, 1)
    out["rig_cpu_us_per_request"] = round(res["rig_cpu_s"] * 1e6 / ok, 1)
    return out


def w1(t: Target, s: Scale) -> dict[str, Any]:
    """W1 overhead: non-stream, one request at a time."""
    spec = {**_spec(t, False, t.auth, s), "mode": "closed", "concurrency": 1, "duration": s.w1_s}
    res = client(spec, s.w1_s + 60)
    return {"spec": spec, "result": res, "derived": _derive(res, t)}


def w2(t: Target, s: Scale) -> dict[str, Any]:
    """W2 throughput: non-stream, 64 requests in flight."""
    spec = {**_spec(t, False, t.auth, s), "mode": "closed", "concurrency": 64, "duration": s.w2_s}
    res = client(spec, s.w2_s + 60)
    return {"spec": spec, "result": res, "derived": _derive(res, t)}


def streams(t: Target, s: Scale, concurrent: int, seconds: float) -> dict[str, Any]:
    """Open-loop streams arriving so that about `concurrent` are open at once (W4 and W5)."""
    stream_s = (s.chunks + 1) * s.interval
    spec = {
        **_spec(t, True, t.auth, s),
        "mode": "open",
        "rate": concurrent / stream_s,
        "duration": seconds,
        "expect_events": s.chunks,
        "timeout": stream_s + 20,
        "seed": concurrent,
    }
    res = client(spec, seconds + stream_s + 90)
    derived = _derive(res, t)
    gaps = res["gap_us"]
    clean = derived["error_rate"] < MAX_ERROR_RATE and bool(gaps)
    # stall-free: at most 0.1 % of gaps over 40 ms (p99.9); strict: not a single one
    derived["stall_free"] = clean and gaps.get("p999", 0.0) / 1e6 <= STALL_S
    derived["stall_free_strict"] = clean and gaps.get("max", 0.0) / 1e6 <= STALL_S
    derived["concurrent"] = concurrent
    return {"spec": spec, "result": res, "derived": derived}


def w7(t: Target, s: Scale, kind: str) -> dict[str, Any]:
    """W7 rejections: an unknown key (401) or, on proxyd, a key over its rate limit (429) or
    asking for a model it may not use (403, refused in admission with a billing row)."""
    if kind == "invalid":
        headers = {"Authorization": "Bearer sk-not-a-key"} if t.own_auth else {}
        expect = [401]
    elif kind == "forbidden":
        headers = {"Authorization": f"Bearer {rig.STREAMS_ONLY_SECRET}"}
        expect = [403]
    else:
        headers = {"Authorization": f"Bearer {rig.LIMITED_SECRET}"}
        expect = [429]
    spec = {
        **_spec(t, False, headers, s),
        "mode": "closed",
        "concurrency": 16,
        "duration": s.w7_s,
        "expect_status": expect,
    }
    res = client(spec, s.w7_s + 60)
    return {"spec": spec, "result": res, "derived": _derive(res, t)}
