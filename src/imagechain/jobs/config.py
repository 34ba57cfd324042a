"""The job file (TOML, default /etc/imagechain/jobs.toml): one `[jobs.NAME]` table per job, an optional
`[agent]` table and `[notify]` defaults (docs/JOBS.md). Everything is checked when the file is read, and
every complaint names the file, the job and the key: a typo must stop the agent at start (or be refused
by a reload, keeping the jobs that ran), not surface at 3 a.m.

Secrets never live here: a job names the file holding its passphrase, or the recipient's public key."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ..codec import CodecParams
from ..engine.prune import Policy
from ..errors import UsageError
from ..limits import IO_PRIORITIES, Limits
from ..sizes import parse_duration, parse_size
from ..snapshots import MODES, SnapshotOptions
from ..snapshots.apps import APPS
from ..sources import check_name
from .schedule import Schedule, parse

DEFAULT_CONFIG = "/etc/imagechain/jobs.toml"
DEFAULT_HISTORY = "/var/lib/imagechain/jobs.sqlite"
ENCRYPTIONS = ("none", "passphrase", "recipient")
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

JOB_KEYS = {
    "source", "repository", "chain", "schedule", "full_every", "retention", "snapshot", "max_freeze",
    "snapshot_size", "pre_snapshot", "post_snapshot", "hook_timeout", "app", "app_connect", "compression",
    "block_size", "encryption", "passphrase_file", "recipient", "identity", "replicate_to", "io_priority",
    "cpu_priority", "threads", "max_read_rate", "max_write_rate", "buffer_memory", "host", "source_name",
    "allow_mounted", "init", "notify", "enabled",
}  # fmt: skip
RETENTION_KEYS = {"last", "hourly", "daily", "weekly", "monthly"}
NOTIFY_KEYS = {"command", "webhook", "on_success", "timeout"}
AGENT_KEYS = {"max_parallel", "history", "stop_timeout"}


@dataclass(frozen=True)
class Notify:
    command: str | None = None  # run through /bin/sh with the result as JSON on stdin
    webhook: str | None = None  # HTTP(S) POST of the result as JSON
    on_success: bool = False  # also after a run that succeeded (failures always notify)
    timeout_s: float = 30.0


@dataclass(frozen=True)
class Job:
    name: str
    source: str
    repository: str
    chain: str
    schedule: Schedule
    full_every_s: float | None = None
    retention: Policy | None = None
    snapshot: SnapshotOptions = field(default_factory=SnapshotOptions)
    limits: Limits = field(default_factory=Limits)
    compression: str | None = None
    block_size: int | None = None
    encryption: str = "none"
    passphrase_file: str | None = None
    recipient: str | None = None  # the recipient's public key file (recipient mode)
    identity: str | None = None  # the recipient's secret key file, when this machine may hold it (retention)
    replicate_to: str | None = None
    host: str | None = None
    source_name: str | None = None
    allow_mounted: bool = False
    init: bool = False  # create the repository if it is missing (off: an unmounted disk must not become one)
    notify: Notify = field(default_factory=Notify)
    enabled: bool = True

    @property
    def chain_key(self) -> tuple[str, str, str, str]:
        """Jobs with the same key write the same chain: the agent never runs two of them at once."""
        return (self.repository.rstrip("/"), os.path.realpath(self.source), self.source_name or "",
                f"{self.host or ''}/{self.chain}")  # fmt: skip


@dataclass(frozen=True)
class Config:
    path: str
    jobs: dict[str, Job]
    max_parallel: int = 2
    history: str = DEFAULT_HISTORY
    stop_timeout_s: float = 120.0  # SIGTERM: how long running jobs get to finish their abort


def duration(text: object) -> float:
    """Seconds from "90s", "30m", "12h", "30d", "2w" (or a number of seconds)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"not a duration: {text!r} (examples: 90s, 30m, 12h, 30d, 2w)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def load(path: str | None = None) -> Config:
    path = path or os.environ.get("IMAGECHAIN_JOBS") or DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"no job file at {path} (write one, see docs/JOBS.md, or give --config FILE)") from None
    except OSError as e:
        raise UsageError(f"cannot read job file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from e
    except UnicodeDecodeError as e:  # TOML is UTF-8; tomllib lets the decoder's error through
        raise UsageError(f"{path} is not valid TOML: it is not UTF-8 (byte {e.start}: {e.reason})") from e
    return parse_config(doc, path)


def parse_config(doc: dict[str, Any], path: str) -> Config:
    unknown = set(doc) - {"jobs", "agent", "notify"}
    if unknown:
        raise UsageError(f"{path}: unknown table(s) {', '.join(sorted(unknown))} (expected [agent], [notify], "
                         f"[jobs.NAME])")  # fmt: skip
    agent = _table(doc, "agent", path, "[agent]")
    _only(agent, AGENT_KEYS, f"{path}: [agent]")
    defaults = _notify(_table(doc, "notify", path, "[notify]"), Notify(), f"{path}: [notify]")
    jobs_doc = _table(doc, "jobs", path, "[jobs]")
    if not jobs_doc:
        raise UsageError(f"{path}: no jobs (add a [jobs.NAME] table)")
    jobs = {}
    for name, body in jobs_doc.items():
        where = f"{path}: job {name!r}"
        if not isinstance(body, dict):
            raise UsageError(f"{where}: must be a table ([jobs.{name}])")
        jobs[name] = _job(name, body, defaults, where)
    try:
        max_parallel = _keyed("max_parallel", int, agent.get("max_parallel", 2))
        if not 1 <= max_parallel <= 64:
            raise ValueError(f"max_parallel: {max_parallel} is not 1 to 64")
        stop = _keyed("stop_timeout", duration, agent.get("stop_timeout", 120))
    except ValueError as e:
        raise UsageError(f"{path}: [agent]: {e}") from e
    history = str(agent.get("history", os.environ.get("IMAGECHAIN_JOBS_HISTORY", DEFAULT_HISTORY)))
    return Config(path, jobs, max_parallel, history, stop)


def _table(doc: dict[str, Any], key: str, path: str, what: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise UsageError(f"{path}: {what} must be a table")
    return value


def _only(body: dict[str, Any], allowed: set[str], where: str) -> None:
    """Unknown keys refused; `where` "" when the caller names the place itself."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise UsageError(f"{f'{where}: ' if where else ''}unknown key(s) {', '.join(unknown)} (known: "
                         f"{', '.join(sorted(allowed))})")  # fmt: skip


def _notify(body: dict[str, Any], base: Notify, where: str) -> Notify:
    _only(body, NOTIFY_KEYS, where)
    try:
        hook = body.get("webhook", base.webhook)
        if hook is not None and not str(hook).startswith(("http://", "https://")):
            raise ValueError(f"webhook: {hook!r} is not an http:// or https:// URL")
        return Notify(str(body["command"]) if "command" in body else base.command,
                      str(hook) if hook is not None else None, _bool(body.get("on_success", base.on_success)),
                      duration(body.get("timeout", base.timeout_s)))  # fmt: skip
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where}: {e}") from e


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{v!r} is not true or false")
    return v


def _job(name: str, body: dict[str, Any], defaults: Notify, where: str) -> Job:
    try:
        check_name("job", name)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    if "passphrase" in body:
        raise UsageError(f"{where}: passphrase: the secret itself never goes into the job file; put it in a file "
                         f"readable by root only and name it with passphrase_file")  # fmt: skip
    _only(body, JOB_KEYS, where)
    for key in ("source", "repository", "schedule"):
        if key not in body:
            raise UsageError(f"{where}: {key} is missing")
    key = ""
    try:
        key = "schedule"
        sched = parse(_str(body["schedule"]))
        key = "chain"
        chain = _str(body.get("chain", name))
        check_name("chain", chain)
        key = "full_every"
        full_every = duration(body["full_every"]) if "full_every" in body else None
        key = "retention"
        retention = _retention(body["retention"]) if "retention" in body else None
        key = ""  # these name their keys themselves
        snapshot = _snapshot(body)
        limits = _limits(body)
        key = "compression"
        compression = _str(body["compression"]) if "compression" in body else None
        if compression is not None:
            CodecParams.parse(compression)
        key = "block_size"
        block_size = parse_size(_str(body["block_size"])) if "block_size" in body else None
        key = "encryption"
        encryption = _str(body.get("encryption", "none"))
        if encryption not in ENCRYPTIONS:
            raise ValueError(f"{encryption!r}: choose one of {', '.join(ENCRYPTIONS)}")
        if encryption == "passphrase" and "passphrase_file" not in body:
            raise ValueError("'passphrase' needs passphrase_file (the file that holds it)")
        if encryption == "recipient" and "recipient" not in body:
            raise ValueError("'recipient' needs recipient (the public key file from `imagechain key generate`)")
        key = "notify"
        notify = _notify(body.get("notify", {}), defaults, f"{where}: notify")
        for key in ("allow_mounted", "init", "enabled"):
            _bool(body.get(key, False))
        key = "host"
        if "host" in body:
            check_name("host", _str(body["host"]))
        key = "source_name"
        if "source_name" in body:
            check_name("source", _str(body["source_name"]))
    except (TypeError, ValueError, UsageError) as e:
        raise UsageError(f"{where}: {f'{key}: ' if key else ''}{_plain(e)}") from None
    opt = {k: _str(body[k]) for k in ("passphrase_file", "recipient", "identity", "replicate_to", "host",
                                      "source_name") if k in body}  # fmt: skip
    return Job(name, _str(body["source"]), _str(body["repository"]), chain, sched, full_every, retention,
               snapshot, limits, compression, block_size, encryption, opt.get("passphrase_file"),
               opt.get("recipient"), opt.get("identity"), opt.get("replicate_to"), opt.get("host"),
               opt.get("source_name"), bool(body.get("allow_mounted", False)), bool(body.get("init", False)),
               notify, bool(body.get("enabled", True)))  # fmt: skip


def _plain(e: Exception) -> str:
    """An option-style message (`--max-freeze ...`) in the job file's words."""
    return re.sub(r"--([a-z-]+)", lambda m: m.group(1).replace("-", "_"), str(e))


def _str(v: object) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"{v!r} is not a non-empty string")
    return v


def _retention(v: object) -> Policy:
    if not isinstance(v, dict):
        raise ValueError("must be a table such as { last = 7, daily = 14, weekly = 8 }")
    _only(v, RETENTION_KEYS, "")  # the job's check names the key
    counts = {}
    for k in RETENTION_KEYS:
        n = v.get(k, 0)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{k} = {n!r}: a count of points (0 or more)")
        counts[k] = n
    policy = Policy(counts["last"], counts["hourly"], counts["daily"], counts["weekly"], counts["monthly"])
    policy.check()
    return policy


def _keyed(key: str, fn: Any, *args: Any) -> Any:
    """fn(*args), its complaint prefixed with the key it is about."""
    try:
        return fn(*args)
    except (TypeError, ValueError, UsageError) as e:
        raise ValueError(f"{key}: {_plain(e)}") from None


def _snapshot(body: dict[str, Any]) -> SnapshotOptions:
    mode = _keyed("snapshot", _str, body.get("snapshot", "auto"))
    if mode not in MODES:
        raise ValueError(f"snapshot: {mode!r}: choose one of {', '.join(MODES)}")
    app = _keyed("app", _str, body["app"]) if "app" in body else None
    if app is not None and app not in APPS:
        raise ValueError(f"app: {app!r}: choose one of {', '.join(APPS)}")
    opts = SnapshotOptions(mode, _keyed("max_freeze", duration, body.get("max_freeze", "60s")),
                           _keyed("snapshot_size", lambda v: parse_size(_str(v)), body["snapshot_size"])
                           if "snapshot_size" in body else None,
                           _keyed("pre_snapshot", _str, body["pre_snapshot"]) if "pre_snapshot" in body else None,
                           _keyed("post_snapshot", _str, body["post_snapshot"]) if "post_snapshot" in body else None,
                           _keyed("hook_timeout", duration, body.get("hook_timeout", "5m")), app,
                           str(body.get("app_connect", "")))  # fmt: skip
    opts.check()
    return opts


def _limits(body: dict[str, Any]) -> Limits:
    io = body.get("io_priority")
    if io is not None and io not in IO_PRIORITIES:
        raise ValueError(f"io_priority: {io!r}: choose one of {', '.join(IO_PRIORITIES)}")
    cpu = body.get("cpu_priority")
    threads = body.get("threads")
    for k, v in (("cpu_priority", cpu), ("threads", threads)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise ValueError(f"{k}: {v!r} is not a whole number")
    rates = {k: _keyed(k, _rate, body.get(k)) for k in ("max_read_rate", "max_write_rate")}
    memory = _keyed("buffer_memory", lambda v: parse_size(_str(v)), body["buffer_memory"]) \
        if "buffer_memory" in body else 0  # fmt: skip
    try:
        return Limits(io_priority=io, cpu_priority=cpu, threads=threads, max_read_rate=rates["max_read_rate"],
                      max_write_rate=rates["max_write_rate"], buffer_memory=memory)  # fmt: skip
    except UsageError as e:
        raise ValueError(_plain(e)) from None


def _rate(v: object) -> int:
    return parse_size(_str(v).removesuffix("/s")) if v is not None else 0


__all__ = ["DEFAULT_CONFIG", "Config", "Job", "Notify", "duration", "load", "parse_config", "parse_duration"]
