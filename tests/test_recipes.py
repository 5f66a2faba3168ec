"""Every bundled recipe matches `transmla convert`'s options, and flags override a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tiny import save_source
from transmla.cli import app
from transmla.errors import TransMLAError
from transmla.cli.recipes import load_recipe, validate_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
CONVERT = typer.main.get_command(app).commands["convert"]


def test_recipes_exist_for_each_family():
    names = " ".join(p.name for p in RECIPES)
    for family in ("smollm2", "llama-3-8b", "qwen2.5-7b", "qwen3-8b", "mistral-7b"):
        assert family in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_matches_the_option_schema(path):
    values = validate_recipe(CONVERT, load_recipe(path), path)
    assert values["method"] in ("svd", "pca", "whiten")
    assert (values.get("rope_dim") or 0) % 2 == 0 and (values.get("kv_budget") or 0.5) <= 1
    assert ("kv_budget" in values) != ("kv_lora_rank" in values)  # the budget's split is measured, or R is fixed


def test_unknown_key_and_bad_value_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kv_lora_rank: 8\nlatent_magic: 3\n")
    with pytest.raises(TransMLAError, match="unknown option 'latent_magic'"):
        validate_recipe(CONVERT, load_recipe(bad), bad)
    bad.write_text("kv_lora_rank: lots\n")
    with pytest.raises(TransMLAError, match="bad value for kv_lora_rank"):
        validate_recipe(CONVERT, load_recipe(bad), bad)


def test_flags_override_the_recipe(tmp_path):
    save_source("llama-gqa", tmp_path / "src")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kv-lora-rank: 24\nrope_dim: 8\ndtype: float32\nmethod: svd\n")
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(tmp_path / "src"), "--out", str(tmp_path / "a"), "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a" / "config.json").read_text())["kv_lora_rank"] == [24, 24]
    result = runner.invoke(app, ["convert", str(tmp_path / "src"), "--out", str(tmp_path / "b"), "--recipe", str(recipe), "-r", "16"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["kv_lora_rank"] == [16, 16] and config["qk_rope_head_dim"] == 8
