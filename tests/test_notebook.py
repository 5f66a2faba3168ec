"""The walkthrough notebook runs end to end (on a tiny random model, so that it cannot rot)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tiny import save_source

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "walkthrough.ipynb"
TEXT = "A latent of a few values per token replaces the keys and values of every head.\n\n" * 60


def test_walkthrough_runs_on_a_tiny_model(tmp_path, monkeypatch):
    save_source("llama-gqa", tmp_path / "src")
    (tmp_path / "text.txt").write_text(TEXT)
    monkeypatch.setenv("TRANSMLA_NOTEBOOK_MODEL", str(tmp_path / "src"))
    monkeypatch.setenv("TRANSMLA_NOTEBOOK_EVAL_TEXT", str(tmp_path / "text.txt"))
    monkeypatch.setenv("TRANSMLA_NOTEBOOK_CALIB_TEXT", str(tmp_path / "text.txt"))
    monkeypatch.setenv("TRANSMLA_NOTEBOOK_SEQ_LEN", "64")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "original perplexity on 2 windows" in outputs
    assert outputs.count("cache kept") == 4
