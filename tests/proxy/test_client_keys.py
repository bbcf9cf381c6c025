"""Client keys (PROXY_API_KEYS): only clients with a key may spend the operator's upstream key, a
bound key records under its campaign and nowhere else, and keys are never kept anywhere.

Through the real proxy with the real `openai` SDK against the loopback fake upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from decimal import Decimal

import aiohttp
import openai
import pytest
from conftest import make_settings
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from pydantic import ValidationError

from costing.settings import describe_error, parse_client_keys
from proxy.keys import open_proxy_refusal
from proxy.logs import BadRequestFilter

SERVER_KEY = "sk-server-secret-0123"
KEY_A = "pk-alpha-7f3c9e1b2d4a"
KEY_BOUND = "pk-tenant-b-91e0aa37c5"
KEYS = f"{KEY_A}, {KEY_BOUND}=tenant-b"
MESSAGES = [{"role": "user", "content": "Roll for initiative."}]


@pytest.fixture
async def keyed(start_proxy):
    return await start_proxy(proxy_api_keys=KEYS, openai_api_key=SERVER_KEY)


def client(proxy, key, campaign="c1", session="s1", **kwargs):
    headers = {"X-Session-Id": session} | ({"X-Campaign-Id": campaign} if campaign else {})
    return openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=key, default_headers=headers,
                              max_retries=0, **kwargs)


async def test_a_request_without_a_key_is_401_in_openais_shape_and_not_forwarded(keyed, fake):
    async with aiohttp.ClientSession() as http:
        for path in ("/v1/chat/completions", "/v1/models", "/v1/files"):
            async with http.post(keyed.url + path, json={"model": "gpt-4o-mini", "messages": MESSAGES},
                                 headers={"X-Campaign-Id": "c1"}) as response:
                assert response.status == 401, path
                assert response.headers["WWW-Authenticate"] == "Bearer"
                error = (await response.json())["error"]
                assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
                assert "PROXY_API_KEYS" in error["message"]
    assert fake.requests == []


async def test_an_unknown_key_is_401_for_the_sdk_on_metered_and_pass_through_paths(keyed, fake):
    with pytest.raises(openai.AuthenticationError) as caught:
        await client(keyed, "pk-not-a-key").chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await client(keyed, KEY_A + "x").models.list()
    with pytest.raises(openai.AuthenticationError):  # the operator's own key is no client key
        await client(keyed, SERVER_KEY).models.list()
    assert fake.requests == []


async def test_a_known_key_is_served_and_the_upstream_sees_only_the_server_key(keyed, fake):
    await client(keyed, KEY_A).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await client(keyed, KEY_A).models.list()  # pass-through paths too
    assert len(fake.requests) == 2
    for seen in fake.requests:
        authorizations = [v for k, v in seen.headers.items() if k.lower() == "authorization"]
        assert authorizations == [f"Bearer {SERVER_KEY}"]
        assert KEY_A not in str(seen.headers)


async def test_a_keyed_client_does_not_choose_the_operators_organization_or_project(keyed, fake):
    await client(keyed, KEY_A, organization="org-theirs", project="proj-theirs").models.list()
    async with aiohttp.ClientSession() as http:
        await http.get(f"{keyed.url}/v1/models", headers={"Authorization": f"Bearer {KEY_A}",
                                                          "Cookie": "session=theirs"})
    for seen in fake.requests:
        names = {name.lower() for name in seen.headers}
        assert not names & {"openai-organization", "openai-project", "cookie"}, seen.headers


async def test_the_bearer_scheme_is_case_insensitive(keyed, fake):
    async with aiohttp.ClientSession() as http:
        for scheme in ("bearer", "BEARER", "Bearer"):
            async with http.get(f"{keyed.url}/v1/models",
                                headers={"Authorization": f"{scheme} {KEY_A}"}) as response:
                assert response.status == 200, scheme
        basic = {"Authorization": f"Basic {KEY_A}"}
        async with http.get(f"{keyed.url}/v1/models", headers=basic) as response:
            assert response.status == 401


async def test_a_bound_key_records_under_its_campaign_whatever_the_header(keyed, fake):
    # No campaign header, and the bound campaign itself: both recorded under tenant-b.
    await client(keyed, KEY_BOUND, campaign=None).chat.completions.create(model="gpt-4o-mini",
                                                                         messages=MESSAGES)
    raw = await client(keyed, KEY_BOUND, campaign="tenant-b").chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES)
    assert raw.headers["X-Campaign-Cost-USD"]
    await keyed.flush()
    rows = await ledger_rows(keyed.engine)
    assert [r.campaign_id for r in rows] == ["tenant-b", "tenant-b"]
    await assert_aggregates_match_ledger(keyed.engine)


async def test_a_bound_key_with_another_campaign_is_403_and_nothing_is_forwarded(keyed, fake):
    for campaign in ("c1", "_untagged", "tenant-b2"):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client(keyed, KEY_BOUND, campaign=campaign).chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES)
        assert caught.value.code == "campaign_not_allowed"
        assert "tenant-b" in caught.value.message
    assert fake.requests == []
    await keyed.flush()
    assert await ledger_rows(keyed.engine) == []


COST_HEADERS = {"x-campaign-cost-usd", "x-campaign-limit-usd", "x-campaign-remaining-usd",
                "x-cost-warning", "x-request-cost-usd"}


async def test_a_background_response_read_with_another_campaigns_key_tells_nothing_of_its_cost(
        start_proxy, fake):
    """A key bound to tenant-b reading tenant-a's background response gets the answer, and the
    read meters the call to tenant-a as any read does, but carries none of tenant-a's cost
    headers: a reader only ever sees its own campaign's. tenant-a's own read carries them all."""
    proxy = await start_proxy(proxy_api_keys=f"{KEY_A}=tenant-a, {KEY_BOUND}=tenant-b",
                              openai_api_key=SERVER_KEY, cost_warning_threshold_usd=Decimal("0.000001"))
    fake.behaviour.background_polls = 0
    tenant_a, tenant_b = client(proxy, KEY_A, campaign=None), client(proxy, KEY_BOUND, campaign=None)
    read_by_b, read_by_a = [await tenant_a.responses.create(model="gpt-4o-mini", input="Scout ahead.",
                                                            background=True) for _ in range(2)]
    other = await tenant_b.responses.with_raw_response.retrieve(read_by_b.id)
    assert other.parse().status == "completed"
    assert not COST_HEADERS & {name.lower() for name in other.headers}
    own = await tenant_a.responses.with_raw_response.retrieve(read_by_a.id)
    assert own.parse().status == "completed"
    assert COST_HEADERS <= {name.lower() for name in own.headers}  # past its warning: all five
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    assert sorted((r.response_id, r.campaign_id) for r in rows) == sorted(
        [(read_by_b.id, "tenant-a"), (read_by_a.id, "tenant-a")])
    assert all(r.cost_usd > 0 for r in rows)
    assert Decimal(own.headers["X-Campaign-Cost-USD"]) == sum(r.cost_usd for r in rows)


async def test_an_unbound_key_uses_the_campaign_header(keyed, fake):
    await client(keyed, KEY_A, campaign="c7").embeddings.create(model="text-embedding-3-small",
                                                                input="goblin")
    await keyed.flush()
    [row] = await ledger_rows(keyed.engine)
    assert row.campaign_id == "c7"


async def test_keys_are_absent_from_logs_ledger_metrics_and_costs(keyed, fake, caplog):
    caplog.set_level(logging.DEBUG)
    await client(keyed, KEY_A).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        await client(keyed, "pk-wrong-key-55").chat.completions.create(model="gpt-4o-mini",
                                                                       messages=MESSAGES)
    await keyed.flush()
    [row] = await ledger_rows(keyed.engine)
    assert row.api_key_hash == hashlib.sha256(KEY_A.encode()).hexdigest()[:12]
    stored = " ".join(str(v) for v in row._mapping.values())
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{keyed.url}/metrics") as response:
            metrics = await response.text()
        texts = [metrics]
        for path in ("/costs/campaigns", "/costs/campaigns/c1", "/costs/campaigns/c1/sessions"):
            async with http.get(keyed.url + path) as response:
                assert response.status == 200
                texts.append(await response.text())
    everything = " ".join([stored, caplog.text, *texts])
    for secret in (KEY_A, KEY_BOUND, "pk-wrong-key-55", SERVER_KEY):
        assert secret not in everything


@pytest.mark.parametrize("bad", [b"\r", b"\x7f", b"\x00"])
async def test_a_request_the_http_parser_refuses_is_logged_without_its_key(keyed, fake, caplog, bad):
    """A header line with a stray CR, a DEL or a NUL byte is refused by aiohttp's parser (400,
    before any handler), whose log would quote the line, key included: one line is logged
    instead, naming the error and the peer."""
    caplog.set_level(logging.INFO)
    reader, writer = await asyncio.open_connection("127.0.0.1", keyed.port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n"
                 b"Authorization: Bearer " + KEY_A.encode() + bad + b"\r\n\r\n")
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n", 1)[0]
    assert fake.requests == []
    assert KEY_A not in caplog.text
    [line] = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert line.getMessage() == ("Refused a malformed HTTP request from 127.0.0.1: BadHttpMessage "
                                 "(its bytes are not logged)")
    assert line.levelno == logging.WARNING and line.exc_info is None


def test_the_servers_own_errors_are_still_logged_whole():
    """Only records caused by a refused request are rewritten: a failure of the server itself
    keeps its message, level and traceback."""
    try:
        raise RuntimeError("the proxy's own bug")
    except RuntimeError as exc:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1,
                                   "Error handling request from %s", ("127.0.0.1",),
                                   (type(exc), exc, exc.__traceback__))
    assert BadRequestFilter().filter(record)
    assert record.getMessage() == "Error handling request from 127.0.0.1"
    assert record.levelno == logging.ERROR and record.exc_info is not None


async def test_without_keys_the_clients_authorization_goes_upstream_as_before(start_proxy, fake):
    proxy = await start_proxy(openai_api_key=SERVER_KEY)
    await proxy.client().models.list()
    assert fake.requests[-1].headers["Authorization"] == "Bearer sk-test-key"


async def test_with_keys_and_no_server_key_the_upstream_gets_no_authorization(start_proxy, fake):
    proxy = await start_proxy(proxy_api_keys=KEY_A)
    await client(proxy, KEY_A).models.list()
    assert "authorization" not in {k.lower() for k in fake.requests[-1].headers}


# -- PROXY_API_KEYS and the open-proxy rule, as configuration ------------------------------------


def test_keys_parse_with_optional_campaign_binding_and_base64_padding():
    assert parse_client_keys(" k1 , k2=camp-2,, a2V5==") == {"k1": None, "k2": "camp-2", "a2V5==": None}


@pytest.mark.parametrize("raw", ["k1=bad campaign", "k1=a,k1=b", " , ", "k 1"])
def test_bad_keys_are_one_line_naming_the_variable_and_never_the_key(raw):
    with pytest.raises(ValidationError) as caught:
        make_settings(proxy_api_keys=raw)
    line = describe_error(caught.value)
    assert "PROXY_API_KEYS" in line and "\n" not in line and "k1" not in line


@pytest.mark.parametrize(("host", "refused"), [
    ("0.0.0.0", True), ("::", True), ("", True), ("192.0.2.7", True),
    ("127.0.0.1", False), ("127.0.0.2", False), ("::1", False), ("localhost", False),
])
def test_serving_beyond_loopback_with_a_server_key_needs_client_keys(host, refused):
    settings = make_settings(proxy_host=host, openai_api_key=SERVER_KEY)
    assert (open_proxy_refusal(settings) is not None) is refused
    for allowed in (make_settings(proxy_host=host, openai_api_key=SERVER_KEY, proxy_api_keys=KEY_A),
                    make_settings(proxy_host=host, openai_api_key=SERVER_KEY, allow_open_proxy=True),
                    make_settings(proxy_host=host)):  # no server key: clients bring their own
        assert open_proxy_refusal(allowed) is None
