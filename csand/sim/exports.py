"""ControlShift's bulk data exports, simulated: CSV files on an S3-like store, announced by webhook.

Two pieces, following ``docs/controlshift-api.md`` ("Bulk data as csand reads it"):

* :class:`StorageSim`, a Starlette app standing in for S3: ``GET /<bucket>/<key>?X-Amz-...``
  with presigned URLs that expire (then 403 with S3's XML ``AccessDenied`` / ``Request has
  expired``), a bad signature is 403 ``SignatureDoesNotMatch``, an unknown key 404
  ``NoSuchKey``. Bodies stream in chunks; ``drop_next`` cuts the next downloads short mid-body
  (the connection is aborted after ``drop_after_bytes``) and ``fail_next`` answers 503
  ``SlowDown``. Time comes from the injectable ``now``.
* :class:`BulkExports`, bound to a :class:`~csand.sim.controlshift.ControlShiftSim` and a
  :class:`StorageSim`: it reads the simulator's records as ControlShift's tables (``signatures``,
  ``petitions``, ``users``, ``members``, ``categories``, ``categorized_petitions``,
  ``unsubscribes``, ``events``, ``attendees``, ``calendars``), and on demand writes CSV files
  (bzip2 or plain; booleans ``t`` / ``f``, empty for null, timestamps in the database's text form
  or ISO 8601, json as text) and announces each with a signed webhook through the simulator's
  own delivery (``data.incremental_table_exported`` / ``data.full_table_exported``).
  :meth:`BulkExports.export_incremental` (what a test or the demo calls each simulated minute)
  exports the rows inserted since the last call, per table; :meth:`BulkExports.export_full` a
  whole table. :meth:`BulkExports.lose_next` writes the next files but drops their webhooks.

Ids the simulator does not keep (users, categories, category links, calendars) are given here,
in order of first sight, and never reused. Like ControlShift's, incremental files carry only
inserted rows: a later change (a signature unsubscribed, a petition's categories) shows only in
the next full export. The ``unsubscribes`` rows are the simulator's ``add_unsubscribe`` records,
with the same ids as their ``unsubscribe.created`` webhooks.
"""

from __future__ import annotations

import bz2
import hashlib
import hmac
import io
import json
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from csand.sim.controlshift import ControlShiftSim, _norm_email, _slugify

__all__ = [
    "COLUMNS",
    "TABLES",
    "BulkExports",
    "Export",
    "StorageSim",
    "csv_cell",
    "csv_line",
    "write_csv",
]

LIFETIME = timedelta(hours=6)
_CHUNK = 64 * 1024

# The columns each table's files carry, in order: the ones ControlShift's published schema lists
# that the simulator can fill or that csand may read (others stay empty). Real files have more
# columns; csand reads cells by name.
COLUMNS: dict[str, tuple[str, ...]] = {
    "signatures": (
        "id", "petition_id", "email", "first_name", "last_name", "phone_number", "postcode",
        "created_at", "join_organisation", "deleted_at", "unsubscribe_at", "member_id",
        "additional_fields", "cached_organisation_slug", "source", "new_member",
        "external_action_id", "locale", "bucket", "country", "updated_at", "user_ip",
        "join_list_suppressed", "from_embed", "user_agent", "confirmed_at",
        "confirmation_sent_at", "last_signed_at", "confirmed_reason",
        "eu_data_processing_consent", "email_opt_in_type_id", "utm_params", "join_partnership",
        "opt_in_sms", "new_mobile_subscriber", "external_ids",
    ),
    "petitions": (
        "id", "title", "who", "why", "what", "created_at", "updated_at", "user_id", "slug",
        "organisation_id", "delivery_details", "hidden", "admin_status", "launched",
        "campaigner_contactable", "admin_reason", "administered_at", "effort_id", "source",
        "location_id", "alias", "target_id", "redirect_to", "successful", "ended_story",
        "locale", "settings", "external_action_id", "custom_goal", "local_chapter_id",
        "partnership_id", "region_id", "ended_at", "ended_type", "ended_reason",
        "content_updated_at", "external_ids", "utm_params",
    ),
    "users": (
        "id", "email", "created_at", "updated_at", "first_name", "last_name", "admin",
        "phone_number", "postcode", "join_organisation", "organisation_id", "confirmed_at",
        "member_id", "additional_fields", "locale", "new_member", "country",
        "email_opt_in_type_id", "external_ids",
    ),
    "members": (
        "id", "email", "organisation_id", "created_at", "updated_at", "external_ids",
        "banned_at",
    ),
    "categories": (
        "id", "name", "created_at", "updated_at", "organisation_id", "slug", "locales",
        "external_ids",
    ),
    "categorized_petitions": ("id", "category_id", "petition_id", "created_at", "updated_at"),
    "unsubscribes": (
        "id", "organisation_id", "member_id", "blast_email_id", "email", "unsubscribe_object",
        "unsubscribe_organisation", "unsubscribable_id", "unsubscribable_type", "created_at",
        "updated_at", "externally_unsubscribed_at", "bounce_id", "source", "external_ids",
    ),
    "calendars": (
        "id", "name", "description", "slug", "organisation_id", "created_at", "updated_at",
        "archived_at", "launched", "partnership_id", "external_ids",
    ),
    "events": (
        "id", "title", "description", "slug", "start_at", "end_at", "created_at", "updated_at",
        "user_id", "organisation_id", "calendar_id", "admin_status", "admin_reason",
        "administered_at", "max_attendees_count", "locale", "host_address", "cancelled_at",
        "launched_at", "petition_id", "extra_location_info", "external_action_id", "time_zone",
        "hidden_at", "virtual", "external_ids",
    ),
    "attendees": (
        "id", "event_id", "member_id", "email", "first_name", "last_name", "phone_number",
        "postcode", "created_at", "country", "new_member", "attending_status",
        "additional_fields", "join_organisation", "source", "eu_data_processing_consent",
        "locale", "notification_level", "confirmed_at", "confirmed_reason", "unsubscribe_at",
        "updated_at", "opt_in_sms", "new_mobile_subscriber", "external_ids",
    ),
}
TABLES: tuple[str, ...] = tuple(COLUMNS)


def csv_cell(value: Any, *, timestamps: Literal["db", "iso"] = "db") -> str:
    """One value as ControlShift's CSVs write it: ``t`` / ``f``, empty for null, timestamps in
    the database's text form (``2024-10-01 12:00:00.000000``, UTC) or ISO 8601, json as text."""
    if value is None:
        return ""
    if value is True:
        return "t"
    if value is False:
        return "f"
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
        if timestamps == "iso":
            return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")
        return moment.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


_NEEDS_QUOTES = re.compile(r'[,"\r\n]')


def csv_line(cells: Sequence[str]) -> str:
    """One CSV record ending in ``\\n``: a cell is quoted when it holds a comma, a quote, a
    carriage return or a newline (Python's csv writer leaves a lone ``\\r`` unquoted when
    lines end in ``\\n``, which no reader can tell from a line ending)."""
    if len(cells) == 1 and cells[0] == "":
        return '""\n'
    return ",".join('"' + c.replace('"', '""') + '"' if _NEEDS_QUOTES.search(c) else c
                    for c in cells) + "\n"


def write_csv(out: Any, columns: Iterable[str], rows: Iterable[dict[str, Any]], *,
              timestamps: Literal["db", "iso"] = "db") -> int:
    """Write a header and ``rows`` (missing columns empty) to the text stream ``out``; returns
    the number of data rows."""
    names = tuple(columns)
    out.write(csv_line(names))
    count = 0
    for row in rows:
        out.write(csv_line([csv_cell(row.get(name), timestamps=timestamps) for name in names]))
        count += 1
    return count


# ---------------------------------------------------------------------------- storage


def _s3_error(status: int, code: str, message: str, **extra: str) -> Response:
    parts = "".join(f"<{k}>{v}</{k}>" for k, v in extra.items())
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message>{parts}<RequestId>{secrets.token_hex(8).upper()}"
            "</RequestId></Error>")
    return Response(body, status, media_type="application/xml")


@dataclass
class _Object:
    data: bytes | None
    path: Path | None
    content_type: str

    @property
    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        assert self.path is not None
        return self.path.stat().st_size

    def chunks(self, size: int) -> Iterator[bytes]:
        if self.data is not None:
            for i in range(0, len(self.data), size):
                yield self.data[i:i + size]
            return
        assert self.path is not None
        with self.path.open("rb") as f:
            while chunk := f.read(size):
                yield chunk


class StorageSim:
    """An S3-like object store serving presigned, expiring GETs (path style:
    ``<base_url>/<bucket>/<key>``). Set ``base_url`` to where ``app`` is served."""

    def __init__(self, *, bucket: str = "cs-bulk-exports",
                 now: Callable[[], datetime] = lambda: datetime.now(UTC),
                 base_url: str = "http://storage.invalid",
                 chunk_size: int = _CHUNK) -> None:
        self.bucket = bucket
        self.now = now
        self.base_url = base_url
        self.chunk_size = chunk_size
        # Faults: the next ``drop_next`` downloads are cut after ``drop_after_bytes`` of body;
        # the next ``fail_next`` requests get 503 SlowDown.
        self.drop_next = 0
        self.drop_after_bytes = 1024
        self.fail_next = 0
        self.chunk_delay = 0.0  # seconds between body chunks: a slow download (crash tests)
        self._secret = secrets.token_bytes(16)
        self._lock = threading.Lock()
        self._objects: dict[str, _Object] = {}
        self.requests: list[tuple[str, int]] = []  # (key, status), in order
        self.app = Starlette(routes=[Route("/{bucket}/{key:path}", self._get,
                                           methods=["GET"])])

    # -- test-side API --

    def put(self, key: str, data: bytes, content_type: str = "text/csv") -> None:
        with self._lock:
            self._objects[key] = _Object(bytes(data), None, content_type)

    def put_file(self, key: str, path: Path | str, content_type: str = "text/csv") -> None:
        """Serve a file from disk, streamed (for large files)."""
        with self._lock:
            self._objects[key] = _Object(None, Path(path), content_type)

    def get(self, key: str) -> bytes:
        with self._lock:
            obj = self._objects[key]
        return b"".join(obj.chunks(1 << 20))

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._objects)

    def presign(self, key: str, *, lifetime: timedelta = LIFETIME,
                signed_at: datetime | None = None) -> str:
        """A presigned GET URL for ``key``, valid ``lifetime`` from ``signed_at`` (now)."""
        stamp = (signed_at or self.now()).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        expires = str(int(lifetime.total_seconds()))
        query = {
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
            "X-Amz-Credential": f"SIMULATEDKEY/{stamp[:8]}/us-east-1/s3/aws4_request",
            "X-Amz-Date": stamp,
            "X-Amz-Expires": expires,
            "X-Amz-SignedHeaders": "host",
            "X-Amz-Signature": self._sign(key, stamp, expires),
        }
        return f"{self.base_url}/{self.bucket}/{quote(key)}?{urlencode(query)}"

    def _sign(self, key: str, stamp: str, expires: str) -> str:
        message = f"{self.bucket}/{key}\n{stamp}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    # -- the app --

    async def _get(self, request: Request) -> Response:
        bucket, key = request.path_params["bucket"], request.path_params["key"]
        response = self._check(bucket, key, request)
        if response is not None:
            self._log(key, response.status_code)
            return response
        with self._lock:
            obj = self._objects[key]
            drop = self.drop_next > 0
            if drop:
                self.drop_next -= 1
            cut = self.drop_after_bytes
        self._log(key, 200)
        return _Body(obj, self.chunk_size, cut if drop else None, self.chunk_delay)

    def _check(self, bucket: str, key: str, request: Request) -> Response | None:
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return _s3_error(503, "SlowDown", "Please reduce your request rate.")
        q = request.query_params
        stamp, expires, signature = q.get("X-Amz-Date"), q.get("X-Amz-Expires"), \
            q.get("X-Amz-Signature")
        if bucket != self.bucket:
            return _s3_error(404, "NoSuchBucket", "The specified bucket does not exist")
        if not stamp or not expires or not signature:
            return _s3_error(403, "AccessDenied", "Access Denied")
        if not hmac.compare_digest(signature, self._sign(key, stamp, expires)):
            return _s3_error(403, "SignatureDoesNotMatch",
                             "The request signature we calculated does not match the "
                             "signature you provided.")
        try:
            signed_at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            lifetime = timedelta(seconds=int(expires))
        except ValueError:
            return _s3_error(400, "AuthorizationQueryParametersError",
                             "X-Amz-Date or X-Amz-Expires is malformed")
        now = self.now().astimezone(UTC)
        if now > signed_at + lifetime:
            return _s3_error(403, "AccessDenied", "Request has expired",
                             **{"X-Amz-Expires": expires,
                                "Expires": (signed_at + lifetime).strftime(
                                    "%Y-%m-%dT%H:%M:%SZ"),
                                "ServerTime": now.strftime("%Y-%m-%dT%H:%M:%SZ")})
        with self._lock:
            if key not in self._objects:
                return _s3_error(404, "NoSuchKey", "The specified key does not exist.",
                                 Key=key)
        return None

    def _log(self, key: str, status: int) -> None:
        with self._lock:
            self.requests.append((key, status))


class _Body(Response):
    """An object's bytes, streamed; with ``cut``, the connection is aborted after that many."""

    def __init__(self, obj: _Object, chunk_size: int, cut: int | None,
                 delay: float = 0.0) -> None:
        super().__init__(None, 200, media_type=obj.content_type)
        self.obj, self.chunk_size, self.cut, self.delay = obj, chunk_size, cut, delay
        self.headers["content-length"] = str(obj.size)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": self.raw_headers})
        sent = 0
        for chunk in self.obj.chunks(self.chunk_size):
            if self.cut is not None and sent + len(chunk) >= self.cut:
                await send({"type": "http.response.body", "body": chunk[: self.cut - sent],
                            "more_body": True})
                await _abort(receive)
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += len(chunk)
            if self.delay:
                await anyio.sleep(self.delay)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _abort(receive: Receive) -> None:
    """Close the connection mid-body (uvicorn's transport is reached through ``receive``)."""
    await anyio.sleep(0.01)  # let the partial body reach the client first
    cycle = getattr(receive, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        raise ConnectionAbortedError("simulated dropped connection")
    transport.abort()
    with anyio.move_on_after(2):
        while (await receive())["type"] != "http.disconnect":
            pass


# ---------------------------------------------------------------------------- exports


@dataclass(frozen=True)
class Export:
    """One file written: ``jid`` is its webhook's, None when the webhook was lost."""

    table: str
    kind: Literal["incremental", "full"]
    key: str
    url: str
    rows: int
    jid: str | None
    data: dict[str, Any]  # the webhook's ``data``

    @property
    def type(self) -> str:
        return f"data.{self.kind}_table_exported"


class BulkExports:
    """The simulated organisation's bulk data exports (see the module docstring).

    Knobs: ``compression`` ("bzip2" or "none"), ``timestamps`` ("db" or "iso"),
    ``announce_compression`` (False leaves ``compression_format`` out of the webhook, as in
    older payloads), ``lifetime`` of the URLs, ``announce_empty`` (whether an incremental export
    with no new rows still writes and announces a file; off by default).
    """

    def __init__(self, sim: ControlShiftSim, storage: StorageSim, *,
                 compression: Literal["bzip2", "none"] = "bzip2",
                 timestamps: Literal["db", "iso"] = "db",
                 announce_compression: bool = True,
                 announce_empty: bool = False,
                 lifetime: timedelta = LIFETIME,
                 organisation_id: int = 1) -> None:
        self.sim = sim
        self.storage = storage
        self.compression = compression
        self.timestamps: Literal["db", "iso"] = timestamps
        self.announce_compression = announce_compression
        self.announce_empty = announce_empty
        self.lifetime = lifetime
        self.organisation_id = organisation_id
        self.exports: list[Export] = []
        self._lose = 0
        self._seq = 0
        self._lock = threading.Lock()
        self._exported: dict[str, int] = dict.fromkeys(TABLES, 0)  # highest id exported
        # Ids given here: users by email, categories by name, links by (petition, category),
        # calendars by slug. Each with the time first seen.
        self._users: dict[str, dict[str, Any]] = {}
        self._categories: dict[str, dict[str, Any]] = {}
        self._links: dict[tuple[int, int], dict[str, Any]] = {}
        self._calendars: dict[str, dict[str, Any]] = {}
        self._petition_users: dict[int, str] = {}  # petition id -> key in _users
        self._next = {"users": 1, "categories": 1, "categorized_petitions": 1, "calendars": 1}

    # -- test-side API --

    def lose_next(self, n: int = 1) -> None:
        """The next ``n`` files are written but their webhooks never sent."""
        with self._lock:
            self._lose += n

    def export_incremental(self) -> list[Export]:
        """Export, per table, the rows inserted since the last incremental export, and announce
        each file (``data.incremental_table_exported``). Returns the files written."""
        with self._lock:
            tables = self._tables(since=self._exported)
            out = []
            for table in TABLES:
                new = tables[table]
                if not new and not self.announce_empty:
                    continue
                if new:
                    self._exported[table] = max(row["id"] for row in new)
                out.append(self._write(table, "incremental", new))
            return out

    def export_full(self, table: str) -> Export:
        """Export the whole ``table`` as it is now (``data.full_table_exported``)."""
        if table not in COLUMNS:
            raise KeyError(table)
        with self._lock:
            return self._write(table, "full", self._tables()[table])

    def export_full_all(self) -> list[Export]:
        """The nightly export: every table in full."""
        with self._lock:
            tables = self._tables()
            return [self._write(table, "full", tables[table]) for table in TABLES]

    def rows(self, table: str) -> list[dict[str, str]]:
        """The whole ``table`` as its CSV cells would read (for oracles)."""
        with self._lock:
            return [{name: csv_cell(row.get(name), timestamps=self.timestamps)
                     for name in COLUMNS[table]} for row in self._tables()[table]]

    # -- files and webhooks --

    def _write(self, table: str, kind: Literal["incremental", "full"],
               rows: list[dict[str, Any]]) -> Export:
        stamp = self.sim.now().astimezone(UTC)
        self._seq += 1
        text = io.StringIO()
        count = write_csv(text, COLUMNS[table], rows, timestamps=self.timestamps)
        data = text.getvalue().encode("utf-8")
        suffix = ".csv"
        if self.compression == "bzip2":
            data, suffix = bz2.compress(data), ".csv.bz2"
        file_stamp = stamp.strftime("%Y%m%d%H%M%S")
        org = self.sim.org_slug
        if kind == "incremental":
            key = (f"{org}/incremental/{table}/{stamp:%Y%m%d}/{self._seq:06d}/"
                   f"{table}_{file_stamp}{suffix}")
        else:
            key = f"{org}/full/{stamp:%Y%m%d}/{self._seq:06d}/{table}_{file_stamp}{suffix}"
        self.storage.put(key, data, "application/x-bzip2" if suffix.endswith("bz2")
                         else "text/csv")
        url = self.storage.presign(key, lifetime=self.lifetime)
        payload: dict[str, Any] = {"url": url, "table": table}
        if self.announce_compression:
            payload["compression_format"] = self.compression
        jid: str | None = None
        if self._lose > 0:
            self._lose -= 1
        else:
            jid = self.sim.emit(f"data.{kind}_table_exported", payload)
        export = Export(table, kind, key, url, count, jid, payload)
        self.exports.append(export)
        return export

    # -- the simulator's records as tables --

    def _tables(self, since: dict[str, int] | None = None) -> dict[str, list[dict[str, Any]]]:
        """Every table's rows, or with ``since`` only those with a greater id (the simulator's
        records are kept in id order: a minute's export reads only what is new)."""
        sim = self.sim

        def newer(table: str, records: Any, key: str = "id") -> list[dict[str, Any]]:
            """``records`` (a list or a dict's values, in id order) after ``since[table]``."""
            if since is None:
                return list(records)
            last, out = since[table], []
            for record in reversed(records):
                if record[key] <= last:
                    break
                out.append(record)
            out.reverse()
            return out

        with sim._lock:
            first_seen = sim.now()
            members = sim._members  # normalised email -> member
            for p in sim._petitions.values():
                self._see_petition(p, members, first_seen)
            for slug in sim._calendars:
                if slug not in self._calendars:
                    self._calendars[slug] = {"id": self._take("calendars")}
            petition_ids = {slug: p["id"] for slug, p in sim._petitions.items()}
            calendar_ids = {slug: c["id"] for slug, c in self._calendars.items()}
            events = {slug: e["seq"] for slug, e in sim._events.items()}
            return {
                "signatures": [self._signature(s, petition_ids) for s in
                               newer("signatures", sim._signatures.values())],
                "petitions": [self._petition(p) for p in
                              newer("petitions", sim._petitions.values())],
                "users": newer("users", [dict(u) for u in self._users.values()]),
                "members": [{**m, "organisation_id": self.organisation_id}
                            for m in newer("members", members.values())],
                "categories": newer("categories",
                                    [dict(c) for c in self._categories.values()]),
                "categorized_petitions": newer("categorized_petitions",
                                               [dict(x) for x in self._links.values()]),
                "unsubscribes": [self._unsubscribe(u, members) for u in
                                 newer("unsubscribes", sim._unsubscribes)],
                "calendars": newer("calendars", [
                    {**c, "id": self._calendars[slug]["id"],
                     "organisation_id": self.organisation_id, "launched": True,
                     "partnership_id": None}
                    for slug, c in sim._calendars.items()]),
                "events": [self._event(e, calendar_ids, petition_ids, members)
                           for e in newer("events", sim._events.values(), "seq")],
                "attendees": [self._attendee(a, events) for a in
                              newer("attendees", sim._attendees.values())
                              if not a.get("_deleted")],
            }

    def _take(self, table: str) -> int:
        value = self._next[table]
        self._next[table] = value + 1
        return value

    def _see_petition(self, p: dict[str, Any], members: dict[str, dict[str, Any]],
                      now: datetime) -> None:
        creator = p["creator"]
        email = _norm_email(creator.get("email")) or f"(petition {p['id']})"
        user = self._users.get(email)
        if user is None:
            user = self._users[email] = {"id": self._take("users"), "created_at": p["created_at"],
                                         "organisation_id": self.organisation_id}
        member = members.get(_norm_email(creator.get("email")))
        user.update({
            "email": creator.get("email"), "first_name": creator.get("first_name"),
            "last_name": creator.get("last_name"), "phone_number": creator.get("phone_number"),
            "postcode": creator.get("postcode"),
            "join_organisation": creator.get("join_organisation"),
            "member_id": member["id"] if member else None, "locale": "en",
            "updated_at": max(user.get("updated_at") or p["updated_at"], p["updated_at"]),
        })
        self._petition_users[p["id"]] = email
        wanted = set()
        for name in p["categories"]:
            category = self._categories.get(name)
            if category is None:
                category = self._categories[name] = {
                    "id": self._take("categories"), "name": name, "slug": _slugify(name),
                    "created_at": now, "updated_at": now,
                    "organisation_id": self.organisation_id}
            wanted.add((p["id"], category["id"]))
            if (p["id"], category["id"]) not in self._links:
                self._links[(p["id"], category["id"])] = {
                    "id": self._take("categorized_petitions"), "category_id": category["id"],
                    "petition_id": p["id"], "created_at": now, "updated_at": now}
        for link in [k for k in self._links if k[0] == p["id"] and k not in wanted]:
            del self._links[link]  # a removed category: the row is deleted

    def _signature(self, s: dict[str, Any], petition_ids: dict[str, int]) -> dict[str, Any]:
        row = {k: v for k, v in s.items() if k in _SIGNATURE_CELLS}
        row["petition_id"] = petition_ids[s["petition_slug"]]
        row["cached_organisation_slug"] = self.sim.org_slug
        return row

    def _petition(self, p: dict[str, Any]) -> dict[str, Any]:
        ended = bool(p.get("ended"))
        return {
            "id": p["id"], "title": p["title"], "slug": p["slug"],
            "created_at": p["created_at"], "updated_at": p["updated_at"],
            "user_id": self._users[self._petition_users[p["id"]]]["id"],
            "organisation_id": self.organisation_id, "admin_status": p["admin_status"],
            "launched": bool(p["launched"]), "locale": "en", "hidden": False,
            "ended_at": p["updated_at"] if ended else None,
        }

    def _unsubscribe(self, u: dict[str, Any], members: dict[str, dict[str, Any]]
                     ) -> dict[str, Any]:
        member = members.get(_norm_email(u.get("email")))
        organisation = bool(u["unsubscribe_organisation"])
        return {
            "id": u["id"], "organisation_id": self.organisation_id,
            "member_id": member["id"] if member else None, "email": u["email"],
            "unsubscribe_object": not organisation and u.get("unsubscribable_type") is not None,
            "unsubscribe_organisation": organisation,
            "unsubscribable_type": u.get("unsubscribable_type"),
            "created_at": u["created_at"], "updated_at": u["created_at"],
        }

    def _event(self, e: dict[str, Any], calendar_ids: dict[str, int],
               petition_ids: dict[str, int], members: dict[str, dict[str, Any]]
               ) -> dict[str, Any]:
        location = e.get("location") or {}
        petition = e.get("petition")
        return {
            **{k: e.get(k) for k in ("title", "description", "slug", "start_at", "end_at",
                                     "created_at", "updated_at", "admin_status",
                                     "admin_reason", "administered_at", "max_attendees_count",
                                     "locale", "host_address", "cancelled_at", "launched_at",
                                     "external_action_id", "time_zone", "hidden_at",
                                     "virtual")},
            "id": e["seq"], "organisation_id": self.organisation_id,
            "calendar_id": calendar_ids.get(e["calendar_slug"]) if e["calendar_slug"] else None,
            "petition_id": petition_ids.get(petition) if isinstance(petition, str) else None,
            "extra_location_info": location.get("extra_location_info"),
        }

    def _attendee(self, a: dict[str, Any], events: dict[str, int]) -> dict[str, Any]:
        row = {k: v for k, v in a.items() if k in _ATTENDEE_CELLS}
        row["event_id"] = events[a["event_slug"]]
        return row


_SIGNATURE_CELLS = frozenset(COLUMNS["signatures"]) - {"petition_id", "cached_organisation_slug"}
_ATTENDEE_CELLS = frozenset(COLUMNS["attendees"]) - {"event_id"}
