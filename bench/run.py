#!/usr/bin/env python3
"""imagechain benchmark: a realistic ext4 volume, cold-cache timings of backup, incremental, restore and
delta restore, and the same volume through zstd, partclone, borg and restic for comparison.

Run as root (loop mounts, drop_caches):  make bench   or   .venv/bin/python bench/run.py [--size 2G]
See bench/README.md for what is measured and how to read the table."""

from __future__ import annotations

import argparse
import compileall
import contextlib
import errno
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import drop, host_backed_memory, ic, touch_memory

SEED = 20251124
FILL = 0.55  # live data, as a share of the filesystem (df's "used", metadata included)
STALE_FILL = 0.95  # how full the filesystem gets with soon-deleted files before the live data goes in
CHANGE = 0.02  # share of the live data modified between the full and the incremental backup
DELETE = 0.005  # share of the live data deleted in the change step (on top of CHANGE)
MEDIA_SHARE = 0.20  # share of the live data that is incompressible "media" (photos, videos, archives)
MAX_POOL_FILE = 128 << 20
FS_UUID = "8c3a1d5e-5b7f-4a43-9d1e-6b0f2e4c9a71"  # fixed, so the volume (and imagechain's source id) repeats
MB, MiB, GiB = 1_000_000, 1 << 20, 1 << 30
HERE = Path(__file__).resolve().parent
POOL_ROOTS = ["/usr/lib", "/usr/share", "/usr/bin", "/usr/sbin"]

T_START = time.monotonic()
TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None  # GNU time, for each command's peak RSS


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- helpers


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M, 2G)")
    n = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")
    return int(n) // (1 << 20) * (1 << 20)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run an untimed helper command; fail loudly with its output."""
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({p.returncode}): {p.stderr.strip() or p.stdout}")
    return p


def cpu_busy_s() -> float:
    """CPU seconds spent by everything on the machine so far (from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def proc_cpu() -> dict[tuple[int, str], tuple[str, float]]:
    """CPU seconds (own + reaped children) of every other process, keyed by (pid, start time)."""
    tck = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    out: dict[tuple[int, str], tuple[str, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        if fields[1] == str(me):  # our own children are the step being measured
            continue
        cpu = sum(int(x) for x in fields[11:15]) / tck  # utime stime cutime cstime
        out[(int(name), fields[19])] = (comm, cpu)
    return out


def disk_reads(path: Path) -> tuple[int, int] | None:
    """(reads completed, bytes read) so far by the block device that holds path, from /proc/diskstats;
    None where there is none (tmpfs, overlay)."""
    try:
        st = os.stat(path)
        with open(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/uevent") as f:
            name = next(ln.split("=", 1)[1].strip() for ln in f if ln.startswith("DEVNAME="))
        with open("/proc/diskstats") as f:
            v = next(ln.split() for ln in f if ln.split()[2] == name)
    except (OSError, StopIteration):
        return None
    return int(v[3]), int(v[5]) * 512


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))


def others_top(before: dict[tuple[int, str], tuple[str, float]],
               after: dict[tuple[int, str], tuple[str, float]]) -> list[str]:  # fmt: skip
    deltas: dict[str, float] = {}
    for key, (comm, cpu) in after.items():
        d = cpu - before.get(key, (comm, 0.0))[1]
        if d > 0:
            deltas[comm] = deltas.get(comm, 0.0) + d
    top = sorted(deltas.items(), key=lambda kv: -kv[1])[:4]
    return [f"{comm} {d:.1f}s" for comm, d in top if d >= 0.1]


def tree_bytes(path: Path) -> int:
    """Apparent size of all regular files under path (or of path itself)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(root, name))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def hasher() -> Any:
    try:
        import blake3  # imagechain's own dependency: fast; hashlib otherwise

        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    except ImportError:
        return hashlib.sha256()


def file_digest(path: Path) -> str:
    h = hasher()
    buf = bytearray(8 * MiB)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(mv):
            h.update(mv[:n])
    return str(h.hexdigest())


def masked_digests(path: Path, bs: int, masks: dict[str, np.ndarray | None],
                   zero: np.ndarray | None = None) -> tuple[dict[str, str], bool]:  # fmt: skip
    """One streaming pass over path: for each mask (bool per block; None: every byte) a digest of the
    selected blocks in order, and whether every block selected by `zero` is all zeros. A partial last
    block is hashed padded with zeros (the same for every file of that size)."""
    hs = {k: hasher() for k in masks}
    chunk = max(bs, 8 * MiB // bs * bs)
    buf = bytearray(chunk)
    mv = memoryview(buf)
    arr = np.frombuffer(buf, np.uint8)
    zero_ok = True
    b0 = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = 0
            while n < chunk and (k := f.readinto(mv[n:])):
                n += k
            if not n:
                break
            nb = -(-n // bs)
            buf[n : nb * bs] = bytes(nb * bs - n)
            blocks = arr[: nb * bs].reshape(nb, bs)
            for key, m in masks.items():
                if m is None:
                    hs[key].update(mv[:n])
                    continue
                sel = m[b0 : b0 + nb]
                if sel.all():
                    hs[key].update(mv[: nb * bs])
                elif sel.any():
                    hs[key].update(blocks[sel])  # a contiguous copy of the selected blocks
            if zero is not None and zero_ok:
                sel = zero[b0 : b0 + nb]
                zero_ok = not (sel.any() and blocks[sel].any())
            b0 += nb
            if n < chunk:
                break
    return {k: str(h.hexdigest()) for k, h in hs.items()}, zero_ok


# The "cold read (used)" baseline, run as its own process: only the blocks marked in a .npy bool mask
# (parsed by hand: no numpy import in the timed process), runs of used blocks read in <= 8 MiB preadv calls.
READ_USED = """\
import os, sys
raw = open(sys.argv[2], "rb").read()
assert raw[:6] == b"\\x93NUMPY", "not a .npy file"
hl, at = (int.from_bytes(raw[8:10], "little"), 10) if raw[6] == 1 else (int.from_bytes(raw[8:12], "little"), 12)
assert b"|b1" in raw[at : at + hl], "not a bool mask"
used = raw[at + hl :]
bs, cap = int(sys.argv[3]), 8 << 20
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
end = os.fstat(fd).st_size
buf = memoryview(bytearray(cap))
n = 0
i = used.find(1)
while i >= 0:
    j = used.find(0, i)
    j = len(used) if j < 0 else j
    off, stop = i * bs, min(j * bs, end)
    while off < stop:
        k = os.preadv(fd, [buf[: min(cap, stop - off)]], off)
        if not k:
            break
        n += k
        off += k
    i = used.find(1, j)
print(n)
"""


def tool_version(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (p.stdout or p.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def project_revision() -> dict[str, Any]:
    """The commit benchmarked, read-only (--no-optional-locks: not even the index is refreshed)."""
    root = HERE.parent
    git = ["git", "--no-optional-locks", "-C", str(root)]
    try:
        rev = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        st = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", "src"],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if rev.returncode:
        return {}
    return {"commit": rev.stdout.strip(), "src_modified": bool(st.stdout.strip())}


def compile_bytecode() -> str:
    """Byte-compile imagechain as pip does when it installs a wheel. From a source checkout (an editable
    install) with PYTHONDONTWRITEBYTECODE set, every run would compile its modules anew, about 0.1 s
    of start-up that no installed copy pays."""
    import imagechain

    folder = os.path.dirname(imagechain.__file__)
    compileall.compile_dir(folder, quiet=1)
    return folder


class Mounts:
    """Loop devices and mounts made by this run, undone in reverse order whatever happens."""

    def __init__(self) -> None:
        self.active: list[tuple[str, str]] = []  # (kind, what)

    @contextlib.contextmanager
    def mounted(self, img: Path, mnt: Path) -> Iterator[Path]:
        dev = run(["losetup", "--find", "--show", str(img)]).stdout.strip()
        self.active.append(("loop", dev))
        try:
            mnt.mkdir(parents=True, exist_ok=True)
            run(["mount", "-t", "ext4", "-o", "nodiscard", dev, str(mnt)])
            self.active.append(("mount", str(mnt)))
            try:
                yield mnt
            finally:
                self._umount(str(mnt))
        finally:
            self._detach(dev)

    def _umount(self, mnt: str) -> None:
        for attempt in range(10):
            if subprocess.run(["umount", mnt], capture_output=True).returncode == 0:
                break
            time.sleep(0.5 * (attempt + 1))
        else:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        with contextlib.suppress(ValueError):
            self.active.remove(("mount", mnt))

    def _detach(self, dev: str) -> None:
        for attempt in range(10):
            if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
                break
            time.sleep(0.5 * (attempt + 1))
        with contextlib.suppress(ValueError):
            self.active.remove(("loop", dev))

    def cleanup(self) -> None:
        for kind, what in reversed(list(self.active)):
            if kind == "mount":
                self._umount(what)
            else:
                self._detach(what)


# -------------------------------------------------------------------------------------- timed steps


@dataclass
class Step:
    key: str  # unique id, e.g. "full/imagechain"
    step: str  # what was done, as shown in the table
    tool: str
    command: str
    wall_s: float  # process(es) wall time + the sync that makes their writes durable
    proc_s: float
    sync_s: float
    user_s: float
    sys_s: float
    peak_rss_kib: int  # sum over the pipeline's processes of each one's own peak (GNU time's %M)
    others_cpu_s: float  # CPU seconds used by *other* processes on the machine meanwhile (noise indicator)
    read_bytes: int  # block-layer reads/writes charged to the processes (ru_inblock/ru_oublock)
    written_bytes: int
    stored_bytes: int | None = None  # repository/output growth
    compare_to: str | None = None  # key of the imagechain step this one is set against
    others: list[str] = field(default_factory=list)  # the other processes that used most CPU meanwhile
    waited_s: float = 0.0  # how long the step waited for the machine to go quiet
    disk_reads: int | None = None  # requests the device holding the work dir completed meanwhile (any process)
    disk_read_bytes: int | None = None
    mbps: float = 0.0
    cpu_ratio: float = 0.0  # (user+sys)/wall: cores kept busy
    extra: dict[str, Any] = field(default_factory=dict)


BACKUP_KEYS = ("block_size", "read_bytes", "changed_bytes", "changed_blocks", "stored_bytes", "file_bytes",
               "duration_s", "unused_blocks", "used_map")  # fmt: skip


def reads_text(s: Step) -> str:
    if s.disk_reads is None or s.disk_read_bytes is None:
        return "disk reads unknown"
    return f"{s.disk_reads} reads of {s.disk_read_bytes / max(s.disk_reads, 1) / 1024:.0f} KiB"


class StepFailed(RuntimeError):
    pass


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work: Path = args.workdir
        self.logs = self.work / "logs"
        self.img = self.work / "volume.img"
        self.mnt = self.work / "mnt"
        self.tmp = self.work / "tmp"
        self.held = self.work / "held"  # repeated incrementals: earlier ones moved aside, the first map linked
        self.size: int = args.size
        self.bs: int = args.block_bytes  # imagechain's block size for both chains (and the used-block maps)
        self.steps: list[Step] = []
        self.mounts = Mounts()
        self.results: dict[str, Any] = {}
        self.memory: dict[str, Any] = {}  # free page reporting as the run found and left it
        self.imagechain = ic()
        self.env = dict(os.environ)
        # keep imagechain's block-map cache (used by incrementals, default on) inside the work dir
        self.env["IMAGECHAIN_CACHE"] = str(self.work / "imagechain-map-cache")
        # the encrypted chain's passphrase (the benchmark's own, never a secret)
        self.enc_env = {**self.env, "IMAGECHAIN_PASSPHRASE": "imagechain benchmark passphrase"}

    # -- running one timed step -----------------------------------------------------------------------

    def timed(self, key: str, step: str, tool: str, pipeline: list[list[str]], *, stdout: Path | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None, grows: Path | None = None,
              compare_to: str | None = None) -> Step:  # fmt: skip
        """Cold cache, then run the pipeline; each process reaped with wait4 for its own rusage."""
        slug = key.replace("/", "-")
        before = tree_bytes(grows) if grows else 0
        waited = self.wait_quiet()
        drop(required=True)
        errf = open(self.logs / f"{slug}.stderr", "wb")  # noqa: SIM115 - closed below
        out = open(stdout or os.devnull, "wb")  # noqa: SIM115
        procs: list[subprocess.Popen[bytes]] = []
        # Peak RSS comes from GNU time's wait4 on the real command: our own wait4 would also see this
        # (big) Python process's high-water mark, which a vfork()ed child inherits across exec.
        rss_files = [self.logs / f"{slug}.{i}.maxrss" for i in range(len(pipeline))]
        wrapped = [[TIME, "-f", "%M", "-o", str(f), *argv] if TIME else argv
                   for f, argv in zip(rss_files, pipeline, strict=True)]  # fmt: skip
        procs0 = proc_cpu()
        busy0 = cpu_busy_s()
        disk0 = disk_reads(self.work)
        t0 = time.perf_counter()
        try:
            prev = None
            for i, argv in enumerate(wrapped):
                last = i == len(pipeline) - 1
                p = subprocess.Popen(argv, stdin=prev if prev is not None else subprocess.DEVNULL,
                                     stdout=out if last else subprocess.PIPE, stderr=errf,
                                     env=env or self.env, cwd=cwd)  # fmt: skip
                if prev is not None:
                    prev.close()
                prev = p.stdout
                procs.append(p)
            rus = []
            for p in procs:
                _pid, status, ru = os.wait4(p.pid, 0)
                p.returncode = os.waitstatus_to_exitcode(status)
                rus.append(ru)
            t1 = time.perf_counter()
            disk1 = disk_reads(self.work)
            busy1 = cpu_busy_s()
            procs1 = proc_cpu()
            os.sync()
            t2 = time.perf_counter()
        finally:
            for p in procs:
                if p.returncode is None:
                    p.kill()
                    p.wait()
            errf.close()
            out.close()
        bad = [(argv[0], p.returncode) for argv, p in zip(pipeline, procs, strict=True) if p.returncode]
        if bad:
            tail = (self.logs / f"{slug}.stderr").read_text(errors="replace")[-2000:]
            raise StepFailed(f"{step} ({tool}) failed: {bad}\n{tail}")
        if TIME:
            peak = sum(int(f.read_text().split()[-1]) for f in rss_files)
            for f in rss_files:
                f.unlink()
        else:
            peak = sum(r.ru_maxrss for r in rus)
        s = Step(
            key=key, step=step, tool=tool, command=" | ".join(" ".join(a) for a in pipeline),
            wall_s=t2 - t0, proc_s=t1 - t0, sync_s=t2 - t1,
            user_s=sum(r.ru_utime for r in rus), sys_s=sum(r.ru_stime for r in rus),
            peak_rss_kib=peak, others_cpu_s=max(0.0, busy1 - busy0 - sum(r.ru_utime + r.ru_stime for r in rus)),
            read_bytes=sum(r.ru_inblock for r in rus) * 512, written_bytes=sum(r.ru_oublock for r in rus) * 512,
            stored_bytes=(tree_bytes(grows) - before) if grows else None, compare_to=compare_to,
            others=others_top(procs0, procs1), waited_s=round(waited, 1),
            disk_reads=disk1[0] - disk0[0] if disk0 and disk1 else None,
            disk_read_bytes=disk1[1] - disk0[1] if disk0 and disk1 else None,
        )  # fmt: skip
        s.mbps = self.size / s.wall_s / MB
        s.cpu_ratio = (s.user_s + s.sys_s) / s.wall_s
        self.steps.append(s)
        log(f"  {step:<22} {tool:<12} {s.wall_s:8.2f} s  {s.mbps:8.1f} MB/s  cpu {s.cpu_ratio:4.2f}  "
            f"rss {s.peak_rss_kib / 1024:7.1f} MiB"
            + (f"  stored {s.stored_bytes / MiB:8.1f} MiB" if s.stored_bytes is not None else ""))  # fmt: skip
        return s

    def wait_quiet(self) -> float:
        """Wait (up to --quiet-wait seconds) for a second in which the rest of the machine used < 5 % CPU."""
        t0 = time.monotonic()
        cores = os.cpu_count() or 1
        said = False
        while time.monotonic() - t0 < self.args.quiet_wait:
            b0, w0 = cpu_busy_s(), time.monotonic()
            time.sleep(1.0)
            busy = (cpu_busy_s() - b0) / ((time.monotonic() - w0) * cores)
            if busy < 0.05:
                break
            if not said:
                log(f"  waiting for other processes to go quiet ({busy:.0%} CPU busy)")
                said = True
        else:
            if self.args.quiet_wait:
                log(f"  machine still busy after {self.args.quiet_wait} s; measuring anyway")
        return time.monotonic() - t0

    def cold_read(self, key: str, step: str) -> Step:
        code = ("import os,sys\nfd=os.open(sys.argv[1],os.O_RDONLY)\n"
                "os.posix_fadvise(fd,0,0,os.POSIX_FADV_SEQUENTIAL)\n"
                "buf=memoryview(bytearray(8<<20));n=0\n"
                "while k:=os.readv(fd,[buf]): n+=k\nprint(n)\n")  # fmt: skip
        return self.timed(key, step, "python read", [[sys.executable, "-I", "-S", "-c", code, str(self.img)]])

    def cold_read_used(self, key: str, step: str, mask: Path) -> Step:
        """The floor for a backup that reads only used blocks: those marked in mask, with a cold cache."""
        out = self.logs / f"{key.replace('/', '-')}.out"
        s = self.timed(key, step, "python read",
                       [[sys.executable, "-I", "-S", "-c", READ_USED, str(self.img), str(mask), str(self.bs)]],
                       stdout=out)  # fmt: skip
        s.extra["bytes"] = int(out.read_text())
        return s

    def used_mask(self, name: str) -> np.ndarray:
        """The used-block mask of the volume now, at the chain's block size, as imagechain's backup makes it
        (untimed); saved to WORKDIR/name for the cold read (used) baseline."""
        from imagechain.usage import volume_usage

        fd = os.open(self.img, os.O_RDONLY)
        try:
            u = volume_usage(lambda off, n: os.pread(fd, n, off), self.size, self.bs)
        finally:
            os.close(fd)
        blocks = -(-self.size // self.bs)
        used = np.ones(blocks, bool) if u.used is None else np.asarray(u.used, bool)
        assert len(used) == blocks, (len(used), blocks)
        np.save(self.work / name, used)
        self.results.setdefault("used_maps", {})[name] = {
            "method": u.method, "notices": u.notices, "blocks": blocks, "used_blocks": int(used.sum()),
            "used_bytes": int(used.sum()) * self.bs}  # fmt: skip
        log(f"  used-block map ({u.method}): {int(used.sum())} of {blocks} blocks of {human(self.bs)} used")
        return used

    # -- the volume -----------------------------------------------------------------------------------

    def pool(self) -> list[tuple[str, int]]:
        roots = list(POOL_ROOTS)
        import sysconfig

        stdlib = sysconfig.get_paths().get("stdlib")
        if stdlib and not any(stdlib.startswith(r + "/") for r in roots):
            roots.append(stdlib)
        seen: set[tuple[int, int]] = set()
        files: list[tuple[str, int]] = []
        work = str(self.work.resolve())
        for root in roots:
            for dirpath, dirs, names in os.walk(root):
                dirs.sort()
                if dirpath.startswith(work):
                    dirs[:] = []
                    continue
                for name in sorted(names):
                    p = os.path.join(dirpath, name)
                    try:
                        st = os.lstat(p)
                    except OSError:
                        continue
                    if not stat.S_ISREG(st.st_mode) or not 0 < st.st_size <= MAX_POOL_FILE:
                        continue
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                    files.append((p, st.st_size))
        files.sort()
        return files

    @staticmethod
    def used(mnt: Path) -> tuple[int, int]:
        st = os.statvfs(mnt)
        return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize

    @staticmethod
    def mutate(data: bytes, rng: np.random.Generator, every: int = 1024) -> bytes:
        """An 'edited' version of data: a few bytes changed every ~KiB, so every 4 KiB block differs
        (no tool can dedupe it against the old version) while it stays as compressible as before."""
        if not data:
            return data
        arr = np.frombuffer(data, np.uint8).copy()
        k = max(1, len(arr) // every)
        arr[rng.integers(0, len(arr), k)] = rng.integers(0, 256, k, dtype=np.uint8)
        return arr.tobytes()

    @staticmethod
    def read_file(path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError:
            return None

    @staticmethod
    def write_file(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def media_size(self, rng: np.random.Generator) -> int:
        """Photo/video/archive-like sizes: log-normal around 3 MiB, 64 KiB..96 MiB."""
        return int(min(96 * MiB, max(64 << 10, rng.lognormal(np.log(3 * MiB), 1.2))))

    def build_volume(self) -> dict[str, Any]:
        t0 = time.monotonic()
        rng = np.random.Generator(np.random.PCG64(self.args.seed))
        log(f"building {human(self.size)} ext4 volume {self.img}")
        self.img.unlink(missing_ok=True)
        with open(self.img, "wb") as f:
            f.truncate(self.size)
        run(["mkfs.ext4", "-q", "-F", "-L", "benchvol", "-U", FS_UUID,
             "-E", f"nodiscard,lazy_itable_init=0,lazy_journal_init=0,hash_seed={FS_UUID}", str(self.img)])  # fmt: skip
        pool = self.pool()
        pool_bytes = sum(s for _, s in pool)
        log(f"  pool: {len(pool)} files, {human(pool_bytes)} from {', '.join(POOL_ROOTS)} and the python stdlib")
        info: dict[str, Any] = {"pool_files": len(pool), "pool_bytes": pool_bytes}
        live: list[tuple[str, int]] = []
        with self.mounts.mounted(self.img, self.mnt) as mnt:
            used0, total = self.used(mnt)
            info["fs_bytes"] = total
            info["fs_used_empty"] = used0
            # 1. stale data: fill the filesystem with files, make them durable, delete them
            big = [p for p, s in pool if s >= 256 << 10]
            stale_dir = mnt / "old"
            stale_dir.mkdir()
            stale = stale_random = 0
            i = 0
            try:
                while self.used(mnt)[0] < STALE_FILL * total:
                    n = int(rng.integers(4, 48)) * MiB
                    is_random = rng.random() < 0.5
                    if is_random:  # encrypted/compressed leftovers
                        data = rng.bytes(n)
                    else:  # old versions of ordinary files
                        parts, got = [], 0
                        while got < n:
                            d = self.read_file(big[int(rng.integers(len(big)))])
                            if d:
                                parts.append(d)
                                got += len(d)
                        data = self.mutate(b"".join(parts)[:n], rng, 4096)
                    self.write_file(stale_dir / f"{i // 100:03d}" / f"blob{i:05d}.dat", data)
                    stale += n
                    stale_random += n if is_random else 0
                    i += 1
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
            os.sync()
            info["stale_written"] = stale
            info["stale_random_share"] = round(stale_random / max(1, stale), 3)
            info["stale_fill"] = round(self.used(mnt)[0] / total, 3)
            log(f"  stale: wrote {human(stale)} ({info['stale_random_share']:.0%} random) "
                f"to {info['stale_fill']:.0%} full; deleting")  # fmt: skip
            shutil.rmtree(stale_dir)
            os.sync()
            # 2. live data: real files (shuffled, repeated under new names if the pool runs out) and media
            order = list(range(len(pool)))
            random.Random(self.args.seed).shuffle(order)
            copied = media = 0
            passes = 0
            pos = 0
            target = FILL * total
            while self.used(mnt)[0] < target:
                if media < MEDIA_SHARE * (copied + media):
                    n = self.media_size(rng)
                    rel = f"home/user/media/{len(live) // 200:03d}/IMG_{len(live):06d}.jpg"
                    self.write_file(mnt / rel, rng.bytes(n))
                    media += n
                    live.append((rel, n))
                    continue
                if pos == len(order):
                    pos, passes = 0, passes + 1
                src, _size = pool[order[pos]]
                pos += 1
                content = self.read_file(src)
                if content is None:
                    continue
                rel = f"sys{passes}{src}" + (f".{passes}" if passes else "")
                self.write_file(mnt / rel, content)
                copied += len(content)
                live.append((rel, len(content)))
            os.sync()
            used, _ = self.used(mnt)
            info.update(live_files=len(live), live_bytes=copied + media, system_bytes=copied, media_bytes=media,
                        pool_passes=passes + 1, fs_used=used, fill=round(used / total, 3))  # fmt: skip
        self.live = live
        info["build_s"] = round(time.monotonic() - t0, 1)
        log(f"  live: {len(live)} files, {human(copied)} system files ({passes + 1} pass(es) over the pool) + "
            f"{human(media)} media; fs {info['fill']:.1%} full; built in {info['build_s']} s")  # fmt: skip
        return info

    def change_volume(self) -> dict[str, Any]:
        """~CHANGE of the live data rewritten: in-place edits, whole-file replacements, new files; a few deletes."""
        t0 = time.monotonic()
        rng = np.random.Generator(np.random.PCG64(self.args.seed + 1))
        live_bytes = sum(s for _, s in self.live)
        budget = CHANGE * live_bytes
        order = rng.permutation(len(self.live)).tolist()
        pool = self.pool()
        stats: dict[str, Any] = {"inplace_files": 0, "inplace_bytes": 0, "replaced_files": 0, "replaced_bytes": 0,
                 "added_files": 0, "added_bytes": 0, "deleted_files": 0, "deleted_bytes": 0}  # fmt: skip
        with self.mounts.mounted(self.img, self.mnt) as mnt:
            it = iter(order)
            gone: set[int] = set()
            # in-place edits (databases, VM disks, logs): 4 KiB-aligned ranges of larger files
            while stats["inplace_bytes"] < 0.4 * budget:
                j = next(it)
                rel, size = self.live[j]
                if size < 64 << 10:
                    continue
                ln = min(size, int(rng.integers(16 << 10, 1 << 20)))
                off = int(rng.integers(0, size - ln + 1)) // 4096 * 4096
                with open(mnt / rel, "r+b") as f:
                    f.seek(off)
                    old = f.read(ln)
                    f.seek(off)
                    f.write(self.mutate(old, rng))
                stats["inplace_files"] += 1
                stats["inplace_bytes"] += len(old)
            # whole-file replacements (save = write a new file, rename over the old one)
            while stats["replaced_bytes"] < 0.3 * budget:
                j = next(it)
                rel, size = self.live[j]
                if size > min(16 * MiB, 0.3 * budget - stats["replaced_bytes"] + (256 << 10)):
                    continue
                data = self.mutate((mnt / rel).read_bytes(), rng)
                grow = int(len(data) * rng.uniform(-0.1, 0.1))
                data = data[: len(data) + grow] if grow < 0 else data + data[:grow]
                tmp = mnt / (rel + ".new~")
                self.write_file(tmp, data)
                os.replace(tmp, mnt / rel)
                stats["replaced_files"] += 1
                stats["replaced_bytes"] += len(data)
                gone.add(j)
            # new files: fresh system files (edited, so nothing is a copy of what is there) and media
            prng = random.Random(self.args.seed + 2)
            while stats["added_bytes"] < 0.3 * budget:
                k = stats["added_files"]
                if rng.random() < MEDIA_SHARE:
                    data = rng.bytes(min(self.media_size(rng), int(0.3 * budget) // 2))
                    rel = f"home/user/new/media/VID_{k:05d}.mp4"
                else:
                    src, size = pool[prng.randrange(len(pool))]
                    raw = self.read_file(src) if size <= 16 * MiB else None
                    if not raw:
                        continue
                    data = self.mutate(raw, rng)
                    rel = f"home/user/new/{k:05d}-{os.path.basename(src)}"
                self.write_file(mnt / rel, data)
                stats["added_files"] += 1
                stats["added_bytes"] += len(data)
            # deletions (metadata only; the blocks keep their data)
            for j in it:
                if stats["deleted_bytes"] >= DELETE * live_bytes:
                    break
                if j in gone:
                    continue
                rel, size = self.live[j]
                (mnt / rel).unlink()
                stats["deleted_files"] += 1
                stats["deleted_bytes"] += size
            os.sync()
            used, total = self.used(mnt)
        written = stats["inplace_bytes"] + stats["replaced_bytes"] + stats["added_bytes"]
        stats.update(written_bytes=written, written_share=round(written / live_bytes, 4), fs_used=used,
                     fill=round(used / total, 3), change_s=round(time.monotonic() - t0, 1))  # fmt: skip
        log(f"  change: wrote {human(written)} ({stats['written_share']:.2%} of the live data): "
            f"{stats['inplace_files']} in-place edits, {stats['replaced_files']} replaced, "
            f"{stats['added_files']} added, {stats['deleted_files']} deleted")  # fmt: skip
        return stats

    # -- the benchmark --------------------------------------------------------------------------------

    def ic(self, *args: str) -> list[str]:
        return [self.imagechain, *args]

    def ic_json(self, key: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.logs / f"{key.replace('/', '-')}.json").read_text())
        return data

    def main(self) -> None:
        a = self.args
        w = self.work
        w.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        repo = w / "repo-imagechain"
        for p in (repo, w / "repo-borg", w / "repo-restic", w / "borg-home", w / "restic-cache",
                  w / "imagechain-map-cache", w / "restore-borg", w / "restore-restic",
                  self.mnt, self.tmp, self.held):  # fmt: skip
            if p.exists():
                shutil.rmtree(p)
        for p in w.glob("*.img"):
            p.unlink()
        for p in w.glob("*.zst"):
            p.unlink()
        self.tmp.mkdir()

        have = {t: shutil.which(t) for t in ("zstd", "partclone.ext4", "borg", "restic")}
        self.results = {
            "config": {"size": self.size, "seed": a.seed, "fill": FILL, "stale_fill": STALE_FILL, "change": CHANGE,
                       "delete": DELETE, "media_share": MEDIA_SHARE, "workdir": str(w), "skip_peers": a.skip_peers,
                       "quiet_wait": a.quiet_wait},
            "environment": {
                "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                "mem_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                "imagechain": tool_version([self.imagechain, "--version"]), **project_revision(),
                **{t: (tool_version([t, "--version"] if t != "restic" else [t, "version"]) if v else None)
                   for t, v in have.items() if t != "partclone.ext4"},
                "partclone.ext4": tool_version(["partclone.ext4", "-v"]) if have["partclone.ext4"] else None,
            },
        }  # fmt: skip
        self.results["config"]["block_size"] = self.bs
        self.results["environment"]["bytecode_compiled"] = compile_bytecode()
        self.results["volume"] = self.build_volume()
        log("used-block map of the volume (untimed)")
        used0 = self.used_mask("used-full.npy")

        # Settle: the freshly written image may still be on its way to the (virtual) disk below us, which
        # makes the first cold read after the build erratic. One untimed cold read, which also hashes the
        # volume for the checks, lets that finish.
        drop(required=True)
        if self.memory.get("page_reporting", "").startswith("off"):
            # the memory the steps will fill, made the host's again once (benchlib.host_backed_memory)
            n = max(0, min(self.size * 3 // 2 + 2 * GiB, mem_available() - 2 * GiB))
            took = touch_memory(n)
            self.memory["touched"] = {"bytes": n, "s": round(took, 1)}
            log(f"free page reporting off for the run; {human(n)} of memory touched in {took:.1f} s")
        self.results["environment"]["memory"] = self.memory
        t = time.perf_counter()
        d0, _ = masked_digests(self.img, self.bs, {"all": None, "used0": used0})
        self.results["volume"]["settle_read_s"] = round(time.perf_counter() - t, 2)
        log(f"timed steps (page cache dropped before each); settle read took {time.perf_counter() - t:.2f} s")
        self.cold_read("read0/baseline", "cold read")
        bs_opt = ["--block-size", self.args.block_size] if self.args.block_size else []
        full = self.timed("full/imagechain", "full backup", "imagechain",
                          [self.ic("backup", str(self.img), str(repo), "--init", "--json", *bs_opt)],
                          stdout=self.logs / "full-imagechain.json", grows=repo)  # fmt: skip
        fj = self.ic_json("full/imagechain")
        full.extra = {k: fj[k] for k in BACKUP_KEYS}
        info0 = json.loads(run(self.ic("info", f"{repo}::default@0", "--json"), env=self.env).stdout)
        full.extra["compression"] = info0["compression"]
        full.extra["summary"] = info0["summary"]
        notes: list[str] = []
        self.results["notes"] = notes  # the same list: kept if a later step fails
        self.check_map(full, used0, notes)
        fall = self.timed("full/imagechain-all", "full backup (all blocks)", "imagechain",
                          [self.ic("backup", str(self.img), str(repo), "--chain", "allblocks", "--all-blocks",
                                   "--json", *bs_opt)],
                          stdout=self.logs / "full-imagechain-all.json", grows=repo,
                          compare_to="full/imagechain")  # fmt: skip
        fall.extra = {k: self.ic_json("full/imagechain-all")[k] for k in BACKUP_KEYS}
        fenc = self.timed("full/imagechain-enc", "full backup (encrypted)", "imagechain",
                          [self.ic("backup", str(self.img), str(repo), "--chain", "encrypted", "--encrypt",
                                   "--json", *bs_opt)],
                          stdout=self.logs / "full-imagechain-enc.json", grows=repo, env=self.enc_env,
                          compare_to="full/imagechain")  # fmt: skip
        fenc.extra = {k: self.ic_json("full/imagechain-enc")[k] for k in BACKUP_KEYS}
        peers = not a.skip_peers
        if peers:
            self.peers_full(have, notes)
        self.results["change"] = self.change_volume()
        log("used-block map and hashes of the changed volume (untimed)")
        used1 = self.used_mask("used-changed.npy")
        d1, _ = masked_digests(self.img, self.bs, {"all": None, "used1": used1, "unused0": ~used0})

        self.cold_read("read1/baseline", "cold read (changed)")
        cache = Path(self.env["IMAGECHAIN_CACHE"])
        held = self.held
        held.mkdir()
        # the parent's map as the first incremental finds it, hard-linked: the root filesystem may discard
        # freed blocks, which on a virtual disk slows the reads that follow, so nothing is deleted in between
        first_maps = {p.name for p in cache.iterdir()}
        for name in first_maps:
            os.link(cache / name, held / name)
        ij: dict[str, Any] = {}
        for i in range(1, a.repeat + 1):
            # floor and incremental in pairs: this machine's disk drifts by more than what is measured
            tag = "" if i == 1 else f"#{i}"
            if i > 1:  # the same incremental again: the previous one's point and map moved aside, the map back
                aside = held / f"incremental-{i - 1}"
                aside.mkdir()
                for n, f in enumerate(ij["files"]):
                    (repo / f).rename(aside / f"{n}-{Path(f).name}")
                for p in cache.iterdir():
                    if p.name not in first_maps:
                        p.rename(aside / p.name)
                for name in first_maps:
                    if not (cache / name).exists():
                        os.link(held / name, cache / name)
            self.cold_read_used(f"readu1/baseline{tag}", f"cold read (used){' ' + tag if tag else ''}",
                                self.work / "used-changed.npy")  # fmt: skip
            inc = self.timed(f"incr/imagechain{tag}", f"incremental backup{' ' + tag if tag else ''}", "imagechain",
                             [self.ic("backup", str(self.img), str(repo), "--json")],
                             stdout=self.logs / "incr-imagechain.json", grows=repo)  # fmt: skip
            ij = self.ic_json("incr/imagechain")
            inc.extra = {k: ij[k] for k in ("kind", *BACKUP_KEYS)}
            if ij["kind"] != "incremental" or ij["sequence"] != 1:
                notes.append(f"SUSPICIOUS: backup {i} after the change was {ij['kind']} #{ij['sequence']}, "
                             f"not the first incremental")  # fmt: skip
            self.check_map(inc, used1, notes)
        inc = next(s for s in self.steps if s.key == "incr/imagechain")
        # what every imagechain process pays before its engine starts: the imports of the CLI and the backup
        # engine from a cold cache, as the console script makes them (after the pairs, to leave them as before)
        self.timed("startup/imagechain", "start-up (cold imports)", "python import",
                   [[sys.executable, "-c", "import imagechain.entry, imagechain.cli, imagechain.engine.backup"]],
                   env={**self.env, "OPENBLAS_NUM_THREADS": "1"})  # fmt: skip
        iall = self.timed("incr/imagechain-all", "incremental (all blocks)", "imagechain",
                          [self.ic("backup", str(self.img), str(repo), "--chain", "allblocks", "--all-blocks",
                                   "--json")],
                          stdout=self.logs / "incr-imagechain-all.json", grows=repo,
                          compare_to="incr/imagechain")  # fmt: skip
        iall.extra = {k: self.ic_json("incr/imagechain-all")[k] for k in ("kind", *BACKUP_KEYS)}
        ienc = self.timed("incr/imagechain-enc", "incremental (encrypted)", "imagechain",
                          [self.ic("backup", str(self.img), str(repo), "--chain", "encrypted", "--json")],
                          stdout=self.logs / "incr-imagechain-enc.json", grows=repo, env=self.enc_env,
                          compare_to="incr/imagechain")  # fmt: skip
        ienc.extra = {k: self.ic_json("incr/imagechain-enc")[k] for k in ("kind", *BACKUP_KEYS)}
        if peers:
            self.peers_incr(have, notes)

        # restore the latest point to a new file: used blocks as the volume's, unused ones zero
        out = w / "restored.img"
        rest = self.timed("restore/imagechain", "restore latest", "imagechain",
                          [self.ic("restore", f"{repo}::default@latest", str(out), "--json")],
                          stdout=self.logs / "restore-imagechain.json")  # fmt: skip
        rest.extra = self.ic_json("restore/imagechain")
        log("checking the restored image (untimed)")
        dr, zero_ok = masked_digests(out, self.bs, {"used1": used1}, zero=~used1)
        rest.extra["used_equal"] = dr["used1"] == d1["used1"] and out.stat().st_size == self.size
        rest.extra["unused_zero"] = zero_ok
        rest.extra["verified"] = ok = rest.extra["used_equal"] and zero_ok
        if not ok:
            notes.append(f"WRONG RESULT: restored latest point: used blocks equal the volume: "
                         f"{rest.extra['used_equal']}, unused blocks zero: {zero_ok}")  # fmt: skip
        if not a.keep:
            out.unlink()
        if peers:
            self.peers_restore(have, notes)
        ddout = w / "dd-copy.img"
        self.timed("copy/baseline", "cold copy (dd)", "dd conv=fsync",
                   [["dd", f"if={self.img}", f"of={ddout}", "bs=8M", "conv=fsync", "status=none"]],
                   compare_to="restore/imagechain")  # fmt: skip
        ddout.unlink()
        # "not slower than dd writing the same used data": dd copying as many bytes as the restore wrote
        # (the volume's first ones, cold, in whole 8 MiB records), into a new file, flushed
        records = -(-int(rest.extra.get("written_bytes", self.size)) // (8 << 20))
        self.timed("copy/used", "cold copy of the used size (dd)", "dd conv=fsync",
                   [["dd", f"if={self.img}", f"of={ddout}", "bs=8M", f"count={records}", "conv=fsync",
                     "status=none"]], compare_to="restore/imagechain")  # fmt: skip
        ddout.unlink()

        # delta restore of the full point onto a copy of the current volume
        copy = w / "delta-target.img"
        shutil.copyfile(self.img, copy)
        delta = self.timed("delta/imagechain", "delta restore @0", "imagechain",
                           [self.ic("restore", f"{repo}::default@0", str(copy), "--delta", "--json")],
                           stdout=self.logs / "delta-imagechain.json")  # fmt: skip
        delta.extra = self.ic_json("delta/imagechain")
        log("checking the delta-restored image (untimed)")
        dd_, _ = masked_digests(copy, self.bs, {"used0": used0, "unused0": ~used0})
        delta.extra["used_equal"] = dd_["used0"] == d0["used0"]
        delta.extra["unused_kept"] = dd_["unused0"] == d1["unused0"]
        delta.extra["verified"] = ok = delta.extra["used_equal"] and delta.extra["unused_kept"]
        if not ok:
            notes.append(f"WRONG RESULT: delta-restored point @0: used-at-@0 blocks equal the volume at @0: "
                         f"{delta.extra['used_equal']}, other blocks left as they were: "
                         f"{delta.extra['unused_kept']}")  # fmt: skip
        if not a.keep:
            copy.unlink()

        # the --all-blocks chain: both restores bit for bit (untimed)
        log("restoring the all-blocks chain (untimed)")
        allb: dict[str, Any] = {}
        out = w / "restored-allblocks.img"
        run(self.ic("restore", f"{repo}::allblocks@latest", str(out), "--json"), env=self.env)
        allb["restore_identical"] = file_digest(out) == d1["all"]
        if not a.keep:
            out.unlink()
        copy = w / "delta-target-allblocks.img"
        shutil.copyfile(self.img, copy)
        run(self.ic("restore", f"{repo}::allblocks@0", str(copy), "--delta", "--json"), env=self.env)
        allb["delta_identical"] = file_digest(copy) == d0["all"]
        if not a.keep:
            copy.unlink()
        self.results["allblocks_chain"] = allb
        for k, what in (("restore_identical", "restored latest point"), ("delta_identical", "delta-restored @0")):
            if not allb[k]:
                notes.append(f"WRONG RESULT: all-blocks chain: {what} differs from the volume")

    def check_map(self, s: Step, used: np.ndarray, notes: list[str]) -> None:
        """The backup read what the benchmark's own used-block map says (same map, same block size)."""
        if s.extra["block_size"] != self.bs:
            notes.append(f"SUSPICIOUS: {s.step} used block size {s.extra['block_size']}, the benchmark {self.bs}")
        elif s.extra["unused_blocks"] != int((~used).sum()):
            notes.append(f"SUSPICIOUS: {s.step} recorded {s.extra['unused_blocks']} unused blocks, the "
                         f"benchmark's map has {int((~used).sum())}")  # fmt: skip

    # -- peers ----------------------------------------------------------------------------------------

    def borg_env(self) -> dict[str, str]:
        return {**self.env, "BORG_BASE_DIR": str(self.work / "borg-home"),
                "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes", "TMPDIR": str(self.tmp)}  # fmt: skip

    def restic_env(self) -> dict[str, str]:
        return {**self.env, "RESTIC_REPOSITORY": str(self.work / "repo-restic"),
                "RESTIC_PASSWORD": "imagechain-bench", "RESTIC_CACHE_DIR": str(self.work / "restic-cache"),
                "TMPDIR": str(self.tmp)}  # fmt: skip

    def peers_full(self, have: dict[str, str | None], notes: list[str]) -> None:
        w, img = self.work, self.img
        if have["zstd"]:
            out = w / "volume.img.zst"
            self.timed("full/zstd", "full backup", "zstd -T0 -3",
                       [["zstd", "-T0", "-3", "-q", "-f", str(img), "-o", str(out)]],
                       grows=out, compare_to="full/imagechain")  # fmt: skip
            if not self.args.keep:
                out.unlink()
        else:
            notes.append("zstd not installed: skipped")
        if have["partclone.ext4"] and have["zstd"]:
            out = w / "volume.pcl.zst"
            self.timed("full/partclone", "full backup", "partclone+zstd",
                       [["partclone.ext4", "-c", "-q", "-s", str(img), "-o", "-",
                         "-L", str(self.logs / "partclone.log")],
                        ["zstd", "-T0", "-3", "-q"]], stdout=out, grows=out,
                       compare_to="full/imagechain")  # fmt: skip
            if not self.args.keep:
                out.unlink()
        else:
            notes.append("partclone.ext4 (or zstd) not installed: partclone skipped")
        if have["borg"]:
            env = self.borg_env()
            run(["borg", "init", "-e", "none", str(w / "repo-borg")], env=env)
            self.timed("full/borg", "full backup", "borg",
                       [["borg", "create", "--chunker-params", "fixed,4194304", "--compression", "zstd,3",
                         f"{w / 'repo-borg'}::full", img.name]],
                       env=env, cwd=w, grows=w / "repo-borg", compare_to="full/imagechain")  # fmt: skip
        else:
            notes.append("borg not installed: skipped")
        if have["restic"]:
            env = self.restic_env()
            run(["restic", "init", "-q"], env=env)
            self.timed("full/restic", "full backup", "restic",
                       [["restic", "backup", "-q", "--host", "bench", img.name]],
                       env=env, cwd=w, grows=w / "repo-restic", compare_to="full/imagechain")  # fmt: skip
        else:
            notes.append("restic not installed: skipped")

    def peers_incr(self, have: dict[str, str | None], notes: list[str]) -> None:
        w, img = self.work, self.img
        if have["borg"]:
            self.timed("incr/borg", "incremental backup", "borg",
                       [["borg", "create", "--chunker-params", "fixed,4194304", "--compression", "zstd,3",
                         f"{w / 'repo-borg'}::incr", img.name]],
                       env=self.borg_env(), cwd=w, grows=w / "repo-borg", compare_to="incr/imagechain")  # fmt: skip
        if have["restic"]:
            self.timed("incr/restic", "incremental backup", "restic",
                       [["restic", "backup", "-q", "--host", "bench", img.name]],
                       env=self.restic_env(), cwd=w, grows=w / "repo-restic", compare_to="incr/imagechain")  # fmt: skip

    def peers_restore(self, have: dict[str, str | None], notes: list[str]) -> None:
        """Each peer restores its latest archive/snapshot into a scratch folder, deleted afterwards."""
        w = self.work
        for tool, argv, env in (
            ("borg", ["borg", "extract", f"{w / 'repo-borg'}::incr"], self.borg_env),
            ("restic", ["restic", "restore", "latest", "-q", "--target", "."], self.restic_env),
        ):
            if not have[tool]:
                continue
            scratch = w / f"restore-{tool}"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            try:
                self.timed(f"restore/{tool}", "restore latest", tool, [argv], env=env(), cwd=scratch,
                           compare_to="restore/imagechain")  # fmt: skip
                got = [p.stat().st_size for p in scratch.rglob(self.img.name)]
                if got != [self.size]:
                    notes.append(f"SUSPICIOUS: {tool} restore left {got} (sizes of {self.img.name}), not one "
                                 f"file of {self.size} bytes")  # fmt: skip
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

    # -- report ---------------------------------------------------------------------------------------

    def report(self, total_s: float) -> str:
        by = {s.key: s for s in self.steps}
        lines = []
        hdr = (f"{'step':<24} {'tool':<15} {'time s':>8} {'MB/s':>8} {'cpu':>5} {'read MiB':>9} {'stored MiB':>11} "
               f"{'peak RSS MiB':>13} {'x imagechain':>13} {'other cpu s':>12}")  # fmt: skip
        lines += [hdr, "-" * len(hdr)]
        for s in self.steps:
            ref = by.get(s.compare_to) if s.compare_to else None
            ratio = f"{s.wall_s / ref.wall_s:.2f}" if ref else ("1.00" if s.tool == "imagechain" else "-")
            stored = f"{s.stored_bytes / MiB:.1f}" if s.stored_bytes is not None else "-"
            lines.append(f"{s.step:<24} {s.tool:<15} {s.wall_s:8.2f} {s.mbps:8.1f} {s.cpu_ratio:5.2f} "
                         f"{s.read_bytes / MiB:9.1f} {stored:>11} {s.peak_rss_kib / 1024:13.1f} {ratio:>13} "
                         f"{s.others_cpu_s:12.2f}")  # fmt: skip
        lines.append("")
        checks: dict[str, Any] = {}

        def ratio_check(key: str, label: str, a: float, b: float, unit: str, target: float | None) -> None:
            r = a / b
            checks[key] = {"value": round(r, 3), "a": round(a, 3), "b": round(b, 3), "unit": unit,
                           **({"target": target, "pass": r <= target} if target is not None else {})}  # fmt: skip
            verdict = f"(target <= {target}: {'PASS' if r <= target else 'FAIL'})" if target is not None else "(report)"
            lines.append(f"check: {label:<42} = {a:.2f} / {b:.2f} {unit} = {r:.2f}   {verdict}")

        def flag_check(key: str, label: str, ok: bool) -> None:
            checks[key] = {"pass": bool(ok)}
            lines.append(f"check: {label}: {'yes' if ok else 'NO'}")

        st = {k: by.get(k) for k in ("read0/baseline", "read1/baseline", "readu1/baseline", "full/imagechain",
                                     "full/imagechain-all", "incr/imagechain", "incr/imagechain-all",
                                     "restore/imagechain", "copy/baseline", "copy/used", "delta/imagechain",
                                     "full/borg",
                                     "incr/borg", "restore/borg", "restore/restic", "full/partclone")}  # fmt: skip
        read = st["read1/baseline"] or st["read0/baseline"]
        readu, full, inc = st["readu1/baseline"], st["full/imagechain"], st["incr/imagechain"]
        rest, cp, delta = st["restore/imagechain"], st["copy/baseline"], st["delta/imagechain"]
        cores = os.cpu_count() or 1
        pairs = [(by[f"incr/imagechain{t}"], by[f"readu1/baseline{t}"])
                 for t in ["", *(f"#{i}" for i in range(2, self.args.repeat + 1))]
                 if f"incr/imagechain{t}" in by and f"readu1/baseline{t}" in by]  # fmt: skip
        if pairs:
            # the check is the first pair, measured as in every earlier run; the repeats are reported beside it:
            # in two runs the repeated cold reads came out 1.7x slower than the first, for no reason found
            fi, fr = pairs[0]
            ratio_check("incremental_over_cold_read_used", "incremental / cold read (used)", fi.wall_s, fr.wall_s,
                        "s", 1.3)  # fmt: skip
            if len(pairs) > 1:
                ratios = sorted(p[0].wall_s / p[1].wall_s for p in pairs)
                checks["incremental_over_cold_read_used"]["pairs"] = [
                    [round(p[0].wall_s, 3), round(p[1].wall_s, 3)] for p in pairs]  # fmt: skip
                checks["incremental_over_cold_read_used"]["median_of_pairs"] = round(ratios[len(ratios) // 2], 3)
                lines.append("info:  incremental / cold read (used), each pair in order: " + ", ".join(
                    f"{p[0].wall_s:.2f}/{p[1].wall_s:.2f}" for p in pairs)
                    + f"; median ratio {ratios[len(ratios) // 2]:.2f}")  # fmt: skip
            if all(x.disk_reads for p in pairs for x in p):
                lines.append("info:  disk reads (requests, average size), incremental / cold read (used): " + ", ".join(
                    f"{reads_text(p[0])} / {reads_text(p[1])}" for p in pairs))  # fmt: skip
        if inc and read:
            ratio_check("incremental_over_cold_read", "incremental / cold read (whole volume)", inc.wall_s,
                        read.wall_s, "s", 1.3)  # fmt: skip
        if full and st["full/borg"]:
            ratio_check("full_over_borg", "imagechain full / borg full", full.wall_s, st["full/borg"].wall_s,
                        "s", 0.5)  # fmt: skip
        pcl = st["full/partclone"]
        if full and pcl and full.stored_bytes is not None and pcl.stored_bytes:
            ratio_check("full_stored_over_partclone", "imagechain full / partclone+zstd stored",
                        full.stored_bytes / MiB, pcl.stored_bytes / MiB, "MiB", 1.0)  # fmt: skip
        if inc and st["incr/borg"]:
            ratio_check("incremental_over_borg", "imagechain incremental / borg incremental", inc.wall_s,
                        st["incr/borg"].wall_s, "s", 0.55)  # fmt: skip
        if rest and st["restore/borg"]:
            ratio_check("restore_over_borg", "imagechain restore / borg restore", rest.wall_s,
                        st["restore/borg"].wall_s, "s", 0.6)  # fmt: skip
        if rest and st["restore/restic"]:
            ratio_check("restore_over_restic", "imagechain restore / restic restore", rest.wall_s,
                        st["restore/restic"].wall_s, "s", None)  # fmt: skip
        if rest and cp:  # as before: a share of the plain copy's throughput (key kept for old results)
            ratio_check("restore_over_cold_copy", "restore / cold dd copy throughput", rest.mbps, cp.mbps, "MB/s", None)
        if rest and st["copy/used"]:
            ratio_check("restore_over_dd_used", "restore / dd copy of as many bytes", rest.wall_s,
                        st["copy/used"].wall_s, "s", 1.0)  # fmt: skip
        if full:
            u = (full.user_s + full.sys_s) / full.wall_s
            checks["full_backup_cpu"] = {"value": round(u, 3), "cores": cores, "share": round(u / cores, 3)}
            lines.append(f"check: {'full backup CPU (user+sys)/wall':<42} = {full.user_s + full.sys_s:.1f} / "
                         f"{full.wall_s:.1f} s = {u:.2f} of {cores} cores "
                         f"({u / cores:.0%}; ideal ~= cores)")  # fmt: skip
        if rest:
            flag_check("restore_used_equal", "restore latest: used blocks equal the volume's",
                       rest.extra.get("used_equal", False))  # fmt: skip
            flag_check("restore_unused_zero", "restore latest: unused blocks all zero",
                       rest.extra.get("unused_zero", False))  # fmt: skip
        if delta:
            flag_check("delta_used_equal", "delta restore @0: blocks used at @0 equal the volume at @0",
                       delta.extra.get("used_equal", False))  # fmt: skip
            flag_check("delta_unused_kept", "delta restore @0: the other blocks left as they were",
                       delta.extra.get("unused_kept", False))  # fmt: skip
        allb = self.results.get("allblocks_chain")
        if allb:
            flag_check("allblocks_restore_identical", "all-blocks chain: restore latest result bit-identical",
                       allb["restore_identical"])  # fmt: skip
            flag_check("allblocks_delta_identical", "all-blocks chain: delta restore @0 result bit-identical",
                       allb["delta_identical"])  # fmt: skip
        if delta and read:
            r = delta.wall_s / read.wall_s
            checks["delta_restore_over_cold_read"] = {"value": round(r, 3)}
            lines.append(f"info:  {'delta restore / cold read':<42} = {delta.wall_s:.2f} / {read.wall_s:.2f} s = "
                         f"{r:.2f} (wrote {human(delta.extra.get('written_bytes', 0))})")  # fmt: skip
        for a, b in (("full/imagechain", "full/imagechain-enc"), ("incr/imagechain", "incr/imagechain-enc")):
            if by.get(a) and by.get(b):
                x, y = by[a], by[b]
                r = y.wall_s / x.wall_s
                checks[f"{a.split('/')[0]}_encrypted_over_plain"] = {"value": round(r, 3), "target": 1.05,
                                                                      "pass": r <= 1.05}  # fmt: skip
                lines.append(f"check: {x.step} encrypted / plain = {y.wall_s:.2f} / {x.wall_s:.2f} s = {r:.2f}   "
                             f"(target <= 1.05: {'PASS' if r <= 1.05 else 'FAIL'}); stored "
                             f"{human(y.stored_bytes or 0)} / {human(x.stored_bytes or 0)}")  # fmt: skip
        for a, b in (("full/imagechain", "full/imagechain-all"), ("incr/imagechain", "incr/imagechain-all")):
            if (used := st[a]) and (every := st[b]):
                lines.append(f"info:  {used.step} with / without the used map: {used.wall_s:.2f} / "
                             f"{every.wall_s:.2f} s, read {human(used.extra['read_bytes'])} / "
                             f"{human(every.extra['read_bytes'])} of the volume, stored "
                             f"{human(used.stored_bytes or 0)} / {human(every.stored_bytes or 0)}")  # fmt: skip
        if full:
            e = full.extra
            lines.append(f"info:  imagechain settings: block size {human(e['block_size'])}, compression "
                         f"{e['compression']}; full point {human(e['file_bytes'])} for {human(self.size)}; "
                         f"used map: {e['used_map']}")  # fmt: skip
        maps = self.results.get("used_maps", {})
        if readu and "used-changed.npy" in maps:
            m = maps["used-changed.npy"]
            lines.append(f"info:  used blocks: {m['used_blocks']} of {m['blocks']} ({human(m['used_bytes'])}) after "
                         f"the change; cold read (used) read {human(readu.extra['bytes'])} of them")  # fmt: skip
        if inc:
            e = inc.extra
            wrote = human(self.results["change"]["written_bytes"])
            lines.append(f"info:  incremental: {e['changed_blocks']} changed blocks = {human(e['changed_bytes'])} "
                         f"for {wrote} written by the change step")  # fmt: skip
        over = [f"{by[k].step} {by[k].wall_s - by[k].extra['duration_s']:.2f} s"
                for k in ("full/imagechain", "incr/imagechain", "restore/imagechain", "delta/imagechain")
                if k in by and "duration_s" in by[k].extra]  # fmt: skip
        if over:
            lines.append(f"info:  imagechain time outside its engine timer (start-up, exit): {', '.join(over)}")
        if pairs and "duration_s" in pairs[0][0].extra:
            ei, er = pairs[0]
            r = ei.extra["duration_s"] / er.wall_s
            checks["incremental_engine_over_cold_read_used"] = {"value": round(r, 3)}
            lines.append(f"info:  incremental engine time / cold read (used) = {ei.extra['duration_s']:.2f} / "
                         f"{er.wall_s:.2f} s = {r:.2f} (without process start-up)")  # fmt: skip
        up = by.get("startup/imagechain")
        if up and pairs:
            ei, er = pairs[0]
            r = (ei.wall_s - up.wall_s) / er.wall_s
            checks["incremental_less_startup_over_cold_read_used"] = {"value": round(r, 3)}
            lines.append(f"info:  cold start-up (imports of the CLI and backup engine) {up.wall_s:.2f} s, "
                         f"{reads_text(up)}; (incremental - start-up) / cold read (used) = "
                         f"({ei.wall_s:.2f} - {up.wall_s:.2f}) / {er.wall_s:.2f} s = {r:.2f}")  # fmt: skip
        noisy = [f"{s.step}/{s.tool} ({s.others_cpu_s:.1f} s: {', '.join(s.others) or 'kernel/irq/steal'})"
                 for s in self.steps if s.others_cpu_s > 0.1 * s.wall_s]  # fmt: skip
        if noisy:
            lines.append(f"WARN:  other processes used CPU during: {', '.join(noisy)}; timings may be disturbed")
        for n in self.results.get("notes", []):
            lines.append(f"note:  {n}")
        lines.append(f"total run time {total_s:.0f} s (volume build {self.results['volume']['build_s']} s)")
        self.results["checks"] = checks
        return "\n".join(lines)

    def cleanup(self) -> None:
        self.mounts.cleanup()
        if self.args.keep:
            return
        w = self.work
        for p in (w / "repo-imagechain", w / "repo-borg", w / "repo-restic", w / "borg-home", w / "restic-cache",
                  w / "imagechain-map-cache", w / "restore-borg", w / "restore-restic",
                  self.mnt, self.tmp, self.held):  # fmt: skip
            shutil.rmtree(p, ignore_errors=True)
        for pat in ("*.img", "*.zst", "*.npy"):
            for p in w.glob(pat):
                p.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("2G"), help="volume size (default 2G)")
    ap.add_argument("--workdir", type=Path, default=HERE / "work", help="scratch folder (default bench/work)")
    ap.add_argument("--skip-peers", action="store_true", help="only imagechain and the baselines")
    ap.add_argument("--keep", action="store_true", help="keep the volume, repositories and restored images")
    ap.add_argument("--quiet-wait", type=float, default=300, metavar="SECONDS",
                    help="before each timed step wait up to this long for other processes to go quiet "
                    "(default 300; 0: don't)")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=3, metavar="N",
                    help="time the used-data cold read and the incremental N times in pairs (default 3)")
    ap.add_argument("--block-size", help="imagechain block size for the chain (default: imagechain's)")
    ap.add_argument("--seed", type=int, default=SEED, help=f"random seed (default {SEED})")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    from imagechain.engine.backup import DEFAULT_BLOCK_SIZE, check_block_size
    from imagechain.errors import ImagechainError
    from imagechain.sizes import parse_size as ic_parse_size

    try:
        args.block_bytes = check_block_size(ic_parse_size(args.block_size)) if args.block_size else DEFAULT_BLOCK_SIZE
    except ImagechainError as e:
        ap.error(f"--block-size: {e}")
    args.workdir = args.workdir.resolve()
    if os.geteuid() != 0:
        print("bench/run.py needs root (loop mounts, /proc/sys/vm/drop_caches)", file=sys.stderr)
        return 2
    if args.size < 256 * MiB:
        print("--size must be at least 256M", file=sys.stderr)
        return 2
    for tool in ("mkfs.ext4", "losetup", "mount", "dd"):
        if not shutil.which(tool):
            print(f"bench/run.py needs {tool}", file=sys.stderr)
            return 2

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    b = Bench(args)
    rc = 0
    try:
        with host_backed_memory() as b.memory:
            b.main()
    except StepFailed as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        b.results.setdefault("notes", []).append(f"FAILED: {e}")
        rc = 1
    finally:
        b.cleanup()
        total = time.monotonic() - T_START
        if b.steps or b.results:
            table = b.report(total) if "volume" in b.results else ""
            b.results["steps"] = [asdict(s) for s in b.steps]
            b.results["total_s"] = round(total, 1)
            b.results["table"] = table
            args.workdir.mkdir(parents=True, exist_ok=True)
            path = args.workdir / "results.json"
            path.write_text(json.dumps(b.results, indent=1) + "\n")
            print()
            print(table)
            print(f"\nresults: {path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
