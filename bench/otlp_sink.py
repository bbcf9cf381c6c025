"""A local OTLP/HTTP trace sink for the tracing bench: answers every `POST /v1/traces` with 200
and counts requests and bytes (it does not decode; the receiver's cost is not the proxy's).

Run:  .venv/bin/python bench/otlp_sink.py [--port 4318]
then start the proxy with OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 and alternate bench
runs against a proxy without it. Ctrl-C prints the totals.
"""

from __future__ import annotations

import argparse

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    totals = {"requests": 0, "bytes": 0}

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        totals["requests"] += 1
        totals["bytes"] += len(body)
        return web.Response(content_type="application/x-protobuf")

    async def report(_app: web.Application) -> None:
        print(f"otlp sink: {totals['requests']} export requests, {totals['bytes']} bytes")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.on_cleanup.append(report)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
