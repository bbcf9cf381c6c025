"""The `llm-cost-proxy` command: `serve` (default) and `migrate`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from aiohttp import web
from pydantic import ValidationError

from costing import schema
from costing.pricing import PriceTableError
from costing.settings import Settings, describe_error


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        print(describe_error(exc), file=sys.stderr)
        raise SystemExit(2) from None


def serve(settings: Settings) -> None:
    from proxy.app import SchemaNotCurrent, create_app

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        app = create_app(settings)
        web.run_app(app, host=settings.proxy_host, port=settings.proxy_port, access_log=None,
                    shutdown_timeout=settings.shutdown_timeout_seconds,
                    print=lambda _: logging.getLogger("llm_cost_proxy").info(
                        "serving on http://%s:%s, forwarding to %s", settings.proxy_host,
                        settings.proxy_port, settings.upstream_base_url))
    except (SchemaNotCurrent, PriceTableError) as exc:
        print(f"llm-cost-proxy: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def migrate(settings: Settings) -> None:
    asyncio.run(schema.upgrade(settings))
    print(f"database at revision {schema.head_revision(settings)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llm-cost-proxy", description=__doc__)
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "migrate"))
    args = parser.parse_args(argv)
    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if args.command == "migrate":
        migrate(settings)
    else:
        serve(settings)


if __name__ == "__main__":
    main()
