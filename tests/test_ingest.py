"""Bulk data as a source: announced files recorded, processed once within their lifetime, and
org-wide unsubscribes from them (csand.controlshift.ingest), against the storage and export
simulators on a fake clock (no sleeps, no sockets)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from csand import health, metrics
from csand.controlshift import webhooks
from csand.controlshift.ingest import (
    BulkIngest,
    TableHandlers,
    default_handlers,
    unsubscribes_handler,
)
from csand.controlshift.webhooks import WebhookProcessor
from csand.retry import RetryPolicy
from csand.sim.controlshift import ControlShiftSim
from csand.sim.exports import BulkExports, Export, StorageSim
from csand.storage import BulkFile, Storage, open_store
from csand.web import build_app

T0 = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)
NO_WAIT = RetryPolicy(base=0.0, factor=1.0, cap=0.0, jitter=0.0, max_attempts=2)
FILES = RetryPolicy(base=30.0, factor=2.0, cap=1800.0, jitter=0.0, max_attempts=None)
SECRET = "whsec-ingest"


class Clock:
    """One fake time for the store (Unix seconds) and the simulators (datetimes)."""

    def __init__(self) -> None:
        self.t = T0.timestamp()

    def __call__(self) -> float:
        return self.t

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)


@dataclass
class World:
    clock: Clock
    sim: ControlShiftSim
    storage: StorageSim
    exports: BulkExports
    store: Storage
    http: httpx.AsyncClient
    ingest: BulkIngest

    async def announce(self, export: Export) -> bool:
        return await self.ingest.announce(envelope(export))

    async def announce_all(self, exports: list[Export]) -> None:
        for export in exports:
            assert await self.announce(export)

    def downloads(self) -> list[str]:
        return [key.rsplit("/", 1)[-1] for key, status in self.storage.requests if status == 200]

    async def unsubscribe_items(self) -> list[dict[str, Any]]:
        return [i for i in await self.store.items() if i["kind"] == "global_unsubscribe"]

    def processor(self, **kw: Any) -> BulkIngest:
        return BulkIngest(self.store, self.http, kw.pop("handlers", default_handlers()),
                          clock=self.clock, batch_rows=kw.pop("batch_rows", 3),
                          download_policy=NO_WAIT, policy=FILES, sleep=_no_sleep, **kw)


def envelope(export: Export) -> bytes:
    return json.dumps({"type": export.type, "data": export.data, "jid": export.jid}).encode()


async def _no_sleep(_: float) -> None:
    return None


@pytest.fixture(params=["sqlite", "postgres"])
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    clock = Clock()
    sim = ControlShiftSim(now=clock.now)
    storage = StorageSim(now=clock.now, base_url="http://storage.test")
    target = (request.getfixturevalue("pg_url") if request.param == "postgres"
              else tmp_path / "csand.db")
    store = await open_store(target, clock=clock, instance="one")
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=storage.app))
    w = World(clock, sim, storage, BulkExports(sim, storage), store, http, None)  # type: ignore[arg-type]
    w.ingest = w.processor()
    try:
        yield w
    finally:
        await http.aclose()
        await store.close()
        sim.close()


def unsubscribe_webhook(record: dict[str, Any], jid: str) -> str:
    return json.dumps({"type": "unsubscribe.created", "data": record, "jid": jid})


async def webhook_unsubscribe(w: World, record: dict[str, Any], *, enabled: bool = True) -> None:
    """The ``unsubscribe.created`` webhook of ``record``, received and processed."""
    body = unsubscribe_webhook(record, f"jid-u{record['id']}")
    assert await w.store.receive_event(f"jid:u{record['id']}", "unsubscribe.created", body)
    processor = WebhookProcessor(w.store, None, _org, lambda: None,  # type: ignore[arg-type]
                                 global_unsubscribes=enabled, clock=w.clock)
    for event in await w.store.events_due():
        await processor.process(event)


async def _org() -> str:
    return "org"


# ---------------------------------------------------------------- org-wide unsubscribes


@pytest.mark.anyio
async def test_org_wide_unsubscribes_of_an_incremental_file_are_enqueued_and_other_tables_skipped(
    world: World,
) -> None:
    world.sim.add_petition(title="Park", slug="park", creator={"email": "ann@x.org"})
    world.sim.add_signature("park", email="bob@x.org")
    for n in range(7):
        world.sim.add_unsubscribe(f"U{n}@X.org", organisation=True,
                                  unsubscribable_type="Organisation")
    world.sim.add_unsubscribe("cy@x.org", organisation=False, unsubscribable_type="Signature")
    written = world.exports.export_incremental()
    await world.announce_all(written)
    assert await world.ingest.run_due() == len(written)

    items = await world.unsubscribe_items()
    assert sorted(i["person_key"] for i in items) == [f"u{n}@x.org" for n in range(7)]
    assert sorted(i["source_key"] for i in items) == [f"unsubscribe:{n}" for n in range(1, 8)]
    # The consent timeline knows at once, before any item runs.
    assert (await world.store.person("u0@x.org")).unsubscribed_at is not None
    # Only the unsubscribes file was downloaded; the other tables were recorded and skipped.
    assert [name.split("_")[0] for name in world.downloads()] == ["unsubscribes"]
    bulk = (await world.store.status())["bulk"]
    assert bulk["files"]["done"] == 1
    assert bulk["files"]["skipped"] == len(written) - 1
    assert bulk["waiting"] == 0 and bulk["last_full_unsubscribes"] is None


@pytest.mark.anyio
@pytest.mark.parametrize("webhook_first", [True, False])
async def test_one_item_per_unsubscribe_whichever_way_it_arrives_first(
    world: World, webhook_first: bool
) -> None:
    record = world.sim.add_unsubscribe("Dee@X.org", organisation=True,
                                       unsubscribable_type="Organisation")
    (export,) = [e for e in world.exports.export_incremental() if e.table == "unsubscribes"]
    if webhook_first:
        await webhook_unsubscribe(world, record)
        assert len(await world.unsubscribe_items()) == 1
    await world.announce(export)
    await world.ingest.run_due()
    if not webhook_first:
        assert len(await world.unsubscribe_items()) == 1
        await webhook_unsubscribe(world, record)
    # And the nightly copy once more.
    await world.announce(world.exports.export_full("unsubscribes"))
    await world.ingest.run_due()
    (item,) = await world.unsubscribe_items()
    assert (item["source_key"], item["person_key"]) == (f"unsubscribe:{record['id']}",
                                                        "dee@x.org")


@pytest.mark.anyio
async def test_global_unsubscribes_off_skips_the_files_as_the_webhooks_are_ignored(
    world: World,
) -> None:
    record = world.sim.add_unsubscribe("dee@x.org", organisation=True)
    ingest = world.processor(handlers=default_handlers(global_unsubscribes=False))
    await webhook_unsubscribe(world, record, enabled=False)
    await world.announce_all(world.exports.export_incremental())
    await world.announce(world.exports.export_full("unsubscribes"))
    await ingest.run_due()
    assert await world.unsubscribe_items() == []
    assert world.downloads() == []
    bulk = await world.store.bulk_status()
    assert bulk["files"]["skipped"] == 2
    # Seen and deliberately left alone: the nightly copy still counts as looked at.
    assert bulk["last_full_unsubscribes"]["status"] == "skipped"
    assert health.bulk_reasons(bulk, world.clock() + 30 * 3600) == []


@pytest.mark.anyio
async def test_malformed_rows_are_dead_letters_and_the_file_goes_on(world: World) -> None:
    world.storage.put("org/u.csv", (
        b"id,email,unsubscribe_organisation,created_at\n"
        b"1,a@x.org,t,2024-10-01 11:00:00\n"
        b"x2,b@x.org,t,2024-10-01 11:00:00\n"
        b"3,c@x.org,maybe,2024-10-01 11:00:00\n"
        b"4,d@x.org,t\n"  # wrong number of fields: a bad row, skipped by the reader
        b"5,e@x.org,f,2024-10-01 11:00:00\n"
        b"6,f@x.org,t,2024-10-01 11:00:00\n"))
    url = world.storage.presign("org/u.csv")
    await world.ingest.announce(json.dumps({"type": "data.incremental_table_exported",
                                            "data": {"url": url, "table": "unsubscribes"}}))
    await world.ingest.run_due()
    items = await world.store.items()
    assert sorted(i["source_key"] for i in items if i["kind"] == "global_unsubscribe") == [
        "unsubscribe:1", "unsubscribe:6"]
    dead = sorted(i["source_key"] for i in items if i["status"] == "dead")
    assert dead == ["unsubscribe:'x2'", "unsubscribe:3"]
    bulk = await world.store.bulk_status()
    assert bulk["files"]["done"] == 1


# ---------------------------------------------------------------- lifetime, retries, failures


@pytest.mark.anyio
async def test_a_file_expired_before_it_was_read_is_reported_and_the_nightly_copy_covers_it(
    world: World,
) -> None:
    world.sim.add_unsubscribe("dee@x.org", organisation=True)
    await world.announce_all(world.exports.export_incremental())
    before = metrics.bulk_files.labels("unsubscribes", "expired")._value.get()
    world.clock.t += 6 * 3600 + 1  # csand was down longer than the URL lives
    await world.ingest.run_due()
    assert world.downloads() == [] and await world.unsubscribe_items() == []
    assert metrics.bulk_files.labels("unsubscribes", "expired")._value.get() == before + 1
    bulk = (await world.store.status())["bulk"]
    assert bulk["expired"] == 1
    assert bulk["newest_expired"]["table"] == "unsubscribes"
    assert "X-Amz" not in json.dumps(bulk)  # the URL's signature is never shown

    await world.announce(world.exports.export_full("unsubscribes"))
    await world.ingest.run_due()
    (item,) = await world.unsubscribe_items()
    assert item["person_key"] == "dee@x.org"
    bulk = await world.store.bulk_status()
    assert bulk["last_full_unsubscribes"]["rows"] == 1
    assert bulk["last_full_unsubscribes"]["reconciled_at"] == world.clock.now().isoformat()


@pytest.mark.anyio
async def test_a_url_s3_refuses_marks_the_file_expired_without_retries(world: World) -> None:
    world.sim.add_unsubscribe("dee@x.org", organisation=True)
    (export,) = world.exports.export_incremental()
    url = export.data["url"].replace("X-Amz-Signature=", "X-Amz-Signature=0")
    await world.ingest.announce(json.dumps({"type": export.type,
                                            "data": {**export.data, "url": url}}))
    await world.ingest.run_due()
    assert [status for _, status in world.storage.requests] == [403]
    assert (await world.store.bulk_status())["files"]["expired"] == 1


@pytest.mark.anyio
async def test_transient_failures_are_retried_later_as_data(world: World) -> None:
    world.sim.add_unsubscribe("dee@x.org", organisation=True)
    await world.announce_all(world.exports.export_incremental())
    world.storage.fail_next = 2  # both tries of the download policy get 503
    assert await world.ingest.run_due() == 1
    bulk = await world.store.bulk_status()
    assert (bulk["files"]["pending"], bulk["retrying"]) == (1, 1)
    assert await world.ingest.run_due() == 0  # not before its next_attempt_at
    world.clock.t += 30
    assert await world.ingest.run_due() == 1
    assert len(await world.unsubscribe_items()) == 1
    assert (await world.store.bulk_status())["files"]["done"] == 1


@pytest.mark.anyio
async def test_a_file_gone_from_storage_fails_without_retries(world: World) -> None:
    world.sim.add_unsubscribe("dee@x.org", organisation=True)
    (export,) = world.exports.export_incremental()
    world.storage.delete(export.key)
    await world.announce(export)
    await world.ingest.run_due()
    world.clock.t += 3600
    assert await world.ingest.run_due() == 0
    assert (await world.store.bulk_status())["files"]["failed"] == 1


# ---------------------------------------------------------------- once, across crashes


class Crash(BaseException):
    """The process dies (nothing below catches a BaseException)."""


def crashing(after_batches: int, seen: list[int]) -> TableHandlers:
    inner = unsubscribes_handler()
    calls = 0

    async def handle(rows: list[dict[str, str]], file: BulkFile) -> Any:
        nonlocal calls
        calls += 1
        if calls > after_batches:
            raise Crash
        seen.extend(int(r["id"]) for r in rows)
        return await inner(rows, file)

    handlers = TableHandlers()
    handlers.register("unsubscribes", handle)
    return handlers


@pytest.mark.anyio
async def test_a_crash_in_the_middle_of_a_file_loses_and_duplicates_nothing(world: World) -> None:
    for n in range(10):
        world.sim.add_unsubscribe(f"u{n}@x.org", organisation=True)
    await world.announce_all(world.exports.export_incremental())
    first: list[int] = []
    with pytest.raises(Crash):
        await world.processor(handlers=crashing(2, first)).run_due()
    assert first == [1, 2, 3, 4, 5, 6]
    assert len(await world.unsubscribe_items()) == 6  # two batches committed, the third not
    # Restart: the store releases what the dead process held; the file goes on after row 6.
    assert await world.store.release_bulk_files() == 1
    second: list[int] = []
    assert await world.processor(handlers=crashing(99, second)).run_due() == 1
    assert second == [7, 8, 9, 10]
    items = await world.unsubscribe_items()
    assert sorted(int(i["source_key"].split(":")[1]) for i in items) == list(range(1, 11))
    (done,) = [f for f in (await world.store.bulk_status())["files"].items() if f[0] == "done"]
    assert done == ("done", 1)


@pytest.mark.anyio
async def test_another_instance_takes_over_a_file_whose_claim_ran_out(world: World) -> None:
    for n in range(5):
        world.sim.add_unsubscribe(f"u{n}@x.org", organisation=True)
    await world.announce_all(world.exports.export_incremental())
    with pytest.raises(Crash):
        await world.processor(handlers=crashing(1, [])).run_due()
    assert await world.ingest.run_due() == 0  # claimed by the dead processor
    world.clock.t += 301
    assert await world.ingest.run_due() == 1
    assert len(await world.unsubscribe_items()) == 5


@pytest.mark.anyio
async def test_the_nightly_copy_enqueues_only_what_is_missing_in_batched_commits(
    world: World,
) -> None:
    records = [world.sim.add_unsubscribe(f"u{n}@x.org", organisation=n % 4 != 0)
               for n in range(1, 1201)]
    for record in records[:300]:  # some arrived by webhook
        if record["unsubscribe_organisation"]:
            await webhook_unsubscribe(world, record)
    already = len(await world.unsubscribe_items())
    commits = 0
    real_commit = world.store.commit_poll

    async def counting(*args: Any, **kw: Any) -> int:
        nonlocal commits
        commits += 1
        return await real_commit(*args, **kw)

    world.store.commit_poll = counting  # type: ignore[method-assign]
    ingest = world.processor(batch_rows=500)
    await world.announce(world.exports.export_full("unsubscribes"))
    await ingest.run_due()
    assert commits == 3  # 1,200 rows, 500 per commit
    assert len(await world.unsubscribe_items()) == 900
    assert already == 225
    # The next night: nothing new, nothing sent again.
    world.clock.t += 86_400
    await world.announce(world.exports.export_full("unsubscribes"))
    await ingest.run_due()
    assert len(await world.unsubscribe_items()) == 900


@pytest.mark.anyio
async def test_instances_sharing_a_postgresql_store_each_claim_other_files(
    world: World, pg_url: str
) -> None:
    if not world.store.shared:
        pytest.skip("one process per SQLite store")
    for n in range(3):
        world.sim.add_unsubscribe(f"u{n}@x.org", organisation=True)
        world.exports.export_incremental()
    for export in world.exports.exports:
        await world.announce(export)
    other = await open_store(pg_url, clock=world.clock, instance="two")  # the world's database
    try:
        first = await world.store.bulk_files_due(2)
        second = await other.bulk_files_due(2)
        assert len(first) == 2 and len(second) == 1
        assert not {f.id for f in first} & {f.id for f in second}
        ingest = BulkIngest(other, world.http, default_handlers(), clock=world.clock,
                            download_policy=NO_WAIT, policy=FILES, sleep=_no_sleep)
        await ingest.process(second[0])
        for file in first:
            await world.ingest.process(file)
    finally:
        await other.close()
    assert len(await world.unsubscribe_items()) == 3
    assert (await world.store.bulk_status())["files"]["done"] == 3


@pytest.mark.anyio
async def test_a_failing_handler_retries_the_file_from_the_last_committed_batch(
    world: World,
) -> None:
    for n in range(5):
        world.sim.add_unsubscribe(f"u{n}@x.org", organisation=True)
    await world.announce_all(world.exports.export_incremental())
    inner = unsubscribes_handler()
    calls = 0

    async def flaky(rows: list[dict[str, str]], file: BulkFile) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("the store went away")
        return await inner(rows, file)

    handlers = TableHandlers()
    handlers.register("unsubscribes", flaky)
    ingest = world.processor(handlers=handlers)
    assert await ingest.run_due() == 1
    assert len(await world.unsubscribe_items()) == 3
    world.clock.t += 30
    assert await ingest.run_due() == 1
    assert len(await world.unsubscribe_items()) == 5
    assert (await world.store.bulk_status())["files"]["done"] == 1


# ---------------------------------------------------------------- health


def test_health_warns_when_no_nightly_unsubscribes_were_reconciled_for_36_hours() -> None:
    now = T0.timestamp()
    hours = 3600.0

    def at(offset_h: float) -> str:
        return datetime.fromtimestamp(now - offset_h * hours, UTC).isoformat()

    assert health.bulk_reasons(None, now) == []
    assert health.bulk_reasons({"first_seen_at": None}, now) == []  # exports never seen
    assert health.bulk_reasons({"first_seen_at": at(30)}, now) == []  # not long enough
    (never,) = health.bulk_reasons({"first_seen_at": at(40)}, now)
    assert "since csand first saw a bulk-data file" in never
    fresh = {"first_seen_at": at(100), "last_full_unsubscribes": {"reconciled_at": at(20)}}
    assert health.bulk_reasons(fresh, now) == []
    stale = {"first_seen_at": at(100), "last_full_unsubscribes": {"reconciled_at": at(37)}}
    (reason,) = health.bulk_reasons(stale, now)
    assert "for 37 h" in reason
    assert reason in health.reasons({"bulk": stale}, poll_interval=60, now=now,
                                    daemon_expected=False)


# ---------------------------------------------------------------- the HTTP receiver


async def _healthy() -> list[str]:
    return []


@pytest.mark.anyio
async def test_signed_announcements_are_recorded_before_the_200_and_others_are_refused(
    world: World,
) -> None:
    world.sim.add_unsubscribe("dee@x.org", organisation=True)
    (export,) = world.exports.export_incremental()
    woken: list[int] = []

    async def receive(dedupe: str, type_: str, body: str) -> bool:
        raise AssertionError("a bulk-data announcement is not a webhook event")

    app = build_app(receive=receive, secret=SECRET, health=_healthy,
                    receive_export=world.ingest.announce, on_export=lambda: woken.append(1))
    body = envelope(export)

    async def post(raw: bytes, signature: str | None) -> httpx.Response:
        headers = {"content-type": "application/json"}
        if signature is not None:
            headers[webhooks.SIGNATURE_HEADER] = signature
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://csand") as client:
            return await client.post("/webhooks/controlshift", content=raw, headers=headers)

    unsigned = await post(body, None)
    forged = await post(body, webhooks.sign(body, "guessed"))
    assert (unsigned.status_code, forged.status_code) == (401, 401)
    assert (await world.store.bulk_status())["first_seen_at"] is None  # nothing stored
    bad = json.dumps({"type": export.type, "data": {"table": "unsubscribes"}}).encode()
    refused = await post(bad, webhooks.sign(bad, SECRET))
    assert refused.status_code == 400 and "data.url" in refused.json()["error"]

    first = await post(body, webhooks.sign(body, SECRET))
    again = await post(body, webhooks.sign(body, SECRET))
    assert first.json() == {"status": "accepted"} and again.json() == {"status": "duplicate"}
    assert woken == [1]
    assert (await world.store.bulk_status())["waiting"] == 1
    await world.ingest.run_due()
    assert len(await world.unsubscribe_items()) == 1
