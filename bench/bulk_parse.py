"""Bulk data reading benchmark: a nightly-sized ``signatures`` export, streamed over loopback.

    .venv/bin/python bench/bulk_parse.py                      # 1,000,000 rows, bzip2
    .venv/bin/python bench/bulk_parse.py --rows 200000 --compression none

Generates a ``signatures`` CSV with the simulator's columns (``csand.sim.exports.COLUMNS``) and
cells written the way the simulator writes them (quoted commas and quotes, json with newlines,
unicode names, ``t`` / ``f``), compressed as ControlShift does, and cached in the temporary
directory. The file is served by the storage simulator (``csand.sim.exports.StorageSim``) on
loopback and read with ``csand.controlshift.bulk.read_rows`` over a real ``httpx.AsyncClient``,
three times:

1. rows only: rows/s of download + decompression + decoding + CSV;
2. rows plus the per-row work a nightly diff needs at least (the id as an int and a 64-bit
   fingerprint of the cells): rows/s;
3. rows only, under ``tracemalloc``: the peak of the Python heap while streaming (every thread,
   the storage simulator's included), which must not grow with the file.

Prints a table and, last, one JSON line with every figure. The process's peak RSS (VmHWM) is
printed too; it includes the interpreter and the loaded modules.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import os
import random
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx

from csand.controlshift.bulk import ReadStats, read_rows
from csand.sim.exports import COLUMNS, StorageSim, csv_cell, csv_line
from csand.sim.server import ServedApp

FIRST = ["Ann", "Bob", "Chloé", "Dmitri", "Eve", "Fatima", "Göran", "Hana", "Iñigo", "José",
         "Kwame", "Li", "Mary-Jane", "Nguyễn", "O'Neil", "Priya", "Zoë"]
LAST = ["Smith", "Jones", "Lee, Jr.", 'Quote "Q"', "Müller", "Ødegaard", "García", "Kowalski",
        "Nakamura", "Okafor", "Silva", "Taylor", "Wang", "Доронин", "Ñúñez"]
SOURCES = ["", "facebook", "email", "twitter", "embed"]


def rows(count: int, seed: int = 11) -> Any:
    rng = random.Random(seed)
    start = datetime(2020, 1, 1, tzinfo=UTC)
    for i in range(1, count + 1):
        created = start + timedelta(seconds=i * 97 + rng.randrange(60),
                                    microseconds=rng.randrange(1_000_000))
        join = rng.random()
        extra: dict[str, Any] | None = None
        if rng.random() < 0.1:
            extra = {"why": "Because it matters,\nto all of us", "n": i}
        yield {
            "id": i,
            "petition_id": rng.randrange(1, 2000),
            "email": f"signer{i}@example.org",
            "first_name": rng.choice(FIRST),
            "last_name": rng.choice(LAST),
            "phone_number": f"+4477009{i % 100000:05d}" if rng.random() < 0.3 else None,
            "postcode": f"N{rng.randrange(1, 20)} {rng.randrange(1, 9)}AB",
            "created_at": created,
            "join_organisation": True if join < 0.6 else (False if join < 0.9 else None),
            "deleted_at": created if rng.random() < 0.01 else None,
            "unsubscribe_at": created if rng.random() < 0.02 else None,
            "member_id": i,
            "additional_fields": extra,
            "cached_organisation_slug": "demo-org",
            "source": rng.choice(SOURCES),
            "new_member": rng.random() < 0.5,
            "locale": "en",
            "country": "GB",
            "updated_at": created,
            "user_ip": f"10.{i % 256}.{(i >> 8) % 256}.{rng.randrange(256)}",
            "join_list_suppressed": False,
            "from_embed": False,
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
            "confirmed_at": created if join < 0.6 else None,
            "eu_data_processing_consent": True,
            "email_opt_in_type_id": 3,
            "utm_params": {"utm_source": "newsletter"} if rng.random() < 0.2 else None,
            "opt_in_sms": rng.random() < 0.1,
        }


def generate(path: Path, count: int, compression: str) -> float:
    t0 = time.perf_counter()
    tmp = path.with_suffix(path.suffix + ".part")
    names = COLUMNS["signatures"]
    packer = bz2.BZ2Compressor() if compression == "bzip2" else None
    with tmp.open("wb") as out:
        batch: list[str] = [csv_line(names)]
        for row in rows(count):
            batch.append(csv_line([csv_cell(row.get(n)) for n in names]))
            if len(batch) >= 5000:
                data = "".join(batch).encode("utf-8")
                out.write(packer.compress(data) if packer else data)
                batch = []
        data = "".join(batch).encode("utf-8")
        out.write(packer.compress(data) if packer else data)
        if packer:
            out.write(packer.flush())
    tmp.rename(path)
    return time.perf_counter() - t0


async def read(url: str, *, fingerprint: bool) -> tuple[int, float, ReadStats]:
    stats = ReadStats()
    count = 0
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=30) as client:
        async for row in read_rows(client, url, stats=stats):
            if fingerprint:
                int(row["id"])
                hashlib.blake2b("\x1f".join(row.values()).encode(), digest_size=8).digest()
            count += 1
    return count, time.perf_counter() - t0, stats


def vm_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--compression", choices=["bzip2", "none"], default="bzip2")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    suffix = ".csv.bz2" if args.compression == "bzip2" else ".csv"
    path = args.dir / f"csand-bench-signatures-{args.rows}{suffix}"
    gen_s = None
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        gen_s = generate(path, args.rows, args.compression)
    size_mib = path.stat().st_size / 2**20

    storage = StorageSim()
    key = f"demo-org/full/signatures_20241001020000{suffix}"
    storage.put_file(key, path)
    figures: dict[str, Any] = {"rows": args.rows, "compression": args.compression,
                               "file_mib": round(size_mib, 1),
                               "generate_s": round(gen_s, 1) if gen_s else None}
    with ServedApp(storage.app) as served:
        storage.base_url = served.url
        url = storage.presign(key, lifetime=timedelta(hours=6))

        count, seconds, stats = anyio.run(lambda: read(url, fingerprint=False))
        assert count == args.rows and stats.bad_rows == 0, (count, stats.bad_rows)
        figures["parse_rows_per_s"] = round(count / seconds)
        figures["parse_s"] = round(seconds, 2)

        count, seconds, _ = anyio.run(lambda: read(url, fingerprint=True))
        figures["parse_fingerprint_rows_per_s"] = round(count / seconds)
        figures["parse_fingerprint_s"] = round(seconds, 2)

        tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        count, seconds, _ = anyio.run(lambda: read(url, fingerprint=False))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        figures["heap_peak_mib"] = round((peak - base) / 2**20, 2)
        figures["traced_s"] = round(seconds, 2)
    figures["vm_hwm_mib"] = round(vm_hwm_mib() or 0, 1)
    figures["cpus"] = os.cpu_count()

    print(f"\nsignatures export: {args.rows:,} rows, {args.compression}, {size_mib:.1f} MiB"
          + (f" (generated in {gen_s:.0f} s)" if gen_s else " (cached)"))
    print(f"{'read rows (download + decompress + decode + CSV)':<58}"
          f"{figures['parse_rows_per_s']:>10,} rows/s  {figures['parse_s']:>7.2f} s")
    print(f"{'  + id and 64-bit fingerprint per row':<58}"
          f"{figures['parse_fingerprint_rows_per_s']:>10,} rows/s  "
          f"{figures['parse_fingerprint_s']:>7.2f} s")
    print(f"{'peak Python heap while streaming (tracemalloc)':<58}"
          f"{figures['heap_peak_mib']:>10.2f} MiB")
    print(f"{'process peak RSS (VmHWM)':<58}{figures['vm_hwm_mib']:>10.1f} MiB")
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    sys.exit(main())
