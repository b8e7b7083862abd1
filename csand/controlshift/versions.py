"""One truth from two sources: compare a CS signature with the version csand recorded. Pure.

The poller and the webhook receiver both see signatures, in any order and any number of times.
This decides, for one record, whether it is new, a newer version (enqueue it), the same version
again (nothing), an older version arriving late (ignore it: never overwrite newer data), or a
deletion (record it, and cancel what is still pending: CS says to treat it as never having
happened).

Attendees follow the same rules (:func:`see_attendee`), with one more state: not attending (a
decline or a no-show). It is not synced, cancels what of the attendee is still pending, and,
unlike a deletion, can be undone: an attendee who RSVPs again is a new version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from csand.model import (
    Activity,
    AttendeeSeen,
    EventRef,
    SignatureSeen,
    attendee_activity,
    is_attending,
    parse_time,
    record_id,
    signature_activity,
    text_field,
    time_field,
)


@dataclass(frozen=True, slots=True)
class Seen:
    row: SignatureSeen | None = None  # what to record; None: nothing changed
    activity: Activity | None = None  # what to enqueue
    cancel: str | None = None  # source key whose pending items are cancelled
    new: bool = False  # never seen before (counts towards the poller's expected new ones)
    deleted_after_sync: bool = False


def see_signature(
    record: dict[str, Any], petition: dict[str, Any], org: str, previous: SignatureSeen | None
) -> Seen:
    """Raises :class:`~csand.model.MalformedRecord` for a record that is not a well-formed
    signature (``petition`` is taken as valid: its caller checked it)."""
    sig_id = record_id(record)
    deleted_at = text_field(record, "deleted_at")
    updated = time_field(record, "updated_at") or time_field(record, "created_at")
    updated_iso = updated.isoformat() if updated else None
    if previous is not None and previous.updated_at and updated is not None:
        known = parse_time(previous.updated_at)
        if known is not None and updated < known:
            return Seen()  # an older version arriving late
    if deleted_at:
        # Never synced whatever else it holds: its other fields are not checked.
        if previous is not None and previous.deleted_at:
            return Seen()
        row = SignatureSeen(sig_id, record_id(petition), "deleted", deleted_at, updated_iso)
        if previous is None:
            return Seen(row=row)
        return Seen(row=row, cancel=f"signature:{sig_id}", deleted_after_sync=True)
    activity = signature_activity(record, petition, org)
    assert activity.petition is not None
    fingerprint = activity.fingerprint()
    if previous is not None and previous.fingerprint == fingerprint and not previous.deleted_at:
        if previous.updated_at != updated_iso and updated_iso is not None:
            row = SignatureSeen(sig_id, activity.petition.cs_id, fingerprint, None, updated_iso)
            return Seen(row=row)  # e.g. a single-petition unsubscribe: nothing for AN
        return Seen()
    if previous is not None and previous.deleted_at:
        return Seen()  # deleted stays deleted
    row = SignatureSeen(sig_id, activity.petition.cs_id, fingerprint, None, updated_iso)
    return Seen(row=row, activity=activity, new=previous is None)


# The fingerprint recorded for an attendee who is not attending (declined, no-show): never an
# activity's fingerprint, so attending again is always a new version.
NOT_ATTENDING = "not-attending"


@dataclass(frozen=True, slots=True)
class SeenAttendee:
    row: AttendeeSeen | None = None  # what to record; None: nothing changed
    activity: Activity | None = None  # what to enqueue
    cancel: str | None = None  # source key whose pending items are cancelled
    new: bool = False


def see_attendee(
    record: dict[str, Any], event: EventRef | None, previous: AttendeeSeen | None, *,
    deleted_at: str | None = None, event_slug: str | None = None,
) -> SeenAttendee:
    """One attendee compared with its recorded version, like :func:`see_signature`.

    ``deleted_at`` marks a deletion (``attendee.deleted``, or gone from a complete listing):
    recorded as deleted for good, pending items cancelled. A record not attending is recorded
    with :data:`NOT_ATTENDING` and cancels what is pending (its fields are not checked). ``event``
    may be None only for a deletion (which then needs ``event_slug``). Raises :class:`~csand.model.MalformedRecord` for a record
    that is not a well-formed attendee."""
    attendee_id = record_id(record)
    source = f"attendee:{attendee_id}"
    updated = time_field(record, "updated_at") or time_field(record, "created_at")
    updated_iso = updated.isoformat() if updated else None
    if previous is not None and previous.updated_at and updated is not None:
        known = parse_time(previous.updated_at)
        if known is not None and updated < known:
            return SeenAttendee()  # an older version arriving late
    if previous is not None and previous.deleted_at:
        return SeenAttendee()  # deleted stays deleted
    if deleted_at:
        slug = previous.event_slug if previous is not None else (
            event.slug if event is not None else event_slug)
        if slug is None:
            raise ValueError("a deletion of an attendee never seen needs its event")
        row = AttendeeSeen(attendee_id, slug, "deleted", deleted_at, updated_iso)
        return SeenAttendee(row=row, cancel=source if previous is not None else None)
    if event is None:
        raise ValueError("an attendee version needs its event")
    if not is_attending(record):
        if previous is not None and previous.fingerprint == NOT_ATTENDING:
            if previous.updated_at != updated_iso and updated_iso is not None:
                return SeenAttendee(row=AttendeeSeen(attendee_id, event.slug, NOT_ATTENDING,
                                                     None, updated_iso))
            return SeenAttendee()
        row = AttendeeSeen(attendee_id, event.slug, NOT_ATTENDING, None, updated_iso)
        return SeenAttendee(row=row, cancel=source if previous is not None else None,
                            new=previous is None)
    activity = attendee_activity(record, event)
    fingerprint = activity.fingerprint()
    row = AttendeeSeen(attendee_id, event.slug, fingerprint, None, updated_iso)
    if previous is not None and previous.fingerprint == fingerprint:
        if previous.updated_at != updated_iso and updated_iso is not None:
            return SeenAttendee(row=row)  # e.g. a confirmation: nothing new for AN
        return SeenAttendee()
    return SeenAttendee(row=row, activity=activity, new=previous is None)
