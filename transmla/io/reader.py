"""Lazy tensor sources: read one tensor at a time from safetensors files or an in-memory state dict."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import safe_open

from transmla.errors import TransMLAError

INDEX_NAME = "model.safetensors.index.json"
# Single-file names, most usual first.
SINGLE_FILE_NAMES = ("model.safetensors", "pytorch_model.safetensors", "consolidated.safetensors")


@runtime_checkable
class TensorSource(Protocol):
    """Read access to named tensors, one at a time."""

    def keys(self) -> list[str]: ...

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def has(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


class SafetensorsSource:
    """Tensors of a checkpoint folder: `model.safetensors`, or shards listed in `model.safetensors.index.json`.

    Shard files are opened on first use and kept open until `close()` (or the end of a `with` block).
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self._handles: dict[Path, Any] = {}
        if not self.folder.is_dir():
            what = "is not a folder" if self.folder.exists() else "does not exist"
            raise TransMLAError(f"checkpoint folder {self.folder} {what}; pass the folder that holds config.json")
        self._weight_map: dict[str, Path] = self._find_weights()

    # -- discovery -------------------------------------------------------------------------------------

    def _find_weights(self) -> dict[str, Path]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            return self._read_index(index)
        for name in SINGLE_FILE_NAMES:
            if (self.folder / name).is_file():
                return self._map_files([self.folder / name])
        files = sorted(self.folder.glob("*.safetensors"))
        if files:
            return self._map_files(files)
        torch_files = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if torch_files:
            raise TransMLAError(
                f"no .safetensors weights in {self.folder} (found {', '.join(torch_files[:3])}); re-save the model "
                "as safetensors, e.g. model.save_pretrained(folder, safe_serialization=True)"
            )
        raise TransMLAError(f"no .safetensors weights in {self.folder}; pass a Hugging Face checkpoint folder")

    def _read_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TransMLAError(f"cannot read the shard index {index} ({exc}); re-download or re-save the checkpoint") from exc
        shards = {name: self.folder / name for name in set(weight_map.values())}
        missing = sorted(name for name, path in shards.items() if not path.is_file())
        if missing:
            raise TransMLAError(
                f"shard {missing[0]} named in {index} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; re-download the checkpoint so that all shards are present"
            )
        return {key: shards[shard] for key, shard in weight_map.items()}

    def _map_files(self, files: list[Path]) -> dict[str, Path]:
        weight_map: dict[str, Path] = {}
        for path in files:
            for key in self._handle(path).keys():
                if key in weight_map:
                    raise TransMLAError(
                        f"tensor {key!r} is in both {weight_map[key].name} and {path.name} in {self.folder}; "
                        "remove the stray file or add a model.safetensors.index.json"
                    )
                weight_map[key] = path
        return weight_map

    def _handle(self, path: Path) -> Any:
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types for bad headers / sizes
                raise TransMLAError(
                    f"cannot read {path}: it is truncated or corrupt ({exc}); re-download or re-save the checkpoint"
                ) from exc
            self._handles[path] = handle
        return handle

    # -- TensorSource ----------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def has(self, name: str) -> bool:
        return name in self._weight_map

    def _path(self, name: str) -> Path:
        try:
            return self._weight_map[name]
        except KeyError:
            raise TransMLAError(
                f"tensor {name!r} is not in the checkpoint at {self.folder}; check that the folder holds a "
                "complete model of a supported architecture"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        path = self._path(name)
        return tuple(self._handle(path).get_slice(name).get_shape())

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        path = self._path(name)
        handle = self._handle(path)
        try:
            tensor = handle.get_tensor(name)
        except Exception as exc:
            raise TransMLAError(
                f"cannot read tensor {name!r} from {path} ({exc}); re-download or re-save the checkpoint"
            ) from exc
        return _cast(tensor, dtype)

    # -- lifetime --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the open shard handles (memory maps are released once no tensor refers to them)."""
        self._handles.clear()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsSource({str(self.folder)!r}, {len(self._weight_map)} tensors)"


class StateDictSource:
    """The same interface over an in-memory state dict (e.g. a model that transformers dequantised from GGUF)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], name: str = "the in-memory model") -> None:
        self._state_dict = state_dict
        self._name = name

    def keys(self) -> list[str]:
        return list(self._state_dict)

    def has(self, name: str) -> bool:
        return name in self._state_dict

    def _tensor(self, name: str) -> torch.Tensor:
        try:
            return self._state_dict[name]
        except KeyError:
            raise TransMLAError(
                f"tensor {name!r} is not in {self._name}; check that it is a complete model of a supported architecture"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return _cast(self._tensor(name).detach(), dtype)

    def close(self) -> None:
        """Nothing to release; present for symmetry with SafetensorsSource."""

    def __enter__(self) -> StateDictSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
