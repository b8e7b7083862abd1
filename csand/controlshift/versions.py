"""One truth from two sources: compare a CS signature with the version csand recorded. Pure.

The poller and the webhook receiver both see signatures, in any order and any number of times.
This decides, for one record, whether it is new, a newer version (enqueue it), the same version
again (nothing), an older version arriving late (ignore it: never overwrite newer data), or a
deletion (record it, and cancel what is still pending: CS says to treat it as never having
happened).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from csand.model import (
    Activity,
    SignatureSeen,
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
