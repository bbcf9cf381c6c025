"""The cost-analytics service behind /costs: validated reads and budget changes over the store."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from costing.budget import make_budget
from costing.errors import NotFound
from costing.records import CampaignTotals, DayTotals, SessionTotals, Totals
from costing.store import Store

MAX_DAYS = 366
SESSION_ORDERS = ("last_seen", "cost", "first_seen")


class CostReports:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def campaigns(self, *, limit: int, after: str | None) -> tuple[list[CampaignTotals], str | None]:
        """One page of campaigns and the id to continue after (None on the last page)."""
        page = await self.store.campaigns(limit=limit + 1, after=after)
        more = len(page) > limit
        page = page[:limit]
        return page, (page[-1].campaign_id if more and page else None)

    async def campaign(self, campaign_id: str) -> CampaignTotals:
        found = await self.store.campaign(campaign_id)
        if found is None:
            raise NotFound(f"Unknown campaign '{campaign_id}': no usage or budget recorded for it")
        return found

    async def sessions(self, campaign_id: str, *, include_deleted: bool, order_by: str,
                       limit: int) -> list[SessionTotals]:
        await self.campaign(campaign_id)
        return await self.store.sessions(campaign_id, include_deleted=include_deleted,
                                         order_by=order_by, limit=limit)

    async def session(self, campaign_id: str, session_id: str) -> SessionTotals:
        found = await self.store.session(campaign_id, session_id)
        if found is None:
            raise NotFound(f"Unknown session '{session_id}' in campaign '{campaign_id}'")
        return found

    async def delete_session(self, campaign_id: str, session_id: str) -> SessionTotals:
        if not await self.store.delete_session(campaign_id, session_id, datetime.now(UTC)):
            raise NotFound(f"Unknown session '{session_id}' in campaign '{campaign_id}'")
        return await self.session(campaign_id, session_id)

    async def daily(self, campaign_id: str, start: date, end: date) -> list[DayTotals]:
        """Every day of [start, end], zero-filled where nothing was spent."""
        await self.campaign(campaign_id)
        stored = {d.day: d for d in await self.store.daily(campaign_id, start, end)}
        return [stored.get(start + timedelta(days=i)) or DayTotals(start + timedelta(days=i), Totals())
                for i in range((end - start).days + 1)]

    async def set_budget(self, campaign_id: str, warning_usd: Decimal,
                         limit_usd: Decimal) -> CampaignTotals:
        await self.store.set_budget(campaign_id, make_budget(warning_usd, limit_usd))
        return await self.campaign(campaign_id)

    async def clear_budget(self, campaign_id: str) -> CampaignTotals:
        await self.campaign(campaign_id)
        await self.store.set_budget(campaign_id, None)
        return await self.campaign(campaign_id)
