"""Campaign and session tags: validated header values, with a default for untagged calls."""

from __future__ import annotations

import re

from multidict import CIMultiDictProxy

from proxy.errors import ProxyError

# Not `.` or `..`: as a path segment of /costs/campaigns/{id} a browser or curl would resolve
# it away (the cost page could never open such a campaign).
TAG = re.compile(r"(?!\.\.?\Z)[A-Za-z0-9_.:-]{1,128}")
RULE = "use 1-128 characters of letters, digits and _ . : - (not . or .. alone)"
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
            400, f"Invalid {name} header: {RULE}; got {len(value)} characters", code="invalid_tag",
            param=name)
    return value


def validate_tag(value: str, what: str) -> str:
    """The same rule for ids in /costs paths."""
    if not TAG.fullmatch(value):
        raise ProxyError(400, f"Invalid {what}: {RULE}", code="invalid_id", param=what)
    return value
