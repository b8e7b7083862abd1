"""Storage: the interfaces the rest of csand sees, and :func:`open_store` to get a backend.

csand keeps four kinds of state, each behind its own interface:

* :class:`Outbox` — activities waiting to reach Action Network, leased one per person in the
  order they happened, with their outcome, retries and dead letters.
* :class:`WebhookInbox` — ControlShift webhooks accepted durably before they are processed.
* :class:`SeenRecords` — what ControlShift showed (petition change signals, signature versions)
  and which AN petition mirrors each CS petition.
* :class:`ANKnowledge` — what Action Network's own answers told csand about people and tags.

plus :class:`Meta` (key/value state, the status figures, the schema, closing) and
:class:`Cluster` (which instance leads, their heartbeats, the Action Network request slots they
share). :class:`Storage` is all of them; a backend proves it keeps their rules by passing
``tests/storage``, one conformance suite for every backend.

Two backends: SQLite (:mod:`csand.storage.sqlite`), one process on one machine, the zero-setup
default; PostgreSQL (:mod:`csand.storage.postgres`), any number of instances on several machines
sharing the work.

Times are Unix seconds (float, from the store's injectable clock) for scheduling, ISO 8601 for
display and for ControlShift's own times.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from os import PathLike
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from csand.model import Activity, AttendeeSeen, DeadLetter, Person, SignatureSeen
from csand.storage.bulk import BulkChanges, BulkFile, Parked

STATUSES = ("pending", "in_flight", "done", "dead", "cancelled")
# A webhook event handed out by ``events_due`` is not handed out again for this long unless its
# processing records a failure: two instances never process one event at once, and one whose
# process died is taken up again after it.
EVENT_CLAIM_SECONDS = 60.0
# A bulk-data file handed out by ``bulk_files_due`` is not handed out again for this long; every
# batch committed from it (``commit_poll(bulk_progress=...)``) extends the claim. A file whose
# processor died is taken up again after it, from the rows already committed.
BULK_CLAIM_SECONDS = 300.0
# An instance silent this long (killed, never restarted) is dropped from the cluster's list.
FORGET_INSTANCE_SECONDS = 86_400.0


class StoreError(Exception):
    """A problem with the store the operator must fix, phrased for them."""


class SchemaTooNew(StoreError):
    """The database was migrated by a newer csand than this one: refuse rather than guess."""


class NotLeader(StoreError):
    """A fenced write by an instance that no longer leads: another instance polls now."""


@dataclass(frozen=True, slots=True)
class Item:
    """A leased outbox item."""

    id: int
    activity: Activity
    attempts: int
    enqueued_at: float
    token: str = ""  # the lease: only its holder may record an outcome
    done_steps: frozenset[str] = frozenset()  # what AN acknowledged on earlier attempts


@dataclass(frozen=True, slots=True)
class Requeued:
    queued: int
    skipped_deleted: int  # records ControlShift deleted: never sent to AN again
    skipped_pruned: int = 0  # versions whose personal data was pruned: nothing left to send
    skipped_malformed: int = 0  # malformed ControlShift records: nothing to send until corrected


@dataclass(frozen=True, slots=True)
class PetitionState:
    cs_id: int
    slug: str
    updated_at: str | None
    public_count: int | None
    content: str | None
    total_pages: int | None
    an_uuid: str | None
    creator_extra: str | None = None  # JSON: creator details only webhooks carry


@dataclass(frozen=True, slots=True)
class EventState:
    """What csand recorded of a CS event (keyed by slug: CS events carry no numeric id).

    In :meth:`Outbox.commit_poll` a None member leaves what was recorded: ``content`` (the
    fingerprint of what AN shows of it, last enqueued), ``calendar_slug``, ``host_extra`` (JSON:
    host details only webhooks carry). ``inappropriate`` is remembered once a webhook said so.
    """

    slug: str
    content: str | None = None
    calendar_slug: str | None = None
    inappropriate: bool = False
    host_extra: str | None = None
    an_uuid: str | None = None


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    id: int
    type: str
    body: str
    attempts: int


class Outbox(Protocol):
    """Activities on their way to Action Network.

    Items move ``pending → in_flight → done | dead`` (or ``cancelled`` when ControlShift
    deleted the record before it was synced). A lease hands out at most one item per person,
    each person's items in the order they happened, a signature only once its petition is
    mirrored (or no creator item for it is still to run). Each lease is a token: only its
    holder records an outcome.
    """

    listeners: list[Callable[[], None]]  # called when work becomes ready
    # sync.history_start: activities older than it are stored ``cancelled`` with the note
    # HISTORY_NOTE (seen, never synced; ``requeue_since`` can still replay them). None: all.
    history_start: datetime | None

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
        """Record what was seen and enqueue what it produced, atomically; the number of new
        items (re-seen versions are not added again). ``event`` and ``attendees`` are the
        events' counterparts of ``petition`` and ``signatures`` (an attendance waits, like a
        signature, until its event is mirrored or no host item of it is still to run).

        ``fence`` is ``(instance, term)`` of a poller: the commit happens only while that
        instance still leads in that term (else :class:`NotLeader`, nothing written), so a
        deposed leader that wakes up late cannot write what it polled.

        ``bulk_progress`` is ``(file id, rows done)`` of a bulk-data file: recorded in the same
        transaction (and the file's claim extended), so a restart goes on after these rows;
        ``bulk`` what its rows change besides (:class:`csand.storage.bulk.BulkChanges`)."""
        ...

    async def enqueue(self, activities: Iterable[Activity]) -> int: ...

    async def lease(self, limit: int, lease_seconds: float) -> list[Item]: ...

    async def renew_leases(self, leases: Sequence[int | tuple[int, str]], lease_seconds: float
                           ) -> None: ...

    async def guard(self, item_id: int, token: str, unsubscribed_at: datetime | None = None
                    ) -> str | None:
        """``"deleted"``, ``"lost"``, ``"unsubscribed"``: why the lease holder must not send its
        next AN request; None when it may."""
        ...

    async def record_step(
        self, item_id: int, token: str, steps: Iterable[str], *,
        person: tuple[str, Person] | None = None, opt_in: str | None = None,
    ) -> bool: ...

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
    ) -> bool: ...

    async def release_all_in_flight(self) -> int: ...

    async def requeue_dead(self, ids: Sequence[int] | None = None) -> Requeued: ...

    async def requeue_since(self, since: str) -> Requeued: ...

    async def drop_dead(self, ids: Sequence[int] | None = None) -> int: ...

    async def dead_items(self, limit: int = 50) -> list[dict[str, Any]]: ...

    async def dead_item(self, item_id: int) -> dict[str, Any] | None: ...

    async def counts(self) -> dict[str, int]: ...

    async def items(self) -> list[dict[str, Any]]:
        """Every outbox item, in id order, read-only (reports and tests): ``id``,
        ``dedupe_key``, ``source_key``, ``person_key``, ``petition_id``, ``kind``, ``payload``
        (the activity as a dict), ``occurred_at``, ``status``, ``attempts``,
        ``next_attempt_at``, ``lease_until``, ``last_error``, ``note``, ``enqueued_at``,
        ``finished_at`` (times as stored: Unix seconds, ``occurred_at`` ISO 8601)."""
        ...

    async def audit_sample(self, limit: int | None, *, petition_id: int | None = None,
                           kinds: Sequence[str] = ...) -> list[dict[str, Any]]:
        """For ``csand audit``: synced activities in random order, at most ``limit`` (None: all;
        only ``petition_id``'s when given): the latest ``done`` version of each record of
        ``kinds`` (default: creators, signers, hosts, attendees, org-wide unsubscribes), not deleted on
        ControlShift since and not pruned (also while a newer version waits: what AN got
        from the synced one stays). Each: ``id``, ``source_key``, ``person_key``,
        ``petition_id``, ``kind``, ``payload`` (the activity as a dict), ``note``,
        ``finished_at``."""
        ...

    async def person_items(self, email: str) -> list[dict[str, Any]]:
        """Every outbox item of the person, oldest first: ``id``, ``source_key``, ``kind``,
        ``status``, ``note``, ``finished_at`` (what csand did for them, and what is to come)."""
        ...

    async def requeue_items(self, ids: Sequence[int], reason: str = "audit") -> Requeued:
        """Queue the activity of each finished item again under a fresh dedupe key
        (``<key>#<reason>@<time>``), so it goes through the rules like any other. Not when an
        item of the same record is still pending or in flight (a repair asked for twice is
        queued once), nor when ControlShift deleted the record or its personal data was
        pruned (both counted)."""
        ...

    async def prune(self, retention_seconds: float, *, batch: int = 1000) -> dict[str, int]:
        """Forget personal data finished with more than ``retention_seconds`` ago; rows pruned
        per kind (``outbox``, ``webhook_events``)."""
        ...


class WebhookInbox(Protocol):
    """Webhooks accepted before they are processed (processing commits via ``commit_poll``)."""

    async def receive_event(self, dedupe: str, type_: str, body: str) -> bool: ...

    async def events_due(self, limit: int = 50) -> list[WebhookEvent]:
        """Claim up to ``limit`` events ready to process, oldest first: none is handed out
        again for :data:`EVENT_CLAIM_SECONDS` unless ``event_failed`` reschedules it."""
        ...

    async def event_failed(self, event_id: int, error: str, retry_at: float | None) -> None: ...


class BulkInbox(Protocol):
    """Bulk-data files ControlShift announced (``data.*_table_exported`` webhooks): recorded
    before the webhook is acknowledged, then claimed and processed once (see
    :mod:`csand.storage.bulk`)."""

    async def record_bulk_file(self, *, url: str, jid: str | None, table: str, kind: str,
                               compression: str | None, body: str,
                               expires_at: float | None) -> bool:
        """Durably record an announced file; False when it was recorded before (same URL or
        same webhook ``jid``). ``expires_at`` None: the announcement time + 6 hours."""
        ...

    async def bulk_files_due(self, limit: int = 1) -> list[BulkFile]:
        """Claim up to ``limit`` files to process (pending, or whose claim ran out), oldest
        announcement first; each is ``processing`` for :data:`BULK_CLAIM_SECONDS`."""
        ...

    async def bulk_file_retry(self, file_id: int, error: str, retry_at: float) -> None:
        """A transient failure: back to ``pending`` until ``retry_at``, one more attempt."""
        ...

    async def bulk_file_finished(self, file_id: int, status: str, *, rows_done: int | None = None,
                                 error: str | None = None) -> None:
        """``done``, ``skipped``, ``expired`` or ``failed``: never handed out again."""
        ...

    async def release_bulk_files(self) -> int:
        """At start-up: the files this instance was processing when it stopped are due again
        at once (they go on from the rows already committed)."""
        ...

    async def bulk_status(self) -> dict[str, Any]:
        """The ``bulk`` figures of ``csand status`` (:func:`csand.storage.bulk.bulk_view`)."""
        ...


class BulkRecords(Protocol):
    """Bulk data as a source (``controlshift.source = "bulk"``, see
    :mod:`csand.controlshift.bulksource`): the rows signatures are joined with, what waits for
    its petition, and what a nightly full file did not hold. Written through
    ``commit_poll(bulk=...)``."""

    async def bulk_records(self, table: str, ids: Sequence[int]) -> dict[int, str]:
        """id → body (the row as JSON) of those of ``ids`` the store has for ``table``."""
        ...

    async def bulk_records_by_ref(self, table: str, refs: Sequence[int]) -> dict[int, list[str]]:
        """ref → bodies, in id order (e.g. a petition's categorized_petitions rows)."""
        ...

    async def bulk_forget(self, table: str, generation: int) -> int:
        """After the full file ``generation``: delete ``table``'s rows last written by an older
        file (so not held by this one; rows of files announced after it stay); how many."""
        ...

    async def bulk_parked(self, after: tuple[str, int] = ("", 0), limit: int = 500
                          ) -> list[Parked]:
        """Waiting rows after ``(kind, id)``, in that order."""
        ...

    async def bulk_waiting(self, kind: str, ids: Sequence[int]) -> set[int]:
        """Those of ``ids`` waiting in ``bulk_parked`` as ``kind``."""
        ...

    async def bulk_vanished(self, generation: int, before: str, after: int = 0,
                            limit: int = 1000) -> list[SignatureSeen]:
        """Live recorded signatures (ids after ``after``, in id order) that the full file
        ``generation`` did not hold and whose recorded CS time is before ``before`` (ISO).
        One marked by a later full file (a file id above ``generation``, processed meanwhile,
        by a retry's delay or another instance) was held by that one: not vanished."""
        ...

    async def signatures_seen_many(self, ids: Sequence[int]) -> dict[int, SignatureSeen]: ...


class SeenRecords(Protocol):
    """What ControlShift showed, and the AN petition mirroring each CS petition."""

    async def petition_state(self, cs_id: int) -> PetitionState | None: ...

    async def signatures_seen(self, petition_id: int) -> dict[int, SignatureSeen]: ...

    async def signature_seen(self, cs_id: int) -> SignatureSeen | None: ...

    async def pending_signature_emails(self, petition_id: int) -> dict[str, str | None]: ...

    async def petition_uuid(self, cs_id: int) -> str | None: ...

    async def set_petition_uuid(self, cs_id: int, slug: str, uuid: str) -> None: ...

    async def clear_petition_uuid(self, cs_id: int, uuid: str | None) -> None: ...

    async def event_state(self, slug: str) -> EventState | None: ...

    async def attendees_seen(self, event_slug: str) -> dict[int, AttendeeSeen]: ...

    async def event_uuid(self, slug: str) -> str | None: ...

    async def set_event_uuid(self, slug: str, uuid: str) -> None: ...

    async def clear_event_uuid(self, slug: str, uuid: str | None) -> None: ...

    async def calendar_uuid(self, slug: str) -> str | None: ...

    async def set_calendar_uuid(self, slug: str, uuid: str) -> None: ...

    def mirror_lock(self, cs_id: int | str) -> AbstractAsyncContextManager[None]:
        """Held while a worker looks for and creates the AN petition mirroring ``cs_id``: two
        instances must not both find none and both create one. (One process: a no-op; the
        worker's own lock serialises its workers.)"""
        ...


class ANKnowledge(Protocol):
    """What Action Network's own answers told csand (a person's consent timeline only moves
    forward)."""

    async def person(self, email: str) -> Person: ...

    async def knowledge(self, email: str, source_key: str) -> tuple[Person, bool]: ...

    async def save_person(self, email: str, person: Person) -> None: ...

    async def tags(self) -> dict[str, tuple[str, str | None]]: ...

    async def save_tags(self, tags: Iterable[tuple[str, str | None]]) -> None: ...


class Meta(Protocol):
    """Key/value state, the figures ``csand status`` prints, and the store's lifecycle."""

    async def get_meta(self, key: str) -> str | None: ...

    async def set_meta(self, **values: str | float | None) -> None: ...

    async def status(self) -> dict[str, Any]: ...

    async def schema_version(self) -> int: ...

    async def close(self) -> None: ...


class Cluster(Protocol):
    """Several csand instances on one store: exactly one leads (polls ControlShift and runs the
    sweeps), every one drains the outbox, and all share one Action Network request budget.

    ``shared`` says whether other processes may use the store at the same time (PostgreSQL); a
    SQLite store belongs to one process, which then always leads. Times of leadership and slots
    are the store's: the database server's clock for PostgreSQL, so instances on machines whose
    clocks disagree still agree on who leads and when a slot comes.
    """

    shared: bool
    instance: str  # this process's name in the cluster (its leases and heartbeats carry it)

    async def lead(self, ttl: float) -> int | None:
        """Take or renew leadership for ``ttl`` seconds: the term while this instance leads
        (a new term each time leadership changes hands), None while another one does."""
        ...

    async def resign(self) -> None:
        """Give leadership up at once (a clean shutdown), so another instance takes over."""
        ...

    async def heartbeat(self, info: dict[str, Any]) -> None:
        """Record that this instance is alive, with what ``csand status`` shows about it."""
        ...

    async def forget_instance(self) -> None:
        """This instance stopped cleanly: drop its heartbeat row."""
        ...

    async def cluster(self) -> dict[str, Any]:
        """``leader``, ``term``, ``leader_for_s`` (seconds its lease still runs) and
        ``instances``: each with ``instance``, ``heartbeat_age_s`` and its info."""
        ...

    async def reserve(self, bucket: str, interval: float, pause: float = 0.0) -> float:
        """Reserve the next request slot of ``bucket``: slots are ``interval`` seconds apart
        across every instance, and none starts before a pause (``pause`` seconds from now,
        after a 429) has passed. Returns how many seconds to wait for the slot."""
        ...


@runtime_checkable
class Storage(Outbox, WebhookInbox, BulkInbox, BulkRecords, SeenRecords, ANKnowledge, Meta, Cluster, Protocol):
    """Everything csand stores: what a backend implements."""


def redact_url(url: str) -> str:
    """The URL without its password (user:password@ or password=...), for logs and messages."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        url = urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{host}"))
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", url)


def is_url(target: object) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


async def open_store(
    target: str | PathLike[str] | Any, clock: Callable[[], float] | None = None, *,
    instance: str | None = None, pool_size: int | None = None,
) -> Storage:
    """Open the store: a SQLite path, a ``postgresql://`` URL, or the ``[store]`` settings.

    Creates and migrates the database as needed (:class:`SchemaTooNew` when a newer csand
    migrated it). ``clock`` drives every time the store keeps; without one, scheduling uses
    this machine's clock and PostgreSQL's cluster coordination the database server's.
    ``instance`` names this process in a cluster (default: the host name).
    """
    url = getattr(target, "url", None)
    if url is not None and hasattr(url, "get_secret_value"):
        url = url.get_secret_value()
    if url is None and is_url(target):
        url = target
    if pool_size is None:
        pool_size = getattr(target, "pool_size", None)
    instance = instance or _default_instance()
    if url:
        from csand.storage.postgres import PostgresStore

        return await PostgresStore.open(url, clock=clock, instance=instance,
                                        pool_size=pool_size or 10)
    from csand.storage.sqlite import SQLiteStore

    path = getattr(target, "path", None) or target
    return await SQLiteStore.open(path, clock=clock or time.time, instance=instance)


def _default_instance() -> str:
    import socket

    return socket.gethostname() or "csand"


__all__ = [
    "BULK_CLAIM_SECONDS", "BulkFile", "BulkInbox", "EVENT_CLAIM_SECONDS", "FORGET_INSTANCE_SECONDS", "STATUSES", "ANKnowledge", "Cluster", "Item", "Meta", "NotLeader",
    "Outbox", "PetitionState", "Requeued", "SchemaTooNew", "SeenRecords", "Storage",
    "StoreError", "WebhookEvent", "WebhookInbox", "is_url", "open_store", "redact_url",
]
