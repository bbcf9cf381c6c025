"""What one span holds, and its attributes (GenAI semantic conventions, v1.37+ names).

A `Span` is made on the request path with references only (no formatting, no copies); the
attributes are derived from it later, in the background, by `attributes()`. Pure.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, cast

import orjson

from costing.budget import Budget
from costing.endpoints import REALTIME_TRANSCRIPTION
from costing.money import SCALE
from costing.records import UsageEntry
from costing.usage import Operation, Reported, RequestFacts

if TYPE_CHECKING:
    from tracing.recorder import Tracer

Value = str | bool | int | float | list[str]
Attributes = list[tuple[str, Value]]

# gen_ai.operation.name: the conventions call a Responses API call `chat` too, and tell the two
# OpenAI APIs apart with `openai.api.type` (chat_completions / responses).
OPERATION_NAMES = {
    Operation.CHAT.value: ("chat", "chat_completions"),
    Operation.COMPLETIONS.value: ("text_completion", "completions"),
    Operation.EMBEDDINGS.value: ("embeddings", "embeddings"),
    Operation.RESPONSES.value: ("chat", "responses"),
    # One span per response of a Realtime WebSocket session (see proxy.realtime).
    "realtime": ("chat", "realtime"),
    # A Realtime session's input audio transcription: no GenAI name, the ledger's (see above).
    REALTIME_TRANSCRIPTION: (REALTIME_TRANSCRIPTION, "realtime"),
}


def operation_names(operation: str) -> tuple[str, str | None]:
    """gen_ai.operation.name and openai.api.type of one of the proxy's operations; a billable
    call it cannot price (`images.generations`, `audio.speech`...) is named as the ledger names
    it, the conventions having no name for it."""
    return OPERATION_NAMES.get(operation) or (operation, None)


PROVIDER = "openai"
UNTAGGED = "_untagged"
CONTENT_LIMIT = 16 * 1024  # characters per captured-content attribute; longer JSON is cut
_FINISH_REASON = re.compile(rb'"finish_reason"\s*:\s*"([A-Za-z_]{1,40})"')
_RESPONSE_STATUS = re.compile(rb'"type"\s*:\s*"response\.(completed|incomplete|failed)"')
_INCOMPLETE_REASON = re.compile(rb'"incomplete_details"\s*:\s*\{\s*"reason"\s*:\s*"([A-Za-z_]{1,40})"')
_MAX_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_INPUT_FIELDS = {
    Operation.CHAT.value: "messages", Operation.COMPLETIONS.value: "prompt",
    Operation.EMBEDDINGS.value: "input", Operation.RESPONSES.value: "input",
}


class Span:
    """One metered call: ids and start from the request's arrival; outcome from its end.

    Slotted and positional: one is made per sampled call.
    """

    __slots__ = ("campaign_id", "content", "end_ns", "entry", "error_type", "facts", "finish", "max_tokens",
                 "operation", "parent_span_id", "reported", "session_id", "span_id", "spent_budget",
                 "start_ns", "status", "trace_id", "tracer", "tracestate")

    def __init__(self, tracer: Tracer, trace_id: str, span_id: str, parent_span_id: str | None,
                 tracestate: str | None, start_ns: int, operation: str, campaign_id: str,
                 session_id: str, facts: RequestFacts, max_tokens: int | None,
                 content: Any) -> None:
        self.tracer = tracer
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self.tracestate = tracestate
        self.start_ns = start_ns
        self.operation = operation
        self.campaign_id = campaign_id
        self.session_id = session_id
        self.facts = facts
        self.max_tokens = max_tokens
        self.content = content  # (input, output) references when content capture is on
        self.end_ns = 0
        self.status = 0
        self.error_type: str | None = None
        self.entry: UsageEntry | None = None
        self.reported: Reported | None = None
        # finish reasons (str) of an answer, or (bytes) the stretches of a stream that name them
        self.finish: list[str] | list[bytes] | None = None
        self.spent_budget: tuple[int, Budget] | None = None

    @property
    def name(self) -> str:
        operation = operation_names(self.operation)[0]
        model = self.facts.model
        return f"{operation} {model}" if model else operation


def max_tokens(body: dict[str, Any]) -> int | None:
    """`max_tokens` (or its newer names) as the request sent it."""
    for key in _MAX_OUTPUT_FIELDS:
        value = body.get(key)
        if type(value) is int:
            return value
    return None


def request_content(operation: str, body: dict[str, Any]) -> Any:
    """The prompt part of a request body (a reference; serialized later)."""
    field = _INPUT_FIELDS.get(operation)  # none for Realtime: its input is a stream of events
    if field is None:
        return None
    value = body.get(field)
    if operation == Operation.RESPONSES.value and body.get("instructions"):
        return {"instructions": body.get("instructions"), "input": value}
    return value


def body_outcome(operation: str, body: Any, capture: bool) -> tuple[list[str] | None, Any]:
    """Finish reasons (and the output, when captured) of a decoded non-streamed answer."""
    if not isinstance(body, dict):
        return None, None
    if operation == Operation.RESPONSES.value:
        status = body.get("status")
        if not isinstance(status, str):
            return None, None
        reason = _response_reason(status, body.get("incomplete_details"))
        return [reason], body.get("output") if capture else None
    choices = body.get("choices")
    if not isinstance(choices, list):
        return None, None
    reasons = [c["finish_reason"] for c in choices
               if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)]
    return reasons, choices if capture else None


def _response_reason(status: str, details: Any) -> str:
    if status == "completed":
        return "stop"
    if status == "incomplete" and isinstance(details, dict) and isinstance(details.get("reason"), str):
        return "length" if details["reason"] == "max_output_tokens" else details["reason"]
    return "error" if status == "failed" else status


def stream_finish_reasons(operation: str, tail: bytes) -> list[str] | None:
    """Finish reasons found in the end of a stream: the chunk that carries them comes just
    before the usage chunk; a Responses stream's terminal event names its status."""
    if operation == Operation.RESPONSES.value:
        found = _RESPONSE_STATUS.search(tail)
        if found is None:
            return None
        status = found.group(1).decode()
        reason = _INCOMPLETE_REASON.search(tail)
        details = {"reason": reason.group(1).decode()} if reason else None
        return [_response_reason(status, details)]
    reasons = [m.decode() for m in _FINISH_REASON.findall(tail)]
    return reasons or None


def budget_status(spent: int, budget: Budget) -> str:
    if spent >= budget.limit_units:
        return "exceeded"
    return "warning" if spent >= budget.warning_units else "ok"


def content_json(value: Any) -> str:
    try:
        text = orjson.dumps(value, default=str).decode()
    except TypeError:
        text = str(value)
    return text if len(text) <= CONTENT_LIMIT else text[:CONTENT_LIMIT]


def _input_messages(operation: str, value: Any) -> Any:
    """Chat messages as the conventions shape them: role and parts."""
    if operation != Operation.CHAT.value or not isinstance(value, list):
        return value
    return [{"role": m.get("role"), "parts": _parts(m.get("content"))} if isinstance(m, dict) else m
            for m in value]


def _parts(content: Any) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    if isinstance(content, list):
        return [{"type": "text", "content": p.get("text")} if isinstance(p, dict) and p.get("type") == "text"
                else p for p in content]
    return [] if content is None else [content]


def _output_messages(operation: str, value: Any) -> Any:
    if operation not in (Operation.CHAT.value, Operation.COMPLETIONS.value) or not isinstance(value, list):
        return value
    out = []
    for choice in value:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        out.append({"role": "assistant", "parts": _parts(text),
                    "finish_reason": choice.get("finish_reason")})
    return out


Shape = tuple[Any, ...]
"""The values a span's repeating attributes come from (see `shape`)."""


def shape(span: Span, server: tuple[str, int]) -> Shape:
    """What spans share with many others (operation, models, campaign, session, status, flags,
    finish reasons): hashable, so the encoder can reuse their encoded attributes."""
    facts, reported, entry = span.facts, span.reported, span.entry
    finish = span.finish
    reasons: list[str] | None
    if finish and isinstance(finish[0], bytes):
        reasons = stream_finish_reasons(span.operation, b"".join(cast(list[bytes], finish)))
    else:
        reasons = cast(list[str] | None, finish)
    return (span.operation, facts.model, facts.stream, span.max_tokens,
            reported.model if reported is not None else None, span.campaign_id, span.session_id,
            span.status, span.error_type, tuple(reasons) if reasons else None,
            entry.estimated if entry is not None else False,
            entry.priced_by_default if entry is not None else False,
            budget_status(*span.spent_budget) if span.spent_budget is not None else None, server)


def repeating_attributes(values: Shape) -> Attributes:
    """The attributes of a span's `shape`, typed as the conventions say."""
    (operation_key, model, stream, max_tokens, response_model, campaign_id, session_id, status,
     error_type, reasons, estimated, priced_by_default, budget, server) = values
    operation, api_type = operation_names(operation_key)
    attrs: Attributes = [
        ("gen_ai.operation.name", operation),
        ("gen_ai.provider.name", PROVIDER),
    ]
    if api_type is not None:
        attrs.append(("openai.api.type", api_type))
    attrs += [
        ("server.address", server[0]),
        ("server.port", server[1]),
        ("llm_proxy.campaign.id", campaign_id),
        ("llm_proxy.session.id", session_id),
        ("llm_proxy.cost.estimated", estimated),
        ("llm_proxy.priced_by_default", priced_by_default),
    ]
    if model:
        attrs.append(("gen_ai.request.model", model))
    if stream:
        attrs.append(("gen_ai.request.stream", True))
    if max_tokens is not None:
        attrs.append(("gen_ai.request.max_tokens", max_tokens))
    if session_id != UNTAGGED:
        attrs.append(("gen_ai.conversation.id", session_id))
    if response_model:
        attrs.append(("gen_ai.response.model", response_model))
    if reasons:
        attrs.append(("gen_ai.response.finish_reasons", list(reasons)))
    if budget is not None:
        attrs.append(("llm_proxy.budget.status", budget))
    if status:
        attrs.append(("http.response.status_code", status))
    if error_type:
        attrs.append(("error.type", error_type))
    return attrs


def varying_attributes(span: Span) -> Attributes:
    """The attributes that differ from span to span: response id, token counts, cost, content."""
    attrs: Attributes = []
    reported, entry = span.reported, span.entry
    if reported is not None and reported.response_id:
        attrs.append(("gen_ai.response.id", reported.response_id))
    if entry is not None:
        usage = entry.usage
        attrs += [
            ("gen_ai.usage.input_tokens", usage.input_tokens),
            ("gen_ai.usage.output_tokens", usage.output_tokens),
            ("gen_ai.usage.cache_read.input_tokens", usage.cached_input_tokens),
            ("gen_ai.usage.reasoning.output_tokens", usage.reasoning_tokens),
        ]
        if usage.cache_write_input_tokens:  # the newest models only: no attribute on the others
            attrs.append(("gen_ai.usage.cache_creation.input_tokens", usage.cache_write_input_tokens))
    cost = entry.cost_units / SCALE if entry is not None else 0.0
    attrs += [("llm_proxy.cost.usd", cost), ("gen_ai.usage.cost", cost)]
    return attrs + content_attributes(span)


def content_attributes(span: Span) -> Attributes:
    """Captured message content (OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true only)."""
    if span.content is None:
        return []
    attrs: Attributes = []
    request, answer = span.content
    if request is not None:
        attrs.append(("gen_ai.input.messages", content_json(_input_messages(span.operation, request))))
    if answer is not None:
        attrs.append(("gen_ai.output.messages", content_json(_output_messages(span.operation, answer))))
    return attrs


def attributes(span: Span, server: tuple[str, int]) -> Attributes:
    """All of a span's attributes (GenAI semantic conventions, v1.37+ names, and the proxy's own)."""
    return repeating_attributes(shape(span, server)) + varying_attributes(span)
