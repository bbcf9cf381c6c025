"""The built-in cost page at GET /, in a real headless Chromium (Debian's `chromium`, driven by
Playwright): it lists campaigns, opens one, draws the daily chart, edits a budget, and moves
when a call goes through the proxy; on a phone's width too; with no console errors.

Also what a page of another site can do in that browser (proxy/browsers.py): nothing, neither
cross-origin nor by DNS rebinding (Chromium's host resolver maps `attacker.example` to 127.0.0.1,
as a rebinding DNS server would after the page loaded).

Screenshots go to tests/artifacts/ (gitignored). Without Chromium the tests skip, except in CI
(CI=true), where they fail: scripts/test.sh installs it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import IN_CI

from costing.records import UsageEntry
from costing.usage import Usage

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--host-resolver-rules=MAP attacker.example 127.0.0.1"]
HELLO = [{"role": "user", "content": "hello"}]

# One database is enough for the page: what it reads is tested on both in test_costs_api.py.
pytestmark = pytest.mark.parametrize("backend", ["sqlite"])


def _have_chromium() -> bool:
    return Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is not None


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    playwright_api = pytest.importorskip("playwright.async_api")
    if not _have_chromium():
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    async with playwright_api.async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


class Page:
    """A browser tab on the proxy that remembers every console error and page error."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    async def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path


async def _open(browser: Any, url: str, **context: Any) -> Page:
    ctx = await browser.new_context(**context)
    tab = Page(await ctx.new_page())
    await tab.page.goto(url)
    return tab


async def _call(proxy: Any, campaign: str, session: str, text: str = "hello") -> Any:
    return await proxy.client(campaign=campaign, session=session).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": text}])


async def _seed_history(proxy: Any, campaign: str, days: int) -> None:
    """Earlier days of play, written through the store as the ledger writes them."""
    now_us = int(time.time() * 1_000_000)
    entries = []
    for day in range(1, days + 1):
        for call in range(day % 4 + 1):
            entries.append(UsageEntry(
                campaign, f"day-{day}", "chat", "gpt-4o", "gpt-4o-2024-08-06",
                Usage(1500 + 100 * call, 200, 300 + day * 10, 0), (day % 5 + 1) * 3 * 10**7, False, False,
                True, 200, 900, now_us - day * 86_400_000_000 - call * 60_000_000))
    await proxy.store.write_batch(entries, proxy.ledger.holder_id)


async def test_the_page_lists_opens_charts_edits_and_follows_live(proxy, fake, browser):
    await _seed_history(proxy, "dragon-keep", 12)
    for campaign, session in (("dragon-keep", "s1"), ("dragon-keep", "s2"), ("dragon-keep", "s3"),
                              ("sunken-city", "s1")):
        await _call(proxy, campaign, session, "hello " * (len(session) * 30))
    async with aiohttp.ClientSession() as http:
        async with http.delete(f"{proxy.url}/costs/campaigns/dragon-keep/sessions/s3") as response:
            assert response.status == 200
        async with http.get(f"{proxy.url}/costs/campaigns/dragon-keep") as response:
            keep = await response.json()
        async with http.get(f"{proxy.url}/costs/campaigns/dragon-keep/daily") as response:
            daily = await response.json()

    tab = await _open(browser, proxy.url + "/", viewport={"width": 1200, "height": 900})
    page = tab.page
    rows = page.locator("#campaigns tbody tr")
    await rows.first.wait_for()
    assert await rows.count() == 2
    row = page.locator('tr[data-campaign="dragon-keep"]')
    assert " of $5.00" in await row.inner_text()
    assert Decimal(keep["cost_usd"]) > Decimal("0.1")
    assert "ok" in await row.locator(".badge").inner_text()
    await tab.shot("cost-page-campaigns")

    # Open a campaign: totals, tokens by kind, the chart, its sessions with the deleted one marked.
    await row.locator("a").click()
    await page.locator("#campaign-view").wait_for(state="visible")
    await page.locator("#chart svg").wait_for()
    assert await page.locator("#c-title").inner_text() == "dragon-keep"
    assert await page.locator("#c-requests").inner_text() == str(keep["requests"])
    bars = page.locator("#chart rect.day")
    assert await bars.count() == 30
    drawn = [(await b.get_attribute("data-date"), Decimal(await b.get_attribute("data-cost") or "-1"),
              float(await b.get_attribute("height") or 0)) for b in await bars.all()]
    assert [(d["date"], Decimal(d["cost_usd"])) for d in daily["days"]] == [(d, c) for d, c, _ in drawn]
    assert sum(1 for _, c, h in drawn if c > 0 and h > 0) == 13  # twelve earlier days and today
    tallest = max(drawn, key=lambda d: d[1])
    assert tallest[2] == max(h for _, _, h in drawn)
    tokens = await page.locator('#c-tokens [data-kind="input"]').inner_text()
    assert int(tokens.replace(",", "")) == keep["tokens"]["input"]
    deleted = page.locator('#sessions tr[data-session="s3"]')
    assert "deleted" in await deleted.inner_text()
    assert "deleted" not in await page.locator('#sessions tr[data-session="s1"]').inner_text()

    # Live: the stream is connected; a call through the proxy moves the page without a reload.
    await page.locator('#live[data-state="on"]').wait_for()
    before = await page.locator("#c-spent").inner_text()
    assert before == "$" + keep["cost_usd"]
    reply = await _call(proxy, "dragon-keep", "s1", "hello " * 400)
    await page.locator("#c-requests", has_text=str(keep["requests"] + 1)).wait_for(timeout=10_000)
    assert await page.locator("#c-spent").inner_text() == "$" + reply.headers["X-Campaign-Cost-USD"]
    latest = page.locator("#events li").first
    assert "dragon-keep / s1" in await latest.inner_text()
    assert reply.headers["X-Campaign-Cost-USD"]
    await tab.shot("cost-page-campaign")

    # Edit the budget: the campaign goes over its warning, the page and /costs agree.
    await page.fill("#warning", "0.0001")
    await page.fill("#limit", "2.50")
    await page.click("#save-budget")
    await page.locator("#budget-saved", has_text="Saved").wait_for()
    await page.locator('#c-status[data-status="warning"]').wait_for()
    assert await page.locator("#c-limit").inner_text() == "$2.50"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/costs/campaigns/dragon-keep") as response:
            budget = (await response.json())["budget"]
    assert (budget["warning_usd"], budget["limit_usd"], budget["source"]) == ("0.0001", "2.50", "override")
    await page.click("#reset-budget")
    await page.locator("#budget-saved", has_text="defaults").wait_for()
    assert await page.locator("#c-limit").inner_text() == "$5.00"
    assert tab.errors == [], tab.errors
    await page.fill("#limit", "not money")
    await page.click("#save-budget")
    await page.locator("#error").wait_for(state="visible")
    assert "limit_usd" in await page.locator("#error").inner_text()
    # The browser logs the refused PUT (422); the page said what to fix, and nothing else failed.
    assert len(tab.errors) == 1 and "422" in tab.errors[0], tab.errors
    tab.errors.clear()
    await page.reload()
    await page.locator("#chart svg").wait_for()
    await page.locator("#c-status").wait_for()

    # The list follows live as well, and a new campaign appears.
    await page.click("#home")
    await page.locator("#campaigns-view").wait_for(state="visible")
    await _call(proxy, "new-campaign", "s1")
    await page.locator('tr[data-campaign="new-campaign"]').wait_for(timeout=10_000)
    await tab.shot("cost-page-list-live")
    assert tab.errors == [], tab.errors

    # A phone: nothing wider than the screen, the campaign readable.
    phone = await _open(browser, proxy.url + "/#/c/dragon-keep", viewport={"width": 390, "height": 844},
                        device_scale_factor=2, is_mobile=True, has_touch=True)
    await phone.page.locator("#chart svg").wait_for()
    widths = await phone.page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], widths
    await phone.shot("cost-page-phone")
    assert phone.errors == [], phone.errors


async def test_under_steady_traffic_the_open_campaign_keeps_moving_and_long_ids_fit_a_phone(
        proxy, fake, browser):
    """A call every 100 ms: the figures follow while the calls go on (a reload at most every
    250 ms, not one that every event puts off); a 128-character id wraps on a phone screen."""
    campaign, session = "c" * 128, "s" * 128
    await _call(proxy, campaign, session)
    tab = await _open(browser, f"{proxy.url}/#/c/{campaign}", viewport={"width": 390, "height": 844},
                      is_mobile=True)
    page = tab.page
    await page.locator("#c-requests", has_text="1").wait_for()
    await page.locator('#live[data-state="on"]').wait_for()
    widths = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], widths
    seen: list[int] = []
    for _ in range(25):
        await _call(proxy, campaign, session)
        await asyncio.sleep(0.1)
        seen.append(int((await page.locator("#c-requests").inner_text()).replace(",", "")))
    assert seen[-1] > 10, seen  # it moved while the traffic went on
    await page.locator("#c-requests", has_text="26").wait_for()
    await page.click("#home")
    await page.locator(f'tr[data-campaign="{campaign}"]').wait_for()
    widths = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], widths
    assert tab.errors == [], tab.errors


async def test_with_a_token_the_page_asks_for_it_and_keeps_it_in_the_tab(start_proxy, fake, browser):
    proxy = await start_proxy(costs_api_token="page-s3cret")
    await _call(proxy, "guarded", "s1")
    tab = await _open(browser, proxy.url + "/")
    page = tab.page
    await page.locator("#token-form").wait_for(state="visible")
    await tab.shot("cost-page-token")
    await page.fill("#token", "page-s3cret")
    await page.click("#token-form button")
    await page.locator('tr[data-campaign="guarded"]').wait_for()
    assert await page.evaluate("sessionStorage.getItem('llm-cost-proxy.token')") == "page-s3cret"
    await page.locator('#live[data-state="on"]').wait_for()
    await _call(proxy, "guarded", "s2")
    await page.locator('#events li[data-campaign="guarded"]').wait_for(timeout=10_000)
    # The 401 the first load got is the page's cue to ask, not an error of the page.
    assert [e for e in tab.errors if "401" not in e] == [], tab.errors


SPEND = """async (proxy) => {
  const body = JSON.stringify({model: "gpt-4o-mini", messages: [{role: "user", content: "spend"}]});
  const sent = await fetch(proxy + "/v1/chat/completions",
                           {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body});
  return sent.type;
}"""


@pytest.fixture
async def other_site() -> AsyncIterator[str]:
    """Any other web page the operator has open: here another local server (another origin)."""
    app = web.Application()

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>cute cats</title>", content_type="text/html")

    app.router.add_get("/", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


async def test_another_sites_page_cannot_spend_the_operators_key(start_proxy, fake, browser, other_site):
    proxy = await start_proxy(openai_api_key="sk-operator-secret")
    tab = await _open(browser, other_site)
    # A "simple" request: no preflight, the browser sends it and the page learns nothing back.
    assert await tab.page.evaluate(SPEND, proxy.url) == "opaque"
    # A form post (a navigation, text/plain) in a frame of the page, the other classic way in.
    await tab.page.evaluate("""(proxy) => {
      const frame = document.createElement("iframe"); frame.name = "sink"; document.body.append(frame);
      const form = document.createElement("form");
      Object.assign(form, {method: "POST", action: proxy + "/v1/chat/completions", target: "sink",
                           enctype: "text/plain"});
      const field = document.createElement("input");
      Object.assign(field, {name: '{"model": "gpt-4o-mini", "messages": [], "x": "', value: '"}'});
      form.append(field); document.body.append(form); form.submit();
    }""", proxy.url)
    await tab.page.wait_for_timeout(500)
    assert fake.requests == []
    await proxy.flush()
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/costs/campaigns") as response:
        assert (await response.json())["campaigns"] == []


async def test_a_rebinding_page_can_neither_read_costs_nor_edit_budgets(start_proxy, fake, browser):
    proxy = await start_proxy(openai_api_key="sk-operator-secret")
    await _call(proxy, "dragon-keep", "s1")
    await proxy.flush()
    tab = await _open(browser, "about:blank")
    # attacker.example now resolves to 127.0.0.1: the page is same-origin with the proxy.
    response = await tab.page.goto(f"http://attacker.example:{proxy.port}/")
    assert response is not None and response.status == 403
    answers = await tab.page.evaluate("""async () => {
      const json = {"Content-Type": "application/json"};
      const read = await fetch("/costs/campaigns");
      const edit = await fetch("/costs/campaigns/dragon-keep/budget", {method: "PUT", headers: json,
        body: JSON.stringify({warning_usd: "0", limit_usd: "1000"})});
      const spend = await fetch("/v1/chat/completions", {method: "POST", headers: json,
        body: JSON.stringify({model: "gpt-4o-mini", messages: [{role: "user", content: "spend"}]})});
      return Promise.all([read, edit, spend].map(async (r) => [r.status, (await r.json()).error.code]));
    }""")
    assert answers == [[403, "host_not_allowed"]] * 3
    assert len(fake.requests) == 1  # the SDK's call only
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/costs/campaigns/dragon-keep") as answer:
            assert (await answer.json())["budget"]["source"] == "default"
