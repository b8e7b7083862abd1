"""What both storage backends share for bulk-data files (the ``bulk_files`` table): the record
handed to the processor and the view ``csand status`` shows.

A file moves ``pending → processing → done | skipped | expired | failed``. ``processing`` is a
claim that lasts until ``next_attempt_at`` (:data:`csand.storage.BULK_CLAIM_SECONDS` after the
claim or the last batch committed); a claim whose holder died runs out and the file is taken
up again, from ``rows_done`` on. A transient failure puts it back to ``pending`` with a later
``next_attempt_at``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from csand.storage.common import iso

# How long an announced URL works when it does not say (``X-Amz-Expires``): ControlShift's
# documented 6 hours (csand.controlshift.bulk.DEFAULT_LIFETIME).
DEFAULT_LIFETIME_SECONDS = 6 * 3600.0

BULK_STATUSES = ("pending", "processing", "done", "skipped", "expired", "failed")
FINAL_STATUSES = ("done", "skipped", "expired", "failed")


@dataclass(frozen=True, slots=True)
class BulkFile:
    """A claimed bulk-data file: ``body`` is the announcement as ``ExportFile.to_json()``."""

    id: int
    table: str
    kind: str  # 'incremental' | 'full'
    url: str
    body: str
    announced_at: float
    expires_at: float
    attempts: int
    rows_done: int  # data rows already committed: a new attempt goes on after them


def bulk_file(row: Mapping[str, Any]) -> BulkFile:
    return BulkFile(id=row["id"], table=row["table_name"], kind=row["kind"], url=row["url"],
                    body=row["body"], announced_at=row["announced_at"],
                    expires_at=row["expires_at"], attempts=row["attempts"],
                    rows_done=row["rows_done"])


# Columns of BulkFile, for SELECT and RETURNING.
BULK_FILE_COLUMNS = ("id, table_name, kind, url, body, announced_at, expires_at, attempts, "
                     "rows_done")

# The figures of bulk_status, in one round trip (no parameters).
BULK_FIGURES = (
    "SELECT "
    "(SELECT MIN(announced_at) FROM bulk_files) AS first_seen, "
    "(SELECT MAX(announced_at) FROM bulk_files) AS last_seen, "
    "(SELECT COUNT(*) FROM bulk_files WHERE status IN ('pending', 'processing') "
    "  AND attempts > 0) AS retrying, "
    "(SELECT MAX(announced_at) FROM bulk_files WHERE table_name = 'signatures' "
    "  AND kind = 'incremental') AS last_incremental_signatures, "
    "(SELECT MAX(announced_at) FROM bulk_files WHERE table_name = 'signatures' "
    "  AND kind = 'full') AS last_full_signatures"
)
BULK_COUNTS = "SELECT status, COUNT(*) AS n FROM bulk_files GROUP BY status"
BULK_NEWEST_EXPIRED = (
    "SELECT table_name, kind, url, announced_at, expires_at, finished_at FROM bulk_files "
    "WHERE status = 'expired' ORDER BY finished_at DESC, id DESC LIMIT 1")
# The last nightly copy of unsubscribes compared with what csand applied (or, with
# controlshift.global_unsubscribes = false, seen and deliberately left alone).
BULK_LAST_FULL_UNSUBSCRIBES = (
    "SELECT status, rows_done, announced_at, finished_at FROM bulk_files "
    "WHERE table_name = 'unsubscribes' AND kind = 'full' AND status IN ('done', 'skipped') "
    "ORDER BY finished_at DESC, id DESC LIMIT 1")


def file_name(url: str) -> str:
    """The file's name (the last part of its path): never the query, whose signature is a
    credential while it lives."""
    path = url.split("?", 1)[0]
    return path.rsplit("/", 1)[-1]


def bulk_view(figures: Mapping[str, Any], counts: Iterable[Mapping[str, Any]],
              newest_expired: Mapping[str, Any] | None,
              last_full: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``bulk`` part of ``csand status`` from the rows of the queries above."""
    by_status = {status: 0 for status in BULK_STATUSES}
    for row in counts:
        by_status[row["status"]] = int(row["n"])
    return {
        "files": by_status,
        "waiting": by_status["pending"] + by_status["processing"],
        "retrying": int(figures["retrying"] or 0),
        "expired": by_status["expired"],
        "failed": by_status["failed"],
        "first_seen_at": iso(figures["first_seen"]),
        "last_announced_at": iso(figures["last_seen"]),
        "last_incremental_signatures_at": iso(figures["last_incremental_signatures"]),
        "last_full_signatures_at": iso(figures["last_full_signatures"]),
        "newest_expired": None if newest_expired is None else {
            "table": newest_expired["table_name"], "kind": newest_expired["kind"],
            "file": file_name(newest_expired["url"]),
            "announced_at": iso(newest_expired["announced_at"]),
            "expired_at": iso(newest_expired["expires_at"]),
        },
        "last_full_unsubscribes": None if last_full is None else {
            "reconciled_at": iso(last_full["finished_at"]),
            "status": last_full["status"],
            "rows": int(last_full["rows_done"]),
            "announced_at": iso(last_full["announced_at"]),
        },
    }


# ---------------------------------------------------------------------------- bulk as a source
# With controlshift.source = "bulk" the small tables a signature is joined with (petitions,
# users, categories, categorized_petitions) are kept as rows (``bulk_records``, the row's cells
# as JSON, upserted by id); a signature or creator that cannot be joined yet waits, durably, in
# ``bulk_parked``; a nightly full file marks each cs_signatures row it holds with its id
# (``cs_signatures.bulk_generation``), so what it did not hold is found in the store, not in
# memory.


@dataclass(frozen=True, slots=True)
class BulkChanges:
    """What a batch of bulk rows changes besides the outbox (``commit_poll(bulk=...)``), in the
    same transaction as its activities and the file's progress."""

    # (table, id, ref, body): upserted; ``ref`` is what the row is looked up by besides its id
    # (a categorized_petitions row's petition id), body the row as JSON.
    records: tuple[tuple[str, int, int | None, str], ...] = ()
    # The file these records came from (every file: a full file's forgets what older files
    # wrote and it did not hold), and the full file the seen signatures came from.
    generation: int | None = None
    seen_signatures: tuple[int, ...] = ()  # cs_signatures ids present in that full file
    # (kind, id, petition id, body): waiting for their petition ('signature', 'creator').
    park: tuple[tuple[str, int, int, str | None], ...] = ()
    unpark: tuple[tuple[str, int], ...] = ()  # (kind, id) resolved: no longer waiting


@dataclass(frozen=True, slots=True)
class Parked:
    kind: str  # 'signature' | 'creator'
    id: int  # the signature's id; a creator's petition id
    petition_id: int
    body: str | None  # a signature: its REST-shaped record as JSON


def chunks(values: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    for at in range(0, len(values), size):
        yield values[at:at + size]
