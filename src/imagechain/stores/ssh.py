"""Where an sftp:// URL connects, as the OpenSSH client would: ~/.ssh/config (HostName, Port, User,
IdentityFile, UserKnownHostsFile, ProxyCommand), default keys, the agent, known hosts (an unknown key is
refused unless IMAGECHAIN_SSH_ACCEPT_NEW=1; a changed one always is); then the SSH connection and its
SFTP channel (paramiko for SSH, sftp_wire for SFTP)."""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import paramiko

from ..errors import CredentialsError, RepositoryError, UsageError
from ..sizes import env_seconds
from .sftp_wire import _Lost, _Sftp, _Status

CONNECT_TIMEOUT = 15.0  # IMAGECHAIN_SSH_TIMEOUT overrides it
KEEPALIVE = 15  # seconds between SSH keepalives, so that idle connections survive NAT and firewalls
WINDOW = 16 << 20  # SSH channel window: enough to keep long, fast links busy
PACKET = 256 << 10  # largest SSH packet we accept from the server
DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")

# paramiko logs transport failures with tracebacks; they are reported here as one line instead
logging.getLogger("paramiko").addHandler(logging.NullHandler())

# -- where to connect: the url and ~/.ssh/config ------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    user: str | None
    host: str
    port: int | None
    root: str  # absolute, or relative to the login's home folder ('' is the home folder)
    url: str


def parse_url(url: str) -> _Target:
    """sftp://[user@]host[:port]/path, canonical: host lowercased, path without '.', '//' or a trailing '/'."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "sftp" or not parts.hostname:
        raise UsageError(f"not an sftp url (sftp://[user@]host[:port]/path): {url}")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"invalid port in sftp url: {url}") from None
    if parts.password is not None or parts.query or parts.fragment:
        raise UsageError(f"an sftp url has no password, query or fragment: {url}")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise UsageError(f"an sftp url needs a folder (sftp://host/absolute/path or sftp://host/~/path): {url}")
    segs = [s for s in path.split("/") if s not in ("", ".")]
    if ".." in segs:
        raise UsageError(f"an sftp url may not contain '..': {url}")
    home = bool(segs) and segs[0] == "~"
    if segs and segs[0].startswith("~") and not home:
        raise UsageError(f"only the login's own home folder (~) can start an sftp path: {url}")
    root = "/".join(segs[1:]) if home else "/" + "/".join(segs)
    user = unquote(parts.username) if parts.username else None
    host = parts.hostname.lower()
    netloc = (quote(user, safe="") + "@" if user else "") + (f"[{host}]" if ":" in host else host)
    netloc += f":{port}" if port is not None else ""
    shown = ("/~" + ("/" + root if root else "")) if home else root
    return _Target(user, host, port, root, f"sftp://{netloc}{quote(shown, safe='/~')}")


@dataclass
class _Host:
    hostname: str
    port: int
    user: str
    identity_files: list[str]
    identities_only: bool
    known_hosts: list[str]  # the user's; the first is where an accepted key goes
    global_known_hosts: list[str]
    host_key_alias: str | None = None
    proxy_command: str | None = None
    hash_known_hosts: bool = False


def ssh_config_path() -> str:
    return os.environ.get("IMAGECHAIN_SSH_CONFIG") or os.path.expanduser("~/.ssh/config")


def _expand(path: str, h: str, user: str) -> str:
    home = os.path.expanduser("~")
    for token, value in (("%d", home), ("%u", getpass.getuser()), ("%h", h), ("%r", user)):
        path = path.replace(token, value)
    return os.path.expanduser(path.replace("%%", "%"))


def resolve_host(t: _Target) -> _Host:
    """What OpenSSH would use for t's host: ~/.ssh/config's Host block (HostName, Port, User, IdentityFile,
    UserKnownHostsFile...) under t's own user and port, which win."""
    path = ssh_config_path()
    try:
        cfg = paramiko.SSHConfig.from_path(path) if os.path.isfile(path) else paramiko.SSHConfig()
        o = cfg.lookup(t.host)
    except (OSError, paramiko.SSHException, ValueError) as e:
        raise UsageError(f"cannot read the ssh configuration {path}: {e}") from e
    hostname = str(o.get("hostname", t.host))
    user = t.user or str(o.get("user") or getpass.getuser())
    try:
        port = t.port or int(o.get("port", 22))
    except ValueError:
        raise UsageError(f"invalid Port for {t.host} in {path}: {o.get('port')}") from None
    ids = [os.path.expanduser(p) for p in o.get("identityfile", [])] or [os.path.expanduser(p) for p in DEFAULT_KEYS]

    def files(key: str, default: tuple[str, ...]) -> list[str]:
        value = str(o.get(key, "")).split() or list(default)
        return [_expand(p, hostname, user) for p in value if p.lower() != "none"]

    proxy = o.get("proxycommand")
    return _Host(hostname=hostname, port=port, user=user, identity_files=ids,
                 identities_only=str(o.get("identitiesonly", "no")).lower() == "yes",
                 known_hosts=files("userknownhostsfile", DEFAULT_KNOWN_HOSTS),
                 global_known_hosts=files("globalknownhostsfile", GLOBAL_KNOWN_HOSTS),
                 host_key_alias=o.get("hostkeyalias"),
                 proxy_command=str(proxy) if proxy and str(proxy).lower() != "none" else None,
                 hash_known_hosts=str(o.get("hashknownhosts", "no")).lower() == "yes")  # fmt: skip


def ssh_timeout() -> float:
    return env_seconds("IMAGECHAIN_SSH_TIMEOUT", CONNECT_TIMEOUT)


def _accept_new() -> bool:
    return os.environ.get("IMAGECHAIN_SSH_ACCEPT_NEW", "").strip().lower() in ("1", "yes", "true")


def fingerprint(key: paramiko.PKey) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


# -- connecting -----------------------------------------------------------------------------------------


class _Connector:
    """Opens one authenticated SFTP connection to a host, or says in one line why it cannot."""

    def __init__(self, url: str, h: _Host) -> None:
        self.url, self.h = url, h
        self.key_name = h.host_key_alias or h.hostname
        if h.port != 22:
            self.key_name = f"[{self.key_name}]:{h.port}"

    def fail(self, why: str) -> str:
        return f"cannot connect to {self.url} ({self.h.user}@{self.h.hostname} port {self.h.port}): {why}"

    def connect(self, timeout: float) -> _Sftp:
        sock = self._socket(timeout)
        t = paramiko.Transport(sock)
        try:
            t.banner_timeout = t.auth_timeout = timeout
            t.set_keepalive(KEEPALIVE)
            known = self._known_keys()
            self._prefer(t, known)
            try:
                t.start_client(timeout=timeout)
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise _Lost(self.fail(f"the SSH handshake failed ({e})")) from e
            self._check_host_key(t, known)
            self._authenticate(t)
            return self._sftp(t, timeout)
        except BaseException:
            t.close()
            raise

    def _socket(self, timeout: float) -> socket.socket | paramiko.ProxyCommand:
        h = self.h
        if h.proxy_command:
            try:
                return paramiko.ProxyCommand(h.proxy_command)
            except (paramiko.SSHException, OSError) as e:
                raise RepositoryError(self.fail(f"its ProxyCommand failed: {e}")) from e
        try:
            sock = socket.create_connection((h.hostname, h.port), timeout=timeout)
        except socket.gaierror as e:
            raise RepositoryError(self.fail(f"host {h.hostname} not found ({e.strerror})")) from e
        except ConnectionRefusedError as e:
            raise _Lost(self.fail("connection refused (is the SSH server running on that port?)")) from e
        except TimeoutError as e:
            raise _Lost(self.fail(f"no answer within {timeout:g} s")) from e
        except OSError as e:
            raise _Lost(self.fail(f"unreachable ({e.strerror or e})")) from e
        _tcp_options(sock)
        return sock

    def _known_keys(self) -> paramiko.HostKeys:
        """Every known hosts file's keys. Lines paramiko cannot read (key types it lacks, damage) are
        skipped as ssh skips them, where HostKeys.load would give up on the whole file; so are @revoked and
        @cert-authority lines, which paramiko does not implement."""
        keys = paramiko.HostKeys()
        for path in (*self.h.global_known_hosts, *self.h.known_hosts):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise RepositoryError(self.fail(f"cannot read known hosts file {path}: {e.strerror or e}")) from e
            for line in lines:
                line = line.strip()
                if not line or line.startswith(("#", "@")):
                    continue
                try:
                    entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
                except Exception:
                    continue
                if entry is not None and entry.key is not None:
                    for name in entry.hostnames:
                        keys.add(name, entry.key.get_name(), entry.key)
        return keys

    def _prefer(self, t: paramiko.Transport, known: paramiko.HostKeys) -> None:
        """Ask for a host key type we know for this host, as OpenSSH does: otherwise the server may offer
        another of its keys, which we could not check. And AES-GCM first: paramiko moves ~20% more data
        with it than with AES-CTR and an HMAC."""
        opts = t.get_security_options()
        gcm = [c for c in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com") if c in opts.ciphers]
        opts.ciphers = gcm + [c for c in opts.ciphers if c not in gcm]
        have = known.lookup(self.key_name)
        if not have:
            return
        names: list[str] = []
        for k in have:
            names += ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if k == "ssh-rsa" else [k]
        avail = list(opts.key_types)
        opts.key_types = [n for n in names if n in avail] + [n for n in avail if n not in names]

    def _check_host_key(self, t: paramiko.Transport, known: paramiko.HostKeys) -> None:
        key = t.get_remote_server_key()
        have = known.lookup(self.key_name)
        ours = f"{key.get_name()} {fingerprint(key)}"
        if have:
            match = have.get(key.get_name())
            if match is not None and match == key:
                return
            old = match or next(iter(have.values()))
            raise CredentialsError(self.fail(
                f"the host key of {self.key_name} has CHANGED: the server offers {ours}, the known hosts files "
                f"({', '.join(self.h.known_hosts)}) have {old.get_name()} {fingerprint(old)}; someone may be "
                f"intercepting the connection (man-in-the-middle), or the server was reinstalled: check, then "
                f"remove the old key with ssh-keygen -R '{self.key_name}'"))  # fmt: skip
        if not _accept_new():
            raise CredentialsError(self.fail(
                f"the host key of {self.key_name} is unknown ({ours}); if that fingerprint is the server's, "
                f"accept it with IMAGECHAIN_SSH_ACCEPT_NEW=1 (or by connecting once with ssh)"))  # fmt: skip
        self._remember(key)

    def _remember(self, key: paramiko.PKey) -> None:
        """Append an accepted key to the user's known hosts file, as ssh's StrictHostKeyChecking=accept-new."""
        path = self.h.known_hosts[0] if self.h.known_hosts else os.path.expanduser(DEFAULT_KNOWN_HOSTS[0])
        name = paramiko.HostKeys.hash_host(self.key_name) if self.h.hash_known_hosts else self.key_name
        line = f"{name} {key.get_name()} {key.get_base64()}\n".encode()
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            try:
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)  # fails on an empty file
                    line = (b"" if f.read(1) == b"\n" else b"\n") + line
            except OSError:
                pass
            with open(path, "ab") as f:
                f.write(line)
        except OSError as e:
            raise RepositoryError(self.fail(f"cannot add its host key to {path}: {e.strerror or e}")) from e

    def _keys(self) -> Iterator[tuple[str, paramiko.PKey | None, str]]:
        """(label, key or None, why not) for each key to try: identity files, then the agent's."""
        for path in self.h.identity_files:
            if not os.path.isfile(path):
                continue
            try:
                yield path, paramiko.PKey.from_path(path), ""
            except paramiko.PasswordRequiredException:
                yield path, None, "encrypted: add it to ssh-agent"
            except Exception as e:  # any key file we cannot use is named, not fatal
                yield path, None, f"unusable: {e}"
        if self.h.identities_only or not os.environ.get("SSH_AUTH_SOCK"):
            return
        try:
            agent = paramiko.Agent()
            agent_keys = agent.get_keys()
        except (paramiko.SSHException, OSError):
            return
        try:
            for k in agent_keys:
                yield f"agent key {fingerprint(k)}", k, ""
        finally:
            agent.close()

    def _authenticate(self, t: paramiko.Transport) -> None:
        tried: list[str] = []
        for label, key, why in self._keys():
            if key is None:
                tried.append(f"{label} ({why})")
                continue
            tried.append(label)
            try:
                t.auth_publickey(self.h.user, key)
            except paramiko.BadAuthenticationType as e:
                raise CredentialsError(self.fail(f"the server accepts no SSH keys for {self.h.user} (only "
                                                 f"{', '.join(e.allowed_types)})")) from e  # fmt: skip
            except paramiko.AuthenticationException:
                continue
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise _Lost(self.fail(f"the connection was lost while logging in ({e})")) from e
            if t.is_authenticated():
                return
        keys = "; ".join(tried) if tried else f"no key found ({', '.join(self.h.identity_files)}) and no agent"
        raise CredentialsError(self.fail(f"login as {self.h.user} refused: the server accepted none of the "
                                         f"keys tried ({keys})"))  # fmt: skip

    def _sftp(self, t: paramiko.Transport, timeout: float) -> _Sftp:
        try:
            chan = t.open_session(window_size=WINDOW, max_packet_size=PACKET, timeout=timeout)
            chan.invoke_subsystem("sftp")
            return _Sftp(t, chan, timeout)
        except (_Lost, _Status) as e:
            raise _Lost(self.fail(f"the server's SFTP did not start ({e})")) from e
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise _Lost(self.fail(f"the server offers no SFTP ({e})")) from e


def _parent(path: str) -> str:
    up = path.rpartition("/")[0]
    return up or ("/" if path.startswith("/") else ".")


def _tcp_options(sock: socket.socket) -> None:
    """No Nagle delay for small requests (a pread waits on each); keepalives find a vanished server (a dead
    link, not a closed one) within minutes rather than TCP's hours."""
    opts = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6), ("TCP_USER_TIMEOUT", 120000)):
        if hasattr(socket, name):
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, opt, value in opts:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, opt, value)


