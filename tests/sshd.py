"""A real OpenSSH server for the SFTP store tests: sshd (as root, with its own host key and sshd_config in a
temporary folder) on a free loopback port, one for the whole session (fixture sshd_server), logging in an
unprivileged system user (imagechain-sftp) by key, with `Subsystem sftp internal-sftp`.

The client side is a generated key and an ssh config file with the Host alias `ictest` (HostName, Port,
User, IdentityFile, UserKnownHostsFile holding the server's key): tests point IMAGECHAIN_SSH_CONFIG at it.
Tests that need a server gone call stop()/start(), or drop_connections() to kill the per-connection sshd
processes (a connection cut in the middle of a transfer)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
USER = "imagechain-sftp"
ALIAS = "ictest"
START_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def why_not() -> str | None:
    """Why a real sshd cannot run here; None when it can."""
    if os.geteuid() != 0:
        return "the SFTP tests run a real sshd and an unprivileged login user: they need root"
    for tool in (SSHD, "/usr/bin/ssh-keygen", "/usr/sbin/useradd"):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing (make test installs openssh-server, openssh-client and passwd)"
    return None


def keygen(path: Path, comment: str = "imagechain-test") -> str:
    """A new ed25519 key pair at path (and path.pub); returns the public key line."""
    for p in (path, Path(f"{path}.pub")):
        p.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, timeout=30)  # fmt: skip
    return Path(f"{path}.pub").read_text().strip()


def ensure_user() -> pwd.struct_passwd:
    """The login user: a system user with a home folder, not locked (sshd without PAM refuses accounts
    whose password field starts with '!', which useradd gives them)."""
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--create-home", "--shell", "/usr/sbin/nologin", USER],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        pw = pwd.getpwnam(USER)
    subprocess.run(["usermod", "-p", "*", USER], check=True, capture_output=True, timeout=60)
    return pw


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(d))
    return tree


def descendants(pid: int) -> list[list[int]]:
    """pid's descendants, level by level (children, grandchildren...)."""
    tree, levels, level = _children(), list[list[int]](), [pid]
    while True:
        level = [c for p in level for c in tree.get(p, [])]
        if not level:
            return levels
        levels.append(level)


def _reaped(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def _kill(pids: list[int]) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _wait_reaped(pids: list[int], timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not all(_reaped(p) for p in pids):
        time.sleep(0.01)


def cut_connections(listener: int) -> int:
    """Cut every connection of an sshd listener: below each per-connection monitor, its processes are
    SIGKILLed deepest first, each level reaped by its living parent before that parent goes (orphans would
    stay zombies: nobody here reaps them); the monitor then reaps the last and exits by itself. Returns
    how many processes were killed."""
    killed = 0
    for monitor in _children().get(listener, []):
        levels = descendants(monitor)
        if not levels:
            _kill([monitor])  # a connection not yet past its first steps: the listener reaps it
            killed += 1
        for i, level in enumerate(reversed(levels)):
            _kill(level)
            killed += len(level)
            if i < len(levels) - 1:
                _wait_reaped(level)
    return killed


@dataclass
class SshServer:
    base: Path  # everything of this server: configs, keys, logs, the user's folders
    port: int
    user: str
    uid: int
    home: Path  # the login user's home folder (sftp://ictest/~/...)
    root: Path  # a folder the login user owns, for repositories
    key: Path  # the client's private key
    config: Path  # the client's ssh config (IMAGECHAIN_SSH_CONFIG)
    known_hosts: Path  # the client's known hosts file, holding the server's key
    host_key_line: str  # the server's public key, as in a .pub file
    alias: str = ALIAS
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def create(cls) -> SshServer:
        pw = ensure_user()
        base = Path(tempfile.mkdtemp(prefix="imagechain-sshd-", dir="/tmp"))
        base.chmod(0o755)  # sshd reads authorized_keys as the user
        root = base / "data"
        root.mkdir()
        os.chown(root, pw.pw_uid, pw.pw_gid)
        client = base / "client"
        client.mkdir(mode=0o700)
        host_key_line = keygen(base / "ssh_host_ed25519_key", "imagechain-test-host")
        (base / "authorized_keys").write_text(keygen(client / "id_ed25519") + "\n")
        srv = cls(base=base, port=free_port(), user=USER, uid=pw.pw_uid, home=Path(pw.pw_dir), root=root,
                  key=client / "id_ed25519", config=client / "config", known_hosts=client / "known_hosts",
                  host_key_line=host_key_line)  # fmt: skip
        srv.write_known_hosts(srv.known_hosts)
        srv.write_config(srv.config)
        return srv

    @property
    def key_name(self) -> str:
        """The server's name in known_hosts files."""
        return f"[127.0.0.1]:{self.port}"

    def write_known_hosts(self, path: Path, key_line: str | None = None) -> None:
        kind, b64 = (key_line or self.host_key_line).split()[:2]
        path.write_text(f"{self.key_name} {kind} {b64}\n")

    def write_config(self, path: Path, *, identity: Path | None = None, known_hosts: Path | None = None,
                     port: int | None = None, user: str | None = None) -> Path:  # fmt: skip
        """A client config for alias `ictest`; each argument replaces what the working one has."""
        path.write_text(f"Host {self.alias}\n"
                        f"    HostName 127.0.0.1\n"
                        f"    Port {port or self.port}\n"
                        f"    User {user or self.user}\n"
                        f"    IdentityFile {identity or self.key}\n"
                        f"    UserKnownHostsFile {known_hosts or self.known_hosts}\n")  # fmt: skip
        return path

    def url(self, folder: str) -> str:
        """The url of a folder below root, through the alias."""
        return f"sftp://{self.alias}{self.root}/{folder}"

    def _sshd_config(self, extra: str = "") -> Path:
        cfg = self.base / "sshd_config"
        cfg.write_text(f"Port {self.port}\n"
                       f"ListenAddress 127.0.0.1\n"
                       f"HostKey {self.base / 'ssh_host_ed25519_key'}\n"
                       f"PidFile {self.base / 'sshd.pid'}\n"
                       f"AuthorizedKeysFile {self.base / 'authorized_keys'}\n"
                       "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                       "UsePAM no\nStrictModes no\nPermitRootLogin no\n"
                       f"AllowUsers {self.user}\n"
                       "Subsystem sftp internal-sftp\n"
                       "MaxStartups 100:30:200\nMaxSessions 100\nMaxAuthTries 10\nLogLevel INFO\n"
                       f"{extra}")  # fmt: skip
        return cfg

    def _config_checked(self) -> Path:
        """sshd_config, with OpenSSH 9.8+'s per-source penalties off (tests fail logins and cut connections
        on purpose; penalised, 127.0.0.1 would be refused for a while) where this sshd knows them."""
        cfg = self._sshd_config("PerSourcePenalties no\n")
        p = subprocess.run([SSHD, "-t", "-f", str(cfg)], capture_output=True, text=True, timeout=30, check=False)
        if p.returncode:
            cfg = self._sshd_config()
            p = subprocess.run([SSHD, "-t", "-f", str(cfg)], capture_output=True, text=True, timeout=30, check=False)
            if p.returncode:
                raise RuntimeError(f"sshd refuses its configuration: {p.stderr.strip()}")
        return cfg

    def start(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation folder
        cfg = self._config_checked()
        with open(self.base / "sshd.log", "ab") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not start: {self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def drop_connections(self) -> int:
        """Kill every per-connection sshd process (not the listener): clients see their connections cut.
        Returns how many processes were killed."""
        return 0 if self.proc is None else cut_connections(self.proc.pid)

    def stop(self) -> None:
        """The listener and every connection gone: connections are refused until start()."""
        if self.proc is None:
            return
        self.drop_connections()
        monitors = _children().get(self.proc.pid, [])
        _wait_reaped(monitors)  # they exit once their connection's processes are gone
        _kill(monitors)
        _wait_reaped(monitors)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.base / "sshd.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def sshd_server() -> Iterator[SshServer]:
    reason = why_not()
    if reason:
        pytest.skip(reason)
    srv = SshServer.create()
    try:
        srv.start()
        yield srv
    finally:
        srv.cleanup()
