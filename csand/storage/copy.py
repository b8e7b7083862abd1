"""Copy a SQLite store into an empty PostgreSQL one: the way from one machine to several.

Without it, a PostgreSQL store starts empty: csand re-syncs all history, and forgets which opt-ins
Action Network already acknowledged and every org-wide unsubscribe it received by webhook (which
ControlShift cannot list again), so people who unsubscribed could be subscribed again.

Rules this module keeps:

* Nothing is merged: the PostgreSQL database must hold no csand data yet.
* No daemon runs on the SQLite file meanwhile: its lock file is taken (as ``csand run`` takes
  it) for the whole copy.
* The SQLite side is read in one read transaction (one consistent snapshot), the PostgreSQL side
  written in one transaction: a failure leaves the target as empty as it was.
* Ids are kept (the identity sequences continue after them); items that were in flight go back
  to the queue, or are cancelled when ControlShift deleted their record, as at csand's start-up.
* Rows stream in batches: memory stays bounded whatever the size of the database.

Cluster state (leader, heartbeats, request slots) is not copied: each instance makes its own.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any

import anyio
from psycopg import AsyncConnection, sql

from csand.storage import StoreError, open_store, redact_url
from csand.storage.common import reason_of
from csand.storage.sqlite import SQLiteStore, single_instance

BATCH = 5_000

# What is copied, in this order, with the columns of each (the same names on both sides).
TABLES: dict[str, tuple[str, ...]] = {
    "meta": ("key", "value"),
    "outbox": (
        "id", "dedupe_key", "source_key", "person_key", "petition_id", "kind", "payload",
        "occurred_at", "status", "attempts", "next_attempt_at", "lease_until", "lease_token",
        "lease_owner", "progress", "source_deleted_at", "last_error", "note", "enqueued_at",
        "finished_at", "event_slug",
    ),
    "cs_petitions": ("cs_id", "slug", "updated_at", "public_count", "content", "total_pages",
                     "walked_at", "an_uuid", "creator_extra"),
    "cs_signatures": ("cs_id", "petition_id", "fingerprint", "deleted_at", "updated_at",
                      "bulk_generation"),
    "an_people": ("email", "exists_", "uuid", "subscribed", "fields_at", "unsubscribed_at",
                  "opted_in_at", "learned_at"),
    "an_tags": ("name_key", "name", "uuid"),
    "opt_ins": ("source_key", "applied_at"),
    "webhook_events": ("id", "dedupe", "type", "body", "received_at", "processed_at", "attempts",
                       "next_attempt_at", "error"),
    "cs_events": ("slug", "content", "calendar_slug", "inappropriate", "host_extra", "an_uuid",
                  "walked_at"),
    "cs_calendars": ("slug", "an_uuid"),
    "cs_attendees": ("cs_id", "event_slug", "fingerprint", "deleted_at", "updated_at"),
    "bulk_files": ("id", "url", "jid", "table_name", "kind", "compression", "body",
                   "announced_at", "expires_at", "status", "attempts", "next_attempt_at",
                   "claim_owner", "rows_done", "error", "finished_at"),
    "bulk_records": ("table_name", "id", "ref", "body", "generation"),
    "bulk_parked": ("kind", "id", "petition_id", "body", "parked_at"),
}
# SQLite keeps these as 0/1/NULL, PostgreSQL as booleans.
BOOLEANS: dict[str, tuple[str, ...]] = {"an_people": ("exists_", "subscribed"),
                                        "cs_events": ("inappropriate",)}
# A database holding any of these rows already has csand data: never merge into it. (``meta``
# may hold what ``csand check`` wrote; the SQLite values replace it.)
DATA_TABLES = ("outbox", "cs_petitions", "cs_signatures", "an_people", "an_tags", "opt_ins",
               "webhook_events", "cs_events", "cs_calendars", "cs_attendees", "bulk_files", "bulk_records", "bulk_parked")
IDENTITY = ("outbox", "webhook_events", "bulk_files")

Progress = Callable[[str, int, int], None]


async def copy_sqlite_to_postgres(
    sqlite_path: str | PathLike[str], pg_url: str, *, progress: Progress | None = None,
) -> dict[str, int]:
    """Copy the SQLite store at ``sqlite_path`` into the empty PostgreSQL database ``pg_url``.

    Returns the rows copied per table; calls ``progress(table, done, total)`` after each batch.
    :class:`StoreError` (one line, the password masked) when the copy is refused or fails;
    then nothing was written to PostgreSQL beyond csand's (empty) schema.
    """
    path = Path(sqlite_path)
    if not await anyio.Path(path).is_file():
        raise StoreError(f"no SQLite database at {path}")
    with single_instance(path):
        store = await SQLiteStore.open(path)  # migrated to the current schema first
        await store.close()
        target = await open_store(pg_url, instance="store-copy")  # creates/migrates the schema
        await target.close()
        # Read in worker threads (one at a time), so the event loop (a progress bar) keeps going.
        source = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            source.execute("PRAGMA query_only=ON")
            try:
                conn = await AsyncConnection.connect(pg_url, connect_timeout=10,
                                                     application_name="csand store-copy")
            except Exception as exc:  # noqa: BLE001 - phrased for the operator
                raise StoreError(f"cannot connect to PostgreSQL at {redact_url(pg_url)}: "
                                 f"{reason_of(exc)}") from None
            try:
                source.execute("BEGIN")  # one snapshot of every table
                try:
                    return await _copy(source, conn, pg_url, progress)
                finally:
                    source.execute("ROLLBACK")
            except StoreError:
                raise
            except Exception as exc:
                if not type(exc).__module__.startswith(("psycopg", "sqlite3")):
                    raise
                raise StoreError(f"copy failed, nothing was copied: {reason_of(exc)}") from None
            finally:
                await conn.close()
        finally:
            source.close()


async def _copy(source: sqlite3.Connection, conn: AsyncConnection[Any], pg_url: str,
                progress: Progress | None) -> dict[str, int]:
    copied: dict[str, int] = {}
    async with conn.transaction():
        # No instance started meanwhile may write between the check and the copy.
        await conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(
            sql.SQL(", ").join(sql.Identifier(t) for t in TABLES)))
        for table in DATA_TABLES:
            cur = await conn.execute(
                sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(table)))
            row = await cur.fetchone()
            if row and row[0]:
                raise StoreError(
                    f"the PostgreSQL database at {redact_url(pg_url)} already holds csand data "
                    f"(table {table} is not empty); copy only into an empty database")
        await conn.execute("DELETE FROM meta")
        for table, columns in TABLES.items():
            copied[table] = await _copy_table(source, conn, table, columns, progress)
        for table in IDENTITY:
            await conn.execute(sql.SQL(
                "SELECT setval(pg_get_serial_sequence({t}, 'id'), "
                "COALESCE(MAX(id), 1), MAX(id) IS NOT NULL) FROM {i}").format(
                t=sql.Literal(table), i=sql.Identifier(table)))
        # As csand's start-up does: a lease of the old process is nobody's now.
        await conn.execute(
            "UPDATE outbox SET lease_until = NULL, lease_token = NULL, lease_owner = NULL, "
            "status = CASE WHEN source_deleted_at IS NULL THEN 'pending' ELSE 'cancelled' END, "
            "finished_at = CASE WHEN source_deleted_at IS NULL THEN NULL ELSE %(now)s END, "
            "note = CASE WHEN source_deleted_at IS NULL THEN note "
            "ELSE 'signature deleted on ControlShift while it was being synced' END "
            "WHERE status = 'in_flight'", {"now": time.time()})
        await conn.execute("UPDATE bulk_files SET status = 'pending', claim_owner = NULL, "
                           "next_attempt_at = 0 WHERE status = 'processing'")
    return copied


async def _copy_table(source: sqlite3.Connection, conn: AsyncConnection[Any], table: str,
                      columns: tuple[str, ...], progress: Progress | None) -> int:
    total = (await _read(source, f"SELECT COUNT(*) FROM {table}")).fetchone()[0]  # noqa: S608
    if progress is not None:
        progress(table, 0, total)
    booleans = [columns.index(c) for c in BOOLEANS.get(table, ())]
    order = "id" if "id" in columns else columns[0]
    cursor = await _read(
        source, f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}")  # noqa: S608
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(c) for c in columns))
    done = 0
    async with conn.cursor() as cur, cur.copy(statement) as copy:
        # COPY writes identity columns as given (like OVERRIDING SYSTEM VALUE): ids are kept.
        while rows := await anyio.to_thread.run_sync(cursor.fetchmany, BATCH):
            for row in rows:
                if booleans:
                    values = list(row)
                    for i in booleans:
                        values[i] = None if values[i] is None else bool(values[i])
                    row = tuple(values)
                await copy.write_row(row)
            done += len(rows)
            if progress is not None:
                progress(table, done, total)
    return done


async def _read(source: sqlite3.Connection, query: str) -> sqlite3.Cursor:
    return await anyio.to_thread.run_sync(source.execute, query)



__all__ = ["BATCH", "TABLES", "copy_sqlite_to_postgres"]
