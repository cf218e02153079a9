"""deploy/docker-compose.yml: valid against the compose specification's JSON schema, and wired
so the names line up: two proxyd instances behind nginx, PostgreSQL, Redis, the mock provider,
Prometheus scraping both, Grafana with the dashboard. Its nginx, Prometheus and proxyd configs
pass their own tools. Docker is not run (no image registry here); every check is static.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml

from proxyd.config import load_config
from tests.deploy_facts import (
    DATA,
    DEPLOY,
    cli_flags,
    env_vars,
    env_vars_in,
    flags_in,
    listen_ports,
    metric_names,
    metrics_in,
    routes,
    run,
    shutdown_grace,
    tool,
)

COMPOSE = DEPLOY / "docker-compose.yml"
FILES = DEPLOY / "compose"
NGINX = FILES / "nginx.conf"
PROXYD_TOML = FILES / "proxyd.toml"


def compose() -> dict[str, Any]:
    """The compose file as the compose tool reads it (YAML merge keys resolved)."""
    return dict(yaml.safe_load(COMPOSE.read_text()))


def services() -> dict[str, dict[str, Any]]:
    """The compose services by name."""
    return dict(compose()["services"])


def proxyd_services() -> dict[str, dict[str, Any]]:
    """Services that run `proxyd serve` from the image built from deploy/Dockerfile."""
    return {
        name: svc
        for name, svc in services().items()
        if svc.get("build", {}).get("dockerfile") == "deploy/Dockerfile" and "entrypoint" not in svc
    }


def config_path(svc: dict[str, Any]) -> Path:
    """The host file a service mounts as its PROXYD_CONFIG."""
    inside = svc["environment"]["PROXYD_CONFIG"]
    for volume in svc["volumes"]:
        source, _, target = volume.partition(":")
        if target.split(":")[0] == inside:
            return Path(DEPLOY / source).resolve()
    raise AssertionError(f"{inside} is not mounted")


def compose_env(svc: dict[str, Any]) -> dict[str, str]:
    """A service's environment with `${VAR:-default}` taken at its default."""
    env = {k: str(v) for k, v in svc.get("environment", {}).items()}
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", v) for k, v in env.items()}


def spec_errors(document: dict[str, Any]) -> list[str]:
    """What the compose specification's JSON schema (draft 7) finds wrong with a document."""
    schema = yaml.safe_load((DATA / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_matches_the_compose_specification() -> None:
    """The compose specification's own JSON schema accepts the file."""
    assert spec_errors(compose()) == []


def test_compose_schema_rejects_a_misspelt_key() -> None:
    """The same schema refuses a service with a misspelt key: the validation bites."""
    bad = compose()
    bad["services"]["proxyd-1"]["stop_grace_perod"] = "45s"
    assert any("stop_grace_perod" in e for e in spec_errors(bad))


def test_two_proxyd_instances_share_postgres_and_redis() -> None:
    """Two proxyd services, both on the compose PostgreSQL and Redis, each with its own state."""
    svcs = services()
    instances = proxyd_services()
    assert len(instances) == 2
    for name, svc in instances.items():
        env = compose_env(svc)
        assert urlsplit(env["PROXYD_DATABASE_URL"]).scheme == "postgresql"
        assert urlsplit(env["PROXYD_DATABASE_URL"]).hostname == "postgres"
        assert urlsplit(env["PROXYD_REDIS_URL"]).hostname == "redis"
        assert svcs["postgres"]["image"].startswith("postgres:")
        assert svcs["redis"]["image"].startswith("redis:")
        pg = compose_env(svcs["postgres"])
        assert urlsplit(env["PROXYD_DATABASE_URL"]).username == pg["POSTGRES_USER"], name
        assert urlsplit(env["PROXYD_DATABASE_URL"]).password == pg["POSTGRES_PASSWORD"], name
        assert urlsplit(env["PROXYD_DATABASE_URL"]).path == "/" + pg["POSTGRES_DB"], name
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert any(v.endswith(":/var/lib/proxyd") for v in svc["volumes"]), f"{name}: no state"
        loaded = load_config(config_path(svc), env)
        assert loaded.billing.database_url == env["PROXYD_DATABASE_URL"]
        assert loaded.redis.url == env["PROXYD_REDIS_URL"]
        assert loaded.billing.spool_dir.startswith("/var/lib/proxyd/")


def test_redis_fallback_shares_limits_between_the_instances() -> None:
    """While Redis is away the instances split each key's limits: fallback_instances = 2."""
    for svc in proxyd_services().values():
        loaded = load_config(config_path(svc), compose_env(svc))
        assert loaded.redis.fallback_instances == len(proxyd_services())


def test_instances_drain_within_the_stop_grace_period() -> None:
    """docker stop waits longer than proxyd's shutdown grace, so streams finish and rows flush."""
    for svc in proxyd_services().values():
        grace = shutdown_grace(config_path(svc))
        stop = svc["stop_grace_period"]
        assert stop.endswith("s")
        assert float(stop[:-1]) >= grace + 10


def test_the_load_balancer_reaches_both_instances_on_proxyds_port() -> None:
    """nginx's upstream lists exactly the two instances at the port each proxyd listens on."""
    conf = NGINX.read_text()
    servers = set(re.findall(r"^\s*server\s+([\w.-]+):(\d+)", conf, re.MULTILINE))
    expected = {
        (name, str(listen_ports(config_path(svc), compose_env(svc))["client"]))
        for name, svc in proxyd_services().items()
    }
    assert servers == expected
    lb = services()["lb"]
    assert "./compose/nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    listen = re.search(r"^\s*listen\s+(\d+);", conf, re.MULTILINE)
    assert listen
    assert any(p.endswith(f":{listen[1]}:{listen[1]}") for p in lb["ports"])
    for directive in ("proxy_buffering off;", "proxy_request_buffering off;"):
        assert directive in conf, f"streams would be buffered without {directive}"


def test_nginx_closes_idle_upstream_connections_before_proxyd_does() -> None:
    """nginx's upstream keepalive_timeout is below proxyd's idle timeout: no dying connections."""
    found = re.search(r"^\s*keepalive_timeout\s+(\d+)s;", NGINX.read_text(), re.MULTILINE)
    assert found, "upstream keepalive_timeout not set (nginx's default is 60 s)"
    for svc in proxyd_services().values():
        idle = load_config(config_path(svc), compose_env(svc)).server.idle_timeout_seconds
        assert int(found[1]) < idle


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    """`nginx -t` accepts compose/nginx.conf (instance hosts pointed at loopback to resolve)."""
    nginx = tool("nginx", "install Debian's nginx-light (scripts/test-tools.sh does)")
    conf = NGINX.read_text()
    for name in proxyd_services():
        conf = conf.replace(f"{name}:", "127.0.0.1:")
    conf = conf.replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;")
    (tmp_path / "nginx.conf").write_text(conf)
    conf_file = str(tmp_path / "nginx.conf")
    result = run(nginx, "-t", "-p", str(tmp_path), "-c", conf_file, "-e", "stderr")
    assert result.returncode == 0, result.stderr


def test_proxyd_config_passes_check_config() -> None:
    """`proxyd check-config` accepts compose/proxyd.toml, state included."""
    result = run(sys.executable, "-m", "proxyd", "check-config", str(PROXYD_TOML))
    assert result.returncode == 0, result.stderr


def test_channels_point_at_the_mock_provider() -> None:
    """Every channel of the compose config calls the mock service at the port it listens on."""
    mock = services()["mock"]
    assert mock["entrypoint"] == ["python", "-m", "proxyd.mockprovider"]
    assert flags_in(mock["command"]) <= cli_flags("proxyd.mockprovider")
    port = mock["command"][mock["command"].index("--port") + 1]
    assert mock["command"][mock["command"].index("--host") + 1] == "0.0.0.0"
    channels = load_config(PROXYD_TOML, {}).state.channels
    assert channels is not None
    assert channels.channels
    for channel in channels.channels:
        url = urlsplit(channel.base_url)
        assert (url.hostname, str(url.port)) == ("mock", port), channel.id
    for svc in proxyd_services().values():
        assert "mock" in svc["depends_on"]


def test_prometheus_scrapes_both_instances(tmp_path: Path) -> None:
    """Job `proxyd` scrapes each instance's /metrics; promtool accepts the config with the rules."""
    prom = services()["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prom["volumes"] if v.startswith("./"))
    assert mounts["./compose/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    config = yaml.safe_load((FILES / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "proxyd"  # the alert rules select job="proxyd"
    assert job["metrics_path"] in routes()
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    expected = {
        f"{name}:{listen_ports(config_path(svc), compose_env(svc))['client']}"
        for name, svc in proxyd_services().items()
    }
    assert targets == expected
    # promtool resolves rule files beside the config, as they are mounted in the container.
    shutil.copy(FILES / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    promtool = tool("promtool", "install Debian's prometheus package (scripts/test-tools.sh)")
    result = run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisions_the_dashboard() -> None:
    """Grafana mounts the provisioning files and deploy/grafana/, where the provider looks."""
    grafana = services()["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    for source in mounts:
        assert (DEPLOY / source).exists(), source
    providers = yaml.safe_load((FILES / "grafana" / "dashboards.yml").read_text())["providers"]
    assert mounts["./grafana"] == providers[0]["options"]["path"]
    boards = list((DEPLOY / "grafana").glob("*.json"))
    assert boards
    for board in boards:
        # Provisioning fills no import inputs: data sources come from the datasource variable.
        assert not json.loads(board.read_text()).get("__inputs"), board.name
        assert "${DS_" not in board.read_text(), board.name
    sources = yaml.safe_load((FILES / "grafana" / "datasources.yml").read_text())["datasources"]
    (prometheus,) = sources
    assert prometheus["isDefault"] is True  # the dashboard's datasource variable picks it
    url = urlsplit(prometheus["url"])
    assert url.hostname == "prometheus"
    assert any(p.endswith(f":{url.port}") for p in services()["prometheus"]["ports"])
    home = compose_env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(mounts["./grafana"] + "/")
    assert (DEPLOY / "grafana" / Path(home).name).exists()


def test_compose_names_only_what_proxyd_has() -> None:
    """Env vars, ports and metric names in the compose files are the ones proxyd defines."""
    texts = [COMPOSE.read_text()] + [p.read_text() for p in FILES.rglob("*") if p.is_file()]
    for text in texts:
        assert env_vars_in(text) <= env_vars()
        assert metrics_in(text) <= metric_names()
    for name, svc in proxyd_services().items():
        env = compose_env(svc)
        ports = listen_ports(config_path(svc), env)
        assert env_vars_in(" ".join(env)) <= env_vars()
        for published in svc.get("ports", []):
            inside = int(published.rsplit(":", 1)[1])
            assert inside in ports.values(), f"{name} publishes {inside}, which proxyd never binds"
    for bind in (v.split(":")[0] for s in services().values() for v in s.get("volumes", [])):
        if bind.startswith("."):
            assert (DEPLOY / bind).exists(), bind
