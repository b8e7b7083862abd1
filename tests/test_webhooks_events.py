"""Event and attendee webhooks (WebhookProcessor with the poller's EventSync): the same items as
a poll of the same records, once whichever source comes first."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from csand.controlshift.client import ControlShiftClient, PetitionDirectory
from csand.controlshift.poller import Poller
from csand.controlshift.versions import NOT_ATTENDING
from csand.controlshift.webhooks import WebhookProcessor
from csand.ratelimit import TokenBucket
from csand.sim.controlshift import ControlShiftSim
from csand.storage import open_store

pytestmark = pytest.mark.anyio

HOST = {"email": "hana@example.org", "first_name": "Hana", "last_name": "Host",
        "join_organisation": True}


class Rig:
    def __init__(self, tmp: Path, *, with_events: bool = True) -> None:
        self.cs = ControlShiftSim(api_key="k", page_size=5)
        self.tmp = tmp
        self.with_events = with_events
        self.pokes = 0
        self.jids = 0

    async def __aenter__(self) -> Rig:
        self.store = await open_store(self.tmp / "csand.db")
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.cs.app),
                                      base_url="http://cs")
        client = ControlShiftClient(self.http, "http://cs", api_key="k",
                                    limiter=TokenBucket(10_000))
        self.poller = Poller(client, self.store, sync_events=True)
        self.processor = WebhookProcessor(
            self.store, PetitionDirectory(client), self.poller.org_slug, self._poke,
            events=self.poller.events if self.with_events else None,
        )
        return self

    def _poke(self) -> None:
        self.pokes += 1

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        await self.store.close()

    async def deliver(self, type_: str, data: dict[str, Any]) -> None:
        self.jids += 1
        body = json.dumps({"type": type_, "data": data, "jid": f"j{self.jids}"})
        await self.store.receive_event(f"jid:j{self.jids}", type_, body)
        for event in await self.store.events_due():
            await self.processor.process(event)

    async def items(self) -> list[dict[str, Any]]:
        rows = await self.store._read(
            "SELECT kind, status, source_key, dedupe_key, payload FROM outbox ORDER BY id")
        return [dict(r) | {"payload": json.loads(r["payload"])} for r in rows]

    async def webhook_rows(self) -> list[dict[str, Any]]:
        rows = await self.store._read(
            "SELECT type, processed_at, error, attempts FROM webhook_events ORDER BY id")
        return [dict(r) for r in rows]

    def add_event(self, slug: str = "picnic", **kw: Any) -> dict[str, Any]:
        start = datetime.now(UTC) + timedelta(days=10)
        kw.setdefault("host", HOST)
        return self.cs.add_event(slug, title=kw.pop("title", "Park picnic"),
                                 description="Bring food", start_at=start,
                                 end_at=start + timedelta(hours=2), **kw)


async def test_event_webhook_then_poll_enqueues_once(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        rig.cs.add_calendar("summer", "Summer of action")
        rig.add_event(calendar_slug="summer")
        rig.cs.add_attendee("picnic", email="a@example.org", join_organisation=True)
        rig.cs.add_attendee("picnic", email="no@example.org", attending_status="not_attending")
        await rig.deliver("event.created", rig.cs.event_webhook_data("picnic"))
        items = await rig.items()
        assert [i["kind"] for i in items] == ["event_hosted", "attendance"]  # walked: new event
        host = items[0]["payload"]
        # The webhook's host: split names and opt-in; the REST copy's description and calendar
        assert (host["first_name"], host["last_name"], host["opted_in"]) == ("Hana", "Host", True)
        assert host["event"]["description"] == "Bring food"
        assert host["event"]["calendar"]["slug"] == "summer"

        await rig.poller.cycle()
        await rig.poller.cycle(full=True)
        await rig.deliver("event.updated", rig.cs.event_webhook_data("picnic"))  # same again
        assert await rig.items() == items
        assert all(r["processed_at"] and not r["error"] for r in await rig.webhook_rows())


async def test_attendee_webhook_and_poll_make_the_same_item(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        rig.add_event()
        await rig.poller.cycle()
        first = rig.cs.add_attendee("picnic", email="a@example.org", join_organisation=True)
        await rig.deliver("attendee.created", first)
        await rig.poller.cycle(full=True)
        second = rig.cs.add_attendee("picnic", email="b@example.org")
        await rig.poller.cycle()
        await rig.deliver("attendee.created", second)
        await rig.deliver("attendee.created", first)  # redelivered under a new jid
        attendances = [i for i in await rig.items() if i["kind"] == "attendance"]
        assert [i["source_key"] for i in attendances] == [f"attendee:{first['id']}",
                                                          f"attendee:{second['id']}"]
        # A confirmation changes nothing AN holds
        await rig.deliver("attendee.confirmed", rig.cs.confirm_attendee(first["id"]))
        assert len([i for i in await rig.items() if i["kind"] == "attendance"]) == 2


async def test_attendee_of_an_event_never_seen_brings_its_host_first(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        rig.add_event()
        att = rig.cs.add_attendee("picnic", email="a@example.org")
        await rig.deliver("attendee.created", att)
        assert [i["kind"] for i in await rig.items()] == ["event_hosted", "attendance"]
        assert rig.pokes == 1
        await rig.poller.cycle()
        assert len(await rig.items()) == 2


async def test_attendee_of_an_unknown_event_is_retried(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        rig.add_event()
        att = rig.cs.add_attendee("picnic", email="a@example.org")
        await rig.deliver("attendee.created", {**att, "event": {"slug": "nowhere"}})
        [row] = await rig.webhook_rows()
        assert row["processed_at"] is None and "nowhere" in row["error"]
        assert await rig.items() == []


async def test_inappropriate_event_is_never_synced(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        rig.add_event()
        await rig.deliver("event.updated", {**rig.cs.event_webhook_data("picnic"),
                                            "admin_status": "inappropriate"})
        state = await rig.store.event_state("picnic")
        assert state is not None and state.inappropriate
        await rig.deliver("attendee.created", rig.cs.add_attendee("picnic", email="a@x.org"))
        await rig.poller.cycle()  # REST shows no moderation status: the recorded one holds
        assert await rig.items() == []
        assert all(r["processed_at"] for r in await rig.webhook_rows())


async def test_event_awaiting_moderation_is_recorded_not_synced(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        rig.add_event(admin_status="unreviewed")
        await rig.deliver("event.created.requires_moderation",
                          rig.cs.event_webhook_data("picnic"))
        assert await rig.items() == []
        state = await rig.store.event_state("picnic")
        assert state is not None and state.content is None and state.host_extra


async def test_event_update_is_one_event_changed_item(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        rig.add_event()
        await rig.deliver("event.created", rig.cs.event_webhook_data("picnic"))
        rig.cs.update_event("picnic", title="Park picnic (indoors)")
        await rig.deliver("event.updated", rig.cs.event_webhook_data("picnic"))
        await rig.poller.cycle()
        changed = [i for i in await rig.items() if i["kind"] == "event_changed"]
        assert len(changed) == 1
        assert changed[0]["payload"]["event"]["title"] == "Park picnic (indoors)"


async def test_decline_and_deletion_cancel_pending_attendances(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        rig.add_event()
        await rig.poller.cycle()
        one = rig.cs.add_attendee("picnic", email="one@example.org")
        two = rig.cs.add_attendee("picnic", email="two@example.org")
        await rig.deliver("attendee.created", one)
        await rig.deliver("attendee.created", two)
        await rig.deliver("attendee.updated",
                          rig.cs.update_attendee(one["id"], attending_status="not_attending"))
        await rig.deliver("attendee.deleted", rig.cs.delete_attendee(two["id"]))
        statuses = {i["source_key"]: i["status"] for i in await rig.items()
                    if i["kind"] == "attendance"}
        assert statuses == {f"attendee:{one['id']}": "cancelled",
                            f"attendee:{two['id']}": "cancelled"}
        seen = await rig.store.attendees_seen("picnic")
        assert seen[one["id"]].fingerprint == NOT_ATTENDING and not seen[one["id"]].deleted_at
        assert seen[two["id"]].deleted_at
        await rig.poller.cycle(full=True)
        assert len(await rig.items()) == 3  # host and the two cancelled items


async def test_event_webhooks_are_ignored_without_event_sync(tmp_path: Path) -> None:
    async with Rig(tmp_path, with_events=False) as rig:
        rig.add_event()
        await rig.deliver("event.created", rig.cs.event_webhook_data("picnic"))
        await rig.deliver("attendee.created", rig.cs.add_attendee("picnic", email="a@x.org"))
        assert await rig.items() == []
        assert all(r["processed_at"] for r in await rig.webhook_rows())


async def test_an_inappropriate_flag_is_recorded_even_when_the_host_is_malformed(tmp_path) -> None:
    """REST never shows moderation: losing the flag with the dead letter would let the next poll
    sync the event."""
    from csand.controlshift.webhooks import WebhookProcessor
    from csand.storage import open_store

    store = await open_store(tmp_path / "csand.db")
    try:
        body = json.dumps({"type": "event.updated", "data": {
            "slug": "rally", "admin_status": "inappropriate", "host": "not an object"}})
        assert await store.receive_event("jid-1", "event.updated", body)
        processor = WebhookProcessor(store, None, _org, lambda: None, events=_NoCalls())
        (event,) = await store.events_due()
        await processor.process(event)
        state = await store.event_state("rally")
        assert state is not None and state.inappropriate
        assert (await store.counts())["dead"] == 1
    finally:
        await store.close()


async def _org() -> str:
    return "org"


class _NoCalls:
    """An event sync that must not be reached for a malformed event webhook."""

    def __getattr__(self, name: str):
        raise AssertionError(f"EventSync.{name} used")
