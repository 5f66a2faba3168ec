"""`python -m transmla` and the `transmla` command: the command line, with Ctrl-C at any point (even while the
heavy libraries are still being imported) ending in one line and exit code 130."""

import os
import signal
import sys

from transmla.errors import INTERRUPTED


def _exit_at_once(signum: int, frame: object) -> None:
    """Outside a command's body (imports, parsing) nothing is being written: leave at once, before a library
    interrupted mid-import breaks in odd ways. Commands make Ctrl-C raise KeyboardInterrupt, so that they clean up."""
    os.write(2, f"{INTERRUPTED}\n".encode())
    os._exit(130)


def main() -> None:
    """Run the command line. A SIGINT handler that is not Python's own (e.g. SIG_IGN in a background job) is left
    alone; once the command is over, a late Ctrl-C no longer kills the exit."""
    owns_sigint = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if owns_sigint:
        signal.signal(signal.SIGINT, _exit_at_once)
    try:
        from transmla.cli import app

        app()
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    finally:
        if owns_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
