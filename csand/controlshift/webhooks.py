"""ControlShift webhooks: verify, accept durably, then turn events into outbox items.

Receiving and processing are separate on purpose. The HTTP handler only checks the signature,
parses the JSON and writes the raw event to the ``webhook_events`` inbox (one SQLite commit), so
the 2xx that stops ControlShift from retrying goes out fast and only once the event is durable.
The :class:`WebhookProcessor` then maps each event through the same rules as polled records
(fetching the petition by slug where the payload lacks it) and commits the outbox rows and
"event processed" together.

ControlShift events (``event.*``, ``attendee.*``) go through the poller's
:class:`~csand.controlshift.poller.EventSync` (``events``; without one they are ignored): an
``event.*`` webhook records what only webhooks say (``admin_status`` "inappropriate", the host's
split names and ``join_organisation``) and then processes the REST copy of the event exactly as
a poll of that one event would (its payload lacks description and calendar), so both sources
build the same items. ``event.created.requires_moderation`` is recorded, not synced. A redelivered event (same ``jid``) is recognised in the inbox, and
the same signature from a webhook and a poll is one version with one fingerprint.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from csand import metrics
from csand.controlshift.budget import purpose
from csand.controlshift.client import CSAuthError, CSError, PetitionDirectory
from csand.controlshift.poller import EventSync, event_slug
from csand.controlshift.versions import see_attendee, see_signature
from csand.logs import get_logger
from csand.model import (
    Activity,
    DeadLetter,
    MalformedRecord,
    creator_activity,
    creator_record,
    dead_letter,
    global_unsubscribe_activity,
    is_launched,
    is_syncable_event,
    normalize_email,
    now_utc,
    parse_time,
    record_id,
    text_field,
)
from csand.retry import WEBHOOK_EVENTS, RetryPolicy
from csand.storage import EventState, Storage, WebhookEvent

log = get_logger("webhooks")

SIGNATURE_HEADER = "x-controlshift-webhook-signature"
MAX_BODY_BYTES = 1024 * 1024

SIGNATURE_EVENTS = {"signature.created", "signature.updated", "signature.confirmed",
                    "signature.deleted"}
PETITION_EVENTS = {"petition.launched", "petition.updated"}
CATEGORY_EVENTS = {"category.created", "category.updated", "category.deleted"}
EVENT_EVENTS = {"event.created", "event.updated"}
MODERATION_EVENT = "event.created.requires_moderation"
ATTENDEE_EVENTS = {"attendee.created", "attendee.confirmed", "attendee.updated",
                   "attendee.deleted"}
HANDLED = (SIGNATURE_EVENTS | PETITION_EVENTS | CATEGORY_EVENTS | {"unsubscribe.created"}
           | EVENT_EVENTS | {MODERATION_EVENT} | ATTENDEE_EVENTS)


def sign(body: bytes, secret: str) -> str:
    return "sha256:" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, header: str | None, secret: str) -> bool:
    """Constant-time check of ``sha256:<hex HMAC-SHA256 of the raw body>``."""
    if not header:
        return False
    scheme, _, digest = header.strip().partition(":")
    if scheme.lower() != "sha256" or not digest:
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(digest.strip().lower().encode(), expected.encode())


@dataclass(frozen=True, slots=True)
class Received:
    type: str
    dedupe: str  # CS's jid, or the body's hash when there is none


def parse(body: bytes) -> Received:
    """Raise ValueError for anything that is not a CS event envelope."""
    data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ValueError("not a ControlShift event: no type")
    if not isinstance(data.get("data"), dict):
        raise ValueError("not a ControlShift event: no data object")
    jid = data.get("jid")
    dedupe = f"jid:{jid}" if jid else "sha256:" + hashlib.sha256(body).hexdigest()
    return Received(data["type"], dedupe)


class WebhookProcessor:
    """Drains the inbox into the outbox; retries while ControlShift cannot be read."""

    def __init__(
        self,
        store: Storage,
        directory: PetitionDirectory,
        org_slug: Callable[[], Any],
        poke_poller: Callable[[], None],
        *,
        global_unsubscribes: bool = True,
        policy: RetryPolicy = WEBHOOK_EVENTS,
        clock: Callable[[], float] = time.time,
        events: EventSync | None = None,
    ) -> None:
        self.store = store
        self.events = events  # the poller's: event and attendee webhooks are ignored without it
        self.directory = directory
        self._org_slug = org_slug
        self._poke = poke_poller
        self.global_unsubscribes = global_unsubscribes
        self.policy = policy
        self.clock = clock
        self._wake = anyio.Event()
        self.processed = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            events = await self.store.events_due()
            for event in events:
                await self.process(event)
            if not events:
                with anyio.move_on_after(1.0):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def process(self, event: WebhookEvent) -> None:
        t0 = time.monotonic()
        try:
            with purpose("webhook"):  # outside the poll budget: never waits for polling's share
                note = await self._apply(event)
        except (CSAuthError, CSError) as exc:
            delay = self.policy.delay(event.attempts + 1)
            await self.store.event_failed(event.id, str(exc), self.clock() + delay)
            log.warning("webhook.retry", event_id=event.id, type=event.type, error=str(exc),
                        retry_in_s=round(delay, 1))
            return
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            reason = f"malformed {event.type} event: {type(exc).__name__}: {exc}"
            await self.store.event_failed(event.id, reason, None)
            metrics.webhooks.labels("malformed").inc()
            log.error("webhook.malformed", event_id=event.id, type=event.type, reason=reason)
            return
        self.processed += 1
        log.info("webhook.processed", event_id=event.id, type=event.type, note=note,
                 ms=round((time.monotonic() - t0) * 1000))

    async def _apply(self, event: WebhookEvent) -> str:
        envelope = json.loads(event.body)
        data: dict[str, Any] = envelope["data"]
        if event.type in SIGNATURE_EVENTS:
            return await self._signature(event, data)
        if event.type in PETITION_EVENTS:
            return await self._petition(event, data)
        if event.type == "unsubscribe.created":
            return await self._unsubscribe(event, data)
        if self.events is not None and event.type in EVENT_EVENTS | {MODERATION_EVENT}:
            return await self._event(event, data, self.events)
        if self.events is not None and event.type in ATTENDEE_EVENTS:
            return await self._attendee(event, data, self.events)
        if event.type in CATEGORY_EVENTS:
            self.directory.forget_all()
            await self.store.commit_poll(None, event_id=event.id)
            self._poke()  # the poller re-reads petitions; changed categories re-tag signers
            return "categories changed: petitions re-read at the next poll"
        await self.store.commit_poll(None, event_id=event.id)
        return "ignored"

    async def _dead_letters(self, event: WebhookEvent, letters: list[DeadLetter],
                            activities: list[Activity] | None = None) -> str:
        """Malformed records: kept as dead letters (as the poller does), the event processed."""
        await self.store.commit_poll(None, (), activities or (), event_id=event.id,
                                     dead_letters=letters)
        self._log_dead_letters(event, letters)
        return "malformed record: kept as a dead letter"

    def _log_dead_letters(self, event: WebhookEvent, letters: list[DeadLetter]) -> None:
        if letters:
            metrics.webhooks.labels("malformed").inc()
        for letter in letters:
            log.error(f"webhook.malformed_{letter.kind}", event_id=event.id, type=event.type,
                      source=letter.source_key, reason=letter.reason,
                      msg="kept as a dead letter; syncs by itself once corrected on ControlShift")

    async def _signature(self, event: WebhookEvent, data: dict[str, Any]) -> str:
        about = data.get("petition")
        try:
            if not isinstance(about, dict):
                raise MalformedRecord("petition is missing" if about is None
                                      else f"petition is not an object ({type(about).__name__})")
            slug = text_field(about, "slug", required=True, prefix="petition.") or ""
        except MalformedRecord as exc:
            return await self._dead_letters(event, [dead_letter("signature", data, exc)])
        petition = await self.directory.get(slug)
        if not is_launched(petition):
            petition = await self.directory.get(slug, fresh=True)
            if not is_launched(petition):
                await self.store.commit_poll(None, event_id=event.id)
                return "petition not launched: ignored"
        if event.type == "signature.deleted" and not data.get("deleted_at"):
            data = {**data, "deleted_at": now_utc().isoformat()}
        org = await self._org_slug()
        activities: list[Activity] = []
        letters: list[DeadLetter] = []
        cs_id = record_id(petition)
        state = await self.store.petition_state(cs_id)
        if state is None or state.content is None:
            # First sight of this petition: its creator goes first, as in a poll.
            extra = json.loads(state.creator_extra) if state and state.creator_extra else None
            try:
                activities.append(creator_activity(petition, org, extra))
            except Exception as exc:  # the creator's own dead letter; the signature goes on
                letters.append(dead_letter("petition", creator_record(petition), exc,
                                           petition_id=cs_id,
                                           source_key=f"petition:{cs_id}:creator"))
            self._poke()
        try:
            sig_id = record_id(data)
        except MalformedRecord as exc:
            letters.append(dead_letter("signature", data, exc, petition_id=cs_id))
            return await self._dead_letters(event, letters, activities)
        previous = await self.store.signature_seen(sig_id)
        try:
            seen = see_signature(data, petition, org, previous)
        except Exception as exc:  # as in a poll: one malformed record is one dead letter
            letters.append(dead_letter("signature", data, exc, petition_id=cs_id))
            return await self._dead_letters(event, letters, activities)
        if seen.activity is not None:
            activities.append(seen.activity)
        await self.store.commit_poll(
            None, [seen.row] if seen.row else (), activities,
            [seen.cancel] if seen.cancel else (), event_id=event.id, dead_letters=letters,
        )
        self._log_dead_letters(event, letters)
        if seen.cancel:
            return "signature deleted: not synced"
        return "enqueued" if seen.activity else "already known"

    async def _petition(self, event: WebhookEvent, data: dict[str, Any]) -> str:
        petition = await self.directory.get(str(data["slug"]), fresh=True)
        if not is_launched(petition):
            await self.store.commit_poll(None, event_id=event.id)
            return "not launched"
        creator = data.get("creator") or {}
        cs_id = record_id(petition)
        org = await self._org_slug()
        try:
            if not isinstance(creator, dict):
                raise MalformedRecord(f"creator is not an object ({type(creator).__name__})")
            extra: dict[str, Any] = {"for_email": normalize_email(
                text_field(creator, "email", prefix="creator."))}
            if creator.get("join_organisation") is not None:
                extra["join_organisation"] = creator["join_organisation"]
            if creator.get("postcode"):
                extra["postcode"] = creator["postcode"]
            activity = creator_activity(petition, org, extra)
        except MalformedRecord as exc:  # not kept as creator_extra: the poll's creator syncs
            return await self._dead_letters(event, [dead_letter(
                "petition", data, exc, petition_id=cs_id, source_key=f"petition:{cs_id}:creator")])
        await self.store.commit_poll(
            None, (), [activity], event_id=event.id,
            creator_extra=(int(petition["id"]), str(petition["slug"]), json.dumps(extra)),
        )
        self._poke()  # a launch has signatures to walk soon
        return "creator enqueued"

    async def _unsubscribe(self, event: WebhookEvent, data: dict[str, Any]) -> str:
        if data.get("unsubscribe_organisation") is not True:
            await self.store.commit_poll(None, event_id=event.id)
            return "single-petition or partnership unsubscribe: nothing changes in AN"
        if not self.global_unsubscribes:
            await self.store.commit_poll(None, event_id=event.id)
            return "org-wide unsubscribe ignored (controlshift.global_unsubscribes = false)"
        try:
            activity = global_unsubscribe_activity(
                data["id"], data.get("email"), parse_time(data.get("created_at")) or now_utc()
            )
        except MalformedRecord as exc:
            return await self._dead_letters(event, [dead_letter("unsubscribe", data, exc)])
        await self.store.commit_poll(None, (), [activity], event_id=event.id)
        return "global unsubscribe enqueued"

    # ---- events and attendees ----

    async def _event(self, event: WebhookEvent, data: dict[str, Any], events: EventSync) -> str:
        try:
            slug = event_slug(data)
            extra = host_extra(data.get("host"))
        except MalformedRecord as exc:  # the poll still syncs the event from its REST copy
            slug_value = data.get("slug")
            if isinstance(slug_value, str) and slug_value.strip() \
                    and data.get("admin_status") == "inappropriate":
                # The moderation is recorded whatever else is wrong: REST never shows it.
                await self.store.commit_poll(None, event=EventState(slug_value.strip(),
                                                                    inappropriate=True))
            return await self._dead_letters(event, [dead_letter(
                "event", data, exc,
                source_key=f"event:{slug_value}" if isinstance(slug_value, str) else None)])
        extra_json = json.dumps(extra, sort_keys=True) if extra is not None else None
        inappropriate = data.get("admin_status") == "inappropriate"
        if event.type == MODERATION_EVENT:
            await self.store.commit_poll(None, event=EventState(slug, host_extra=extra_json),
                                         event_id=event.id)
            return "event awaiting moderation: recorded, not synced"
        rest = await events.cs.event(slug)
        org = await self._org_slug()
        async with events.lock(slug):
            if rest is None:  # gone, or not shown: what the webhook said is kept
                await self.store.commit_poll(None, event=EventState(
                    slug, inappropriate=inappropriate, host_extra=extra_json), event_id=event.id)
                return "event not found on ControlShift: recorded, not synced"
            state = await self.store.event_state(slug)
            walked = state is not None and state.content is not None
            # Attendees of an event walked before arrive by their own webhooks and polls.
            return await events.sync(rest, org, walk=not walked, event_id=event.id,
                                     inappropriate=inappropriate, host_extra=extra)

    async def _attendee(self, event: WebhookEvent, data: dict[str, Any], events: EventSync
                        ) -> str:
        about = data.get("event")
        try:
            if not isinstance(about, dict):
                raise MalformedRecord("event is missing" if about is None
                                      else f"event is not an object ({type(about).__name__})")
            slug = event_slug(about)
            attendee_id = record_id(data)
        except MalformedRecord as exc:
            return await self._dead_letters(event, [dead_letter("attendee", data, exc)])
        org = await self._org_slug()
        deleting = event.type == "attendee.deleted"
        rest = None if deleting else await events.cs.event(slug)
        if not deleting and rest is None:  # not readable yet: tried again later
            raise CSError(f"ControlShift event {slug!r} of attendee {attendee_id} not found")
        async with events.lock(slug):
            state = await self.store.event_state(slug)
            if state is not None and state.inappropriate:
                await self.store.commit_poll(None, event_id=event.id)
                return "event moderated as inappropriate: not synced"
            ref = None
            if rest is not None:
                if not is_syncable_event(rest):
                    await self.store.commit_poll(None, event_id=event.id)
                    return "event not launched: its attendees are walked once it is"
                if state is None or state.content is None:
                    # First sight of the event: its host goes first, as in a poll.
                    await events.sync(rest, org, walk=True)
                    self._poke()
                try:
                    ref = await events.ref(rest, org)
                except MalformedRecord:  # the event's own dead letter says why
                    await self.store.commit_poll(None, event_id=event.id)
                    return "event malformed: not synced"
            previous = (await self.store.attendees_seen(slug)).get(attendee_id)
            try:
                seen = see_attendee(
                    data, ref, previous, event_slug=slug,
                    deleted_at=(text_field(data, "deleted_at") or now_utc().isoformat())
                    if deleting else None)
            except Exception as exc:  # as in a poll: one malformed record is one dead letter
                return await self._dead_letters(event, [dead_letter("attendee", data, exc)])
            await self.store.commit_poll(
                None, activities=[seen.activity] if seen.activity else (),
                deleted_sources=[seen.cancel] if seen.cancel else (),
                attendees=[seen.row] if seen.row else (), event_id=event.id)
        if deleting or seen.cancel:
            return "attendee deleted or not attending: not synced"
        return "enqueued" if seen.activity else "already known"


_HOST_EXTRA = ("first_name", "last_name", "confirmed_at")


def host_extra(host: Any) -> dict[str, Any] | None:
    """What an ``event.*`` webhook says of the host that the REST event does not: split names,
    ``join_organisation`` and ``confirmed_at``, for the host's email (see
    :func:`csand.controlshift.poller.with_host_extra`). None without a host."""
    if host is None:
        return None
    if not isinstance(host, dict):
        raise MalformedRecord(f"host is not an object ({type(host).__name__})")
    extra: dict[str, Any] = {
        "for_email": normalize_email(text_field(host, "email", prefix="host."))}
    for key in _HOST_EXTRA:
        value = text_field(host, key, prefix="host.")
        if value is not None:
            extra[key] = value
    join = host.get("join_organisation")
    if join is not None and not isinstance(join, bool):
        raise MalformedRecord(
            f"host.join_organisation is not true, false or null ({type(join).__name__})")
    if join is not None:
        extra["join_organisation"] = join
    return extra
