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


# -- broken checkpoints, for every command that reads one ---------------------------------------------------

BROKEN_TENSOR = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("robust-converted") / "mla"
    result = run("convert", source, "--out", out, *ARGS)
    assert result.exit_code == 0, result.output
    return out


def broken_copy(folder: Path, where: Path, damage: str) -> Path:
    """A copy of `folder` with its config.json not JSON, its weights truncated, or one tensor missing."""
    copy = where / f"{damage}-{folder.name}"
    shutil.copytree(folder, copy)
    if damage == "json":
        (copy / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 64,,\n}')
    elif damage == "truncate":
        data = (copy / "model.safetensors").read_bytes()
        (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        rewrite_without(copy, BROKEN_TENSOR)
    return copy


def no_model_load(monkeypatch) -> None:
    """Fail the test if transformers is asked to load a model's weights."""
    from transformers import AutoModelForCausalLM

    def fail(*args, **kwargs):
        raise AssertionError("the error should have been raised before any model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fail)


def command_on(name: str, folder: Path, source: Path, tmp_path: Path) -> list[object]:
    text = tmp_path / "text.txt"
    text.write_text("Latent attention caches a small latent per token. " * 100)
    return {
        "convert": ["convert", folder, "--out", tmp_path / "out", *ARGS],
        "inspect": ["inspect", folder],
        "eval": ["eval", folder, "--text-file", text, "--seq-len", "16", "--device", "cpu"],
        "heal": ["heal", folder, "--out", tmp_path / "out", "--tokens", "1k", "--teacher", source],
        "export": ["export", folder, "--out", tmp_path / "out", "--device", "cpu"],
    }[name]


@pytest.mark.parametrize("command, which", [("convert", "source"), ("inspect", "source"), ("eval", "source"),
                                            ("inspect", "converted"), ("eval", "converted"), ("heal", "converted"),
                                            ("export", "converted")])
def test_config_that_is_not_json_is_one_line(source, converted, tmp_path, monkeypatch, command, which):
    folder = broken_copy(source if which == "source" else converted, tmp_path, "json")
    no_model_load(monkeypatch)
    line = one_line_error(run(*command_on(command, folder, source, tmp_path)), f"{folder / 'config.json'} is not valid JSON")
    assert "line 2, column 21" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, fragment", [("truncate", "model.safetensors: it is truncated"),
                                              ("missing", f"tensor {BROKEN_TENSOR} is missing")])
@pytest.mark.parametrize("command, which", [("eval", "source"), ("eval", "converted"), ("heal", "converted"),
                                            ("export", "converted")])
def test_broken_weights_are_refused_before_loading(source, converted, tmp_path, monkeypatch, command, which, damage, fragment):
    folder = broken_copy(source if which == "source" else converted, tmp_path, damage)
    no_model_load(monkeypatch)
    one_line_error(run(*command_on(command, folder, source, tmp_path)), fragment)
    assert not (tmp_path / "out").exists()


def test_weights_of_another_architecture_are_checked_for_damage_only(source, tmp_path, monkeypatch):
    """Architectures that transmla does not convert may store other tensor names than their model's (transformers
    renames them on loading): their files are checked to be readable, their names are left to transformers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from transmla.io.source import load_model

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=256, bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    rewrite_without(folder, "transformer.h.0.ln_1.weight")
    model, _ = load_model(str(folder), need_tokenizer=False)
    assert model.config.model_type == "gpt2"
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    no_model_load(monkeypatch)
    one_line_error(run(*command_on("eval", folder, source, tmp_path)), "model.safetensors: it is truncated")


@pytest.mark.parametrize("damage", ["truncate", "missing"])
def test_broken_teacher_is_one_line(source, converted, tmp_path, damage):
    teacher = broken_copy(source, tmp_path, damage)
    result = run("heal", converted, "--out", tmp_path / "out", "--tokens", "1k", "--teacher", teacher)
    lines = [line for line in result.output.strip().splitlines() if line.strip() and "Loading weights" not in line]
    assert result.exit_code == 1 and len(lines) == 1 and f"could not load the teacher {str(teacher)!r}" in lines[0], result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["convert", "inspect", "eval"])
def test_unknown_model_type_is_one_line(source, tmp_path, monkeypatch, command):
    folder = tmp_path / "odd"
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    no_model_load(monkeypatch)
    one_line_error(run(*command_on(command, folder, source, tmp_path)), "model type 'no-such-model', which transformers")


@pytest.mark.parametrize("damage", ["not-gguf", "truncated"])
@pytest.mark.parametrize("command", ["convert", "inspect", "eval"])
def test_broken_gguf_file_is_one_line(source, tmp_path, command, damage):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not a gguf file" if damage == "not-gguf" else b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)
    one_line_error(run(*command_on(command, gguf, source, tmp_path)), f"transformers can not read the model in {gguf}")


@pytest.mark.parametrize("command", ["heal", "export"])
@pytest.mark.parametrize("where", ["file", "under-file"])
def test_out_that_is_a_file_is_refused_before_any_work(source, converted, tmp_path, monkeypatch, command, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("precious")
    no_model_load(monkeypatch)
    args = command_on(command, converted, source, tmp_path)
    args[args.index("--out") + 1] = blocker if where == "file" else blocker / "out"
    one_line_error(run(*args, "--overwrite"), "is not a folder; choose another --out")
    assert blocker.read_text() == "precious"


# -- Ctrl-C at any point ------------------------------------------------------------------------------------

# Runs the `transmla` entry point with a real SIGINT sent to itself when the module named by argv[1] is first
# imported: torch (the start-up imports, before any command runs) or transmla.inspection (a command's own import).
SIGINT_AT_IMPORT = """
import os, signal, sys
target = sys.argv.pop(1)

class Trigger:
    def find_spec(self, name, path=None, module=None):
        if name == target:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Trigger())
from transmla.__main__ import main
main()
"""


@pytest.mark.parametrize("module", ["torch", "transmla.inspection"])
def test_ctrl_c_during_imports_is_one_line(source, module):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", SIGINT_AT_IMPORT, module, "inspect", str(source)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "interrupted: nothing was written", done.stderr


def test_error_after_a_swallowed_ctrl_c_is_reported_as_the_interrupt(source, monkeypatch):
    """A library interrupted mid-import may swallow the KeyboardInterrupt and fail later with another error."""
    import transmla.inspection

    def half_imported(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            pass
        raise ImportError("cannot load module more than once per process")

    monkeypatch.setattr(transmla.inspection, "inspect_model", half_imported)
    result = run("inspect", source)
    assert result.exit_code == 130
    assert result.output.strip() == "interrupted: nothing was written"


def test_console_script_is_the_interrupt_safe_entry_point():
    import re

    import transmla.__main__

    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    assert re.findall(r'^transmla = "(.+)"$', scripts, flags=re.M) == ["transmla.__main__:main"]
    assert callable(transmla.__main__.main)
