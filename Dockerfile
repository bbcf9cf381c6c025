# llm-cost-proxy: `docker build -t llm-cost-proxy .` then
#   docker run -v llm-costs:/data -p 127.0.0.1:8080:8080 -e PROXY_API_KEYS=... -e OPENAI_API_KEY=... llm-cost-proxy
# (or `docker compose up -d` for PostgreSQL, Prometheus and Grafana around it).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY costing ./costing
COPY tracing ./tracing
COPY migrations ./migrations
RUN pip install . \
    && rm -rf /src/build \
    && useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin app \
    && mkdir -p /data/llm-costs-spool \
    && chown -R app:app /data

# The state of a proxy without PostgreSQL lives in the volume /data: the embedded SQLite ledger
# and the local spool of records not yet committed.
WORKDIR /data
USER app
VOLUME ["/data"]

ENV PROXY_HOST=0.0.0.0 \
    PROXY_PORT=8080 \
    DATABASE_URL=sqlite+aiosqlite:////data/llm-costs.db \
    LEDGER_SPOOL_DIR=/data/llm-costs-spool
EXPOSE 8080

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${PROXY_PORT:-8080}/healthz', timeout=3)" || exit 1

CMD ["llm-cost-proxy", "serve"]
