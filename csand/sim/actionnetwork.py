"""An in-memory Action Network API v2, served as a Starlette app, for testing csand end to end.

It reproduces what csand must cope with on the real service: the helpers' subscription rules,
silently ignored unknown tags, globally unique petition identifiers, the people list's endless
``next`` link, the per-key rate limit, the ``200 {}`` helper failures, and injected outages
(5xx, slow answers, dropped connections, failures after the write was committed). Tests drive
it over real HTTP (see :mod:`csand.sim.server`) and inspect its state through plain methods.
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
SIGNUP = "POST /people"
SIGNATURE = "POST /petitions/{uuid}/signatures"
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
class _PersonInput:
    email: str
    status: str | None
    fields: dict[str, str | None]  # only the fields the request carries


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
            Route(
                f"{PREFIX}/petitions/{{uuid}}/signatures", self._signature_helper, methods=["POST"]
            ),
            Route(f"{PREFIX}/tags", self._list_tags, methods=["GET"]),
            Route(f"{PREFIX}/tags", self._post_tag, methods=["POST"]),
            Route(f"{PREFIX}/tags/{{uuid}}/taggings", self._post_tagging, methods=["POST"]),
        ]
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
    ) -> str:
        """Put a person in the list before the test starts (``created_by="setup"``); tags are created."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}")
        with self._lock:
            if self._find_person(email) is not None:
                raise ValueError(f"{email!r} is already in the list")
            person = self._create_person(email.strip(), status, "setup")
            person.given_name, person.family_name = given_name, family_name
            person.postal_code = postal_code
            for name in tags:
                self._tag_person(person, self._tags[self._ensure_tag(name)])
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
                    "identifiers": list(p.identifiers),
                    "creator_uuid": p.creator_uuid,
                }
                for p in self._petitions.values()
            ]

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
        if key in (SIGNUP, SIGNATURE) and self._hit(f.empty_200_rate, "empty_200"):
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
            for name in ("people", "petitions", "tags"):
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
            person = self._upsert(person_in, person_in.status or "subscribed", person_in.status)
            self._apply_tags(person, add, remove)
            self._record(person, SIGNUP)
            return HalResponse(self._person_json(person, _base(request)))

    async def _put_person(self, request: Request) -> Response:
        body = await _json_body(request)
        fields = _person_fields(body)
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
            self._record(person, "PUT /people/{uuid}")
            return HalResponse(self._person_json(person, _base(request)))

    async def _list_petitions(self, request: Request) -> Response:
        page = _page(request)
        wanted = request.query_params.get("filter")
        with self._lock:
            if wanted is None:
                petitions = list(self._petitions.values())
            else:
                found = self._petition_by_identifier.get(_filter_value(wanted, "identifier"))
                petitions = [] if found is None else [self._petitions[found]]
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
        identifiers = body.get("identifiers", [])
        if not isinstance(identifiers, list) or not all(
            isinstance(i, str) and ":" in i and not i.startswith("action_network:")
            for i in identifiers
        ):
            raise ApiError(400, "identifiers must be a list of 'system:value' strings")
        creator_href = _link(body, "osdi:creator")
        with self._lock:
            if any(i in self._petition_by_identifier for i in identifiers):
                self._duplicate_identifier_posts += 1
                raise ApiError(400, "identifier already in use")
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
                person = self._upsert(signer, "subscribed", signer.status)
            self._apply_tags(person, add, [])
            signature = self._sign(petition, person, comments)
            self._record(person, SIGNATURE, petition_uuid=petition.uuid)
            return HalResponse(self._signature_json(signature, _base(request)))

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
        self, person_in: _PersonInput, status_if_new: str, status_if_existing: str | None
    ) -> _Person:
        """Create or update by email; an existing person's status changes only if one is given."""
        person = self._find_person(person_in.email)
        if person is None:
            person = self._create_person(person_in.email, status_if_new, "api")
        elif status_if_existing is not None:
            person.status = status_if_existing
        for name, value in person_in.fields.items():
            setattr(person, name, value)
        return person

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
        return {
            "uuid": person.uuid,
            "email": person.email,
            "status": person.status,
            "given_name": person.given_name,
            "family_name": person.family_name,
            "postal_code": person.postal_code,
            "tags": {self._tags[t].name for t in person.taggings},
            "created_by": person.created_by,
        }

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
) -> dict[str, Any]:
    """One page of a list. People lists have no totals and always a ``next`` link (AN's quirk)."""
    base = _base(request)
    query = {k: v for k, v in request.query_params.items() if k != "page"}

    def href(number: int) -> str:
        return f"{base}/{name}?{urlencode({**query, 'page': number}, quote_via=quote)}"

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
    return _PersonInput(_valid_email(first.get("address")), status, _person_fields(data))


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
