"""Domain records shared by every stage: what ControlShift reported, as csand stores and replays it.

An :class:`Activity` is one version of one thing a person did on ControlShift (created a petition,
signed one, unsubscribed from everything). It is what the outbox holds, serialised as JSON, so it
must carry everything the sync needs without asking ControlShift again.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any

CREATOR_TAG = "controlshift-petition-creator"
SIGNER_TAG = "controlshift-petition-signer"
CATEGORY_TAG_PREFIX = "controlshift:"
EVENT_HOST_TAG = "controlshift-event-host"
ATTENDEE_TAG = "controlshift-event-attendee"
ATTENDING = frozenset({"attending", "confirmed", "attended"})  # the others: declined, no-show

# Deliberately simple: AN is the authority on deliverability; this only stops records that
# cannot possibly be an address (missing, no "@", spaces) from costing a request.
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class ActivityKind(StrEnum):
    PETITION_CREATED = "petition_created"
    SIGNATURE = "signature"
    GLOBAL_UNSUBSCRIBE = "global_unsubscribe"
    EVENT_HOSTED = "event_hosted"  # the host of an event: the event's creator and organiser
    ATTENDANCE = "attendance"  # an attendee's RSVP
    EVENT_CHANGED = "event_changed"  # title, description, times or place of a mirrored event


class MalformedRecord(ValueError):
    """A ControlShift record with a field missing or of the wrong type; the message names it
    (``email is not a string (int)``)."""


def _kind(value: Any) -> str:
    return type(value).__name__


def record_id(record: Any, key: str = "id") -> int:
    """A CS record's numeric id: an int (a bool or a digit string is not one)."""
    if not isinstance(record, dict):
        raise MalformedRecord(f"not an object ({_kind(record)})")
    value = record.get(key)
    if value is None:
        raise MalformedRecord(f"{key} is missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedRecord(f"{key} is not an integer ({_kind(value)})")
    return value


def text_field(record: dict[str, Any], key: str, *, required: bool = False,
               prefix: str = "") -> str | None:
    """A string field, or None when absent or null; any other type is malformed."""
    value = record.get(key)
    if value is None:
        if required:
            raise MalformedRecord(f"{prefix}{key} is missing")
        return None
    if not isinstance(value, str):
        raise MalformedRecord(f"{prefix}{key} is not a string ({_kind(value)})")
    return value


def time_field(record: dict[str, Any], key: str, *, prefix: str = "") -> datetime | None:
    """A timestamp field: None when absent, null or empty; anything unparseable is malformed."""
    value = record.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value  # read by csand already (a bulk-data cell): parse_time's result
    if not isinstance(value, str):
        raise MalformedRecord(f"{prefix}{key} is not a timestamp ({_kind(value)})")
    parsed = parse_time(value)
    if parsed is None:
        raise MalformedRecord(f"{prefix}{key} is not a timestamp ({value[:40]!r})")
    return parsed


def _opt_in(record: dict[str, Any], prefix: str = "") -> bool:
    """``join_organisation``: true, false or null (absent); only true is an opt-in."""
    value = record.get("join_organisation")
    if value is not None and not isinstance(value, bool):
        raise MalformedRecord(
            f"{prefix}join_organisation is not true, false or null ({_kind(value)})")
    return value is True


def normalize_email(raw: str | None) -> str | None:
    """Emails match case-insensitively after trimming (docs/rules.md §1)."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise MalformedRecord(f"email is not a string ({_kind(raw)})")
    email = raw.strip().lower()
    return email or None


def valid_email(email: str | None) -> bool:
    return email is not None and bool(_EMAIL_RE.match(email))


def category_tag(name: str) -> str:
    return f"{CATEGORY_TAG_PREFIX}{name}"


def parse_time(value: Any) -> datetime | None:
    """Parse a CS timestamp (ISO 8601, ``Z`` or offset); naive values are taken as UTC."""
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        text = str(value).strip().replace("Z", "+00:00")
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            return None
    # Normalised to UTC so that ISO strings sort in time order in the outbox.
    return dt.astimezone(UTC) if dt.tzinfo else dt.replace(tzinfo=UTC)


def before_history(activity: Activity, start: datetime | None) -> bool:
    """Whether ``activity`` predates ``sync.history_start`` and so is recorded, not synced.

    An org-wide unsubscribe never is, whatever its age: csand must not leave subscribed someone
    who asked to hear nothing more. An activity without a time is synced (it cannot be placed).
    """
    return (start is not None and activity.kind is not ActivityKind.GLOBAL_UNSUBSCRIBE
            and activity.occurred_at is not None and activity.occurred_at < start)


def history_start(value: str | None, now: datetime) -> datetime | None:
    """``sync.history_start`` as a time: None (all history), ``"now"`` (``now``), an ISO date
    (midnight UTC) or an ISO time (naive: UTC). Raises ValueError for anything else."""
    if value is None:
        return None
    text = value.strip()
    if text.lower() == "now":
        return now
    parsed = parse_time(text)
    if parsed is None:
        raise ValueError(f"{value!r} is neither \"now\" nor an ISO date or time "
                         "(for example 2026-11-01 or 2026-11-01T09:30:00Z)")
    return parsed


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


@dataclass(frozen=True, slots=True)
class PetitionRef:
    """The part of a CS petition needed to mirror it in AN."""

    cs_id: int
    slug: str
    title: str
    url: str | None
    identifier: str  # globally unique AN identifier, e.g. controlshift-org:petition-12
    creator_email: str | None = None


@dataclass(frozen=True, slots=True)
class CalendarRef:
    """A CS calendar that holds synced events: one AN event campaign."""

    slug: str
    name: str
    url: str | None
    identifier: str  # controlshift-<org>:calendar-<slug>
    description: str | None = None


@dataclass(frozen=True, slots=True)
class EventRef:
    """The part of a CS event needed to mirror it in AN. CS events have no numeric id: the slug
    is the key."""

    slug: str
    title: str
    url: str | None
    identifier: str  # controlshift-<org>:event-<slug>
    description: str | None = None
    start_at: str | None = None  # ISO 8601, UTC
    end_at: str | None = None
    virtual: bool = False
    # AN's location fields (venue, address_lines as "\n"-joined text, locality, region,
    # postal_code, country), present ones only; none for a virtual event.
    location: tuple[tuple[str, str], ...] = ()
    calendar: CalendarRef | None = None
    host_email: str | None = None

    def content(self) -> str:
        """Fingerprint of what AN shows of the event: a change is sent as an update."""
        data = [self.title, self.description, self.start_at, self.end_at, self.virtual,
                [list(pair) for pair in self.location], self.url]
        return hashlib.sha256(json.dumps(data, separators=(",", ":")).encode()).hexdigest()[:20]


@dataclass(frozen=True, slots=True)
class Activity:
    kind: ActivityKind
    source_key: str  # which CS record this is a version of ("signature:42")
    email: str | None  # normalised; None when CS sent none
    raw_email: str | None = None  # as CS sent it, for the dead-letter reason
    first_name: str | None = None
    last_name: str | None = None
    postcode: str | None = None
    opted_in: bool = False
    occurred_at: datetime | None = None  # when this version happened: ordering per person
    # When the person opted in (confirmed_at, else created_at): never the record's updated_at,
    # which any later edit bumps. None when not opted in, or for payloads written before.
    opted_in_at: datetime | None = None
    fields_at: datetime | None = None  # when the person's fields were given: precedence
    petition: PetitionRef | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    # The person's answers to the organisation's custom questions (additional_fields), as
    # (ControlShift short name, value as text), sorted; empty answers are left out.
    custom_fields: tuple[tuple[str, str], ...] = ()
    phone: str | None = None  # phone_number as typed (free text)
    sms_opt_in: bool = False  # opt_in_sms: true, an explicit SMS opt-in
    event: EventRef | None = None  # for hosts and attendees

    @property
    def opt_in_time(self) -> datetime | None:
        """The time of this record's opt-in, for the consent timeline (None when there is none).

        Older payloads carry no ``opted_in_at``: their ``fields_at`` is the record's
        ``created_at``, the earliest moment the person can have opted in, so an org-wide
        unsubscribe after it still wins.
        """
        if not self.opted_in:
            return None
        return self.opted_in_at or self.fields_at

    @property
    def person_key(self) -> str:
        """Serialisation key: items with the same key are applied one at a time, in order. An
        event's changes are nobody's: they queue behind each other, per event."""
        if self.kind is ActivityKind.EVENT_CHANGED and self.event is not None:
            return f"event:{self.event.slug}"
        return self.email if self.email else f"invalid:{self.source_key}"

    def fingerprint(self) -> str:
        """Hash of everything that changes what csand writes to AN; re-seeing it enqueues nothing."""
        # Not occurred_at (a CS-side edit such as a single-petition unsubscribe bumps it without
        # changing anything AN holds) and not the petition's title (a retitled petition must not
        # resync every signer); the category tags are in, so a new category reaches every signer.
        data: list[Any] = [
            str(self.kind), self.source_key, self.email, self.first_name, self.last_name,
            self.postcode, self.opted_in, self.fields_at.isoformat() if self.fields_at else None,
            self.petition.cs_id if self.petition else None, sorted(self.tags),
        ]
        # Added later: only when present, so versions without them keep their fingerprint (and
        # an upgrade does not re-sync every record).
        if self.custom_fields:
            data.append(["custom_fields", [list(pair) for pair in self.custom_fields]])
        if self.phone is not None or self.sms_opt_in:
            data.append(["phone", self.phone, self.sms_opt_in])
        if self.event is not None:  # which event; its content changes are updates, not RSVPs
            data.append(["event", self.event.slug])
            if self.kind is ActivityKind.EVENT_CHANGED:
                data.append(["content", self.event.content()])
        blob = json.dumps(data, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    @property
    def dedupe_key(self) -> str:
        return f"{self.source_key}@{self.fingerprint()}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = str(self.kind)
        data["tags"] = list(self.tags)
        data["custom_fields"] = [list(pair) for pair in self.custom_fields]
        for key in ("occurred_at", "fields_at", "opted_in_at"):
            value = data[key]
            data[key] = value.isoformat() if value else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Activity:
        petition = data.get("petition")
        event = data.get("event")
        return cls(
            kind=ActivityKind(data["kind"]),
            source_key=data["source_key"],
            email=data.get("email"),
            raw_email=data.get("raw_email"),
            first_name=data.get("first_name"),
            last_name=data.get("last_name"),
            postcode=data.get("postcode"),
            opted_in=bool(data.get("opted_in")),
            occurred_at=parse_time(data.get("occurred_at")),
            fields_at=parse_time(data.get("fields_at")),
            opted_in_at=parse_time(data.get("opted_in_at")),
            petition=PetitionRef(**petition) if petition else None,
            tags=tuple(data.get("tags") or ()),
            custom_fields=tuple((str(k), str(v)) for k, v in data.get("custom_fields") or ()),
            phone=data.get("phone"),
            sms_opt_in=bool(data.get("sms_opt_in")),
            event=_event_from_json(event) if event else None,
        )


def _event_from_json(data: dict[str, Any]) -> EventRef:
    calendar = data.get("calendar")
    return EventRef(**{
        **data, "location": tuple(tuple(pair) for pair in data.get("location") or ()),
        "calendar": CalendarRef(**calendar) if calendar else None,
    })


@dataclass(frozen=True, slots=True)
class Person:
    """What csand knows about one AN person, from AN's own earlier answers."""

    exists: bool | None = None  # None: unknown, must look up before a non-opted-in write
    uuid: str | None = None
    subscribed: bool | None = None  # None: present but status unknown
    # Per field (given_name, family_name, postal_code): CS time of the activity that set it.
    fields_at: Mapping[str, datetime] = field(default_factory=lambda: MappingProxyType({}))
    # The person's consent timeline, in ControlShift times (when the person acted, not when
    # csand learnt of it): the latest org-wide unsubscribe, and the latest opt-in AN acknowledged.
    unsubscribed_at: datetime | None = None
    opted_in_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Fields:
    """Person fields to send; ``None`` members are omitted (never blank a value AN has)."""

    email: str
    given_name: str | None = None
    family_name: str | None = None
    postal_code: str | None = None
    custom_fields: tuple[tuple[str, str], ...] = ()  # (AN custom field name, value)
    # AN's native mobile number: (E.164 number, "subscribed" or None to leave its status alone)
    mobile: tuple[str, str | None] | None = None


@dataclass(frozen=True, slots=True)
class SignatureSeen:
    """The version of a CS signature csand last recorded (from a poll or a webhook)."""

    cs_id: int
    petition_id: int
    fingerprint: str
    deleted_at: str | None
    updated_at: str | None = None  # ISO, UTC: an older version seen later is ignored


@dataclass(frozen=True, slots=True)
class AttendeeSeen:
    """The version of a CS attendee csand last recorded (from a poll or a webhook)."""

    cs_id: int
    event_slug: str
    fingerprint: str
    deleted_at: str | None
    updated_at: str | None = None  # ISO, UTC: an older version seen later is ignored


def is_launched(petition: dict[str, Any]) -> bool:
    """Only launched petitions are synced. A record without the field (not the documented shape)
    counts as launched: skipping every petition would lose everything, silently."""
    return petition.get("launched", True) is True


def petition_identifier(org_slug: str, cs_id: int) -> str:
    return f"controlshift-{org_slug}:petition-{cs_id}"


def petition_ref(petition: dict[str, Any], org_slug: str) -> PetitionRef:
    """Raises :class:`MalformedRecord` for a petition without an integer id and a slug."""
    cs_id = record_id(petition)
    slug = text_field(petition, "slug", required=True) or ""
    if not slug.strip():
        raise MalformedRecord("slug is empty")
    creator = petition.get("creator")
    creator_email = creator.get("email") if isinstance(creator, dict) else None
    return PetitionRef(
        cs_id=cs_id,
        slug=slug,
        title=_clean(text_field(petition, "title")) or slug,
        url=_clean(text_field(petition, "url")),
        identifier=petition_identifier(org_slug, cs_id),
        # A malformed creator is the creator's own dead letter; its signers still link to
        # the petition (without a creator).
        creator_email=normalize_email(creator_email) if isinstance(creator_email, str) else None,
    )


def category_tags(petition: dict[str, Any]) -> tuple[str, ...]:
    names = []
    for category in petition.get("categories") or ():
        name = _clean(category.get("name") if isinstance(category, dict) else category)
        if name:
            names.append(category_tag(name))
    return tuple(sorted(set(names)))


def creator_activity(
    petition: dict[str, Any], org_slug: str, extra: dict[str, Any] | None = None
) -> Activity:
    """The creation of a launched petition, as an activity of its creator.

    The REST petition carries no postcode and no opt-in for its creator; ``extra`` adds what a
    ``petition.*`` webhook told csand, so both sources build the same activity. It belongs to
    the person it was given for (its ``for_email``): a new creator does not inherit it.
    """
    raw_creator = petition.get("creator")
    if raw_creator is not None and not isinstance(raw_creator, dict):
        raise MalformedRecord(f"creator is not an object ({_kind(raw_creator)})")
    creator = dict(raw_creator or {})
    if extra and extra.get("for_email") == normalize_email(creator.get("email")):
        creator.update({k: v for k, v in extra.items() if k != "for_email"})
    ref = petition_ref(petition, org_slug)
    created = time_field(petition, "created_at")
    return _person_activity(
        ActivityKind.PETITION_CREATED, f"petition:{ref.cs_id}:creator", creator,
        occurred_at=created, fields_at=created, opted_in_at=created, petition=ref,
        tags=(CREATOR_TAG, *category_tags(petition)), prefix="creator.",
    )


def signature_activity(signature: dict[str, Any], petition: dict[str, Any], org_slug: str) -> Activity:
    """Raises :class:`MalformedRecord` when a field it uses is missing or of the wrong type."""
    sig_id = record_id(signature)
    created = time_field(signature, "created_at")
    return _person_activity(
        ActivityKind.SIGNATURE, f"signature:{sig_id}", signature,
        occurred_at=time_field(signature, "updated_at") or created, fields_at=created,
        # A late confirmation is an opt-in at its time; without one, the signature's creation.
        opted_in_at=time_field(signature, "confirmed_at") or created,
        petition=petition_ref(petition, org_slug), tags=(SIGNER_TAG, *category_tags(petition)),
    )


def _person_activity(
    kind: ActivityKind, source_key: str, person: dict[str, Any], *, occurred_at: datetime | None,
    fields_at: datetime | None, opted_in_at: datetime | None, petition: PetitionRef | None,
    tags: tuple[str, ...], prefix: str = "",
) -> Activity:
    """Creators and signers carry the same person fields; only ``true`` is an opt-in.

    Strings must be strings: a number or an object where CS documents text is malformed, not
    something to guess at.
    """
    raw_email = text_field(person, "email", prefix=prefix)
    opted_in = _opt_in(person, prefix)
    sms = person.get("opt_in_sms")
    return Activity(
        kind=kind,
        source_key=source_key,
        email=normalize_email(raw_email),
        raw_email=raw_email,
        first_name=_clean(text_field(person, "first_name", prefix=prefix)),
        last_name=_clean(text_field(person, "last_name", prefix=prefix)),
        postcode=_clean(text_field(person, "postcode", prefix=prefix)),
        opted_in=opted_in,
        occurred_at=occurred_at,
        fields_at=fields_at,
        opted_in_at=opted_in_at if opted_in else None,
        petition=petition,
        tags=tags,
        custom_fields=custom_answers(person.get("additional_fields"), prefix),
        phone=_phone_text(person.get("phone_number")),
        sms_opt_in=sms is True or (isinstance(sms, str) and sms.strip().lower() in ("t", "true")),
    )


def _phone_text(value: Any) -> str | None:
    """A phone number is free text on ControlShift; a number typed as a number is still one.
    Anything else is dropped (never the whole activity for it)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return _clean(value)


def custom_answers(value: Any, prefix: str = "") -> tuple[tuple[str, str], ...]:
    """``additional_fields`` as sorted (name, text) pairs. Values go to AN as text: numbers and
    booleans as written, lists joined with ", ", objects as JSON; empty answers are left out.
    Anything but an object (or null) is malformed."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise MalformedRecord(f"{prefix}additional_fields is not an object ({_kind(value)})")
    answers: dict[str, str] = {}
    for name, answer in value.items():
        if isinstance(answer, bool):
            text = "true" if answer else "false"
        elif isinstance(answer, list):
            text = ", ".join(str(a).strip() for a in answer if a is not None and str(a).strip())
        elif isinstance(answer, dict):
            text = json.dumps(answer, sort_keys=True, ensure_ascii=False) if answer else ""
        else:
            text = "" if answer is None else str(answer).strip()
        key = str(name).strip()
        if key and text:
            answers[key] = text
    return tuple(sorted(answers.items()))


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A ControlShift record csand cannot sync as it is: it goes straight to the dead letters,
    with a reason for the operator and the record as CS sent it."""

    source_key: str  # "signature:42", or "signature:'42'" when even the id is malformed
    reason: str
    record: str  # the record as JSON (keys sorted: the same record gives the same text)
    petition_id: int | None = None
    kind: str = "signature"  # what the record was meant to be

    @property
    def dedupe_key(self) -> str:
        """One dead letter per version of a record, however often it is seen."""
        digest = hashlib.sha256(self.record.encode()).hexdigest()[:20]
        return f"malformed:{self.source_key}@{digest}"

    def payload(self, limit: int = 4000) -> dict[str, Any]:
        return {"kind": self.kind, "source_key": self.source_key, "reason": self.reason,
                "malformed": self.record[:limit]}


def creator_record(petition: dict[str, Any]) -> dict[str, Any]:
    """The part of a petition its creator activity is built from: a malformed creator's dead
    letter holds this, so a new signature count does not make it a new dead letter."""
    return {key: petition.get(key) for key in ("id", "slug", "created_at", "creator")}


def dead_letter(kind: str, record: Any, exc: BaseException, *, petition_id: int | None = None,
                source_key: str | None = None) -> DeadLetter:
    """The dead letter for a ControlShift ``kind`` record (e.g. a signature) that ``exc`` says
    is malformed: ``malformed ControlShift signature 42: email is not a string (int)``."""
    if source_key is None:
        raw_id = record.get("id") if isinstance(record, dict) else None
        shown = str(raw_id) if isinstance(raw_id, int) and not isinstance(raw_id, bool) else (
            "(no id)" if raw_id is None else repr(raw_id)[:40])
        source_key = f"{kind}:{shown}"
    label = source_key.replace(":", " ", 1).replace(":", " ")
    cause = str(exc) if isinstance(exc, MalformedRecord) else f"{type(exc).__name__}: {exc}"
    text = json.dumps(record, sort_keys=True, default=str, separators=(",", ":"))
    return DeadLetter(source_key, f"malformed ControlShift {label}: {cause}"[:1000], text,
                      petition_id, kind)


def global_unsubscribe_activity(
    unsubscribe_id: Any, email: str | None, at: datetime | None
) -> Activity:
    return Activity(
        kind=ActivityKind.GLOBAL_UNSUBSCRIBE,
        source_key=f"unsubscribe:{unsubscribe_id}",
        email=normalize_email(email),
        raw_email=email,
        occurred_at=at,
        fields_at=at,
    )


def now_utc() -> datetime:
    return datetime.now(UTC)


# ---- events, hosts and attendees (docs/rules.md §5) ----


def event_identifier(org_slug: str, slug: str) -> str:
    return f"controlshift-{org_slug}:event-{slug}"


def calendar_identifier(org_slug: str, slug: str) -> str:
    return f"controlshift-{org_slug}:calendar-{slug}"


_LOCATION = (("venue", "location_venue"), ("locality", "locality"), ("region", "region"),
             ("postal_code", "postal_code"), ("country", "country"))


def event_location(event: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """AN's location fields from a CS event; none for a virtual event."""
    if event.get("virtual") is True:
        return ()
    raw = event.get("location")
    location = raw if isinstance(raw, dict) else {}
    found: dict[str, str] = {}
    street = " ".join(str(v).strip() for v in (location.get("street_number"),
                                               location.get("street")) if v)
    if street:
        found["address_lines"] = street
    for an_name, cs_name in _LOCATION:
        value = event.get(cs_name) if cs_name == "location_venue" else location.get(cs_name)
        text = _clean(value) if isinstance(value, str | int) and not isinstance(value, bool) \
            else None
        if text:
            found[an_name] = text
    return tuple(sorted(found.items()))


def is_syncable_event(event: dict[str, Any], *, inappropriate: bool = False) -> bool:
    """Launched and not moderated as inappropriate. REST events say ``launched_at`` (null while
    unlaunched) and carry no moderation status: ``inappropriate`` is what a webhook said."""
    if inappropriate or event.get("admin_status") == "inappropriate":
        return False
    if "launched_at" in event:
        return event["launched_at"] is not None
    return event.get("launched", True) is not False


def event_ref(event: dict[str, Any], org_slug: str, calendar: CalendarRef | None = None
              ) -> EventRef:
    """Raises :class:`MalformedRecord` for an event without a slug."""
    slug = (text_field(event, "slug", required=True) or "").strip()
    if not slug:
        raise MalformedRecord("slug is empty")
    host = event.get("host")
    host_email = normalize_email(host.get("email")) if isinstance(host, dict) and isinstance(
        host.get("email"), str) else None
    return EventRef(
        slug=slug,
        title=_clean(text_field(event, "title")) or slug,
        url=_clean(text_field(event, "url")),
        identifier=event_identifier(org_slug, slug),
        description=_clean(text_field(event, "description")),
        start_at=_iso_or_none(time_field(event, "start_at")),
        end_at=_iso_or_none(time_field(event, "end_at")),
        virtual=event.get("virtual") is True,
        location=event_location(event),
        calendar=calendar,
        host_email=host_email,
    )


def calendar_ref(calendar: dict[str, Any], org_slug: str) -> CalendarRef:
    slug = (text_field(calendar, "slug", required=True) or "").strip()
    if not slug:
        raise MalformedRecord("calendar slug is empty")
    return CalendarRef(slug=slug, name=_clean(text_field(calendar, "name")) or slug,
                       url=_clean(text_field(calendar, "url")),
                       identifier=calendar_identifier(org_slug, slug),
                       description=_clean(text_field(calendar, "description")))


def _iso_or_none(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


def is_attending(attendee: dict[str, Any]) -> bool:
    """``attending``, ``confirmed`` or ``attended``; a decline or a no-show is not synced."""
    return attendee.get("attending_status") in ATTENDING


def attendee_activity(attendee: dict[str, Any], event: EventRef) -> Activity:
    """An attendee's RSVP. Raises :class:`MalformedRecord` like a signature does."""
    attendee_id = record_id(attendee)
    created = time_field(attendee, "created_at")
    return replace(_person_activity(
        ActivityKind.ATTENDANCE, f"attendee:{attendee_id}", attendee,
        occurred_at=time_field(attendee, "updated_at") or created, fields_at=created,
        opted_in_at=time_field(attendee, "confirmed_at") or created, petition=None,
        tags=(ATTENDEE_TAG,),
    ), event=event)


def host_activity(event: dict[str, Any], ref: EventRef) -> Activity:
    """The hosting of an event, as an activity of its host. A REST host has only ``full_name``
    and no opt-in: its name is not split (never guessed) and it does not opt in; a webhook's
    host has first and last names and ``join_organisation``."""
    raw = event.get("host")
    if raw is not None and not isinstance(raw, dict):
        raise MalformedRecord(f"host is not an object ({_kind(raw)})")
    host = dict(raw or {})
    created = time_field(event, "created_at") or time_field(event, "launched_at")
    return replace(_person_activity(
        ActivityKind.EVENT_HOSTED, f"event:{ref.slug}:host", host,
        occurred_at=created, fields_at=created, opted_in_at=created, petition=None,
        tags=(EVENT_HOST_TAG,),
    ), event=ref)


def event_change_activity(ref: EventRef, at: datetime | None) -> Activity:
    """A change to a mirrored event's title, description, times or place, sent as an update.
    It waits, like an attendance, for the event's host item (which creates the mirror)."""
    return Activity(kind=ActivityKind.EVENT_CHANGED, source_key=f"event:{ref.slug}", email=None,
                    occurred_at=at, fields_at=at, event=ref)
