#!/usr/bin/env python3
"""Consolidation throughput against a plain `cp` of the same bytes.

A chain of a volume of mixed data (--size MiB): a full point and --incrementals incrementals, each
rewriting --change percent of the volume. Then `imagechain consolidate` merges the whole chain into a
synthetic full (it reads the run's payloads, writes the merged point, verifies it, retires the old files),
timed against `cp` of all the run's files to another folder of the same filesystem (cold cache both).

    .venv/bin/python bench/consolidate.py [--size 1024] [--incrementals 4] [--change 10]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchlib import drop, ic  # noqa: E402

from tests.conftest import write_volume  # noqa: E402

MiB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--incrementals", type=int, default=4)
    ap.add_argument("--change", type=float, default=10.0, help="percent of the volume rewritten per incremental")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="imagechain-consolidate-", dir="/var/tmp") as d:
        base = Path(d)
        vol, repo = base / "vol.img", base / "repo"
        data = bytearray(write_volume(vol, args.size * MiB, seed=3))
        subprocess.run([ic(), "backup", str(vol), str(repo), "--init"], check=True, capture_output=True)
        rng = random.Random(1)
        piece = 1 << 20
        for _ in range(args.incrementals):
            for _ in range(int(len(data) * args.change / 100 / piece)):
                at = rng.randrange(0, len(data) - piece)
                data[at : at + piece] = os.urandom(piece)
            vol.write_bytes(data)
            subprocess.run([ic(), "backup", str(vol), str(repo)], check=True, capture_output=True)
        files = sorted(repo.rglob("*.icimg"))
        size = sum(f.stat().st_size for f in files)
        drop()
        t0 = time.monotonic()
        copy = base / "copy"
        copy.mkdir()
        for f in files:
            subprocess.run(["cp", str(f), str(copy)], check=True)
        os.sync()
        cp_s = time.monotonic() - t0
        drop()
        t0 = time.monotonic()
        p = subprocess.run([ic(), "consolidate", f"{repo}::default@latest", "--json"], check=True,
                           capture_output=True, text=True)  # fmt: skip
        os.sync()
        merge_s = time.monotonic() - t0
        r = json.loads(p.stdout)
        merged = sum(f.stat().st_size for f in repo.rglob("*.icimg"))
    print(json.dumps({"points": args.incrementals + 1, "run_bytes": size, "merged_bytes": merged,
                      "cp_s": round(cp_s, 2), "cp_mib_s": round(size / MiB / cp_s, 1),
                      "consolidate_s": round(merge_s, 2), "consolidate_mib_s_of_run": round(size / MiB / merge_s, 1),
                      "consolidate_engine_s": round(r["duration_s"], 2)}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
