"""Bulk data as a source: every announced export file recorded, then processed once in its life.

ControlShift announces each export file with a signed webhook (``data.incremental_table_exported``
each minute, ``data.full_table_exported`` each night) carrying a presigned URL that works for
some hours. :func:`announce` records the file in the store's ``bulk_files`` before the webhook is
acknowledged, so an announcement ControlShift saw answered 200 is never lost.
:class:`BulkIngest` (a daemon task) then claims due files one at a time, streams each through
:func:`csand.controlshift.bulk.read_rows` and hands its rows, :data:`BATCH_ROWS` at a time, to
the handler registered for its table (:class:`TableHandlers`). What a batch produced and how
many rows of the file are done are committed together (``commit_poll(bulk_progress=...)``): a
crash in the middle of a file goes on after the last batch committed on restart, and the outbox
dedupe makes re-reading a batch enqueue nothing twice.

Retries are data: a transient failure puts the file back with ``next_attempt_at`` in its row
(:data:`csand.retry.BULK_FILES`); a file whose URL expired before it was read is marked
``expired``, counted, logged and shown by ``csand status`` (the next nightly full export carries
its rows); a file that can never be read (404, a corrupt body) is ``failed``. Files of tables no
handler consumes are marked ``skipped`` without a download.

Registered today: ``unsubscribes`` (org-wide unsubscribes, :func:`unsubscribes_handler`), unless
``controlshift.global_unsubscribes`` is false. A handler is ``async (rows, file) -> Batch``: it
maps the rows of one batch to the activities (and dead letters, and any other
``commit_poll`` arguments) that batch commits.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx

from csand import metrics
from csand.controlshift.bulk import (
    BULK_DOWNLOAD,
    BadExport,
    BulkError,
    ExportCorrupt,
    ExportExpired,
    ExportFile,
    ExportGone,
    ExportUnavailable,
    ReadStats,
    org_wide_unsubscribe,
    parse_export,
    read_rows,
)
from csand.logs import get_logger
from csand.model import Activity, DeadLetter, MalformedRecord, dead_letter
from csand.retry import BULK_FILES, RetryPolicy
from csand.storage import BulkFile, Storage
from csand.storage.bulk import file_name

log = get_logger("bulk")

# Rows per commit: one transaction per batch, never one per row.
BATCH_ROWS = 500

Row = dict[str, str]


@dataclass(frozen=True, slots=True)
class Batch:
    """What one batch of rows commits: activities, dead letters, and any other keyword argument
    of :meth:`csand.storage.Outbox.commit_poll` (``signatures``, ``deleted_sources``...)."""

    activities: Sequence[Activity] = ()
    dead_letters: Sequence[DeadLetter] = ()
    commit: Mapping[str, Any] = field(default_factory=dict)


TableHandler = Callable[[list[Row], BulkFile], Awaitable[Batch]]
FileFinisher = Callable[[BulkFile], Awaitable[Any]]


class TableHandlers:
    """Which tables csand consumes, and how: table name → async row handler, for incremental
    files, full files or both. Files of any other table are recorded and skipped."""

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str], TableHandler] = {}
        self._finishers: dict[tuple[str, str], FileFinisher] = {}
        self.settlers: list[Callable[[], Awaitable[Any]]] = []

    def register(self, table: str, handler: TableHandler,
                 kinds: Iterable[str] = ("incremental", "full"),
                 finish: FileFinisher | None = None) -> None:
        """``finish`` runs once every row of a file was handled, before the file is done (again
        after a crash there: it must be idempotent)."""
        for kind in kinds:
            self._handlers[(table, kind)] = handler
            if finish is not None:
                self._finishers[(table, kind)] = finish

    def on_settle(self, settle: Callable[[], Awaitable[Any]]) -> None:
        """``settle`` runs when the files due are all processed (and at start-up): the moment
        rows of one minute's files of different tables can be joined."""
        self.settlers.append(settle)

    def get(self, table: str, kind: str) -> TableHandler | None:
        return self._handlers.get((table, kind))

    def finisher(self, table: str, kind: str) -> FileFinisher | None:
        return self._finishers.get((table, kind))

    @property
    def tables(self) -> set[str]:
        return {table for table, _ in self._handlers}


def unsubscribes_handler() -> TableHandler:
    """``unsubscribes`` rows with ``unsubscribe_organisation`` true become org-wide unsubscribes,
    keyed ``unsubscribe:<id>`` like the ``unsubscribe.created`` webhook's: the store keeps one
    item per unsubscribe whichever source brought it first, and the consent timeline learns of
    it as the batch commits. A malformed row is a dead letter, as a malformed webhook's is.

    The nightly full copy goes through the same handler: every org-wide row is offered again,
    and those csand has already enqueued (also done and pruned ones) add nothing; that is the
    comparison with what csand applied."""

    async def handle(rows: list[Row], file: BulkFile) -> Batch:
        activities: list[Activity] = []
        letters: list[DeadLetter] = []
        for row in rows:
            try:
                read = org_wide_unsubscribe(row)
            except MalformedRecord as exc:
                raw_id = (row.get("id") or "").strip()
                letters.append(dead_letter(
                    "unsubscribe", dict(row), exc,
                    source_key=f"unsubscribe:{raw_id}" if raw_id.isdigit() else None))
                continue
            if read is not None:
                activities.append(read.activity())
        return Batch(activities, letters)

    return handle


def default_handlers(*, global_unsubscribes: bool = True) -> TableHandlers:
    """The tables csand consumes today."""
    handlers = TableHandlers()
    if global_unsubscribes:
        handlers.register("unsubscribes", unsubscribes_handler())
    return handlers


async def announce(store: Storage, body: bytes | str, *, received_at: datetime | None = None
                   ) -> bool:
    """Record the file a (verified) ``data.*_table_exported`` webhook announces; False when it
    was recorded before. Raises :class:`~csand.controlshift.bulk.BadExport` for an unusable
    announcement."""
    export = parse_export(body, received_at=received_at)
    new = await store.record_bulk_file(
        url=export.url, jid=export.jid, table=export.table, kind=export.kind,
        compression=export.compression, body=export.to_json(),
        expires_at=export.expires_at.timestamp() if export.expires_at else None)
    if new:
        log.info("bulk.announced", table=export.table, kind=export.kind,
                 file=file_name(export.url),
                 expires_at=export.expires_at.isoformat() if export.expires_at else None)
    return new


@dataclass
class FileReport:
    """What processing one file did (for logs and tests)."""

    status: str  # done, skipped, expired, failed, retry
    rows: int = 0
    enqueued: int = 0
    bad_rows: int = 0
    error: str | None = None


class BulkIngest:
    """Processes due bulk-data files, one at a time (see the module docstring)."""

    def __init__(
        self,
        store: Storage,
        http: httpx.AsyncClient,
        handlers: TableHandlers,
        *,
        clock: Callable[[], float] = time.time,
        batch_rows: int = BATCH_ROWS,
        policy: RetryPolicy = BULK_FILES,
        download_policy: RetryPolicy = BULK_DOWNLOAD,
        sleep: Callable[[float], Any] = anyio.sleep,
        idle_seconds: float = 2.0,
    ) -> None:
        self.store = store
        self.http = http
        self.handlers = handlers
        self.clock = clock
        self.batch_rows = batch_rows
        self.policy = policy
        self.download_policy = download_policy
        self.sleep = sleep
        self.idle_seconds = idle_seconds
        self._wake = anyio.Event()
        self.processed = 0

    def wake(self) -> None:
        self._wake.set()

    async def announce(self, body: bytes | str) -> bool:
        """:func:`announce` at this processor's clock (what the HTTP receiver calls)."""
        return await announce(self.store, body,
                              received_at=datetime.fromtimestamp(self.clock(), UTC))

    async def run(self) -> None:
        settled = False
        while True:
            try:
                if not settled:
                    await self.settle()  # what a previous process left waiting
                    settled = True
                busy = await self.run_due()
            except Exception as exc:  # the store unreachable: the files wait in it, try later
                log.warning("bulk.store_failed", error=f"{type(exc).__name__}: {exc}"[:300])
                busy = 0
            if not busy:
                with anyio.move_on_after(self.idle_seconds):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def run_due(self) -> int:
        """Process every file due now; the number processed."""
        n = 0
        while files := await self.store.bulk_files_due(1):
            for file in files:
                await self.process(file)
                n += 1
        if n:
            await self.settle()
        return n

    async def settle(self) -> None:
        for settle in self.handlers.settlers:
            await settle()

    async def process(self, file: BulkFile) -> FileReport:
        t0 = time.monotonic()
        handler = self.handlers.get(file.table, file.kind)
        if handler is None:
            await self.store.bulk_file_finished(
                file.id, "skipped", error=f"the {file.table} table is not consumed")
            metrics.bulk_files.labels(file.table, "skipped").inc()
            return FileReport("skipped")
        if self.clock() >= file.expires_at:
            return await self._expired(file, "the URL expired before csand could read it")
        try:
            export = ExportFile.from_json(file.body)
        except (BadExport, KeyError, ValueError) as exc:
            return await self._failed(file, f"unreadable record of the file: {exc}")
        stats = ReadStats()
        report = FileReport("done", rows=file.rows_done)
        try:
            await self._read(file, export, handler, stats, report)
        except ExportExpired as exc:
            return await self._expired(file, str(exc), report)
        except (ExportGone, ExportCorrupt) as exc:
            return await self._failed(file, f"{type(exc).__name__}: {exc}", report)
        except (ExportUnavailable, BulkError, httpx.HTTPError, OSError) as exc:
            return await self._retry(file, f"{type(exc).__name__}: {exc}", report)
        except Exception as exc:  # a failed commit, a handler's bug: later, from the last batch
            log.exception("bulk.file_error", table=file.table, file=file_name(file.url))
            return await self._retry(file, f"{type(exc).__name__}: {exc}", report)
        finish = self.handlers.finisher(file.table, file.kind)
        if finish is not None:
            try:
                await finish(file)
            except Exception as exc:  # as a failed batch: the file is taken up again
                log.exception("bulk.file_error", table=file.table, file=file_name(file.url))
                return await self._retry(file, f"{type(exc).__name__}: {exc}", report)
        report.bad_rows = stats.bad_rows
        note = f"{stats.bad_rows} bad rows skipped" if stats.bad_rows else None
        await self.store.bulk_file_finished(file.id, "done", rows_done=report.rows, error=note)
        metrics.bulk_files.labels(file.table, "done").inc()
        self.processed += 1
        log.info("bulk.file_done", table=file.table, kind=file.kind, file=file_name(file.url),
                 rows=report.rows, resumed_after=file.rows_done or None,
                 enqueued=report.enqueued, bad_rows=stats.bad_rows,
                 ms=round((time.monotonic() - t0) * 1000))
        return report

    async def _read(self, file: BulkFile, export: ExportFile, handler: TableHandler,
                    stats: ReadStats, report: FileReport) -> None:
        skip = file.rows_done  # committed by an earlier attempt: read past, not handled again
        seen = 0
        batch: list[Row] = []
        async for row in read_rows(
                self.http, export, stats=stats, policy=self.download_policy, sleep=self.sleep,
                now=lambda: datetime.fromtimestamp(self.clock(), UTC)):
            seen += 1
            if seen <= skip:
                continue
            batch.append(row)
            if len(batch) >= self.batch_rows:
                await self._commit(file, handler, batch, seen, report)
                batch = []
        if batch:
            await self._commit(file, handler, batch, seen, report)
        report.rows = max(seen, skip)

    async def _commit(self, file: BulkFile, handler: TableHandler, rows: list[Row],
                      done: int, report: FileReport) -> None:
        result = await handler(rows, file)
        report.enqueued += await self.store.commit_poll(
            None, activities=result.activities, dead_letters=result.dead_letters,
            bulk_progress=(file.id, done), **dict(result.commit))
        report.rows = done
        metrics.bulk_rows.labels(file.table).inc(len(rows))

    async def _expired(self, file: BulkFile, reason: str,
                       report: FileReport | None = None) -> FileReport:
        rows = report.rows if report else file.rows_done
        await self.store.bulk_file_finished(file.id, "expired", rows_done=rows, error=reason)
        metrics.bulk_files.labels(file.table, "expired").inc()
        log.warning("bulk.file_expired", table=file.table, kind=file.kind,
                    file=file_name(file.url), rows_read=rows,
                    announced_at=datetime.fromtimestamp(file.announced_at, UTC).isoformat(),
                    expired_at=datetime.fromtimestamp(file.expires_at, UTC).isoformat(),
                    msg="the file's rows come again with the next nightly full export")
        return FileReport("expired", rows=rows, error=reason)

    async def _failed(self, file: BulkFile, reason: str,
                      report: FileReport | None = None) -> FileReport:
        rows = report.rows if report else file.rows_done
        await self.store.bulk_file_finished(file.id, "failed", rows_done=rows, error=reason)
        metrics.bulk_files.labels(file.table, "failed").inc()
        log.error("bulk.file_failed", table=file.table, kind=file.kind,
                  file=file_name(file.url), rows_read=rows, error=reason[:300],
                  msg="the file cannot be read; its rows come again with the next nightly "
                      "full export")
        return FileReport("failed", rows=rows, error=reason)

    async def _retry(self, file: BulkFile, reason: str, report: FileReport) -> FileReport:
        delay = self.policy.delay(file.attempts + 1)
        await self.store.bulk_file_retry(file.id, reason, self.clock() + delay)
        metrics.bulk_files.labels(file.table, "retried").inc()
        log.warning("bulk.file_retry", table=file.table, kind=file.kind,
                    file=file_name(file.url), rows_done=report.rows, error=reason[:300],
                    retry_in_s=round(delay, 1))
        return FileReport("retry", rows=report.rows, error=reason)
