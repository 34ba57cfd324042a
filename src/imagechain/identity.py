"""Who is backing up: a host identity that tells cloned machines apart.

The host id is derived from /etc/machine-id together with the SMBIOS product UUID (which
hypervisors renew on clone even when the machine-id was copied), or from --host NAME."""

from __future__ import annotations

import os
from dataclasses import dataclass

import blake3

MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
PRODUCT_UUID_FILE = "/sys/class/dmi/id/product_uuid"


@dataclass(frozen=True)
class HostIdentity:
    host_id: bytes  # 16 bytes, in every header
    name: str  # verbatim, for display
    machine: str  # the machine fingerprint this process runs on (for lock liveness checks)


def read_text(path: str) -> str:
    """A small system file (machine-id, boot id), stripped; '' when unreadable."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def machine_fingerprint() -> str:
    """Stable per machine, different on clones; IMAGECHAIN_MACHINE_ID overrides it (containers, tests)."""
    override = os.environ.get("IMAGECHAIN_MACHINE_ID")
    if override:
        return override
    mid = next((v for v in map(read_text, MACHINE_ID_FILES) if v), "")
    return f"{mid}/{read_text(PRODUCT_UUID_FILE)}"


def local_host(name: str | None = None) -> HostIdentity:
    """The identity backups from this process are filed under."""
    machine = machine_fingerprint()
    if name is not None:
        hid = blake3.blake3(b"imagechain-host-name\0" + name.encode()).digest(16)
        return HostIdentity(hid, name, machine)
    hid = blake3.blake3(b"imagechain-machine\0" + machine.encode()).digest(16)
    return HostIdentity(hid, _host_name(), machine)


def _host_name() -> str:
    """The machine's name, as `hostname` says it (uname's node name: the socket module is not needed)."""
    if hasattr(os, "uname"):
        return os.uname().nodename
    import socket

    return socket.gethostname()
