"""docker-compose.yml, Dockerfile, .dockerignore and prometheus/prometheus.yml agree with each other
and with the project (no Docker engine needed)."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import IN_CI, free_port
from deploy_files import (
    COMPOSE,
    DOCKERFILE,
    DOCKERIGNORE,
    PROMETHEUS_CONFIG,
    ROOT,
    bind_mounts,
    compose,
    container_ports,
    dockerfile_instructions,
    env_example,
    environment,
    interpolate,
    load_yaml,
    service,
)

from costing.settings import Settings

# Values the compose stack sets on purpose instead of the .env.example default.
COMPOSE_OVERRIDES = {"DATABASE_URL", "PROXY_HOST", "LEDGER_SPOOL_DIR"}


def test_compose_has_the_four_services_and_declares_its_named_volumes():
    data = compose()
    assert set(data["services"]) >= {"postgres", "proxy", "prometheus", "grafana"}
    assert str(service("postgres")["image"]).startswith("postgres:16")
    assert str(service("prometheus")["image"]).startswith("prom/prometheus")
    assert str(service("grafana")["image"]).startswith("grafana/grafana")
    declared = set(data.get("volumes") or {})
    for name, svc in data["services"].items():
        for volume in svc.get("volumes") or []:
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}: named volume {source!r} not declared"
    assert service("postgres").get("volumes"), "PostgreSQL data must live in a volume"


def test_every_mounted_host_path_exists():
    mounts = [(name, host, target) for name, svc in compose()["services"].items()
              for host, target in bind_mounts(svc)]
    assert {name for name, _, _ in mounts} >= {"prometheus", "grafana"}
    for name, host, target in mounts:
        assert host.exists(), f"{name}: {host} (mounted at {target}) does not exist"
        assert host.is_relative_to(ROOT), f"{name}: {host} is outside the project"


def test_proxy_is_built_here_and_published_on_8080():
    proxy = service("proxy")
    build = proxy["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).resolve() == DOCKERFILE
    assert "8080:8080" in [str(p) for p in proxy["ports"]]
    assert environment(proxy)["PROXY_PORT"] == "8080"
    assert environment(proxy)["PROXY_HOST"] == "0.0.0.0"


def test_proxy_environment_covers_every_configuration_variable_with_its_default():
    example = env_example()
    env = environment(service("proxy"))
    assert len(example) >= 20, "could not read .env.example"
    missing = sorted(set(example) - set(env))
    assert not missing, f"docker-compose.yml proxy environment lacks {missing}"
    for name, default in example.items():
        if name not in COMPOSE_OVERRIDES:
            assert env[name] == default, f"{name}: compose default {env[name]!r} != .env.example {default!r}"
    assert env["OPENAI_API_KEY"] == ""  # ${OPENAI_API_KEY:-}: taken from the user's shell
    raw = service("proxy")["environment"]["OPENAI_API_KEY"]
    assert interpolate(raw, {"OPENAI_API_KEY": "sk-x"}) == "sk-x"


def test_proxy_environment_is_a_valid_configuration_pointing_at_the_postgres_service():
    env = environment(service("proxy"))
    unknown = sorted(k for k in env if k.lower() not in Settings.model_fields)
    assert not unknown, f"not settings of the proxy: {unknown}"
    settings = Settings(_env_file=None, **{k.lower(): v for k, v in env.items()})  # type: ignore[arg-type]
    db = urlsplit(settings.database.url)
    assert db.scheme == "postgresql+asyncpg"
    pg = environment(service("postgres"))
    assert (db.hostname, db.port) == ("postgres", 5432)
    assert (db.username, db.password, db.path.lstrip("/")) == (
        pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
    assert settings.openai_api_key is None and settings.costs_api_token is None
    assert settings.prices_file is None


def test_proxy_waits_for_a_healthy_postgres():
    depends = service("proxy")["depends_on"]
    assert isinstance(depends, dict), "depends_on needs the long form to carry a condition"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(service("postgres")["healthcheck"]["test"])
    assert "proxy" in service("prometheus")["depends_on"]
    assert "prometheus" in service("grafana")["depends_on"]


def test_every_service_has_a_healthcheck():
    for name, svc in compose()["services"].items():
        check = svc.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        test = check["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name


def test_grafana_is_reachable_and_documented():
    grafana = service("grafana")
    assert "3000:3000" in [str(p) for p in grafana["ports"]]
    env = environment(grafana)
    anonymous = env.get("GF_AUTH_ANONYMOUS_ENABLED") == "true"
    assert anonymous or env.get("GF_SECURITY_ADMIN_PASSWORD") == "admin"
    header = COMPOSE.read_text(encoding="utf-8").split("services:")[0]
    assert "localhost:3000" in header and "admin/admin" in header


def test_prometheus_scrapes_the_proxy_service_on_its_container_port():
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "15s"
    [job] = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", "15s") == "15s"
    [static] = job["static_configs"]
    [target] = static["targets"]
    host, port = target.rsplit(":", 1)
    assert host in compose()["services"] and host == "proxy"
    assert int(port) in container_ports(service(host))
    assert int(port) == int(environment(service(host))["PROXY_PORT"])
    # The file Prometheus reads is the one mounted from the project.
    prometheus = service("prometheus")
    config_flag = next(a for a in prometheus.get("command", ["--config.file=/etc/prometheus/prometheus.yml"])
                       if a.startswith("--config.file="))
    mounted = dict((target, host) for host, target in bind_mounts(prometheus))
    assert mounted[config_flag.split("=", 1)[1]] == PROMETHEUS_CONFIG


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("promtool (Debian package prometheus) is required in CI")
        pytest.skip("promtool not installed")
    check = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def _instruction(name: str) -> list[str]:
    return [args for keyword, args in dockerfile_instructions() if keyword == name]


def test_dockerfile_runs_serve_as_a_non_root_user_on_all_interfaces():
    [base] = _instruction("FROM")
    assert base == "python:3.11-slim"
    [cmd] = _instruction("CMD")
    assert json.loads(cmd) == ["llm-cost-proxy", "serve"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["scripts"]["llm-cost-proxy"] == "proxy.cli:main"
    assert any("pip install ." in run for run in _instruction("RUN"))
    users = _instruction("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    env = " ".join(_instruction("ENV"))
    assert "PROXY_HOST=0.0.0.0" in env
    assert "8080" in " ".join(_instruction("EXPOSE")).split()
    [healthcheck] = _instruction("HEALTHCHECK")
    assert "urllib" in healthcheck and "/healthz" in healthcheck


def _matches(pattern: str, path: str) -> bool:
    """Docker's .dockerignore matching: per path segment, `**` spanning any number of segments."""
    pattern_parts, path_parts = pattern.split("/"), path.split("/")
    if pattern_parts[0] == "**":
        rest = "/".join(pattern_parts[1:])
        return any(_matches(rest, "/".join(path_parts[i:])) for i in range(len(path_parts)))
    return len(pattern_parts) == len(path_parts) and all(
        fnmatch.fnmatchcase(part, pat) for pat, part in zip(pattern_parts, path_parts, strict=True))


def _ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `relative` (or a directory holding it) out of the build context."""
    parts = Path(relative).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        pattern = raw.lstrip("!").strip("/")
        if any(_matches(pattern, prefix) for prefix in prefixes):
            ignored = not raw.startswith("!")
    return ignored


def test_docker_build_context_holds_what_pip_install_needs_and_nothing_local():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    for required in (".venv", ".git", "*.db", "__pycache__"):
        assert required in patterns, f".dockerignore lacks {required}"
    for local in (".venv/bin/python", ".git/HEAD", "llm-costs.db", "proxy/__pycache__/app.cpython-311.pyc"):
        assert _ignored(local, patterns), f"{local} would be sent to the Docker daemon"
    copied = []
    for args in _instruction("COPY"):
        sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert not _ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
            copied.append(source)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {package.split(".")[0] for package in pyproject["tool"]["setuptools"]["packages"]}
    assert needed <= set(copied), f"pip install . needs {sorted(needed - set(copied))} in the image"


def _healthcheck_commands() -> list[str]:
    """The proxy healthchecks as /bin/sh would run them inside the container."""
    [dockerfile] = _instruction("HEALTHCHECK")
    shell_form = dockerfile.split(" CMD ", 1)[1]
    test = service("proxy")["healthcheck"]["test"]
    compose_form = interpolate(test[1]) if test[0] == "CMD-SHELL" else shlex.join(test[1:])
    return [shell_form, compose_form]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_proxy_healthchecks_pass_against_a_live_proxy_and_fail_without_one(proxy):
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    for command in _healthcheck_commands():
        for port, healthy in ((proxy.port, True), (free_port(), False)):
            run = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", command, env={"PATH": path, "PROXY_PORT": str(port)},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(run.communicate(), 20)
            assert (run.returncode == 0) is healthy, (command, port, err.decode())
