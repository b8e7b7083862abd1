"""Action Network API v2: the typed calls csand makes, each one request through the shared limiter.

Every answer is classified by :mod:`csand.actionnetwork.errors`; anything but success raises
:class:`ANFailure` carrying that outcome, and the worker decides what happens to the item. A 429
informs the shared limiter (everyone pauses) and is retried here a few times, since it says
nothing about the record.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from csand import metrics
from csand.actionnetwork.errors import Outcome, Verdict, classify_exception, classify_response
from csand.logs import get_logger
from csand.model import Fields
from csand.ratelimit import TokenBucket

log = get_logger("actionnetwork")

MAX_429_RETRIES = 4
MAX_PAGES = 2000  # a guard against a list that never ends
PAGE_SIZE = 25  # AN's most items per page

# Awaited right before each request leaves (after the rate limiter let it through): the worker
# sets it for its task to check that it may still write for its item; raising stops the request.
before_request: ContextVar[Callable[[], Awaitable[None]] | None] = ContextVar(
    "an_before_request", default=None)


class ANFailure(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class PersonRecord:
    uuid: str
    subscribed: bool | None


def uuid_of(resource: dict[str, Any]) -> str | None:
    """AN's id is the ``action_network:<uuid>`` identifier (URLs use the bare uuid)."""
    for identifier in resource.get("identifiers") or ():
        if isinstance(identifier, str) and identifier.startswith("action_network:"):
            return identifier.split(":", 1)[1]
    href = ((resource.get("_links") or {}).get("self") or {}).get("href")
    return href.rstrip("/").rsplit("/", 1)[-1] if href else None


def _person_record(resource: dict[str, Any]) -> PersonRecord | None:
    uuid = uuid_of(resource)
    if not uuid:
        return None
    status = None
    for address in resource.get("email_addresses") or ():
        if address.get("primary", True) and address.get("status"):
            status = address["status"]
            break
    return PersonRecord(uuid, None if status is None else status == "subscribed")


def _odata_quote(value: str) -> str:
    return value.replace("'", "''")


class ActionNetworkClient:
    def __init__(
        self, http: httpx.AsyncClient, base_url: str, api_key: str, limiter: TokenBucket
    ) -> None:
        self._http = http
        self.base_url = base_url.rstrip("/")
        self._headers = {"OSDI-API-Token": api_key, "Content-Type": "application/json"}
        self.limiter = limiter
        self.requests = 0  # every request sent, for figures and the demo

    def person_href(self, uuid: str) -> str:
        return f"{self.base_url}/people/{uuid}"

    async def _call(
        self, method: str, path: str, *, json: Any = None, helper: bool = False,
        by_id: bool = False,
    ) -> Any:
        url = path if path.startswith("http") else f"{self.base_url}{path}"
        for _ in range(MAX_429_RETRIES + 1):
            await self.limiter.acquire()
            check = before_request.get()
            if check is not None:
                await check()
            self.requests += 1
            started = time.monotonic()
            try:
                response = await self._http.request(method, url, json=json, headers=self._headers)
            except httpx.HTTPError as exc:
                metrics.an_requests.labels("error").inc()
                raise ANFailure(classify_exception(exc)) from exc
            metrics.an_requests.labels(str(response.status_code)).inc()
            body: Any
            try:
                body = response.json() if response.content else None
            except ValueError:
                body = response.text
            outcome = classify_response(
                response.status_code, body, helper=helper, by_id=by_id,
                retry_after=response.headers.get("Retry-After"),
            )
            log.debug("an.request", method=method, path=url.removeprefix(self.base_url),
                      status=response.status_code, ms=round((time.monotonic() - started) * 1000))
            if outcome.verdict is Verdict.OK:
                self.limiter.on_success()
                return body
            if outcome.verdict is Verdict.RATE_LIMITED:
                metrics.an_rate_limited.inc()
                pause = self.limiter.on_rate_limited(outcome.retry_after)
                log.warning("an.rate_limited", pause_s=round(pause, 2),
                            rate=round(self.limiter.current_rate(), 2),
                            retry_after=outcome.retry_after)
                continue
            raise ANFailure(outcome)
        raise ANFailure(outcome)

    # ---- people ----

    async def find_person(self, email: str, also: tuple[str, ...] = ()) -> PersonRecord | None:
        """Look a person up by (normalised) email, then by each other spelling in ``also``."""
        for spelling in dict.fromkeys((email, *also)):
            query = quote(f"email_address eq '{_odata_quote(spelling)}'", safe="")
            body = await self._call("GET", f"/people?filter={query}")
            for resource in _embedded(body, "osdi:people"):
                addresses = [(a.get("address") or "").strip().lower()
                             for a in resource.get("email_addresses") or ()]
                if email in addresses:
                    record = _person_record(resource)
                    if record is None:
                        raise ANFailure(Outcome(Verdict.RETRY, "person found without an id"))
                    return record
        return None

    async def signup(self, fields: Fields, status: str | None, tags: tuple[str, ...]) -> PersonRecord:
        body = await self._call(
            "POST", "/people", json={"person": _person_json(fields, status), "add_tags": list(tags)},
            helper=True,
        )
        record = _person_record(body)
        if record is None:
            raise ANFailure(Outcome(Verdict.RETRY, "Person Signup Helper answered without an id"))
        return record

    async def record_signature(
        self, petition_uuid: str, fields: Fields, status: str | None, tags: tuple[str, ...]
    ) -> str | None:
        """Returns the person's uuid when AN's answer names it (it normally does)."""
        body = await self._call(
            "POST", f"/petitions/{petition_uuid}/signatures",
            json={"person": _person_json(fields, status), "add_tags": list(tags)},
            helper=True, by_id=True,
        )
        uuid = body.get("action_network:person_id") or _href_uuid(body, "osdi:person")
        return str(uuid) if uuid else None

    async def sign_as(self, petition_uuid: str, person_uuid: str) -> None:
        await self._call(
            "POST", f"/petitions/{petition_uuid}/signatures",
            json={"_links": {"osdi:person": {"href": self.person_href(person_uuid)}}},
            helper=True, by_id=True,
        )

    async def set_status(self, person_uuid: str, email: str, status: str) -> None:
        await self._call(
            "PUT", f"/people/{person_uuid}",
            json={"email_addresses": [{"address": email, "status": status}]}, by_id=True,
        )

    # ---- petitions ----

    async def find_petition(self, identifier: str) -> str | None:
        """Find a mirrored petition by its identifier.

        Uses AN's identifier filter; should the filter be refused (400), falls back to paging
        through the group's petitions, which is slower but never creates a duplicate.
        """
        query = quote(f"identifier eq '{_odata_quote(identifier)}'", safe="")
        try:
            body = await self._call("GET", f"/petitions?filter={query}")
            return _with_identifier(body, identifier)
        except ANFailure as failure:
            if failure.outcome.verdict is not Verdict.DEAD:
                raise
            log.warning("an.petition_filter_refused", reason=failure.outcome.reason)
        for page in range(1, MAX_PAGES + 1):
            body = await self._call("GET", f"/petitions?page={page}")
            if not _embedded(body, "osdi:petitions"):
                return None
            found = _with_identifier(body, identifier)
            if found:
                return found
        return None

    async def create_petition(
        self, *, title: str, description: str, identifier: str, origin_system: str,
        creator_uuid: str | None,
    ) -> str:
        payload: dict[str, Any] = {
            "title": title, "description": description, "origin_system": origin_system,
            "identifiers": [identifier],
        }
        if creator_uuid:
            payload["_links"] = {"osdi:creator": {"href": self.person_href(creator_uuid)}}
        body = await self._call("POST", "/petitions", json=payload, helper=True)
        uuid = uuid_of(body or {})
        if not uuid:
            raise ANFailure(Outcome(Verdict.RETRY, "petition created without an id in the answer"))
        return uuid

    async def list_petitions(
        self, field: str, value: str,
        on_page: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> list[tuple[str, dict[str, Any]]]:
        """``(uuid, petition)`` for every petition whose ``field`` (``title``,
        ``origin_system``, ...) equals ``value``, 25 a page; ``on_page`` sees each page.

        Should AN refuse the filter (400), pages through all the group's petitions and keeps
        the matching ones. A listed petition without an id is a failure (retry): skipping it
        could create a duplicate.
        """
        query = quote(f"{field} eq '{_odata_quote(value)}'", safe="")
        try:
            return await self._petition_pages(f"/petitions?filter={query}&page=", None, on_page)
        except ANFailure as failure:
            if failure.outcome.verdict is not Verdict.DEAD:
                raise
            log.warning("an.petition_filter_refused", field=field, reason=failure.outcome.reason)
        return await self._petition_pages("/petitions?page=", (field, value), on_page)

    async def _petition_pages(
        self, path: str, keep: tuple[str, str] | None,
        on_page: Callable[[list[dict[str, Any]]], None] | None,
    ) -> list[tuple[str, dict[str, Any]]]:
        found: list[tuple[str, dict[str, Any]]] = []
        for page in range(1, MAX_PAGES + 1):
            body = await self._call("GET", f"{path}{page}")
            items = _embedded(body, "osdi:petitions")
            if on_page is not None:
                on_page(items)
            for item in items:
                if keep is not None and item.get(keep[0]) != keep[1]:
                    continue
                uuid = uuid_of(item)
                if not uuid:
                    raise ANFailure(Outcome(Verdict.RETRY, "petition listed without an id"))
                found.append((uuid, item))
            if not items or not ((body or {}).get("_links") or {}).get("next"):
                break
        return found

    async def add_petition_identifier(self, uuid: str, identifier: str) -> None:
        """``PUT /petitions/{uuid}`` with ``{"identifiers": [identifier]}``: AN appends it to
        the petition's identifiers (they are never removed, and unique across AN: a 400 if
        another resource holds it). Safe to repeat; 404 is *gone*."""
        await self._call("PUT", f"/petitions/{uuid}", json={"identifiers": [identifier]},
                         helper=True, by_id=True)

    # ---- events and event campaigns ----

    async def find_event(self, identifier: str) -> str | None:
        """Find a mirrored event by its identifier (AN deduplicates events only on these).

        Like :meth:`find_petition`: the identifier filter, else (filter refused with 400)
        paging through the group's events.
        """
        return await self._find_identified("events", identifier)

    async def create_event(
        self, *, title: str, description: str | None, start_date: str | None,
        end_date: str | None, location: dict[str, Any] | None, browser_url: str | None,
        identifier: str, origin_system: str, creator_uuid: str | None,
        campaign_uuid: str | None,
    ) -> str:
        """POST a new event (into the event campaign when ``campaign_uuid`` is given: AN sets
        campaign membership only at creation). Dates are ISO 8601 strings; None fields are left
        out. The host, when known, is linked as both creator and organizer."""
        payload: dict[str, Any] = {"title": title}
        for name, value in (("description", description), ("start_date", start_date),
                            ("end_date", end_date), ("location", location),
                            ("browser_url", browser_url)):
            if value is not None:
                payload[name] = value
        payload["origin_system"] = origin_system
        payload["identifiers"] = [identifier]
        if creator_uuid:
            href = self.person_href(creator_uuid)
            payload["_links"] = {"osdi:creator": {"href": href}, "osdi:organizer": {"href": href}}
        if campaign_uuid:
            body = await self._call("POST", f"/event_campaigns/{campaign_uuid}/events",
                                    json=payload, helper=True, by_id=True)
        else:
            body = await self._call("POST", "/events", json=payload, helper=True)
        return _created_uuid(body, "event")

    async def update_event(
        self, uuid: str, *, title: str | None = None, description: str | None = None,
        start_date: str | None = None, end_date: str | None = None,
        location: dict[str, Any] | None = None, browser_url: str | None = None,
    ) -> None:
        """PUT only the fields given (None: leave as it is). AN replaces a location whole.

        An empty answer is a failure (retry): a PUT is safe to repeat, and an update that may
        not have landed must not be recorded as done. Nothing to change: no request.
        """
        payload = {name: value for name, value in (
            ("title", title), ("description", description), ("start_date", start_date),
            ("end_date", end_date), ("location", location), ("browser_url", browser_url),
        ) if value is not None}
        if not payload:
            return
        await self._call("PUT", f"/events/{uuid}", json=payload, helper=True, by_id=True)

    async def find_event_campaign(self, identifier: str) -> str | None:
        """Find a mirrored event campaign by its identifier, as :meth:`find_event` does."""
        return await self._find_identified("event_campaigns", identifier)

    async def create_event_campaign(
        self, *, title: str, description: str | None, browser_url: str | None,
        identifier: str, origin_system: str,
    ) -> str:
        payload: dict[str, Any] = {"title": title}
        if description is not None:
            payload["description"] = description
        if browser_url is not None:
            payload["browser_url"] = browser_url
        payload["origin_system"] = origin_system
        payload["identifiers"] = [identifier]
        body = await self._call("POST", "/event_campaigns", json=payload, helper=True)
        return _created_uuid(body, "event campaign")

    # ---- attendances ----

    async def record_attendance(
        self, event_uuid: str, fields: Fields, status: str | None, tags: tuple[str, ...]
    ) -> tuple[str | None, bool | None]:
        """Record Attendance Helper: upserts the person and records their RSVP in one call.

        Like the signature helper it subscribes a person new to the list. Returns the person's
        uuid when the answer names it, and their subscription state when the answer carries the
        person (AN's attendance answer normally does not: then None, meaning unknown).
        """
        body = await self._call(
            "POST", f"/events/{event_uuid}/attendances",
            json={"person": _person_json(fields, status), "add_tags": list(tags)},
            helper=True, by_id=True,
        )
        if not isinstance(body, dict):
            raise ANFailure(Outcome(Verdict.RETRY, "Record Attendance Helper answered no object"))
        uuid = body.get("action_network:person_id") or _href_uuid(body, "osdi:person")
        subscribed = None
        person = (body.get("_embedded") or {}).get("osdi:person")
        if isinstance(person, dict):
            record = _person_record(person)
            if record is not None:
                subscribed = record.subscribed
                uuid = uuid or record.uuid
        return (str(uuid) if uuid else None), subscribed

    async def attend_as(self, event_uuid: str, person_uuid: str) -> None:
        """A plain attendance for a person AN already has: creates or subscribes no one."""
        await self._call(
            "POST", f"/events/{event_uuid}/attendances",
            json={"_links": {"osdi:person": {"href": self.person_href(person_uuid)}}},
            helper=True, by_id=True,
        )

    async def _find_identified(self, collection: str, identifier: str) -> str | None:
        rel = f"osdi:{collection}"
        query = quote(f"identifier eq '{_odata_quote(identifier)}'", safe="")
        try:
            body = await self._call("GET", f"/{collection}?filter={query}")
            return _identified_in(body, rel, identifier)
        except ANFailure as failure:
            if failure.outcome.verdict is not Verdict.DEAD:
                raise
            log.warning("an.identifier_filter_refused", collection=collection,
                        reason=failure.outcome.reason)
        for page in range(1, MAX_PAGES + 1):
            body = await self._call("GET", f"/{collection}?page={page}")
            if not _embedded(body, rel):
                return None
            found = _identified_in(body, rel, identifier)
            if found:
                return found
        return None

    # ---- tags ----

    async def list_tags(self) -> dict[str, str]:
        """name → uuid for every tag (paged, no filter exists); stops at an empty page."""
        tags: dict[str, str] = {}
        for page in range(1, MAX_PAGES + 1):
            body = await self._call("GET", f"/tags?page={page}")
            items = _embedded(body, "osdi:tags")
            for item in items:
                if item.get("name"):
                    tags[item["name"]] = uuid_of(item) or ""
            if not items or not ((body or {}).get("_links") or {}).get("next"):
                break
        return tags

    async def create_tag(self, name: str) -> str:
        body = await self._call("POST", "/tags", json={"name": name}, helper=True)
        return uuid_of(body or {}) or ""

    # ---- reads for csand audit ----

    async def _pages(self, path: str, rel: str) -> list[dict[str, Any]]:
        """Every item of a list addressed by id (a 404 raises GONE), page by page. A page of
        fewer than 25 items is the last: no request for an empty page after it."""
        items: list[dict[str, Any]] = []
        sep = "&" if "?" in path else "?"
        for page in range(1, MAX_PAGES + 1):
            body = await self._call("GET", f"{path}{sep}page={page}", by_id=True)
            found = _embedded(body, rel)
            items.extend(found)
            links = (body or {}).get("_links") or {}
            total = (body or {}).get("total_pages")
            if len(found) < PAGE_SIZE or not links.get("next") or (
                    isinstance(total, int) and page >= total):
                break
        return items

    async def person_tag_ids(self, person_uuid: str) -> set[str]:
        """The uuids of the person's tags (``GET /people/{id}/taggings``); GONE if no such
        person."""
        taggings = await self._pages(f"/people/{person_uuid}/taggings", "osdi:taggings")
        return {uuid for t in taggings if (uuid := _href_uuid(t, "osdi:tag"))}

    async def person_petition_ids(self, person_uuid: str) -> set[str]:
        """The uuids of the petitions the person signed (``GET /people/{id}/signatures``);
        GONE if no such person."""
        signatures = await self._pages(f"/people/{person_uuid}/signatures", "osdi:signatures")
        return {uuid for s in signatures
                if (uuid := s.get("action_network:petition_id") or _href_uuid(s, "osdi:petition"))}

    async def person_event_ids(self, person_uuid: str) -> set[str]:
        """The uuids of the events the person attends (``GET /people/{id}/attendances``);
        GONE if no such person."""
        attendances = await self._pages(f"/people/{person_uuid}/attendances",
                                        "osdi:attendances")
        return {uuid for a in attendances
                if (uuid := a.get("action_network:event_id") or _href_uuid(a, "osdi:event"))}

    async def petition_signer_ids(self, petition_uuid: str) -> set[str]:
        """The uuids of everyone who signed the petition (``GET /petitions/{id}/signatures``,
        25 a page); GONE if no such petition."""
        signatures = await self._pages(f"/petitions/{petition_uuid}/signatures",
                                       "osdi:signatures")
        return {uuid for s in signatures
                if (uuid := s.get("action_network:person_id") or _href_uuid(s, "osdi:person"))}

    async def get_petition(self, petition_uuid: str) -> dict[str, Any] | None:
        """The petition, or None when AN has no such petition (404)."""
        try:
            body = await self._call("GET", f"/petitions/{petition_uuid}", by_id=True)
        except ANFailure as failure:
            if failure.outcome.verdict is Verdict.GONE:
                return None
            raise
        return body if isinstance(body, dict) else None

    async def all_petitions(self) -> list[dict[str, Any]]:
        """Every petition of the group (25 a page)."""
        return await self._pages("/petitions", "osdi:petitions")

    async def check_key(self) -> bool:
        """The entry point answers 200 even for a bad key, only without the ``osdi:tags`` link."""
        body = await self._call("GET", "/")
        return "osdi:tags" in ((body or {}).get("_links") or {})


def _embedded(body: Any, rel: str) -> list[dict[str, Any]]:
    """The items of a list answer.

    An empty answer (AN's ``200 {}`` quirk, or no body) is a failure, never "no match": taking
    it for "not in AN" would create people or force their status. A real list answer carries
    links or other members, and an absent or null list in it means no items.
    """
    if not isinstance(body, dict) or not body:
        raise ANFailure(Outcome(Verdict.RETRY, f"Action Network answered an empty {rel} list"))
    items = (body.get("_embedded") or {}).get(rel)
    if items is None:
        return []
    if not isinstance(items, list):
        raise ANFailure(Outcome(Verdict.RETRY, f"Action Network answered {rel} not as a list"))
    return [item for item in items if isinstance(item, dict)]


def _with_identifier(body: Any, identifier: str) -> str | None:
    for resource in _embedded(body, "osdi:petitions"):
        if identifier in (resource.get("identifiers") or ()):
            return uuid_of(resource)
    return None


def _identified_in(body: Any, rel: str, identifier: str) -> str | None:
    """The uuid of the listed resource carrying ``identifier``; one without an id is a failure
    (taking it for "not in AN" would create a duplicate)."""
    for resource in _embedded(body, rel):
        if identifier in (resource.get("identifiers") or ()):
            uuid = uuid_of(resource)
            if not uuid:
                raise ANFailure(Outcome(Verdict.RETRY, f"{rel} {identifier} listed without an id"))
            return uuid
    return None


def _created_uuid(body: Any, what: str) -> str:
    uuid = uuid_of(body) if isinstance(body, dict) else None
    if not uuid:
        raise ANFailure(Outcome(Verdict.RETRY, f"{what} created without an id in the answer"))
    return uuid


def _href_uuid(body: dict[str, Any], rel: str) -> str | None:
    href = ((body.get("_links") or {}).get(rel) or {}).get("href")
    return href.rstrip("/").rsplit("/", 1)[-1] if href else None


def _person_json(fields: Fields, status: str | None) -> dict[str, Any]:
    email: dict[str, Any] = {"address": fields.email}
    if status:
        email["status"] = status
    person: dict[str, Any] = {"email_addresses": [email]}
    if fields.given_name:
        person["given_name"] = fields.given_name
    if fields.family_name:
        person["family_name"] = fields.family_name
    if fields.postal_code:
        person["postal_addresses"] = [{"postal_code": fields.postal_code}]
    if fields.custom_fields:
        person["custom_fields"] = dict(fields.custom_fields)
    if fields.mobile is not None:
        number, sms_status = fields.mobile
        phone: dict[str, Any] = {"number": number, "number_type": "Mobile"}
        if sms_status:  # only ever "subscribed", on an explicit SMS opt-in
            phone["status"] = sms_status
        person["phone_numbers"] = [phone]
    return person
