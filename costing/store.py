"""Storage: the only code that speaks SQL. A narrow API over the ledger tables: write a batch,
lease budget, read totals, manage budgets and deleted sessions.

Every aggregate changes only by atomic increments (`SET x = x + excluded.x`) in the same
transaction that inserts the ledger rows, and only for rows actually inserted (the insert is
idempotent on the proxy's own record id), so retries never double count and
the aggregates always equal the sum of `usage_records`.
"""

from __future__ import annotations

import functools
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Table, and_, bindparam, case, func, literal, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from costing.budget import Budget, effective, lease_amount
from costing.models import (
    BackgroundResponse,
    BudgetLease,
    CampaignCostAggregate,
    CampaignDailyCost,
    Money,
    SessionCostSnapshot,
    UsageRecord,
)
from costing.money import ZERO, from_units, to_units
from costing.records import (
    CampaignSnapshot,
    CampaignTotals,
    DayTotals,
    LeaseGrant,
    RemoteUsage,
    SessionTotals,
    Totals,
    UsageEntry,
    epoch_us,
    from_epoch_us,
)
from costing.usage import Operation, Usage

RECORDS: Table = UsageRecord.__table__  # type: ignore[assignment]
SESSIONS: Table = SessionCostSnapshot.__table__  # type: ignore[assignment]
CAMPAIGNS: Table = CampaignCostAggregate.__table__  # type: ignore[assignment]
DAILY: Table = CampaignDailyCost.__table__  # type: ignore[assignment]
LEASES: Table = BudgetLease.__table__  # type: ignore[assignment]
BACKGROUND: Table = BackgroundResponse.__table__  # type: ignore[assignment]

TOTAL_COLUMNS = ("cost_usd", "requests", "input_tokens", "cached_input_tokens", "output_tokens",
                 "reasoning_tokens", "audio_input_tokens", "audio_output_tokens",
                 "cache_write_input_tokens", "cached_audio_input_tokens")


def _totals(row: Any) -> Totals:
    return Totals(
        cost_usd=row.cost_usd if row.cost_usd is not None else ZERO,
        requests=int(row.requests or 0),
        input_tokens=int(row.input_tokens or 0),
        cached_input_tokens=int(row.cached_input_tokens or 0),
        output_tokens=int(row.output_tokens or 0),
        reasoning_tokens=int(row.reasoning_tokens or 0),
        audio_input_tokens=int(row.audio_input_tokens or 0),
        audio_output_tokens=int(row.audio_output_tokens or 0),
        cache_write_input_tokens=int(row.cache_write_input_tokens or 0),
        cached_audio_input_tokens=int(row.cached_audio_input_tokens or 0),
    )


def _totals_values(totals: Totals) -> dict[str, Any]:
    return {name: getattr(totals, name) for name in TOTAL_COLUMNS}


class Store:
    """Repository over one engine. `default_budget` applies where a campaign has no override."""

    def __init__(self, engine: AsyncEngine, default_budget: Budget) -> None:
        self.engine = engine
        self.default_budget = default_budget
        self._dialect = engine.dialect.name
        self._returning = False  # see write_batch
        # Built once: constructing these upserts (each `excluded` proxies every column) cost more
        # main-thread time than writing a small batch.
        self._add_to_campaigns = self._upsert_adding(CAMPAIGNS, ["campaign_id"], seen=True)
        self._add_to_sessions = self._upsert_adding(SESSIONS, ["campaign_id", "session_id"], seen=True,
                                                    revive=True)
        self._add_to_days = self._upsert_adding(DAILY, ["campaign_id", "day"], seen=False)
        spent = bindparam("spent", type_=Money())
        self._take_from_lease = (
            update(LEASES)
            .where(LEASES.c.campaign_id == bindparam("cid"), LEASES.c.holder_id == bindparam("holder"))
            .values(amount_usd=case((LEASES.c.amount_usd > spent, LEASES.c.amount_usd - spent),
                                    else_=literal(ZERO, Money()))))

    # -- writes -------------------------------------------------------------------------------

    def _insert(self, table: Table) -> Any:
        module: Any = postgresql if self._dialect == "postgresql" else sqlite
        return module.insert(table)

    def _upsert_adding(self, table: Table, keys: Sequence[str], *, seen: bool,
                       revive: bool = False) -> Any:
        """INSERT ... ON CONFLICT (keys) DO UPDATE adding every total (atomic increments).

        `revive`: a call in a deleted session clears its `deleted_at` (its earlier cost stays),
        so the session lists keep adding up to the campaign."""
        stmt = self._insert(table)
        changes: dict[str, Any] = {
            name: table.c[name] + stmt.excluded[name] for name in TOTAL_COLUMNS
        }
        if seen:
            first, last = table.c.first_seen, table.c.last_seen
            changes["first_seen"] = case(
                (first.is_(None), stmt.excluded.first_seen),
                (stmt.excluded.first_seen < first, stmt.excluded.first_seen), else_=first)
            changes["last_seen"] = case(
                (last.is_(None), stmt.excluded.last_seen),
                (stmt.excluded.last_seen > last, stmt.excluded.last_seen), else_=last)
        if revive:
            changes["deleted_at"] = None
        return stmt.on_conflict_do_update(index_elements=list(keys), set_=changes)

    async def write_batch(self, entries: Sequence[UsageEntry], holder_id: str) -> list[UsageEntry]:
        """Insert ledger rows and add them to every aggregate in one transaction.

        Returns the entries actually inserted (a record id already in the ledger, from a retried
        batch or a replayed spool, is skipped, and so are its increments). Recorded cost is taken
        off this process's budget lease in the same transaction, since it now counts as spend.
        """
        if not entries:
            return []
        entries = list({e.id: e for e in entries}.values())  # one id, one row, one increment
        if self._returning:
            inserted = await self._write(entries, holder_id, returning=True)
            # Known records come in runs (a retried batch, a replayed backlog): return ids until
            # a batch has none, rather than write each batch twice.
            self._returning = len(inserted) < len(entries)
            return inserted
        try:
            return await self._write(entries, holder_id, returning=False)
        except _SomeWereKnown:
            self._returning = True
            return await self._write(entries, holder_id, returning=True)

    async def _write(self, entries: list[UsageEntry], holder_id: str, *,
                     returning: bool) -> list[UsageEntry]:
        """One transaction. Without `returning` the insert only counts its rows, which is
        cheaper, and raises _SomeWereKnown (rolling back) when fewer than all went in: then the
        caller writes again with `returning`, to learn which ones did."""
        insert = _insert_records_postgresql if self._dialect == "postgresql" else _insert_records_sqlite
        async with self.engine.begin() as conn:
            inserted_ids = await insert(conn, entries, returning)
            if inserted_ids is None:
                inserted = entries
            else:
                inserted = [e for e in entries if e.id in inserted_ids]
            await self._add_to_aggregates(conn, inserted, holder_id)
        return inserted

    async def _add_to_aggregates(
        self, conn: AsyncConnection, entries: Sequence[UsageEntry], holder_id: str
    ) -> None:
        if not entries:
            return
        # Group once by the finest key, then roll the few groups up: per-row work stays minimal.
        groups: dict[tuple[str, str, int], list[UsageEntry]] = defaultdict(list)
        for e in entries:
            groups[(e.campaign_id, e.session_id, e.created_us // US_PER_DAY)].append(e)
        campaigns: dict[str, _Span] = {}
        sessions: dict[tuple[str, str], _Span] = {}
        days: dict[tuple[str, date], Totals] = defaultdict(Totals)
        for (c, s, d), group in groups.items():
            span = _Span.of(group)
            _merge_span(campaigns, c, span)
            _merge_span(sessions, (c, s), span)
            days[(c, EPOCH_DAY + timedelta(days=d))].merge(span.totals)
        # Sorted keys: every writer locks rows in one order, so replicas cannot deadlock.
        await conn.execute(
            self._add_to_campaigns,
            [{"campaign_id": c, **span.values()} for c, span in sorted(campaigns.items())],
        )
        await conn.execute(
            self._add_to_sessions,
            [{"campaign_id": c, "session_id": s, **span.values()}
             for (c, s), span in sorted(sessions.items())],
        )
        await conn.execute(
            self._add_to_days,
            [{"campaign_id": c, "day": d, **_totals_values(t)} for (c, d), t in sorted(days.items())],
        )
        await conn.execute(
            self._take_from_lease,
            [{"cid": c, "holder": holder_id, "spent": span.totals.cost_usd}
             for c, span in sorted(campaigns.items())],
        )

    # -- budget leases -------------------------------------------------------------------------

    def _budget(self, row: Any) -> Budget:
        return effective(row.warning_usd, row.limit_usd, self.default_budget)

    async def acquire_lease(
        self, campaign_id: str, holder_id: str, *, held: Decimal, need: Decimal,
        fraction: Decimal, now: datetime, expires_at: datetime,
    ) -> LeaseGrant:
        """Grow this process's lease to cover `need` (plus a slice of the headroom), if it fits.

        `held` is what already-admitted work needs; it stays leased even when `need` is refused.
        The campaign row is locked, so concurrent leases of all replicas are serialized.
        """
        async with self.engine.begin() as conn:
            await conn.execute(
                self._insert(CAMPAIGNS).values(campaign_id=campaign_id).on_conflict_do_nothing())
            row = (await conn.execute(
                select(CAMPAIGNS.c.cost_usd, CAMPAIGNS.c.warning_usd, CAMPAIGNS.c.limit_usd)
                .where(CAMPAIGNS.c.campaign_id == campaign_id).with_for_update())).one()
            others = await conn.scalar(
                select(func.coalesce(func.sum(LEASES.c.amount_usd), literal(ZERO, Money())))
                .where(LEASES.c.campaign_id == campaign_id, LEASES.c.holder_id != holder_id,
                       LEASES.c.expires_at > now))
            budget = self._budget(row)
            spent: Decimal = row.cost_usd
            headroom = budget.limit_usd - spent - (others or ZERO)
            amount = lease_amount(need, headroom, fraction) if spent < budget.limit_usd else None
            admitted = amount is not None
            held_amount = amount if amount is not None else held
            stmt = self._insert(LEASES).values(
                campaign_id=campaign_id, holder_id=holder_id, amount_usd=held_amount,
                expires_at=expires_at)
            await conn.execute(stmt.on_conflict_do_update(
                index_elements=["campaign_id", "holder_id"],
                set_={"amount_usd": stmt.excluded.amount_usd, "expires_at": stmt.excluded.expires_at}))
        return LeaseGrant(admitted, held_amount, spent, budget)

    async def refresh(
        self, campaign_ids: Iterable[str], holder_id: str, *, renew_until: datetime | None,
        trims: Mapping[str, Decimal] | None = None,
    ) -> dict[str, CampaignSnapshot]:
        """Current spend, budget and this process's lease of some campaigns; renews the leases,
        first lowering those in `trims` to at most the amount given (never raising one)."""
        ids = sorted(set(campaign_ids))
        if not ids:
            return {}
        async with self.engine.begin() as conn:
            if trims:
                cap = bindparam("cap", type_=Money())
                await conn.execute(
                    update(LEASES)
                    .where(LEASES.c.campaign_id == bindparam("cid"),
                           LEASES.c.holder_id == bindparam("holder"))
                    .values(amount_usd=case((LEASES.c.amount_usd > cap, cap), else_=LEASES.c.amount_usd)),
                    [{"cid": cid, "holder": holder_id, "cap": amount} for cid, amount in trims.items()])
            if renew_until is not None:
                await conn.execute(
                    update(LEASES)
                    .where(LEASES.c.holder_id == holder_id, LEASES.c.campaign_id.in_(ids))
                    .values(expires_at=renew_until))
            rows = await conn.execute(
                select(CAMPAIGNS.c.campaign_id, CAMPAIGNS.c.cost_usd, CAMPAIGNS.c.warning_usd,
                       CAMPAIGNS.c.limit_usd, LEASES.c.amount_usd)
                .select_from(CAMPAIGNS.outerjoin(LEASES, and_(
                    LEASES.c.campaign_id == CAMPAIGNS.c.campaign_id,
                    LEASES.c.holder_id == holder_id)))
                .where(CAMPAIGNS.c.campaign_id.in_(ids)))
            found = {
                row.campaign_id: CampaignSnapshot(row.cost_usd, self._budget(row),
                                                  row.amount_usd or ZERO)
                for row in rows
            }
        for campaign_id in ids:
            found.setdefault(campaign_id, CampaignSnapshot(ZERO, self.default_budget, ZERO))
        return found

    async def purge_expired_leases(self, before: datetime) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(LEASES.delete().where(LEASES.c.expires_at < before))

    # -- background responses --------------------------------------------------------------------

    async def save_background_owners(self, owners: Sequence[tuple[str, str, str, int]]) -> None:
        """Store who created background responses: (response id, campaign, session, epoch
        microseconds). The first creator stored wins (an id seen again changes nothing)."""
        if not owners:
            return
        rows = [{"response_id": r, "campaign_id": c, "session_id": s, "created_at": from_epoch_us(us)}
                for r, c, s, us in {o[0]: o for o in owners}.values()]
        async with self.engine.begin() as conn:
            await conn.execute(self._insert(BACKGROUND).on_conflict_do_nothing(
                index_elements=["response_id"]), rows)

    async def background_owner(self, response_id: str) -> tuple[str, str] | None:
        """The campaign and session that created a background response, if stored: one read of
        the primary key."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(
                select(BACKGROUND.c.campaign_id, BACKGROUND.c.session_id)
                .where(BACKGROUND.c.response_id == response_id))).first()
        return (row.campaign_id, row.session_id) if row is not None else None

    async def prune_background_owners(self, before: datetime) -> int:
        """Forget creators stored before `before` (its index on created_at); how many went."""
        async with self.engine.begin() as conn:
            result = await conn.execute(BACKGROUND.delete().where(BACKGROUND.c.created_at < before))
        return int(result.rowcount or 0)

    # -- budgets -----------------------------------------------------------------------------------

    async def set_budget(self, campaign_id: str, budget: Budget | None) -> None:
        """Store (or with None, clear) a campaign's override; revokes every replica's lease so the
        new limit is what the next lease is measured against."""
        warning = budget.warning_usd if budget else None
        limit = budget.limit_usd if budget else None
        async with self.engine.begin() as conn:
            stmt = self._insert(CAMPAIGNS).values(
                campaign_id=campaign_id, warning_usd=warning, limit_usd=limit)
            await conn.execute(stmt.on_conflict_do_update(
                index_elements=["campaign_id"],
                set_={"warning_usd": stmt.excluded.warning_usd, "limit_usd": stmt.excluded.limit_usd}))
            await conn.execute(LEASES.delete().where(LEASES.c.campaign_id == campaign_id))

    # -- reads -------------------------------------------------------------------------------------

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def session_cost(self, campaign_id: str, session_id: str) -> Decimal:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                select(SESSIONS.c.cost_usd).where(SESSIONS.c.campaign_id == campaign_id,
                                                  SESSIONS.c.session_id == session_id))
        return value if value is not None else ZERO

    async def response_tokens(self, response_id: str) -> int | None:
        """Input + output tokens of a Responses response as the ledger recorded them from the
        upstream's usage (estimated rows do not count), for the reservation of a call that
        continues it; the largest where an id was reused. None when no such row is written.
        One lookup on the response id's index."""
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                select(func.max(RECORDS.c.input_tokens + RECORDS.c.output_tokens))
                .where(RECORDS.c.response_id == response_id,
                       RECORDS.c.operation == Operation.RESPONSES.value,
                       RECORDS.c.estimated.is_(False)))
        return int(value) if value is not None else None

    async def campaigns(self, *, limit: int, after: str | None = None,
                        ids: Sequence[str] | None = None) -> list[CampaignTotals]:
        """Campaigns ordered by id (keyset pagination after `after`), with session statistics."""
        query = select(CAMPAIGNS).order_by(CAMPAIGNS.c.campaign_id).limit(limit)
        if after is not None:
            query = query.where(CAMPAIGNS.c.campaign_id > after)
        if ids is not None:
            query = query.where(CAMPAIGNS.c.campaign_id.in_(list(ids)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            if not rows:
                return []
            deleted = SESSIONS.c.deleted_at.is_not(None)
            stats = {
                r.campaign_id: r
                for r in await conn.execute(
                    select(
                        SESSIONS.c.campaign_id,
                        func.count().label("sessions"),
                        func.count(SESSIONS.c.deleted_at).label("deleted"),
                        func.coalesce(func.sum(case((deleted, SESSIONS.c.cost_usd))),
                                      literal(ZERO, Money())).label("deleted_cost"),
                    )
                    .where(SESSIONS.c.campaign_id.in_([r.campaign_id for r in rows]))
                    .group_by(SESSIONS.c.campaign_id))
            }
        result = []
        for row in rows:
            stat = stats.get(row.campaign_id)
            result.append(CampaignTotals(
                campaign_id=row.campaign_id, totals=_totals(row), budget=self._budget(row),
                first_seen=row.first_seen, last_seen=row.last_seen,
                session_count=int(stat.sessions) if stat else 0,
                deleted_session_count=int(stat.deleted) if stat else 0,
                deleted_sessions_cost_usd=stat.deleted_cost if stat else ZERO,
                has_budget_override=row.warning_usd is not None or row.limit_usd is not None,
            ))
        return result

    async def campaign(self, campaign_id: str) -> CampaignTotals | None:
        found = await self.campaigns(limit=1, ids=[campaign_id])
        return found[0] if found else None

    async def sessions(self, campaign_id: str, *, include_deleted: bool, order_by: str = "last_seen",
                       limit: int = 1000, session_id: str | None = None) -> list[SessionTotals]:
        """Sessions of a campaign, newest (or costliest) first."""
        order = {"cost": SESSIONS.c.cost_usd.desc(), "last_seen": SESSIONS.c.last_seen.desc(),
                 "first_seen": SESSIONS.c.first_seen.desc()}[order_by]
        query = (select(SESSIONS).where(SESSIONS.c.campaign_id == campaign_id)
                 .order_by(order, SESSIONS.c.session_id).limit(limit))
        if session_id is not None:
            query = query.where(SESSIONS.c.session_id == session_id)
        elif not include_deleted:
            query = query.where(SESSIONS.c.deleted_at.is_(None))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [SessionTotals(r.campaign_id, r.session_id, _totals(r), r.first_seen, r.last_seen,
                              r.deleted_at) for r in rows]

    async def session(self, campaign_id: str, session_id: str) -> SessionTotals | None:
        found = await self.sessions(campaign_id, include_deleted=True, session_id=session_id)
        return found[0] if found else None

    async def delete_session(self, campaign_id: str, session_id: str, now: datetime) -> bool:
        """Flag a session deleted (first deletion time kept); False when it does not exist."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(SESSIONS)
                .where(SESSIONS.c.campaign_id == campaign_id, SESSIONS.c.session_id == session_id)
                .values(deleted_at=func.coalesce(SESSIONS.c.deleted_at, bindparam(
                    "now", now, type_=SESSIONS.c.deleted_at.type))))
        return bool(result.rowcount)

    async def daily(self, campaign_id: str, start: date, end: date) -> list[DayTotals]:
        """Stored days of [start, end]; days without usage are absent (the caller zero-fills)."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(DAILY).where(DAILY.c.campaign_id == campaign_id, DAILY.c.day >= start,
                                    DAILY.c.day <= end).order_by(DAILY.c.day))
            return [DayTotals(r.day, _totals(r)) for r in rows]

    async def stored_sessions(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], SessionTotals]:
        """The stored sessions among (campaign, session) pairs, deleted ones included."""
        wanted = sorted(set(pairs))
        if not wanted:
            return {}
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(SESSIONS).where(tuple_(SESSIONS.c.campaign_id, SESSIONS.c.session_id).in_(wanted)))
            return {(r.campaign_id, r.session_id): SessionTotals(
                r.campaign_id, r.session_id, _totals(r), r.first_seen, r.last_seen, r.deleted_at)
                for r in rows}

    async def count_records_between(self, floor_id: int, ceiling_id: int) -> int:
        """How many ledger rows have an id from `floor_id` up to (not including) `ceiling_id`: a
        range of the primary key (record ids are version 7 UUIDs, time-ordered), counted from
        the index alone."""
        async with self.engine.connect() as conn:
            return int(await conn.scalar(
                select(func.count()).select_from(RECORDS).where(
                    RECORDS.c.id >= uuid.UUID(int=floor_id), RECORDS.c.id < uuid.UUID(int=ceiling_id))) or 0)

    async def record_ids_between(self, floor_id: int, ceiling_id: int, limit: int) -> list[int]:
        """Ids of ledger rows in that range, oldest first (see `count_records_between`)."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(RECORDS.c.id).where(RECORDS.c.id >= uuid.UUID(int=floor_id),
                                           RECORDS.c.id < uuid.UUID(int=ceiling_id))
                .order_by(RECORDS.c.id).limit(limit))
            return [row[0].int for row in rows]

    async def usage_with_totals(self, ids: Sequence[int], ceiling_id: int) -> list[RemoteUsage]:
        """Ledger rows by id, oldest first, each with its campaign's and session's totals as they
        stood right after it (in id order: the ledger's running sums) and its budget, for the
        live feed's events of other processes.

        One statement, so the stored totals and the rows after each one are read at one moment:
        the costs of the rows after it, up to `ceiling_id` (the watcher's window; a background
        final state's derived id is never counted as later), are taken off the stored totals.
        """
        if not ids:
            return []
        r, c, s = RECORDS, CAMPAIGNS, SESSIONS
        later = (1, None)  # ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING
        window = (
            select(r, func.coalesce(func.sum(r.c.cost_usd).over(
                       partition_by=r.c.campaign_id, order_by=r.c.id, rows=later), literal(ZERO, Money()))
                   .label("campaign_later"),
                   func.coalesce(func.sum(r.c.cost_usd).over(
                       partition_by=(r.c.campaign_id, r.c.session_id), order_by=r.c.id, rows=later),
                       literal(ZERO, Money())).label("session_later"))
            .where(r.c.id >= uuid.UUID(int=min(ids)), r.c.id < uuid.UUID(int=ceiling_id))
            .subquery())
        w = window.c
        query = (
            select(window, (c.c.cost_usd - w.campaign_later).label("campaign_cost"), c.c.warning_usd,
                   c.c.limit_usd, (s.c.cost_usd - w.session_later).label("session_cost"))
            .select_from(window.outerjoin(c, c.c.campaign_id == w.campaign_id).outerjoin(
                s, and_(s.c.campaign_id == w.campaign_id, s.c.session_id == w.session_id)))
            .where(w.id.in_([uuid.UUID(int=i) for i in ids]))
            .order_by(w.id))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        result = []
        for row in rows:
            entry = UsageEntry(
                row.campaign_id, row.session_id, row.operation, row.request_model,
                row.response_model,
                Usage(row.input_tokens, row.cached_input_tokens, row.output_tokens,
                      row.reasoning_tokens, row.audio_input_tokens, row.audio_output_tokens,
                      row.web_search_calls, row.cache_write_input_tokens,
                      row.cached_audio_input_tokens),
                to_units(row.cost_usd), row.priced_by_default, row.estimated, row.streamed,
                row.status_code, row.latency_ms, epoch_us(row.created_at), row.response_id,
                row.api_key_hash, row.service_tier, id=row.id.int)
            result.append(RemoteUsage(entry, to_units(row.campaign_cost or ZERO),
                                      to_units(row.session_cost or ZERO), self._budget(row)))
        return result

    async def budget_gauges(self, limit: int) -> list[tuple[str, Decimal, Budget]]:
        """(campaign, spent, budget) of the most expensive campaigns, for the metrics gauges."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(CAMPAIGNS.c.campaign_id, CAMPAIGNS.c.cost_usd, CAMPAIGNS.c.warning_usd,
                       CAMPAIGNS.c.limit_usd)
                .order_by(CAMPAIGNS.c.cost_usd.desc(), CAMPAIGNS.c.campaign_id).limit(limit))
            return [(r.campaign_id, r.cost_usd, self._budget(r)) for r in rows]


def lease_expiry(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)


# -- ledger inserts -----------------------------------------------------------------------------
# The ledger insert is the one statement whose cost grows with traffic, so it bypasses
# SQLAlchemy's per-row parameter processing: PostgreSQL gets one array per column (a single
# prepared statement whatever the batch size), SQLite multi-row VALUES. Only the rows actually
# inserted are added to the aggregates, which keeps the increments idempotent: the insert counts
# its rows, and in the rare batch where not all went in, it runs again returning their ids
# (returning ids for every batch cost about a tenth of the write).

RECORD_COLUMNS = (
    "id", "created_at", "campaign_id", "session_id", "operation", "request_model", "response_model",
    "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens", "cost_usd",
    "priced_by_default", "estimated", "streamed", "status_code", "latency_ms", "response_id",
    "api_key_hash", "service_tier", "audio_input_tokens", "audio_output_tokens", "web_search_calls",
    "cache_write_input_tokens", "cached_audio_input_tokens",
)
_PG_ARRAY_TYPES = (
    "uuid", "timestamptz", "varchar", "varchar", "varchar", "varchar", "varchar", "bigint", "bigint",
    "bigint", "bigint", "numeric", "bool", "bool", "bool", "int", "int", "varchar", "varchar",
    "varchar", "bigint", "bigint", "int", "bigint", "bigint",
)
_PG_INSERT = (
    f"INSERT INTO usage_records ({', '.join(RECORD_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${i}::{kind}[]" for i, kind in enumerate(_PG_ARRAY_TYPES, 1))
    + ") ON CONFLICT (id) DO NOTHING"
)
US_PER_DAY = 86_400_000_000
EPOCH_DAY = date(1970, 1, 1)
# Multi-row statements come in power-of-two sizes only: sqlite3 caches compiled statements per
# connection by their text, and one text per batch size grew the cache by tens of MB (soak test).
_SQLITE_MAX_ROWS = 256
_SQLITE_ROW = "(" + ", ".join("?" * len(RECORD_COLUMNS)) + ")"


def _sqlite_chunks(count: int) -> list[int]:
    """Split `count` rows into statement sizes of 256 and then powers of two: at most 9 texts."""
    sizes = [_SQLITE_MAX_ROWS] * (count // _SQLITE_MAX_ROWS)
    rest = count % _SQLITE_MAX_ROWS
    while rest:
        size = 1 << (rest.bit_length() - 1)
        sizes.append(size)
        rest -= size
    return sizes


class _SomeWereKnown(Exception):
    """A batch held records already in the ledger (a retried batch, a replayed backlog)."""


def _record_tuple(e: UsageEntry) -> tuple[Any, ...]:
    """One ledger row in RECORD_COLUMNS order, as PostgreSQL takes it."""
    u = e.usage
    return (uuid.UUID(int=e.id), from_epoch_us(e.created_us), e.campaign_id, e.session_id,
            e.operation, e.request_model, e.response_model, u.input_tokens, u.cached_input_tokens,
            u.output_tokens, u.reasoning_tokens, from_units(e.cost_units), e.priced_by_default,
            e.estimated, e.streamed, e.status_code, e.latency_ms, e.response_id, e.api_key_hash,
            e.service_tier, u.audio_input_tokens, u.audio_output_tokens, u.web_search_calls,
            u.cache_write_input_tokens, u.cached_audio_input_tokens)


async def _insert_records_postgresql(conn: AsyncConnection, entries: Sequence[UsageEntry],
                                     returning: bool) -> set[int] | None:
    """Insert, skipping known records; the ids inserted with `returning`, else None once all
    went in (raises _SomeWereKnown when some did not)."""
    columns = list(zip(*(_record_tuple(e) for e in entries), strict=True))
    arrays = tuple(list(column) for column in columns)
    if returning:
        result = await conn.exec_driver_sql(_PG_INSERT + " RETURNING id", arrays)
        return {row[0].int for row in result}
    result = await conn.exec_driver_sql(_PG_INSERT, arrays)
    if result.rowcount != len(entries):
        raise _SomeWereKnown
    return None


class _SQLiteTimestamps:
    """Epoch microseconds as SQLAlchemy's SQLite dialect stores a timestamp (naive UTC, always
    microseconds), for one batch. Entries come in time order, so the text up to the second is
    made once per second of the batch and the rest is digits: isoformat per row cost more than
    the rest of the row."""

    def __init__(self) -> None:
        self.second: int | None = None
        self.prefix = ""

    def __call__(self, us: int) -> str:
        second, micro = divmod(us, 1_000_000)
        if second != self.second:
            self.second = second
            self.prefix = from_epoch_us(second * 1_000_000).isoformat(" ", "seconds")[:19] + "."
        return self.prefix + str(micro + 1_000_000)[1:]


async def _insert_records_sqlite(conn: AsyncConnection, entries: Sequence[UsageEntry],
                                 returning: bool) -> set[int] | None:
    """As _insert_records_postgresql; SQLite takes id, time and money as it stores them (hex,
    text, integer units), and booleans as the integers sqlite3 binds without adapting."""
    inserted: set[int] = set()
    count = 0
    start = 0
    timestamp = _SQLiteTimestamps()
    for size in _sqlite_chunks(len(entries)):
        params: list[Any] = []
        for e in entries[start:start + size]:
            u = e.usage
            params += (f"{e.id:032x}", timestamp(e.created_us), e.campaign_id, e.session_id,
                       e.operation, e.request_model, e.response_model, u.input_tokens,
                       u.cached_input_tokens, u.output_tokens, u.reasoning_tokens, e.cost_units,
                       1 if e.priced_by_default else 0, 1 if e.estimated else 0,
                       1 if e.streamed else 0, e.status_code, e.latency_ms, e.response_id,
                       e.api_key_hash, e.service_tier, u.audio_input_tokens, u.audio_output_tokens,
                       u.web_search_calls, u.cache_write_input_tokens, u.cached_audio_input_tokens)
        start += size
        result = await conn.exec_driver_sql(_sqlite_insert(size, returning), tuple(params))
        if returning:
            inserted.update(int(row[0], 16) for row in result)
        else:
            count += result.rowcount
    if returning:
        return inserted
    if count != len(entries):
        raise _SomeWereKnown
    return None


@functools.cache
def _sqlite_insert(rows: int, returning: bool) -> str:
    return (f"INSERT INTO usage_records ({', '.join(RECORD_COLUMNS)}) VALUES "
            + ", ".join([_SQLITE_ROW] * rows) + " ON CONFLICT (id) DO NOTHING"
            + (" RETURNING id" if returning else ""))


@dataclass(slots=True)
class _Span:
    """Totals of a group of entries and the first and last time among them."""

    totals: Totals
    first_seen: datetime
    last_seen: datetime

    @classmethod
    def of(cls, entries: Sequence[UsageEntry]) -> _Span:
        moments = [e.created_us for e in entries]
        return cls(Totals.of(entries), from_epoch_us(min(moments)), from_epoch_us(max(moments)))

    def values(self) -> dict[str, Any]:
        return {**_totals_values(self.totals), "first_seen": self.first_seen, "last_seen": self.last_seen}


def _merge_span(spans: dict[Any, _Span], key: Any, span: _Span) -> None:
    known = spans.get(key)
    if known is None:
        spans[key] = _Span(Totals(), span.first_seen, span.last_seen)
        known = spans[key]
    known.totals.merge(span.totals)
    known.first_seen = min(known.first_seen, span.first_seen)
    known.last_seen = max(known.last_seen, span.last_seen)
