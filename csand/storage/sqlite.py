"""The SQLite backend of :mod:`csand.storage`: schema, migrations and every query, in one place.

Rules this module keeps:

* WAL mode, so ``csand status`` can read while ``csand run`` writes.
* One writer connection; every write transaction starts with ``BEGIN IMMEDIATE`` (a deferred
  transaction that later upgrades fails at once with "database is locked").
* What the poller saw (petition signals, signature fingerprints) and the outbox rows it produced
  commit in the same transaction, so a crash can never record "seen" without "enqueued".
* Outbox items move ``pending → in_flight → done | dead`` (or ``cancelled`` when ControlShift
  deleted the signature before it was synced); attempts and the next attempt time are columns,
  not memory.

Times are Unix seconds (float, from an injectable clock) for scheduling, ISO 8601 for display.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite
import anyio

from csand.logs import get_logger
from csand.model import (
    Activity,
    ActivityKind,
    AttendeeSeen,
    DeadLetter,
    Person,
    SignatureSeen,
    parse_time,
)
from csand.storage import (
    BULK_CLAIM_SECONDS,
    EVENT_CLAIM_SECONDS,
    FORGET_INSTANCE_SECONDS,
    STATUSES,
    EventState,
    Item,
    NotLeader,
    PetitionState,
    Requeued,
    SchemaTooNew,
    StoreError,
    WebhookEvent,
)
from csand.storage.bulk import (
    BULK_COUNTS,
    BULK_FIGURES,
    BULK_FILE_COLUMNS,
    BULK_LAST_FULL_UNSUBSCRIBES,
    BULK_NEWEST_EXPIRED,
    DEFAULT_LIFETIME_SECONDS,
    FINAL_STATUSES,
    BulkChanges,
    BulkFile,
    Parked,
    bulk_file,
    bulk_view,
    chunks,
)
from csand.storage.common import (
    AUDIT_KINDS,
    DEAD_REASONS,
    HISTORY_NOTE,
    LEASE_RULES,
    PRUNED,
    STATUS_FIGURES,
    UNSUBSCRIBES_KNOWN,
    audit_sample_where,
    cluster_view,
    dead_letter_row,
    field_times,
    first_unsubscribes,
    iso,
    outbox_row,
    record_number,
    signature_id,
    split_history,
    stale_versions,
    status_view,
    steps_of,
    unsubscribe_keys,
)

# Each entry migrates from version i to i+1. Append only; never edit a released one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT
    );

    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY,
        dedupe_key      TEXT NOT NULL UNIQUE,   -- source record + version fingerprint
        source_key      TEXT NOT NULL,          -- the CS record ("signature:42")
        person_key      TEXT NOT NULL,          -- normalised email: one in flight per person
        petition_id     INTEGER,                -- CS petition id, for ordering behind its creator
        kind            TEXT NOT NULL,
        payload         TEXT NOT NULL,          -- Activity as JSON
        occurred_at     TEXT NOT NULL,          -- CS time: per-person apply order
        status          TEXT NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'in_flight', 'done', 'dead', 'cancelled')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        lease_until     REAL,
        last_error      TEXT,
        note            TEXT,
        enqueued_at     REAL NOT NULL,
        finished_at     REAL
    );
    CREATE INDEX outbox_ready    ON outbox (status, next_attempt_at, id);
    CREATE INDEX outbox_person   ON outbox (person_key, status, occurred_at, id);
    CREATE INDEX outbox_source   ON outbox (source_key, status);
    CREATE INDEX outbox_petition ON outbox (petition_id, kind, status);

    CREATE TABLE cs_petitions (
        cs_id            INTEGER PRIMARY KEY,
        slug             TEXT NOT NULL,
        updated_at       TEXT,                  -- CS change signals seen at the last walk
        public_count     INTEGER,
        content          TEXT,                  -- fingerprint of title/categories/creator
        total_pages      INTEGER,
        walked_at        REAL,
        an_uuid          TEXT                   -- the mirrored AN petition, once created
    );

    CREATE TABLE cs_signatures (
        cs_id        INTEGER PRIMARY KEY,
        petition_id  INTEGER NOT NULL,
        fingerprint  TEXT NOT NULL,
        deleted_at   TEXT
    );
    CREATE INDEX cs_signatures_petition ON cs_signatures (petition_id);

    CREATE TABLE an_people (                    -- what AN's own answers told csand
        email      TEXT PRIMARY KEY,
        exists_    INTEGER,                     -- 1 present, 0 absent, NULL unknown
        uuid       TEXT,
        subscribed INTEGER,
        fields_at  TEXT,                        -- JSON: field name → CS time that set it
        learned_at REAL NOT NULL
    );

    CREATE TABLE an_tags (
        name_key TEXT PRIMARY KEY,              -- lower-cased: AN tag names are case-insensitive
        name     TEXT NOT NULL,
        uuid     TEXT
    );
    """,
    # v2: webhooks. Received events wait in an inbox until turned into outbox items; signature
    # versions carry their CS time so an older version seen later never overwrites a newer one;
    # creator details only webhooks carry (postcode, opt-in) are kept per petition.
    """
    CREATE TABLE webhook_events (
        id              INTEGER PRIMARY KEY,
        dedupe          TEXT NOT NULL UNIQUE,   -- CS's jid, or a hash of the body
        type            TEXT NOT NULL,
        body            TEXT NOT NULL,
        received_at     REAL NOT NULL,
        processed_at    REAL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        error           TEXT
    );
    CREATE INDEX webhook_events_todo ON webhook_events (processed_at, next_attempt_at, id);
    ALTER TABLE cs_signatures ADD COLUMN updated_at TEXT;
    ALTER TABLE cs_petitions ADD COLUMN creator_extra TEXT;
    """,
    # v3: the lease query walks pending items in id order and stops at its LIMIT, instead of
    # examining and sorting the whole backlog on every lease.
    """
    CREATE INDEX outbox_pending ON outbox (id) WHERE status = 'pending';
    """,
    # v4: an opt-in counts once, at its time. Records whose opt-in reached AN, and each
    # person's latest org-wide unsubscribe, so a re-sync or a late-found older opt-in never
    # subscribes someone who unsubscribed since.
    """
    CREATE TABLE opt_ins (
        source_key TEXT PRIMARY KEY,
        applied_at REAL NOT NULL
    );
    ALTER TABLE an_people ADD COLUMN unsubscribed_at TEXT;
    """,
    # v5: consent and no-loss under every interleaving.
    # * A lease is a token the finishing worker must still hold: after a clock jump the same
    #   item may be handed out again, and the first worker then writes nothing more.
    # * What AN acknowledged is kept per item as it happens, so a retry continues the plan.
    # * Once ControlShift deleted a record, every item of it says so (checked before each AN
    #   request, by `dead retry` and by re-syncs).
    # * Each person's consent timeline gains the latest opt-in AN applied.
    # And what earlier versions stored that this one does not trust is cleared or rebuilt.
    """
    ALTER TABLE outbox ADD COLUMN lease_token TEXT;
    ALTER TABLE outbox ADD COLUMN progress TEXT;
    ALTER TABLE outbox ADD COLUMN source_deleted_at TEXT;
    ALTER TABLE an_people ADD COLUMN opted_in_at TEXT;

    -- Whether a person is in AN, and subscribed, goes stale the moment someone else changes AN:
    -- versions before v4 kept it, and it made csand skip the lookup for a person erased since.
    UPDATE an_people SET exists_ = NULL, subscribed = NULL;

    UPDATE outbox SET source_deleted_at = (
        SELECT s.deleted_at FROM cs_signatures AS s
        WHERE s.cs_id = CAST(substr(outbox.source_key, 11) AS INTEGER))
    WHERE source_key LIKE 'signature:%';
    UPDATE outbox SET status = 'cancelled', lease_until = NULL,
        note = 'signature deleted on ControlShift before it was synced'
    WHERE status IN ('pending', 'in_flight') AND source_deleted_at IS NOT NULL;

    -- Versions before v4 did not record which opt-ins reached AN: every finished opt-in is
    -- taken as applied. That can only stop a re-subscription, never cause one.
    INSERT OR IGNORE INTO opt_ins (source_key, applied_at)
    SELECT source_key, MIN(COALESCE(finished_at, enqueued_at)) FROM outbox
    WHERE status = 'done' AND json_extract(payload, '$.opted_in') = 1
    GROUP BY source_key;
    UPDATE an_people SET opted_in_at = (
        SELECT MAX(COALESCE(json_extract(o.payload, '$.opted_in_at'),
                            json_extract(o.payload, '$.fields_at')))
        FROM outbox AS o
        WHERE o.person_key = an_people.email AND o.status = 'done'
          AND json_extract(o.payload, '$.opted_in') = 1);
    """,
    # v6: the cluster interface (the PostgreSQL backend shares it among instances; here one
    # process always leads): who leads in which term, each instance's heartbeat, request slots,
    # and which instance holds each lease.
    """
    CREATE TABLE cluster_leader (
        role   TEXT PRIMARY KEY,                -- 'poller'
        holder TEXT NOT NULL,
        term   INTEGER NOT NULL,
        until  REAL NOT NULL
    );
    CREATE TABLE cluster_instances (
        instance     TEXT PRIMARY KEY,
        heartbeat_at REAL NOT NULL,
        info         TEXT NOT NULL              -- JSON: what csand status shows
    );
    CREATE TABLE rate_buckets (
        name         TEXT PRIMARY KEY,
        next_at      REAL NOT NULL,             -- earliest start of the next slot
        paused_until REAL NOT NULL DEFAULT 0
    );
    ALTER TABLE outbox ADD COLUMN lease_owner TEXT;
    """,
    # v7: events. What csand saw of each CS event (keyed by slug: CS events have no numeric id)
    # and its attendees, the AN events and event campaigns mirroring them, and which event an
    # outbox item belongs to (an attendance waits for its event like a signature for its
    # petition).
    """
    CREATE TABLE cs_events (
        slug          TEXT PRIMARY KEY,
        content       TEXT,                     -- fingerprint of what AN shows of it
        calendar_slug TEXT,
        inappropriate INTEGER NOT NULL DEFAULT 0, -- a webhook said so: never synced
        host_extra    TEXT,                     -- JSON: host details only webhooks carry
        an_uuid       TEXT,                     -- the mirrored AN event, once created
        walked_at     REAL
    );
    CREATE TABLE cs_calendars (
        slug    TEXT PRIMARY KEY,
        an_uuid TEXT                            -- the mirrored AN event campaign
    );
    CREATE TABLE cs_attendees (
        cs_id       INTEGER PRIMARY KEY,
        event_slug  TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        deleted_at  TEXT,
        updated_at  TEXT
    );
    CREATE INDEX cs_attendees_event ON cs_attendees (event_slug);
    ALTER TABLE outbox ADD COLUMN event_slug TEXT;
    CREATE INDEX outbox_event ON outbox (event_slug, kind, status);
    """,
    # v8: bulk data. Every file a verified data.*_table_exported webhook announced, recorded
    # before the 200 so an acknowledged announcement is never lost; its processing state
    # (claimed like webhook events through next_attempt_at), and how many of its rows are done
    # so a restart resumes instead of starting over.
    """
    CREATE TABLE bulk_files (
        id              INTEGER PRIMARY KEY,
        url             TEXT NOT NULL UNIQUE,
        jid             TEXT UNIQUE,            -- the announcing webhook's, when it had one
        table_name      TEXT NOT NULL,
        kind            TEXT NOT NULL,          -- 'incremental' | 'full'
        compression     TEXT,
        body            TEXT NOT NULL,          -- ExportFile.to_json()
        announced_at    REAL NOT NULL,
        expires_at      REAL NOT NULL,
        status          TEXT NOT NULL DEFAULT 'pending',
                        -- pending | processing | done | skipped | expired | failed
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        claim_owner     TEXT,
        rows_done       INTEGER NOT NULL DEFAULT 0,
        error           TEXT,
        finished_at     REAL
    );
    CREATE INDEX bulk_files_todo ON bulk_files (status, next_attempt_at, id);
    CREATE INDEX bulk_files_table ON bulk_files (table_name, kind, status, finished_at);
    """,
    # v9: bulk data as a source (controlshift.source = "bulk"): the rows signatures are joined
    # with, what waits for its petition, and which full file last held each signature.
    """
    CREATE TABLE bulk_records (
        table_name  TEXT NOT NULL,           -- petitions, users, categories, categorized_petitions
        id          INTEGER NOT NULL,
        ref         INTEGER,                 -- categorized_petitions: the petition id
        body        TEXT NOT NULL,           -- the row's cells as JSON
        generation  INTEGER,                 -- the full file that last held it
        PRIMARY KEY (table_name, id)
    );
    CREATE INDEX bulk_records_ref ON bulk_records (table_name, ref);
    CREATE TABLE bulk_parked (
        kind        TEXT NOT NULL,           -- 'signature' | 'creator'
        id          INTEGER NOT NULL,
        petition_id INTEGER NOT NULL,
        body        TEXT,
        parked_at   REAL NOT NULL,
        PRIMARY KEY (kind, id)
    );
    ALTER TABLE cs_signatures ADD COLUMN bulk_generation INTEGER;
    """,
]

log = get_logger("store")


class SQLiteStore:
    """The single writer. Open with ``await SQLiteStore.open(path)`` (or
    :func:`csand.storage.open_store`); close with ``await store.close()``."""

    shared = False  # one process per database file (the daemon's lock file sees to it)

    def __init__(self, conn: aiosqlite.Connection, clock: Callable[[], float],
                 instance: str = "csand") -> None:
        self._db = conn
        self.instance = instance
        self._clock = clock
        self._lock = anyio.Lock()  # one transaction at a time on the writer connection
        self._reader: aiosqlite.Connection | None = None
        self._read_lock = anyio.Lock()
        self.listeners: list[Callable[[], None]] = []  # called when work becomes ready
        self.history_start: datetime | None = None  # see Outbox.history_start
        # Bumped by every commit that can take an item from its worker (a deletion, a reclaimed
        # lease); a lease checked since the last bump needs no read (see guard).
        self._epoch = 0
        self._checked: dict[tuple[int, str], int] = {}

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()

    # ---- lifecycle ----

    @classmethod
    async def open(cls, path: str | Path, clock: Callable[[], float] = time.time,
                   instance: str = "csand") -> SQLiteStore:
        path = Path(path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
            _create_private(path)
        conn = await aiosqlite.connect(str(path), isolation_level=None, timeout=30)
        conn.row_factory = sqlite3.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL
        await conn.execute("PRAGMA secure_delete=ON")  # pruned data is overwritten, not unlinked
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=30000")
        store = cls(conn, clock, instance)
        try:
            await store._migrate()
            if str(path) != ":memory:":
                # Reads get their own connection (and thread): under WAL they see every
                # committed write and never queue behind the writer's transactions.
                reader = await aiosqlite.connect(str(path), isolation_level=None, timeout=30)
                reader.row_factory = sqlite3.Row
                await reader.execute("PRAGMA busy_timeout=30000")
                await reader.execute("PRAGMA query_only=ON")
                store._reader = reader
        except BaseException:
            await conn.close()
            raise
        return store

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.close()
        await self._db.close()

    async def _migrate(self) -> None:
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                version = (await (await self._db.execute("PRAGMA user_version")).fetchone())[0]
                if version > len(MIGRATIONS):
                    raise SchemaTooNew(
                        f"the database is at schema version {version}, newer than this csand "
                        f"knows ({len(MIGRATIONS)}): a newer csand migrated it; run that version "
                        "or restore a backup taken before the upgrade")
                for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                    for statement in _statements(script):
                        await self._db.execute(statement)
                    await self._db.execute(f"PRAGMA user_version = {number}")
                await self._db.execute("COMMIT")
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise

    async def schema_version(self) -> int:
        return (await (await self._db.execute("PRAGMA user_version")).fetchone())[0]

    # ---- transactions ----

    async def _write(self, fn: Callable[[aiosqlite.Connection], Any]) -> Any:
        """Run ``fn`` inside ``BEGIN IMMEDIATE … COMMIT`` on the writer connection."""
        async with self._lock:
            with anyio.CancelScope(shield=True):  # never leave a half-open transaction behind
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = await fn(self._db)
                    await self._db.execute("COMMIT")
                except BaseException:
                    await self._db.execute("ROLLBACK")
                    raise
        return result

    async def _read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        if self._reader is None:  # an in-memory database has one connection only
            async with self._lock:
                cursor = await self._db.execute(sql, params)
                return list(await cursor.fetchall())
        async with self._read_lock:
            cursor = await self._reader.execute(sql, params)
            return list(await cursor.fetchall())

    # ---- meta ----

    async def get_meta(self, key: str) -> str | None:
        rows = await self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    async def set_meta(self, **values: str | float | None) -> None:
        async def tx(db: aiosqlite.Connection) -> None:
            await db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [(k, None if v is None else str(v)) for k, v in values.items()],
            )

        await self._write(tx)

    # ---- poller side ----

    async def petition_state(self, cs_id: int) -> PetitionState | None:
        rows = await self._read(
            "SELECT cs_id, slug, updated_at, public_count, content, total_pages, an_uuid, "
            "creator_extra "
            "FROM cs_petitions WHERE cs_id = ?", (cs_id,),
        )
        return PetitionState(**dict(rows[0])) if rows else None

    async def signatures_seen(self, petition_id: int) -> dict[int, SignatureSeen]:
        rows = await self._read(
            "SELECT cs_id, petition_id, fingerprint, deleted_at, updated_at FROM cs_signatures "
            "WHERE petition_id = ?", (petition_id,),
        )
        return {r["cs_id"]: SignatureSeen(**dict(r)) for r in rows}

    async def commit_poll(
        self,
        petition: PetitionState | None,
        signatures: Iterable[SignatureSeen] = (),
        activities: Iterable[Activity] = (),
        deleted_sources: Iterable[str] = (),
        *,
        event_id: int | None = None,
        creator_extra: tuple[int, str, str] | None = None,
        dead_letters: Iterable[DeadLetter] = (),
        fence: tuple[str, int] | None = None,
        event: EventState | None = None,
        attendees: Iterable[AttendeeSeen] = (),
        bulk_progress: tuple[int, int] | None = None,
        bulk: BulkChanges | None = None,
    ) -> int:
        """Record what was seen and enqueue what it produced, atomically.

        Used by the poller and by the webhook processor (``event_id`` marks that event
        processed in the same transaction; ``creator_extra`` is ``(cs_id, slug, json)``).
        Returns the number of new outbox items (re-seen versions are ignored by the unique
        dedupe key). Pending items of deleted signatures are cancelled: CS says to treat a
        deleted signature as if it never happened. ``dead_letters`` (malformed CS records) are
        stored dead, once per version of the record however often it is seen; they are not
        counted in the return value.
        """
        now = self._clock()
        activities = list(activities)
        signatures = list(signatures)
        attendees = list(attendees)
        deleted = [(s,) for s in deleted_sources]
        dead = [dead_letter_row(d, now) for d in dead_letters]

        async def tx(db: aiosqlite.Connection) -> int:
            if fence is not None:
                await _check_fence(db, fence, now)
            # What was read before this transaction may be stale: a webhook processed meanwhile
            # may have recorded a deletion or a newer version. Those win; the stale copy and the
            # activity built from it are dropped here, under the write lock.
            stale = await _stale(db, "cs_signatures", signatures)
            stale_attendees = await _stale(db, "cs_attendees", attendees)
            sigs = [(s.cs_id, s.petition_id, s.fingerprint, s.deleted_at, s.updated_at)
                    for s in signatures if s.cs_id not in stale]
            atts = [(s.cs_id, s.event_slug, s.fingerprint, s.deleted_at, s.updated_at)
                    for s in attendees if s.cs_id not in stale_attendees]
            rows, history = split_history(
                ((a, outbox_row(a, now)) for a in activities
                 if signature_id(a.source_key) not in stale
                 and record_number(a.source_key, "attendee") not in stale_attendees),
                self.history_start)
            unsubscribing = unsubscribe_keys(rows)
            known: set[str] = set()  # org-wide unsubscribes enqueued before: already applied
            if unsubscribing:
                for at in range(0, len(unsubscribing), 500):  # under SQLite's parameter limit
                    chunk = unsubscribing[at:at + 500]
                    cur = await db.execute(UNSUBSCRIBES_KNOWN.format(
                        marks=", ".join("?" * len(chunk))), chunk)
                    known.update(r[0] for r in await cur.fetchall())
                rows = first_unsubscribes(rows, known)
            if event is not None:
                await db.execute(_UPSERT_EVENT, (
                    event.slug, event.content, event.calendar_slug, int(event.inappropriate),
                    event.host_extra, now))
                if event.inappropriate:  # what is still queued of it never reaches AN
                    await db.execute(_CANCEL_FLAGGED, (now, event.slug))
            if atts:
                await db.executemany(
                    "INSERT INTO cs_attendees "
                    "(cs_id, event_slug, fingerprint, deleted_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (cs_id) DO UPDATE SET "
                    "fingerprint = excluded.fingerprint, deleted_at = excluded.deleted_at, "
                    "updated_at = excluded.updated_at", atts)
            if petition is not None:
                await db.execute(
                    "INSERT INTO cs_petitions "
                    "(cs_id, slug, updated_at, public_count, content, total_pages, walked_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (cs_id) DO UPDATE SET "
                    "slug = excluded.slug, updated_at = excluded.updated_at, "
                    "public_count = excluded.public_count, content = excluded.content, "
                    "total_pages = excluded.total_pages, walked_at = excluded.walked_at",
                    (petition.cs_id, petition.slug, petition.updated_at, petition.public_count,
                     petition.content, petition.total_pages, now),
                )
            if sigs:
                await db.executemany(
                    "INSERT INTO cs_signatures "
                    "(cs_id, petition_id, fingerprint, deleted_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (cs_id) DO UPDATE SET "
                    "fingerprint = excluded.fingerprint, deleted_at = excluded.deleted_at, "
                    "updated_at = excluded.updated_at",
                    sigs,
                )
            before = db.total_changes
            if rows:
                await db.executemany(_INSERT_OUTBOX, rows)
                # An RSVP given again, unchanged, after it was withdrawn while still queued: its
                # cancelled item comes back instead of being taken for a re-seen version.
                await db.executemany(_REVIVE_RSVP, [(r[0],) for r in rows
                                                    if r[4] == str(ActivityKind.ATTENDANCE)])
            added = db.total_changes - before
            if history:
                before = db.total_changes
                await db.executemany(_INSERT_HISTORY, [(*r, now) for r in history])
                if db.total_changes > before:
                    await db.execute(_COUNT_HISTORY, (db.total_changes - before,))
            if dead:
                await db.executemany(_INSERT_DEAD_LETTER, dead)
            if deleted:
                # Every item of the record learns it, whatever its state: one in flight stops
                # before its next AN request, a dead one is not revived, a done one not re-synced.
                await db.executemany(
                    "UPDATE outbox SET source_deleted_at = COALESCE(source_deleted_at, ?) "
                    "WHERE source_key = ?",
                    [(iso(now), s) for (s,) in deleted],
                )
                await db.executemany(
                    "UPDATE outbox SET status = 'cancelled', finished_at = ?, "
                    "note = CASE WHEN source_key LIKE 'attendee:%' "
                    "THEN 'RSVP withdrawn or deleted on ControlShift before it was synced' "
                    "ELSE 'signature deleted on ControlShift before it was synced' END "
                    "WHERE source_key = ? AND status = 'pending'",
                    [(now, s) for (s,) in deleted],
                )
            unsubscribes = [(a.email, a.occurred_at.isoformat(), now) for a in activities
                            if a.kind is ActivityKind.GLOBAL_UNSUBSCRIBE and a.email
                            and a.occurred_at is not None and a.source_key not in known]
            if unsubscribes:
                learned.append(True)  # plans in flight must see it before their next request
                # The consent timeline learns of an org-wide unsubscribe when csand does, not
                # when its item runs: an older opt-in waiting in the queue must not subscribe
                # the person first.
                await db.executemany(
                    "INSERT INTO an_people (email, unsubscribed_at, learned_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (email) DO UPDATE SET unsubscribed_at = CASE "
                    "WHEN unsubscribed_at IS NULL OR excluded.unsubscribed_at > unsubscribed_at "
                    "THEN excluded.unsubscribed_at ELSE unsubscribed_at END", unsubscribes)
            if creator_extra is not None:
                await db.execute(
                    "INSERT INTO cs_petitions (cs_id, slug, creator_extra) VALUES (?, ?, ?) "
                    "ON CONFLICT (cs_id) DO UPDATE SET creator_extra = excluded.creator_extra",
                    creator_extra,
                )
            if event_id is not None:
                await db.execute(
                    "UPDATE webhook_events SET processed_at = ?, error = NULL WHERE id = ?",
                    (now, event_id),
                )
            if bulk_progress is not None:
                await db.execute(_BULK_PROGRESS, (bulk_progress[1], now + BULK_CLAIM_SECONDS,
                                                  bulk_progress[0]))
            if bulk is not None:
                await _bulk_changes(db, bulk, now)
            return added

        learned: list[bool] = []
        added = await self._write(tx)
        # Only once committed: a guard that read the epoch first and the database before the
        # commit would otherwise take the old state as current for as long as nothing else
        # moves the epoch.
        if deleted or learned:
            self._epoch += 1
        if added:
            self._notify()
        return added

    async def enqueue(self, activities: Iterable[Activity]) -> int:
        return await self.commit_poll(None, (), activities)

    async def signature_seen(self, cs_id: int) -> SignatureSeen | None:
        rows = await self._read(
            "SELECT cs_id, petition_id, fingerprint, deleted_at, updated_at FROM cs_signatures "
            "WHERE cs_id = ?", (cs_id,),
        )
        return SignatureSeen(**dict(rows[0])) if rows else None

    async def signatures_seen_many(self, ids: Sequence[int]) -> dict[int, SignatureSeen]:
        out: dict[int, SignatureSeen] = {}
        for chunk in chunks(list(ids)):
            rows = await self._read(
                "SELECT cs_id, petition_id, fingerprint, deleted_at, updated_at FROM cs_signatures "
                f"WHERE cs_id IN ({', '.join('?' * len(chunk))})", tuple(chunk))
            out.update((r["cs_id"], SignatureSeen(**dict(r))) for r in rows)
        return out

    # ---- bulk data as a source ----

    async def bulk_records(self, table: str, ids: Sequence[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for chunk in chunks(list(ids)):
            rows = await self._read(
                f"SELECT id, body FROM bulk_records WHERE table_name = ? "
                f"AND id IN ({', '.join('?' * len(chunk))})", (table, *chunk))
            out.update((r["id"], r["body"]) for r in rows)
        return out

    async def bulk_records_by_ref(self, table: str, refs: Sequence[int]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for chunk in chunks(list(refs)):
            rows = await self._read(
                f"SELECT ref, body FROM bulk_records WHERE table_name = ? "
                f"AND ref IN ({', '.join('?' * len(chunk))}) ORDER BY id", (table, *chunk))
            for r in rows:
                out.setdefault(r["ref"], []).append(r["body"])
        return out

    async def bulk_forget(self, table: str, generation: int) -> int:
        async def tx(db: aiosqlite.Connection) -> int:
            cur = await db.execute(
                "DELETE FROM bulk_records WHERE table_name = ? "
                "AND (generation IS NULL OR generation < ?)", (table, generation))
            return cur.rowcount

        return await self._write(tx)

    async def bulk_parked(self, after: tuple[str, int] = ("", 0), limit: int = 500
                          ) -> list[Parked]:
        rows = await self._read(
            "SELECT kind, id, petition_id, body FROM bulk_parked WHERE (kind, id) > (?, ?) "
            "ORDER BY kind, id LIMIT ?", (*after, limit))
        return [Parked(**dict(r)) for r in rows]

    async def bulk_waiting(self, kind: str, ids: Sequence[int]) -> set[int]:
        out: set[int] = set()
        for chunk in chunks(list(ids)):
            rows = await self._read(
                f"SELECT id FROM bulk_parked WHERE kind = ? "
                f"AND id IN ({', '.join('?' * len(chunk))})", (kind, *chunk))
            out.update(r["id"] for r in rows)
        return out

    async def bulk_vanished(self, generation: int, before: str, after: int = 0,
                            limit: int = 1000) -> list[SignatureSeen]:
        rows = await self._read(
            "SELECT cs_id, petition_id, fingerprint, deleted_at, updated_at FROM cs_signatures "
            "WHERE cs_id > ? AND deleted_at IS NULL AND updated_at < ? "
            "AND (bulk_generation IS NULL OR bulk_generation < ?) ORDER BY cs_id LIMIT ?",
            (after, before, generation, limit))
        return [SignatureSeen(**dict(r)) for r in rows]

    async def pending_signature_emails(self, petition_id: int) -> dict[str, str | None]:
        """source key → email (as CS gave it) of this petition's signatures still to sync."""
        rows = await self._read(
            "SELECT source_key, payload FROM outbox WHERE petition_id = ? AND kind = 'signature' "
            "AND status = 'pending'", (petition_id,),
        )
        result: dict[str, str | None] = {}
        for r in rows:
            payload = json.loads(r["payload"])
            result[r["source_key"]] = (payload.get("raw_email") or payload.get("email") or "").strip() or None
        return result

    # ---- webhook inbox ----

    async def receive_event(self, dedupe: str, type_: str, body: str) -> bool:
        """Durably accept a webhook; False when it was received before (a redelivery)."""
        now = self._clock()

        async def tx(db: aiosqlite.Connection) -> bool:
            cur = await db.execute(
                "INSERT OR IGNORE INTO webhook_events (dedupe, type, body, received_at) "
                "VALUES (?, ?, ?, ?)", (dedupe, type_, body, now),
            )
            return cur.rowcount == 1

        return await self._write(tx)

    async def events_due(self, limit: int = 50) -> list[WebhookEvent]:
        now = self._clock()
        due = ("SELECT id, type, body, attempts FROM webhook_events "
               "WHERE processed_at IS NULL AND next_attempt_at <= ? ORDER BY id LIMIT ?")
        if not await self._read(due, (now, 1)):  # the idle loop asks every second: read only
            return []

        async def tx(db: aiosqlite.Connection) -> list[WebhookEvent]:
            rows = list(await (await db.execute(due, (now, limit))).fetchall())
            await db.executemany("UPDATE webhook_events SET next_attempt_at = ? WHERE id = ?",
                                 [(now + EVENT_CLAIM_SECONDS, r["id"]) for r in rows])
            return [WebhookEvent(**dict(r)) for r in rows]

        return await self._write(tx)

    async def event_failed(self, event_id: int, error: str, retry_at: float | None) -> None:
        """Retry later (``retry_at``), or give up on a malformed event (``None``)."""
        now = self._clock()

        async def tx(db: aiosqlite.Connection) -> None:
            if retry_at is None:
                await db.execute(
                    "UPDATE webhook_events SET processed_at = ?, error = ?, "
                    "attempts = attempts + 1 WHERE id = ?", (now, error, event_id))
            else:
                await db.execute(
                    "UPDATE webhook_events SET next_attempt_at = ?, error = ?, "
                    "attempts = attempts + 1 WHERE id = ?", (retry_at, error, event_id))

        await self._write(tx)

    # ---- bulk-data files ----

    async def record_bulk_file(self, *, url: str, jid: str | None, table: str, kind: str,
                               compression: str | None, body: str,
                               expires_at: float | None) -> bool:
        now = self._clock()

        async def tx(db: aiosqlite.Connection) -> bool:
            cur = await db.execute(
                "INSERT OR IGNORE INTO bulk_files (url, jid, table_name, kind, compression, "
                "body, announced_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (url, jid, table, kind, compression, body, now,
                 expires_at if expires_at is not None else now + DEFAULT_LIFETIME_SECONDS))
            return cur.rowcount == 1

        return await self._write(tx)

    async def bulk_files_due(self, limit: int = 1) -> list[BulkFile]:
        now = self._clock()
        due = (f"SELECT {BULK_FILE_COLUMNS} FROM bulk_files "
               "WHERE status IN ('pending', 'processing') AND next_attempt_at <= ? "
               "ORDER BY id LIMIT ?")
        if not await self._read(due, (now, 1)):  # asked every few seconds: read only
            return []

        async def tx(db: aiosqlite.Connection) -> list[BulkFile]:
            rows = list(await (await db.execute(due, (now, limit))).fetchall())
            await db.executemany(
                "UPDATE bulk_files SET status = 'processing', claim_owner = ?, "
                "next_attempt_at = ? WHERE id = ?",
                [(self.instance, now + BULK_CLAIM_SECONDS, r["id"]) for r in rows])
            return [bulk_file(r) for r in rows]

        return await self._write(tx)

    async def bulk_file_retry(self, file_id: int, error: str, retry_at: float) -> None:
        async def tx(db: aiosqlite.Connection) -> None:
            await db.execute(
                "UPDATE bulk_files SET status = 'pending', claim_owner = NULL, error = ?, "
                "attempts = attempts + 1, next_attempt_at = ? WHERE id = ? "
                "AND status IN ('pending', 'processing')", (error[:1000], retry_at, file_id))

        await self._write(tx)

    async def bulk_file_finished(self, file_id: int, status: str, *, rows_done: int | None = None,
                                 error: str | None = None) -> None:
        if status not in FINAL_STATUSES:
            raise ValueError(f"{status!r} is not a final bulk file status")
        now = self._clock()

        async def tx(db: aiosqlite.Connection) -> None:
            await db.execute(
                "UPDATE bulk_files SET status = ?, finished_at = ?, claim_owner = NULL, "
                "error = ?, rows_done = COALESCE(?, rows_done), "
                "attempts = attempts + (CASE WHEN ? = 'skipped' THEN 0 ELSE 1 END) "
                "WHERE id = ?",
                (status, now, error[:1000] if error else None, rows_done, status, file_id))

        await self._write(tx)

    async def release_bulk_files(self) -> int:
        """One process per SQLite file: every claim in it was a previous process's."""

        async def tx(db: aiosqlite.Connection) -> int:
            cur = await db.execute(
                "UPDATE bulk_files SET status = 'pending', claim_owner = NULL, "
                "next_attempt_at = 0 WHERE status = 'processing'")
            return cur.rowcount

        return await self._write(tx)

    async def bulk_status(self) -> dict[str, Any]:
        (figures,) = await self._read(BULK_FIGURES)
        newest = await self._read(BULK_NEWEST_EXPIRED)
        last = await self._read(BULK_LAST_FULL_UNSUBSCRIBES)
        return bulk_view(figures, await self._read(BULK_COUNTS), newest[0] if newest else None,
                         last[0] if last else None)

    # ---- worker side ----

    async def release_all_in_flight(self) -> int:
        """At start-up: whatever a previous (crashed) process held is ours to retry (one
        process per SQLite file, so every lease in it was a previous process's)."""

        async def tx(db: aiosqlite.Connection) -> int:
            cur = await db.execute(_RELEASE + "WHERE status = 'in_flight'", {"now": self._clock()})
            return cur.rowcount

        released = await self._write(tx)
        self._epoch += 1
        return released

    async def lease(self, limit: int, lease_seconds: float) -> list[Item]:
        """Take up to ``limit`` ready items, at most one per person, oldest activity first.

        An item is ready when its time has come, nobody else holds an item of the same person,
        no earlier item of that person is still pending, and — for a signature — its petition is
        mirrored in AN or no creator item for it is still to run (the creator link needs the
        creator's AN person). Expired leases of a crashed worker are reclaimed first.

        Each lease is a fresh token. Expiry is wall-clock time, so a clock jump can hand out an
        item whose worker still runs; that worker's token no longer matches, and it learns so
        before its next AN request (:meth:`guard`) and when it tries to record an outcome.
        """
        now = self._clock()

        async def tx(db: aiosqlite.Connection) -> list[Item]:
            reclaimed = await db.execute(
                _RELEASE + "WHERE status = 'in_flight' AND lease_until < :now", {"now": now},
            )
            reclaimed_any.append(bool(reclaimed.rowcount))
            cursor = await db.execute(_LEASE_QUERY, {"now": now, "limit": limit})
            rows = list(await cursor.fetchall())
            tokens = [secrets.token_hex(8) for _ in rows]
            if rows:
                await db.executemany(
                    "UPDATE outbox SET status = 'in_flight', lease_until = ?, lease_token = ?, "
                    "lease_owner = ? WHERE id = ?",
                    [(now + lease_seconds, t, self.instance, r["id"])
                     for r, t in zip(rows, tokens, strict=True)],
                )
            return [
                Item(r["id"], Activity.from_json(json.loads(r["payload"])), r["attempts"],
                     r["enqueued_at"], token, steps_of(r["progress"]))
                for r, token in zip(rows, tokens, strict=True)
            ]

        reclaimed_any: list[bool] = []
        items = await self._write(tx)
        if any(reclaimed_any):  # after the commit, for the reason commit_poll says
            self._epoch += 1
        for item in items:  # what this lease saw: no deletion, the lease fresh
            self._checked[(item.id, item.token)] = self._epoch
        return items

    async def renew_leases(self, leases: Sequence[int | tuple[int, str]], lease_seconds: float
                           ) -> None:
        """Extend leases still worked on: ``(id, token)`` pairs (a bare id renews any holder)."""
        until = self._clock() + lease_seconds
        pairs = [lease if isinstance(lease, tuple) else (lease, None) for lease in leases]

        async def tx(db: aiosqlite.Connection) -> None:
            await db.executemany(
                "UPDATE outbox SET lease_until = ? WHERE id = ? AND status = 'in_flight' "
                "AND (? IS NULL OR lease_token = ?)",
                [(until, i, t, t) for i, t in pairs],
            )

        await self._write(tx)

    async def guard(self, item_id: int, token: str, unsubscribed_at: datetime | None = None
                    ) -> str | None:
        """Why the holder of this lease must not send its next AN request, or None.

        ``"deleted"``: ControlShift deleted the record since (its data must not reach AN);
        ``"lost"``: the lease expired and the item was handed out again, or it finished;
        ``"unsubscribed"``: an org-wide unsubscribe of the person newer than
        ``unsubscribed_at`` (what the plan knew) was committed since: plan again.

        Only this process writes the database (the daemon's single-instance lock), so a lease
        found intact is still intact until a commit of this store could have changed that:
        until then the answer comes from memory, and the common case costs no read.
        """
        key = (item_id, token)
        if self._checked.get(key) == self._epoch:
            return None
        epoch = self._epoch
        rows = await self._read(
            "SELECT o.status, o.lease_token, o.source_deleted_at, p.unsubscribed_at "
            "FROM outbox AS o LEFT JOIN an_people AS p ON p.email = o.person_key "
            "WHERE o.id = ?", (item_id,)
        )
        if not rows or rows[0]["status"] != "in_flight" or rows[0]["lease_token"] != token:
            return "lost"
        if rows[0]["source_deleted_at"]:
            return "deleted"
        latest = parse_time(rows[0]["unsubscribed_at"])
        if latest is not None and (unsubscribed_at is None or latest > unsubscribed_at):
            return "unsubscribed"
        if len(self._checked) > 10_000:  # leases never finished here (lost ones): forget them
            self._checked.clear()
        self._checked[key] = epoch
        return None

    async def record_step(
        self, item_id: int, token: str, steps: Iterable[str], *,
        person: tuple[str, Person] | None = None, opt_in: str | None = None,
    ) -> bool:
        """Persist what AN just acknowledged, before the plan goes on: the steps done (a retry
        continues from there instead of replaying them), what was learnt about the person, and
        the opt-in (source key) if this step sent one. The facts about AN are kept even when
        the lease was lost; the item's steps only while it is held. False if it was lost."""
        now = self._clock()
        progress = json.dumps(sorted(set(steps)))

        async def tx(db: aiosqlite.Connection) -> bool:
            cur = await db.execute(
                "UPDATE outbox SET progress = ? WHERE id = ? AND lease_token = ? "
                "AND status = 'in_flight'", (progress, item_id, token),
            )
            await _save_knowledge(db, person, opt_in, now)
            return cur.rowcount == 1

        return await self._write(tx)

    async def finish(
        self,
        item_id: int,
        status: str,
        *,
        error: str | None = None,
        note: str | None = None,
        next_attempt_at: float | None = None,
        count_attempt: bool = True,
        person: tuple[str, Person] | None = None,
        opt_in_source: str | None = None,
        token: str | None = None,
        steps: Iterable[str] | None = None,
    ) -> bool:
        """Record an item's outcome and what was learned about its person, in one transaction.

        ``status`` is ``done``, ``dead``, ``cancelled`` or ``pending`` (retry at
        ``next_attempt_at``; with ``count_attempt=False`` the item is released without using up
        an attempt). A retry of a record ControlShift deleted meanwhile is cancelled instead.
        With ``token`` the outcome is recorded only while that lease is held; what was learnt
        about AN is kept either way. ``steps``: what AN acknowledged of the item so far (a
        retry continues from there). Returns whether the outcome was recorded.
        """
        now = self._clock()
        held = "(:token IS NULL OR (lease_token = :token AND status = 'in_flight'))"
        if token is not None:
            self._checked.pop((item_id, token), None)

        progress = json.dumps(sorted(set(steps))) if steps is not None else None

        async def tx(db: aiosqlite.Connection) -> bool:
            if status == "pending":
                cur = await db.execute(
                    _RELEASE + ", attempts = attempts + :count, next_attempt_at = :next, "
                    "last_error = COALESCE(:error, last_error), "
                    "progress = COALESCE(:progress, progress) "
                    f"WHERE id = :id AND {held}",
                    {"count": 1 if count_attempt else 0, "next": next_attempt_at or now,
                     "error": error, "id": item_id, "token": token, "now": now,
                     "progress": progress},
                )
            else:
                cur = await db.execute(
                    "UPDATE outbox SET status = :status, lease_until = NULL, lease_token = NULL, "
                    "finished_at = :now, attempts = attempts + 1, "
                    "last_error = COALESCE(:error, last_error), note = :note, "
                    "progress = COALESCE(:progress, progress) "
                    f"WHERE id = :id AND {held}",
                    {"status": status, "now": now, "error": error, "note": note, "id": item_id,
                     "token": token, "progress": progress},
                )
            await _save_knowledge(db, person, opt_in_source, now)
            return cur.rowcount == 1

        return await self._write(tx)

    async def requeue_dead(self, ids: Sequence[int] | None = None) -> Requeued:
        """Put dead items back in the queue (after the operator fixed the cause); never those
        whose record ControlShift deleted since they died, nor malformed ControlShift records
        (they hold no activity; once corrected on ControlShift the next poll syncs them). Both
        are counted as skipped."""
        requeue = ("UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = 0, "
                   "finished_at = NULL WHERE status = 'dead' AND source_deleted_at IS NULL "
                   "AND kind != 'malformed'")
        skipped = ("SELECT COALESCE(SUM(source_deleted_at IS NOT NULL), 0), "
                   "COALESCE(SUM(source_deleted_at IS NULL AND kind = 'malformed'), 0) "
                   "FROM outbox WHERE status = 'dead'")

        async def tx(db: aiosqlite.Connection) -> Requeued:
            if ids is None:
                deleted, malformed = await (await db.execute(skipped)).fetchone()
                cur = await db.execute(requeue)
                return Requeued(cur.rowcount, deleted, skipped_malformed=malformed)
            deleted = malformed = 0
            for i in ids:
                d, m = await (await db.execute(skipped + " AND id = ?", (i,))).fetchone()
                deleted, malformed = deleted + d, malformed + m
            cur = await db.executemany(requeue + " AND id = ?", [(i,) for i in ids])
            return Requeued(cur.rowcount, deleted, skipped_malformed=malformed)

        result = await self._write(tx)
        if result.queued:
            self._notify()
        return result

    async def requeue_since(self, since: str) -> Requeued:
        """Re-sync history: the latest version of every activity that happened since ``since``
        (ISO time) and already finished is queued again under a fresh dedupe key.

        Never one whose record ControlShift deleted; and versions whose personal data was
        pruned (see :meth:`prune`) cannot be replayed. Both are only counted.
        """
        now = self._clock()
        latest = ("FROM outbox WHERE (status IN ('done', 'dead') "
                  f"OR (status = 'cancelled' AND note = '{HISTORY_NOTE}')) "
                  "AND kind != 'malformed' "
                  "AND occurred_at >= :since "
                  "AND id IN (SELECT MAX(id) FROM outbox GROUP BY source_key)")
        params = {"since": since, "pruned": f"{PRUNED}%"}

        async def tx(db: aiosqlite.Connection) -> Requeued:
            deleted = (await (await db.execute(
                f"SELECT COUNT(*) {latest} AND source_deleted_at IS NOT NULL",
                params)).fetchone())[0]
            pruned = (await (await db.execute(
                f"SELECT COUNT(*) {latest} AND source_deleted_at IS NULL "
                "AND person_key LIKE :pruned", params)).fetchone())[0]
            cur = await db.execute(
                "INSERT INTO outbox (dedupe_key, source_key, person_key, petition_id, kind, "
                "payload, occurred_at, enqueued_at, event_slug) "
                "SELECT dedupe_key || '#resync@' || :now, source_key, person_key, petition_id, "
                f"kind, payload, occurred_at, :now, event_slug {latest} "
                "AND source_deleted_at IS NULL "
                "AND person_key NOT LIKE :pruned",
                {"now": now, **params},
            )
            return Requeued(cur.rowcount, deleted, pruned)

        result = await self._write(tx)
        if result.queued:
            self._notify()
        return result

    async def dead_item(self, item_id: int) -> dict[str, Any] | None:
        rows = await self._read(
            "SELECT id, source_key, kind, status, attempts, last_error, payload, enqueued_at, "
            "finished_at FROM outbox WHERE id = ?", (item_id,),
        )
        if not rows:
            return None
        row = dict(rows[0])
        row["activity"] = json.loads(row.pop("payload"))
        row["enqueued_at"] = iso(row["enqueued_at"])
        row["finished_at"] = iso(row["finished_at"])
        return row

    async def drop_dead(self, ids: Sequence[int] | None = None) -> int:
        """The operator gives up on dead items: they become ``cancelled`` (kept for the record)."""
        now = self._clock()

        async def tx(db: aiosqlite.Connection) -> int:
            sql = ("UPDATE outbox SET status = 'cancelled', finished_at = ?, "
                   "note = 'dropped by the operator' WHERE status = 'dead'")
            if ids is None:
                return (await db.execute(sql, (now,))).rowcount
            return (await db.executemany(sql + " AND id = ?", [(now, i) for i in ids])).rowcount

        return await self._write(tx)

    # ---- what csand knows about AN ----

    async def person(self, email: str) -> Person:
        rows = await self._read(
            "SELECT exists_, uuid, subscribed, fields_at, unsubscribed_at, opted_in_at "
            "FROM an_people WHERE email = ?", (email,)
        )
        return _person(rows[0]) if rows else Person()

    async def knowledge(self, email: str, source_key: str) -> tuple[Person, bool]:
        """What a worker needs before planning, in one round trip: the person, and whether this
        record's opt-in already reached AN."""
        rows = await self._read(
            "SELECT p.exists_, p.uuid, p.subscribed, p.fields_at, p.unsubscribed_at, "
            "p.opted_in_at, (SELECT 1 FROM opt_ins WHERE source_key = :source) AS applied "
            "FROM (SELECT 1) LEFT JOIN an_people AS p ON p.email = :email",
            {"email": email, "source": source_key},
        )
        return _person(rows[0]), bool(rows[0]["applied"])

    async def save_person(self, email: str, person: Person) -> None:
        now = self._clock()

        async def tx(db: aiosqlite.Connection) -> None:
            await _save_person(db, email, person, now)

        await self._write(tx)

    async def petition_uuid(self, cs_id: int) -> str | None:
        rows = await self._read("SELECT an_uuid FROM cs_petitions WHERE cs_id = ?", (cs_id,))
        return rows[0]["an_uuid"] if rows else None

    async def set_petition_uuid(self, cs_id: int, slug: str, uuid: str) -> None:
        async def tx(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO cs_petitions (cs_id, slug, an_uuid) VALUES (?, ?, ?) "
                "ON CONFLICT (cs_id) DO UPDATE SET an_uuid = excluded.an_uuid",
                (cs_id, slug, uuid),
            )

        await self._write(tx)
        self._notify()  # signatures waiting for this petition are ready now

    async def clear_petition_uuid(self, cs_id: int, uuid: str | None) -> None:
        """Forget the mirrored petition ``uuid`` (gone from AN); a newer one stays."""
        async def tx(db: aiosqlite.Connection) -> None:
            await db.execute("UPDATE cs_petitions SET an_uuid = NULL WHERE cs_id = ? "
                             "AND an_uuid IS ?", (cs_id, uuid))

        await self._write(tx)

    async def event_state(self, slug: str) -> EventState | None:
        rows = await self._read(
            "SELECT slug, content, calendar_slug, inappropriate, host_extra, an_uuid "
            "FROM cs_events WHERE slug = ?", (slug,))
        return EventState(**dict(rows[0]) | {"inappropriate": bool(rows[0]["inappropriate"])}
                          ) if rows else None

    async def attendees_seen(self, event_slug: str) -> dict[int, AttendeeSeen]:
        rows = await self._read(
            "SELECT cs_id, event_slug, fingerprint, deleted_at, updated_at FROM cs_attendees "
            "WHERE event_slug = ?", (event_slug,))
        return {r["cs_id"]: AttendeeSeen(**dict(r)) for r in rows}

    async def event_uuid(self, slug: str) -> str | None:
        rows = await self._read("SELECT an_uuid FROM cs_events WHERE slug = ?", (slug,))
        return rows[0]["an_uuid"] if rows else None

    async def set_event_uuid(self, slug: str, uuid: str) -> None:
        async def tx(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO cs_events (slug, an_uuid) VALUES (?, ?) "
                "ON CONFLICT (slug) DO UPDATE SET an_uuid = excluded.an_uuid", (slug, uuid))

        await self._write(tx)
        self._notify()  # attendances waiting for this event are ready now

    async def clear_event_uuid(self, slug: str, uuid: str | None) -> None:
        async def tx(db: aiosqlite.Connection) -> None:
            await db.execute("UPDATE cs_events SET an_uuid = NULL WHERE slug = ? "
                             "AND an_uuid IS ?", (slug, uuid))

        await self._write(tx)

    async def calendar_uuid(self, slug: str) -> str | None:
        rows = await self._read("SELECT an_uuid FROM cs_calendars WHERE slug = ?", (slug,))
        return rows[0]["an_uuid"] if rows else None

    async def set_calendar_uuid(self, slug: str, uuid: str) -> None:
        async def tx(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO cs_calendars (slug, an_uuid) VALUES (?, ?) "
                "ON CONFLICT (slug) DO UPDATE SET an_uuid = excluded.an_uuid", (slug, uuid))

        await self._write(tx)

    @asynccontextmanager
    async def mirror_lock(self, cs_id: int | str) -> AsyncIterator[None]:
        yield  # one process per database: the worker's in-process lock is enough

    async def tags(self) -> dict[str, tuple[str, str | None]]:
        rows = await self._read("SELECT name_key, name, uuid FROM an_tags")
        return {r["name_key"]: (r["name"], r["uuid"]) for r in rows}

    async def save_tags(self, tags: Iterable[tuple[str, str | None]]) -> None:
        values = [(name.lower(), name, uuid) for name, uuid in tags]

        async def tx(db: aiosqlite.Connection) -> None:
            await db.executemany(
                "INSERT INTO an_tags (name_key, name, uuid) VALUES (?, ?, ?) "
                "ON CONFLICT (name_key) DO UPDATE SET uuid = COALESCE(excluded.uuid, uuid)",
                values,
            )

        if values:
            await self._write(tx)

    # ---- cluster (one process: it always leads) ----

    async def lead(self, ttl: float) -> int | None:
        now = self._clock()

        async def tx(db: aiosqlite.Connection) -> int | None:
            return await _lead(db, self.instance, now, ttl)

        return await self._write(tx)

    async def resign(self) -> None:
        async def tx(db: aiosqlite.Connection) -> None:
            # Expired, not deleted: terms keep counting up (a deposed term stays fenced off).
            await db.execute("UPDATE cluster_leader SET until = 0 WHERE role = 'poller' "
                             "AND holder = ?", (self.instance,))

        await self._write(tx)

    async def heartbeat(self, info: dict[str, Any]) -> None:
        now = self._clock()

        async def tx(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO cluster_instances (instance, heartbeat_at, info) VALUES (?, ?, ?) "
                "ON CONFLICT (instance) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, "
                "info = excluded.info", (self.instance, now, json.dumps(info, default=str)))
            await db.execute("DELETE FROM cluster_instances WHERE heartbeat_at < ?",
                             (now - FORGET_INSTANCE_SECONDS,))

        await self._write(tx)

    async def forget_instance(self) -> None:
        async def tx(db: aiosqlite.Connection) -> None:
            await db.execute("DELETE FROM cluster_instances WHERE instance = ?", (self.instance,))

        await self._write(tx)

    async def cluster(self) -> dict[str, Any]:
        now = self._clock()
        leader = await self._read("SELECT holder, term, until FROM cluster_leader "
                                  "WHERE role = 'poller'")
        rows = await self._read("SELECT instance, heartbeat_at, info FROM cluster_instances "
                                "ORDER BY instance")
        return cluster_view(now, leader[0] if leader else None, rows)

    async def reserve(self, bucket: str, interval: float, pause: float = 0.0) -> float:
        now = self._clock()

        async def tx(db: aiosqlite.Connection) -> float:
            await db.execute(_RESERVE_INSERT, {"name": bucket, "now": now})
            await db.execute(_RESERVE, {"name": bucket, "now": now, "pause": pause,
                                        "interval": interval})
            slot = (await (await db.execute("SELECT next_at FROM rate_buckets WHERE name = ?",
                                            (bucket,))).fetchone())[0]
            return max(0.0, slot - interval - now)

        return await self._write(tx)

    # ---- retention ----

    async def prune(self, retention_seconds: float, *, batch: int = 1000) -> dict[str, int]:
        """Forget personal data that served its purpose more than ``retention_seconds`` ago.

        * ``done`` and ``cancelled`` items (a dropped dead letter is ``cancelled``) finished
          before then keep what deduplication and the reports need — id, dedupe key, source,
          kind, status, times, note, attempts — and lose the rest: the payload becomes
          ``{"kind", "source_key", "pruned": true}``, the person key ``pruned:<id>`` (only
          pending and in-flight person keys order the queue) and the last error goes.
          Dead, pending and in-flight items keep everything.
        * Webhook events processed before then keep their ``dedupe`` (a redelivery is still
          recognised) and lose their body.

        Candidates are found on the reader connection and changed ``batch`` rows per write
        transaction, so the worker's transactions never wait long behind a prune. Returns the
        number of rows pruned per table.
        """
        cutoff = self._clock() - retention_seconds
        counts = {"outbox": 0, "webhook_events": 0}
        after = 0
        while True:  # id order over the whole table: one pass, whatever the backlog
            rows = await self._read(
                "SELECT id, kind, source_key FROM outbox NOT INDEXED WHERE id > ? "
                "AND status IN ('done', 'cancelled') AND finished_at < ? "
                "AND person_key NOT LIKE ? ORDER BY id LIMIT ?",
                (after, cutoff, f"{PRUNED}%", batch),
            )
            if not rows:
                break
            after = rows[-1]["id"]
            values = [(f"{PRUNED}{r['id']}",
                       json.dumps({"kind": r["kind"], "source_key": r["source_key"],
                                   "pruned": True}, separators=(",", ":")),
                       r["id"], cutoff) for r in rows]

            async def outbox_tx(db: aiosqlite.Connection, values: list[Any] = values) -> int:
                cur = await db.executemany(
                    "UPDATE outbox SET person_key = ?, payload = ?, last_error = NULL "
                    "WHERE id = ? AND status IN ('done', 'cancelled') AND finished_at < ?",
                    values,
                )
                return cur.rowcount

            counts["outbox"] += await self._write(outbox_tx)
        after = 0
        while True:
            rows = await self._read(
                "SELECT id FROM webhook_events NOT INDEXED WHERE id > ? AND processed_at < ? "
                "AND body != '{}' ORDER BY id LIMIT ?", (after, cutoff, batch),
            )
            if not rows:
                break
            after = rows[-1]["id"]
            ids = [(r["id"], cutoff) for r in rows]

            async def events_tx(db: aiosqlite.Connection, ids: list[Any] = ids) -> int:
                cur = await db.executemany(
                    "UPDATE webhook_events SET body = '{}' WHERE id = ? AND processed_at < ?", ids,
                )
                return cur.rowcount

            counts["webhook_events"] += await self._write(events_tx)
        return counts

    # ---- reporting ----

    async def counts(self) -> dict[str, int]:
        rows = await self._read("SELECT status, COUNT(*) AS n FROM outbox GROUP BY status")
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({r["status"]: r["n"] for r in rows})
        return counts

    # ---- audit (csand audit) ----

    async def audit_sample(self, limit: int | None, *, petition_id: int | None = None,
                           kinds: Sequence[str] = AUDIT_KINDS) -> list[dict[str, Any]]:
        """Synced activities to audit, in random order (see :meth:`Outbox.audit_sample`)."""
        where, params = audit_sample_where(petition_id, kinds, ":{}")
        rows = await self._read(
            "SELECT id, source_key, person_key, petition_id, kind, payload, note, finished_at "
            f"FROM outbox WHERE {where} ORDER BY RANDOM()"
            + ("" if limit is None else f" LIMIT {int(limit)}"), params)
        return [dict(r) | {"payload": json.loads(r["payload"])} for r in rows]

    async def person_items(self, email: str) -> list[dict[str, Any]]:
        """The person's outbox items, oldest first (see :meth:`Outbox.person_items`)."""
        rows = await self._read(
            "SELECT id, source_key, kind, status, note, finished_at FROM outbox "
            "WHERE person_key = ? ORDER BY id", (email,))
        return [dict(r) for r in rows]

    async def requeue_items(self, ids: Sequence[int], reason: str = "audit") -> Requeued:
        """Each item's activity queued again under a fresh dedupe key (see
        :meth:`Outbox.requeue_items`)."""
        now = self._clock()

        async def tx(db: aiosqlite.Connection) -> Requeued:
            queued = deleted = pruned = 0
            for item_id in dict.fromkeys(ids):
                row = await (await db.execute(
                    "SELECT source_key, person_key, source_deleted_at, status FROM outbox "
                    "WHERE id = ?", (item_id,))).fetchone()
                if row is None or row["status"] not in ("done", "dead"):
                    continue
                if row["source_deleted_at"] is not None:
                    deleted += 1
                    continue
                if row["person_key"].startswith(PRUNED):
                    pruned += 1
                    continue
                busy = await (await db.execute(
                    "SELECT 1 FROM outbox WHERE source_key = ? AND status IN "
                    "('pending', 'in_flight') LIMIT 1", (row["source_key"],))).fetchone()
                if busy:
                    continue
                cur = await db.execute(
                    "INSERT OR IGNORE INTO outbox (dedupe_key, source_key, person_key, "
                    "petition_id, kind, payload, occurred_at, enqueued_at, event_slug) "
                    "SELECT dedupe_key || '#' || :reason || '@' || :now, source_key, "
                    "person_key, petition_id, kind, payload, occurred_at, :now, event_slug "
                    "FROM outbox WHERE id = :id",
                    {"reason": reason, "now": now, "id": item_id})
                queued += cur.rowcount
            return Requeued(queued, deleted, pruned)

        result = await self._write(tx)
        if result.queued:
            self._notify()
        return result

    async def items(self) -> list[dict[str, Any]]:
        """Every outbox item in id order, read-only (see :meth:`csand.storage.Outbox.items`)."""
        rows = await self._read(
            "SELECT id, dedupe_key, source_key, person_key, petition_id, kind, payload, "
            "occurred_at, status, attempts, next_attempt_at, lease_until, last_error, note, "
            "enqueued_at, finished_at FROM outbox ORDER BY id"
        )
        return [dict(r) | {"payload": json.loads(r["payload"])} for r in rows]

    async def status(self) -> dict[str, Any]:
        """The figures ``csand status`` prints; cheap enough to call every second."""
        now = self._clock()
        counts = await self.counts()
        meta = {r["key"]: r["value"] for r in await self._read("SELECT key, value FROM meta")}
        (row,) = await self._read(STATUS_FIGURES.format(hour=":hour"), {"hour": now - 3600})
        view = status_view(counts, meta, row, await self._read(DEAD_REASONS), now, STATUSES)
        view["bulk"] = await self.bulk_status()
        return view

    async def dead_items(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = await self._read(
            "SELECT id, source_key, kind, attempts, last_error, finished_at FROM outbox "
            "WHERE status = 'dead' ORDER BY id LIMIT ?", (limit,),
        )
        return [dict(r) | {"finished_at": iso(r["finished_at"])} for r in rows]


def _person(r: sqlite3.Row) -> Person:
    """An ``an_people`` row (all NULL when there is none) as :class:`Person`."""
    return Person(
        exists=None if r["exists_"] is None else bool(r["exists_"]),
        uuid=r["uuid"],
        subscribed=None if r["subscribed"] is None else bool(r["subscribed"]),
        fields_at=field_times(r["fields_at"]),
        unsubscribed_at=parse_time(r["unsubscribed_at"]),
        opted_in_at=parse_time(r["opted_in_at"]),
    )


class AlreadyRunning(StoreError):
    """A csand process already holds this database (its lock file)."""


@contextmanager
def single_instance(db_path: Path) -> Iterator[None]:
    """Hold the database's lock file: one process per SQLite database (``csand run``, and
    ``csand store-copy`` while it reads). Two daemons on one file would each think they own
    the in-flight items."""
    if str(db_path) == ":memory:":
        yield
        return
    db_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = db_path.with_name(db_path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(
                f"another csand is already running on {db_path} (lock {lock_path})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def _create_private(path: Path) -> None:
    """Create the database file owner-only (0600), whatever the umask: it holds names, emails and
    postcodes, and SQLite gives its ``-wal`` and ``-shm`` files the database file's mode.

    An existing database keeps the mode it has (the operator may have chosen it); one that others
    can read gets a warning.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("store.readable_by_others", path=str(path), mode=f"{mode:04o}",
                        msg="the database holds personal data; chmod 600 it (and its -wal and "
                        "-shm files) unless other users must read it")


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


# An item handed back (a retry, a shutdown, a crashed process, an expired lease) goes back to
# the queue, unless ControlShift deleted its record meanwhile: then it is cancelled. No pending
# item ever carries a deletion mark, so none can block its person's later items.
_RELEASE = (
    "UPDATE outbox SET lease_until = NULL, lease_token = NULL, "
    "status = CASE WHEN source_deleted_at IS NULL THEN 'pending' ELSE 'cancelled' END, "
    "finished_at = CASE WHEN source_deleted_at IS NULL THEN NULL ELSE :now END, "
    "note = CASE WHEN source_deleted_at IS NULL THEN note "
    "ELSE 'signature deleted on ControlShift while it was being synced' END "
)

# A batch of a bulk-data file committed: the rows done so far, and the claim goes on.
_BULK_PROGRESS = ("UPDATE bulk_files SET rows_done = MAX(rows_done, ?), next_attempt_at = ? "
                  "WHERE id = ? AND status = 'processing'")

_INSERT_OUTBOX = (
    "INSERT OR IGNORE INTO outbox (dedupe_key, source_key, person_key, petition_id, kind, "
    "payload, occurred_at, enqueued_at, event_slug) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# An activity older than sync.history_start: recorded (its dedupe key keeps it from coming
# back), finished at once, never leased; ``requeue_since`` can replay it.
_INSERT_HISTORY = (
    "INSERT OR IGNORE INTO outbox (dedupe_key, source_key, person_key, petition_id, kind, "
    "payload, occurred_at, enqueued_at, event_slug, status, finished_at, note) "
    f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'cancelled', ?, '{HISTORY_NOTE}')"
)
_COUNT_HISTORY = (
    "INSERT INTO meta (key, value) VALUES ('history_skipped', ?1) ON CONFLICT (key) DO UPDATE "
    "SET value = CAST(CAST(value AS INTEGER) + ?1 AS TEXT)"
)

# The poller offers an attendance only when it is new to csand (or attending again after a
# decline), so a cancelled item with its dedupe key was withdrawn while queued: it goes back.
_REVIVE_RSVP = (
    "UPDATE outbox SET status = 'pending', source_deleted_at = NULL, finished_at = NULL, "
    "note = NULL, next_attempt_at = 0 WHERE dedupe_key = ? AND status = 'cancelled' "
    "AND kind = 'attendance'"
)

_CANCEL_FLAGGED = (
    "UPDATE outbox SET status = 'cancelled', finished_at = ?, "
    "note = 'event moderated as inappropriate on ControlShift' "
    "WHERE event_slug = ? AND status = 'pending'"
)

# What was seen of an event: a None member keeps what was recorded; inappropriate sticks.
_UPSERT_EVENT = (
    "INSERT INTO cs_events (slug, content, calendar_slug, inappropriate, host_extra, walked_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (slug) DO UPDATE SET "
    "content = COALESCE(excluded.content, content), "
    "calendar_slug = COALESCE(excluded.calendar_slug, calendar_slug), "
    "inappropriate = MAX(inappropriate, excluded.inappropriate), "
    "host_extra = COALESCE(excluded.host_extra, host_extra), walked_at = excluded.walked_at"
)

# Oldest first (a petition's creator item is enqueued before its signatures). The partial index
# keeps this a walk over pending ids that stops at the LIMIT; every condition below is an index
# lookup per candidate.
_LEASE_QUERY = f"""
SELECT o.id, o.payload, o.attempts, o.enqueued_at, o.progress
FROM outbox AS o INDEXED BY outbox_pending
WHERE o.status = 'pending'
  AND o.next_attempt_at <= :now
  AND o.source_deleted_at IS NULL
{LEASE_RULES}ORDER BY o.id
LIMIT :limit
"""


async def _stale(db: aiosqlite.Connection, table: str,
                 versions: Sequence[SignatureSeen | AttendeeSeen]) -> set[int]:
    """Ids among ``versions`` older than what ``table`` records (or live copies of deleted
    records): a webhook processed meanwhile won."""
    if not versions:
        return set()
    by_id = {v.cs_id: v for v in versions}
    ids = list(by_id)
    stale: set[int] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        cursor = await db.execute(
            f"SELECT cs_id, deleted_at, updated_at FROM {table} "
            f"WHERE cs_id IN ({','.join('?' * len(chunk))})", chunk)
        stale |= stale_versions(await cursor.fetchall(), by_id)
    return stale


async def _save_knowledge(
    db: aiosqlite.Connection, person: tuple[str, Person] | None, opt_in: str | None, now: float
) -> None:
    if person is not None:
        await _save_person(db, person[0], person[1], now)
    if opt_in is not None:
        await db.execute(
            "INSERT OR IGNORE INTO opt_ins (source_key, applied_at) VALUES (?, ?)", (opt_in, now)
        )


_INSERT_DEAD_LETTER = (
    "INSERT OR IGNORE INTO outbox (dedupe_key, source_key, person_key, petition_id, kind, "
    "payload, occurred_at, status, last_error, note, enqueued_at, finished_at) "
    "VALUES (?, ?, ?, ?, 'malformed', ?, ?, 'dead', ?, ?, ?, ?)"
)


async def _save_person(db: aiosqlite.Connection, email: str, p: Person, now: float) -> None:
    # The consent timeline only moves forward: a writer holding an older view (a worker whose
    # lease was lost) must not take back a newer opt-in or unsubscribe. Times are UTC ISO
    # strings of one format, so they compare as text.
    await db.execute(
        "INSERT INTO an_people "
        "(email, exists_, uuid, subscribed, fields_at, unsubscribed_at, opted_in_at, learned_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (email) DO UPDATE SET "
        "exists_ = excluded.exists_, uuid = excluded.uuid, subscribed = excluded.subscribed, "
        "fields_at = excluded.fields_at, "
        "unsubscribed_at = CASE WHEN unsubscribed_at IS NULL "
        "OR excluded.unsubscribed_at > unsubscribed_at THEN excluded.unsubscribed_at "
        "ELSE unsubscribed_at END, "
        "opted_in_at = CASE WHEN opted_in_at IS NULL "
        "OR excluded.opted_in_at > opted_in_at THEN excluded.opted_in_at ELSE opted_in_at END, "
        "learned_at = excluded.learned_at",
        (
            email,
            None if p.exists is None else int(p.exists),
            p.uuid,
            None if p.subscribed is None else int(p.subscribed),
            json.dumps({k: v.isoformat() for k, v in p.fields_at.items()}) if p.fields_at else None,
            p.unsubscribed_at.isoformat() if p.unsubscribed_at else None,
            p.opted_in_at.isoformat() if p.opted_in_at else None,
            now,
        ),
    )


async def _lead(db: aiosqlite.Connection, instance: str, now: float, ttl: float) -> int | None:
    row = await (await db.execute(
        "SELECT holder, term, until FROM cluster_leader WHERE role = 'poller'")).fetchone()
    if row is None:
        await db.execute("INSERT INTO cluster_leader (role, holder, term, until) "
                         "VALUES ('poller', ?, 1, ?)", (instance, now + ttl))
        return 1
    holder, term, until = row
    if holder == instance and until >= now:
        await db.execute("UPDATE cluster_leader SET until = ? WHERE role = 'poller'",
                         (now + ttl,))
        return int(term)
    # Another holder is a previous process on this file (one process per SQLite database, by the
    # lock file), whatever its lease says: take over at once, in a new term.
    await db.execute("UPDATE cluster_leader SET holder = ?, term = term + 1, until = ? "
                     "WHERE role = 'poller'", (instance, now + ttl))
    return int(term) + 1


async def _check_fence(db: aiosqlite.Connection, fence: tuple[str, int], now: float) -> None:
    row = await (await db.execute(
        "SELECT holder, term, until FROM cluster_leader WHERE role = 'poller'")).fetchone()
    if row is None or (row[0], row[1]) != fence or row[2] < now:
        raise NotLeader(f"instance {fence[0]} no longer leads (term {fence[1]})")


# A slot starts no earlier than now, the pause, and one interval after the previous slot.
_RESERVE_INSERT = ("INSERT INTO rate_buckets (name, next_at) VALUES (:name, :now) "
                   "ON CONFLICT (name) DO NOTHING")
_RESERVE = (
    "UPDATE rate_buckets SET "
    "paused_until = MAX(paused_until, :now + :pause), "
    "next_at = MAX(next_at, :now, MAX(paused_until, :now + :pause)) + :interval "
    "WHERE name = :name"
)


async def _bulk_changes(db: aiosqlite.Connection, bulk: BulkChanges, now: float) -> None:
    if bulk.records:
        await db.executemany(
            "INSERT INTO bulk_records (table_name, id, ref, body, generation) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (table_name, id) DO UPDATE SET "
            "ref = excluded.ref, body = excluded.body, "
            "generation = MAX(COALESCE(excluded.generation, 0), "
            "COALESCE(bulk_records.generation, 0))",
            [(*r, bulk.generation) for r in bulk.records])
    if bulk.seen_signatures and bulk.generation is not None:
        for chunk in chunks(list(bulk.seen_signatures)):
            await db.execute(
                f"UPDATE cs_signatures SET bulk_generation = ? "
                f"WHERE cs_id IN ({', '.join('?' * len(chunk))})", (bulk.generation, *chunk))
    if bulk.park:
        await db.executemany(
            "INSERT INTO bulk_parked (kind, id, petition_id, body, parked_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (kind, id) DO UPDATE SET "
            "petition_id = excluded.petition_id, body = excluded.body",
            [(*p, now) for p in bulk.park])
    if bulk.unpark:
        await db.executemany("DELETE FROM bulk_parked WHERE kind = ? AND id = ?", bulk.unpark)


__all__ = ["MIGRATIONS", "AlreadyRunning", "SQLiteStore", "single_instance"]
