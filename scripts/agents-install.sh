#!/usr/bin/env bash
# Installs the pinned coding-agent CLIs the agent tests drive (tests/test_agents_cli.py), each
# into its own folder under ~/.cache/proxyd-agents/<name>@<version>, outside the repository.
# Move a pin by editing the versions below (or set CLAUDE_CODE_VERSION / CODEX_VERSION).
# Without node/npm it says so and exits 0: the tests then skip with that message.
set -euo pipefail

CLAUDE_CODE_VERSION="${CLAUDE_CODE_VERSION:-2.1.332}"
CODEX_VERSION="${CODEX_VERSION:-0.171.0}"
CACHE="${PROXYD_AGENTS_CACHE:-$HOME/.cache/proxyd-agents}"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "agents-install: node/npm not found; the real-CLI tests will be skipped" >&2
  exit 0
fi

install() {  # install <package> <version> <folder name>
  local dir="$CACHE/$3@$2"
  if [ -f "$dir/.installed" ]; then return 0; fi
  mkdir -p "$dir"
  npm install --silent --no-audit --no-fund --prefix "$dir" "$1@$2" >&2
  touch "$dir/.installed"
}

install @anthropic-ai/claude-code "$CLAUDE_CODE_VERSION" claude-code
install @openai/codex "$CODEX_VERSION" codex
