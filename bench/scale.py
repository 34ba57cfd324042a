#!/usr/bin/env python3
"""Scale benchmark: a sparse image file of 1 TiB and 4 TiB apparent size holding a few GiB of data.
Full backup, incremental after a small change, verify, restore to a sparse file; wall time and peak RSS
of each step (the goal: RSS under 500 MiB, time that follows the data, not the apparent size).

    .venv/bin/python bench/scale.py [--sizes 1T,4T] [--data 2G] [--workdir bench/work-scale]

Run as root to drop the page cache before each step (otherwise the steps run warm and it says so)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GiB, MiB = 1 << 30, 1 << 20
REGION = 64 * MiB
MEASURE = """
import resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(p.stderr)
print("MAXRSS", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(p.returncode)
"""


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def step(exe: str, *args: object) -> dict[str, float]:
    cold = drop_caches()
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", MEASURE, exe, *map(str, args)], capture_output=True, text=True)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"{args[0]} failed ({p.returncode}): {p.stderr.strip()}")
    rss = int(p.stdout.strip().splitlines()[-1].split()[1]) / 1024
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(rss, 1), "cold": cold}


def make_volume(path: Path, apparent: int, data: int, rng: np.random.Generator) -> list[int]:
    """Regions of 64 MiB at random aligned offsets: half random bytes, half text-like (compressible)."""
    n = max(1, data // REGION)
    slots = rng.choice(apparent // REGION, size=n, replace=False)
    offsets = sorted(int(s) * REGION for s in slots)
    with open(path, "wb") as f:
        f.truncate(apparent)
        for i, off in enumerate(offsets):
            if i % 2:
                block = rng.integers(0, 256, REGION, dtype=np.uint8).tobytes()
            else:
                block = (rng.integers(32, 127, 4096, dtype=np.uint8).tobytes() * (REGION // 4096))
            f.seek(off)
            f.write(block)
    return offsets


def extents(path: Path) -> list[tuple[int, int]]:
    out, fd = [], os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def same(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in extents(a) + extents(b):
            for pos in range(start, end, 64 * MiB):
                n = min(64 * MiB, end - pos)
                if os.pread(fa.fileno(), n, pos) != os.pread(fb.fileno(), n, pos):
                    return False
    return True


def _n(v: object) -> int:
    assert isinstance(v, int), v
    return v


def run(exe: str, apparent: int, data: int, work: Path, seed: int) -> dict[str, object]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    vol, repo, out = work / "big.img", work / "repo", work / "restored.img"
    offsets = make_volume(vol, apparent, data, rng)
    env_cache = work / "cache"
    os.environ["IMAGECHAIN_CACHE"] = str(env_cache)
    res: dict[str, object] = {"apparent": apparent, "data": len(offsets) * REGION}
    res["full"] = step(exe, "backup", vol, repo, "--init")
    with open(vol, "r+b") as f:  # change 1% of the data, in place
        for off in offsets[:: max(1, len(offsets) // 4)]:
            f.seek(off + 4096)
            f.write(rng.integers(0, 256, max(1, len(offsets) * REGION // 100 // 4), dtype=np.uint8).tobytes())
    res["incremental"] = step(exe, "backup", vol, repo)
    res["verify"] = step(exe, "verify", repo)
    res["restore"] = step(exe, "restore", f"{repo}::default", out)
    res["restored_bit_exact"] = same(vol, out)
    res["stored_bytes"] = sum(f.stat().st_size for f in repo.rglob("*.icimg"))
    res["cache_bytes"] = sum(f.stat().st_size for f in env_cache.glob("*.map"))
    shutil.rmtree(work, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1T,4T")
    ap.add_argument("--data", default="2G")
    ap.add_argument("--workdir", type=Path, default=HERE / "work-scale")
    ap.add_argument("--seed", type=int, default=20261125)
    args = ap.parse_args()
    exe = str(Path(sys.executable).parent / "imagechain")
    results = []
    for size in args.sizes.split(","):
        r = run(exe, parse_size(size), parse_size(args.data), args.workdir, args.seed)
        results.append(r)
        print(f"{size}: " + json.dumps(r), file=sys.stderr)
    print("| apparent | data | step | wall | peak RSS |\n|---|---|---|---:|---:|")
    for r in results:
        for k in ("full", "incremental", "verify", "restore"):
            s = r[k]
            assert isinstance(s, dict)
            print(f"| {_n(r['apparent']) / (1 << 40):.0f} TiB | {_n(r['data']) / GiB:.0f} GiB | {k} | "
                  f"{s['wall_s']} s | {s['peak_rss_mib']} MiB |")
        print(f"| | | restored bit-exact: {r['restored_bit_exact']}, stored {_n(r['stored_bytes']) / MiB:.0f} MiB, "
              f"map cache {_n(r['cache_bytes']) / MiB:.0f} MiB | | |")
    (HERE / "scale-results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
