#!/usr/bin/env bash
# Install the system tools the tests use when they are missing: Debian's prometheus package
# (the prometheus server and promtool) for the metrics, dashboard and alert-rule tests.
set -euo pipefail

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    echo "installing Debian's prometheus package (promtool, prometheus)" >&2
    export DEBIAN_FRONTEND=noninteractive
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
