"""The nightly diff of a ``signatures`` export (``controlshift.source = "bulk"``): time and peak
memory for a file of 1,000,000 rows against a store that recorded them all.

    .venv/bin/python bench/bulk_diff.py                  # 1,000,000 rows, bzip2, SQLite
    .venv/bin/python bench/bulk_diff.py --rows 100000

Prepared once and cached in the temporary directory (a separate process, so its memory is not
counted): the export file (``bench/bulk_parse.py``'s generator: 36 columns, quoted cells, json,
unicode), and a SQLite store holding the 2,000 petitions and their creators as bulk rows and
one ``cs_signatures`` row per signature with the fingerprint the bulk path computes, except:
1 % of them recorded with an older version (the diff must enqueue them: late opt-ins and
edits) and 5,000 more signatures the file does not hold (vanished: recorded as deleted).

Measured in a fresh process on a copy of that store: the file announced and processed by the
daemon's own code (``BulkIngest`` with ``BulkSource``'s handlers, the storage simulator serving
the file on loopback): every row read, mapped, joined, compared with cs_signatures in batches,
what changed enqueued and each row marked in the store, then the vanished check. Prints
rows/s, the time, the process's peak RSS (``ru_maxrss``: interpreter, modules, SQLite's cache
and the storage simulator's thread included) and one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bulk_parse import generate, rows  # noqa: E402

from csand.controlshift.bulksource import BulkSource  # noqa: E402
from csand.controlshift.ingest import BulkIngest, TableHandlers  # noqa: E402
from csand.controlshift.source import petition_record, signature_record  # noqa: E402
from csand.controlshift.versions import see_signature  # noqa: E402
from csand.sim.exports import COLUMNS, StorageSim, csv_cell  # noqa: E402
from csand.sim.server import ServedApp  # noqa: E402
from csand.storage import open_store  # noqa: E402
from csand.storage.bulk import BulkChanges  # noqa: E402

ORG = "demo-org"
ORG_URL = "https://demo-org.example.org"
PETITIONS = 2000
VANISHED = 5000
STALE_EVERY = 100  # 1 %: recorded with an older version


def petition_rows() -> list[dict[str, str]]:
    return [{"id": str(p), "slug": f"petition-{p}", "title": f"Petition {p}", "launched": "t",
             "user_id": str(p), "created_at": "2019-12-01 00:00:00", "updated_at":
             "2019-12-01 00:00:00"} for p in range(1, PETITIONS)]


def user_rows() -> list[dict[str, str]]:
    return [{"id": str(p), "email": f"creator{p}@example.org", "first_name": "Cleo",
             "last_name": f"Ng{p}", "join_organisation": "f"} for p in range(1, PETITIONS)]


async def _prepare_store(db: Path, count: int) -> None:
    store = await open_store(db)
    await store.commit_poll(None, bulk=BulkChanges(records=tuple(
        [("petitions", int(r["id"]), None, json.dumps(r)) for r in petition_rows()]
        + [("users", int(r["id"]), None, json.dumps(r)) for r in user_rows()])))
    await store.close()
    users = {int(u["id"]): u for u in user_rows()}
    petitions = {int(p["id"]): petition_record(p, users[int(p["id"])], [], ORG_URL)
                 for p in petition_rows()}
    names = COLUMNS["signatures"]
    conn = sqlite3.connect(db)
    batch: list[tuple[Any, ...]] = []
    for row in rows(count):
        cells = {n: csv_cell(row.get(n)) for n in names}
        record = signature_record(cells)
        seen = see_signature(record, petitions[record["petition_id"]], ORG, None).row
        assert seen is not None
        fingerprint = seen.fingerprint if record["id"] % STALE_EVERY else "older-version"
        batch.append((seen.cs_id, seen.petition_id, fingerprint, seen.deleted_at,
                      seen.updated_at))
        if len(batch) >= 20_000:
            conn.executemany("INSERT INTO cs_signatures (cs_id, petition_id, fingerprint, "
                             "deleted_at, updated_at) VALUES (?, ?, ?, ?, ?)", batch)
            batch = []
    batch += [(count + n, 1, "fp", None, "2020-01-01T00:00:00+00:00")
              for n in range(1, VANISHED + 1)]
    conn.executemany("INSERT INTO cs_signatures (cs_id, petition_id, fingerprint, deleted_at, "
                     "updated_at) VALUES (?, ?, ?, ?, ?)", batch)
    conn.commit()
    conn.close()


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    suffix = ".csv.bz2" if args.compression == "bzip2" else ".csv"
    path = args.dir / f"csand-bench-signatures-{args.rows}{suffix}"
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        generate(path, args.rows, args.compression)
    db = args.dir / f"csand-bench-diff-{args.rows}.db"
    if not db.exists():
        print(f"preparing {db} ...", flush=True)
        part = db.with_suffix(".part.db")
        part.unlink(missing_ok=True)
        anyio.run(_prepare_store, part, args.rows)
        part.rename(db)
    return path, db


async def diff(path: Path, db: Path, compression: str) -> dict[str, Any]:
    suffix = ".csv.bz2" if compression == "bzip2" else ".csv"
    storage = StorageSim()
    key = f"{ORG}/full/20241001/000001/signatures_20241001020000{suffix}"
    storage.put_file(key, path)
    store = await open_store(db)

    async def org() -> str:
        return ORG

    async def org_url() -> str:
        return ORG_URL

    handlers = TableHandlers()
    source = BulkSource(store, org, org_url)
    source.register(handlers)
    with ServedApp(storage.app) as served:
        storage.base_url = served.url
        url = storage.presign(key, lifetime=timedelta(hours=6),
                              signed_at=datetime.now(UTC))
        body = json.dumps({"type": "data.full_table_exported", "data": {
            "url": url, "table": "signatures", "compression_format": compression}})
        async with httpx.AsyncClient(timeout=60) as http:
            ingest = BulkIngest(store, http, handlers)
            assert await ingest.announce(body)
            t0 = time.perf_counter()
            (file,) = await store.bulk_files_due(1)
            report = await ingest.process(file)
            seconds = time.perf_counter() - t0
    counts = await store.counts()
    deleted = (await store.status())["signatures_deleted"]
    await store.close()
    return {"status": report.status, "rows": report.rows, "seconds": round(seconds, 1),
            "rows_per_s": round(report.rows / seconds), "enqueued": report.enqueued,
            "pending": counts.get("pending"), "deleted_recorded": deleted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--compression", choices=["bzip2", "none"], default="bzip2")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--measure", nargs=2, type=Path, metavar=("FILE", "DB"),
                        help=argparse.SUPPRESS)  # the measuring child process
    args = parser.parse_args()
    if args.measure:
        figures = anyio.run(diff, args.measure[0], args.measure[1], args.compression)
        figures["peak_rss_mib"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(figures), flush=True)
        return
    path, db = prepare(args)
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "csand.db"
        shutil.copy(db, copy)
        out = subprocess.run(
            [sys.executable, __file__, "--measure", str(path), str(copy),
             "--compression", args.compression],
            capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    figures = json.loads(out)
    figures.update(rows_in_file=args.rows, compression=args.compression, cpus=os.cpu_count(),
                   file_mib=round(path.stat().st_size / 2**20, 1),
                   expected_enqueued=args.rows // STALE_EVERY, expected_vanished=VANISHED)
    print(f"\nnightly diff of a signatures export: {args.rows:,} rows ({args.compression}, "
          f"{figures['file_mib']} MiB) against {args.rows + VANISHED:,} recorded signatures")
    print(f"{'time (read, map, join, compare, enqueue, mark; vanished check)':<64}"
          f"{figures['seconds']:>9.1f} s")
    print(f"{'rows/s':<64}{figures['rows_per_s']:>9,}")
    print(f"{'enqueued (changed versions)':<64}{figures['enqueued']:>9,}")
    print(f"{'process peak RSS':<64}{figures['peak_rss_mib']:>9.1f} MiB")
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    sys.exit(main())
