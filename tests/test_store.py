"""The SQLite backend (csand.storage.sqlite): what only SQLite has — migrations, WAL, the file,
its transactions. The behaviour every backend shares is in tests/storage/test_conformance.py."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from csand.storage import SchemaTooNew, open_store
from csand.storage import sqlite as store_module
from csand.storage.sqlite import MIGRATIONS, SQLiteStore
from tests.fakes import ManualClock
from tests.storage import ORG, petition_state, seen_row, sig


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "csand.db"


@pytest.fixture
async def store(db_path: Path, clock: ManualClock):
    s = await SQLiteStore.open(db_path, clock=clock)
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
async def test_fresh_database_reaches_latest_version_in_wal_mode(db_path: Path, clock: ManualClock) -> None:
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
async def test_reopening_is_a_no_op_and_keeps_data(db_path: Path, clock: ManualClock) -> None:
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
async def test_older_database_is_upgraded_in_place(db_path: Path, clock: ManualClock) -> None:
    """A database as version 1 wrote it (rows written by that version's SQL, not today's)."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db_path)
    for statement in store_module._statements(MIGRATIONS[0]):
        conn.execute(statement)
    a = sig(1, "ann@example.org")
    conn.execute(
        "INSERT INTO outbox (dedupe_key, source_key, person_key, petition_id, kind, payload, "
        "occurred_at, enqueued_at) VALUES (?, ?, ?, 1, ?, ?, ?, 0)",
        (a.dedupe_key, a.source_key, a.person_key, str(a.kind), json.dumps(a.to_json()),
         a.occurred_at.isoformat()))
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    s = await open_store(db_path, clock=clock)
    try:
        assert await s.schema_version() == len(MIGRATIONS)
        (item,) = await s.lease(1, 60)
        assert item.activity == a
    finally:
        await s.close()


@pytest.mark.anyio
async def test_failed_migration_leaves_the_database_as_it_was(
    db_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await open_store(db_path, clock=clock)
    await s.close()
    broken = "CREATE TABLE half_done (a INTEGER); CREATE TABLE broken (;"
    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS, broken])
    with pytest.raises(sqlite3.OperationalError):
        await open_store(db_path, clock=clock)
    assert rows(db_path, "PRAGMA user_version")[0][0] == len(MIGRATIONS)
    assert rows(db_path, "SELECT name FROM sqlite_master WHERE name = 'half_done'") == []


@pytest.mark.anyio
async def test_a_database_migrated_by_a_newer_csand_is_refused(db_path: Path,
                                                               clock: ManualClock) -> None:
    s = await open_store(db_path, clock=clock)
    await s.enqueue([sig(1, "ann@example.org")])
    await s.close()
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("PRAGMA user_version = 99")
        conn.commit()
    finally:
        conn.close()
    with pytest.raises(SchemaTooNew, match="newer") as refused:
        await SQLiteStore.open(db_path, clock=clock)
    assert "99" in str(refused.value)
    assert rows(db_path, "PRAGMA user_version")[0][0] == 99  # left as it was
    assert len(outbox(db_path)) == 1


# ---------------------------------------------------------------- transactions


async def _nothing_visible(store: SQLiteStore, db_path: Path) -> None:
    assert outbox(db_path) == []
    assert rows(db_path, "SELECT * FROM cs_signatures") == []
    assert rows(db_path, "SELECT * FROM cs_petitions") == []
    assert await store.signatures_seen(1) == {}
    assert await store.petition_state(1) is None


@pytest.mark.anyio
async def test_commit_poll_is_atomic_when_the_transaction_fails_midway(
    store: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The petition and signature rows are written, then the outbox insert fails.
    monkeypatch.setattr(
        store_module, "_INSERT_OUTBOX",
        "INSERT INTO outbox (no_such_column) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    with pytest.raises(sqlite3.OperationalError):
        await store.commit_poll(petition_state(), [seen_row(1), seen_row(2)], [sig(1, "a@example.org")])
    await _nothing_visible(store, db_path)

    monkeypatch.undo()  # the writer connection is usable again: no half-open transaction
    assert await store.commit_poll(petition_state(), [seen_row(1)], [sig(1, "a@example.org")]) == 1
    assert len(outbox(db_path)) == 1


@pytest.mark.anyio
async def test_a_second_connection_reads_while_the_writer_holds_a_transaction(
    store: SQLiteStore, db_path: Path
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


# ---------------------------------------------------------------- retention

DAY = 86_400.0
RETENTION = 30 * DAY


@pytest.mark.anyio
async def test_pruned_personal_data_is_gone_from_the_database_file(
    db_path: Path, clock: ManualClock
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
async def test_prune_empties_old_processed_webhook_bodies_in_the_table(
    store: SQLiteStore, clock: ManualClock, db_path: Path
) -> None:
    body = '{"type":"signature.created","data":{"email":"ann@example.org"}}'
    assert await store.receive_event("jid-old", "signature.created", body)
    assert await store.receive_event("jid-waiting", "signature.created", body)
    old, _ = [e.id for e in await store.events_due()]
    await store.commit_poll(None, event_id=old)
    clock.t += 31 * DAY
    assert await store.prune(RETENTION) == {"outbox": 0, "webhook_events": 1}
    bodies = {r["dedupe"]: r["body"] for r in rows(db_path, "SELECT * FROM webhook_events")}
    assert bodies == {"jid-old": "{}", "jid-waiting": body}


@pytest.mark.anyio
async def test_a_new_process_leads_at_once_whatever_the_previous_one_held(
        db_path: Path, clock: ManualClock) -> None:
    """One process per SQLite file: a previous process's unexpired lease (it was killed, and the
    host was renamed since) must not delay the first poll."""
    old = await SQLiteStore.open(db_path, clock=clock, instance="old-name")
    assert await old.lead(15) == 1
    await old.close()
    new = await SQLiteStore.open(db_path, clock=clock, instance="new-name")
    try:
        assert await new.lead(15) == 2
        assert (await new.cluster())["leader"] == "new-name"
    finally:
        await new.close()


@pytest.mark.anyio
async def test_a_guard_during_an_unsubscribes_commit_does_not_keep_the_old_answer(
    tmp_path: Path,
) -> None:
    """The guard caches its answer per epoch; the epoch moves only once the commit is visible,
    so a guard that read the database before it reads again afterwards."""
    from csand.model import global_unsubscribe_activity, parse_time
    from tests.test_worker import sig as worker_sig

    store = await open_store(tmp_path / "c.db")
    try:
        await store.enqueue([worker_sig(1, "ann@example.org", opted_in=True)])
        (item,) = await store.lease(1, 60)
        assert await store.guard(item.id, item.token) is None
        db = store._db  # type: ignore[attr-defined]
        original = db.executemany
        during = []

        async def guarded(sql: str, params: Any) -> Any:
            if sql.startswith("INSERT INTO an_people (email, unsubscribed_at, learned_at)"):
                during.append(await store.guard(item.id, item.token))  # the commit is open
            return await original(sql, params)

        db.executemany = guarded
        await store.enqueue([global_unsubscribe_activity(
            7, "ann@example.org", parse_time("2024-03-01T00:00:00Z"))])
        db.executemany = original
        assert during == [None]  # not committed yet: nothing to see
        assert await store.guard(item.id, item.token) == "unsubscribed"
    finally:
        await store.close()
