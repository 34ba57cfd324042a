"""The console script: stop signals are routed before anything heavy is imported, so a Ctrl-C or
SIGTERM in the first instant ends with one line and exit 128 + signal, never a traceback. What the
interpreter does before the first line of this module (its own start-up, finding the package) is Python's:
a Ctrl-C there gets its KeyboardInterrupt traceback, a SIGTERM its default death."""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # built in, without stubs

# Noted from the first line the interpreter runs of imagechain: the signal module imports enum before it can
# set a handler, and under load a Ctrl-C in those tens of milliseconds came out as a KeyboardInterrupt
# traceback from inside that import. The built-in _signal needs no import. So importing this module takes
# over the stop signals: only the console script and `python -m imagechain` import it.
_early: list[int] = []


def _note(signum: int, _frame: object) -> None:
    _early.append(signum)


for _s in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
    _signal.signal(_s, _note)

import gc  # noqa: E402 - after the handlers: as little as possible runs without them
import os  # noqa: E402
import sys  # noqa: E402

from . import interrupts  # noqa: E402
from .interrupts import Stopped  # noqa: E402


def run() -> None:
    # numpy's BLAS would start a thread per core that spins in the background; imagechain does no linear
    # algebra (measured: 2% of a backup's CPU time went to those threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # a terminal or log whose encoding cannot show a name (a chain called 日本 under a Latin-1 locale) gets
    # it escaped, as stderr already does: the table printed to stdout died with a UnicodeEncodeError
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        interrupts.install()  # from here a stop signal raises Stopped (or waits in deferred())
        if _early:  # one came while the modules that route them were imported
            raise Stopped(_early[0])
        # held until the imports are done: a signal raised inside an extension module's import (numpy's)
        # comes out as an ImportError with a traceback, not as the stop it was
        with interrupts.deferred():
            from .cli import main
        # what the imports made lives until exit: keep the cyclic garbage collector from walking it again
        # and again while a backup allocates (1.5% of a backup's CPU time went to those walks)
        gc.freeze()
    except KeyboardInterrupt as e:
        stop = interrupts.as_stopped(e)
        sys.stderr.write(f"imagechain: interrupted ({stop.name}) while starting; nothing was done\n")
        sys.exit(stop.exit_code)
    import click

    try:
        main.main(standalone_mode=False)
    except click.exceptions.Abort as e:  # click turns an interrupt while parsing into Abort
        stop = interrupts.as_stopped(e.__cause__ if isinstance(e.__cause__, KeyboardInterrupt) else Stopped())
        sys.stderr.write(f"imagechain: interrupted ({stop.name}); {stop.what}\n")
        sys.exit(stop.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    finally:
        # the outcome is decided and said: a signal from now on must not turn it into a death by signal
        # while the interpreter shuts down (its handlers are gone by then)
        interrupts.hold()
