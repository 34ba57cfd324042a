"""Read-only FUSE views of points (disk.img and one file per partition), the filesystems inside them
mounted read-only, and file-level restore (docs/MOUNT.md)."""
