"""What a run was given to open encrypted chains (a passphrase, a recipient's identity) and the local key
store, where a machine that backs itself up in recipient mode keeps the one key it needs: its chains'
digest keys. Unlocking a point proves its header MAC and attaches its keys to it for every reader."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import struct
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .crypto import (
    ARGON2_LANES,
    ARGON2_MEMORY_KIB,
    ARGON2_TIME,
    KEY_MATERIAL_SIZE,
    SLOT_PASSPHRASE,
    SLOT_SIZE,
    Passphrase,
    PointKeys,
    fingerprint,
    header_mac_key,
    new_key,
    open_slot,
    public_key,
    raw_public,
    seal_slot_passphrase,
    seal_slot_recipient,
    slot_kind,
    slots,
)
from .errors import CredentialsError, IntegrityError, UsageError
from .format import spec
from .format.reader import PointFiles
from .stores import temporary_name

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

KEYSTORE_ENV = "IMAGECHAIN_KEYSTORE"
DEFAULT_KEYSTORE = "/var/lib/imagechain/keys"


class KeyStore:
    """One small file per chain, `<chain id>.key`, readable by its owner only (root for system backups):
    the chain's digest key and the recipient it encrypts to."""

    def __init__(self, folder: str | None = None) -> None:
        self.folder = folder or os.environ.get(KEYSTORE_ENV) or DEFAULT_KEYSTORE

    def _path(self, chain_id: uuid.UUID) -> str:
        return os.path.join(self.folder, f"{chain_id.hex}.key")

    def get(self, chain_id: uuid.UUID) -> bytes | None:
        try:
            with open(self._path(chain_id), encoding="utf-8") as f:
                data = json.load(f)
            key = base64.b64decode(data["digest_key"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return key if len(key) == 32 else None

    def put(self, chain_id: uuid.UUID, digest_key: bytes, recipient: str) -> None:
        """Written whole or not at all (temporary, fsync, rename), mode 0600 in a folder of mode 0700."""
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            path = self._path(chain_id)
            tmp = temporary_name(path)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"chain_id": str(chain_id), "digest_key": base64.b64encode(digest_key).decode(),
                               "recipient": recipient}, f)  # fmt: skip
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as e:
            raise UsageError(f"cannot write the key store {self.folder}: {e.strerror}") from e


class Keyring:
    def __init__(self, passphrase: Passphrase | None = None, identity: X25519PrivateKey | None = None,
                 store: KeyStore | None = None, ask: Callable[[], Passphrase] | None = None) -> None:  # fmt: skip
        """ask: how to get the passphrase when a point needs one and none was given (a prompt)."""
        self.passphrase, self.identity = passphrase, identity
        self.store = store or KeyStore()
        self.ask = ask

    def need_passphrase(self) -> Passphrase | None:
        if self.passphrase is None and self.ask is not None:
            self.passphrase = self.ask()
        return self.passphrase

    @property
    def given(self) -> bool:
        return self.passphrase is not None or self.identity is not None

    def unlock(self, p: PointFiles, need_data: bool = True) -> PointKeys | None:
        """The point's keys (None for a plaintext point), attached to it; its header MAC proven. Without a
        passphrase or identity that opens it, the digest key of the local key store gives what a writer of a
        recipient-mode chain may do (read block maps), unless need_data."""
        h = p.header
        if h.encryption == spec.ENCRYPTION_NONE:
            return None
        if p.keys is not None and (p.keys.data_key is not None or not need_data):
            return p.keys
        opened = None
        kinds = {slot_kind(s) for s in slots(h.key_material)}
        if self.identity is None and SLOT_PASSPHRASE in kinds and (need_data or self.store.get(h.chain_id) is None):
            self.need_passphrase()
        if len(h.key_material) == KEY_MATERIAL_SIZE:
            for slot in slots(h.key_material):
                opened = open_slot(h.chain_id, h.point_id, slot, self.passphrase, self.identity)
                if opened is not None:
                    break
        if opened is not None:
            keys = PointKeys(h.point_id, opened[32:], opened[:32])
        else:
            stored = None if need_data else self.store.get(h.chain_id)
            if stored is None:
                raise CredentialsError(self._why(p))
            keys = PointKeys(h.point_id, stored, None)
        if not h.mac_matches(header_mac_key(keys.digest_key)):
            raise IntegrityError(f"{p.name}: point header fails its MAC (altered, or not of this chain)")
        table = h.metadata.get(KEY_TABLE)
        if table is not None and keys.data_key is not None:
            try:
                sealed = base64.b64decode(str(table), validate=True)
            except ValueError as e:
                raise IntegrityError(f"{p.name}: its key table is not base64") from e
            keys = keys.with_key_table(sealed)
        p.keys = keys
        return keys

    def unlock_all(self, points: Iterable[PointFiles], need_data: bool = True) -> None:
        for p in points:
            self.unlock(p, need_data)

    def _why(self, p: PointFiles) -> str:
        kinds = {slot_kind(s) for s in slots(p.header.key_material)}
        short = str(p.point_id)[:8]
        if self.given:
            what = "passphrase" if self.passphrase is not None else "identity"
            return f"the {what} given does not open point {short} ({p.name}): wrong {what}"
        if 2 in kinds:
            return (f"point {short} is encrypted to a recipient: give the identity (--identity FILE) that "
                    f"`imagechain key generate` wrote with its public key")  # fmt: skip
        return (f"point {short} is encrypted: give its passphrase (IMAGECHAIN_PASSPHRASE, --passphrase-file "
                f"FILE, or at the prompt)")  # fmt: skip


def read_passphrase_file(path: str) -> Passphrase:
    """The passphrase in a file's first line (a file, never the command line, where `ps` shows it)."""
    try:
        with open(path, "rb") as f:
            text = f.readline().rstrip(b"\r\n")
    except OSError as e:
        raise UsageError(f"cannot read passphrase file {path}: {e.strerror}") from e
    if not text:
        raise UsageError(f"passphrase file {path} is empty")
    return Passphrase(text)


KEY_TABLE = "key_table"  # header metadata of an encrypted merged point (docs/FORMAT.md section 11.1)


@dataclass
class NewPointKeys:
    """What a backup writes into a new point of an encrypted chain."""

    keys: PointKeys
    key_material: bytes
    metadata: dict[str, object]
    remember: Callable[[], None]  # after publishing: what the local key store must keep (recipient mode)


def keys_for_new_point(ring: Keyring, chain_id: uuid.UUID, point_id: uuid.UUID, parent: PointFiles | None,
                       encrypt: Passphrase | X25519PublicKey | None) -> NewPointKeys | None:  # fmt: skip
    """The keys and key slots of a new point: a full point of a chain started with `encrypt`, or an
    incremental of an encrypted chain (it inherits the parent's mode, passphrase salt or recipient). None
    for a plaintext point."""
    given = None if encrypt is None or isinstance(encrypt, Passphrase) else encrypt  # a recipient's public key
    if parent is not None:
        if not parent.header.encrypted:
            if encrypt is not None:
                raise UsageError("the chain is not encrypted; encryption starts with a new chain (--full)")
            return None
        pk = ring.unlock(parent, need_data=False)
        assert pk is not None
        digest_key = pk.digest_key
        recipient_b64 = parent.header.metadata.get("recipient")
        kinds = [slot_kind(s) for s in slots(parent.header.key_material)]
        if (isinstance(encrypt, Passphrase) and recipient_b64) or (given is not None and SLOT_PASSPHRASE in kinds):
            raise UsageError("the chain is encrypted in the other mode (passphrase or recipient); it keeps its "
                             "mode until a new chain starts (--full)")  # fmt: skip
    else:
        if encrypt is None:
            return None
        digest_key, recipient_b64 = new_key(), None
    data_key = new_key()
    keys = PointKeys(point_id, digest_key, data_key)
    both = data_key + digest_key
    meta: dict[str, object] = {}
    remember: Callable[[], None] = lambda: None  # noqa: E731
    if recipient_b64 is not None or given is not None:
        rec = given if given is not None else public_key(base64.b64decode(str(recipient_b64)))
        meta = {"recipient": base64.b64encode(raw_public(rec)).decode(), "recipient_fingerprint": fingerprint(rec)}
        slot = seal_slot_recipient(chain_id, point_id, both, rec)
        if ring.store.get(chain_id) != digest_key:
            def remember() -> None:
                ring.store.put(chain_id, digest_key, fingerprint(rec))
    else:
        passphrase = encrypt if isinstance(encrypt, Passphrase) else ring.need_passphrase()
        if passphrase is None:
            raise CredentialsError("the chain is encrypted with a passphrase: give it (IMAGECHAIN_PASSPHRASE, "
                                   "--passphrase-file FILE, or at the prompt)")  # fmt: skip
        params = _passphrase_slot_params(parent, passphrase) if parent is not None else None
        salt, t, m, p = params or (os.urandom(16), ARGON2_TIME, ARGON2_MEMORY_KIB, ARGON2_LANES)
        slot = seal_slot_passphrase(chain_id, point_id, both, passphrase, salt, t, m, p)
    return NewPointKeys(keys, slot + bytes(SLOT_SIZE), meta, remember)


def _passphrase_slot_params(p: PointFiles, passphrase: Passphrase) -> tuple[bytes, int, int, int] | None:
    """The salt and Argon2id parameters of the parent's slot that this passphrase opens: the chain keeps one
    key-encryption key, derived once per run."""
    h = p.header
    for slot in slots(h.key_material):
        if slot_kind(slot) == SLOT_PASSPHRASE and open_slot(h.chain_id, h.point_id, slot, passphrase, None):
            _k, salt, t, m, lanes = struct.unpack("<B3x16sIII4x", slot[:36])
            return salt, t, m, lanes
    return None
