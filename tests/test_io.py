"""Checkpoint I/O: sharded writing, lazy reading, atomic output folders and disk checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from transmla.errors import TransMLAError
from transmla.io import (
    SafetensorsSource,
    ShardedSafetensorsWriter,
    StateDictSource,
    TensorSource,
    atomic_output_dir,
    check_free_disk,
    check_writable,
    cleanup_stale_temp_dirs,
)


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(32, 16, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(16, generator=g),
        "model.layers.0.input_layernorm.weight": torch.ones(16, dtype=torch.float16),
        "model.norm.weight": torch.ones(16),
        "lm_head.weight": torch.randn(32, 16, generator=g),
    }


def _write(out: Path, state_dict: dict[str, torch.Tensor], max_shard_bytes: int) -> list[Path]:
    writer = ShardedSafetensorsWriter(out, max_shard_bytes=max_shard_bytes)
    for name, tensor in state_dict.items():
        writer.add(name, tensor)
    return writer.finish()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# -- writer + reader round trip ---------------------------------------------------------------------------


def test_sharded_round_trip(tmp_path: Path) -> None:
    sd = _state_dict()
    paths = _write(tmp_path, sd, max_shard_bytes=2048)  # embed / lm_head are 2048 bytes each

    count = len(paths)
    assert count >= 3
    assert [p.name for p in paths] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in paths] + ["model.safetensors.index.json"])

    index_text = (tmp_path / "model.safetensors.index.json").read_text()
    index = json.loads(index_text)
    assert index["metadata"]["total_size"] == sum(_nbytes(t) for t in sd.values())
    assert set(index["weight_map"]) == set(sd)
    assert list(index["weight_map"]) == sorted(sd)
    assert set(index["weight_map"].values()) == {p.name for p in paths}
    assert index_text == json.dumps(index, indent=2, sort_keys=True) + "\n"

    from_files: dict[str, torch.Tensor] = {}
    for p in paths:
        from_files.update(load_file(p))
    with SafetensorsSource(tmp_path) as src:
        assert sorted(src.keys()) == sorted(sd)
        for name, tensor in sd.items():
            assert src.has(name)
            assert src.shape(name) == tuple(tensor.shape)
            got = src.get(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)
            assert torch.equal(from_files[name], tensor)
            assert index["weight_map"][name] in {p.name for p in paths}
            assert name in load_file(tmp_path / index["weight_map"][name])
        assert not src.has("nope")


def test_single_shard_has_no_index(tmp_path: Path) -> None:
    sd = _state_dict()
    paths = _write(tmp_path, sd, max_shard_bytes=2**30)
    assert paths == [tmp_path / "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    loaded = load_file(paths[0])
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    with SafetensorsSource(tmp_path) as src:
        assert all(torch.equal(src.get(k), v) for k, v in sd.items())


@pytest.mark.parametrize("max_shard_bytes", [2048, 2**30])
def test_output_is_byte_identical(tmp_path: Path, max_shard_bytes: int) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, _state_dict(), max_shard_bytes)
    _write(b, _state_dict(), max_shard_bytes)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_tied_views_and_metadata(tmp_path: Path) -> None:
    base = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    writer = ShardedSafetensorsWriter(tmp_path, metadata={"format": "pt", "note": "x"})
    writer.add("embed", base)
    writer.add("lm_head", base)  # tied: same storage
    writer.add("row", base[2])  # a view
    writer.add("t", base.t())  # not contiguous
    with pytest.raises(ValueError, match="embed"):
        writer.add("embed", base)
    writer.finish()
    with pytest.raises(RuntimeError):
        writer.add("late", base)
    loaded = load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["embed"], base) and torch.equal(loaded["lm_head"], base)
    assert torch.equal(loaded["row"], base[2]) and torch.equal(loaded["t"], base.t())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}


def test_oversized_tensor_gets_its_own_shard(tmp_path: Path) -> None:
    sd = {"small": torch.zeros(4), "big": torch.zeros(1000), "small2": torch.zeros(4)}
    paths = _write(tmp_path, sd, max_shard_bytes=64)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(paths) == 3
    assert len({index["weight_map"][k] for k in sd}) == 3


def test_lazy_dtype_conversion(tmp_path: Path) -> None:
    sd = _state_dict()
    _write(tmp_path, sd, max_shard_bytes=2048)
    with SafetensorsSource(tmp_path) as src:
        got = src.get("model.layers.0.self_attn.q_proj.weight", dtype=torch.float32)
        assert got.dtype == torch.float32
        assert torch.equal(got, sd["model.layers.0.self_attn.q_proj.weight"].float())
        got = src.get("model.norm.weight", dtype=torch.bfloat16)
        assert got.dtype == torch.bfloat16
        assert src.get("model.norm.weight").dtype == torch.float32
    mem = StateDictSource(sd)
    assert isinstance(mem, TensorSource) and isinstance(SafetensorsSource(tmp_path), TensorSource)
    assert mem.keys() == list(sd) and mem.has("lm_head.weight") and not mem.has("x")
    assert mem.shape("lm_head.weight") == (32, 16)
    assert mem.get("model.norm.weight", torch.float16).dtype == torch.float16
    with pytest.raises(TransMLAError, match="missing.weight"):
        mem.get("missing.weight")


def test_other_single_file_name(tmp_path: Path) -> None:
    save_file({"w": torch.ones(3)}, str(tmp_path / "consolidated.safetensors"))
    with SafetensorsSource(tmp_path) as src:
        assert src.keys() == ["w"] and torch.equal(src.get("w"), torch.ones(3))


# -- reader errors ----------------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(TransMLAError, match="does not exist") as e:
        SafetensorsSource(tmp_path / "nowhere")
    assert "nowhere" in str(e.value)


def test_no_safetensors_with_bin(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(TransMLAError, match="pytorch_model.bin") as e:
        SafetensorsSource(tmp_path)
    assert "safe_serialization=True" in str(e.value)


def test_no_safetensors_at_all(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TransMLAError, match="no .safetensors"):
        SafetensorsSource(tmp_path)


def test_missing_shard(tmp_path: Path) -> None:
    paths = _write(tmp_path, _state_dict(), max_shard_bytes=2048)
    paths[1].unlink()
    with pytest.raises(TransMLAError, match=paths[1].name) as e:
        SafetensorsSource(tmp_path)
    assert "\n" not in str(e.value)


def test_bad_index(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(TransMLAError, match="model.safetensors.index.json"):
        SafetensorsSource(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 20])
def test_truncated_shard(tmp_path: Path, keep: float) -> None:
    paths = _write(tmp_path, _state_dict(), max_shard_bytes=2048)
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    first_key = next(k for k, v in json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].items() if v == paths[0].name)
    with SafetensorsSource(tmp_path) as src:  # shards open lazily
        with pytest.raises(TransMLAError, match=paths[0].name):
            src.get(first_key)


def test_truncated_single_file(tmp_path: Path) -> None:
    (path,) = _write(tmp_path, _state_dict(), max_shard_bytes=2**30)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(TransMLAError, match="model.safetensors"):
        SafetensorsSource(tmp_path)


def test_missing_tensor(tmp_path: Path) -> None:
    _write(tmp_path, _state_dict(), max_shard_bytes=2048)
    with SafetensorsSource(tmp_path) as src:
        for call in (src.get, src.shape):
            with pytest.raises(TransMLAError, match="model.layers.7.mlp.up_proj.weight") as e:
                call("model.layers.7.mlp.up_proj.weight")
            assert str(tmp_path) in str(e.value)


# -- atomic output folder ---------------------------------------------------------------------------------


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_atomic_success(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "out"
    with atomic_output_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".out.tmp-")
        assert not final.exists()
        (tmp / "config.json").write_text("{}")
    assert (final / "config.json").read_text() == "{}"
    assert _leftovers(final.parent, "out") == []


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_atomic_failure_leaves_nothing(tmp_path: Path, exc_type: type[BaseException]) -> None:
    final = tmp_path / "out"
    with pytest.raises(exc_type):
        with atomic_output_dir(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise exc_type("stop")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_existing_folder(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(TransMLAError, match="exists and is not empty; pass --overwrite"):
        with atomic_output_dir(final):
            pytest.fail("must refuse before yielding")
    assert (final / "old.txt").read_text() == "old"

    with atomic_output_dir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path, "out") == []

    # a failure with overwrite keeps the old folder
    with pytest.raises(RuntimeError):
        with atomic_output_dir(final, overwrite=True):
            raise RuntimeError
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path, "out") == []


def test_atomic_empty_existing_folder_and_file(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    with atomic_output_dir(final) as tmp:
        (tmp / "a").write_text("a")
    assert (final / "a").exists()
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(TransMLAError, match="not a folder"):
        with atomic_output_dir(file, overwrite=True):
            pass


def test_stale_temp_dirs_cleaned(tmp_path: Path) -> None:
    final = tmp_path / "out"
    stale = [tmp_path / ".out.tmp-abc123", tmp_path / ".out.tmp-99999999-ff", tmp_path / ".out.old-99999999-ee"]
    for d in stale:
        (d / "x").mkdir(parents=True)
    running = tmp_path / f".out.tmp-{os.getpid()}-aa"  # a live process's folder is kept
    running.mkdir()
    other = tmp_path / ".other.tmp-abc"
    other.mkdir()
    assert sorted(cleanup_stale_temp_dirs(final)) == sorted(stale)
    assert running.exists() and other.exists()
    running.rmdir()
    for d in stale:
        (d / "x").mkdir(parents=True)
    with atomic_output_dir(final) as tmp:
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([tmp.name, ".other.tmp-abc"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-abc", "out"]


def test_parent_under_a_file(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(TransMLAError, match="choose another --out") as e:
        with atomic_output_dir(file / "sub" / "out"):
            pytest.fail("must refuse before yielding")
    assert str(file) in str(e.value)
    with pytest.raises(TransMLAError, match="choose another --out"):
        check_writable(file)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_parent_not_writable(tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(TransMLAError, match="choose another --out") as e:
            with atomic_output_dir(parent / "out"):
                pytest.fail("must refuse before yielding")
        assert str(parent) in str(e.value)
    finally:
        parent.chmod(0o700)


# -- disk space -------------------------------------------------------------------------------------------


def test_check_free_disk(tmp_path: Path) -> None:
    check_free_disk(tmp_path, 1)
    check_free_disk(tmp_path / "not" / "yet", 1)  # measured on the nearest existing parent
    with pytest.raises(TransMLAError, match="GiB needed.*GiB free; free space or choose another --out"):
        check_free_disk(tmp_path, 2**70)
