"""YAML recipes: a file of `transmla convert` options, overridden by any flag given on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from transmla.errors import TransMLAError


def load_recipe(path: Path) -> dict[str, Any]:
    """The recipe's options, keys normalised to parameter names (`kv-lora-rank` -> `kv_lora_rank`)."""
    if not path.is_file():
        raise TransMLAError(f"recipe {path} not found; the bundled ones are in the recipes/ folder")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TransMLAError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise TransMLAError(f"recipe {path} must be a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items() if k != "description"}


def validate_recipe(command: Any, recipe: dict[str, Any], path: Path) -> dict[str, Any]:
    """Check every key against the command's options and convert each value with the option's own type."""
    params = {p.name: p for p in command.params if p.param_type_name == "option"}
    context = command.context_class(command)
    values = {}
    for key, value in recipe.items():
        if key not in params or key == "recipe":
            raise TransMLAError(f"recipe {path}: unknown option {key!r}; see transmla convert --help")
        if params[key].multiple and not isinstance(value, list):
            value = [value]  # a single value for a repeatable option
        try:
            values[key] = params[key].process_value(context, value)
        except Exception as exc:  # the CLI library's BadParameter
            raise TransMLAError(f"recipe {path}: bad value for {key}: {getattr(exc, 'message', exc)}") from exc
    return values


def apply_recipe(ctx: Any, path: Path, given: dict[str, Any]) -> dict[str, Any]:
    """`given` (the command's arguments) with the recipe's values wherever no flag was typed."""
    recipe = validate_recipe(ctx.command, load_recipe(path), path)
    merged = dict(given)
    for key, value in recipe.items():
        source = ctx.get_parameter_source(key)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            merged[key] = value
    return merged
