"""Storage: the interfaces the rest of csand sees, and :func:`open_store` to get a backend.

csand keeps four kinds of state, each behind its own interface:

* :class:`Outbox` — activities waiting to reach Action Network, leased one per person in the
  order they happened, with their outcome, retries and dead letters.
* :class:`WebhookInbox` — ControlShift webhooks accepted durably before they are processed.
* :class:`SeenRecords` — what ControlShift showed (petition change signals, signature versions)
  and which AN petition mirrors each CS petition.
* :class:`ANKnowledge` — what Action Network's own answers told csand about people and tags.

plus :class:`Meta` (key/value state, the status figures, the schema, closing). :class:`Storage`
is all of them; a backend proves it keeps their rules by passing ``tests/storage``, one
conformance suite for every backend. SQLite (:mod:`csand.storage.sqlite`) is the only backend
for now.

Times are Unix seconds (float, from the store's injectable clock) for scheduling, ISO 8601 for
display and for ControlShift's own times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from os import PathLike
from typing import Any, Protocol, runtime_checkable

from csand.model import Activity, DeadLetter, Person, SignatureSeen

STATUSES = ("pending", "in_flight", "done", "dead", "cancelled")


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
    ) -> int:
        """Record what was seen and enqueue what it produced, atomically; the number of new
        items (re-seen versions are not added again)."""
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

    async def prune(self, retention_seconds: float, *, batch: int = 1000) -> dict[str, int]:
        """Forget personal data finished with more than ``retention_seconds`` ago; rows pruned
        per kind (``outbox``, ``webhook_events``)."""
        ...


class WebhookInbox(Protocol):
    """Webhooks accepted before they are processed (processing commits via ``commit_poll``)."""

    async def receive_event(self, dedupe: str, type_: str, body: str) -> bool: ...

    async def events_due(self, limit: int = 50) -> list[WebhookEvent]: ...

    async def event_failed(self, event_id: int, error: str, retry_at: float | None) -> None: ...


class SeenRecords(Protocol):
    """What ControlShift showed, and the AN petition mirroring each CS petition."""

    async def petition_state(self, cs_id: int) -> PetitionState | None: ...

    async def signatures_seen(self, petition_id: int) -> dict[int, SignatureSeen]: ...

    async def signature_seen(self, cs_id: int) -> SignatureSeen | None: ...

    async def pending_signature_emails(self, petition_id: int) -> dict[str, str | None]: ...

    async def petition_uuid(self, cs_id: int) -> str | None: ...

    async def set_petition_uuid(self, cs_id: int, slug: str, uuid: str) -> None: ...

    async def clear_petition_uuid(self, cs_id: int, uuid: str | None) -> None: ...


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


@runtime_checkable
class Storage(Outbox, WebhookInbox, SeenRecords, ANKnowledge, Meta, Protocol):
    """Everything csand stores: what a backend implements."""


class _HasPath(Protocol):
    @property
    def path(self) -> PathLike[str]: ...


async def open_store(
    target: str | PathLike[str] | _HasPath, clock: Callable[[], float] = time.time
) -> Storage:
    """Open the store: a database path, or the ``[store]`` settings (their ``path``).

    Creates and migrates the database as needed. SQLite is the only backend for now.
    """
    from csand.storage.sqlite import SQLiteStore

    path = target.path if hasattr(target, "path") else target
    return await SQLiteStore.open(path, clock=clock)


__all__ = [
    "STATUSES", "ANKnowledge", "Item", "Meta", "Outbox", "PetitionState", "Requeued",
    "SeenRecords", "Storage", "WebhookEvent", "WebhookInbox", "open_store",
]
