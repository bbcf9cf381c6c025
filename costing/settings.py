"""Configuration: one immutable Settings object built once at start from the environment and `.env`.

Everything configurable lives here; no other module reads `os.environ`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from costing.money import MAX_USD

TAG_HEADER_PATTERN = r"^[A-Za-z][A-Za-z0-9-]{0,63}$"


@dataclass(frozen=True)
class DatabaseTarget:
    """A SQLAlchemy async URL plus the PostgreSQL schema the app asked for (Prisma's `?schema=`)."""

    url: str
    schema: str | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


def parse_database_url(raw: str) -> DatabaseTarget:
    """Accept SQLAlchemy URLs and the app's Prisma-style `postgresql://...?schema=public` as is."""
    raw = raw.strip()
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        query = parse_qsl(parts.query, keep_blank_values=True)
        schema = next((v for k, v in query if k == "schema"), None)
        # Prisma-only options that asyncpg would reject as unknown server settings.
        prisma_only = {"schema", "connection_limit", "pool_timeout", "pgbouncer", "sslaccept",
                       "socket_timeout", "connect_timeout", "statement_cache_size"}
        rest = [(k, v) for k, v in query if k not in prisma_only]
        if not parts.hostname and not parts.path.strip("/"):
            raise ValueError("a PostgreSQL URL needs a host and a database name")
        url = urlunsplit(("postgresql+asyncpg", parts.netloc, parts.path, urlencode(rest), ""))
        return DatabaseTarget(url, schema or None)
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

    campaign_header: str = Field("X-Campaign-Id", pattern=TAG_HEADER_PATTERN)
    session_header: str = Field("X-Session-Id", pattern=TAG_HEADER_PATTERN)
    costs_api_token: SecretStr | None = None

    auto_migrate: bool = True
    ledger_flush_interval_seconds: float = Field(0.2, gt=0, le=60)
    ledger_batch_size: int = Field(1000, ge=1)
    ledger_buffer_max_records: int = Field(100_000, ge=100)

    upstream_connect_timeout_seconds: float = Field(10.0, gt=0)
    upstream_read_timeout_seconds: float = Field(600.0, gt=0)
    max_request_body_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    metrics_max_campaigns: int = Field(1000, ge=1)
    shutdown_timeout_seconds: float = Field(30.0, ge=0)
    log_level: str = "INFO"

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

    @field_validator("openai_api_key", "costs_api_token", "prices_file", mode="before")
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

    @property
    def workers(self) -> int:
        """PROXY_WORKERS as a count of processes."""
        value = self.proxy_workers.strip()
        return len(os.sched_getaffinity(0)) if value == "auto" else int(value)

    @property
    def database(self) -> DatabaseTarget:
        return parse_database_url(self.database_url)


def describe_error(error: ValidationError) -> str:
    """One line naming the variable, for the start-up failure message."""
    first = error.errors()[0]
    loc = first.get("loc") or ()
    name = str(loc[0]).upper() if loc else "configuration"
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc:
        return f"invalid configuration: {message}"
    return f"invalid configuration: {name}: {message}"
