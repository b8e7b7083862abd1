"""The nightly reconciliation of ``unsubscribes``: a full export processed by the daemon's bulk
task (``csand.controlshift.ingest.BulkIngest``) into a SQLite or PostgreSQL store.

    .venv/bin/python bench/bulk_unsubscribes.py                    # 100,000 rows, SQLite
    .venv/bin/python bench/bulk_unsubscribes.py --rows 20000 --store postgresql://...

Writes an ``unsubscribes`` CSV (bzip2) of ``--rows`` rows, ``--org-wide`` of them org-wide,
serves it with the storage simulator on loopback and processes it three times, as three nightly
copies of the same table would be:

1. into an empty store: every org-wide row becomes an outbox item (500 rows per commit);
2. the same file again (the next night, nothing new): every row is offered, none enqueued;
3. again after a crash half-way through: the file resumes after the last committed batch.

Prints rows/s and the number of commits of each pass, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import bz2
import json
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from csand.controlshift.ingest import BulkIngest, TableHandlers, default_handlers  # noqa: E402
from csand.sim.exports import COLUMNS, StorageSim, write_csv  # noqa: E402
from csand.sim.server import ServedApp  # noqa: E402
from csand.storage import open_store  # noqa: E402


def make_file(rows: int, org_wide: float, seed: int = 5) -> bytes:
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    records = []
    for n in range(1, rows + 1):
        wide = rng.random() < org_wide
        records.append({
            "id": n, "organisation_id": 1, "member_id": n, "email": f"person{n}@example.org",
            "unsubscribe_object": not wide, "unsubscribe_organisation": wide,
            "unsubscribable_type": "Organisation" if wide else "Signature",
            "created_at": start + timedelta(seconds=n), "updated_at": start + timedelta(seconds=n),
        })
    import io

    text = io.StringIO()
    write_csv(text, COLUMNS["unsubscribes"], records, timestamps="db")
    return bz2.compress(text.getvalue().encode())


class _Crash(BaseException):
    pass


async def one_pass(store: Any, http: httpx.AsyncClient, storage: StorageSim, key: str,
                   name: str, *, crash_after: int | None = None) -> dict[str, Any]:
    commits = 0
    real = store.commit_poll

    async def counting(*args: Any, **kw: Any) -> int:
        nonlocal commits
        commits += 1
        if crash_after is not None and commits > crash_after:
            raise _Crash
        return await real(*args, **kw)

    store.commit_poll = counting
    url = storage.presign(key)
    body = json.dumps({"type": "data.full_table_exported", "jid": name,
                       "data": {"url": url, "table": "unsubscribes",
                                "compression_format": "bzip2"}})
    ingest = BulkIngest(store, http, default_handlers())
    await ingest.announce(body)
    before = len([i for i in await store.items() if i["kind"] == "global_unsubscribe"])
    t0 = time.perf_counter()
    crashed_commits = 0
    if crash_after is not None:
        try:
            await ingest.run_due()
        except _Crash:
            pass
        crashed_commits = commits
        crash_after = None
        await store.release_bulk_files()
    await ingest.run_due()
    seconds = time.perf_counter() - t0
    store.commit_poll = real
    after = len([i for i in await store.items() if i["kind"] == "global_unsubscribe"])
    bulk = await store.bulk_status()
    return {"pass": name, "seconds": round(seconds, 2), "commits": commits,
            "commits_before_crash": crashed_commits or None,
            "enqueued": after - before, "unsubscribe_items": after,
            "rows": bulk["last_full_unsubscribes"]["rows"]}


async def main(args: argparse.Namespace) -> None:
    data = make_file(args.rows, args.org_wide)
    storage = StorageSim()
    storage.put("org/full/unsubscribes_20241001000000.csv.bz2", data)
    key = "org/full/unsubscribes_20241001000000.csv.bz2"
    with ServedApp(storage.app) as served, tempfile.TemporaryDirectory() as tmp:
        storage.base_url = served.url
        target = args.store or Path(tmp) / "csand.db"
        store = await open_store(target, instance="bench")
        try:
            async with httpx.AsyncClient(timeout=60) as http:
                results = [await one_pass(store, http, storage, key, "first night")]
                storage.put(key.replace("2024100100", "2024100200"), data)
                results.append(await one_pass(
                    store, http, storage, key.replace("2024100100", "2024100200"), "next night"))
                storage.put(key.replace("2024100100", "2024100300"), data)
                results.append(await one_pass(
                    store, http, storage, key.replace("2024100100", "2024100300"),
                    "crash half-way", crash_after=args.rows // 1000))
        finally:
            await store.close()
    print(f"unsubscribes: {args.rows} rows ({len(data) / 1e6:.1f} MB bzip2), "
          f"{args.org_wide:.0%} org-wide, store {'PostgreSQL' if args.store else 'SQLite'}")
    for r in results:
        print(f"  {r['pass']:<16} {r['seconds']:>7.2f} s  {args.rows / r['seconds']:>9,.0f} rows/s"
              f"  {r['commits']:>4} commits  {r['enqueued']:>7} enqueued")
    print(json.dumps({"rows": args.rows, "org_wide": args.org_wide,
                      "bytes": len(data), "passes": results}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--org-wide", type=float, default=0.6)
    parser.add_argument("--store", help="a postgresql:// URL (default: a SQLite file)")
    _ = TableHandlers  # the registry the handlers come from
    anyio.run(main, parser.parse_args())
