"""Workers: lease items from the outbox, apply them to AN under the shared limiter, record outcomes.

One dispatcher leases as many items as there are idle workers (the lease query already keeps a
person's items one at a time and in order) and runs each in its own task. Each item is applied by
asking :func:`csand.sync.rules.next_step` what to do next until it says done or dead; every AN
operation is idempotent (helpers match by email, signing again overwrites, tags are sets, the
mirrored petition is looked up by identifier before it is created), so replaying an item after a
crash between AN's answer and csand's commit duplicates nothing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import anyio

from csand import metrics
from csand.actionnetwork.client import ActionNetworkClient, ANFailure
from csand.logs import get_logger
from csand.model import Activity, ActivityKind, PetitionRef
from csand.store import Item, Store
from csand.sync import rules
from csand.sync.outcome import Outcome, RetryPolicy, Verdict

log = get_logger("worker")


class TagCache:
    """AN ignores unknown names in ``add_tags``, so every tag is created before first use."""

    def __init__(self, an: ActionNetworkClient, store: Store) -> None:
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

    In-process a per-petition lock serialises creation; across a crash the identifier lookup
    before creating finds a petition whose creation csand did not get to record.
    """

    def __init__(self, an: ActionNetworkClient, store: Store, origin_system: str) -> None:
        self._an = an
        self._store = store
        self._origin = origin_system
        self._locks: dict[int, anyio.Lock] = {}
        self._known: dict[int, str] = {}  # cs id → AN uuid, once mirrored (never changes)

    async def forget(self, cs_id: int) -> None:
        self._known.pop(cs_id, None)
        await self._store.clear_petition_uuid(cs_id)

    async def ensure(self, petition: PetitionRef, creator_uuid: str | None) -> str:
        known = self._known.get(petition.cs_id)
        if known:
            return known
        lock = self._locks.setdefault(petition.cs_id, anyio.Lock())
        async with lock:
            uuid = await self._store.petition_uuid(petition.cs_id)
            if uuid:
                self._known[petition.cs_id] = uuid
                return uuid
            uuid = await self._an.find_petition(petition.identifier)
            if uuid is None:
                if creator_uuid is None and petition.creator_email:
                    creator_uuid = (await self._store.person(petition.creator_email)).uuid
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


class Dispatcher:
    """Leases items for idle workers and applies them; pauses everything on a bad AN key."""

    def __init__(
        self,
        store: Store,
        an: ActionNetworkClient,
        *,
        workers: int = 4,
        origin_system: str = "Controlshift Petition",
        policy: RetryPolicy = RetryPolicy(),
        lease_seconds: float = 300.0,
        auth_recheck_interval: float = 60.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.an = an
        self.workers = workers
        self.policy = policy
        self.lease_seconds = lease_seconds
        self.auth_recheck_interval = auth_recheck_interval
        self.clock = clock
        self.rng = rng or random.Random()
        self.tags = TagCache(an, store)
        self.petitions = PetitionMirror(an, store, origin_system)
        self.stats = WorkerStats()
        self.in_flight: dict[int, Item] = {}
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
                        self.in_flight[item.id] = item
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
                await self.store.renew_leases(list(self.in_flight), self.lease_seconds)

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
        """On shutdown: hand back what was not finished, without using up an attempt."""
        for item_id in list(self.in_flight):
            await self.store.finish(item_id, "pending", count_attempt=False)
            self.in_flight.pop(item_id, None)

    async def _apply_and_record(self, item: Item) -> None:
        started = time.monotonic()
        activity = item.activity
        progress = rules.Progress()
        outcome: Outcome | None = None
        note = ""
        try:
            if activity.email:
                person, applied = await self.store.knowledge(activity.email, activity.source_key)
                progress = rules.Progress(person=person, opt_in_applied=applied)
            progress, step = await self._apply(item, progress)
            if isinstance(step, rules.Dead):
                outcome = Outcome(Verdict.DEAD, step.reason)
            else:
                note = step.note
                if activity.kind is ActivityKind.GLOBAL_UNSUBSCRIBE:
                    progress = rules.after_unsubscribe(progress, activity)
        except ANFailure as failure:
            outcome = failure.outcome
        except Exception as exc:  # a bug must not lose the item: retry it, loudly
            log.exception("worker.error", item=item.id)
            outcome = Outcome(Verdict.RETRY, f"internal error: {type(exc).__name__}: {exc}")
        await self._record(item, outcome, note, progress, time.monotonic() - started)

    async def _apply(self, item: Item, progress: rules.Progress) -> tuple[rules.Progress, rules.Done | rules.Dead]:
        activity = item.activity
        for _ in range(rules.MAX_STEPS):
            step = rules.next_step(activity, progress)
            match step:
                case rules.Done() | rules.Dead():
                    return progress, step
                case rules.EnsureTags(names=names):
                    await self.tags.ensure(names)
                    progress = replace(progress, tags_ready=True)
                case rules.EnsurePetition(petition=petition, creator_uuid=creator):
                    uuid = await self.petitions.ensure(petition, creator)
                    progress = replace(progress, petition_uuid=uuid)
                case rules.LookupPerson(email=email, also=also):
                    found = await self.an.find_person(email, also)
                    progress = rules.after_lookup(
                        progress, found.uuid if found else None, found.subscribed if found else None
                    )
                case rules.Signup(fields=fields, status=status, tags=tags):
                    record = await self.an.signup(fields, status, tags)
                    progress = rules.after_person_write(
                        progress, activity, step, record.uuid, record.subscribed
                    )
                case rules.RecordSignature(petition_uuid=pet, fields=fields, status=status, tags=tags):
                    try:
                        uuid = await self.an.record_signature(pet, fields, status, tags)
                    except ANFailure as failure:
                        if failure.outcome.verdict is not Verdict.GONE:
                            raise
                        progress = await self._petition_gone(activity, progress)
                        continue
                    progress = rules.after_person_write(progress, activity, step, uuid, None)
                case rules.SignAs(petition_uuid=pet, person_uuid=person):
                    try:
                        await self.an.sign_as(pet, person)
                    except ANFailure as failure:
                        if failure.outcome.verdict is not Verdict.GONE:
                            raise
                        # Either the person or the petition is gone: find both again.
                        progress = rules.forget_person(await self._petition_gone(activity, progress))
                        continue
                    progress = replace(progress, signed=True)
                case rules.SetStatus(person_uuid=person, email=email, status=status):
                    try:
                        await self.an.set_status(person, email, status)
                    except ANFailure as failure:
                        if failure.outcome.verdict is not Verdict.GONE:
                            raise
                        progress = rules.forget_person(progress)
                        continue
                    progress = rules.after_status(progress, status)
        return progress, rules.Dead(f"no plan finished within {rules.MAX_STEPS} steps")

    async def _petition_gone(self, activity: Activity, progress: rules.Progress) -> rules.Progress:
        """AN answered 404 for the mirrored petition (deleted by an admin): mirror it again."""
        assert activity.petition is not None
        log.warning("an.petition_gone", petition=activity.petition.slug,
                    msg="the mirrored petition is gone from Action Network; mirroring it again")
        await self.petitions.forget(activity.petition.cs_id)
        return replace(progress, petition_uuid=None)

    async def _record(
        self, item: Item, outcome: Outcome | None, note: str, progress: rules.Progress,
        seconds: float,
    ) -> None:
        activity = item.activity
        person = (activity.email, rules.knowledge_to_keep(progress.person)) if activity.email else None
        attempts = item.attempts + 1
        fields = {"item": item.id, "source": activity.source_key, "kind": str(activity.kind),
                  "person": activity.email, "attempt": attempts, "ms": round(seconds * 1000)}
        with anyio.CancelScope(shield=True):
            if outcome is None:
                await self.store.finish(
                    item.id, "done", note=note, person=person,
                    opt_in_source=activity.source_key if progress.opt_in_sent else None,
                )
                self.stats.done += 1
                metrics.actions.labels(str(activity.kind), "done").inc()
                log.info("sync.done", outcome="done", note=note, **fields)
            elif outcome.verdict is Verdict.DEAD or (
                outcome.verdict is Verdict.RETRY and self.policy.gives_up(attempts)
            ):
                reason = outcome.reason if outcome.verdict is Verdict.DEAD else (
                    f"gave up after {attempts} attempts: {outcome.reason}")
                await self.store.finish(item.id, "dead", error=reason, person=person)
                self.stats.dead += 1
                metrics.actions.labels(str(activity.kind), "dead").inc()
                log.warning("sync.dead", outcome="dead", reason=reason, **fields)
            elif outcome.verdict is Verdict.AUTH:
                await self.store.finish(item.id, "pending", error=outcome.reason,
                                        count_attempt=False, person=person)
                if not self.auth_paused:
                    self.auth_paused = outcome.reason
                    await self.store.set_meta(an_paused=outcome.reason)
                    log.error("an.auth_failed", outcome="paused", reason=outcome.reason,
                              msg="Action Network rejected the API key: all workers paused, "
                              "nothing is dropped. Check action_network.api_key.", **fields)
            elif outcome.verdict is Verdict.RATE_LIMITED:
                retry_at = self.clock() + max(1.0, self.an.limiter.paused_until - time.monotonic())
                await self.store.finish(item.id, "pending", error=outcome.reason,
                                        next_attempt_at=retry_at, count_attempt=False, person=person)
                log.info("sync.retry", outcome="rate_limited", **fields)
            else:  # RETRY, or GONE from a call that has no re-plan
                delay = self.policy.delay(attempts, self.rng)
                await self.store.finish(item.id, "pending", error=outcome.reason,
                                        next_attempt_at=self.clock() + delay, person=person)
                self.stats.retried += 1
                metrics.actions.labels(str(activity.kind), "retry").inc()
                log.warning("sync.retry", outcome="retry", reason=outcome.reason,
                            retry_in_s=round(delay, 1), **fields)
            self.in_flight.pop(item.id, None)
            self.wake()
