"""ControlShift bulk data: the export announcements, and their CSV files read as a stream.

ControlShift exports its tables as CSV files (``docs/controlshift-api.md``, "Bulk data as csand
reads it"): every minute the rows inserted since the last export
(``data.incremental_table_exported``), every night a full copy (``data.full_table_exported``).
Each file is announced by a signed webhook carrying a presigned S3 URL that stops working after
some hours. This module holds the pieces later code builds on, none of them tied to storage:

* :func:`parse_export` turns an announcement into an :class:`ExportFile` (or raises
  :class:`BadExport` saying what is wrong);
* :func:`read_rows` downloads one file with a streaming GET, decompresses bzip2 (or gzip) as the
  bytes arrive, decodes UTF-8 and parses the CSV, yielding one ``dict`` per data row. Memory
  stays bounded by a chunk and one record, whatever the file's size. A dropped connection, a
  timeout or a 5xx restarts the download after a backoff (rows already yielded are skipped, so
  each row is yielded once); an expired or refused URL raises :class:`ExportExpired` /
  :class:`ExportGone` at once; a malformed row is reported with its line number and skipped;
* :func:`parse_bool`, :func:`parse_timestamp`, :func:`parse_int` read CSV cells (booleans are
  ``t`` / ``f``, empty is null, timestamps come in more than one form);
* :func:`unsubscribe_row` maps an ``unsubscribes`` row to what an org-wide unsubscribe needs.
"""

from __future__ import annotations

import bz2
import csv
import json
import re
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx

from csand.logs import get_logger
from csand.model import Activity, MalformedRecord, global_unsubscribe_activity, normalize_email
from csand.retry import RetryPolicy

log = get_logger("bulk")

INCREMENTAL = "data.incremental_table_exported"
FULL = "data.full_table_exported"
EXPORT_TYPES: dict[str, Literal["incremental", "full"]] = {INCREMENTAL: "incremental",
                                                           FULL: "full"}

# How long an announced URL works when the URL itself does not say (X-Amz-Date/X-Amz-Expires).
DEFAULT_LIFETIME = timedelta(hours=6)

# A download that failed transiently (5xx, 408, 429, timeouts, dropped connections, a body cut
# short): restarted after 2, 4, 8, 16, 32 s, then ExportUnavailable after 6 tries. No jitter:
# one file, one reader. Well inside a URL's 6-hour life.
BULK_DOWNLOAD = RetryPolicy(base=2.0, factor=2.0, cap=60.0, jitter=0.0, max_attempts=6)

Compression = Literal["bzip2", "gzip", "none"]
_COMPRESSION_NAMES: dict[str, Compression] = {
    "bzip2": "bzip2", "bz2": "bzip2", "bzip": "bzip2",
    "gzip": "gzip", "gz": "gzip",
    "none": "none", "": "none", "plain": "none", "csv": "none",
}
_TABLE_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_FILE_STAMP_RE = re.compile(r"_(\d{14})(?:\.csv)?(?:\.bz2|\.gz)?$")
_BZ2_MAGIC = b"BZh"
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 64 * 1024
_MAX_OUT = 256 * 1024  # decompressed bytes per step: the rows of one step are held at once
_MAX_BAD_ROWS_LOGGED = 20
# Lines held while a quote stays open: past either bound, they go to the CSV reader regardless.
_MAX_OPEN_CHARS = 4 * 1024 * 1024
_MAX_OPEN_LINES = 10_000


# ---------------------------------------------------------------------------- errors


class BulkError(Exception):
    """Anything that stops one export file from being read."""


class BadExport(BulkError, ValueError):
    """An announcement that is not a usable bulk data export; the message says why."""


class ExportGone(BulkError):
    """The file cannot be downloaded and never will be (4xx from S3): only a new announcement
    (the next nightly export) brings its rows. ``code`` and ``message`` are S3's, if any."""

    def __init__(self, url: str, status: int | None, code: str | None, message: str) -> None:
        self.url = url
        self.status = status
        self.code = code
        self.message = message
        where = f"HTTP {status}" if status is not None else "before any request"
        super().__init__(f"{_safe_url(url)}: {where}: {code or 'error'}: {message}")


class ExportExpired(ExportGone):
    """The presigned URL has expired (S3 answers 403 ``Request has expired``), or had before
    the download started."""


class ExportUnavailable(BulkError):
    """Transient failures went on for every try the retry policy allows."""


class ExportCorrupt(BulkError):
    """The whole body arrived but is not a readable file (a broken or truncated compressed
    stream, no header row): downloading it again would give the same bytes."""


# ---------------------------------------------------------------------------- announcements


@dataclass(frozen=True, slots=True)
class ExportFile:
    """One announced export file.

    ``file_key`` (host and path, no signature) names the file for deduplication: a redelivered
    webhook, or the same file announced to two endpoints, has the same key. ``expires_at`` comes
    from the URL's ``X-Amz-Date`` + ``X-Amz-Expires`` when present, else ``received_at`` + 6 h
    (when known). ``exported_at`` is read from the file name's ``_<YYYYMMDDHHMMSS>`` stamp, else
    None: the URL's signing time and the announcement come after the export's snapshot, and a
    time too late would take signatures made during the export for vanished. ``compression`` is None when the announcement does not say (the
    reader then looks at the URL and the first bytes).
    """

    table: str
    kind: Literal["incremental", "full"]
    url: str
    compression: Compression | None
    jid: str | None = None
    exported_at: datetime | None = None
    expires_at: datetime | None = None

    @property
    def file_key(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.netloc}{parts.path}"

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def to_json(self) -> str:
        """A JSON text to keep the record in a store (see :meth:`from_json`)."""
        return json.dumps({
            "table": self.table, "kind": self.kind, "url": self.url,
            "compression": self.compression, "jid": self.jid,
            "exported_at": self.exported_at.isoformat() if self.exported_at else None,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExportFile:
        data = json.loads(text)
        kind = data["kind"]
        if kind not in ("incremental", "full"):
            raise BadExport(f"kind {kind!r} is not incremental or full")
        return cls(table=data["table"], kind=kind, url=data["url"],
                   compression=parse_compression(data.get("compression")),
                   jid=data.get("jid"),
                   exported_at=parse_timestamp(data.get("exported_at")),
                   expires_at=parse_timestamp(data.get("expires_at")))


def parse_export(envelope: bytes | str | dict[str, Any], *,
                 received_at: datetime | None = None) -> ExportFile:
    """An :class:`ExportFile` from a ``data.*_table_exported`` webhook (raw body or decoded).

    Raises :class:`BadExport` for anything else: another event type, a missing or non-string
    ``url`` / ``table``, a URL that is not http(s), a table name that is not a plain identifier,
    an unknown ``compression_format``.
    """
    if isinstance(envelope, bytes | str):
        try:
            envelope = json.loads(envelope)
        except ValueError as exc:
            raise BadExport(f"not JSON: {exc}") from None
    if not isinstance(envelope, dict):
        raise BadExport(f"not an event object ({type(envelope).__name__})")
    type_ = envelope.get("type")
    kind = EXPORT_TYPES.get(type_) if isinstance(type_, str) else None
    if kind is None:
        raise BadExport(f"type {envelope.get('type')!r} is not a bulk data export")
    data = envelope.get("data")
    if not isinstance(data, dict):
        raise BadExport("data is missing or not an object")
    url = data.get("url")
    if not isinstance(url, str) or not url.strip():
        raise BadExport("data.url is missing" if url in (None, "")
                        else f"data.url is not a string ({type(url).__name__})")
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise BadExport(f"data.url is not an http(s) URL: {_safe_url(url)!r}")
    table = data.get("table")
    if not isinstance(table, str) or not table:
        raise BadExport("data.table is missing" if table in (None, "")
                        else f"data.table is not a string ({type(table).__name__})")
    if not _TABLE_RE.match(table):
        raise BadExport(f"data.table {table!r} is not a table name")
    compression = parse_compression(data.get("compression_format"))
    jid = envelope.get("jid")
    signed_at, lifetime = _amz_times(parts.query)
    expires_at = None
    if signed_at is not None and lifetime is not None:
        expires_at = signed_at + lifetime
    elif received_at is not None:
        expires_at = received_at + DEFAULT_LIFETIME
    stamp = _FILE_STAMP_RE.search(parts.path)
    exported_at = None
    if stamp:
        try:
            exported_at = datetime.strptime(stamp.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        except ValueError:
            pass
    return ExportFile(table=table, kind=kind, url=url, compression=compression,
                      jid=str(jid) if jid not in (None, "") else None,
                      exported_at=exported_at, expires_at=expires_at)


def parse_compression(value: Any) -> Compression | None:
    """``compression_format`` as announced (``bzip2``, ``BZIP2``, ``none``...); None when absent."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadExport(f"data.compression_format is not a string ({type(value).__name__})")
    name = _COMPRESSION_NAMES.get(value.strip().lower())
    if name is None:
        raise BadExport(f"data.compression_format {value!r} is not supported "
                        "(bzip2, gzip or none)")
    return name


def _amz_times(query: str) -> tuple[datetime | None, timedelta | None]:
    params = parse_qs(query)
    signed_at = lifetime = None
    raw_date = (params.get("X-Amz-Date") or [None])[0]
    raw_expires = (params.get("X-Amz-Expires") or [None])[0]
    if raw_date:
        try:
            signed_at = datetime.strptime(raw_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            signed_at = None
    if raw_expires and raw_expires.isdigit():
        lifetime = timedelta(seconds=int(raw_expires))
    return signed_at, lifetime


def _safe_url(url: str) -> str:
    """The URL without its query: the signature is a credential for as long as it lives."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.netloc else url[:80]


# ---------------------------------------------------------------------------- cells


def parse_bool(value: str | None) -> bool | None:
    """A boolean cell: ``t`` / ``f`` (also ``true`` / ``false``, ``1`` / ``0``); empty is null."""
    if value is None:
        return None
    text = value.strip().lower()
    if text in ("t", "true", "1"):
        return True
    if text in ("f", "false", "0"):
        return False
    if text == "":
        return None
    raise MalformedRecord(f"{value!r} is not a boolean (t or f)")


def parse_int(value: str | None) -> int | None:
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    if not (text.isdigit() or (text[:1] == "-" and text[1:].isdigit())) or not text.isascii():
        raise MalformedRecord(f"{value!r} is not an integer")
    return int(text)


def parse_timestamp(value: str | None) -> datetime | None:
    """A timestamp cell, as an aware UTC datetime; empty is null.

    Accepts ISO 8601 (``2024-03-01T09:00:00Z``, any offset) and the database's text form
    (``2024-03-01 09:00:00``, with or without fractional seconds, ``+00`` or `` UTC``); a value
    without an offset is UTC.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.endswith(" UTC"):
        text = text[:-4]
    elif text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise MalformedRecord(f"{value!r} is not a timestamp") from None
    return dt.astimezone(UTC) if dt.tzinfo else dt.replace(tzinfo=UTC)


def text(value: str | None) -> str | None:
    """A text cell: empty is null."""
    return value if value else None


# ---------------------------------------------------------------------------- unsubscribes


@dataclass(frozen=True, slots=True)
class UnsubscribeRow:
    """An ``unsubscribes`` row as csand reads it (rows are never updated, only inserted)."""

    id: int
    email: str | None  # normalised
    raw_email: str | None
    organisation: bool  # unsubscribe_organisation: true is org-wide, whatever the type
    unsubscribable_type: str | None
    member_id: int | None
    created_at: datetime | None

    def activity(self) -> Activity:
        """The org-wide unsubscribe, keyed ``unsubscribe:<id>`` like the webhook's."""
        return global_unsubscribe_activity(self.id, self.raw_email, self.created_at)


def unsubscribe_row(row: dict[str, str | None]) -> UnsubscribeRow:
    """Read an ``unsubscribes`` row; raises :class:`MalformedRecord` naming the bad column."""
    try:
        raw_id = row.get("id")
        if raw_id is None or raw_id.strip() == "":
            raise MalformedRecord("id is missing")
        unsubscribe_id = parse_int(raw_id)
        assert unsubscribe_id is not None
    except MalformedRecord as exc:
        raise MalformedRecord(f"id: {exc}") from None
    values: dict[str, Any] = {}
    for column, parse in (("unsubscribe_organisation", parse_bool), ("member_id", parse_int),
                          ("created_at", parse_timestamp)):
        try:
            values[column] = parse(row.get(column))
        except MalformedRecord as exc:
            raise MalformedRecord(f"{column}: {exc}") from None
    raw_email = text(row.get("email"))
    return UnsubscribeRow(
        id=unsubscribe_id,
        email=normalize_email(raw_email),
        raw_email=raw_email,
        organisation=values["unsubscribe_organisation"] is True,
        unsubscribable_type=text(row.get("unsubscribable_type")),
        member_id=values["member_id"],
        created_at=values["created_at"],
    )


def org_wide_unsubscribe(row: dict[str, str | None]) -> UnsubscribeRow | None:
    """The row if it is an org-wide unsubscribe (``unsubscribe_organisation`` true), else None."""
    read = unsubscribe_row(row)
    return read if read.organisation else None


# ---------------------------------------------------------------------------- reading files


@dataclass(frozen=True, slots=True)
class BadRow:
    """A data row that could not be read; it is skipped and the file goes on."""

    line: int  # physical line where the record starts (the header is line 1)
    end_line: int
    reason: str


@dataclass
class ReadStats:
    """What one :func:`read_rows` call did, filled in as it goes."""

    rows: int = 0
    bad_rows: int = 0
    attempts: int = 0
    bytes_downloaded: int = 0  # over every attempt, as sent (compressed)
    compression: Compression | None = None
    columns: tuple[str, ...] = ()
    errors: list[str] = field(default_factory=list)  # the transient errors retried


class _Transient(Exception):
    pass


async def _parsed(response: httpx.Response, parser: _Parser, chunk_size: int,
                  stats: ReadStats) -> AsyncIterator[list[Any]]:
    """The parser's batches of the body as it arrives, then those its end releases."""
    async for chunk in response.aiter_raw(chunk_size):
        stats.bytes_downloaded += len(chunk)
        for batch in parser.feed(chunk):
            yield batch
    for batch in parser.close():
        yield batch


async def read_rows(
    client: httpx.AsyncClient,
    export: ExportFile | str,
    *,
    compression: Compression | None = None,
    on_bad_row: Callable[[BadRow], None] | None = None,
    stats: ReadStats | None = None,
    policy: RetryPolicy = BULK_DOWNLOAD,
    sleep: Callable[[float], Any] = anyio.sleep,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    chunk_size: int = _CHUNK,
) -> AsyncIterator[dict[str, str]]:
    """Yield the data rows of one export file as ``{column: cell}`` (cells as text, empty as
    ``""``: see :func:`text`, :func:`parse_bool`, :func:`parse_timestamp`).

    Streams: nothing is held but one downloaded chunk, the decompressor's state and the rows of
    one decompression step (256 KiB of text), whatever the file's size. A transient failure (connection error, timeout, 5xx, 408, 429, a body cut short)
    restarts the download after ``policy``'s delay, skipping the rows already yielded;
    :class:`ExportUnavailable` once the policy gives up. A 400/403 raises
    :class:`ExportExpired`, a 404/410 :class:`ExportGone` (no retry); so does an ``export``
    whose ``expires_at`` has passed, without a request. A bad row (wrong number of fields,
    broken quoting, invalid UTF-8) goes to ``on_bad_row`` (and the log) and is skipped.
    """
    if isinstance(export, str):
        url, declared, expires_at = export, compression, None
    else:
        url, declared, expires_at = export.url, compression or export.compression, \
            export.expires_at
    stats = stats if stats is not None else ReadStats()
    yielded = 0  # data rows handed out so far: a restarted download skips this many
    reported = 0  # bad rows reported so far (by line): not reported again after a restart
    attempts = 0
    while True:
        if expires_at is not None and now() >= expires_at:
            raise ExportExpired(url, None, "Expired",
                                f"the URL expired at {expires_at.isoformat()}")
        attempts += 1
        stats.attempts = attempts
        seen = 0  # data rows parsed in this attempt (good ones)
        try:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    await _refuse(url, response)
                parser = _Parser(url, declared)
                async with aclosing(_parsed(response, parser, chunk_size, stats)) as batches:
                    async for batch in batches:
                        for item in batch:
                            if type(item) is dict:
                                seen += 1
                                if seen > yielded:
                                    yielded = stats.rows = seen
                                    yield item
                            elif item.line > reported:  # type: ignore[union-attr]
                                reported = item.line  # type: ignore[union-attr]
                                _report(url, item, stats, on_bad_row)  # type: ignore[arg-type]
                stats.compression = parser.compression
                stats.columns = parser.columns
                return
        except (_Transient, httpx.TransportError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            stats.errors.append(reason[:300])
            if policy.gives_up(attempts):
                raise ExportUnavailable(
                    f"{_safe_url(url)}: {attempts} tries failed, the last: {reason}") from exc
            delay = policy.delay(attempts)
            log.warning("bulk.download_retry", url=_safe_url(url), attempt=attempts,
                        rows_so_far=yielded, error=reason[:300], retry_in_s=delay)
            await sleep(delay)


def _report(url: str, bad: BadRow, stats: ReadStats,
            on_bad_row: Callable[[BadRow], None] | None) -> None:
    stats.bad_rows += 1
    if stats.bad_rows <= _MAX_BAD_ROWS_LOGGED:
        log.warning("bulk.bad_row", url=_safe_url(url), line=bad.line, reason=bad.reason)
    if on_bad_row is not None:
        on_bad_row(bad)


_S3_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_S3_MESSAGE = re.compile(rb"<Message>([^<]{1,300})</Message>")


async def _refuse(url: str, response: httpx.Response) -> None:
    """Raise the error a non-200 answer means (reading at most 4 KiB of its body)."""
    status = response.status_code
    body = b""
    try:
        if response.is_stream_consumed:  # already read (a test's in-memory response)
            body = response.content[:4096]
        else:
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) >= 4096:
                    break
    except httpx.TransportError:
        pass
    code_match, message_match = _S3_CODE.search(body), _S3_MESSAGE.search(body)
    code = code_match.group(1).decode("utf-8", "replace") if code_match else None
    message = (message_match.group(1).decode("utf-8", "replace") if message_match
               else body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}")
    if status >= 500 or status in (408, 429):
        raise _Transient(f"HTTP {status}: {code or ''} {message}".strip())
    if status in (400, 403):
        raise ExportExpired(url, status, code, message)
    raise ExportGone(url, status, code, message)


class _Parser:
    """Bytes in, rows (dicts) and :class:`BadRow` out: decompress, split lines, decode, CSV.

    Lines are split on ``\\n`` in bytes, so an invalid UTF-8 sequence is pinned to its line and
    only the record holding it is lost; the CSV reader gets the lines with their terminators, so
    quoted fields keep embedded newlines. The reader is strict: text after a closing quote, or
    a quote still open at the end of the file, makes a bad row rather than a guess.
    """

    def __init__(self, url: str, declared: Compression | None) -> None:
        self.url = url
        self.declared = declared
        self.compression: Compression | None = None
        self._head = b""  # the first bytes, until the format is known
        self._bz2: Any = None
        self._gzip: Any = None
        self._tail = b""  # bytes after the last newline
        self._pending: list[str] = []  # decoded lines not yet parsed
        self._pending_chars = 0
        self._parity = 0  # quote characters in _pending, modulo 2
        self._boundary = 0  # lines of _pending that end whole records
        self._line_no = 0  # physical lines parsed so far
        self._bad_lines: set[int] = set()
        self._header: list[str] | None = None
        self.columns: tuple[str, ...] = ()

    # -- decompression --

    def _choose(self, head: bytes) -> None:
        if head.startswith(_BZ2_MAGIC) and len(head) >= 4 and head[3:4] in b"123456789":
            found: Compression = "bzip2"
        elif head.startswith(_GZIP_MAGIC):
            found = "gzip"
        else:
            found = "none"
        if self.declared is not None and self.declared != found:
            log.warning("bulk.compression_mismatch", url=_safe_url(self.url),
                        announced=self.declared, found=found)
        self.compression = found
        if found == "bzip2":
            self._bz2 = bz2.BZ2Decompressor()
        elif found == "gzip":
            self._gzip = zlib.decompressobj(wbits=47)

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        if self.compression == "none":
            if data:
                yield data
            return
        while True:
            if self.compression == "bzip2":
                dec = self._bz2
                if dec.eof:  # concatenated streams (pbzip2, or several files appended)
                    data = dec.unused_data + data
                    if not data:
                        return
                    self._bz2 = dec = bz2.BZ2Decompressor()
                try:
                    out = dec.decompress(data, _MAX_OUT)
                except (OSError, EOFError) as exc:
                    raise ExportCorrupt(f"{_safe_url(self.url)}: bzip2: {exc}") from None
                data = b""
                if out:
                    yield out
                if dec.eof:
                    if not dec.unused_data:
                        return
                    continue
                if dec.needs_input:
                    return
            else:
                dec = self._gzip
                try:
                    out = dec.decompress(data, _MAX_OUT)
                except zlib.error as exc:
                    raise ExportCorrupt(f"{_safe_url(self.url)}: gzip: {exc}") from None
                data = dec.unconsumed_tail
                if out:
                    yield out
                if dec.eof and dec.unused_data:
                    data = dec.unused_data
                    self._gzip = zlib.decompressobj(wbits=47)
                    continue
                if not data:
                    return

    # -- lines and rows --

    def feed(self, chunk: bytes) -> Iterator[list[dict[str, str] | BadRow]]:
        """The rows completed by ``chunk``, in batches (one per decompressed piece)."""
        if self.compression is None:
            self._head += chunk
            if len(self._head) < 10:
                return
            self._choose(self._head)
            chunk, self._head = self._head, b""
        for data in self._inflate(chunk):
            batch = self._take(data)
            if batch:
                yield batch

    def close(self) -> Iterator[list[dict[str, str] | BadRow]]:
        """The last rows, once the body has ended; raises :class:`ExportCorrupt` if the file
        is cut short or has no header."""
        if self.compression is None:
            self._choose(self._head)
            chunk, self._head = self._head, b""
            for data in self._inflate(chunk):
                batch = self._take(data)
                if batch:
                    yield batch
        if self.compression == "bzip2" and not self._bz2.eof:
            raise ExportCorrupt(f"{_safe_url(self.url)}: the bzip2 stream is cut short")
        if self.compression == "gzip" and not self._gzip.eof:
            raise ExportCorrupt(f"{_safe_url(self.url)}: the gzip stream is cut short")
        if self._tail:
            self._add_lines(self._tail, terminated=False)
            self._tail = b""
        self._boundary = len(self._pending)
        yield self._rows()
        if self._header is None:
            raise ExportCorrupt(f"{_safe_url(self.url)}: empty file, no header row")

    def _take(self, data: bytes) -> list[dict[str, str] | BadRow]:
        data = self._tail + data if self._tail else data
        cut = data.rfind(b"\n")
        if cut < 0:
            self._tail = data
            return []
        self._tail = data[cut + 1:]
        self._add_lines(data[: cut + 1], terminated=True)
        return self._rows() if self._boundary else []

    def _add_lines(self, block: bytes, *, terminated: bool) -> None:
        """Decode ``block`` (whole lines; the last one unterminated unless ``terminated``) into
        ``_pending``, noting the lines that are not UTF-8 and where records may end."""
        try:
            parts = block.decode("utf-8").split("\n")
            bad: list[bool] | None = None
        except UnicodeDecodeError:
            raw_parts = block.split(b"\n")
            parts, bad = [], []
            for raw in raw_parts:
                try:
                    parts.append(raw.decode("utf-8"))
                    bad.append(False)
                except UnicodeDecodeError:
                    parts.append(raw.decode("utf-8", "replace"))
                    bad.append(True)
        if terminated:
            parts.pop()  # the "" after the block's final newline
        pending = self._pending
        parity = self._parity
        for i, part in enumerate(parts):
            line = part + "\n" if terminated or i < len(parts) - 1 else part
            pending.append(line)
            self._pending_chars += len(line)
            if bad is not None and bad[i]:
                self._bad_lines.add(self._line_no + len(pending))
            if '"' in line:
                parity ^= line.count('"') & 1
            if not parity:
                self._boundary = len(pending)
        self._parity = parity
        if (self._pending_chars > _MAX_OPEN_CHARS
                or len(pending) - self._boundary > _MAX_OPEN_LINES):
            # A stray quote keeps the count odd: hand the lines over anyway, the CSV reader's
            # own rules decide (and a field beyond csv.field_size_limit() is a bad row).
            self._boundary, self._parity = len(pending), 0

    def _rows(self) -> list[dict[str, str] | BadRow]:
        """Parse the lines of _pending that end whole records, so the reader never runs out of
        lines inside a quoted field."""
        batch = self._pending[: self._boundary]
        self._pending = self._pending[self._boundary:]
        self._pending_chars = sum(len(line) for line in self._pending)
        self._boundary = 0
        base = self._line_no
        self._line_no += len(batch)
        out: list[dict[str, str] | BadRow] = []
        reader = csv.reader(batch, strict=True)
        header = self._header
        width = len(header) if header is not None else 0
        bad_lines = self._bad_lines
        prev = 0  # reader.line_num after the previous record
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return out
            except csv.Error as exc:
                start, prev = base + prev + 1, reader.line_num
                out.append(BadRow(start, base + prev, f"CSV: {exc}"))
                continue
            if len(fields) == width and width and not bad_lines:  # the common case, kept short
                prev = reader.line_num
                out.append(dict(zip(header, fields, strict=False)))  # type: ignore[arg-type]
                continue
            start, prev = base + prev + 1, reader.line_num
            end = base + prev
            if bad_lines and any(start <= n <= end for n in bad_lines):
                self._bad_lines = bad_lines = {n for n in bad_lines if n > end}
                if header is None:
                    raise ExportCorrupt(f"{_safe_url(self.url)}: the header is not UTF-8")
                out.append(BadRow(start, end, "not valid UTF-8"))
                continue
            if header is None:
                if fields and fields[0].startswith("\ufeff"):
                    fields[0] = fields[0][1:]
                if not fields or any(not name for name in fields):
                    raise ExportCorrupt(f"{_safe_url(self.url)}: bad header row {fields!r}"[:300])
                if len(set(fields)) != len(fields):
                    raise ExportCorrupt(f"{_safe_url(self.url)}: duplicate columns in header")
                self._header = header = fields
                width = len(fields)
                self.columns = tuple(fields)
                continue
            if not fields:  # a blank line
                continue
            if len(fields) != width:
                out.append(BadRow(start, end, f"{len(fields)} fields, the header has {width}"))
                continue
            out.append(dict(zip(header, fields, strict=False)))
