"""An in-memory Action Network API v2, served as a Starlette app, for testing csand end to end.

It reproduces what csand must cope with on the real service: the helpers' subscription rules,
silently ignored unknown tags, globally unique petition identifiers, the people list's endless
``next`` link, the per-key rate limit, the ``200 {}`` helper failures, and injected outages
(5xx, slow answers, dropped connections, failures after the write was committed). Tests drive
it over real HTTP (see :mod:`csand.sim.server`) and inspect its state through plain methods.

Events, event campaigns, attendances, person custom fields and phone numbers follow
``spec/events-api.md`` section B (the event routes need ``ActionNetworkSim(events_api=True)``). Where that document marks a behaviour unconfirmed or a GUESS,
the simulator takes the stricter reading, the one that exposes a client bug:

- Identifiers are unique across every resource (petitions, events, event campaigns,
  attendances): a POST reusing one is refused with 400, like a petition's.
- An event joins an event campaign only when POSTed to ``/event_campaigns/{id}/events``; nothing
  moves an existing event in or out (a PUT ignores campaign links, creator, organizer and
  identifiers).
- An event's ``status`` is accepted (when valid) on POST and PUT but silently ignored: every
  event stays ``confirmed``. Events, event campaigns and attendances cannot be deleted (405).
- A PUT ``location`` replaces the whole location object: fields it leaves out are gone.
- ``end_date`` before ``start_date`` is refused (400); dates must be ISO 8601.
- The Record Attendance Helper answers every failure of the request body (no or invalid email,
  an email status other than ``subscribed``, a malformed phone or custom field, an identifier
  in use, ...) with ``200 {}`` and writes nothing. It subscribes a person new to the list and
  leaves an existing person's status alone, like the signature helper.
- An attendance's ``status`` is always ``accepted``: a ``declined`` (or any) status sent is ignored.
- Custom field values must be strings (400, or ``200 {}`` on the attendance helper); an empty
  string overwrites like any other value. With ``custom_fields_locked`` a key that is not
  pre-created (:meth:`ActionNetworkSim.add_custom_field`) is silently dropped.
- A phone number new to the person gets SMS status ``unsubscribed`` unless a status is sent; an
  existing number's status changes only when a status is sent. People are matched on email
  first, then on phone; a number that belongs to someone else is silently dropped.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import anyio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "/api/v2"
PAGE_SIZE = 25
MAX_NAME = 255
MAX_POSTAL_CODE = 64
MAX_EMAIL = 254
STATUSES = frozenset({"subscribed", "unsubscribed"})
PHONE_STATUSES = frozenset({"subscribed", "unsubscribed", "bouncing", "previous bounce"})
EVENT_STATUSES = frozenset({"confirmed", "tentative", "cancelled"})
SIGNUP = "POST /people"
SIGNATURE = "POST /petitions/{uuid}/signatures"
ATTENDANCE = "POST /events/{uuid}/attendances"
ENTRY_POINT = "GET /"

_EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(?:\.[^@\s.]+)+")
_FAULT_STATUSES = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


class ApiError(Exception):
    """A request AN refuses: rendered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Faults:
    """Probabilities (0..1) of injected failures; tests may change them at any time."""

    error_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 0.0
    drop_rate: float = 0.0
    empty_200_rate: float = 0.0
    fail_after_commit_rate: float = 0.0
    # Route keys ("POST /petitions") the slow answers apply to; empty: every route.
    slow_routes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Stamp:
    at: float  # the simulator's clock, so tests can order events
    iso: str  # wall-clock date as AN renders it


@dataclass
class _Tagging:
    uuid: str
    created: _Stamp


@dataclass
class _Person:
    uuid: str
    email: str
    status: str
    created_by: str
    created: _Stamp
    modified: _Stamp
    given_name: str | None = None
    family_name: str | None = None
    postal_code: str | None = None
    taggings: dict[str, _Tagging] = field(default_factory=dict)  # by tag uuid
    history: list[dict[str, Any]] = field(default_factory=list)
    custom_fields: dict[str, str] = field(default_factory=dict)
    phones: list[_Phone] = field(default_factory=list)
    sms_history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Phone:
    number: str
    number_type: str
    status: str


@dataclass
class _CustomField:
    name: str
    numeric_id: int
    notes: str | None
    created: _Stamp


@dataclass
class _Event:
    uuid: str
    identifiers: list[str]
    campaign_uuid: str | None
    creator_uuid: str | None
    organizer_uuid: str | None
    created: _Stamp
    modified: _Stamp
    fields: dict[str, Any]  # title, description, start_date, location, ... as last written
    status: str = "confirmed"


@dataclass
class _EventCampaign:
    uuid: str
    identifiers: list[str]
    created: _Stamp
    modified: _Stamp
    fields: dict[str, Any]


@dataclass
class _Attendance:
    uuid: str
    event_uuid: str
    person_uuid: str
    identifiers: list[str]
    created: _Stamp
    modified: _Stamp
    status: str = "accepted"


@dataclass
class _Tag:
    uuid: str
    name: str
    created: _Stamp


@dataclass
class _Petition:
    uuid: str
    title: str
    description: str | None
    origin_system: str | None
    identifiers: list[str]
    creator_uuid: str | None
    created: _Stamp
    signature_count: int = 0
    browser_url: str | None = None


@dataclass
class _Signature:
    uuid: str
    petition_uuid: str
    person_uuid: str
    comments: str | None
    created: _Stamp
    modified: _Stamp


@dataclass
class _Bucket:
    tokens: float
    updated: float

    def take(self, now: float, rate: float, capacity: float) -> bool:
        self.tokens = min(capacity, self.tokens + (now - self.updated) * rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass(frozen=True)
class _PhoneInput:
    number: str
    number_type: str
    status: str | None


@dataclass(frozen=True)
class _PersonInput:
    email: str
    status: str | None
    fields: dict[str, str | None]  # only the fields the request carries
    custom_fields: dict[str, str] = field(default_factory=dict)
    phones: tuple[_PhoneInput, ...] = ()


@dataclass(frozen=True)
class _Verdict:
    """What the gate does with a request before (or instead of) the handler."""

    answer: Response | None = None
    drop: bool = False
    delay: float = 0.0
    fail_after_commit: bool = False


class HalResponse(JSONResponse):
    """AN answers in HAL+JSON."""

    media_type = "application/hal+json"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return HalResponse({"error": message}, status_code=status, headers=headers)


class ActionNetworkSim:
    """The simulated service: ``app`` serves the API, the other public methods inspect it."""

    def __init__(
        self,
        *,
        api_key: str = "an-test-key",
        requests_per_second: float | None = 4.0,
        burst: float | None = None,
        send_retry_after: bool = True,
        repost_tag: str = "existing",
        custom_fields_locked: bool = False,
        events_api: bool = False,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if repost_tag not in ("existing", "error"):
            raise ValueError("repost_tag must be 'existing' or 'error'")
        self.api_key = api_key
        self.requests_per_second = requests_per_second
        self.burst = burst
        self.send_retry_after = send_retry_after
        self.repost_tag = repost_tag
        self.custom_fields_locked = custom_fields_locked
        self.faults = Faults()
        self._clock = clock
        self._lock = threading.Lock()
        self._fault_rng = random.Random(seed)
        self._id_rng = random.Random(f"ids:{seed}")
        self._buckets: dict[str, _Bucket] = {}
        self._people: dict[str, _Person] = {}
        self._person_by_email: dict[str, str] = {}
        self._tags: dict[str, _Tag] = {}
        self._tag_by_name: dict[str, str] = {}
        self._petitions: dict[str, _Petition] = {}
        self._petition_by_identifier: dict[str, str] = {}
        self._signatures: dict[tuple[str, str], _Signature] = {}
        # Every identifier of every resource -> "<collection>/<uuid>": identifiers are global.
        self._identifier_owner: dict[str, str] = {}
        self._custom_fields: dict[str, _CustomField] = {}
        self._phone_owner: dict[str, str] = {}  # phone key -> person uuid
        self._events: dict[str, _Event] = {}
        self._campaigns: dict[str, _EventCampaign] = {}
        self._attendances: dict[tuple[str, str], _Attendance] = {}  # by (event, person) uuid
        self._reset_stats()
        self._routes = [
            Route(f"{PREFIX}/", self._entry_point, methods=["GET"]),
            Route(f"{PREFIX}/people", self._list_people, methods=["GET"]),
            Route(f"{PREFIX}/people", self._signup_helper, methods=["POST"]),
            Route(f"{PREFIX}/people/{{uuid}}", self._get_person, methods=["GET"]),
            Route(f"{PREFIX}/people/{{uuid}}", self._put_person, methods=["PUT"]),
            Route(f"{PREFIX}/petitions", self._list_petitions, methods=["GET"]),
            Route(f"{PREFIX}/petitions", self._post_petition, methods=["POST"]),
            Route(f"{PREFIX}/petitions/{{uuid}}", self._get_petition, methods=["GET"]),
            Route(f"{PREFIX}/petitions/{{uuid}}", self._put_petition, methods=["PUT"]),
            Route(
                f"{PREFIX}/petitions/{{uuid}}/signatures", self._signature_helper, methods=["POST"]
            ),
            Route(f"{PREFIX}/petitions/{{uuid}}/signatures", self._list_petition_signatures,
                  methods=["GET"]),
            Route(f"{PREFIX}/people/{{uuid}}/signatures", self._list_person_signatures,
                  methods=["GET"]),
            Route(f"{PREFIX}/people/{{uuid}}/taggings", self._list_person_taggings,
                  methods=["GET"]),
            Route(f"{PREFIX}/tags/{{uuid}}/taggings", self._list_tag_taggings, methods=["GET"]),
            Route(f"{PREFIX}/tags", self._list_tags, methods=["GET"]),
            Route(f"{PREFIX}/tags", self._post_tag, methods=["POST"]),
            Route(f"{PREFIX}/tags/{{uuid}}/taggings", self._post_tagging, methods=["POST"]),
            Route(f"{PREFIX}/metadata/custom_fields", self._list_custom_fields, methods=["GET"]),
        ]
        # Off by default: tests written before the events API treat /events as unknown.
        self.events_api = events_api
        event_routes = [
            Route(f"{PREFIX}/events", self._list_events, methods=["GET"]),
            Route(f"{PREFIX}/events", self._post_event, methods=["POST"]),
            Route(f"{PREFIX}/events/{{uuid}}", self._get_event, methods=["GET"]),
            Route(f"{PREFIX}/events/{{uuid}}", self._put_event, methods=["PUT"]),
            Route(
                f"{PREFIX}/events/{{uuid}}/attendances", self._list_attendances, methods=["GET"]
            ),
            Route(f"{PREFIX}/people/{{uuid}}/attendances", self._list_person_attendances,
                  methods=["GET"]),
            Route(
                f"{PREFIX}/events/{{uuid}}/attendances",
                self._attendance_helper,
                methods=["POST"],
            ),
            Route(
                f"{PREFIX}/events/{{uuid}}/attendances/{{attendance}}",
                self._get_attendance,
                methods=["GET"],
            ),
            Route(
                f"{PREFIX}/events/{{uuid}}/attendances/{{attendance}}",
                self._put_attendance,
                methods=["PUT"],
            ),
            Route(f"{PREFIX}/event_campaigns", self._list_campaigns, methods=["GET"]),
            Route(f"{PREFIX}/event_campaigns", self._post_campaign, methods=["POST"]),
            Route(f"{PREFIX}/event_campaigns/{{uuid}}", self._get_campaign, methods=["GET"]),
            Route(f"{PREFIX}/event_campaigns/{{uuid}}", self._put_campaign, methods=["PUT"]),
            Route(
                f"{PREFIX}/event_campaigns/{{uuid}}/events",
                self._list_campaign_events,
                methods=["GET"],
            ),
            Route(
                f"{PREFIX}/event_campaigns/{{uuid}}/events",
                self._post_campaign_event,
                methods=["POST"],
            ),
        ]
        if events_api:
            self._routes += event_routes
        self.app = Starlette(
            routes=self._routes,
            middleware=[Middleware(_Gate, admit=self._admit)],
            exception_handlers={ApiError: _api_error, HTTPException: _http_error},
        )

    # ----------------------------------------------------------------- test-side API

    def add_person(
        self,
        email: str,
        given_name: str | None = None,
        family_name: str | None = None,
        postal_code: str | None = None,
        status: str = "subscribed",
        tags: Iterable[str] = (),
        custom_fields: dict[str, str] | None = None,
        phone_numbers: dict[str, str] | None = None,
    ) -> str:
        """Put a person in the list before the test starts (``created_by="setup"``); tags and
        custom fields are created (even when locked); ``phone_numbers`` maps number to SMS status."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}")
        if any(s not in PHONE_STATUSES for s in (phone_numbers or {}).values()):
            raise ValueError(f"phone status must be one of {sorted(PHONE_STATUSES)}")
        with self._lock:
            if self._find_person(email) is not None:
                raise ValueError(f"{email!r} is already in the list")
            if any(_phone_key(n) in self._phone_owner for n in phone_numbers or {}):
                raise ValueError("a phone number is already someone else's")
            person = self._create_person(email.strip(), status, "setup")
            person.given_name, person.family_name = given_name, family_name
            person.postal_code = postal_code
            for name in tags:
                self._tag_person(person, self._tags[self._ensure_tag(name)])
            for name in custom_fields or {}:
                self._ensure_custom_field(name)
            self._apply_custom_fields(person, dict(custom_fields or {}))
            phones = tuple(_PhoneInput(n, "Mobile", s) for n, s in (phone_numbers or {}).items())
            self._apply_phones(person, phones, "setup")
            self._record(person, "setup")
            return person.uuid

    def delete_person(self, email: str) -> None:
        """An AN admin erases the person (a data-protection request): gone with their
        signatures; a later write by email creates a new person."""
        with self._lock:
            person = self._find_person(email)
            if person is None:
                raise KeyError(email)
            del self._people[person.uuid]
            del self._person_by_email[_email_key(person.email)]
            for key in [k for k in self._signatures if k[1] == person.uuid]:
                del self._signatures[key]
            for phone in person.phones:
                self._phone_owner.pop(_phone_key(phone.number), None)
            for key in [k for k in self._attendances if k[1] == person.uuid]:
                for identifier in self._attendances.pop(key).identifiers:
                    self._identifier_owner.pop(identifier, None)

    # Damage, as an AN admin (or another tool) may do it after a sync: what ``csand audit``
    # must find. AN's API cannot do most of these; its web interface and other tools can.

    def remove_tagging(self, email: str, tag_name: str) -> None:
        """Take a tag off a person (an admin removing it)."""
        with self._lock:
            person = self._find_person(email)
            tag_uuid = self._tag_by_name.get(tag_name.lower())
            if person is None or tag_uuid is None or tag_uuid not in person.taggings:
                raise KeyError((email, tag_name))
            del person.taggings[tag_uuid]

    def delete_signature(self, email: str, petition_uuid: str) -> None:
        """Remove a person's signature from a petition (a clean-up gone wrong)."""
        with self._lock:
            person = self._find_person(email)
            key = (petition_uuid, person.uuid if person else "")
            if key not in self._signatures:
                raise KeyError((email, petition_uuid))
            del self._signatures[key]
            self._petitions[petition_uuid].signature_count -= 1

    def delete_attendance(self, email: str, event_uuid: str) -> None:
        """Remove a person's attendance on an event (an admin's clean-up; AN's API cannot)."""
        with self._lock:
            person = self._find_person(email)
            key = (event_uuid, person.uuid if person else "")
            if key not in self._attendances:
                raise KeyError((email, event_uuid))
            for identifier in self._attendances.pop(key).identifiers:
                self._identifier_owner.pop(identifier, None)

    def set_status(self, email: str, status: str) -> None:
        """Force a person's email status (an import, an admin, another tool)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}")
        with self._lock:
            person = self._find_person(email)
            if person is None:
                raise KeyError(email)
            person.status = status
            self._record(person, "admin")

    def add_tag(self, name: str) -> str:
        """Create a tag (or find it, case-insensitively); returns its uuid."""
        with self._lock:
            return self._ensure_tag(name)

    def person(self, email: str) -> dict[str, Any] | None:
        with self._lock:
            person = self._find_person(email)
            return None if person is None else self._person_view(person)

    def people(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._person_view(p) for p in self._people.values()]

    def history(self, email: str) -> list[dict[str, Any]]:
        """Snapshots of the person after each write that touched them, oldest first."""
        with self._lock:
            person = self._find_person(email)
            return [] if person is None else [dict(h, tags=set(h["tags"])) for h in person.history]

    def petitions(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "uuid": p.uuid,
                    "title": p.title,
                    "description": p.description,
                    "origin_system": p.origin_system,
                    "browser_url": p.browser_url,
                    "identifiers": list(p.identifiers),
                    "creator_uuid": p.creator_uuid,
                }
                for p in self._petitions.values()
            ]

    def add_petition(
        self,
        title: str,
        *,
        description: str | None = None,
        browser_url: str | None = None,
        origin_system: str | None = "Controlshift Petition",
        identifiers: Iterable[str] = (),
        signers: Iterable[str] = (),
    ) -> str:
        """A petition made before the test starts, as ControlShift's hosted integration makes
        them (its origin system, the CS title, the CS URL in ``description``, no csand
        identifier); ``signers`` (emails of people already added) have signed it. Its uuid."""
        with self._lock:
            ids = list(dict.fromkeys(identifiers))
            self._check_identifiers(ids, None)
            petition_uuid = self._new_id()
            petition = _Petition(
                uuid=petition_uuid, title=title, description=description,
                origin_system=origin_system,
                identifiers=[f"action_network:{petition_uuid}", *ids], creator_uuid=None,
                created=self._stamp(), browser_url=browser_url,
            )
            self._petitions[petition_uuid] = petition
            self._claim_identifiers(petition.identifiers, f"petitions/{petition_uuid}")
            for identifier in petition.identifiers:
                self._petition_by_identifier[identifier] = petition_uuid
            for email in signers:
                person = self._find_person(email)
                if person is None:
                    raise KeyError(email)
                self._sign(petition, person, None)
            return petition_uuid

    def delete_petition(self, uuid: str) -> None:
        """An AN admin deletes the petition, with its signatures (then 404 by uuid)."""
        with self._lock:
            petition = self._petitions.pop(uuid)
            for identifier in petition.identifiers:
                self._petition_by_identifier.pop(identifier, None)
                self._identifier_owner.pop(identifier, None)
            for key in [k for k in self._signatures if k[0] == uuid]:
                del self._signatures[key]

    def signatures(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "uuid": s.uuid,
                    "petition_uuid": s.petition_uuid,
                    "person_uuid": s.person_uuid,
                    "comments": s.comments,
                    "created": s.created.at,
                    "modified": s.modified.at,
                }
                for s in self._signatures.values()
            ]

    def add_custom_field(self, name: str, notes: str | None = None) -> None:
        """An AN admin creates a custom field (the only way to add one when locked)."""
        with self._lock:
            self._ensure_custom_field(name).notes = notes

    def custom_fields(self) -> list[dict[str, Any]]:
        """The custom field definitions, as ``GET /metadata/custom_fields`` lists them."""
        with self._lock:
            return [
                {"name": f.name, "numeric_id": f.numeric_id, "notes": f.notes}
                for f in self._custom_fields.values()
            ]

    def sms_history(self, email: str) -> list[dict[str, Any]]:
        """Every SMS status a person's numbers took, oldest first: ``{"action", "at", "number",
        "status", "previous"}`` (``previous`` is None when the number was added)."""
        with self._lock:
            person = self._find_person(email)
            return [] if person is None else [dict(h) for h in person.sms_history]

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._event_view(e) for e in self._events.values()]

    def event_campaigns(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "uuid": c.uuid,
                    "identifiers": list(c.identifiers),
                    **json.loads(json.dumps(c.fields)),
                    "total_events": self._campaign_totals(c)[0],
                    "total_rsvps": self._campaign_totals(c)[1],
                    "created": c.created.at,
                    "modified": c.modified.at,
                }
                for c in self._campaigns.values()
            ]

    def attendances(self, event_uuid: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "uuid": a.uuid,
                    "event_uuid": a.event_uuid,
                    "person_uuid": a.person_uuid,
                    "identifiers": list(a.identifiers),
                    "status": a.status,
                    "created": a.created.at,
                    "modified": a.modified.at,
                }
                for a in self._attendances.values()
                if event_uuid is None or a.event_uuid == event_uuid
            ]

    def duplicates(self) -> dict[str, int]:
        """Resources that share an identifier, and attendances beyond one per person per event
        (all zero by construction; oracles report them alongside their own counts)."""
        with self._lock:

            def extra(identifier_lists: Iterable[list[str]]) -> int:
                flat = [i for ids in identifier_lists for i in ids]
                return len(flat) - len(set(flat))

            pairs = [(a.event_uuid, a.person_uuid) for a in self._attendances.values()]
            return {
                "events": extra(e.identifiers for e in self._events.values()),
                "event_campaigns": extra(c.identifiers for c in self._campaigns.values()),
                "attendances": len(pairs) - len(set(pairs)),
            }

    def quirks(self) -> dict[str, int]:
        """Writes the service accepted but (partly) ignored, since the last stats reset:
        ``event_status_ignored``, ``attendance_status_ignored``, ``custom_fields_dropped``,
        ``phone_numbers_dropped``, ``helper_failures`` (``200 {}`` answers not injected)."""
        with self._lock:
            return dict(self._quirks)

    def tag_names(self) -> set[str]:
        with self._lock:
            return {t.name for t in self._tags.values()}

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset; ``requests`` and ``by_route`` include 429s."""
        with self._lock:
            return {
                "requests": self._requests,
                "by_route": dict(self._by_route),
                "rate_limited": self._rate_limited,
                "forbidden": self._forbidden,
                "faults": dict(self._fault_counts),
                "duplicate_identifier_posts": self._duplicate_identifier_posts,
                "request_times": list(self._request_times),
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._reset_stats()

    # ----------------------------------------------------------------- gate

    def _reset_stats(self) -> None:
        self._requests = 0
        self._by_route: Counter[str] = Counter()
        self._rate_limited = 0
        self._forbidden = 0
        self._fault_counts: Counter[str] = Counter()
        self._duplicate_identifier_posts = 0
        self._request_times: list[float] = []
        self._quirks: Counter[str] = Counter()

    def _route_key(self, scope: Scope) -> str:
        """``"POST /petitions/{uuid}/signatures"``-style key; the raw path for unknown routes."""
        method = scope["method"]
        for route in self._routes:
            if route.matches(scope)[0] is not Match.NONE:
                return f"{method} {route.path.removeprefix(PREFIX) or '/'}"
        return f"{method} {scope['path'].removeprefix(PREFIX)}"

    def _admit(self, scope: Scope) -> _Verdict:
        """Authenticate, rate-limit and roll the faults for one request, in that order."""
        key = self._route_key(scope)
        token = Headers(scope=scope).get("osdi-api-token")
        with self._lock:
            if token != self.api_key:
                if key == ENTRY_POINT:
                    return _Verdict()
                self._forbidden += 1
                return _Verdict(answer=_error(403, "API Key invalid or not present"))
            self._requests += 1
            self._by_route[key] += 1
            now = self._clock()
            if self.requests_per_second is not None:
                capacity = self.requests_per_second if self.burst is None else self.burst
                bucket = self._buckets.setdefault(self.api_key, _Bucket(capacity, now))
                if not bucket.take(now, self.requests_per_second, capacity):
                    self._rate_limited += 1
                    headers = {"Retry-After": "1"} if self.send_retry_after else None
                    return _Verdict(
                        answer=_error(429, "You have exceeded your rate limit", headers)
                    )
            self._request_times.append(now)
            return self._roll_faults(scope["method"], key)

    def _hit(self, rate: float, kind: str) -> bool:
        hit = rate > 0 and self._fault_rng.random() < rate
        if hit:
            self._fault_counts[kind] += 1
        return hit

    def _roll_faults(self, method: str, key: str) -> _Verdict:
        f = self.faults
        if self._hit(f.drop_rate, "drop"):
            return _Verdict(drop=True)
        slow = not f.slow_routes or key in f.slow_routes
        delay = f.slow_seconds if slow and self._hit(f.slow_rate, "slow") else 0.0
        if self._hit(f.error_rate, "error"):
            return _Verdict(answer=self._fault_page(), delay=delay)
        if key in (SIGNUP, SIGNATURE, ATTENDANCE) and self._hit(f.empty_200_rate, "empty_200"):
            return _Verdict(answer=HalResponse({}), delay=delay)
        writes = method in ("POST", "PUT")
        commit_fails = writes and self._hit(f.fail_after_commit_rate, "fail_after_commit")
        return _Verdict(delay=delay, fail_after_commit=commit_fails)

    def _fault_page(self) -> Response:
        status = self._fault_rng.choice(sorted(_FAULT_STATUSES))
        text = f"{status} {_FAULT_STATUSES[status]}"
        if self._fault_rng.random() < 0.5:
            html = f"<html><head><title>{text}</title></head><body><h1>{text}</h1></body></html>"
            return Response(html, status_code=status, media_type="text/html")
        return _error(status, _FAULT_STATUSES[status])

    # ----------------------------------------------------------------- handlers

    async def _entry_point(self, request: Request) -> Response:
        base = _base(request)
        links: dict[str, Any] = {
            "self": {"href": f"{base}/"},
            "docs": {"href": "https://actionnetwork.org/docs", "title": "Documentation"},
        }
        if request.headers.get("osdi-api-token") == self.api_key:
            names = ["people", "petitions", "tags"]
            if self.events_api:
                names += ["events", "event_campaigns"]
            for name in names:
                links[f"osdi:{name}"] = {"href": f"{base}/{name}"}
        return HalResponse(
            {
                "motd": "Welcome to the Action Network OSDI API v2 Entry Point!",
                "vendor_name": "Action Network",
                "product_name": "Action Network",
                "osdi_version": "1.1.1",
                "max_page_size": PAGE_SIZE,
                "_links": links,
            }
        )

    async def _list_people(self, request: Request) -> Response:
        page = _page(request)
        wanted = request.query_params.get("filter")
        with self._lock:
            if wanted is None:
                people = list(self._people.values())
            else:
                found = self._find_person(_filter_value(wanted, "email_address"))
                people = [] if found is None else [found]
            base = _base(request)
            return HalResponse(
                _collection(
                    request,
                    "people",
                    people,
                    page,
                    lambda p: self._person_json(p, base),
                    totals=False,
                )
            )

    async def _get_person(self, request: Request) -> Response:
        with self._lock:
            return HalResponse(self._person_json(self._known_person(request), _base(request)))

    async def _signup_helper(self, request: Request) -> Response:
        """Person Signup Helper: upsert by email; new default subscribed, existing status forced."""
        body = await _json_body(request)
        person_in = _parse_person(body.get("person"))
        if person_in.status is not None and person_in.status not in STATUSES:
            raise ApiError(400, f"Invalid email status: {person_in.status!r}")
        add, remove = _names(body, "add_tags"), _names(body, "remove_tags")
        with self._lock:
            person = self._upsert(
                person_in, person_in.status or "subscribed", person_in.status, SIGNUP
            )
            self._apply_tags(person, add, remove)
            self._record(person, SIGNUP)
            return HalResponse(self._person_json(person, _base(request)))

    async def _put_person(self, request: Request) -> Response:
        body = await _json_body(request)
        fields = _person_fields(body)
        custom_fields = _custom_fields(body)
        phones = _phones(body)
        emails = body.get("email_addresses")
        address: str | None = None
        status: str | None = None
        if emails is not None:
            first = _first_object(emails, "email_addresses")
            if first.get("address") is not None:
                address = _valid_email(first["address"])
            status = first.get("status")
            if status is not None and status not in STATUSES:
                raise ApiError(400, f"Invalid email status: {status!r}")
        with self._lock:
            person = self._known_person(request)
            if address is not None and _email_key(address) != _email_key(person.email):
                if self._find_person(address) is not None:
                    raise ApiError(400, "Email address already in use by another person")
                del self._person_by_email[_email_key(person.email)]
                self._person_by_email[_email_key(address)] = person.uuid
                person.email = address
            if status is not None:
                person.status = status
            for name, value in fields.items():
                setattr(person, name, value)
            self._apply_custom_fields(person, custom_fields)
            self._apply_phones(person, phones, "PUT /people/{uuid}")
            self._record(person, "PUT /people/{uuid}")
            return HalResponse(self._person_json(person, _base(request)))

    async def _list_petitions(self, request: Request) -> Response:
        page = _page(request)
        wanted = request.query_params.get("filter")
        with self._lock:
            if wanted is None:
                petitions = list(self._petitions.values())
            else:
                petitions = self._filter_petitions(wanted)
            base = _base(request)
            return HalResponse(
                _collection(
                    request,
                    "petitions",
                    petitions,
                    page,
                    lambda p: self._petition_json(p, base),
                    totals=True,
                )
            )

    def _filter_petitions(self, wanted: str) -> list[_Petition]:
        """AN's OData filter on petitions: ``identifier``, ``title`` or ``origin_system``
        ``eq '<value>'`` (exact, case-sensitive); anything else is refused (400)."""
        field_name = wanted.strip().split(" ", 1)[0]
        if field_name not in ("identifier", "title", "origin_system"):
            raise ApiError(400, f"Unsupported filter: {wanted!r}")
        value = _filter_value(wanted, field_name)
        if field_name == "identifier":
            found = self._petition_by_identifier.get(value)
            return [] if found is None else [self._petitions[found]]
        return [p for p in self._petitions.values() if getattr(p, field_name) == value]

    async def _put_petition(self, request: Request) -> Response:
        """Update a petition: title, description, browser_url; identifiers sent are appended
        (never removed; refused with 400 when another resource holds one)."""
        body = await _json_body(request)
        identifiers = _identifiers(body)
        with self._lock:
            petition = self._known_petition(request)
            owner = f"petitions/{petition.uuid}"
            self._check_identifiers(identifiers, owner)
            for name in ("title", "description", "browser_url"):
                value = _optional_text(body, name)
                if value is not None:
                    setattr(petition, name, value)
            petition.identifiers = list(dict.fromkeys([*petition.identifiers, *identifiers]))
            self._claim_identifiers(petition.identifiers, owner)
            for identifier in petition.identifiers:
                self._petition_by_identifier[identifier] = petition.uuid
            return HalResponse(self._petition_json(petition, _base(request)))

    async def _get_petition(self, request: Request) -> Response:
        with self._lock:
            return HalResponse(self._petition_json(self._known_petition(request), _base(request)))

    async def _post_petition(self, request: Request) -> Response:
        """Create a petition; identifiers are unique across all of AN, so reusing one is refused."""
        body = await _json_body(request)
        title = body.get("title")
        if not isinstance(title, str) or not title.strip():
            raise ApiError(400, "Title is required")
        description = _optional_text(body, "description")
        origin_system = _optional_text(body, "origin_system")
        identifiers = _identifiers(body)
        creator_href = _link(body, "osdi:creator")
        with self._lock:
            self._check_identifiers(identifiers, None)
            creator = None
            if creator_href is not None:
                creator = self._people.get(_uuid_from_href(creator_href, "people"))
                if creator is None:
                    raise ApiError(400, "osdi:creator is not a known person")
            petition_uuid = self._new_id()
            petition = _Petition(
                uuid=petition_uuid,
                title=title,
                description=description,
                origin_system=origin_system,
                identifiers=[f"action_network:{petition_uuid}", *dict.fromkeys(identifiers)],
                creator_uuid=None if creator is None else creator.uuid,
                created=self._stamp(),
            )
            self._petitions[petition_uuid] = petition
            self._claim_identifiers(petition.identifiers, f"petitions/{petition_uuid}")
            for identifier in petition.identifiers:
                self._petition_by_identifier[identifier] = petition_uuid
            return HalResponse(self._petition_json(petition, _base(request)))

    async def _signature_helper(self, request: Request) -> Response:
        """Record Signature Helper: new people are always subscribed; only "subscribed" is valid."""
        body = await _json_body(request)
        add = _names(body, "add_tags")
        comments = _optional_text(body, "comments")
        signer: _PersonInput | str  # the person's fields, or the uuid of a known person
        if "person" in body:
            signer = _parse_person(body["person"])
            if signer.status is not None and signer.status != "subscribed":
                raise ApiError(400, f"Invalid email status for a signature: {signer.status!r}")
        else:
            href = _link(body, "osdi:person")
            if href is None:
                raise ApiError(400, "A person or an osdi:person link is required")
            signer = _uuid_from_href(href, "people")
        with self._lock:
            petition = self._known_petition(request)
            if isinstance(signer, str):
                found = self._people.get(signer)
                if found is None:
                    raise ApiError(404, "Person not found")
                person = found
            else:
                person = self._upsert(signer, "subscribed", signer.status, SIGNATURE)
            self._apply_tags(person, add, [])
            signature = self._sign(petition, person, comments)
            self._record(person, SIGNATURE, petition_uuid=petition.uuid)
            return HalResponse(self._signature_json(signature, _base(request)))

    async def _list_petition_signatures(self, request: Request) -> Response:
        page = _page(request)
        with self._lock:
            petition = self._known_petition(request)
            items = [g for g in self._signatures.values() if g.petition_uuid == petition.uuid]
            base = _base(request)
            return HalResponse(_collection(
                request, "signatures", items, page, lambda g: self._signature_json(g, base),
                totals=True, path=f"petitions/{petition.uuid}/signatures"))

    async def _list_person_signatures(self, request: Request) -> Response:
        page = _page(request)
        with self._lock:
            person = self._known_person(request)
            items = [g for g in self._signatures.values() if g.person_uuid == person.uuid]
            base = _base(request)
            return HalResponse(_collection(
                request, "signatures", items, page, lambda g: self._signature_json(g, base),
                totals=True, path=f"people/{person.uuid}/signatures"))

    async def _list_person_taggings(self, request: Request) -> Response:
        page = _page(request)
        with self._lock:
            person = self._known_person(request)
            items = list(person.taggings.items())
            base = _base(request)
            return HalResponse(_collection(
                request, "taggings", items, page,
                lambda pair: self._tagging_json(self._tags[pair[0]], person, pair[1], base),
                totals=True, path=f"people/{person.uuid}/taggings"))

    async def _list_tag_taggings(self, request: Request) -> Response:
        page = _page(request)
        with self._lock:
            tag = self._tags.get(request.path_params["uuid"])
            if tag is None:
                raise ApiError(404, "Tag not found")
            items = [p for p in self._people.values() if tag.uuid in p.taggings]
            base = _base(request)
            return HalResponse(_collection(
                request, "taggings", items, page,
                lambda p: self._tagging_json(tag, p, p.taggings[tag.uuid], base),
                totals=True, path=f"tags/{tag.uuid}/taggings"))

    async def _list_tags(self, request: Request) -> Response:
        page = _page(request)  # AN has no filter on tags: any filter parameter is ignored
        with self._lock:
            base = _base(request)
            tags = list(self._tags.values())
            return HalResponse(
                _collection(
                    request, "tags", tags, page, lambda t: self._tag_json(t, base), totals=True
                )
            )

    async def _post_tag(self, request: Request) -> Response:
        body = await _json_body(request)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "Tag name is required")
        with self._lock:
            if name.lower() in self._tag_by_name and self.repost_tag == "error":
                raise ApiError(400, "A tag with this name already exists")
            tag = self._tags[self._ensure_tag(name)]
            return HalResponse(self._tag_json(tag, _base(request)))

    async def _post_tagging(self, request: Request) -> Response:
        body = await _json_body(request)
        href = _link(body, "osdi:person")
        if href is None:
            raise ApiError(400, "An osdi:person link is required")
        with self._lock:
            tag = self._tags.get(request.path_params["uuid"])
            if tag is None:
                raise ApiError(404, "Tag not found")
            person = self._people.get(_uuid_from_href(href, "people"))
            if person is None:
                raise ApiError(404, "Person not found")
            tagging = self._tag_person(person, tag)
            self._record(person, "POST /tags/{uuid}/taggings")
            return HalResponse(self._tagging_json(tag, person, tagging, _base(request)))

    # ----------------------------------------------------------------- events

    async def _list_events(self, request: Request) -> Response:
        with self._lock:
            return self._events_page(request, list(self._events.values()))

    async def _list_campaign_events(self, request: Request) -> Response:
        with self._lock:
            campaign = self._known_campaign(request)
            events = [e for e in self._events.values() if e.campaign_uuid == campaign.uuid]
            path = f"event_campaigns/{campaign.uuid}/events"
            return self._events_page(request, events, path)

    def _events_page(
        self, request: Request, events: list[_Event], path: str | None = None
    ) -> Response:
        page = _page(request)
        wanted = request.query_params.get("filter")
        if wanted is not None:
            identifier = _filter_value(wanted, "identifier")
            events = [e for e in events if identifier in e.identifiers]
        base = _base(request)
        return HalResponse(
            _collection(
                request,
                "events",
                events,
                page,
                lambda e: self._event_json(e, base),
                totals=True,
                path=path,
            )
        )

    async def _get_event(self, request: Request) -> Response:
        with self._lock:
            return HalResponse(self._event_json(self._known_event(request), _base(request)))

    async def _post_event(self, request: Request) -> Response:
        return await self._create_event(request, None)

    async def _post_campaign_event(self, request: Request) -> Response:
        with self._lock:
            campaign_uuid = self._known_campaign(request).uuid
        return await self._create_event(request, campaign_uuid)

    async def _create_event(self, request: Request, campaign_uuid: str | None) -> Response:
        """Events are deduplicated on identifiers only; a status sent is ignored."""
        body = await _json_body(request)
        fields, status = _event_fields(body, creating=True)
        identifiers = _identifiers(body)
        creator_href = _link(body, "osdi:creator")
        organizer_href = _link(body, "osdi:organizer")
        with self._lock:
            if campaign_uuid is not None and campaign_uuid not in self._campaigns:
                raise ApiError(404, "Event campaign not found")
            self._check_identifiers(identifiers, None)
            creator = self._linked_person(creator_href, "osdi:creator")
            organizer = self._linked_person(organizer_href, "osdi:organizer")
            event_uuid = self._new_id()
            stamp = self._stamp()
            event = _Event(
                uuid=event_uuid,
                identifiers=[f"action_network:{event_uuid}", *identifiers],
                campaign_uuid=campaign_uuid,
                creator_uuid=creator,
                organizer_uuid=organizer,
                created=stamp,
                modified=stamp,
                fields={"visibility": "public", **fields},
            )
            if status is not None and status != event.status:
                self._quirks["event_status_ignored"] += 1
            self._events[event_uuid] = event
            self._claim_identifiers(event.identifiers, f"events/{event_uuid}")
            if campaign_uuid is not None:
                self._campaigns[campaign_uuid].modified = stamp
            return HalResponse(self._event_json(event, _base(request)))

    async def _put_event(self, request: Request) -> Response:
        """Update the event's own fields; identifiers, links, campaign and status are ignored."""
        body = await _json_body(request)
        fields, status = _event_fields(body, creating=False)
        with self._lock:
            event = self._known_event(request)
            merged = {**event.fields, **fields}
            _check_dates(merged.get("start_date"), merged.get("end_date"))
            event.fields = merged
            if status is not None and status != event.status:
                self._quirks["event_status_ignored"] += 1
            event.modified = self._stamp()
            return HalResponse(self._event_json(event, _base(request)))

    # ----------------------------------------------------------------- event campaigns

    async def _list_campaigns(self, request: Request) -> Response:
        page = _page(request)
        wanted = request.query_params.get("filter")
        with self._lock:
            campaigns = list(self._campaigns.values())
            if wanted is not None:
                identifier = _filter_value(wanted, "identifier")
                campaigns = [c for c in campaigns if identifier in c.identifiers]
            base = _base(request)
            return HalResponse(
                _collection(
                    request,
                    "event_campaigns",
                    campaigns,
                    page,
                    lambda c: self._campaign_json(c, base),
                    totals=True,
                )
            )

    async def _get_campaign(self, request: Request) -> Response:
        with self._lock:
            return HalResponse(self._campaign_json(self._known_campaign(request), _base(request)))

    async def _post_campaign(self, request: Request) -> Response:
        body = await _json_body(request)
        fields = _campaign_fields(body, creating=True)
        identifiers = _identifiers(body)
        with self._lock:
            self._check_identifiers(identifiers, None)
            campaign_uuid = self._new_id()
            stamp = self._stamp()
            campaign = _EventCampaign(
                campaign_uuid,
                [f"action_network:{campaign_uuid}", *identifiers],
                stamp,
                stamp,
                fields,
            )
            self._campaigns[campaign_uuid] = campaign
            self._claim_identifiers(campaign.identifiers, f"event_campaigns/{campaign_uuid}")
            return HalResponse(self._campaign_json(campaign, _base(request)))

    async def _put_campaign(self, request: Request) -> Response:
        body = await _json_body(request)
        fields = _campaign_fields(body, creating=False)
        with self._lock:
            campaign = self._known_campaign(request)
            campaign.fields = {**campaign.fields, **fields}
            campaign.modified = self._stamp()
            return HalResponse(self._campaign_json(campaign, _base(request)))

    # ----------------------------------------------------------------- attendances

    async def _list_attendances(self, request: Request) -> Response:
        page = _page(request)
        with self._lock:
            event = self._known_event(request)
            items = [a for a in self._attendances.values() if a.event_uuid == event.uuid]
            base = _base(request)
            return HalResponse(
                _collection(
                    request,
                    "attendances",
                    items,
                    page,
                    lambda a: self._attendance_json(a, base),
                    totals=True,
                    path=f"events/{event.uuid}/attendances",
                )
            )

    async def _list_person_attendances(self, request: Request) -> Response:
        page = _page(request)
        with self._lock:
            person = self._known_person(request)
            items = [a for a in self._attendances.values() if a.person_uuid == person.uuid]
            base = _base(request)
            return HalResponse(_collection(
                request, "attendances", items, page, lambda a: self._attendance_json(a, base),
                totals=True, path=f"people/{person.uuid}/attendances"))

    async def _get_attendance(self, request: Request) -> Response:
        with self._lock:
            attendance = self._known_attendance(request)
            return HalResponse(self._attendance_json(attendance, _base(request)))

    async def _put_attendance(self, request: Request) -> Response:
        """Only new identifiers stick; the status stays ``accepted``."""
        body = await _json_body(request)
        identifiers = _identifiers(body)
        with self._lock:
            attendance = self._known_attendance(request)
            owner = f"attendances/{attendance.uuid}"
            self._check_identifiers(identifiers, owner)
            self._note_attendance_status(body.get("status"))
            attendance.identifiers = list(dict.fromkeys([*attendance.identifiers, *identifiers]))
            self._claim_identifiers(attendance.identifiers, owner)
            attendance.modified = self._stamp()
            return HalResponse(self._attendance_json(attendance, _base(request)))

    async def _attendance_helper(self, request: Request) -> Response:
        """Record Attendance Helper: like the signature helper (new people subscribed, only
        "subscribed" accepted, unknown tags ignored), one attendance per person and event, and
        any failure of the body answered ``200 {}`` with nothing written."""
        body = await _json_body(request)
        with self._lock:
            event = self._known_event(request)
        try:
            add, remove = _names(body, "add_tags"), _names(body, "remove_tags")
            identifiers = _identifiers(body)
            attendee: _PersonInput | str  # the person's fields, or the uuid of a known person
            if "person" in body:
                attendee = _parse_person(body["person"])
                if attendee.status is not None and attendee.status != "subscribed":
                    raise ApiError(400, "Invalid email status for an attendance")
            else:
                href = _link(body, "osdi:person")
                if href is None:
                    raise ApiError(400, "A person or an osdi:person link is required")
                attendee = _uuid_from_href(href, "people")
        except ApiError:
            with self._lock:
                self._quirks["helper_failures"] += 1
            return HalResponse({})
        with self._lock:
            if event.uuid not in self._events:  # gone while the body was parsed: cannot happen
                raise ApiError(404, "Event not found")
            person: _Person | None
            if isinstance(attendee, str):
                person = self._people.get(attendee)
            else:
                person = self._match(attendee)
            existing = None if person is None else self._attendances.get((event.uuid, person.uuid))
            owner = None if existing is None else f"attendances/{existing.uuid}"
            try:
                if person is None and isinstance(attendee, str):
                    raise ApiError(404, "Person not found")
                self._check_identifiers(identifiers, owner)
            except ApiError:
                self._quirks["helper_failures"] += 1
                return HalResponse({})
            if not isinstance(attendee, str):
                person = self._upsert(attendee, "subscribed", attendee.status, ATTENDANCE)
            assert person is not None
            self._apply_tags(person, add, remove)
            self._note_attendance_status(body.get("status"))
            attendance = self._attend(event, person, identifiers)
            self._record(person, ATTENDANCE, event_uuid=event.uuid)
            return HalResponse(self._attendance_json(attendance, _base(request)))

    def _note_attendance_status(self, status: Any) -> None:
        if status is not None and status != "accepted":
            self._quirks["attendance_status_ignored"] += 1

    def _attend(self, event: _Event, person: _Person, identifiers: list[str]) -> _Attendance:
        """One attendance per person and event: attending again only refreshes it."""
        stamp = self._stamp()
        attendance = self._attendances.get((event.uuid, person.uuid))
        if attendance is None:
            attendance_uuid = self._new_id()
            attendance = _Attendance(
                attendance_uuid,
                event.uuid,
                person.uuid,
                [f"action_network:{attendance_uuid}", *identifiers],
                stamp,
                stamp,
            )
            self._attendances[(event.uuid, person.uuid)] = attendance
        else:
            attendance.identifiers = list(dict.fromkeys([*attendance.identifiers, *identifiers]))
            attendance.modified = stamp
        self._claim_identifiers(attendance.identifiers, f"attendances/{attendance.uuid}")
        return attendance

    # ----------------------------------------------------------------- custom fields

    async def _list_custom_fields(self, request: Request) -> Response:
        with self._lock:
            base = _base(request)
            return HalResponse(
                {
                    "action_network:custom_fields": [
                        {
                            "name": f.name,
                            "created_date": f.created.iso,
                            "modified_date": f.created.iso,
                            "notes": f.notes,
                            "numeric_id": f.numeric_id,
                        }
                        for f in self._custom_fields.values()
                    ],
                    "_links": {"self": {"href": f"{base}/metadata/custom_fields"}},
                }
            )

    # ----------------------------------------------------------------- state (lock held)

    def _new_id(self) -> str:
        return str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4))

    def _stamp(self) -> _Stamp:
        return _Stamp(self._clock(), datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def _find_person(self, email: str) -> _Person | None:
        found = self._person_by_email.get(_email_key(email))
        return None if found is None else self._people[found]

    def _known_person(self, request: Request) -> _Person:
        person = self._people.get(request.path_params["uuid"])
        if person is None:
            raise ApiError(404, "Person not found")
        return person

    def _known_event(self, request: Request) -> _Event:
        event = self._events.get(request.path_params["uuid"])
        if event is None:
            raise ApiError(404, "Event not found")
        return event

    def _known_campaign(self, request: Request) -> _EventCampaign:
        campaign = self._campaigns.get(request.path_params["uuid"])
        if campaign is None:
            raise ApiError(404, "Event campaign not found")
        return campaign

    def _known_attendance(self, request: Request) -> _Attendance:
        event = self._known_event(request)
        wanted = request.path_params["attendance"]
        for attendance in self._attendances.values():
            if attendance.uuid == wanted and attendance.event_uuid == event.uuid:
                return attendance
        raise ApiError(404, "Attendance not found")

    def _linked_person(self, href: str | None, rel: str) -> str | None:
        if href is None:
            return None
        person = self._people.get(_uuid_from_href(href, "people"))
        if person is None:
            raise ApiError(400, f"{rel} is not a known person")
        return person.uuid

    def _campaign_totals(self, campaign: _EventCampaign) -> tuple[int, int]:
        events = {e.uuid for e in self._events.values() if e.campaign_uuid == campaign.uuid}
        rsvps = sum(1 for a in self._attendances.values() if a.event_uuid in events)
        return len(events), rsvps

    def _total_accepted(self, event: _Event) -> int:
        return sum(1 for a in self._attendances.values() if a.event_uuid == event.uuid)

    def _known_petition(self, request: Request) -> _Petition:
        petition = self._petitions.get(request.path_params["uuid"])
        if petition is None:
            raise ApiError(404, "Petition not found")
        return petition

    def _create_person(self, email: str, status: str, created_by: str) -> _Person:
        stamp = self._stamp()
        person = _Person(self._new_id(), email, status, created_by, stamp, stamp)
        self._people[person.uuid] = person
        self._person_by_email[_email_key(email)] = person.uuid
        return person

    def _upsert(
        self,
        person_in: _PersonInput,
        status_if_new: str,
        status_if_existing: str | None,
        action: str,
    ) -> _Person:
        """Create or update by email, else by phone; an existing person's status changes only
        if one is given. A person matched by phone keeps their email address."""
        person = self._match(person_in)
        if person is None:
            person = self._create_person(person_in.email, status_if_new, "api")
        elif status_if_existing is not None:
            person.status = status_if_existing
        for name, value in person_in.fields.items():
            setattr(person, name, value)
        self._apply_custom_fields(person, person_in.custom_fields)
        self._apply_phones(person, person_in.phones, action)
        return person

    def _match(self, person_in: _PersonInput) -> _Person | None:
        """The person a helper writes to: by email, else by one of the phone numbers."""
        person = self._find_person(person_in.email)
        if person is None:
            owners = [self._phone_owner.get(_phone_key(p.number)) for p in person_in.phones]
            person = next((self._people[o] for o in owners if o is not None), None)
        return person

    def _ensure_custom_field(self, name: str) -> _CustomField:
        found = self._custom_fields.get(name)
        if found is None:
            number = len(self._custom_fields) + 1
            found = self._custom_fields[name] = _CustomField(name, number, None, self._stamp())
        return found

    def _apply_custom_fields(self, person: _Person, values: dict[str, str]) -> None:
        """One string per key, new data overwrites; a locked network drops unknown keys."""
        for name, value in values.items():
            if name not in self._custom_fields:
                if self.custom_fields_locked:
                    self._quirks["custom_fields_dropped"] += 1
                    continue
                self._ensure_custom_field(name)
            person.custom_fields[name] = value

    def _apply_phones(self, person: _Person, phones: Iterable[_PhoneInput], action: str) -> None:
        """A new number is ``unsubscribed`` unless a status is sent; a known number's status
        changes only when one is sent; someone else's number is dropped."""
        for phone in phones:
            key = _phone_key(phone.number)
            owner = self._phone_owner.get(key)
            if owner is not None and owner != person.uuid:
                self._quirks["phone_numbers_dropped"] += 1
                continue
            known = next((p for p in person.phones if _phone_key(p.number) == key), None)
            if known is None:
                status = phone.status or "unsubscribed"
                person.phones.append(_Phone(phone.number, phone.number_type, status))
                self._phone_owner[key] = person.uuid
                previous = None
            elif phone.status is not None and phone.status != known.status:
                previous, known.status = known.status, phone.status
                status = phone.status
            else:
                continue
            person.sms_history.append(
                {
                    "action": action,
                    "at": self._clock(),
                    "number": phone.number,
                    "status": status,
                    "previous": previous,
                }
            )

    def _check_identifiers(self, identifiers: Iterable[str], owner: str | None) -> None:
        """Refuse identifiers some other resource holds (they are unique across all of AN)."""
        if any(self._identifier_owner.get(i, owner) != owner for i in identifiers):
            self._duplicate_identifier_posts += 1
            raise ApiError(400, "identifier already in use")

    def _claim_identifiers(self, identifiers: Iterable[str], owner: str) -> None:
        for identifier in identifiers:
            self._identifier_owner[identifier] = owner

    def _ensure_tag(self, name: str) -> str:
        found = self._tag_by_name.get(name.lower())
        if found is not None:
            return found
        tag = _Tag(self._new_id(), name, self._stamp())
        self._tags[tag.uuid] = tag
        self._tag_by_name[name.lower()] = tag.uuid
        return tag.uuid

    def _tag_person(self, person: _Person, tag: _Tag) -> _Tagging:
        tagging = person.taggings.get(tag.uuid)
        if tagging is None:
            tagging = person.taggings[tag.uuid] = _Tagging(self._new_id(), self._stamp())
        return tagging

    def _apply_tags(self, person: _Person, add: list[str], remove: list[str]) -> None:
        """Names that are not existing tags are ignored, as AN does."""
        for name in add:
            if (tag_uuid := self._tag_by_name.get(name.lower())) is not None:
                self._tag_person(person, self._tags[tag_uuid])
        for name in remove:
            if (tag_uuid := self._tag_by_name.get(name.lower())) is not None:
                person.taggings.pop(tag_uuid, None)

    def _sign(self, petition: _Petition, person: _Person, comments: str | None) -> _Signature:
        """One signature per person and petition: signing again only refreshes it."""
        stamp = self._stamp()
        signature = self._signatures.get((petition.uuid, person.uuid))
        if signature is None:
            signature = _Signature(
                self._new_id(), petition.uuid, person.uuid, comments, stamp, stamp
            )
            self._signatures[(petition.uuid, person.uuid)] = signature
            petition.signature_count += 1
        else:
            signature.modified = stamp
            if comments is not None:
                signature.comments = comments
        return signature

    def _record(self, person: _Person, action: str, **extra: Any) -> None:
        person.modified = self._stamp()
        view = self._person_view(person)
        del view["uuid"], view["created_by"]
        person.history.append({"action": action, "at": person.modified.at, **view, **extra})

    # ----------------------------------------------------------------- rendering (lock held)

    def _person_view(self, person: _Person) -> dict[str, Any]:
        """``custom_fields`` and ``phone_numbers`` appear only once the person has some."""
        view: dict[str, Any] = {
            "uuid": person.uuid,
            "email": person.email,
            "status": person.status,
            "given_name": person.given_name,
            "family_name": person.family_name,
            "postal_code": person.postal_code,
            "tags": {self._tags[t].name for t in person.taggings},
            "created_by": person.created_by,
        }
        if person.custom_fields:
            view["custom_fields"] = dict(person.custom_fields)
        if person.phones:
            view["phone_numbers"] = [_phone_json(p) for p in person.phones]
        return view

    def _person_json(self, person: _Person, base: str) -> dict[str, Any]:
        href = f"{base}/people/{person.uuid}"
        doc: dict[str, Any] = {
            "identifiers": [f"action_network:{person.uuid}"],
            "created_date": person.created.iso,
            "modified_date": person.modified.iso,
        }
        for name in ("given_name", "family_name"):
            if getattr(person, name) is not None:
                doc[name] = getattr(person, name)
        doc["email_addresses"] = [
            {"primary": True, "address": person.email, "status": person.status}
        ]
        if person.postal_code is not None:
            doc["postal_addresses"] = [{"primary": True, "postal_code": person.postal_code}]
        if person.phones:
            doc["phone_numbers"] = [
                {"primary": i == 0, **_phone_json(p)} for i, p in enumerate(person.phones)
            ]
        doc["custom_fields"] = dict(person.custom_fields)
        doc["_links"] = {
            "self": {"href": href},
            "osdi:signatures": {"href": f"{href}/signatures"},
            "osdi:taggings": {"href": f"{href}/taggings"},
        }
        return doc

    def _petition_json(self, petition: _Petition, base: str) -> dict[str, Any]:
        href = f"{base}/petitions/{petition.uuid}"
        links: dict[str, Any] = {
            "self": {"href": href},
            "osdi:signatures": {"href": f"{href}/signatures"},
            "osdi:record_signature_helper": {"href": f"{href}/signatures"},
        }
        if petition.creator_uuid is not None:
            links["osdi:creator"] = {"href": f"{base}/people/{petition.creator_uuid}"}
        return {
            "identifiers": list(petition.identifiers),
            "created_date": petition.created.iso,
            "modified_date": petition.created.iso,
            "title": petition.title,
            "description": petition.description,
            "origin_system": petition.origin_system,
            **({"browser_url": petition.browser_url} if petition.browser_url else {}),
            "total_signatures": petition.signature_count,
            "action_network:hidden": False,
            "_links": links,
        }

    def _signature_json(self, signature: _Signature, base: str) -> dict[str, Any]:
        petition_href = f"{base}/petitions/{signature.petition_uuid}"
        doc: dict[str, Any] = {
            "identifiers": [f"action_network:{signature.uuid}"],
            "created_date": signature.created.iso,
            "modified_date": signature.modified.iso,
            "action_network:person_id": signature.person_uuid,
            "action_network:petition_id": signature.petition_uuid,
            "_links": {
                "self": {"href": f"{petition_href}/signatures/{signature.uuid}"},
                "osdi:petition": {"href": petition_href},
                "osdi:person": {"href": f"{base}/people/{signature.person_uuid}"},
            },
        }
        if signature.comments is not None:
            doc["comments"] = signature.comments
        return doc

    def _event_view(self, event: _Event) -> dict[str, Any]:
        return {
            "uuid": event.uuid,
            "identifiers": list(event.identifiers),
            "campaign_uuid": event.campaign_uuid,
            "creator_uuid": event.creator_uuid,
            "organizer_uuid": event.organizer_uuid,
            "status": event.status,
            **{name: None for name in _EVENT_TEXT},
            "capacity": None,
            "location": None,
            **json.loads(json.dumps(event.fields)),
            "total_accepted": self._total_accepted(event),
            "created": event.created.at,
            "modified": event.modified.at,
        }

    def _event_json(self, event: _Event, base: str) -> dict[str, Any]:
        href = f"{base}/events/{event.uuid}"
        links: dict[str, Any] = {
            "self": {"href": href},
            "osdi:attendances": {"href": f"{href}/attendances"},
            "osdi:record_attendance_helper": {"href": f"{href}/attendances"},
        }
        if event.creator_uuid is not None:
            links["osdi:creator"] = {"href": f"{base}/people/{event.creator_uuid}"}
        if event.organizer_uuid is not None:
            links["osdi:organizer"] = {"href": f"{base}/people/{event.organizer_uuid}"}
        if event.campaign_uuid is not None:
            links["action_network:event_campaign"] = {
                "href": f"{base}/event_campaigns/{event.campaign_uuid}"
            }
        doc: dict[str, Any] = {
            "identifiers": list(event.identifiers),
            "created_date": event.created.iso,
            "modified_date": event.modified.iso,
        }
        doc |= {k: v for k, v in json.loads(json.dumps(event.fields)).items() if v is not None}
        doc |= {
            "status": event.status,
            "transparence": "opaque",
            "total_accepted": self._total_accepted(event),
            "action_network:hidden": False,
            "_links": links,
        }
        return doc

    def _campaign_json(self, campaign: _EventCampaign, base: str) -> dict[str, Any]:
        href = f"{base}/event_campaigns/{campaign.uuid}"
        total_events, total_rsvps = self._campaign_totals(campaign)
        doc: dict[str, Any] = {
            "identifiers": list(campaign.identifiers),
            "created_date": campaign.created.iso,
            "modified_date": campaign.modified.iso,
        }
        doc |= {k: v for k, v in campaign.fields.items() if v is not None}
        doc |= {
            "total_events": total_events,
            "total_rsvps": total_rsvps,
            "_links": {"self": {"href": href}, "osdi:events": {"href": f"{href}/events"}},
        }
        return doc

    def _attendance_json(self, attendance: _Attendance, base: str) -> dict[str, Any]:
        event_href = f"{base}/events/{attendance.event_uuid}"
        return {
            "identifiers": list(attendance.identifiers),
            "created_date": attendance.created.iso,
            "modified_date": attendance.modified.iso,
            "status": attendance.status,
            "action_network:person_id": attendance.person_uuid,
            "action_network:event_id": attendance.event_uuid,
            "_links": {
                "self": {"href": f"{event_href}/attendances/{attendance.uuid}"},
                "osdi:event": {"href": event_href},
                "osdi:person": {"href": f"{base}/people/{attendance.person_uuid}"},
            },
        }

    def _tag_json(self, tag: _Tag, base: str) -> dict[str, Any]:
        href = f"{base}/tags/{tag.uuid}"
        return {
            "identifiers": [f"action_network:{tag.uuid}"],
            "created_date": tag.created.iso,
            "modified_date": tag.created.iso,
            "name": tag.name,
            "_links": {"self": {"href": href}, "osdi:taggings": {"href": f"{href}/taggings"}},
        }

    def _tagging_json(
        self, tag: _Tag, person: _Person, tagging: _Tagging, base: str
    ) -> dict[str, Any]:
        tag_href = f"{base}/tags/{tag.uuid}"
        return {
            "identifiers": [f"action_network:{tagging.uuid}"],
            "created_date": tagging.created.iso,
            "modified_date": tagging.created.iso,
            "_links": {
                "self": {"href": f"{tag_href}/taggings/{tagging.uuid}"},
                "osdi:tag": {"href": tag_href},
                "osdi:person": {"href": f"{base}/people/{person.uuid}"},
            },
        }


class _Gate:
    """ASGI middleware applying the sim's verdict: auth, rate limit and injected faults."""

    def __init__(self, app: ASGIApp, admit: Callable[[Scope], _Verdict]) -> None:
        self.app = app
        self.admit = admit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        verdict = self.admit(scope)
        if verdict.drop:
            await _drop_connection(receive)
            return
        if verdict.delay:
            receive = await _buffered(receive)
            await anyio.sleep(verdict.delay)
        if verdict.answer is not None:
            await verdict.answer(scope, receive, send)
        elif verdict.fail_after_commit:
            await self.app(scope, receive, _discard)
            await _error(500, "Internal Server Error")(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def _discard(message: Message) -> None:
    """A ``send`` that throws the handler's answer away, once its write is done."""


async def _buffered(receive: Receive) -> Receive:
    """Read the body now, so a slow handler still works after the client has given up.

    That is how a real server behaves: a client that times out does not undo the write.
    """
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def _drop_connection(receive: Receive) -> None:
    """Close the TCP connection without a byte of answer, like a crashed load balancer.

    ASGI has no message for this, so reach the server's transport through its bound ``receive``
    (uvicorn keeps it as ``transport``), close it, and wait until the server sees the disconnect
    so it does not answer a 500 on our behalf.
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is None:
        raise ConnectionAbortedError("the server does not expose its transport: cannot drop")
    transport.close()
    while (await receive())["type"] != "http.disconnect":
        pass


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error(exc.status, exc.message)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: "Not found", 405: "Method not allowed"}
    return _error(exc.status_code, messages.get(exc.status_code, str(exc.detail)))


def _base(request: Request) -> str:
    """The API root as the client addressed it, so links are absolute like AN's."""
    return f"{request.url.scheme}://{request.url.netloc}{PREFIX}"


def _email_key(email: str) -> str:
    return email.strip().lower()


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise ApiError(400, "Invalid JSON") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "Expected a JSON object")
    return body


def _page(request: Request) -> int:
    raw = request.query_params.get("page", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ApiError(400, f"Invalid page: {raw!r}")
    return int(raw)


def _filter_value(expression: str, field_name: str) -> str:
    """The value of an OData-style ``<field> eq '<value>'`` (quotes doubled inside)."""
    match = re.fullmatch(rf"\s*{field_name}\s+eq\s+'((?:[^']|'')*)'\s*", expression)
    if match is None:
        raise ApiError(400, f"Unsupported filter: {expression!r}")
    return match.group(1).replace("''", "'")


def _collection(
    request: Request,
    name: str,
    items: list[Any],
    page: int,
    render: Callable[[Any], dict[str, Any]],
    *,
    totals: bool,
    path: str | None = None,
) -> dict[str, Any]:
    """One page of a list. People lists have no totals and always a ``next`` link (AN's quirk).

    ``path`` is the collection's path when it is not ``name`` (``events/{uuid}/attendances``)."""
    base = _base(request)
    query = {k: v for k, v in request.query_params.items() if k != "page"}

    def href(number: int) -> str:
        return f"{base}/{path or name}?{urlencode({**query, 'page': number}, quote_via=quote)}"

    total_pages = max(1, math.ceil(len(items) / PAGE_SIZE))
    links: dict[str, Any] = {"self": {"href": href(page)}}
    if not totals or page < total_pages:
        links["next"] = {"href": href(page + 1)}
    if page > 1:
        links["previous"] = {"href": href(page - 1)}
    start = (page - 1) * PAGE_SIZE
    doc: dict[str, Any] = {"page": page, "per_page": PAGE_SIZE}
    if totals:
        doc |= {"total_pages": total_pages, "total_records": len(items)}
    doc["_embedded"] = {f"osdi:{name}": [render(item) for item in items[start : start + PAGE_SIZE]]}
    doc["_links"] = links
    return doc


def _first_object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, list) or not value or not isinstance(value[0], dict):
        raise ApiError(400, f"{name} must be a non-empty list of objects")
    return value[0]


def _text(value: Any, name: str, limit: int) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string")
    if value is not None and len(value) > limit:
        raise ApiError(400, f"{name} is too long (maximum is {limit} characters)")
    return value


def _optional_text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string")
    return value


def _valid_email(value: Any) -> str:
    if not isinstance(value, str):
        raise ApiError(400, "An email address is required")
    address = value.strip()
    if len(address) > MAX_EMAIL:
        raise ApiError(400, f"Email address is too long (maximum is {MAX_EMAIL} characters)")
    if not _EMAIL.fullmatch(address):
        raise ApiError(400, "Email address is invalid")
    return address


def _person_fields(data: dict[str, Any]) -> dict[str, str | None]:
    """The name and postcode fields the request carries; a present ``null`` or ``""`` blanks."""
    fields: dict[str, str | None] = {}
    for name in ("given_name", "family_name"):
        if name in data:
            fields[name] = _text(data[name], name, MAX_NAME)
    postal = data.get("postal_addresses")
    if postal is not None and postal != []:
        first = _first_object(postal, "postal_addresses")
        if "postal_code" in first:
            fields["postal_code"] = _text(first["postal_code"], "postal_code", MAX_POSTAL_CODE)
    return fields


def _parse_person(data: Any) -> _PersonInput:
    if not isinstance(data, dict):
        raise ApiError(400, "A person object is required")
    first = _first_object(data.get("email_addresses"), "email_addresses")
    status = first.get("status")
    if status is not None and not isinstance(status, str):
        raise ApiError(400, "Email status must be a string")
    return _PersonInput(
        _valid_email(first.get("address")),
        status,
        _person_fields(data),
        _custom_fields(data),
        _phones(data),
    )


def _custom_fields(data: dict[str, Any]) -> dict[str, str]:
    value = data.get("custom_fields")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, "custom_fields must be an object")
    for name, text in value.items():
        if not name.strip():
            raise ApiError(400, "A custom field needs a name")
        if not isinstance(text, str):
            raise ApiError(400, f"Custom field {name!r} must be a string")
    return dict(value)


def _phones(data: dict[str, Any]) -> tuple[_PhoneInput, ...]:
    value = data.get("phone_numbers")
    if value is None or value == []:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, dict) for p in value):
        raise ApiError(400, "phone_numbers must be a list of objects")
    phones = []
    for phone in value:
        number = phone.get("number")
        if not isinstance(number, str) or not 7 <= len(_phone_key(number)) <= 15:
            raise ApiError(400, "Phone number is invalid")
        number_type = phone.get("number_type", "Mobile")
        if not isinstance(number_type, str):
            raise ApiError(400, "number_type must be a string")
        status = phone.get("status")
        if status is not None and status not in PHONE_STATUSES:
            raise ApiError(400, f"Invalid phone status: {status!r}")
        phones.append(_PhoneInput(number.strip(), number_type, status))
    return tuple(phones)


def _phone_key(number: str) -> str:
    """Numbers match on their digits: "+1 (555) 010-0000" is "15550100000"."""
    return re.sub(r"\D", "", number)


def _phone_json(phone: _Phone) -> dict[str, Any]:
    return {"number": phone.number, "number_type": phone.number_type, "status": phone.status}


def _identifiers(body: dict[str, Any]) -> list[str]:
    identifiers = body.get("identifiers", [])
    if not isinstance(identifiers, list) or not all(
        isinstance(i, str) and ":" in i and not i.startswith("action_network:")
        for i in identifiers
    ):
        raise ApiError(400, "identifiers must be a list of 'system:value' strings")
    return list(dict.fromkeys(identifiers))


def _names(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(400, f"{key} must be a list of tag names")
    return value


def _link(body: dict[str, Any], rel: str) -> str | None:
    """``body["_links"][rel]["href"]``, or None when absent."""
    links = body.get("_links")
    if links is not None and not isinstance(links, dict):
        raise ApiError(400, "_links must be an object")
    target = None if links is None else links.get(rel)
    if target is None:
        return None
    href = target.get("href") if isinstance(target, dict) else None
    if not isinstance(href, str):
        raise ApiError(400, f"_links.{rel}.href must be a string")
    return href


def _uuid_from_href(href: str, collection: str) -> str:
    match = re.search(rf"/{collection}/([^/?#]+)/?$", href)
    if match is None:
        raise ApiError(400, f"Not a link to {collection}: {href!r}")
    return match.group(1)


_EVENT_TEXT = (
    "title",
    "name",
    "description",
    "instructions",
    "browser_url",
    "start_date",
    "end_date",
    "visibility",
    "origin_system",
)
_CAMPAIGN_TEXT = (
    "title",
    "description",
    "host_pitch",
    "host_instructions",
    "browser_url",
    "host_url",
    "featured_image_url",
    "origin_system",
)


def _title(body: dict[str, Any], creating: bool) -> dict[str, Any]:
    if not creating and "title" not in body:
        return {}
    title = body.get("title")
    if not isinstance(title, str) or not title.strip():
        raise ApiError(400, "Title is required")
    return {"title": title}


def _texts(body: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The string fields the request carries; a present ``null`` blanks."""
    return {name: _optional_text(body, name) for name in names if name in body}


def _event_fields(body: dict[str, Any], *, creating: bool) -> tuple[dict[str, Any], str | None]:
    """The event fields the request carries, and the status it asks for (which is ignored)."""
    fields = _texts(body, _EVENT_TEXT[1:]) | _title(body, creating)
    for name in ("start_date", "end_date"):
        if fields.get(name) is not None:
            _iso_date(fields[name], name)
    if creating:
        _check_dates(fields.get("start_date"), fields.get("end_date"))
    if "capacity" in body:
        capacity = body["capacity"]
        if capacity is not None and (
            not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0
        ):
            raise ApiError(400, "capacity must be a non-negative integer")
        fields["capacity"] = capacity
    if "location" in body:
        fields["location"] = _location(body["location"])
    status = body.get("status")
    if status is not None and status not in EVENT_STATUSES:
        raise ApiError(400, f"Invalid event status: {status!r}")
    return fields, status


def _location(value: Any) -> dict[str, Any] | None:
    """A whole location: what a PUT leaves out of it is gone."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(400, "location must be an object")
    location = _texts(value, ("venue", "locality", "region", "postal_code", "country"))
    if "address_lines" in value:
        lines = value["address_lines"]
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            raise ApiError(400, "address_lines must be a list of strings")
        location["address_lines"] = list(lines)
    point = value.get("location")
    if point is not None:
        if not isinstance(point, dict) or not all(
            isinstance(point.get(k), int | float) and not isinstance(point.get(k), bool)
            for k in ("latitude", "longitude")
        ):
            raise ApiError(400, "location.location needs numeric latitude and longitude")
        location["location"] = {"latitude": point["latitude"], "longitude": point["longitude"]}
    return location


def _iso_date(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ApiError(400, f"{name} is not an ISO 8601 date: {value!r}") from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _check_dates(start: str | None, end: str | None) -> None:
    if start is not None and end is not None:
        if _iso_date(end, "end_date") < _iso_date(start, "start_date"):
            raise ApiError(400, "end_date is before start_date")


def _campaign_fields(body: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    return _texts(body, _CAMPAIGN_TEXT[1:]) | _title(body, creating)
