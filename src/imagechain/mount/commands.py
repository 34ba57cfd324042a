"""CLI commands of the mount package (registered on the main group by cli.py)."""

from __future__ import annotations

import click


def register(main: click.Group) -> None:
    """Add mount, umount and restore-files to the CLI."""
