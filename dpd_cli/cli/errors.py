"""The one place where user errors become a message and exit code 2."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Iterator

import typer
from rich.markup import escape

from dpd_cli import interrupt
from dpd_cli.cli.console import error_console
from dpd_cli.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError


def _debug() -> bool:
    return os.environ.get("DPD_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = EXIT_USER_ERROR, traceback: bool = True) -> typer.Exit:
    """Print ``Error: message`` to stderr (and how to see the traceback, if worth seeing); return the Exit to raise."""
    error_console().print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if code == EXIT_USER_ERROR and traceback and not _debug():
        error_console().print("[dim](Set DPD_DEBUG=1 to see the traceback.)[/]", highlight=False)
    return typer.Exit(code)


def _on_sigint(signum, frame) -> None:
    """Ctrl-C or SIGTERM (what torchrun and batch schedulers send): stop at the next safe point."""
    if interrupt.requested() or not interrupt.in_safe_points():
        # Second Ctrl-C, or nothing to finish (loading data): leave at once; every write is atomic.
        raise KeyboardInterrupt
    interrupt.request()
    what = "Ctrl-C" if signum == signal.SIGINT else "the signal"
    print(f"\nStopping at the next safe point ({what} again to quit at once)...", file=sys.stderr, flush=True)


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Translate user errors and interruptions into messages and exit codes (2, 130)."""
    interrupt.clear()
    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread (e.g. inside some test runners)
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_sigint)
    try:
        yield
    except (UserError, KeyboardInterrupt) as e:  # interrupt.Interrupted is a KeyboardInterrupt
        # While the closing message is printed, a signal (torchrun sends SIGTERM to every rank once one has
        # failed) must not cut it short: Typer would turn the handler's KeyboardInterrupt into a silent exit 130.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if isinstance(e, UserError):
            if _debug():  # the traceback on stderr, then the same message and exit code as without DPD_DEBUG
                traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
            raise fail(str(e), traceback=e.has_traceback) from None
        if isinstance(e, interrupt.Interrupted):
            raise fail(f"Interrupted: {e.resume_hint}.", EXIT_INTERRUPTED) from None
        rerun = "rerun the same command (with --resume for distill) to continue"
        raise fail(f"Interrupted. Finished pieces are kept; {rerun}.", EXIT_INTERRUPTED) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        interrupt.clear()
