"""What every job run did, in SQLite (WAL): written by the process that runs the job, read by `jobs list`
and `jobs history` while the agent runs, and by the agent itself to know when each job last ran.

A run is a row from its start: `running` until it ends as `ok`, `failed` or `aborted` (stopped by a
signal: nothing was published). A row still `running` whose process is gone is shown as `interrupted`
(the machine went down, or the process was killed)."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Any

from ..errors import UsageError
from ..lock import boot_id, proc_start, process_gone

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    job TEXT NOT NULL,
    scheduled REAL,            -- the schedule slot this run was for (unix time); NULL: started by hand
    started REAL NOT NULL,
    ended REAL,
    result TEXT NOT NULL,      -- running, ok, failed, aborted
    pid INTEGER,
    pid_start TEXT,            -- with pid and boot: which process runs it (lock.process_gone)
    boot TEXT,
    point_id TEXT,
    kind TEXT,
    bytes_read INTEGER,
    bytes_changed INTEGER,
    bytes_stored INTEGER,
    duration_s REAL,
    exit_code INTEGER,
    error TEXT,
    detail TEXT                -- JSON: retention, replication, notification outcomes
);
CREATE INDEX IF NOT EXISTS runs_job ON runs (job, started);
"""
COLUMNS = ("id", "job", "scheduled", "started", "ended", "result", "pid", "pid_start", "boot", "point_id", "kind",
           "bytes_read", "bytes_changed", "bytes_stored", "duration_s", "exit_code", "error", "detail")  # fmt: skip


def _alive(pid: int | None, start: str | None, boot: str | None) -> bool:
    """Whether the process that started a run still runs it (this boot, that pid, that start time)."""
    return bool(pid) and boot == boot_id() and not process_gone(int(pid or 0), start or "")


class History:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise UsageError(f"cannot open the job history {path}: {e}") from e

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, job: str, scheduled: float | None) -> int:
        cur = self.db.execute("INSERT INTO runs (job, scheduled, started, result, pid, pid_start, boot) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?)", (job, scheduled, time.time(), "running", os.getpid(),
                                                               proc_start(os.getpid()), boot_id()))  # fmt: skip
        assert cur.lastrowid is not None
        return cur.lastrowid

    def finish(self, run_id: int, result: str, *, point_id: str | None = None, kind: str | None = None,
               bytes_read: int | None = None, bytes_changed: int | None = None, bytes_stored: int | None = None,
               exit_code: int = 0, error: str | None = None, detail: dict[str, Any] | None = None) -> None:  # fmt: skip
        started = self.db.execute("SELECT started FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
        now = time.time()
        self.db.execute("UPDATE runs SET ended = ?, result = ?, point_id = ?, kind = ?, bytes_read = ?, "
                        "bytes_changed = ?, bytes_stored = ?, duration_s = ?, exit_code = ?, error = ?, detail = ? "
                        "WHERE id = ?", (now, result, point_id, kind, bytes_read, bytes_changed, bytes_stored,
                                         round(now - started, 3), exit_code, error,
                                         json.dumps(detail) if detail else None, run_id))  # fmt: skip

    def note(self, run_id: int, detail: dict[str, Any]) -> None:
        self.db.execute("UPDATE runs SET detail = ? WHERE id = ?", (json.dumps(detail), run_id))

    def runs(self, job: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first."""
        where, args = ("WHERE job = ?", (job,)) if job else ("", ())
        rows = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM runs {where} ORDER BY started DESC, id DESC "
                               f"LIMIT ?", (*args, limit)).fetchall()  # fmt: skip
        return [self._row(r) for r in rows]

    def last(self, job: str) -> dict[str, Any] | None:
        rows = self.runs(job, 1)
        return rows[0] if rows else None

    def last_slot(self, job: str) -> float | None:
        """The newest schedule slot a run was started for (when the agent last ran the job on schedule)."""
        row = self.db.execute("SELECT MAX(scheduled) FROM runs WHERE job = ?", (job,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    @staticmethod
    def _row(r: tuple[Any, ...]) -> dict[str, Any]:
        d = dict(zip(COLUMNS, r, strict=True))
        if d["result"] == "running" and not _alive(d["pid"], d["pid_start"], d["boot"]):
            d["result"] = "interrupted"
        d["detail"] = json.loads(d["detail"]) if d["detail"] else {}
        d.pop("boot")
        d.pop("pid_start")
        return d
