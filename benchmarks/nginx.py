"""nginx as the reference reverse proxy: find or install Debian's binary, write a config, run it.

Plain streaming proxy (proxy_buffering off, upstream keep-alive, one worker), loopback only.
Installing uses apt-get, and only when the caller asks for it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks import debian

CONF = """\
worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 16000; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{servers}}}
"""

SERVER = """\
    upstream up_{port} {{ server 127.0.0.1:{upstream}; keepalive 1024;
        keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096{reuseport};
        location / {{
            proxy_pass http://up_{port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
"""


def find_binary() -> str | None:
    """The nginx binary on PATH or in /usr/sbin, or None."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def install() -> str | None:
    """apt-get install nginx-light (or nginx) when nginx is missing; the binary or None."""
    return debian.install(("nginx-light", "nginx"), find_binary)


def version(binary: str) -> str:
    """`nginx -v` as one line, e.g. 'nginx/1.22.1'."""
    out = subprocess.run([binary, "-v"], check=False, capture_output=True, text=True)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


STATIC = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ default_type application/json; return 200 '{body}'; }}
    }}
"""


def _workdir(servers: str, workers: int) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="proxyd-bench-nginx-"))
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir()
    (workdir / "nginx.conf").write_text(CONF.format(dir=workdir, servers=servers, workers=workers))
    return workdir


def write_config(routes: dict[int, int], workers: int = 1) -> Path:
    """A temp dir holding nginx.conf that proxies each listen port to its upstream port (with
    `workers` worker processes; more than one share each port with SO_REUSEPORT, as proxyd's
    workers do, so that every worker takes connections)."""
    reuseport = " reuseport" if workers > 1 else ""
    servers = "".join(
        SERVER.format(port=p, upstream=u, reuseport=reuseport) for p, u in routes.items()
    )
    return _workdir(servers, workers)


def write_static(port: int, body: bytes) -> Path:
    """A temp dir holding nginx.conf that answers every request on `port` with `body` (JSON,
    200): a provider that costs next to nothing, so the proxy in front of it is what a run
    measures."""
    text = body.decode()
    if "'" in text or "$" in text or "\\" in text:
        raise ValueError("the static body must not need nginx escaping")
    return _workdir(STATIC.format(port=port, body=text), 1)


def command(binary: str, workdir: Path) -> list[str]:
    """The argv that runs nginx in the foreground on the config in `workdir`."""
    return [binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", "stderr"]
