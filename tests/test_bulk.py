"""Bulk data: announcements, cells, unsubscribes rows, and the streaming reader (against
in-memory transports; tests/sim/test_exports.py reads the simulator's files over HTTP)."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csand.controlshift.bulk import (
    BULK_DOWNLOAD,
    BadExport,
    BadRow,
    ExportCorrupt,
    ExportExpired,
    ExportFile,
    ExportGone,
    ExportUnavailable,
    ReadStats,
    org_wide_unsubscribe,
    parse_bool,
    parse_export,
    parse_int,
    parse_timestamp,
    read_rows,
    unsubscribe_row,
)
from csand.model import ActivityKind, MalformedRecord
from csand.retry import RetryPolicy

S3 = ("https://cs-exports.s3.amazonaws.com/demo/incremental/signatures/20241001/"
      "signatures_20241001120102.csv.bz2")
SIGNED = (S3 + "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=K%2F20241001%2Fus-east-1"
          "%2Fs3%2Faws4_request&X-Amz-Date=20241001T120110Z&X-Amz-Expires=21600"
          "&X-Amz-SignedHeaders=host&X-Amz-Signature=abc123")
NO_WAIT = RetryPolicy(base=0.0, factor=1.0, cap=0.0, jitter=0.0, max_attempts=4)


def hook(type_: str = "data.incremental_table_exported", **data: Any) -> dict[str, Any]:
    body = {"url": SIGNED, "table": "signatures", "compression_format": "bzip2"}
    body.update(data)
    return {"type": type_, "data": {k: v for k, v in body.items() if v is not ...},
            "jid": "j1"}


# ---------------------------------------------------------------------------- announcements


def test_parse_export_reads_the_documented_payload() -> None:
    export = parse_export(hook())
    assert export.table == "signatures" and export.kind == "incremental"
    assert export.url == SIGNED and export.compression == "bzip2" and export.jid == "j1"
    assert export.exported_at == datetime(2024, 10, 1, 12, 1, 2, tzinfo=UTC)
    assert export.expires_at == datetime(2024, 10, 1, 18, 1, 10, tzinfo=UTC)
    assert export.file_key == S3.removeprefix("https://")
    assert export.expired(datetime(2024, 10, 1, 18, 1, 10, tzinfo=UTC))
    assert not export.expired(datetime(2024, 10, 1, 18, 1, 9, tzinfo=UTC))
    full = parse_export(hook("data.full_table_exported"))
    assert full.kind == "full" and full.file_key == export.file_key


def test_export_file_round_trips_through_json() -> None:
    for export in (parse_export(hook()), parse_export(hook(url="https://h/x.csv",
                                                              compression_format=...))):
        assert ExportFile.from_json(export.to_json()) == export


def test_parse_export_from_raw_bytes_with_json_escaped_url() -> None:
    body = json.dumps(hook()).replace("&", "\\u0026").encode()
    assert b"\\u0026" in body
    assert parse_export(body).url == SIGNED


def test_parse_export_without_amz_times_uses_receipt() -> None:
    received = datetime(2024, 10, 2, 3, 0, tzinfo=UTC)
    export = parse_export(hook(url="https://h.example/x/users.csv", compression_format=...),
                          received_at=received)
    assert export.compression is None
    assert export.expires_at == received + timedelta(hours=6)
    assert export.exported_at is None
    assert parse_export(hook(url="https://h.example/x/users.csv")).expires_at is None


@pytest.mark.parametrize(("value", "expected"), [
    ("bzip2", "bzip2"), ("BZIP2", "bzip2"), ("none", "none"), ("", "none"), (None, None),
    ("gzip", "gzip"),
])
def test_parse_export_compression(value: str | None, expected: str | None) -> None:
    assert parse_export(hook(compression_format=value)).compression == expected


@pytest.mark.parametrize(("envelope", "message"), [
    (b"not json", "not JSON"),
    ([1], "not an event object"),
    ({"type": "signature.created", "data": {}}, "is not a bulk data export"),
    ({"type": ["data.full_table_exported"], "data": {}}, "is not a bulk data export"),
    ({"data": {}}, "type None is not a bulk data export"),
    ({"type": "data.full_table_exported"}, "data is missing"),
    (hook(url=...), "data.url is missing"),
    (hook(url=""), "data.url is missing"),
    (hook(url=5), "data.url is not a string (int)"),
    (hook(url="ftp://h/x.csv"), "not an http(s) URL"),
    (hook(url="/relative/x.csv"), "not an http(s) URL"),
    (hook(table=...), "data.table is missing"),
    (hook(table=["x"]), "data.table is not a string (list)"),
    (hook(table="signatures; drop"), "is not a table name"),
    (hook(compression_format="zip"), "'zip' is not supported"),
    (hook(compression_format=True), "compression_format is not a string (bool)"),
])
def test_parse_export_rejects(envelope: Any, message: str) -> None:
    with pytest.raises(BadExport, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_export(envelope)


def test_bad_export_message_hides_the_signature() -> None:
    with pytest.raises(BadExport) as caught:
        parse_export(hook(url="ftp://h/x.csv?X-Amz-Signature=secret"))
    assert "secret" not in str(caught.value)


# ---------------------------------------------------------------------------- cells


@pytest.mark.parametrize(("cell", "expected"), [
    ("t", True), ("f", False), ("true", True), ("FALSE", False), ("1", True), ("0", False),
    ("", None), (None, None), (" t ", True),
])
def test_parse_bool(cell: str | None, expected: bool | None) -> None:
    assert parse_bool(cell) is expected


@pytest.mark.parametrize("cell", ["yes", "tt", "2", "null"])
def test_parse_bool_rejects(cell: str) -> None:
    with pytest.raises(MalformedRecord, match="is not a boolean"):
        parse_bool(cell)


AT = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(("cell", "expected"), [
    ("2024-03-01 09:00:00", AT),
    ("2024-03-01 09:00:00.5", AT + timedelta(milliseconds=500)),
    ("2024-03-01 09:00:00.123456", AT + timedelta(microseconds=123456)),
    ("2024-03-01 09:00:00 UTC", AT),
    ("2024-03-01 09:00:00+00", AT),
    ("2024-03-01T09:00:00Z", AT),
    ("2024-03-01T09:00:00.000Z", AT),
    ("2024-03-01T11:00:00+02:00", AT),
    ("2024-03-01T09:00:00", AT),
    ("", None),
    (None, None),
])
def test_parse_timestamp(cell: str | None, expected: datetime | None) -> None:
    assert parse_timestamp(cell) == expected


@pytest.mark.parametrize("cell", ["yesterday", "2024-13-01 00:00:00", "01/03/2024"])
def test_parse_timestamp_rejects(cell: str) -> None:
    with pytest.raises(MalformedRecord, match="is not a timestamp"):
        parse_timestamp(cell)


def test_parse_int() -> None:
    assert parse_int("42") == 42 and parse_int("-3") == -3 and parse_int("") is None
    for bad in ("4.2", "x", "١٢"):
        with pytest.raises(MalformedRecord):
            parse_int(bad)


# ---------------------------------------------------------------------------- unsubscribes


def unsub(**cells: str) -> dict[str, str]:
    row = {"id": "17", "organisation_id": "1", "member_id": "5", "email": " Dee@X.org ",
           "unsubscribe_object": "f", "unsubscribe_organisation": "t",
           "unsubscribable_id": "", "unsubscribable_type": "Organisation",
           "created_at": "2024-03-01 09:00:00", "updated_at": "2024-03-01 09:00:00"}
    row.update(cells)
    return row


def test_unsubscribe_row_org_wide() -> None:
    read = unsubscribe_row(unsub())
    assert (read.id, read.email, read.raw_email, read.organisation, read.member_id,
            read.unsubscribable_type, read.created_at) == (
        17, "dee@x.org", " Dee@X.org ", True, 5, "Organisation", AT)
    activity = read.activity()
    assert activity.kind is ActivityKind.GLOBAL_UNSUBSCRIBE
    assert activity.source_key == "unsubscribe:17"  # as the unsubscribe.created webhook's
    assert activity.email == "dee@x.org" and activity.occurred_at == AT
    assert org_wide_unsubscribe(unsub()) == read


@pytest.mark.parametrize("cells", [
    {"unsubscribe_organisation": "f", "unsubscribable_type": "Signature"},
    {"unsubscribe_organisation": "", "unsubscribable_type": "PartnershipSubscription"},
])
def test_unsubscribe_row_not_org_wide(cells: dict[str, str]) -> None:
    assert unsubscribe_row(unsub(**cells)).organisation is False
    assert org_wide_unsubscribe(unsub(**cells)) is None


def test_unsubscribe_row_of_any_type_with_the_flag_is_org_wide() -> None:
    assert org_wide_unsubscribe(unsub(unsubscribable_type="Signature")) is not None


@pytest.mark.parametrize(("cells", "message"), [
    ({"id": ""}, "id: id is missing"),
    ({"id": "x"}, "id: 'x' is not an integer"),
    ({"unsubscribe_organisation": "maybe"}, "unsubscribe_organisation: 'maybe' is not"),
    ({"created_at": "soon"}, "created_at: 'soon' is not a timestamp"),
    ({"member_id": "m"}, "member_id: 'm' is not an integer"),
])
def test_unsubscribe_row_malformed(cells: dict[str, str], message: str) -> None:
    with pytest.raises(MalformedRecord, match=message):
        unsubscribe_row(unsub(**cells))


def test_unsubscribe_row_without_email_or_time() -> None:
    read = unsubscribe_row(unsub(email="", created_at=""))
    assert read.email is None and read.created_at is None


# ---------------------------------------------------------------------------- the reader


class Chunks(httpx.AsyncByteStream):
    """``data`` in chunks of the given sizes (cycled); ``drop_at``: raise a read error once
    that many bytes have gone out."""

    def __init__(self, data: bytes, sizes: Sequence[int] = (4096,),
                 drop_at: int | None = None) -> None:
        self.data, self.sizes, self.drop_at = data, sizes, drop_at

    async def __aiter__(self) -> AsyncIterator[bytes]:
        at, i = 0, 0
        while at < len(self.data):
            size = self.sizes[i % len(self.sizes)]
            i += 1
            if self.drop_at is not None and at + size >= self.drop_at:
                yield self.data[at:self.drop_at]
                raise httpx.ReadError("peer closed connection")
            yield self.data[at:at + size]
            at += size


Answer = Callable[[int], httpx.Response]  # attempt number (1-based) -> response


def serve(answer: Answer) -> tuple[httpx.AsyncClient, list[int]]:
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(len(attempts) + 1)
        return answer(len(attempts))

    return httpx.AsyncClient(transport=httpx.MockTransport(handler)), attempts


def ok(data: bytes, sizes: Sequence[int] = (4096,), drop_at: int | None = None
       ) -> httpx.Response:
    return httpx.Response(200, stream=Chunks(data, sizes, drop_at))


def to_csv(header: Sequence[str], rows: Sequence[Sequence[str]], lineterminator: str = "\n"
           ) -> bytes:
    """CSV as ControlShift's Ruby writer makes it: a cell holding a comma, quote, CR or LF is
    quoted (Python's writer leaves a lone CR unquoted unless lines end in CRLF)."""
    if lineterminator == "\r\n":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator=lineterminator)
        writer.writerow(header)
        writer.writerows(rows)
        return out.getvalue().encode("utf-8")

    def line(cells: Sequence[str]) -> str:
        if len(cells) == 1 and cells[0] == "":
            return '""\n'
        return ",".join('"' + c.replace('"', '""') + '"' if any(x in c for x in ',"\r\n')
                        else c for c in cells) + "\n"

    return "".join(line(cells) for cells in [header, *rows]).encode("utf-8")


def pack(data: bytes, compression: str) -> bytes:
    if compression == "bzip2":
        return bz2.compress(data)
    if compression == "gzip":
        return gzip.compress(data)
    return data


async def collect(client: httpx.AsyncClient, url: str = S3, **kw: Any
                  ) -> tuple[list[dict[str, str]], list[BadRow], ReadStats]:
    bad: list[BadRow] = []
    stats = ReadStats()
    kw.setdefault("policy", NO_WAIT)
    async with client:
        rows = [row async for row in read_rows(client, url, on_bad_row=bad.append,
                                               stats=stats, **kw)]
    return rows, bad, stats


cell_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                           blacklist_characters="\x00"), max_size=40)
special = st.sampled_from(["", ",", '"', '""', "\n", "\r\n", "a,b", 'say "hi"', "multi\nline",
                           "é", "日本", "🙂", " lead", "trail ", "\ufeff", "t", "f"])


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[str], list[list[str]]]:
    width = draw(st.integers(1, 6))
    header = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True),
                           min_size=width, max_size=width, unique=True))
    rows = draw(st.lists(st.lists(st.one_of(cell_text, special), min_size=width,
                                  max_size=width), max_size=30))
    return header, rows


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=tables(), compression=st.sampled_from(["bzip2", "gzip", "none"]),
       sizes=st.lists(st.integers(1, 700), min_size=1, max_size=5),
       announce=st.booleans(), crlf=st.booleans())
@pytest.mark.anyio
async def test_round_trip_any_rows_any_chunks(
    table: tuple[list[str], list[list[str]]], compression: str, sizes: list[int],
    announce: bool, crlf: bool,
) -> None:
    header, rows = table
    data = pack(to_csv(header, rows, "\r\n" if crlf else "\n"), compression)
    client, _ = serve(lambda attempt: ok(data, sizes))
    got, bad, stats = await collect(client, compression=compression if announce else None)
    # A row of one empty cell is written as "" and comes back as such; no row is lost.
    assert got == [dict(zip(header, row, strict=True)) for row in rows]
    assert bad == [] and stats.rows == len(rows) and stats.compression == compression


@pytest.mark.anyio
async def test_compression_found_by_magic_whatever_was_announced() -> None:
    data = to_csv(["id"], [["1"], ["2"]])
    for body, announced in ((bz2.compress(data), "none"), (data, "bzip2"),
                            (gzip.compress(data), None)):
        client, _ = serve(lambda attempt, body=body: ok(body, (3,)))
        got, _, _ = await collect(client, compression=announced)
        assert got == [{"id": "1"}, {"id": "2"}]


@pytest.mark.anyio
async def test_concatenated_bzip2_streams_and_bom() -> None:
    body = bz2.compress("\ufeffid,name\n1,a\n".encode()) + bz2.compress(b"2,b\n")
    client, _ = serve(lambda attempt: ok(body, (5,)))
    got, _, stats = await collect(client)
    assert got == [{"id": "1", "name": "a"}, {"id": "2", "name": "b"}]
    assert stats.columns == ("id", "name")


@pytest.mark.anyio
async def test_bad_rows_are_reported_by_line_and_skipped() -> None:
    body = (b'id,email,note\n'
            b'1,a@x,"two\nlines"\n'          # lines 2-3
            b'2,b@x\n'                       # line 4: a field short
            b'3,c@x,\xff\xfe bad bytes\n'    # line 5: not UTF-8
            b'4,d@x,"ok, fine"\n'            # line 6
            b'5,e@x,fine,extra\n'            # line 7: a field too many
            b'6,f@x,"never closed\n')        # line 8: quote open at the end
    client, _ = serve(lambda attempt: ok(body, (7,)))
    got, bad, stats = await collect(client)
    assert [r["id"] for r in got] == ["1", "4"]
    assert got[0]["note"] == "two\nlines"
    assert [(b.line, b.end_line) for b in bad] == [(4, 4), (5, 5), (7, 7), (8, 8)]
    assert "unexpected end of data" in bad[3].reason
    assert "2 fields, the header has 3" in bad[0].reason
    assert bad[1].reason == "not valid UTF-8"
    assert "4 fields" in bad[2].reason
    assert stats.bad_rows == 4 and stats.rows == 2


@pytest.mark.anyio
async def test_oversized_field_is_a_bad_row_not_the_end() -> None:
    body = b"id,note\n1,\"" + b"x" * 200_000 + b"\"\n2,ok\n"
    client, _ = serve(lambda attempt: ok(body))
    got, bad, _ = await collect(client)
    assert got == [{"id": "2", "note": "ok"}]
    assert len(bad) == 1 and "field larger than field limit" in bad[0].reason


@pytest.mark.anyio
async def test_stray_quote_in_unquoted_field_is_kept() -> None:
    body = b'id,name\n1,O"Brien\n2,plain\n3,x\n'
    client, _ = serve(lambda attempt: ok(body, (4,)))
    got, bad, _ = await collect(client)
    assert got == [{"id": "1", "name": 'O"Brien'}, {"id": "2", "name": "plain"},
                   {"id": "3", "name": "x"}]
    assert bad == []


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "body", "error", "code"), [
    (403, b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Request has expired"
          b"</Message></Error>", ExportExpired, "AccessDenied"),
    (400, b"<Error><Code>ExpiredToken</Code><Message>The provided token has expired."
          b"</Message></Error>", ExportExpired, "ExpiredToken"),
    (404, b"<Error><Code>NoSuchKey</Code><Message>The specified key does not exist."
          b"</Message></Error>", ExportGone, "NoSuchKey"),
    (410, b"gone", ExportGone, None),
])
async def test_refusals_are_final(status: int, body: bytes, error: type[Exception],
                                  code: str | None) -> None:
    client, attempts = serve(lambda attempt: httpx.Response(status, content=body))
    with pytest.raises(error) as caught:
        await collect(client, SIGNED)
    assert attempts == [1]
    assert caught.value.code == code  # type: ignore[attr-defined]
    assert caught.value.status == status  # type: ignore[attr-defined]
    assert "abc123" not in str(caught.value)  # the signature is not logged


@pytest.mark.anyio
async def test_transient_failures_are_retried_then_given_up() -> None:
    data = to_csv(["id"], [["1"]])
    answers = {1: httpx.Response(503), 2: httpx.Response(500), 3: httpx.Response(429)}
    client, attempts = serve(lambda attempt: answers.get(attempt) or ok(data))
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    got, _, stats = await collect(client, policy=BULK_DOWNLOAD, sleep=sleep)
    assert got == [{"id": "1"}] and attempts == [1, 2, 3, 4]
    assert waits == [2.0, 4.0, 8.0]
    assert stats.attempts == 4 and len(stats.errors) == 3

    client, attempts = serve(lambda attempt: httpx.Response(502))
    with pytest.raises(ExportUnavailable, match="4 tries failed"):
        await collect(client)
    assert len(attempts) == 4


@pytest.mark.anyio
async def test_connection_errors_are_transient() -> None:
    data = to_csv(["id"], [["1"]])

    def answer(attempt: int) -> httpx.Response:
        if attempt == 1:
            raise httpx.ConnectError("refused")
        if attempt == 2:
            raise httpx.ReadTimeout("slow")
        return ok(data)

    client, attempts = serve(answer)
    got, _, stats = await collect(client)
    assert got == [{"id": "1"}] and len(attempts) == 3
    assert stats.errors[0].startswith("ConnectError") and stats.errors[1].startswith("ReadTimeout")


@pytest.mark.anyio
@pytest.mark.parametrize("compression", ["none", "bzip2"])
async def test_mid_stream_disconnect_restarts_and_yields_each_row_once(compression: str) -> None:
    rows = [[str(i), f"name {i}", "bad" if i == 3 else "x"] for i in range(1, 2001)]
    rows[2] = ["3", "short"]  # a bad row before the cut: reported once, not once per try
    data = pack(to_csv(["id", "name", "note"], rows), compression)
    cuts = {1: len(data) // 3, 2: len(data) // 2}
    client, attempts = serve(lambda attempt: ok(data, (1000,), cuts.get(attempt)))
    got, bad, stats = await collect(client)
    assert [r["id"] for r in got] == [str(i) for i in range(1, 2001) if i != 3]
    assert [b.line for b in bad] == [4]
    assert len(attempts) == 3 and stats.attempts == 3


@pytest.mark.anyio
async def test_expired_before_the_request() -> None:
    export = parse_export(hook())
    client, attempts = serve(lambda attempt: ok(b"id\n1\n"))
    with pytest.raises(ExportExpired, match="expired at 2024-10-01T18:01:10"):
        await collect(client, export,  # type: ignore[arg-type]
                      now=lambda: datetime(2024, 10, 1, 18, 2, tzinfo=UTC))
    assert attempts == []


@pytest.mark.anyio
@pytest.mark.parametrize(("body", "message"), [
    (b"", "empty file"),
    (bz2.compress(b"id\n1\n2\n")[:-10], "cut short"),
    (b"BZh91AY&SY" + b"\x00" * 50, "bzip2"),
    (b"\x1f\x8b" + b"\x00" * 30, "gzip"),
    (b"id,id\n1,2\n", "duplicate columns"),
    (b",a\n1,2\n", "bad header"),
])
async def test_unreadable_files(body: bytes, message: str) -> None:
    client, attempts = serve(lambda attempt: ok(body))
    with pytest.raises(ExportCorrupt, match=message):
        await collect(client)
    assert attempts == [1]


PAD = "a long line " * 40  # 480 characters: a row is about 530 bytes


class Generated(httpx.AsyncByteStream):
    """A bzip2 CSV made while it is sent: the test holds no more of it than the reader."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    async def __aiter__(self) -> AsyncIterator[bytes]:
        packer = bz2.BZ2Compressor(1)
        yield packer.compress(b"id,email,note\n")
        for start in range(0, self.rows, 100):
            block = "".join(f'{i},user{i}@example.org,"note {i}, with ""quotes""\nand {PAD}"\n'
                            for i in range(start, min(start + 100, self.rows)))
            out = packer.compress(block.encode())
            if out:
                yield out
        yield packer.flush()


async def peak_heap(rows: int) -> int:
    import tracemalloc

    count = 0
    client, _ = serve(lambda attempt: httpx.Response(200, stream=Generated(rows)))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        async with client:
            async for _row in read_rows(client, S3, policy=NO_WAIT):
                count += 1
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert count == rows
    return peak


@pytest.mark.anyio
async def test_memory_stays_bounded_whatever_the_file_size() -> None:
    small, large = await peak_heap(1_500), await peak_heap(6_000)  # 0.8 and 3.2 MB of CSV
    # The decompressor's own state (traced too) and one step's rows, not the file.
    assert large < 3 * 2**20, f"peak heap {large / 2**20:.1f} MiB"
    assert large < small * 1.3, (small, large)
