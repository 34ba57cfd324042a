"""The MariaDB recipe with a real server: --app mariadb holds FLUSH TABLES WITH READ LOCK over the
snapshot while transfers run between InnoDB accounts and every transfer is logged in a MyISAM table
(no crash recovery there: a MyISAM table copied while written is marked crashed). The restored copy
must start, CHECK TABLE must pass for both tables, the accounts must still sum to what they started
with, and the binary log position at the lock is recorded in the point."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import exe, need_root, need_tool
from .dbserver import MariaDB, reachable_folder

MiB = 1 << 20
ACCOUNTS, START = 50, 1000
CONFIG = ["--log-bin=binlog", "--server-id=1"]  # a copy starts with its original's configuration
pytestmark = [pytest.mark.root, pytest.mark.slow]


def _run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[Path, Path, MariaDB]]:
    need_root()
    need_tool("mkfs.ext4", "mariadb")
    if not MariaDB.available():
        pytest.skip("MariaDB is not installed (make test installs mariadb-server with apt-get)")
    pytest.importorskip("pymysql")
    with reachable_folder("imagechain-maria-") as base:
        vol, mnt = base / "vol.img", base / "mnt"
        with open(vol, "wb") as f:
            f.truncate(512 * MiB)
        _run("mkfs.ext4", "-q", "-F", vol)
        mnt.mkdir()
        _run("mount", "-o", "loop", vol, mnt)
        db = MariaDB(mnt / "data", base / "run" / "mysqld.sock")
        try:
            db.install()
            db.start(extra=CONFIG)
            db.sql("CREATE DATABASE bank; CREATE TABLE bank.accounts (id INT PRIMARY KEY, balance INT) ENGINE=InnoDB;"
                   "CREATE TABLE bank.log (id INT AUTO_INCREMENT PRIMARY KEY, src INT, dst INT, amount INT, "
                   "note CHAR(200)) ENGINE=MyISAM;")  # fmt: skip
            values = ",".join(f"({i},{START})" for i in range(ACCOUNTS))
            db.sql(f"INSERT INTO bank.accounts VALUES {values}")
            yield base, vol, db
        finally:
            db.stop()
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True)


def transfers(sock: Path, stop: threading.Event, done: list[int]) -> None:
    import pymysql

    conn = pymysql.connect(unix_socket=str(sock), user="root", database="bank", autocommit=False)
    n = 0
    try:
        with conn.cursor() as c:
            while not stop.is_set():
                a, b, x = n % ACCOUNTS, (n * 7 + 3) % ACCOUNTS, n % 13 + 1
                c.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (x, a))
                c.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (x, b))
                conn.commit()
                c.execute("INSERT INTO log (src, dst, amount, note) VALUES (%s, %s, %s, REPEAT('x', 200))", (a, b, x))
                conn.commit()
                n += 1
    finally:
        conn.close()
        done.append(n)


def test_flush_tables_with_read_lock_makes_every_table_restore_clean(server: tuple[Path, Path, MariaDB]) -> None:
    base, vol, db = server
    repo = base / "repo"
    stop, done = threading.Event(), []
    load = threading.Thread(target=transfers, args=(db.sock, stop, done))
    load.start()
    results = []
    try:
        time.sleep(1)
        for _ in range(2):
            p = subprocess.run([exe(), "backup", str(vol), str(repo), "--init", "--json", "--app", "mariadb",
                                "--app-connect", f"unix_socket={db.sock} user=root"],
                               capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
            assert p.returncode == 0, p.stderr
            results.append(json.loads(p.stdout))
            time.sleep(1)
    finally:
        stop.set()
        load.join(60)
    assert done and done[0] > 50, f"the load barely ran: {done}"
    for i, r in enumerate(results):
        snap = r["snapshot"]
        assert snap["provider"] == "fsfreeze" and snap["app"]["app"] == "mariadb", snap
        assert snap["app"]["binlog_file"].startswith("binlog.") and snap["app"]["binlog_position"] > 0, snap
        img, mnt = base / f"restored-{i}.img", base / f"restored-{i}"
        subprocess.run([exe(), "restore", f"{repo}::{r['point_id'][:8]}", str(img)], check=True, capture_output=True)
        mnt.mkdir()
        _run("mount", "-o", "loop", img, mnt)
        copy = MariaDB(mnt / "data", base / f"run-{i}" / "mysqld.sock")
        try:
            copy.start(extra=CONFIG)
            checks = copy.sql("CHECK TABLE bank.accounts, bank.log").splitlines()
            assert all(line.split("\t")[-1] == "OK" for line in checks if "\tstatus\t" in line), checks
            total = int(copy.sql("SELECT SUM(balance) FROM bank.accounts"))
            assert total == ACCOUNTS * START, total
            logged = int(copy.sql("SELECT COUNT(*) FROM bank.log"))
            assert logged > 0
        finally:
            copy.stop()
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
            img.unlink()
