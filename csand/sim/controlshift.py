"""A simulator of the ControlShift REST API (``/oauth/token`` and ``/api/v1/*``) as a Starlette app.

It follows ``docs/controlshift-api.md``: API-key or OAuth client-credentials auth, ``?page=N``
pagination with a ``meta`` block, the per-minute limits with ``RateLimit-*`` headers, and the
petition / signature / member shapes csand relies on. What the real API leaves unspecified is a
knob here (page size, sort orders, whether deleted signatures stay in lists, the UTC suffix of
timestamps) so tests can run the client against every plausible answer.

Tests drive it through plain, thread-safe Python methods (``add_petition``, ``add_signature``,
``update_signature``, ...) while the app is served from another thread by
:class:`csand.sim.server.ServedApp`. Time comes from two injectable callables: ``clock``
(monotonic seconds: token expiry, rate-limit windows) and ``now`` (wall time: record timestamps).

It also pushes webhooks the way ControlShift does: every endpoint registered with
``add_webhook_endpoint`` receives each event as a signed JSON POST (``{"type", "data", "jid"}``
with ``x-controlshift-webhook-signature: sha256:<hex HMAC-SHA256 of the body>``), in order and
one at a time per endpoint, from a background thread. A non-2xx answer or a transport error is
retried with the identical body after each of ``webhook_retry_delays`` (real seconds, on
``time.monotonic``); after 9 failed retries of one event that event is dropped and the endpoint is
disabled until ``enable_webhook_endpoint``. Mutators emit ``signature.*``, ``petition.*``,
``event.*``, ``attendee.*`` and ``unsubscribe.created``; ``emit`` sends any other event.

Events, calendars and attendees follow ``spec/events-api.md`` A1-A3 (``add_calendar``,
``add_event``, ``update_event``, ``add_attendee``, ``update_attendee``, ``confirm_attendee``,
``delete_attendee``). Events are keyed by slug and carry no numeric id anywhere. REST events
(``/events``, ``/events/{slug}``, ``/calendars/{slug}/events``; every event, unlaunched ones
included, newest first unless ``event_order="asc"``) have no created_at / updated_at, no
moderation status and a host with only a full name, but carry ``calendar`` (or null). Event
webhooks carry ``admin_status``, created_at / updated_at and a host with split names and consent,
but no description, time zone or calendar. Cancellation (``cancelled_at``) shows nowhere but in
``events()``. There is no list of calendars. Deleted attendees vanish from REST.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import math
import random
import re
import secrets
import threading
import time
import unicodedata
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "WEBHOOK_MAX_RETRIES",
    "WEBHOOK_SIGNATURE_HEADER",
    "ConnectionDropped",
    "ControlShiftSim",
    "Faults",
    "webhook_signature",
]

_TICK = timedelta(microseconds=1)
_WINDOW_SECONDS = 60

# Fields of a signature that the test-side API may not set directly.
_SIGNATURE_FIXED = frozenset({"id", "member", "petition", "created_at"})
_PETITION_EDITABLE = frozenset(
    {"title", "launched", "categories", "ended", "admin_status", "creator"}
)
# The creator as the REST API shows it (postcode and opt-in only travel in petition webhooks).
_REST_CREATOR_FIELDS = ("full_name", "first_name", "last_name", "email", "phone_number")

# Events are keyed by slug: no numeric id in any payload. ``seq`` is internal (a tie-break).
_EVENT_FIXED = frozenset(
    {"id", "seq", "calendar", "host_member_id", "start_in_zone", "end_in_zone", "_deleted"}
)
_EVENT_DEFAULTS: dict[str, Any] = {
    "locale": "en",
    "host_address": None,
    "max_attendees_count": None,
    "external_id": None,
    "location_venue": None,
    "unconfirmed_location": False,
    "shifts": [],
    "petition": None,
    "labels": [],
    "mentor": None,
    "image_url": None,
    "administered_at": None,
    "admin_reason": None,
    # Only in bulk data: never shown by REST or webhooks.
    "cancelled_at": None,
    "hidden_at": None,
}
_EVENT_KNOWN = frozenset(
    {
        "seq",
        "slug",
        "title",
        "description",
        "start_at",
        "end_at",
        "time_zone",
        "virtual",
        "host",
        "location",
        "calendar_slug",
        "launched_at",
        "admin_status",
        "url",
        "created_at",
        "updated_at",
        *_EVENT_DEFAULTS,
    }
)
_HOST_KNOWN = frozenset(
    {
        "full_name",
        "first_name",
        "last_name",
        "email",
        "phone_number",
        "postcode",
        "country",
        "join_organisation",
        "opt_in_sms",
        "confirmed_at",
    }
)
_LOCATION_FIELDS = (
    "query",
    "latitude",
    "longitude",
    "street_number",
    "street",
    "locality",
    "region",
    "postal_code",
    "country",
    "created_at",
    "extra_location_info",
)
# Event webhooks carry the location without extra_location_info.
_WEBHOOK_LOCATION_FIELDS = tuple(k for k in _LOCATION_FIELDS if k != "extra_location_info")
_CALENDAR_FIELDS = ("name", "description", "slug", "url", "partnership")
_ATTENDEE_FIXED = frozenset({"id", "member", "member_id", "event", "event_slug", "_deleted"})
ATTENDING_STATUSES = frozenset({"attending", "not_attending", "attended", "confirmed", "no_show"})

WEBHOOK_SIGNATURE_HEADER = "x-controlshift-webhook-signature"
# Retries of one event before the endpoint is disabled (10 attempts in all).
WEBHOOK_MAX_RETRIES = 9
_WEBHOOK_TIMEOUT = 5.0
_DEFAULT_RETRY_DELAYS: tuple[float, ...] = (15, 30, 90, 300, 900, 1800, 3600, 7200, 14400)


class ConnectionDropped(ConnectionError):
    """Raised when a drop fault fires but the server's transport cannot be reached to close it."""


@dataclass
class Faults:
    """Fault knobs, mutable at any time (also while the app is being served).

    Every request to the simulator draws, in this order: ``slow_rate`` (answer after
    ``slow_seconds`` of real time), ``drop_rate`` (close the connection without answering, so
    httpx raises a transport error), ``error_rate`` (answer with a status from
    ``error_statuses``). ``drop_next`` / ``fail_next`` force the next N requests to drop / fail,
    deterministically. ``paths`` limits faults to requests whose path starts with one of the
    given prefixes (empty: every path). Draws come from ``rng`` (``random.Random(seed)``).
    Requests refused by a rate limit are answered 429 before any fault is drawn.
    """

    error_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 0.5
    drop_rate: float = 0.0
    error_statuses: tuple[int, ...] = (500, 502, 503)
    drop_next: int = 0
    fail_next: int = 0
    paths: tuple[str, ...] = ()
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def reset(self) -> None:
        """Turn every fault off (the random stream carries on)."""
        self.error_rate = self.slow_rate = self.drop_rate = 0.0
        self.drop_next = self.fail_next = 0
        self.paths = ()

    def draw(self, path: str) -> tuple[bool, Literal["drop", "error"] | None, int]:
        """Decide the fate of one request: (slow?, drop/error/None, error status)."""
        if self.paths and not any(path.startswith(p) for p in self.paths):
            return False, None, 0
        slow = self.slow_rate > 0 and self.rng.random() < self.slow_rate
        if self.drop_next > 0:
            self.drop_next -= 1
            return slow, "drop", 0
        if self.fail_next > 0:
            self.fail_next -= 1
            return slow, "error", self.error_statuses[0] if self.error_statuses else 503
        if self.drop_rate > 0 and self.rng.random() < self.drop_rate:
            return slow, "drop", 0
        if self.error_rate > 0 and self.rng.random() < self.error_rate:
            statuses = self.error_statuses or (503,)
            return slow, "error", self.rng.choice(statuses)
        return slow, None, 0


@dataclass
class _Window:
    """A fixed one-minute window counter (windows aligned on multiples of 60 s of ``clock``)."""

    window: int = -1
    count: int = 0

    def hit(self, now: float, limit: int) -> tuple[bool, int, int]:
        """Count one request; return (over the limit?, remaining, seconds until reset)."""
        window = math.floor(now / _WINDOW_SECONDS)
        if window != self.window:
            self.window, self.count = window, 0
        self.count += 1
        reset = max(1, math.ceil((window + 1) * _WINDOW_SECONDS - now))
        return self.count > limit, max(0, limit - self.count), reset


@dataclass
class _Outgoing:
    """One event queued for one endpoint; ``body`` is sent byte for byte on every attempt."""

    jid: str
    type: str
    body: bytes
    attempts: int = 0
    duplicate: bool = False


@dataclass
class _Endpoint:
    id: int
    url: str
    secret: str
    created_at: datetime
    updated_at: datetime
    disabled_at: datetime | None = None
    last_failure: str | None = None
    queue: deque[_Outgoing] = field(default_factory=deque)
    due: float = 0.0  # time.monotonic() at which the head of the queue may be sent
    in_flight: bool = False


def webhook_signature(body: bytes, secret: str) -> str:
    """The ``x-controlshift-webhook-signature`` value for a raw body: ``sha256:<hex HMAC>``."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return f"sha256:{digest}"


def _slugify(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _norm_email(email: str | None) -> str:
    # A test may store a malformed email (a number, a list) to see how csand copes.
    return email.strip().lower() if isinstance(email, str) else ""


class ControlShiftSim:
    """The simulated ControlShift organisation: its data, its knobs and its Starlette ``app``."""

    def __init__(
        self,
        *,
        org_slug: str = "demo-org",
        org_name: str = "Demo Organisation",
        api_key: str | None = "cs-test-key",
        client_id: str | None = None,
        client_secret: str | None = None,
        token_ttl: float = 7200.0,
        page_size: int = 10,
        signature_order: Literal["asc", "desc"] = "asc",
        petition_order: Literal["asc", "desc"] = "desc",
        event_order: Literal["asc", "desc"] = "desc",
        attendee_order: Literal["asc", "desc"] = "asc",
        requests_per_minute: int | None = 1000,
        token_requests_per_minute: int | None = 10,
        deleted_visible: bool = True,
        utc_suffix: Literal["Z", "+00:00"] = "Z",
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        webhook_retry_delays: Sequence[float] = _DEFAULT_RETRY_DELAYS,
        webhook_duplicate_rate: float = 0.0,
    ) -> None:
        # Knobs: plain attributes, safe to change between requests.
        self.org_slug = org_slug
        self.org_name = org_name
        self.api_key = api_key
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_ttl = token_ttl
        self.page_size = page_size
        self.signature_order: Literal["asc", "desc"] = signature_order
        self.petition_order: Literal["asc", "desc"] = petition_order
        self.event_order: Literal["asc", "desc"] = event_order
        self.attendee_order: Literal["asc", "desc"] = attendee_order
        self.requests_per_minute = requests_per_minute
        self.token_requests_per_minute = token_requests_per_minute
        self.deleted_visible = deleted_visible
        self.utc_suffix: Literal["Z", "+00:00"] = utc_suffix
        self.clock = clock
        self.now = now
        self.faults = Faults(rng=random.Random(seed))
        # Webhook knobs: the wait (real seconds) before retry n is webhook_retry_delays[n] (the
        # last one repeats if the tuple is short); webhook_duplicate_rate is the probability that
        # a delivered event is delivered once more, identical.
        self.webhook_retry_delays: tuple[float, ...] = tuple(webhook_retry_delays)
        self.webhook_duplicate_rate = webhook_duplicate_rate
        # Broken pagination: when set, every list answer's ``meta`` is what
        # ``meta_override(path, page, meta)`` returns (any JSON value; ``path`` is the request
        # path, e.g. ``/api/v1/petitions/<slug>/signatures``), in place of the true one.
        self.meta_override: Callable[[str, int, dict[str, Any]], Any] | None = None

        self._lock = threading.Lock()
        self._petitions: dict[str, dict[str, Any]] = {}  # slug -> stored petition
        self._signatures: dict[int, dict[str, Any]] = {}  # id -> stored signature
        self._by_petition: dict[str, list[int]] = {}  # slug -> signature ids
        self._live_count: Counter[str] = Counter()  # slug -> non-deleted signatures
        self._versions: Counter[str] = Counter()  # slug -> bumped on any signature change
        self._order_cache: dict[str, tuple[tuple[Any, ...], list[int]]] = {}
        self._members: dict[str, dict[str, Any]] = {}  # normalized email -> member
        self._tokens: dict[str, float] = {}  # access token -> expiry on `clock`
        self._next_petition_id = 1
        self._next_signature_id = 1
        self._next_member_id = 1
        self._last_stamp: datetime | None = None
        self._api_window = _Window()
        self._token_window = _Window()
        self._stats: dict[str, Any] = {}
        self.reset_stats()
        self._unsubscribes: list[dict[str, Any]] = []
        self._next_unsubscribe_id = 1
        self._calendars: dict[str, dict[str, Any]] = {}  # slug -> stored calendar
        self._events: dict[str, dict[str, Any]] = {}  # slug -> stored event
        self._attendees: dict[int, dict[str, Any]] = {}  # id -> stored attendee
        self._by_event: dict[str, list[int]] = {}  # event slug -> attendee ids
        self._next_event_seq = 1
        self._next_attendee_id = 1
        # Webhook state has its own lock: the sender thread never takes ``_lock`` while holding
        # it, and never holds either during HTTP. Lock order: ``_lock`` before ``_wh_cond``.
        self._wh_cond = threading.Condition(threading.Lock())
        self._endpoints: dict[int, _Endpoint] = {}
        self._next_endpoint_id = 1
        self._deliveries: list[dict[str, Any]] = []
        self._webhook_rng = random.Random(seed)
        self._sender: threading.Thread | None = None
        self._sender_stop: threading.Event | None = None

        routes = [
            Route("/oauth/token", self._token, methods=["POST"]),
            Route("/api/v1/organisation", self._organisation, methods=["GET"]),
            Route("/api/v1/petitions", self._petition_list, methods=["GET"]),
            Route("/api/v1/petitions/{slug}", self._petition_one, methods=["GET"]),
            Route("/api/v1/petitions/{slug}/signatures", self._signature_list, methods=["GET"]),
            Route(
                "/api/v1/petitions/{slug}/signatures/lookup",
                self._signature_lookup,
                methods=["GET"],
            ),
            Route("/api/v1/members/lookup", self._member_lookup, methods=["GET"]),
            Route("/api/v1/events", self._event_list, methods=["GET"]),
            Route("/api/v1/events/{slug}", self._event_one, methods=["GET"]),
            Route("/api/v1/events/{slug}/attendees", self._attendee_list, methods=["GET"]),
            Route(
                "/api/v1/events/{slug}/attendees/lookup",
                self._attendee_lookup,
                methods=["GET"],
            ),
            Route("/api/v1/calendars/{slug}", self._calendar_one, methods=["GET"]),
            Route("/api/v1/calendars/{slug}/events", self._calendar_events, methods=["GET"]),
            Route("/api/v1/webhook_endpoints", self._webhook_endpoint_list, methods=["GET"]),
        ]
        self.app = Starlette(
            routes=routes,
            middleware=[Middleware(_Gate, sim=self)],
            exception_handlers={404: _not_found, 405: _not_allowed},
        )

    # ------------------------------------------------------------------ test-side API

    def add_petition(
        self,
        *,
        title: str,
        slug: str | None = None,
        launched: bool = True,
        categories: Sequence[str] = (),
        creator: dict[str, Any],
        created_at: datetime | None = None,
    ) -> dict[str, Any]:
        """Create a petition; ``creator`` has first_name, last_name, email, phone_number and
        optionally postcode and join_organisation (shown only in ``petition.*`` webhooks).
        A launched petition emits ``petition.launched``."""
        with self._lock:
            if slug is None:
                base = _slugify(title) or "petition"
                slug, n = base, 1
                while slug in self._petitions:
                    n += 1
                    slug = f"{base}-{n}"
            elif slug in self._petitions:
                raise ValueError(f"petition slug {slug!r} already exists")
            stamp = _aware(created_at) if created_at is not None else self._stamp()
            petition = {
                "id": self._next_petition_id,
                "slug": slug,
                "title": title,
                "launched": bool(launched),
                "created_at": stamp,
                "updated_at": stamp,
                "ended": False,
                "admin_status": "good",
                "creator": self._creator(creator),
                "categories": list(categories),
            }
            self._next_petition_id += 1
            self._petitions[slug] = petition
            self._by_petition[slug] = []
            self._touch_member(petition["creator"]["email"], stamp)
            if petition["launched"]:
                self._emit("petition.launched", self._petition_event_data(petition))
            return self._render_petition(petition)

    def update_petition(self, slug: str, **changes: Any) -> dict[str, Any]:
        """Change title, launched, categories (names), ended, admin_status or creator fields.
        Emits ``petition.launched`` when this launches the petition, else ``petition.updated``."""
        unknown = set(changes) - _PETITION_EDITABLE
        if unknown:
            raise TypeError(f"cannot update petition fields {sorted(unknown)}")
        with self._lock:
            petition = self._petitions[slug]
            was_launched = bool(petition["launched"])
            for key, value in changes.items():
                if key == "creator":
                    merged = {**petition["creator"], **value}
                    if "full_name" not in value:
                        del merged["full_name"]
                    petition["creator"] = self._creator(merged)
                elif key == "categories":
                    petition["categories"] = list(value)
                else:
                    petition[key] = value
            petition["updated_at"] = self._bump(petition["updated_at"])
            launching = not was_launched and bool(petition["launched"])
            event = "petition.launched" if launching else "petition.updated"
            self._emit(event, self._petition_event_data(petition))
            return self._render_petition(petition)

    def add_signature(
        self,
        petition_slug: str,
        *,
        email: str | None,
        first_name: str | None = None,
        last_name: str | None = None,
        postcode: str | None = None,
        join_organisation: bool | None = None,
        created_at: datetime | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Sign a petition. ``extra`` sets any other field (phone_number, country, confirmed_at,
        unsubscribe_at, email_opt_in_type, deleted_at, or fields csand does not use).
        Emits ``signature.created`` if the petition is launched."""
        fixed = _SIGNATURE_FIXED & set(extra)
        if fixed:
            raise TypeError(f"cannot set signature fields {sorted(fixed)}")
        with self._lock:
            if petition_slug not in self._petitions:
                raise KeyError(petition_slug)
            stamp = _aware(created_at) if created_at is not None else self._stamp()
            signature: dict[str, Any] = {
                "id": self._next_signature_id,
                "email": email,
                "first_name": first_name,
                "last_name": last_name,
                "postcode": postcode,
                "phone_number": None,
                "country": None,
                "join_organisation": join_organisation,
                "email_opt_in_type": self._opt_in_type(join_organisation),
                "confirmed_at": stamp if join_organisation is not None else None,
                "deleted_at": None,
                "unsubscribe_at": None,
                "created_at": stamp,
                "updated_at": stamp,
                "locale": "en",
                "petition_slug": petition_slug,
            }
            signature.update(extra)
            self._next_signature_id += 1
            member = self._touch_member(email, stamp)
            signature["member_id"] = member["id"] if member else None
            self._signatures[signature["id"]] = signature
            self._by_petition[petition_slug].append(signature["id"])
            if signature["deleted_at"] is None:
                self._live_count[petition_slug] += 1
            self._versions[petition_slug] += 1
            rendered = self._render_signature(signature)
            if self._petitions[petition_slug]["launched"]:
                self._emit("signature.created", rendered)
            return rendered

    def update_signature(self, signature_id: int, **changes: Any) -> dict[str, Any]:
        """Change any field (e.g. ``join_organisation=True``, ``unsubscribe_at=...``); bumps
        ``updated_at``. Changing ``join_organisation`` also updates ``email_opt_in_type.mailable``
        unless ``email_opt_in_type`` is given too. Emits ``signature.updated``."""
        fixed = (_SIGNATURE_FIXED | {"updated_at"}) & set(changes)
        if fixed:
            raise TypeError(f"cannot update signature fields {sorted(fixed)}")
        with self._lock:
            signature = self._signatures[signature_id]
            was_deleted = signature["deleted_at"] is not None
            if "join_organisation" in changes and "email_opt_in_type" not in changes:
                opt_in = dict(signature["email_opt_in_type"] or {})
                opt_in["mailable"] = changes["join_organisation"] is True
                changes["email_opt_in_type"] = opt_in
            signature.update(changes)
            signature["updated_at"] = self._bump(signature["updated_at"])
            if "email" in changes:
                member = self._touch_member(signature["email"], signature["updated_at"])
                signature["member_id"] = member["id"] if member else None
            self._after_signature_change(signature, was_deleted)
            rendered = self._render_signature(signature)
            self._emit("signature.updated", rendered)
            return rendered

    def confirm_signature(
        self, signature_id: int, join_organisation: bool = True
    ) -> dict[str, Any]:
        """The signer confirms by email: sets ``confirmed_at``, ``join_organisation`` (and
        ``email_opt_in_type.mailable``), bumps ``updated_at``; emits ``signature.confirmed``."""
        with self._lock:
            signature = self._signatures[signature_id]
            was_deleted = signature["deleted_at"] is not None
            stamp = self._bump(signature["updated_at"])
            signature["confirmed_at"] = signature["updated_at"] = stamp
            signature["join_organisation"] = join_organisation
            opt_in = dict(signature["email_opt_in_type"] or {})
            opt_in["mailable"] = join_organisation is True
            signature["email_opt_in_type"] = opt_in
            self._after_signature_change(signature, was_deleted)
            rendered = self._render_signature(signature)
            self._emit("signature.confirmed", rendered)
            return rendered

    def delete_signature(self, signature_id: int) -> dict[str, Any]:
        """Mark a signature deleted ("This wasn't me"): sets ``deleted_at`` and ``updated_at``
        and emits ``signature.deleted`` (nothing happens to an already deleted signature)."""
        with self._lock:
            signature = self._signatures[signature_id]
            if signature["deleted_at"] is None:
                stamp = self._bump(signature["updated_at"])
                signature["deleted_at"] = signature["updated_at"] = stamp
                self._after_signature_change(signature, was_deleted=False)
                rendered = self._render_signature(signature)
                self._emit("signature.deleted", rendered)
                return rendered
            return self._render_signature(signature)

    def add_unsubscribe(
        self, email: str, *, organisation: bool, unsubscribable_type: str | None = None
    ) -> dict[str, Any]:
        """Record an unsubscribe and emit ``unsubscribe.created``. ``organisation=True`` is an
        org-wide unsubscribe; otherwise it is from one petition / partnership, named by
        ``unsubscribable_type`` (e.g. "Signature", "PartnershipSubscription"; null allowed)."""
        with self._lock:
            record = {
                "id": self._next_unsubscribe_id,
                "email": email,
                "unsubscribe_organisation": bool(organisation),
                "unsubscribable_type": unsubscribable_type,
                "created_at": self._stamp(),
            }
            self._next_unsubscribe_id += 1
            self._unsubscribes.append(record)
            rendered = {key: self._ts(value) for key, value in record.items()}
            self._emit("unsubscribe.created", rendered)
            return dict(rendered)

    def unsubscribes(self) -> list[dict[str, Any]]:
        """Every unsubscribe recorded by ``add_unsubscribe``, oldest first."""
        with self._lock:
            return [{k: self._ts(v) for k, v in u.items()} for u in self._unsubscribes]

    # ------------------------------------------------------------------ events (test-side API)

    def add_calendar(
        self,
        slug: str,
        name: str,
        *,
        description: str | None = None,
        url: str | None = None,
        partnership: Any = None,
    ) -> dict[str, Any]:
        """Create a calendar (a collection of events; there is no REST list of them)."""
        with self._lock:
            if slug in self._calendars:
                raise ValueError(f"calendar slug {slug!r} already exists")
            calendar = {
                "slug": slug,
                "name": name,
                "description": description,
                "url": url if url is not None else f"{self._org_url()}/calendars/{slug}",
                "partnership": copy.deepcopy(partnership),
            }
            self._calendars[slug] = calendar
            return dict(calendar)

    def calendars(self) -> list[dict[str, Any]]:
        """Every calendar, in creation order (for tests; the API has no such list)."""
        with self._lock:
            return [copy.deepcopy(c) for c in self._calendars.values()]

    def add_event(
        self,
        slug: str,
        *,
        title: str,
        description: str | None,
        start_at: datetime,
        end_at: datetime | None,
        time_zone: str = "UTC",
        virtual: bool = False,
        host: dict[str, Any],
        location: dict[str, Any] | None = None,
        calendar_slug: str | None = None,
        launched: bool = True,
        admin_status: str = "good",
        url: str | None = None,
        created_at: datetime | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Create an event, keyed by ``slug`` (events have no numeric id in any payload).

        ``host`` has email, first_name, last_name and optionally full_name, phone_number,
        postcode, country, join_organisation, opt_in_sms, confirmed_at. ``location`` has any of
        query, latitude, longitude, street_number, street, locality, region, postal_code,
        country, created_at, extra_location_info. ``extra`` sets the other fields (locale,
        host_address, max_attendees_count, external_id, location_venue, unconfirmed_location,
        shifts, petition (a petition slug), labels, mentor, image_url, administered_at,
        admin_reason, cancelled_at, hidden_at — the last two are never shown by the API — or
        fields csand does not use). Emits ``event.created.requires_moderation`` when launched
        with admin_status "unreviewed", else ``event.created`` when launched, else nothing.
        Returns the event as ``GET /api/v1/events/{slug}`` shows it."""
        fixed = _EVENT_FIXED & set(extra)
        if fixed:
            raise TypeError(f"cannot set event fields {sorted(fixed)}")
        _zone(time_zone)
        with self._lock:
            if slug in self._events:
                raise ValueError(f"event slug {slug!r} already exists")
            if calendar_slug is not None and calendar_slug not in self._calendars:
                raise KeyError(calendar_slug)
            stamp = _aware(created_at) if created_at is not None else self._stamp()
            event: dict[str, Any] = {
                "seq": self._next_event_seq,
                "slug": slug,
                "title": title,
                "description": description,
                "start_at": _aware(start_at),
                "end_at": _aware(end_at) if end_at is not None else None,
                "time_zone": time_zone,
                "virtual": bool(virtual),
                "host": self._event_host(host),
                "location": self._event_location(location, stamp),
                "calendar_slug": calendar_slug,
                "launched_at": stamp if launched else None,
                "admin_status": admin_status,
                "url": url if url is not None else f"{self._org_url()}/events/{slug}",
                "created_at": stamp,
                "updated_at": stamp,
                **copy.deepcopy(_EVENT_DEFAULTS),
            }
            event.update(extra)
            self._next_event_seq += 1
            self._events[slug] = event
            self._by_event[slug] = []
            self._touch_member(event["host"]["email"], stamp)
            if event["launched_at"] is not None:
                if admin_status == "unreviewed":
                    self._emit("event.created.requires_moderation", self._event_data(event))
                else:
                    self._emit("event.created", self._event_data(event))
            return self._render_event(event)

    def update_event(self, slug: str, **changes: Any) -> dict[str, Any]:
        """Change any field given to ``add_event`` (``host`` is merged into the host;
        ``launched=True/False`` sets or clears ``launched_at``; a new ``admin_status`` sets
        ``administered_at`` unless given). Bumps ``updated_at``. Emits ``event.created`` when this
        launches the event, else ``event.updated`` (also for unlaunched or cancelled events)."""
        fixed = (_EVENT_FIXED | {"updated_at", "created_at", "launched_at"}) & set(changes)
        if fixed:
            raise TypeError(f"cannot update event fields {sorted(fixed)}")
        if "time_zone" in changes:
            _zone(changes["time_zone"])
        with self._lock:
            event = self._events[slug]
            calendar_slug = changes.get("calendar_slug")
            if calendar_slug is not None and calendar_slug not in self._calendars:
                raise KeyError(calendar_slug)
            was_launched = event["launched_at"] is not None
            stamp = self._bump(event["updated_at"])
            for key, value in changes.items():
                if key == "host":
                    merged = {**event["host"], **value}
                    if "full_name" not in value:
                        del merged["full_name"]
                    event["host"] = self._event_host(merged)
                    self._touch_member(event["host"]["email"], stamp)
                elif key == "location":
                    event["location"] = self._event_location(value, stamp)
                elif key == "launched":
                    if not value:
                        event["launched_at"] = None
                    elif event["launched_at"] is None:
                        event["launched_at"] = stamp
                elif key in ("start_at", "end_at"):
                    event[key] = _aware(value) if value is not None else None
                elif key == "virtual":
                    event[key] = bool(value)
                else:
                    event[key] = copy.deepcopy(value)
            if (
                "admin_status" in changes
                and "administered_at" not in changes
                and changes["admin_status"] != "unreviewed"
            ):
                event["administered_at"] = stamp
            event["updated_at"] = stamp
            launching = not was_launched and event["launched_at"] is not None
            self._emit("event.created" if launching else "event.updated", self._event_data(event))
            return self._render_event(event)

    def event(self, slug: str) -> dict[str, Any]:
        """One event as ``GET /api/v1/events/{slug}`` shows it."""
        with self._lock:
            return self._render_event(self._events[slug])

    def events(self) -> list[dict[str, Any]]:
        """Every event's stored record (datetimes, ``calendar_slug``, ``admin_status``,
        ``launched_at``, ``cancelled_at``, ...), in creation order: for oracles."""
        with self._lock:
            out = []
            for e in self._events.values():
                record = copy.deepcopy(e)
                del record["seq"]
                out.append(record)
            return out

    def event_webhook_data(self, slug: str) -> dict[str, Any]:
        """The event as ``event.*`` webhooks carry it now."""
        with self._lock:
            return self._event_data(self._events[slug])

    def add_attendee(
        self,
        event_slug: str,
        *,
        email: str | None,
        first_name: str | None = None,
        last_name: str | None = None,
        postcode: str | None = None,
        phone_number: str | None = None,
        attending_status: str = "attending",
        join_organisation: bool | None = None,
        opt_in_sms: bool | None = None,
        additional_fields: dict[str, Any] | None = None,
        created_at: datetime | None = None,
        confirmed_at: datetime | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """RSVP to an event. ``extra`` sets any other field of the body (country,
        notification_level, new_mobile_subscriber, partnership_opt_ins, email_opt_in_type,
        eu_data_processing_consent, unsubscribe_at, confirmed_reason, source, utm_*, ...).
        Emits ``attendee.created`` if the event is launched. Returns the webhook body."""
        fixed = _ATTENDEE_FIXED & set(extra)
        if fixed:
            raise TypeError(f"cannot set attendee fields {sorted(fixed)}")
        _check_attending_status(attending_status)
        with self._lock:
            event = self._events[event_slug]
            stamp = _aware(created_at) if created_at is not None else self._stamp()
            opt_in = self._opt_in_type(join_organisation)
            opt_in["context"] = "event_rsvp"
            attendee: dict[str, Any] = {
                "id": self._next_attendee_id,
                "first_name": first_name,
                "last_name": last_name,
                "email": email,
                "phone_number": phone_number,
                "postcode": postcode,
                "country": None,
                "notification_level": "all",
                "attending_status": attending_status,
                "join_organisation": join_organisation,
                "new_mobile_subscriber": None,
                "opt_in_sms": opt_in_sms,
                "additional_fields": copy.deepcopy(additional_fields or {}),
                "partnership_opt_ins": [],
                "email_opt_in_type": opt_in,
                "eu_data_processing_consent": None,
                "created_at": stamp,
                "updated_at": stamp,
                "unsubscribe_at": None,
                "confirmed_at": _aware(confirmed_at) if confirmed_at is not None else None,
                "confirmed_reason": None,
                "source": None,
                "event_slug": event_slug,
            }
            attendee.update(extra)
            self._next_attendee_id += 1
            member = self._touch_member(email, stamp)
            attendee["member_id"] = member["id"] if member else None
            self._attendees[attendee["id"]] = attendee
            self._by_event[event_slug].append(attendee["id"])
            rendered = self._render_attendee(attendee)
            if event["launched_at"] is not None:
                self._emit("attendee.created", rendered)
            return rendered

    def update_attendee(self, attendee_id: int, **changes: Any) -> dict[str, Any]:
        """Change any field (attending_status, join_organisation, opt_in_sms, additional_fields,
        unsubscribe_at, ...); bumps ``updated_at``. Changing ``join_organisation`` also updates
        ``email_opt_in_type.mailable`` unless that is given too. Emits ``attendee.updated``.
        A deleted attendee raises KeyError."""
        fixed = (_ATTENDEE_FIXED | {"updated_at", "created_at"}) & set(changes)
        if fixed:
            raise TypeError(f"cannot update attendee fields {sorted(fixed)}")
        if "attending_status" in changes:
            _check_attending_status(changes["attending_status"])
        with self._lock:
            attendee = self._live_attendee(attendee_id)
            if "join_organisation" in changes and "email_opt_in_type" not in changes:
                opt_in = dict(attendee["email_opt_in_type"] or {})
                opt_in["mailable"] = changes["join_organisation"] is True
                changes["email_opt_in_type"] = opt_in
            attendee.update(copy.deepcopy(changes))
            attendee["updated_at"] = self._bump(attendee["updated_at"])
            if "email" in changes:
                member = self._touch_member(attendee["email"], attendee["updated_at"])
                attendee["member_id"] = member["id"] if member else None
            rendered = self._render_attendee(attendee)
            self._emit("attendee.updated", rendered)
            return rendered

    def confirm_attendee(self, attendee_id: int) -> dict[str, Any]:
        """The attendee confirms by email: sets ``confirmed_at`` and bumps ``updated_at``
        (consent fields unchanged); emits ``attendee.confirmed``."""
        with self._lock:
            attendee = self._live_attendee(attendee_id)
            stamp = self._bump(attendee["updated_at"])
            attendee["confirmed_at"] = attendee["updated_at"] = stamp
            rendered = self._render_attendee(attendee)
            self._emit("attendee.confirmed", rendered)
            return rendered

    def delete_attendee(self, attendee_id: int) -> dict[str, Any]:
        """Delete an attendee: gone from every REST answer; emits ``attendee.deleted`` with its
        last body (unchanged). Deleting it again does nothing and returns that body."""
        with self._lock:
            attendee = self._attendees[attendee_id]
            rendered = self._render_attendee(attendee)
            if attendee.get("_deleted"):
                return rendered
            attendee["_deleted"] = True
            self._emit("attendee.deleted", rendered)
            return rendered

    def attendees(
        self, event_slug: str | None = None, *, include_deleted: bool = False
    ) -> list[dict[str, Any]]:
        """Attendee bodies (as webhooks carry them), by id; deleted ones only on request."""
        with self._lock:
            ids: Sequence[int] = (
                list(self._attendees) if event_slug is None else self._by_event[event_slug]
            )
            return [
                self._render_attendee(self._attendees[i])
                for i in ids
                if include_deleted or not self._attendees[i].get("_deleted")
            ]

    def petition(self, slug: str) -> dict[str, Any]:
        with self._lock:
            return self._render_petition(self._petitions[slug])

    def petitions(self) -> list[dict[str, Any]]:
        """Every petition, oldest first (by id), as the API would render it."""
        with self._lock:
            return [self._render_petition(p) for p in self._petitions.values()]

    def signatures(self, petition_slug: str | None = None) -> list[dict[str, Any]]:
        """Every signature (deleted ones included, whatever ``deleted_visible``), by id."""
        with self._lock:
            if petition_slug is None:
                ids: Sequence[int] = list(self._signatures)
            else:
                ids = self._by_petition[petition_slug]
            return [self._render_signature(self._signatures[i]) for i in ids]

    def member_id(self, email: str) -> int | None:
        """The member id for an email (case- and space-insensitive), if any."""
        with self._lock:
            member = self._members.get(_norm_email(email))
            return member["id"] if member else None

    def stats(self) -> dict[str, Any]:
        """Counters: requests, by_route ("METHOD /path/{param}"), rate_limited, token_requests,
        unauthorized, faults {"slow", "drop", "error"}."""
        with self._lock:
            return copy.deepcopy(self._stats)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = {
                "requests": 0,
                "by_route": {},
                "rate_limited": 0,
                "token_requests": 0,
                "unauthorized": 0,
                "faults": {"slow": 0, "drop": 0, "error": 0},
            }

    # ------------------------------------------------------------------ webhooks (test-side API)

    def add_webhook_endpoint(self, url: str, secret: str) -> dict[str, Any]:
        """Register an endpoint that receives every event emitted from now on, signed with
        ``secret``; starts the sender thread if it is not running."""
        stamp = self._wall()
        with self._wh_cond:
            endpoint = _Endpoint(
                id=self._next_endpoint_id,
                url=url,
                secret=secret,
                created_at=stamp,
                updated_at=stamp,
            )
            self._next_endpoint_id += 1
            self._endpoints[endpoint.id] = endpoint
            self._ensure_sender()
            return self._render_endpoint(endpoint)

    def enable_webhook_endpoint(self, endpoint_id: int) -> None:
        """Re-enable a disabled endpoint by hand: clears ``disabled_at``; the events queued while
        it was disabled are then delivered, in order."""
        stamp = self._wall()
        with self._wh_cond:
            endpoint = self._endpoints[endpoint_id]
            if endpoint.disabled_at is not None:
                endpoint.disabled_at = None
                endpoint.updated_at = stamp
                endpoint.due = time.monotonic()
                for item in endpoint.queue:
                    item.attempts = 0
            self._ensure_sender()
            self._wh_cond.notify_all()

    def webhook_endpoints(self) -> list[dict[str, Any]]:
        """The endpoints as ``GET /api/v1/webhook_endpoints`` lists them."""
        with self._wh_cond:
            return [self._render_endpoint(e) for e in self._endpoints.values()]

    def webhook_deliveries(self) -> list[dict[str, Any]]:
        """Every delivery attempt, in the order made: ``endpoint_id``, ``jid``, ``type``,
        ``status`` (HTTP status, None after a transport error), ``error`` (None on a 2xx, else a
        short reason), ``at`` (timestamp from ``now``) and ``attempt`` (1 for the first send of
        an event, 2.. for its retries; a duplicate redelivery starts again at 1)."""
        with self._wh_cond:
            return [dict(d) for d in self._deliveries]

    def wait_webhooks_idle(self, timeout: float = 10) -> bool:
        """Wait until no event is queued for an enabled endpoint and no delivery is in flight
        (events queued for disabled endpoints do not count); False if ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        with self._wh_cond:
            while True:
                if all(
                    not e.in_flight and (e.disabled_at is not None or not e.queue)
                    for e in self._endpoints.values()
                ):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wh_cond.wait(remaining)

    def lose_queued_webhooks(self) -> int:
        """Drop every event queued and not yet delivered, for good (a delivery ControlShift
        gave up on); returns how many. Stop the sender first (:meth:`close`) to lose the events
        of changes made meanwhile; enabling an endpoint starts it again."""
        with self._wh_cond:
            lost = 0
            for endpoint in self._endpoints.values():
                if endpoint.in_flight:
                    continue
                lost += len(endpoint.queue)
                endpoint.queue.clear()
            self._wh_cond.notify_all()
            return lost

    def emit(self, type: str, data: dict[str, Any], jid: str | None = None) -> str:
        """Queue an event of any ``type`` (``category.updated``, ``member.deleted``, an unknown
        one, ...) for every endpoint; ``jid`` defaults to fresh random hex. Returns the jid."""
        return self._emit(type, data, jid)

    def close(self) -> None:
        """Stop the sender thread (after the delivery in flight, if any). Queued events stay
        queued; registering or enabling an endpoint starts a new sender."""
        with self._wh_cond:
            thread, stop = self._sender, self._sender_stop
            self._sender = self._sender_stop = None
            if stop is not None:
                stop.set()
                self._wh_cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=_WEBHOOK_TIMEOUT * 2)

    # ------------------------------------------------------------------ storage helpers

    def _stamp(self) -> datetime:
        """Wall time from ``now``, strictly increasing across calls."""
        stamp = _aware(self.now())
        if self._last_stamp is not None and stamp <= self._last_stamp:
            stamp = self._last_stamp + _TICK
        self._last_stamp = stamp
        return stamp

    def _bump(self, previous: datetime) -> datetime:
        stamp = self._stamp()
        return stamp if stamp > previous else previous + _TICK

    def _creator(self, creator: dict[str, Any]) -> dict[str, Any]:
        first, last = creator.get("first_name"), creator.get("last_name")
        full = " ".join(part for part in (first, last) if isinstance(part, str) and part) or None
        return {
            "full_name": creator.get("full_name", full),
            "first_name": first,
            "last_name": last,
            "email": creator.get("email"),
            "phone_number": creator.get("phone_number"),
            "postcode": creator.get("postcode"),
            "join_organisation": creator.get("join_organisation"),
        }

    @staticmethod
    def _opt_in_type(join_organisation: bool | None) -> dict[str, Any]:
        return {
            "context": "petition_signature",
            "kind": "checkbox",
            "mailable": join_organisation is True,
            "external_id": None,
            "active": True,
        }

    def _touch_member(self, email: str | None, stamp: datetime) -> dict[str, Any] | None:
        key = _norm_email(email)
        if not key:
            return None
        member = self._members.get(key)
        if member is None:
            member = {
                "id": self._next_member_id,
                "email": key,
                "created_at": stamp,
                "updated_at": stamp,
                "external_id": None,
            }
            self._next_member_id += 1
            self._members[key] = member
        else:
            member["created_at"] = min(member["created_at"], stamp)
            member["updated_at"] = max(member["updated_at"], stamp)
        return member

    def _after_signature_change(self, signature: dict[str, Any], was_deleted: bool) -> None:
        slug = signature["petition_slug"]
        is_deleted = signature["deleted_at"] is not None
        if was_deleted != is_deleted:
            self._live_count[slug] += 1 if was_deleted else -1
        self._versions[slug] += 1

    def _ordered_signature_ids(self, slug: str) -> list[int]:
        """The petition's signatures in API order (cached until the petition's signatures or
        the ordering knobs change)."""
        key = (self._versions[slug], self.signature_order, self.deleted_visible)
        cached = self._order_cache.get(slug)
        if cached is not None and cached[0] == key:
            return cached[1]
        sigs = [self._signatures[i] for i in self._by_petition[slug]]
        if not self.deleted_visible:
            sigs = [s for s in sigs if s["deleted_at"] is None]
        sigs.sort(key=lambda s: (s["created_at"], s["id"]), reverse=self.signature_order == "desc")
        ids = [s["id"] for s in sigs]
        self._order_cache[slug] = (key, ids)
        return ids

    def _org_url(self) -> str:
        return f"https://{self.org_slug}.example.org"

    def _event_host(self, host: dict[str, Any]) -> dict[str, Any]:
        first, last = host.get("first_name"), host.get("last_name")
        full = " ".join(part for part in (first, last) if isinstance(part, str) and part) or None
        confirmed = host.get("confirmed_at")
        return {
            "full_name": host.get("full_name", full),
            "first_name": first,
            "last_name": last,
            "email": host.get("email"),
            "phone_number": host.get("phone_number"),
            "postcode": host.get("postcode"),
            "country": host.get("country"),
            "join_organisation": host.get("join_organisation"),
            "opt_in_sms": host.get("opt_in_sms"),
            "confirmed_at": _aware(confirmed) if isinstance(confirmed, datetime) else confirmed,
            **{k: copy.deepcopy(v) for k, v in host.items() if k not in _HOST_KNOWN},
        }

    @staticmethod
    def _event_location(location: dict[str, Any] | None, stamp: datetime) -> dict[str, Any] | None:
        if location is None:
            return None
        out: dict[str, Any] = {key: None for key in _LOCATION_FIELDS}
        out["created_at"] = stamp
        out.update(copy.deepcopy(location))
        return out

    def _live_attendee(self, attendee_id: int) -> dict[str, Any]:
        attendee = self._attendees[attendee_id]
        if attendee.get("_deleted"):
            raise KeyError(attendee_id)
        return attendee

    def _ordered_events(self, calendar_slug: str | None = None) -> list[dict[str, Any]]:
        events = [
            e
            for e in self._events.values()
            if calendar_slug is None or e["calendar_slug"] == calendar_slug
        ]
        events.sort(key=lambda e: (e["created_at"], e["seq"]), reverse=self.event_order == "desc")
        return events

    def _ordered_attendees(self, event_slug: str) -> list[dict[str, Any]]:
        live = [
            a
            for a in (self._attendees[i] for i in self._by_event[event_slug])
            if not a.get("_deleted")
        ]
        live.sort(key=lambda a: (a["created_at"], a["id"]), reverse=self.attendee_order == "desc")
        return live

    # ------------------------------------------------------------------ webhook delivery

    def _wall(self) -> datetime:
        """Wall time from ``now``, read under ``_lock`` (never call it holding ``_wh_cond``)."""
        with self._lock:
            return _aware(self.now())

    def _json_default(self, value: Any) -> Any:
        if isinstance(value, datetime):
            return self._ts(value)
        return str(value)

    def _emit(self, type_: str, data: dict[str, Any], jid: str | None = None) -> str:
        """Queue one event for every endpoint. Mutators call it while holding ``_lock`` so
        events are queued in the order the changes happened."""
        jid = jid if jid is not None else secrets.token_hex(12)
        with self._wh_cond:
            if not self._endpoints:
                return jid
            body = json.dumps(
                {"type": type_, "data": data, "jid": jid}, default=self._json_default
            ).encode("utf-8")
            now = time.monotonic()
            for endpoint in self._endpoints.values():
                if not endpoint.queue:
                    endpoint.due = now
                endpoint.queue.append(_Outgoing(jid=jid, type=type_, body=body))
            self._wh_cond.notify_all()
        return jid

    def _petition_event_data(self, p: dict[str, Any]) -> dict[str, Any]:
        """A petition as ``petition.*`` webhooks carry it: no numeric id, no categories, and a
        creator with member id, postcode and opt-in."""
        creator = p["creator"]
        member = self._members.get(_norm_email(creator["email"]))
        opt_in = self._opt_in_type(creator["join_organisation"])
        opt_in["context"] = "petition_creation"
        return {
            "slug": p["slug"],
            "title": p["title"],
            "url": self._petition_url(p["slug"]),
            "created_at": self._ts(p["created_at"]),
            "updated_at": self._ts(p["updated_at"]),
            "creator": {
                "id": member["id"] if member else None,
                "email": creator["email"],
                "first_name": creator["first_name"],
                "last_name": creator["last_name"],
                "postcode": creator["postcode"],
                "join_organisation": creator["join_organisation"],
                "email_opt_in_type": opt_in,
            },
        }

    def _render_endpoint(self, e: _Endpoint) -> dict[str, Any]:
        return {
            "id": e.id,
            "url": e.url,
            "created_at": self._ts(e.created_at),
            "updated_at": self._ts(e.updated_at),
            "disabled_at": self._ts(e.disabled_at),
            "last_failure": e.last_failure,
        }

    def _ensure_sender(self) -> None:
        """Start the sender thread unless it runs (call holding ``_wh_cond``)."""
        if self._sender is not None:
            return
        stop = threading.Event()
        thread = threading.Thread(
            target=self._send_loop, args=(stop,), name="controlshift-webhooks", daemon=True
        )
        self._sender, self._sender_stop = thread, stop
        thread.start()

    def _next_due(self) -> tuple[_Endpoint | None, float | None]:
        """The enabled endpoint whose queue head is due soonest, or how long to wait for one."""
        now = time.monotonic()
        best: _Endpoint | None = None
        wait: float | None = None
        for endpoint in self._endpoints.values():
            if endpoint.disabled_at is not None or endpoint.in_flight or not endpoint.queue:
                continue
            if endpoint.due <= now:
                if best is None or endpoint.due < best.due:
                    best = endpoint
            else:
                left = endpoint.due - now
                wait = left if wait is None else min(wait, left)
        return best, wait

    def _send_loop(self, stop: threading.Event) -> None:
        with httpx.Client(timeout=_WEBHOOK_TIMEOUT) as client:
            while True:
                with self._wh_cond:
                    while True:
                        if stop.is_set():
                            return
                        endpoint, wait = self._next_due()
                        if endpoint is not None:
                            break
                        self._wh_cond.wait(wait)
                    item = endpoint.queue[0]
                    item.attempts += 1
                    endpoint.in_flight = True
                    url, secret, attempt = endpoint.url, endpoint.secret, item.attempts
                status, error = self._post(client, url, secret, item.body)
                try:
                    at = self._wall()
                except Exception:  # a test's `now` may run dry; the attempt still counts
                    at = datetime.now(UTC)
                with self._wh_cond:
                    endpoint.in_flight = False
                    self._settle(endpoint, item, attempt, status, error, at)
                    self._wh_cond.notify_all()

    @staticmethod
    def _post(
        client: httpx.Client, url: str, secret: str, body: bytes
    ) -> tuple[int | None, str | None]:
        headers = {
            "Content-Type": "application/json",
            WEBHOOK_SIGNATURE_HEADER: webhook_signature(body, secret),
        }
        try:
            response = client.post(url, content=body, headers=headers)
        except Exception as exc:  # any transport failure is a failed attempt
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return None, reason[:200]
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, f"HTTP {response.status_code}"

    def _settle(
        self,
        endpoint: _Endpoint,
        item: _Outgoing,
        attempt: int,
        status: int | None,
        error: str | None,
        at: datetime,
    ) -> None:
        """Record one attempt and decide what comes next (call holding ``_wh_cond``)."""
        stamp = self._ts(at)
        self._deliveries.append(
            {
                "endpoint_id": endpoint.id,
                "jid": item.jid,
                "type": item.type,
                "status": status,
                "error": error,
                "at": stamp,
                "attempt": attempt,
            }
        )
        now = time.monotonic()
        if not endpoint.queue or endpoint.queue[0] is not item:
            return
        if error is None:
            endpoint.queue.popleft()
            rate = self.webhook_duplicate_rate
            if not item.duplicate and rate > 0 and self._webhook_rng.random() < rate:
                endpoint.queue.appendleft(
                    _Outgoing(jid=item.jid, type=item.type, body=item.body, duplicate=True)
                )
            endpoint.due = now
            return
        endpoint.last_failure = f"{stamp} {error}"
        retries_done = attempt - 1
        if retries_done >= WEBHOOK_MAX_RETRIES:
            # The event is given up on and the endpoint disabled until re-enabled by hand.
            endpoint.queue.popleft()
            endpoint.disabled_at = endpoint.updated_at = at
            endpoint.due = now
            return
        delays = self.webhook_retry_delays
        delay = delays[min(retries_done, len(delays) - 1)] if delays else 0.0
        endpoint.due = now + max(0.0, float(delay))

    # ------------------------------------------------------------------ rendering

    def _ts(self, value: Any) -> Any:
        if not isinstance(value, datetime):
            return value
        text = _aware(value).astimezone(UTC).isoformat(timespec="microseconds")
        return text.replace("+00:00", "Z") if self.utc_suffix == "Z" else text

    def _petition_url(self, slug: str) -> str:
        return f"https://{self.org_slug}.example.org/petitions/{slug}"

    def _render_petition(self, p: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": p["id"],
            "slug": p["slug"],
            "title": p["title"],
            "url": self._petition_url(p["slug"]),
            "launched": p["launched"],
            "created_at": self._ts(p["created_at"]),
            "updated_at": self._ts(p["updated_at"]),
            "ended": p["ended"],
            "public_signature_count": self._live_count[p["slug"]],
            "admin_status": p["admin_status"],
            "locale": "en",
            "creator": {key: p["creator"][key] for key in _REST_CREATOR_FIELDS},
            "categories": [{"slug": _slugify(name), "name": name} for name in p["categories"]],
        }

    def _render_signature(self, s: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in s.items():
            if key in ("petition_slug", "member_id"):
                continue
            if isinstance(value, dict):
                out[key] = {k: self._ts(v) for k, v in value.items()}
            elif isinstance(value, list):
                out[key] = copy.deepcopy(value)
            else:
                out[key] = self._ts(value)
        out["member"] = {"id": s["member_id"]} if s["member_id"] is not None else None
        slug = s["petition_slug"]
        out["petition"] = {"slug": slug, "url": self._petition_url(slug)}
        return out

    def _in_zone(self, value: datetime | None, zone: str) -> str | None:
        if value is None:
            return None
        text = value.astimezone(_zone(zone)).isoformat(timespec="milliseconds")
        return text.replace("+00:00", "Z") if self.utc_suffix == "Z" else text

    def _render_calendar_ref(self, slug: str | None) -> dict[str, Any] | None:
        if slug is None:
            return None
        c = self._calendars[slug]
        return {"name": c["name"], "slug": c["slug"], "url": c["url"]}

    def _render_calendar(self, c: dict[str, Any]) -> dict[str, Any]:
        return {key: copy.deepcopy(c[key]) for key in _CALENDAR_FIELDS}

    def _petition_ref(self, slug: Any, *, with_url: bool) -> Any:
        if not isinstance(slug, str):
            return copy.deepcopy(slug)
        return {"slug": slug, "url": self._petition_url(slug)} if with_url else {"slug": slug}

    def _extra_fields(self, e: dict[str, Any]) -> dict[str, Any]:
        """Fields a test set that the simulator does not model, shown everywhere as given."""
        return {k: self._render_value(v) for k, v in e.items() if k not in _EVENT_KNOWN}

    def _render_value(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._render_value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._render_value(v) for v in value]
        return self._ts(value)

    def _render_event(self, e: dict[str, Any]) -> dict[str, Any]:
        """An event as the REST API shows it: no numeric id, no created_at / updated_at, no
        moderation status; a host with only a full name; the calendar or null."""
        host = e["host"]
        member = self._members.get(_norm_email(host["email"]))
        location = e["location"]
        return {
            "slug": e["slug"],
            "title": e["title"],
            "url": e["url"],
            "description": e["description"],
            "start_at": self._ts(e["start_at"]),
            "end_at": self._ts(e["end_at"]),
            "start_in_zone": self._in_zone(e["start_at"], e["time_zone"]),
            "end_in_zone": self._in_zone(e["end_at"], e["time_zone"]),
            "time_zone": e["time_zone"],
            "virtual": e["virtual"],
            "launched_at": self._ts(e["launched_at"]),
            "locale": e["locale"],
            "host_address": e["host_address"],
            "max_attendees_count": e["max_attendees_count"],
            "external_id": e["external_id"],
            "host": {
                "member_id": member["id"] if member else None,
                "full_name": host["full_name"],
                "email": host["email"],
                "phone_number": host["phone_number"],
                "postcode": host["postcode"],
            },
            "location": (
                None
                if location is None
                else {key: self._render_value(location[key]) for key in _LOCATION_FIELDS}
            ),
            "location_venue": e["location_venue"],
            "shifts": self._render_value(e["shifts"]),
            "petition": self._petition_ref(e["petition"], with_url=True),
            "labels": self._render_value(e["labels"]),
            "mentor": self._render_value(e["mentor"]),
            "calendar": self._render_calendar_ref(e["calendar_slug"]),
            **self._extra_fields(e),
        }

    def _event_data(self, e: dict[str, Any]) -> dict[str, Any]:
        """An event as ``event.*`` webhooks carry it: moderation status, created_at /
        updated_at and a host with split names and consent; no id, description, time_zone,
        calendar, capacity or cancel flag."""
        host = e["host"]
        member = self._members.get(_norm_email(host["email"]))
        location = e["location"]
        email_opt_in = self._opt_in_type(host["join_organisation"])
        email_opt_in["context"] = "event_creation"
        sms_opt_in = None
        if host["opt_in_sms"] is not None:
            sms_opt_in = self._opt_in_type(host["opt_in_sms"])
            sms_opt_in["context"] = "event_creation"
        webhook_host = {
            "id": member["id"] if member else None,
            "email": host["email"],
            "first_name": host["first_name"],
            "last_name": host["last_name"],
            "phone_number": host["phone_number"],
            "postcode": host["postcode"],
            "country": host["country"],
            "join_organisation": host["join_organisation"],
            "email_opt_in_type": email_opt_in,
            "opt_in_sms": host["opt_in_sms"],
            "sms_opt_in_type": sms_opt_in,
            "confirmed_at": self._ts(host["confirmed_at"]),
        }
        webhook_host.update(
            {k: self._render_value(v) for k, v in host.items() if k not in _HOST_KNOWN}
        )
        return {
            "slug": e["slug"],
            "title": e["title"],
            "start_at": self._ts(e["start_at"]),
            "end_at": self._ts(e["end_at"]),
            "virtual": e["virtual"],
            "location": (
                None
                if location is None
                else {key: self._render_value(location[key]) for key in _WEBHOOK_LOCATION_FIELDS}
            ),
            "location_venue": e["location_venue"],
            "unconfirmed_location": e["unconfirmed_location"],
            "host": webhook_host,
            "url": e["url"],
            "admin_status": e["admin_status"],
            "administered_at": self._ts(e["administered_at"]),
            "admin_reason": e["admin_reason"],
            "created_at": self._ts(e["created_at"]),
            "updated_at": self._ts(e["updated_at"]),
            "shifts": self._render_value(e["shifts"]),
            "image_url": e["image_url"],
            "petition": self._petition_ref(e["petition"], with_url=False),
            "mentor": self._render_value(e["mentor"]),
            **self._extra_fields(e),
        }

    def _render_attendee(self, a: dict[str, Any]) -> dict[str, Any]:
        out = {
            key: self._render_value(value)
            for key, value in a.items()
            if key not in ("event_slug", "member_id", "_deleted")
        }
        out["member"] = {"id": a["member_id"]} if a["member_id"] is not None else None
        event = self._events[a["event_slug"]]
        out["event"] = {"url": event["url"], "slug": event["slug"]}
        return out

    def _render_member(self, m: dict[str, Any]) -> dict[str, Any]:
        return {key: self._ts(value) for key, value in m.items()}

    def _page(self, items: Sequence[Any], request: Request) -> tuple[Sequence[Any], dict[str, Any]]:
        try:
            page = max(1, int(request.query_params.get("page", "1")))
        except ValueError:
            page = 1
        size = max(1, self.page_size)
        total = max(1, math.ceil(len(items) / size))
        meta: Any = {
            "current_page": page,
            "total_pages": total,
            "previous_page": page - 1 if 1 < page <= total else None,
            "next_page": page + 1 if page < total else None,
        }
        if self.meta_override is not None:
            meta = self.meta_override(request.url.path, page, meta)
        return items[(page - 1) * size : page * size], meta

    # ------------------------------------------------------------------ request gate

    def _route_name(self, scope: Scope) -> str:
        for route in self.app.router.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE and isinstance(route, Route):
                return f"{scope['method']} {route.path}"
        return f"{scope['method']} (unknown)"

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return False
        if self.api_key is not None and secrets.compare_digest(credential, self.api_key):
            return True
        expiry = self._tokens.get(credential)
        return expiry is not None and self.clock() < expiry

    async def _gate(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Stats, rate limits, faults and auth in front of the routes."""
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        route = self._route_name(scope)
        limit_headers: dict[str, str] = {}
        with self._lock:
            stats = self._stats
            stats["requests"] += 1
            stats["by_route"][route] = stats["by_route"].get(route, 0) + 1
            window, limit = None, None
            if path.startswith("/api/v1/"):
                window, limit = self._api_window, self.requests_per_minute
            elif path == "/oauth/token":
                stats["token_requests"] += 1
                window, limit = self._token_window, self.token_requests_per_minute
            limited = False
            if window is not None and limit is not None:
                limited, remaining, reset = window.hit(self.clock(), limit)
                limit_headers = {
                    "RateLimit-Limit": str(limit),
                    "RateLimit-Remaining": str(remaining),
                    "RateLimit-Reset": str(reset),
                }
            if limited:
                stats["rate_limited"] += 1
                slow, fault, status = False, None, 0
            else:
                slow, fault, status = self.faults.draw(path)
                if slow:
                    stats["faults"]["slow"] += 1
                if fault is not None:
                    stats["faults"][fault] += 1
            authorized = not path.startswith("/api/v1/") or self._authorized(headers)
            if not limited and fault is None and not authorized:
                stats["unauthorized"] += 1
            slow_seconds = self.faults.slow_seconds

        if limited:
            body = {"error": "rate limit exceeded"}
            await JSONResponse(body, 429, headers=limit_headers)(scope, receive, send)
            return
        if slow:
            await anyio.sleep(slow_seconds)
        if fault == "drop":
            await _drop_connection(receive)
            return
        if fault == "error":
            body = {"error": "internal server error"}
            await JSONResponse(body, status, headers=limit_headers)(scope, receive, send)
            return
        if not authorized:
            response = JSONResponse({"error": "unauthorized"}, 401, headers=limit_headers)
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and limit_headers:
                message = dict(message)
                extra = [(k.lower().encode(), v.encode()) for k, v in limit_headers.items()]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await app(scope, receive, send_with_headers)

    # ------------------------------------------------------------------ endpoints

    async def _token(self, request: Request) -> Response:
        raw = await request.body()
        params: dict[str, Any]
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                loaded = json.loads(raw or b"{}")
            except ValueError:
                return _oauth_error(400, "invalid_request", "The request body is not valid JSON.")
            params = loaded if isinstance(loaded, dict) else {}
        else:
            params = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
        client_id, client_secret = params.get("client_id"), params.get("client_secret")
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic" and client_id is None:
            try:
                decoded = base64.b64decode(encoded.strip()).decode("utf-8")
            except ValueError:
                decoded = ""
            client_id, _, client_secret = decoded.partition(":")
        grant_type = params.get("grant_type")
        if not grant_type:
            return _oauth_error(400, "invalid_request", "Missing required parameter: grant_type.")
        if grant_type != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "The grant type is not supported.")
        with self._lock:
            valid = (
                self.client_id is not None
                and self.client_secret is not None
                and isinstance(client_id, str)
                and isinstance(client_secret, str)
                and secrets.compare_digest(client_id, self.client_id)
                and secrets.compare_digest(client_secret, self.client_secret)
            )
            if not valid:
                return _oauth_error(401, "invalid_client", "Client authentication failed.")
            now = self.clock()
            for token, expiry in list(self._tokens.items()):
                if expiry <= now:
                    del self._tokens[token]
            token = secrets.token_hex(32)
            self._tokens[token] = now + self.token_ttl
            created_at = int(_aware(self.now()).timestamp())
            ttl = self.token_ttl
        return JSONResponse(
            {
                "access_token": token,
                "token_type": "bearer",
                "expires_in": int(ttl),
                "created_at": created_at,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def _organisation(self, request: Request) -> Response:
        with self._lock:
            body = {
                "organisation": {
                    "slug": self.org_slug,
                    "name": self.org_name,
                    "url": f"https://{self.org_slug}.example.org",
                    "petitions_count": len(self._petitions),
                    "signatures_count": sum(self._live_count.values()),
                    "members_count": len(self._members),
                }
            }
        return JSONResponse(body)

    async def _petition_list(self, request: Request) -> Response:
        with self._lock:
            items = sorted(
                self._petitions.values(),
                key=lambda p: (p["created_at"], p["id"]),
                reverse=self.petition_order == "desc",
            )
            page, meta = self._page(items, request)
            body = {"petitions": [self._render_petition(p) for p in page], "meta": meta}
        return JSONResponse(body)

    async def _petition_one(self, request: Request) -> Response:
        with self._lock:
            petition = self._petitions.get(request.path_params["slug"])
            if petition is None:
                return _error(404, "not found")
            return JSONResponse({"petition": self._render_petition(petition)})

    async def _signature_list(self, request: Request) -> Response:
        slug = request.path_params["slug"]
        with self._lock:
            petition = self._petitions.get(slug)
            if petition is None:
                return _error(404, "not found")
            page, meta = self._page(self._ordered_signature_ids(slug), request)
            body = {
                "petition": {"title": petition["title"], "slug": slug},
                "signatures": [self._render_signature(self._signatures[i]) for i in page],
                "meta": meta,
            }
        return JSONResponse(body)

    async def _signature_lookup(self, request: Request) -> Response:
        slug = request.path_params["slug"]
        email = _norm_email(request.query_params.get("email"))
        with self._lock:
            if slug not in self._petitions or not email:
                return _error(404, "not found")
            matches = [
                s
                for s in (self._signatures[i] for i in self._by_petition[slug])
                if _norm_email(s["email"]) == email
                and (self.deleted_visible or s["deleted_at"] is None)
            ]
            if not matches:
                return _error(404, "not found")
            # The live signature if there is one, else the latest.
            best = max(matches, key=lambda s: (s["deleted_at"] is None, s["created_at"], s["id"]))
            return JSONResponse({"signature": self._render_signature(best)})

    async def _member_lookup(self, request: Request) -> Response:
        email = _norm_email(request.query_params.get("email"))
        with self._lock:
            member = self._members.get(email) if email else None
            if member is None:
                return _error(404, "not found")
            return JSONResponse({"member": self._render_member(member)})

    async def _event_list(self, request: Request) -> Response:
        with self._lock:
            page, meta = self._page(self._ordered_events(), request)
            body = {"events": [self._render_event(e) for e in page], "meta": meta}
        return JSONResponse(body)

    async def _event_one(self, request: Request) -> Response:
        with self._lock:
            event = self._events.get(request.path_params["slug"])
            if event is None:
                return _error(404, "not found")
            return JSONResponse({"event": self._render_event(event)})

    async def _attendee_list(self, request: Request) -> Response:
        slug = request.path_params["slug"]
        with self._lock:
            event = self._events.get(slug)
            if event is None:
                return _error(404, "not found")
            page, meta = self._page(self._ordered_attendees(slug), request)
            body = {
                "meta": meta,
                "event": {"title": event["title"], "slug": slug, "url": event["url"]},
                "attendees": [self._render_attendee(a) for a in page],
            }
        return JSONResponse(body)

    async def _attendee_lookup(self, request: Request) -> Response:
        slug = request.path_params["slug"]
        email = _norm_email(request.query_params.get("email"))
        with self._lock:
            if slug not in self._events or not email:
                return _error(404, "not found")
            matches = [a for a in self._ordered_attendees(slug) if _norm_email(a["email"]) == email]
            if not matches:
                return _error(404, "not found")
            best = max(matches, key=lambda a: (a["created_at"], a["id"]))
            return JSONResponse({"attendee": self._render_attendee(best)})

    async def _calendar_one(self, request: Request) -> Response:
        with self._lock:
            calendar = self._calendars.get(request.path_params["slug"])
            if calendar is None:
                return _error(404, "not found")
            return JSONResponse({"calendar": self._render_calendar(calendar)})

    async def _calendar_events(self, request: Request) -> Response:
        slug = request.path_params["slug"]
        with self._lock:
            calendar = self._calendars.get(slug)
            if calendar is None:
                return _error(404, "not found")
            page, meta = self._page(self._ordered_events(slug), request)
            body = {
                "meta": meta,
                "calendar": self._render_calendar(calendar),
                "events": [self._render_event(e) for e in page],
            }
        return JSONResponse(body)

    async def _webhook_endpoint_list(self, request: Request) -> Response:
        return JSONResponse(self.webhook_endpoints())


class _Gate:
    """Pure ASGI middleware handing every HTTP request to ``ControlShiftSim._gate``."""

    def __init__(self, app: ASGIApp, sim: ControlShiftSim) -> None:
        self.app = app
        self.sim = sim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.sim._gate(self.app, scope, receive, send)


async def _drop_connection(receive: Receive) -> None:
    """Close the client's connection without sending a byte of response.

    ASGI has no message for this, so the server's transport is reached through the ``receive``
    callable, which uvicorn (h11 and httptools alike) binds to its request cycle object. Waiting
    for the resulting ``http.disconnect`` keeps uvicorn from answering a 500 on our behalf.
    """
    cycle = getattr(receive, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        raise ConnectionDropped("simulated dropped connection")
    transport.abort()
    with anyio.move_on_after(2):
        while (await receive())["type"] != "http.disconnect":
            pass


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


def _check_attending_status(status: str) -> None:
    if status not in ATTENDING_STATUSES:
        raise ValueError(f"attending_status must be one of {sorted(ATTENDING_STATUSES)}")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


def _oauth_error(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status)


def _not_found(request: Request, exc: Exception) -> Response:
    return _error(404, "not found")


def _not_allowed(request: Request, exc: Exception) -> Response:
    return _error(405, "method not allowed")
