"""Workers: lease items from the outbox, apply them to AN under the shared limiter, record outcomes.

One dispatcher leases as many items as there are idle workers (the lease query already keeps a
person's items one at a time and in order) and runs each in its own task. Each item is applied by
asking :func:`csand.sync.rules.next_step` what to do next until it says done or dead; every AN
operation is idempotent (helpers match by email, signing again overwrites, tags are sets, the
mirrored petition is looked up by identifier before it is created), so replaying an item after a
crash between AN's answer and csand's commit duplicates nothing.

Two checks keep consent under every interleaving. Before each AN request the worker asks the
store whether it still holds the lease and whether ControlShift deleted the record meanwhile
(:meth:`Storage.guard`): either way it sends nothing more. And every person write AN acknowledges
mid-plan (the opt-in above all) is persisted at once (:meth:`Storage.record_step`), so a retry, a
shutdown or a crash continues the plan instead of replaying it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

import anyio

from csand import metrics
from csand.actionnetwork.client import ActionNetworkClient, ANFailure, before_request
from csand.actionnetwork.errors import Outcome, Verdict
from csand.logs import get_logger
from csand.model import Activity, ActivityKind, CalendarRef, EventRef, PetitionRef
from csand.retry import OUTBOX, RetryPolicy
from csand.storage import Item, Storage
from csand.sync import rules
from csand.sync.adopter import Adopter

log = get_logger("worker")


class TagCache:
    """AN ignores unknown names in ``add_tags``, so every tag is created before first use."""

    def __init__(self, an: ActionNetworkClient, store: Storage) -> None:
        self._an = an
        self._store = store
        self._known: set[str] | None = None  # lower-cased names AN is known to have
        self._lock = anyio.Lock()

    async def ensure(self, names: tuple[str, ...]) -> None:
        if self._known is not None and all(n.lower() in self._known for n in names):
            return
        async with self._lock:
            if self._known is None:
                self._known = set((await self._store.tags()).keys())
            missing = [n for n in names if n.lower() not in self._known]
            if not missing:
                return
            # Another tool (or an earlier run) may have created them: read AN's list once.
            existing = await self._an.list_tags()
            await self._store.save_tags(existing.items())
            self._known |= {n.lower() for n in existing}
            for name in missing:
                if name.lower() in self._known:
                    continue
                uuid = await self._an.create_tag(name)
                await self._store.save_tags([(name, uuid)])
                self._known.add(name.lower())
                log.info("an.tag_created", tag=name)


class PetitionMirror:
    """Creates each CS petition's AN twin exactly once, also across crashes.

    A per-petition lock serialises creation in this process, the store's mirror lock across the
    instances sharing a database; across a crash the identifier lookup before creating finds a
    petition whose creation (or adoption) csand did not get to record. Before creating, the
    twin ControlShift's hosted integration made is adopted (:mod:`csand.sync.adopter`).
    """

    def __init__(self, an: ActionNetworkClient, store: Storage, origin_system: str) -> None:
        self._an = an
        self._store = store
        self._origin = origin_system
        self._locks: dict[int, anyio.Lock] = {}
        self._known: dict[int, str] = {}  # cs id → AN uuid, once mirrored (never changes)
        self._adopter = Adopter(an, store, origin_system)

    async def forget(self, cs_id: int, gone: str | None) -> None:
        """AN no longer has petition ``gone``: forget it, but not a twin mirrored since by
        another worker that met the same 404 first."""
        lock = self._locks.setdefault(cs_id, anyio.Lock())
        async with lock:
            if self._known.get(cs_id) == gone:
                self._known.pop(cs_id, None)
            await self._store.clear_petition_uuid(cs_id, gone)

    async def ensure(self, petition: PetitionRef, creator_uuid: str | None) -> str:
        known = self._known.get(petition.cs_id)
        if known:
            return known
        lock = self._locks.setdefault(petition.cs_id, anyio.Lock())
        # In this process the lock, across instances on one database the store's lock: both
        # found no twin and created one otherwise (AN refuses the second identifier).
        async with lock, self._store.mirror_lock(petition.cs_id):
            uuid = await self._store.petition_uuid(petition.cs_id)
            if uuid and not await self._adopter.identified(petition, uuid):
                uuid = None  # adopted by `csand adopt`, and gone from AN since
            if uuid:
                self._known[petition.cs_id] = uuid
                return uuid
            uuid = await self._an.find_petition(petition.identifier)
            if uuid is None:  # the hosted integration's twin, if it made one
                uuid = await self._adopter.adopt(petition)
            if uuid is None:
                if creator_uuid is None and petition.creator_email:
                    creator_uuid = (await self._store.person(petition.creator_email)).uuid
                if creator_uuid is None and petition.creator_email:
                    # Not synced by csand (an activity before sync.history_start, a creator
                    # record that is malformed or waits): AN may know the person all the same,
                    # and the link can only be set now. A read: nobody's consent changes.
                    found = await self._an.find_person(petition.creator_email)
                    creator_uuid = found.uuid if found else None
                description = f"Petition on ControlShift: {petition.url or petition.slug}"
                try:
                    uuid = await self._an.create_petition(
                        title=petition.title, description=description,
                        identifier=petition.identifier, origin_system=self._origin,
                        creator_uuid=creator_uuid,
                    )
                except ANFailure as failure:
                    if failure.outcome.verdict is not Verdict.DEAD or creator_uuid is None:
                        raise
                    # A creator csand knew may be gone from AN: the petition matters more.
                    log.warning("an.creator_link_refused", petition=petition.slug,
                                reason=failure.outcome.reason)
                    creator_uuid = None
                    uuid = await self._an.create_petition(
                        title=petition.title, description=description,
                        identifier=petition.identifier, origin_system=self._origin,
                        creator_uuid=None,
                    )
                log.info("an.petition_created", petition=petition.slug, an_petition=uuid,
                         creator_linked=creator_uuid is not None)
            await self._store.set_petition_uuid(petition.cs_id, petition.slug, uuid)
            self._known[petition.cs_id] = uuid
            return uuid


@dataclass
class WorkerStats:
    done: int = 0
    dead: int = 0
    retried: int = 0
    cancelled: int = 0
    lost: int = 0


class Stop(Exception):
    """The plan stops before its next AN request; ``why`` is ``deleted`` (ControlShift deleted
    the record), ``lost`` (the lease was handed out again) or ``shutdown``."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class Replan(Exception):
    """A newer org-wide unsubscribe of the person became known mid-plan: decide again."""

    def __init__(self, unsubscribed_at: datetime | None) -> None:
        super().__init__("replan")
        self.unsubscribed_at = unsubscribed_at


PERSON_WRITTEN = "person_written"
SIGNED = "signed"
ATTENDED = "attended"


@dataclass
class _Attempt:
    progress: rules.Progress


def _steps(progress: rules.Progress) -> set[str]:
    """What AN acknowledged of the item, as stored on it."""
    steps = {PERSON_WRITTEN} if progress.person_written else set()
    if progress.person_written and progress.signed:
        steps.add(SIGNED)
    if progress.person_written and progress.attended:
        steps.add(ATTENDED)
    return steps


T = TypeVar("T")


async def _unless_gone(call: Awaitable[T]) -> tuple[bool, T | None]:
    """``(True, None)`` when AN answers that what the request names is gone (404): the plan
    then finds it again; any other failure propagates."""
    try:
        return False, await call
    except ANFailure as failure:
        if failure.outcome.verdict is not Verdict.GONE:
            raise
        return True, None


def event_location_json(event: EventRef) -> dict[str, Any] | None:
    """AN's location object for an event (None for a virtual one, or when CS gave no place)."""
    if not event.location:
        return None
    location: dict[str, Any] = {}
    for name, value in event.location:
        if name == "address_lines":
            location[name] = value.split("\n")
        else:
            location[name] = value
    return location


class EventMirror:
    """Creates each CS event's AN twin once (inside its calendar's event campaign, itself created
    once), also across crashes and across instances: the same discipline as
    :class:`PetitionMirror`, keyed by slug."""

    def __init__(self, an: ActionNetworkClient, store: Storage, origin_system: str) -> None:
        self._an = an
        self._store = store
        self._origin = origin_system
        self._locks: dict[str, anyio.Lock] = {}
        self._known: dict[str, str] = {}

    async def forget(self, slug: str, gone: str | None) -> None:
        lock = self._locks.setdefault(f"event:{slug}", anyio.Lock())
        async with lock:
            if self._known.get(f"event:{slug}") == gone:
                self._known.pop(f"event:{slug}", None)
            await self._store.clear_event_uuid(slug, gone)

    async def ensure(self, event: EventRef, creator_uuid: str | None) -> str:
        key = f"event:{event.slug}"
        known = self._known.get(key)
        if known:
            return known
        campaign = await self._campaign(event.calendar) if event.calendar else None
        lock = self._locks.setdefault(key, anyio.Lock())
        async with lock, self._store.mirror_lock(key):
            uuid = await self._store.event_uuid(event.slug)
            if not uuid:
                uuid = await self._an.find_event(event.identifier)
            if not uuid:
                uuid = await self._an.create_event(
                    title=event.title, description=event.description,
                    start_date=event.start_at, end_date=event.end_at,
                    location=event_location_json(event), browser_url=event.url,
                    identifier=event.identifier, origin_system=self._origin,
                    creator_uuid=creator_uuid, campaign_uuid=campaign)
                log.info("an.event_created", cs_event=event.slug, an_event=uuid,
                         campaign=campaign, creator_linked=creator_uuid is not None)
            await self._store.set_event_uuid(event.slug, uuid)
            self._known[key] = uuid
            return uuid

    async def _campaign(self, calendar: CalendarRef) -> str:
        key = f"calendar:{calendar.slug}"
        known = self._known.get(key)
        if known:
            return known
        lock = self._locks.setdefault(key, anyio.Lock())
        async with lock, self._store.mirror_lock(key):
            uuid = await self._store.calendar_uuid(calendar.slug)
            if not uuid:
                uuid = await self._an.find_event_campaign(calendar.identifier)
            if not uuid:
                uuid = await self._an.create_event_campaign(
                    title=calendar.name, description=calendar.description,
                    browser_url=calendar.url, identifier=calendar.identifier,
                    origin_system=self._origin)
                log.info("an.event_campaign_created", calendar=calendar.slug, an_campaign=uuid)
            await self._store.set_calendar_uuid(calendar.slug, uuid)
            self._known[key] = uuid
            return uuid


class Dispatcher:
    """Leases items for idle workers and applies them; pauses everything on a bad AN key."""

    def __init__(
        self,
        store: Storage,
        an: ActionNetworkClient,
        *,
        workers: int = 4,
        origin_system: str = "Controlshift Petition",
        event_origin_system: str = "Controlshift Event",
        policy: RetryPolicy = OUTBOX,
        lease_seconds: float = 300.0,
        auth_recheck_interval: float = 60.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        options: rules.SyncOptions = rules.DEFAULT_OPTIONS,
    ) -> None:
        self.store = store
        self.an = an
        self.options = options  # custom fields and phone numbers: what to send, how
        self.workers = workers
        self.policy = policy
        self.lease_seconds = lease_seconds
        self.auth_recheck_interval = auth_recheck_interval
        self.clock = clock
        self.rng = rng or random.Random()
        self.tags = TagCache(an, store)
        self.petitions = PetitionMirror(an, store, origin_system)
        self.events = EventMirror(an, store, event_origin_system)
        self.stats = WorkerStats()
        # By lease token: after a clock jump the same item may be leased twice, briefly.
        self.in_flight: dict[str, Item] = {}
        self.auth_paused: str | None = None
        self._wake = anyio.Event()
        self._stopping = False
        store.listeners.append(self.wake)

    def wake(self) -> None:
        self._wake.set()

    def stop_intake(self) -> None:
        self._stopping = True
        self.wake()

    async def run(self, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Lease and apply until :meth:`stop_intake`; then wait for the items in flight."""
        async with anyio.create_task_group() as tg:
            renewal = anyio.CancelScope()

            async def renew() -> None:
                with renewal:
                    await self._renew_leases()

            tg.start_soon(renew)
            task_status.started()
            while not self._stopping:
                if self.auth_paused:
                    await self._recheck_key()
                    continue
                free = self.workers - len(self.in_flight)
                leased = []
                if free > 0:
                    leased = await self.store.lease(free, self.lease_seconds)
                    for item in leased:
                        self.in_flight[item.token] = item
                        tg.start_soon(self._apply_and_record, item)
                if not leased or free <= len(leased):
                    await self._idle(1.0)
            while self.in_flight:  # let them finish (the daemon bounds this by its grace)
                await self._idle(0.1)
            renewal.cancel()

    async def _renew_leases(self) -> None:
        """An item still being worked on (a long 429 pause, a slow AN) keeps its lease, so the
        expiry that rescues items of a crashed process never hands a live one out twice."""
        while True:
            await anyio.sleep(self.lease_seconds / 3)
            if self.in_flight:
                await self.store.renew_leases(
                    [(item.id, item.token) for item in self.in_flight.values()],
                    self.lease_seconds)

    async def _idle(self, seconds: float) -> None:
        """Sleep until woken (new work, a finished item, shutdown) or ``seconds`` pass."""
        with anyio.move_on_after(seconds):
            await self._wake.wait()
        self._wake = anyio.Event()

    async def _recheck_key(self) -> None:
        """While paused on a bad key, ask AN every so often whether the key works again."""
        deadline = anyio.current_time() + self.auth_recheck_interval
        while not self._stopping and anyio.current_time() < deadline:
            await self._idle(deadline - anyio.current_time())
        if self._stopping or self.in_flight:
            return
        try:
            ok = await self.an.check_key()
        except ANFailure:
            ok = False
        if ok:
            log.warning("an.key_accepted", msg="Action Network accepts the API key again; resuming")
            self.auth_paused = None
            await self.store.set_meta(an_paused=None)
        else:
            log.error("an.key_rejected", msg="Action Network still rejects the API key; "
                      "workers stay paused. Fix action_network.api_key and restart or wait.")

    async def release_in_flight(self) -> None:
        """On shutdown: hand back what was not finished, without using up an attempt (what AN
        acknowledged of it is already persisted: the next attempt continues from there)."""
        for token, item in list(self.in_flight.items()):
            await self.store.finish(item.id, "pending", count_attempt=False, token=token)
            self.in_flight.pop(token, None)

    async def _apply_and_record(self, item: Item) -> None:
        started = time.monotonic()
        activity = item.activity
        attempt = _Attempt(rules.Progress())
        outcome: Outcome | None = None
        stopped: str | None = None
        note = ""
        try:
            if activity.email:
                person, applied = await self.store.knowledge(activity.email, activity.source_key)
                # Steps AN acknowledged on an earlier attempt are not sent again. A person
                # written without a known uuid cannot be signed for: that step is redone.
                written = PERSON_WRITTEN in item.done_steps and person.uuid is not None
                attempt.progress = rules.Progress(
                    person=person, opt_in_applied=applied, person_written=written,
                    signed=written and SIGNED in item.done_steps,
                    attended=written and ATTENDED in item.done_steps)
            elif activity.kind is ActivityKind.EVENT_CHANGED and activity.event is not None:
                # Only a mirrored event is updated; the update never creates one.
                attempt.progress = rules.Progress(
                    event_uuid=await self.store.event_uuid(activity.event.slug))
            token = before_request.set(lambda: self._before_request(item, attempt))
            try:
                step = await self._apply(item, attempt)
            finally:
                before_request.reset(token)
            if isinstance(step, rules.Dead):
                outcome = Outcome(Verdict.DEAD, step.reason)
            else:
                note = step.note
                if activity.kind is ActivityKind.GLOBAL_UNSUBSCRIBE:
                    attempt.progress = rules.after_unsubscribe(attempt.progress, activity)
        except Stop as stop:
            stopped = stop.why
        except ANFailure as failure:
            outcome = failure.outcome
        except Exception as exc:  # a bug must not lose the item: retry it, loudly
            log.exception("worker.error", item=item.id)
            outcome = Outcome(Verdict.RETRY, f"internal error: {type(exc).__name__}: {exc}")
        # What was learnt before a failure is kept too: the outcome is recorded with it.
        if stopped is not None:
            await self._stopped(item, stopped, attempt.progress)
        else:
            await self._record(item, outcome, note, attempt.progress, time.monotonic() - started)

    async def _before_request(self, item: Item, attempt: _Attempt) -> None:
        """Runs before every AN request made for the item (whatever part of the plan makes it:
        a lookup, a tag or petition creation, a person write). Nothing more goes to AN for an
        item whose record was deleted or whose lease was lost, nor once shutdown began (the
        item is handed back and continues where it stopped). An org-wide unsubscribe committed
        meanwhile makes the plan decide again before anything is sent."""
        known = attempt.progress.person.unsubscribed_at
        why = await self.store.guard(item.id, item.token, known)
        if why == "unsubscribed":  # only a person (an email) has a timeline to move
            person = await self.store.person(item.activity.email or "")
            raise Replan(person.unsubscribed_at)
        if why is None and self._stopping:
            why = "shutdown"
        if why is not None:
            raise Stop(why)

    async def _acknowledged(self, item: Item, progress: rules.Progress) -> None:
        """Persist an opt-in AN acknowledged, with the steps done, before the plan goes on:
        a replay could subscribe someone who unsubscribed in AN in the meantime, even after
        a ``kill -9``. Other acknowledged steps are recorded with the item's outcome (a retry
        or a shutdown continues from there); only a crash can replay them, and they are
        idempotent and carry no opt-in. A write that completed the plan is recorded with the
        outcome, in the same transaction."""
        if not progress.opt_in_sent:
            return
        if isinstance(rules.next_step(item.activity, progress, self.options),
                      rules.Done | rules.Dead):
            return
        activity = item.activity
        with anyio.CancelScope(shield=True):
            await self.store.record_step(
                item.id, item.token, _steps(progress),
                person=(activity.email, rules.knowledge_to_keep(progress.person))
                if activity.email else None,
                opt_in=activity.source_key if progress.opt_in_sent else None,
            )

    async def _apply(self, item: Item, attempt: _Attempt) -> rules.Done | rules.Dead:
        """Run the plan; ``attempt.progress`` holds what is known at every moment, also when a
        request fails and this raises."""
        activity = item.activity
        problem = rules.phone_problem(activity, self.options)
        if problem:
            log.warning("sync.phone_dropped", item=item.id, source=activity.source_key,
                        reason=problem, msg="the phone number is left out; the rest syncs")
        for _ in range(rules.MAX_STEPS):
            progress = attempt.progress
            step = rules.next_step(activity, progress, self.options)
            try:
                await self._perform(item, attempt, step)
            except Replan as replan:  # nothing was sent for this step: decide it again
                known = attempt.progress
                attempt.progress = replace(known, person=replace(
                    known.person, unsubscribed_at=replan.unsubscribed_at))
                continue
            if isinstance(step, rules.Done | rules.Dead):
                return step
        return rules.Dead(f"no plan finished within {rules.MAX_STEPS} steps")

    async def _perform(self, item: Item, attempt: _Attempt, step: rules.Step) -> None:
        """One step of the plan: its AN request, folded into ``attempt.progress`` (also what a
        re-plan needs after a 404: the rules then see the petition or person as unknown)."""
        activity = item.activity
        progress = attempt.progress
        match step:
            case rules.Done() | rules.Dead():
                return
            case rules.EnsureTags(names=names):
                await self.tags.ensure(names)
                attempt.progress = replace(progress, tags_ready=True)
            case rules.EnsurePetition(petition=petition, creator_uuid=creator):
                uuid = await self.petitions.ensure(petition, creator)
                attempt.progress = replace(progress, petition_uuid=uuid)
            case rules.LookupPerson(email=email, also=also):
                found = await self.an.find_person(email, also)
                attempt.progress = rules.after_lookup(
                    progress, found.uuid if found else None, found.subscribed if found else None
                )
            case rules.Signup(fields=fields, status=status, tags=tags):
                record = await self.an.signup(fields, status, tags)
                attempt.progress = rules.after_person_write(
                    progress, activity, step, record.uuid, record.subscribed
                )
                await self._acknowledged(item, attempt.progress)
            case rules.RecordSignature(petition_uuid=pet, fields=fields, status=status, tags=tags):
                gone, uuid = await _unless_gone(self.an.record_signature(pet, fields, status, tags))
                if gone:
                    attempt.progress = await self._petition_gone(activity, progress)
                    return
                attempt.progress = rules.after_person_write(progress, activity, step, uuid, None)
                await self._acknowledged(item, attempt.progress)
            case rules.SignAs(petition_uuid=pet, person_uuid=person):
                gone, _ = await _unless_gone(self.an.sign_as(pet, person))
                if gone:  # either the person or the petition is gone: find both again
                    attempt.progress = rules.forget_person(
                        await self._petition_gone(activity, progress))
                    return
                attempt.progress = replace(progress, signed=True)
            case rules.EnsureEvent(event=event, creator_uuid=creator):
                uuid = await self.events.ensure(event, creator)
                attempt.progress = replace(progress, event_uuid=uuid)
            case rules.RecordAttendance(event_uuid=ev, fields=fields, status=status, tags=tags):
                gone, answer = await _unless_gone(
                    self.an.record_attendance(ev, fields, status, tags))
                if gone:
                    attempt.progress = await self._event_gone(activity, progress)
                    return
                uuid = answer[0] if answer else None
                attempt.progress = rules.after_person_write(progress, activity, step, uuid, None)
                await self._acknowledged(item, attempt.progress)
            case rules.AttendAs(event_uuid=ev, person_uuid=person):
                gone, _ = await _unless_gone(self.an.attend_as(ev, person))
                if gone:  # either the person or the event is gone: find both again
                    attempt.progress = rules.forget_person(
                        await self._event_gone(activity, progress))
                    return
                attempt.progress = replace(progress, attended=True)
            case rules.UpdateEvent(event_uuid=ev, event=event):
                gone, _ = await _unless_gone(self.an.update_event(
                    ev, title=event.title, description=event.description,
                    start_date=event.start_at, end_date=event.end_at,
                    location=event_location_json(event), browser_url=event.url))
                if gone:  # deleted in AN: the next host or RSVP item of the event mirrors it
                    await self.events.forget(event.slug, ev)
                    attempt.progress = replace(progress, event_uuid=None)
                    return
                attempt.progress = replace(progress, attended=True)
            case rules.SetStatus(person_uuid=person, email=email, status=status):
                gone, _ = await _unless_gone(self.an.set_status(person, email, status))
                if gone:
                    attempt.progress = rules.forget_person(progress)
                    return
                attempt.progress = rules.after_status(progress, status)

    async def _event_gone(self, activity: Activity, progress: rules.Progress) -> rules.Progress:
        """AN answered 404 for the mirrored event (deleted by an admin): mirror it again."""
        assert activity.event is not None
        log.warning("an.event_gone", cs_event=activity.event.slug,
                    msg="the mirrored event is gone from Action Network; mirroring it again")
        await self.events.forget(activity.event.slug, progress.event_uuid)
        return replace(progress, event_uuid=None)

    async def _petition_gone(self, activity: Activity, progress: rules.Progress) -> rules.Progress:
        """AN answered 404 for the mirrored petition (deleted by an admin): mirror it again."""
        assert activity.petition is not None
        log.warning("an.petition_gone", petition=activity.petition.slug,
                    msg="the mirrored petition is gone from Action Network; mirroring it again")
        await self.petitions.forget(activity.petition.cs_id, progress.petition_uuid)
        return replace(progress, petition_uuid=None)

    async def _record(
        self, item: Item, outcome: Outcome | None, note: str, progress: rules.Progress,
        seconds: float,
    ) -> None:
        activity = item.activity
        attempts = item.attempts + 1
        fields = {"item": item.id, "source": activity.source_key, "kind": str(activity.kind),
                  "person": activity.email, "attempt": attempts, "ms": round(seconds * 1000)}
        with anyio.CancelScope(shield=True):
            if outcome is None:
                held = await self._finish(item, progress, "done", note=note)
                if held:
                    self.stats.done += 1
                    metrics.actions.labels(str(activity.kind), "done").inc()
                    log.info("sync.done", outcome="done", note=note, **fields)
            elif outcome.verdict is Verdict.DEAD or (
                outcome.verdict is Verdict.RETRY and self.policy.gives_up(attempts)
            ):
                reason = outcome.reason if outcome.verdict is Verdict.DEAD else (
                    f"gave up after {attempts} attempts: {outcome.reason}")
                held = await self._finish(item, progress, "dead", error=reason)
                if held:
                    self.stats.dead += 1
                    metrics.actions.labels(str(activity.kind), "dead").inc()
                    log.warning("sync.dead", outcome="dead", reason=reason, **fields)
            elif outcome.verdict is Verdict.AUTH:
                held = await self._finish(item, progress, "pending", error=outcome.reason,
                                          count_attempt=False)
                if not self.auth_paused:
                    self.auth_paused = outcome.reason
                    await self.store.set_meta(an_paused=outcome.reason)
                    log.error("an.auth_failed", outcome="paused", reason=outcome.reason,
                              msg="Action Network rejected the API key: all workers paused, "
                              "nothing is dropped. Check action_network.api_key.", **fields)
            elif outcome.verdict is Verdict.RATE_LIMITED:
                retry_at = self.clock() + max(1.0, self.an.limiter.paused_until - time.monotonic())
                held = await self._finish(item, progress, "pending", error=outcome.reason,
                                          next_attempt_at=retry_at, count_attempt=False)
                if held:
                    log.info("sync.retry", outcome="rate_limited", **fields)
            else:  # RETRY, or GONE from a call that has no re-plan
                delay = self.policy.delay(attempts, self.rng)
                held = await self._finish(item, progress, "pending", error=outcome.reason,
                                          next_attempt_at=self.clock() + delay)
                if held:
                    self.stats.retried += 1
                    metrics.actions.labels(str(activity.kind), "retry").inc()
                    log.warning("sync.retry", outcome="retry", reason=outcome.reason,
                                retry_in_s=round(delay, 1), **fields)
            if not held:
                self._lost(item)
            self._release(item)

    async def _finish(self, item: Item, progress: rules.Progress, status: str, **kwargs: Any
                      ) -> bool:
        """Record the outcome with what was learnt about the person and the opt-in sent."""
        activity = item.activity
        return await self.store.finish(
            item.id, status, token=item.token, steps=_steps(progress),
            person=(activity.email, rules.knowledge_to_keep(progress.person))
            if activity.email else None,
            opt_in_source=activity.source_key if progress.opt_in_sent else None, **kwargs,
        )

    async def _stopped(self, item: Item, why: str, progress: rules.Progress) -> None:
        """The plan stopped before an AN request (see :meth:`_before_request`)."""
        activity = item.activity
        fields = {"item": item.id, "source": activity.source_key, "kind": str(activity.kind),
                  "person": activity.email}
        with anyio.CancelScope(shield=True):
            if why == "deleted":
                note = "signature deleted on ControlShift while it was being synced"
                if await self._finish(item, progress, "cancelled", note=note):
                    self.stats.cancelled += 1
                    metrics.actions.labels(str(activity.kind), "cancelled").inc()
                    log.info("sync.cancelled", outcome="cancelled", note=note, **fields)
                else:
                    self._lost(item)
            elif why == "shutdown":
                if not await self._finish(item, progress, "pending", count_attempt=False):
                    self._lost(item)
            else:
                self._lost(item)
            self._release(item)

    def _lost(self, item: Item) -> None:
        self.stats.lost += 1
        log.warning("sync.lease_lost", item=item.id, source=item.activity.source_key,
                    msg="the item was handed out again (its lease expired: a clock jump or a "
                    "stall); this worker wrote nothing more for it")

    def _release(self, item: Item) -> None:
        self.in_flight.pop(item.token, None)
        self.wake()
