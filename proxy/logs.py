"""The aiohttp server's log, kept free of what clients send.

aiohttp's parser refuses a malformed request (a stray CR, a DEL or NUL byte in a header line,
a line too long) with a 400, and its server logger writes the error at ERROR with a traceback
that quotes the offending line: `Authorization: Bearer sk-...` would land in the log, and keys
are never logged. Such records become one line: the error class and the peer, no request bytes.
"""

from __future__ import annotations

import ipaddress
import logging

from aiohttp.http_exceptions import HttpProcessingError

SERVER_LOGGER = "aiohttp.server"


class BadRequestFilter(logging.Filter):
    """Rewrites records caused by a request the HTTP parser refused; every other record (the
    server's own failures) passes as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not _refused_request(exc):
            return True
        record.msg = "Refused a malformed HTTP request from %s: %s (its bytes are not logged)"
        record.args = (_peer(record.args), type(exc).__name__)
        # A client's malformed request is no failure of the proxy: a warning, not an error.
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def _refused_request(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 8:  # the error, or what caused it
        if isinstance(exc, HttpProcessingError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _peer(args: object) -> str:
    """aiohttp's one argument, `request.remote`, when it is an address: nothing else is kept."""
    if isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], str):
        try:
            return str(ipaddress.ip_address(args[0]))
        except ValueError:
            pass
    return "an unknown peer"


def server_logger() -> logging.Logger:
    """aiohttp's server logger with the filter on (once), for the server's `logger` option."""
    logger = logging.getLogger(SERVER_LOGGER)
    if not any(isinstance(f, BadRequestFilter) for f in logger.filters):
        logger.addFilter(BadRequestFilter())
    return logger
