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


def recipe_source(path: Path) -> str:
    """The one-line source of a recipe: its header's ``Source:`` or ``measured:`` comment."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        for prefix in ("Source:", "measured:"):
            if text.startswith(prefix):
                return text.removeprefix("Source:").strip().rstrip(";")
    return ""


def recipes_table() -> str:
    """Every shipped recipe with its model, method, task and source, as aligned text columns."""
    from lorafit.io import read_yaml_mapping

    rows = [("recipe", "model", "method", "task", "source")]
    for name in list_recipes():
        path = recipe_root() / f"{name}.yaml"
        data = read_yaml_mapping(path, "a recipe")
        rows.append((name, str(data.get("model", "minilm")), str(data.get("method", "lora")),
                     str(data.get("task", "mrpc")), recipe_source(path)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[4]]).rstrip() for row in rows)
