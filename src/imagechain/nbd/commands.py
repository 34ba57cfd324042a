"""CLI commands of the nbd package (registered on the main group by cli.py)."""

from __future__ import annotations

import click


def register(main: click.Group) -> None:
    """Add serve and export to the CLI."""
