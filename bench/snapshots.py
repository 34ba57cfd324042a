#!/usr/bin/env python3
"""How long each snapshot provider blocks a busy database's writers, and how long a backup takes under load.

PostgreSQL runs with its data directory on ext4 in a loop-mounted image file that lives on XFS (reflink
capable), pgbench (TPC-B-like, --clients, logging every transaction's latency) writing throughout. For
each provider (fsfreeze, reflink; and none --allow-mounted for the read time without any snapshot), a
full backup and then an incremental run while pgbench runs. Reported per backup: its duration, what the
point records as writers blocked, and pgbench's longest and 99th-percentile transaction latency during
the backup, against the same figures over the same length of time with no backup (the baseline, taken
right before each backup).

Needs root, PostgreSQL (postgresql), xfsprogs. Run: `sudo .venv/bin/python bench/snapshots.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.dbserver import Postgres, latencies_ms, own, pg_bin, reachable_folder, stop_pgbench  # noqa: E402

MiB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(*args: str | Path) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout


def imagechain() -> str:
    here = Path(sys.executable).parent / "imagechain"
    return str(here) if here.exists() else shutil.which("imagechain") or "imagechain"


def window(lat: list[tuple[float, float]], t0: float, t1: float) -> dict[str, float]:
    xs = [ms for t, ms in lat if t0 <= t <= t1]
    if not xs:
        return {"transactions": 0}
    xs.sort()
    return {"transactions": len(xs), "max_ms": round(xs[-1], 1), "p99_ms": round(xs[int(len(xs) * 0.99) - 1], 1),
            "median_ms": round(statistics.median(xs), 2)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=50, help="pgbench scale (16 MB of accounts each)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--volume-size", type=int, default=3072, help="MiB")
    ap.add_argument("--providers", default="fsfreeze,reflink,none")
    ap.add_argument("--incrementals", type=int, default=1, help="incrementals after each full backup")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    if os.geteuid() != 0 or pg_bin() is None:
        sys.exit("needs root and PostgreSQL")
    results: list[dict[str, Any]] = []
    with reachable_folder("imagechain-snapbench-") as base:
        host_img, host, mnt = base / "host.img", base / "host", base / "pg"
        with open(host_img, "wb") as f:
            f.truncate((args.volume_size + 1024) * MiB)
        run("mkfs.xfs", "-q", "-m", "reflink=1", host_img)
        host.mkdir()
        mnt.mkdir()
        run("mount", "-o", "loop", host_img, host)
        vol = host / "pgvol.img"
        pg = Postgres(mnt / "data", base / "sock", 25432)
        try:
            with open(vol, "wb") as f:
                f.truncate(args.volume_size * MiB)
            run("mkfs.ext4", "-q", "-F", vol)
            run("mount", "-o", "loop", vol, mnt)
            pg.initdb()
            pg.start()
            log(f"pgbench -i -s {args.scale}")
            pg.pgbench_init(args.scale)
            logs = base / "logs"
            logs.mkdir()
            own(logs, "postgres")
            for provider in args.providers.split(","):
                repo = base / f"repo-{provider}"
                extra = ["--snapshot", provider] + (["--allow-mounted"] if provider == "none" else [])
                for n, kind in enumerate(["full"] + ["incremental"] * args.incrementals):
                    pg.psql("CHECKPOINT")
                    os.sync()
                    prefix = f"{provider}-{n}"
                    bench = pg.pgbench(3600, args.clients, logs / prefix)
                    time.sleep(5)
                    t0 = time.time()
                    p = subprocess.run([imagechain(), "backup", str(vol), str(repo), "--init", "--json", *extra],
                                       capture_output=True, text=True, check=False)  # fmt: skip
                    t1 = time.time()
                    time.sleep(2)
                    stop_pgbench(bench)
                    if p.returncode:
                        sys.exit(f"backup failed: {p.stderr}")
                    r = json.loads(p.stdout)
                    lat = latencies_ms(logs, prefix)
                    span = t1 - t0
                    row = {"provider": provider, "kind": kind, "backup_s": round(span, 2),
                           "read_mib": round(r["read_bytes"] / MiB), "stored_mib": round(r["file_bytes"] / MiB),
                           "writers_blocked_ms": r["snapshot"].get("writers_blocked_ms"),
                           "steps_ms": {k: v for k, v in r["snapshot"].items() if k in ("presync_ms", "clone_ms")},
                           "during": window(lat, t0, t1 + 0.5), "before": window(lat, t0 - 5, t0)}  # fmt: skip
                    results.append(row)
                    log(json.dumps(row))
        finally:
            pg.stop()
            subprocess.run(["umount", str(mnt)], check=False)
            subprocess.run(["umount", str(host)], check=False)
    print(f"{'provider':<10} {'kind':<12} {'backup s':>8} {'read MiB':>8} {'blocked ms':>10} "
          f"{'max ms (before)':>16} {'max ms (during)':>16} {'p99 before':>10} {'p99 during':>10}")  # fmt: skip
    for r in results:
        b, d = r["before"], r["during"]
        print(f"{r['provider']:<10} {r['kind']:<12} {r['backup_s']:>8} {r['read_mib']:>8} "
              f"{r['writers_blocked_ms'] if r['writers_blocked_ms'] is not None else '-':>10} "
              f"{b.get('max_ms', '-'):>16} {d.get('max_ms', '-'):>16} {b.get('p99_ms', '-'):>10} "
              f"{d.get('p99_ms', '-'):>10}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
