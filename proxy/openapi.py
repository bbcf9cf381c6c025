"""The OpenAPI 3.1 description of the /costs API, served at `GET /costs/openapi.json`.

Built from the same constants the handlers use (page sizes, session orders, day range, budget
cap), so limits cannot drift; `tests/proxy/test_openapi.py` checks that every route of the /costs
sub-app is described here and fuzzes the live API against this document.
"""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Any

import orjson
from aiohttp import web

from costing.budget import BudgetStatus
from costing.money import MAX_USD
from costing.reports import MAX_DAYS, SESSION_ORDERS

ID_PATTERN = r"^(?!\.\.?$)[A-Za-z0-9_.:-]{1,128}$"
MONEY_PATTERN = r"^[0-9]+\.[0-9]{2,10}$"
AMOUNT_PATTERN = r"^[0-9]+(\.[0-9]+)?$"
DATE_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
CURSOR_PATTERN = r"^[A-Za-z0-9_-]*$"

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": _json(_ref(schema))}


def _err(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _errors(*statuses: int) -> dict[str, Any]:
    names = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
             413: "TooLarge", 422: "InvalidBudget", 500: "InternalError", 503: "Unavailable"}
    return {str(status): _err(names[status]) for status in (*statuses, 401, 403, 500)}


def _object(properties: dict[str, Any], *, required: list[str] | None = None,
            description: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }
    if description:
        schema["description"] = description
    return schema


def _path_id(name: str, what: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "description": f"The {what} id, as sent in the tag header (1-128 characters of letters, "
                           "digits and `_ . : -`, not `.` or `..` alone). Anything else is refused "
                           "with 400 `invalid_id`.",
            "schema": {"type": "string", "pattern": ID_PATTERN, "minLength": 1, "maxLength": 128}}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema}


def _schemas(max_budget: int) -> dict[str, Any]:
    timestamp = {"type": "string", "format": "date-time",
                 "description": "ISO 8601 UTC with milliseconds, e.g. `2026-11-25T10:04:05.123Z`"}
    nullable_timestamp = {**timestamp, "type": ["string", "null"]}
    count = {"type": "integer", "minimum": 0}
    amount = {
        "description": f"USD, below {max_budget}: a decimal string (preferred, exact) or a JSON number",
        "oneOf": [
            {"type": "string", "pattern": AMOUNT_PATTERN, "maxLength": 40, "examples": ["5.00"]},
            {"type": "number", "minimum": 0, "exclusiveMaximum": max_budget},
        ],
    }
    return {
        "Error": _object(
            {"error": _object({
                "message": {"type": "string"},
                "type": {"type": "string", "examples": ["invalid_request_error"]},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"], "examples": ["not_found"]},
            })},
            description="Every error the proxy itself produces, in OpenAI's error shape."),
        "Money": {"type": "string", "pattern": MONEY_PATTERN,
                  "description": "USD as a plain decimal string with at least cents and at most 10 "
                                 "decimals, never an exponent: `\"0.000054\"`, `\"5.00\"`.",
                  "examples": ["0.000054", "5.00"]},
        "Tokens": _object(
            {"input": count, "cached_input": count, "output": count, "reasoning": count,
             "audio_input": count, "audio_output": count, "cache_write_input": count,
             "cached_audio_input": count},
            description="`input` includes cached, cache-write and audio input, `output` includes "
                        "reasoning and audio output (as OpenAI counts them); `cached_audio_input` "
                        "is the audio part of `cached_input` (Realtime), `audio_input` the "
                        "uncached audio."),
        "Budget": _object({
            "warning_usd": _ref("Money"),
            "limit_usd": _ref("Money"),
            "spent_usd": _ref("Money"),
            "remaining_usd": _ref("Money"),
            "status": {"type": "string", "enum": [s.value for s in BudgetStatus]},
            "source": {"type": "string", "enum": ["default", "override"],
                       "description": "`override` when set with PUT .../budget, else the defaults "
                                      "from COST_WARNING_THRESHOLD_USD / COST_LIMIT_THRESHOLD_USD"},
        }),
        "UsageEvent": _object({
            "campaign_id": {"type": "string", "pattern": ID_PATTERN},
            "session_id": {"type": "string", "pattern": ID_PATTERN},
            "model": {"type": ["string", "null"]},
            "cost_usd": _ref("Money"),
            "tokens": _ref("Tokens"),
            "estimated": {"type": "boolean"},
            "at": timestamp,
            "campaign_cost_usd": _ref("Money"),
            "session_cost_usd": {"oneOf": [_ref("Money"), {"type": "null"}]},
            "budget_status": {"type": "string", "enum": [s.value for s in BudgetStatus]},
        }, description="The data of an `event: usage` of GET /costs/events: one recorded call, and "
                       "its campaign's and session's totals right after it."),
        "Campaign": _object({
            "campaign_id": {"type": "string", "pattern": ID_PATTERN},
            "cost_usd": _ref("Money"),
            "requests": count,
            "tokens": _ref("Tokens"),
            "session_count": {**count, "description": "Every session ever seen, deleted ones included"},
            "deleted_session_count": count,
            "deleted_sessions_cost_usd": {**_ref("Money"),
                                          "description": "Part of `cost_usd` spent in deleted sessions"},
            "budget": _ref("Budget"),
            "first_seen": {**nullable_timestamp,
                           "description": "Null for a campaign that has a budget but no usage yet"},
            "last_seen": nullable_timestamp,
        }),
        "CampaignList": _object({
            "campaigns": {"type": "array", "items": _ref("Campaign")},
            "next_cursor": {"type": ["string", "null"], "pattern": CURSOR_PATTERN,
                            "description": "Pass as `cursor` for the next page; null on the last page"},
        }),
        "Session": _object({
            "campaign_id": {"type": "string", "pattern": ID_PATTERN},
            "session_id": {"type": "string", "pattern": ID_PATTERN},
            "cost_usd": _ref("Money"),
            "requests": count,
            "tokens": _ref("Tokens"),
            "first_seen": timestamp,
            "last_seen": timestamp,
            "deleted_at": {**nullable_timestamp, "description": "Null unless the session was deleted"},
        }),
        "SessionList": _object({
            "campaign_id": {"type": "string", "pattern": ID_PATTERN},
            "sessions": {"type": "array", "items": _ref("Session")},
            "has_more": {"type": "boolean",
                         "description": "More sessions than `limit`: the list is the first of them"},
        }),
        "Day": _object({
            "date": {"type": "string", "format": "date", "pattern": DATE_PATTERN},
            "cost_usd": _ref("Money"),
            "requests": count,
            "tokens": _ref("Tokens"),
        }),
        "Daily": _object({
            "campaign_id": {"type": "string", "pattern": ID_PATTERN},
            "from": {"type": "string", "format": "date", "pattern": DATE_PATTERN},
            "to": {"type": "string", "format": "date", "pattern": DATE_PATTERN},
            "days": {"type": "array", "items": _ref("Day"), "minItems": 1, "maxItems": MAX_DAYS,
                     "description": "Every UTC day of the range in order, zero-filled"},
        }),
        "BudgetUpdate": {
            "type": "object",
            "required": ["warning_usd", "limit_usd"],
            "properties": {"warning_usd": amount, "limit_usd": amount},
            "description": "Both amounts zero or more and `warning_usd` <= `limit_usd`, else 422 "
                           "`invalid_budget`. Other fields are ignored.",
            "examples": [{"warning_usd": "2.00", "limit_usd": "10.00"}],
        },
    }


def _responses() -> dict[str, Any]:
    def error(description: str) -> dict[str, Any]:
        return {"description": description, "content": _json(_ref("Error"))}

    return {
        "BadRequest": error("Invalid path id (`invalid_id`), query parameter (`invalid_parameter`) "
                            "or body that is not a JSON object (`invalid_json`)."),
        "Unauthorized": error("COSTS_API_TOKEN is set and the request lacks `Authorization: Bearer "
                              "<token>` (`invalid_costs_token`)."),
        "Forbidden": error("COSTS_API_TOKEN is unset and the client is not on loopback "
                           "(`costs_loopback_only`); a browser's request for a page of another "
                           "origin (`origin_not_allowed`, see PROXY_ALLOWED_ORIGINS); a `Host` that "
                           "may be a DNS-rebinding page's (`host_not_allowed`, see "
                           "PROXY_ALLOWED_HOSTS)."),
        "NotFound": error("Unknown campaign or session (`not_found`)."),
        "TooLarge": error("The body exceeds MAX_REQUEST_BODY_BYTES (`request_too_large`)."),
        "InvalidBudget": error("A budget amount is missing, not a number, negative, too large, or the "
                               "warning is above the limit (`invalid_budget`, `param` names the field)."),
        "InternalError": error("Unexpected failure, e.g. the database is unreachable (`internal_error`)."),
        "Unavailable": error("The live feed already serves LIVE_MAX_SUBSCRIBERS streams "
                             "(`too_many_subscribers`); retry after `Retry-After` seconds."),
    }


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once; treat as read-only)."""
    from proxy import costs_api as api  # the handlers' limits; imported late: costs_api imports us

    campaign = _path_id("campaign_id", "campaign")
    session = _path_id("session_id", "session")
    try:
        version = metadata.version("llm-cost-proxy")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    paths: dict[str, Any] = {
        "/costs/openapi.json": {"get": {
            "operationId": "getOpenApi", "summary": "This document", "tags": ["meta"],
            "responses": {"200": {"description": "The OpenAPI 3.1 document",
                                  "content": _json({"type": "object"})},
                          **_errors()}}},
        "/costs/events": {"get": {
            "operationId": "followEvents", "summary": "Live cost events (Server-Sent Events)",
            "tags": ["live"],
            "description": (
                "`event: usage` after each recorded call (data: `UsageEvent`), `event: budget` when "
                "a campaign's status changes or its budget is edited (data: `Budget` plus "
                "`campaign_id`), `event: resync` when events were missed (reload /costs, then "
                "follow on). Every event has an `id:`; send it back as `Last-Event-ID` to resume. "
                "A comment line comes at least every 15 s. With COSTS_API_TOKEN set, the token "
                "is also accepted as `?token=` (a browser's EventSource cannot send headers)."),
            "parameters": [
                _query("campaign_id", "Only this campaign's events",
                       {"type": "string", "pattern": ID_PATTERN, "minLength": 1, "maxLength": 128}),
                _query("token", "COSTS_API_TOKEN, for clients that cannot send headers",
                       {"type": "string"}),
                {"name": "Last-Event-ID", "in": "header", "required": False,
                 "description": "The id of the last event received, to resume after it",
                 "schema": {"type": "string", "maxLength": 100}},
            ],
            "responses": {"200": {"description": "An endless event stream",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                          **_errors(400, 503)}}},
        "/costs/campaigns": {"get": {
            "operationId": "listCampaigns", "summary": "Campaigns with totals, ordered by id",
            "parameters": [
                _query("limit", "Page size",
                       {"type": "integer", "minimum": 1, "maximum": api.MAX_PAGE,
                        "default": api.DEFAULT_PAGE}),
                _query("cursor", "Opaque `next_cursor` of the previous page; empty = first page",
                       {"type": "string", "pattern": CURSOR_PATTERN, "maxLength": 200}),
            ],
            "responses": {"200": _ok("One page of campaigns", "CampaignList"), **_errors(400)}}},
        "/costs/campaigns/{campaign_id}": {
            "parameters": [campaign],
            "get": {
                "operationId": "getCampaign",
                "summary": "Totals, session count, cost of deleted sessions, budget, first/last seen",
                "responses": {"200": _ok("The campaign", "Campaign"), **_errors(400, 404)}}},
        "/costs/campaigns/{campaign_id}/sessions": {
            "parameters": [campaign],
            "get": {
                "operationId": "listSessions", "summary": "Per-session breakdown of a campaign",
                "parameters": [
                    _query("include_deleted", "Also list deleted sessions (`true`/`false`, `1`/`0`)",
                           {"type": "boolean", "default": False}),
                    _query("order", "Newest activity, highest cost or newest first activity first",
                           {"type": "string", "enum": list(SESSION_ORDERS), "default": "last_seen"}),
                    _query("limit", "At most this many sessions",
                           {"type": "integer", "minimum": 1, "maximum": api.MAX_SESSIONS,
                            "default": api.DEFAULT_SESSIONS}),
                ],
                "responses": {"200": _ok("The sessions", "SessionList"), **_errors(400, 404)}}},
        "/costs/campaigns/{campaign_id}/sessions/{session_id}": {
            "parameters": [campaign, session],
            "get": {
                "operationId": "getSession", "summary": "One session's totals (deleted ones too)",
                "responses": {"200": _ok("The session", "Session"), **_errors(400, 404)}},
            "delete": {
                "operationId": "deleteSession",
                "summary": "Mark the session deleted; its cost stays in the campaign totals",
                "description": "Idempotent: the first deletion time is kept.",
                "responses": {"200": _ok("The session, with `deleted_at` set", "Session"),
                              **_errors(400, 404)}}},
        "/costs/campaigns/{campaign_id}/daily": {
            "parameters": [campaign],
            "get": {
                "operationId": "getDaily", "summary": "Cost and tokens per UTC day (trends)",
                "parameters": [
                    _query("from", f"First day (default: `to` minus {api.DEFAULT_DAYS - 1} days); "
                                   f"the range covers at most {MAX_DAYS} days",
                           {"type": "string", "format": "date", "pattern": DATE_PATTERN}),
                    _query("to", "Last day, inclusive (default: today, UTC)",
                           {"type": "string", "format": "date", "pattern": DATE_PATTERN}),
                ],
                "responses": {"200": _ok("Every day of the range, zero-filled", "Daily"),
                              **_errors(400, 404)}}},
        "/costs/campaigns/{campaign_id}/budget": {
            "parameters": [campaign],
            "put": {
                "operationId": "putBudget",
                "summary": "Override the campaign's budget (creates the campaign if it has no usage yet)",
                "requestBody": {"required": True, "content": _json(_ref("BudgetUpdate"))},
                "responses": {"200": _ok("The campaign with its new budget", "Campaign"),
                              **_errors(400, 413, 422)}},
            "delete": {
                "operationId": "deleteBudget", "summary": "Revert to the default budget",
                "responses": {"200": _ok("The campaign with the default budget", "Campaign"),
                              **_errors(400, 404)}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-cost-proxy /costs API",
            "version": version,
            "description": "Token cost analytics and budgets per campaign and session. Loopback "
                           "clients only, unless COSTS_API_TOKEN is set (then a bearer token is "
                           "required). Every error is `{\"error\": {message, type, param, code}}`.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(int(MAX_USD)),
            "responses": _responses(),
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "The COSTS_API_TOKEN value. Without COSTS_API_TOKEN no token is "
                               "needed, but only loopback clients are served."}},
        },
        "security": [{"bearerAuth": []}, {}],
    }


@functools.cache
def _body() -> bytes:
    return orjson.dumps(document())


async def serve(_request: web.Request) -> web.Response:
    """`GET /costs/openapi.json`."""
    return web.Response(body=_body(), content_type="application/json")
