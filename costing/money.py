"""Money helpers: every amount is exact on a 1e-10 USD quantum.

A fixed quantum makes sums exact and identical on PostgreSQL (NUMERIC) and SQLite (scaled
integer), so aggregates always equal the sum of the ledger to the last decimal. Amounts at the
edges (settings, the API, the database) are Decimals quantized to 10 places; amounts on the
request path (costs, reservations, budget views, cost headers) are integer *units* of 1e-10
USD, the same value without Decimal's cost: every request does a dozen sums and five headers.
"""

from decimal import ROUND_HALF_EVEN, Decimal

QUANTUM_DIGITS = 10
QUANTUM = Decimal(1).scaleb(-QUANTUM_DIGITS)
SCALE = 10**QUANTUM_DIGITS
ZERO = Decimal(0)
# The largest amount either database stores: SQLite keeps 1e-10 USD units in 64 bits (about
# 9.2e8 USD), PostgreSQL NUMERIC(20,10) just under 1e10. A hundred million dollars is plenty for
# any budget or price and leaves room for sums.
MAX_USD = Decimal(10**8)


def quantize(amount: Decimal) -> Decimal:
    """Round to the storage quantum, half-even like banks and the database do."""
    return amount.quantize(QUANTUM, rounding=ROUND_HALF_EVEN)


def to_units(amount: Decimal) -> int:
    """Decimal USD to integer units of 1e-10 USD (SQLite storage)."""
    return int(quantize(amount) * SCALE)


def from_units(units: int) -> Decimal:
    """Integer units to Decimal USD on the quantum (exact: no rounding happens)."""
    return Decimal(units).scaleb(-QUANTUM_DIGITS)


def format_units(units: int) -> str:
    """An amount in units as a plain decimal string of USD: at least cents, no exponent, no
    extra zeros ('0.000123', '5.00'), made without a Decimal (every response carries several)."""
    if units < 0:
        return "-" + format_units(-units)
    # %-format: one C-level call, measured ~20% cheaper than an f-string with a format spec.
    text = "%d.%010d" % divmod(units, SCALE)  # noqa: UP031
    short = text.rstrip("0")
    return short if len(short) >= len(text) - 8 else text[:-8]  # [:-8] keeps two decimals


def format_usd(amount: Decimal) -> str:
    """`format_units` of a Decimal, rounded half-even to the quantum first."""
    return format_units(to_units(amount))


def parse_usd(text: str) -> Decimal:
    """Parse a user-supplied amount; raises ValueError on anything that is not a finite number."""
    stripped = str(text).strip()
    if "_" in stripped:  # Decimal reads "1_000" as 1000: not how anyone writes an amount here
        raise ValueError(f"not a decimal number: {text!r}")
    try:
        value = Decimal(stripped)
    except ArithmeticError as exc:
        raise ValueError(f"not a decimal number: {text!r}") from exc
    if not value.is_finite():
        raise ValueError(f"not a finite number: {text!r}")
    if abs(value) >= MAX_USD:
        raise ValueError(f"too large: {text!r} (must be below {MAX_USD:,} USD)")
    value = quantize(value)
    if abs(value) >= MAX_USD:  # rounded up to the bound itself
        raise ValueError(f"too large: {text!r} (must be below {MAX_USD:,} USD)")
    return value
