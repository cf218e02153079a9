"""Debian packages the benchmark rig runs (nginx, wrk), installed only when a caller asks."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence


def install(packages: Sequence[str], find: Callable[[], str | None]) -> str | None:
    """What `find` finds, after `apt-get install` of the first of `packages` that installs when
    it finds nothing (and apt-get exists); None when still missing."""
    found = find()
    if found or shutil.which("apt-get") is None:
        return found
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(["apt-get", "update", "-q"], check=False, env=env, capture_output=True)
    for package in packages:
        done = subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
            check=False,
            env=env,
            capture_output=True,
        )
        if done.returncode == 0 and find():
            break
    return find()
