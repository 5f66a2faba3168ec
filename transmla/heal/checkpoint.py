"""The work folder of a healing run: its settings, periodic training checkpoints and what `--resume` needs."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transmla.errors import TransMLAError

RUN_FILE = "heal_run.json"
CHECKPOINT_PREFIX = "checkpoint-"
OWN_FILES = {RUN_FILE}


def default_work_dir(out: Path) -> Path:
    """`OUT.heal-work` beside the output folder."""
    out = Path(out).expanduser().absolute()
    return out.parent / f"{out.name}.heal-work"


def checkpoints(work: Path) -> list[Path]:
    """Complete checkpoints in the work folder, oldest first."""
    if not work.is_dir():
        return []
    found = [p for p in work.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "complete").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def checkpoint_path(work: Path, step: int) -> Path:
    return work / f"{CHECKPOINT_PREFIX}{step:08d}"


def mark_complete(path: Path, keep: int) -> None:
    """Mark a checkpoint as fully written and delete all but the newest `keep` complete ones (main process)."""
    (path / "complete").write_text("")
    for old in checkpoints(path.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for partial in path.parent.glob(f"{CHECKPOINT_PREFIX}*"):
        if partial.is_dir() and not (partial / "complete").exists() and partial != path:
            shutil.rmtree(partial, ignore_errors=True)


def check_work_dir(work: Path, settings: dict[str, Any], resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start; raises if the folder does not allow the request.

    A run's settings are stored in the folder; `--resume` requires the same settings, and a folder holding
    checkpoints is never reused without `--resume` or `--overwrite`. Reads only.
    """
    existing = checkpoints(work)
    run_file = work / RUN_FILE
    if resume:
        if not existing or not run_file.is_file():
            raise TransMLAError(f"nothing to resume: {work} holds no checkpoint; run without --resume to start")
        saved = json.loads(run_file.read_text())
        changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if changed:
            listing = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise TransMLAError(f"--resume needs the settings of the interrupted run; changed: {listing}")
        return existing[-1]
    if existing and not overwrite:
        raise TransMLAError(
            f"{work} holds checkpoints of an earlier run: pass --resume to continue it or --overwrite to start again"
        )
    if work.exists():
        if not work.is_dir():
            raise TransMLAError(f"{work} is not a folder; choose another --work-dir")
        foreign = [p.name for p in work.iterdir() if p.name not in OWN_FILES and not p.name.startswith(CHECKPOINT_PREFIX)]
        if foreign:
            raise TransMLAError(f"{work} holds files of its own ({', '.join(sorted(foreign)[:3])}); choose another --work-dir")
    return None


def start_work_dir(work: Path, settings: dict[str, Any]) -> None:
    """An empty work folder holding the run's settings (main process, after `check_work_dir`)."""
    if work.exists():
        shutil.rmtree(work)
    try:
        work.mkdir(parents=True)
    except OSError as exc:
        raise TransMLAError(f"cannot create the work folder {work} ({exc.strerror or exc}); choose another --work-dir") from exc
    (work / RUN_FILE).write_text(json.dumps(settings, indent=2, default=str) + "\n")


@dataclass
class TrainState:
    """Progress saved with every checkpoint (registered with the Accelerator)."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "seconds": self.seconds, "history": self.history,
                "evals": self.evals, "baseline": self.baseline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
