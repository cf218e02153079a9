"""Reads CPU time, RSS and per-core busy time from /proc; nothing else.

Linux only. Never writes anything and never signals a process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuSample:
    """Cumulative CPU seconds of a process tree and busy/total jiffies of every core."""

    proc_seconds: float
    core_busy: tuple[int, ...]
    core_total: tuple[int, ...]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    # the command name is in parentheses and may hold spaces: split after the last ')'
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of one process (all its threads); 0 when it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # after the name: state(0) ppid(1) ... utime(11) stime(12)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    """Every descendant of a process (workers forked by nginx or proxyd)."""
    by_parent: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            by_parent.setdefault(int(fields[1]), []).append(int(name))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = by_parent.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def tree_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of the given processes together."""
    return sum(cpu_seconds(p) for p in pids)


def rss_bytes(pid: int) -> int:
    """Resident set size of one process from /proc/PID/status (VmRSS); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def core_times() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(busy, total) jiffies per core from /proc/stat; idle and iowait count as not busy."""
    busy: list[int] = []
    total: list[int] = []
    with open("/proc/stat", "rb") as f:
        for line in f:
            if not line.startswith(b"cpu") or line.startswith(b"cpu "):
                continue
            if not line[3:4].isdigit():
                break
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + values[4]
            all_ = sum(values[:8])
            busy.append(all_ - idle)
            total.append(all_)
    return tuple(busy), tuple(total)


def sample(pids: list[int]) -> CpuSample:
    """One snapshot of the watched processes and all cores."""
    busy, total = core_times()
    return CpuSample(tree_cpu_seconds(pids), busy, total)


def core_utilisation(a: CpuSample, b: CpuSample) -> list[float]:
    """Busy fraction of each core between two samples."""
    out = []
    for i in range(min(len(a.core_total), len(b.core_total))):
        dt = b.core_total[i] - a.core_total[i]
        out.append((b.core_busy[i] - a.core_busy[i]) / dt if dt > 0 else 0.0)
    return out


def busy_seconds(a: CpuSample, b: CpuSample) -> float:
    """CPU seconds all cores spent busy between two samples, whoever used them."""
    return (sum(b.core_busy) - sum(a.core_busy)) / CLK_TCK
