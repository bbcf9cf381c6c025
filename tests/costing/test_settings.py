"""Configuration: the defaults of the spec's Configuration table, environment variables and `.env`,
the app's Prisma-style DATABASE_URL, and one clear line naming the variable when a value is invalid.

Specification of `costing.settings`. Every test starts from an environment with none of the
proxy's variables set and reads no `.env` unless it says so.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from costing.budget import make_budget
from costing.settings import DatabaseTarget, Settings, describe_error, parse_database_url

ROOT = Path(__file__).resolve().parents[2]
PRISMA_URL = "postgresql://postgres:postgres@localhost:5432/ai_rpg_manager?schema=public"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No proxy variable from the machine, in any letter case (names are case-insensitive)."""
    fields = set(Settings.model_fields)
    for name in list(os.environ):
        if name.lower() in fields:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # and no stray ./.env


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch):
    """Set environment variables, then build Settings the way the CLI does (minus `.env`)."""

    def build(**variables: str) -> Settings:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        return Settings(_env_file=None)  # type: ignore[call-arg]

    return build


# -- defaults ------------------------------------------------------------------------------------


def test_defaults_match_the_spec_configuration_table(env):
    s = env()
    assert s.database_url == "sqlite+aiosqlite:///./llm-costs.db"
    assert s.upstream_base_url == "https://api.openai.com"
    assert s.openai_api_key is None
    assert (s.proxy_host, s.proxy_port) == ("127.0.0.1", 8080)
    assert s.openai_price_per_1k_prompt_tokens == Decimal("0.00015")
    assert s.openai_price_per_1k_completion_tokens == Decimal("0.0006")
    assert s.prices_file is None
    assert s.cost_warning_threshold_usd == Decimal("1.00")
    assert s.cost_limit_threshold_usd == Decimal("5.00")
    assert (s.campaign_header, s.session_header) == ("X-Campaign-Id", "X-Session-Id")
    assert s.costs_api_token is None


def test_by_default_migrations_run_at_start_and_the_store_is_an_embedded_sqlite_file(env):
    s = env()
    assert s.auto_migrate is True
    assert s.database == DatabaseTarget("sqlite+aiosqlite:///./llm-costs.db", None)
    assert s.database.is_sqlite


def test_default_prices_and_thresholds_are_exact_decimals(env):
    s = env()
    for amount in (s.openai_price_per_1k_prompt_tokens, s.openai_price_per_1k_completion_tokens,
                   s.cost_warning_threshold_usd, s.cost_limit_threshold_usd):
        assert isinstance(amount, Decimal)


def test_settings_are_immutable(env):
    s = env()
    with pytest.raises(ValidationError):
        s.proxy_port = 9999  # type: ignore[misc]


# -- environment variables and .env --------------------------------------------------------------


def test_environment_variables_are_read(env):
    s = env(DATABASE_URL=PRISMA_URL, UPSTREAM_BASE_URL="http://fake:8000", OPENAI_API_KEY="sk-test",
            PROXY_HOST="0.0.0.0", PROXY_PORT="9090",
            OPENAI_PRICE_PER_1K_PROMPT_TOKENS="0.001", OPENAI_PRICE_PER_1K_COMPLETION_TOKENS="0.002",
            PRICES_FILE="/etc/prices.toml", COST_WARNING_THRESHOLD_USD="2.50", COST_LIMIT_THRESHOLD_USD="10",
            CAMPAIGN_HEADER="X-Game-Id", SESSION_HEADER="X-Chat-Id", COSTS_API_TOKEN="t0ken")
    assert s.database_url == PRISMA_URL
    assert s.upstream_base_url == "http://fake:8000"
    assert s.openai_api_key is not None and s.openai_api_key.get_secret_value() == "sk-test"
    assert (s.proxy_host, s.proxy_port) == ("0.0.0.0", 9090)
    assert s.openai_price_per_1k_prompt_tokens == Decimal("0.001")
    assert s.openai_price_per_1k_completion_tokens == Decimal("0.002")
    assert s.prices_file == Path("/etc/prices.toml")
    assert (s.cost_warning_threshold_usd, s.cost_limit_threshold_usd) == (Decimal("2.50"), Decimal("10"))
    assert (s.campaign_header, s.session_header) == ("X-Game-Id", "X-Chat-Id")
    assert s.costs_api_token is not None and s.costs_api_token.get_secret_value() == "t0ken"


def test_secrets_never_show_in_the_settings_text(env):
    s = env(OPENAI_API_KEY="sk-very-secret", COSTS_API_TOKEN="also-secret")
    assert "sk-very-secret" not in repr(s) and "also-secret" not in str(s)


def test_an_empty_key_or_token_is_unset(env):
    s = env(OPENAI_API_KEY="", COSTS_API_TOKEN="")
    assert s.openai_api_key is None and s.costs_api_token is None


def test_an_empty_prices_file_is_unset(env):
    assert env(PRICES_FILE="").prices_file is None


def test_the_upstream_url_loses_its_trailing_slash_but_keeps_its_path_prefix(env):
    assert env(UPSTREAM_BASE_URL="http://h/stream/").upstream_base_url == "http://h/stream"
    assert env(UPSTREAM_BASE_URL=" https://api.openai.com/ ").upstream_base_url == "https://api.openai.com"


def test_a_dotenv_file_is_read_and_the_environment_wins_over_it(monkeypatch, tmp_path):
    dotenv = tmp_path / "custom.env"
    dotenv.write_text("PROXY_PORT=7070\nCOST_LIMIT_THRESHOLD_USD=20\nCAMPAIGN_HEADER=X-Game-Id\n")
    monkeypatch.setenv("PROXY_PORT", "6060")
    s = Settings(_env_file=dotenv)  # type: ignore[call-arg]
    assert (s.proxy_port, s.cost_limit_threshold_usd, s.campaign_header) == (6060, Decimal(20), "X-Game-Id")


def test_the_dotenv_in_the_working_directory_is_read_by_default(tmp_path):
    (tmp_path / ".env").write_text("PROXY_PORT=7171\n")
    assert Settings().proxy_port == 7171


def test_the_shipped_env_example_documents_the_defaults(env):
    example = Settings(_env_file=ROOT / ".env.example")  # type: ignore[call-arg]
    defaults = env()
    # PRICES_FILE is the one exception, see test_an_empty_prices_file_is_unset.
    assert example.model_dump(exclude={"prices_file"}) == defaults.model_dump(exclude={"prices_file"})


# -- DATABASE_URL --------------------------------------------------------------------------------


def test_the_apps_prisma_url_is_mapped_to_asyncpg_with_its_schema():
    target = parse_database_url(PRISMA_URL)
    assert target.url == "postgresql+asyncpg://postgres:postgres@localhost:5432/ai_rpg_manager"
    assert target.schema == "public"
    assert not target.is_sqlite
    assert "schema" not in target.url


def test_the_prisma_url_is_accepted_as_database_url(env):
    assert env(DATABASE_URL=PRISMA_URL).database == DatabaseTarget(
        "postgresql+asyncpg://postgres:postgres@localhost:5432/ai_rpg_manager", "public")


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+asyncpg", "POSTGRESQL"])
def test_every_postgresql_spelling_uses_asyncpg(scheme):
    assert parse_database_url(f"{scheme}://u:p@db:5432/costs").url == "postgresql+asyncpg://u:p@db:5432/costs"


def test_prisma_and_libpq_options_are_mapped_out_of_the_url():
    target = parse_database_url("postgresql://u:p@db/costs?schema=game&connection_limit=5&pool_timeout=10"
                                "&application_name=proxy&socket_timeout=3")
    assert target == DatabaseTarget("postgresql+asyncpg://u:p@db/costs", "game", application_name="proxy",
                                    pool_size=5, pool_timeout=10.0)


def test_a_url_without_schema_has_no_schema():
    assert parse_database_url("postgresql://u@db/costs").schema is None
    assert parse_database_url("postgresql://u@db/costs?schema=").schema is None


def test_a_percent_encoded_password_is_kept_as_is():
    url = "postgresql://app:p%40ss%2Fw0rd@db:5432/costs"
    assert parse_database_url(url).url == "postgresql+asyncpg://app:p%40ss%2Fw0rd@db:5432/costs"


@pytest.mark.parametrize(("raw", "url"), [
    ("sqlite+aiosqlite:///./llm-costs.db", "sqlite+aiosqlite:///./llm-costs.db"),
    ("sqlite+aiosqlite:////var/lib/costs.db", "sqlite+aiosqlite:////var/lib/costs.db"),
    ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
    ("sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite:///:memory:"),
    ("  sqlite:///x.db  ", "sqlite+aiosqlite:///x.db"),
])
def test_sqlite_urls_use_aiosqlite(raw, url):
    target = parse_database_url(raw)
    assert target == DatabaseTarget(url, None)
    assert target.is_sqlite


@pytest.mark.parametrize("raw", ["mysql://u:p@h/db", "mongodb://h/db", "postgresql+psycopg2://u@h/db",
                                 "llm-costs.db", ""])
def test_other_databases_are_refused_with_the_accepted_forms(raw):
    with pytest.raises(ValueError) as caught:
        parse_database_url(raw)
    message = str(caught.value)
    assert "postgresql://" in message and "sqlite+aiosqlite://" in message


def test_a_postgresql_url_without_host_or_database_is_refused():
    with pytest.raises(ValueError, match="host and a database"):
        parse_database_url("postgresql://")


# -- invalid values ------------------------------------------------------------------------------


@pytest.mark.parametrize(("variables", "name"), [
    ({"PROXY_PORT": "abc"}, "PROXY_PORT"),
    ({"PROXY_PORT": "70000"}, "PROXY_PORT"),
    ({"PROXY_PORT": "-1"}, "PROXY_PORT"),
    ({"COST_LIMIT_THRESHOLD_USD": "-1"}, "COST_LIMIT_THRESHOLD_USD"),
    ({"COST_WARNING_THRESHOLD_USD": "lots"}, "COST_WARNING_THRESHOLD_USD"),
    ({"COST_WARNING_THRESHOLD_USD": "6"}, "COST_WARNING_THRESHOLD_USD"),  # above the default limit
    ({"COST_WARNING_THRESHOLD_USD": "2", "COST_LIMIT_THRESHOLD_USD": "1"}, "COST_LIMIT_THRESHOLD_USD"),
    ({"OPENAI_PRICE_PER_1K_PROMPT_TOKENS": "-0.1"}, "OPENAI_PRICE_PER_1K_PROMPT_TOKENS"),
    ({"OPENAI_PRICE_PER_1K_COMPLETION_TOKENS": "x"}, "OPENAI_PRICE_PER_1K_COMPLETION_TOKENS"),
    ({"UPSTREAM_BASE_URL": "ftp://x"}, "UPSTREAM_BASE_URL"),
    ({"UPSTREAM_BASE_URL": "api.openai.com"}, "UPSTREAM_BASE_URL"),
    ({"UPSTREAM_BASE_URL": "http://"}, "UPSTREAM_BASE_URL"),
    ({"DATABASE_URL": "mysql://u:p@h/db"}, "DATABASE_URL"),
    ({"CAMPAIGN_HEADER": "X Campaign"}, "CAMPAIGN_HEADER"),
    ({"SESSION_HEADER": ""}, "SESSION_HEADER"),
    ({"AUTO_MIGRATE": "perhaps"}, "AUTO_MIGRATE"),
])
def test_an_invalid_value_is_one_line_naming_the_variable(env, variables, name):
    with pytest.raises(ValidationError) as caught:
        env(**variables)
    line = describe_error(caught.value)
    assert name in line
    assert "\n" not in line
    assert line.startswith("invalid configuration")


def test_the_line_says_what_is_wrong(env):
    with pytest.raises(ValidationError) as caught:
        env(UPSTREAM_BASE_URL="ftp://x")
    assert describe_error(caught.value) == (
        "invalid configuration: UPSTREAM_BASE_URL: must be an http(s) URL such as https://api.openai.com")


def test_warning_above_limit_is_explained_with_both_variables(env):
    with pytest.raises(ValidationError) as caught:
        env(COST_WARNING_THRESHOLD_USD="6", COST_LIMIT_THRESHOLD_USD="5")
    assert describe_error(caught.value) == (
        "invalid configuration: COST_WARNING_THRESHOLD_USD must not exceed COST_LIMIT_THRESHOLD_USD")


def test_several_invalid_values_still_give_one_line(env):
    with pytest.raises(ValidationError) as caught:
        env(PROXY_PORT="abc", UPSTREAM_BASE_URL="ftp://x", DATABASE_URL="mysql://h/db")
    line = describe_error(caught.value)
    assert "\n" not in line and any(n in line for n in ("PROXY_PORT", "UPSTREAM_BASE_URL", "DATABASE_URL"))


def test_a_limit_too_large_to_store_is_refused_naming_the_variable_or_works(env):
    try:
        s = env(COST_LIMIT_THRESHOLD_USD="1e18")
    except ValidationError as exc:
        assert "COST_LIMIT_THRESHOLD_USD" in describe_error(exc)
        return
    make_budget(s.cost_warning_threshold_usd, s.cost_limit_threshold_usd)


def test_workers_are_a_count_or_auto():
    assert Settings(_env_file=None).workers == 1  # type: ignore[call-arg]
    assert Settings(_env_file=None, proxy_workers="4").workers == 4  # type: ignore[call-arg]
    assert Settings(_env_file=None, proxy_workers="auto").workers == len(os.sched_getaffinity(0))  # type: ignore[call-arg]
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValidationError) as caught:
            Settings(_env_file=None, proxy_workers=bad)  # type: ignore[call-arg]
        assert describe_error(caught.value).startswith("invalid configuration: PROXY_WORKERS")
