"""Starts and stops the benchmark's processes: the mock providers, nginx and proxyd, each pinned.

The proxy under test goes on core 0, the mock provider and the load client on core 1. Only
loopback addresses; every process it starts it also stops, by its own pid.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import nginx

PROXY_CORE = "0"
RIG_CORE = "1"
BENCH_SECRET = "sk-bench-0123456789abcdef"  # noqa: S105 - throwaway benchmark secret
LIMITED_SECRET = "sk-bench-limited-0123456789"  # noqa: S105 - throwaway benchmark secret
STREAMS_ONLY_SECRET = "sk-bench-streams-only-0123456789"  # noqa: S105 - throwaway benchmark secret
ADMIN_TOKEN = "bench-admin-token-0123456789"  # noqa: S105 - throwaway benchmark secret
DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
INSTANT_MODEL = "mock-gpt"
STREAM_MODEL = "mock-gpt-stream"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pinned(core: str, argv: list[str]) -> list[str]:
    """argv run under `taskset -c core` when taskset exists and the core does."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > int(core):
        return ["taskset", "-c", core, *argv]
    return argv


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Block until something accepts on 127.0.0.1:port; fail if the process died first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop(svc: Service, grace: float = 10.0) -> None:
    """SIGTERM the process we started, SIGKILL it if it lingers, then remove its temp dir."""
    _stop(svc.proc, grace)
    if "workdir" in svc.extra:
        shutil.rmtree(svc.extra["workdir"], ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Service:
    """One started process and the port it serves."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The pid of the real server (taskset execs it, so the pid is the same)."""
        return self.proc.pid


CHECKOUT = Path(__file__).resolve().parent.parent


def _spawn(
    name: str,
    argv: list[str],
    port: int,
    logdir: Path,
    env: dict[str, str] | None = None,
    cwd: Path = CHECKOUT,
) -> Service:
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        wait_port(port, proc)
    except RuntimeError:
        _stop(proc)
        raise
    return Service(name, proc, port, log)


def start_mock(logdir: Path, *, instant: bool, chunks: int, interval: float) -> Service:
    """The mock provider on the rig core."""
    port = free_port()
    argv = [sys.executable, "-m", "proxyd.mockprovider", "--port", str(port)]
    argv += ["--chunks", str(chunks), "--interval", str(interval)]
    argv += ["--instant"] if instant else []
    return _spawn("mock-instant" if instant else "mock-paced", pinned(RIG_CORE, argv), port, logdir)


def start_static_provider(binary: str, body: bytes, logdir: Path) -> Service:
    """nginx on the rig core answering every request with `body` (a non-streamed completion):
    the provider of runs that must measure the proxy, not a Python mock beside it."""
    port = free_port()
    workdir = nginx.write_static(port, body)
    try:
        argv = pinned(RIG_CORE, nginx.command(binary, workdir))
        svc = _spawn("static-provider", argv, port, logdir)
    except RuntimeError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    svc.extra["workdir"] = str(workdir)
    return svc


def start_nginx(
    binary: str, routes: dict[str, int], logdir: Path
) -> tuple[Service, dict[str, int]]:
    """nginx on the proxy core with one listen port per named upstream port."""
    ports = {name: free_port() for name in routes}
    workdir = nginx.write_config({ports[n]: up for n, up in routes.items()})
    try:
        svc = _spawn(
            "nginx",
            pinned(PROXY_CORE, nginx.command(binary, workdir)),
            next(iter(ports.values())),
            logdir,
        )
    except RuntimeError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    for port in ports.values():
        wait_port(port, svc.proc)
    svc.extra["workdir"] = str(workdir)
    return svc, ports


def sha256_hex(secret: str) -> str:
    """The key hash proxyd stores."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _key(key_id: str, secret: str, model: str, *, rpm: int, tpm: int) -> str:
    """One `[[state.keys.keys]]` table of the bench config."""
    return f"""\
[[state.keys.keys]]
id = "{key_id}"
hash = "{sha256_hex(secret)}"
account_id = "acct-bench"
status = "active"
models = ["{model}"]
rpm = {rpm}
tpm = {tpm}
"""


def _channel(channel_id: str, port: int, model: str, credentials: int = 1) -> str:
    """One `[[state.channels.channels]]` table: a mock provider on `port` serving `model` (with
    `credentials` API keys: more than one gives sticky sessions a choice to keep)."""
    keys = (
        'api_key = "mock"'
        if credentials == 1
        else "api_keys = [" + ", ".join(f'"mock-{i}"' for i in range(credentials)) + "]"
    )
    return f"""\
[[state.channels.channels]]
id = "{channel_id}"
type = "openai"
base_url = "http://127.0.0.1:{port}/v1"
{keys}
models = ["{model}"]
"""


def proxyd_config(
    instant_port: int,
    paced_port: int,
    workdir: Path,
    *,
    metrics: bool = True,
    credentials: int = 1,
) -> str:
    """The TOML state proxyd starts with: a bench key, a rate-limited key, a key allowed the
    stream model only (its calls to the instant model get 403), and two mock channels."""
    return f"""\
metrics_enabled = {str(metrics).lower()}

[server]
max_body_bytes = 1048576
shutdown_grace_seconds = 2

[billing]
spool_dir = "{workdir}/spool"

[logging]
level = "warning"
format = "json"

[state.keys]
version = 1

{_key("bench", BENCH_SECRET, "*", rpm=100000000, tpm=100000000000)}
{_key("bench-limited", LIMITED_SECRET, "*", rpm=1, tpm=1000000)}
{_key("bench-streams-only", STREAMS_ONLY_SECRET, STREAM_MODEL, rpm=100000000, tpm=100000000000)}
[state.prices]
version = 1
discount = "1"

[state.prices.prices."{INSTANT_MODEL}"]
input = "0.15"
output = "0.60"

[state.prices.prices."{STREAM_MODEL}"]
input = "0.15"
output = "0.60"

[state.channels]
version = 1

{_channel("mock-instant", instant_port, INSTANT_MODEL, credentials)}
{_channel("mock-paced", paced_port, STREAM_MODEL)}
[state.balances."acct-bench"]
version = 1
balance_nanos = 1000000000000000
"""


def proxyd_argv() -> list[str]:
    """`python -m proxyd serve`, run from the checkout so this tree's proxyd is the one served."""
    return [sys.executable, "-m", "proxyd", "serve"]


def proxyd_available() -> bool:
    """Whether this checkout has a proxyd that can serve (the CLI module imports)."""
    done = subprocess.run(
        [sys.executable, "-c", "import proxyd.cli, proxyd.app"], check=False, capture_output=True
    )
    return done.returncode == 0


def proxyd_env(
    config: Path, port: int, control: int, database_url: str, tree: Path = CHECKOUT
) -> dict[str, str]:
    """The environment of a bench proxyd: its config file, listeners, admin token, billing
    database, and `tree` (a baseline commit's exported tree) first on PYTHONPATH."""
    env = {
        **os.environ,
        "PROXYD_CONFIG": str(config),
        "PROXYD_LISTEN": f"127.0.0.1:{port}",
        "PROXYD_CONTROL_LISTEN": f"127.0.0.1:{control}",
        "PROXYD_ADMIN_TOKEN": ADMIN_TOKEN,
        "PROXYD_DATABASE_URL": database_url,
    }
    if tree != CHECKOUT:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    return env


def start_proxyd(
    logdir: Path,
    instant_port: int,
    paced_port: int,
    database_url: str,
    *,
    metrics: bool = True,
    name: str = "proxyd",
    tree: Path = CHECKOUT,
    tls: tuple[str, str] | None = None,
    extra_config: str = "",
) -> Service:
    """proxyd on the proxy core with billing into `database_url`, metrics on unless told.

    `tree` is the source tree whose proxyd is served: this checkout, or a baseline commit's
    tree exported by `export_tree` (first on PYTHONPATH, so its modules win over the venv's).
    `extra_config` (TOML tables, e.g. `[redis]`) is appended to the configuration.
    """
    workdir = Path(tempfile.mkdtemp(prefix="proxyd-bench-"))
    config = workdir / "proxyd.toml"
    text = proxyd_config(instant_port, paced_port, workdir, metrics=metrics)
    config.write_text(text + ("\n" + extra_config if extra_config else ""))
    port, control = free_port(), free_port()
    env = proxyd_env(config, port, control, database_url, tree)
    if tls is not None:  # HTTPS on the client listener: (certificate chain, key) files
        env["PROXYD_TLS_CERT"], env["PROXYD_TLS_KEY"] = tls
    try:
        svc = _spawn(name, pinned(PROXY_CORE, proxyd_argv()), port, logdir, env=env, cwd=tree)
    except RuntimeError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    svc.extra.update(workdir=str(workdir), control_port=str(control))
    return svc


def export_tree(rev: str, into: Path) -> tuple[Path, str]:
    """The source tree of commit `rev` written under `into` (`git archive`); and its short id.

    The baseline proxyd runs from it with this checkout's virtualenv, so a baseline is any
    commit whose dependencies the venv has.
    """
    short = subprocess.run(
        ["git", "rev-parse", "--short", rev],
        check=True,
        capture_output=True,
        text=True,
        cwd=CHECKOUT,
    ).stdout.strip()
    tree = into / f"baseline-{short}"
    tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", short, "proxyd"],
        check=True,
        capture_output=True,
        cwd=CHECKOUT,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree, short
