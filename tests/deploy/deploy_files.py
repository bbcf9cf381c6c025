"""Readers for the deployment files (docker-compose.yml, Dockerfile, prometheus/, grafana/) shared by
the tests in this folder."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS_CONFIG = ROOT / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards"
DASHBOARDS = GRAFANA / "dashboards"

# What the e2e test puts for Grafana's interval macros: wide enough for a few 1 s scrapes.
INTERVAL_MACROS = ("$__rate_interval", "${__rate_interval}", "$__interval", "${__interval}",
                   "$__range", "${__range}")


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "no services in compose"
    return data


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    result: dict[str, Any] = services[name]
    return result


_INTERPOLATION = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str] | None = None) -> str:
    """Compose interpolation as `docker compose` does it for an (by default empty) shell environment:
    `${VAR:-default}`, `${VAR-default}`, `${VAR}`, `$VAR`, and `$$` for a literal `$`."""
    env = env or {}

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, default = match.group(2), match.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        if op in (":?", "?"):
            assert name in env, f"${{{name}}} is required by docker-compose.yml"
        return env.get(name, "")

    return _INTERPOLATION.sub(replace, str(value))


# What a user must set for `docker compose up` (`${VAR:?...}` in docker-compose.yml).
REQUIRED = {"METRICS_TOKEN": "metrics-token-1234", "GRAFANA_ADMIN_PASSWORD": "grafana-pw-1234"}


def environment(svc: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, str]:
    """A service's environment (map or list form), interpolated with a shell environment holding
    only the required variables (or `env`)."""
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    shell = REQUIRED if env is None else env
    return {str(k): interpolate("" if v is None else v, shell) for k, v in raw.items()}


def published(svc: dict[str, Any], env: dict[str, str] | None = None) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of a service's `ports:` entries, interpolated;
    the address is "" when the entry names none (every interface)."""
    found = []
    for port in svc.get("ports") or []:
        if isinstance(port, dict):
            found.append((interpolate(port.get("host_ip", ""), env), int(interpolate(port["published"], env)),
                          int(port["target"])))
            continue
        parts = interpolate(port, env).split("/")[0].rsplit(":", 2)
        if len(parts) == 3:
            found.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            found.append(("", int(parts[0]), int(parts[1])))
        else:
            found.append(("", 0, int(parts[0])))
    return found


def bind_mounts(svc: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of a service's bind mounts (short and long volume syntax)."""
    mounts = []
    for volume in svc.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("type") != "bind":
                continue
            source, target = str(volume["source"]), str(volume["target"])
        else:
            source, target = str(volume).split(":")[:2]
            if not source.startswith((".", "/", "~")):
                continue  # a named volume
        mounts.append(((ROOT / source).resolve(), target))
    return mounts


def container_ports(svc: dict[str, Any]) -> list[int]:
    ports = []
    for port in svc.get("ports") or []:
        if isinstance(port, dict):
            ports.append(int(port["target"]))
        else:
            ports.append(int(str(port).split("/")[0].rsplit(":", 1)[-1]))
    return ports


COMPOSE_ONLY_MARKER = "# -- docker-compose.yml only"


def env_example(*, compose_only: bool = False) -> dict[str, str]:
    """Every proxy variable listed in .env.example with its (default) value; with `compose_only`,
    those of its docker-compose.yml section instead."""
    values = {}
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    proxy_part, _, compose_part = text.partition(COMPOSE_ONLY_MARKER)
    for line in (compose_part if compose_only else proxy_part).splitlines():
        match = re.match(r"^\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            values[match.group(1)] = match.group(2).strip()
    return values


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


def dashboards() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        with path.open(encoding="utf-8") as f:
            found.append((path, json.load(f)))
    return found


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those collapsed inside rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in all_panels(dashboard):
        if panel.get("type") == "row":
            continue
        for target in panel.get("targets", []):
            yield panel, target


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def runnable_promql(expr: str, dashboard: dict[str, Any], interval: str = "1m") -> str:
    """The expression as Grafana would send it with every variable at "All" (its allValue regex)."""
    for name, variable in variables(dashboard).items():
        all_value = variable.get("allValue") or ".*"
        expr = expr.replace("${" + name + "}", all_value).replace("$" + name, all_value)
    for macro in INTERVAL_MACROS:
        expr = expr.replace(macro, interval)
    assert "$" not in expr, f"unsubstituted variable left in {expr!r}"
    return expr
