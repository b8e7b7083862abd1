"""The PostgreSQL backend of :mod:`csand.storage`: schema, migrations and every query, in one place.

Any number of csand instances, on several machines, share one database. What SQLite got from
having a single writer, this backend gets from the database:

* **Leases** take rows with ``FOR UPDATE SKIP LOCKED``: two instances leasing at once never wait
  for each other and never take the same item. The per-person rules hold across instances
  because an item is only ready while no other item of its person is pending before it or in
  flight, and a row another instance is leasing is still pending in everyone's view until that
  lease commits.
* **What was seen and what it produced** commit under one transaction-level advisory lock
  (:data:`COMMIT_LOCK`), so a poll and a webhook about the same signature, on two instances,
  still decide "newer version wins" one after the other, as they do on SQLite.
* **The guard** before each Action Network request reads the database every time: another
  instance may have committed a deletion or an unsubscribe a millisecond ago.
* **Migrations** run in one transaction under an advisory lock (:data:`MIGRATE_LOCK`): instances
  starting together migrate once; a database newer than this code is refused.
* **Leadership and request slots** use the database server's clock (unless a clock is injected,
  as tests do), so instances whose machine clocks disagree still agree on who leads.

psycopg 3 with its connection pool: see the README's design notes for why.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

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
    redact_url,
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
    reason_of,
    record_number,
    signature_id,
    split_history,
    stale_versions,
    status_view,
    steps_of,
    unsubscribe_keys,
)

log = get_logger("store")

# Advisory lock keys (any two 32-bit numbers unique to csand within the database).
MIGRATE_LOCK = (0x6373616E, 1)  # "csan": migrations
COMMIT_LOCK = (0x6373616E, 2)  # commits of what ControlShift showed
# An instance heartbeats every 5 s: one silent this long is dead (or cut off from the database,
# so it cannot send anything either), and its leases go back to the queue.
SILENT_INSTANCE_SECONDS = 30.0
MIRROR_LOCK = 0x63736D70  # "csmp", with the CS petition id: creating its AN twin

# Each entry migrates from version i to i+1. Append only; never edit a released one.
# Version 1 is the schema SQLite reached in its version 6, in PostgreSQL's types.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE csand_schema (
        version integer NOT NULL
    );
    INSERT INTO csand_schema (version) VALUES (0);

    CREATE TABLE meta (
        key   text PRIMARY KEY,
        value text
    );

    CREATE TABLE outbox (
        id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        dedupe_key        text NOT NULL UNIQUE,    -- source record + version fingerprint
        source_key        text NOT NULL,           -- the CS record ("signature:42")
        person_key        text NOT NULL,           -- normalised email: one in flight per person
        petition_id       bigint,                  -- CS petition id, for ordering behind its creator
        kind              text NOT NULL,
        payload           text NOT NULL,           -- Activity as JSON
        occurred_at       text COLLATE "C" NOT NULL, -- CS time: per-person apply order
        status            text NOT NULL DEFAULT 'pending'
                          CHECK (status IN ('pending', 'in_flight', 'done', 'dead', 'cancelled')),
        attempts          integer NOT NULL DEFAULT 0,
        next_attempt_at   double precision NOT NULL DEFAULT 0,
        lease_until       double precision,
        lease_token       text,
        lease_owner       text,                    -- the instance holding the lease
        progress          text,                    -- JSON: steps AN acknowledged
        source_deleted_at text,
        last_error        text,
        note              text,
        enqueued_at       double precision NOT NULL,
        finished_at       double precision
    );
    CREATE INDEX outbox_pending  ON outbox (id) WHERE status = 'pending';
    CREATE INDEX outbox_flight   ON outbox (lease_until) WHERE status = 'in_flight';
    CREATE INDEX outbox_person   ON outbox (person_key, status, occurred_at, id);
    CREATE INDEX outbox_source   ON outbox (source_key, status);
    CREATE INDEX outbox_petition ON outbox (petition_id, kind, status);
    CREATE INDEX outbox_finished ON outbox (finished_at) WHERE status IN ('done', 'cancelled');

    CREATE TABLE cs_petitions (
        cs_id         bigint PRIMARY KEY,
        slug          text NOT NULL,
        updated_at    text,                        -- CS change signals seen at the last walk
        public_count  integer,
        content       text,                        -- fingerprint of title/categories/creator
        total_pages   integer,
        walked_at     double precision,
        an_uuid       text,                        -- the mirrored AN petition, once created
        creator_extra text                         -- JSON: creator details only webhooks carry
    );

    CREATE TABLE cs_signatures (
        cs_id        bigint PRIMARY KEY,
        petition_id  bigint NOT NULL,
        fingerprint  text NOT NULL,
        deleted_at   text,
        updated_at   text
    );
    CREATE INDEX cs_signatures_petition ON cs_signatures (petition_id);

    CREATE TABLE an_people (                       -- what AN's own answers told csand
        email           text PRIMARY KEY,
        exists_         boolean,
        uuid            text,
        subscribed      boolean,
        fields_at       text,                      -- JSON: field name → CS time that set it
        unsubscribed_at text COLLATE "C",          -- consent timeline, UTC ISO (compare as text)
        opted_in_at     text COLLATE "C",
        learned_at      double precision NOT NULL
    );

    CREATE TABLE an_tags (
        name_key text PRIMARY KEY,                 -- lower-cased: AN tag names are case-insensitive
        name     text NOT NULL,
        uuid     text
    );

    CREATE TABLE opt_ins (
        source_key text PRIMARY KEY,
        applied_at double precision NOT NULL
    );

    CREATE TABLE webhook_events (
        id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        dedupe          text NOT NULL UNIQUE,      -- CS's jid, or a hash of the body
        type            text NOT NULL,
        body            text NOT NULL,
        received_at     double precision NOT NULL,
        processed_at    double precision,
        attempts        integer NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL DEFAULT 0,
        error           text
    );
    CREATE INDEX webhook_events_todo ON webhook_events (next_attempt_at, id)
        WHERE processed_at IS NULL;

    CREATE TABLE cluster_leader (
        role   text PRIMARY KEY,                   -- 'poller'
        holder text NOT NULL,
        term   bigint NOT NULL,
        until  double precision NOT NULL
    );
    CREATE TABLE cluster_instances (
        instance     text PRIMARY KEY,
        heartbeat_at double precision NOT NULL,
        info         text NOT NULL                 -- JSON: what csand status shows
    );
    CREATE TABLE rate_buckets (
        name         text PRIMARY KEY,
        next_at      double precision NOT NULL,    -- earliest start of the next slot
        paused_until double precision NOT NULL DEFAULT 0
    );
    """,
    # v2: events (SQLite's v7): what csand saw of each CS event and its attendees, the AN events
    # and event campaigns mirroring them, and which event an outbox item belongs to.
    """
    CREATE TABLE cs_events (
        slug          text PRIMARY KEY,
        content       text,
        calendar_slug text,
        inappropriate boolean NOT NULL DEFAULT false,
        host_extra    text,
        an_uuid       text,
        walked_at     double precision
    );
    CREATE TABLE cs_calendars (
        slug    text PRIMARY KEY,
        an_uuid text
    );
    CREATE TABLE cs_attendees (
        cs_id       bigint PRIMARY KEY,
        event_slug  text NOT NULL,
        fingerprint text NOT NULL,
        deleted_at  text,
        updated_at  text
    );
    CREATE INDEX cs_attendees_event ON cs_attendees (event_slug);
    ALTER TABLE outbox ADD COLUMN event_slug text;
    CREATE INDEX outbox_event ON outbox (event_slug, kind, status);
    """,
    # v3: bulk data (SQLite's v8): every file a verified data.*_table_exported webhook
    # announced, its processing state (claimed by one instance through next_attempt_at) and
    # how many of its rows are done.
    """
    CREATE TABLE bulk_files (
        id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        url             text NOT NULL UNIQUE,
        jid             text UNIQUE,
        table_name      text NOT NULL,
        kind            text NOT NULL,
        compression     text,
        body            text NOT NULL,
        announced_at    double precision NOT NULL,
        expires_at      double precision NOT NULL,
        status          text NOT NULL DEFAULT 'pending',
        attempts        integer NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL DEFAULT 0,
        claim_owner     text,
        rows_done       bigint NOT NULL DEFAULT 0,
        error           text,
        finished_at     double precision
    );
    CREATE INDEX bulk_files_todo ON bulk_files (next_attempt_at, id)
        WHERE status IN ('pending', 'processing');
    CREATE INDEX bulk_files_table ON bulk_files (table_name, kind, status, finished_at);
    """,
    # v4: bulk data as a source (SQLite's v9): the rows signatures are joined with, what waits
    # for its petition, and which full file last held each signature.
    """
    CREATE TABLE bulk_records (
        table_name  text NOT NULL,
        id          bigint NOT NULL,
        ref         bigint,
        body        text NOT NULL,
        generation  bigint,
        PRIMARY KEY (table_name, id)
    );
    CREATE INDEX bulk_records_ref ON bulk_records (table_name, ref);
    CREATE TABLE bulk_parked (
        kind        text NOT NULL,
        id          bigint NOT NULL,
        petition_id bigint NOT NULL,
        body        text,
        parked_at   double precision NOT NULL,
        PRIMARY KEY (kind, id)
    );
    ALTER TABLE cs_signatures ADD COLUMN bulk_generation bigint;
    """,
]

# The cluster's clock: an injected one (tests), else the database server's (one value for the
# whole statement). CS times are ISO 8601 text of one format compared as text, hence the C
# collation on those columns: a locale's collation may order punctuation differently.
_NOW = "COALESCE(%(now)s::double precision, extract(epoch FROM statement_timestamp()))"


def _NOW_AS(param: str) -> str:  # noqa: N802 - _NOW with another parameter name
    return _NOW.replace("%(now)s", f"%({param})s")


class PostgresStore:
    """One instance's view of the shared database. Open with ``await PostgresStore.open(url)``
    (or :func:`csand.storage.open_store`); close with ``await store.close()``."""

    shared = True

    def __init__(self, pool: AsyncConnectionPool, clock: Callable[[], float] | None,
                 instance: str) -> None:
        self._pool = pool
        self._injected = clock
        self._clock = clock or time.time
        self.instance = instance
        self.listeners: list[Callable[[], None]] = []  # called when work becomes ready
        self.history_start: datetime | None = None  # see Outbox.history_start

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()

    def _cluster_now(self) -> float | None:
        return self._injected() if self._injected is not None else None

    # ---- lifecycle ----

    @classmethod
    async def open(cls, url: str, clock: Callable[[], float] | None = None, *,
                   instance: str = "csand", pool_size: int = 10) -> PostgresStore:
        # One plain connection first: the pool retries for its whole timeout and then reports
        # only "pool initialization incomplete", where an operator needs libpq's reason at once.
        try:
            probe = await AsyncConnection.connect(url, connect_timeout=10)
        except Exception as exc:  # noqa: BLE001 - phrased for the operator
            raise StoreError(f"cannot connect to PostgreSQL at {redact_url(url)}: "
                             f"{reason_of(exc)}") from None
        await probe.close()
        pool = AsyncConnectionPool(
            url, min_size=min(2, pool_size), max_size=pool_size, open=False,
            kwargs={"autocommit": True, "row_factory": dict_row,
                    "application_name": f"csand {instance}"[:63]},
            name="csand", timeout=30.0,
        )
        try:
            await pool.open(wait=True, timeout=30.0)
        except Exception as exc:  # noqa: BLE001 - phrased for the operator
            await pool.close()
            raise StoreError(f"cannot connect to PostgreSQL at {redact_url(url)}: "
                             f"{reason_of(exc)}") from None
        store = cls(pool, clock, instance)
        try:
            await store._migrate()
        except BaseException:
            await pool.close()
            raise
        return store

    async def close(self) -> None:
        await self._pool.close()

    async def _migrate(self) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", MIGRATE_LOCK)
            exists = await (await conn.execute(
                "SELECT to_regclass('csand_schema') IS NOT NULL AS e")).fetchone()
            version = 0
            if exists["e"]:
                version = (await (await conn.execute(
                    "SELECT version FROM csand_schema")).fetchone())["version"]
            if version > len(MIGRATIONS):
                raise SchemaTooNew(
                    f"the database is at schema version {version}, newer than this csand knows "
                    f"({len(MIGRATIONS)}): a newer csand migrated it; run that version on every "
                    "instance, or restore a backup taken before the upgrade")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                await conn.execute(script)
                await conn.execute("UPDATE csand_schema SET version = %s", (number,))
                log.info("store.migrated", backend="postgresql", version=number)

    async def schema_version(self) -> int:
        return (await self._one("SELECT version FROM csand_schema"))["version"]

    # ---- connections ----

    async def _rows(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            return await (await conn.execute(sql, params)).fetchall()

    async def _one(self, sql: str, params: Any = None) -> dict[str, Any]:
        rows = await self._rows(sql, params)
        return rows[0]

    async def _write(self, fn: Callable[[AsyncConnection[Any]], Any]) -> Any:
        """Run ``fn`` in one transaction on a pooled connection."""
        async with self._pool.connection() as conn, conn.transaction():
            return await fn(conn)

    # ---- meta ----

    async def get_meta(self, key: str) -> str | None:
        rows = await self._rows("SELECT value FROM meta WHERE key = %s", (key,))
        return rows[0]["value"] if rows else None

    async def set_meta(self, **values: str | float | None) -> None:
        async def tx(db: AsyncConnection[Any]) -> None:
            async with db.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO meta (key, value) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    [(k, None if v is None else str(v)) for k, v in sorted(values.items())],
                )

        await self._write(tx)

    # ---- poller side ----

    async def petition_state(self, cs_id: int) -> PetitionState | None:
        rows = await self._rows(
            "SELECT cs_id, slug, updated_at, public_count, content, total_pages, an_uuid, "
            "creator_extra FROM cs_petitions WHERE cs_id = %s", (cs_id,),
        )
        return PetitionState(**rows[0]) if rows else None

    async def signatures_seen(self, petition_id: int) -> dict[int, SignatureSeen]:
        rows = await self._rows(
            "SELECT cs_id, petition_id, fingerprint, deleted_at, updated_at FROM cs_signatures "
            "WHERE petition_id = %s", (petition_id,),
        )
        return {r["cs_id"]: SignatureSeen(**r) for r in rows}

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
        """Record what was seen and enqueue what it produced, atomically (see
        :meth:`csand.storage.Outbox.commit_poll`). Commits of every instance take
        :data:`COMMIT_LOCK` in turn, so "the newer version wins" is decided one at a time."""
        now = self._clock()
        activities = list(activities)
        signatures = list(signatures)
        attendees = list(attendees)
        deleted = list(deleted_sources)
        dead = [dead_letter_row(d, now) for d in dead_letters]

        async def tx(db: AsyncConnection[Any]) -> int:
            await db.execute("SELECT pg_advisory_xact_lock(%s, %s)", COMMIT_LOCK)
            if fence is not None:
                await _check_fence(db, fence, self._cluster_now())
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
            if unsubscribing:  # under COMMIT_LOCK: no other commit adds one meanwhile
                found = await (await db.execute(
                    UNSUBSCRIBES_KNOWN.format(marks="SELECT unnest(%s::text[])"),
                    (unsubscribing,))).fetchall()
                known = {r["source_key"] for r in found}
                rows = first_unsubscribes(rows, known)
            async with db.cursor() as cur:
                if event is not None:
                    await cur.execute(_UPSERT_EVENT, (
                        event.slug, event.content, event.calendar_slug, event.inappropriate,
                        event.host_extra, now))
                    if event.inappropriate:  # what is still queued of it never reaches AN
                        await cur.execute(
                            "UPDATE outbox SET status = 'cancelled', finished_at = %s, "
                            "note = 'event moderated as inappropriate on ControlShift' "
                            "WHERE event_slug = %s AND status = 'pending'", (now, event.slug))
                if atts:
                    await cur.executemany(
                        "INSERT INTO cs_attendees "
                        "(cs_id, event_slug, fingerprint, deleted_at, updated_at) "
                        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (cs_id) DO UPDATE SET "
                        "fingerprint = excluded.fingerprint, deleted_at = excluded.deleted_at, "
                        "updated_at = excluded.updated_at", atts)
                if petition is not None:
                    await cur.execute(
                        "INSERT INTO cs_petitions "
                        "(cs_id, slug, updated_at, public_count, content, total_pages, "
                        "walked_at) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT (cs_id) DO UPDATE SET "
                        "slug = excluded.slug, updated_at = excluded.updated_at, "
                        "public_count = excluded.public_count, content = excluded.content, "
                        "total_pages = excluded.total_pages, walked_at = excluded.walked_at",
                        (petition.cs_id, petition.slug, petition.updated_at,
                         petition.public_count, petition.content, petition.total_pages, now),
                    )
                if sigs:
                    await cur.executemany(
                        "INSERT INTO cs_signatures "
                        "(cs_id, petition_id, fingerprint, deleted_at, updated_at) "
                        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (cs_id) DO UPDATE SET "
                        "fingerprint = excluded.fingerprint, deleted_at = excluded.deleted_at, "
                        "updated_at = excluded.updated_at",
                        sigs,
                    )
                added = 0
                if rows:
                    await cur.executemany(_INSERT_OUTBOX, rows)
                    added = max(cur.rowcount, 0)
                    # An RSVP given again after it was withdrawn while queued (see SQLite).
                    rsvps = [r[0] for r in rows if r[4] == str(ActivityKind.ATTENDANCE)]
                    if rsvps:
                        await cur.execute(_REVIVE_RSVP, (rsvps,))
                        added += max(cur.rowcount, 0)
                if history:
                    await cur.executemany(_INSERT_HISTORY, [(*r, now) for r in history])
                    if cur.rowcount > 0:
                        await cur.execute(_COUNT_HISTORY, {"n": cur.rowcount})
                if dead:
                    await cur.executemany(_INSERT_DEAD_LETTER, dead)
                if deleted:
                    # Every item of the record learns it, whatever its state (see SQLite).
                    # Rows locked in id order, as renew_leases does: two transactions
                    # updating the same in-flight rows never wait for each other in a circle.
                    await cur.execute(
                        "UPDATE outbox SET source_deleted_at = COALESCE(source_deleted_at, %s) "
                        "WHERE id IN (SELECT id FROM outbox WHERE source_key = ANY(%s) "
                        "ORDER BY id FOR UPDATE)", (iso(now), deleted))
                    await cur.execute(
                        "UPDATE outbox SET status = 'cancelled', finished_at = %s, "
                        "note = CASE WHEN source_key LIKE 'attendee:%%' "
                        "THEN 'RSVP withdrawn or deleted on ControlShift before it was synced' "
                        "ELSE 'signature deleted on ControlShift before it was synced' END "
                        "WHERE source_key = ANY(%s) AND status = 'pending'", (now, deleted))
                unsubscribes = [(a.email, a.occurred_at.isoformat(), now) for a in activities
                                if a.kind is ActivityKind.GLOBAL_UNSUBSCRIBE and a.email
                                and a.occurred_at is not None and a.source_key not in known]
                if unsubscribes:
                    # The consent timeline learns of an org-wide unsubscribe when csand does,
                    # not when its item runs (see SQLite).
                    await cur.executemany(
                        "INSERT INTO an_people (email, unsubscribed_at, learned_at) "
                        "VALUES (%s, %s, %s) ON CONFLICT (email) DO UPDATE SET unsubscribed_at = "
                        "GREATEST(an_people.unsubscribed_at, excluded.unsubscribed_at)",
                        unsubscribes)
                if creator_extra is not None:
                    await cur.execute(
                        "INSERT INTO cs_petitions (cs_id, slug, creator_extra) "
                        "VALUES (%s, %s, %s) ON CONFLICT (cs_id) DO UPDATE SET "
                        "creator_extra = excluded.creator_extra", creator_extra)
                if event_id is not None:
                    await cur.execute(
                        "UPDATE webhook_events SET processed_at = %s, error = NULL "
                        "WHERE id = %s", (now, event_id))
                if bulk_progress is not None:
                    await cur.execute(
                        "UPDATE bulk_files SET rows_done = GREATEST(rows_done, %s), "
                        "next_attempt_at = %s WHERE id = %s AND status = 'processing'",
                        (bulk_progress[1], now + BULK_CLAIM_SECONDS, bulk_progress[0]))
                if bulk is not None:
                    await _bulk_changes(cur, bulk, now)
            return added

        added = await self._write(tx)
        if added:
            self._notify()
        return added

    async def enqueue(self, activities: Iterable[Activity]) -> int:
        return await self.commit_poll(None, (), activities)

    async def signature_seen(self, cs_id: int) -> SignatureSeen | None:
        rows = await self._rows(
            "SELECT cs_id, petition_id, fingerprint, deleted_at, updated_at FROM cs_signatures "
            "WHERE cs_id = %s", (cs_id,),
        )
        return SignatureSeen(**rows[0]) if rows else None

    async def signatures_seen_many(self, ids: Sequence[int]) -> dict[int, SignatureSeen]:
        rows = await self._rows(
            "SELECT cs_id, petition_id, fingerprint, deleted_at, updated_at FROM cs_signatures "
            "WHERE cs_id = ANY(%s)", (list(ids),))
        return {r["cs_id"]: SignatureSeen(**r) for r in rows}

    # ---- bulk data as a source ----

    async def bulk_records(self, table: str, ids: Sequence[int]) -> dict[int, str]:
        rows = await self._rows(
            "SELECT id, body FROM bulk_records WHERE table_name = %s AND id = ANY(%s)",
            (table, list(ids)))
        return {r["id"]: r["body"] for r in rows}

    async def bulk_records_by_ref(self, table: str, refs: Sequence[int]) -> dict[int, list[str]]:
        rows = await self._rows(
            "SELECT ref, body FROM bulk_records WHERE table_name = %s AND ref = ANY(%s) "
            "ORDER BY id", (table, list(refs)))
        out: dict[int, list[str]] = {}
        for r in rows:
            out.setdefault(r["ref"], []).append(r["body"])
        return out

    async def bulk_forget(self, table: str, generation: int) -> int:
        return await self._rows_none(
            "DELETE FROM bulk_records WHERE table_name = %s "
            "AND (generation IS NULL OR generation < %s)", (table, generation))

    async def bulk_parked(self, after: tuple[str, int] = ("", 0), limit: int = 500
                          ) -> list[Parked]:
        rows = await self._rows(
            "SELECT kind, id, petition_id, body FROM bulk_parked "
            "WHERE (kind COLLATE \"C\", id) > (%s COLLATE \"C\", %s) "
            "ORDER BY kind COLLATE \"C\", id LIMIT %s", (*after, limit))
        return [Parked(**r) for r in rows]

    async def bulk_waiting(self, kind: str, ids: Sequence[int]) -> set[int]:
        rows = await self._rows(
            "SELECT id FROM bulk_parked WHERE kind = %s AND id = ANY(%s)", (kind, list(ids)))
        return {r["id"] for r in rows}

    async def bulk_vanished(self, generation: int, before: str, after: int = 0,
                            limit: int = 1000) -> list[SignatureSeen]:
        rows = await self._rows(
            "SELECT cs_id, petition_id, fingerprint, deleted_at, updated_at FROM cs_signatures "
            "WHERE cs_id > %s AND deleted_at IS NULL AND updated_at COLLATE \"C\" < %s "
            "AND (bulk_generation IS NULL OR bulk_generation < %s) ORDER BY cs_id LIMIT %s",
            (after, before, generation, limit))
        return [SignatureSeen(**r) for r in rows]

    async def pending_signature_emails(self, petition_id: int) -> dict[str, str | None]:
        rows = await self._rows(
            "SELECT source_key, payload FROM outbox WHERE petition_id = %s "
            "AND kind = 'signature' AND status = 'pending'", (petition_id,),
        )
        result: dict[str, str | None] = {}
        for r in rows:
            payload = json.loads(r["payload"])
            result[r["source_key"]] = (
                (payload.get("raw_email") or payload.get("email") or "").strip() or None)
        return result

    # ---- webhook inbox ----

    async def receive_event(self, dedupe: str, type_: str, body: str) -> bool:
        rows = await self._rows(
            "INSERT INTO webhook_events (dedupe, type, body, received_at) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (dedupe) DO NOTHING RETURNING id",
            (dedupe, type_, body, self._clock()),
        )
        return bool(rows)

    async def events_due(self, limit: int = 50) -> list[WebhookEvent]:
        now = self._clock()
        rows = await self._rows(
            "UPDATE webhook_events SET next_attempt_at = %(claim)s WHERE id IN ("
            "  SELECT id FROM webhook_events WHERE processed_at IS NULL "
            "  AND next_attempt_at <= %(now)s ORDER BY id LIMIT %(limit)s "
            "  FOR UPDATE SKIP LOCKED) "
            "RETURNING id, type, body, attempts",
            {"now": now, "claim": now + EVENT_CLAIM_SECONDS, "limit": limit},
        )
        return sorted((WebhookEvent(**r) for r in rows), key=lambda e: e.id)

    async def event_failed(self, event_id: int, error: str, retry_at: float | None) -> None:
        now = self._clock()
        if retry_at is None:
            sql = ("UPDATE webhook_events SET processed_at = %s, error = %s, "
                   "attempts = attempts + 1 WHERE id = %s")
            params: tuple[Any, ...] = (now, error, event_id)
        else:
            sql = ("UPDATE webhook_events SET next_attempt_at = %s, error = %s, "
                   "attempts = attempts + 1 WHERE id = %s")
            params = (retry_at, error, event_id)
        await self._rows_none(sql, params)

    async def _rows_none(self, sql: str, params: Any = None) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql, params)
            return max(cur.rowcount, 0)

    # ---- bulk-data files ----

    async def record_bulk_file(self, *, url: str, jid: str | None, table: str, kind: str,
                               compression: str | None, body: str,
                               expires_at: float | None) -> bool:
        now = self._clock()
        rows = await self._rows(
            "INSERT INTO bulk_files (url, jid, table_name, kind, compression, body, "
            "announced_at, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING RETURNING id",
            (url, jid, table, kind, compression, body, now,
             expires_at if expires_at is not None else now + DEFAULT_LIFETIME_SECONDS))
        return bool(rows)

    async def bulk_files_due(self, limit: int = 1) -> list[BulkFile]:
        """SKIP LOCKED: two instances claiming at once take different files."""
        now = self._clock()
        rows = await self._rows(
            "UPDATE bulk_files SET status = 'processing', claim_owner = %(owner)s, "
            "next_attempt_at = %(claim)s WHERE id IN ("
            "  SELECT id FROM bulk_files WHERE status IN ('pending', 'processing') "
            "  AND next_attempt_at <= %(now)s ORDER BY id LIMIT %(limit)s "
            "  FOR UPDATE SKIP LOCKED) "
            f"RETURNING {BULK_FILE_COLUMNS}",
            {"now": now, "claim": now + BULK_CLAIM_SECONDS, "limit": limit,
             "owner": self.instance})
        return sorted((bulk_file(r) for r in rows), key=lambda f: f.id)

    async def bulk_file_retry(self, file_id: int, error: str, retry_at: float) -> None:
        await self._rows_none(
            "UPDATE bulk_files SET status = 'pending', claim_owner = NULL, error = %s, "
            "attempts = attempts + 1, next_attempt_at = %s WHERE id = %s "
            "AND status IN ('pending', 'processing')", (error[:1000], retry_at, file_id))

    async def bulk_file_finished(self, file_id: int, status: str, *, rows_done: int | None = None,
                                 error: str | None = None) -> None:
        if status not in FINAL_STATUSES:
            raise ValueError(f"{status!r} is not a final bulk file status")
        await self._rows_none(
            "UPDATE bulk_files SET status = %(status)s, finished_at = %(now)s, "
            "claim_owner = NULL, error = %(error)s, "
            "rows_done = COALESCE(%(rows)s, rows_done), "
            "attempts = attempts + (CASE WHEN %(status)s = 'skipped' THEN 0 ELSE 1 END) "
            "WHERE id = %(id)s",
            {"status": status, "now": self._clock(), "error": error[:1000] if error else None,
             "rows": rows_done, "id": file_id})

    async def release_bulk_files(self) -> int:
        """The files this instance was processing before it restarted; other instances' claims
        are theirs (those of an instance that died run out)."""
        return await self._rows_none(
            "UPDATE bulk_files SET status = 'pending', claim_owner = NULL, next_attempt_at = 0 "
            "WHERE status = 'processing' AND claim_owner = %s", (self.instance,))

    async def bulk_status(self) -> dict[str, Any]:
        figures = await self._one(BULK_FIGURES)
        newest = await self._rows(BULK_NEWEST_EXPIRED)
        last = await self._rows(BULK_LAST_FULL_UNSUBSCRIBES)
        return bulk_view(figures, await self._rows(BULK_COUNTS), newest[0] if newest else None,
                         last[0] if last else None)

    # ---- worker side ----

    async def release_all_in_flight(self) -> int:
        """At start-up: the leases this instance held before it restarted go back to the queue.
        Other instances' leases are theirs; those of an instance that died expire
        (``sync.lease_seconds``) and are reclaimed by whoever leases next."""
        return await self._rows_none(
            _RELEASE + "WHERE status = 'in_flight' AND lease_owner = %(owner)s",
            {"now": self._clock(), "owner": self.instance})

    async def lease(self, limit: int, lease_seconds: float) -> list[Item]:
        """Take up to ``limit`` ready items (rules: :class:`csand.storage.Outbox`), skipping
        rows another instance is taking at this moment."""
        now = self._clock()

        async def tx(db: AsyncConnection[Any]) -> list[Item]:
            # Expired leases, and those of an instance whose heartbeat stopped (killed, its
            # machine gone): its items need not wait out the whole lease.
            # SKIP LOCKED: two instances reclaiming at once never wait for (or deadlock on)
            # each other; what one skips, it or the other takes next time.
            await db.execute(
                _RELEASE + "WHERE id IN (SELECT id FROM outbox WHERE status = 'in_flight' "
                "AND (lease_until < %(now)s OR lease_owner IN (SELECT instance FROM "
                f"cluster_instances WHERE heartbeat_at < {_NOW_AS('cluster_now')} - %(silent)s)) "
                "FOR UPDATE SKIP LOCKED)",
                {"now": now, "cluster_now": self._cluster_now(),
                 "silent": SILENT_INSTANCE_SECONDS})
            rows = await (await db.execute(
                _LEASE_QUERY, {"now": now, "limit": limit})).fetchall()
            if not rows:
                return []
            tokens = [secrets.token_hex(8) for _ in rows]
            await db.execute(
                "UPDATE outbox SET status = 'in_flight', lease_until = %s, lease_owner = %s, "
                "lease_token = v.token FROM unnest(%s::bigint[], %s::text[]) AS v(id, token) "
                "WHERE outbox.id = v.id",
                (now + lease_seconds, self.instance, [r["id"] for r in rows], tokens))
            return [
                Item(r["id"], Activity.from_json(json.loads(r["payload"])), r["attempts"],
                     r["enqueued_at"], token, steps_of(r["progress"]))
                for r, token in zip(rows, tokens, strict=True)
            ]

        return await self._write(tx)

    async def renew_leases(self, leases: Sequence[int | tuple[int, str]], lease_seconds: float
                           ) -> None:
        until = self._clock() + lease_seconds
        pairs = [lease if isinstance(lease, tuple) else (lease, None) for lease in leases]
        if not pairs:
            return
        pairs.sort(key=lambda pair: pair[0])  # rows locked in id order (see commit_poll)

        async def tx(db: AsyncConnection[Any]) -> None:
            ids = [i for i, _ in pairs]
            await db.execute("SELECT id FROM outbox WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                             (ids,))
            await db.execute(
                "UPDATE outbox SET lease_until = %s FROM unnest(%s::bigint[], %s::text[]) "
                "AS v(id, token) WHERE outbox.id = v.id AND outbox.status = 'in_flight' "
                "AND (v.token IS NULL OR outbox.lease_token = v.token)",
                (until, ids, [t for _, t in pairs]))

        await self._write(tx)

    async def guard(self, item_id: int, token: str, unsubscribed_at: datetime | None = None
                    ) -> str | None:
        """Why the holder of this lease must not send its next AN request, or None (see
        :meth:`csand.storage.Outbox.guard`). Always a read: any instance may have committed a
        deletion, an unsubscribe or a reclaimed lease since the last one."""
        rows = await self._rows(
            "SELECT o.status, o.lease_token, o.source_deleted_at, p.unsubscribed_at "
            "FROM outbox AS o LEFT JOIN an_people AS p ON p.email = o.person_key "
            "WHERE o.id = %s", (item_id,))
        if not rows or rows[0]["status"] != "in_flight" or rows[0]["lease_token"] != token:
            return "lost"
        if rows[0]["source_deleted_at"]:
            return "deleted"
        latest = parse_time(rows[0]["unsubscribed_at"])
        if latest is not None and (unsubscribed_at is None or latest > unsubscribed_at):
            return "unsubscribed"
        return None

    async def record_step(
        self, item_id: int, token: str, steps: Iterable[str], *,
        person: tuple[str, Person] | None = None, opt_in: str | None = None,
    ) -> bool:
        now = self._clock()
        progress = json.dumps(sorted(set(steps)))

        async def tx(db: AsyncConnection[Any]) -> bool:
            cur = await db.execute(
                "UPDATE outbox SET progress = %s WHERE id = %s AND lease_token = %s "
                "AND status = 'in_flight'", (progress, item_id, token))
            held = cur.rowcount == 1
            await _save_knowledge(db, person, opt_in, now)
            return held

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
        now = self._clock()
        held = ("(%(token)s::text IS NULL OR (lease_token = %(token)s "
                "AND status = 'in_flight'))")
        progress = json.dumps(sorted(set(steps))) if steps is not None else None

        async def tx(db: AsyncConnection[Any]) -> bool:
            if status == "pending":
                cur = await db.execute(
                    _RELEASE + ", attempts = attempts + %(count)s, "
                    "next_attempt_at = %(next)s, last_error = COALESCE(%(error)s, last_error), "
                    "progress = COALESCE(%(progress)s, progress) "
                    f"WHERE id = %(id)s AND {held}",
                    {"count": 1 if count_attempt else 0, "next": next_attempt_at or now,
                     "error": error, "id": item_id, "token": token, "now": now,
                     "progress": progress})
            else:
                cur = await db.execute(
                    "UPDATE outbox SET status = %(status)s, lease_until = NULL, "
                    "lease_token = NULL, finished_at = %(now)s, attempts = attempts + 1, "
                    "last_error = COALESCE(%(error)s, last_error), note = %(note)s, "
                    "progress = COALESCE(%(progress)s, progress) "
                    f"WHERE id = %(id)s AND {held}",
                    {"status": status, "now": now, "error": error, "note": note,
                     "id": item_id, "token": token, "progress": progress})
            recorded = cur.rowcount == 1
            await _save_knowledge(db, person, opt_in_source, now)
            return recorded

        return await self._write(tx)

    async def requeue_dead(self, ids: Sequence[int] | None = None) -> Requeued:
        where = "status = 'dead'" + ("" if ids is None else " AND id = ANY(%(ids)s)")
        params = {"ids": list(ids or [])}

        async def tx(db: AsyncConnection[Any]) -> Requeued:
            counts = await (await db.execute(
                "SELECT COUNT(*) FILTER (WHERE source_deleted_at IS NOT NULL) AS deleted, "
                "COUNT(*) FILTER (WHERE source_deleted_at IS NULL AND kind = 'malformed') "
                f"AS malformed FROM outbox WHERE {where}", params)).fetchone()
            cur = await db.execute(
                "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = 0, "
                f"finished_at = NULL WHERE {where} AND source_deleted_at IS NULL "
                "AND kind != 'malformed'", params)
            return Requeued(cur.rowcount, counts["deleted"],
                            skipped_malformed=counts["malformed"])

        result = await self._write(tx)
        if result.queued:
            self._notify()
        return result

    async def requeue_since(self, since: str) -> Requeued:
        now = self._clock()
        latest = ("FROM outbox WHERE (status IN ('done', 'dead') "
                  f"OR (status = 'cancelled' AND note = '{HISTORY_NOTE}')) "
                  "AND kind != 'malformed' AND occurred_at >= %(since)s "
                  "AND id IN (SELECT MAX(id) FROM outbox GROUP BY source_key)")
        params = {"since": since, "pruned": f"{PRUNED}%", "now": now}

        async def tx(db: AsyncConnection[Any]) -> Requeued:
            counts = await (await db.execute(
                "SELECT COUNT(*) FILTER (WHERE source_deleted_at IS NOT NULL) AS deleted, "
                "COUNT(*) FILTER (WHERE source_deleted_at IS NULL "
                f"AND person_key LIKE %(pruned)s) AS pruned {latest}", params)).fetchone()
            cur = await db.execute(
                "INSERT INTO outbox (dedupe_key, source_key, person_key, petition_id, kind, "
                "payload, occurred_at, enqueued_at, event_slug) "
                "SELECT dedupe_key || '#resync@' || %(now)s::text, source_key, person_key, "
                f"petition_id, kind, payload, occurred_at, %(now)s, event_slug {latest} "
                "AND source_deleted_at IS NULL AND person_key NOT LIKE %(pruned)s "
                "ORDER BY id", params)
            return Requeued(cur.rowcount, counts["deleted"], counts["pruned"])

        result = await self._write(tx)
        if result.queued:
            self._notify()
        return result

    async def dead_item(self, item_id: int) -> dict[str, Any] | None:
        rows = await self._rows(
            "SELECT id, source_key, kind, status, attempts, last_error, payload, enqueued_at, "
            "finished_at FROM outbox WHERE id = %s", (item_id,))
        if not rows:
            return None
        row = rows[0]
        row["activity"] = json.loads(row.pop("payload"))
        row["enqueued_at"] = iso(row["enqueued_at"])
        row["finished_at"] = iso(row["finished_at"])
        return row

    async def drop_dead(self, ids: Sequence[int] | None = None) -> int:
        sql = ("UPDATE outbox SET status = 'cancelled', finished_at = %(now)s, "
               "note = 'dropped by the operator' WHERE status = 'dead'")
        if ids is not None:
            sql += " AND id = ANY(%(ids)s)"
        return await self._rows_none(sql, {"now": self._clock(), "ids": list(ids or [])})

    # ---- what csand knows about AN ----

    async def person(self, email: str) -> Person:
        rows = await self._rows(
            "SELECT exists_, uuid, subscribed, fields_at, unsubscribed_at, opted_in_at "
            "FROM an_people WHERE email = %s", (email,))
        return _person(rows[0]) if rows else Person()

    async def knowledge(self, email: str, source_key: str) -> tuple[Person, bool]:
        row = await self._one(
            "SELECT p.exists_, p.uuid, p.subscribed, p.fields_at, p.unsubscribed_at, "
            "p.opted_in_at, EXISTS (SELECT 1 FROM opt_ins WHERE source_key = %(source)s) "
            "AS applied FROM (SELECT 1) AS one "
            "LEFT JOIN an_people AS p ON p.email = %(email)s",
            {"email": email, "source": source_key})
        return _person(row), bool(row["applied"])

    async def save_person(self, email: str, person: Person) -> None:
        now = self._clock()

        async def tx(db: AsyncConnection[Any]) -> None:
            await _save_person(db, email, person, now)

        await self._write(tx)

    async def petition_uuid(self, cs_id: int) -> str | None:
        rows = await self._rows("SELECT an_uuid FROM cs_petitions WHERE cs_id = %s", (cs_id,))
        return rows[0]["an_uuid"] if rows else None

    async def set_petition_uuid(self, cs_id: int, slug: str, uuid: str) -> None:
        await self._rows_none(
            "INSERT INTO cs_petitions (cs_id, slug, an_uuid) VALUES (%s, %s, %s) "
            "ON CONFLICT (cs_id) DO UPDATE SET an_uuid = excluded.an_uuid", (cs_id, slug, uuid))
        self._notify()  # signatures waiting for this petition are ready now

    async def clear_petition_uuid(self, cs_id: int, uuid: str | None) -> None:
        await self._rows_none(
            "UPDATE cs_petitions SET an_uuid = NULL WHERE cs_id = %s "
            "AND an_uuid IS NOT DISTINCT FROM %s", (cs_id, uuid))

    async def event_state(self, slug: str) -> EventState | None:
        rows = await self._rows(
            "SELECT slug, content, calendar_slug, inappropriate, host_extra, an_uuid "
            "FROM cs_events WHERE slug = %s", (slug,))
        return EventState(**rows[0]) if rows else None

    async def attendees_seen(self, event_slug: str) -> dict[int, AttendeeSeen]:
        rows = await self._rows(
            "SELECT cs_id, event_slug, fingerprint, deleted_at, updated_at FROM cs_attendees "
            "WHERE event_slug = %s", (event_slug,))
        return {r["cs_id"]: AttendeeSeen(**r) for r in rows}

    async def event_uuid(self, slug: str) -> str | None:
        rows = await self._rows("SELECT an_uuid FROM cs_events WHERE slug = %s", (slug,))
        return rows[0]["an_uuid"] if rows else None

    async def set_event_uuid(self, slug: str, uuid: str) -> None:
        await self._rows_none(
            "INSERT INTO cs_events (slug, an_uuid) VALUES (%s, %s) "
            "ON CONFLICT (slug) DO UPDATE SET an_uuid = excluded.an_uuid", (slug, uuid))
        self._notify()  # attendances waiting for this event are ready now

    async def clear_event_uuid(self, slug: str, uuid: str | None) -> None:
        await self._rows_none(
            "UPDATE cs_events SET an_uuid = NULL WHERE slug = %s "
            "AND an_uuid IS NOT DISTINCT FROM %s", (slug, uuid))

    async def calendar_uuid(self, slug: str) -> str | None:
        rows = await self._rows("SELECT an_uuid FROM cs_calendars WHERE slug = %s", (slug,))
        return rows[0]["an_uuid"] if rows else None

    async def set_calendar_uuid(self, slug: str, uuid: str) -> None:
        await self._rows_none(
            "INSERT INTO cs_calendars (slug, an_uuid) VALUES (%s, %s) "
            "ON CONFLICT (slug) DO UPDATE SET an_uuid = excluded.an_uuid", (slug, uuid))

    @asynccontextmanager
    async def mirror_lock(self, cs_id: int | str) -> AsyncIterator[None]:
        """A transaction-level advisory lock on a connection of its own, held while the worker
        looks for and creates the petition (a number) or event or calendar (a key such as
        ``event:<slug>``) in AN: a few requests."""
        key = cs_id % 2_147_483_647 if isinstance(cs_id, int) else None
        async with self._pool.connection() as conn, conn.transaction():
            if key is not None:
                await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (MIRROR_LOCK, key))
            else:
                await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                                   (MIRROR_LOCK + 1, cs_id))
            yield

    async def tags(self) -> dict[str, tuple[str, str | None]]:
        rows = await self._rows("SELECT name_key, name, uuid FROM an_tags")
        return {r["name_key"]: (r["name"], r["uuid"]) for r in rows}

    async def save_tags(self, tags: Iterable[tuple[str, str | None]]) -> None:
        values = sorted({name.lower(): (name.lower(), name, uuid) for name, uuid in tags}.values())
        if not values:
            return

        async def tx(db: AsyncConnection[Any]) -> None:
            async with db.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO an_tags (name_key, name, uuid) VALUES (%s, %s, %s) "
                    "ON CONFLICT (name_key) DO UPDATE SET "
                    "uuid = COALESCE(excluded.uuid, an_tags.uuid)", values)

        await self._write(tx)

    # ---- cluster ----

    async def lead(self, ttl: float) -> int | None:
        now = self._cluster_now()

        async def tx(db: AsyncConnection[Any]) -> int | None:
            # One row, locked by whoever asks: the holder renews, anyone takes it once expired.
            row = await (await db.execute(
                f"INSERT INTO cluster_leader (role, holder, term, until) "
                f"VALUES ('poller', %(me)s, 1, {_NOW} + %(ttl)s) "
                f"ON CONFLICT (role) DO UPDATE SET "
                f"holder = CASE WHEN cluster_leader.holder = %(me)s "
                f"  OR cluster_leader.until < {_NOW} THEN %(me)s ELSE cluster_leader.holder END, "
                f"term = CASE WHEN cluster_leader.holder = %(me)s "
                f"  AND cluster_leader.until >= {_NOW} THEN cluster_leader.term "
                f"  WHEN cluster_leader.until < {_NOW} THEN cluster_leader.term + 1 "
                f"  ELSE cluster_leader.term END, "
                f"until = CASE WHEN cluster_leader.holder = %(me)s "
                f"  OR cluster_leader.until < {_NOW} THEN {_NOW} + %(ttl)s "
                f"  ELSE cluster_leader.until END "
                f"RETURNING holder, term",
                {"me": self.instance, "ttl": ttl, "now": now})).fetchone()
            return int(row["term"]) if row["holder"] == self.instance else None

        return await self._write(tx)

    async def resign(self) -> None:
        await self._rows_none(
            "UPDATE cluster_leader SET until = 0 WHERE role = 'poller' AND holder = %s",
            (self.instance,))  # expired, not deleted: terms keep counting up (the fence)

    async def heartbeat(self, info: dict[str, Any]) -> None:
        params = {"me": self.instance, "info": json.dumps(info, default=str),
                  "now": self._cluster_now(), "forget": FORGET_INSTANCE_SECONDS}

        async def tx(db: AsyncConnection[Any]) -> None:
            await db.execute(
                f"INSERT INTO cluster_instances (instance, heartbeat_at, info) "
                f"VALUES (%(me)s, {_NOW}, %(info)s) ON CONFLICT (instance) DO UPDATE SET "
                f"heartbeat_at = excluded.heartbeat_at, info = excluded.info", params)
            await db.execute(f"DELETE FROM cluster_instances "
                             f"WHERE heartbeat_at < {_NOW} - %(forget)s", params)

        await self._write(tx)

    async def forget_instance(self) -> None:
        await self._rows_none("DELETE FROM cluster_instances WHERE instance = %s",
                              (self.instance,))

    async def cluster(self) -> dict[str, Any]:
        params = {"now": self._cluster_now()}
        now = (await self._one(f"SELECT {_NOW} AS now", params))["now"]
        leader = await self._rows(
            "SELECT holder, term, until FROM cluster_leader WHERE role = 'poller'")
        rows = await self._rows(
            "SELECT instance, heartbeat_at, info FROM cluster_instances ORDER BY instance")
        return cluster_view(
            now, tuple(leader[0].values()) if leader else None,
            [tuple(r.values()) for r in rows])

    async def reserve(self, bucket: str, interval: float, pause: float = 0.0) -> float:
        """One statement: slots of all instances are handed out in the order they ask, each
        ``interval`` after the last, none before a pause ends (server time)."""
        row = await self._one(
            f"INSERT INTO rate_buckets AS b (name, next_at, paused_until) "
            f"VALUES (%(name)s, {_NOW} + %(pause)s + %(interval)s, {_NOW} + %(pause)s) "
            f"ON CONFLICT (name) DO UPDATE SET "
            f"paused_until = GREATEST(b.paused_until, {_NOW} + %(pause)s), "
            f"next_at = GREATEST(b.next_at, {_NOW}, b.paused_until, {_NOW} + %(pause)s) "
            f"  + %(interval)s "
            f"RETURNING next_at - %(interval)s - {_NOW} AS wait",
            {"name": bucket, "interval": interval, "pause": pause,
             "now": self._cluster_now()})
        return max(0.0, float(row["wait"]))

    # ---- retention ----

    async def prune(self, retention_seconds: float, *, batch: int = 1000) -> dict[str, int]:
        """Forget personal data finished with long ago (see the SQLite backend for what is
        kept), ``batch`` rows per transaction so leases never wait long behind it."""
        cutoff = self._clock() - retention_seconds
        counts = {"outbox": 0, "webhook_events": 0}
        while True:
            n = await self._rows_none(
                "UPDATE outbox SET person_key = %(pruned)s || id::text, "
                "payload = json_build_object('kind', kind, 'source_key', source_key, "
                "'pruned', true)::text, last_error = NULL "
                "WHERE id IN (SELECT id FROM outbox WHERE status IN ('done', 'cancelled') "
                "AND finished_at < %(cutoff)s AND person_key NOT LIKE %(like)s "
                "ORDER BY id LIMIT %(batch)s FOR UPDATE SKIP LOCKED)",
                {"pruned": PRUNED, "like": f"{PRUNED}%", "cutoff": cutoff, "batch": batch})
            counts["outbox"] += n
            if n < batch:
                break
        while True:
            n = await self._rows_none(
                "UPDATE webhook_events SET body = '{}' WHERE id IN (SELECT id FROM "
                "webhook_events WHERE processed_at < %(cutoff)s AND body != '{}' "
                "ORDER BY id LIMIT %(batch)s FOR UPDATE SKIP LOCKED)",
                {"cutoff": cutoff, "batch": batch})
            counts["webhook_events"] += n
            if n < batch:
                break
        return counts

    # ---- reporting ----

    async def counts(self) -> dict[str, int]:
        rows = await self._rows("SELECT status, COUNT(*) AS n FROM outbox GROUP BY status")
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({r["status"]: r["n"] for r in rows})
        return counts

    # ---- audit (csand audit) ----

    async def audit_sample(self, limit: int | None, *, petition_id: int | None = None,
                           kinds: Sequence[str] = AUDIT_KINDS) -> list[dict[str, Any]]:
        where, params = audit_sample_where(petition_id, kinds, "%({})s")
        rows = await self._rows(
            "SELECT id, source_key, person_key, petition_id, kind, payload, note, finished_at "
            f"FROM outbox WHERE {where} ORDER BY random()"
            + ("" if limit is None else f" LIMIT {int(limit)}"), params)
        return [r | {"payload": json.loads(r["payload"])} for r in rows]

    async def person_items(self, email: str) -> list[dict[str, Any]]:
        return await self._rows(
            "SELECT id, source_key, kind, status, note, finished_at FROM outbox "
            "WHERE person_key = %s ORDER BY id", (email,))

    async def requeue_items(self, ids: Sequence[int], reason: str = "audit") -> Requeued:
        now = self._clock()

        async def tx(db: AsyncConnection[Any]) -> Requeued:
            queued = deleted = pruned = 0
            for item_id in dict.fromkeys(ids):
                row = await (await db.execute(
                    "SELECT source_key, person_key, source_deleted_at, status FROM outbox "
                    "WHERE id = %s", (item_id,))).fetchone()
                if row is None or row["status"] not in ("done", "dead"):
                    continue
                if row["source_deleted_at"] is not None:
                    deleted += 1
                    continue
                if row["person_key"].startswith(PRUNED):
                    pruned += 1
                    continue
                # One repair per record at a time, also when two audits repair at once.
                await db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                                 (f"requeue:{row['source_key']}",))
                busy = await (await db.execute(
                    "SELECT 1 FROM outbox WHERE source_key = %s AND status IN "
                    "('pending', 'in_flight') LIMIT 1", (row["source_key"],))).fetchone()
                if busy:
                    continue
                cur = await db.execute(
                    "INSERT INTO outbox (dedupe_key, source_key, person_key, petition_id, kind, "
                    "payload, occurred_at, enqueued_at, event_slug) "
                    "SELECT dedupe_key || '#' || %(reason)s || '@' || %(now)s::text, "
                    "source_key, person_key, petition_id, kind, payload, occurred_at, %(now)s, "
                    "event_slug FROM outbox WHERE id = %(id)s ON CONFLICT DO NOTHING",
                    {"reason": reason, "now": now, "id": item_id})
                queued += max(cur.rowcount, 0)
            return Requeued(queued, deleted, pruned)

        result = await self._write(tx)
        if result.queued:
            self._notify()
        return result

    async def items(self) -> list[dict[str, Any]]:
        rows = await self._rows(
            "SELECT id, dedupe_key, source_key, person_key, petition_id, kind, payload, "
            "occurred_at, status, attempts, next_attempt_at, lease_until, last_error, note, "
            "enqueued_at, finished_at FROM outbox ORDER BY id")
        return [r | {"payload": json.loads(r["payload"])} for r in rows]

    async def status(self) -> dict[str, Any]:
        """The figures ``csand status`` prints; cheap enough to call every second."""
        now = self._clock()
        counts = await self.counts()
        meta = {r["key"]: r["value"] for r in await self._rows("SELECT key, value FROM meta")}
        (row,) = await self._rows(STATUS_FIGURES.format(hour="%(hour)s"), {"hour": now - 3600})
        view = status_view(counts, meta, row, await self._rows(DEAD_REASONS), now, STATUSES)
        view["bulk"] = await self.bulk_status()
        return view

    async def dead_items(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = await self._rows(
            "SELECT id, source_key, kind, attempts, last_error, finished_at FROM outbox "
            "WHERE status = 'dead' ORDER BY id LIMIT %s", (limit,))
        return [r | {"finished_at": iso(r["finished_at"])} for r in rows]



def _person(r: dict[str, Any]) -> Person:
    return Person(
        exists=r["exists_"], uuid=r["uuid"], subscribed=r["subscribed"],
        fields_at=field_times(r["fields_at"]),
        unsubscribed_at=parse_time(r["unsubscribed_at"]),
        opted_in_at=parse_time(r["opted_in_at"]),
    )


async def _check_fence(db: AsyncConnection[Any], fence: tuple[str, int], now: float | None
                       ) -> None:
    row = await (await db.execute(
        f"SELECT holder, term, until >= {_NOW} AS alive FROM cluster_leader "
        f"WHERE role = 'poller' FOR SHARE", {"now": now})).fetchone()
    if row is None or (row["holder"], row["term"]) != fence or not row["alive"]:
        raise NotLeader(f"instance {fence[0]} no longer leads (term {fence[1]})")


async def _stale(db: AsyncConnection[Any], table: str,
                 versions: Sequence[SignatureSeen | AttendeeSeen]) -> set[int]:
    """Ids among ``versions`` older than what ``table`` records (or live copies of deleted
    records): a webhook processed meanwhile won."""
    if not versions:
        return set()
    by_id = {v.cs_id: v for v in versions}
    rows = await (await db.execute(
        f"SELECT cs_id, deleted_at, updated_at FROM {table} WHERE cs_id = ANY(%s)",
        (list(by_id),))).fetchall()
    return stale_versions(((r["cs_id"], r["deleted_at"], r["updated_at"]) for r in rows), by_id)


async def _save_knowledge(db: AsyncConnection[Any], person: tuple[str, Person] | None,
                          opt_in: str | None, now: float) -> None:
    if person is not None:
        await _save_person(db, person[0], person[1], now)
    if opt_in is not None:
        await db.execute(
            "INSERT INTO opt_ins (source_key, applied_at) VALUES (%s, %s) "
            "ON CONFLICT (source_key) DO NOTHING", (opt_in, now))


async def _save_person(db: AsyncConnection[Any], email: str, p: Person, now: float) -> None:
    # The consent timeline only moves forward (GREATEST ignores NULLs): a writer holding an
    # older view must not take back a newer opt-in or unsubscribe.
    await db.execute(
        "INSERT INTO an_people (email, exists_, uuid, subscribed, fields_at, unsubscribed_at, "
        "opted_in_at, learned_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (email) DO UPDATE SET exists_ = excluded.exists_, uuid = excluded.uuid, "
        "subscribed = excluded.subscribed, fields_at = excluded.fields_at, "
        "unsubscribed_at = GREATEST(an_people.unsubscribed_at, excluded.unsubscribed_at), "
        "opted_in_at = GREATEST(an_people.opted_in_at, excluded.opted_in_at), "
        "learned_at = excluded.learned_at",
        (email, p.exists, p.uuid, p.subscribed,
         json.dumps({k: v.isoformat() for k, v in p.fields_at.items()}) if p.fields_at else None,
         p.unsubscribed_at.isoformat() if p.unsubscribed_at else None,
         p.opted_in_at.isoformat() if p.opted_in_at else None, now))


# An item handed back goes back to the queue, unless ControlShift deleted its record meanwhile:
# then it is cancelled (see the SQLite backend).
_RELEASE = (
    "UPDATE outbox SET lease_until = NULL, lease_token = NULL, lease_owner = NULL, "
    "status = CASE WHEN source_deleted_at IS NULL THEN 'pending' ELSE 'cancelled' END, "
    "finished_at = CASE WHEN source_deleted_at IS NULL THEN NULL ELSE %(now)s END, "
    "note = CASE WHEN source_deleted_at IS NULL THEN note "
    "ELSE 'signature deleted on ControlShift while it was being synced' END "
)

_INSERT_OUTBOX = (
    "INSERT INTO outbox (dedupe_key, source_key, person_key, petition_id, kind, payload, "
    "occurred_at, enqueued_at, event_slug) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (dedupe_key) DO NOTHING"
)

# An activity older than sync.history_start (see SQLite).
_INSERT_HISTORY = (
    "INSERT INTO outbox (dedupe_key, source_key, person_key, petition_id, kind, payload, "
    "occurred_at, enqueued_at, event_slug, status, finished_at, note) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 'cancelled', %s, "
    f"'{HISTORY_NOTE}') ON CONFLICT (dedupe_key) DO NOTHING"
)
_COUNT_HISTORY = (
    "INSERT INTO meta (key, value) VALUES ('history_skipped', %(n)s::text) "
    "ON CONFLICT (key) DO UPDATE SET value = (meta.value::bigint + %(n)s)::text"
)

_REVIVE_RSVP = (
    "UPDATE outbox SET status = 'pending', source_deleted_at = NULL, finished_at = NULL, "
    "note = NULL, next_attempt_at = 0 WHERE dedupe_key = ANY(%s) AND status = 'cancelled' "
    "AND kind = 'attendance'"
)

# What was seen of an event: a None member keeps what was recorded; inappropriate sticks.
_UPSERT_EVENT = (
    "INSERT INTO cs_events (slug, content, calendar_slug, inappropriate, host_extra, walked_at) "
    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (slug) DO UPDATE SET "
    "content = COALESCE(excluded.content, cs_events.content), "
    "calendar_slug = COALESCE(excluded.calendar_slug, cs_events.calendar_slug), "
    "inappropriate = cs_events.inappropriate OR excluded.inappropriate, "
    "host_extra = COALESCE(excluded.host_extra, cs_events.host_extra), "
    "walked_at = excluded.walked_at"
)

_INSERT_DEAD_LETTER = (
    "INSERT INTO outbox (dedupe_key, source_key, person_key, petition_id, kind, payload, "
    "occurred_at, status, last_error, note, enqueued_at, finished_at) "
    "VALUES (%s, %s, %s, %s, 'malformed', %s, %s, 'dead', %s, %s, %s, %s) "
    "ON CONFLICT (dedupe_key) DO NOTHING"
)

# The rules of SQLite's lease query; FOR UPDATE SKIP LOCKED passes over rows another instance
# is leasing right now instead of waiting for it.
_LEASE_QUERY = f"""
SELECT o.id, o.payload, o.attempts, o.enqueued_at, o.progress
FROM outbox AS o
WHERE o.status = 'pending'
  AND o.next_attempt_at <= %(now)s
  AND o.source_deleted_at IS NULL
{LEASE_RULES}ORDER BY o.id
LIMIT %(limit)s
FOR UPDATE OF o SKIP LOCKED
"""


__all__ = ["MIGRATIONS", "PostgresStore"]


async def _bulk_changes(cur: Any, bulk: BulkChanges, now: float) -> None:
    """What a batch of bulk rows changes (see :class:`csand.storage.bulk.BulkChanges`)."""
    if bulk.records:
        await cur.executemany(
            "INSERT INTO bulk_records (table_name, id, ref, body, generation) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (table_name, id) DO UPDATE SET "
            "ref = excluded.ref, body = excluded.body, "
            "generation = GREATEST(excluded.generation, bulk_records.generation)",
            [(*r, bulk.generation) for r in bulk.records])
    if bulk.seen_signatures and bulk.generation is not None:
        await cur.execute(
            "UPDATE cs_signatures SET bulk_generation = %s WHERE cs_id = ANY(%s)",
            (bulk.generation, list(bulk.seen_signatures)))
    if bulk.park:
        await cur.executemany(
            "INSERT INTO bulk_parked (kind, id, petition_id, body, parked_at) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (kind, id) DO UPDATE SET "
            "petition_id = excluded.petition_id, body = excluded.body",
            [(*p, now) for p in bulk.park])
    if bulk.unpark:
        await cur.executemany("DELETE FROM bulk_parked WHERE kind = %s AND id = %s",
                              list(bulk.unpark))
