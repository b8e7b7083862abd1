"""The mapping rules: "this CS activity + what we know → the next AN operation". Pure, no I/O.

The worker calls :func:`next_step` in a loop: it performs the returned operation, folds the answer
into :class:`Progress` and asks again, until the answer is :class:`Done` or :class:`Dead`. Keeping
the decision here, apart from HTTP, is what lets every row of the subscription table
(docs/rules.md §2) be tested exhaustively without a network.

The one thing that must never happen is subscribing a person who did not opt in. AN's helpers
subscribe people *new to the list* by default, so for a non-opted-in person whose presence in AN
is not known the first operation is always a lookup, and a person known to be absent is created
with an explicit ``unsubscribed`` status before anything else is posted for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType

import phonenumbers

from csand.model import (
    Activity,
    ActivityKind,
    EventRef,
    Fields,
    Person,
    PetitionRef,
    valid_email,
)

MAX_STEPS = 12  # more than any plan needs; a loop beyond it is a bug, reported as dead


@dataclass(frozen=True, slots=True)
class Progress:
    """Everything learned while applying one activity (starts from stored knowledge)."""

    person: Person = field(default_factory=Person)
    petition_uuid: str | None = None
    tags_ready: bool = False
    person_written: bool = False  # fields/tags/status applied for this activity
    signed: bool = False  # signature recorded on the mirrored petition
    opt_in_applied: bool = False  # this record's opt-in reached AN before (an earlier version)
    opt_in_sent: bool = False  # this attempt sent "subscribed" for it
    event_uuid: str | None = None  # the mirrored AN event (hosts and attendees)
    attended: bool = False  # attendance recorded on the mirrored event


# ---- operations: each is one AN request (EnsureTags/EnsurePetition are cached sub-protocols) ----


@dataclass(frozen=True, slots=True)
class EnsureTags:
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EnsurePetition:
    petition: PetitionRef
    creator_uuid: str | None


@dataclass(frozen=True, slots=True)
class LookupPerson:
    """Find the person by email; also try ``also`` (the address as typed): AN's filter may match
    case-sensitively, and missing a person who is there would treat them as new."""

    email: str
    also: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RecordSignature:
    """Record Signature Helper: upsert person + tags + signature in one request.

    ``status`` is ``"subscribed"`` or ``None``; the helper subscribes anyone new to the list, so
    it is only used for opted-in people or people known to be present.
    """

    petition_uuid: str
    fields: Fields
    status: str | None
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Signup:
    """Person Signup Helper. ``status=None`` leaves an existing person's status alone."""

    fields: Fields
    status: str | None
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SignAs:
    """A plain signature for a person AN already has (cannot create or subscribe anyone)."""

    petition_uuid: str
    person_uuid: str


@dataclass(frozen=True, slots=True)
class EnsureEvent:
    """The AN event mirroring ``event`` (inside its calendar's event campaign when it has one),
    created once; ``creator_uuid`` links the host as creator and organiser."""

    event: EventRef
    creator_uuid: str | None


@dataclass(frozen=True, slots=True)
class RecordAttendance:
    """Record Attendance Helper: upsert person + tags + attendance in one request. Like the
    signature helper it subscribes anyone new to the list: ``status`` is ``"subscribed"`` for
    an opt-in, otherwise None and used only for people known to be present."""

    event_uuid: str
    fields: Fields
    status: str | None
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AttendAs:
    """A plain attendance for a person AN already has (cannot create or subscribe anyone)."""

    event_uuid: str
    person_uuid: str


@dataclass(frozen=True, slots=True)
class UpdateEvent:
    """``PUT /events/{id}`` with the event's current title, description, times and place (AN
    does not change an event re-posted with a known identifier)."""

    event_uuid: str
    event: EventRef


@dataclass(frozen=True, slots=True)
class SetStatus:
    person_uuid: str
    email: str
    status: str


@dataclass(frozen=True, slots=True)
class Done:
    note: str


@dataclass(frozen=True, slots=True)
class Dead:
    reason: str


Operation = (EnsureTags | EnsurePetition | LookupPerson | RecordSignature | Signup | SignAs
             | SetStatus | EnsureEvent | RecordAttendance | AttendAs | UpdateEvent)
Step = Operation | Done | Dead

NAME_LIMIT = 255  # AN rejects longer names; catching it here gives a clearer dead-letter reason


def validate(activity: Activity) -> str | None:
    """A reason this activity can never sync, or None."""
    if activity.kind is ActivityKind.EVENT_CHANGED:
        return None if activity.event is not None else "activity has no event"
    if activity.email is None:
        return "no email address on the ControlShift record"
    if not valid_email(activity.email):
        return f"invalid email address {activity.raw_email!r}"
    if activity.kind in EVENT_KINDS:
        if activity.event is None:
            return "activity has no event"
    elif activity.kind is not ActivityKind.GLOBAL_UNSUBSCRIBE and activity.petition is None:
        return "activity has no petition"
    return None


EVENT_KINDS = frozenset({ActivityKind.EVENT_HOSTED, ActivityKind.ATTENDANCE})


FIELD_NAMES = ("given_name", "family_name", "postal_code")
PHONE_MODES = ("custom_field", "mobile", "off")
PHONE_FIELD = "phone_number"  # the AN custom field ControlShift's own integration uses
PHONE_KEY = "phone"  # its precedence key in Person.fields_at (custom fields: "custom:<name>")


@dataclass(frozen=True, slots=True)
class SyncOptions:
    """What csand sends of a person besides name and postcode (``[sync]`` in the config).

    ``custom_fields``: ``"all"`` (ControlShift's short names as AN custom field names),
    ``"none"``, a tuple of the names to send, or a mapping from ControlShift name to AN name
    (only those). ``phone``: ``"custom_field"`` (AN custom field ``phone_number``, as
    ControlShift's own integration does), ``"mobile"`` (AN's native mobile number in E.164, for
    numbers written without ``+`` read as numbers of ``phone_country``) or ``"off"``.
    """

    custom_fields: str | tuple[str, ...] | Mapping[str, str] = "all"
    phone: str = "custom_field"
    phone_country: str | None = None

    def custom_name(self, name: str) -> str | None:
        """The AN custom field a ControlShift answer goes to, or None (not synced)."""
        chosen = self.custom_fields
        if chosen == "all":
            return name
        if chosen == "none":
            return None
        if isinstance(chosen, Mapping):
            return chosen.get(name)
        return name if name in chosen else None


DEFAULT_OPTIONS = SyncOptions()


def mobile_number(raw: str | None, country: str | None) -> str | None:
    """``raw`` in E.164, or None when it is not a valid phone number."""
    if not raw:
        return None
    try:
        number = phonenumbers.parse(raw, country)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def phone_problem(activity: Activity, options: SyncOptions) -> str | None:
    """Why this activity's phone number is dropped (the rest of it still syncs), or None."""
    if options.phone != "mobile" or not activity.phone:
        return None
    if mobile_number(activity.phone, options.phone_country) is None:
        return "not a valid phone number" + (
            "" if options.phone_country else " (no sync.phone_country for numbers without +)")
    return None


def _values(activity: Activity) -> dict[str, str | None]:
    return {"given_name": activity.first_name, "family_name": activity.last_name,
            "postal_code": activity.postcode}


def fields_for(activity: Activity, person: Person, options: SyncOptions = DEFAULT_OPTIONS,
               *, sms_subscribe: bool = False) -> Fields:
    """Each field follows the person's most recent activity that gave it a value.

    An older activity discovered later (common in a backfill) still fills a field no newer
    activity set, but never overwrites one a newer activity set; empty values are never sent.
    The same holds for each custom field and for the phone number. A mobile number is sent
    with SMS status ``subscribed`` only when ``sms_subscribe`` (the caller's decision: an
    explicit SMS opt-in that is the person's newest consent); otherwise without a status,
    which leaves an existing number's status alone.
    """
    assert activity.email is not None

    def newer_known(key: str) -> bool:
        set_at = person.fields_at.get(key)
        return set_at is not None and (activity.fields_at is None or activity.fields_at < set_at)

    chosen: dict[str, str | None] = {
        name: None if newer_known(name) else value for name, value in _values(activity).items()}
    custom: dict[str, str] = {}
    for name, value in activity.custom_fields:
        an_name = options.custom_name(name)
        if an_name and not newer_known(f"custom:{an_name}"):
            custom[an_name] = value
    mobile: tuple[str, str | None] | None = None
    if activity.phone and not newer_known(PHONE_KEY):
        if options.phone == "custom_field":
            custom[PHONE_FIELD] = activity.phone
        elif options.phone == "mobile":
            number = mobile_number(activity.phone, options.phone_country)
            if number is not None:
                mobile = (number, "subscribed" if sms_subscribe and activity.sms_opt_in
                          else None)
    return Fields(email=activity.email, custom_fields=tuple(sorted(custom.items())),
                  mobile=mobile, **chosen)


def _spellings(activity: Activity) -> tuple[str, ...]:
    assert activity.email is not None
    as_given = (activity.raw_email or "").strip()
    return () if as_given in ("", activity.email) else (as_given,)


def next_step(activity: Activity, progress: Progress,
              options: SyncOptions = DEFAULT_OPTIONS) -> Step:
    reason = validate(activity)
    if reason:
        return Dead(reason)
    if activity.kind is ActivityKind.GLOBAL_UNSUBSCRIBE:
        return _unsubscribe_step(activity, progress)
    if activity.kind is ActivityKind.EVENT_CHANGED:
        return _event_change_step(activity, progress)
    return _action_step(activity, progress, options)


def _unsubscribe_step(activity: Activity, p: Progress) -> Step:
    assert activity.email is not None
    if p.person_written:
        return Done("unsubscribed in Action Network")
    if superseded_by_opt_in(activity, p.person):
        return Done("the person opted in again after this unsubscribe: subscription kept")
    if p.person.exists is None or (p.person.exists and p.person.uuid is None):
        return LookupPerson(activity.email, _spellings(activity))
    if not p.person.exists:
        return Done("not in Action Network; a global unsubscribe never creates a person")
    assert p.person.uuid is not None
    return SetStatus(p.person.uuid, activity.email, "unsubscribed")


def superseded_by_opt_in(unsubscribe: Activity, person: Person) -> bool:
    """An org-wide unsubscribe older than an opt-in AN already applied changes nothing: the
    person acted later (ControlShift retries webhooks for hours, so old news arrives late).
    An unsubscribe without a time is applied: unsubscribing is the safe side."""
    at = unsubscribe.occurred_at
    return at is not None and person.opted_in_at is not None and person.opted_in_at > at


def opts_in(activity: Activity, p: Progress) -> bool:
    """Whether this activity's opt-in is sent to AN: only the newest consent counts, once.

    Decided from the times the person acted (:attr:`Activity.opt_in_time`: confirmation, else
    creation; never a later edit). Not again when the same record is synced again (a category
    added to its petition, an operator's retry, a retry after a later step failed): the person
    may have unsubscribed since, through AN itself. Not when an org-wide unsubscribe is as new
    or newer, however late csand learns of the opt-in. And not when it is no newer than an
    opt-in AN already applied: the person may have unsubscribed in AN after that one, and an
    older opt-in found late (a backfill) says nothing new. An opt-in without a time counts only
    for a person with no consent history at all.
    """
    if not activity.opted_in or p.opt_in_applied:
        return False
    at = activity.opt_in_time
    timeline = [t for t in (p.person.unsubscribed_at, p.person.opted_in_at) if t is not None]
    if at is None:
        return not timeline
    return all(at > t for t in timeline)


def _action_step(activity: Activity, p: Progress, options: SyncOptions) -> Step:
    """A petition creation or a signature (recorded as a signature on the mirrored petition), or
    the hosting of an event or an RSVP (an attendance on the mirrored event): person upsert +
    tags + Action History entry, by one set of consent rules. The helpers that record the
    entry subscribe anyone new to the list, like the signup helper without a status."""
    assert activity.email is not None
    on_event = activity.kind in EVENT_KINDS
    recorded, target = (p.attended, p.event_uuid) if on_event else (p.signed, p.petition_uuid)
    if recorded:
        return Done(_done_note(activity, p))
    if not p.tags_ready:
        return EnsureTags(activity.tags)
    subscribe = opts_in(activity, p)
    # SMS consent rides on the email decision: subscribed to SMS only with an explicit SMS
    # opt-in on the activity whose email opt-in is the person's newest consent, sent once.
    fields = fields_for(activity, p.person, options, sms_subscribe=subscribe)
    owner = activity.kind in (ActivityKind.PETITION_CREATED, ActivityKind.EVENT_HOSTED)

    # The petition's or event's creator link needs its owner's AN uuid: an owner goes first.
    if target is None and not (owner and not p.person_written):
        creator = p.person.uuid if owner else None
        if on_event:
            assert activity.event is not None
            return EnsureEvent(activity.event, creator)
        assert activity.petition is not None
        return EnsurePetition(activity.petition, creator)

    def record(status: str | None) -> Step:
        assert target is not None
        if on_event:
            return RecordAttendance(target, fields, status, activity.tags)
        return RecordSignature(target, fields, status, activity.tags)

    if not p.person_written:
        if subscribe:
            return Signup(fields, "subscribed", activity.tags) if owner else record("subscribed")
        # Not opted in: never post anything that could create a subscribed person.
        if p.person.exists is None:
            return LookupPerson(activity.email, _spellings(activity))
        if p.person.exists is False:
            return Signup(fields, "unsubscribed", activity.tags)
        return Signup(fields, None, activity.tags) if owner else record(None)

    assert target is not None and p.person.uuid is not None
    return AttendAs(target, p.person.uuid) if on_event else SignAs(target, p.person.uuid)


def _event_change_step(activity: Activity, p: Progress) -> Step:
    """``p.event_uuid`` is the stored mirror (the worker reads it; a change never creates one).
    The change is leased only once no item that may mirror the event is still to run: without
    a mirror then, the event is not synced (its host and RSVPs died or were cancelled)."""
    assert activity.event is not None
    if p.attended:  # the update went through
        return Done("event updated in Action Network")
    if p.event_uuid is None:
        return Done("event not mirrored in Action Network: nothing to update")
    return UpdateEvent(p.event_uuid, activity.event)


def _done_note(activity: Activity, p: Progress) -> str:
    who = {ActivityKind.PETITION_CREATED: "creator", ActivityKind.EVENT_HOSTED: "host",
           ActivityKind.ATTENDANCE: "attendee"}.get(activity.kind, "signer")
    status = {True: "subscribed", False: "unsubscribed", None: "status unchanged"}[p.person.subscribed]
    return f"{who} synced ({status})"


# ---- folding answers back into progress (still pure) ----


def after_lookup(p: Progress, found_uuid: str | None, subscribed: bool | None) -> Progress:
    if found_uuid is None:
        person = replace(p.person, exists=False, uuid=None, subscribed=None)
    else:
        person = replace(p.person, exists=True, uuid=found_uuid, subscribed=subscribed)
    return replace(p, person=person)


def after_person_write(
    p: Progress, activity: Activity, op: RecordSignature | RecordAttendance | Signup,
    uuid: str | None,
    subscribed: bool | None,
) -> Progress:
    """Record what a helper did. ``subscribed`` is AN's answer where it gave one."""
    if subscribed is None:
        if op.status == "subscribed":
            subscribed = True
        elif op.status == "unsubscribed":
            subscribed = False
        else:
            subscribed = p.person.subscribed
    fields_at = dict(p.person.fields_at)
    if activity.fields_at is not None:
        for name in FIELD_NAMES:
            if getattr(op.fields, name):
                fields_at[name] = activity.fields_at
        for name, _ in op.fields.custom_fields:
            fields_at[PHONE_KEY if name == PHONE_FIELD and activity.phone else f"custom:{name}"] \
                = activity.fields_at
        if op.fields.mobile is not None:
            fields_at[PHONE_KEY] = activity.fields_at
    opted_in_at = p.person.opted_in_at
    if op.status == "subscribed":
        opted_in_at = _latest(opted_in_at, activity.opt_in_time)
    person = Person(exists=True, uuid=uuid, subscribed=subscribed,
                    fields_at=MappingProxyType(fields_at),
                    unsubscribed_at=p.person.unsubscribed_at, opted_in_at=opted_in_at)
    return replace(
        p, person=person, person_written=True, signed=p.signed or isinstance(op, RecordSignature),
        attended=p.attended or isinstance(op, RecordAttendance),
        opt_in_sent=p.opt_in_sent or op.status == "subscribed",
    )


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


def after_status(p: Progress, status: str) -> Progress:
    return replace(
        p, person=replace(p.person, subscribed=status == "subscribed"), person_written=True
    )


def after_unsubscribe(p: Progress, activity: Activity) -> Progress:
    """Remember an org-wide unsubscribe, applied or not (the person may not be in AN): an
    older opt-in learnt later must not undo it."""
    at = _latest(p.person.unsubscribed_at, activity.occurred_at)
    return replace(p, person=replace(p.person, unsubscribed_at=at))


def knowledge_to_keep(person: Person) -> Person:
    """What may be trusted on a later attempt: csand's own history, not AN's current state.

    Whether and how a person is in AN goes stale the moment someone else changes AN: "absent"
    would force ``unsubscribed`` onto a person subscribed since, "present" would let a helper
    create (and subscribe) a person deleted since. So each attempt looks them up again; what is
    kept is when fields were set and when the person unsubscribed.
    """
    return Person(uuid=person.uuid, fields_at=person.fields_at,
                  unsubscribed_at=person.unsubscribed_at, opted_in_at=person.opted_in_at)


def forget_person(p: Progress) -> Progress:
    """AN no longer has the uuid we knew (404): start over from a lookup."""
    return replace(
        p, person=replace(p.person, exists=None, uuid=None, subscribed=None), person_written=False
    )
