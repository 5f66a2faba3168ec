"""The command line through typer's runner: convert, inspect, eval, and one-line errors on bad input."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from tiny import save_source
from transmla.cli import app

runner = CliRunner()
TEXT = "Latent attention caches a small latent per token, and the rotary key is shared by all heads.\n\n" * 40


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_source("llama-gqa", root / "src")
    (root / "text.txt").write_text(TEXT)
    return root


def run(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert fragment in lines[0]


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("convert", "inspect", "eval"):
        assert command in result.output


def test_convert_help_states_the_defaults_that_depend_on_the_source():
    result = run("convert", "--help", env={"COLUMNS": "400"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for fragment in ("default: the --kv-budget's cache minus the RoPE key", "default: measured under the --kv-budget",
                     "default 0.5 when neither -r nor -d is given", "default: 256 on a GPU, 16 on a CPU",
                     "default: 200 on a GPU, 0 on a CPU"):
        assert fragment in text


def test_convert_then_eval_with_compare(source, tmp_path):
    out = tmp_path / "mla"
    result = run("convert", source / "src", "--out", out, "-r", "24", "-d", "8", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file()
    result = run("eval", out, "--compare", source / "src", "--text-file", source / "text.txt", "--seq-len", "64",
                 "--max-windows", "3", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["windows"] for r in rows] == [3, 3]
    assert rows[0]["kv_values_per_token"] == 2 * 64 and rows[1]["kv_values_per_token"] == 2 * 32
    assert rows[1]["kv_compression"] == pytest.approx(2.0)
    assert rows[1]["perplexity_ratio"] == pytest.approx(rows[1]["perplexity"] / rows[0]["perplexity"])


def test_inspect_reports_sizes(source):
    result = run("inspect", source / "src", "-r", "24", "-d", "8", "--bytes-per-value", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [row["values_after"] for row in report["layers"]] == [32, 32]
    assert report["bytes_before"] == 2 * 64 * 2 and report["bytes_after"] == 2 * 32 * 2
    assert report["compression"] == pytest.approx(2.0)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["-r", "999"], "--kv-lora-rank 999 is out of range"),
        (["-d", "7"], "--rope-dim 7 must be even"),
        (["-d", "40"], "--rope-dim 40 must be even and in 2..32"),
        (["--method", "magic"], "--method 'magic'"),
        (["--device", "tpu"], "--device 'tpu'"),
    ],
)
def test_convert_bad_options(source, tmp_path, args, fragment):
    result = run("convert", source / "src", "--out", tmp_path / "mla", "--method", "svd", *args)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "mla").exists()


def test_missing_source_folder(tmp_path):
    result = run("convert", tmp_path / "nowhere", "--out", tmp_path / "mla")
    assert_one_line_error(result, "not found")
    assert not (tmp_path / "mla").exists()


def test_unwritable_output(source, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run("convert", source / "src", "--out", blocker / "mla", "-r", "24", "-d", "8", "--method", "svd")
    assert_one_line_error(result, "--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions; covered by test_unwritable_output")
def test_read_only_parent(source, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    result = run("convert", source / "src", "--out", parent / "mla", "-r", "24", "-d", "8", "--method", "svd")
    assert_one_line_error(result, "--out")


def test_existing_output_needs_overwrite(source, tmp_path):
    out = tmp_path / "mla"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run("convert", source / "src", "--out", out, "-r", "24", "-d", "8", "--method", "svd")
    assert_one_line_error(result, "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    result = run("convert", source / "src", "--out", out, "-r", "24", "-d", "8", "--overwrite", "--method", "svd")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_eval_needs_text(source):
    result = run("eval", source / "src")
    assert_one_line_error(result, "--text-file")


def test_calibrated_flags_reach_the_conversion(source, tmp_path):
    out = tmp_path / "mla"
    result = run("convert", source / "src", "--out", out, "-r", "12", "-d", "8", "--device", "cpu", "--method", "whiten",
                 "--calib-file", source / "text.txt", "--calib-samples", "2", "--calib-seq-len", "32",
                 "--score-weight", "5", "--calib-offload", "always")
    assert result.exit_code == 0, result.output
    options = json.loads((out / "transmla.json").read_text())["options"]
    assert options["score_weight"] == 5.0 and options["calib_offload"] == "always"
    assert json.loads((out / "config.json").read_text())["kv_lora_rank"] in (12, [12, 12])


def test_bad_offload_mode_is_one_line(source, tmp_path):
    result = run("convert", source / "src", "--out", tmp_path / "mla", "-r", "12", "-d", "8", "--device", "cpu",
                 "--method", "whiten", "--calib-file", source / "text.txt", "--calib-offload", "sometimes")
    assert_one_line_error(result, "sometimes")
    assert not (tmp_path / "mla").exists()


def test_non_positive_score_weight_is_one_line(source, tmp_path):
    result = run("convert", source / "src", "--out", tmp_path / "mla", "-r", "12", "-d", "8", "--device", "cpu",
                 "--method", "whiten", "--calib-file", source / "text.txt", "--score-weight", "0")
    assert_one_line_error(result, "--score-weight")
    assert not (tmp_path / "mla").exists()


def test_folder_without_tokenizer_files_converts_or_fails_in_one_line(tmp_path, source):
    """Weights and config only (as `save_pretrained` of a model writes): converted without a tokenizer, or one
    line where calibration text needs one."""
    from tiny import tiny_model

    tiny_model("llama-gqa").save_pretrained(tmp_path / "bare")
    result = run("convert", tmp_path / "bare", "--out", tmp_path / "mla", "-r", "24", "-d", "8", "--device", "cpu", "--method", "svd")
    assert result.exit_code == 0, result.output
    assert "no tokenizer files" in result.output
    assert (tmp_path / "mla" / "model.safetensors").is_file() and not (tmp_path / "mla" / "tokenizer.json").exists()
    result = run("convert", tmp_path / "bare", "--out", tmp_path / "mla2", "--method", "whiten",
                 "--calib-file", source / "text.txt", "--device", "cpu")
    assert_one_line_error(result, "needs a tokenizer")
    assert not (tmp_path / "mla2").exists()


def test_python_dash_m_runs_the_command_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "transmla", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "convert" in done.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["-r", "0"], "--kv-lora-rank 0 is out of range: with --rope-dim 8 this model allows 1..56"),
        (["-r", "-4"], "--kv-lora-rank -4 is out of range: with --rope-dim 8 this model allows 1..56"),
        (["-d", "0"], "--rope-dim 0 must be even"),
        (["--bytes-per-value", "0"], "--bytes-per-value 0 must be at least 1"),
    ],
)
def test_inspect_bad_options(source, args, fragment):
    assert_one_line_error(run("inspect", source / "src", "-d", "8", *args), fragment)


def test_convert_refuses_a_zero_rank(source, tmp_path):
    result = run("convert", source / "src", "--out", tmp_path / "mla", "--method", "svd", "-d", "8", "-r", "0")
    assert_one_line_error(result, "--kv-lora-rank 0 is out of range: with --rope-dim 8 this model allows 1..56")
    assert not (tmp_path / "mla").exists()


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-converted") / "mla"
    result = run("convert", source / "src", "--out", out, "-r", "24", "-d", "8", "--device", "cpu", "--method", "svd")
    assert result.exit_code == 0, result.output
    return out


def test_inspect_of_a_converted_folder_refuses_planned_sizes(converted):
    assert_one_line_error(run("inspect", converted, "-r", "8"), "is converted already and reports its own R and D")


@pytest.mark.parametrize("fmt", ["ours", "gguf"])
def test_export_format_names_what_export_writes(converted, tmp_path, fmt):
    result = run("export", converted, "--out", tmp_path / "ds", "--format", fmt)
    assert_one_line_error(result, f"export writes --format deepseek only, not {fmt!r}")
    assert "what `transmla convert` writes" in result.output and "is not one of ours, deepseek" not in result.output
    assert not (tmp_path / "ds").exists()


def fail_on_model_load(monkeypatch) -> None:
    import transmla.io.source

    def fail(*args, **kwargs):
        raise AssertionError("the arguments should have been checked before any model was loaded")

    monkeypatch.setattr(transmla.io.source, "load_model", fail)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--max-windows", "0"], "--max-windows 0 must be at least 1"),
        (["--seq-len", "1"], "--seq-len 1 is too short"),
        (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
        (["--dtype", "auto"], "--dtype 'auto' is not one of float32, bfloat16, float16"),
        (["--compare", "nowhere"], "model 'nowhere' not found"),
    ],
)
def test_eval_checks_its_arguments_before_loading_models(source, converted, monkeypatch, args, fragment):
    fail_on_model_load(monkeypatch)
    assert_one_line_error(run("eval", converted, "--text-file", source / "text.txt", "--device", "cpu", *args), fragment)


def test_eval_of_an_empty_text_file_is_refused_before_loading(converted, tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    fail_on_model_load(monkeypatch)
    assert_one_line_error(run("eval", converted, "--text-file", empty, "--device", "cpu"), "is empty")


def test_eval_batch_size_has_help():
    text = " ".join(run("eval", "--help", env={"COLUMNS": "300"}).output.split())
    assert "--batch-size <int> Windows per forward pass" in text


@pytest.mark.parametrize("command", ["eval", "heal", "convert"])
def test_dataset_without_a_network_fails_fast_in_one_line(source, converted, tmp_path, monkeypatch, command):
    import time

    from datasets import config
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    args = {"eval": ["eval", converted, "--dataset", "wikitext2", "--device", "cpu"],
            "heal": ["heal", converted, "--out", tmp_path / "out", "--tokens", "1k", "--dataset", "wikitext2"],
            "convert": ["convert", source / "src", "--out", tmp_path / "out", "--calib-dataset", "wikitext2", "--device", "cpu"]}
    start = time.monotonic()
    result = run(*args[command])
    lines = [line for line in result.output.strip().splitlines() if line.strip() and not line.startswith("note:")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "dataset 'wikitext2' needs the Hugging Face hub (http://127.0.0.1:9), which can not be reached" in lines[0]
    assert "--text-file" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert time.monotonic() - start < 10 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["convert", "heal", "export", "eval", "inspect"])
def test_help_shows_no_type_after_flags(command):
    text = run(command, "--help", env={"COLUMNS": "300"}).output
    assert "<bool>" not in text
    flag = {"convert": "--overwrite", "heal": "--resume", "export": "--rope-interleave", "eval": "--json", "inspect": "--json"}[command]
    assert flag in text and "--help" in text


def test_output_folders_of_the_docs_are_ignored_by_git():
    import re
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("needs a git checkout")
    docs = (root / "README.md").read_text() + (root / "docs" / "serving.md").read_text()
    names = {name for name in re.findall(r"--out ([^\s`)]+)", docs) if "/" not in name and not name.isupper()}
    assert {"smollm2-mla", "smollm2-ds", "smollm2-healed", "llama3-mla"} <= names
    for name in sorted(names | {"smollm2-mla-r64", ".smollm2-mla.tmp-123-abcd", "smollm2-mla.heal-work"}):
        done = subprocess.run(["git", "check-ignore", "-q", f"{name}/model.safetensors"], cwd=root)
        assert done.returncode == 0, f"{name}/ is not in .gitignore"
