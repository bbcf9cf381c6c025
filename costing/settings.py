"""Configuration: one immutable Settings object built once at start from the environment and `.env`.

Everything configurable lives here; no other module reads `os.environ`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from costing.money import MAX_USD

TAG_HEADER_PATTERN = r"^[A-Za-z][A-Za-z0-9-]{0,63}$"
TAG_VALUE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


@dataclass(frozen=True)
class DatabaseTarget:
    """A SQLAlchemy async URL, the PostgreSQL schema the app asked for (Prisma's `?schema=`) and
    the libpq/Prisma connection parameters `costing.db` turns into asyncpg arguments."""

    url: str
    schema: str | None = None
    sslmode: str | None = None
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    sslpassword: str | None = None
    application_name: str | None = None
    connect_timeout: float | None = None
    pgbouncer: bool = False
    statement_cache_size: int | None = None
    pool_size: int | None = None
    pool_timeout: float | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file, None for an in-memory or URI database."""
        if not self.is_sqlite:
            return None
        path = self.url.split(":///", 1)[1].split("?", 1)[0] if ":///" in self.url else ""
        if not path or path == ":memory:" or path.startswith("file:"):
            return None
        return Path(path)


SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# libpq/Prisma query parameters and what becomes of them (see the README, "Database URLs").
_TEXT_PARAMETERS = ("sslrootcert", "sslcert", "sslkey", "sslpassword", "application_name")
_IGNORED_PARAMETERS = ("socket_timeout", "sslaccept")  # Prisma-only, no asyncpg equivalent
_PASSED_PARAMETERS = ("host", "port", "prepared_statement_cache_size", "command_timeout")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _number(name: str, value: str, kind: type[int] | type[float], minimum: float) -> Any:
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"parameter {name}={value!r} is not a number") from None
    if number < minimum:
        raise ValueError(f"parameter {name}={value!r} must be at least {minimum}")
    return number


def _postgresql_target(netloc: str, path: str, query: list[tuple[str, str]]) -> DatabaseTarget:
    fields: dict[str, Any] = {}
    passed: list[tuple[str, str]] = []
    for name, value in query:
        if name == "schema":
            fields["schema"] = value or None
        elif name in ("sslmode", "ssl"):  # `ssl` is SQLAlchemy's spelling for asyncpg
            mode = {"true": "require", "false": "disable"}.get(value.lower(), value.lower())
            if mode not in SSL_MODES:
                raise ValueError(f"parameter {name}={value!r}: use one of {', '.join(SSL_MODES)}")
            fields["sslmode"] = mode
        elif name in _TEXT_PARAMETERS:
            fields[name] = value or None
        elif name == "connect_timeout":
            seconds = _number(name, value, float, 0)
            fields[name] = seconds or None  # libpq: 0 means wait forever
        elif name == "pgbouncer":
            if value.lower() not in _BOOLEANS:
                raise ValueError(f"parameter pgbouncer={value!r}: use true or false")
            fields[name] = _BOOLEANS[value.lower()]
        elif name == "statement_cache_size":
            fields[name] = _number(name, value, int, 0)
        elif name == "connection_limit":
            fields["pool_size"] = _number(name, value, int, 1)
        elif name == "pool_timeout":
            fields[name] = _number(name, value, float, 0) or None
        elif name in _PASSED_PARAMETERS:
            passed.append((name, value))
        elif name not in _IGNORED_PARAMETERS:
            raise ValueError(f"unknown parameter {name!r} (see the README, \"Database URLs\", for "
                             "those the proxy understands)")
    if fields.get("pgbouncer"):
        passed.append(("prepared_statement_cache_size", "0"))
    url = urlunsplit(("postgresql+asyncpg", netloc, path, urlencode(passed), ""))
    return DatabaseTarget(url, **fields)


def parse_fsync(value: str) -> float | None:
    """LEDGER_SPOOL_FSYNC as seconds between syncs: None never, 0 always."""
    text = value.strip().lower()
    if text == "never":
        return None
    if text == "always":
        return 0.0
    seconds = float(text)
    if not 0 < seconds < float("inf"):  # NaN too
        raise ValueError("must be never, always or a number of seconds above 0")
    return seconds


def parse_database_url(raw: str) -> DatabaseTarget:
    """Accept SQLAlchemy URLs and the libpq/Prisma URLs of hosted PostgreSQL services as they are:
    the driver, `schema` and the connection parameters are mapped, unknown parameters refused."""
    raw = raw.strip()
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        query = parse_qsl(parts.query, keep_blank_values=True)
        if not parts.hostname and not parts.path.strip("/") and not any(k == "host" for k, _ in query):
            raise ValueError("a PostgreSQL URL needs a host and a database name")
        return _postgresql_target(parts.netloc, parts.path, query)
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return DatabaseTarget("sqlite+aiosqlite:" + raw.split(":", 1)[1])
    raise ValueError(
        "use postgresql://user:pw@host:5432/db (Prisma style accepted) or sqlite+aiosqlite:///./file.db"
    )


class Settings(BaseSettings):
    """All settings; environment variable names are the field names in upper case."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True,
        case_sensitive=False,
    )

    database_url: str = "sqlite+aiosqlite:///./llm-costs.db"
    upstream_base_url: str = "https://api.openai.com"
    openai_api_key: SecretStr | None = None
    proxy_host: str = "127.0.0.1"
    proxy_port: int = Field(8080, ge=0, le=65535)

    openai_price_per_1k_prompt_tokens: Decimal = Field(Decimal("0.00015"), ge=0, lt=MAX_USD)
    openai_price_per_1k_completion_tokens: Decimal = Field(Decimal("0.0006"), ge=0, lt=MAX_USD)
    prices_file: Path | None = None

    cost_warning_threshold_usd: Decimal = Field(Decimal("1.00"), ge=0, lt=MAX_USD)
    cost_limit_threshold_usd: Decimal = Field(Decimal("5.00"), ge=0, lt=MAX_USD)
    budget_default_max_output_tokens: int = Field(4096, ge=0)
    budget_fail_closed: bool = False
    budget_lease_seconds: float = Field(30.0, gt=0)
    budget_lease_fraction: Decimal = Field(Decimal("0.05"), gt=0, le=1)
    background_hold_seconds: float = Field(1800.0, gt=0)

    campaign_header: str = Field("X-Campaign-Id", pattern=TAG_HEADER_PATTERN)
    session_header: str = Field("X-Session-Id", pattern=TAG_HEADER_PATTERN)
    costs_api_token: SecretStr | None = None

    auto_migrate: bool = True
    ledger_flush_interval_seconds: float = Field(0.2, gt=0, le=60)
    ledger_batch_size: int = Field(1000, ge=1)
    ledger_buffer_max_records: int = Field(100_000, ge=100)
    # Durability (#19, costing/spool.py): every record is appended here before its answer's last
    # byte, and replayed at start. Empty: no spool (a kill -9 loses up to one flush interval).
    ledger_spool_dir: Path | None = Path("./llm-costs-spool")
    # never (survives the process, not the machine), always (fdatasync per record) or seconds.
    ledger_spool_fsync: str = "never"

    # Live costs (/costs/events and the cost page at /)
    live_max_subscribers: int = Field(500, ge=1)
    live_queue_events: int = Field(1000, ge=1)
    live_buffer_events: int = Field(10_000, ge=1)
    live_heartbeat_seconds: float = Field(10.0, gt=0, le=15)
    live_poll_interval_seconds: float = Field(1.0, gt=0, le=60)
    live_poll_lag_seconds: float = Field(10.0, gt=0, le=3600)

    upstream_connect_timeout_seconds: float = Field(10.0, gt=0)
    upstream_read_timeout_seconds: float = Field(600.0, gt=0)
    max_request_body_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    metrics_max_campaigns: int = Field(1000, ge=1)
    shutdown_timeout_seconds: float = Field(30.0, ge=0)
    log_level: str = "INFO"

    # Client keys and exposed deployments (#17).
    proxy_api_keys: SecretStr | None = None
    allow_open_proxy: bool = False
    metrics_token: SecretStr | None = None
    database_connect_timeout_seconds: float = Field(30.0, ge=0)
    # Browsers and local pages (proxy/browsers.py): origins whose pages may call the proxy
    # (`scheme://host[:port]`, comma-separated, `*` any), and names clients may reach it by
    # (besides localhost and IP addresses; `.example.com` for a domain and its subdomains, `*` any).
    proxy_allowed_origins: str = ""
    proxy_allowed_hosts: str = ""

    # Tracing (standard OTEL_* variables, their standard meanings; see tracing/ and the README)
    otel_sdk_disabled: bool = False
    otel_traces_exporter: str = "otlp"
    otel_service_name: str = "llm-cost-proxy"
    otel_resource_attributes: str = ""
    otel_exporter_otlp_endpoint: str | None = None
    otel_exporter_otlp_traces_endpoint: str | None = None
    otel_exporter_otlp_headers: SecretStr | None = None
    otel_exporter_otlp_traces_headers: SecretStr | None = None
    otel_exporter_otlp_timeout: int | None = Field(None, gt=0)  # milliseconds, 10000 when unset
    otel_exporter_otlp_traces_timeout: int | None = Field(None, gt=0)
    otel_exporter_otlp_compression: str | None = None  # gzip when unset, or none
    otel_exporter_otlp_traces_compression: str | None = None
    otel_exporter_otlp_protocol: str | None = None  # http/protobuf (the only one served)
    otel_exporter_otlp_traces_protocol: str | None = None
    otel_traces_sampler: str = "parentbased_always_on"
    otel_traces_sampler_arg: str | None = None
    otel_bsp_schedule_delay: int = Field(5000, ge=0)  # milliseconds
    otel_bsp_export_timeout: int = Field(30000, gt=0)  # milliseconds
    otel_bsp_max_queue_size: int = Field(2048, ge=1)
    otel_bsp_max_export_batch_size: int = Field(512, ge=1)
    otel_instrumentation_genai_capture_message_content: bool = False

    # Workers (#21): processes serving one port; "auto" = one per core.
    proxy_workers: str = Field("1", pattern=r"^\s*(auto|[1-9][0-9]{0,2})\s*$")

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        parse_database_url(value)
        return value

    @field_validator("upstream_base_url")
    @classmethod
    def _check_upstream(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as https://api.openai.com")
        return value.strip().rstrip("/")

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.strip().upper() not in LOG_LEVELS:
            raise ValueError(f"use one of {', '.join(LOG_LEVELS)}")
        return value.strip().upper()

    @field_validator("proxy_api_keys")
    @classmethod
    def _check_client_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_client_keys(value.get_secret_value())
        return value

    @field_validator("proxy_allowed_origins")
    @classmethod
    def _check_allowed_origins(cls, value: str) -> str:
        parse_allowed_origins(value)
        return value

    @field_validator("proxy_allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, value: str) -> str:
        parse_allowed_hosts(value)
        return value

    @field_validator("ledger_spool_fsync")
    @classmethod
    def _check_spool_fsync(cls, value: str) -> str:
        try:
            parse_fsync(value)
        except ValueError:
            raise ValueError("must be never, always or a number of seconds above 0") from None
        return value.strip().lower()

    @field_validator("otel_exporter_otlp_endpoint", "otel_exporter_otlp_traces_endpoint")
    @classmethod
    def _check_otlp_endpoint(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as http://localhost:4318")
        return value.strip()

    @field_validator("otel_exporter_otlp_compression", "otel_exporter_otlp_traces_compression")
    @classmethod
    def _check_compression(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if value.strip().lower() not in ("gzip", "none"):
            raise ValueError("must be gzip or none")
        return value.strip().lower()

    @field_validator("otel_exporter_otlp_protocol", "otel_exporter_otlp_traces_protocol")
    @classmethod
    def _check_protocol(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if value.strip().lower() != "http/protobuf":
            raise ValueError("only http/protobuf is supported (send to the receiver's OTLP/HTTP port, 4318)")
        return value.strip().lower()

    @field_validator("openai_api_key", "costs_api_token", "prices_file", "proxy_api_keys",
                     "metrics_token", "ledger_spool_dir", "otel_exporter_otlp_headers",
                     "otel_exporter_otlp_traces_headers", "otel_traces_sampler_arg", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _warning_not_above_limit(self) -> Settings:
        if self.cost_warning_threshold_usd > self.cost_limit_threshold_usd:
            raise ValueError(
                "COST_WARNING_THRESHOLD_USD must not exceed COST_LIMIT_THRESHOLD_USD"
            )
        return self

    @model_validator(mode="after")
    def _check_sampler(self) -> Settings:
        from tracing.sampler import make_sampler  # tracing depends on costing, not the reverse

        try:
            make_sampler(self.otel_traces_sampler, self.otel_traces_sampler_arg)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def workers(self) -> int:
        """PROXY_WORKERS as a count of processes."""
        value = self.proxy_workers.strip()
        return len(os.sched_getaffinity(0)) if value == "auto" else int(value)

    @property
    def database(self) -> DatabaseTarget:
        return parse_database_url(self.database_url)

    @property
    def upstream_base(self) -> str:
        """UPSTREAM_BASE_URL without a trailing `/v1`: the incoming `/v1/...` path is appended to
        it, and an SDK-style base URL (`https://api.groq.com/openai/v1`) is a common copy."""
        return self.upstream_base_url.removesuffix("/v1")

    @property
    def spool_fsync_seconds(self) -> float | None:
        """LEDGER_SPOOL_FSYNC as seconds between syncs: None never, 0 always."""
        return parse_fsync(self.ledger_spool_fsync)

    @property
    def client_keys(self) -> dict[str, str | None]:
        """PROXY_API_KEYS as {key: bound campaign or None}; empty when unset."""
        if self.proxy_api_keys is None:
            return {}
        return parse_client_keys(self.proxy_api_keys.get_secret_value())

    @property
    def allowed_origins(self) -> frozenset[str]:
        """PROXY_ALLOWED_ORIGINS as serialized origins (lower case, no default port)."""
        return parse_allowed_origins(self.proxy_allowed_origins)

    @property
    def allowed_hosts(self) -> frozenset[str]:
        """PROXY_ALLOWED_HOSTS as lower-case names (`.domain` entries keep their dot)."""
        return parse_allowed_hosts(self.proxy_allowed_hosts)

    @property
    def metrics_access_token(self) -> SecretStr | None:
        """/metrics takes METRICS_TOKEN, else the /costs token; with neither, loopback only."""
        return self.metrics_token if self.metrics_token is not None else self.costs_api_token


    @property
    def traces_url(self) -> str | None:
        """Where spans go: the traces endpoint as given, else `{endpoint}/v1/traces`; None when
        tracing is off (no endpoint, OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none)."""
        if self.otel_sdk_disabled or self.otel_traces_exporter.strip().lower() == "none":
            return None
        if self.otel_exporter_otlp_traces_endpoint:
            return self.otel_exporter_otlp_traces_endpoint
        if self.otel_exporter_otlp_endpoint:
            return self.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
        return None

def parse_client_keys(raw: str) -> dict[str, str | None]:
    """`key1,key2=campaign` -> {key: bound campaign or None}. Messages never quote a key.

    A key ending in `=` (base64 padding) is a key, not a binding: a binding needs a campaign.
    """
    keys: dict[str, str | None] = {}
    for position, item in enumerate((part.strip() for part in raw.split(",")), start=1):
        if not item:
            continue
        key, sep, campaign = item.rpartition("=")
        if not sep or not campaign:
            key, campaign_id = item, None
        else:
            campaign_id = campaign.strip()
            key = key.strip()
            if not TAG_VALUE.fullmatch(campaign_id):
                raise ValueError(f"key {position}: the campaign after '=' must be 1-128 characters "
                                 "of letters, digits and _ . : -")
        if not key or any(c.isspace() for c in key):
            raise ValueError(f"key {position} is empty or holds spaces")
        if key in keys and keys[key] != campaign_id:
            raise ValueError(f"key {position} is listed twice with different campaigns")
        keys[key] = campaign_id
    if not keys:
        raise ValueError("no key given (comma-separated keys, or leave it unset)")
    return keys


ORIGIN_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
HOST_NAME = re.compile(r"\.?[a-z0-9_-]+(\.[a-z0-9_-]+)*")
DEFAULT_PORTS = {"http": 80, "https": 443}


def _items(raw: str) -> list[str]:
    return [item for item in (part.strip() for part in raw.split(",")) if item]


def parse_allowed_origins(raw: str) -> frozenset[str]:
    """`http://localhost:3000, https://app.example.com` -> origins as browsers send them in
    `Origin`: scheme and host in lower case, the scheme's default port left out, no path."""
    origins: set[str] = set()
    for item in _items(raw):
        if item == "*":
            origins.add(item)
            continue
        if item.lower() == "null":
            raise ValueError("'null' is the origin of every sandboxed frame and file:// page, any "
                             "site can send it: serve the page from an http(s) origin and list that")
        example = "write scheme://host[:port] without a path, e.g. http://localhost:3000"
        parts = urlsplit(item)
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{item!r} has an invalid port; {example}") from None
        scheme = parts.scheme.lower()
        if (not ORIGIN_SCHEME.fullmatch(scheme) or not parts.hostname or parts.path not in ("", "/")
                or parts.query or parts.fragment or "@" in parts.netloc):
            raise ValueError(f"{item!r} is not an origin; {example}")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        if port is not None and port != DEFAULT_PORTS.get(scheme):
            host = f"{host}:{port}"
        origins.add(f"{scheme}://{host}")
    return frozenset(origins)


def parse_allowed_hosts(raw: str) -> frozenset[str]:
    """`costs.example.com, .internal` -> lower-case host names without a trailing dot; a leading
    dot stands for that domain and all its subdomains."""
    hosts: set[str] = set()
    for item in _items(raw):
        name = item.lower()
        if name != "*":
            name = name.rstrip(".") or name  # a root-terminated name, as in DNS
            if "://" in name or "/" in name:
                raise ValueError(f"{item!r}: write the host name alone, e.g. costs.example.com "
                                 "(no scheme, no path)")
            if ":" in name:
                raise ValueError(f"{item!r}: write the host name without a port (any port is "
                                 "accepted; IP addresses need no entry)")
            if not HOST_NAME.fullmatch(name):
                raise ValueError(f"{item!r} is not a host name (e.g. costs.example.com, or "
                                 ".example.com for a domain and its subdomains)")
        hosts.add(name)
    return frozenset(hosts)


def describe_error(error: ValidationError) -> str:
    """One line naming the variable, for the start-up failure message."""
    first = error.errors()[0]
    loc = first.get("loc") or ()
    name = str(loc[0]).upper() if loc else "configuration"
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc:
        return f"invalid configuration: {message}"
    return f"invalid configuration: {name}: {message}"
