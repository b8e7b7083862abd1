"""The SQLite backend (csand.storage.sqlite), on a real database file and a fake clock."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiosqlite
import pytest

from csand.model import Activity, Person, SignatureSeen, creator_activity, signature_activity
from csand.storage import PetitionState, Storage, open_store
from csand.storage import sqlite as store_module
from csand.storage.sqlite import MIGRATIONS

ORG = "test-org"
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def petition(pid: int = 1, creator_email: str = "creator@example.org", **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": pid,
        "slug": f"petition-{pid}",
        "title": f"Petition {pid}",
        "url": f"https://cs.example.org/petitions/petition-{pid}",
        "launched": True,
        "created_at": "2024-01-01T00:00:00Z",
        "updated_at": "2024-01-01T00:00:00Z",
        "creator": {"first_name": "Cleo", "last_name": "Ng", "email": creator_email},
        "categories": [],
    }
    data.update(extra)
    return data


def signature(sid: int, email: str, created: str = "2024-01-02T00:00:00Z", **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": sid,
        "email": email,
        "first_name": "Ann",
        "last_name": "Lee",
        "postcode": "2000",
        "join_organisation": True,
        "created_at": created,
        "updated_at": created,
    }
    data.update(extra)
    return data


def sig(sid: int, email: str, created: str = "2024-01-02T00:00:00Z", pid: int = 1, **extra: Any) -> Activity:
    return signature_activity(signature(sid, email, created, **extra), petition(pid), ORG)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "csand.db"


@pytest.fixture
async def store(db_path: Path, clock: FakeClock):
    s = await open_store(db_path, clock=clock)
    try:
        yield s
    finally:
        await s.close()


def rows(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Read with a connection of its own, as ``csand status`` does."""
    conn = sqlite3.connect(db_path, timeout=1)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute(sql, params).fetchall())
    finally:
        conn.close()


def outbox(db_path: Path) -> list[sqlite3.Row]:
    return rows(db_path, "SELECT * FROM outbox ORDER BY id")


# ---------------------------------------------------------------- migrations


@pytest.mark.anyio
async def test_fresh_database_reaches_latest_version_in_wal_mode(db_path: Path, clock: FakeClock) -> None:
    s = await open_store(db_path, clock=clock)
    try:
        assert await s.schema_version() == len(MIGRATIONS)
    finally:
        await s.close()
    assert rows(db_path, "PRAGMA user_version")[0][0] == len(MIGRATIONS)
    assert rows(db_path, "PRAGMA journal_mode")[0][0] == "wal"
    tables = {r["name"] for r in rows(db_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "outbox", "cs_petitions", "cs_signatures", "an_people", "an_tags"} <= tables


@pytest.mark.anyio
async def test_reopening_is_a_no_op_and_keeps_data(db_path: Path, clock: FakeClock) -> None:
    s = await open_store(db_path, clock=clock)
    await s.enqueue([sig(1, "ann@example.org")])
    await s.set_meta(org_slug=ORG)
    await s.close()
    schema_before = rows(db_path, "SELECT sql FROM sqlite_master ORDER BY name")

    s = await open_store(db_path, clock=clock)
    try:
        assert await s.schema_version() == len(MIGRATIONS)
        assert (await s.counts())["pending"] == 1
        assert await s.get_meta("org_slug") == ORG
    finally:
        await s.close()
    assert [tuple(r) for r in rows(db_path, "SELECT sql FROM sqlite_master ORDER BY name")] == [
        tuple(r) for r in schema_before
    ]


@pytest.mark.anyio
async def test_older_database_is_upgraded_in_place(
    db_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:1])
    s = await open_store(db_path, clock=clock)
    await s.enqueue([sig(1, "ann@example.org")])
    await s.close()
    assert rows(db_path, "PRAGMA user_version")[0][0] == 1

    monkeypatch.undo()
    s = await open_store(db_path, clock=clock)
    try:
        assert await s.schema_version() == len(MIGRATIONS)
        (item,) = await s.lease(1, 60)
        assert item.activity == sig(1, "ann@example.org")
    finally:
        await s.close()


@pytest.mark.anyio
async def test_failed_migration_leaves_the_database_as_it_was(
    db_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await open_store(db_path, clock=clock)
    await s.close()
    broken = "CREATE TABLE half_done (a INTEGER); CREATE TABLE broken (;"
    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS, broken])
    with pytest.raises(sqlite3.OperationalError):
        await open_store(db_path, clock=clock)
    assert rows(db_path, "PRAGMA user_version")[0][0] == len(MIGRATIONS)
    assert rows(db_path, "SELECT name FROM sqlite_master WHERE name = 'half_done'") == []


# ---------------------------------------------------------------- enqueue


@pytest.mark.anyio
async def test_enqueue_dedupes_same_version_and_adds_changed_one(store: Storage, db_path: Path) -> None:
    a = sig(1, "ann@example.org", join_organisation=None)
    assert await store.enqueue([a]) == 1
    assert await store.enqueue([a]) == 0
    # Only a CS-side timestamp moved (e.g. a single-petition unsubscribe): same version.
    bumped = sig(1, "ann@example.org", join_organisation=None, updated_at="2024-03-01T00:00:00Z")
    assert bumped.fingerprint() == a.fingerprint()
    assert await store.enqueue([bumped]) == 0
    assert len(outbox(db_path)) == 1

    opted_in = sig(1, "ann@example.org", join_organisation=True)
    assert opted_in.fingerprint() != a.fingerprint()
    assert await store.enqueue([opted_in]) == 1
    items = outbox(db_path)
    assert len(items) == 2
    assert {r["source_key"] for r in items} == {"signature:1"}
    assert {r["person_key"] for r in items} == {"ann@example.org"}


@pytest.mark.anyio
async def test_enqueue_notifies_listeners_only_when_something_was_added(store: Storage) -> None:
    calls: list[int] = []
    store.listeners.append(lambda: calls.append(1))
    a = sig(1, "ann@example.org")
    await store.enqueue([a])
    await store.enqueue([a])
    assert calls == [1]


# ---------------------------------------------------------------- lease


@pytest.mark.anyio
@pytest.mark.parametrize(
    "times",
    [
        ["2024-01-03T00:00:00Z", "2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z"],
        # Whole second vs fractional second, and an offset that normalises to an earlier UTC.
        ["2024-01-01T00:00:00.500000Z", "2024-01-01T00:00:00Z", "2024-01-01T02:00:01+03:00"],
    ],
)
async def test_lease_one_per_person_in_occurred_order(store: Storage, times: list[str]) -> None:
    activities = [sig(i + 1, "ann@example.org", t) for i, t in enumerate(times)]
    await store.enqueue(activities)  # enqueued out of time order
    expected = sorted(activities, key=lambda a: a.occurred_at)  # type: ignore[arg-type, return-value]

    applied: list[str] = []
    for _ in expected:
        leased = await store.lease(10, 60)
        assert len(leased) == 1
        applied.append(leased[0].activity.source_key)
        await store.finish(leased[0].id, "done")
    assert applied == [a.source_key for a in expected]
    assert await store.lease(10, 60) == []


@pytest.mark.anyio
async def test_lease_takes_one_item_for_each_person(store: Storage) -> None:
    await store.enqueue([
        sig(1, "ann@example.org", "2024-01-02T00:00:00Z"),
        sig(2, "ann@example.org", "2024-01-01T00:00:00Z"),
        sig(3, "bob@example.org", "2024-01-01T00:00:00Z"),
        sig(4, "cat@example.org", "2024-01-01T00:00:00Z"),
    ])
    leased = await store.lease(10, 60)
    assert sorted(i.activity.source_key for i in leased) == ["signature:2", "signature:3", "signature:4"]
    assert len({i.activity.person_key for i in leased}) == len(leased)
    assert (await store.counts())["in_flight"] == 3


@pytest.mark.anyio
async def test_never_two_in_flight_for_one_person_across_lease_calls(store: Storage) -> None:
    await store.enqueue([sig(1, "ann@example.org", "2024-01-01T00:00:00Z")])
    first = await store.lease(1, 60)
    assert [i.activity.source_key for i in first] == ["signature:1"]
    # A newer activity of the same person arrives while the first is in flight.
    await store.enqueue([sig(2, "ann@example.org", "2024-01-05T00:00:00Z"),
                         sig(3, "bob@example.org", "2024-01-05T00:00:00Z")])
    second = await store.lease(10, 60)
    assert [i.activity.source_key for i in second] == ["signature:3"]
    await store.finish(first[0].id, "done")
    third = await store.lease(10, 60)
    assert [i.activity.source_key for i in third] == ["signature:2"]


@pytest.mark.anyio
async def test_item_scheduled_in_the_future_is_not_leased(store: Storage, clock: FakeClock) -> None:
    await store.enqueue([sig(1, "ann@example.org")])
    (item,) = await store.lease(1, 60)
    await store.finish(item.id, "pending", error="boom", next_attempt_at=clock() + 30)
    assert await store.lease(10, 60) == []
    clock.t += 29.9
    assert await store.lease(10, 60) == []
    clock.t += 0.1
    (again,) = await store.lease(10, 60)
    assert again.id == item.id
    assert again.attempts == 1


@pytest.mark.anyio
async def test_expired_lease_is_reclaimed(store: Storage, clock: FakeClock, db_path: Path) -> None:
    await store.enqueue([sig(1, "ann@example.org")])
    (item,) = await store.lease(1, lease_seconds=30)
    assert outbox(db_path)[0]["lease_until"] == pytest.approx(T0 + 30)
    clock.t += 30
    assert await store.lease(10, 30) == []  # not yet expired (strictly past the lease)
    clock.t += 0.5
    (again,) = await store.lease(10, 30)
    assert again.id == item.id
    assert again.attempts == 0  # a crash does not use up an attempt
    assert outbox(db_path)[0]["lease_until"] == pytest.approx(clock.t + 30)


@pytest.mark.anyio
async def test_renewed_lease_is_not_reclaimed(store: Storage, clock: FakeClock) -> None:
    await store.enqueue([sig(1, "ann@example.org")])
    (item,) = await store.lease(1, lease_seconds=30)
    clock.t += 20
    await store.renew_leases([item.id], 30)  # the worker is still on it
    clock.t += 25
    assert await store.lease(10, 30) == []  # 45 s after leasing, yet not handed out twice
    clock.t += 6
    assert [i.id for i in await store.lease(10, 30)] == [item.id]


@pytest.mark.anyio
async def test_release_all_in_flight(store: Storage, db_path: Path) -> None:
    await store.enqueue([sig(1, "ann@example.org"), sig(2, "bob@example.org")])
    assert len(await store.lease(10, 3600)) == 2
    assert await store.lease(10, 3600) == []
    assert await store.release_all_in_flight() == 2
    counts = await store.counts()
    assert counts["pending"] == 2 and counts["in_flight"] == 0
    assert all(r["lease_until"] is None for r in outbox(db_path))
    assert len(await store.lease(10, 3600)) == 2
    assert await store.release_all_in_flight() == 2


# ---------------------------------------------------------------- signatures behind their creator


async def _creator_and_signature(store: Storage) -> None:
    creator = creator_activity(petition(7), ORG)
    signer = sig(70, "ann@example.org", pid=7)
    # The signature is the older activity and is enqueued first: it still waits.
    await store.enqueue([signer, creator])


@pytest.mark.anyio
@pytest.mark.parametrize("outcome", ["done", "dead"])
async def test_signature_waits_for_its_petition_creator(store: Storage, outcome: str) -> None:
    await _creator_and_signature(store)
    (creator_item,) = await store.lease(10, 60)
    assert creator_item.activity.kind == "petition_created"
    assert await store.lease(10, 60) == []  # creator in flight: still waiting

    await store.finish(creator_item.id, "pending", next_attempt_at=T0)
    leased = await store.lease(10, 60)
    assert [i.activity.kind for i in leased] == ["petition_created"]  # creator pending: waiting

    await store.finish(leased[0].id, outcome, error="x" if outcome == "dead" else None)
    (signer_item,) = await store.lease(10, 60)
    assert signer_item.activity.source_key == "signature:70"


@pytest.mark.anyio
async def test_signature_leasable_once_petition_is_mirrored(store: Storage) -> None:
    await _creator_and_signature(store)
    notified: list[int] = []
    store.listeners.append(lambda: notified.append(1))
    await store.set_petition_uuid(7, "petition-7", "an-petition-uuid")
    assert notified == [1]
    assert await store.petition_uuid(7) == "an-petition-uuid"
    leased = await store.lease(10, 60)
    assert sorted(str(i.activity.kind) for i in leased) == ["petition_created", "signature"]


@pytest.mark.anyio
async def test_signature_of_other_petition_does_not_wait(store: Storage) -> None:
    await store.enqueue([creator_activity(petition(7), ORG), sig(80, "ann@example.org", pid=8)])
    leased = await store.lease(10, 60)
    assert len(leased) == 2


# ---------------------------------------------------------------- finish


@pytest.mark.anyio
async def test_finish_done_dead_and_pending(store: Storage, clock: FakeClock, db_path: Path) -> None:
    await store.enqueue([sig(1, "a@example.org"), sig(2, "b@example.org"),
                         sig(3, "c@example.org"), sig(4, "d@example.org")])
    items = {i.activity.source_key: i for i in await store.lease(10, 60)}
    clock.t += 5
    await store.finish(items["signature:1"].id, "done", note="signer synced (subscribed)")
    await store.finish(items["signature:2"].id, "dead", error="Action Network refused the record (400): bad")
    await store.finish(items["signature:3"].id, "pending", error="503", next_attempt_at=clock() + 40)
    await store.finish(items["signature:4"].id, "pending", error="shutdown", count_attempt=False)

    by_source = {r["source_key"]: r for r in outbox(db_path)}
    done = by_source["signature:1"]
    assert (done["status"], done["attempts"], done["note"]) == ("done", 1, "signer synced (subscribed)")
    assert done["finished_at"] == pytest.approx(clock())
    assert done["lease_until"] is None
    dead = by_source["signature:2"]
    assert (dead["status"], dead["attempts"]) == ("dead", 1)
    assert dead["last_error"] == "Action Network refused the record (400): bad"
    retry = by_source["signature:3"]
    assert (retry["status"], retry["attempts"], retry["last_error"]) == ("pending", 1, "503")
    assert retry["next_attempt_at"] == pytest.approx(clock() + 40)
    assert retry["lease_until"] is None and retry["finished_at"] is None
    released = by_source["signature:4"]
    assert (released["status"], released["attempts"]) == ("pending", 0)
    assert released["next_attempt_at"] == pytest.approx(clock())

    status = await store.status()
    assert status["retrying"] == 1
    assert status["dead_reasons"] == [{"reason": "Action Network refused the record (400): bad", "count": 1}]
    (dead_item,) = await store.dead_items()
    assert dead_item["source_key"] == "signature:2"
    assert datetime.fromisoformat(dead_item["finished_at"]).timestamp() == pytest.approx(clock())

    assert (await store.requeue_dead()).queued == 1
    requeued = {r["source_key"]: r for r in outbox(db_path)}["signature:2"]
    assert (requeued["status"], requeued["attempts"]) == ("pending", 0)


@pytest.mark.anyio
async def test_finish_records_what_was_learned_about_the_person(store: Storage) -> None:
    await store.enqueue([sig(1, "ann@example.org")])
    (item,) = await store.lease(1, 60)
    person = Person(exists=True, uuid="p-1", subscribed=True)
    await store.finish(item.id, "done", person=("ann@example.org", person))
    assert await store.person("ann@example.org") == person


# ---------------------------------------------------------------- commit_poll


def _state(pid: int = 1) -> PetitionState:
    return PetitionState(
        cs_id=pid, slug=f"petition-{pid}", updated_at="2024-01-01T00:00:00Z", public_count=2,
        content="abc", total_pages=1, an_uuid=None,
    )


def _seen(sid: int, pid: int = 1) -> SignatureSeen:
    return SignatureSeen(sid, pid, f"fp{sid}", None)


async def _nothing_visible(store: Storage, db_path: Path) -> None:
    assert outbox(db_path) == []
    assert rows(db_path, "SELECT * FROM cs_signatures") == []
    assert rows(db_path, "SELECT * FROM cs_petitions") == []
    assert await store.signatures_seen(1) == {}
    assert await store.petition_state(1) is None


@pytest.mark.anyio
async def test_commit_poll_records_and_enqueues_together(store: Storage, db_path: Path) -> None:
    added = await store.commit_poll(
        _state(), [_seen(1), _seen(2)], [sig(1, "a@example.org"), sig(2, "b@example.org")]
    )
    assert added == 2
    assert set(await store.signatures_seen(1)) == {1, 2}
    state = await store.petition_state(1)
    assert state is not None and state.public_count == 2 and state.content == "abc"
    assert await store.petition_state(2) is None
    assert len(outbox(db_path)) == 2


@pytest.mark.anyio
async def test_commit_poll_is_atomic_when_an_activity_cannot_be_serialised(
    store: Storage, db_path: Path
) -> None:
    good = sig(1, "a@example.org")
    broken_ref = dataclasses.replace(good.petition, title=object())  # type: ignore[arg-type]
    broken = dataclasses.replace(sig(2, "b@example.org"), petition=broken_ref)
    with pytest.raises(TypeError):
        await store.commit_poll(_state(), [_seen(1), _seen(2)], [good, broken, sig(3, "c@example.org")])
    await _nothing_visible(store, db_path)


@pytest.mark.anyio
async def test_commit_poll_is_atomic_when_the_transaction_fails_midway(
    store: Storage, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The petition and signature rows are written, then the outbox insert fails.
    monkeypatch.setattr(
        store_module, "_INSERT_OUTBOX",
        "INSERT INTO outbox (no_such_column) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    with pytest.raises(sqlite3.OperationalError):
        await store.commit_poll(_state(), [_seen(1), _seen(2)], [sig(1, "a@example.org")])
    await _nothing_visible(store, db_path)

    monkeypatch.undo()  # the writer connection is usable again: no half-open transaction
    assert await store.commit_poll(_state(), [_seen(1)], [sig(1, "a@example.org")]) == 1
    assert len(outbox(db_path)) == 1


@pytest.mark.anyio
async def test_deleted_signature_cancels_only_its_pending_items(store: Storage, db_path: Path) -> None:
    await store.enqueue([sig(1, "a@example.org"), sig(2, "b@example.org")])
    await store.enqueue([sig(2, "b@example.org", first_name="Bea")])  # a second version, same person
    (b1,) = [i for i in await store.lease(10, 60) if i.activity.source_key == "signature:2"]
    await store.finish(b1.id, "done")

    added = await store.commit_poll(
        None, [SignatureSeen(1, 1, "deleted", "2024-02-01T00:00:00Z"),
               SignatureSeen(2, 1, "deleted", "2024-02-01T00:00:00Z")],
        deleted_sources=["signature:1", "signature:2"],
    )
    assert added == 0
    statuses = [(r["source_key"], r["status"]) for r in outbox(db_path)]
    assert statuses == [("signature:1", "in_flight"), ("signature:2", "done"), ("signature:2", "cancelled")]

    await store.release_all_in_flight()  # the deletion arrived while it was in flight
    by_id = outbox(db_path)
    assert by_id[0]["status"] == "cancelled"
    assert by_id[0]["note"] == "signature deleted on ControlShift while it was being synced"
    await store.commit_poll(None, deleted_sources=["signature:1"])  # seen again: no change
    assert (await store.counts())["cancelled"] == 2
    seen = await store.signatures_seen(1)
    assert seen[1].deleted_at == "2024-02-01T00:00:00Z"
    assert (await store.status())["signatures_deleted"] == 2
    assert await store.lease(10, 60) == []


# ---------------------------------------------------------------- people, tags, meta, status


@pytest.mark.anyio
async def test_person_knowledge_round_trip(store: Storage) -> None:
    assert await store.person("nobody@example.org") == Person()
    fields_at = {
        "given_name": datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        "postal_code": datetime(2023, 12, 31, tzinfo=UTC),
    }
    person = Person(exists=True, uuid="u-1", subscribed=False, fields_at=MappingProxyType(fields_at))
    await store.save_person("ann@example.org", person)
    loaded = await store.person("ann@example.org")
    assert loaded == person
    assert dict(loaded.fields_at) == fields_at
    assert loaded.fields_at["given_name"].tzinfo is not None

    unknown = Person(exists=None, uuid=None, subscribed=None)
    await store.save_person("ann@example.org", unknown)
    assert await store.person("ann@example.org") == unknown

    absent = Person(exists=False)
    await store.save_person("bob@example.org", absent)
    assert await store.person("bob@example.org") == absent


@pytest.mark.anyio
async def test_tags_round_trip_case_insensitively(store: Storage) -> None:
    await store.save_tags([("controlshift:Avoiding Taxes", "t-1"), ("Signer", None)])
    await store.save_tags([("signer", "t-2")])
    assert await store.tags() == {
        "controlshift:avoiding taxes": ("controlshift:Avoiding Taxes", "t-1"),
        "signer": ("Signer", "t-2"),
    }


@pytest.mark.anyio
async def test_status_figures(store: Storage, clock: FakeClock) -> None:
    status = await store.status()
    for key in ("pending", "in_flight", "done", "dead", "cancelled"):
        assert type(status[key]) is int and status[key] == 0
    assert status["last_poll_at"] is None
    assert status["last_reconcile_at"] is None
    assert status["backfill_done"] is False
    assert status["oldest_pending_age_s"] is None

    await store.enqueue([sig(1, "a@example.org"), sig(2, "b@example.org"), sig(3, "c@example.org")])
    items = await store.lease(2, 60)
    await store.finish(items[0].id, "done")
    await store.set_meta(last_poll_at=clock(), backfill_done="1", last_reconcile_at=clock() - 60)
    clock.t += 12.5
    status = await store.status()
    assert (status["pending"], status["in_flight"], status["done"], status["dead"]) == (1, 1, 1, 0)
    assert datetime.fromisoformat(status["last_poll_at"]) == datetime.fromtimestamp(T0, UTC)
    assert datetime.fromisoformat(status["last_reconcile_at"]) == datetime.fromtimestamp(T0 - 60, UTC)
    assert status["backfill_done"] is True
    assert status["oldest_pending_age_s"] == 12.5


@pytest.mark.anyio
async def test_a_second_connection_reads_while_the_writer_holds_a_transaction(
    store: Storage, db_path: Path
) -> None:
    await store.enqueue([sig(1, "a@example.org")])
    seen_by_reader: list[int] = []

    async def tx(db: aiosqlite.Connection) -> None:
        await db.execute(
            "UPDATE outbox SET status = 'done' WHERE source_key = 'signature:1'"
        )
        await db.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")
        # The write transaction is open (BEGIN IMMEDIATE holds the write lock) right now.
        reader = sqlite3.connect(db_path, timeout=0)
        try:
            seen_by_reader.append(reader.execute("SELECT COUNT(*) FROM outbox WHERE status = 'pending'").fetchone()[0])
            seen_by_reader.append(reader.execute("SELECT COUNT(*) FROM meta").fetchone()[0])
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                reader.execute("BEGIN IMMEDIATE")
        finally:
            reader.close()

    await store._write(tx)
    assert seen_by_reader == [1, 0]  # the reader saw the last committed state
    assert (await store.counts())["done"] == 1


@pytest.mark.anyio
async def test_a_stale_poll_never_undoes_a_deletion_or_a_newer_version(store: Storage) -> None:
    """The poller read a page; a webhook then recorded a deletion; the poll's commit comes last."""
    await store.commit_poll(None, [SignatureSeen(1, 1, "deleted", "2024-02-01T00:00:00+00:00",
                                                 "2024-02-01T00:00:00+00:00")])
    stale = sig(1, "ann@example.org")
    await store.commit_poll(None, [SignatureSeen(1, 1, stale.fingerprint(), None,
                                                 "2024-01-02T00:00:00+00:00")], [stale])
    assert (await store.counts())["pending"] == 0
    assert (await store.signature_seen(1)).deleted_at is not None
    newer = SignatureSeen(2, 1, "fp-new", None, "2024-03-01T00:00:00+00:00")
    await store.commit_poll(None, [newer])
    older = sig(2, "bob@example.org")
    await store.commit_poll(None, [SignatureSeen(2, 1, older.fingerprint(), None,
                                                 "2024-01-02T00:00:00+00:00")], [older])
    assert (await store.counts())["pending"] == 0
    assert (await store.signature_seen(2)).fingerprint == "fp-new"


# ---------------------------------------------------------------- retention

DAY = 86_400.0
RETENTION = 30 * DAY


def _by_source(db_path: Path) -> dict[str, sqlite3.Row]:
    return {r["source_key"]: r for r in outbox(db_path)}


@pytest.mark.anyio
async def test_prune_reduces_old_finished_items_to_what_dedupe_and_reports_need(
    store: Storage, clock: FakeClock, db_path: Path
) -> None:
    old_done, recent_done = sig(1, "ann@example.org"), sig(2, "bob@example.org")
    old_dead, dropped, pending = (sig(3, "cy@example.org"), sig(4, "dee@example.org"),
                                  sig(5, "eve@example.org"))
    await store.enqueue([old_done, recent_done, old_dead, dropped, pending])
    ids = {r["source_key"]: r["id"] for r in outbox(db_path)}
    await store.finish(ids["signature:1"], "done", note="signer synced (subscribed)",
                       error="AN 503 for ann@example.org")  # an earlier attempt's error
    await store.finish(ids["signature:3"], "dead", error="invalid email address 'cy@example.org'")
    await store.finish(ids["signature:4"], "dead", error="invalid email address 'dee@example.org'")
    await store.drop_dead([ids["signature:4"]])
    clock.t += 2 * DAY
    await store.finish(ids["signature:2"], "done", note="signer synced (subscribed)")
    before = _by_source(db_path)
    counts_before = await store.counts()

    clock.t = T0 + 31 * DAY  # signature 1 and the dropped 4 finished 31 days ago; 2, 29 days ago
    assert await store.prune(RETENTION) == {"outbox": 2, "webhook_events": 0}

    after = _by_source(db_path)
    for source in ("signature:1", "signature:4"):
        row, was = after[source], before[source]
        assert json.loads(row["payload"]) == {"kind": "signature", "source_key": source,
                                              "pruned": True}
        assert row["person_key"] == f"pruned:{row['id']}"
        assert row["last_error"] is None
        kept = ("id", "dedupe_key", "source_key", "petition_id", "kind", "status", "occurred_at",
                "finished_at", "enqueued_at", "note", "attempts")
        assert [row[k] for k in kept] == [was[k] for k in kept]
    for source in ("signature:2", "signature:3", "signature:5"):  # recent, dead, pending
        assert dict(after[source]) == dict(before[source])
    assert await store.counts() == counts_before
    assert (await store.dead_item(ids["signature:4"]))["activity"]["pruned"] is True

    # A pruned version seen again is still a duplicate; a second prune finds nothing to do.
    assert await store.enqueue([old_done]) == 0
    assert await store.prune(RETENTION) == {"outbox": 0, "webhook_events": 0}
    # The pending item is unaffected and leasable.
    (item,) = await store.lease(10, 60)
    assert item.activity == pending


@pytest.mark.anyio
async def test_prune_works_in_batches(store: Storage, clock: FakeClock, db_path: Path) -> None:
    await store.enqueue([sig(i, f"p{i}@example.org") for i in range(1, 8)])
    for row in outbox(db_path):
        await store.finish(row["id"], "done")
    clock.t += 31 * DAY
    assert await store.prune(RETENTION, batch=3) == {"outbox": 7, "webhook_events": 0}
    assert all(r["person_key"].startswith("pruned:") for r in outbox(db_path))


@pytest.mark.anyio
async def test_prune_empties_old_processed_webhook_bodies_and_keeps_their_dedupe(
    store: Storage, clock: FakeClock, db_path: Path
) -> None:
    body = '{"type":"signature.created","data":{"email":"ann@example.org"}}'
    assert await store.receive_event("jid-old", "signature.created", body)
    assert await store.receive_event("jid-waiting", "signature.created", body)
    assert await store.receive_event("jid-failed", "signature.created", body)
    events = {e.id: e for e in await store.events_due()}
    old, waiting, failed = sorted(events)
    await store.commit_poll(None, event_id=old)
    await store.event_failed(failed, "malformed: no petition", None)  # given up on: processed
    clock.t += 2 * DAY
    assert await store.receive_event("jid-recent", "signature.created", body)
    (recent,) = [e.id for e in await store.events_due() if e.id not in events]
    await store.commit_poll(None, event_id=recent)

    clock.t = T0 + 31 * DAY
    assert await store.prune(RETENTION) == {"outbox": 0, "webhook_events": 2}
    bodies = {r["dedupe"]: r["body"] for r in rows(db_path, "SELECT * FROM webhook_events")}
    assert bodies == {"jid-old": "{}", "jid-failed": "{}", "jid-waiting": body, "jid-recent": body}
    # CS redelivers a pruned event: still recognised, not processed again.
    assert await store.receive_event("jid-old", "signature.created", body) is False
    assert [e.id for e in await store.events_due()] == [waiting]
    assert await store.prune(RETENTION) == {"outbox": 0, "webhook_events": 0}


@pytest.mark.anyio
async def test_pruned_personal_data_is_gone_from_the_database_file(
    db_path: Path, clock: FakeClock
) -> None:
    """secure_delete: the old payloads are overwritten, not merely unlinked from the b-tree."""
    store = await open_store(db_path, clock=clock)
    try:
        await store.enqueue([sig(1, "zoe.private@example.org"), sig(2, "yan.private@example.org")])
        for row in outbox(db_path):
            await store.finish(row["id"], "done")
        clock.t += 31 * DAY
        assert (await store.prune(RETENTION))["outbox"] == 2
    finally:
        await store.close()  # the last connection checkpoints the WAL into the file
    assert not Path(f"{db_path}-wal").exists()  # noqa: ASYNC240 - a test's one check
    raw = db_path.read_bytes()  # noqa: ASYNC240
    assert b"private@example.org" not in raw and b"zoe.private" not in raw


@pytest.mark.anyio
async def test_requeue_since_skips_pruned_items_and_counts_them(
    store: Storage, clock: FakeClock, db_path: Path
) -> None:
    await store.enqueue([sig(1, "ann@example.org"), sig(2, "bob@example.org"),
                         sig(3, "cy@example.org")])
    ids = {r["source_key"]: r["id"] for r in outbox(db_path)}
    await store.finish(ids["signature:1"], "done")
    await store.finish(ids["signature:3"], "dead", error="bad")
    clock.t += 2 * DAY
    await store.finish(ids["signature:2"], "done")
    clock.t = T0 + 31 * DAY
    await store.prune(RETENTION)

    result = await store.requeue_since("2000-01-01T00:00:00+00:00")
    assert (result.queued, result.skipped_deleted, result.skipped_pruned) == (2, 0, 1)
    queued = [r for r in outbox(db_path) if r["status"] == "pending"]
    assert sorted(r["source_key"] for r in queued) == ["signature:2", "signature:3"]
    assert all(not r["person_key"].startswith("pruned:") for r in queued)
