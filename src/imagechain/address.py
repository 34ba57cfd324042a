"""Point addresses that are pleasant to type (docs/CLI.md#addressing-points):

  REPO::[[HOST/]SOURCE/]CHAIN[@SEL]   a chain's point; SEL: latest (default), -N, N (sequence), full,
                                      or a time 2026-11-24[T19:00[:00]][Z] (newest point at or before)
  REPO::POINTID[@SEL]                 a point-id prefix (at least 4 hex digits); SEL walks its lineage
  PATH/TO/FILE.icimg                  any segment file of a point
Components match the verbatim name, the folder name, or an id prefix."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .chain import Catalog, newest_generation
from .errors import AmbiguousPointError, IntegrityError, PointNotFoundError, RepositoryError, UsageError
from .format.reader import PointFiles
from .names import component
from .repository import EXTENSION, MARKER, Repository, chain_key, find_root
from .stores import is_remote, open_store, parent_location


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


def open_point(address: str, salvage: bool = False) -> Resolved:
    repo_path, spec_ = split_address(address)
    if spec_ is None and is_remote(address):
        if address.endswith(EXTENSION):
            return _by_remote_file(address, salvage)
        spec_ = ""
    if spec_ is None:
        try:
            st = os.stat(address)
        except FileNotFoundError:
            raise PointNotFoundError(f"no such point, image file or repository: {address}") from None
        except OSError as e:  # a disk that went away: say so, not "no such point"
            raise RepositoryError(f"cannot read {address}: {e.strerror or e}") from e
        if stat.S_ISREG(st.st_mode):
            return _by_file(address, salvage)
        if not stat.S_ISDIR(st.st_mode):
            raise PointNotFoundError(f"no such point, image file or repository: {address}")
        spec_ = ""
    repo = Repository.open(repo_path)
    cat = repo.catalog()
    if salvage:
        cat = cat.with_salvaged()
    return Resolved(repo, cat, select(cat, spec_, repo_path))


def _by_remote_file(url: str, salvage: bool) -> Resolved:
    """An image file named by URL: its repository is the nearest folder upwards with the marker."""
    folder, name = parent_location(url)
    rel = [name]
    probe = folder
    while True:
        store = open_store(probe)
        if store.exists(MARKER):
            return _in(Repository(store, probe), "/".join(reversed(rel)), url, salvage)
        up, last = parent_location(probe)
        if up == probe or "://" not in up or up.endswith(":/"):
            store = open_store(folder)
            return _in(Repository(store, folder), name, url, salvage)
        rel.append(last)
        probe = up


def _by_file(path: str, salvage: bool = False) -> Resolved:
    root = find_root(path)
    repo = Repository.open(root) if os.path.isfile(os.path.join(root, MARKER)) else Repository.around(root)
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/")
    return _in(repo, rel, path, salvage)


def _in(repo: Repository, rel: str, path: str, salvage: bool) -> Resolved:
    """The point a file (rel, relative to repo) belongs to."""
    cat = repo.catalog()
    if salvage:
        cat = cat.with_salvaged()
    pid = cat.by_file.get(rel)
    if pid is None:
        raise PointNotFoundError(f"not an imagechain image file: {path}")
    if pid in cat.damaged:
        raise IntegrityError(f"{path} belongs to a damaged point: {cat.damaged[pid][1]}")
    if pid not in cat.points:
        why = next((w for files, w in cat.problems if rel in files), "incomplete")
        raise PointNotFoundError(f"{path} is not a usable point: {why}")
    return Resolved(repo, cat, cat.points[pid])


def _matches(value: str, name: str, ident: bytes, folder: str) -> bool:
    v = value.casefold()
    return v in (name.casefold(), folder.casefold()) or (len(v) >= 4 and ident.hex().startswith(v))


def _id_hits(cat: Catalog, path: str) -> tuple[list[PointFiles], list[str]]:
    """Points (and damaged points) whose id starts with path, when path can be an id prefix."""
    if not re.fullmatch(r"[0-9a-fA-F-]{4,36}", path):
        return [], []
    q = path.replace("-", "").lower()
    hits = [p for p in cat.points.values() if p.point_id.hex.startswith(q)]
    damaged = [why for pid, (_f, why) in cat.damaged.items() if pid.hex.startswith(q)]
    return hits, damaged


def _chain_hits(cat: Catalog, path: str) -> dict[tuple[bytes, bytes, str], list[PointFiles]]:
    """The generation each matching named chain continues (or the generation named by a chain-id prefix)."""
    parts = path.split("/") if path else []
    if len(parts) > 3:
        raise UsageError(f"address {path!r} has more than HOST/SOURCE/CHAIN")
    given: list[str | None] = [p or None for p in parts]  # HOST//CHAIN: any source
    host_q, source_q, chain_q = [None] * (3 - len(given)) + given
    out: dict[tuple[bytes, bytes, str], list[PointFiles]] = {}
    for (host_id, source_id, cn), gens in cat.named_chains().items():
        meta = gens[0][0].header.metadata
        hn, sn = str(meta.get("host", "")), str(meta.get("source", ""))
        if host_q and not _matches(host_q, hn, host_id, component(hn, host_id.hex()[:8])):
            continue
        if source_q and not _matches(source_q, sn, source_id, component(sn, source_id.hex()[:8])):
            continue
        if chain_q and len(chain_q) >= 4:
            for pts in gens:  # a specific generation, by chain id prefix
                if pts[0].header.chain_id.hex.startswith(chain_q.lower()):
                    out[(host_id, source_id, pts[0].header.chain_id.hex)] = pts
        if chain_q and not _matches(chain_q, cn, bytes.fromhex(chain_key(cn)), component(cn, chain_key(cn))):
            continue
        out[(host_id, source_id, cn)] = newest_generation(gens)
    return out


def _label(pts: list[PointFiles]) -> str:
    return "/".join(str(pts[-1].header.metadata.get(k)) for k in ("host", "source", "chain"))


def select(cat: Catalog, spec_: str, repo_display: str) -> PointFiles:
    """The point an address names; every selector walks one lineage (docs/CLI.md#addressing-points)."""
    path, _, sel = spec_.partition("@")
    path = path.strip("/")
    hits, damaged = _id_hits(cat, path)
    chains = _chain_hits(cat, path)
    if not chains and path.count("/") == 1:  # HOST/CHAIN, when no SOURCE/CHAIN matches
        chains = _chain_hits(cat, path.replace("/", "//"))
    if (hits or damaged) and chains:
        raise AmbiguousPointError(
            f"{path!r} is both a point id prefix ({', '.join(str(p.point_id)[:8] for p in hits) or 'a damaged point'}) "
            f"and a chain ({', '.join(sorted(_label(p) for p in chains.values()))}); "
            f"give more id digits or HOST/SOURCE/CHAIN"
        )
    if len(hits) + len(damaged) > 1:
        raise AmbiguousPointError(f"point id prefix {path!r} matches {len(hits) + len(damaged)} points; "
                                  f"give more digits")  # fmt: skip
    if damaged:
        raise IntegrityError(damaged[0])
    if hits:
        return _pick(cat, hits[0], sel or "latest", spec_)
    if not chains:
        raise PointNotFoundError(f"no chain matches {spec_!r} in {repo_display} (see: imagechain list)")
    if len(chains) > 1:
        names = sorted(_label(p) for p in chains.values())
        raise AmbiguousPointError(f"{spec_ or 'the address'} matches {len(chains)} chains: {', '.join(names)}")
    pts = next(iter(chains.values()))
    found: dict[str, PointFiles] = {}
    errors: list[str] = []
    for tip in cat.tips(pts):
        try:
            p = _pick(cat, tip, sel or "latest", spec_, by_chain=True)
            found[p.point_id.hex] = p
        except PointNotFoundError as e:
            errors.append(str(e))
    if not found:
        raise PointNotFoundError(errors[0])
    if len(found) > 1:
        listed = "; ".join(f"{str(p.point_id)[:8]} (#{p.header.sequence}, {p.name})"
                           for p in sorted(found.values(), key=lambda p: p.name))  # fmt: skip
        raise AmbiguousPointError(
            f"{spec_ or 'the address'}: the chain has forked and the address names a different point on each "
            f"branch: {listed}; address one by its point id (REPO::ID, or REPO::TIPID@SEL along one branch)"
        )
    return next(iter(found.values()))


def _pick(cat: Catalog, tip: PointFiles, sel: str, spec_: str, by_chain: bool = False) -> PointFiles:
    """Evaluate a selector along the lineage that ends at tip. With by_chain (the address named a chain,
    not a point), selectors counted from the newest point refuse to count from an older one when the
    newest file is damaged: restoring an older point must never happen silently."""
    s = sel.strip().lower()
    if by_chain and (s == "latest" or re.fullmatch(r"-\d+", s)):
        bad = cat.damaged_after(tip)
        if bad:
            name, why = bad[0]
            raise IntegrityError(
                f"{spec_ or 'the chain'}: its newest point, {name}, is damaged ({why}); the last sound point "
                f"is {str(tip.point_id)[:8]}: restore it by its id (REPO::{str(tip.point_id)[:8]}) if that "
                f"is what you want"
            )
    if s == "latest":
        return tip
    pts = cat.ancestry(tip)
    if s == "full":
        if pts[0].header.parent_id is not None:
            raise PointNotFoundError(f"{spec_}: the lineage of {str(tip.point_id)[:8]} is broken before its full point")
        return pts[0]
    if re.fullmatch(r"-\d+", s):
        back = int(s[1:])
        if back >= len(pts):
            raise PointNotFoundError(f"{spec_}: the lineage of {str(tip.point_id)[:8]} has only {len(pts)} points")
        return pts[-1 - back]
    if re.fullmatch(r"\d+", s):
        for p in pts:
            if p.header.sequence == int(s):
                return p
        raise PointNotFoundError(f"{spec_}: no point with sequence number {s}")
    limit = _time_limit(sel)
    before = [p for p in pts if p.header.created_us <= limit]
    if not before:
        raise PointNotFoundError(f"{spec_}: no point at or before {sel}")
    return before[-1]


def _time_limit(sel: str) -> int:
    """The last microsecond a time selector includes. A trailing Z means UTC, an offset means that zone,
    neither means local time; a date, hour, minute or second includes all of it, so a time copied from
    `info` or `list` selects the point shown there. A local date is a day of the wall clock, 23 or 25 hours
    long when the clocks change; a local time the clock passed twice includes its second pass."""
    text = sel.strip()
    utc = text.endswith(("Z", "z"))
    body = text[:-1] if utc else text
    m = re.fullmatch(r"(.*?)([+-]\d\d(?::?\d\d)?)?", body) if len(body) > 10 else None
    bare = m.group(1) if m else body
    try:
        when = datetime.fromisoformat(body)
    except ValueError as e:
        raise UsageError(f"bad point selector {sel!r} (latest, full, -N, N, or a date/time)") from e
    if utc:
        if when.tzinfo is not None:
            raise UsageError(f"bad point selector {sel!r}: a zone offset and Z")
        when = when.replace(tzinfo=UTC)
    # the first moment past what the selector names, by the clock it is written in
    try:
        end = when + _SPANS.get(len(bare), timedelta(microseconds=1))
        if end.tzinfo is None:  # local: the later of two passes (a time in a gap keeps the first reading)
            end = max(end.replace(fold=0).astimezone(), end.replace(fold=1).astimezone())
    except (OverflowError, ValueError):  # past 9999-12-31 or before 0001-01-01, by the span or the zone
        return _LAST_US if when.year == datetime.max.year else -1
    return (end - _EPOCH) // timedelta(microseconds=1) - 1


_SPANS = {10: timedelta(days=1), 13: timedelta(hours=1), 16: timedelta(minutes=1), 19: timedelta(seconds=1)}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LAST_US = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)
