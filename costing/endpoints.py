"""Which OpenAI endpoints cost money: the one list the budget gate and the ledger follow.

Every `POST /v1/...` falls in one of three kinds:
- metered: the four operations whose usage the proxy reads and prices (`costing.usage.Operation`),
  and compaction (`/v1/responses/compact`), metered as a Responses call;
- billable: OpenAI bills them but the proxy cannot price them yet (images, audio, batches,
  files, fine-tuning, assistants runs, realtime sessions, vector stores, videos, containers,
  eval runs). The budget gate refuses them once a campaign is at its limit, and each call is
  recorded at cost 0, `priced_by_default`, so the ledger shows it;
- free: known not to bill (moderations, token counting, creating threads, messages and
  assistants, and every `.../cancel`: a campaign over its limit must still be able to stop work).
A `POST` the list does not know is treated as billable: a budget that holds matters more than
a row too many. Other methods are never refused: reading or deleting costs nothing.

A WebSocket upgrade under /v1/ (the Realtime API, `GET /v1/realtime?model=...`) is billable too:
gated when it opens, then each response it bills metered (see proxy.realtime), `WEBSOCKET`;
each input audio transcription it bills is a row of its own, `REALTIME_TRANSCRIPTION`.

Background responses (`{"background": true}`) are metered when their final state is read:
`GET /v1/responses/{id}` (or its stream) and the cancel call return the response object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

from costing.usage import OPERATION_PATHS, Operation


class Kind(Enum):
    METERED = "metered"
    BILLABLE = "billable"
    RETRIEVAL = "retrieval"  # returns a response object whose final state may need metering
    FREE = "free"


@dataclass(frozen=True, slots=True)
class Endpoint:
    kind: Kind
    operation: str  # the ledger's `operation`: the Operation's value, or a name for the path
    metered: Operation | None = None


_ID = r"[^/]+"
# (name, pattern) of billable POST paths, after normalisation (no repeated or trailing slash).
BILLABLE = (
    ("images.generations", r"/v1/images/generations"),
    ("images.edits", r"/v1/images/edits"),
    ("images.variations", r"/v1/images/variations"),
    ("audio.speech", r"/v1/audio/speech"),
    ("audio.transcriptions", r"/v1/audio/transcriptions"),
    ("audio.translations", r"/v1/audio/translations"),
    ("batches", r"/v1/batches"),
    ("files", r"/v1/files"),
    ("uploads", rf"/v1/uploads(/{_ID}/(parts|complete))?"),
    ("fine_tuning.jobs", rf"/v1/fine_tuning/jobs(/{_ID}/(pause|resume))?"),
    ("threads.runs", rf"/v1/threads(/{_ID})?/runs"),
    ("threads.runs", rf"/v1/threads/{_ID}/runs/{_ID}/submit_tool_outputs"),
    ("realtime", r"/v1/realtime/(sessions|transcription_sessions|client_secrets|calls)(/.*)?"),
    ("vector_stores", rf"/v1/vector_stores(/{_ID}/(files|file_batches|search))?"),
    ("videos", rf"/v1/videos(/{_ID}/remix)?"),
    ("containers", rf"/v1/containers(/{_ID}/files)?"),
    ("evals.runs", rf"/v1/evals/{_ID}/runs"),
)
FREE = (
    r"/v1/moderations",
    r"/v1/responses/input_tokens",
    r"/v1/.*/cancel",
    rf"/v1/threads(/{_ID})?",
    rf"/v1/threads/{_ID}/messages(/{_ID})?",
    rf"/v1/threads/{_ID}/runs/{_ID}",  # modify a run's metadata
    rf"/v1/assistants(/{_ID})?",
    r"/v1/conversations(/.*)?",
    rf"/v1/chat/completions/{_ID}",  # update a stored completion's metadata
    rf"/v1/vector_stores/{_ID}",  # modify
    rf"/v1/evals(/{_ID})?",
    r"/v1/fine_tuning/checkpoints/.*",
    r"/v1/organization/.*",
)
# A Realtime session's input audio transcription (`input_audio_transcription`): a row of its
# own, billed at the transcription model's price (see proxy.realtime).
REALTIME_TRANSCRIPTION = "realtime.transcription"
# Every name the ledger gives a call it knows: the metered operations, the billable list and
# Realtime transcriptions. An unknown path is named by its first segment, which the client
# chooses: kept in the ledger, never made a metric label (see proxy.metrics).
OPERATIONS = frozenset({*(operation.value for operation in Operation), *(name for name, _ in BILLABLE),
                        REALTIME_TRANSCRIPTION})
RESPONSE_OBJECT = re.compile(rf"/v1/responses/{_ID}(/cancel)?")
_BILLABLE = tuple((name, re.compile(pattern)) for name, pattern in BILLABLE)
_FREE = re.compile("|".join(f"(?:{pattern})" for pattern in FREE))
_PASS = Endpoint(Kind.FREE, "")
# A WebSocket under /v1/: a Realtime session, named as the Realtime HTTP calls are.
WEBSOCKET = Endpoint(Kind.BILLABLE, "realtime")


def normalize(path: str) -> str:
    """The path an upstream that merges slashes would serve: `/v1//chat/completions` is chat."""
    while "//" in path:
        path = path.replace("//", "/")
    return path


# By path, not by Operation: enum members hash in Python code, and every request asks.
_METERED = {path: Endpoint(Kind.METERED, operation.value, operation)
            for path, operation in OPERATION_PATHS.items()}


def classify(method: str, path: str) -> Endpoint:
    """The kind of a request to a normalised `path`; the metered paths are a dict lookup."""
    if method == "POST":
        found = _METERED.get(path) or _METERED.get(path.rstrip("/"))
        if found is not None:
            return found
    return _classify_other(method, path.rstrip("/"))


@lru_cache(maxsize=4096)
def _classify_other(method: str, path: str) -> Endpoint:
    if RESPONSE_OBJECT.fullmatch(path) and (method == "GET" or path.endswith("/cancel")):
        return Endpoint(Kind.RETRIEVAL, Operation.RESPONSES.value)
    if method != "POST":
        return _PASS
    for name, pattern in _BILLABLE:  # before the free list: `/v1/threads/runs` is not a thread id
        if pattern.fullmatch(path):
            return Endpoint(Kind.BILLABLE, name)
    if _FREE.fullmatch(path):
        return _PASS
    # Unknown: gated and recorded; named by its first segment (the ledger column holds 32).
    first = path.removeprefix("/v1/").split("/", 1)[0].replace("\x00", "\ufffd")  # (see usage._str)
    return Endpoint(Kind.BILLABLE, (first or "unknown")[:32])
