#!/usr/bin/env bash
# The README's run command: creates .venv, installs the proxy, starts it (embedded SQLite default).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e .
exec .venv/bin/llm-cost-proxy serve "$@"
