"""Which OpenAI endpoints the budget gate refuses at the limit and the ledger records: walked
against OpenAI's API reference, path by path."""

from __future__ import annotations

import pytest
from openai_endpoints import METERED, OPENAI_BILLABLE, OPENAI_FREE

from costing.endpoints import OPERATIONS, Kind, classify, normalize
from costing.usage import Operation


@pytest.mark.parametrize("path", OPENAI_BILLABLE)
def test_billable_posts_are_gated_and_recorded(path: str) -> None:
    endpoint = classify("POST", path)
    assert endpoint.kind is Kind.BILLABLE and endpoint.operation and len(endpoint.operation) <= 32


@pytest.mark.parametrize("path", METERED)
def test_the_priced_operations_are_metered(path: str) -> None:
    endpoint = classify("POST", path)
    assert endpoint.kind is Kind.METERED and endpoint.metered is not None
    assert classify("POST", path + "/").kind is Kind.METERED


@pytest.mark.parametrize("path", OPENAI_FREE)
def test_free_posts_and_cancellations_pass(path: str) -> None:
    assert classify("POST", path).kind is Kind.FREE


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("path", [*OPENAI_BILLABLE, "/v1/models", "/v1/files/file_1/content"])
def test_reading_and_deleting_is_never_refused(method: str, path: str) -> None:
    assert classify(method, path).kind is Kind.FREE


def test_an_unknown_post_is_gated_as_billable() -> None:
    """A new OpenAI endpoint the list does not know yet: a budget that holds matters more."""
    endpoint = classify("POST", "/v1/brand_new/things")
    assert (endpoint.kind, endpoint.operation) == (Kind.BILLABLE, "brand_new")


@pytest.mark.parametrize("path", [*METERED, *OPENAI_BILLABLE])
def test_every_known_path_is_named_from_the_fixed_list_of_operations(path: str) -> None:
    """The names metrics may use as labels: a known path's name is always one of them."""
    assert classify("POST", path).operation in OPERATIONS


def test_an_unknown_paths_name_is_not_an_operation() -> None:
    """Chosen by the client (`POST /v1/<anything>`): the ledger keeps it, metrics do not."""
    assert classify("POST", "/v1/0123abcd/things").operation not in OPERATIONS


def test_response_objects_are_read_for_their_final_state() -> None:
    assert classify("GET", "/v1/responses/resp_1").kind is Kind.RETRIEVAL
    assert classify("POST", "/v1/responses/resp_1/cancel").kind is Kind.RETRIEVAL
    assert classify("GET", "/v1/responses/resp_1/input_items").kind is Kind.FREE
    assert classify("DELETE", "/v1/responses/resp_1").kind is Kind.FREE


def test_repeated_slashes_are_merged_before_routing() -> None:
    assert normalize("/v1//chat///completions") == "/v1/chat/completions"
    assert classify("POST", normalize("/v1//chat/completions")).kind is Kind.METERED
    assert classify("POST", normalize("//v1/images//generations")).kind is Kind.BILLABLE


@pytest.mark.parametrize(("path", "operation"), [
    ("/v1/chat/completions", Operation.CHAT),
    ("/v1/completions", Operation.COMPLETIONS),
    ("/v1/embeddings", Operation.EMBEDDINGS),
    ("/v1/responses", Operation.RESPONSES),
    ("/v1/chat/completions/", Operation.CHAT),
    ("/v1/responses/", Operation.RESPONSES),
    ("/v1/responses/compact", Operation.RESPONSES),  # a Responses call: its usage is Responses'
])
def test_posting_to_a_metered_path_is_a_metered_operation(path, operation):
    assert classify("POST", path).metered is operation


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
def test_other_methods_on_metered_paths_are_not_metered(method):
    assert classify(method, "/v1/chat/completions").metered is None
    assert classify(method, "/v1/responses").metered is None


@pytest.mark.parametrize("path", ["/v1/models", "/v1/files", "/v1/chat/completions/chatcmpl-1",
                                  "/v1/responses/resp_1", "/v1/responses/resp_1/cancel",
                                  "/v1/images/generations", "/chat/completions", "/v2/chat/completions", "/"])
def test_other_paths_are_not_metered(path):
    assert classify("POST", path).metered is None
