"""`llm-cost-proxy prices MODEL [--tier T]` and PRICES_FILE errors at start, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).with_name("llm-cost-proxy")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "PRICES_FILE"}
    environment.update(env or {})
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=60, env=environment,
                          cwd=Path(__file__).parent)


def test_prices_prints_every_dimension_and_its_source():
    done = run("prices", "gpt-5", "--tier", "priority")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "service tier: priority" in out
    assert "input          $2.5 per 1M tokens" in out and "output         $20 per 1M tokens" in out
    assert "genai-prices 0.2.3" in out
    assert "largest answer: 128000 output tokens" in out
    assert "context window: 400000 tokens" in out
    assert "image: up to 1190 input tokens each (70 at detail low)" in out


def test_prices_names_our_override_and_the_fine_tune_base():
    out = run("prices", "ft:gpt-4o-mini-2024-07-18:org::abc").stdout
    assert "priced as ft:gpt-4o-mini" in out
    assert "cached input   $0.15 per 1M tokens  costing/price_overrides.json" in out
    search = run("prices", "gpt-4o-mini-search-preview").stdout
    assert "web search     $25 per 1k calls" in search and "every call is billed one web search" in search


def test_prices_of_an_unknown_model_says_it_is_priced_by_default():
    out = run("prices", "house-llama").stdout
    assert "priced by default" in out and "$0.15 per 1M tokens" in out


def test_prices_file_entries_show_as_their_source(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text('[models.house-llama]\ninput = 1\noutput = 2\nmax_output_tokens = 8000\n'
                    '[models.house-llama.service_tiers.flex]\ninput = 0.5\noutput = 1\n')
    out = run("prices", "house-llama", "--tier", "flex", env={"PRICES_FILE": str(path)}).stdout
    assert f"$0.5 per 1M tokens  PRICES_FILE {path} (flex)" in out
    assert "largest answer: 8000 output tokens" in out


@pytest.mark.parametrize(("content", "problem"), [
    ('{"gpt-4o": {"input": 1e400, "output": 1}}', "input must be at most 10000"),
    ('{"gpt-4o": {"input": -1, "output": 1}}', "input must be a non-negative number"),
    ('{"gpt-4o": {"input": NaN, "output": 1}}', "input must be a non-negative number"),
    ('{"gpt-4o": {"inptu": 1, "output": 1}}', "unknown key 'inptu'"),
    ('{"gpt-4o": {"service_tiers": {"turbo": {"input": 1}}}}', "unknown service tier 'turbo'"),
    ('{"models": {}, "prices": {}}', "unknown top-level key 'prices'"),
    ('{"house-llama": {"output": 1}}', "needs 'input' and 'output'"),
])
def test_a_bad_prices_file_is_one_line_naming_it(tmp_path, content, problem):
    _refused(tmp_path, content, problem, "prices")


@pytest.mark.parametrize(("content", "problem"), [
    ('{"gpt-4o": {"input": 1e400, "output": 1}}', "input must be at most 10000"),
    ('{"gpt-4o": {"inptu": 1, "output": 1}}', "unknown key 'inptu'"),
])
def test_a_bad_prices_file_stops_serve_with_one_line_naming_it(tmp_path, content, problem):
    _refused(tmp_path, content, problem, "serve")


def _refused(tmp_path: Path, content: str, problem: str, command: str) -> None:
    path = tmp_path / "prices.json"
    path.write_text(content)
    env = {"PRICES_FILE": str(path), "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/db.sqlite",
           "PROXY_PORT": "0"}
    done = run(command, *(["gpt-4o"] if command == "prices" else []), env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("llm-cost-proxy: PRICES_FILE: ") and problem in lines[0]


def test_prices_shows_the_cache_write_price():
    out = run("prices", "gpt-6.1-sol").stdout
    assert "cache writes   $2.5 per 1M tokens  genai-prices 0.2.3" in out
    assert "prompts above 272000 input tokens: input $4, cached $0.2, cache writes $5, output $15" in out
    assert "cache writes   billed as input" in run("prices", "gpt-4o-mini").stdout
