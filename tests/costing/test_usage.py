"""Token usage: what OpenAI reports (response bodies, stream events) and what a request may use.

Specification of `costing.usage`: every shape a metered operation can answer with, the
stream events that carry usage and text, the facts read from a request body before it is
forwarded, and tolerance of anything malformed (zeros or None, never an exception).
"""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costing.usage import (
    CHARS_PER_TOKEN,
    MAX_ID_LENGTH,
    MAX_MODEL_LENGTH,
    MAX_TOKENS,
    TOKENS_PER_IMAGE,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_REPLY,
    Operation,
    Reported,
    RequestFacts,
    Usage,
    answer_chars,
    estimate_usage,
    event_text,
    from_body,
    from_event,
    parse_usage,
    request_facts,
    tokens_for_chars,
)

# -- parse_usage: chat / completions / embeddings shape ------------------------------------------


def test_chat_usage_reads_prompt_and_completion_tokens_with_their_details():
    raw = {
        "prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 128, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }
    assert parse_usage(raw) == Usage(input_tokens=1200, cached_input_tokens=1024,
                                     output_tokens=300, reasoning_tokens=128)


def test_chat_usage_without_details_has_no_cached_or_reasoning_tokens():
    raw = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
    assert parse_usage(raw) == Usage(9, 0, 12, 0)


def test_embeddings_usage_has_only_prompt_tokens():
    assert parse_usage({"prompt_tokens": 8, "total_tokens": 8}) == Usage(8, 0, 0, 0)


def test_total_tokens_is_input_plus_output_whatever_the_upstream_says():
    usage = parse_usage({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 999})
    assert usage is not None and usage.total_tokens == 15


# -- parse_usage: Responses shape ----------------------------------------------------------------


def test_responses_usage_reads_input_and_output_tokens_with_their_details():
    raw = {
        "input_tokens": 2000, "output_tokens": 700, "total_tokens": 2700,
        "input_tokens_details": {"cached_tokens": 1500},
        "output_tokens_details": {"reasoning_tokens": 512},
    }
    assert parse_usage(raw) == Usage(2000, 1500, 700, 512)


def test_responses_shape_is_recognised_by_output_tokens_alone():
    assert parse_usage({"output_tokens": 4}) == Usage(0, 0, 4, 0)


def test_responses_shape_ignores_chat_field_names():
    """A Responses usage object is read with Responses names only: no mixing of the two shapes."""
    raw = {"input_tokens": 3, "output_tokens": 2,
           "prompt_tokens_details": {"cached_tokens": 3},
           "completion_tokens_details": {"reasoning_tokens": 2}}
    assert parse_usage(raw) == Usage(3, 0, 2, 0)


# -- parse_usage: prompt-cache writes (the newest models) ------------------------------------------


def test_chat_usage_reads_cache_writes_as_part_of_the_input():
    raw = {"prompt_tokens": 50_000, "completion_tokens": 1000, "total_tokens": 51_000,
           "prompt_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 48_000,
                                     "audio_tokens": 0},
           "completion_tokens_details": {"reasoning_tokens": 200, "audio_tokens": 0}}
    assert parse_usage(raw) == Usage(50_000, 1024, 1000, 200, cache_write_input_tokens=48_000)


def test_responses_usage_reads_cache_writes_as_part_of_the_input():
    raw = {"input_tokens": 50_000, "output_tokens": 1000, "total_tokens": 51_000,
           "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 48_000},
           "output_tokens_details": {"reasoning_tokens": 0}}
    assert parse_usage(raw) == Usage(50_000, 0, 1000, 0, cache_write_input_tokens=48_000)


def test_the_streams_final_usage_carries_the_cache_writes():
    """The final chat chunk and `response.completed` carry the same usage object as a body."""
    chunk = _chat_chunk(usage={"prompt_tokens": 10, "completion_tokens": 2,
                               "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 8}},
                        choices=False)
    completed = {"type": "response.completed", "response": {
        **_RESPONSE, "usage": {"input_tokens": 30, "output_tokens": 90,
                               "input_tokens_details": {"cached_tokens": 10, "cache_write_tokens": 20},
                               "output_tokens_details": {"reasoning_tokens": 64}}}}
    assert from_event(chunk).usage == Usage(10, 0, 2, 0, cache_write_input_tokens=8)
    assert from_event(completed).usage == Usage(30, 10, 90, 64, cache_write_input_tokens=20)


@pytest.mark.parametrize(("details", "written"), [
    ({"cached_tokens": 3, "cache_write_tokens": 9}, 4),  # with the read tokens, at most the input
    ({"cached_tokens": 9, "cache_write_tokens": 9}, 0),  # cached clamped to 7 first
    ({"cache_write_tokens": None}, 0), ({"cache_write_tokens": "5"}, 0), ({"cache_write_tokens": -5}, 0),
    ({"cache_write_tokens": 2.7}, 2),
])
def test_cache_writes_are_clamped_to_the_input_not_read_from_the_cache(details, written):
    for raw in ({"prompt_tokens": 7, "prompt_tokens_details": details},
                {"input_tokens": 7, "input_tokens_details": details}):
        usage = parse_usage(raw)
        assert usage is not None
        assert usage.cache_write_input_tokens == written
        assert usage.cached_input_tokens + usage.cache_write_input_tokens <= usage.input_tokens


def test_a_usage_without_cache_writes_has_none():
    assert parse_usage({"prompt_tokens": 9, "completion_tokens": 1,
                        "prompt_tokens_details": {"cached_tokens": 4}}) == Usage(9, 4, 1, 0)
    assert parse_usage({"input_tokens": 9}).cache_write_input_tokens == 0  # type: ignore[union-attr]


# -- parse_usage: missing, null and garbage fields ------------------------------------------------


@pytest.mark.parametrize("raw", [None, "usage", 42, 1.5, True, [], [{"prompt_tokens": 1}]])
def test_a_usage_that_is_not_an_object_is_absent(raw):
    assert parse_usage(raw) is None


def test_an_empty_usage_object_is_zero_usage_not_absent():
    assert parse_usage({}) == Usage(0, 0, 0, 0)


@pytest.mark.parametrize("garbage", [None, "12", "", [], {}, True, False, -7, -0.5])
def test_a_token_count_that_is_not_a_non_negative_number_counts_as_zero(garbage):
    assert parse_usage({"prompt_tokens": garbage, "completion_tokens": 3}) == Usage(0, 0, 3, 0)
    assert parse_usage({"input_tokens": garbage, "output_tokens": 3}) == Usage(0, 0, 3, 0)


def test_a_fractional_token_count_is_truncated():
    assert parse_usage({"prompt_tokens": 10.9, "completion_tokens": 2.0}) == Usage(10, 0, 2, 0)


@pytest.mark.parametrize("details", [None, "x", 3, [], [{"cached_tokens": 5}], {"cached_tokens": None},
                                     {"cached_tokens": "5"}, {}])
def test_null_or_garbage_details_mean_no_cached_or_reasoning_tokens(details):
    chat = {"prompt_tokens": 10, "completion_tokens": 10,
            "prompt_tokens_details": details, "completion_tokens_details": details}
    responses = {"input_tokens": 10, "output_tokens": 10,
                 "input_tokens_details": details, "output_tokens_details": details}
    assert parse_usage(chat) == Usage(10, 0, 10, 0)
    assert parse_usage(responses) == Usage(10, 0, 10, 0)


def test_cached_tokens_are_clamped_to_the_input_tokens():
    chat = {"prompt_tokens": 7, "prompt_tokens_details": {"cached_tokens": 9}}
    responses = {"input_tokens": 7, "input_tokens_details": {"cached_tokens": 9}}
    assert parse_usage(chat) == Usage(7, 7, 0, 0)
    assert parse_usage(responses) == Usage(7, 7, 0, 0)


def test_reasoning_tokens_are_clamped_to_the_output_tokens():
    chat = {"completion_tokens": 3, "completion_tokens_details": {"reasoning_tokens": 50}}
    responses = {"output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 50}}
    assert parse_usage(chat) == Usage(0, 0, 3, 3)
    assert parse_usage(responses) == Usage(0, 0, 3, 3)


def test_details_without_their_total_are_clamped_to_zero():
    raw = {"prompt_tokens_details": {"cached_tokens": 5},
           "completion_tokens_details": {"reasoning_tokens": 5}}
    assert parse_usage(raw) == Usage(0, 0, 0, 0)


# -- from_body ----------------------------------------------------------------------------------


def test_from_body_reads_usage_model_and_id_of_a_chat_completion():
    body = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
    assert from_body(body) == Reported(Usage(5, 0, 1, 0), "gpt-4o-mini-2024-07-18", "chatcmpl-1")


def test_from_body_reads_a_responses_object():
    body = {"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4.1",
            "usage": {"input_tokens": 11, "output_tokens": 22,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}}
    assert from_body(body) == Reported(Usage(11, 0, 22, 0), "gpt-4.1", "resp_1")


def test_from_body_of_an_embeddings_list_has_no_id():
    body = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
            "model": "text-embedding-3-small", "usage": {"prompt_tokens": 4, "total_tokens": 4}}
    assert from_body(body) == Reported(Usage(4, 0, 0, 0), "text-embedding-3-small", None)


@pytest.mark.parametrize("body", [None, "text", 1, [], [{"usage": {"prompt_tokens": 1}}]])
def test_from_body_of_something_that_is_not_an_object_reports_nothing(body):
    assert from_body(body) == Reported(None, None, None)


@pytest.mark.parametrize("value", [None, "", 7, ["m"], {"m": 1}])
def test_from_body_treats_an_empty_or_non_string_model_and_id_as_absent(value):
    assert from_body({"model": value, "id": value}) == Reported(None, None, None)


def test_an_error_body_reports_no_usage():
    body = {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}}
    assert from_body(body) == Reported(None, None, None)


# -- from_event: chat and legacy completion chunks -----------------------------------------------


def _chat_chunk(content: str | None = None, *, usage=None, choices=True):
    chunk = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06",
             "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
             if choices else []}
    if usage is not ...:
        chunk["usage"] = usage
    return chunk


def test_chat_chunks_before_the_last_carry_model_and_id_but_no_usage():
    assert from_event(_chat_chunk("Hel", usage=None)) == Reported(None, "gpt-4o-2024-08-06", "chatcmpl-9")
    assert from_event(_chat_chunk("lo", usage=...)).usage is None


def test_the_final_chat_chunk_carries_the_usage():
    final = _chat_chunk(usage={"prompt_tokens": 8, "completion_tokens": 2,
                               "prompt_tokens_details": {"cached_tokens": 0},
                               "completion_tokens_details": {"reasoning_tokens": 0}}, choices=False)
    assert from_event(final) == Reported(Usage(8, 0, 2, 0), "gpt-4o-2024-08-06", "chatcmpl-9")


def test_a_legacy_completion_chunk_with_usage_is_read_like_a_body():
    chunk = {"id": "cmpl-1", "object": "text_completion", "model": "gpt-3.5-turbo-instruct",
             "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 16}}
    assert from_event(chunk) == Reported(Usage(3, 0, 16, 0), "gpt-3.5-turbo-instruct", "cmpl-1")


# -- from_event: Responses stream events ---------------------------------------------------------


_RESPONSE = {"id": "resp_42", "object": "response", "model": "o4-mini-2025-04-16",
             "usage": {"input_tokens": 30, "output_tokens": 90,
                       "input_tokens_details": {"cached_tokens": 10},
                       "output_tokens_details": {"reasoning_tokens": 64}}}


def test_response_created_gives_id_and_model_without_usage():
    created = {"type": "response.created", "sequence_number": 0,
               "response": {**_RESPONSE, "status": "in_progress", "usage": None}}
    assert from_event(created) == Reported(None, "o4-mini-2025-04-16", "resp_42")


@pytest.mark.parametrize("kind", ["response.created", "response.in_progress", "response.queued",
                                  "response.output_item.done"])
def test_non_terminal_response_events_never_give_usage_even_if_one_is_present(kind):
    reported = from_event({"type": kind, "response": _RESPONSE})
    assert reported == Reported(None, "o4-mini-2025-04-16", "resp_42")


@pytest.mark.parametrize("kind", ["response.completed", "response.incomplete", "response.failed"])
def test_terminal_response_events_give_the_usage(kind):
    assert from_event({"type": kind, "response": _RESPONSE}) == Reported(
        Usage(30, 10, 90, 64), "o4-mini-2025-04-16", "resp_42")


def test_a_failed_response_without_usage_gives_none():
    failed = {"type": "response.failed", "response": {**_RESPONSE, "status": "failed", "usage": None}}
    assert from_event(failed) == Reported(None, "o4-mini-2025-04-16", "resp_42")


@pytest.mark.parametrize("event", [
    {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Hi"},
    {"type": "response.completed"},
    {"type": "response.completed", "response": "resp_42"},
    {"type": "response.completed", "response": None},
])
def test_response_events_without_a_response_object_report_nothing(event):
    assert from_event(event) == Reported(None, None, None)


def test_response_event_usage_lives_inside_the_response_not_on_the_event():
    event = {"type": "response.completed", "usage": {"input_tokens": 1, "output_tokens": 1},
             "response": {"id": "resp_1", "model": "gpt-5"}}
    assert from_event(event) == Reported(None, "gpt-5", "resp_1")


@pytest.mark.parametrize("event", [None, "data", 0, [], ["response.completed"]])
def test_from_event_of_something_that_is_not_an_object_reports_nothing(event):
    assert from_event(event) == Reported(None, None, None)


# -- event_text ---------------------------------------------------------------------------------


def test_event_text_of_a_chat_delta_is_its_content():
    assert event_text(_chat_chunk("Hello")) == "Hello"


def test_event_text_of_a_chat_delta_includes_tool_call_arguments():
    chunk = {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "roll", "arguments": ""}},
        {"index": 1, "function": {"arguments": '{"dice":'}},
        {"index": 2, "function": {"arguments": '"2d6"}'}},
    ]}}]}
    assert event_text(chunk) == '{"dice":"2d6"}'


def test_event_text_includes_refusals_and_reasoning_content():
    chunk = {"choices": [{"delta": {"refusal": "I can't"}}, {"delta": {"reasoning_content": " think"}}]}
    assert event_text(chunk) == "I can't think"


def test_event_text_joins_every_choice_of_an_n_greater_than_one_stream():
    chunk = {"choices": [{"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}]}
    assert event_text(chunk) == "ab"


def test_event_text_of_a_legacy_completion_chunk_is_its_text():
    chunk = {"id": "cmpl-1", "object": "text_completion",
             "choices": [{"index": 0, "text": "Once upon", "finish_reason": None}]}
    assert event_text(chunk) == "Once upon"


def test_event_text_of_a_responses_output_text_delta_is_its_delta():
    event = {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
             "content_index": 0, "delta": "Greetings"}
    assert event_text(event) == "Greetings"


def test_event_text_of_a_responses_function_call_arguments_delta_is_its_delta():
    assert event_text({"type": "response.function_call_arguments.delta", "delta": '{"a":1}'}) == '{"a":1}'


@pytest.mark.parametrize("event", [
    {"type": "response.output_text.done", "text": "Greetings"},
    {"type": "response.completed", "response": _RESPONSE},
    {"type": "response.output_text.delta", "delta": None},
    {"type": "response.output_text.delta", "delta": ["x"]},
    {"choices": []},
    {"choices": None},
    {"choices": [{"delta": {"role": "assistant"}}]},
    {"choices": [{"delta": {"content": None}, "finish_reason": "stop"}]},
    {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": None}}, "x", None]}}]},
    {"choices": ["x", None, 3]},
    None, "text", [],
])
def test_events_without_generated_text_give_the_empty_string(event):
    assert event_text(event) == ""


@pytest.mark.parametrize("event", [
    {"choices": 5},
    {"choices": True},
    {"choices": [{"delta": {"tool_calls": 7}}]},
])
def test_event_text_never_raises_on_a_non_list_choices_or_tool_calls(event):
    assert event_text(event) == ""


# -- answer_chars: the text of a whole answer, for an estimate without usage ----------------------


def test_a_chat_answer_counts_its_message_content():
    body = {"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello there", "refusal": None},
         "finish_reason": "stop"}]}
    assert answer_chars(body) == len("Hello there")


def test_a_chat_answer_counts_tool_call_arguments_refusals_reasoning_and_every_choice():
    body = {"choices": [
        {"message": {"content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "roll", "arguments": '{"dice":"2d6"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "roll", "arguments": "{}"}}]}},
        {"message": {"content": "ok", "refusal": "I can't", "reasoning_content": " think"}}]}
    assert answer_chars(body) == len('{"dice":"2d6"}') + len("{}") + len("ok") + len("I can't think")


def test_a_legacy_completion_answer_counts_its_choices_text():
    body = {"object": "text_completion", "choices": [{"text": "Once upon"}, {"text": " a time"}]}
    assert answer_chars(body) == len("Once upon a time")


def test_a_responses_answer_counts_message_text_refusals_reasoning_and_tool_arguments():
    body = {"object": "response", "output": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Plan."}]},
        {"type": "web_search_call", "action": {"type": "search", "query": "not generated text"}},
        {"type": "function_call", "name": "roll", "arguments": '{"a":1}'},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Greetings", "annotations": []},
            {"type": "refusal", "refusal": "No."}]}],
        "output_text": "Greetings"}  # the SDKs' convenience copy: not counted twice
    assert answer_chars(body) == len("Plan.") + len('{"a":1}') + len("Greetings") + len("No.")


def test_a_responses_answer_with_only_output_text_counts_that():
    assert answer_chars({"output": [], "output_text": "Just this"}) == len("Just this")


def test_a_json_answer_and_the_same_answer_streamed_count_the_same_text():
    """The estimate of an answer without usage does not depend on how it was delivered."""
    words = ["The", " goblin", " king", " grins."]
    chunks = [_chat_chunk(word) for word in words]
    body = {"choices": [{"message": {"role": "assistant", "content": "".join(words)}}]}
    assert answer_chars(body) == sum(len(event_text(chunk)) for chunk in chunks) == 22


@pytest.mark.parametrize("body", [
    None, "text", [], {}, {"choices": None}, {"choices": 5}, {"choices": ["x", None]},
    {"choices": [{"message": None}, {"message": {"content": 3, "tool_calls": "x"}}]},
    {"output": [None, "x", {"type": "message", "content": "not a list"}]},
    {"output": [{"content": [None, {"text": 5}]}], "output_text": None},
    {"data": [{"embedding": [0.1]}], "object": "list"},
])
def test_answers_without_generated_text_count_zero(body):
    assert answer_chars(body) == 0


# -- request_facts -------------------------------------------------------------------------------


def _chat(**fields):
    messages = [{"role": "user", "content": "Roll for initiative"}]
    return {"model": "gpt-4o-mini", "messages": messages, **fields}


def test_request_facts_read_model_stream_and_include_usage():
    facts = request_facts(Operation.CHAT, _chat(stream=True, stream_options={"include_usage": True}))
    assert (facts.model, facts.stream, facts.include_usage) == ("gpt-4o-mini", True, True)


def test_a_request_streams_only_when_stream_is_exactly_true():
    for value in (False, None, "true", 1, []):
        assert request_facts(Operation.CHAT, _chat(stream=value)).stream is False
    assert request_facts(Operation.CHAT, _chat()).stream is False


def test_include_usage_is_true_only_when_stream_options_says_so_exactly():
    for options in (None, {}, {"include_usage": False}, {"include_usage": "true"}, {"include_usage": 1},
                    [{"include_usage": True}], "include_usage"):
        facts = request_facts(Operation.CHAT, _chat(stream=True, stream_options=options))
        assert facts.include_usage is False, options


def test_a_missing_or_non_string_model_is_none():
    assert request_facts(Operation.CHAT, {"messages": []}).model is None
    assert request_facts(Operation.CHAT, {"model": 4}).model is None
    assert request_facts(Operation.CHAT, {"model": ""}).model is None


def test_max_completion_tokens_wins_over_max_tokens():
    facts = request_facts(Operation.CHAT, _chat(max_tokens=500, max_completion_tokens=200))
    assert facts.max_output_tokens == 200


def test_max_tokens_is_the_cap_when_max_completion_tokens_is_absent():
    assert request_facts(Operation.CHAT, _chat(max_tokens=500)).max_output_tokens == 500
    assert request_facts(Operation.COMPLETIONS, {"prompt": "x", "max_tokens": 16}).max_output_tokens == 16


def test_max_output_tokens_is_the_cap_of_a_responses_request():
    facts = request_facts(Operation.RESPONSES, {"model": "gpt-5", "input": "hi", "max_output_tokens": 300})
    assert facts.max_output_tokens == 300


def test_max_tokens_wins_over_max_output_tokens():
    facts = request_facts(Operation.RESPONSES, {"input": "hi", "max_tokens": 50, "max_output_tokens": 300})
    assert facts.max_output_tokens == 50


def test_an_unusable_cap_is_skipped_for_the_next_one():
    for bad in (None, -1, "100", 1.5, True):
        facts = request_facts(Operation.CHAT, _chat(max_completion_tokens=bad, max_tokens=70))
        assert facts.max_output_tokens == 70, bad


def test_without_a_cap_the_output_is_unbounded():
    assert request_facts(Operation.CHAT, _chat()).max_output_tokens is None
    assert request_facts(Operation.RESPONSES, {"input": "hi"}).max_output_tokens is None


def test_a_zero_cap_is_a_cap():
    assert request_facts(Operation.CHAT, _chat(max_tokens=0)).max_output_tokens == 0


def test_embeddings_produce_no_output_tokens():
    facts = request_facts(Operation.EMBEDDINGS, {"model": "text-embedding-3-small", "input": "abc",
                                                 "max_tokens": 99})
    assert facts.max_output_tokens == 0


def test_n_choices_multiply_the_output_cap():
    assert request_facts(Operation.CHAT, _chat(max_tokens=100, n=3)).max_output_tokens == 300
    completion = request_facts(Operation.COMPLETIONS, {"prompt": "x", "max_tokens": 10, "n": 2})
    assert completion.max_output_tokens == 20


@pytest.mark.parametrize("n", [1, 0, -2, "3", 2.0, True, None])
def test_an_n_that_is_not_an_integer_above_one_does_not_multiply(n):
    assert request_facts(Operation.CHAT, _chat(max_tokens=100, n=n)).max_output_tokens == 100


def test_n_does_not_invent_a_cap():
    assert request_facts(Operation.CHAT, _chat(n=4)).max_output_tokens is None


def test_best_of_candidates_multiply_the_output_cap_of_a_legacy_completion():
    facts = request_facts(Operation.COMPLETIONS, {"prompt": "x", "max_tokens": 100, "best_of": 5})
    assert facts.max_output_tokens == 500


# -- request_facts: prompt token estimate --------------------------------------------------------


def _prompt(operation: Operation, body) -> int:
    return request_facts(operation, body).prompt_tokens


def test_a_chat_prompt_is_estimated_at_four_characters_per_token_plus_message_overhead():
    messages = [{"role": "system", "content": "s" * 94}, {"role": "user", "content": "u" * 40}]
    chars = len("system") + 94 + len("user") + 40  # every string of the messages counts
    expected = math.ceil(chars / CHARS_PER_TOKEN) + 2 * TOKENS_PER_MESSAGE + TOKENS_PER_REPLY
    assert _prompt(Operation.CHAT, {"messages": messages}) == expected == 36 + 8 + 3


def test_the_estimate_grows_by_one_token_per_four_characters():
    short = _prompt(Operation.CHAT, _chat())
    longer = _chat(messages=[{"role": "user", "content": "Roll for initiative" + "x" * 400}])
    assert _prompt(Operation.CHAT, longer) == short + 100


def test_tools_count_toward_a_chat_prompt():
    tools = [{"type": "function", "function": {"name": "roll", "description": "d" * 400}}]
    assert _prompt(Operation.CHAT, _chat(tools=tools)) > _prompt(Operation.CHAT, _chat()) + 100


def test_a_completion_prompt_counts_prompt_and_suffix():
    assert _prompt(Operation.COMPLETIONS, {"prompt": "p" * 40, "suffix": "s" * 40}) == 20
    assert _prompt(Operation.COMPLETIONS, {"prompt": ["a" * 20, "b" * 20]}) == 10


def test_an_embeddings_input_counts_every_string_without_chat_overhead():
    assert _prompt(Operation.EMBEDDINGS, {"input": "x" * 8}) == 2
    assert _prompt(Operation.EMBEDDINGS, {"input": ["x" * 8, "y" * 8]}) == 4


def test_an_already_tokenized_input_counts_one_token_per_token_id():
    assert _prompt(Operation.EMBEDDINGS, {"input": [101, 2023, 2003, 102]}) == 4
    assert _prompt(Operation.COMPLETIONS, {"prompt": [1, 2, 3, 4, 5]}) == 5


def test_a_batch_of_token_arrays_counts_one_token_per_token_id():
    assert _prompt(Operation.EMBEDDINGS, {"input": [[101, 2023, 102], [101, 102]]}) == 5


def test_a_responses_prompt_counts_input_instructions_and_tools():
    base = _prompt(Operation.RESPONSES, {"input": "i" * 40})
    assert base == 10
    assert _prompt(Operation.RESPONSES, {"input": "i" * 40, "instructions": "n" * 40}) == 20
    assert _prompt(Operation.RESPONSES, {"input": "i" * 40, "tools": [{"type": "web_search"}]}) > base


def test_fields_that_are_not_prompt_do_not_count():
    body = _chat()
    assert _prompt(Operation.CHAT, {**body, "user": "u" * 4000, "metadata": {"k": "v" * 4000}}) == _prompt(
        Operation.CHAT, body)


def test_an_image_in_a_chat_message_counts_as_tokens_per_image():
    text = {"role": "user", "content": [{"type": "text", "text": "What is this?"}]}
    with_image = {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                              {"type": "image_url",
                                               "image_url": {"url": "https://example.com/map.png"}}]}
    assert _prompt(Operation.CHAT, {"messages": [with_image]}) == (
        _prompt(Operation.CHAT, {"messages": [text]}) + TOKENS_PER_IMAGE)


def test_an_input_image_in_a_responses_request_counts_as_tokens_per_image():
    def body(*extra):
        return {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Describe"}, *extra]}]}

    image = {"type": "input_image", "image_url": "https://example.com/a-very-long-url/" + "p" * 400}
    assert _prompt(Operation.RESPONSES, body(image, image)) == _prompt(Operation.RESPONSES, body()) + (
        2 * TOKENS_PER_IMAGE)


def test_text_that_starts_like_a_data_url_is_counted_as_text_and_image_parts_as_images():
    """Only a part typed as an image is one image: a 400,000-character message that happens to
    start with `data:` is billed as text, and reserved as text."""
    def body(part):
        return {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, part]}]}

    text = "data: " + "A" * 400_000
    as_text = _prompt(Operation.CHAT, body({"type": "text", "text": text}))
    plain = _prompt(Operation.CHAT, body({"type": "text", "text": "B" * len(text)}))
    assert as_text == plain > 100_000
    assert _prompt(Operation.CHAT, {"messages": [{"role": "user", "content": text}]}) > 100_000
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 400_000}}
    alone = [{"type": "text", "text": "x"}]
    without = _prompt(Operation.CHAT, {"messages": [{"role": "user", "content": alone}]})
    assert _prompt(Operation.CHAT, body(image)) == without + TOKENS_PER_IMAGE


# -- images by model family and detail -----------------------------------------------------------


def _chat_images(model, *details):
    parts = [{"type": "image_url", "image_url": {"url": "https://example.com/map.png",
                                                 **({"detail": d} if d else {})}} for d in details]
    return request_facts(Operation.CHAT, {"model": model, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]}]})


def _responses_images(model, *details):
    parts = [{"type": "input_image", "image_url": "https://example.com/map.png",
              **({"detail": d} if d else {})} for d in details]
    return request_facts(Operation.RESPONSES, {"model": model, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"}, *parts]}]})


@pytest.mark.parametrize(("model", "high", "low"), [
    # tiles: base + 8 tiles of 512 px at most (768 x 2048), the base alone at detail low
    ("gpt-4o", 85 + 8 * 170, 85),
    ("gpt-4o-2024-08-06", 1445, 85),
    ("chatgpt-4o-latest", 1445, 85),
    ("gpt-4o-mini", 2833 + 8 * 5667, 2833),
    ("gpt-4o-mini-2024-07-18", 48_169, 2833),
    ("ft:gpt-4o-mini-2024-07-18:acme::abc123", 48_169, 2833),
    ("openai/GPT-4o-mini", 48_169, 2833),
    ("o1", 75 + 8 * 150, 75),
    ("o3-pro", 1275, 75),
    ("gpt-5", 70 + 8 * 140, 70),
    ("gpt-5-chat-latest", 1190, 70),
    ("computer-use-preview", 65 + 8 * 129, 65),
    ("gpt-4.1", 1536, 85),  # documented both with tiles (1,445) and as 1 token per patch: the larger
    # patches: 1,536 at most, times the model's multiplier; no low-detail budget is documented
    ("gpt-4.1-mini", 2489, 2489),  # 1536 x 1.62 = 2,488.3
    ("gpt-4.1-nano-2025-04-14", 3779, 3779),  # x 2.46
    ("o4-mini", 2642, 2642),  # x 1.72
    ("gpt-5-mini", 2489, 2489),
    ("gpt-5-nano", 3779, 3779),
    # a family the table does not know, even one that starts like a known one: the dearest known
    ("gpt-5.4", TOKENS_PER_IMAGE, 3779),
    ("gpt-5.4-mini", 48_169, 3779),
    ("house-llama", 48_169, 3779),
    (None, 48_169, 3779),
])
def test_an_image_reserves_the_most_its_model_family_bills_at_its_detail(model, high, low):
    """Chat `image_url` parts (detail in the part's `image_url`) and Responses `input_image` parts
    (detail in the part): detail low reserves the family's low figure; high, auto, unset or
    anything else its largest image."""
    for facts_of in (_chat_images, _responses_images):
        base = facts_of(model).prompt_tokens
        assert facts_of(model, "high").prompt_tokens == base + high
        assert facts_of(model, "auto").prompt_tokens == base + high
        assert facts_of(model, None).prompt_tokens == base + high
        assert facts_of(model, "original").prompt_tokens == base + high
        assert facts_of(model, "low").prompt_tokens == base + low
        facts = facts_of(model, "high", "low", None)
        assert (facts.images, facts.image_tokens) == (3, 2 * high + low)
        assert facts.prompt_tokens == base + 2 * high + low


def test_a_model_the_image_table_does_not_know_reserves_the_dearest_known_image():
    assert TOKENS_PER_IMAGE == 2833 + 8 * 5667 == 48_169  # gpt-4o-mini at high detail


# -- earlier context the request names -----------------------------------------------------------


def test_a_responses_request_continuing_an_earlier_response_names_it():
    """OpenAI bills the earlier response's context as input: the facts name it, and the prompt
    estimate stays the request's own (the meter adds the context, see costing.budget)."""
    body = {"model": "gpt-4o", "input": "And then?"}
    facts = request_facts(Operation.RESPONSES, {**body, "previous_response_id": "resp_1"})
    assert (facts.previous_response_id, facts.unsized, facts.context_tokens) == ("resp_1", None, None)
    assert facts.prompt_tokens == request_facts(Operation.RESPONSES, body).prompt_tokens
    def named(value):
        return request_facts(Operation.RESPONSES, {**body, "previous_response_id": value}
                             ).previous_response_id

    assert named(7) is None and named("") is None
    assert named("r" * 300) == "r" * MAX_ID_LENGTH  # as the ledger stores response ids
    chat = {"model": "gpt-4o", "messages": [], "previous_response_id": "resp_1"}
    assert request_facts(Operation.CHAT, chat).previous_response_id is None


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


@pytest.mark.parametrize(("body", "unsized"), [
    ({"conversation": "conv_1"}, "conversation"),
    ({"conversation": {"id": "conv_1"}}, "conversation"),
    ({"prompt": {"id": "pmpt_1", "version": "2", "variables": {"city": "Paris"}}}, "prompt"),
    ({"input": _user({"type": "input_file", "file_id": "file-1"})}, "file"),
    ({"input": _user({"type": "input_file", "file_url": "https://example.com/a.pdf"})}, "file"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference"),
    ({"conversation": "conv_1", "input": _user({"type": "input_file", "file_id": "file-1"})},
     "conversation"),
    # the file's data is in the request: counted as its text is
    ({"input": _user({"type": "input_file", "filename": "a.pdf",
                      "file_data": "data:application/pdf;base64,AAAA"})}, None),
    ({"input": "hi", "conversation": None, "prompt": None}, None),
    ({"input": "hi", "conversation": "", "prompt": {"variables": {}}}, None),
])
def test_a_responses_request_naming_input_the_proxy_cannot_size_says_what(body, unsized):
    assert request_facts(Operation.RESPONSES, {"model": "gpt-4o", **body}).unsized == unsized


def test_a_chat_file_part_by_id_is_input_the_proxy_cannot_size():
    def facts(part):
        return request_facts(Operation.CHAT, {"model": "gpt-4o", "messages": _user(part)})

    assert facts({"type": "file", "file": {"file_id": "file-1"}}).unsized == "file"
    inline = {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,AA"}}
    assert facts(inline).unsized is None
    # A legacy completion's `prompt` is its text, not a stored prompt; chat has no conversations.
    assert request_facts(Operation.COMPLETIONS, {"prompt": "hi", "conversation": "c"}).unsized is None
    assert request_facts(Operation.CHAT, {"messages": [], "prompt": {"id": "pmpt_1"}}).unsized is None


def test_a_batch_of_prompts_multiplies_the_output_cap_of_a_legacy_completion():
    """Legacy completions answer every prompt of a list (times `n`/`best_of`): 100 prompts
    reserve 100 answers, as `n=100` does."""
    def facts(prompt, **extra):
        return request_facts(Operation.COMPLETIONS, {"prompt": prompt, "max_tokens": 400, **extra})

    assert facts(["hi"] * 100).max_output_tokens == facts("hi", n=100).max_output_tokens == 40_000
    assert facts([[1, 2], [3]], best_of=3).max_output_tokens == 2 * 3 * 400
    assert facts([1, 2, 3]).max_output_tokens == facts("hi").max_output_tokens == 400  # one prompt
    assert request_facts(Operation.COMPLETIONS, {"prompt": ["a", "b"]}).candidates == 2
    assert request_facts(Operation.CHAT, {"messages": ["a", "b"], "max_tokens": 5}).max_output_tokens == 5


@pytest.mark.parametrize("operation", list(Operation))
def test_a_body_that_is_not_an_object_has_no_facts(operation):
    for body in (None, [], "x", 3):
        assert request_facts(operation, body) == RequestFacts(None, False, False, 0, None)


def test_a_deeply_nested_body_that_orjson_accepts_does_not_raise():
    depth = 1020
    body = orjson.loads(b'{"model":"m","messages":' + b"[" * depth + b"]" * depth + b"}")
    facts = request_facts(Operation.CHAT, body)
    assert facts.model == "m"


def test_operations_are_named_by_their_openai_path():
    assert [str(o) for o in Operation] == ["chat.completions", "completions", "embeddings", "responses"]


# -- estimate_usage ------------------------------------------------------------------------------


def test_an_interrupted_stream_is_estimated_from_its_prompt_and_streamed_characters():
    assert estimate_usage(120, 401) == Usage(input_tokens=120, cached_input_tokens=0,
                                             output_tokens=101, reasoning_tokens=0)


def test_a_stream_interrupted_before_any_text_has_no_output():
    assert estimate_usage(50, 0) == Usage(50, 0, 0, 0)


def test_characters_round_up_to_whole_tokens():
    assert [tokens_for_chars(c) for c in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


# -- never an exception --------------------------------------------------------------------------

_KEYS = st.sampled_from([
    "usage", "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
    "prompt_tokens_details", "completion_tokens_details", "input_tokens_details",
    "output_tokens_details", "cached_tokens", "reasoning_tokens", "type", "response", "model", "id",
    "choices", "delta", "messages", "content", "input", "prompt", "suffix", "instructions", "tools",
    "max_tokens", "max_completion_tokens", "max_output_tokens", "n", "stream", "stream_options",
    "include_usage", "image_url", "message", "output", "output_text", "text", "summary",
    "arguments", "tool_calls", "function", "refusal",
]) | st.text(max_size=8)
_TYPES = st.sampled_from(["response.created", "response.completed", "response.incomplete", "response.failed",
                          "response.output_text.delta", "image_url", "input_image", "text"])
_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=12) | _TYPES | st.just("data:image/png;base64,AAAA"))
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=6),
    max_leaves=30,
)


@settings(deadline=None)
@given(JSON_VALUES)
def test_parse_usage_never_raises_and_keeps_its_invariants(value):
    usage = parse_usage(value)
    if usage is not None:
        assert 0 <= usage.cached_input_tokens <= usage.input_tokens
        assert 0 <= usage.reasoning_tokens <= usage.output_tokens


@settings(deadline=None)
@given(JSON_VALUES)
def test_from_body_and_from_event_never_raise(value):
    for reported in (from_body(value), from_event(value), from_event({"type": "response.completed",
                                                                       "response": value})):
        assert reported.model is None or isinstance(reported.model, str)
        assert reported.response_id is None or isinstance(reported.response_id, str)


@settings(deadline=None)
@given(JSON_VALUES)
def test_answer_chars_never_raises(value):
    assert answer_chars(value) >= 0
    assert answer_chars({"output": value}) >= 0 and answer_chars({"choices": value}) >= 0


@settings(deadline=None)
@given(JSON_VALUES)
def test_request_facts_never_raise_and_are_well_formed(value):
    for operation in Operation:
        facts = request_facts(operation, value)
        assert isinstance(facts.prompt_tokens, int) and facts.prompt_tokens >= 0
        assert facts.max_output_tokens is None or facts.max_output_tokens >= 0


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_a_nan_or_infinite_token_count_counts_as_zero(number):
    assert parse_usage({"prompt_tokens": number, "completion_tokens": 1}) == Usage(0, 0, 1, 0)


# -- values the database could not store never leave the parser ----------------------------------


def test_an_absurd_token_count_is_capped_so_it_cannot_block_the_ledger():
    usage = parse_usage({"prompt_tokens": 1e30, "completion_tokens": 2**70})
    assert usage == Usage(MAX_TOKENS, 0, MAX_TOKENS, 0)


def test_model_names_and_ids_are_cut_to_what_the_ledger_columns_hold():
    reported = from_body({"model": "m" * 1000, "id": "i" * 1000})
    assert (len(reported.model or ""), len(reported.response_id or "")) == (MAX_MODEL_LENGTH, MAX_ID_LENGTH)
    assert request_facts(Operation.CHAT, {"model": "m" * 1000}).model == "m" * MAX_MODEL_LENGTH


def test_an_absurd_output_cap_is_capped_so_the_reservation_stays_a_number():
    facts = request_facts(Operation.COMPLETIONS, {"prompt": "x", "max_tokens": 10**30, "n": 10**10,
                                                  "best_of": 10**12})
    assert facts.max_output_tokens == MAX_TOKENS


# -- billed dimensions: audio, service tier, web searches, choices --------------------------------


def test_chat_audio_tokens_are_read_from_both_details():
    usage = parse_usage({"prompt_tokens": 1000, "completion_tokens": 600,
                         "prompt_tokens_details": {"cached_tokens": 100, "audio_tokens": 700},
                         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 500}})
    assert usage == Usage(input_tokens=1000, cached_input_tokens=100, output_tokens=600,
                          audio_input_tokens=700, audio_output_tokens=500)


def test_responses_audio_tokens_are_read_from_both_details():
    usage = parse_usage({"input_tokens": 50, "output_tokens": 40,
                         "input_tokens_details": {"audio_tokens": 30},
                         "output_tokens_details": {"audio_tokens": 20, "reasoning_tokens": 5}})
    assert (usage.audio_input_tokens, usage.audio_output_tokens, usage.reasoning_tokens) == (30, 20, 5)


@pytest.mark.parametrize("audio", [None, "7", -3, [1], True])
def test_garbage_audio_counts_are_zero(audio):
    usage = parse_usage({"prompt_tokens": 10, "prompt_tokens_details": {"audio_tokens": audio}})
    assert usage.audio_input_tokens == 0


def test_audio_tokens_are_clamped_to_their_totals():
    usage = parse_usage({"prompt_tokens": 5, "completion_tokens": 3,
                         "prompt_tokens_details": {"audio_tokens": 50},
                         "completion_tokens_details": {"audio_tokens": 9}})
    assert (usage.audio_input_tokens, usage.audio_output_tokens) == (5, 3)


def test_the_service_tier_of_a_body_and_of_a_chat_usage_chunk_is_read():
    body = {"id": "c", "model": "gpt-5", "service_tier": "priority", "usage": {"prompt_tokens": 1}}
    assert from_body(body).service_tier == "priority"
    chunk = {"id": "c", "object": "chat.completion.chunk", "service_tier": "flex", "choices": [],
             "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    assert from_event(chunk).service_tier == "flex"


@pytest.mark.parametrize("tier", [None, "", 3, ["flex"]])
def test_a_missing_or_non_string_service_tier_is_none(tier):
    assert from_body({"service_tier": tier, "usage": {}}).service_tier is None


def test_a_long_service_tier_is_cut():
    assert from_body({"service_tier": "x" * 100}).service_tier == "x" * 32


def _searching_response(searches: int) -> dict:
    output = [{"type": "web_search_call", "id": f"ws_{i}", "status": "completed"} for i in range(searches)]
    return {"id": "resp_1", "object": "response", "model": "gpt-5", "service_tier": "default",
            "output": [*output, {"type": "message", "content": []}, "junk", {"type": "reasoning"}],
            "usage": {"input_tokens": 10, "output_tokens": 5}}


def test_web_search_calls_are_counted_in_a_responses_object():
    reported = from_body(_searching_response(3))
    assert reported.usage.web_search_calls == 3 and reported.service_tier == "default"


def test_web_search_calls_are_counted_in_the_terminal_event_of_a_stream():
    event = {"type": "response.completed", "response": _searching_response(2)}
    assert from_event(event).usage.web_search_calls == 2
    assert from_event(event).service_tier == "default"


def test_a_chat_body_has_no_web_search_calls():
    assert from_body({"usage": {"prompt_tokens": 1}, "choices": []}).usage.web_search_calls == 0


def test_the_requested_tier_and_the_number_of_choices_are_request_facts():
    facts = request_facts(Operation.CHAT, _chat(n=3, service_tier="flex"))
    assert (facts.candidates, facts.service_tier, facts.max_output_tokens) == (3, "flex", None)
    best_of = request_facts(Operation.COMPLETIONS, {"prompt": "x", "n": 2, "best_of": 4})
    assert best_of.candidates == 4
    assert request_facts(Operation.CHAT, _chat()).candidates == 1
    assert request_facts(Operation.CHAT, _chat(n=10**6)).candidates == 128  # OpenAI's largest n


@pytest.mark.parametrize(("tools", "preview"), [
    ([{"type": "web_search_preview"}], True),
    ([{"type": "function", "name": "roll"}, {"type": "web_search_preview_2025_03_11"}], True),
    ([{"type": "web_search"}], False),
    ("web_search_preview", False),
    ([["web_search_preview"]], False),
    (None, False),
])
def test_a_responses_request_offering_the_search_preview_tool_is_a_fact(tools, preview):
    assert request_facts(Operation.RESPONSES, {"input": "x", "tools": tools}).search_preview is preview
    chat = request_facts(Operation.CHAT, {"messages": [], "tools": tools})
    assert chat.search_preview is False
