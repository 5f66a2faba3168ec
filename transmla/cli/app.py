"""The command-line application, its one-line error handling and the shared option parsers."""

from __future__ import annotations

import sys
from functools import wraps
from typing import Callable

import typer
from rich.console import Console
from rich.markup import escape

from transmla.errors import TransMLAError

app = typer.Typer(
    help="Convert multi-head / grouped-query attention checkpoints to Multi-head Latent Attention (MLA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Tables are wide; keep them readable when the output goes to a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 400)


def friendly_errors(command: Callable) -> Callable:
    """Turn TransMLAError and disk failures into one line on stderr and exit code 1; Ctrl-C, SIGTERM and
    SIGHUP clean up and exit with 128 + the signal's number."""
    from transmla.io.failures import disk_error_line, exit_code, terminate_as_interrupt

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with terminate_as_interrupt():
                return command(*args, **kwargs)
        except TransMLAError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            if (line := disk_error_line(exc)) is None:
                raise
            err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            err_console.print("interrupted: nothing was written")
            raise typer.Exit(exit_code(exc)) from None

    return wrapper


def resolve_device(device: str) -> str:
    """cpu or cuda for --device cpu|cuda|auto; one clear error where no CUDA device is."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TransMLAError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise TransMLAError(f"--device {device!r} is not one of cpu, cuda, auto")
    return device
