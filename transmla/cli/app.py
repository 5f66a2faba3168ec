"""The command-line application, its one-line error handling and the shared option parsers."""

from __future__ import annotations

import sys
from functools import wraps
from typing import Callable, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from transmla.errors import INTERRUPTED, TransMLAError


def hide_flag_types() -> None:
    """typer's rich help prints a value type after every flag (`--overwrite <bool>`, `--help <bool>`), though a
    flag takes no value: show none for flags, in every command's help."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "hides_flag_types", False):
        return

    def display_type_rich(self: TyperOption, ctx: typer.Context) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.hides_flag_types = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


hide_flag_types()
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
    SIGHUP clean up and exit with 128 + the signal's number (as does any error that follows a Ctrl-C)."""
    from transmla.io.failures import disk_error_line, exit_code, interrupted, terminate_as_interrupt

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with terminate_as_interrupt():
                return command(*args, **kwargs)
        except TransMLAError as exc:
            fail(str(exc))
        except KeyboardInterrupt as exc:
            err_console.print(INTERRUPTED)
            raise typer.Exit(exit_code(exc)) from None
        except Exception as exc:
            line = disk_error_line(exc) if isinstance(exc, OSError) else None
            if line is not None:
                fail(line)
            if not interrupted():
                raise
            err_console.print(INTERRUPTED)
            raise typer.Exit(130) from None

    return wrapper


def fail(line: str) -> NoReturn:
    """Print `error: LINE` on stderr and exit with code 1."""
    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1) from None


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
