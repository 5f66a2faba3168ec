"""Conversions that are killed, run out of disk, or meet a broken checkpoint never leave a broken output, and the
same input always gives the same bytes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import transmla.convert.stream as convert_module
import transmla.io.writer as writer_module
from tiny import interrupt_second_layer, save_source
from transmla.cli import app
from transmla.io.failures import Terminated, terminate_as_interrupt
from transmla.io import SafetensorsSource, ShardedSafetensorsWriter

ROOT = Path(__file__).resolve().parents[1]
ARGS = ("-r", "24", "-d", "8", "--device", "cpu", "--method", "svd")
runner = CliRunner()

# Runs the CLI with every layer's attention math slowed down, so that a signal lands mid-conversion.
SLOW_CLI = """
import time
import transmla.convert.stream as c
real = c.convert_layer
def slow(*args, **kwargs):
    time.sleep(2.0)
    return real(*args, **kwargs)
c.convert_layer = slow
from transmla.cli import app
app()
"""


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, fragment: str) -> str:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip() and "converting layers" not in line]
    assert len(lines) == 1, result.output
    assert fragment in lines[0], lines[0]
    return lines[0]


def leftovers(parent: Path, name: str = "mla") -> list[str]:
    """Temporary or set-aside folders of OUT=parent/name."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("robust") / "src"
    save_source("llama-gqa", folder)
    return folder


@pytest.fixture()
def sharded(tmp_path) -> Path:
    folder = tmp_path / "src"
    save_source("llama-gqa", folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def no_layer_math(monkeypatch) -> None:
    """Fail the test if the conversion gets as far as the per-layer math."""

    def fail(*args, **kwargs):
        raise AssertionError("the error should have been raised before any layer was converted")

    monkeypatch.setattr(convert_module, "convert_layer", fail)


# -- killed midway ------------------------------------------------------------------------------------------


def start_slow_conversion(src: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, "convert", str(src), "--out", str(out), *ARGS],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_partial_shard(parent: Path, proc: subprocess.Popen, timeout: float = 120.0) -> Path:
    """The temporary folder, once its first shard is being written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for tmp in parent.glob(".mla.tmp-*"):
            if any(tmp.glob("_shard-*.partial")):
                return tmp
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the conversion never started writing")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_killed_conversion_leaves_no_output_and_rerun_completes(source, tmp_path, sig, code):
    out = tmp_path / "mla"
    proc = start_slow_conversion(source, out)
    tmp = wait_for_partial_shard(tmp_path, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert not out.exists()
    if sig == signal.SIGKILL:
        assert leftovers(tmp_path) == [tmp.name]  # nothing could clean up; the next run does
    else:
        assert "interrupted" in stderr and "Traceback" not in stderr
        assert leftovers(tmp_path) == []

    result = run("convert", source, "--out", out, *ARGS)
    assert result.exit_code == 0, result.output
    assert leftovers(tmp_path) == []
    assert {"config.json", "model.safetensors", "modeling_transmla.py"} <= set(os.listdir(out))


def test_sigterm_handler_is_scoped():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as info, terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_interrupt_during_overwrite_keeps_the_old_output(source, tmp_path, monkeypatch):
    out = tmp_path / "mla"
    assert run("convert", source, "--out", out, *ARGS).exit_code == 0
    before = snapshot(out)
    interrupt_second_layer(monkeypatch)
    result = run("convert", source, "--out", out, "-r", "16", "-d", "8", "--device", "cpu", "--overwrite", "--method", "svd")
    assert result.exit_code == 130
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


# -- disk ---------------------------------------------------------------------------------------------------


def test_free_disk_is_checked_up_front(source, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    no_layer_math(monkeypatch)
    result = run("convert", source, "--out", tmp_path / "mla", *ARGS)
    one_line_error(result, "not enough disk space")
    assert sorted(os.listdir(tmp_path)) == []


def test_stale_temp_folder_is_freed_before_the_disk_check(source, tmp_path, monkeypatch):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".mla.tmp-{dead.pid}-0123abcd"
    stale.mkdir()
    (stale / "_shard-00001.safetensors.partial").write_bytes(b"x" * 1000)
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1, 1, 0) if stale.exists() else real(path))
    result = run("convert", source, "--out", tmp_path / "mla", *ARGS)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ["mla"]


def test_disk_full_midway_is_one_line_and_leaves_nothing(source, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = writer_module._write_tensor

    def filling(handle, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device", handle.name)
        return real(handle, tensor)

    monkeypatch.setattr(writer_module, "_write_tensor", filling)
    result = run("convert", source, "--out", tmp_path / "mla", *ARGS)
    one_line_error(result, "the disk is full")
    assert sorted(os.listdir(tmp_path)) == []


# -- broken checkpoints -------------------------------------------------------------------------------------


def last_shard(folder: Path) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / sorted(set(index["weight_map"].values()))[-1]


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_broken_shard_is_refused_before_any_work(sharded, tmp_path, monkeypatch, damage):
    shard = last_shard(sharded)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"#" * 16 + data[24:])
    no_layer_math(monkeypatch)
    result = run("convert", sharded, "--out", tmp_path / "mla", *ARGS)
    one_line_error(result, shard.name)
    assert not (tmp_path / "mla").exists() and leftovers(tmp_path) == []


def rewrite_without(folder: Path, name: str) -> None:
    """Re-save a single-file checkpoint without one tensor."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "model.layers.0.post_attention_layernorm.weight",
                                  "lm_head.weight", "model.norm.weight"])
def test_missing_tensor_is_named(tmp_path, monkeypatch, name):
    src = tmp_path / "src"
    save_source("llama-gqa", src)
    rewrite_without(src, name)
    no_layer_math(monkeypatch)
    result = run("convert", src, "--out", tmp_path / "mla", *ARGS)
    one_line_error(result, f"tensor {name} is missing")
    assert not (tmp_path / "mla").exists()


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("intermediate_size", 128, "mlp.gate_proj.weight has shape (96, 64) but the config implies (128, 64)"),
        ("vocab_size", 300, "model.embed_tokens.weight has shape (256, 64)"),
        ("hidden_size", 80, "has shape"),
        ("num_hidden_layers", 1, "weights of 2 layers but its config says num_hidden_layers=1"),
        ("num_hidden_layers", 3, "tensor model.layers.2.input_layernorm.weight (and 8 more) is missing"),
        ("head_dim", 8, "self_attn.q_proj.weight has shape (64, 64) but the config implies (32, 64)"),
    ],
)
def test_config_that_lies_is_refused(tmp_path, monkeypatch, field, value, fragment):
    src = tmp_path / "src"
    save_source("llama-gqa", src)
    config = json.loads((src / "config.json").read_text())
    config[field] = value
    (src / "config.json").write_text(json.dumps(config))
    no_layer_math(monkeypatch)
    result = run("convert", src, "--out", tmp_path / "mla", "-d", "8", "--device", "cpu", "--method", "svd")
    one_line_error(result, fragment)
    assert not (tmp_path / "mla").exists()


# -- the output folder --------------------------------------------------------------------------------------


def test_out_is_an_existing_file(source, tmp_path):
    blocker = tmp_path / "mla"
    blocker.write_text("precious")
    one_line_error(run("convert", source, "--out", blocker, *ARGS, "--overwrite"), "is not a folder")
    assert blocker.read_text() == "precious"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_out_where_nobody_can_write(source):
    one_line_error(run("convert", source, "--out", "/proc/transmla-out", *ARGS), "cannot write to /proc")


@pytest.mark.parametrize("where", ["itself", "parent"])
def test_out_that_would_replace_the_source_is_refused(tmp_path, where):
    src = tmp_path / "models" / "src"
    save_source("llama-gqa", src)
    before = snapshot(src)
    out = src if where == "itself" else src.parent
    one_line_error(run("convert", src, "--out", out, *ARGS, "--overwrite"), "would replace the source")
    assert snapshot(src) == before


# -- determinism and streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize("shard_gib", ["5", "0.00004"])
def test_same_input_gives_byte_identical_output(sharded, tmp_path, shard_gib):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        result = run("convert", sharded, "--out", out, "-r", "20", "-d", "8", "--max-shard-size", shard_gib, "--device", "cpu", "--method", "svd")
        assert result.exit_code == 0, result.output
    first, second = snapshot(outs[0]), snapshot(outs[1])
    assert sorted(first) == sorted(second)
    assert (len([n for n in first if n.endswith(".safetensors")]) > 1) == (shard_gib != "5")
    for name in first:
        assert first[name] == second[name], name


def test_writer_streams_each_tensor_to_disk(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=2**30)
    big = torch.randn(512, 1024)
    writer.add("big", big)
    (partial,) = tmp_path.glob("_shard-*.partial")
    assert partial.stat().st_size >= big.numel() * 4  # on disk already, not held in memory
    writer.add("small", torch.ones(3, dtype=torch.bfloat16))
    writer.finish()
    with SafetensorsSource(tmp_path) as src:
        assert torch.equal(src.get("big"), big) and torch.equal(src.get("small"), torch.ones(3, dtype=torch.bfloat16))


def test_writer_header_outgrowing_its_room(tmp_path):
    tensors = {f"model.layers.{i}.weight": torch.full((i + 1,), float(i)) for i in range(50)}
    writer = ShardedSafetensorsWriter(tmp_path, header_reserve=64, metadata={"format": "pt"})
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    (path,) = writer.finish()
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_size % 8 == 0 and header_size < 4096
