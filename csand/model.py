"""Domain records shared by every stage: what ControlShift reported, as csand stores and replays it.

An :class:`Activity` is one version of one thing a person did on ControlShift (created a petition,
signed one, unsubscribed from everything). It is what the outbox holds, serialised as JSON, so it
must carry everything the sync needs without asking ControlShift again.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

CREATOR_TAG = "controlshift-petition-creator"
SIGNER_TAG = "controlshift-petition-signer"
CATEGORY_TAG_PREFIX = "controlshift:"

# Deliberately simple: AN is the authority on deliverability; this only stops records that
# cannot possibly be an address (missing, no "@", spaces) from costing a request.
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class ActivityKind(StrEnum):
    PETITION_CREATED = "petition_created"
    SIGNATURE = "signature"
    GLOBAL_UNSUBSCRIBE = "global_unsubscribe"


def normalize_email(raw: str | None) -> str | None:
    """Emails match case-insensitively after trimming (INTEGRATION.md §1)."""
    if raw is None:
        return None
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
        """Serialisation key: items with the same key are applied one at a time, in order."""
        return self.email if self.email else f"invalid:{self.source_key}"

    def fingerprint(self) -> str:
        """Hash of everything that changes what csand writes to AN; re-seeing it enqueues nothing."""
        # Not occurred_at (a CS-side edit such as a single-petition unsubscribe bumps it without
        # changing anything AN holds) and not the petition's title (a retitled petition must not
        # resync every signer); the category tags are in, so a new category reaches every signer.
        data = [
            str(self.kind), self.source_key, self.email, self.first_name, self.last_name,
            self.postcode, self.opted_in, self.fields_at.isoformat() if self.fields_at else None,
            self.petition.cs_id if self.petition else None, sorted(self.tags),
        ]
        blob = json.dumps(data, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    @property
    def dedupe_key(self) -> str:
        return f"{self.source_key}@{self.fingerprint()}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = str(self.kind)
        data["tags"] = list(self.tags)
        for key in ("occurred_at", "fields_at", "opted_in_at"):
            value = data[key]
            data[key] = value.isoformat() if value else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Activity:
        petition = data.get("petition")
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
        )


@dataclass(frozen=True, slots=True)
class SignatureSeen:
    """The version of a CS signature csand last recorded (from a poll or a webhook)."""

    cs_id: int
    petition_id: int
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
    creator = petition.get("creator") or {}
    return PetitionRef(
        cs_id=int(petition["id"]),
        slug=str(petition["slug"]),
        title=_clean(petition.get("title")) or str(petition["slug"]),
        url=_clean(petition.get("url")),
        identifier=petition_identifier(org_slug, int(petition["id"])),
        creator_email=normalize_email(creator.get("email")),
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
    creator = dict(petition.get("creator") or {})
    if extra and extra.get("for_email") == normalize_email(creator.get("email")):
        creator.update({k: v for k, v in extra.items() if k != "for_email"})
    ref = petition_ref(petition, org_slug)
    created = parse_time(petition.get("created_at"))
    return _person_activity(
        ActivityKind.PETITION_CREATED, f"petition:{ref.cs_id}:creator", creator,
        occurred_at=created, fields_at=created, opted_in_at=created, petition=ref,
        tags=(CREATOR_TAG, *category_tags(petition)),
    )


def signature_activity(signature: dict[str, Any], petition: dict[str, Any], org_slug: str) -> Activity:
    created = parse_time(signature.get("created_at"))
    return _person_activity(
        ActivityKind.SIGNATURE, f"signature:{int(signature['id'])}", signature,
        occurred_at=parse_time(signature.get("updated_at")) or created, fields_at=created,
        # A late confirmation is an opt-in at its time; without one, the signature's creation.
        opted_in_at=parse_time(signature.get("confirmed_at")) or created,
        petition=petition_ref(petition, org_slug), tags=(SIGNER_TAG, *category_tags(petition)),
    )


def _person_activity(
    kind: ActivityKind, source_key: str, person: dict[str, Any], *, occurred_at: datetime | None,
    fields_at: datetime | None, opted_in_at: datetime | None, petition: PetitionRef,
    tags: tuple[str, ...],
) -> Activity:
    """Creators and signers carry the same person fields; only ``true`` is an opt-in."""
    opted_in = person.get("join_organisation") is True
    return Activity(
        kind=kind,
        source_key=source_key,
        email=normalize_email(person.get("email")),
        raw_email=person.get("email"),
        first_name=_clean(person.get("first_name")),
        last_name=_clean(person.get("last_name")),
        postcode=_clean(person.get("postcode")),
        opted_in=opted_in,
        occurred_at=occurred_at,
        fields_at=fields_at,
        opted_in_at=opted_in_at if opted_in else None,
        petition=petition,
        tags=tags,
    )


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
