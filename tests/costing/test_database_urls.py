"""DATABASE_URL as hosted PostgreSQL services hand it out (Neon, Supabase, RDS, Heroku: libpq and
Prisma query parameters): each parameter becomes the asyncpg argument that means the same, and an
unknown one is refused with one line naming DATABASE_URL and the parameter.

Specification of `costing.settings.parse_database_url` and `costing.db.connect_args`; the TLS
behaviour against a real server is in test_database_tls.py.
"""

from __future__ import annotations

import ssl

import pytest
from pydantic import ValidationError

from costing.db import connect_args, create_engine, ssl_argument
from costing.errors import DatabaseUnavailable
from costing.settings import Settings, describe_error, parse_database_url

BASE = "postgresql://app:pw@db.example.com:5432/costs"


def target(query: str):
    return parse_database_url(f"{BASE}?{query}")


@pytest.mark.parametrize(("mode", "expected"), [
    ("disable", False), ("allow", "allow"), ("prefer", "prefer"),
])
def test_sslmodes_asyncpg_shares_are_passed_as_asyncpg_spells_them(mode, expected):
    assert ssl_argument(target(f"sslmode={mode}")) == expected
    assert "sslmode" not in target(f"sslmode={mode}").url


def test_sslmode_require_encrypts_without_checking_the_certificate():
    context = ssl_argument(target("sslmode=require"))
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname


def test_verify_full_checks_chain_and_host_name_verify_ca_only_the_chain(tmp_path):
    full = ssl_argument(target("sslmode=verify-full"))
    ca = ssl_argument(target("sslmode=verify-ca&sslrootcert=system"))
    assert isinstance(full, ssl.SSLContext) and isinstance(ca, ssl.SSLContext)
    assert full.verify_mode == ssl.CERT_REQUIRED and full.check_hostname
    assert ca.verify_mode == ssl.CERT_REQUIRED and not ca.check_hostname


def test_require_with_a_root_certificate_verifies_it_as_libpq_does():
    context = ssl_argument(target("sslmode=require&sslrootcert=system"))
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED


def test_no_sslmode_leaves_asyncpgs_default():
    assert ssl_argument(parse_database_url(BASE)) is None
    assert "ssl" not in connect_args(parse_database_url(BASE))


def test_sqlalchemys_ssl_spelling_is_the_same_as_sslmode():
    assert target("ssl=disable").sslmode == "disable"
    assert target("ssl=true").sslmode == "require"


def test_application_name_schema_and_connect_timeout_become_connect_arguments():
    args = connect_args(target("schema=llm_costs&application_name=rpg-proxy&connect_timeout=7"))
    assert args["server_settings"] == {"search_path": "llm_costs", "application_name": "rpg-proxy"}
    assert args["timeout"] == 7.0


def test_pgbouncer_turns_every_prepared_statement_cache_off():
    t = target("pgbouncer=true")
    args = connect_args(t)
    assert args["statement_cache_size"] == 0
    first, second = args["prepared_statement_name_func"](), args["prepared_statement_name_func"]()
    assert first != second  # unique names: PgBouncer hands server connections between clients
    assert "prepared_statement_cache_size=0" in t.url
    engine = create_engine(t)
    _, kwargs = engine.dialect.create_connect_args(engine.url)  # SQLAlchemy's own cache
    assert kwargs["prepared_statement_cache_size"] == 0
    plain = create_engine(parse_database_url(BASE))
    assert plain.dialect.create_connect_args(plain.url)[1].get("prepared_statement_cache_size") != 0
    assert "statement_cache_size" not in connect_args(target("pgbouncer=false"))


def test_prisma_pool_parameters_size_the_pool():
    engine = create_engine(target("connection_limit=3&pool_timeout=4"))
    assert engine.pool.size() == 3  # type: ignore[attr-defined]
    assert engine.pool._max_overflow == 0  # type: ignore[attr-defined]
    assert engine.pool._timeout == 4.0  # type: ignore[attr-defined]


def test_prisma_only_parameters_without_an_equivalent_are_ignored():
    t = target("socket_timeout=10&sslaccept=strict")
    assert t.url == "postgresql+asyncpg://app:pw@db.example.com:5432/costs"


@pytest.mark.parametrize(("query", "named"), [
    ("sslmod=require", "sslmod"),
    ("options=-c%20search_path%3Dx", "options"),
    ("sslmode=sometimes", "sslmode"),
    ("connect_timeout=soon", "connect_timeout"),
    ("pgbouncer=maybe", "pgbouncer"),
    ("connection_limit=0", "connection_limit"),
])
def test_an_unknown_parameter_or_value_is_one_line_naming_database_url_and_it(query, named, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"{BASE}?{query}")
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)  # type: ignore[call-arg]
    line = describe_error(caught.value)
    assert "\n" not in line and "DATABASE_URL" in line and named in line


def test_a_missing_tls_file_is_one_line_naming_database_url(tmp_path):
    with pytest.raises(DatabaseUnavailable) as caught:
        ssl_argument(target(f"sslmode=verify-full&sslrootcert={tmp_path / 'missing.crt'}"))
    assert str(caught.value).startswith("DATABASE_URL: ") and "\n" not in str(caught.value)
