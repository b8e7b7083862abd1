"""Bulk data as the source of petitions, creators and signatures (``controlshift.source =
"bulk"``): the export files replace the REST walk of every petition.

Handlers of :class:`csand.controlshift.ingest.BulkIngest` (:meth:`BulkSource.register`):

* ``petitions``, ``users``, ``categories``, ``categorized_petitions`` (incremental and full):
  each row is kept in the store (``bulk_records``, upserted by id); a petition row (or a new
  category link) puts its creator on the waiting list, to be built once the minute's other
  files are in. After a full ``categorized_petitions`` file, links it did not hold are deleted
  (a category taken off a petition).
* ``signatures`` (incremental: new rows): each row, as the REST record
  (:mod:`csand.controlshift.source`), is joined with its petition (title, URL, creator, category
  names) and compared with what csand recorded (:func:`csand.controlshift.versions.see_signature`)
  exactly as the poller does: the same activities, the same dedupe keys, so a webhook or a REST
  poll that saw the signature first makes it a no-op. A signature whose petition cannot be
  joined yet (its row, its creator's ``users`` row or a category row has not arrived, or it is
  not launched) waits, durably, in ``bulk_parked`` and is taken up by :meth:`BulkSource.settle`
  when the files due are processed; nothing is fetched by REST for it.
* ``signatures`` (full, nightly): the same comparison for every row, streamed in batches: a late
  opt-in, a deletion or any other edit is a new version and goes through the normal rules; each
  row's id is marked in the store with the file's id in the batch's own transaction. Once the
  file is read, live signatures csand recorded before the export was taken that the file did not
  hold have vanished from ControlShift: recorded as deleted, their pending items cancelled (the
  full export is a complete copy, so unlike a REST walk no page shift can hide one). Memory
  holds one batch and a bounded cache of joined petitions, whatever the file's size.

Updates and deletions between nightly exports come from webhooks, processed as with REST
polling. Events stay on REST (the poller's event cycle).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from csand.controlshift.bulk import BadExport, ExportFile
from csand.controlshift.ingest import Batch, Row, TableHandlers
from csand.controlshift.source import (
    petition_record,
    record_json,
    row_id,
    signature_record,
    user_id,
)
from csand.controlshift.versions import see_signature
from csand.logs import get_logger
from csand.model import (
    Activity,
    DeadLetter,
    MalformedRecord,
    SignatureSeen,
    creator_activity,
    creator_record,
    dead_letter,
)
from csand.storage import BulkFile, Storage
from csand.storage.bulk import BulkChanges

log = get_logger("bulk")

JOIN_TABLES = ("petitions", "users", "categories", "categorized_petitions")
CACHE_PETITIONS = 5_000  # joined petitions kept between batches (cleared when rows change)
SETTLE_BATCH = 500
VANISHED_BATCH = 1_000

Joined = dict[str, Any] | None  # a REST-shaped petition, or None: not joinable yet


class BulkSource:
    def __init__(self, store: Storage, org_slug: Callable[[], Awaitable[str]],
                 org_url: Callable[[], Awaitable[str | None]], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.org_slug = org_slug
        self.org_url = org_url
        self.clock = clock
        self._joined: dict[int, Joined] = {}
        self._unjoinable_logged: set[int] = set()

    def register(self, handlers: TableHandlers) -> None:
        for table in JOIN_TABLES:
            handlers.register(table, self.records, finish=(
                self.forget_links if table == "categorized_petitions" else None))
        handlers.register("signatures", self.new_signatures, kinds=("incremental",))
        handlers.register("signatures", self.all_signatures, kinds=("full",),
                          finish=self.vanished)
        handlers.on_settle(self.settle)

    # ---- the joined tables ----

    async def records(self, rows: list[Row], file: BulkFile) -> Batch:
        records: list[tuple[str, int, int | None, str]] = []
        creators: dict[int, tuple[str, int, int, None]] = {}
        for row in rows:
            try:
                rid = row_id(row)
                ref = row_id(row, "petition_id") if file.table == "categorized_petitions" else None
            except MalformedRecord as exc:
                log.error("bulk.malformed_row", table=file.table, reason=str(exc),
                          row_id=str(row.get("id"))[:40])
                continue
            records.append((file.table, rid, ref, json.dumps(row, separators=(",", ":"))))
            petition = rid if file.table == "petitions" else ref
            if petition is not None:  # its creator (tags included) is built again
                creators[petition] = ("creator", petition, petition, None)
        self._joined.clear()
        return Batch(commit={"bulk": BulkChanges(
            records=tuple(records), park=tuple(creators.values()), generation=file.id)})

    async def forget_links(self, file: BulkFile) -> None:
        if file.kind == "full":
            gone = await self.store.bulk_forget("categorized_petitions", file.id)
            self._joined.clear()
            if gone:
                log.info("bulk.category_links_removed", links=gone)

    async def petitions(self, ids: Iterable[int]) -> dict[int, Joined]:
        """The REST shape of each petition (None while its rows are incomplete)."""
        wanted = set(ids)
        missing = [pid for pid in wanted if pid not in self._joined]
        if missing:
            if len(self._joined) + len(missing) > CACHE_PETITIONS:
                self._joined.clear()
            rows = {pid: json.loads(body) for pid, body in
                    (await self.store.bulk_records("petitions", missing)).items()}
            users_of: dict[int, int | None] = {}
            for pid, row in rows.items():
                try:
                    users_of[pid] = user_id(row)
                except MalformedRecord:
                    users_of[pid] = None
            users = {uid: json.loads(body) for uid, body in (await self.store.bulk_records(
                "users", sorted({u for u in users_of.values() if u is not None}))).items()}
            links = await self.store.bulk_records_by_ref("categorized_petitions", list(rows))
            category_of = {pid: [_category_id(json.loads(b)) for b in bodies]
                           for pid, bodies in links.items()}
            names = {cid: json.loads(body).get("name") for cid, body in (
                await self.store.bulk_records("categories", sorted(
                    {c for cs in category_of.values() for c in cs if c is not None}))).items()}
            org_url = await self.org_url()
            for pid in missing:
                self._joined[pid] = self._join(pid, rows.get(pid), users_of.get(pid), users,
                                               category_of.get(pid, []), names, org_url)
        return {pid: self._joined[pid] for pid in wanted}

    def _join(self, pid: int, row: dict[str, Any] | None, uid: int | None,
              users: dict[int, Any], categories: list[int | None], names: dict[int, Any],
              org_url: str | None) -> Joined:
        if row is None:
            return None
        user = users.get(uid) if uid is not None else None
        if (uid is not None and user is None) or any(
                c is None or not isinstance(names.get(c), str) for c in categories):
            return None  # its creator or a category has not arrived yet
        try:
            return petition_record(row, user, [names[c] for c in categories
                                               if c is not None], org_url)
        except MalformedRecord as exc:
            if pid not in self._unjoinable_logged:
                self._unjoinable_logged.add(pid)
                log.error("bulk.malformed_petition", petition=pid, reason=str(exc),
                          msg="its signatures wait until a corrected row arrives")
            return None

    # ---- signatures ----

    async def new_signatures(self, rows: list[Row], file: BulkFile) -> Batch:
        return await self._signatures(rows, file, full=False)

    async def all_signatures(self, rows: list[Row], file: BulkFile) -> Batch:
        return await self._signatures(rows, file, full=True)

    async def _signatures(self, rows: list[Row], file: BulkFile, *, full: bool) -> Batch:
        letters: list[DeadLetter] = []
        records: dict[int, dict[str, Any]] = {}
        unreadable: list[int] = []  # held by the file all the same: not vanished
        for row in rows:
            try:
                record = signature_record(row)
            except MalformedRecord as exc:  # keyed like the REST record's dead letter
                raw_id = (row.get("id") or "").strip()
                letters.append(dead_letter(
                    "signature", dict(row), exc,
                    source_key=f"signature:{raw_id}" if raw_id.isdigit() else None))
                if raw_id.isdigit():
                    unreadable.append(int(raw_id))
                continue
            records[record["id"]] = record  # the file's last version of it
        batch = await self._see(list(records.values()), parked=False)
        changes = BulkChanges(
            park=tuple(batch.park), generation=file.id if full else None,
            seen_signatures=(*records, *unreadable) if full else ())
        return Batch(batch.activities, letters + batch.letters, commit={
            "signatures": batch.signatures, "deleted_sources": batch.deleted, "bulk": changes})

    async def _see(self, records: list[dict[str, Any]], *, parked: bool) -> _Seen:
        out = _Seen()
        if not records:
            return out
        joined = await self.petitions({r["petition_id"] for r in records})
        # A petition whose creator waits for settle(): its signatures wait too, so that no
        # signature reaches the worker before its creator's item (the AN petition is created
        # by the first item of it, and only creation sets its creator link). Read from the
        # store: another instance may have parked it.
        creator_waits = set() if parked else await self.store.bulk_waiting(
            "creator", sorted(joined))
        previous = await self.store.signatures_seen_many([r["id"] for r in records])
        org = await self.org_slug()
        for record in records:
            sid, pid = record["id"], record["petition_id"]
            petition = joined.get(pid)
            if petition is None or not petition["launched"] or pid in creator_waits:
                if not parked:
                    out.park.append(("signature", sid, pid, record_json(record)))
                continue
            if parked:
                out.unpark.append(("signature", sid))
            try:
                seen = see_signature(record, petition, org, previous.get(sid))
            except Exception as exc:  # one bad record must not stop the others
                out.letters.append(dead_letter("signature", record, exc, petition_id=pid))
                continue
            if seen.row is not None:
                previous[sid] = seen.row
                out.signatures.append(seen.row)
            if seen.activity is not None:
                out.activities.append(seen.activity)
            if seen.cancel is not None:
                out.deleted.append(seen.cancel)
                log.info("cs.signature_deleted", source=seen.cancel,
                         msg="deleted on ControlShift: not synced further; AN unchanged")
        return out

    async def vanished(self, file: BulkFile) -> int:
        """Live signatures recorded before the export was taken that it did not hold: recorded
        as deleted, their pending items cancelled. Idempotent (a crash here runs it again)."""
        try:
            export = ExportFile.from_json(file.body)
            taken = export.exported_at
        except (BadExport, KeyError, ValueError):
            taken = None
        if taken is None:  # a later time would take signatures made meanwhile for vanished
            log.info("bulk.vanished_skipped", file=file.url.split("?")[0][-80:],
                     msg="the export's time is unknown (no stamp in its name): no signature "
                         "is taken for vanished; deletions still come from deleted_at and "
                         "webhooks")
            return 0
        before = taken.astimezone(UTC).isoformat()
        after, total = 0, 0
        while rows := await self.store.bulk_vanished(file.id, before, after, VANISHED_BATCH):
            after = rows[-1].cs_id
            at = datetime.fromtimestamp(self.clock(), UTC).isoformat()
            await self.store.commit_poll(
                None, [SignatureSeen(s.cs_id, s.petition_id, "deleted", at, s.updated_at)
                       for s in rows], (), [f"signature:{s.cs_id}" for s in rows],
                bulk_progress=(file.id, 0))
            total += len(rows)
        if total:
            log.info("cs.signatures_vanished", signatures=total, export=before,
                     msg="no longer in ControlShift's full export: treated as deleted, not "
                         "synced further; AN unchanged")
        return total

    # ---- what waits for its petition ----

    async def settle(self) -> int:
        """Build what waits in ``bulk_parked`` now that its petition can be joined; the number
        of new outbox items."""
        after: tuple[str, int] = ("", 0)
        added = 0
        while parked := await self.store.bulk_parked(after, SETTLE_BATCH):
            after = (parked[-1].kind, parked[-1].id)
            joined = await self.petitions({p.petition_id for p in parked})
            org = await self.org_slug()
            activities: list[Activity] = []
            letters: list[DeadLetter] = []
            unpark: list[tuple[str, int]] = []
            for p in parked:
                petition = joined.get(p.petition_id)
                if p.kind != "creator" or petition is None:
                    continue
                unpark.append(("creator", p.id))
                if not petition["launched"]:
                    continue  # a launch reaches csand by webhook or with the nightly file
                try:
                    activities.append(creator_activity(petition, org))
                except Exception as exc:  # the creator's dead letter; the signers still sync
                    letters.append(dead_letter("petition", creator_record(petition), exc,
                                               petition_id=p.id,
                                               source_key=f"petition:{p.id}:creator"))
            seen = await self._see([json.loads(p.body) for p in parked
                                    if p.kind == "signature" and p.body], parked=True)
            if not (unpark or seen.unpark):
                continue
            added += await self.store.commit_poll(
                None, seen.signatures, activities + seen.activities, seen.deleted,
                dead_letters=letters + seen.letters,
                bulk=BulkChanges(unpark=tuple(unpark + seen.unpark)))
        return added


class _Seen:
    __slots__ = ("activities", "signatures", "deleted", "letters", "park", "unpark")

    def __init__(self) -> None:
        self.activities: list[Activity] = []
        self.signatures: list[SignatureSeen] = []
        self.deleted: list[str] = []
        self.letters: list[DeadLetter] = []
        self.park: list[tuple[str, int, int, str | None]] = []
        self.unpark: list[tuple[str, int]] = []


def _category_id(link: dict[str, Any]) -> int | None:
    try:
        return row_id(link, "category_id")
    except MalformedRecord:
        return None
