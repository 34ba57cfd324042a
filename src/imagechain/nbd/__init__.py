"""An NBD server over a point view (read-only, or with a copy-on-write overlay), and exports to VM
image formats through it (docs/NBD.md)."""
