#!/usr/bin/env python3
"""Reading a point without restoring it: sequential throughput through the FUSE mount and the NBD export
against `imagechain restore` of the same point, and random 4 KiB reads per second through NBD.

A volume of mixed data (random, compressible and zero regions) is backed up; then, each run with the page
cache dropped and a fresh mount or server (so nothing is cached): restore to a file, `dd` of the mount's
disk.img, `nbdcopy` of the export (4 connections) to /dev/null, and `qemu-io -r` issuing --random reads of
4 KiB at random offsets on one connection, one at a time. Needs root, FUSE, qemu-utils and libnbd-bin.

    sudo .venv/bin/python bench/views.py [--size 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
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


def timed(cmd: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.monotonic() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(point: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    p = subprocess.Popen([ic(), "serve", point, "--listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None
    p.stdout.readline()  # "serving point ... at nbd://..."
    return p, f"nbd://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="volume MiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--random", type=int, default=5000, help="random 4 KiB reads per run")
    args = ap.parse_args()
    out: dict[str, list[float]] = {"restore_s": [], "fuse_s": [], "nbd_s": [], "random_per_s": []}
    with tempfile.TemporaryDirectory(prefix="imagechain-views-", dir="/var/tmp") as d:
        base = Path(d)
        vol, repo, mnt = base / "vol.img", base / "repo", base / "mnt"
        write_volume(vol, args.size * MiB, seed=7)
        subprocess.run([ic(), "backup", str(vol), str(repo), "--init"], check=True, capture_output=True)
        point = f"{repo}::default"
        mnt.mkdir()
        rng = random.Random(1)
        for _ in range(args.runs):
            (base / "r.img").unlink(missing_ok=True)
            drop()
            out["restore_s"].append(timed([ic(), "restore", point, str(base / "r.img")]))
            (base / "r.img").unlink()
            subprocess.run([ic(), "mount", point, str(mnt)], check=True, capture_output=True)
            try:
                drop()
                out["fuse_s"].append(timed(["dd", f"if={mnt}/disk.img", "of=/dev/null", "bs=1M"]))
            finally:
                subprocess.run([ic(), "umount", str(mnt)], check=True, capture_output=True)
            srv, uri = serve(point)
            try:
                drop()
                out["nbd_s"].append(timed(["nbdcopy", "-C", "4", uri, "null:"]))
            finally:
                srv.terminate()
                srv.wait()
            srv, uri = serve(point)
            try:
                drop()
                cmds = [f"read {rng.randrange(0, args.size * MiB // 4096) * 4096} 4096" for _ in range(args.random)]
                script = base / "reads.txt"
                script.write_text("\n".join(cmds) + "\nquit\n")
                t0 = time.monotonic()
                with open(script) as f:
                    subprocess.run(["qemu-io", "-r", "-f", "raw", uri], stdin=f, check=True, capture_output=True)
                out["random_per_s"].append(args.random / (time.monotonic() - t0))
            finally:
                srv.terminate()
                srv.wait()
    size = args.size * MiB
    summary = {k: round(statistics.median(v), 3) for k, v in out.items()}
    summary.update({f"{k.removesuffix('_s')}_mib_s": round(size / MiB / summary[k], 1)
                    for k in ("restore_s", "fuse_s", "nbd_s")})  # fmt: skip
    summary["fuse_vs_restore"] = round(summary["restore_s"] / summary["fuse_s"], 2)
    summary["nbd_vs_restore"] = round(summary["restore_s"] / summary["nbd_s"], 2)
    print(json.dumps({"runs": out, "median": summary}, indent=1))


if __name__ == "__main__":
    main()
