"""One exception hierarchy; every error a user can see maps to one exit code here and nowhere else."""

from __future__ import annotations


class ImagechainError(Exception):
    """Base of every error that is reported to the user as one line."""

    exit_code = 1


class UsageError(ImagechainError):
    """An argument has an invalid value (block size, split size, selector syntax...)."""

    exit_code = 2


class SourceError(ImagechainError):
    """The source volume is missing, unreadable or changed size while being read."""

    exit_code = 3


class RepositoryError(ImagechainError):
    """The repository is missing, not a folder, or not writable."""

    exit_code = 4


class PointNotFoundError(ImagechainError):
    """No point matches the address given."""

    exit_code = 5


class AmbiguousPointError(ImagechainError):
    """More than one point or chain matches the address given."""

    exit_code = 6


class IntegrityError(ImagechainError):
    """Stored data does not match its checksums or digests, or a chain link is broken."""

    exit_code = 7


class ChainBrokenError(IntegrityError):
    """A parent point is missing or is not the point the child was made from."""


class TargetError(ImagechainError):
    """The restore target is too small, not writable, or exists without --force."""

    exit_code = 8


class LockedError(ImagechainError):
    """Another process holds (or held, and died holding) the chain's write lock."""

    exit_code = 9


class NoSpaceError(ImagechainError):
    """The repository (or restore target) ran out of space; nothing was published."""

    exit_code = 10


class CredentialsError(ImagechainError):
    """An encrypted point needs a passphrase or identity that was not given, or the one given is wrong."""

    exit_code = 11


class SnapshotError(ImagechainError):
    """A snapshot could not be taken or did not hold (freeze refused or too long, clone or LVM failure,
    a failing pre-snapshot hook or database step); nothing was published and everything was thawed."""

    exit_code = 12


class MountError(ImagechainError):
    """A mount, unmount or NBD export could not be set up or taken down (busy, FUSE missing, a port
    in use); what was set up is taken down again."""

    exit_code = 13


# Stop signals are not errors: interrupts.Stopped exits with 128 + the signal number (130 SIGINT,
# 143 SIGTERM, 129 SIGHUP) after saying what the stop left behind.
