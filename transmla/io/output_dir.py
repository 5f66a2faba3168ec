"""An output folder that appears only when complete, plus the disk checks to run before heavy work."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transmla.errors import TransMLAError


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _aside_prefix(final: Path) -> str:
    return f".{final.name}.old-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale_temp_dirs(final: Path | str) -> list[Path]:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` folders left next to `final` by a run that was killed; return them.

    Names carry the writer's process id; folders of a process that is still running (this one included) are
    left alone.
    """
    final = Path(final)
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    for prefix in (_temp_prefix(final), _aside_prefix(final)):
        for path in final.parent.glob(f"{prefix}*"):
            pid = path.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and _pid_alive(int(pid)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_writable(folder: Path | str) -> None:
    """Raise TransMLAError unless `folder` is an existing folder in which a file can be created."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TransMLAError(f"{folder} is not a folder; choose another --out")
    probe = folder / f".transmla-write-test-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise TransMLAError(f"cannot write to {folder} ({exc.strerror or exc}); choose another --out") from exc


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest parent that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(final: Path | str, overwrite: bool = False) -> None:
    """Raise TransMLAError where `final` can not become an output folder: it is a file or a link, a non-empty
    folder (unless `overwrite`), or the nearest existing folder above it is not writable. Cheap: run it before
    heavy work."""
    final = Path(final).expanduser().absolute()
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise TransMLAError(f"{final} exists and is not a folder; choose another --out")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise TransMLAError(f"{final} exists and is not empty; pass --overwrite or choose another --out")
    check_writable(nearest_existing(final.parent))


def _format_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_free_disk(folder: Path | str, needed_bytes: int, margin: float = 1.1) -> None:
    """Raise TransMLAError if the disk holding `folder` (or its nearest existing parent) lacks `needed_bytes * margin`."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    required = needed_bytes * margin
    if free < required:
        raise TransMLAError(
            f"not enough disk space for {folder}: about {_format_bytes(required)} needed, "
            f"{_format_bytes(free)} free; free space or choose another --out"
        )


def _make_unique_dir(parent: Path, prefix: str) -> Path:
    """Create `parent/prefix<pid>-<random>` with the usual (umask) permissions."""
    while True:
        path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


@contextmanager
def atomic_output_dir(final: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final` that is renamed to `final` only if the block completes.

    Checks up front that `final` can be written (raising TransMLAError otherwise). On any exception, including
    KeyboardInterrupt, the temporary folder is removed and `final` is left as it was.
    """
    final = Path(final).expanduser().absolute()
    parent = final.parent
    check_output_dir(final, overwrite)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TransMLAError(
            f"cannot create the folder {parent} ({exc.strerror or exc}); choose another --out"
        ) from exc
    check_writable(parent)
    cleanup_stale_temp_dirs(final)

    tmp = _make_unique_dir(parent, _temp_prefix(final))
    try:
        yield tmp
        _commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`, moving an existing `final` aside first and deleting it afterwards."""
    if not final.exists():
        tmp.rename(final)
        return
    aside = _make_unique_dir(final.parent, _aside_prefix(final))
    aside.rmdir()
    final.rename(aside)
    try:
        tmp.rename(final)
    except BaseException:
        aside.rename(final)
        raise
    shutil.rmtree(aside, ignore_errors=True)
