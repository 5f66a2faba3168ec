"""What a converted folder holds: the shipped modeling files, the run record, and the weight dtypes by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from transmla.errors import TransMLAError

MODELING_DIR = Path(__file__).resolve().parents[1] / "modeling"
MODELING_FILES = ("configuration_transmla.py", "modeling_transmla.py", "cache_transmla.py", "mla_decode.py")
RECORD_FILE = "transmla.json"  # how the folder was made: source, options, healing
MODEL_TYPE = "transmla"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, flag: str = "--dtype", allow_auto: bool = True) -> torch.dtype | None:
    """The torch dtype named `name` (None for `auto` where allowed); one clear error otherwise."""
    if allow_auto and name == "auto":
        return None
    if name not in DTYPES:
        names = (["auto"] if allow_auto else []) + list(DTYPES)
        raise TransMLAError(f"{flag} {name!r} is not one of {', '.join(names)}")
    return DTYPES[name]


def config_dtype(config: Any, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a config (object or dict) records for its weights, or `default`."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    value = get("dtype") or get("torch_dtype")
    if isinstance(value, str):
        value = DTYPES.get(value.removeprefix("torch."))
    return value if value in DTYPES.values() else default


def copy_modeling_files(folder: Path) -> None:
    """Put the modeling code that `trust_remote_code=True` loads beside the weights."""
    for name in MODELING_FILES:
        shutil.copyfile(MODELING_DIR / name, Path(folder) / name)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; one clear error naming the file (and the position) where it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TransMLAError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}): "
                            "fix the file or re-download the model") from None
    except UnicodeDecodeError:
        raise TransMLAError(f"{path} is not UTF-8 text: fix the file or re-download the model") from None
    except OSError as exc:
        raise TransMLAError(f"cannot read {path} ({exc.strerror or exc}): check the file's permissions") from None
    if not isinstance(data, dict):
        raise TransMLAError(f"{path} holds a JSON {type(data).__name__}, not an object of named fields: fix the file "
                            "or re-download the model")
    return data


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json as a dict (checked to be a JSON object)."""
    return read_json_object(Path(folder) / "config.json")


def is_converted(folder: Path) -> bool:
    """Whether a folder holds a checkpoint written by transmla."""
    return (Path(folder) / "config.json").is_file() and read_config(folder).get("model_type") == MODEL_TYPE


def read_record(folder: Path) -> dict[str, Any]:
    """The folder's run record (empty if it has none)."""
    path = Path(folder) / RECORD_FILE
    return read_json_object(path) if path.is_file() else {}


def write_record(folder: Path, record: dict[str, Any]) -> None:
    (Path(folder) / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
