"""Encrypted chains: the keys, how every image file carries them wrapped, and how a point's parts are
sealed (docs/SECURITY.md for the threat model, docs/FORMAT.md section 11 for the bytes).

Keys, all 32 random bytes:
- the chain's *digest key*: block digests are BLAKE3 keyed with it, so equal blocks look alike only
  to someone who holds it, and CBC compares digests without decrypting anything. Index frames, the
  frame directory and the summary are sealed with a key derived from it and the point id, and the
  header's MAC is keyed with another: whoever may write the chain can read its block maps.
- each point's *data key*: seals that point's payloads (AES-256-GCM; the nonce is the block number,
  the point id, block number and codec are associated data). Fresh for every point.

Every image file carries both keys of its point in two *key slots* (4 KiB apart, so a torn write can
only ever damage one): sealed by a key derived from a passphrase (Argon2id, parameters in the slot) or
for a recipient (X25519 with an ephemeral key, HKDF-SHA256). The slots lie outside what the header MAC
and the footer's header digest cover: `key change-passphrase` rewrites one slot at a time, in place,
and each slot proves itself (its AEAD tag), so a file always opens with one passphrase or the other.

In recipient mode the backing-up machine keeps only the digest key (its key store) and the recipient's
public key: it writes incrementals, reads block maps, and cannot open a payload."""

from __future__ import annotations

import base64
import os
import struct
import threading
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import blake3

from .errors import CredentialsError, IntegrityError, UsageError

SLOT_SIZE = 4096
SLOT_COUNT = 2
KEY_MATERIAL_SIZE = SLOT_SIZE * SLOT_COUNT
SLOT_USED = 128  # bytes of a slot that carry anything; the rest is zero
SLOT_EMPTY, SLOT_PASSPHRASE, SLOT_RECIPIENT = 0, 1, 2
TAG = 16
# Argon2id: ~0.3 s and 128 MiB on one of this project's 2-core machines, once per chain and run
ARGON2_TIME, ARGON2_MEMORY_KIB, ARGON2_LANES = 3, 128 << 10, 2
_SLOT_AAD = b"imagechain-keyslot-v1\0"

# cryptography and argon2 are imported where they are used: they cost about 0.07 s of every run's start-up
# on a cold cache, and most runs (plain chains) never use them
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def _aesgcm(key: bytes) -> AESGCM:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def raw_public(key: X25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key(raw: bytes) -> X25519PublicKey:
    """An X25519 public key from its 32 bytes (ValueError if they are not one)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    return X25519PublicKey.from_public_bytes(raw)


# nonce suffixes (after a u64 counter) of the things sealed under a point's keys
N_PAYLOAD, N_FRAME, N_DIRECTORY, N_SUMMARY, N_KEY_TABLE = 0, 1, 2, 3, 4
KEY_TABLE_ENTRY = 48  # point id (16) + that point's data key (32)


# the end of an encrypted point's sealed frame directory: the footer's state digest, header digest and
# index entry count, so that the keys vouch for the footer too
TRAILER = struct.Struct("<32s32sQ")


def _nonce(counter: int, kind: int) -> bytes:
    return struct.pack("<QI", counter, kind)


def _derive(context: str, key: bytes, extra: bytes = b"") -> bytes:
    return blake3.blake3(key + extra, derive_key_context=f"imagechain 2026 {context}").digest()


@dataclass(frozen=True)
class PointKeys:
    """The keys one point needs; data_key is None where only the digest key is known (the writer of a
    recipient-mode chain, or `verify` of structure only)."""

    point_id: uuid.UUID
    digest_key: bytes
    data_key: bytes | None
    # a merged point's payloads keep the keys they were sealed with: (sealing point id, its data key) for
    # index entries whose `key` field is 1, 2, ... (docs/FORMAT.md section 11.1)
    inherited: tuple[tuple[uuid.UUID, bytes], ...] = ()
    _aead: dict[str, AESGCM] = field(default_factory=dict, compare=False, repr=False)

    @property
    def header_mac_key(self) -> bytes:
        return header_mac_key(self.digest_key)

    def _cipher(self, which: str) -> AESGCM:
        c = self._aead.get(which)
        if c is None:
            if which.startswith("inherited "):
                key = self.inherited[int(which.split()[1]) - 1][1]
            elif which == "data":
                if self.data_key is None:
                    raise CredentialsError("this needs the chain's passphrase or the recipient's identity "
                                           "(--identity): the key that opens payloads is not known here")
                key = self.data_key
            else:
                key = _derive("index", self.digest_key, self.point_id.bytes)
            c = self._aead[which] = _aesgcm(key)
        return c

    # payloads: under the point's data key
    def seal_payload(self, block: int, codec: int, data: bytes | memoryview) -> bytes:
        return self._cipher("data").encrypt(_nonce(block, N_PAYLOAD), bytes(data), self._payload_aad(block, codec))

    def open_payload(self, block: int, codec: int, sealed: bytes | memoryview, key: int = 0) -> bytes:
        """key: the index entry's key field (0 for every point but a merged one)."""
        from cryptography.exceptions import InvalidTag

        if key == 0:
            cipher, sealer = self._cipher("data"), self.point_id
        else:
            self._cipher("data")  # no data key at all: say what is missing before anything else
            if key > len(self.inherited):
                raise IntegrityError(f"block {block} names data key {key}, which the point does not hold")
            sealer = self.inherited[key - 1][0]
            cipher = self._cipher(f"inherited {key}")
        try:
            return cipher.decrypt(_nonce(block, N_PAYLOAD), bytes(sealed), _payload_aad(sealer, block, codec))
        except InvalidTag as e:
            raise IntegrityError(f"block {block} does not decrypt (altered, or moved from another block or point)") \
                from e  # fmt: skip

    def _payload_aad(self, block: int, codec: int) -> bytes:
        return _payload_aad(self.point_id, block, codec)

    def all_data_keys(self) -> dict[uuid.UUID, bytes]:
        """Every data key this point's payloads were sealed with, by sealing point (consolidation carries
        them into the merged point's key table)."""
        assert self.data_key is not None
        return {self.point_id: self.data_key, **dict(self.inherited)}

    def seal_key_table(self, table: list[tuple[uuid.UUID, bytes]]) -> bytes:
        """Inherited data keys, sealed under this point's data key: whoever opens a key slot opens them,
        and `key change-passphrase` (which rewrites only the slots) keeps working."""
        raw = b"".join(pid.bytes + k for pid, k in table)
        return self._cipher("data").encrypt(_nonce(0, N_KEY_TABLE), raw, b"key table\0" + self.point_id.bytes)

    def with_key_table(self, sealed: bytes) -> PointKeys:
        from cryptography.exceptions import InvalidTag

        try:
            raw = self._cipher("data").decrypt(_nonce(0, N_KEY_TABLE), sealed, b"key table\0" + self.point_id.bytes)
        except InvalidTag as e:
            raise IntegrityError(f"point {str(self.point_id)[:8]}: its key table does not decrypt (altered)") from e
        if len(raw) % KEY_TABLE_ENTRY:
            raise IntegrityError(f"point {str(self.point_id)[:8]}: its key table has a bad length")
        table = tuple((uuid.UUID(bytes=raw[i : i + 16]), raw[i + 16 : i + KEY_TABLE_ENTRY])
                      for i in range(0, len(raw), KEY_TABLE_ENTRY))  # fmt: skip
        return PointKeys(self.point_id, self.digest_key, self.data_key, table)

    # index frames, the frame directory, the summary: under the index key (from the digest key)
    def seal_meta(self, counter: int, kind: int, data: bytes) -> bytes:
        return self._cipher("index").encrypt(_nonce(counter, kind), data, self.point_id.bytes)

    def open_meta(self, counter: int, kind: int, sealed: bytes, what: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        try:
            return self._cipher("index").decrypt(_nonce(counter, kind), sealed, self.point_id.bytes)
        except InvalidTag as e:
            raise IntegrityError(f"{what} does not decrypt (altered, or not this point's)") from e

    def digest(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=self.digest_key).digest()


def _payload_aad(sealer: uuid.UUID, block: int, codec: int) -> bytes:
    return b"payload\0" + sealer.bytes + struct.pack("<QB", block, codec)


def header_mac_key(digest_key: bytes) -> bytes:
    return _derive("header mac", digest_key)


def new_key() -> bytes:
    return os.urandom(32)


# --- key slots --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Passphrase:
    secret: bytes

    def __repr__(self) -> str:  # never in a traceback or a log
        return "Passphrase(***)"


def _argon2(secret: bytes, salt: bytes, t: int, m: int, p: int) -> bytes:
    from argon2.low_level import Type, hash_secret_raw

    return hash_secret_raw(secret, salt, time_cost=t, memory_cost=m, parallelism=p, hash_len=32, type=Type.ID)


def _recipient_key(shared: bytes, eph_pub: bytes, rec_pub: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(hashes.SHA256(), 32, eph_pub + rec_pub, b"imagechain-keyslot-v1").derive(shared)


def _slot_aad(chain_id: uuid.UUID, point_id: uuid.UUID, head: bytes) -> bytes:
    return _SLOT_AAD + chain_id.bytes + point_id.bytes + head


class KEKCache:
    """Argon2id is slow on purpose: derive each (passphrase, salt, parameters) once per run."""

    def __init__(self) -> None:
        self._keys: dict[tuple[bytes, bytes, int, int, int], bytes] = {}
        self._lock = threading.Lock()

    def get(self, secret: bytes, salt: bytes, t: int, m: int, p: int) -> bytes:
        k = (secret, salt, t, m, p)
        with self._lock:
            if k not in self._keys:
                self._keys[k] = _argon2(secret, salt, t, m, p)
            return self._keys[k]


_KEKS = KEKCache()


def seal_slot_passphrase(chain_id: uuid.UUID, point_id: uuid.UUID, keys: bytes, passphrase: Passphrase,
                         salt: bytes, t: int = ARGON2_TIME, m: int = ARGON2_MEMORY_KIB,
                         p: int = ARGON2_LANES) -> bytes:  # fmt: skip
    head = struct.pack("<B3x16sIII4x", SLOT_PASSPHRASE, salt, t, m, p)
    nonce = os.urandom(12)
    kek = _KEKS.get(passphrase.secret, salt, t, m, p)
    sealed = _aesgcm(kek).encrypt(nonce, keys, _slot_aad(chain_id, point_id, head))
    return (head + nonce + sealed).ljust(SLOT_SIZE, b"\0")


def seal_slot_recipient(chain_id: uuid.UUID, point_id: uuid.UUID, keys: bytes, recipient: X25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    eph = X25519PrivateKey.generate()
    eph_pub, rec_pub = raw_public(eph.public_key()), raw_public(recipient)
    head = struct.pack("<B3x32s", SLOT_RECIPIENT, eph_pub)
    nonce = os.urandom(12)
    wrap = _recipient_key(eph.exchange(recipient), eph_pub, rec_pub)
    sealed = _aesgcm(wrap).encrypt(nonce, keys, _slot_aad(chain_id, point_id, head))
    return (head + nonce + sealed).ljust(SLOT_SIZE, b"\0")


def slot_kind(slot: bytes) -> int:
    return slot[0] if slot else SLOT_EMPTY


def slot_salt(slot: bytes) -> bytes | None:
    return slot[4:20] if slot_kind(slot) == SLOT_PASSPHRASE else None


def open_slot(chain_id: uuid.UUID, point_id: uuid.UUID, slot: bytes, passphrase: Passphrase | None,
              identity: X25519PrivateKey | None) -> bytes | None:  # fmt: skip
    """The 64 key bytes (data key, digest key) a slot seals, or None when what was given does not open it."""
    from cryptography.exceptions import InvalidTag

    kind = slot_kind(slot)
    head, nonce, sealed = slot[:36], slot[36:48], slot[48 : 48 + 64 + TAG]
    if kind == SLOT_PASSPHRASE and passphrase is not None:
        _k, salt, t, m, p = struct.unpack("<B3x16sIII4x", head)
        if not (1 <= t <= 64 and 8 <= m <= (4 << 20) and 1 <= p <= 64):
            return None  # parameters nobody wrote: refuse rather than spend hours or all memory on them
        wrap = _KEKS.get(passphrase.secret, salt, t, m, p)
    elif kind == SLOT_RECIPIENT and identity is not None:
        eph_pub = head[4:36]
        rec_pub = raw_public(identity.public_key())
        try:
            shared = identity.exchange(public_key(eph_pub))
        except ValueError:
            return None
        wrap = _recipient_key(shared, eph_pub, rec_pub)
    else:
        return None
    try:
        return _aesgcm(wrap).decrypt(nonce, sealed, _slot_aad(chain_id, point_id, head))
    except InvalidTag:
        return None


def slots(key_material: bytes) -> list[bytes]:
    return [key_material[i * SLOT_SIZE : (i + 1) * SLOT_SIZE] for i in range(SLOT_COUNT)]


# --- identities (recipient mode) --------------------------------------------------------------------

_PUBLIC, _SECRET = "imagechain-x25519-public", "imagechain-x25519-secret"


def generate_identity(path: str) -> str:
    """Write a new X25519 key pair: PATH (secret, mode 0600) and PATH.pub. Returns the public key's path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())  # fmt: skip
    pub = raw_public(key.public_key())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as e:
        raise UsageError(f"{path} exists; not overwriting a key") from e
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from e
    with os.fdopen(fd, "w") as f:
        f.write(f"{_SECRET} {base64.b64encode(raw).decode()}\n")
    with open(path + ".pub", "w", encoding="utf-8") as f:
        f.write(f"{_PUBLIC} {base64.b64encode(pub).decode()}\n")
    return path + ".pub"


def _read_key(path: str, kind: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(4096)  # a key file is one short line: a larger file is not one
    except OSError as e:
        raise UsageError(f"cannot read key file {path}: {e.strerror}") from e
    try:
        words = data.decode("ascii").split()  # a binary or text file of another kind fails here too
        if len(words) != 2 or words[0] != kind:
            raise ValueError
        raw = base64.b64decode(words[1], validate=True)
        if len(raw) != 32:
            raise ValueError
    except ValueError as e:
        what = "public key (KEY.pub)" if kind == _PUBLIC else "secret identity"
        raise UsageError(f"{path} is not an imagechain {what} file") from e
    return raw


def load_recipient(path: str) -> X25519PublicKey:
    return public_key(_read_key(path, _PUBLIC))


def load_identity(path: str) -> X25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(_read_key(path, _SECRET))


def fingerprint(key: X25519PublicKey) -> str:
    raw = raw_public(key)
    return blake3.blake3(raw).hexdigest()[:16]
