"""`imagechain agent` and `imagechain jobs list|run|history` (docs/JOBS.md)."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Any

import click

from ..sizes import human

CONFIG_HELP = "The job file (default /etc/imagechain/jobs.toml, or IMAGECHAIN_JOBS)."


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).astimezone().isoformat(timespec="minutes")


def register(main: click.Group) -> None:
    from ..cli import handle_errors

    @main.command()
    @click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
    @handle_errors
    def agent(config_path: str | None) -> None:
        """Run every job of the job file on its schedule, until SIGTERM; SIGHUP reloads the file."""
        from .agent import Agent

        sys.exit(Agent(config_path).run_forever())

    @main.group()
    def jobs() -> None:
        """The jobs of the job file: list them, run one now, show what runs did."""

    @jobs.command(name="list")
    @click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
    @click.option("--json", "as_json", is_flag=True)
    @handle_errors
    def list_(config_path: str | None, as_json: bool) -> None:
        """Each job: its schedule, its next run and how its last run went."""
        from .agent import next_slot
        from .config import load
        from .history import History

        config = load(config_path)
        now = time.time()
        rows: list[dict[str, Any]] = []
        with History(config.history) as h:
            for job in config.jobs.values():
                last = h.last(job.name)
                rows.append({"job": job.name, "schedule": job.schedule.text, "cron": job.schedule.cron,
                             "enabled": job.enabled, "next_run": next_slot(job, h, now) if job.enabled else None,
                             "source": job.source, "repository": job.repository, "chain": job.chain,
                             "last_result": last["result"] if last else None,
                             "last_started": last["started"] if last else None,
                             "last_error": last["error"] if last else None})  # fmt: skip
        if as_json:
            click.echo(json.dumps(rows, indent=1))
            return
        for r in rows:
            due = "disabled" if not r["enabled"] else ("now (missed)" if r["next_run"] <= now else _when(r["next_run"]))
            ran = f"{r['last_result']} at {_when(r['last_started'])}" if r["last_result"] else "never run"
            click.echo(f"{r['job']}: {r['schedule']} ({r['cron']}); next {due}; last {ran}; "
                       f"{r['source']} -> {r['repository']} chain {r['chain']}")  # fmt: skip
            if r["last_error"]:
                click.echo(f"  {r['last_error']}")

    @jobs.command()
    @click.argument("name")
    @click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
    @click.option("--slot", type=float, hidden=True, help="The schedule slot this run is for (the agent).")
    @click.option("--json", "as_json", is_flag=True)
    @handle_errors
    def run(name: str, config_path: str | None, slot: float | None, as_json: bool) -> None:
        """Run job NAME now (recorded in the history like a scheduled run); exits as its backup would."""
        from ..errors import UsageError
        from .config import load
        from .runner import run_job

        config = load(config_path)
        job = config.jobs.get(name)
        if job is None:
            raise UsageError(f"no job {name!r} in {config.path} (jobs: {', '.join(config.jobs) or 'none'})")
        res = run_job(job, config, slot)
        if as_json:
            click.echo(json.dumps(res.as_dict(), indent=1))
        elif res.result == "ok":
            b = res.detail.get("backup", {})
            click.echo(f"job {name}: {res.kind} point {str(res.point_id)[:8]}, changed "
                       f"{human(b.get('changed_bytes', 0))}, stored {human(b.get('stored_bytes', 0))}")  # fmt: skip
        else:
            click.echo(f"imagechain: error: job {name} {res.result}: {res.error}", err=True)
        for p in res.detail.get("notify_problems", []):
            click.echo(f"notice: {p}", err=True)
        sys.exit(res.exit_code)

    @jobs.command()
    @click.argument("name", required=False)
    @click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
    @click.option("--limit", type=click.IntRange(1, 1_000_000), default=20, show_default=True)
    @click.option("--json", "as_json", is_flag=True)
    @handle_errors
    def history(name: str | None, config_path: str | None, limit: int, as_json: bool) -> None:
        """What the last runs (of job NAME, or of every job) did, newest first."""
        from .config import load
        from .history import History

        config = load(config_path)
        with History(config.history) as h:
            rows = h.runs(name, limit)
        if as_json:
            click.echo(json.dumps(rows, indent=1))
            return
        for r in rows:
            size = f", read {human(r['bytes_read'] or 0)}, changed {human(r['bytes_changed'] or 0)}, stored " \
                   f"{human(r['bytes_stored'] or 0)}" if r["bytes_read"] is not None else ""  # fmt: skip
            took = f", {r['duration_s']:.1f} s" if r["duration_s"] is not None else ""
            why = f" ({r['error']})" if r["error"] else ""
            click.echo(f"{_when(r['started'])} {r['job']}: {r['result']}{took}{size}{why}")
