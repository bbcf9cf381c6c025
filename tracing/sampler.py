"""`OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, with the standard names and meanings.

A sampler is a function (trace id, parent or None) -> sampled; a parent-based one follows the
caller's sampled flag and asks its root sampler only for new traces.
"""

from __future__ import annotations

from collections.abc import Callable

from tracing.context import Parent

Sampler = Callable[[str, Parent | None], bool]
"""(trace id as 32 hex digits, the caller's span or None) -> sampled."""
NAMES = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
         "parentbased_always_off", "parentbased_traceidratio")


def _always_on(trace_id: str, parent: Parent | None) -> bool:
    return True


def _always_off(trace_id: str, parent: Parent | None) -> bool:
    return False


def ratio(rate: float) -> Sampler:
    """TraceIdRatioBased as OpenTelemetry's SDKs do it: the trace id's low 64 bits (its last 16
    hex digits) against a bound, so every service sampling at the same rate keeps the same traces."""
    bound = round(min(max(rate, 0.0), 1.0) * (1 << 64))

    def sample(trace_id: str, parent: Parent | None) -> bool:
        return int(trace_id[16:], 16) < bound

    return sample


def parent_based(root: Sampler) -> Sampler:
    def sample(trace_id: str, parent: Parent | None) -> bool:
        return root(trace_id, None) if parent is None else parent.sampled

    return sample


def make_sampler(name: str, arg: str | None) -> Sampler:
    """The sampler named; raises ValueError for an unknown name or a bad ratio."""
    name = name.strip().lower()
    if name not in NAMES:
        raise ValueError(f"OTEL_TRACES_SAMPLER: unknown sampler {name!r}; use one of {', '.join(NAMES)}")
    base = name.removeprefix("parentbased_")
    root: Sampler
    if base == "always_on":
        root = _always_on
    elif base == "always_off":
        root = _always_off
    else:
        try:
            rate = 1.0 if arg is None or not arg.strip() else float(arg)
        except ValueError:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be a number from 0 to 1, not {arg!r}") from None
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be from 0 to 1, not {arg!r}")
        root = ratio(rate)
    return parent_based(root) if name.startswith("parentbased_") else root
