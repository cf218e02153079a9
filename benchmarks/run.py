"""`python -m benchmarks.run [--quick|--smoke] [--out DIR]`: the benchmark driver (`make bench`).

Starts the mock providers, nginx and proxyd pinned to their cores, runs every workload against
each target in the same session, and writes JSON per run, a summary, RESULTS.md and a plot.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import resource
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks import nginx, procstat, profile, report, rig, workloads
from benchmarks.workloads import Scale, Target

HERE = Path(__file__).resolve().parent


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _postgres_up() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 5432), 1.0):
        return True
    return False


def _wait_ready(port: int, timeout: float = 30.0, ca: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    url = f"{'https' if ca else 'http'}://127.0.0.1:{port}/readyz"
    context = ssl.create_default_context(cafile=ca) if ca else None
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=1, context=context) as r,  # noqa: S310 - loopback
        ):
            if r.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"proxyd on port {port} is not ready after {timeout}s")


def _versions(nginx_bin: str | None) -> dict[str, str]:
    out = {"Python": sys.version.split()[0]}
    for mod in ("aiohttp", "uvloop", "orjson", "proxyd"):
        with contextlib.suppress(Exception):
            out[mod] = str(importlib.import_module(mod).__version__)
    if nginx_bin:
        out["nginx"] = nginx.version(nginx_bin).removeprefix("nginx/")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        check=False,
        capture_output=True,
        text=True,
        cwd=HERE.parent,
    )
    if commit.returncode == 0:
        out["commit"] = commit.stdout.strip()
    return out


@contextlib.contextmanager
def session(
    scale: Scale,
    logdir: Path,
    notes: list[str],
    want_nginx: bool,
    install_nginx: bool,
    want_proxyd: bool,
    baseline: str | None = None,
    tls: bool = False,
) -> Iterator[tuple[list[Target], str | None]]:
    """Everything the runs need, started pinned and stopped afterwards, as a list of targets.

    With `baseline` (a commit), the proxyd of that commit runs beside this checkout's as the
    target `proxyd@<commit>`, with the same config, so a change is measured against the commit
    before it in one session.
    """
    started: list[rig.Service] = []
    try:
        instant = rig.start_mock(logdir, instant=True, chunks=16, interval=scale.interval)
        started.append(instant)
        paced = rig.start_mock(logdir, instant=False, chunks=scale.chunks, interval=scale.interval)
        started.append(paced)
        mocks = [instant.pid, paced.pid]
        targets = [Target("direct", instant.port, paced.port, rig_pids=mocks)]
        binary = (nginx.install() if install_nginx else nginx.find_binary()) if want_nginx else None
        if want_nginx and binary is None:
            notes.append("nginx is not installed here: the nginx column is skipped.")
        if binary:
            svc, ports = rig.start_nginx(binary, {"i": instant.port, "p": paced.port}, logdir)
            started.append(svc)
            pids = [svc.pid, *procstat.children(svc.pid)]
            targets.append(Target("nginx", ports["i"], ports["p"], pids, mocks))
        if want_proxyd and rig.proxyd_available():
            db = rig.DATABASE_URL
            if not _postgres_up():
                db = f"sqlite:///{logdir.resolve()}/bench.sqlite3"
                notes.append("PostgreSQL is not answering: proxyd billed into SQLite instead.")
            try:
                svc = rig.start_proxyd(logdir, instant.port, paced.port, db)
            except RuntimeError as exc:
                tail = (logdir / "proxyd.log").read_text(errors="replace").strip()[-300:]
                notes.append(f"proxyd did not start ({exc}); its column is skipped: {tail}")
            else:
                started.append(svc)
                _wait_ready(svc.port)
                pids = [svc.pid, *procstat.children(svc.pid)]
                targets.append(Target("proxyd", svc.port, svc.port, pids, mocks, own_auth=True))
                try:  # the same proxyd with metrics off, for the cost of metrics (W2, W4)
                    off = rig.start_proxyd(
                        logdir, instant.port, paced.port, db, metrics=False, name=NO_METRICS
                    )
                except RuntimeError as exc:
                    notes.append(f"proxyd with metrics off did not start ({exc})")
                else:
                    started.append(off)
                    _wait_ready(off.port)
                    pids = [off.pid, *procstat.children(off.pid)]
                    targets.append(
                        Target(NO_METRICS, off.port, off.port, pids, mocks, own_auth=True)
                    )
                if tls:  # the same proxyd with HTTPS on its client listener
                    ca, pair = _tls_files(logdir)
                    try:
                        svc = rig.start_proxyd(
                            logdir, instant.port, paced.port, db, name=TLS, tls=pair
                        )
                    except RuntimeError as exc:
                        notes.append(f"proxyd with TLS did not start ({exc})")
                    else:
                        started.append(svc)
                        _wait_ready(svc.port, ca=ca)
                        pids = [svc.pid, *procstat.children(svc.pid)]
                        targets.append(
                            Target(TLS, svc.port, svc.port, pids, mocks, own_auth=True, tls_ca=ca)
                        )
                if baseline:
                    base = _start_baseline(baseline, logdir, instant.port, paced.port, db, notes)
                    if base is not None:
                        svc, name = base
                        started.append(svc)
                        pids = [svc.pid, *procstat.children(svc.pid)]
                        targets.append(Target(name, svc.port, svc.port, pids, mocks, own_auth=True))
        elif want_proxyd:
            notes.append("proxyd does not import in this checkout yet: its column is skipped.")
        yield targets, binary
    finally:
        for svc in reversed(started):
            rig.stop(svc)


def _start_baseline(
    rev: str, logdir: Path, instant_port: int, paced_port: int, db: str, notes: list[str]
) -> tuple[rig.Service, str] | None:
    """The proxyd of commit `rev`, started from its exported tree; None (with a note) if not."""
    try:
        tree, short = rig.export_tree(rev, logdir.parent)
    except subprocess.CalledProcessError as exc:
        notes.append(f"baseline {rev} could not be exported: {exc}")
        return None
    name = f"proxyd@{short}"
    try:
        svc = rig.start_proxyd(logdir, instant_port, paced_port, db, name=name, tree=tree)
    except RuntimeError as exc:
        notes.append(f"baseline {name} did not start ({exc}); its column is skipped")
        return None
    _wait_ready(svc.port)
    return svc, name


NO_METRICS = "proxyd-nometrics"  # the same proxyd with metrics off, in W2 and W4 only
TLS = "proxyd-tls"  # the same proxyd with TLS 1.3 on its client listener (--tls)


def _tls_files(logdir: Path) -> tuple[str, tuple[str, str]]:
    """A throwaway CA (trustme) and a certificate for 127.0.0.1: (CA file, (chain, key))."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = [logdir / "tls-ca.pem", logdir / "tls-cert.pem", logdir / "tls-key.pem"]
    ca.cert_pem.write_to_path(str(paths[0]))
    paths[1].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(paths[2]))
    return str(paths[0]), (str(paths[1]), str(paths[2]))


class Recorder:
    """Keeps every run, in memory and as one JSON file each."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.results: dict[str, dict[str, list[dict[str, Any]]]] = {}

    def record(self, group: str, target: str, run: int, fn: Callable[[], dict[str, Any]]) -> None:
        try:
            data = fn()
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            data = {
                "error": str(exc)[-500:],
                "derived": {"limit": "-", "error_rate": 1.0, "stall_free": False},
                "result": {},
            }
        data.update(group=group, target=target, run=run)
        name = f"{group.replace(':', '-').replace('@', '-')}-{target}-run{run}.json"
        (self.out / name).write_text(json.dumps(data, indent=1))
        self.results.setdefault(group, {}).setdefault(target, []).append(data)
        status = data.get("error") or data["derived"].get("limit")
        print(f"  {group:<14} {target:<7} run {run}: {status}", flush=True)


def run_all(
    scale: Scale, targets: list[Target], rec: Recorder, only: frozenset[str] = frozenset()
) -> dict[str, int]:
    """Every workload (or those in `only`), runs interleaved across targets.

    Returns W5's largest stall-free level.
    """

    def wanted(group: str) -> bool:
        return not only or group in only or group.split("@")[0] in only

    plain: list[tuple[str, Callable[[Target], dict[str, Any]]]] = [
        ("W1", lambda t: workloads.w1(t, scale)),
        ("W2", lambda t: workloads.w2(t, scale)),
        ("W4", lambda t: workloads.streams(t, scale, scale.w4_streams, scale.w4_s)),
        ("W7:invalid", lambda t: workloads.w7(t, scale, "invalid")),
    ]
    for group, fn in plain:
        if not wanted(group):
            continue
        for i in range(scale.runs):
            for t in targets:
                if t.name == NO_METRICS and group not in ("W2", "W4"):
                    continue
                rec.record(group, t.name, i, functools.partial(fn, t))
    targets = [t for t in targets if t.name != NO_METRICS]
    for kind in ("limited", "forbidden"):  # refusals only proxyd makes
        group = f"W7:{kind}"
        for i in range(scale.runs if wanted(group) else 0):
            for t in targets:
                if t.own_auth:
                    rec.record(group, t.name, i, functools.partial(workloads.w7, t, scale, kind))
    best: dict[str, int] = {}
    misses: dict[str, int] = {}
    alive = list(targets) if wanted("W5") else []

    def prev(level: int) -> int:
        i = scale.w5_levels.index(level)
        return scale.w5_levels[i - 1] if i else 0

    for level in scale.w5_levels:
        group = f"W5@{level}"
        for i in range(scale.runs):
            for t in alive:
                rec.record(
                    group,
                    t.name,
                    i,
                    functools.partial(workloads.streams, t, scale, level, scale.w5_s),
                )
        for t in list(alive):
            runs = rec.results[group][t.name]
            free = sorted(r["derived"].get("stall_free", False) for r in runs)
            strict = sorted(r["derived"].get("stall_free_strict", False) for r in runs)
            if strict[len(strict) // 2] and best.get(t.name + " (strict)", 0) == prev(level):
                best[t.name + " (strict)"] = level
            if free[len(free) // 2]:  # the median run was stall-free
                if misses.get(t.name, 0) == 0:
                    best[t.name] = level
            else:
                misses[t.name] = misses.get(t.name, 0) + 1
                if misses[t.name] >= 2:  # one more level after the first miss, for the plot
                    alive.remove(t)
        if not alive:
            break
    return best


def profiles(scale: Scale, targets: list[Target], out: Path, level: int) -> dict[str, Any]:
    """Extra W1, W2, W7 (429) and W5 runs against proxyd under py-spy; the top frames of each."""
    found: dict[str, Any] = {}
    proxyd = next((t for t in targets if t.own_auth), None)
    if proxyd is None or profile.py_spy() is None:
        return found
    jobs: list[tuple[str, float, Callable[[], dict[str, Any]]]] = [
        ("W1", scale.w1_s, functools.partial(workloads.w1, proxyd, scale)),
        ("W2", scale.w2_s, functools.partial(workloads.w2, proxyd, scale)),
        ("W7:limited", scale.w7_s, functools.partial(workloads.w7, proxyd, scale, "limited")),
        (
            f"W5@{level}",
            scale.w5_s,
            functools.partial(workloads.streams, proxyd, scale, level, scale.w5_s),
        ),
    ]
    for name, seconds, job in jobs:
        path = out / f"profile-{name.replace('@', '-').replace(':', '-')}.txt"
        spy = profile.start(proxyd.proxy_pids[0], seconds + 0.5, path)
        if spy is None:
            break
        job()
        spy.wait(timeout=seconds + 30)
        if path.exists():
            found[name] = profile.top_frames(path)
    return found


def billing(seconds: float, notes: list[str]) -> dict[str, Any] | None:
    """The billing writer benchmark from benchmarks/bench_billing.py, when it exists."""
    try:
        mod = importlib.import_module("benchmarks.bench_billing")
    except ImportError as exc:
        notes.append(f"billing writer benchmark skipped: benchmarks.bench_billing: {exc}")
        return None
    try:
        result: dict[str, Any] = mod.run(seconds)
    except Exception as exc:  # the other module's failure must not lose the whole session
        notes.append(f"billing writer benchmark failed: {type(exc).__name__}: {exc}")
        return None
    return result


def write_results(
    path: Path,
    scale: Scale,
    summary: dict[str, Any],
    best: dict[str, int],
    versions: dict[str, str],
    notes: list[str],
    bill: dict[str, Any] | None,
    plotted: bool,
    spied: dict[str, Any],
) -> None:
    """RESULTS.md: header, targets, one table per workload, W5 levels, billing, notes."""
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "# proxyd benchmark results",
        "",
        f"{when}; scale `{scale.name}` ({scale.runs} run(s) per cell, cells show median "
        "(min..max)).  ",
        f"Machine: {report.machine(versions)}.  ",
        "proxy under test pinned to core 0; mock provider and load client pinned to core 1. "
        "'limit' names the core that was ≥ 90 % busy during the run (other tenants of this "
        "machine count too), 'neither' means the offered load, not a core, set the figure. "
        "The method, the rig's limits and why the missed targets are missed: "
        "[README.md](README.md).",
        "",
        "## Targets from issue 8",
        "",
        *report.targets_check(summary, best),
    ]
    base = next((g for g in _targets(summary) if g.startswith("proxyd@")), None)
    if base is not None:
        parts += ["", f"## This checkout against {base}, same session", ""]
        parts += report.versus(summary, "proxyd", base)
    titles = {
        "W1": "W1 overhead — non-stream, concurrency 1",
        "W2": "W2 throughput — non-stream, concurrency 64",
        "W4": f"W4 stream latency — {scale.w4_streams} streams of {scale.chunks} chunks "
        f"every {scale.interval * 1000:.0f} ms, open-loop",
        "W7:invalid": "W7 rejections — unknown key (401), concurrency 16",
        "W7:limited": "W7 rejections — key over its rate limit (429), concurrency 16",
        "W7:forbidden": "W7 rejections — model the key may not use (403), concurrency 16",
    }
    for group, title in titles.items():
        if group in summary:
            parts += ["", f"## {title}", "", report.table(summary, group)]
    w5 = sorted((g for g in summary if g.startswith("W5@")), key=lambda g: int(g[3:]))
    if w5:
        parts += ["", "## W5 stream capacity — open-loop streams at each concurrency level", ""]
        parts += [
            f"Largest stall-free level: {best or 'none'}. A level is stall-free when at most "
            "0.1 % of inter-event gaps exceed 40 ms (gap p99.9 <= 40 ms) and under 0.1 % of "
            "streams fail; '(strict)' means not a single gap over 40 ms. The direct connection "
            "shows the rig's own jitter at the same level.",
            "",
        ]
        if plotted:
            parts += ["![gap p99 and CPU per chunk vs concurrent streams](results.png)", ""]
        for g in w5:
            parts += [f"### {g[3:]} concurrent streams", "", report.table(summary, g), ""]
    parts += ["", "## Billing writer", ""]
    parts += [f"```json\n{json.dumps(bill, indent=1)}\n```" if bill else "not measured (see notes)"]
    for name, frames in spied.items():
        parts += [
            "",
            f"## proxyd profile under {name} (py-spy, % of samples)",
            "",
            "| own % | function | | inclusive % | function |",
            "| --- | --- | --- | --- | --- |",
        ]
        for (f1, p1), (f2, p2) in zip(frames["self"][:15], frames["total"][:15], strict=False):
            parts.append(f"| {p1} | `{f1}` | | {p2} | `{f2}` |")
    if notes:
        parts += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    path.write_text("\n".join(parts) + "\n")


def _targets(summary: dict[str, Any]) -> list[str]:
    """Every target name that appears in any group, in first-seen order."""
    return list(dict.fromkeys(t for group in summary.values() for t in group))


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the session, write the results; 0 unless nothing could run."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one short run per cell")
    p.add_argument("--smoke", action="store_true", help="every workload for about a second")
    p.add_argument("--out", type=Path, default=HERE / "out", help="where the JSON goes")
    p.add_argument("--no-nginx", action="store_true")
    p.add_argument("--no-proxyd", action="store_true")
    p.add_argument(
        "--tls",
        action="store_true",
        help="also run proxyd with TLS 1.3 on its client listener, as target proxyd-tls",
    )
    p.add_argument(
        "--profile", action="store_true", help="extra W1/W2/W7/W5 runs of proxyd under py-spy"
    )
    p.add_argument("--profile-streams", type=int, default=400, help="W5 level to profile")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated workloads to run "
        "(W1,W2,W4,W7:invalid,W7:limited,W7:forbidden,W5,billing); "
        "the report then goes to --out, not to benchmarks/RESULTS.md",
    )
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the proxyd of commit REV (e.g. HEAD~1) as target proxyd@REV, and "
        "compare this checkout against it",
    )
    args = p.parse_args(argv)
    scale = workloads.SCALES["smoke" if args.smoke else "quick" if args.quick else "full"]
    only = frozenset(w.strip() for w in args.only.split(",") if w.strip())
    out: Path = args.out / time.strftime("%Y%m%d-%H%M%S")
    logdir = out / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    _raise_nofile()
    notes: list[str] = []
    rec = Recorder(out)
    print(f"benchmark ({scale.name}) -> {out}", flush=True)
    with session(
        scale,
        logdir,
        notes,
        not args.no_nginx,
        not args.smoke,
        not args.no_proxyd,
        args.baseline,
        args.tls,
    ) as (targets, nginx_bin):
        best = run_all(scale, targets, rec, only)
        spied = profiles(scale, targets, out, args.profile_streams) if args.profile else {}
    bill = billing(scale.billing_s, notes) if not only or "billing" in only else None
    summary = report.summarise(rec.results)
    others = [
        r["derived"].get("other_tenants_cores") or 0.0
        for g in rec.results.values()
        for runs in g.values()
        for r in runs
    ]
    if others and sorted(others)[len(others) // 2] > 0.3:
        notes.append(
            f"other tenants used a median {sorted(others)[len(others) // 2]:.2f} "
            "cores during the runs: absolute latencies and the rig ceiling are noisy; "
            "CPU per request and per chunk are the robust figures."
        )
    versions = _versions(nginx_bin)
    (out / "summary.json").write_text(
        json.dumps(
            {
                "scale": scale.name,
                "summary": summary,
                "w5_best": best,
                "billing": bill,
                "notes": notes,
                "versions": versions,
            },
            indent=1,
        )
    )
    partial = args.smoke or bool(only)
    dest = out if partial else HERE
    plotted = report.plot(summary, dest / "results.png") if not partial else False
    write_results(dest / "RESULTS.md", scale, summary, best, versions, notes, bill, plotted, spied)
    print(f"wrote {dest / 'RESULTS.md'}", flush=True)
    for n in notes:
        print(f"note: {n}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
