"""Realistic, seeded data for the ControlShift (and Action Network) simulators, and the oracle of
what Action Network must hold once csand has synced it.

``populate`` fills a :class:`~csand.sim.controlshift.ControlShiftSim` with campaign-like
petitions, unevenly sized, signed by people with non-ASCII names, messy emails (mixed case, ``+``
tags, stray spaces), repeat signers and optional broken records; it can also seed Action Network
with some of those people beforehand. Everything is deterministic for a given ``seed`` and anchor
day.

With ``events`` (and ``calendars``, ``attendees``) it also creates ControlShift calendars, events
(launched ones in and out of calendars, virtual ones, an unlaunched and an inappropriate one),
their hosts and attendees (every attending status, every consent, some also signers, some
already in AN, some with custom answers and phone numbers).

``expected_state`` (and :meth:`Scenario.expected_an_state`) is the end-to-end oracle: a direct
reading of docs/rules.md, computed from the simulator's *current* data, so it stays right when a
test adds, updates or deletes records after ``populate``. It assumes every CS change happened
before the sync it checks (a signature deleted after it was synced leaves its earlier effects in
AN, which no oracle over CS data alone can know).
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from csand.sim.controlshift import ControlShiftSim

if TYPE_CHECKING:
    from csand.sim.actionnetwork import ActionNetworkSim

__all__ = [
    "CATEGORIES",
    "ATTENDEE_TAG",
    "ATTENDING",
    "CREATOR_TAG",
    "EVENT_HOST_TAG",
    "MAX_FIELD_LENGTH",
    "SIGNER_TAG",
    "DeadRecord",
    "ExistingPerson",
    "ExpectedEvent",
    "ExpectedPerson",
    "Scenario",
    "expected_events",
    "expected_state",
    "normalize_email",
    "populate",
    "unsyncable_reason",
]

SIGNER_TAG = "controlshift-petition-signer"
CREATOR_TAG = "controlshift-petition-creator"
CATEGORY_TAG_PREFIX = "controlshift:"
EVENT_HOST_TAG = "controlshift-event-host"
ATTENDEE_TAG = "controlshift-event-attendee"
ATTENDING = frozenset({"attending", "confirmed", "attended"})
ATTENDING_STATUSES = ("attending", "confirmed", "attended", "not_attending", "no_show")
# Longest name / postcode the oracle treats as syncable; longer records are dead letters.
MAX_FIELD_LENGTH = 255
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

CATEGORIES = (
    "Avoiding Taxes",
    "Climate",
    "Public Transport",
    "Housing",
    "Health",
    "Education",
    "Animal Welfare",
    "Local Democracy",
)
BAD_RECORD_KINDS = ("missing_email", "invalid_email", "null_names", "long_first_name", "non_ascii")

_FIRST_NAMES = (
    "Ann", "José", "Zoë", "Łukasz", "花子", "Mohammed", "Aisha", "Søren", "François", "Ngọc",
    "Priya", "Liam", "Olivia", "Chloé", "Mateo", "Siobhán", "Kwame", "Eilidh", "Björn",
    "Ana-María", "Wei", "Fatima", "Tomás", "Anaïs", "Dmitri", "Jürgen", "Grace", "Oliver",
    "Amelia", "Noah", "Mia", "Ethan", "Emma", "Sam", "Jo", "Hēmi", "Aroha", "Małgorzata",
)  # fmt: skip
_LAST_NAMES = (
    "Lee", "García", "Müller", "Nowak", "田中", "O'Brien", "Nguyễn", "Smith", "Jones",
    "Williams", "Brown", "Taylor", "Wilson", "Kowalski", "Dubois", "Rossi", "Johansson",
    "Okafor", "Patel", "Khan", "Murphy", "MacDonald", "van der Berg", "Fernández", "Ødegaard",
    "Papadopoulos", "Ivanova", "Chen", "Singh", "Cohen", "Żółkiewska", "Ngata",
)  # fmt: skip
_ROMANIZED = {"花子": "hanako", "田中": "tanaka"}
_DOMAINS = ("example.org", "example.com", "example.net", "mail.example.org", "post.example.net")
_PLACES = ("Riverton", "Lakeside", "Northbridge", "Malmö Street", "Kingsford", "Ashdown",
           "Port Ellen", "Westmere", "Saint-Étienne Road", "Harbourside")  # fmt: skip
_CORPS = ("MegaCorp", "Globex", "Initech", "Acme Holdings", "Umbrella Retail", "Soylent Foods")
_AMENITIES = ("library", "swimming pool", "community garden", "youth centre", "night bus",
              "post office", "bike lanes")  # fmt: skip
_THREATS = ("fracking", "a new motorway", "luxury flats", "the incinerator", "hospital cuts")
_TITLES = (
    "Stop {corp} dodging its taxes",
    "Make {corp} pay its fair share",
    "Save {place}'s {amenity}",
    "Bring back the {place} {amenity}",
    "Protect {place} from {threat}",
    "Say no to {threat} in {place}",
    "Affordable homes for {place}",
    "Keep {place} Hospital open",
    "Clean air for {place} schools",
    "Free buses for under-25s in {place}",
)
_POSTCODES: dict[str, tuple[str, ...]] = {
    "GB": ("SW1A 1AA", "EH1 1YZ", "M1 1AE", "CF10 1EP", "BS1 4DJ"),
    "US": ("10001", "94103", "60614", "02139", "73301"),
    "AU": ("2000", "3000", "4000", "6000"),
    "DE": ("10115", "80331", "20095"),
    "NZ": ("6011", "1010", "8011"),
    "NL": ("1012 AB", "3511 LX"),
    "CA": ("K1A 0B1", "M5V 2T6"),
}


def normalize_email(email: str | None) -> str:
    """How emails are matched: trimmed, lower-cased."""
    return (email or "").strip().lower()


def unsyncable_reason(email: str | None, *fields: Any) -> str | None:
    """Why a record cannot reach AN (``None`` if it can): no email, an invalid one, or a text
    field longer than ``MAX_FIELD_LENGTH``."""
    address = normalize_email(email)
    if not address:
        return "missing email"
    if not _EMAIL_RE.match(address):
        return "invalid email"
    if any(isinstance(v, str) and len(v) > MAX_FIELD_LENGTH for v in fields):
        return "field too long"
    return None


@dataclass(frozen=True)
class ExistingPerson:
    """A person already in AN before csand runs."""

    email: str
    given_name: str | None
    family_name: str | None
    status: Literal["subscribed", "unsubscribed"]


@dataclass(frozen=True)
class ExpectedPerson:
    """What AN must hold for one person (keyed by normalized email) after the sync."""

    email: str
    status: Literal["subscribed", "unsubscribed"]
    tags: frozenset[str]
    petitions: frozenset[str]  # slugs of the launched petitions they signed or created
    given_name: str | None
    family_name: str | None
    postal_code: str | None
    events: frozenset[str] = frozenset()  # slugs of the synced events they host or attend


@dataclass(frozen=True)
class ExpectedEvent:
    """What AN must hold for one synced CS event (launched, not moderated as inappropriate)."""

    slug: str
    identifier: str  # controlshift-<org>:event-<slug>
    title: str
    calendar: str | None  # calendar slug: the event lives in that calendar's event campaign
    calendar_identifier: str | None  # controlshift-<org>:calendar-<slug>
    host: str | None  # the host's normalized email, None when the host cannot sync
    attendances: frozenset[str]  # normalized emails with one attendance each (host included)


@dataclass(frozen=True)
class DeadRecord:
    """A CS record that must not reach AN: a deleted signature, or one that cannot sync."""

    kind: Literal["signature", "creator"]
    petition: str  # petition slug
    signature_id: int | None  # None for a creator
    email: str | None  # as CS has it
    reason: str  # "deleted", "missing email", "invalid email" or "field too long"


@dataclass(frozen=True)
class _Activity:
    at: datetime
    order: tuple[int, int]  # tie-breakers: (creator, signer, host, attendee; record id)
    petition: str | None
    role_tag: str
    category_tags: frozenset[str]
    opted_in: bool
    first_name: str | None
    last_name: str | None
    postcode: str | None
    event: str | None = None


def _parse(ts: str | datetime) -> datetime:
    return ts if isinstance(ts, datetime) else datetime.fromisoformat(ts)


def _filled(value: str | None) -> bool:
    return bool(value and value.strip())


def _latest(values: Iterable[str | None], fallback: str | None) -> str | None:
    """The first non-empty value (values come newest first), else the fallback."""
    return next((v for v in values if _filled(v)), fallback)


def expected_state(
    petitions: Sequence[Mapping[str, Any]],
    signatures: Sequence[Mapping[str, Any]],
    existing: Mapping[str, ExistingPerson],
    *,
    events: Sequence[Mapping[str, Any]] = (),
    attendees: Sequence[Mapping[str, Any]] = (),
    host_consent_known: bool = False,
    moderation_known: bool = True,
) -> tuple[dict[str, ExpectedPerson], list[DeadRecord]]:
    """docs/rules.md applied to CS data as the REST API renders it.

    Only launched petitions count (their creators and signatures). Deleted signatures and
    records that cannot sync are returned as dead records instead. People already in AN with no
    syncable activity are included unchanged.

    ``events`` are :meth:`ControlShiftSim.events` records and ``attendees`` the live
    :meth:`ControlShiftSim.attendees` bodies: the host of a synced event (see
    :func:`expected_events`) and each of its attending attendees are activities like a
    signature (tagged, §2 consent from ``join_organisation``). A REST host carries only a full
    name (never split) and no opt-in, so a host opts in only when ``host_consent_known`` (csand
    heard the event's webhook). Declines, no-shows and the attendees of events that are not
    synced produce nothing (not even a person).
    """
    launched = {p["slug"]: p for p in petitions if p["launched"]}
    by_email: dict[str, list[_Activity]] = defaultdict(list)
    dead: list[DeadRecord] = []

    def categories(petition: Mapping[str, Any]) -> frozenset[str]:
        return frozenset(CATEGORY_TAG_PREFIX + c["name"] for c in petition["categories"])

    for p in launched.values():
        c = p["creator"]
        reason = unsyncable_reason(c["email"], c["first_name"], c["last_name"])
        if reason:
            dead.append(DeadRecord("creator", p["slug"], None, c["email"], reason))
            continue
        by_email[normalize_email(c["email"])].append(
            _Activity(
                at=_parse(p["created_at"]),
                order=(0, p["id"]),
                petition=p["slug"],
                role_tag=CREATOR_TAG,
                category_tags=categories(p),
                opted_in=False,  # REST carries no opt-in for creators
                first_name=c["first_name"],
                last_name=c["last_name"],
                postcode=None,  # nor a postcode
            )
        )
    for s in signatures:
        p = launched.get(s["petition"]["slug"])
        if p is None:
            continue
        reason = "deleted" if s["deleted_at"] else None
        reason = reason or unsyncable_reason(
            s["email"], s["first_name"], s["last_name"], s["postcode"]
        )
        if reason:
            dead.append(DeadRecord("signature", p["slug"], s["id"], s["email"], reason))
            continue
        by_email[normalize_email(s["email"])].append(
            _Activity(
                at=_parse(s["created_at"]),
                order=(1, s["id"]),
                petition=p["slug"],
                role_tag=SIGNER_TAG,
                category_tags=categories(p),
                opted_in=s["join_organisation"] is True,
                first_name=s["first_name"],
                last_name=s["last_name"],
                postcode=s["postcode"],
            )
        )

    synced = {e["slug"]: e for e in events if _syncable_event(e, moderation_known)}
    for e in synced.values():
        h = e["host"] or {}
        if unsyncable_reason(h.get("email")):
            continue  # the event still syncs, without a host
        by_email[normalize_email(h["email"])].append(
            _Activity(
                at=_parse(e["created_at"]),
                order=(2, 0),
                petition=None,
                role_tag=EVENT_HOST_TAG,
                category_tags=frozenset(),
                opted_in=host_consent_known and h.get("join_organisation") is True,
                first_name=h.get("first_name") if host_consent_known else None,
                last_name=h.get("last_name") if host_consent_known else None,
                postcode=h.get("postcode"),
                event=e["slug"],
            )
        )
    for a in attendees:
        slug = (a.get("event") or {}).get("slug")
        if slug not in synced or a.get("attending_status") not in ATTENDING:
            continue
        if unsyncable_reason(a["email"], a["first_name"], a["last_name"], a["postcode"]):
            continue
        by_email[normalize_email(a["email"])].append(
            _Activity(
                at=_parse(a["created_at"]),
                order=(3, a["id"]),
                petition=None,
                role_tag=ATTENDEE_TAG,
                category_tags=frozenset(),
                opted_in=a["join_organisation"] is True,
                first_name=a["first_name"],
                last_name=a["last_name"],
                postcode=a["postcode"],
                event=slug,
            )
        )

    state: dict[str, ExpectedPerson] = {}
    for email in sorted(set(by_email) | set(existing)):
        acts = sorted(by_email.get(email, []), key=lambda a: (a.at, a.order), reverse=True)
        before = existing.get(email)
        opted_in = any(a.opted_in for a in acts)
        if opted_in or (before and before.status == "subscribed"):
            status: Literal["subscribed", "unsubscribed"] = "subscribed"
        else:
            status = before.status if before else "unsubscribed"
        state[email] = ExpectedPerson(
            email=email,
            status=status,
            tags=frozenset({a.role_tag for a in acts}).union(*(a.category_tags for a in acts)),
            petitions=frozenset(a.petition for a in acts if a.petition is not None),
            given_name=_latest((a.first_name for a in acts), before and before.given_name),
            family_name=_latest((a.last_name for a in acts), before and before.family_name),
            postal_code=_latest((a.postcode for a in acts), None),
            events=frozenset(a.event for a in acts if a.event is not None),
        )
    return state, dead


def _syncable_event(event: Mapping[str, Any], moderation_known: bool) -> bool:
    """Launched and not moderated as inappropriate. REST shows no moderation status: unless
    ``moderation_known`` (csand heard the event's webhooks), an inappropriate event looks like
    any launched one."""
    if event.get("launched_at") is None:
        return False
    return not (moderation_known and event.get("admin_status") == "inappropriate")


def expected_events(
    events: Sequence[Mapping[str, Any]],
    attendees: Sequence[Mapping[str, Any]],
    org_slug: str,
    *,
    moderation_known: bool = True,
) -> dict[str, ExpectedEvent]:
    """Per CS event slug, the AN event csand must mirror (docs/rules.md §5): one per launched
    event not moderated as inappropriate, in its calendar's event campaign (so one campaign per
    calendar holding such an event), with one attendance for the host and for each attending
    attendee whose record can sync."""
    out: dict[str, ExpectedEvent] = {}
    for e in events:
        if not _syncable_event(e, moderation_known):
            continue
        host_email = (e["host"] or {}).get("email")
        host = None if unsyncable_reason(host_email) else normalize_email(host_email)
        going = {
            normalize_email(a["email"])
            for a in attendees
            if (a.get("event") or {}).get("slug") == e["slug"]
            and a.get("attending_status") in ATTENDING
            and not unsyncable_reason(a["email"], a["first_name"], a["last_name"], a["postcode"])
        }
        calendar = e.get("calendar_slug")
        out[e["slug"]] = ExpectedEvent(
            slug=e["slug"],
            identifier=f"controlshift-{org_slug}:event-{e['slug']}",
            title=e["title"],
            calendar=calendar,
            calendar_identifier=f"controlshift-{org_slug}:calendar-{calendar}" if calendar else None,
            host=host,
            attendances=frozenset(going | ({host} if host else set())),
        )
    return out


@dataclass
class Scenario:
    """What ``populate`` generated, and the oracle over the simulator's current data."""

    cs: ControlShiftSim
    seed: int
    petitions: list[dict[str, Any]]  # as created (later changes: ask ``cs``)
    signatures: list[dict[str, Any]]  # as created, bad records included, by id
    bad_records: dict[int, str]  # signature id -> one of BAD_RECORD_KINDS
    existing_people: dict[str, ExistingPerson]  # normalized email -> AN before the sync
    people: list[str] = field(default_factory=list)  # every generated normalized email
    calendars: list[dict[str, Any]] = field(default_factory=list)  # as created
    events: list[dict[str, Any]] = field(default_factory=list)  # as created (REST rendering)
    attendees: list[dict[str, Any]] = field(default_factory=list)  # as created, by id
    # What csand can know (REST carries neither a host's opt-in nor an event's moderation):
    # set these to match how the csand under test hears ControlShift.
    # CS petition slug -> the AN petitions ControlShift's hosted integration made for it before
    # csand (two: a duplicate, ambiguous); see ``populate(hosted=...)``.
    hosted: dict[str, list[str]] = field(default_factory=dict)
    host_consent_known: bool = False  # hosts' join_organisation (webhooks only)
    moderation_known: bool = True  # admin_status "inappropriate" (webhooks only)

    def _state(self) -> tuple[dict[str, ExpectedPerson], list[DeadRecord]]:
        return expected_state(
            self.cs.petitions(),
            self.cs.signatures(),
            self.existing_people,
            events=self.cs.events(),
            attendees=self.cs.attendees(),
            host_consent_known=self.host_consent_known,
            moderation_known=self.moderation_known,
        )

    def expected_an_state(self) -> dict[str, ExpectedPerson]:
        """Per normalized email, what AN must end with."""
        return self._state()[0]

    def expected_dead(self) -> list[DeadRecord]:
        """Records that must not reach AN, each with its reason."""
        return self._state()[1]

    def has_events(self) -> bool:
        return bool(self.cs.events())

    def expected_events(self) -> dict[str, ExpectedEvent]:
        """Per CS event slug, the AN event csand must mirror and its attendances."""
        return expected_events(
            self.cs.events(),
            self.cs.attendees(),
            self.cs.org_slug,
            moderation_known=self.moderation_known,
        )

    def expected_campaigns(self) -> dict[str, str]:
        """Calendar slug -> AN event campaign identifier, for each calendar holding a synced
        event."""
        return {
            e.calendar: e.calendar_identifier
            for e in self.expected_events().values()
            if e.calendar and e.calendar_identifier
        }

    def summary(self) -> dict[str, int]:
        state, dead = self._state()
        out = {
            "petitions": len(self.petitions),
            "launched": sum(1 for p in self.petitions if p["launched"]),
            "signatures": len(self.signatures),
            "people": len(self.people),
            "existing_in_an": len(self.existing_people),
            "bad_records": len(self.bad_records),
            "expected_people": len(state),
            "expected_subscribed": sum(1 for p in state.values() if p.status == "subscribed"),
            "expected_dead": len(dead),
        }
        if self.events:
            synced = self.expected_events()
            out |= {
                "calendars": len(self.calendars),
                "events": len(self.events),
                "attendees": len(self.attendees),
                "expected_events": len(synced),
                "expected_campaigns": len(self.expected_campaigns()),
                "expected_attendances": sum(len(e.attendances) for e in synced.values()),
            }
        return out


# ---------------------------------------------------------------------- generation


@dataclass
class _Person:
    email: str  # how they usually type it
    first_name: str | None
    last_name: str | None
    country: str
    postcode: str | None
    phone_number: str | None
    petitions: set[str] = field(default_factory=set)


def _ascii(text: str) -> str:
    if text in _ROMANIZED:
        return _ROMANIZED[text]
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]", "", folded.lower())


class _Generator:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.people: list[_Person] = []
        self.taken: set[str] = set()

    def new_person(self) -> _Person:
        rng = self.rng
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        local = ".".join(part for part in (_ascii(first), _ascii(last)) if part) or "supporter"
        domain = rng.choice(_DOMAINS)
        base, n = local, 1
        while f"{local}@{domain}" in self.taken:
            n += 1
            local = f"{base}{n}"
        self.taken.add(f"{local}@{domain}")
        if rng.random() < 0.08:
            local += rng.choice(("+petitions", "+cs", "+news"))
        email = f"{local}@{domain}"
        if rng.random() < 0.15:
            email = ".".join(w.capitalize() for w in local.split(".")) + "@" + domain.capitalize()
        country = rng.choice(tuple(_POSTCODES))
        person = _Person(
            email=email,
            first_name=first,
            last_name=last if rng.random() > 0.05 else None,
            country=country,
            postcode=rng.choice(_POSTCODES[country]) if rng.random() > 0.1 else None,
            phone_number=f"+44 7700 900{rng.randrange(1000):03d}" if rng.random() < 0.4 else None,
        )
        self.people.append(person)
        return person

    def typed_email(self, person: _Person, repeat: bool) -> str:
        """The email as typed on one form: other case sometimes, stray spaces rarely."""
        email = person.email
        if repeat and self.rng.random() < 0.3:
            email = self.rng.choice((email.upper(), email.lower(), email.swapcase()))
        if self.rng.random() < 0.04:
            email = self.rng.choice((f" {email}", f"{email} ", f"\t{email} "))
        return email

    def pick_person(self, repeat_rate: float, avoid: str) -> tuple[_Person, bool]:
        """A returning person (with probability ``repeat_rate``) who has not acted on ``avoid``,
        else a new one."""
        if self.people and self.rng.random() < repeat_rate:
            for _ in range(5):
                person = self.rng.choice(self.people)
                if avoid not in person.petitions:
                    return person, True
        return self.new_person(), False

    def moment(self, start: datetime, end: datetime) -> datetime:
        span = max((end - start).total_seconds(), 1.0)
        return start + timedelta(seconds=self.rng.uniform(0, span))

    def title(self) -> str:
        rng = self.rng
        return rng.choice(_TITLES).format(
            corp=rng.choice(_CORPS),
            place=rng.choice(_PLACES),
            amenity=rng.choice(_AMENITIES),
            threat=rng.choice(_THREATS),
        )


def _bad_signature(kind: str, index: int, person: _Person) -> dict[str, Any]:
    """Signature fields for one broken record (``person`` supplies the harmless parts)."""
    fields: dict[str, Any] = {
        "email": f"record{index}.{kind.replace('_', '-')}@example.org",
        "first_name": person.first_name,
        "last_name": person.last_name,
    }
    if kind == "missing_email":
        fields["email"] = None if index % 2 == 0 else ""
    elif kind == "invalid_email":
        fields["email"] = "not-an-email"
    elif kind == "null_names":
        fields["first_name"] = fields["last_name"] = None
    elif kind == "long_first_name":
        fields["first_name"] = ("Maximiliana" * 30)[:300]
    elif kind == "non_ascii":
        fields["first_name"], fields["last_name"] = "Ngọc Ánh 🌏", "Đặng-Żółć ß"
    return fields


_CALENDAR_NAMES = ("Summer of Action", "Climate Week", "Save Our Services", "Housing Days",
                   "Town Hall Tour", "Week of Welcome")  # fmt: skip
_EVENT_TITLES = ("Door-knocking in {place}", "Banner-making night", "Public meeting: {title}",
                 "Stall at {place} market", "Phone bank for {place}", "Picnic protest in {place}",
                 "Letter-writing evening", "Online briefing: {title}")  # fmt: skip
_ANSWERS: dict[str, tuple[Any, ...]] = {
    "dietary": ("vegan", "vegetarian", "none", "gluten free"),
    "first_event": (True, False),
    "transport": ("bike", "bus", "car share"),
    "volunteer_roles": (["stewarding"], ["stewarding", "set-up"], []),
}


def _slug(text: str, n: int) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", _ascii_words(text)).strip("-")
    return f"{words[:40].rstrip('-')}-{n}"


def _ascii_words(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return folded.lower()


def _populate_hosted(
    cs: ControlShiftSim,
    an: ActionNetworkSim,
    made: list[dict[str, Any]],
    signed: list[dict[str, Any]],
    bad: dict[int, str],
    existing: Mapping[str, ExistingPerson],
    count: int,
    duplicates: int,
) -> dict[str, list[str]]:
    """What the hosted integration left in AN: see ``populate(hosted=...)``."""
    urls = {p["slug"]: p["url"] for p in cs.petitions()}
    by_slug: dict[str, set[str]] = defaultdict(set)
    for sig in signed:
        email = normalize_email(sig.get("email"))
        if sig["id"] not in bad and email in existing:
            by_slug[sig["petition"]["slug"]].add(email)
    out: dict[str, list[str]] = {}
    for i, petition in enumerate([p for p in made if p["launched"]][:count]):
        slug = petition["slug"]
        signers = sorted(by_slug.get(slug, ()))
        if i < duplicates:  # made twice, neither naming the URL
            out[slug] = [an.add_petition(petition["title"], description=f"{petition['title']}.",
                                         signers=signers) for _ in range(2)]
        else:
            out[slug] = [an.add_petition(
                petition["title"], signers=signers,
                description=f"<p>{petition['title']}</p><p><a href=\"{urls[slug]}\">"
                            f"{urls[slug]}</a></p>")]
    return out


def _populate_events(
    cs: ControlShiftSim,
    gen: _Generator,
    rng: random.Random,
    anchor: datetime,
    events: int,
    calendars: int,
    attendees: int,
    not_opted_in: float,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Calendars, events (with hosts) and attendees, from their own random stream ``rng``."""
    if events <= 0:
        return [], [], []
    main_rng, gen.rng = gen.rng, rng  # people come from the shared pool, choices from rng
    try:
        made_calendars = [
            cs.add_calendar(
                _slug(name, i + 1),
                f"{name} {anchor.year}",
                description=f"Events for {name.lower()} across the country.",
            )
            for i, name in enumerate(rng.choice(_CALENDAR_NAMES) for _ in range(calendars))
        ]

        def consent() -> bool | None:
            return rng.choice((False, None)) if rng.random() < not_opted_in else True

        start = anchor - timedelta(days=120)
        created = sorted(gen.moment(start, anchor - timedelta(days=3)) for _ in range(events))
        made_events: list[dict[str, Any]] = []
        for i, created_at in enumerate(created):
            title = rng.choice(_EVENT_TITLES).format(place=rng.choice(_PLACES), title=gen.title())
            slug = _slug(title, i + 1)
            host, repeat = gen.pick_person(0.3, avoid="")
            host.petitions.add(f"event:{slug}")  # never also an attendee of their own event
            virtual = rng.random() < 0.25
            country = host.country
            location = None if virtual else {
                "street_number": str(rng.randint(1, 200)),
                "street": rng.choice(("High Street", "Station Road", "Church Lane", "Rue Haute")),
                "locality": rng.choice(_PLACES),
                "region": None,
                "postal_code": rng.choice(_POSTCODES[country]),
                "country": country,
            }
            starts = created_at + timedelta(days=rng.randint(5, 60), hours=rng.randint(0, 10))
            starts = starts.replace(minute=0, second=0, microsecond=0)
            in_calendar = made_calendars and rng.random() < 0.6
            made_events.append(cs.add_event(
                slug,
                title=title,
                description=f"Join us: {title.lower()}." if rng.random() < 0.9 else None,
                start_at=starts,
                end_at=starts + timedelta(hours=rng.choice((1, 2, 3))),
                virtual=virtual,
                host={
                    "email": gen.typed_email(host, repeat),
                    "first_name": host.first_name,
                    "last_name": host.last_name,
                    "postcode": host.postcode,
                    "phone_number": host.phone_number,
                    "country": host.country,
                    "join_organisation": consent(),
                },
                location=location,
                calendar_slug=rng.choice(made_calendars)["slug"] if in_calendar else None,
                launched=not (events >= 4 and i == events - 1),
                admin_status="inappropriate" if events >= 4 and i == events - 2 else "good",
                created_at=created_at,
                location_venue=None if virtual else rng.choice(("Town Hall", "The Crown", None)),
            ))

        specs: list[tuple[datetime, str, dict[str, Any]]] = []
        weights = [1 / (k + 1) for k in range(events)]
        rng.shuffle(weights)
        weights = [w if e["launched_at"] else 0.0 for w, e in zip(weights, made_events, strict=True)]
        for _ in range(attendees):
            event = rng.choices(made_events, weights)[0]
            person, repeat = gen.pick_person(0.3, avoid=f"event:{event['slug']}")
            person.petitions.add(f"event:{event['slug']}")
            status = rng.choices(ATTENDING_STATUSES, (50, 15, 15, 12, 8))[0]
            at = gen.moment(_parse(created[made_events.index(event)]) + timedelta(minutes=1),
                            anchor)
            answers = {
                key: rng.choice(values)
                for key, values in _ANSWERS.items()
                if rng.random() < 0.4
            }
            specs.append((at, event["slug"], {
                "email": gen.typed_email(person, repeat),
                "first_name": person.first_name,
                "last_name": person.last_name,
                "postcode": person.postcode,
                "phone_number": person.phone_number,
                "attending_status": status,
                "join_organisation": consent(),
                "additional_fields": answers or None,
                "confirmed_at": at + timedelta(minutes=5) if status != "attending" else None,
            }))
        specs.sort(key=lambda spec: spec[0])
        made_attendees = [
            cs.add_attendee(slug, created_at=at, **fields) for at, slug, fields in specs
        ]
        return made_calendars, made_events, made_attendees
    finally:
        gen.rng = main_rng


def populate(
    cs: ControlShiftSim,
    an: ActionNetworkSim | None,
    *,
    petitions: int = 12,
    signatures: int = 400,
    not_opted_in: float = 0.3,
    existing_in_an: float = 0.2,
    existing_subscribed: float = 0.5,
    unlaunched: int = 1,
    repeat_signers: float = 0.1,
    bad_records: int = 0,
    seed: int = 0,
    now: datetime | None = None,
    events: int = 0,
    calendars: int = 0,
    attendees: int = 0,
    hosted: int = 0,
    hosted_duplicates: int = 0,
) -> Scenario:
    """Fill ``cs`` (and, if given, seed ``an`` with pre-existing people); return the Scenario.

    ``signatures`` counts ordinary signatures; the ``bad_records`` broken ones come on top. The
    ``unlaunched`` petitions are the newest and have no signatures. Timestamps fall in the ~6
    months before midnight UTC of ``now`` (default: the simulator's ``now``), so a run is
    reproducible from ``seed`` on any one day, or always with a fixed ``now``.

    ``events`` CS events (with ``events >= 4``: the newest is unlaunched and the one before it
    launched but moderated inappropriate), spread over ``calendars`` calendars (about 60% of them
    in one) or none, a quarter virtual; hosts and the ``attendees`` RSVPs are returning people
    (signers among them) or new ones, with every attending status and ``join_organisation``
    true / false / null. Events come from their own random stream: with ``events=0`` nothing
    else changes.

    ``hosted``: ControlShift's hosted Action Network integration already mirrored the oldest
    ``hosted`` launched petitions into ``an`` (origin system ``Controlshift Petition``, the CS
    title, the CS URL in the description, no csand identifier, signed by the people already in
    AN who signed them on CS); the first ``hosted_duplicates`` of them got two AN petitions
    each, neither naming the URL (ambiguous: a person must choose). See
    :attr:`Scenario.hosted`.
    """
    if attendees and not events:
        raise ValueError("attendees need events")
    if hosted and an is None:
        raise ValueError("hosted petitions need the Action Network simulator")
    if not 0 <= hosted_duplicates <= hosted:
        raise ValueError("hosted_duplicates must be between 0 and hosted")
    if not 0 <= unlaunched <= petitions:
        raise ValueError("unlaunched must be between 0 and petitions")
    if signatures + bad_records > 0 and unlaunched == petitions:
        raise ValueError("signatures need at least one launched petition")
    rng = random.Random(seed)
    gen = _Generator(rng)
    anchor = (now or cs.now()).astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = anchor - timedelta(days=180)

    # Petitions, oldest first; the newest `unlaunched` of them are drafts.
    created = sorted(gen.moment(start, anchor - timedelta(days=7)) for _ in range(petitions))
    made: list[dict[str, Any]] = []
    for i, created_at in enumerate(created):
        creator, _ = gen.pick_person(repeat_signers, avoid="")
        petition = cs.add_petition(
            title=gen.title(),
            launched=i < petitions - unlaunched,
            categories=rng.sample(CATEGORIES, rng.randint(0, 3)),
            creator={
                "first_name": creator.first_name,
                "last_name": creator.last_name,
                "email": creator.email,
                "phone_number": creator.phone_number,
            },
            created_at=created_at,
        )
        creator.petitions.add(petition["slug"])
        made.append(petition)

    # Signatures, spread unevenly: a few large petitions, a long tail of small ones.
    launched = [p for p in made if p["launched"]]
    weights = [1 / (k + 1) ** 1.2 for k in range(len(launched))]
    rng.shuffle(weights)
    specs: list[tuple[datetime, str, dict[str, Any], str | None]] = []
    for _ in range(signatures):
        petition = rng.choices(launched, weights)[0]
        person, repeat = gen.pick_person(repeat_signers, avoid=petition["slug"])
        person.petitions.add(petition["slug"])
        join: bool | None = True
        if rng.random() < not_opted_in:
            join = rng.choice((False, None))
        fields = {
            "email": gen.typed_email(person, repeat),
            "first_name": person.first_name,
            "last_name": person.last_name,
            "postcode": person.postcode,
            "phone_number": person.phone_number,
            "country": person.country,
            "join_organisation": join,
        }
        at = gen.moment(_parse(petition["created_at"]) + timedelta(minutes=1), anchor)
        specs.append((at, petition["slug"], fields, None))
    for i in range(bad_records):
        kind = BAD_RECORD_KINDS[i % len(BAD_RECORD_KINDS)]
        petition = rng.choice(launched)
        fields = _bad_signature(kind, i, gen.new_person())
        gen.people.pop()  # a one-off, not a returning supporter
        fields["join_organisation"] = rng.random() >= not_opted_in
        at = gen.moment(_parse(petition["created_at"]) + timedelta(minutes=1), anchor)
        specs.append((at, petition["slug"], fields, kind))

    # Insert in time order so that ids grow with created_at, as on a real platform.
    specs.sort(key=lambda spec: spec[0])
    signed: list[dict[str, Any]] = []
    bad: dict[int, str] = {}
    for at, slug, fields, kind in specs:
        sig = cs.add_signature(slug, created_at=at, **fields)
        signed.append(sig)
        if kind is not None:
            bad[sig["id"]] = kind

    made_calendars, made_events, made_attendees = _populate_events(
        cs, gen, random.Random(f"events:{seed}"), anchor, events, calendars, attendees,
        not_opted_in,
    )

    # People already in AN before the sync.
    existing: dict[str, ExistingPerson] = {}
    for person in gen.people:
        if rng.random() < existing_in_an:
            status: Literal["subscribed", "unsubscribed"] = (
                "subscribed" if rng.random() < existing_subscribed else "unsubscribed"
            )
            key = normalize_email(person.email)
            existing[key] = ExistingPerson(key, person.first_name, person.last_name, status)
    if an is not None:
        for person in existing.values():
            an.add_person(
                person.email,
                given_name=person.given_name,
                family_name=person.family_name,
                status=person.status,
            )

    made_hosted = _populate_hosted(cs, an, made, signed, bad, existing, hosted,
                                   hosted_duplicates) if an is not None else {}

    return Scenario(
        hosted=made_hosted,
        cs=cs,
        seed=seed,
        petitions=made,
        signatures=signed,
        bad_records=bad,
        existing_people=existing,
        people=[normalize_email(p.email) for p in gen.people],
        calendars=made_calendars,
        events=made_events,
        attendees=made_attendees,
    )
