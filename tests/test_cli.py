"""The command line as a user runs it: the installed console script in a subprocess, its text and JSON
output, every way of addressing a point, and bit-exact restores."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import imagechain

from .conftest import exe, write_volume

BS = 64 << 10
COMMANDS = ("backup", "list", "info", "restore", "verify", "break-lock")



def ic(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe(), *map(str, args)], capture_output=True, text=True, env=dict(os.environ),
                          timeout=120)  # fmt: skip


def ok(*args: object) -> str:
    p = ic(*args)
    assert p.returncode == 0, f"imagechain {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr
    return p.stdout


def js(*args: object) -> Any:
    return json.loads(ok(*args, "--json"))


def differing_blocks(a: bytes, b: bytes) -> int:
    return sum(a[i : i + BS] != b[i : i + BS] for i in range(0, max(len(a), len(b)), BS))


def edit(data: bytes, blocks: list[int], seed: int) -> bytes:
    out = bytearray(data)
    rnd = random.Random(seed)
    for b in blocks:
        out[b * BS + 100 : b * BS + 300] = rnd.randbytes(200)
    return bytes(out)


def test_backup_list_info_verify_restore(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    v0 = write_volume(vol, 3 << 20, seed=21)
    full = js("backup", vol, repo)
    assert (full["kind"], full["sequence"], full["chain"], full["source"]) == ("full", 0, "default", "vol.img")
    assert full["volume_size"] == len(v0) and full["block_size"] == BS
    # random data is no filesystem: every block is read, and the backup says why
    assert full["notices"] == ["volume: no filesystem recognised; every block of it is read"]
    assert full["used_map"] == "all blocks (no filesystem recognised)" and full["unused_blocks"] == 0
    assert all((repo / f).is_file() for f in full["files"])
    assert full["file_bytes"] == sum((repo / f).stat().st_size for f in full["files"])

    v1 = edit(v0, [2, 9, 30], seed=1)
    vol.write_bytes(v1)
    incr = js("backup", vol, repo)
    assert (incr["kind"], incr["sequence"], incr["chain_id"]) == ("incremental", 1, full["chain_id"])
    assert incr["changed_blocks"] == 3 and incr["changed_bytes"] == 3 * BS

    v2 = edit(v1, [0, 9, 47], seed=2)
    vol.write_bytes(v2)
    text = ok("backup", vol, repo)  # the human summary line
    m = re.fullmatch(r"incremental point ([0-9a-f]{8}) \(#2 of chain 'default'\): .*changed .* \(3 blocks\).*\n",
                     text)  # fmt: skip
    assert m, text

    # list: text and JSON
    listing = js("list", repo)
    assert listing["incomplete"] == [] and listing["leftovers"] == []
    [points] = listing["chains"]
    assert [p["sequence"] for p in points] == [0, 1, 2]
    assert [p["kind"] for p in points] == ["full", "incremental", "incremental"]
    assert points[0]["point_id"] == full["point_id"] and points[1]["point_id"] == incr["point_id"]
    assert points[2]["point_id"].startswith(m.group(1))
    assert points[0]["files"] == full["files"] and all(p["volume_size"] == len(v0) for p in points)
    ids = [p["point_id"] for p in points]
    table = ok("list", repo)
    assert "vol.img" in table and "default" in table
    assert all(i[:8] in table for i in ids), table
    assert full["chain_id"][:8] in table

    # info: digests and the parent link
    infos = [js("info", f"{repo}::{i}") for i in ids]
    assert [x["point_id"] for x in infos] == ids
    assert infos[0]["state_digest"] == full["state_digest"] and infos[1]["state_digest"] == incr["state_digest"]
    assert infos[0]["parent_id"] is None and infos[0]["parent_state_digest"] is None
    for parent, child in itertools.pairwise(infos):
        assert child["parent_id"] == parent["point_id"]
        assert child["parent_state_digest"] == parent["state_digest"]
        assert child["parent_file"] == parent["files"][0]
    assert len({x["state_digest"] for x in infos}) == 3
    assert infos[2]["summary"]["changed_blocks"] == 3 and infos[2]["block_size"] == BS
    assert "state_digest" in ok("info", f"{repo}::{ids[1]}")

    # verify: the repository, and one point
    out = ok("verify", repo)
    assert "3 point(s) checked, 0 problem(s)" in out and all(p["files"][0] in out for p in points)
    assert js("verify", repo)["ok"] is True
    assert "1 point(s) checked, 0 problem(s)" in ok("verify", f"{repo}::default@0")

    # restore, then restore --delta over it
    target = tmp_path / "restored.img"
    ok("restore", f"{repo}::default@0", target)
    assert target.read_bytes() == v0
    delta = js("restore", f"{repo}::default", target, "--delta")
    assert target.read_bytes() == v2
    assert delta["written_blocks"] == differing_blocks(v0, v2) == 5 and delta["delta"] is True
    again = js("restore", f"{repo}::default", target, "--delta")
    assert again["written_blocks"] == 0 and target.read_bytes() == v2
    forced = tmp_path / "forced.img"
    forced.write_bytes(b"old" * 5000 + bytes(len(v0)))  # longer than the volume: cut to its size
    ok("restore", f"{repo}::default@1", forced, "--force")
    assert forced.read_bytes() == v1


def test_addressing_points(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    volumes = [write_volume(vol, 2 << 20, seed=31)]
    results = [js("backup", vol, repo)]
    for k in (1, 2):
        volumes.append(edit(volumes[-1], [k, 10 + k], seed=k))
        vol.write_bytes(volumes[-1])
        results.append(js("backup", vol, repo))
    ids = [r["point_id"] for r in results]

    def picks(address: object) -> int:
        return ids.index(js("info", address)["point_id"])

    host = results[0]["host"]
    cases = {
        f"{repo}::default": 2, f"{repo}::default@latest": 2, f"{repo}::default@-1": 1, f"{repo}::default@-2": 0,
        f"{repo}::default@0": 0, f"{repo}::default@1": 1, f"{repo}::default@full": 0,
        f"{repo}::vol.img/default@-1": 1, f"{repo}::{host}/vol.img/default@1": 1, f"{repo}::DEFAULT@0": 0,
        f"{repo}::{ids[1][:8]}": 1, f"{repo}::{ids[0][:4]}": 0, f"{repo}::{ids[2]}": 2,
        f"{repo}::{results[0]['chain_id'][:8]}@-1": 1, str(repo): 2,
        repo / results[1]["files"][0]: 1,
    }  # fmt: skip
    for address, want in cases.items():
        assert picks(address) == want, address
    # a date: the newest point made on or before that day; a date before the first backup is no point
    today = datetime.now().astimezone().date().isoformat()
    assert picks(f"{repo}::default@{today}") == 2
    p = ic("info", f"{repo}::default@2000-01-01")
    assert p.returncode == 5 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "2000-01-01" in p.stderr
    # a time to the second, minute or hour includes all of it: a time copied from `info` selects that point
    # (or a later one made within the same second)
    created = [datetime.fromisoformat(js("info", f"{repo}::{i}")["created"]) for i in ids]
    local, utc = created[1], created[1].astimezone(UTC)
    for selector, unit in ((local.isoformat(timespec="seconds"), "seconds"),
                           (local.strftime("%Y-%m-%dT%H:%M:%S"), "seconds"),
                           (utc.strftime("%Y-%m-%dT%H:%M:%SZ"), "seconds"),
                           (utc.strftime("%Y-%m-%dT%H:%MZ"), "minutes"),
                           (local.strftime("%Y-%m-%dT%H:%M"), "minutes"),
                           (local.strftime("%Y-%m-%dT%H"), "hours")):  # fmt: skip
        keep = {"seconds": {"microsecond": 0}, "minutes": {"second": 0, "microsecond": 0},
                "hours": {"minute": 0, "second": 0, "microsecond": 0}}[unit]  # fmt: skip
        want = max(i for i, c in enumerate(created) if c.replace(**keep) <= local.replace(**keep))
        assert picks(f"{repo}::default@{selector}") == want, selector

    # the same addresses restore bit-exact
    target = tmp_path / "out.img"
    for address, want in ((f"{repo}::default@-1", 1), (f"{repo}::{ids[0][:6]}", 0),
                          (repo / results[2]["files"][0], 2), (f"{repo}::default@full", 0)):  # fmt: skip
        ok("restore", address, target)
        assert target.read_bytes() == volumes[want], address
        target.unlink()


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None) -> None:
    out = ok(*([command] if command else []), "--help")
    assert out.startswith("Usage: imagechain") and (command or "COMMAND") in out
    if command is None:
        assert all(c in out for c in COMMANDS)


def test_version() -> None:
    out = ok("--version")
    assert out.strip() == f"imagechain, version {imagechain.__version__}"


def test_names_a_terminal_cannot_show_are_escaped(tmp_path: Path, repo: Path) -> None:
    """Under a locale whose encoding lacks a chain's characters (日本 on Latin-1), `list` died with a
    UnicodeEncodeError traceback; the names come out escaped, as on stderr."""
    vol = tmp_path / "vol.img"
    write_volume(vol, 1 << 20, seed=51)
    ok("backup", vol, repo, "--chain", "日本")
    env = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    for args in (["list", repo], ["info", f"{repo}::日本"], ["backup", vol, repo, "--chain", "日本"]):
        p = subprocess.run([exe(), *map(str, args)], capture_output=True, env=env, check=False)
        assert p.returncode == 0 and b"Traceback" not in p.stderr, (args, p.stderr)
    listed = subprocess.run([exe(), "list", str(repo)], capture_output=True, env=env, check=True).stdout
    assert b"\\u65e5\\u672c" in listed
