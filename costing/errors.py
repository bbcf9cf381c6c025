"""The domain's exceptions; the HTTP edge maps each to one status and error code in one place."""

from __future__ import annotations

from decimal import Decimal

from costing.money import format_usd


class CostingError(Exception):
    """Base of every error the domain raises on purpose."""


class BudgetExceeded(CostingError):
    """The campaign's spend (plus what this request may cost) reaches its limit."""

    def __init__(self, campaign_id: str, spent: Decimal, limit: Decimal, reservation: Decimal,
                 hint: str = "") -> None:
        self.campaign_id = campaign_id
        self.spent = spent
        self.limit = limit
        self.reservation = reservation
        self.hint = hint
        if spent >= limit:
            message = (f"Campaign '{campaign_id}' reached its cost limit: "
                       f"${format_money(spent)} spent of ${format_money(limit)}")
        else:
            message = (f"Campaign '{campaign_id}' cannot afford this request: "
                       f"${format_money(spent)} spent of ${format_money(limit)}, and this request "
                       f"may cost up to ${format_usd(reservation)} (lower max_tokens or raise the "
                       f"budget)")
            if hint:
                message = f"{message}. {hint}"
        super().__init__(message)

    def with_hint(self, hint: str) -> BudgetExceeded:
        """The same refusal, also saying why the request cannot fit (after any earlier hint)."""
        return BudgetExceeded(self.campaign_id, self.spent, self.limit, self.reservation,
                              f"{self.hint}. {hint}" if self.hint else hint)


class InvalidBudget(CostingError):
    """A budget that cannot be applied (negative, warning above limit...)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class NotFound(CostingError):
    """An unknown campaign or session."""


class LedgerUnavailable(CostingError):
    """Usage cannot be recorded now (database down with BUDGET_FAIL_CLOSED, or buffer full)."""


def format_money(amount: Decimal) -> str:
    """Human text for messages: cents, more digits only when cents would hide the amount."""
    cents = amount.quantize(Decimal("0.01"))
    return str(cents) if cents == amount or amount >= 1 else format_usd(amount)


class DatabaseUnavailable(CostingError):
    """The database cannot be used at start (missing SQLite directory, unreachable server)."""
