"""Built-in recipes that make a snapshot application-consistent for a database (--app).

A snapshot of a running database's volume is crash-consistent: the database recovers from it as from
a power cut. The recipes do better, each in the database's own documented way, over a connection this
process holds (so a backup that dies, however, drops the connection and the database lets go by itself):

- ``postgresql``: CHECKPOINT just before the snapshot, so recovery on restore has little WAL to replay.
- ``postgresql-label``: pg_backup_start before the snapshot, pg_backup_stop right after it; the backup
  label and tablespace map it returns are stored with the point (summary, ``snapshot.app``). For
  restores that replay WAL from an archive (point-in-time recovery): write them into the restored data
  directory as ``backup_label`` and ``tablespace_map`` (docs/SNAPSHOTS.md).
- ``mariadb`` (also MySQL): FLUSH TABLES WITH READ LOCK held over the snapshot, so every table,
  MyISAM and Aria included, is flushed and unchanged at that moment; the binary log position at the
  lock is recorded.

The connection is described by --app-connect: a libpq connection string for PostgreSQL ("host=/run/
postgresql user=postgres"), or key=value words for MariaDB (unix_socket, host, port, user, password,
read_default_file, read_default_group, database). The drivers (psycopg, PyMySQL) are the optional
extra ``imagechain[apps]``."""

from __future__ import annotations

import shlex
from typing import Any, Protocol

from ..errors import SnapshotError, UsageError

APPS = ("postgresql", "postgresql-label", "mariadb")
LABEL = "imagechain"
_MARIADB_KEYS = {"unix_socket", "host", "port", "user", "password", "read_default_file", "read_default_group",
                 "database"}  # fmt: skip
MARIADB_DEFAULT = {"unix_socket": "/run/mysqld/mysqld.sock", "user": "root"}


class App(Protocol):
    name: str

    def quiesce(self) -> None:
        """Just before the snapshot: bring the database to a state worth capturing."""

    def release(self) -> dict[str, Any]:
        """Just after the snapshot: let the database go on; what it says about the moment captured."""

    def abort(self) -> None:
        """The snapshot was not taken: let go, quietly."""


def make(name: str, connect: str, timeout_s: float) -> App:
    if name == "postgresql":
        return _Postgres(connect, timeout_s, label=False)
    if name == "postgresql-label":
        return _Postgres(connect, timeout_s, label=True)
    if name == "mariadb":
        return _MariaDB(_mariadb_args(connect), timeout_s)
    raise UsageError(f"unknown --app {name!r}; choose one of {', '.join(APPS)}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _Postgres:
    def __init__(self, conninfo: str, timeout_s: float, label: bool) -> None:
        self.name = "postgresql-label" if label else "postgresql"
        self.conninfo, self.timeout_s, self.label = conninfo, timeout_s, label
        self.conn: Any = None
        self.record: dict[str, Any] = {}

    def _connect(self) -> Any:
        try:
            import psycopg
        except ImportError as e:
            raise SnapshotError("--app postgresql needs the psycopg driver: pip install 'imagechain[apps]'") from e
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=max(1, int(self.timeout_s)))
            ms = str(int(self.timeout_s * 1000))
            conn.execute("SELECT set_config('statement_timeout', %s, false)", (ms,))
        except psycopg.Error as e:
            where = self.conninfo or "defaults"
            raise SnapshotError(f"cannot connect to PostgreSQL ({where}): {_first_line(e)}") from e
        return conn

    def _do(self, what: str, sql: str, args: tuple[Any, ...] = ()) -> Any:
        import psycopg

        try:
            cur = self.conn.execute(sql, args)
            return cur.fetchone() if cur.description else None
        except psycopg.Error as e:
            raise SnapshotError(f"PostgreSQL {what} failed: {_first_line(e)}") from e

    def quiesce(self) -> None:
        self.conn = self._connect()
        try:
            if self.label:
                row = self._do("pg_backup_start", "SELECT pg_backup_start(%s, true)::text", (LABEL,))
                self.record = {"start_lsn": row[0]}
            else:
                self._do("CHECKPOINT", "CHECKPOINT")
                row = self._do("pg_current_wal_lsn", "SELECT pg_current_wal_lsn()::text")
                self.record = {"checkpoint_lsn": row[0]}
        except BaseException:
            self.abort()
            raise

    def release(self) -> dict[str, Any]:
        try:
            if self.label:
                row = self._do("pg_backup_stop", "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(true)")
                self.record.update(stop_lsn=row[0], backup_label=row[1], tablespace_map=row[2] or "")
        finally:
            self.abort()
        return {"app": self.name, **self.record}

    def abort(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()  # an unfinished pg_backup_start ends with its session


def _mariadb_args(connect: str) -> dict[str, Any]:
    if not connect.strip():
        return dict(MARIADB_DEFAULT)
    out: dict[str, Any] = {}
    try:
        words = shlex.split(connect)
    except ValueError as e:
        raise UsageError(f"--app-connect: {e}") from e
    for w in words:
        key, eq, value = w.partition("=")
        if not eq or key not in _MARIADB_KEYS:
            raise UsageError(f"--app-connect for mariadb takes key=value words with keys "
                             f"{', '.join(sorted(_MARIADB_KEYS))}; not {w!r}")  # fmt: skip
        out[key] = int(value) if key == "port" and value.isdigit() else value
    return out


class _MariaDB:
    name = "mariadb"

    def __init__(self, args: dict[str, Any], timeout_s: float) -> None:
        self.args, self.timeout_s = args, timeout_s
        self.conn: Any = None
        self.record: dict[str, Any] = {}

    def quiesce(self) -> None:
        try:
            import pymysql
        except ImportError as e:
            raise SnapshotError("--app mariadb needs the PyMySQL driver: pip install 'imagechain[apps]'") from e
        where = self.args.get("unix_socket") or self.args.get("host") or "defaults"
        try:
            self.conn = pymysql.connect(**self.args, connect_timeout=max(1, int(self.timeout_s)), autocommit=True)
        except pymysql.Error as e:
            raise SnapshotError(f"cannot connect to MariaDB ({where}): {_first_line(e)}") from e
        try:
            with self.conn.cursor() as c:
                c.execute("SET SESSION lock_wait_timeout = %s", (max(1, int(self.timeout_s)),))
                c.execute("FLUSH TABLES WITH READ LOCK")
                try:
                    c.execute("SHOW MASTER STATUS")
                    row = c.fetchone()
                except pymysql.Error:
                    row = None  # no binary log, or no privilege to see it: nothing to record
                if row:
                    self.record = {"binlog_file": row[0], "binlog_position": int(row[1])}
        except pymysql.Error as e:
            self.abort()
            raise SnapshotError(f"MariaDB FLUSH TABLES WITH READ LOCK failed: {_first_line(e)}") from e
        except BaseException:
            self.abort()
            raise

    def release(self) -> dict[str, Any]:
        import pymysql

        try:
            with self.conn.cursor() as c:
                c.execute("UNLOCK TABLES")
        except pymysql.Error as e:
            raise SnapshotError(f"MariaDB UNLOCK TABLES failed: {_first_line(e)}") from e
        finally:
            self.abort()
        return {"app": self.name, **self.record}

    def abort(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a broken connection: the server drops the lock anyway
                pass
