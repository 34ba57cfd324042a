"""CLI commands of the nbd package (registered on the main group by cli.py): serve and export."""

from __future__ import annotations

import ipaddress
import json
import sys

import click

from .. import interrupts
from ..errors import UsageError
from ..sizes import human

DEFAULT_THREADS = 4


def register(main: click.Group) -> None:
    """Add serve and export to the CLI."""
    # imported here: cli.py imports this module while it is itself being imported
    from ..cli import _keyring, handle_errors, key_options, say

    @main.command()
    @click.argument("point")
    @click.option("--listen", metavar="HOST:PORT", help="TCP address to listen on (default 127.0.0.1:10809; "
                  "port 0: any free port, printed).")  # fmt: skip
    @click.option("--socket", "socket_path", metavar="PATH", help="Listen on a Unix socket instead of TCP.")
    @click.option("--overlay", metavar="FILE", help="Make the export writable: writes go to FILE (created "
                  "sparse, or continued), never to the repository.")  # fmt: skip
    @click.option("--name", default="", metavar="NAME", help="Export name (default: empty, what clients ask for "
                  "by default).")  # fmt: skip
    @click.option("--threads", type=click.IntRange(1, 64), default=DEFAULT_THREADS, show_default=True, metavar="N",
                  help="Threads that fetch, decrypt, decode and prove blocks.")  # fmt: skip
    @key_options
    @handle_errors
    def serve(point: str, listen: str | None, socket_path: str | None, overlay: str | None, name: str, threads: int,
              passphrase_file: str | None, identity: str | None) -> None:  # fmt: skip
        """Serve POINT over NBD (read-only, or copy-on-write with --overlay) until stopped (Ctrl-C, SIGTERM):
        for qemu-img, qemu-io, nbdinfo, nbdcopy, or a VM booting the point."""
        from ..address import open_point
        from ..view import PointView
        from .overlay import Overlay
        from .server import NbdServer, close_view, parse_listen

        if listen is not None and socket_path is not None:
            raise UsageError("give --listen or --socket, not both")
        host, port = parse_listen(listen or "")
        res = open_point(point)
        view = PointView(res.repo, res.point, cat=res.catalog, keyring=_keyring(passphrase_file, identity),
                         threads=threads)  # fmt: skip
        ov: Overlay | None = None
        server: NbdServer | None = None
        pid = str(res.point.point_id)[:8]
        try:
            if overlay:
                ov = Overlay.open(overlay, view, res.point.point_id, getattr(res.repo.store, "root", None))
            server = NbdServer(view, overlay=ov, name=name, description=f"imagechain point {pid}")
            uri = server.listen_unix(socket_path) if socket_path else server.listen_tcp(host, port)
            if server.address is not None and not _loopback(host):
                say(f"notice: NBD has neither authentication nor encryption: whoever can reach port "
                    f"{server.address[1]} of {host} reads{' and writes' if ov else ''} this volume")
            mode = "read-only" if ov is None else f"writable, writes go to overlay {overlay}" + \
                ("" if ov.created else f", continued: {human(ov.written_bytes)} written before")  # fmt: skip
            click.echo(f"serving point {pid} ({human(view.size)}, {mode}) at {uri}")
            sys.stdout.flush()  # scripts and tests wait for this line
            try:
                server.serve_forever()
            except KeyboardInterrupt as e:
                stop = interrupts.as_stopped(e)
                stop.what = "the server stopped" + (f"; overlay {overlay} flushed" if ov else "")
                raise stop from None
        finally:
            with interrupts.deferred():  # a second Ctrl-C must not cut the overlay's last flush short
                if server is not None:
                    server.stop()
                if ov is not None:
                    ov.close()
                close_view(view)

    @main.command()
    @click.argument("point")
    @click.argument("out")
    @click.option("--format", "fmt", required=True, type=click.Choice(["raw", "qcow2", "vhdx", "vmdk"]),
                  help="Image format of OUT.")  # fmt: skip
    @click.option("--force", is_flag=True, help="Replace an existing OUT.")
    @click.option("--threads", type=click.IntRange(1, 64), default=DEFAULT_THREADS, show_default=True, metavar="N",
                  help="Threads that fetch, decrypt, decode and prove blocks.")  # fmt: skip
    @key_options
    @click.option("--json", "as_json", is_flag=True)
    @handle_errors
    def export(point: str, out: str, fmt: str, force: bool, threads: int, passphrase_file: str | None,
               identity: str | None, as_json: bool) -> None:  # fmt: skip
        """Write POINT as a VM disk image (raw sparse, qcow2, vhdx or vmdk) to OUT, through qemu-img."""
        from ..address import open_point
        from .export import export as run_export

        res = open_point(point)
        r = run_export(res.repo, res.point, out, fmt, cat=res.catalog, force=force, threads=threads,
                       keyring=_keyring(passphrase_file, identity))  # fmt: skip
        for n in r.notices:
            say(f"notice: {n}")
        if as_json:
            click.echo(json.dumps(r.as_dict(), indent=1))
            return
        rate = r.volume_size / r.duration_s if r.duration_s else 0
        click.echo(f"exported point {r.point_id[:8]} to {out} ({fmt}): volume {human(r.volume_size)}, file "
                   f"{human(r.file_bytes)}, {human(r.allocated_bytes)} allocated, {r.duration_s:.1f} s, "
                   f"{human(rate)}/s")  # fmt: skip


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
