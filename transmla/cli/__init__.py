"""The `transmla` command line: convert, heal, export, eval and inspect."""

from . import convert, heal, export, evaluate  # noqa: F401, I001  (each registers its commands, in this order)
from .app import app


def main() -> None:  # pragma: no cover
    app()


__all__ = ["app", "main"]
