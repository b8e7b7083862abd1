"""The simulator's bulk data exports: files on the storage simulator, announced by webhook,
read back with csand's streaming reader over real HTTP."""

from __future__ import annotations

import bz2
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from csand.controlshift.bulk import (
    ExportExpired,
    ExportFile,
    ExportGone,
    ReadStats,
    _Parser,
    parse_bool,
    parse_export,
    parse_timestamp,
    read_rows,
    unsubscribe_row,
)
from csand.controlshift.webhooks import verify
from csand.retry import RetryPolicy
from csand.sim.controlshift import WEBHOOK_SIGNATURE_HEADER, ControlShiftSim
from csand.sim.exports import COLUMNS, BulkExports, StorageSim, csv_cell, write_csv
from csand.sim.server import ServedApp

SECRET = "whsec-bulk"
T0 = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)
NO_WAIT = RetryPolicy(base=0.0, factor=1.0, cap=0.0, jitter=0.0, max_attempts=4)


class Clock:
    def __init__(self) -> None:
        self.at = T0

    def now(self) -> datetime:
        return self.at

    def advance(self, **delta: float) -> None:
        self.at += timedelta(**delta)


class Inbox:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bodies: list[tuple[bytes, str | None]] = []
        self.app = Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        with self.lock:
            self.bodies.append((body, request.headers.get(WEBHOOK_SIGNATURE_HEADER)))
        return Response(status_code=204)

    def events(self, prefix: str = "") -> list[dict[str, Any]]:
        with self.lock:
            out = [json.loads(b) for b, _ in self.bodies]
        return [e for e in out if e["type"].startswith(prefix)]


@dataclass
class World:
    clock: Clock
    sim: ControlShiftSim
    storage: StorageSim
    exports: BulkExports
    inbox: Inbox


@pytest.fixture
def world() -> Iterator[World]:
    clock = Clock()
    sim = ControlShiftSim(now=clock.now, webhook_retry_delays=(0.05,))
    storage = StorageSim(now=clock.now)
    inbox = Inbox()
    with ServedApp(storage.app) as served_storage, ServedApp(inbox.app) as served_inbox:
        storage.base_url = served_storage.url
        sim.add_webhook_endpoint(f"{served_inbox.url}/hook", SECRET)
        try:
            yield World(clock, sim, storage, BulkExports(sim, storage), inbox)
        finally:
            sim.close()


def populate(sim: ControlShiftSim) -> None:
    sim.add_petition(title="Save the park", slug="park", categories=["Parks", "Local"],
                     creator={"first_name": "Ann", "last_name": "Lee", "email": "ann@x.org",
                              "postcode": "N1", "join_organisation": True})
    sim.add_signature("park", email="bob@x.org", first_name="Bob", last_name='Quote "Q", Esq.',
                      join_organisation=True, additional_fields={"why": "line one\nline two"})
    sim.add_signature("park", email="cy@x.org", first_name="Cy", join_organisation=False)
    sim.add_unsubscribe("dee@x.org", organisation=True, unsubscribable_type="Organisation")
    sim.add_unsubscribe("bob@x.org", organisation=False, unsubscribable_type="Signature")


async def read(export: ExportFile | str, **kw: Any) -> list[dict[str, str]]:
    kw.setdefault("now", lambda: T0)  # the simulated clock's start, not the wall clock
    async with httpx.AsyncClient(timeout=5) as client:
        return [row async for row in read_rows(client, export, policy=NO_WAIT, **kw)]


@pytest.mark.anyio
async def test_incremental_export_announced_signed_and_read_back(world: World) -> None:
    populate(world.sim)
    written = world.exports.export_incremental()
    assert {e.table for e in written} == {"signatures", "petitions", "users", "members",
                                          "categories", "categorized_petitions", "unsubscribes"}
    assert world.sim.wait_webhooks_idle(5)
    with world.inbox.lock:
        bodies = [(b, h) for b, h in world.inbox.bodies if b"data.incremental" in b]
    assert len(bodies) == len(written)
    assert all(verify(body, header, SECRET) for body, header in bodies)

    by_table = {}
    for body, _ in bodies:
        export = parse_export(body)
        assert export.kind == "incremental" and export.compression == "bzip2"
        assert export.expires_at == T0 + timedelta(hours=6)
        by_table[export.table] = export

    signatures = await read(by_table["signatures"])
    assert [r["email"] for r in signatures] == ["bob@x.org", "cy@x.org"]
    assert list(signatures[0]) == list(COLUMNS["signatures"])
    bob = signatures[0]
    assert bob["last_name"] == 'Quote "Q", Esq.'
    assert json.loads(bob["additional_fields"]) == {"why": "line one\nline two"}
    assert parse_bool(bob["join_organisation"]) is True
    assert parse_bool(signatures[1]["join_organisation"]) is False
    assert bob["join_organisation"] == "t" and bob["deleted_at"] == ""
    assert parse_timestamp(bob["created_at"]) is not None
    assert " " in bob["created_at"] and "T" not in bob["created_at"]  # the database's text form
    assert bob["petition_id"] == "1"
    assert signatures == world.exports.rows("signatures")

    petitions = await read(by_table["petitions"])
    users = await read(by_table["users"])
    assert petitions[0]["user_id"] == users[0]["id"]
    assert users[0]["postcode"] == "N1" and users[0]["join_organisation"] == "t"
    categories = {c["id"]: c["name"] for c in await read(by_table["categories"])}
    links = await read(by_table["categorized_petitions"])
    assert sorted(categories[link["category_id"]] for link in links) == ["Local", "Parks"]
    assert {link["petition_id"] for link in links} == {petitions[0]["id"]}


@pytest.mark.anyio
async def test_incremental_carries_only_new_rows_and_full_carries_changes(world: World) -> None:
    populate(world.sim)
    world.exports.export_incremental()
    assert world.exports.export_incremental() == []  # nothing inserted since
    sig = world.sim.add_signature("park", email="eve@x.org", join_organisation=True)
    world.sim.update_signature(1, unsubscribe_at=T0)  # an update: only in the nightly file
    world.sim.update_petition("park", categories=["Parks", "Rivers"])
    second = {e.table: e for e in world.exports.export_incremental()}
    assert set(second) == {"signatures", "members", "categories", "categorized_petitions"}
    rows = await read(second["signatures"].url)
    assert [r["id"] for r in rows] == [str(sig["id"])]
    assert [r["name"] for r in await read(second["categories"].url)] == ["Rivers"]

    full = world.exports.export_full("signatures")
    assert full.kind == "full" and full.rows == 3
    rows = await read(full.url)
    assert [r["unsubscribe_at"] != "" for r in rows] == [True, False, False]
    links = await read(world.exports.export_full("categorized_petitions").url)
    assert len(links) == 2  # "Local" was removed: its row is gone from the full copy


@pytest.mark.anyio
async def test_unsubscribes_match_their_webhooks(world: World) -> None:
    populate(world.sim)
    export = world.exports.export_full("unsubscribes")
    assert world.sim.wait_webhooks_idle(5)
    hooks = [e["data"] for e in world.inbox.events("unsubscribe.created")]
    rows = await read(export.url)
    assert len(rows) == len(hooks) == 2
    for hook, row in zip(hooks, rows, strict=True):
        read_row = unsubscribe_row(row)
        assert read_row.id == hook["id"]
        assert read_row.raw_email == hook["email"]
        assert read_row.organisation is hook["unsubscribe_organisation"]
        assert read_row.unsubscribable_type == hook["unsubscribable_type"]
        assert read_row.created_at == parse_timestamp(hook["created_at"])
    assert rows[0]["unsubscribe_organisation"] == "t" and rows[1]["unsubscribe_organisation"] == "f"
    activity = unsubscribe_row(rows[0]).activity()
    assert activity.source_key == f"unsubscribe:{hooks[0]['id']}"
    assert activity.email == "dee@x.org"


@pytest.mark.anyio
async def test_expired_url_is_refused_with_s3_error(world: World) -> None:
    populate(world.sim)
    export = world.exports.export_full("members")
    world.clock.advance(hours=6, seconds=1)
    async with httpx.AsyncClient() as client:
        response = await client.get(export.url)
    assert response.status_code == 403
    assert b"<Code>AccessDenied</Code>" in response.content
    assert b"<Message>Request has expired</Message>" in response.content
    with pytest.raises(ExportExpired) as caught:
        await read(export.url)
    assert caught.value.status == 403 and caught.value.message == "Request has expired"
    # Known beforehand from the announcement: no request is made at all.
    announced = parse_export({"type": export.type, "data": export.data})
    requests = len(world.storage.requests)
    with pytest.raises(ExportExpired):
        await read(announced, now=world.clock.now)
    assert len(world.storage.requests) == requests


@pytest.mark.anyio
async def test_tampered_and_missing_files(world: World) -> None:
    populate(world.sim)
    export = world.exports.export_full("members")
    with pytest.raises(ExportExpired) as caught:  # any 403 is final
        await read(export.url.replace("X-Amz-Signature=", "X-Amz-Signature=0"))
    assert caught.value.code == "SignatureDoesNotMatch"
    world.storage.delete(export.key)
    with pytest.raises(ExportGone) as gone:
        await read(export.url)
    assert gone.value.status == 404 and gone.value.code == "NoSuchKey"


@pytest.mark.anyio
async def test_dropped_download_is_restarted_and_rows_come_once(world: World) -> None:
    for i in range(300):
        world.sim.add_petition(title=f"P {i}", creator={"email": f"c{i}@x.org"})
    world.exports.compression = "none"  # rows come before the cut (bzip2 emits whole blocks)
    plain = world.exports.export_full("petitions")
    world.exports.compression = "bzip2"
    packed = world.exports.export_full("petitions")
    world.storage.chunk_size = 1024
    for export, cut in ((plain, 6000), (packed, 1000)):
        world.storage.drop_next = 2
        world.storage.drop_after_bytes = cut
        stats = ReadStats()
        seen: list[int] = []
        async with httpx.AsyncClient(timeout=5) as client:
            async for row in read_rows(client, export.url, stats=stats, policy=NO_WAIT):
                seen.append(int(row["id"]))
        assert seen == list(range(1, 301))
        assert stats.attempts == 3 and len(stats.errors) == 2, stats.errors
        assert all("RemoteProtocolError" in e or "ReadError" in e for e in stats.errors)
    world.storage.fail_next = 1  # a 503 is retried too
    stats = ReadStats()
    assert len(await read(packed.url, stats=stats)) == 300
    assert stats.attempts == 2 and "503" in stats.errors[0]


def test_lost_webhook_and_plain_iso_files(world: World) -> None:
    world.exports.compression = "none"
    world.exports.timestamps = "iso"
    world.exports.announce_compression = False
    populate(world.sim)
    world.exports.lose_next(1)
    written = world.exports.export_incremental()
    assert written[0].jid is None and all(e.jid for e in written[1:])
    assert world.sim.wait_webhooks_idle(5)
    announced = world.inbox.events("data.")
    assert len(announced) == len(written) - 1
    assert "compression_format" not in announced[0]["data"]
    assert parse_export(announced[0]).compression is None
    text = world.storage.get(written[0].key).decode()
    assert text.startswith(",".join(COLUMNS[written[0].table]) + "\n")
    assert "T" in world.exports.rows("signatures")[0]["created_at"]
    assert not written[0].key.endswith(".bz2")


def test_bzip2_files_are_real_bzip2(world: World) -> None:
    populate(world.sim)
    export = world.exports.export_full("users")
    raw = world.storage.get(export.key)
    assert raw[:3] == b"BZh" and export.key.endswith(".csv.bz2")
    assert bz2.decompress(raw).decode().splitlines()[0] == ",".join(COLUMNS["users"])


@pytest.mark.anyio
async def test_events_attendees_and_calendars(world: World) -> None:
    sim = world.sim
    sim.add_calendar("spring", "Spring actions")
    host = {"email": "host@x.org", "first_name": "Hal", "last_name": "Ost"}
    sim.add_event("picnic", title="Picnic", description="Bring food", start_at=T0,
                  end_at=T0 + timedelta(hours=2), host=host, calendar_slug="spring",
                  cancelled_at=T0)
    kept = sim.add_attendee("picnic", email="amy@x.org", join_organisation=True,
                            additional_fields={"diet": "vegan, mostly"})
    gone = sim.add_attendee("picnic", email="ben@x.org")
    written = {e.table: e for e in world.exports.export_incremental()}
    assert {"calendars", "events", "attendees"} <= set(written)
    calendars = await read(written["calendars"].url)
    events = await read(written["events"].url)
    attendees = await read(written["attendees"].url)
    assert events[0]["calendar_id"] == calendars[0]["id"] and events[0]["slug"] == "picnic"
    assert parse_timestamp(events[0]["cancelled_at"]) == T0  # only bulk data shows it
    assert [a["event_id"] for a in attendees] == [events[0]["id"]] * 2
    assert json.loads(attendees[0]["additional_fields"]) == {"diet": "vegan, mostly"}
    sim.delete_attendee(gone["id"])
    full = await read(world.exports.export_full("attendees").url)
    assert [int(a["id"]) for a in full] == [kept["id"]]  # a deleted attendee's row is gone
    nightly = world.exports.export_full_all()
    assert [e.table for e in nightly] == list(COLUMNS)
    assert all(e.kind == "full" for e in nightly)


cells = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
            max_size=30),
    st.sampled_from(["\r", "\r\n", "\n", '"', ",", "", " "]),
    st.datetimes(timezones=st.just(UTC)),
    st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=3),
)


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.fixed_dictionaries({"a": cells, "b": cells, "c": cells}), max_size=20),
       timestamps=st.sampled_from(["db", "iso"]))
def test_what_the_simulator_writes_csand_reads(rows: list[dict[str, Any]],
                                               timestamps: Literal["db", "iso"]) -> None:
    text = io.StringIO()
    write_csv(text, ("a", "b", "c"), rows, timestamps=timestamps)
    parser = _Parser("http://s3/x.csv.bz2", None)
    got = [item for batch in parser.feed(bz2.compress(text.getvalue().encode()))
           for item in batch]
    got += [item for batch in parser.close() for item in batch]
    assert got == [{k: csv_cell(v, timestamps=timestamps) for k, v in row.items()}
                   for row in rows]
    for row, read_back in zip(rows, got, strict=True):
        for key, value in row.items():
            if isinstance(value, bool):
                assert parse_bool(read_back[key]) is value
            elif isinstance(value, datetime):
                assert parse_timestamp(read_back[key]) == value
            elif value is None:
                assert read_back[key] == ""
