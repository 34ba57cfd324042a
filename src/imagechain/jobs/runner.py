"""One run of one job: the backup (a new full point when `full_every` says so), then retention on that
chain, then replication of it, each recorded in the history as it ends, then notification.

A stop signal during the backup aborts it as `imagechain backup` would (nothing half-published): the run
is recorded `aborted` and the signal's exit code is passed on. An error in a later step fails the run
but keeps the point, which is published and recorded."""

from __future__ import annotations

import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..codec import CodecParams
from ..crypto import Passphrase, load_identity, load_recipient
from ..engine.backup import backup
from ..engine.prune import prune
from ..engine.replicate import replicate
from ..errors import ImagechainError
from ..identity import local_host
from ..interrupts import Stopped
from ..keyring import Keyring, read_passphrase_file
from ..repository import Repository
from ..sources import open_source
from . import notify
from .config import Config, Job
from .history import History

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey


@dataclass
class RunResult:
    job: str
    result: str  # ok, failed, aborted
    run_id: int
    point_id: str | None = None
    kind: str | None = None
    exit_code: int = 0
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job, "result": self.result, "run_id": self.run_id, "point_id": self.point_id,
                "kind": self.kind, "exit_code": self.exit_code, "error": self.error, **self.detail}  # fmt: skip


def _keys(job: Job) -> tuple[Keyring, Passphrase | X25519PublicKey | None]:
    """The keyring a job's chain opens with, and what a new chain of it is encrypted with."""
    pw = read_passphrase_file(job.passphrase_file) if job.passphrase_file else None
    ident = load_identity(job.identity) if job.identity else None
    encrypt: Passphrase | X25519PublicKey | None = None
    if job.encryption == "passphrase":
        encrypt = pw
    elif job.encryption == "recipient":
        assert job.recipient is not None
        encrypt = load_recipient(job.recipient)
    return Keyring(pw, ident), encrypt


def _full_due(job: Job, history: History, now: float) -> bool:
    """Whether `full_every` asks for a new full point: the job's last full run (its history), else the
    age of the chain's current generation in the repository."""
    if job.full_every_s is None:
        return False
    fulls = [r for r in history.runs(job.name, 1000) if r["result"] == "ok" and r["kind"] == "full"]
    if fulls:
        return now - float(fulls[0]["started"]) >= job.full_every_s
    try:
        repo = Repository.open(job.repository)
        with open_source(job.source, job.source_name) as src:
            gen = repo.catalog().find_generation(local_host(job.host).host_id, src.source_id, job.chain)
    except ImagechainError:
        return False  # the backup itself will say what is wrong
    return bool(gen) and now - gen[0].header.created_us / 1e6 >= job.full_every_s


def run_job(job: Job, config: Config, scheduled: float | None = None) -> RunResult:
    with History(config.history) as history:
        run_id = history.start(job.name, scheduled)
        res = RunResult(job.name, "running", run_id)
        try:
            _run(job, history, res)
            res.result = "ok"
        except Stopped as e:
            res.result, res.exit_code = "aborted", e.exit_code
            res.error = f"stopped by {e.name}" + (f" after point {res.point_id[:8]} was published" if res.point_id
                                                  else f"; {e.what}")  # fmt: skip
        except ImagechainError as e:
            res.result, res.exit_code, res.error = "failed", e.exit_code, str(e)
        except Exception as e:  # a bug must still end the run's record, and reach the notification
            res.result, res.exit_code = "failed", 1
            res.error = f"unexpected error: {e!r} ({traceback.extract_tb(e.__traceback__)[-1].name})"
        stats = res.detail.get("backup", {})
        problems = notify.send(job.notify, res.as_dict())
        if problems:
            res.detail["notify_problems"] = problems
        history.finish(run_id, res.result, point_id=res.point_id, kind=res.kind,
                       bytes_read=stats.get("read_bytes"), bytes_changed=stats.get("changed_bytes"),
                       bytes_stored=stats.get("stored_bytes"), exit_code=res.exit_code, error=res.error,
                       detail=res.detail)  # fmt: skip
    return res


def _run(job: Job, history: History, res: RunResult) -> None:
    ring, encrypt = _keys(job)
    full = _full_due(job, history, time.time())
    b = backup(job.source, job.repository, chain=job.chain, full=full, block_size=job.block_size,
               codec=CodecParams.parse(job.compression) if job.compression else None,
               host=local_host(job.host) if job.host else None, source_name=job.source_name,
               allow_mounted=job.allow_mounted, init=job.init, limits=job.limits, encrypt=encrypt, keyring=ring,
               snapshot=job.snapshot)  # fmt: skip
    res.point_id, res.kind = b.point_id, b.kind
    res.detail["backup"] = {"read_bytes": b.read_bytes, "changed_bytes": b.changed_bytes,
                            "stored_bytes": b.stored_bytes, "duration_s": round(b.duration_s, 3),
                            "sequence": b.sequence, "full_because": "full_every" if full else None,
                            "notices": b.notices}  # fmt: skip
    history.note(res.run_id, res.detail)
    repo = Repository.open(job.repository)
    if job.retention is not None:
        cat = repo.catalog()
        gen = cat.generations().get(uuid.UUID(b.chain_id), [])
        p = prune(repo, [gen], job.retention, cat=cat, keyring=ring)
        res.detail["retention"] = {"merged_points": sum(len(m.remove) for m in p.merges), "kept": p.kept,
                                   "freed_bytes": p.freed_bytes, "notices": p.notices}  # fmt: skip
        history.note(res.run_id, res.detail)
    if job.replicate_to:
        r = replicate(repo, Repository.open(job.replicate_to, create=True), chains=(job.chain,))
        res.detail["replication"] = {"to": job.replicate_to, "copied": len(r.copied), "skipped": r.skipped,
                                     "bytes_copied": r.bytes_copied}  # fmt: skip


