"""Samples a running proxy with py-spy and ranks its hottest frames, apart from the measured runs.

py-spy runs on the rig core in non-blocking mode, so the profiled run is a separate, extra run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from benchmarks import rig


def py_spy() -> str | None:
    """The py-spy binary next to this interpreter or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """Begin sampling `pid` for `seconds` into `out` (collapsed stacks); None without py-spy."""
    binary = py_spy()
    if binary is None:
        return None
    argv = [
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "250",
        "--format",
        "raw",
        "--nonblocking",
        "--output",
        str(out),
    ]
    return subprocess.Popen(
        rig.pinned(rig.RIG_CORE, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _frame(raw: str) -> str:
    """'handle (proxyd/x.py:120)' -> 'handle (proxyd/x.py)': lines merged per function."""
    name, _, where = raw.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name


def top_frames(collapsed: Path, n: int = 25) -> dict[str, list[tuple[str, float]]]:
    """The n frames with the most own time and the most inclusive time, in % of samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for f in set(frames):
            total[f] += count
    if not samples:
        return {"self": [], "total": []}
    return {
        "self": [(f, round(100 * c / samples, 1)) for f, c in own.most_common(n)],
        "total": [(f, round(100 * c / samples, 1)) for f, c in total.most_common(n)],
    }
