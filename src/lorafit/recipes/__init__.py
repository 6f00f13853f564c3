"""YAML recipes shipped with lorafit: the paper's hyperparameters and measured ones for the
embedded model. A recipe is named by its path under this folder without ``.yaml``
(``paper/roberta-base/mrpc``) or given as a file path."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from lorafit.errors import LorafitError


def recipe_root() -> Path:
    return Path(str(resources.files("lorafit.recipes")))


def list_recipes() -> list[str]:
    root = recipe_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def find_recipe(name: str | Path) -> Path:
    """The file of a recipe given by shipped name or by path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise LorafitError(f"--recipe {name}: file not found")
        return path
    shipped = recipe_root() / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    close = [r for r in list_recipes() if str(name).split("/")[-1] in r][:5]
    hint = f" (similar: {', '.join(close)})" if close else " (see `lorafit recipes`)"
    raise LorafitError(f"--recipe {name}: no such recipe{hint}")
