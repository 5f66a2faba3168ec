"""Checks to run before a long conversion or a model load: the checkpoint holds every tensor the config implies,
at its shape, and the output folder can not replace the source."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from transmla.errors import TransMLAError
from transmla.io.output_dir import check_writable, nearest_existing
from transmla.io.reader import SafetensorsSource, TensorSource

Shapes = dict[str, tuple[int, ...]]

LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def model_tensors(config: Any, trust_remote_code: bool = False) -> tuple[Shapes, Shapes]:
    """(required, optional) tensor names and shapes of the transformers model of `config`, from its skeleton on
    the meta device: its parameters are required, tied copies and buffers optional."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise TransMLAError(f"transformers can not build a causal language model of type {config.model_type!r} "
                            f"({str(exc).splitlines()[0]}): give a causal LM checkpoint") from exc
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)} - tied
    return ({k: v for k, v in shapes.items() if k in params}, {k: v for k, v in shapes.items() if k not in params})


def check_checkpoint(folder: Path, config: Any, trust_remote_code: bool = False, by_name: bool = True) -> None:
    """The safetensors weights of a model folder are readable and (with `by_name`: where the checkpoint stores the
    model's own tensor names) hold every tensor its model loads, at its shape. Reads headers only; folders of other
    weight formats are left to transformers."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")) and any(p.suffix in (".bin", ".pt", ".pth") for p in folder.iterdir()):
        return
    with SafetensorsSource(folder) as tensors:
        if by_name:
            check_source_tensors(tensors, config, str(folder), model_tensors(config, trust_remote_code))
        else:
            for name in tensors.keys():
                tensors.shape(name)  # opens every shard: a truncated or corrupt one fails here


def check_source_tensors(tensors: TensorSource, config: Any, where: str, expected: tuple[Shapes, Shapes]) -> None:
    """Raise TransMLAError naming the first missing, misshapen or surplus-layer tensor (reads headers only).
    `expected` is (required, optional) names and shapes (`model_tensors`)."""
    required, optional = expected
    present = set(tensors.keys())
    missing = sorted(set(required) - present, key=_natural)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise TransMLAError(f"tensor {missing[0]}{more} is missing from the checkpoint at {where}: re-download or re-save it")
    layers = config.get_text_config().num_hidden_layers if hasattr(config, "get_text_config") else config.num_hidden_layers
    found = {int(m.group(1)) for key in present if (m := LAYER_KEY.match(key))}
    if found and max(found) >= layers:
        raise TransMLAError(
            f"the checkpoint at {where} has weights of {max(found) + 1} layers but its config says "
            f"num_hidden_layers={layers}: the config does not match the weights"
        )
    for name, shape in {**optional, **required}.items():
        if name in present and tuple(tensors.shape(name)) != shape:
            raise TransMLAError(
                f"{name} has shape {tuple(tensors.shape(name))} but the config implies {shape}: "
                f"the config does not match the weights at {where}"
            )


def _natural(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def check_output_location(out: Path, source_path: Path) -> None:
    """Refuse an --out that can not be created, or that is (or holds) the source: replacing it would delete it."""
    out, source = Path(out).expanduser().absolute(), Path(source_path).expanduser().resolve()
    if out.resolve() == source or out.resolve() in source.parents:
        raise TransMLAError(f"--out {out} would replace the source checkpoint at {source}; choose another --out")
    check_writable(nearest_existing(out.parent))
