"""Telling someone how a job went: a command (the result as JSON on stdin, the essentials in IMAGECHAIN_*
variables) and a webhook (an HTTP POST of the same JSON). Failures always notify; successes when asked.
A notification that fails is recorded with the run, never turned into the run's failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from typing import Any

from .config import Notify


def send(notify: Notify, result: dict[str, Any]) -> list[str]:
    """Problems met while notifying (empty: every configured channel took it)."""
    if result.get("result") == "ok" and not notify.on_success:
        return []
    body = json.dumps(result, indent=1).encode()
    problems = []
    if notify.command:
        problems += _command(notify, result, body)
    if notify.webhook:
        problems += _webhook(notify, body)
    return problems


def _command(notify: Notify, result: dict[str, Any], body: bytes) -> list[str]:
    assert notify.command is not None
    env = {**os.environ, "IMAGECHAIN_JOB": str(result.get("job", "")), "IMAGECHAIN_RESULT": str(result["result"]),
           "IMAGECHAIN_ERROR": str(result.get("error") or ""), "IMAGECHAIN_POINT": str(result.get("point_id") or "")}
    try:
        p = subprocess.Popen(["/bin/sh", "-c", notify.command], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=env, start_new_session=True)  # fmt: skip
    except OSError as e:
        return [f"notify command could not start: {e.strerror}"]
    try:
        _out, err = p.communicate(body, timeout=notify.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return [f"notify command did not finish within {notify.timeout_s:g} s (killed)"]
    if p.returncode != 0:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return [f"notify command exited with {p.returncode}: {last[0]}".rstrip(": ")]
    return []


def _webhook(notify: Notify, body: bytes) -> list[str]:
    assert notify.webhook is not None
    req = urllib.request.Request(notify.webhook, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "imagechain"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=notify.timeout_s) as r:
            r.read()
    except urllib.error.HTTPError as e:
        return [f"webhook {notify.webhook} answered {e.code} {e.reason}"]
    except (urllib.error.URLError, OSError, ValueError) as e:
        why = getattr(e, "reason", None) or e
        return [f"webhook {notify.webhook} not reached: {why}"]
    return []
