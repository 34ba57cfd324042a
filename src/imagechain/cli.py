"""The command layer: parse, call the library, render progress, results and errors. Nothing else."""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import click

from . import __version__, interrupts
from .address import open_point
from .chain import Catalog, describe
from .codec import CodecParams
from .crypto import Passphrase, generate_identity, load_identity, load_recipient
from .damage import DamageRecord
from .engine.backup import backup as run_backup
from .engine.backup import check_block_size, check_split_size
from .errors import CredentialsError, ImagechainError, IntegrityError, UsageError
from .format import spec
from .format.reader import PointFiles, PointReader
from .identity import local_host
from .keyring import Keyring, read_passphrase_file
from .limits import Limits
from .lock import LOCK_DIR, inspect_lock
from .repository import EXTENSION, Repository
from .sizes import human, parse_duration, parse_size
from .snapshots import MODES, SnapshotOptions
from .snapshots.apps import APPS
from .sources import check_name
from .stores import is_remote

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from rich.console import Console
    from rich.progress import Progress as RichBar


class _LazyConsole:
    """A rich Console made on first use: importing rich is a good part of start-up on a cold cache, and
    most runs of a script (--json, no terminal) print a line or nothing."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def real(self) -> Console:
        """The Console itself (made now if need be), for rich objects that take one."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)


# markup and emoji off: names, paths and addresses are printed as they are ("[x]" is no style, ":100:" no
# picture)
err = cast("Console", _LazyConsole(stderr=True, highlight=False, markup=False, emoji=False))
out = cast("Console", _LazyConsole(highlight=False, markup=False, emoji=False,
                                   width=None if sys.stdout.isatty() else 200))  # pipes: never wrap


def say(line: str) -> None:
    """One line on stderr, as it is (notices, errors): through rich only on a terminal, where a progress bar
    may be drawn; otherwise written directly, without importing rich for it."""
    if sys.stderr.isatty():
        err.print(line, soft_wrap=True)  # the console prints no markup
    else:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


F = TypeVar("F", bound=Callable[..., Any])
LOCK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8}")


class BarProgress:
    """A rich progress bar on a terminal; notices go to stderr either way."""

    def __init__(self, enabled: bool) -> None:
        # isatty first: asking rich would import it, for nothing when stderr is a pipe or a log file
        self.enabled = enabled and sys.stderr.isatty() and err.is_terminal
        self._bar: RichBar | None = None
        self._task: Any = None

    def start(self, label: str, total: int) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, DownloadColumn, ProgressColumn, Task, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichBar
        from rich.text import Text

        class _BinaryRate(ProgressColumn):
            """Transfer rate in the binary units every other figure of the tool uses."""

            def render(self, task: Task) -> Text:
                speed = task.finished_speed or task.speed
                return Text("?" if speed is None else f"{human(speed)}/s", style="progress.data.speed")

        self._bar = RichBar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                            _BinaryRate(), TimeRemainingColumn(), console=cast(_LazyConsole, err).real(),
                            transient=True)  # fmt: skip
        self._bar.start()
        self._task = self._bar.add_task(label, total=total)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def notice(self, message: str) -> None:
        say(f"notice: {message}")


def _fail(message: str, code: int, kind: str, as_json: bool) -> None:
    """One line on stderr; with --json also a JSON object on stdout, for scripts that read only that."""
    say(f"imagechain: {message}")
    if as_json:
        click.echo(json.dumps({"error": {"message": message, "exit_code": code, "kind": kind}}, indent=1))
    sys.exit(code)


def handle_errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except ImagechainError as e:
            if debug:
                traceback.print_exc()
            _fail(f"error: {e}", e.exit_code, type(e).__name__, as_json)
        except KeyboardInterrupt as e:  # SIGINT, SIGTERM, SIGHUP (interrupts.py)
            stop = interrupts.as_stopped(e)
            _fail(f"interrupted ({stop.name}); {stop.what}", stop.exit_code, "Interrupted", as_json)
        except OSError as e:
            if debug:
                traceback.print_exc()
            _fail(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), 1, "OSError", as_json)

    return wrapper  # type: ignore[return-value]


PASSPHRASE_ENV = "IMAGECHAIN_PASSPHRASE"


def _read_passphrase(file: str | None, env: str = PASSPHRASE_ENV) -> Passphrase | None:
    """From a file (first line) or the environment; never from the command line, where `ps` shows it."""
    if file:
        return read_passphrase_file(file)
    value = os.environ.get(env)
    return Passphrase(os.fsencode(value)) if value else None


def _ask(what: str, confirm: bool) -> Callable[[], Passphrase]:
    """A prompt on the terminal (asked twice when a passphrase is being set); an error without one."""

    def ask() -> Passphrase:
        if not sys.stdin.isatty():
            raise CredentialsError(f"{what} is needed: give it with {PASSPHRASE_ENV} or --passphrase-file FILE "
                                   f"(there is no terminal to ask on)")  # fmt: skip
        first = getpass.getpass(f"{what}: ")
        if not first:
            raise UsageError("an empty passphrase is not a passphrase")
        if confirm and getpass.getpass(f"{what} (again): ") != first:
            raise UsageError("the two passphrases differ")
        return Passphrase(first.encode())

    return ask


def _keyring(passphrase_file: str | None, identity: str | None, ask: bool = True) -> Keyring:
    return Keyring(_read_passphrase(passphrase_file), load_identity(identity) if identity else None,
                   ask=_ask("passphrase", False) if ask else None)  # fmt: skip


def key_options(fn: F) -> F:
    fn = click.option("--identity", metavar="FILE", help="Secret key (from `imagechain key generate`) of a "
                      "recipient-mode chain.")(fn)  # fmt: skip
    return click.option("--passphrase-file", metavar="FILE", help=f"Read the passphrase of an encrypted chain from "
                        f"FILE (else {PASSPHRASE_ENV}, else a prompt on a terminal).")(fn)  # fmt: skip


def _rate(value: str | None) -> int:
    """A rate such as 50M or 50M/s, in bytes per second; 0 (no limit) when not given."""
    return parse_size(value.removesuffix("/s")) if value else 0


def _size_option(value: str | None, check: Callable[[int], int]) -> int | None:
    return None if value is None else check(parse_size(value))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(__version__, prog_name="imagechain")
def main(debug: bool) -> None:
    """Image-based backups of disk volumes as chains of full and incremental image files."""


@main.command()
@click.argument("source")
@click.argument("repo")
@click.option("--chain", default="default", show_default=True, help="Chain name; chains share nothing.")
@click.option("--full", is_flag=True, help="Start a new chain generation with a full point.")
@click.option("--parent", "parent", metavar="POINT",
              help="Point to continue (a point id prefix or CHAIN@SEL) when the chain has forked.")
@click.option("--block-size", help="Block size for a new chain (power of two, 4K..16M).  [default: 64K]")
@click.option("--compression", help="zstd[:LEVEL], lz4 or none.  [default: zstd:3, or the chain's]")
@click.option("--split-size", help="Largest image file; bigger points are split into segments (0: no limit).")
@click.option("--host", "host_name", help="Host identity to file the backup under (default: this machine).")
@click.option("--source-name", help="Back the source up under this name, as a source of its own (default: the "
              "file or device name).")
@click.option("--init", "init", is_flag=True, help="Create the repository if REPO is not one yet.")
@click.option("--allow-mounted", is_flag=True, help="Image a source whose filesystem is mounted read-write "
              "(the point is marked: it may not be consistent).")
@click.option("--source-moved", is_flag=True, help="The source is the chain's volume on another device or file "
              "(moved, restored, re-plugged): continue its chain.")
@click.option("--all-blocks", is_flag=True, help="Read and keep every block, also those the filesystem does not "
              "use (by default they are recorded as unused, never read or stored).")
@click.option("--io-priority", type=click.Choice(["idle", "low", "normal"]), help="I/O scheduling class of the "
              "backup's threads (idle: only when the disk has nothing else to do).")
@click.option("--cpu-priority", type=int, metavar="NICE", help="Nice value of the backup's threads (0..19; "
              "below the current one needs root).")
@click.option("--threads", type=int, help="Worker threads (default: the CPUs this process may use).")
@click.option("--max-read-rate", metavar="RATE", help="Read the source at most this fast, per second (e.g. 50M).")
@click.option("--max-write-rate", metavar="RATE", help="Write to the repository at most this fast, per second.")
@click.option("--buffer-memory", metavar="SIZE", help="Volume data in flight at most (at least 32M; default "
              "about 16M per thread plus 64M).")
@click.option("--encrypt", is_flag=True, help="Start an encrypted chain, keys sealed with a passphrase (the chain "
              "keeps it; needs --full on an existing chain).")
@click.option("--recipient", metavar="PUBFILE", help="Start an encrypted chain whose payloads only the holder of "
              "the matching identity can open: this machine keeps just the chain's digest key.")
@click.option("--snapshot", "snapshot_mode", type=click.Choice(MODES), default="auto", show_default=True,
              help="How a live source is read: auto picks reflink for an image file that can be cloned, lvm for a "
              "logical volume, fsfreeze for a mounted volume with nothing better, else none.")
@click.option("--max-freeze", metavar="DURATION", default="60s", show_default=True, help="fsfreeze: the longest "
              "writers may be blocked; a read that takes longer is abandoned, thawed, nothing published (0: no limit).")
@click.option("--snapshot-size", metavar="SIZE", help="lvm: size of a classic snapshot (default: 20%% of the "
              "volume, at least 256M).")
@click.option("--pre-snapshot", metavar="CMD", help="Shell command run just before the snapshot; if it fails "
              "nothing is backed up.")
@click.option("--post-snapshot", metavar="CMD", help="Shell command run once the snapshot is taken (after the "
              "thaw for fsfreeze), also when it failed.")
@click.option("--hook-timeout", metavar="DURATION", default="5m", show_default=True, help="Longest a hook or "
              "database step may take.")
@click.option("--app", type=click.Choice(APPS), help="Make the snapshot application-consistent for a database: "
              "postgresql (checkpoint), postgresql-label (pg_backup_start/stop, label kept), mariadb (tables "
              "flushed and read-locked over the snapshot).")
@click.option("--app-connect", metavar="CONN", default="", help="How --app connects: a libpq connection string "
              "(PostgreSQL), or key=value words such as unix_socket=... user=... (MariaDB).")
@key_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def backup(source: str, repo: str, chain: str, full: bool, parent: str | None, block_size: str | None,
           compression: str | None, split_size: str | None, host_name: str | None, source_name: str | None,
           init: bool, allow_mounted: bool, source_moved: bool, all_blocks: bool, io_priority: str | None,
           cpu_priority: int | None, threads: int | None, max_read_rate: str | None, max_write_rate: str | None,
           buffer_memory: str | None, encrypt: bool, recipient: str | None, snapshot_mode: str, max_freeze: str,
           snapshot_size: str | None, pre_snapshot: str | None, post_snapshot: str | None, hook_timeout: str,
           app: str | None, app_connect: str, passphrase_file: str | None, identity: str | None,
           as_json: bool) -> None:  # fmt: skip
    """Back up SOURCE (image file or block device) into the repository folder REPO."""
    if encrypt and recipient:
        raise UsageError("--encrypt (a passphrase) and --recipient (a public key) are two modes: choose one")
    new: Passphrase | X25519PublicKey | None = load_recipient(recipient) if recipient else None
    if encrypt:
        new = _read_passphrase(passphrase_file) or _ask("new passphrase", True)()
    limits = Limits(io_priority=io_priority, cpu_priority=cpu_priority, threads=threads,
                    max_read_rate=_rate(max_read_rate), max_write_rate=_rate(max_write_rate),
                    buffer_memory=parse_size(buffer_memory) if buffer_memory else 0)  # fmt: skip
    res = run_backup(
        source, repo, chain=chain, full=full, parent=parent,
        block_size=_size_option(block_size, check_block_size),
        codec=CodecParams.parse(compression) if compression else None,
        split_size=_size_option(split_size, check_split_size),
        host=local_host(check_name("host", host_name)) if host_name is not None else None, source_name=source_name,
        source_moved=source_moved, allow_mounted=allow_mounted, all_blocks=all_blocks, init=init,
        limits=limits, encrypt=new, keyring=_keyring(passphrase_file, identity),
        snapshot=SnapshotOptions(snapshot_mode, parse_duration(max_freeze),
                                 parse_size(snapshot_size) if snapshot_size else None, pre_snapshot, post_snapshot,
                                 parse_duration(hook_timeout), app, app_connect),
        progress=BarProgress(not as_json),
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(res.as_dict(), indent=1))
        return
    rate = res.volume_size / res.duration_s if res.duration_s else 0
    click.echo(
        f"{res.kind} point {res.point_id[:8]} (#{res.sequence} of chain {res.chain!r}): "
        f"read {human(res.read_bytes)} of {human(res.volume_size)} ({res.used_map}), "
        f"changed {human(res.changed_bytes)} ({res.changed_blocks} blocks), "
        f"stored {human(res.file_bytes)} in {len(res.files)} file(s), {res.duration_s:.1f} s, {human(rate)}/s"
        + (f"; read from {res.snapshot_text}" if res.snapshot.get("provider", "none") != "none" else "")
    )


def _row(p: PointFiles, repo: Repository, cat: Catalog, damage: DamageRecord | None = None) -> dict[str, Any]:
    h = p.header
    problem: dict[str, str] = {}
    try:
        with PointReader(repo.store, p) as r:
            s = r.summary()
    except (ImagechainError, ValueError) as e:  # statistics only: a damaged summary must not hide the point
        s, problem = {}, {"summary_problem": str(e)}
    if h.encrypted and p.keys is None:  # sealed statistics: not a problem, just not for everyone to read
        s, problem = {}, {}
    kids = cat.children.get(p.point_id, [])
    parent_missing = h.parent_id is not None and cat.ancestry(p)[0].header.parent_id is not None
    why = "parent missing" if parent_missing else (damage.why_not_restorable(p.point_id) if damage else "")
    return {
        "point_id": str(h.point_id), "chain_id": str(h.chain_id), "sequence": h.sequence,
        "kind": "full" if h.kind == spec.KIND_FULL else "incremental",
        "created": datetime.fromtimestamp(h.created_us / 1e6).astimezone().isoformat(timespec="seconds"),
        "host": h.metadata.get("host"), "source": h.metadata.get("source"), "chain": h.metadata.get("chain"),
        "parent_id": str(h.parent_id) if h.parent_id else None,
        "parent_state_digest": h.parent_state.hex() if h.parent_id else None,
        "state_digest": p.footer.state_digest.hex(), "children": [str(k.point_id) for k in kids],
        "tip": not kids, "lineage_broken": parent_missing, "restorable": not why,
        **({"not_restorable_because": why} if why else {}),
        "volume_size": h.volume_size, "block_size": h.block_size,
        "changed_bytes": s.get("changed_bytes"), "stored_bytes": s.get("stored_bytes"),
        "file_bytes": sum(f.size for f in p.segments), "files": [f.name for f in p.segments], **problem,
    }  # fmt: skip


def _flags(row: dict[str, Any], gen_tips: int) -> str:
    out = []
    if len(row["children"]) > 1:
        out.append(f"fork: {len(row['children'])} branches")
    if row["tip"] and gen_tips > 1:
        out.append("tip")
    if not row["restorable"]:
        out.append(f"not restorable: {row['not_restorable_because']}")
    if "summary_problem" in row:
        out.append("summary damaged")
    return ", ".join(out)


@main.command()
@click.argument("repo")
@handle_errors
def init(repo: str) -> None:
    """Make REPO (a folder, created if missing) an imagechain repository; harmless if it is one."""
    Repository.open(repo, create=True)
    click.echo(f"{repo} is an imagechain repository")


@main.command(name="list")
@click.argument("repo")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def list_(repo: str, as_json: bool) -> None:
    """List hosts, sources, chains and points in REPO, with forks and tips."""
    r = Repository.open(repo)
    cat = r.catalog()
    gens = sorted(cat.generations().values(), key=lambda pts: (str(pts[0].header.metadata.get("host")),
                  str(pts[0].header.metadata.get("source")), str(pts[0].header.metadata.get("chain")),
                  pts[0].header.created_us))  # fmt: skip
    damage = [DamageRecord.of(r.store, cat.ancestry(pts[0])[0], cat.listed) for pts in gens]  # one per generation
    rows = [[_row(p, r, cat, d) for p in pts] for pts, d in zip(gens, damage, strict=True)]
    tips = [[str(t.point_id) for t in cat.tips(pts)] for pts in gens]
    if as_json:
        click.echo(json.dumps({
            "chains": rows, "tips": tips,
            "damaged": [{"point_id": str(pid), "files": f, "problem": w} for pid, (f, w) in cat.damaged.items()],
            "incomplete": [{"files": f, "problem": w} for f, w in cat.problems],
            "leftovers": cat.leftovers, "notices": cat.notices,
        }, indent=1))  # fmt: skip
        return
    if not rows and not cat.damaged:
        out.print(f"no points in {repo}")
    from rich.table import Table

    for pts, gen_tips, gen in zip(rows, tips, gens, strict=True):
        first = pts[0]
        host8 = gen[0].header.host_id.hex()[:8]  # two machines may share a host name
        total = sum(p["file_bytes"] for p in pts)
        t = Table(title=f"{first['host']} ({host8}) / {first['source']} / {first['chain']}  (chain "
                        f"{first['chain_id'][:8]}: {len(pts)} point(s), {human(total)})",
                  title_justify="left", box=None)  # fmt: skip
        for col in ("#", "created", "kind", "volume", "changed", "stored", "point", "parent", ""):
            t.add_column(col, justify="right" if col in ("#", "volume", "changed", "stored") else "left")
        for p in pts:
            changed = human(p["changed_bytes"]) if p["changed_bytes"] is not None else "-"  # sealed or damaged
            t.add_row(str(p["sequence"]), p["created"][:19].replace("T", " "), p["kind"], human(p["volume_size"]),
                      changed, human(p["file_bytes"]), p["point_id"][:8],
                      (p["parent_id"] or "")[:8], _flags(p, len(gen_tips)))  # fmt: skip
        out.print(t)
        if len(gen_tips) > 1:
            why = "forked" if any(len(p["children"]) > 1 for p in pts) else "split by a missing point"
            out.print(f"  {why}: {len(gen_tips)} branches, tips {', '.join(x[:8] for x in gen_tips)}; backup "
                      f"continues one with --parent POINT", soft_wrap=True)  # fmt: skip
    for p in (p for pts in rows for p in pts if "summary_problem" in p):
        say(f"notice: point {p['point_id'][:8]}: {p['summary_problem']} (statistics only)")  # fmt: skip
    for _f, why in cat.damaged.values():
        say(f"notice: {why} (run imagechain verify)")
    for _files, why in cat.problems:
        say(f"notice: not a point: {why}")
    for n in cat.notices:
        say(f"notice: {n}")
    for name in cat.leftovers:
        say(f"notice: leftover temporary file {name}")


@main.command()
@click.argument("point")
@key_options
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def info(point: str, passphrase_file: str | None, identity: str | None, as_json: bool) -> None:
    """Show a point's header, parent, digests and block statistics."""
    res = open_point(point)
    p, h = res.point, res.point.header
    try:
        _keyring(passphrase_file, identity, ask=False).unlock(p, need_data=False)
        with PointReader(res.repo.store, p) as r:
            summary = r.summary()
    except CredentialsError:
        summary = {"sealed": "the statistics of an encrypted point show with its passphrase or identity"}
    parent = res.catalog.points.get(h.parent_id) if h.parent_id else None
    data: dict[str, Any] = {
        **_row(p, res.repo, res.catalog), "format": f"{spec.FORMAT_MAJOR}.{h.minor}",
        "parent_file": parent.name if parent else h.metadata.get("parent_file"),
        "host_id": h.host_id.hex(), "source_id": h.source_id.hex(),
        "source_path": h.metadata.get("source_path"), "source_identity": h.metadata.get("source_identity"),
        "compression": str(CodecParams(h.compression, h.compression_level)), "split_size": h.split_size,
        "encryption": _encryption(h),
        "used_map": h.metadata.get("used_map", "all blocks"),
        "snapshot": _snapshot(h, summary),
        **({"layout": h.metadata["layout"]} if isinstance(h.metadata.get("layout"), dict) else {}),
        "warnings": _warnings(h, summary),
        "summary": summary,
    }  # fmt: skip
    if as_json:
        click.echo(json.dumps(data, indent=1))
        return
    def shown(key: str, v: object) -> str:
        if isinstance(v, list):
            return ", ".join(map(str, v))
        if isinstance(v, int) and key.endswith(("_size", "_bytes")) and v >= 1024:
            return f"{human(v)} ({v} bytes)"
        return str(v)

    for k, v in data.items():  # plain lines: never wrapped, whatever the terminal
        if k == "layout":
            for line in _layout_lines(v):
                click.echo(line)
        elif k == "summary":
            for sk, sv in v.items():
                if sk == "snapshot":
                    continue  # shown above, in words
                click.echo(f"  {sk:<16} {shown(sk, sv)}")
        else:
            click.echo(f"{k:<20} {shown(k, v)}")


def _encryption(h: spec.PointHeader) -> str:
    if not h.encrypted:
        return "none"
    fp = h.metadata.get("recipient_fingerprint")
    return f"aes-256-gcm, keys for recipient {fp}" if h.metadata.get("recipient") else "aes-256-gcm, passphrase"


def _layout_lines(layout: dict[str, Any]) -> list[str]:
    """A disk point's partition table, one line per partition with the used-block map of its filesystem."""
    out = [f"{'layout':<20} {layout.get('kind')} partition table, disk id {layout.get('disk_id')}, "
           f"{layout.get('sector_size')}-byte sectors"]  # fmt: skip
    volumes = {v.get("number"): v for v in layout.get("volumes", []) if isinstance(v, dict)}
    for p in layout.get("partitions", []):
        vol = volumes.get(p.get("number"), {})
        start, size = int(p.get("start", 0)), int(p.get("size", 0))
        name = f" {p['name']!r}" if p.get("name") else ""
        out.append(f"  partition {p.get('number'):<6} start {start} ({human(start)}), size {human(size)} "
                   f"({size} bytes), type {p.get('type')}{name}: {vol.get('fs') or '?'}, "
                   f"{vol.get('used_map', 'all blocks')}")  # fmt: skip
    return out


def _snapshot(h: spec.PointHeader, summary: dict[str, Any]) -> str:
    """How the source was read, in words: provider, writers blocked, database recipe."""
    rec = summary.get("snapshot")
    rec = rec if isinstance(rec, dict) else {}
    provider = str(h.metadata.get("snapshot") or rec.get("provider") or "none (not recorded)")
    out = [provider]
    if rec.get("why"):
        out.append(str(rec["why"]))
    if "writers_blocked_ms" in rec:
        out.append(f"writers blocked {rec['writers_blocked_ms']} ms ({', '.join(map(str, rec.get('frozen', [])))})")
    if rec.get("lvm_snapshot"):
        out.append(f"LVM snapshot {rec['lvm_snapshot']}")
    app = rec.get("app")
    if isinstance(app, dict):
        facts = ", ".join(f"{k} {v}" for k, v in app.items() if k in ("checkpoint_lsn", "start_lsn", "stop_lsn",
                                                                       "binlog_file", "binlog_position"))  # fmt: skip
        label = "; backup label kept (info --json: summary.snapshot.app)" if app.get("backup_label") else ""
        out.append(f"{app.get('app')}{': ' + facts if facts else ''}{label}")
    return "; ".join(out)


def _warnings(h: spec.PointHeader, summary: dict[str, object]) -> list[str]:
    """What the point's writer found doubtful about the source (mounted, modified while read)."""
    out = [f"mounted read-write while it was read: {h.metadata['mounted_while_read']}"] \
        if h.metadata.get("mounted_while_read") else []  # fmt: skip
    more = summary.get("warnings")
    return out + ([str(w) for w in more] if isinstance(more, list) else [])


@main.command()
@click.argument("point")
@click.argument("dest")
@click.option("--delta", is_flag=True, help="Read DEST first and write only the blocks that differ.")
@click.option("--force", is_flag=True, help="Overwrite an existing file or device.")
@click.option("--salvage", is_flag=True, help="Also restore from points damaged only in their header, when every "
              "block digest and the state digest prove the result.")
@click.option("--overwrite-mounted", is_flag=True, help="Write even to a device or file whose filesystem is "
              "mounted (corrupts what is mounted; --force alone refuses).")
@click.option("--partition", type=int, metavar="N", help="Restore only partition N of a whole-disk point (numbers "
              "as `info` shows them) to DEST.")
@click.option("--discard", is_flag=True, help="On a device, discard blocks the filesystem did not use instead of "
              "zeroing them (they then read as whatever the device returns).")
@key_options
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def restore(point: str, dest: str, delta: bool, force: bool, salvage: bool, overwrite_mounted: bool,
            partition: int | None, discard: bool, passphrase_file: str | None, identity: str | None,
            as_json: bool) -> None:  # fmt: skip
    """Restore POINT to DEST (a file or block device), bit for bit."""
    res = open_point(point, salvage=salvage)
    from .engine.restore import partition_window
    from .engine.restore import restore as run_restore

    window = partition_window(res.point.header, partition) if partition is not None else None
    bar = BarProgress(not as_json)
    for p in res.catalog.lineage(res.point):
        if p.point_id in res.catalog.salvageable:
            bar.notice(f"{describe(p)} is damaged in its header only; using it (--salvage): every block "
                       f"digest and the state digest must still prove what is restored")  # fmt: skip
    r = run_restore(res.repo, res.point, dest, delta=delta, force=force, progress=bar, cat=res.catalog,
                    overwrite_mounted=overwrite_mounted, window=window, discard=discard,
                    keyring=_keyring(passphrase_file, identity))  # fmt: skip
    if as_json:
        click.echo(json.dumps(r.as_dict(), indent=1))
        return
    rate = r.volume_size / r.duration_s if r.duration_s else 0
    click.echo(
        f"restored point {r.point_id[:8]} to {dest}: {human(r.volume_size)}, wrote {human(r.written_bytes)} "
        f"({r.written_blocks} blocks{', delta' if delta else ''}"
        f"{f', {human(r.zeroed_bytes)} of it zeroed by the target' if r.zeroed_bytes else ''}), "
        f"{r.checked_blocks} block digests checked, "
        f"state {r.state_digest[:16]} proven, {r.duration_s:.1f} s, {human(rate)}/s"
    )


@main.command()
@click.argument("target")
@key_options
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def verify(target: str, passphrase_file: str | None, identity: str | None, as_json: bool) -> None:
    """Verify a whole repository, or one point: structure, checksums, links and every block digest."""
    if "::" not in target and (os.path.isdir(target) or (is_remote(target) and not target.endswith(EXTENSION))):
        repo, only, cat = Repository.open(target), None, None
    else:
        res = open_point(target)
        repo, only, cat = res.repo, res.point, res.catalog
    from .engine.verify import verify as run_verify

    report = run_verify(repo, only, progress=BarProgress(not as_json), cat=cat,
                        keyring=_keyring(passphrase_file, identity, ask=False))  # fmt: skip
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=1))
    else:
        for p in report.points:
            status = "ok" if p.ok else "FAILED"
            click.echo(f"{status:6} {p.file} ({p.checked_blocks} blocks checked)")
            for prob in p.problems:
                click.echo(f"       {prob}")
            for n in p.notices:
                click.echo(f"       notice: {n}")
        for n in report.notices:
            click.echo(f"notice: {n}")
        for i in report.incomplete:
            click.echo(f"FAILED not a point: {i}")
        for name in report.leftovers:
            click.echo(f"notice: leftover temporary file {name} (removed by the next backup of its chain)")
        bad = sum(not p.ok for p in report.points) + len(report.incomplete)
        click.echo(f"{len(report.points)} point(s) checked, {bad} problem(s)")
    if not report.ok:
        sys.exit(IntegrityError.exit_code)
    if report.opened_none:  # a wrong key file or variable must not pass for a full check
        if as_json:  # said in the report (opened_none)
            sys.exit(CredentialsError.exit_code)
        raise CredentialsError(f"{report.opened_none} (what could be checked without it is sound)")


@main.group()
def key() -> None:
    """Keys of encrypted chains: generate a recipient's key pair, change a chain's passphrase."""


@key.command()
@click.argument("path")
@handle_errors
def generate(path: str) -> None:
    """Write a new X25519 key pair: PATH (the secret identity, mode 0600: keep it off the machines that back
    up) and PATH.pub (for `backup --recipient`)."""
    pub = generate_identity(path)
    click.echo(f"wrote {path} (secret: restore, verify and mount need it; keep it off the backed-up machines) "
               f"and {pub} (for backup --recipient)")  # fmt: skip


@key.command(name="change-passphrase")
@click.argument("target", metavar="POINT|CHAIN")
@click.option("--passphrase-file", metavar="FILE", help=f"The old passphrase (else {PASSPHRASE_ENV}, else a prompt).")
@click.option("--new-passphrase-file", metavar="FILE", help="The new passphrase (else IMAGECHAIN_NEW_PASSPHRASE, "
              "else a prompt, twice).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def change_passphrase_cmd(target: str, passphrase_file: str | None, new_passphrase_file: str | None,
                          as_json: bool) -> None:  # fmt: skip
    """Re-seal the keys of every point of an encrypted chain (every point of the chain named, or of the
    point's chain) under a new passphrase, in place; no data is re-encrypted. Crash-safe: until it ends
    every file opens with the old or with the new passphrase; run it again to finish an interrupted run."""
    res = open_point(target)
    chain_id = res.point.header.chain_id
    points = [p for p in res.catalog.points.values() if p.header.chain_id == chain_id]
    old = _read_passphrase(passphrase_file) or _ask("old passphrase", False)()
    new = _read_passphrase(new_passphrase_file, "IMAGECHAIN_NEW_PASSPHRASE") or _ask("new passphrase", True)()
    from .engine.rekey import change_passphrase

    r = change_passphrase(res.repo, points, old, new)
    if as_json:
        click.echo(json.dumps(r.as_dict(), indent=1))
        return
    click.echo(f"chain {chain_id.hex[:8]}: {r.points} point(s) now open with the new passphrase only "
               f"({r.sealed} key slots sealed, {r.cleared} old ones cleared)")  # fmt: skip


class _Reported(Protocol):
    notices: list[str]

    def as_dict(self) -> dict[str, object]: ...


def _notices_or_json(r: _Reported, as_json: bool) -> bool:
    """A maintenance command's notices on stderr, and with --json its result on stdout (True: that is all)."""
    for n in r.notices:
        click.echo(f"notice: {n}", err=True)
    if as_json:
        click.echo(json.dumps(r.as_dict(), indent=1))
    return as_json


@main.command()
@click.argument("point")
@click.option("--from", "from_point", metavar="POINT", help="First point of the run to merge (default: the chain's "
              "full point, which makes the merged point a synthetic full).")
@click.option("--json", "as_json", is_flag=True)
@key_options
@handle_errors
def consolidate(point: str, from_point: str | None, as_json: bool, passphrase_file: str | None,
                identity: str | None) -> None:  # fmt: skip
    """Merge the points from the chain's full point (or --from) down to POINT into one; later points go on."""
    from .engine.consolidate import consolidate as run_consolidate

    res = open_point(point)
    r = run_consolidate(res.repo, res.point, cat=res.catalog, from_address=from_point,
                        keyring=_keyring(passphrase_file, identity))  # fmt: skip
    if _notices_or_json(r, as_json):
        return
    click.echo(f"merged {len(r.replaced)} points into {r.kind} point {r.point_id[:8]}: {r.copied_payloads} "
               f"payloads ({human(r.stored_bytes)}) copied as stored, {len(r.retired_files)} file(s) retired, "
               f"{r.duration_s:.1f} s")  # fmt: skip


@main.command()
@click.argument("target")
@click.option("--keep-last", type=int, default=0, help="Keep the newest N points.")
@click.option("--keep-hourly", type=int, default=0, help="Keep the newest point of each of the last N hours "
              "with points.")
@click.option("--keep-daily", type=int, default=0, help="... of each of the last N days with points.")
@click.option("--keep-weekly", type=int, default=0, help="... of each of the last N ISO weeks with points.")
@click.option("--keep-monthly", type=int, default=0, help="... of each of the last N months with points.")
@click.option("--dry-run", is_flag=True, help="Say what would go and how many bytes that frees; change nothing.")
@click.option("--json", "as_json", is_flag=True)
@key_options
@handle_errors
def prune(target: str, keep_last: int, keep_hourly: int, keep_daily: int, keep_weekly: int, keep_monthly: int,
          dry_run: bool, as_json: bool, passphrase_file: str | None, identity: str | None) -> None:  # fmt: skip
    """Keep the points a retention policy names in every chain of TARGET (a repository, or a chain's address
    such as REPO::CHAIN); merge the others into the point after them. The tip of every branch stays."""
    from .engine.prune import Policy
    from .engine.prune import prune as run_prune

    policy = Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly)
    policy.check()
    if "::" in target:
        res = open_point(target)
        repo, cat = res.repo, res.catalog
        gens = [cat.generations()[res.point.header.chain_id]]
    else:
        repo = Repository.open(target)
        cat = repo.catalog()
        gens = list(cat.generations().values())
    r = run_prune(repo, gens, policy, cat=cat, dry_run=dry_run, keyring=_keyring(passphrase_file, identity, ask=False))
    if _notices_or_json(r, as_json):
        return
    for m in r.merges:
        click.echo(f"{'would merge' if dry_run else 'merged'} {', '.join(describe(p) for p in m.remove)} into "
                   f"{describe(m.into)} ({human(m.freed_bytes)} freed)")  # fmt: skip
    click.echo(f"{len(r.merges)} merge(s), {sum(len(m.remove) for m in r.merges)} point(s) "
               f"{'would go' if dry_run else 'gone'}, {r.kept} kept, {human(r.freed_bytes)} "
               f"{'would be ' if dry_run else ''}freed")  # fmt: skip


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--chain", "chains", multiple=True, metavar="NAME", help="Only this chain (repeatable).")
@click.option("--init", "init", is_flag=True, help="Create DST as a repository if it is not one yet.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def replicate(src: str, dst: str, chains: tuple[str, ...], init: bool, as_json: bool) -> None:
    """Copy the points DST lacks from SRC, each proven before it appears in DST; resumable, idempotent."""
    from .engine.replicate import replicate as run_replicate

    r = run_replicate(Repository.open(src), Repository.open(dst, create=init), chains=chains)
    if _notices_or_json(r, as_json):
        return
    retired = f", {len(r.retired_files)} file(s) retired (merged away in SRC)" if r.retired_files else ""
    click.echo(f"copied {len(r.copied)} point(s) ({human(r.bytes_copied)}), {r.skipped} already there{retired}, "
               f"{r.duration_s:.1f} s")  # fmt: skip


@main.command(name="break-lock")
@click.argument("repo")
@click.argument("lock_ids", nargs=-1)
@click.option("--force", is_flag=True, help="Also remove locks whose backup still seems to be running.")
@handle_errors
def break_lock(repo: str, lock_ids: tuple[str, ...], force: bool) -> None:
    """Remove stale chain locks (as named by the error that reported them); without LOCK_IDS, list locks."""
    r = Repository.open(repo)
    me = local_host()
    names = [e.name for e in r.store.list(LOCK_DIR) if e.name.endswith(".lock")]
    if not lock_ids:
        for n in names:
            st = inspect_lock(r.store, n, me)
            if st:
                click.echo(f"{n.rpartition('/')[2].removesuffix('.lock')}: {'live' if st.live else 'stale'}, {st.why}")
        return
    for lid in lock_ids:
        if not LOCK_ID.fullmatch(lid):  # it becomes a path: nothing but a lock id of this repository
            raise UsageError(f"{lid!r} is not a lock id (three groups of 8 hex digits, as printed by the error "
                             f"or by break-lock {repo})")  # fmt: skip
        name = f"{LOCK_DIR}/{lid}.lock"
        st = inspect_lock(r.store, name, me)
        if st is None:
            raise UsageError(f"no lock {lid} in {repo}")
        if st.live and not force:
            raise ImagechainError(f"lock {lid} is live ({st.why}); not removed (use --force if you are sure)")
        r.store.delete(name)
        click.echo(f"removed lock {lid} ({st.why})")


def _register_commands() -> None:
    """Commands that live with their packages (mount, nbd, jobs), imported here so `imagechain --help` lists them."""
    from .jobs.commands import register as jobs_commands
    from .mount.commands import register as mount_commands
    from .nbd.commands import register as nbd_commands

    mount_commands(main)
    nbd_commands(main)
    jobs_commands(main)


_register_commands()
