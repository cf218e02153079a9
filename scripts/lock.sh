#!/usr/bin/env bash
# Refresh constraints.txt, the lock file: resolve pyproject.toml's dependencies with every extra
# (dev, bench) afresh in a throwaway virtualenv, at the newest versions the ranges allow, and
# write the exact versions. `make install`, `make bench` and deploy/Dockerfile install with it.
# Run it (`make lock`) after changing a dependency in pyproject.toml, then `make install` and
# `make lint test`, and commit constraints.txt with the change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp" build' EXIT   # build/: setuptools' leftovers of the non-editable install
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet --upgrade pip setuptools wheel
"$tmp/venv/bin/pip" install --quiet '.[dev,bench]'
{
    echo "# The lock file: exact versions of every dependency of proxyd, its dev and bench extras,"
    echo "# and pip/setuptools/wheel, as resolved by scripts/lock.sh (\`make lock\`) on CPython 3.11."
    echo "# Used as a pip constraints file (-c) by \`make install\`, \`make bench\` and deploy/Dockerfile."
    "$tmp/venv/bin/pip" freeze --all --exclude proxyd
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pinned packages"
