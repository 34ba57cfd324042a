"""Point addresses that are pleasant to type (docs/CLI.md#addressing-points):

  REPO::[[HOST/]SOURCE/]CHAIN[@SEL]   a chain's point; SEL: latest (default), -N, N (sequence), full,
                                      or a time 2026-11-24[T19:00[:00]][Z] (newest point at or before)
  REPO::POINTID                       a point-id prefix (at least 4 hex digits)
  PATH/TO/FILE.icimg                  any segment file of a point
Components match the verbatim name, the folder name, or an id prefix."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from .chain import Catalog
from .errors import AmbiguousPointError, PointNotFoundError, UsageError
from .format.reader import PointFiles
from .names import component
from .repository import Repository, chain_key, find_root


@dataclass
class Resolved:
    repo: Repository
    catalog: Catalog
    point: PointFiles


def split_address(address: str) -> tuple[str, str | None]:
    if "::" in address:
        repo, spec_ = address.split("::", 1)
        return repo, spec_
    return address, None


def open_point(address: str) -> Resolved:
    repo_path, spec_ = split_address(address)
    if spec_ is None:
        if os.path.isfile(address):
            return _by_file(address)
        if os.path.isdir(address):
            spec_ = ""
        else:
            raise PointNotFoundError(f"no such point, image file or repository: {address}")
    repo = Repository.open(repo_path)
    cat = repo.catalog()
    return Resolved(repo, cat, select(cat, spec_, repo_path))


def _by_file(path: str) -> Resolved:
    root = find_root(path)
    repo = Repository.open(root)
    cat = repo.catalog()
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/")
    pid = cat.by_file.get(rel)
    if pid is None:
        raise PointNotFoundError(f"not an imagechain image file: {path}")
    if pid not in cat.points:
        why = next((w for files, w in cat.problems if rel in files), "incomplete")
        raise PointNotFoundError(f"{path} is not a usable point: {why}")
    return Resolved(repo, cat, cat.points[pid])


def _matches(value: str, name: str, ident: bytes, folder: str) -> bool:
    v = value.casefold()
    return v in (name.casefold(), folder.casefold()) or (len(v) >= 4 and ident.hex().startswith(v))


def select(cat: Catalog, spec_: str, repo_display: str) -> PointFiles:
    path, _, sel = spec_.partition("@")
    path = path.strip("/")
    if re.fullmatch(r"[0-9a-fA-F-]{4,36}", path) and not sel:
        hits = [p for p in cat.points.values() if p.point_id.hex.startswith(path.replace("-", "").lower())]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise AmbiguousPointError(f"point id prefix {path!r} matches {len(hits)} points; give more digits")
    parts = path.split("/") if path else []
    if len(parts) > 3:
        raise UsageError(f"address {spec_!r} has more than HOST/SOURCE/CHAIN")
    host_q, source_q, chain_q = [None] * (3 - len(parts)) + parts
    chains: dict[tuple[bytes, bytes, str], list[PointFiles]] = {}
    for pts in cat.chains().values():
        h = pts[-1].header
        meta = h.metadata
        hn, sn, cn = str(meta.get("host", "")), str(meta.get("source", "")), str(meta.get("chain", ""))
        if host_q and not _matches(host_q, hn, h.host_id, component(hn, h.host_id.hex()[:8])):
            continue
        if source_q and not _matches(source_q, sn, h.source_id, component(sn, h.source_id.hex()[:8])):
            continue
        if chain_q and not (_matches(chain_q, cn, bytes.fromhex(chain_key(cn)), component(cn, chain_key(cn)))
                            or (len(chain_q) >= 4 and h.chain_id.hex.startswith(chain_q.lower()))):  # fmt: skip
            continue
        key = (h.host_id, h.source_id, cn)
        if chain_q and len(chain_q) >= 4 and h.chain_id.hex.startswith(chain_q.lower()):
            key = (h.host_id, h.source_id, h.chain_id.hex)  # a specific generation
        best = chains.get(key)
        if best is None or max(p.header.created_us for p in pts) > max(p.header.created_us for p in best):
            chains[key] = pts
    if not chains:
        raise PointNotFoundError(f"no chain matches {spec_!r} in {repo_display} (see: imagechain list)")
    if len(chains) > 1:
        names = sorted("/".join(str(p[-1].header.metadata.get(k)) for k in ("host", "source", "chain"))
                       for p in chains.values())  # fmt: skip
        raise AmbiguousPointError(f"{spec_ or 'the address'} matches {len(chains)} chains: {', '.join(names)}")
    pts = next(iter(chains.values()))
    return _pick(pts, sel or "latest", spec_)


def _pick(pts: list[PointFiles], sel: str, spec_: str) -> PointFiles:
    s = sel.strip().lower()
    if s == "latest":
        return pts[-1]
    if s == "full":
        return pts[0]
    if re.fullmatch(r"-\d+", s):
        back = int(s[1:])
        if back >= len(pts):
            raise PointNotFoundError(f"{spec_}: the chain has only {len(pts)} points")
        return pts[-1 - back]
    if re.fullmatch(r"\d+", s):
        for p in pts:
            if p.header.sequence == int(s):
                return p
        raise PointNotFoundError(f"{spec_}: no point with sequence number {s}")
    try:
        text = sel.strip()
        when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError as e:
        raise UsageError(f"bad point selector {sel!r} (latest, -N, N, full, or a date/time)") from e
    if when.tzinfo is None:
        when = when.astimezone()  # local time, as the user reads their clock
    if len(sel.strip()) == 10:  # a bare date means the end of that day
        when = when.replace(hour=23, minute=59, second=59, microsecond=999999)
    limit = int(when.astimezone(UTC).timestamp() * 1e6)
    # a time given to the hour, minute or second includes that whole hour, minute or second (with or
    # without a zone suffix), so a time copied from `info` or `list` selects the point shown there
    body = re.sub(r"(?:[Zz]|[+-]\d\d(?::?\d\d)?)$", "", text) if len(text) > 10 else text
    limit += {13: 3_599_999_999, 16: 59_999_999, 19: 999_999}.get(len(body), 0)
    before = [p for p in pts if p.header.created_us <= limit]
    if not before:
        raise PointNotFoundError(f"{spec_}: no point at or before {sel}")
    return before[-1]
