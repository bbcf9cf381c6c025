"""Campaign and session tags: validated header values, with a default for untagged calls."""

from __future__ import annotations

import re

from multidict import CIMultiDictProxy

from proxy.errors import ProxyError

TAG = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
UNTAGGED = "_untagged"


def tag_value(headers: CIMultiDictProxy[str], name: str) -> str:
    """The tag in header `name`: absent -> `_untagged`; anything invalid -> ProxyError(400)."""
    values = headers.getall(name, [])
    if not values:
        return UNTAGGED
    if len(values) > 1:
        raise ProxyError(400, f"Send the {name} header once (got {len(values)} values)",
                         code="invalid_tag", param=name)
    value = values[0]
    if not TAG.fullmatch(value):
        raise ProxyError(
            400, f"Invalid {name} header: use 1-128 characters of letters, digits and _ . : - "
                 f"(got {len(value)} characters)", code="invalid_tag", param=name)
    return value


def validate_tag(value: str, what: str) -> str:
    """The same rule for ids in /costs paths."""
    if not TAG.fullmatch(value):
        raise ProxyError(400, f"Invalid {what}: use 1-128 characters of letters, digits and _ . : -",
                         code="invalid_id", param=what)
    return value
