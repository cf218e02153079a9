"""wrk as a load client written in C: find or install Debian's binary, run a closed loop, read it.

The Python load client (`loadclient`) costs about as much CPU per request as the proxy it
drives; on two cores it competes with the proxy's workers for them. wrk's one thread costs a
small part of that, so a figure taken with it is more the proxy's own. Installing uses
apt-get, and only when the caller asks for it. Loopback only; bounded by `seconds`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import orjson

from benchmarks import debian

_REQUESTS = re.compile(r"(\d+) requests in ")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass(frozen=True)
class Burst:
    """What one wrk run saw: responses with a 2xx status, the others, socket errors."""

    ok: int
    errors: int
    seconds: float

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def find_binary() -> str | None:
    """The wrk binary on PATH, or None."""
    return shutil.which("wrk")


def install() -> str | None:
    """apt-get install wrk when it is missing; the binary or None."""
    return debian.install(("wrk",), find_binary)


def script(body: object, headers: dict[str, str]) -> Path:
    """A Lua file that makes every request a POST of `body` (JSON) with `headers`."""
    text = orjson.dumps(body).decode()
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(text)}"]
    lines.append('wrk.headers["Content-Type"] = "application/json"')
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    path = Path(tempfile.mkdtemp(prefix="proxyd-bench-wrk-")) / "post.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse(output: str, seconds: float) -> Burst:
    """A Burst from wrk's report (raises ValueError when it holds no request count)."""
    found = _REQUESTS.search(output)
    if found is None:
        raise ValueError(f"wrk printed no request count: {output[-400:]!r}")
    total = int(found.group(1))
    bad = _NON_2XX.search(output)
    failed = int(bad.group(1)) if bad else 0
    sockets = _SOCKET_ERRORS.search(output)
    broken = sum(int(g) for g in sockets.groups()) if sockets else 0
    return Burst(ok=total - failed, errors=failed + broken, seconds=seconds)


def run(
    binary: str, url: str, lua: Path, *, connections: int, seconds: float, threads: int = 1
) -> Burst:
    """One closed-loop burst: `connections` keep-alive connections, each sending its next
    request when the last answer arrived, for `seconds` (whole seconds, at least one)."""
    whole = max(1, round(seconds))
    argv = [binary, f"-t{threads}", f"-c{connections}", f"-d{whole}s", "-s", str(lua), url]
    done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=whole + 30)
    return parse(done.stdout, float(whole))
