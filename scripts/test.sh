#!/usr/bin/env bash
# The README's test command: creates .venv, installs with test extras, makes sure a PostgreSQL is
# there (the local server, started if installed but down; else the tests start a throwaway cluster
# with initdb/pg_ctl), installs Prometheus's promtool/server if apt can, then runs lint, types and
# the whole suite on SQLite and PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[test]"

# --- tracing (#18): a real Arize Phoenix for tests/tracing/test_phoenix.py, in its own venv ---
# Kept across runs (~45 s to install). Only a venv this block made is ever removed (an install
# cut short leaves `.installing` and is redone); a PHOENIX_VENV of your own is used as it is.
export PHOENIX_VENV="${PHOENIX_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-cost-proxy/phoenix-venv}"
if [ ! -f "$PHOENIX_VENV/.installed" ] && { [ ! -e "$PHOENIX_VENV" ] || [ -f "$PHOENIX_VENV/.installing" ]; }; then
  rm -rf "$PHOENIX_VENV"
  mkdir -p "$(dirname "$PHOENIX_VENV")"
  python3 -m venv "$PHOENIX_VENV" && touch "$PHOENIX_VENV/.installing"
  if "$PHOENIX_VENV/bin/pip" install -q "arize-phoenix==20.26.1"; then
    mv "$PHOENIX_VENV/.installing" "$PHOENIX_VENV/.installed"
  else
    echo "note: could not install arize-phoenix into $PHOENIX_VENV"
  fi
fi
# --- end tracing ---

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  command -v prometheus >/dev/null || missing+=(prometheus)
  command -v openssl >/dev/null || missing+=(openssl)  # the TLS database tests' certificates
  command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  if [ ${#missing[@]} -gt 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null \
      || echo "note: could not apt-get install ${missing[*]}"
  fi
fi
# --- Live costs (#20): the cost page's browser tests drive Debian's Chromium with Playwright
# (the pip package, from the test extras; it never downloads a browser of its own here).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
    || echo "note: could not apt-get install chromium (the cost page's browser tests will skip, or fail in CI)"
fi
# --- end Live costs

if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ] && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi

.venv/bin/ruff check proxy costing tracing migrations tests bench
.venv/bin/mypy
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
