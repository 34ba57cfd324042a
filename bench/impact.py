#!/usr/bin/env python3
"""What a backup costs the machine's other work, and what the polite settings spare it.

1. I/O contention. fio reads random 4 KiB blocks (O_DIRECT, queue depth 1: a database's point reads) from
   a file on the same disk as the volume, without pause. While it runs, imagechain backs the volume up:
   a full backup and an incremental, each with the default settings and with the polite ones (--polite,
   default: POLITE below). fio logs its IOPS and mean latency every 250 ms; the figures compare the windows
   during each backup with fio alone, in the windows before and after it (--settle seconds each).
2. The page cache. In a memory cgroup of --cgroup-memory (the machine's own memory is too large to show
   anything), a hot working set (--hot-size) is read into the cache, then the volume is read once: by
   `imagechain backup` (drops what it reads and writes behind it) and by `dd` (a pass that does not, as
   most tools read). Afterwards: how much of the hot set is still cached (fincore) and how long reading it
   again takes, cold parts from the disk.

Needs root (drop_caches, cgroups), fio and fincore. The volume: --volume PATH (e.g. bench/run.py's, kept
with --keep), else a 4 GiB ext4 volume about half full is built in the work folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchlib import drop

HERE = Path(__file__).resolve().parent
POLITE = "--io-priority idle --cpu-priority 19 --threads 1 --max-read-rate 150M --max-write-rate 60M"
MiB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("/S")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


class Impact:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work: Path = args.workdir
        self.work.mkdir(parents=True, exist_ok=True)
        ic = Path(sys.executable).parent / "imagechain"
        self.imagechain = str(ic) if ic.exists() else (shutil.which("imagechain") or "imagechain")
        self.env = {**os.environ, "IMAGECHAIN_CACHE": str(self.work / "map-cache")}
        self.results: dict[str, Any] = {}

    # -- the volume ------------------------------------------------------------------------------------

    def volume(self) -> Path:
        if self.args.volume:
            return Path(self.args.volume)
        img = self.work / "volume.img"
        if img.exists():
            return img
        log("building a 4 GiB ext4 volume, about half full, from the files under /usr")
        with open(img, "wb") as f:
            f.truncate(4 << 30)
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(img)])
        mnt = self.work / "mnt"
        mnt.mkdir(exist_ok=True)
        run(["mount", "-o", "loop", str(img), str(mnt)])
        try:
            n = 0
            while shutil.disk_usage(mnt).used < (2 << 30):
                dst = mnt / f"copy{n}"
                subprocess.run(["cp", "-a", "/usr/lib", str(dst)], check=False, capture_output=True)
                n += 1
        finally:
            run(["umount", str(mnt)])
        return img

    # -- 1. I/O contention -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def fio(self, name: str) -> Iterator[tuple[float, Path]]:
        """fio random reads in the background; yields (its start on our clock, its log prefix)."""
        prefix = self.work / f"fio-{name}"
        for old in self.work.glob(f"fio-{name}*.log"):
            old.unlink()
        cmd = ["fio", "--name=db", f"--filename={self.work / 'db.dat'}", "--size=1G", "--rw=randread", "--bs=4k",
               "--direct=1", "--ioengine=psync", "--time_based", "--runtime=3600", "--log_avg_msec=250",
               f"--write_iops_log={prefix}", f"--write_lat_log={prefix}", "--output-format=json"]  # fmt: skip
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        try:
            yield t0, prefix
        finally:
            p.send_signal(2)  # fio writes its logs on SIGINT (and exits non-zero: it was interrupted)
            _, err = p.communicate(timeout=60)
            if not Path(f"{prefix}_iops.1.log").exists():
                raise RuntimeError(f"fio wrote no log ({p.returncode}): {err}")

    @staticmethod
    def series(path: Path) -> list[tuple[float, float]]:
        """(seconds since fio started, value) from a fio log (time in ms, value, ...)."""
        out = []
        for line in path.read_text().splitlines():
            f = line.split(",")
            if len(f) >= 2:
                out.append((int(f[0]) / 1000, float(f[1])))
        return out

    def backup(self, repo: Path, chain: str, polite: bool) -> dict[str, Any]:
        extra = self.args.polite.split() if polite else []
        t0 = time.monotonic()
        out = run([self.imagechain, "backup", str(self.vol), str(repo), "--chain", chain, "--json", *extra],
                  env=self.env).stdout  # fmt: skip
        t1 = time.monotonic()
        res = json.loads(out)
        return {"start": t0, "end": t1, "wall_s": round(t1 - t0, 2), "kind": res["kind"],
                "read_bytes": res["read_bytes"], "stored_bytes": res["stored_bytes"]}  # fmt: skip

    def contention(self) -> None:
        repo = self.work / "repo"
        shutil.rmtree(repo, ignore_errors=True)
        run([self.imagechain, "init", str(repo)])
        log("laying out fio's 1 GiB file")
        run(["fio", "--name=layout", f"--filename={self.work / 'db.dat'}", "--size=1G", "--rw=write", "--bs=1M",
             "--direct=1", "--output=/dev/null"])  # fmt: skip
        rows = []
        for step in ("full", "incremental"):
            for polite in (False, True):
                name = f"{step}-{'polite' if polite else 'default'}"
                drop(required=True)
                with self.fio(name) as (f0, prefix):
                    time.sleep(self.args.settle)
                    b = self.backup(repo, "polite" if polite else "default", polite)
                    time.sleep(self.args.settle)
                iops = self.series(Path(f"{prefix}_iops.1.log"))
                lat = self.series(Path(f"{prefix}_lat.1.log"))
                s, e = b["start"] - f0, b["end"] - f0

                def mean(ser: list[tuple[float, float]], a: float, z: float) -> float:
                    vals = [v for t, v in ser if a <= t <= z]
                    return statistics.fmean(vals) if vals else float("nan")

                # fio alone: the windows before and after the backup (this disk's speed drifts by itself)
                alone = [(t, v) for t, v in iops if 0.75 <= t <= s - 0.25 or e + 0.5 <= t]
                alone_lat = [(t, v) for t, v in lat if 0.75 <= t <= s - 0.25 or e + 0.5 <= t]
                before = mean(alone, 0, 1e9)
                during = mean(iops, s + 0.25, e)
                row = {"step": name, **b, "fio_iops_before": round(before), "fio_iops_during": round(during),
                       "fio_drop": round(1 - during / before, 3),
                       "fio_lat_us_before": round(mean(alone_lat, 0, 1e9) / 1000, 1),
                       "fio_lat_us_during": round(mean(lat, s + 0.25, e) / 1000, 1)}  # fmt: skip
                assert row["kind"] == step, row
                rows.append(row)
                log(f"  {name:<22} backup {b['wall_s']:6.2f} s   fio {row['fio_iops_before']:6} -> "
                    f"{row['fio_iops_during']:6} IOPS ({row['fio_drop']:+.1%} drop)   latency "
                    f"{row['fio_lat_us_before']} -> {row['fio_lat_us_during']} us")  # fmt: skip
        self.results["contention"] = rows

    # -- 2. the page cache -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def cgroup(self) -> Iterator[Path]:
        base = Path("/sys/fs/cgroup/memory")
        if base.is_dir():  # v1
            cg, limit = base / "imagechain-bench", "memory.limit_in_bytes"
        else:  # v2
            cg, limit = Path("/sys/fs/cgroup/imagechain-bench"), "memory.max"
        cg.mkdir(exist_ok=True)
        try:
            (cg / limit).write_text(str(self.args.cgroup_memory))
            yield cg
        finally:
            with contextlib.suppress(OSError):
                cg.rmdir()

    def inside(self, cg: Path, cmd: list[str]) -> float:
        """Run cmd in the cgroup; its wall time."""
        t0 = time.monotonic()
        run(["sh", "-c", f'echo $$ > {cg / "cgroup.procs"} && exec "$@"', "sh", *cmd], env=self.env)
        return time.monotonic() - t0

    def cached(self, path: Path) -> int:
        out = run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)]).stdout
        return int(out.split()[0])

    def page_cache(self) -> None:
        hot = self.work / "hot.dat"
        with open(hot, "wb") as f:
            for _ in range(self.args.hot_size // MiB):
                f.write(os.urandom(MiB))
            os.fsync(f.fileno())
        rows = []
        repo = self.work / "repo-cache"
        passes = {
            "imagechain backup": [self.imagechain, "backup", str(self.vol), str(repo), "--init", "--full", "--json"],
            "dd (no drop-behind)": ["dd", f"if={self.vol}", "of=/dev/null", "bs=8M", "status=none"],
        }
        with self.cgroup() as cg:
            for name, cmd in passes.items():
                shutil.rmtree(repo, ignore_errors=True)
                drop(required=True)
                warm = self.inside(cg, ["dd", f"if={hot}", "of=/dev/null", "bs=1M", "status=none"])
                hot_before = self.cached(hot)
                t_pass = self.inside(cg, cmd)
                hot_after = self.cached(hot)
                reread = self.inside(cg, ["dd", f"if={hot}", "of=/dev/null", "bs=1M", "status=none"])
                rows.append({"pass": name, "pass_s": round(t_pass, 2), "hot_cached_before": hot_before,
                             "hot_cached_after": hot_after, "hot_read_cold_s": round(warm, 3),
                             "hot_reread_s": round(reread, 3)})  # fmt: skip
                log(f"  {name:<22} pass {t_pass:6.2f} s   hot set cached {hot_before / MiB:6.1f} -> "
                    f"{hot_after / MiB:6.1f} MiB   re-read {reread * 1000:7.1f} ms (cold {warm * 1000:.1f} ms)")
        self.results["page_cache"] = rows
        shutil.rmtree(repo, ignore_errors=True)

    def main(self) -> None:
        for tool in ("fio", "fincore"):
            if shutil.which(tool) is None:
                package = "fio" if tool == "fio" else "util-linux"
                raise SystemExit(f"{tool} is not installed (apt-get install {package})")
        self.vol = self.volume()
        self.results["config"] = {"volume": str(self.vol), "volume_bytes": self.vol.stat().st_size,
                                  "polite": self.args.polite, "cgroup_memory": self.args.cgroup_memory,
                                  "hot_size": self.args.hot_size, "cpus": os.cpu_count(),
                                  "scheduler": self.scheduler()}  # fmt: skip
        log(f"volume {self.vol} ({self.vol.stat().st_size / (1 << 30):.1f} GiB); disk scheduler "
            f"{self.results['config']['scheduler']}")
        log(f"1. fio random reads during backups (default, then {self.args.polite})")
        self.contention()
        if self.args.skip_cache:
            return
        log(f"2. hot working set of {self.args.hot_size // MiB} MiB in a {self.args.cgroup_memory // MiB} MiB "
            f"memory cgroup, after one pass over the volume")
        self.page_cache()
        (self.work / "impact.json").write_text(json.dumps(self.results, indent=1))
        log(f"results: {self.work / 'impact.json'}")

    def scheduler(self) -> str:
        dev = os.stat(self.vol).st_dev
        try:
            name = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
            disk = name.parent if (name / "partition").exists() else name
            text = (disk / "queue" / "scheduler").read_text()
            return text[text.index("[") + 1 : text.index("]")] if "[" in text else text.strip()
        except (OSError, ValueError):
            return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volume", help="the volume to back up (default: build one in the work folder)")
    ap.add_argument("--workdir", type=Path, default=HERE / "work-impact", help="scratch folder")
    ap.add_argument("--polite", default=POLITE, help=f"options of the polite runs (default: {POLITE})")
    ap.add_argument("--cgroup-memory", type=parse_size, default=parse_size("1G"), help="memory cgroup limit")
    ap.add_argument("--hot-size", type=parse_size, default=parse_size("256M"), help="hot working set")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds of fio alone before and after a backup")
    ap.add_argument("--skip-cache", action="store_true", help="only the I/O contention part")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (drop_caches, memory cgroups)")
    Impact(args).main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
