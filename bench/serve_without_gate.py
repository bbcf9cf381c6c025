"""`llm-cost-proxy serve` with the budget gate switched off, to measure what the gate costs.

Metering, pricing, the ledger, headers and metrics stay as they are; only the worst-case
reservation and the admission check (lease, limit) are skipped. Not for production: it is the
"before" side of a before/after benchmark.

    PROXY_CMD=".venv/bin/python bench/serve_without_gate.py" .venv/bin/python ../shared/bench/run.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from costing import meter
from costing.gate import Admission, BudgetGate
from proxy.cli import main


async def admit_everything(self: BudgetGate, campaign_id: str, reservation: int) -> Admission:
    view = self.views.get(campaign_id) or await self._load(campaign_id)
    return self._take(view, campaign_id, 0, verified=True)


def no_reservation(*_args: Any) -> int:
    return 0


BudgetGate.admit = admit_everything  # type: ignore[method-assign]
BudgetGate.admit_now = lambda *_args: None  # type: ignore[method-assign,assignment]
meter.worst_case_units = no_reservation  # type: ignore[assignment]

if __name__ == "__main__":
    main(["serve"])
