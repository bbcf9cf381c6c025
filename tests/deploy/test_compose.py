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
import yaml
from conftest import IN_CI, free_port
from deploy_files import (
    COMPOSE,
    DOCKERFILE,
    DOCKERIGNORE,
    PROMETHEUS_CONFIG,
    REQUIRED,
    ROOT,
    bind_mounts,
    compose,
    container_ports,
    dockerfile_instructions,
    env_example,
    environment,
    interpolate,
    load_yaml,
    published,
    service,
)

from costing.settings import Settings

# Values the compose stack sets on purpose instead of the .env.example default (METRICS_TOKEN:
# required, Prometheus scrapes with it).
COMPOSE_OVERRIDES = {"DATABASE_URL", "PROXY_HOST", "METRICS_TOKEN", "LEDGER_SPOOL_DIR"}


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


def test_proxy_is_built_here_and_published_on_8080_of_the_loopback_interface():
    proxy = service("proxy")
    build = proxy["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).resolve() == DOCKERFILE
    assert published(proxy) == [("127.0.0.1", 8080, 8080)]
    assert published(proxy, {"PROXY_PUBLISH_ADDRESS": "0.0.0.0"}) == [("0.0.0.0", 8080, 8080)]
    assert environment(proxy)["PROXY_PORT"] == "8080"
    assert environment(proxy)["PROXY_HOST"] == "0.0.0.0"


def test_every_published_port_binds_127_0_0_1_unless_the_user_opens_it():
    openers = {"proxy": "PROXY_PUBLISH_ADDRESS", "prometheus": "PROMETHEUS_PUBLISH_ADDRESS",
               "grafana": "GRAFANA_PUBLISH_ADDRESS", "jaeger": "JAEGER_PUBLISH_ADDRESS"}
    for name, svc in compose()["services"].items():
        for address, _host_port, _container_port in published(svc):
            assert address == "127.0.0.1", f"{name} publishes a port on {address or 'every interface'}"
        if svc.get("ports"):
            opened = published(svc, {openers[name]: "0.0.0.0"})
            assert {address for address, _, _ in opened} == {"0.0.0.0"}, name
    assert published(service("postgres")) == []  # the database is reachable inside the stack only


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


def test_grafana_has_no_default_password_and_no_anonymous_access_by_default():
    grafana = service("grafana")
    assert published(grafana) == [("127.0.0.1", 3000, 3000)]
    raw = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    with pytest.raises(AssertionError, match="GRAFANA_ADMIN_PASSWORD"):
        interpolate(raw, {})  # `docker compose up` refuses to start without it
    assert interpolate(raw, {"GRAFANA_ADMIN_PASSWORD": "pw-1"}) == "pw-1"
    env = environment(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"  # never more, even when turned on
    opened = environment(grafana, {**REQUIRED, "GRAFANA_ANONYMOUS_VIEWER": "true"})
    assert opened["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert "admin" not in {env.get("GF_SECURITY_ADMIN_PASSWORD")}
    header = COMPOSE.read_text(encoding="utf-8").split("services:")[0]
    assert "127.0.0.1:3000" in header and "GRAFANA_ADMIN_PASSWORD" in header


def test_compose_only_variables_of_env_example_are_used_with_the_same_defaults():
    text = COMPOSE.read_text(encoding="utf-8")
    only = env_example(compose_only=True)
    assert {"GRAFANA_ADMIN_PASSWORD", "PROXY_PUBLISH_ADDRESS"} <= set(only)
    for name, default in only.items():
        if name in REQUIRED:
            assert f"${{{name}:?" in text, f"{name} must be required by docker-compose.yml"
        else:
            assert f"${{{name}:-{default}}}" in text, f"{name}: compose default differs from .env.example"
    for name in ("PROXY_API_KEYS", "ALLOW_OPEN_PROXY", "METRICS_TOKEN"):
        assert name in env_example(), f".env.example lacks {name}"


def test_the_proxy_refuses_to_serve_openly_in_compose_without_client_keys():
    """Inside the stack the proxy listens on 0.0.0.0: with OPENAI_API_KEY and no PROXY_API_KEYS it
    must refuse to start (proxy.keys.open_proxy_refusal), not relay for anyone."""
    from proxy.keys import open_proxy_refusal

    proxy = service("proxy")
    values = {k.lower(): v for k, v in environment(proxy, {**REQUIRED, "OPENAI_API_KEY": "sk-x"}).items()}
    refusal = open_proxy_refusal(Settings(_env_file=None, **values))  # type: ignore[arg-type]
    assert refusal is not None and "PROXY_API_KEYS" in refusal
    keyed = environment(proxy, {**REQUIRED, "OPENAI_API_KEY": "sk-x", "PROXY_API_KEYS": "k1,k2=c2"})
    settings = Settings(_env_file=None, **{k.lower(): v for k, v in keyed.items()})  # type: ignore[arg-type]
    assert open_proxy_refusal(settings) is None
    assert settings.client_keys == {"k1": None, "k2": "c2"}


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


def test_prometheus_scrapes_with_the_proxys_metrics_token(tmp_path):
    """The scrape job's credentials_file is the file the compose entrypoint writes METRICS_TOKEN to,
    and the entrypoint, run by /bin/sh, writes the token exactly (no newline) and starts Prometheus
    with the compose command."""
    [job] = load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
    auth = job["authorization"]
    assert auth.get("type", "Bearer") == "Bearer" and "credentials" not in auth
    token_file = auth["credentials_file"]
    prometheus = service("prometheus")
    raw_proxy = service("proxy")["environment"]["METRICS_TOKEN"]
    assert prometheus["environment"]["METRICS_TOKEN"].split(":?")[0] == raw_proxy.split(":?")[0]
    shell, flag, script, argv0 = prometheus["entrypoint"]
    assert (shell, flag) == ("/bin/sh", "-c")
    script = interpolate(script)  # $$ -> $
    assert f"> {token_file} " in script and "exec /bin/prometheus" in script
    written = tmp_path / "metrics_token"
    runnable = script.replace(token_file, str(written)).replace("exec /bin/prometheus", "exec echo")
    done = subprocess.run(["/bin/sh", "-c", runnable, argv0, *prometheus["command"]], capture_output=True,
                          text=True, timeout=10, env={"PATH": os.environ["PATH"], "METRICS_TOKEN": "t0k en"})
    assert done.returncode == 0, done.stderr
    assert written.read_text() == "t0k en"
    assert oct(written.stat().st_mode & 0o777) == "0o600"
    assert done.stdout.split() == prometheus["command"]




def test_prometheus_config_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("promtool (Debian package prometheus) is required in CI")
        pytest.skip("promtool not installed")
    # promtool also checks that the token file exists: it is written when the container starts.
    config = load_yaml(PROMETHEUS_CONFIG)
    token = tmp_path / "metrics_token"
    token.write_text("token")
    for job in config["scrape_configs"]:
        job["authorization"]["credentials_file"] = str(token)
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config), encoding="utf-8")
    check = subprocess.run([promtool, "check", "config", str(checked)], capture_output=True,
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
    # State (the SQLite ledger and the spool) in a declared volume, not in the container's layer.
    [volume] = _instruction("VOLUME")
    volumes = json.loads(volume) if volume.startswith("[") else volume.split()
    assert "/data" in volumes
    assert "DATABASE_URL=sqlite+aiosqlite:////data/" in env
    assert "LEDGER_SPOOL_DIR=/data/" in env
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
