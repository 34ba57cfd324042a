"""A reader written from docs/FORMAT.md alone (no imagechain module is used to read): it finds a point's
segments by their headers, parses header, footer, frame directory and index by the documented offsets,
opens an encrypted point's key slot with the passphrase, follows the parent links, checks every digest
and the state digest, and rebuilds the volume. It must agree with the volume backed up, for plain and
encrypted chains with zero and unused blocks."""

from __future__ import annotations

import base64
import json
import os
import random
import struct
import subprocess
import uuid
from pathlib import Path

import blake3
import lz4.block
import numpy as np
import pytest
import zstandard
from argon2.low_level import Type, hash_secret_raw
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .conftest import need_tool


def derive(context: str, material: bytes) -> bytes:
    return blake3.blake3(material, derive_key_context=context).digest()


class SpecReader:
    """Everything below follows FORMAT.md: sections 2 (segments), 3 (header), 5 (index, frame directory),
    7 (footer), 8 (maps, state digest), 11 (encryption)."""

    def __init__(self, folder: Path, passphrase: bytes | None = None) -> None:
        self.passphrase = passphrase
        self.segments: dict[uuid.UUID, dict[int, bytes]] = {}
        for f in folder.rglob("*.icimg"):
            if f.relative_to(folder).parts[0] == "retired":  # replaced points' files, kept a while (section 8)
                continue
            raw = f.read_bytes()
            magic, _major, _flags, number, pid = struct.unpack_from("<8sHHI16s", raw, 0)
            assert magic == b"ICHSEG01" and blake3.blake3(raw[:56]).digest()[:8] == raw[56:64]
            self.segments.setdefault(uuid.UUID(bytes=pid), {})[number] = raw[64:]
        self.points = {pid: self._point(pid) for pid in self.segments}

    def _point(self, pid: uuid.UUID) -> dict[str, object]:
        segs = self.segments[pid]
        stream = b"".join(segs[i] for i in range(len(segs)))
        footer = stream[-256:]
        assert footer[-8:] == b"ICHEND01" and blake3.blake3(footer[:216]).digest() == footer[216:248]
        (fpid, ioff, ilen, icount, _idig, soff, _slen, _sdig, nseg, state, hdig, llen, _ddig) = struct.unpack(
            "<16sQQQ32sQI32sI32s32sQ24s", footer[:216])  # fmt: skip
        assert fpid == pid.bytes and nseg == len(segs) and llen == len(stream)
        magic, _maj, minor, hlen = struct.unpack_from("<8sHHI", stream, 0)
        assert minor >= 1, "these test points have a frame directory"
        assert magic == b"IMGCHAIN"
        parent, pstate = stream[48:64], stream[64:96]
        seq, bs, vsize = struct.unpack_from("<IIQ", stream, 128)
        dalg, _comp, _lvl, enc = struct.unpack_from("<BBbB", stream, 153)
        klen, mlen = struct.unpack_from("<II", stream, 168)
        header = stream[:hlen]
        key_material = header[256 : 256 + klen]
        meta = json.loads(header[256 + klen : 256 + klen + mlen])
        masked = header[:256] + bytes(klen) + header[256 + klen :]
        assert blake3.blake3(masked).digest() == hdig
        p: dict[str, object] = {"pid": pid, "stream": stream, "parent": None if parent == bytes(16) else
                                uuid.UUID(bytes=parent), "pstate": pstate, "seq": seq, "bs": bs, "vsize": vsize,
                                "state": state, "meta": meta, "enc": enc}  # fmt: skip
        chain_id = stream[32:48]
        if enc == 1:
            assert dalg == 2 and klen == 8192
            kp, kd = self._open_slots(chain_id, pid.bytes, key_material)
            kh = derive("imagechain 2026 header mac", kd)
            assert blake3.blake3(masked[:-32], key=kh).digest() == header[-32:], "header MAC"
            p.update(kp=kp, kd=kd, ki=derive("imagechain 2026 index", kd + pid.bytes))
            table = []  # a merged point's inherited data keys (11.1): (sealing point id, its data key)
            if "key_table" in meta:
                raw = AESGCM(kp).decrypt(struct.pack("<QI", 0, 4), base64.b64decode(meta["key_table"]),
                                         b"key table\0" + pid.bytes)  # fmt: skip
                table = [(raw[i : i + 16], raw[i + 16 : i + 48]) for i in range(0, len(raw), 48)]
            p["table"] = table
        else:
            assert blake3.blake3(header[:-32]).digest() == header[-32:]
        # frame directory (1.1+), the frames it lists, their entries
        raw_dir = stream[ioff + ilen : soff]
        if enc == 1:
            plain = AESGCM(p["ki"]).decrypt(struct.pack("<QI", 0, 2), raw_dir, pid.bytes)  # type: ignore[arg-type]
            raw_dir, trailer = plain[:-72], plain[-72:]
            assert trailer == state + hdig + struct.pack("<Q", icount)
        entries = []
        for f in range(len(raw_dir) // 64):
            _first, _end, off, length, n, digest = struct.unpack_from("<QQQII32s", raw_dir, f * 64)
            frame = stream[off : off + length]
            assert blake3.blake3(frame).digest() == digest
            if enc == 1:
                frame = AESGCM(p["ki"]).decrypt(struct.pack("<QI", f, 1), frame, pid.bytes)  # type: ignore[arg-type]
            data = zstandard.ZstdDecompressor().decompress(frame)
            assert len(data) == n * 64
            entries += [struct.unpack_from("<QIBBHQII32s", data, i * 64) for i in range(n)]
        assert len(entries) == icount
        p["entries"] = entries
        return p

    def _open_slots(self, chain_id: bytes, pid: bytes, km: bytes) -> tuple[bytes, bytes]:
        assert self.passphrase is not None
        for i in range(2):
            slot = km[i * 4096 : i * 4096 + 128]
            if slot[0] != 1:
                continue
            salt, t, m, lanes = struct.unpack_from("<16sIII", slot, 4)
            kek = hash_secret_raw(self.passphrase, salt, time_cost=t, memory_cost=m, parallelism=lanes, hash_len=32,
                                  type=Type.ID)  # fmt: skip
            aad = b"imagechain-keyslot-v1\0" + chain_id + pid + slot[:36]
            keys = AESGCM(kek).decrypt(slot[36:48], slot[48:128], aad)
            return keys[:32], keys[32:]
        raise AssertionError("no passphrase slot")

    def _parent(self, pid: uuid.UUID) -> dict[str, object]:
        """The point with that id, else the merged point whose `merged` lists it (section 8)."""
        if pid in self.points:
            return self.points[pid]
        listing = [p for p in self.points.values() if pid.hex in p["meta"].get("merged", [])]  # type: ignore[attr-defined]
        return max(listing, key=lambda p: len(p["meta"]["merged"]))  # type: ignore[index]

    def restore(self, pid: uuid.UUID) -> bytes:
        lineage = [self.points[pid]]
        while lineage[-1]["parent"] is not None:
            parent = self._parent(lineage[-1]["parent"])  # type: ignore[arg-type]
            assert parent["state"] == lineage[-1]["pstate"]
            lineage.append(parent)
        lineage.reverse()
        top = lineage[-1]
        bs, vsize = int(top["bs"]), int(top["vsize"])  # type: ignore[call-overload]
        n = -(-vsize // bs)
        kind = np.zeros(n, np.uint8)
        digest = np.zeros((n, 32), np.uint8)
        where: dict[int, tuple[dict[str, object], int, int, int, int, int]] = {}
        for p in lineage:
            for block, count, k, codec, key, off, length, member, dig in p["entries"]:  # type: ignore[attr-defined]
                for b in range(block, min(block + count, n)):
                    kind[b] = k
                    digest[b] = np.frombuffer(dig, np.uint8)
                    if k == 1:
                        where[b] = (p, off, length, codec, key, member)
        assert kind.all(), "a block no point defines"
        state = blake3.blake3(b"imagechain-state-v1\0" + struct.pack("<QI", vsize, bs) + blake3.blake3(
            kind.tobytes()).digest() + blake3.blake3(digest.tobytes()).digest()).digest()  # fmt: skip
        assert state == top["state"], "state digest"
        out = bytearray(vsize)
        self.groups = 0
        for b, (p, off, length, codec, key, member) in where.items():
            payload = p["stream"][off : off + length]  # type: ignore[index]
            first = b - member  # a group's payload is sealed as its first block's (section 4)
            if p["enc"] == 1:
                sealer, kp = (p["pid"].bytes, p["kp"]) if key == 0 else p["table"][key - 1]  # type: ignore[attr-defined,index]
                aad = b"payload\0" + sealer + struct.pack("<QB", first, codec)
                payload = AESGCM(kp).decrypt(struct.pack("<QI", first, 0), payload, aad)
            raw_len = min(bs, vsize - b * bs)
            if codec == 0:
                raw = payload
            elif codec == 1:
                raw = zstandard.ZstdDecompressor().decompress(payload)
            elif codec == 3:
                raw = zstandard.ZstdDecompressor().decompress(payload)[member * bs : member * bs + raw_len]
                self.groups += member == 0
            else:
                raw = lz4.block.decompress(payload, uncompressed_size=raw_len)
            key = p["kd"] if p["enc"] == 1 else None
            d = blake3.blake3(raw, key=key).digest() if key else blake3.blake3(raw).digest()  # type: ignore[arg-type]
            assert d == digest[b].tobytes() and len(raw) == raw_len
            out[b * bs : b * bs + raw_len] = raw
        return bytes(out)


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_reader_from_the_spec_restores_every_point(tmp_path: Path, repo: Path, encrypted: bool) -> None:
    need_tool("mkfs.ext4")
    from imagechain.crypto import Passphrase
    from imagechain.engine.backup import backup
    from imagechain.keyring import Keyring
    from imagechain.usage import volume_usage

    vol = tmp_path / "vol.img"
    with open(vol, "wb") as f:
        f.truncate(24 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(vol)], check=True, capture_output=True)
    with open(vol, "rb") as f:
        used = volume_usage(lambda o, k: os.pread(f.fileno(), k, o), 24 << 20, 64 << 10).used
    assert used is not None
    rng = random.Random(9)
    data = bytearray(vol.read_bytes())
    free = np.flatnonzero(~used).tolist()
    for b in rng.sample(free, 20):  # stale data in blocks the filesystem does not use: UNUSED, not stored
        data[b * 65536 : (b + 1) * 65536] = rng.randbytes(65536)
    # compressible data in six consecutive used blocks: stored as a group (codec 3) by the full point
    # (the journal's: the last used blocks but the three the steps change; not the metadata the used map reads)
    top = int(np.flatnonzero(used)[-1]) - 3
    run = max(int(b) for b in np.flatnonzero(used) if b + 6 <= top and used[b : b + 6].all())
    for b in range(run, run + 6):
        data[b * 65536 : (b + 1) * 65536] = ((b"block %d of a group; " % b) * 4096)[:65536]
    vol.write_bytes(data)
    pw = Passphrase(b"spec reader") if encrypted else None
    ring = Keyring(pw)
    states = []
    for step in range(3):
        if step:  # change a used block; the first change replaces a block inside the group
            b = run + 2 if step == 1 else int(np.flatnonzero(used)[-1]) - step
            data[b * 65536 + 100 : b * 65536 + 200] = rng.randbytes(100)
            vol.write_bytes(data)
        r = backup(str(vol), str(repo), encrypt=pw if step == 0 else None, keyring=ring)
        assert r.unused_blocks == int((~used).sum())
        want = bytearray(data)
        for b in np.flatnonzero(~used).tolist():
            want[b * 65536 : (b + 1) * 65536] = bytes(65536)
        states.append((uuid.UUID(r.point_id), bytes(want)))
    # a merged point (1.4): points 0 and 1 replaced by one synthetic full; point 2 links to it
    from imagechain.address import open_point
    from imagechain.engine.consolidate import consolidate

    res = open_point(f"{repo}::default@1")
    merged = consolidate(res.repo, res.point, cat=res.catalog, keyring=ring)
    assert merged.copied_payloads > 0
    states = [(uuid.UUID(merged.point_id), states[1][1]), states[2]]
    reader = SpecReader(repo, b"spec reader" if encrypted else None)
    assert set(reader.points) == {pid for pid, _ in states}
    assert ("key_table" in reader.points[states[0][0]]["meta"]) == encrypted  # type: ignore[operator]
    for pid, want in states:
        assert reader.restore(pid) == want
    assert reader.groups > 0, "no point held a group"
