"""``csand audit``: does Action Network still hold what csand synced? The fetching around
:mod:`csand.drift`, which decides.

Two ways to look:

* **A sample** (``--sample N``): N activities csand synced, picked at random from its store
  (creators, signers, event hosts, attendees, org-wide unsubscribes). Per activity: the
  signature's current version on ControlShift (signers only: 1 CS request), the person by email,
  their taggings and their signatures, or their attendances for a host or an attendee (3 AN
  requests; 1 for an org-wide unsubscribe). A petition is looked up (1-2 more) only when a
  signature is missing from it.
* **One petition** (``--petition SLUG``): every activity csand synced for it; the petition's
  ControlShift signatures and its AN signatures are walked page by page (25 a page on AN), so
  per activity only the person and their taggings are asked for (2 AN requests).

Budgets: AN requests go through a bucket of their own at ``audit.an_share`` of AN's rate, and
through the shared bucket of the running daemons on PostgreSQL; on SQLite the audit announces its
share in the store and waits for a running daemon to leave it
(:class:`csand.ratelimit.Reservation`). ControlShift requests take ``audit.cs_share`` of its
budget. ``--repair`` queues the activities of repairable findings again (a fresh dedupe key,
:meth:`csand.storage.Outbox.requeue_items`): the daemon then syncs them by the usual rules.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx

from csand import __version__
from csand.actionnetwork.client import ActionNetworkClient, ANFailure
from csand.actionnetwork.errors import Verdict
from csand.config import Settings
from csand.controlshift.client import ControlShiftClient, CSError, CSNotFound, configured_client
from csand.drift import (
    ANPerson,
    ANPetition,
    Consent,
    CSState,
    Finding,
    Kind,
    Summary,
    Synced,
    activity_findings,
    consent_from,
    cs_state,
    duplicate_petitions,
    petition_findings,
)
from csand.model import Activity, ActivityKind, normalize_email
from csand.ratelimit import (
    HONOURED_KEY,
    RESERVATION_KEY,
    Reservation,
    SharedTokenBucket,
    TokenBucket,
)
from csand.storage import Storage
from csand.storage.sqlite import AlreadyRunning, single_instance

T = TypeVar("T")

AN_HEADROOM = 0.97  # as the daemon's bucket: 3% under AN's limit
RESERVATION_SECONDS = 30.0  # an announced share expires this long after its last renewal
RENEW_SECONDS = 10.0
HONOUR_WAIT_SECONDS = 12.0  # a daemon leaves an announced share at its next heartbeat (5 s)
CONCURRENCY = 4  # activities checked at once (the buckets pace the requests)
READ_ATTEMPTS = 3  # a read AN answers 5xx or "200 {}" is asked again before giving up


class AuditFailed(Exception):
    """The audit could not be done (a service unreachable, a key refused): exit code 2."""


class AuditLimiter(TokenBucket):
    """The audit's own share of AN's rate, and, on PostgreSQL, a slot of the daemons' shared
    bucket for each request too: the audit never takes more than its share, and what it takes
    the daemons do not."""

    def __init__(self, rate: float, shared: SharedTokenBucket | None = None) -> None:
        super().__init__(rate)
        self.shared = shared

    async def acquire(self) -> None:
        await super().acquire()
        if self.shared is not None:
            await self.shared.acquire()

    def on_rate_limited(self, retry_after: float | None = None) -> float:
        if self.shared is not None:
            self.shared.on_rate_limited(retry_after)
        return super().on_rate_limited(retry_after)


@dataclass
class Report:
    mode: str  # "sample" or "petition"
    checked: int = 0  # activities compared with AN
    skipped: dict[str, int] = field(default_factory=dict)  # not judged, by reason
    summary: Summary = field(default_factory=Summary)
    an_requests: int = 0
    cs_requests: int = 0
    seconds: float = 0.0
    an_rate: float = 0.0
    repair: dict[str, int] | None = None
    petition: str | None = None

    @property
    def drift(self) -> bool:
        return bool(self.summary.findings)

    def to_json(self) -> dict[str, Any]:
        per = self.an_requests / self.checked if self.checked else 0.0
        return {
            "mode": self.mode, "petition": self.petition, "checked": self.checked,
            "skipped": self.skipped, "drift": self.drift, "by_kind": self.summary.by_kind(),
            "findings": [f.to_json() for f in self.summary.findings],
            "an_requests": self.an_requests, "cs_requests": self.cs_requests,
            "an_requests_per_activity": round(per, 2), "seconds": round(self.seconds, 1),
            "an_rate": round(self.an_rate, 3), "repair": self.repair,
        }


Progress = Callable[[int, int], None]  # (done, total)


class Auditor:
    """Compares what csand synced with what AN holds, through the audit's budgets."""

    def __init__(self, store: Storage, an: ActionNetworkClient, cs: ControlShiftClient, *,
                 org_slug: str, origin_system: str, progress: Progress | None = None) -> None:
        self.store = store
        self.an = an
        self.cs = cs
        self.org_slug = org_slug
        self.origin_system = origin_system
        self.progress = progress or (lambda done, total: None)
        self._tag_names: dict[str, str] = {}  # tag uuid -> lower-cased name
        self._petition_uuid: dict[int, str | None] = {}
        self._petition_checked: dict[int, list[Finding]] = {}
        self._people: dict[tuple[str, bool, bool, bool], ANPerson | None] = {}
        self._event_uuids: dict[str, str | None] = {}

    # ---- the two ways to look ----

    async def sample(self, n: int, report: Report) -> None:
        rows = await self.store.audit_sample(n)
        await self._load_tags()
        await self._check_rows(rows, report, signer_ids=None, cs_records=None)

    async def petition(self, slug: str, report: Report) -> None:
        try:
            record = (await self.cs.get_object(f"/petitions/{slug}")).get("petition") or {}
        except CSNotFound:
            raise LookupError(f"ControlShift has no petition {slug!r}") from None
        cs_id = record.get("id")
        if not isinstance(cs_id, int):
            raise AuditFailed(f"ControlShift's petition {slug!r} has no numeric id")
        rows = await self.store.audit_sample(None, petition_id=cs_id)
        await self._load_tags()
        cs_records: dict[int, dict[str, Any]] = {}
        async for items, _ in self.cs.pages(f"/petitions/{slug}/signatures", "signatures"):
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("id"), int):
                    cs_records[item["id"]] = item
        found = await self._check_petition(cs_id, slug, rows)
        report.summary.add(found)
        missing = any(f.kind is Kind.PETITION_MISSING for f in found)
        signer_ids: set[str] | None = None
        if not missing:  # the signatures csand made are on the petition it recorded
            uuid = await self._recorded_uuid(cs_id)
            signer_ids = await self._read(self.an.petition_signer_ids, uuid) if uuid else set()
        await self._check_rows(rows, report, signer_ids=signer_ids, cs_records=cs_records,
                               petition_missing=missing)

    async def duplicates(self, report: Report) -> None:
        """Copies of mirrored petitions, over the group's whole petition list (25 a page)."""
        petitions = await self._read(self.an.all_petitions)
        report.summary.add(duplicate_petitions(
            petitions, f"controlshift-{self.org_slug}:petition-", self.origin_system))

    # ---- one activity at a time ----

    async def _check_rows(self, rows: list[dict[str, Any]], report: Report, *,
                          signer_ids: set[str] | None,
                          cs_records: dict[int, dict[str, Any]] | None,
                          petition_missing: bool = False) -> None:
        total = len(rows)
        done = 0
        queue = iter(rows)
        self.progress(0, total)

        async def worker() -> None:
            nonlocal done
            for row in queue:
                await self._check_row(row, report, signer_ids, cs_records, petition_missing)
                done += 1
                self.progress(done, total)

        async with anyio.create_task_group() as tg:
            for _ in range(min(CONCURRENCY, max(1, total))):
                tg.start_soon(worker)

    async def _check_row(self, row: dict[str, Any], report: Report,
                         signer_ids: set[str] | None,
                         cs_records: dict[int, dict[str, Any]] | None,
                         petition_missing: bool) -> None:
        activity = Activity.from_json(row["payload"])
        ref = activity.petition
        pet_uuid = await self._recorded_uuid(ref.cs_id) if ref else None
        event_uuid = await self._event_uuid(activity.event.slug) if activity.event else None
        synced = Synced(row["id"], activity, pet_uuid, event_uuid)
        cs = await self._cs_state(activity, cs_records)
        if cs in (CSState.GONE, CSState.CHANGED):
            key = "deleted on ControlShift since" if cs is CSState.GONE else \
                "changed on ControlShift since (its sync is due)"
            report.skipped[key] = report.skipped.get(key, 0) + 1
            return
        person_activity = activity.kind is not ActivityKind.GLOBAL_UNSUBSCRIBE
        assert activity.email is not None
        person = await self._an_person(
            activity, tags=person_activity,
            petitions=ref is not None and signer_ids is None and not petition_missing,
            events=activity.event is not None)
        if person is not None and signer_ids is not None and pet_uuid:
            person = ANPerson(person.uuid, person.subscribed, person.tags,
                              frozenset({pet_uuid}) if person.uuid in signer_ids else frozenset(),
                              person.events)
        consent = await self._consent(activity.email)
        found = activity_findings(synced, cs, consent, person,
                                  petition_checked=not petition_missing)
        if ref is not None and any(f.kind is Kind.SIGNATURE_MISSING for f in found) \
                and signer_ids is None:
            # Is the petition itself gone (or doubled)? Then that is the finding.
            petition = await self._check_petition(ref.cs_id, ref.slug, None)
            if petition:
                found = [f for f in found if f.kind is not Kind.SIGNATURE_MISSING] + petition
        report.checked += 1
        report.summary.add(found)

    async def _cs_state(self, activity: Activity,
                        cs_records: dict[int, dict[str, Any]] | None) -> CSState:
        if activity.kind is not ActivityKind.SIGNATURE or activity.petition is None:
            return CSState.UNKNOWN  # csand's record of creators and unsubscribes stands
        sig_id = int(activity.source_key.split(":", 1)[1])
        if cs_records is not None:
            return cs_state(cs_records.get(sig_id), activity)
        assert activity.email is not None
        record = await self.cs.lookup_signature(activity.petition.slug,
                                                activity.raw_email or activity.email)
        if record is not None and record.get("id") != sig_id:
            record = None  # another signature of the same person: ours is gone
        return cs_state(record, activity)

    async def _an_person(self, activity: Activity, *, tags: bool, petitions: bool,
                         events: bool = False) -> ANPerson | None:
        assert activity.email is not None
        key = (activity.email, tags, petitions, events)
        if key in self._people:
            return self._people[key]
        spelled = (activity.raw_email or "").strip()
        also = (spelled,) if spelled and spelled != activity.email else ()
        found = await self._read(self.an.find_person, activity.email, also)
        person: ANPerson | None = None
        if found is not None:
            tag_names: frozenset[str] = frozenset()
            signed: frozenset[str] | None = None
            attended: frozenset[str] | None = None
            try:
                if tags:
                    ids = await self._read(self.an.person_tag_ids, found.uuid)
                    if any(i not in self._tag_names for i in ids):
                        await self._load_tags()  # a tag created since the audit began
                    tag_names = frozenset(self._tag_names.get(i, "") for i in ids) - {""}
                if petitions:
                    signed = frozenset(await self._read(self.an.person_petition_ids, found.uuid))
                if events:
                    attended = frozenset(await self._read(self.an.person_event_ids, found.uuid))
            except ANFailure as failure:
                if failure.outcome.verdict is not Verdict.GONE:
                    raise
                found = None  # erased between the two answers
            if found is not None:
                person = ANPerson(found.uuid, found.subscribed, tag_names, signed, attended)
        self._people[key] = person
        return person

    async def _consent(self, email: str) -> Consent:
        return consent_from(await self.store.person(email), await self.store.person_items(email))

    async def _event_uuid(self, slug: str) -> str | None:
        if slug not in self._event_uuids:
            self._event_uuids[slug] = await self.store.event_uuid(slug)
        return self._event_uuids[slug]

    async def _recorded_uuid(self, cs_id: int) -> str | None:
        if cs_id not in self._petition_uuid:
            self._petition_uuid[cs_id] = await self.store.petition_uuid(cs_id)
        return self._petition_uuid[cs_id]

    async def _check_petition(self, cs_id: int, slug: str, rows: list[dict[str, Any]] | None
                              ) -> list[Finding]:
        """The mirrored petition's findings (each petition asked once); a missing one is
        repaired by replaying every activity csand synced for it."""
        if cs_id in self._petition_checked:
            return self._petition_checked[cs_id]
        recorded = await self._recorded_uuid(cs_id)
        identifier = f"controlshift-{self.org_slug}:petition-{cs_id}"
        owner = await self._read(self.an.find_petition, identifier)
        exists: bool | None = None
        if recorded and owner != recorded:
            exists = (await self._read(self.an.get_petition, recorded)) is not None
        elif recorded:
            exists = True
        if rows is None:
            rows = await self.store.audit_sample(None, petition_id=cs_id)
        items = [r["id"] for r in rows if r["kind"] != ActivityKind.GLOBAL_UNSUBSCRIBE]
        found = petition_findings(cs_id, slug, ANPetition(recorded, exists, owner), items)
        self._petition_checked[cs_id] = found
        return found

    async def _load_tags(self) -> None:
        tags = await self._read(self.an.list_tags)
        self._tag_names = {uuid: name.lower() for name, uuid in tags.items() if uuid}

    async def _read(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """An AN read; a transient failure (5xx, "200 {}", a dropped connection) is asked
        again a few times, since an audit that stops halfway tells nothing."""
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                return await fn(*args)
            except ANFailure as failure:
                if failure.outcome.verdict is not Verdict.RETRY or attempt == READ_ATTEMPTS:
                    raise
                await anyio.sleep(0.5 * attempt)
        raise AssertionError("unreachable")


# ---- running it ----


async def run_audit(settings: Settings, store: Storage, *, sample: int | None,
                    petition: str | None, repair: bool, duplicates: bool,
                    an_rate: float | None = None, progress: Progress | None = None,
                    an_transport: httpx.AsyncBaseTransport | None = None,
                    cs_transport: httpx.AsyncBaseTransport | None = None) -> Report:
    """Run one audit (raises :class:`AuditFailed` when it cannot be done)."""
    s = settings
    started = time.monotonic()
    report = Report(mode="petition" if petition else "sample", petition=petition)
    full = s.action_network.requests_per_second * AN_HEADROOM
    rate = an_rate if an_rate is not None else s.action_network.requests_per_second * \
        s.audit.an_share * AN_HEADROOM
    rate = min(rate, full)
    report.an_rate = rate
    shared = SharedTokenBucket(store, s.action_network.requests_per_second,
                               headroom=AN_HEADROOM) if store.shared else None
    headers = {"User-Agent": f"csand/{__version__} (audit)"}
    async with httpx.AsyncClient(transport=an_transport, timeout=s.action_network.timeout,
                                 headers=headers) as an_http, \
            httpx.AsyncClient(transport=cs_transport, timeout=s.controlshift.timeout,
                              headers=headers) as cs_http:
        an = ActionNetworkClient(an_http, s.action_network.url,
                                 s.action_network.api_key.get_secret_value(),  # type: ignore[union-attr]
                                 AuditLimiter(rate, shared))
        cs = configured_client(s.controlshift, cs_http, share=s.audit.cs_share)
        try:
            try:
                org_slug = s.controlshift.org_slug or str(
                    (await cs.organisation()).get("slug") or "")
                if not org_slug:
                    raise AuditFailed("ControlShift named no organisation slug: set "
                                      "controlshift.org_slug")
                if not await an.check_key():
                    raise AuditFailed("Action Network rejected the API key")
                auditor = Auditor(store, an, cs, org_slug=org_slug,
                                  origin_system=s.sync.origin_system, progress=progress)
                async with _announced(store, s, rate):
                    if petition:
                        await auditor.petition(petition, report)
                    else:
                        await auditor.sample(sample or s.audit.sample, report)
                    if duplicates:
                        await auditor.duplicates(report)
            except BaseExceptionGroup as group:  # from a task group: the one inside
                raise _first(group) from None
        except ANFailure as failure:
            raise AuditFailed(f"Action Network: {failure.outcome.reason}") from None
        except CSError as exc:
            raise AuditFailed(str(exc)) from None
        report.an_requests = an.requests
        report.cs_requests = cs.requests
    if repair:
        ids = report.summary.repair_items()
        result = await store.requeue_items(ids, "audit")
        report.repair = {"items": len(ids), "queued": result.queued,
                         "already_queued": len(ids) - result.queued - result.skipped_deleted
                         - result.skipped_pruned,
                         "skipped_deleted": result.skipped_deleted,
                         "skipped_pruned": result.skipped_pruned}
    report.seconds = time.monotonic() - started
    return report


def _first(group: BaseExceptionGroup) -> BaseException:
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found


@asynccontextmanager
async def _announced(store: Storage, settings: Settings, rate: float) -> AsyncIterator[None]:
    """On SQLite, while the audit runs: its AN share announced in the store (renewed), and,
    when a daemon runs, a wait until it has left that share (at its next heartbeat)."""
    if store.shared:  # PostgreSQL: the audit takes slots of the daemons' shared bucket
        yield
        return

    async def announce() -> float:
        until = time.time() + RESERVATION_SECONDS
        await store.set_meta(**{RESERVATION_KEY: Reservation(rate, until).to_meta()})
        return until

    async def renew() -> None:
        while True:
            await anyio.sleep(RENEW_SECONDS)
            await announce()

    first = await announce()
    try:
        if _daemon_running(settings):
            deadline = time.monotonic() + HONOUR_WAIT_SECONDS
            for _ in range(int(HONOUR_WAIT_SECONDS / 0.2)):
                if float(await store.get_meta(HONOURED_KEY) or 0) >= first or \
                        time.monotonic() > deadline:
                    break
                await anyio.sleep(0.2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(renew)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await store.set_meta(**{RESERVATION_KEY: None})


def _daemon_running(settings: Settings) -> bool:
    """A daemon holds the SQLite store's lock file."""
    try:
        with single_instance(Path(settings.store.path)):
            return False
    except AlreadyRunning:
        return True


def emails_masked(report: dict[str, Any]) -> dict[str, Any]:
    """The JSON report with every finding's email masked (``a***@example.org``)."""
    from csand.logs import mask_email

    for finding in report["findings"]:
        if finding.get("email"):
            finding["email"] = mask_email(normalize_email(finding["email"]) or "")
        finding["detail"] = mask_email(finding["detail"])
    return report
