"""ControlShift REST API: auth (API key or OAuth2 client credentials), paging, its rate limits.

Every request passes ``limiter`` (the whole ``requests_per_minute``); polling requests first
pass the poll budget of :mod:`csand.controlshift.budget`, which also counts requests by purpose
and learns the page size from the answers.

The poller is the main caller. Transient failures (5xx, timeouts, dropped connections) are retried
a few times here (:data:`csand.retry.CS_TRANSIENT`), since a poll cycle is cheap to repeat; what
still fails raises :class:`CSError` and the cycle is tried again at the next interval. Nothing is
lost either way: the poller records what it saw only after it has enqueued it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
import httpx

from csand import metrics
from csand.controlshift.budget import CSBudget, current_purpose
from csand.logs import get_logger
from csand.ratelimit import TokenBucket
from csand.retry import CS_RATE_LIMITED, CS_TRANSIENT

if TYPE_CHECKING:
    from csand.config import ControlShiftSettings

log = get_logger("controlshift")

# No list is walked further than this many pages, whatever its meta says: a next_page that
# keeps growing must not trap the poller. (CS's page size is undocumented; at 25 a page this
# is 250,000 records.)
MAX_PAGES = 10_000


class CSError(Exception):
    """ControlShift could not be read this time; the message is meant for the operator."""


class CSAuthError(CSError):
    pass


class CSNotFound(CSError):
    pass


class CSBadPage(CSError):
    """A list page whose items or pagination (``meta``) cannot be followed."""


def _page_number(meta: dict[str, Any], key: str, *, minimum: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        shown = repr(value) if isinstance(value, int | float | str) else type(value).__name__
        raise CSBadPage(f"meta.{key} is not a page number ({shown[:40]})")
    return value


def pagination(meta: Any, page: int, path: str) -> tuple[int | None, int | None]:
    """``(total_pages, next_page)`` of list page ``page`` of ``path``, validated.

    Either may be None (absent or null: no next page). Raises :class:`CSBadPage` for anything
    else that is not a page number, or more than :data:`MAX_PAGES` pages. A next page beyond
    ``total_pages`` is not followed (logged as ``cs.bad_pagination``; None is returned). A next
    page not after ``page`` is returned as it is: callers stop at a page they have read.
    """
    try:
        if meta is None:
            return None, None
        if not isinstance(meta, dict):
            raise CSBadPage(f"meta is not an object ({type(meta).__name__})")
        total = _page_number(meta, "total_pages", minimum=0)
        nxt = _page_number(meta, "next_page", minimum=1)
        if total is not None and total > MAX_PAGES:
            raise CSBadPage(f"meta.total_pages is {total}, more than the {MAX_PAGES} pages "
                            "csand walks")
        if nxt is not None and nxt > MAX_PAGES:
            raise CSBadPage(f"meta.next_page is {nxt}, more than the {MAX_PAGES} pages "
                            "csand walks")
        if nxt is not None and total is not None and nxt > total:
            log.error("cs.bad_pagination", path=path, page=page,
                      error=f"meta.next_page {nxt} is beyond meta.total_pages {total}",
                      msg="not followed: csand reads no page past meta.total_pages")
            return total, None
        return total, nxt
    except CSBadPage as exc:
        raise CSBadPage(f"ControlShift {path} page {page}: {exc}") from None


def _items(body: dict[str, Any], key: str, path: str, page: int) -> list[Any]:
    items = body.get(key)
    if items is None:
        return []
    if not isinstance(items, list):
        raise CSBadPage(f"ControlShift {path} page {page}: {key} is not a list "
                        f"({type(items).__name__})")
    return items


class OAuthToken:
    """Client-credentials token, cached until shortly before it expires (CS allows 10/minute)."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, client_id: str, client_secret: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._http = http
        self._url = f"{base_url}/oauth/token"
        self._form = {"grant_type": "client_credentials", "client_id": client_id,
                      "client_secret": client_secret}
        self._clock = clock
        self._token: str | None = None
        self._expires = 0.0
        self._lock = anyio.Lock()
        self._limiter = TokenBucket(10 / 60, clock=clock)  # no burst: never 11 in a minute
        self.requests = 0

    def invalidate(self) -> None:
        self._token = None

    async def get(self) -> str:
        async with self._lock:
            if self._token and self._clock() < self._expires - 60:
                return self._token
            await self._limiter.acquire()
            self.requests += 1
            try:
                response = await self._http.post(self._url, data=self._form)
            except httpx.HTTPError as exc:
                raise CSError(f"ControlShift token request failed: {type(exc).__name__}") from exc
            if response.status_code in (400, 401, 403):
                raise CSAuthError(
                    "ControlShift rejected the OAuth client credentials "
                    f"({response.status_code}); check controlshift.client_id/client_secret"
                )
            if response.status_code != 200:
                raise CSError(f"ControlShift token endpoint answered {response.status_code}")
            try:
                body = response.json()
                token = str(body["access_token"])
                lifetime = float(body.get("expires_in") or 7200)
            except (ValueError, KeyError, TypeError, AttributeError):
                raise CSError("ControlShift token endpoint answered 200 without a token") from None
            self._token = token
            self._expires = self._clock() + lifetime
            return token


class ControlShiftClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        *,
        api_key: str | None = None,
        oauth: OAuthToken | None = None,
        limiter: TokenBucket | None = None,
        sleep: Callable[[float], Any] = anyio.sleep,
        budget: CSBudget | None = None,
    ) -> None:
        if api_key is None and oauth is None:
            raise ValueError("an API key or OAuth credentials are required")
        self._http = http
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._oauth = oauth
        self.limiter = limiter or TokenBucket(1000 / 60)
        self._sleep = sleep
        self.requests = 0
        self.rate_limited = 0
        # Who spends what (csand.controlshift.budget); without one, nothing but counting.
        self.budget = budget or CSBudget()

    async def _auth_header(self) -> dict[str, str]:
        token = self._api_key if self._api_key else await self._oauth.get()  # type: ignore[union-attr]
        return {"Authorization": f"Bearer {token}"}

    async def get(self, path: str) -> Any:
        url = f"{self.base_url}/api/v1{path}"
        auth_retried = False
        failures = 0  # transient failures of this request so far
        limited = 0  # 429s of this request so far
        spender = current_purpose()
        while True:
            await self.budget.admit(spender)  # polling: its share first
            await self.limiter.acquire()
            self.requests += 1
            self.budget.record(spender)
            try:
                response = await self._http.get(url, headers=await self._auth_header())
            except httpx.HTTPError as exc:
                metrics.cs_requests.labels("error").inc()
                failures += 1
                if CS_TRANSIENT.gives_up(failures):
                    raise CSError(f"ControlShift unreachable: {type(exc).__name__}: {exc}") from exc
                await self._sleep(CS_TRANSIENT.delay(failures))
                continue
            status = response.status_code
            metrics.cs_requests.labels(str(status)).inc()
            if status == 200:
                try:
                    body = response.json()
                except ValueError as exc:
                    raise CSError(f"ControlShift answered non-JSON for {path}") from exc
                if not isinstance(body, dict | list):
                    raise CSError(f"ControlShift answered unexpected JSON for {path}")
                return body
            if status == 429:
                self.rate_limited += 1
                limited += 1
                reset = _seconds(response.headers.get("RateLimit-Reset"))
                if reset is None:
                    reset = CS_RATE_LIMITED.delay(limited)
                log.warning("cs.rate_limited", pause_s=reset)
                self.limiter.on_rate_limited(reset)
                continue
            if status == 401:
                if self._oauth and not auth_retried:  # token revoked or expired early
                    self._oauth.invalidate()
                    auth_retried = True
                    continue
                raise CSAuthError(
                    "ControlShift rejected the credentials (401); check controlshift.api_key"
                )
            if status == 404:
                raise CSNotFound(f"ControlShift: {path.split('?')[0]} not found (404)")
            if status >= 500 or status == 408:
                failures += 1
                if CS_TRANSIENT.gives_up(failures):
                    raise CSError(f"ControlShift answered {status} for {path}")
                await self._sleep(CS_TRANSIENT.delay(failures))
                continue
            raise CSError(f"ControlShift answered {status} for {path}: {response.text[:200]}")

    async def get_object(self, path: str) -> dict[str, Any]:
        body = await self.get(path)
        if not isinstance(body, dict):
            raise CSError(f"ControlShift answered a JSON {type(body).__name__} for {path}, "
                          "expected an object")
        return body

    async def pages(self, path: str, key: str, start: int = 1) -> AsyncIterator[tuple[list[dict], dict]]:
        """Yield ``(items, meta)`` page by page, following ``meta.next_page`` until null.

        Raises :class:`CSBadPage` for a page it cannot follow (see :func:`pagination`).
        """
        page: int | None = start
        seen: set[int] = set()
        while page is not None and page not in seen:
            seen.add(page)
            body = await self.get_object(f"{path}{'&' if '?' in path else '?'}page={page}")
            items = _items(body, key, path, page)
            meta = body.get("meta")
            self.budget.saw_page(key, len(items), meta)
            _, nxt = pagination(meta, page, path)
            yield items, meta or {}
            page = nxt

    async def lookup_signature(self, slug: str, email: str) -> dict[str, Any] | None:
        """The petition's signature for ``email``, or None when CS has none."""
        try:
            body = await self.get_object(
                f"/petitions/{quote(slug, safe='')}/signatures/lookup?email={quote(email, safe='')}")
        except CSNotFound:
            return None
        signature = body.get("signature")
        return signature if isinstance(signature, dict) else None

    async def organisation(self) -> dict[str, Any]:
        return (await self.get_object("/organisation")).get("organisation") or {}

    async def petitions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = []
        async for items, _ in self.pages("/petitions", "petitions"):
            result.extend(items)
        return result

    async def signatures_page(self, slug: str, page: int) -> tuple[list[dict[str, Any]], dict]:
        """One page of a petition's signatures and its raw ``meta`` (see :func:`pagination`);
        raises :class:`CSBadPage` when the signatures are not a list."""
        return await self._page(f"/petitions/{quote(slug, safe='')}/signatures", "signatures",
                                page)

    # Events, attendees and calendars (spec/events-api.md A1-A2). Events have no numeric id in
    # any REST answer: the slug is the key everywhere. There is no REST list of calendars.

    async def events(self) -> list[dict[str, Any]]:
        """Every event, all pages (unlaunched ones included); each carries ``calendar`` or null."""
        result: list[dict[str, Any]] = []
        async for items, _ in self.pages("/events", "events"):
            result.extend(items)
        return result

    async def event(self, slug: str) -> dict[str, Any] | None:
        """One event by slug, or None when CS answers 404."""
        return await self._one(f"/events/{quote(slug, safe='')}", "event", slug)

    async def attendees_page(self, slug: str, page: int) -> tuple[list[dict[str, Any]], dict]:
        """One page of an event's attendees and its raw ``meta`` (see :func:`pagination`);
        raises :class:`CSBadPage` when the attendees are not a list."""
        return await self._page(f"/events/{quote(slug, safe='')}/attendees", "attendees", page)

    async def _page(self, path: str, key: str, page: int) -> tuple[list[dict[str, Any]], dict]:
        """Page ``page`` of the list at ``path``: its ``key`` items (the page size learned from
        them) and its raw ``meta``."""
        body = await self.get_object(f"{path}?page={page}")
        items = _items(body, key, path, page)
        self.budget.saw_page(key, len(items), body.get("meta"))
        return items, body.get("meta")

    async def attendees(self, slug: str) -> list[dict[str, Any]]:
        """Every attendee of an event, all pages (deleted attendees are not listed)."""
        result: list[dict[str, Any]] = []
        async for items, _ in self.pages(f"/events/{quote(slug, safe='')}/attendees",
                                         "attendees"):
            result.extend(items)
        return result

    async def attendee_lookup(self, slug: str, email: str) -> dict[str, Any] | None:
        """The event's attendee for ``email``, or None when CS answers 404."""
        return await self._one(
            f"/events/{quote(slug, safe='')}/attendees/lookup?email={quote(email, safe='')}",
            "attendee", slug)

    async def calendar(self, slug: str) -> dict[str, Any] | None:
        """A calendar's ``{name, description, slug, url, partnership}``, or None on 404."""
        return await self._one(f"/calendars/{quote(slug, safe='')}", "calendar", slug)

    async def _one(self, path: str, key: str, slug: str) -> dict[str, Any] | None:
        """The ``key`` object of ``path``'s answer; None on 404. A 200 without that object is a
        :class:`CSError`, not None: None means CS said it has none."""
        try:
            body = await self.get_object(path)
        except CSNotFound:
            return None
        value = body.get(key)
        if not isinstance(value, dict):
            raise CSError(f"ControlShift answered {path.split('?')[0]} without "
                          f"{'an' if key[0] in 'aeiou' else 'a'} {key} object for {slug!r}")
        return value


def configured_client(cs: ControlShiftSettings, http: httpx.AsyncClient, *, share: float = 1.0,
                      budget: CSBudget | None = None) -> ControlShiftClient:
    """The client of the ``[controlshift]`` settings: its API key or OAuth client credentials,
    and a bucket of ``share`` of ``requests_per_minute``, 5% under it (a burst of 5 on top must
    still fit in any minute). The daemon takes it all; a command beside it takes its share."""
    limiter = TokenBucket(cs.requests_per_minute * share / 60.0, burst=5, headroom=0.95)
    if cs.api_key is not None:
        return ControlShiftClient(http, cs.url, api_key=cs.api_key.get_secret_value(),
                                  limiter=limiter, budget=budget)
    oauth = OAuthToken(http, cs.url, cs.client_id or "",
                       cs.client_secret.get_secret_value())  # type: ignore[union-attr]
    return ControlShiftClient(http, cs.url, oauth=oauth, limiter=limiter, budget=budget)


def _seconds(value: str | None) -> float | None:
    """A ``RateLimit-Reset`` header in seconds (at least 1), or None when absent or unreadable."""
    try:
        return max(1.0, float(value)) if value is not None else None
    except ValueError:
        return None


class PetitionDirectory:
    """Petitions by slug, for webhooks, whose payloads carry a slug but no id or categories.

    Every poll cycle refreshes it with the list it fetched anyway; a miss (a petition launched
    since) fetches that one petition.
    """

    def __init__(self, cs: ControlShiftClient, max_age: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cs = cs
        self._max_age = max_age
        self._clock = clock
        self._by_slug: dict[str, tuple[float, dict[str, Any]]] = {}

    def remember(self, petitions: list[dict[str, Any]]) -> None:
        now = self._clock()
        for petition in petitions:
            if isinstance(petition, dict) and petition.get("slug"):
                self._by_slug[str(petition["slug"])] = (now, petition)

    def forget_all(self) -> None:
        self._by_slug.clear()

    async def get(self, slug: str, *, fresh: bool = False) -> dict[str, Any]:
        cached = self._by_slug.get(slug)
        if cached and not fresh and self._clock() - cached[0] < self._max_age:
            return cached[1]
        body = await self._cs.get_object(f"/petitions/{quote(slug, safe='')}")
        petition = body.get("petition")
        if not isinstance(petition, dict) or "id" not in petition:
            raise CSError(f"ControlShift returned no petition for {slug!r}")
        self.remember([petition])
        return petition

    async def webhook_endpoints(self) -> list[dict[str, Any]]:
        body = await self._cs.get("/webhook_endpoints")
        return body if isinstance(body, list) else []
