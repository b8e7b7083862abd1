"""The poller: finds what changed on ControlShift and enqueues it, with what it saw, atomically.

ControlShift offers no "since" filter, no documented sort order and no page size, and signatures
exist only per petition. So every cycle lists the petitions (cheap: few pages) and compares each
launched petition's change signals with what was recorded after its last walk:

* ``public_signature_count`` grew → walk its signature pages from both ends (1, N, 2, N-1, …)
  until as many unseen signatures as the count grew by have turned up *and* each end has reached
  a page holding a signature recorded before (new signatures sort together at one end, whichever
  the unknown order is, so that bounds them). A deletion meanwhile makes the count grow by less
  than what was added; the bound still finds every new one. An unusual order only costs more
  pages, never a missed signature, since the walk continues to the end when it must.
* the count shrank, the petition's content (title, categories, creator) changed, or the petition
  is new → walk every page.
* nothing changed → no signature request at all.

Every signature seen is compared by fingerprint with the version recorded before; only new or
changed versions are enqueued. A full reconciliation sweep (every page of every petition) runs
every ``reconcile_interval`` to catch edits that move no signal, such as a late opt-in. The very
first cycle walks everything: that is the backfill.

Events (:class:`EventSync`, when ``sync_events`` is on, after the petitions, through the same client and so the same request
budget): every cycle lists the events (few pages). A REST event carries no ``updated_at``, no
count and no moderation status, so there is no cheap change signal for its attendees: each
listed event that is launched and not recorded as inappropriate (a webhook said so) gets its
host activity (with the split names and opt-in a webhook gave, for the same host email) and, when
its content (title, description, times, place, URL) differs from what was recorded, one
``event_changed`` item. Its attendees (every page) are compared like signatures, by fingerprint;
declines and no-shows are not synced and cancel what is pending, attendees gone from a complete
listing are deleted (confirmed by a second listing first).

Walking every event's attendees every cycle costs one request per attendee page per event, for
ever. So an incremental cycle walks the attendees only of events never walked before and of
events whose ``end_at`` (else ``start_at``; neither: always) is in the future or less than
:data:`RECENT_EVENT_DAYS` days ago; the attendees of older events change only through webhooks
until the next reconciliation sweep, which walks every event's attendees.

Everything the incremental cycles ask counts as ``poll`` and a sweep's as ``sweep``: both stay
within ``poll_budget_share`` of ControlShift's budget (:mod:`csand.controlshift.budget`), so a
long petition list stretches the cycle. Each page of petitions is looked at as it arrives, and a
sweep is paced over ``reconcile_interval`` beside the incremental cycles, which skip the petition
it is walking rather than wait for it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio

from csand import metrics
from csand.controlshift.budget import current_purpose, purpose
from csand.controlshift.client import (
    ControlShiftClient,
    CSAuthError,
    CSBadPage,
    CSError,
    CSNotFound,
    PetitionDirectory,
    pagination,
)
from csand.controlshift.versions import see_attendee, see_signature
from csand.logs import get_logger
from csand.model import (
    Activity,
    AttendeeSeen,
    DeadLetter,
    EventRef,
    MalformedRecord,
    SignatureSeen,
    calendar_ref,
    creator_activity,
    creator_record,
    dead_letter,
    event_change_activity,
    event_ref,
    host_activity,
    is_launched,
    is_syncable_event,
    normalize_email,
    now_utc,
    parse_time,
    petition_ref,
    record_id,
    text_field,
)
from csand.storage import EventState, PetitionState, Storage, StoreError

log = get_logger("poller")

COMMIT_EVERY_PAGES = 20  # bounds memory and lost work on a very large petition
RECENT_EVENT_DAYS = 7  # incremental cycles walk the attendees of events ended since then


def edge_order(total_pages: int) -> list[int]:
    """1, N, 2, N-1, …: the pages where new records sit under either sort order come first."""
    order: list[int] = []
    lo, hi = 1, total_pages
    while lo <= hi:
        order.append(lo)
        if hi != lo:
            order.append(hi)
        lo, hi = lo + 1, hi - 1
    return order


def petition_content(petition: dict[str, Any]) -> str:
    creator = petition.get("creator")
    creator = creator if isinstance(creator, dict) else {"malformed": creator}
    email = creator.get("email")
    data = [
        petition.get("title"),
        sorted(str((c or {}).get("name") if isinstance(c, dict) else c)
               for c in petition.get("categories") or ()),
        email.strip().lower() if isinstance(email, str) else email,
        creator.get("first_name"), creator.get("last_name"), creator.get("malformed"),
    ]
    return hashlib.sha256(json.dumps(data, default=str).encode()).hexdigest()[:20]


@dataclass
class CycleReport:
    petitions: int = 0
    walked: int = 0
    pages: int = 0
    enqueued: int = 0
    malformed: int = 0
    events: int = 0
    events_walked: int = 0
    event_requests: int = 0  # ControlShift requests the events took
    skipped: int = 0  # petitions a running sweep was walking: looked at next cycle


class Poller:
    def __init__(
        self,
        cs: ControlShiftClient,
        store: Storage,
        *,
        poll_interval: float = 30.0,
        reconcile_interval: float = 3600.0,
        org_slug: str | None = None,
        clock: Callable[[], float] = time.time,
        sync_events: bool = False,
        source: str = "rest",
        bulk_stale: tuple[float, float] = (1800.0, 30 * 3600.0),
    ) -> None:
        self.cs = cs
        # "bulk": petitions, creators and signatures come from the export files
        # (csand.controlshift.bulksource); a cycle is then a light check that ControlShift
        # answers and the exports keep arriving (``bulk_stale``: seconds without an
        # incremental signatures file, without a nightly full one), never a petition walk.
        self.source = source
        self.bulk_stale = bulk_stale
        self._stale_logged: list[str] = []
        self.store = store
        self.poll_interval = poll_interval
        self.reconcile_interval = reconcile_interval
        self._org_slug = org_slug
        self.clock = clock
        self._locks: dict[int, anyio.Lock] = {}
        self.cycles = 0
        self.poked = anyio.Event()  # set to start the next cycle early (webhooks, tests)
        # Every cycle refreshes the directory; webhooks (petition.updated, category.*) refresh
        # or clear what they change. So an entry stays good for two cycles: a long poll_interval
        # must not cost every signature webhook a petition request.
        self.directory = PetitionDirectory(cs, max_age=max(600.0, 2 * poll_interval))
        # (instance, term) while this process leads a cluster: every commit of what was polled
        # is refused once another instance leads (csand.storage.NotLeader stops the cycle).
        self.fence: tuple[str, int] | None = None
        # Events are polled only when asked (off until the worker syncs them); the webhook
        # processor shares ``events`` so both sources are serialised per event.
        self.sync_events = sync_events
        self.events = EventSync(cs, store, clock=clock)

    # ---- loops ----

    def poke(self) -> None:
        """Start the next incremental cycle now (a webhook said something changed)."""
        self.poked.set()

    async def run(self) -> None:
        """Incremental cycles every ``poll_interval``; reconciliation sweeps beside them."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._incremental_loop)
            tg.start_soon(self._reconcile_loop)

    async def _incremental_loop(self) -> None:
        with purpose("poll"):  # within the poll budget (csand.controlshift.budget)
            while True:
                await self._incremental()
                with anyio.move_on_after(self.poll_interval):
                    await self.poked.wait()
                self.poked = anyio.Event()

    async def _incremental(self) -> CycleReport | None:
        """One incremental cycle; what it cost besides the walks is the idle cost the sweep's
        pace leaves room for."""
        meter = self.cs.budget.meter
        before = meter.totals[current_purpose()]
        report = await self._guarded_cycle(full=False)
        if report is not None:
            spent = meter.totals[current_purpose()] - before
            self.cs.budget.saw_idle_cycle(max(0, spent - report.pages))
        return report

    async def sweep(self, *, asked: bool = False) -> CycleReport | None:
        """A full sweep, paced by :func:`csand.controlshift.budget.plan_sweep`: spread over
        ``reconcile_interval`` when the poll budget allows (``asked``: as fast as it allows)."""
        budget = self.cs.budget
        plan = budget.plan_sweep(reconcile_interval=self.reconcile_interval,
                                 poll_interval=self.poll_interval, asked=asked)
        log.info("poll.sweep_started", asked=asked, estimated_requests=budget.estimate(),
                 rate_per_minute=round(plan.rate * 60, 1),
                 expected_s=None if math.isinf(plan.seconds) else round(plan.seconds),
                 fits_reconcile_interval=plan.fits)
        budget.start_sweep(plan)
        t0 = budget.clock()
        with purpose("sweep"):
            before = budget.meter.totals["sweep"]
            report = None
            try:
                report = await self._guarded_cycle(full=True)
            finally:
                seconds = budget.clock() - t0
                requests = budget.meter.totals["sweep"] - before
                budget.finish_sweep(requests=requests, seconds=seconds, ok=report is not None,
                                    events=report.event_requests if report else 0)
        if report is not None:
            log.info("poll.sweep_done", requests=requests, seconds=round(seconds, 1))
        return report

    async def _reconcile_loop(self) -> None:
        while True:
            last = await self.store.get_meta("last_reconcile_at")
            due = (float(last) + self.reconcile_interval) if last else None
            now = self.clock()
            if due is None:  # no backfill yet: the incremental loop's first cycle does it
                await anyio.sleep(min(self.poll_interval, 5.0))
                continue
            if now < due:
                # Wake at least every poll interval: `csand backfill` asks for a sweep by
                # resetting last_reconcile_at in the database.
                await anyio.sleep(min(due - now, self.poll_interval))
                continue
            await self.sweep(asked=float(last) == 0)

    async def _guarded_cycle(self, full: bool) -> CycleReport | None:
        try:
            return await self.cycle(full=full)
        except CSAuthError as exc:
            metrics.poll_failures.inc()
            await self.store.set_meta(last_poll_result=f"failed: {exc}")
            log.error("cs.auth_failed", error=str(exc), msg="ControlShift rejected the "
                      "credentials; polling continues every interval. Nothing is lost meanwhile.")
        except CSBadPage as exc:  # the petition list itself cannot be followed
            metrics.poll_failures.inc()
            await self.store.set_meta(last_poll_result=f"failed: {exc}")
            log.error("poll.failed", error=str(exc), full=full,
                      msg="ControlShift sent a petition list page csand cannot follow; "
                          "polling continues every interval")
        except CSError as exc:
            metrics.poll_failures.inc()
            await self.store.set_meta(last_poll_result=f"failed: {exc}")
            log.warning("poll.failed", error=str(exc), full=full)
        return None

    # ---- one cycle ----

    async def org_slug(self) -> str:
        if self._org_slug is None:
            stored = await self.store.get_meta("org_slug")
            if stored is None:
                stored = str((await self.cs.organisation()).get("slug") or "").strip()
                if not stored:
                    raise CSError("ControlShift /api/v1/organisation returned no slug")
                await self.store.set_meta(org_slug=stored)
            self._org_slug = stored
        return self._org_slug

    async def cycle(self, full: bool = False) -> CycleReport:
        started = self.clock()
        t0 = time.monotonic()
        org = await self.org_slug()
        report = CycleReport()
        first_run = await self.store.get_meta("backfill_done") is None
        listed: list[dict[str, Any]] = []
        if self.source == "bulk":
            await self._bulk_check(report)
        # Each page's petitions are looked at as it arrives: on a long list, a new signature
        # need not wait for the last page to be listed (within the poll budget, that is minutes).
        async for petition in (self._nothing() if self.source == "bulk"
                               else self._listing(listed)):
            try:
                cs_id = record_id(petition)
                slug = text_field(petition, "slug", required=True) or ""
            except MalformedRecord as exc:
                report.malformed += 1
                log.error("cs.malformed_petition", reason=f"petition without id or slug: {exc}",
                          record=str(petition)[:200])
                continue
            if not is_launched(petition):
                continue
            report.petitions += 1
            lock = self._locks.setdefault(cs_id, anyio.Lock())
            if not full and not first_run and lock.locked():
                # A paced sweep is walking it: the fresh signatures of the others do not wait
                # for it. What the sweep records is compared again next cycle.
                report.skipped += 1
                continue
            async with lock:
                try:
                    await self._sync_petition(petition, cs_id, slug, org, full or first_run,
                                              report)
                except CSBadPage as exc:  # this petition's pages cannot be followed: the others can
                    report.malformed += 1
                    log.error("cs.bad_pagination", petition=slug, error=str(exc),
                              msg="what its pages showed so far is kept; the petition is "
                                  "walked again next cycle")
                except CSError:
                    raise  # ControlShift itself failed: the cycle is retried as a whole
                except Exception as exc:  # one odd record must not stop every other petition
                    report.malformed += 1
                    log.error("cs.malformed_petition", petition=slug,
                              reason=f"{type(exc).__name__}: {exc}", record=str(petition)[:200])
        if self.source != "bulk":
            self.cs.budget.saw_petitions(listed, is_launched)
        events_failed = None
        if self.sync_events:
            spent = self.cs.budget.meter.totals[current_purpose()]
            try:
                await self.events.cycle(org, full=full or first_run, report=report,
                                        fence=self.fence)
                report.event_requests = self.cs.budget.meter.totals[current_purpose()] - spent
            except CSAuthError:
                raise
            except CSError as exc:
                # What the petitions gave is kept and the cycle counts: events never walked are
                # walked next cycle anyway, old ones at the next sweep.
                metrics.poll_failures.inc()
                events_failed = str(exc)
                log.warning("poll.events_failed", error=str(exc), full=full)
        meta: dict[str, float | str] = {
            "last_poll_at": started,
            "last_poll_result": f"ok: {report.petitions} petitions, {report.walked} walked, "
                                f"{report.events} events, {report.events_walked} walked, "
                                f"{report.enqueued} new activities"
                                + (f", {report.malformed} malformed records" if report.malformed
                                   else "")
                                + (f"; events failed: {events_failed}" if events_failed else ""),
        }
        if full or first_run:
            meta["last_reconcile_at"] = started
        if first_run:
            meta["backfill_done"] = "1"
        await self.store.set_meta(**meta)
        self.cycles += 1
        metrics.poll_cycles.labels("full" if full or first_run else "incremental").observe(
            time.monotonic() - t0)
        log.info("poll.cycle", full=full, backfill=first_run, petitions=report.petitions,
                 walked=report.walked, events=report.events, events_walked=report.events_walked,
                 pages=report.pages, enqueued=report.enqueued,
                 malformed=report.malformed, ms=round((time.monotonic() - t0) * 1000))
        return report

    @staticmethod
    async def _nothing() -> AsyncIterator[Any]:
        return
        yield

    async def org_url(self) -> str | None:
        """The organisation's public URL (petition URLs are ``<it>/petitions/<slug>``)."""
        stored = await self.store.get_meta("org_url")
        if stored is None:
            url = (await self.cs.organisation()).get("url")
            stored = url.strip() if isinstance(url, str) and url.strip() else None
            if stored:
                await self.store.set_meta(org_url=stored)
        return stored or None

    async def _bulk_check(self, report: CycleReport) -> None:
        """With ``source = "bulk"``: one request (the organisation: credentials and URL) and
        whether the export files keep arriving. Stale exports are a problem of ``csand status``
        and /healthz, a warning in the log and the metric ``csand_bulk_last_file_age_seconds``."""
        org = await self.cs.organisation()
        url = org.get("url")
        if isinstance(url, str) and url.strip() and url.strip() != await self.store.get_meta(
                "org_url"):
            await self.store.set_meta(org_url=url.strip())
        now = self.clock()
        bulk = await self.store.bulk_status()
        stale: list[str] = []
        since = bulk.get("first_seen_at")
        for kind, limit, what in (
                ("incremental", self.bulk_stale[0], "incremental signatures export"),
                ("full", self.bulk_stale[1], "nightly full signatures export")):
            last = bulk.get(f"last_{kind}_signatures_at")
            age = now - datetime.fromisoformat(last or since).timestamp() if (
                last or since) else None
            metrics.bulk_last_file_age.labels(kind).set(age if age is not None else -1)
            if age is None:
                stale.append("no bulk-data file has arrived yet: with controlshift.source = "
                             "\"bulk\" signatures come only from them (check the bulk data "
                             "exports and the webhook endpoint in ControlShift)")
                break
            if age > limit:
                stale.append(f"no {what} for {age / 60:.0f} min (expected within "
                             f"{limit / 60:.0f} min)" + ("" if last else
                                                         ": none since csand first saw one"))
        if stale != self._stale_logged:  # once per change, not every cycle
            for reason in stale:
                log.warning("bulk.exports_stale", reason=reason)
            if not stale:
                log.info("bulk.exports_arriving")
            self._stale_logged = stale
        await self.store.set_meta(bulk_source=json.dumps(
            {"checked_at": now, "stale": stale}, separators=(",", ":")))

    async def _listing(self, into: list[dict[str, Any]]) -> AsyncIterator[Any]:
        """The petition list page by page, each page remembered in the directory (and added
        to ``into``) before its petitions are handed out."""
        async for items, _ in self.cs.pages("/petitions", "petitions"):
            self.directory.remember(items)
            into.extend(items)
            for petition in items:
                yield petition

    async def _sync_petition(
        self, petition: dict[str, Any], cs_id: int, slug: str, org: str, full: bool,
        report: CycleReport,
    ) -> None:
        state = await self.store.petition_state(cs_id)
        public = petition.get("public_signature_count")
        public = int(public) if isinstance(public, int | float) else None
        content = petition_content(petition)
        known = state is not None and state.content is not None
        whole = (
            full or not known or state.content != content or public is None
            or state.public_count is None or public < state.public_count
        )
        if not whole and public == state.public_count and petition.get("updated_at") == state.updated_at:
            return  # nothing moved: no signature request at all
        report.walked += 1
        petition_ref(petition, org)  # a malformed petition stops here, before any record
        batch = _Batch()
        extra = json.loads(state.creator_extra) if state and state.creator_extra else None
        try:
            batch.activities.append(creator_activity(petition, org, extra))
        except Exception as exc:  # a malformed creator: its dead letter; the signers still sync
            self._malformed(dead_letter("petition", creator_record(petition), exc,
                                        petition_id=cs_id,
                                        source_key=f"petition:{cs_id}:creator"),
                            slug, batch, report)
        seen = await self.store.signatures_seen(cs_id)
        live = sum(1 for s in seen.values() if not s.deleted_at)
        # How many unseen signatures to look for: the growth since the last walk, or more if an
        # earlier walk missed some (pages shift while being read). Counting only "live" records
        # would undercount when CS drops deleted signatures from its lists.
        expected_new = None if whole or public is None else max(
            0, public - live, public - (state.public_count or 0))

        total_pages = 1
        new_found = 0
        # New signatures sort together at one end of the list, whichever the (unknown) order:
        # on the first pages or on the last ones. Each edge (front: 1, 2, ...; back: N, N-1,
        # ...) is read from the outside in until a page on it holds a signature recorded
        # before this walk, which bounds any new ones on that side. Only when both edges are
        # bounded and enough new ones turned up may the walk stop early: otherwise a deletion
        # (the count grows by less than what was added) could hide a new signature.
        known_before = set(seen)
        early = expected_new is not None
        edges = 0  # N as page 1 said; 0: unknown (the back edge then stays open)
        front_closed = back_closed = False
        order = [1]
        index = 0
        deferred: list[int] = []  # pages of an edge already bounded, read only if need be
        walked: set[int] = set()
        complete = True
        while index < len(order) or deferred:
            if index == len(order):  # no early stop after all: read what was put off
                order.extend(deferred)
                deferred = []
                early = False
            page = order[index]
            index += 1
            front = page <= (edges + 1) // 2
            if early and page <= edges and (front_closed if front else back_closed):
                deferred.append(page)
                continue
            items, meta = await self.cs.signatures_page(slug, page)
            report.pages += 1
            bounded = False
            for record in items:
                new_found += self._see(record, petition, org, seen, batch, report)
                if isinstance(record, dict) and type(record.get("id")) is int:
                    walked.add(record["id"])
                    bounded = bounded or record["id"] in known_before
            try:
                page_total, next_page = pagination(
                    meta, page, f"/petitions/{slug}/signatures")
            except CSBadPage:
                # What this walk saw is kept (the petition's state is not: walked again).
                await self._commit(None, batch)
                raise
            if page == 1 and page_total:
                total_pages = edges = page_total
                order = edge_order(total_pages)
            if bounded and page == 1:
                front_closed = True
                back_closed = back_closed or edges == 1  # one page: both edges at once
            elif bounded and page <= edges:
                if front:
                    front_closed = True
                else:
                    back_closed = True
            if next_page and next_page > max(order):
                # No total_pages, or the petition grew during the walk: follow next_page too.
                order.append(next_page)
                total_pages = max(total_pages, next_page)
            if len(batch.pages) >= COMMIT_EVERY_PAGES:
                report.enqueued += await self._commit(None, batch)
                batch = _Batch()
            batch.pages.append(page)
            if early and new_found >= (expected_new or 0) and front_closed and back_closed:
                complete = False
                break
        if complete:  # every page was read
            await self._confirm_vanished(slug, cs_id, seen, walked, batch)
        new_state = PetitionState(
            cs_id=cs_id, slug=slug, updated_at=petition.get("updated_at"), public_count=public,
            content=content, total_pages=total_pages, an_uuid=None,
        )
        report.enqueued += await self._commit(new_state, batch)

    async def _confirm_vanished(
        self, slug: str, cs_id: int, seen: dict[int, SignatureSeen], walked: set[int],
        batch: _Batch,
    ) -> None:
        """Signatures that dropped out of a complete walk may have been deleted.

        Whether CS lists deleted signatures is not documented. One that vanished while it still
        waits in the outbox is looked up by email: only if CS confirms it is gone (or deleted) is
        it cancelled — a signature merely skipped by a page shift during the walk stays.
        """
        vanished = {f"signature:{sid}": sid for sid, s in seen.items()
                    if not s.deleted_at and sid not in walked}
        if not vanished:
            return
        waiting = await self.store.pending_signature_emails(cs_id)
        for source, email in waiting.items():
            sid = vanished.get(source)
            if sid is None or not email:
                continue
            found = await self.cs.lookup_signature(slug, email)
            if found is not None and found.get("id") == sid and not found.get("deleted_at"):
                continue
            row = SignatureSeen(sid, cs_id, "deleted", now_utc().isoformat(), None)
            seen[sid] = row
            batch.signatures.append(row)
            batch.deleted.append(source)
            log.info("cs.signature_vanished", source=source,
                     msg="no longer on ControlShift: treated as deleted, not synced")

    def _see(
        self, record: Any, petition: dict[str, Any], org: str, seen: dict[int, SignatureSeen],
        batch: _Batch, report: CycleReport,
    ) -> int:
        """Compare one signature with its recorded version; returns 1 if it is a new one.

        A record that cannot be read becomes a dead letter saying why; it counts as new unless
        csand recorded its id before, so the walk does not keep looking for it.
        """
        sig_id = record.get("id") if isinstance(record, dict) else None
        known = type(sig_id) is int and sig_id in seen
        try:
            seen_now = see_signature(record, petition, org, seen.get(sig_id) if known else None)
        except Exception as exc:  # one bad record must not stop the others
            self._malformed(dead_letter("signature", record, exc, petition_id=petition["id"]),
                            petition["slug"], batch, report)
            return 0 if known else 1
        if seen_now.row is not None:
            seen[seen_now.row.cs_id] = seen_now.row
            batch.signatures.append(seen_now.row)
        if seen_now.activity is not None:
            batch.activities.append(seen_now.activity)
        if seen_now.cancel is not None:
            batch.deleted.append(seen_now.cancel)
            log.info("cs.signature_deleted", source=seen_now.cancel,
                     msg="deleted on ControlShift: not synced further; AN unchanged")
        return 1 if seen_now.new else 0

    @staticmethod
    def _malformed(letter: DeadLetter, slug: str, batch: _Batch, report: CycleReport) -> None:
        report.malformed += 1
        batch.dead.append(letter)
        log.error(f"cs.malformed_{letter.kind}", petition=slug, source=letter.source_key,
                  reason=letter.reason,
                  msg="kept as a dead letter; syncs by itself once corrected on ControlShift")

    async def _commit(self, state: PetitionState | None, batch: _Batch) -> int:
        return await self.store.commit_poll(state, batch.signatures, batch.activities,
                                            batch.deleted, dead_letters=batch.dead,
                                            fence=self.fence)


class _Batch:
    __slots__ = ("activities", "signatures", "deleted", "dead", "pages", "attendees")

    def __init__(self) -> None:
        self.activities: list[Activity] = []
        self.signatures: list[SignatureSeen] = []
        self.deleted: list[str] = []
        self.dead: list[DeadLetter] = []
        self.pages: list[int] = []
        self.attendees: list[AttendeeSeen] = []


def event_slug(event: Any) -> str:
    """The slug of an event record; :class:`MalformedRecord` when it has none."""
    if not isinstance(event, dict):
        raise MalformedRecord(f"event is not an object ({type(event).__name__})")
    slug = (text_field(event, "slug", required=True) or "").strip()
    if not slug:
        raise MalformedRecord("slug is empty")
    return slug


def with_host_extra(event: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """The event with what a webhook told csand of its host (split names, opt-in) merged into
    the REST host, when it was given for the same email (a new host does not inherit it)."""
    host = event.get("host")
    if not extra or not isinstance(host, dict):
        return event
    email = host.get("email")
    if extra.get("for_email") != (normalize_email(email) if isinstance(email, str) else None):
        return event
    merged = {**host, **{k: v for k, v in extra.items() if k != "for_email"}}
    return {**event, "host": merged}


def host_record(event: dict[str, Any]) -> dict[str, Any]:
    """What a malformed host's dead letter holds (not the whole event: a new title is not a new
    dead letter)."""
    return {key: event.get(key) for key in ("slug", "launched_at", "created_at", "host")}


class EventSync:
    """Events, hosts and attendees: one event at a time, from a poll or a webhook.

    The poller runs :meth:`cycle`; the webhook processor runs :meth:`sync` on the REST copy of
    one event, so both sources build the same activities (the same dedupe keys). Commits of one
    event are serialised here.
    """

    def __init__(self, cs: ControlShiftClient, store: Storage, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.cs = cs
        self.store = store
        self.clock = clock
        self._locks: dict[str, anyio.Lock] = {}
        self._calendars: dict[str, dict[str, Any]] = {}  # slug → GET /calendars/{slug}

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def lock(self, slug: str) -> anyio.Lock:
        return self._locks.setdefault(slug, anyio.Lock())

    async def cycle(self, org: str, *, full: bool, report: CycleReport,
                    fence: tuple[str, int] | None) -> None:
        """Every listed event; ``full`` walks the attendees of every one of them."""
        for event in await self.cs.events():
            try:
                slug = event_slug(event)
            except MalformedRecord as exc:
                report.malformed += 1
                log.error("cs.malformed_event", reason=f"event without a slug: {exc}",
                          record=str(event)[:200])
                continue
            try:
                async with self.lock(slug):
                    await self.sync(event, org, full=full, fence=fence, report=report)
            except CSNotFound as exc:  # deleted while being read: the others go on
                log.warning("cs.event_gone", event_slug=slug, error=str(exc))
            except CSBadPage as exc:
                report.malformed += 1
                log.error("cs.bad_pagination", event_slug=slug, error=str(exc),
                          msg="what its pages showed so far is kept; the event's attendees are "
                              "walked again next cycle")
            except CSError:
                raise  # ControlShift itself failed: the cycle is retried as a whole
            except MalformedRecord as exc:
                report.malformed += 1
                log.error("cs.malformed_event", event_slug=slug, reason=str(exc),
                          record=str(event)[:200])
            except StoreError:
                raise  # NotLeader and the like: not about this event
            except Exception as exc:
                report.malformed += 1
                log.error("cs.malformed_event", event_slug=slug,
                          reason=f"{type(exc).__name__}: {exc}", record=str(event)[:200])

    async def ref(self, event: dict[str, Any], org: str) -> EventRef:
        """The event's reference, in its calendar when the payload names one; raises
        :class:`MalformedRecord`. A calendar's name and description come from
        ``GET /calendars/{slug}`` (once per calendar and process) when the payload lacks them:
        they become the AN event campaign's."""
        raw = event.get("calendar")
        if raw is not None and not isinstance(raw, dict):
            raise MalformedRecord(f"calendar is not an object ({type(raw).__name__})")
        if raw and isinstance(raw.get("slug"), str) and not (raw.get("name")
                                                               and raw.get("description")):
            raw = {**(await self._calendar(raw["slug"])), **{k: v for k, v in raw.items() if v}}
        return event_ref(event, org, calendar_ref(raw, org) if raw else None)

    async def _calendar(self, slug: str) -> dict[str, Any]:
        if slug not in self._calendars:
            try:
                found = await self.cs.calendar(slug)
            except CSError as exc:  # the event still syncs, its campaign named by the slug
                log.warning("cs.calendar_unreadable", calendar=slug, error=str(exc))
                return {}
            self._calendars[slug] = found or {}
        return self._calendars[slug]

    def recent(self, start_at: str | None, end_at: str | None) -> bool:
        """Whether an event ended (else started) less than RECENT_EVENT_DAYS ago, or is to come;
        an event with neither time counts as recent."""
        when = parse_time(end_at) or parse_time(start_at)
        return when is None or when >= self.now() - timedelta(days=RECENT_EVENT_DAYS)

    async def sync(
        self, event: dict[str, Any], org: str, *, full: bool = False, walk: bool | None = None,
        fence: tuple[str, int] | None = None, event_id: int | None = None,
        inappropriate: bool = False, host_extra: dict[str, Any] | None = None,
        report: CycleReport | None = None,
    ) -> str:
        """Record and enqueue what one REST ``event`` shows: its host, a change of its content,
        and (when ``walk``; by default when ``full``, never walked or recent) its attendees.

        ``inappropriate`` and ``host_extra`` are what a webhook said now (recorded with it);
        ``event_id`` marks that webhook processed in the last commit. Returns a note.
        """
        report = report if report is not None else CycleReport()
        slug = event_slug(event)
        state = await self.store.event_state(slug)
        extra_json = json.dumps(host_extra, sort_keys=True) if host_extra is not None else None
        extra = host_extra if host_extra is not None else (
            json.loads(state.host_extra) if state and state.host_extra else None)
        flagged = inappropriate or (state is not None and state.inappropriate)
        if not is_syncable_event(event, inappropriate=flagged):
            if event_id is not None or inappropriate or extra_json is not None:
                await self.store.commit_poll(
                    None, event=EventState(slug, inappropriate=inappropriate,
                                           host_extra=extra_json),
                    event_id=event_id, fence=fence)
            return "event not launched or moderated as inappropriate: not synced"
        report.events += 1
        batch = _Batch()
        try:
            ref = await self.ref(event, org)
        except Exception as exc:  # nothing of it syncs until corrected
            self._malformed(dead_letter("event", event, exc, source_key=f"event:{slug}"),
                            slug, batch, report)
            await self.store.commit_poll(
                None, dead_letters=batch.dead, event_id=event_id, fence=fence,
                event=EventState(slug, host_extra=extra_json) if extra_json else None)
            return "malformed event: kept as a dead letter"
        try:
            batch.activities.append(host_activity(with_host_extra(event, extra), ref))
        except Exception as exc:  # the host's dead letter; the attendees still sync
            self._malformed(dead_letter("event", host_record(event), exc,
                                        source_key=f"event:{slug}:host"), slug, batch, report)
        walked_before = state is not None and state.content is not None
        if walk is None:
            walk = full or not walked_before or self.recent(ref.start_at, ref.end_at)
        if walk:
            report.events_walked += 1
            batch = await self._walk(slug, ref, batch, report, fence)
        content = ref.content()
        if walked_before and state is not None and state.content != content:
            batch.activities.append(event_change_activity(ref, self.now()))
        new_state = EventState(slug, content=content,
                               calendar_slug=ref.calendar.slug if ref.calendar else None,
                               inappropriate=inappropriate, host_extra=extra_json)
        added = await self._commit(batch, fence, state=new_state, event_id=event_id)
        report.enqueued += added
        return f"{added} new activities" + (", attendees walked" if walk else "")

    async def _walk(self, slug: str, ref: EventRef, batch: _Batch, report: CycleReport,
                    fence: tuple[str, int] | None) -> _Batch:
        """Every attendee page; attendees seen before and gone from the listing are deleted."""
        seen = await self.store.attendees_seen(slug)
        listed: set[int] = set()
        page: int | None = 1
        read: set[int] = set()
        while page is not None and page not in read:
            items, meta = await self.cs.attendees_page(slug, page)
            read.add(page)
            report.pages += 1
            for record in items:
                self._see(record, ref, seen, batch, report)
                if isinstance(record, dict) and type(record.get("id")) is int:
                    listed.add(record["id"])
            try:
                _, page = pagination(meta, page, f"/events/{slug}/attendees")
            except CSBadPage:
                await self._commit(batch, fence)  # what was seen is kept, the event is not
                raise
            batch.pages.append(len(read))
            if len(batch.pages) >= COMMIT_EVERY_PAGES:
                report.enqueued += await self._commit(batch, fence)
                batch = _Batch()
        vanished = {aid for aid, row in seen.items() if not row.deleted_at and aid not in listed}
        if vanished:
            # Deleted attendees are not listed; one merely skipped by a page shift during the
            # walk is: a second listing confirms the deletion first.
            again = {a.get("id") for a in await self.cs.attendees(slug) if isinstance(a, dict)}
            at = self.now().isoformat()
            for aid in sorted(vanished - again):
                row = AttendeeSeen(aid, slug, "deleted", at, seen[aid].updated_at)
                batch.attendees.append(row)
                batch.deleted.append(f"attendee:{aid}")
                log.info("cs.attendee_vanished", event_slug=slug, source=f"attendee:{aid}",
                         msg="no longer on ControlShift: treated as deleted, not synced")
        return batch

    def _see(self, record: Any, ref: EventRef, seen: dict[int, AttendeeSeen], batch: _Batch,
             report: CycleReport) -> None:
        aid = record.get("id") if isinstance(record, dict) else None
        known = type(aid) is int and aid in seen
        try:
            if not isinstance(record, dict):
                raise MalformedRecord(f"attendee is not an object ({type(record).__name__})")
            now = see_attendee(record, ref, seen.get(aid) if known else None)
        except Exception as exc:  # one bad record must not stop the others
            self._malformed(dead_letter("attendee", record, exc), ref.slug, batch, report)
            return
        if now.row is not None:
            seen[now.row.cs_id] = now.row
            batch.attendees.append(now.row)
        if now.activity is not None:
            batch.activities.append(now.activity)
        if now.cancel is not None:
            batch.deleted.append(now.cancel)
            log.info("cs.attendee_not_attending", source=now.cancel,
                     msg="declined, no-show or deleted on ControlShift: not synced further")

    @staticmethod
    def _malformed(letter: DeadLetter, slug: str, batch: _Batch, report: CycleReport) -> None:
        report.malformed += 1
        batch.dead.append(letter)
        log.error(f"cs.malformed_{letter.kind}", event_slug=slug, source=letter.source_key,
                  reason=letter.reason,
                  msg="kept as a dead letter; syncs by itself once corrected on ControlShift")

    async def _commit(self, batch: _Batch, fence: tuple[str, int] | None, *,
                      state: EventState | None = None, event_id: int | None = None) -> int:
        return await self.store.commit_poll(
            None, activities=batch.activities, deleted_sources=batch.deleted,
            dead_letters=batch.dead, fence=fence, event=state, attendees=batch.attendees,
            event_id=event_id)
