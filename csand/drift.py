"""Drift: where Action Network no longer holds what csand synced. Pure, no I/O.

``csand audit`` (:mod:`csand.audit`) fetches; this module decides. Given one activity csand
synced, what ControlShift says of it now, what csand knows of the person (its own consent
timeline and what it last saw of them in AN), and what AN answered, :func:`activity_findings`
lists the drift by kind. :func:`petition_findings` and :func:`duplicate_petitions` do the same
for the mirrored petitions.

Only what is provably wrong is reported (docs/rules.md §1-§2):

* **person_missing** — a synced creator, signer, host or attendee is not in AN (by email).
* **tag_missing** — a tag the activity gave (role tag, category tags) is not on the person.
* **signature_missing** — the person has no signature on the mirrored petition.
* **attendance_missing** — an event host or attendee has no attendance on the mirrored event
  (or the mirrored event is gone).
* **petition_missing** — no AN petition carries csand's identifier and the recorded one is gone.
* **petition_duplicated** — csand's record and AN's identifier name different petitions that
  both exist, or another petition has a mirrored petition's title and origin system but not
  its identifier (a copy).
* **unsubscribe_not_applied** — AN has the person subscribed though their newest consent
  csand knows of is an org-wide unsubscribe, and csand last left them unsubscribed.
* **subscribed_without_opt_in** — AN has the person subscribed though they never opted in on
  ControlShift and csand last left them unsubscribed (it created them unsubscribed, or found
  them unsubscribed and changed nothing, as §2 says).

A subscription is judged only from csand's own records, never from AN's state alone: a person
csand last saw subscribed (already in AN and subscribed, say) is legitimately subscribed,
whatever they did on ControlShift; an unsubscribed person who once opted in may have
unsubscribed in AN, and one who opted in may have re-subscribed there, so neither is drift. And
nothing is judged while an item of the person is pending, in flight or dead (the sync is not
finished), nor for a record ControlShift changed or deleted since csand synced it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from csand.model import Activity, ActivityKind, Person, normalize_email


class Kind(StrEnum):
    PERSON_MISSING = "person_missing"
    TAG_MISSING = "tag_missing"
    SIGNATURE_MISSING = "signature_missing"
    ATTENDANCE_MISSING = "attendance_missing"
    PETITION_MISSING = "petition_missing"
    PETITION_DUPLICATED = "petition_duplicated"
    UNSUBSCRIBE_NOT_APPLIED = "unsubscribe_not_applied"
    SUBSCRIBED_WITHOUT_OPT_IN = "subscribed_without_opt_in"


# Put right by syncing the activity again through the outbox (the same rules as ever). A
# duplicate petition is never deleted by csand, and csand never sets a status the rules do not
# give: a subscription without an opt-in is for a person to look at.
REPAIRABLE = frozenset({Kind.PERSON_MISSING, Kind.TAG_MISSING, Kind.SIGNATURE_MISSING,
                        Kind.ATTENDANCE_MISSING, Kind.PETITION_MISSING,
                        Kind.UNSUBSCRIBE_NOT_APPLIED})


@dataclass(frozen=True, slots=True)
class Finding:
    kind: Kind
    detail: str
    source_key: str | None = None  # the activity ("signature:42"); None for a petition
    email: str | None = None
    petition_id: int | None = None  # the CS petition
    items: tuple[int, ...] = ()  # outbox items whose replay repairs it (none: not repairable)

    @property
    def repairable(self) -> bool:
        return self.kind in REPAIRABLE and bool(self.items)

    def to_json(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "detail": self.detail, "source_key": self.source_key,
                "email": self.email, "petition_id": self.petition_id,
                "repairable": self.repairable}


@dataclass(frozen=True, slots=True)
class Synced:
    """One activity csand synced: the latest version of its record, finished ``done``."""

    item_id: int
    activity: Activity
    petition_uuid: str | None = None  # the AN petition csand recorded as the mirror
    event_uuid: str | None = None  # the AN event csand recorded as the mirror (hosts, RSVPs)


class CSState(StrEnum):
    SAME = "same"  # ControlShift still has the record as csand synced it
    GONE = "gone"  # deleted (or no longer found): nothing more goes to AN for it
    CHANGED = "changed"  # a newer version: its own sync is due
    UNKNOWN = "unknown"  # not asked (creators, org-wide unsubscribes: csand's record stands)


@dataclass(frozen=True, slots=True)
class Consent:
    """What csand's records say of the person's subscription."""

    opted_in_at: datetime | None = None  # the latest opt-in AN acknowledged (CS time)
    unsubscribed_at: datetime | None = None  # the latest org-wide unsubscribe (CS time)
    # What csand last saw or left in AN: "subscribed", "unsubscribed", "absent", None (unknown)
    last_status: str | None = None
    settled: bool = True  # no item of the person pending, in flight or dead
    unsubscribe_item: int | None = None  # the latest synced org-wide unsubscribe, to replay


@dataclass(frozen=True, slots=True)
class ANPerson:
    """What AN answered about a person."""

    uuid: str
    subscribed: bool | None
    tags: frozenset[str] = frozenset()  # tag names, lower-cased (AN's names are case-blind)
    petitions: frozenset[str] | None = None  # uuids of the petitions signed; None: not asked
    events: frozenset[str] | None = None  # uuids of the events attended; None: not asked


@dataclass(frozen=True, slots=True)
class ANPetition:
    """What AN answered about a mirrored petition."""

    recorded_uuid: str | None  # the mirror csand recorded
    recorded_exists: bool | None  # whether AN still has it (None: not asked)
    identifier_owner: str | None  # the AN petition carrying csand's identifier, if any


# ---- what csand's records say ----


def status_in_note(note: str | None) -> str | None:
    """The AN status a finished item's note records (``signer synced (unsubscribed)``,
    ``unsubscribed in Action Network``...): what csand saw or set then, or None."""
    if not note:
        return None
    if note.endswith("(unsubscribed)") or note == "unsubscribed in Action Network":
        return "unsubscribed"
    if note.endswith("(subscribed)"):
        return "subscribed"
    if note.startswith("not in Action Network"):
        return "absent"
    return None


def consent_from(person: Person, items: Sequence[Mapping[str, Any]]) -> Consent:
    """The person's :class:`Consent` from their stored knowledge and outbox items (``id``,
    ``kind``, ``status``, ``note``, ``finished_at``)."""
    settled = all(i["status"] in ("done", "cancelled") for i in items)
    done = sorted((i for i in items if i["status"] == "done"),
                  key=lambda i: (i.get("finished_at") or 0.0, i["id"]))
    last_status = None
    for item in reversed(done):
        last_status = status_in_note(item.get("note"))
        if last_status is not None:
            break
    unsubscribes = [i for i in done if i["kind"] == ActivityKind.GLOBAL_UNSUBSCRIBE]
    return Consent(opted_in_at=person.opted_in_at, unsubscribed_at=person.unsubscribed_at,
                   last_status=last_status, settled=settled,
                   unsubscribe_item=unsubscribes[-1]["id"] if unsubscribes else None)


def cs_state(record: Mapping[str, Any] | None, activity: Activity) -> CSState:
    """ControlShift's current signature (None: it has none) against the synced version."""
    if record is None or record.get("deleted_at"):
        return CSState.GONE
    try:
        email = normalize_email(record.get("email"))
    except ValueError:
        return CSState.CHANGED
    now = (email, _clean(record.get("first_name")), _clean(record.get("last_name")),
           _clean(record.get("postcode")), record.get("join_organisation") is True)
    then = (activity.email, activity.first_name, activity.last_name, activity.postcode,
            activity.opted_in)
    return CSState.SAME if now == then else CSState.CHANGED


def _clean(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


# ---- the comparisons ----


def activity_findings(synced: Synced, cs: CSState, consent: Consent, an: ANPerson | None,
                      *, petition_checked: bool = True) -> list[Finding]:
    """Drift of one synced activity. ``an`` is AN's answer for the person (None: not in AN).
    ``petition_checked=False`` skips the signature (the petition itself is reported missing)."""
    activity = synced.activity
    if cs in (CSState.GONE, CSState.CHANGED) or activity.email is None:
        return []
    email = activity.email
    petition_id = activity.petition.cs_id if activity.petition else None
    who = {ActivityKind.PETITION_CREATED: "petition creator",
           ActivityKind.SIGNATURE: "signer", ActivityKind.EVENT_HOSTED: "event host",
           ActivityKind.ATTENDANCE: "attendee"}.get(activity.kind)

    def finding(kind: Kind, detail: str, items: tuple[int, ...] = (synced.item_id,)) -> Finding:
        return Finding(kind, detail, activity.source_key, email, petition_id, items)

    if activity.kind is ActivityKind.GLOBAL_UNSUBSCRIBE:
        found = subscription_finding(consent, an)
        return [replace_source(found, activity)] if found else []
    if who is None:  # an event's change is nobody's
        return []
    if an is None:
        return [finding(Kind.PERSON_MISSING, f"the {who} is not in Action Network")]
    out: list[Finding] = []
    missing = sorted(t for t in activity.tags if t.lower() not in an.tags)
    if missing:
        out.append(finding(Kind.TAG_MISSING, f"tags missing: {', '.join(missing)}"))
    if (petition_checked and an.petitions is not None and synced.petition_uuid
            and synced.petition_uuid not in an.petitions):
        out.append(finding(Kind.SIGNATURE_MISSING,
                           f"no signature of the {who} on the mirrored petition "
                           f"{synced.petition_uuid}"))
    if (an.events is not None and synced.event_uuid
            and synced.event_uuid not in an.events):
        out.append(finding(Kind.ATTENDANCE_MISSING,
                           f"no attendance of the {who} on the mirrored event "
                           f"{synced.event_uuid} (or that event is gone)"))
    found = subscription_finding(consent, an)
    if found:
        out.append(replace_source(found, activity))
    return out


def replace_source(found: Finding, activity: Activity) -> Finding:
    return Finding(found.kind, found.detail, activity.source_key, activity.email,
                   activity.petition.cs_id if activity.petition else None, found.items)


def subscription_finding(consent: Consent, an: ANPerson | None) -> Finding | None:
    """A subscription in AN the rules would not give (see the module's docstring)."""
    if an is None or an.subscribed is not True or not consent.settled:
        return None
    if consent.last_status != "unsubscribed":
        return None  # csand last saw them subscribed (or not at all): theirs to be
    unsubscribed, opted_in = consent.unsubscribed_at, consent.opted_in_at
    if unsubscribed is not None and (opted_in is None or unsubscribed >= opted_in):
        items = (consent.unsubscribe_item,) if consent.unsubscribe_item is not None else ()
        return Finding(Kind.UNSUBSCRIBE_NOT_APPLIED,
                       f"subscribed in Action Network, though their newest consent is an "
                       f"org-wide unsubscribe on ControlShift ({unsubscribed.isoformat()})",
                       items=items)
    if opted_in is None and unsubscribed is None:
        return Finding(Kind.SUBSCRIBED_WITHOUT_OPT_IN,
                       "subscribed in Action Network, though they never opted in on "
                       "ControlShift and csand left them unsubscribed (a subscription made in "
                       "Action Network itself also shows here: check before acting)")
    return None  # they opted in once: a later subscription in AN may well be theirs


def petition_findings(cs_id: int, slug: str, an: ANPetition, items: Sequence[int]
                      ) -> list[Finding]:
    """Drift of one mirrored petition; ``items`` are its synced activities (replayed to put
    back a missing petition: the worker finds or creates it again, then signs everyone)."""
    recorded, owner = an.recorded_uuid, an.identifier_owner
    if owner is None and not an.recorded_exists:
        detail = (f"petition {slug}: the recorded AN petition {recorded} is gone and no AN "
                  "petition carries csand's identifier" if recorded else
                  f"petition {slug}: no AN petition carries csand's identifier")
        return [Finding(Kind.PETITION_MISSING, detail, petition_id=cs_id, items=tuple(items))]
    if recorded and owner and owner != recorded:
        if an.recorded_exists:
            return [Finding(Kind.PETITION_DUPLICATED,
                            f"petition {slug}: csand signs people on AN petition {recorded}, "
                            f"but csand's identifier is on {owner}", petition_id=cs_id)]
        return [Finding(Kind.PETITION_MISSING,
                        f"petition {slug}: the recorded AN petition {recorded} is gone (csand's "
                        f"identifier is on {owner})", petition_id=cs_id, items=tuple(items))]
    return []


def duplicate_petitions(an_petitions: Iterable[Mapping[str, Any]], identifier_prefix: str,
                        origin_system: str) -> list[Finding]:
    """Copies of mirrored petitions: an AN petition with a mirrored petition's title and
    ``origin_system`` that does not carry a csand identifier (``identifier_prefix``, e.g.
    ``controlshift-org:petition-``). Petitions of other origins are someone else's."""
    petitions = list(an_petitions)
    mirrored: dict[str, list[str]] = {}
    for p in petitions:
        ids = [i for i in p.get("identifiers") or () if str(i).startswith(identifier_prefix)]
        if ids:
            mirrored.setdefault(str(p.get("title") or "").strip(), []).extend(ids)
    out = []
    for p in petitions:
        ids = p.get("identifiers") or ()
        title = str(p.get("title") or "").strip()
        if (p.get("origin_system") != origin_system or title not in mirrored
                or any(str(i).startswith(identifier_prefix) for i in ids)):
            continue
        own = next((str(i).split(":", 1)[1] for i in ids
                    if str(i).startswith("action_network:")), "?")
        for identifier in mirrored[title]:
            cs_id = _cs_id(identifier)
            out.append(Finding(Kind.PETITION_DUPLICATED,
                               f"AN petition {own} copies the mirror of {identifier} (same "
                               f"title {title!r} and origin system, no csand identifier)",
                               petition_id=cs_id))
    return out


def _cs_id(identifier: str) -> int | None:
    tail = identifier.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


PERSON_WIDE = frozenset({Kind.UNSUBSCRIBE_NOT_APPLIED, Kind.SUBSCRIBED_WITHOUT_OPT_IN})


@dataclass
class Summary:
    """Findings deduplicated (a person's subscription once, a petition once), counted by kind."""

    findings: list[Finding] = field(default_factory=list)
    _seen: set[tuple[Any, ...]] = field(default_factory=set)

    def add(self, found: Iterable[Finding]) -> None:
        for f in found:
            key = ((f.kind, f.email) if f.kind in PERSON_WIDE
                   else (f.kind, f.source_key, f.petition_id, f.detail))
            if key not in self._seen:
                self._seen.add(key)
                self.findings.append(f)

    def by_kind(self) -> dict[str, int]:
        counts = {str(k): 0 for k in Kind}
        for f in self.findings:
            counts[str(f.kind)] += 1
        return counts

    def repair_items(self) -> list[int]:
        return list(dict.fromkeys(i for f in self.findings if f.repairable for i in f.items))
