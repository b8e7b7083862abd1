"""``csand run --dry-run``: poll and decide for real, write nothing to Action Network.

Reads (lookups, the tag and petition lists) go to AN as usual, so the decisions are the ones a
real run would make; every write is logged as ``dry_run.would`` with what it would send, and
answered with a made-up id. The daemon runs on a copy of the database, so the real queue and
what csand knows are untouched. Behind those overrides, :class:`ReadOnlyTransport` refuses any
request that is not a read, so a write method the overrides miss still sends nothing.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from types import TracebackType

import httpx

from csand.actionnetwork.client import ActionNetworkClient, PersonRecord
from csand.logs import get_logger
from csand.model import Fields

log = get_logger("dry_run")


def _fake_id(*parts: object) -> str:
    return "dry-run-" + hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def copy_database(source: Path, target: Path) -> None:
    """A consistent copy (SQLite's backup API) of the real store, if there is one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not source.exists():
        return
    # The copy holds the same personal data: owner-only, like the database csand creates.
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o600))
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


READ_METHODS = frozenset({"GET", "HEAD"})


class DryRunWriteRefused(RuntimeError):
    """A dry run tried to write to Action Network: a bug (an unguarded write method), not a
    network failure, so it is deliberately not an ``httpx.HTTPError``."""


class ReadOnlyTransport(httpx.AsyncBaseTransport):
    """Passes reads to ``inner`` and refuses anything else before it leaves.

    The safety net of a dry run: it holds whatever the client's methods do.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method.upper() not in READ_METHODS:
            # The path only: the query string may hold an email address.
            log.error("dry_run.write_refused", method=request.method, path=request.url.path)
            raise DryRunWriteRefused(
                f"dry run: refused {request.method} {request.url.path}; nothing was sent")
        return await self.inner.handle_async_request(request)

    async def __aenter__(self) -> ReadOnlyTransport:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None = None,
                        exc_value: BaseException | None = None,
                        traceback: TracebackType | None = None) -> None:
        await self.inner.__aexit__(exc_type, exc_value, traceback)

    async def aclose(self) -> None:
        await self.inner.aclose()


class DryRunActionNetworkClient(ActionNetworkClient):
    writes = 0

    def _would(self, operation: str, **details: object) -> None:
        self.writes += 1
        log.info("dry_run.would", operation=operation, **details)

    async def signup(self, fields: Fields, status: str | None, tags: tuple[str, ...]) -> PersonRecord:
        self._would("POST /people (Person Signup Helper)", person=fields.email, status=status,
                    tags=list(tags), given_name=fields.given_name, family_name=fields.family_name,
                    postal_code=fields.postal_code)
        return PersonRecord(_fake_id("person", fields.email),
                            None if status is None else status == "subscribed")

    async def record_signature(self, petition_uuid: str, fields: Fields, status: str | None,
                               tags: tuple[str, ...]) -> str | None:
        self._would("POST /petitions/{id}/signatures (Record Signature Helper)",
                    petition=petition_uuid, person=fields.email, status=status, tags=list(tags))
        return _fake_id("person", fields.email)

    async def sign_as(self, petition_uuid: str, person_uuid: str) -> None:
        self._would("POST /petitions/{id}/signatures", petition=petition_uuid,
                    person_id=person_uuid)

    async def set_status(self, person_uuid: str, email: str, status: str) -> None:
        self._would("PUT /people/{id}", person=email, status=status)

    async def create_petition(self, *, title: str, description: str, identifier: str,
                              origin_system: str, creator_uuid: str | None) -> str:
        self._would("POST /petitions", title=title, identifier=identifier,
                    origin_system=origin_system, creator_id=creator_uuid)
        return _fake_id("petition", identifier)

    async def add_petition_identifier(self, uuid: str, identifier: str) -> None:
        self._would("PUT /petitions/{id} (adopt)", petition=uuid, identifier=identifier)

    async def create_tag(self, name: str) -> str:
        self._would("POST /tags", tag=name)
        return _fake_id("tag", name)
