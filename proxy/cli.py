"""The `llm-cost-proxy` command: `serve` (default, `--workers N` for N processes), `migrate`,
and `prices MODEL [--tier T]`.

A start that fails says why in one line on stderr, naming the variable or the cause, and exits
non-zero; the traceback only with LOG_LEVEL=DEBUG.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import socket
import sqlite3
import ssl
import sys
import traceback
from decimal import Decimal
from typing import NoReturn

from aiohttp import web
from pydantic import ValidationError

from costing import schema
from costing.db import causes, describe_cause, is_transient, wait_until_reachable
from costing.errors import DatabaseUnavailable
from costing.images import image_tokens
from costing.pricing import PriceTable, PriceTableError, library_version, service_tier_key
from costing.settings import Settings, describe_error
from costing.spool import SpoolUnavailable
from proxy.peers import WorkerSlot

log = logging.getLogger("llm_cost_proxy")


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        print(describe_error(exc), file=sys.stderr)
        raise SystemExit(2) from None


def tune_gc() -> None:
    """Keep the cycle collector off the request path.

    Each request allocates many short-lived objects and almost no cycles, so the default
    young-generation threshold (700) runs collections thousands of times a second, and each
    older-generation pass rescans the start-up heap (SQLAlchemy, pydantic, aiohttp). Freezing
    that heap and collecting the young generation less often cut CPU per request by ~15% in
    the bench; cyclic garbage is still collected, only in larger batches.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 100)


def startup_error_line(exc: BaseException, settings: Settings) -> str:
    """The one place a start-up failure becomes one line naming the variable or the cause."""
    from proxy.app import SchemaNotCurrent

    def first_line(value: object) -> str:
        lines = str(value).strip().splitlines()
        return lines[0] if lines else type(value).__name__

    # A PriceTableError of the price table's load names PRICES_FILE itself.
    if isinstance(exc, (DatabaseUnavailable, SchemaNotCurrent, SpoolUnavailable, PriceTableError)):
        return first_line(exc)
    where = f"{settings.proxy_host}:{settings.proxy_port}"
    if isinstance(exc, socket.gaierror):
        return f"PROXY_HOST: cannot resolve {settings.proxy_host!r} ({exc.strerror})"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"PROXY_PORT: {where} is already in use by another process; choose another PROXY_PORT"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL:
        return f"PROXY_HOST: {settings.proxy_host} is not an address of this machine"
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno == errno.EACCES):
        return f"PROXY_PORT: no permission to listen on {where} (ports below 1024 need privileges)"
    database = _database_problem(exc, settings)
    if database is not None:
        return database
    return f"{type(exc).__name__}: {first_line(exc)}"


def _database_problem(exc: BaseException, settings: Settings) -> str | None:
    """A line for a database failure at start, or None when `exc` is not one."""
    chain = causes(exc, limit=20)
    names = {type(e).__name__ for e in chain}
    target = settings.database
    if target.is_sqlite:
        if any(isinstance(e, sqlite3.Error) for e in chain):
            return f"DATABASE_URL: the SQLite database cannot be used: {describe_cause(exc)}"
        return None
    if "InvalidCatalogNameError" in names:
        return f"DATABASE_URL: the database does not exist ({describe_cause(exc)})"
    if names & {"InvalidPasswordError", "InvalidAuthorizationSpecificationError"}:
        return f"DATABASE_URL: the server refused the user or password ({describe_cause(exc)})"
    if any(isinstance(e, ssl.SSLError | ssl.CertificateError) for e in chain):
        return (f"DATABASE_URL: TLS with the database failed (check sslmode, sslrootcert): "
                f"{describe_cause(exc)}")
    if is_transient(exc) or any(isinstance(e, OSError) for e in chain):
        return (f"DATABASE_URL: the database is unreachable after "
                f"{settings.database_connect_timeout_seconds:g} s "
                f"(DATABASE_CONNECT_TIMEOUT_SECONDS): {describe_cause(exc)}")
    if any(type(e).__module__.startswith(("sqlalchemy", "asyncpg")) for e in chain):
        return f"DATABASE_URL: {describe_cause(exc)}"
    return None


def fail(exc: BaseException, settings: Settings) -> NoReturn:
    """Exit 2 when a setting or a step of the operator's is what to fix (PRICES_FILE,
    LEDGER_SPOOL_DIR, `migrate` with AUTO_MIGRATE=false), as for bad settings: a supervisor
    does not restart a worker for those. 1 for the rest (a database, a port)."""
    from proxy.app import SchemaNotCurrent

    if settings.log_level == "DEBUG":
        traceback.print_exception(exc, file=sys.stderr)
    print(f"llm-cost-proxy: {startup_error_line(exc, settings)}", file=sys.stderr)
    operator = isinstance(exc, PriceTableError | SpoolUnavailable | SchemaNotCurrent)
    raise SystemExit(2 if operator else 1) from None


def serve(settings: Settings) -> None:
    from proxy.keys import open_proxy_refusal

    refusal = open_proxy_refusal(settings)
    if refusal is not None:
        print(f"llm-cost-proxy: {refusal}", file=sys.stderr)
        raise SystemExit(2)
    if settings.upstream_base != settings.upstream_base_url:
        log.warning("UPSTREAM_BASE_URL ends in /v1, which the proxy adds itself: forwarding to %s/v1/...",
                    settings.upstream_base)
    if settings.workers > 1:
        serve_workers(settings)
        return
    try:
        _install_uvloop()
        _run(settings, None)
    except Exception as exc:
        fail(exc, settings)


def _install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


def _run(settings: Settings, worker: WorkerSlot | None) -> None:
    """One process serving the port: the whole proxy, or one of N workers (SO_REUSEPORT)."""
    from proxy.app import create_app, server_options

    app = create_app(settings, worker=worker)
    tune_gc()
    web.run_app(app, host=settings.proxy_host, port=settings.proxy_port, reuse_port=worker is not None,
                **server_options(settings),
                print=worker.ready if worker is not None else lambda _: log.info(
                    "serving on http://%s:%s, forwarding to %s", settings.proxy_host,
                    settings.proxy_port, settings.upstream_base))


def _run_worker(settings: Settings, worker: WorkerSlot) -> None:
    _install_uvloop()
    try:
        _run(settings, worker)
    except Exception as exc:
        fail(exc, settings)


def prepare_workers(settings: Settings) -> None:
    """What one process checks before it serves, done once before `--workers` fork (in a child
    of the supervisor): the spool directory usable, PRICES_FILE valid, the database reachable
    (waited for as one process waits) with its schema at head. A failure is `fail`'s one line
    and exit status, as for one process, instead of one line per worker."""
    from proxy.app import load_prices, open_database, open_spool

    async def database() -> None:
        engine = await open_database(settings)
        await engine.dispose()

    try:
        spool = open_spool(settings)
        if spool is not None:
            spool.close()  # nothing was written: its directory goes too
        _install_uvloop()  # the loop one process runs: the driver's words are the same
        asyncio.run(database())
        load_prices(settings)
    except Exception as exc:
        fail(exc, settings)


def serve_workers(settings: Settings) -> None:
    from proxy.workers import Supervisor, check_port

    try:
        check_port(settings)
    except OSError as exc:
        print(f"llm-cost-proxy: cannot listen on {settings.proxy_host}:{settings.proxy_port}: "
              f"{exc.strerror} (PROXY_HOST / PROXY_PORT)", file=sys.stderr)
        raise SystemExit(2) from None
    status = Supervisor(settings, settings.workers, _run_worker, prepare_workers).run()
    if status:
        raise SystemExit(status)


def _workers(value: str) -> str:
    """`--workers`: a count of processes or `auto` (one per core)."""
    if value.strip() != "auto" and not (value.strip().isdigit() and 1 <= int(value) <= 999):
        raise argparse.ArgumentTypeError("a number from 1 to 999, or auto")
    return value.strip()


def migrate(settings: Settings) -> None:
    async def run() -> None:
        await wait_until_reachable(settings.database, settings.database_connect_timeout_seconds)
        await schema.upgrade(settings)

    try:
        asyncio.run(run())
    except Exception as exc:
        fail(exc, settings)
    print(f"database at revision {schema.head_revision(settings)}")


def describe_price(table: PriceTable, model: str, tier: str | None) -> str:
    """What `prices` prints: each billed dimension of the price the proxy would use, and where
    each figure came from."""
    quote, origin = table.explain(model, tier)
    price = quote.price
    lines = [f"model: {model}" + (f" (priced as {quote.model})" if quote.model and quote.model != model
                                  else ""),
             f"service tier: {service_tier_key(tier) or 'standard'}"
             + (f" (asked: {tier})" if tier and service_tier_key(tier) != tier else "")]
    if quote.priced_by_default:
        lines.append("unknown model: priced by default (OPENAI_PRICE_PER_1K_PROMPT_TOKENS / "
                     "OPENAI_PRICE_PER_1K_COMPLETION_TOKENS), counted as priced_by_default")

    def row(label: str, key: str, amount: Decimal | None, unit: str, fallback: str = "") -> None:
        if amount is None:
            lines.append(f"  {label:<14} {fallback}")
        else:
            lines.append(f"  {label:<14} ${amount.normalize():f} {unit:<14} {origin.get(key, 'default')}")

    row("input", "input", price.input, "per 1M tokens")
    row("cached input", "cached_input", price.cached_input, "per 1M tokens")
    row("cache writes", "cache_write_input", price.cache_write_input, "per 1M tokens",
        "billed as input")
    row("output", "output", price.output, "per 1M tokens")
    lines.append("  reasoning      billed as output")
    row("audio input", "audio_input", price.audio_input, "per 1M tokens", "billed as input")
    row("cached audio", "cached_audio_input", price.cached_audio_input, "per 1M tokens",
        "billed as cached input")
    row("audio output", "audio_output", price.audio_output, "per 1M tokens", "billed as output")
    row("web search", "web_search", price.web_search, "per 1k calls")
    if price.preview is not None:
        row("search preview", "web_search_preview", price.preview.web_search, "per 1k calls")
    if price.search_every_call:
        lines.append("  (every call is billed one web search)")
    for above, band in price.long_context:
        writes = (f", cache writes ${band.cache_write_input.normalize():f}"
                  if band.cache_write_input is not None else "")
        lines.append(f"  prompts above {above} input tokens: input ${band.input.normalize():f}, cached "
                     f"${band.cached_input.normalize():f}{writes}, output ${band.output.normalize():f} "
                     "per 1M")
    if quote.max_output_tokens is not None:
        lines.append(f"largest answer: {quote.max_output_tokens} output tokens (reserved when a request "
                     "sets no output cap)")
    else:
        lines.append("largest answer: unknown (BUDGET_DEFAULT_MAX_OUTPUT_TOKENS is reserved when a "
                     "request sets no output cap)")
    lines.append(f"context window: {quote.context_window} tokens (reserved as input for earlier "
                 "context of unknown size)")
    image = image_tokens(model)
    lines.append(f"image: up to {image.high} input tokens each ({image.low} at detail low), as reserved")
    lines.append(f"data: genai-prices {library_version()}, costing/price_overrides.json"
                 + (f", PRICES_FILE {table.user_label.removeprefix('PRICES_FILE ')}"
                    if table.user.models or table.user.max_output_tokens or table.user.context_window
                    else ""))
    return "\n".join(lines)


def prices(settings: Settings, model: str, tier: str | None) -> None:
    try:
        table = PriceTable.load(default_per_1k_prompt=settings.openai_price_per_1k_prompt_tokens,
                                default_per_1k_completion=settings.openai_price_per_1k_completion_tokens,
                                prices_file=settings.prices_file)
    except PriceTableError as exc:
        print(f"llm-cost-proxy: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(describe_price(table, model, tier))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llm-cost-proxy", description=__doc__)
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "migrate", "prices"))
    parser.add_argument("model", nargs="?", help="prices: the model name, as a request would send it")
    parser.add_argument("--tier", help="prices: the service tier (flex, priority, batch; default: standard)")
    parser.add_argument("--workers", type=_workers, default=None, metavar="N",
                        help="serve: processes on one port, or `auto` for one per core "
                             "(default PROXY_WORKERS, else 1)")
    args = parser.parse_args(argv)
    if args.command == "prices" and not args.model:
        parser.error("prices needs a MODEL, e.g. llm-cost-proxy prices gpt-4o-mini --tier flex")
    settings = load_settings()
    if args.command == "prices":
        prices(settings, args.model, args.tier)
        return
    if args.workers is not None:
        settings = settings.model_copy(update={"proxy_workers": args.workers})
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if args.command == "migrate":
        migrate(settings)
    else:
        serve(settings)


if __name__ == "__main__":
    main()
