"""The /costs JSON API for the app's Cost Analytics tab: request parsing and JSON rendering only;
the work is done by `costing.reports`.

Access: with COSTS_API_TOKEN set, `Authorization: Bearer <token>` (constant-time compare);
unset, loopback clients only.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from costing import budget as rules
from costing.errors import InvalidBudget
from costing.money import MAX_USD, format_usd, parse_usd, to_units
from costing.records import CampaignTotals, DayTotals, SessionTotals, Totals
from costing.reports import MAX_DAYS, SESSION_ORDERS, CostReports
from costing.tasks import uninterrupted
from proxy import access, openapi
from proxy.errors import Handler, ProxyError, add_fallback, answering
from proxy.state import BROWSERS, FEED, GATE, LEDGER, SETTINGS, STORE
from proxy.tags import validate_tag

DEFAULT_PAGE, MAX_PAGE = 50, 500
DEFAULT_SESSIONS, MAX_SESSIONS = 1000, 5000
DEFAULT_DAYS = 30
ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

# -- rendering -------------------------------------------------------------------------------------


def timestamp(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def tokens_json(t: Totals) -> dict[str, int]:
    return {"input": t.input_tokens, "cached_input": t.cached_input_tokens,
            "output": t.output_tokens, "reasoning": t.reasoning_tokens,
            "audio_input": t.audio_input_tokens, "audio_output": t.audio_output_tokens,
            "cache_write_input": t.cache_write_input_tokens,
            "cached_audio_input": t.cached_audio_input_tokens}


def campaign_json(c: CampaignTotals) -> dict[str, Any]:
    spent = c.totals.cost_usd
    return {
        "campaign_id": c.campaign_id,
        "cost_usd": format_usd(spent),
        "requests": c.totals.requests,
        "tokens": tokens_json(c.totals),
        "session_count": c.session_count,
        "deleted_session_count": c.deleted_session_count,
        "deleted_sessions_cost_usd": format_usd(c.deleted_sessions_cost_usd),
        "budget": {
            "warning_usd": format_usd(c.budget.warning_usd),
            "limit_usd": format_usd(c.budget.limit_usd),
            "spent_usd": format_usd(spent),
            "remaining_usd": format_usd(rules.remaining(spent, c.budget)),
            "status": rules.status(spent, c.budget).value,
            "source": "override" if c.has_budget_override else "default",
        },
        "first_seen": timestamp(c.first_seen),
        "last_seen": timestamp(c.last_seen),
    }


def session_json(s: SessionTotals) -> dict[str, Any]:
    return {
        "campaign_id": s.campaign_id,
        "session_id": s.session_id,
        "cost_usd": format_usd(s.totals.cost_usd),
        "requests": s.totals.requests,
        "tokens": tokens_json(s.totals),
        "first_seen": timestamp(s.first_seen),
        "last_seen": timestamp(s.last_seen),
        "deleted_at": timestamp(s.deleted_at),
    }


def day_json(d: DayTotals) -> dict[str, Any]:
    return {"date": d.day.isoformat(), "cost_usd": format_usd(d.totals.cost_usd),
            "requests": d.totals.requests, "tokens": tokens_json(d.totals)}


def ok(body: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


# -- parameters ------------------------------------------------------------------------------------


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ProxyError(400, f"Query parameter '{name}' must be a whole number", code="invalid_parameter",
                         param=name) from None
    if not low <= value <= high:
        raise ProxyError(400, f"Query parameter '{name}' must be between {low} and {high}",
                         code="invalid_parameter", param=name)
    return value


def _bool_param(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ProxyError(400, f"Query parameter '{name}' must be true or false", code="invalid_parameter",
                         param=name)
    return raw in ("true", "1")


def _date_param(request: web.Request, name: str) -> date | None:
    """A YYYY-MM-DD date (exactly: not the other ISO forms `date.fromisoformat` takes), or None."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        if not ISO_DATE.fullmatch(raw):
            raise ValueError(raw)
        return date.fromisoformat(raw)
    except ValueError:
        raise ProxyError(400, f"Query parameter '{name}' must be a date as YYYY-MM-DD",
                         code="invalid_parameter", param=name) from None


def _days_before(day: date, days: int) -> date:
    """`day` minus `days`, stopping at the first representable date (no OverflowError)."""
    return day - timedelta(days=min(days, (day - date.min).days))


def encode_cursor(campaign_id: str) -> str:
    return base64.urlsafe_b64encode(campaign_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        return validate_tag(value, "cursor")
    except (binascii.Error, UnicodeDecodeError, ValueError, ProxyError):
        raise ProxyError(400, "Query parameter 'cursor' is not a cursor this API returned",
                         code="invalid_parameter", param="cursor") from None


def _campaign_id(request: web.Request) -> str:
    return validate_tag(request.match_info["campaign_id"], "campaign_id")


def _session_id(request: web.Request) -> str:
    return validate_tag(request.match_info["session_id"], "session_id")


def _reports(request: web.Request) -> CostReports:
    return CostReports(request.config_dict[STORE], request.config_dict.get(LEDGER))


# -- handlers --------------------------------------------------------------------------------------


async def list_campaigns(request: web.Request) -> web.Response:
    limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    cursor = request.query.get("cursor")
    after = decode_cursor(cursor) if cursor else None
    page, next_after = await _reports(request).campaigns(limit=limit, after=after)
    return ok({"campaigns": [campaign_json(c) for c in page],
               "next_cursor": encode_cursor(next_after) if next_after else None})


async def get_campaign(request: web.Request) -> web.Response:
    return ok(campaign_json(await _reports(request).campaign(_campaign_id(request))))


async def list_sessions(request: web.Request) -> web.Response:
    campaign_id = _campaign_id(request)
    order = request.query.get("order", "last_seen")
    if order not in SESSION_ORDERS:
        raise ProxyError(400, f"Query parameter 'order' must be one of {', '.join(SESSION_ORDERS)}",
                         code="invalid_parameter", param="order")
    limit = _int_param(request, "limit", DEFAULT_SESSIONS, 1, MAX_SESSIONS)
    # One more than asked for tells whether the list goes on (a page that sums it must know).
    sessions = await _reports(request).sessions(
        campaign_id, include_deleted=_bool_param(request, "include_deleted"), order_by=order,
        limit=limit + 1)
    return ok({"campaign_id": campaign_id, "sessions": [session_json(s) for s in sessions[:limit]],
               "has_more": len(sessions) > limit})


async def get_session(request: web.Request) -> web.Response:
    return ok(session_json(await _reports(request).session(_campaign_id(request), _session_id(request))))


async def delete_session(request: web.Request) -> web.Response:
    session = await _reports(request).delete_session(_campaign_id(request), _session_id(request))
    return ok(session_json(session))


async def daily(request: web.Request) -> web.Response:
    campaign_id = _campaign_id(request)
    today = datetime.now(UTC).date()
    end = _date_param(request, "to") or today
    start = _date_param(request, "from") or _days_before(end, DEFAULT_DAYS - 1)
    if start > end:
        raise ProxyError(400, "'from' must not be after 'to'", code="invalid_parameter", param="from")
    if (end - start).days >= MAX_DAYS:
        raise ProxyError(400, f"A range covers at most {MAX_DAYS} days", code="invalid_parameter",
                         param="from")
    days = await _reports(request).daily(campaign_id, start, end)
    return ok({"campaign_id": campaign_id, "from": start.isoformat(), "to": end.isoformat(),
               "days": [day_json(d) for d in days]})


def _amount(body: dict[str, Any], name: str) -> Decimal:
    if name not in body:
        raise InvalidBudget(f"'{name}' is required (a decimal number of USD, e.g. \"5.00\")", name)
    value = body[name]
    try:
        if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
            raise ValueError(value)
        return parse_usd(str(value))
    except ValueError:
        raise InvalidBudget(f"'{name}' must be a decimal number of USD below {MAX_USD:,}, "
                            "e.g. \"5.00\"", name) from None


async def put_budget(request: web.Request) -> web.Response:
    campaign_id = _campaign_id(request)
    try:
        body = json.loads(await request.read(), parse_float=Decimal, parse_int=Decimal)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProxyError(400, f"The body must be JSON like {{\"warning_usd\": \"1.00\", \"limit_usd\": "
                              f"\"5.00\"}} ({exc})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "The body must be a JSON object with warning_usd and limit_usd",
                         code="invalid_json")
    campaign = await _reports(request).set_budget(campaign_id, _amount(body, "warning_usd"),
                                                  _amount(body, "limit_usd"))
    _budget_changed(request, campaign)
    return ok(campaign_json(campaign))


async def delete_budget(request: web.Request) -> web.Response:
    campaign_id = _campaign_id(request)
    campaign = await _reports(request).clear_budget(campaign_id)
    _budget_changed(request, campaign)
    return ok(campaign_json(campaign))


def _budget_changed(request: web.Request, campaign: CampaignTotals) -> None:
    """The gate re-reads the budget; the live feed announces it."""
    request.config_dict[GATE].forget(campaign.campaign_id)
    feed = request.config_dict.get(FEED)
    if feed is not None:
        feed.budget_changed(campaign.campaign_id, to_units(campaign.totals.cost_usd), campaign.budget)


# -- access ----------------------------------------------------------------------------------------


is_loopback = access.is_loopback  # the rule's old home; callers may still import it from here


def check_access(request: web.Request) -> None:
    """Raise unless the caller may use /costs: not a web page's request (proxy.browsers), and the
    token, or loopback when no token is set."""
    check_browser(request)
    access.check(request, request.config_dict[SETTINGS].costs_api_token, "/costs", "COSTS_API_TOKEN")


def check_browser(request: web.Request) -> None:
    """The browser rule alone (proxy.browsers): for the routes whose token check is their own."""
    request.config_dict[BROWSERS].check(request)


def guarded(handler: Handler) -> Handler:
    """`handler` behind the access rule, answering errors in the error shape.

    A client that leaves early does not cut the handler's database work short (see
    `costing.tasks`); its answer is dropped instead.
    """

    async def checked(request: web.Request) -> web.StreamResponse:
        check_access(request)
        return await uninterrupted(handler(request))

    return answering(functools.wraps(handler)(checked))


def setup(app: web.Application, *, events: Handler | None = None) -> None:
    """Mount /costs as a sub-application: its access rule never touches the /v1 hot path.
    `events` is the live feed's handler (proxy.feed), which checks access itself."""
    costs = web.Application()
    r = costs.router
    if events is not None:
        r.add_get("/events", answering(events))
    r.add_get("/openapi.json", guarded(openapi.serve))
    r.add_get("/campaigns", guarded(list_campaigns))
    r.add_get("/campaigns/{campaign_id}", guarded(get_campaign))
    r.add_get("/campaigns/{campaign_id}/sessions", guarded(list_sessions))
    r.add_get("/campaigns/{campaign_id}/sessions/{session_id}", guarded(get_session))
    r.add_delete("/campaigns/{campaign_id}/sessions/{session_id}", guarded(delete_session))
    r.add_get("/campaigns/{campaign_id}/daily", guarded(daily))
    r.add_put("/campaigns/{campaign_id}/budget", guarded(put_budget))
    r.add_delete("/campaigns/{campaign_id}/budget", guarded(delete_budget))
    add_fallback(costs)
    app.add_subapp("/costs", costs)
