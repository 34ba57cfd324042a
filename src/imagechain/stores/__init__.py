"""Where image files live. The engine talks to a Store; local folders now, SFTP and S3 later."""

from .base import TEMP_MARK, AtomicWriter, RandomReader, Store, StoreEntry, temporary_of
from .local import LocalStore

__all__ = ["TEMP_MARK", "AtomicWriter", "LocalStore", "RandomReader", "Store", "StoreEntry", "temporary_of"]
