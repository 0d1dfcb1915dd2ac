"""User errors and the command-line wrapper every kvasir-dali command runs under.

A `UserError` is a problem the user can fix (a bad path, option, manifest, checkpoint): the
command prints its message in one to three lines and exits 2. Anything else is a bug and keeps
its traceback. SIGINT and SIGTERM end a command like an error does (cleanup runs through the
normal exception path), with one line and exit 130 or 143. `--debug` or `KVASIR_DEBUG=1` shows
the traceback of user errors too. Standard library only: `kvasir_dali` builds on it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable


class UserError(Exception):
    """Something the user can fix; the message says what, which file, and what to do."""


class Terminated(BaseException):
    """SIGTERM received; a BaseException so that `except Exception` cleanup does not eat it."""


def debug_wanted(argv: list[str]) -> bool:
    """`--debug` anywhere on the command line, or KVASIR_DEBUG set to a true value."""
    return "--debug" in argv or os.environ.get("KVASIR_DEBUG", "") not in ("", "0", "false")


def _on_sigterm(signum, frame) -> None:
    raise Terminated


def run_command(prog: str, main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run `main(argv)` (argv without `--debug`) and turn its ending into an exit status."""
    debug = debug_wanted(argv)
    argv = [a for a in argv if a != "--debug"]
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C
        if debug:
            raise
        print(f"{prog}: stopped by SIGINT", file=sys.stderr)
        return 130
    except Terminated:
        if debug:
            raise
        print(f"{prog}: stopped by SIGTERM", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
