#!/usr/bin/env python3
"""Remote repositories: throughput to S3 (moto's server) and SFTP (OpenSSH's sshd) on loopback, bytes an
incremental downloads against the chain's size, and start-up of `list` and `backup` on a fleet repository
of many points on S3, with the catalog cache cold and warm.

    .venv/bin/python bench/remote.py [--size 1024] [--points 10000] [--chains 100] [--skip-scale]

Throughput: a volume of mixed data (--size MiB) backed up full to each store, then 2% of it rewritten
and backed up again (with and without this machine's block-map cache), then restored. Scale: --points
points in --chains chains (one host each, a 1 MiB volume), made locally and uploaded, then listed and
continued from S3. Needs root for sshd; moto[server] from the test extra."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchlib import drop, ic  # noqa: E402

from tests.conftest import write_volume  # noqa: E402
from tests.s3server import MotoServer, client, new_bucket  # noqa: E402

MiB = 1 << 20


def run(*args: object, env: dict[str, str] | None = None) -> tuple[float, dict[str, Any]]:
    t = time.monotonic()
    r = subprocess.run([ic(), *map(str, args)], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    took = time.monotonic() - t
    if r.returncode != 0:
        raise SystemExit(f"{args[0]} failed ({r.returncode}): {r.stderr.strip()}")
    try:
        out = json.loads(r.stdout) if r.stdout.strip().startswith(("{", "[")) else {}
    except json.JSONDecodeError:
        out = {}
    return took, out


def throughput(kind: str, url: str, base: Path, size: int, env: dict[str, str]) -> dict[str, Any]:
    vol = base / f"vol-{kind}.img"
    data = bytearray(write_volume(vol, size, seed=7))
    cache = base / f"cache-{kind}"
    env = {**env, "IMAGECHAIN_CACHE": str(cache / "maps")}
    drop()
    full_s, full = run("backup", vol, url, "--init", "--json", env=env)
    rng = random.Random(2)
    for _ in range(int(size * 0.02) // MiB):
        at = rng.randrange(len(data) - MiB)
        data[at : at + MiB] = os.urandom(MiB)
    vol.write_bytes(data)
    drop()
    inc_s, inc = run("backup", vol, url, "--json", env=env)
    chain = full["stored_bytes"] + inc["stored_bytes"]
    for _ in range(int(size * 0.02) // MiB):
        at = rng.randrange(len(data) - MiB)
        data[at : at + MiB] = os.urandom(MiB)
    vol.write_bytes(data)
    nocache = {**env, "IMAGECHAIN_CACHE": str(base / f"empty-{kind}" / "maps")}
    inc2_s, inc2 = run("backup", vol, url, "--json", env=nocache)
    chain += inc2["stored_bytes"]
    out = base / f"out-{kind}.img"
    drop()
    rest_s, _ = run("restore", f"{url}::default", out, env=env)
    ok = out.read_bytes() == bytes(data)
    out.unlink()
    vol.unlink()
    row = {"store": kind, "volume_mib": size // MiB, "full_s": round(full_s, 2),
           "stored_mib": round(full["stored_bytes"] / MiB, 1),
           "upload_mib_s": round(full["stored_bytes"] / MiB / full_s, 1), "volume_mib_s": round(size / MiB / full_s, 1),
           "incremental_s": round(inc_s, 2), "incremental_downloaded": inc["repository_read_bytes"],
           "incremental_downloaded_pct": round(100 * inc["repository_read_bytes"] / chain, 3),
           "incremental_no_map_cache_s": round(inc2_s, 2), "no_map_cache_downloaded": inc2["repository_read_bytes"],
           "no_map_cache_downloaded_pct": round(100 * inc2["repository_read_bytes"] / chain, 3),
           "chain_mib": round(chain / MiB, 1), "restore_s": round(rest_s, 2),
           "restore_mib_s": round(size / MiB / rest_s, 1), "restored_bit_exact": ok}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def _make_chain(args: tuple[int, int, str]) -> int:
    """One host's chain of n points in a local repository of its own (a process per chain)."""
    i, n, folder = args
    from imagechain.engine.backup import backup
    from imagechain.identity import local_host

    host = local_host(f"pc-{i:05d}")
    vol = Path(folder) / f"vol-{i}.img"
    data = bytearray(os.urandom(MiB))
    repo = Path(folder) / f"repo-{i}"
    for seq in range(n):
        data[(seq * 4096) % MiB : (seq * 4096) % MiB + 100] = os.urandom(100)
        vol.write_bytes(data)
        backup(str(vol), str(repo), host=host, source_name="disk", cache_dir=None, init=True)
    vol.unlink()
    return n


def scale(endpoint: str, base: Path, points: int, chains: int, env: dict[str, str]) -> dict[str, Any]:
    made = base / "fleet-parts"
    made.mkdir()
    per = points // chains
    t = time.monotonic()
    with ProcessPoolExecutor(os.cpu_count() or 2) as pool:
        total = sum(pool.map(_make_chain, [(i, per, str(made)) for i in range(chains)]))
    make_s = time.monotonic() - t
    bucket = new_bucket(endpoint)
    s3 = client(endpoint)
    files = [(f, f.relative_to(made / f.relative_to(made).parts[0]).as_posix()) for f in made.rglob("*.icimg")]
    t = time.monotonic()
    s3.put_object(Bucket=bucket, Key="fleet/imagechain.json", Body=(made / "repo-0" / "imagechain.json").read_bytes())
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda fr: s3.upload_file(str(fr[0]), bucket, f"fleet/{fr[1]}"), files))
    upload_s = time.monotonic() - t
    url = f"s3://{bucket}/fleet"
    catalog = base / "catalog"
    e = {**env, "IMAGECHAIN_CATALOG_CACHE": str(catalog), "IMAGECHAIN_CACHE": str(base / "fleet-cache" / "maps")}
    cold_list, listed = run("list", url, "--json", env=e)
    warm_list, _ = run("list", url, "--json", env=e)
    shutil.rmtree(catalog)
    vol = base / "one.img"
    vol.write_bytes(os.urandom(MiB))
    cold_backup, b1 = run("backup", vol, url, "--source-name", "newcomer", "--json", env=e)
    warm_backup, b2 = run("backup", vol, url, "--source-name", "newcomer", "--json", env=e)
    local = base / "fleet-local"
    local.mkdir()
    (local / "imagechain.json").write_bytes((made / "repo-0" / "imagechain.json").read_bytes())
    for f, rel in files:
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(f, local / rel)
    local_list, _ = run("list", local, "--json", env=e)
    row = {"points": total, "files": len(files), "chains": chains, "make_s": round(make_s, 1),
           "upload_s": round(upload_s, 1), "listed_points": sum(len(c) for c in listed["chains"]),
           "list_cold_s": round(cold_list, 2), "list_warm_s": round(warm_list, 2),
           "backup_full_cold_catalog_s": round(cold_backup, 2),
           "backup_incremental_warm_catalog_s": round(warm_backup, 2),
           "backup_incremental_downloaded": b2["repository_read_bytes"], "list_local_folder_s": round(local_list, 2),
           "catalog_cache_bytes": sum(f.stat().st_size for f in catalog.rglob("*") if f.is_file())}  # fmt: skip
    assert b1["kind"] == "full" and b2["kind"] == "incremental"
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="MiB of the throughput volume")
    ap.add_argument("--points", type=int, default=10000)
    ap.add_argument("--chains", type=int, default=100)
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-sftp", action="store_true")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="imagechain-remote-", dir="/var/tmp") as d:
        base = Path(d)
        server = MotoServer()
        server.start()
        try:
            env = {**os.environ, "AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_CONFIG_FILE": str(base / "none"),
                   "AWS_SHARED_CREDENTIALS_FILE": str(base / "none")}  # fmt: skip
            os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
            rows = [throughput("local", str(base / "local-repo"), base, args.size * MiB, env)]
            rows.append(throughput("s3", f"s3://{new_bucket(server.endpoint)}/repo", base, args.size * MiB, env))
            if not args.skip_sftp and os.geteuid() == 0:
                from tests.sshd import SshServer

                srv = SshServer.create()
                srv.start()
                try:
                    rows.append(throughput("sftp", srv.url("bench-repo"), base, args.size * MiB,
                                           {**env, "IMAGECHAIN_SSH_CONFIG": str(srv.config)}))  # fmt: skip
                finally:
                    srv.stop()
                    srv.cleanup()
            results["throughput"] = rows
            if not args.skip_scale:
                results["scale"] = scale(server.endpoint, base, args.points, args.chains, env)
        finally:
            server.stop()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
