"""Real database servers for the snapshot tests and benchmark: PostgreSQL (with pgbench) and MariaDB,
each with its data directory on a volume the test backs up. Servers run as their own system users
(postgres, mysql), listen on a Unix socket only, and are started by the tests themselves."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def as_user(user: str, *args: str | Path, check: bool = True, timeout: float = 300) -> str:
    p = subprocess.run(["runuser", "-u", user, "--", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, check=False)  # fmt: skip
    if check and p.returncode:
        raise RuntimeError(f"{args[0]} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return p.stdout


def own(path: Path, user: str) -> None:
    shutil.chown(path, user, user)


class Postgres:
    """One PostgreSQL cluster in `data`, its socket in `sock` (both must be reachable by postgres)."""

    def __init__(self, data: Path, sock: Path, port: int) -> None:
        b = pg_bin()
        assert b is not None
        self.bin, self.data, self.sock, self.port = b, data, sock, port
        self.running = False

    def conninfo(self) -> str:
        return f"host={self.sock} port={self.port} user=postgres dbname=postgres"

    def initdb(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        own(self.data, "postgres")
        self.data.chmod(0o700)
        as_user("postgres", self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                "--no-sync")  # fmt: skip
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("listen_addresses = ''\nfsync = on\nfull_page_writes = on\nshared_buffers = 64MB\n"
                    "max_wal_size = 256MB\ncheckpoint_timeout = 30s\n")  # fmt: skip

    def start(self, timeout: float = 120) -> None:
        self.sock.mkdir(parents=True, exist_ok=True)
        own(self.sock, "postgres")
        log = self.data.parent / f"pg-{self.port}.log"
        log.touch()
        own(log, "postgres")
        p = subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D", str(self.data), "-w",
                            "-t", str(int(timeout)), "-l", str(log), "-o", f"-k {self.sock} -p {self.port}", "start"],
                           capture_output=True, text=True, check=False)  # fmt: skip
        if p.returncode:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError("PostgreSQL did not start:\n" + "\n".join(tail))
        self.running = True

    def stop(self) -> None:
        if self.running:
            as_user("postgres", self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", check=False)
            self.running = False

    def psql(self, sql: str, db: str = "postgres") -> str:
        return as_user("postgres", self.bin / "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", self.sock,
                       "-p", str(self.port), "-d", db, "-c", sql).strip()  # fmt: skip

    def pgbench_init(self, scale: int) -> None:
        as_user("postgres", self.bin / "pgbench", "-i", "-q", "-s", str(scale), "-h", self.sock, "-p", str(self.port),
                "postgres")  # fmt: skip

    def pgbench(self, seconds: int, clients: int = 4, log_prefix: Path | None = None) -> subprocess.Popen[str]:
        """pgbench's TPC-B-like load in the background; with log_prefix, one latency line per transaction."""
        args = [str(self.bin / "pgbench"), "-n", "-c", str(clients), "-j", "2", "-T", str(seconds),
                "-h", str(self.sock), "-p", str(self.port)]  # fmt: skip
        cwd = None
        if log_prefix is not None:
            log_prefix.parent.mkdir(parents=True, exist_ok=True)
            own(log_prefix.parent, "postgres")
            args += ["-l", f"--log-prefix={log_prefix.name}"]
            cwd = log_prefix.parent
        args.append("postgres")
        return subprocess.Popen(["runuser", "-u", "postgres", "--", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=cwd)  # fmt: skip

    def balances(self) -> tuple[int, int, int, int]:
        """pgbench's invariant: these four sums are equal after any number of whole transactions."""
        row = self.psql("SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM "
                        "pgbench_branches), (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT coalesce(sum(delta), "
                        "0) FROM pgbench_history)")  # fmt: skip
        a, b, t, h = (int(x) for x in row.split("|"))
        return a, b, t, h

    def amcheck(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "pg_amcheck"), "--install-missing",
                               "--heapallindexed", "-h", str(self.sock), "-p", str(self.port), "-U", "postgres",
                               "postgres"], capture_output=True, text=True, timeout=600, check=False)  # fmt: skip


def stop_pgbench(p: subprocess.Popen[str]) -> str:
    with contextlib.suppress(ProcessLookupError):
        p.terminate()
    try:
        out, _ = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
    return out


def latencies_ms(folder: Path, prefix: str) -> list[tuple[float, float]]:
    """(end time in seconds since the epoch, latency in ms) of every transaction in pgbench's logs."""
    out = []
    for f in folder.glob(f"{prefix}.*"):
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 6:  # client tx latency_us script epoch_s epoch_us
                out.append((int(parts[4]) + int(parts[5]) / 1e6, int(parts[2]) / 1000))
    return sorted(out)


class MariaDB:
    """One MariaDB server with `data` as its data directory, on a Unix socket only."""

    def __init__(self, data: Path, sock: Path) -> None:
        self.data, self.sock = data, sock
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("mariadbd") is not None or os.path.exists("/usr/sbin/mariadbd")

    def install(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        own(self.data, "mysql")
        subprocess.run(["mariadb-install-db", "--user=mysql", f"--datadir={self.data}", "--skip-test-db",
                        "--auth-root-authentication-method=socket"],
                       capture_output=True, check=True, timeout=300)  # fmt: skip

    def start(self, timeout: float = 120, extra: list[str] | None = None) -> None:
        self.sock.parent.mkdir(parents=True, exist_ok=True)
        own(self.sock.parent, "mysql")
        log = self.data.parent / "mariadb.err"
        self.proc = subprocess.Popen(["/usr/sbin/mariadbd", "--no-defaults", "--user=mysql", f"--datadir={self.data}",
                                      f"--socket={self.sock}", "--skip-networking", f"--log-error={log}",
                                      f"--pid-file={self.sock.parent / 'mariadb.pid'}", "--innodb-buffer-pool-size=64M",
                                      "--innodb-flush-log-at-trx-commit=1", *(extra or [])])  # fmt: skip
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("MariaDB did not start:\n" + log.read_text(errors="replace")[-2000:])
            try:
                self.sql("SELECT 1")
                return
            except RuntimeError:
                time.sleep(0.3)
        raise RuntimeError("MariaDB did not answer in time")

    def sql(self, query: str) -> str:
        p = subprocess.run(["mariadb", "--no-defaults", f"--socket={self.sock}", "-uroot", "-N", "-B", "-e", query],
                           capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        if p.returncode:
            raise RuntimeError(p.stderr.strip())
        return p.stdout.strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def reachable_folder(prefix: str) -> Iterator[Path]:
    """A folder every system user can reach (pytest's tmp_path is under a root-only folder)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
