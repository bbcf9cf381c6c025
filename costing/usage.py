"""Token usage: what the upstream reported (pure parsing of OpenAI response bodies and stream
events) and what a request may cost at most (estimates used for budget reservations).

Shapes handled: chat completions, legacy completions, embeddings (`prompt_tokens` /
`completion_tokens`) and the Responses API (`input_tokens` / `output_tokens`), with cached
input, cache writes and reasoning details; streamed Responses report usage in their terminal event; Realtime
sessions in each `response.done` event (`input_token_details` / `output_token_details`) and each
input audio transcription's `completed` event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from costing.images import UNKNOWN, images_tokens


class Operation(StrEnum):
    """Metered operations, named by their OpenAI path."""

    CHAT = "chat.completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"


OPERATION_PATHS = {
    "/v1/chat/completions": Operation.CHAT,
    "/v1/completions": Operation.COMPLETIONS,
    "/v1/embeddings": Operation.EMBEDDINGS,
    "/v1/responses": Operation.RESPONSES,
    # Compaction (`client.responses.compact`): a Responses call on the model it names, its body
    # the same input and instructions, its answer Responses usage (and no model).
    "/v1/responses/compact": Operation.RESPONSES,
}

# Responses API terminal events: each carries the final `response` object with its usage.
TERMINAL_RESPONSE_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})

# The longest model name and response id kept, and the largest token count believed: an
# upstream or client can send anything, and one value the database cannot store would stop
# the ledger writer for everyone. No call uses a billion tokens.
MAX_MODEL_LENGTH = 200
MAX_ID_LENGTH = 255
MAX_TOKENS = 10**9
MAX_TIER_LENGTH = 32

# Characters per token: OpenAI's rule of thumb for English text; used only for estimates.
CHARS_PER_TOKEN = 4
# What an image part reserves on a model whose family costing.images does not know (or none
# named): the dearest image of any known family (gpt-4o-mini at high detail, 2,833 + 8 x 5,667).
# Known families reserve their own figure, by detail.
TOKENS_PER_IMAGE = UNKNOWN.high
# OpenAI's chat format adds a few tokens per message and to prime the reply.
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3


@dataclass(slots=True)
class Usage:
    """Token counts as OpenAI reports them: input includes cached, output includes reasoning.

    Like the other value objects made for every request (Reported, RequestFacts, Admission,
    CampaignStanding), not frozen: a frozen dataclass sets each field through
    object.__setattr__, which tripled their construction cost. Nothing mutates them.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    audio_input_tokens: int = 0  # part of input_tokens
    audio_output_tokens: int = 0  # part of output_tokens
    web_search_calls: int = 0  # Responses `web_search_call` output items
    # Part of input_tokens, as cached (read) tokens are: the prompt-cache writes that OpenAI's
    # newest models bill at their own price (`*_tokens_details.cache_write_tokens`).
    cache_write_input_tokens: int = 0
    # Part of cached_input_tokens: the cached audio a Realtime response reports apart
    # (`cached_tokens_details.audio_tokens`), billed at the model's cached audio price.
    cached_audio_input_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)  # not frozen: made per request, see Usage
class Reported:
    """What one response body or terminal stream event tells about the call.

    `background_at`: for a Responses object created with `background: true`, its `created_at`;
    such a response is metered from its final state, once, whoever reads it (see costing.meter).
    """

    usage: Usage | None
    model: str | None
    response_id: str | None
    service_tier: str | None = None  # the tier that served the call, as the response says
    background_at: int | None = None
    # A Responses object's echoed `tools` offer `web_search_preview` (its searches have their own
    # price): what a background response's final state is priced by, with no request at hand.
    search_preview: bool = False


def _background_at(response: dict[str, Any]) -> int | None:
    if response.get("background") is not True:
        return None
    created = response.get("created_at")
    return created if type(created) is int else 0


def _int(value: Any) -> int:
    # type(), not isinstance: JSON gives exact types, bool must not count, and this runs six
    # times per response.
    if type(value) is int:
        return value if 0 <= value <= MAX_TOKENS else min(max(value, 0), MAX_TOKENS)
    if type(value) is float and math.isfinite(value):
        return min(max(int(value), 0), MAX_TOKENS)
    return 0


def parse_usage(raw: Any) -> Usage | None:
    """Parse a `usage` object of any metered operation; None when absent or not an object."""
    if not isinstance(raw, dict):
        return None
    if "input_tokens" in raw or "output_tokens" in raw:
        inputs, outputs = raw.get("input_tokens"), raw.get("output_tokens")
        in_details = raw.get("input_tokens_details")
        out_details = raw.get("output_tokens_details")
    else:
        inputs, outputs = raw.get("prompt_tokens"), raw.get("completion_tokens")
        in_details = raw.get("prompt_tokens_details")
        out_details = raw.get("completion_tokens_details")
    # _int's checks written out for the usual plain count: its call costs more than they do.
    input_tokens = inputs if type(inputs) is int and 0 <= inputs <= MAX_TOKENS else _int(inputs)
    output_tokens = outputs if type(outputs) is int and 0 <= outputs <= MAX_TOKENS else _int(outputs)
    cached = audio_in = reasoning = audio_out = 0
    # Likewise below, and a 0 (most audio counts) skips _int. `in` first for the keys one shape
    # or the older models lack (a miss is cheapest that way).
    if type(out_details) is dict:
        value = out_details.get("reasoning_tokens")
        if value:
            reasoning = value if type(value) is int and 0 < value <= MAX_TOKENS else _int(value)
        if "audio_tokens" in out_details:
            value = out_details["audio_tokens"]
            if value:
                audio_out = _int(value)
    if type(in_details) is dict:
        value = in_details.get("cached_tokens")
        if value:
            cached = value if type(value) is int and 0 < value <= MAX_TOKENS else _int(value)
        if "audio_tokens" in in_details:
            value = in_details["audio_tokens"]
            if value:
                audio_in = _int(value)
        if "cache_write_tokens" in in_details:  # the newest models: apart, so others pay one `in`
            value = in_details["cache_write_tokens"]
            if value:
                return _with_cache_writes(input_tokens, cached, output_tokens, reasoning, audio_in,
                                          audio_out, value)
    # Positional: this runs for every response, and keyword matching costs more than the rest.
    return Usage(input_tokens, cached if cached < input_tokens else input_tokens,
                 output_tokens, reasoning if reasoning < output_tokens else output_tokens,
                 audio_in if audio_in < input_tokens else input_tokens,
                 audio_out if audio_out < output_tokens else output_tokens)


def _with_cache_writes(input_tokens: int, cached: int, output_tokens: int, reasoning: int,
                       audio_in: int, audio_out: int, writes: Any) -> Usage:
    """parse_usage's result for a usage that reports prompt-cache writes: written and read
    tokens are separate parts of the input, so together never more than it."""
    if cached > input_tokens:
        cached = input_tokens
    written = _int(writes)
    if written > input_tokens - cached:
        written = input_tokens - cached
    return Usage(input_tokens, cached, output_tokens,
                 reasoning if reasoning < output_tokens else output_tokens,
                 audio_in if audio_in < input_tokens else input_tokens,
                 audio_out if audio_out < output_tokens else output_tokens, 0, written)


def _tier(value: Any) -> str | None:
    return _str(value, MAX_TIER_LENGTH)  # a request's tier is the client's string (NUL: see _str)


def web_search_calls(output: Any) -> int:
    """Web searches a Responses output made: its `web_search_call` items (each is billed)."""
    if type(output) is not list:
        return 0
    return sum(1 for item in output if type(item) is dict and item.get("type") == "web_search_call")


def model_name(value: Any) -> str | None:
    """A model name from anywhere a client or an upstream writes one, as the ledger stores it."""
    return _str(value, MAX_MODEL_LENGTH)


def _str(value: Any, limit: int) -> str | None:
    """A model name or id as the ledger stores it: cut to its column, and without NUL characters
    (PostgreSQL text cannot hold one: a client's `"model": "a\u0000b"` would be a record the
    database refuses)."""
    if not isinstance(value, str) or not value:
        return None
    value = value[:limit]
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def from_body(body: Any) -> Reported:
    """Usage, model and id of a non-streamed response body (any metered operation)."""
    if not isinstance(body, dict):
        return Reported(None, None, None)
    usage = parse_usage(body.get("usage"))
    if "output" in body:  # a Responses object: its web searches, and whether it ran in the background
        if usage is not None:
            usage.web_search_calls = web_search_calls(body["output"])
        tools = body.get("tools")
        return Reported(usage, _str(body.get("model"), MAX_MODEL_LENGTH),
                        _str(body.get("id"), MAX_ID_LENGTH), _tier(body.get("service_tier")),
                        _background_at(body), type(tools) is list and _offers_search_preview(tools))
    return Reported(usage, _str(body.get("model"), MAX_MODEL_LENGTH),
                    _str(body.get("id"), MAX_ID_LENGTH), _tier(body.get("service_tier")))


def from_event(event: Any) -> Reported:
    """Usage, model and id carried by one decoded stream event (chat, completions, responses)."""
    if not isinstance(event, dict):
        return Reported(None, None, None)
    kind = event.get("type")
    if isinstance(kind, str) and kind.startswith("response."):
        response = event.get("response")
        if not isinstance(response, dict):
            return Reported(None, None, None)
        if kind in TERMINAL_RESPONSE_EVENTS:
            return from_body(response)
        return Reported(None, _str(response.get("model"), MAX_MODEL_LENGTH),
                        _str(response.get("id"), MAX_ID_LENGTH), _tier(response.get("service_tier")),
                        _background_at(response))
    return from_body(event)


def realtime_usage(raw: Any) -> Usage | None:
    """A Realtime `response.usage` (`input_token_details`, `output_token_details`), None when
    absent. Cached tokens count text and audio alike, and `cached_audio_input_tokens` the audio
    part of them (some models price cached audio above cached text: gpt-realtime-mini);
    `audio_input_tokens` is the uncached audio, so the cost formula bills each input token once:
    uncached text at the input price, cached text and cached audio at their cached prices,
    uncached audio at the audio price."""
    if not isinstance(raw, dict):
        return None
    input_tokens = _int(raw.get("input_tokens"))
    output_tokens = _int(raw.get("output_tokens"))
    in_details = raw.get("input_token_details")
    out_details = raw.get("output_token_details")
    cached = audio_in = cached_audio = audio_out = 0
    if type(in_details) is dict:
        cached = min(_int(in_details.get("cached_tokens")), input_tokens)
        audio_in = _int(in_details.get("audio_tokens"))
        cached_details = in_details.get("cached_tokens_details")
        if type(cached_details) is dict:
            cached_audio = min(_int(cached_details.get("audio_tokens")), audio_in, cached)
    if type(out_details) is dict:
        audio_out = min(_int(out_details.get("audio_tokens")), output_tokens)
    return Usage(input_tokens, cached, output_tokens, 0,
                 min(audio_in - cached_audio, input_tokens - cached), audio_out,
                 cached_audio_input_tokens=cached_audio)


def transcription_usage(raw: Any) -> Usage | None:
    """The `usage` of a Realtime `conversation.item.input_audio_transcription.completed`, None
    when absent. Tokens (gpt-4o-transcribe family): the input's audio part at the model's audio
    price, the text out at its output price. A duration (whisper-1, `{"type": "duration",
    "seconds": ..}`) has no tokens: billed per minute, which no token price covers."""
    if not isinstance(raw, dict):
        return None
    input_tokens = _int(raw.get("input_tokens"))
    details = raw.get("input_token_details")
    audio = min(_int(details.get("audio_tokens")), input_tokens) if type(details) is dict else 0
    return Usage(input_tokens, 0, _int(raw.get("output_tokens")), 0, audio)


def from_transcription(event: Any, model: str | None) -> Reported:
    """What a Realtime `...input_audio_transcription.completed` event tells: its usage and item
    id (the row's response id); the model is the session's transcription model (the event does
    not name it)."""
    if not isinstance(event, dict):
        return Reported(None, model, None)
    return Reported(transcription_usage(event.get("usage")), model,
                    _str(event.get("item_id"), MAX_ID_LENGTH))


def from_realtime_response(response: Any, model: str | None) -> Reported:
    """What a Realtime `response.done` event's `response` tells: usage, id; the model is the
    session's (the event does not name it)."""
    if not isinstance(response, dict):
        return Reported(None, model, None)
    return Reported(realtime_usage(response.get("usage")),
                    _str(response.get("model"), MAX_MODEL_LENGTH) or model,
                    _str(response.get("id"), MAX_ID_LENGTH))


def event_text(event: Any) -> str:
    """Generated text in one stream event, for estimating output when usage never arrives."""
    if not isinstance(event, dict):
        return ""
    kind = event.get("type")
    if isinstance(kind, str):
        delta = event.get("delta")
        return delta if isinstance(delta, str) and kind.endswith(".delta") else ""
    parts: list[str] = []
    choices = event.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            parts.append(choice["text"])
        delta = choice.get("delta")
        if isinstance(delta, dict):
            _message_text(delta, parts)
    return "".join(parts)


def _message_text(message: dict[str, Any], parts: list[str]) -> None:
    """Append the generated text of a chat message or of a stream delta, the same fields for
    both: content, refusal, reasoning (compatible upstreams) and tool-call arguments."""
    for key in ("content", "refusal", "reasoning_content"):
        if isinstance(message.get(key), str):
            parts.append(message[key])
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            parts.append(function["arguments"])


# Responses output items: where each kind keeps the text its stream sends as `*.delta` events
# (message text and refusals, reasoning text and summaries in part lists; tool-call arguments).
_OUTPUT_PART_LISTS = ("content", "summary")
_OUTPUT_PART_TEXT = ("text", "refusal")
_OUTPUT_ITEM_TEXT = ("arguments", "input")


def answer_chars(body: Any) -> int:
    """Characters of generated text in a whole (non-streamed) answer: its output estimated as a
    stream's is when the upstream reports no usage (an OpenAI-compatible upstream may omit it),
    so an answer costs the same estimate whether it came as JSON or as events."""
    if not isinstance(body, dict):
        return 0
    parts: list[str] = []
    output = body.get("output")
    if isinstance(output, list):  # a Responses object
        for item in output:
            if isinstance(item, dict):
                _output_item_text(item, parts)
        if not parts and isinstance(body.get("output_text"), str):  # the SDKs' convenience field
            parts.append(body["output_text"])
        return sum(map(len, parts))
    choices = body.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):  # legacy completions
            parts.append(choice["text"])
        message = choice.get("message")
        if isinstance(message, dict):
            _message_text(message, parts)
    return sum(map(len, parts))


def _output_item_text(item: dict[str, Any], parts: list[str]) -> None:
    for key in _OUTPUT_ITEM_TEXT:
        if isinstance(item.get(key), str):
            parts.append(item[key])
    for key in _OUTPUT_PART_LISTS:
        content = item.get(key)
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict):
                for field in _OUTPUT_PART_TEXT:
                    if isinstance(part.get(field), str):
                        parts.append(part[field])


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def tokens_for_chars(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


@dataclass(slots=True)  # not frozen: made per request, see Usage
class RequestFacts:
    """What the proxy needs to know about a metered request body before forwarding it."""

    model: str | None
    stream: bool
    include_usage: bool
    prompt_tokens: int
    max_output_tokens: int | None  # the cap times `candidates`; None: the request sets no cap
    candidates: int = 1  # choices billed: `n` (`best_of` for legacy completions), per prompt
    service_tier: str | None = None  # as requested
    search_preview: bool = False  # Responses: offers the `web_search_preview` tool
    background: bool = False  # Responses `background: true`: metered when its final state is read
    images: int = 0  # image parts in the prompt
    image_tokens: int = 0  # what they may cost (in prompt_tokens): by model family and detail
    # Responses: the earlier response this one continues; OpenAI bills that context as input.
    previous_response_id: str | None = None
    # Input the proxy cannot size, by what carries it (UNSIZED): the model's context window is
    # reserved for it.
    unsized: str | None = None
    # Set by the meter before admission, the one fact not read from the body: the previous
    # response's input + output tokens as the ledger recorded them; None while unknown.
    context_tokens: int | None = None


# Input whose size the proxy cannot know (it never sees the content), by what carries it, as a
# refusal names it.
UNSIZED = {
    "conversation": "a conversation (`conversation`)",
    "prompt": "a stored prompt template (`prompt.id`)",
    "file": "a file by `file_id` or `file_url`",
    "item_reference": "items of earlier responses (`item_reference`)",
}
# Content parts by their "type": images, files (sized only when their data is inline) and
# references to earlier items.
_IMAGE, _FILE, _REFERENCE = 1, 2, 3
_PARTS = {"image_url": _IMAGE, "input_image": _IMAGE, "image": _IMAGE,
          "input_file": _FILE, "file": _FILE, "item_reference": _REFERENCE}


def _text_chars(value: Any) -> tuple[int, int, int, str | None]:
    """Characters of text, images (parts typed as images), images at detail low, and what part
    the proxy cannot size (a file by id or URL, an item reference), in a prompt structure
    (messages, input...). Every string counts its characters, whatever it starts with: a text
    that looks like a data URL is still billed as text.

    Iterative, so a body nested as deep as the JSON decoder allows cannot exhaust the stack;
    exact type checks, as decoded JSON has no subclasses and this walks every request's prompt.
    """
    chars = images = low = 0
    unsized = None
    pending = [value]
    pop, extend = pending.pop, pending.extend
    parts = _PARTS
    while pending:
        item = pop()
        kind = type(item)
        if kind is str:
            chars += len(item)  # a data URL too: only a part typed as an image is one
        elif kind is dict:
            part = item.get("type")
            special = parts.get(part) if type(part) is str else None
            if special is None:
                extend(item.values())
            elif special == _IMAGE:
                images += 1
                if _detail(item) == "low":
                    low += 1
            else:
                if special == _REFERENCE:
                    unsized = "item_reference"
                elif _by_reference(item):
                    unsized = "file"
                extend(item.values())
        elif kind is list:
            extend(item)
    return chars, images, low, unsized


def _detail(image: dict[str, Any]) -> Any:
    """An image part's detail: Responses `input_image` has it in the part, chat `image_url` in
    its `image_url` object."""
    detail = image.get("detail")
    if detail is None:
        inner = image.get("image_url")
        if type(inner) is dict:
            detail = inner.get("detail")
    return detail


def _by_reference(part: dict[str, Any]) -> bool:
    """A file part that names a stored or remote file (Responses `input_file`, chat `file`)
    rather than carrying its data."""
    inner = part.get("file")
    source = inner if type(inner) is dict else part
    return source.get("file_id") is not None or source.get("file_url") is not None


def _prompts(prompt: Any) -> int:
    """How many prompts a legacy completion answers: a list of strings or of token-id arrays is
    a batch; a string or one token-id array is one prompt."""
    if type(prompt) is not list or not prompt or type(prompt[0]) is int:
        return 1
    return min(len(prompt), 10_000)


def _token_ids(value: Any) -> int | None:
    """Number of token ids in an already tokenized input (one array or a batch), else None."""
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, int) for v in value):
        return len(value)
    if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
        return sum(len(v) for v in value)
    return None


@dataclass(frozen=True, slots=True)
class _Shape:
    """Where an operation's request body keeps its prompt, looked up once per request (enum
    members hash and compare in Python code, so the hot path avoids doing that repeatedly)."""

    prompt_fields: tuple[str, ...]
    token_ids: bool  # prompt fields may be arrays of token ids
    messages: bool  # chat: a few tokens per message on top of their text
    output: bool  # embeddings produce no output tokens
    search_tools: bool = False  # Responses: its tools may include web_search_preview
    batches: bool = False  # legacy completions: `prompt` may be a list of prompts, each answered
    references: bool = False  # Responses: may continue earlier context (previous response...)


_SHAPES = {
    Operation.CHAT: _Shape(("messages", "tools"), token_ids=False, messages=True, output=True),
    Operation.COMPLETIONS: _Shape(("prompt", "suffix"), token_ids=True, messages=False, output=True,
                                  batches=True),
    Operation.EMBEDDINGS: _Shape(("input",), token_ids=True, messages=False, output=False),
    Operation.RESPONSES: _Shape(("input", "instructions", "tools"), token_ids=True, messages=False,
                                output=True, search_tools=True, references=True),
}
_MAX_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def _prompt_tokens(shape: _Shape, body: dict[str, Any], model: str | None
                   ) -> tuple[int, int, int, str | None]:
    """The prompt's estimate in tokens (its images' included), its images, what they may cost,
    and what part of it the proxy cannot size."""
    chars = images = low = 0
    unsized = None
    for field in shape.prompt_fields:
        value = body.get(field)
        if value is None:
            continue
        token_ids = _token_ids(value) if shape.token_ids else None
        if token_ids is not None:
            chars += token_ids * CHARS_PER_TOKEN
            continue
        c, i, lo, u = _text_chars(value)
        chars += c
        images += i
        low += lo
        unsized = u or unsized
    overhead = 0
    messages = body.get("messages") if shape.messages else None
    if type(messages) is list:
        overhead = TOKENS_PER_MESSAGE * len(messages) + TOKENS_PER_REPLY
    image_tokens = min(images_tokens(model, images, low), MAX_TOKENS) if images else 0
    return tokens_for_chars(chars) + image_tokens + overhead, images, image_tokens, unsized


def _referenced(body: dict[str, Any]) -> str | None:
    """Earlier context a Responses request names that the proxy cannot size (see UNSIZED)."""
    conversation = body.get("conversation")
    if (type(conversation) is str and conversation) or type(conversation) is dict:
        return "conversation"
    prompt = body.get("prompt")
    if type(prompt) is dict and prompt.get("id") is not None:
        return "prompt"
    return None


def request_facts(operation: Operation, body: Any) -> RequestFacts:
    """Facts of a parsed JSON request body; tolerant of any shape (the upstream judges validity)."""
    if not isinstance(body, dict):
        return RequestFacts(None, False, False, 0, None)
    shape = _SHAPES[operation]
    model = _str(body.get("model"), MAX_MODEL_LENGTH)
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = type(options) is dict and options.get("include_usage") is True
    max_output: int | None = None
    if not shape.output:
        max_output = 0
    else:
        for key in _MAX_OUTPUT_FIELDS:
            value = body.get(key)
            if type(value) is int and value >= 0:
                max_output = value
                break
    # Every candidate is billed: `n` choices, and for legacy completions `best_of` (>= n), for
    # each prompt of a batch (legacy completions take a list of prompts).
    candidates = 1
    if "n" in body or "best_of" in body:
        candidates = min(max(_count(body.get("n")), _count(body.get("best_of")), 1), 128)
    if shape.batches:
        candidates *= _prompts(body.get("prompt"))
    if max_output and candidates > 1:
        max_output = min(max_output * candidates, MAX_TOKENS)
    tools = body.get("tools") if shape.search_tools else None
    prompt_tokens, images, image_tokens, unsized = _prompt_tokens(shape, body, model)
    facts = RequestFacts(model, stream, include_usage, min(prompt_tokens, MAX_TOKENS), max_output,
                         candidates, _tier(body.get("service_tier")),
                         type(tools) is list and _offers_search_preview(tools),
                         body.get("background") is True, images, image_tokens)
    if shape.references:
        facts.previous_response_id = _str(body.get("previous_response_id"), MAX_ID_LENGTH)
        facts.unsized = _referenced(body) or unsized
    elif unsized is not None:
        facts.unsized = unsized
    return facts


def _offers_search_preview(tools: list[Any]) -> bool:
    """Whether a Responses request offers the `web_search_preview` tool (billed per call at its
    own price on some models); its dated names too (`web_search_preview_2025_03_11`)."""
    for tool in tools:
        if type(tool) is dict:
            kind = tool.get("type")
            if type(kind) is str and kind.startswith("web_search_preview"):
                return True
    return False


def estimate_usage(prompt_tokens: int, output_chars: int) -> Usage:
    """Usage of an answer the upstream did not report: the prompt's estimate, and the output's
    from the characters of text it held (a stream's so far, or a JSON answer's)."""
    return Usage(input_tokens=prompt_tokens, output_tokens=tokens_for_chars(output_chars))
