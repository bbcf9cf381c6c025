"""The OpenAPI document of /costs: valid OpenAPI 3.1, in step with the routes actually registered,
and true of the live API (schemathesis fuzzes a real proxy holding real traffic and validates every
answer: no 5xx, status documented, content type and body as documented)."""

from __future__ import annotations

import asyncio
import copy
import os
import sys
from collections import Counter, defaultdict
from typing import Any

import aiohttp
import pytest
import requests
import schemathesis
from conftest import make_settings
from hypothesis import HealthCheck, Phase, given, settings
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from proxy.app import create_app
from proxy.openapi import document

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
# COSTS_FUZZ_EXAMPLES=500 for a deeper (slower) run.
EXAMPLES_PER_OPERATION_AND_MODE = int(os.environ.get("COSTS_FUZZ_EXAMPLES", "40"))

# Campaign/session pairs that exist after seeding (plus unknown ones), so generated requests reach
# real rows, not only 404s.
SEEDED = {"alpha": ["s1", "s2", "s3"], "beta.2:x_y-z": ["only"]}
KNOWN_IDS = [("alpha", "s1"), ("alpha", "s2"), ("alpha", "s3"), ("beta.2:x_y-z", "only"),
             ("alpha", "nope"), ("ghost", "s1")]


def _costs_routes() -> set[tuple[str, str]]:
    """(method, path) of every route of the /costs sub-app, as aiohttp registered them."""
    app = create_app(make_settings())
    subapps = [r.get_info()["app"] for r in app.router.resources()
               if r.get_info().get("prefix") == "/costs" and "app" in r.get_info()]
    assert len(subapps) == 1, "the /costs sub-app is not mounted"
    # The fallback route ("*") answers unknown paths and methods with 404/405; it is not an
    # operation.
    routes = {(route.method.lower(), route.resource.canonical)
              for route in subapps[0].router.routes()
              if route.resource is not None and route.method != "*"}
    # aiohttp adds HEAD to every GET route on its own; HEAD is implied by GET in OpenAPI terms.
    return {(m, p) for m, p in routes if not (m == "head" and ("get", p) in routes)}


def _documented() -> set[tuple[str, str]]:
    return {(method, path) for path, item in document()["paths"].items()
            for method in item if method in HTTP_METHODS}


def test_document_is_valid_openapi_3_1():
    doc = document()
    assert doc["openapi"].startswith("3.1.")
    validate(copy.deepcopy(doc), cls=OpenAPIV31SpecValidator)
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        **doc["components"]["securitySchemes"]["bearerAuth"], "type": "http", "scheme": "bearer"}


def test_every_costs_route_is_documented_and_nothing_else():
    routes, documented = _costs_routes(), _documented()
    assert routes - documented == set(), "routes missing from proxy/openapi.py"
    assert documented - routes == set(), "documented operations that no route serves"


def test_every_operation_documents_its_errors_in_the_error_shape():
    doc = document()
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            statuses = set(operation["responses"])
            assert {"200", "401", "403", "500"} <= statuses, (method, path)
            if "{campaign_id}" in path:
                assert "400" in statuses, (method, path)
            for status, response in operation["responses"].items():
                if status != "200":
                    assert response["$ref"].startswith("#/components/responses/"), (method, path, status)
    for response in doc["components"]["responses"].values():
        assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}


async def test_the_document_is_served_under_the_costs_access_rule(start_proxy, fake):
    proxy = await start_proxy(costs_api_token="tok-123")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/costs/openapi.json") as response:
            assert response.status == 401
        async with http.get(f"{proxy.url}/costs/openapi.json",
                            headers={"Authorization": "Bearer tok-123"}) as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            assert await response.json() == document()


async def _seed(proxy: Any) -> None:
    for campaign, sessions in SEEDED.items():
        for i, session in enumerate(sessions):
            await proxy.client(campaign=campaign, session=session).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "roll for initiative " * (i + 1)}])
    await proxy.client(campaign="alpha", session="s2").embeddings.create(
        model="text-embedding-3-small", input="a goblin")
    await proxy.flush()
    async with aiohttp.ClientSession() as http:
        async with http.delete(f"{proxy.url}/costs/campaigns/alpha/sessions/s3") as response:
            assert response.status == 200
        async with http.put(f"{proxy.url}/costs/campaigns/beta.2:x_y-z/budget",
                            json={"warning_usd": "0.00", "limit_usd": "0.00"}) as response:
            assert response.status == 200


def _path_parameter_names(operation: Any) -> set[str]:
    return {p.name for p in operation.path_parameters}


def _property(strategy: Any, examples: int, base_url: str, http: requests.Session,
              counts: Counter[int]) -> Any:
    """A Hypothesis test: each generated case is sent to the live proxy and its answer checked."""

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case: Any) -> None:
        response = case.call_and_validate(base_url=base_url, session=http, checks=CHECKS, timeout=10)
        counts[response.status_code] += 1

    return check


def fuzz(base_url: str, examples: int) -> tuple[list[str], dict[str, Counter[int]]]:
    """Run every operation with positive and negative data, and positive data on seeded ids.

    Returns the failures and, per operation, how often each status was answered."""
    schema = schemathesis.openapi.from_dict(copy.deepcopy(document()))
    failures: list[str] = []
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    with requests.Session() as http:
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), result
            operation = result.ok()
            if operation.path == "/costs/events":
                continue  # an endless stream: tested in test_feed.py
            names = _path_parameter_names(operation)
            has_input = bool(names or operation.query or operation.body)
            runs: list[tuple[str, Any]] = [
                (mode.value, operation.as_strategy(generation_mode=mode))
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
                if has_input or mode is GenerationMode.POSITIVE  # nothing to make invalid otherwise
            ]
            if names:
                seeded = [{k: v for k, v in (("campaign_id", c), ("session_id", s)) if k in names}
                          for c, s in KNOWN_IDS]
                unique = [dict(t) for t in {tuple(sorted(p.items())) for p in seeded}]
                runs += [(f"seeded {p}", operation.as_strategy(path_parameters=p))
                         for p in sorted(unique, key=lambda p: sorted(p.items()))]
            counts = statuses[f"{operation.method.upper()} {operation.path}"]
            for label, strategy in runs:
                n = examples if not label.startswith("seeded") else max(3, examples // 5)
                try:
                    _property(strategy, n, base_url, http, counts)()
                except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup
                    failures.append(f"{operation.method.upper()} {operation.path} [{label}]: {exc}")
    return failures, statuses


@pytest.mark.slow
@pytest.mark.timeout(110)
async def test_live_api_conforms_to_the_document(proxy, fake):
    await _seed(proxy)
    failures, statuses = await asyncio.to_thread(fuzz, proxy.url, EXAMPLES_PER_OPERATION_AND_MODE)
    assert not failures, "\n\n".join(failures)
    print({operation: dict(sorted(counts.items())) for operation, counts in statuses.items()})
    # Every operation was exercised on real rows, not only rejected.
    assert {f"{m.upper()} {p}" for m, p in _documented() if p != "/costs/events"} == set(statuses)
    assert all(counts[200] for counts in statuses.values()), statuses
    # The fuzzing (DELETE session, PUT/DELETE budget included) never breaks the ledger invariant.
    from ledger_check import assert_aggregates_match_ledger

    await assert_aggregates_match_ledger(proxy.engine)


async def test_the_conformance_run_has_teeth(proxy, fake, monkeypatch):
    """A document that lies (money with exactly 3 decimals, no 404 for GET campaign) is caught."""
    await _seed(proxy)
    lying = copy.deepcopy(document())
    lying["components"]["schemas"]["Money"]["pattern"] = r"^[0-9]+\.[0-9]{3}$"
    del lying["paths"]["/costs/campaigns/{campaign_id}"]["get"]["responses"]["404"]
    monkeypatch.setattr(sys.modules[__name__], "document", lambda: lying)
    failures, _ = await asyncio.to_thread(fuzz, proxy.url, 5)
    text = "\n".join(failures)
    assert "Response violates schema" in text and "Undocumented status code" in text, text
