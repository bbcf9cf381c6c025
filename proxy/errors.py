"""The proxy's own errors in OpenAI's error shape, and the one place that maps exceptions to them."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from costing.errors import BudgetExceeded, InvalidBudget, LedgerUnavailable, NotFound

log = logging.getLogger(__name__)


class ProxyError(Exception):
    """An error answered in OpenAI's shape: `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def error_response(error: ProxyError) -> web.Response:
    return web.Response(status=error.status, body=error_body(error.message, error.type, error.code,
                                                           error.param),
                        content_type="application/json", headers=error.headers)


_HTTP_CODES = {404: ("not_found", "Not found: only /v1/..., /costs/..., /healthz, /readyz, "
                                  "/metrics and the cost page at / are served"),
               405: ("method_not_allowed", "Method not allowed on this path"),
               413: ("request_too_large", "Request body too large"),
               400: ("bad_request", "Bad request")}


def from_exception(exc: BaseException) -> ProxyError:
    """Map a domain or aiohttp exception to the error the client receives."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, BudgetExceeded):
        return ProxyError(429, str(exc), type="insufficient_quota", code="budget_exceeded",
                          headers={"x-should-retry": "false"})
    if isinstance(exc, LedgerUnavailable):
        return ProxyError(503, f"{exc}; retry shortly", type="service_unavailable",
                          code="cost_ledger_unavailable", headers={"Retry-After": "1"})
    if isinstance(exc, InvalidBudget):
        return ProxyError(422, str(exc), code="invalid_budget", param=exc.param)
    if isinstance(exc, NotFound):
        return ProxyError(404, str(exc), code="not_found")
    if isinstance(exc, web.HTTPException):
        code, default = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
        message = default if exc.status in _HTTP_CODES else (exc.text or exc.reason)
        if exc.status == 413:
            message = f"Request body too large: {exc.text}" if exc.text else default
        allow = exc.headers.get("Allow")
        return ProxyError(exc.status, message, code=code, headers={"Allow": allow} if allow else None)
    log.exception("unexpected error", exc_info=exc)
    return ProxyError(500, "The proxy failed to handle this request", type="server_error",
                      code="internal_error")


def answer(exc: Exception) -> web.Response:
    """The response for an exception a handler raised; redirects and the like are re-raised."""
    if isinstance(exc, web.HTTPException) and exc.status < 400:
        raise exc
    return error_response(from_exception(exc))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def answering(handler: Handler) -> Handler:
    """Wrap a handler so that whatever it raises is answered in the error shape.

    A wrapper per handler, not a middleware: any aiohttp middleware adds two coroutine frames
    (its own and aiohttp's current-app fixer) to every request, and the /v1 hot path would pay
    for them on each resume. `forward` catches its own errors the same way, through `answer`.
    """

    @functools.wraps(handler)
    async def answered(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:
            return answer(exc)

    return answered


async def not_found(request: web.Request) -> web.StreamResponse:
    """The last route of an application: 405 where another route has the path, else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            _match, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def add_fallback(app: web.Application) -> None:
    """Answer unknown paths and methods of `app` in the error shape (call after every route)."""
    app.router.add_route("*", "/{tail:.*}", answering(not_found))
