# llm-cost-proxy: `docker build -t llm-cost-proxy .` then `docker run -p 8080:8080 llm-cost-proxy`
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
    && mkdir -p /data \
    && chown app:app /data

# Without DATABASE_URL the embedded SQLite file lands in /data (the working directory).
WORKDIR /data
USER app

ENV PROXY_HOST=0.0.0.0 \
    PROXY_PORT=8080
EXPOSE 8080

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${PROXY_PORT:-8080}/healthz', timeout=3)" || exit 1

CMD ["llm-cost-proxy", "serve"]
