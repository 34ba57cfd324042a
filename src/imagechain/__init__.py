"""imagechain: image-based, block-level backups of disk volumes as chains of image files."""

__version__ = "0.1.0"
