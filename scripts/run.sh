#!/usr/bin/env bash
# The README's run command: creates .venv and installs the proxy the first time (and again only
# when pyproject.toml changed), then starts it (embedded SQLite default). Once installed it starts
# offline: no network, no pip.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.installed-pyproject
if [ ! -x .venv/bin/llm-cost-proxy ] || [ ! -f "$stamp" ] || ! cmp -s pyproject.toml "$stamp"; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e .
  cp pyproject.toml "$stamp"
fi
exec .venv/bin/llm-cost-proxy serve "$@"
