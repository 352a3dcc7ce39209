"""Find and load recipe files, apply command-line overrides, and check field values.

``launch RECIPE``: RECIPE is a path to a ``.py`` file (optionally ``file.py:function``), or the
name of a shipped recipe (``full_ft``, ``recipes/full_ft.py`` also works from any directory).
The file must define ``recipe()`` returning a :class:`launcher.recipe.Recipe`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import traceback
from pathlib import Path

from launcher import config_io, paths
from launcher.errors import UserError
from launcher.recipe import Recipe
from model.presets import PRESETS



def find_recipe(spec: str) -> tuple[Path, str]:
    """(file, function name) for a recipe spec."""
    file, _, func = spec.partition(":")
    func = func or "recipe"
    path = Path(file)
    if path.is_file():
        return path, func
    shipped = paths.recipes_dir() / (path.name if path.suffix == ".py" else f"{path.name}.py")
    if path.parent in (Path("."), Path("recipes")) and shipped.is_file():
        return shipped, func
    raise UserError(f"no recipe file {file!r}; shipped recipes: {', '.join(shipped_names())}", "RECIPE")


def shipped_names() -> list[str]:
    return sorted(p.stem for p in paths.recipes_dir().glob("*.py") if not p.name.startswith("_"))


def load_recipe(spec: str) -> tuple[Recipe, Path]:
    """Import the recipe file and call its ``recipe()`` (or the named function)."""
    target, path = load_target(spec)
    if not isinstance(target, Recipe):
        raise UserError("defines a pipeline, not a recipe; a recipe file defines recipe() returning a Recipe", str(path))
    return target, path


def load_target(spec: str):
    """A Recipe, or a Pipeline from a file defining ``pipeline()`` and no ``recipe()``; and the file.
    Errors in the file point at its line."""
    from launcher.pipeline import Pipeline, check

    path, func = find_recipe(spec)
    explicit = ":" in spec
    module_name = f"_moe_recipe_{path.stem}_{abs(hash(str(path.resolve())))}"
    try:
        mod_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[module_name] = module
        mod_spec.loader.exec_module(module)
        if not explicit and not callable(getattr(module, func, None)) and callable(getattr(module, "pipeline", None)):
            func = "pipeline"
        fn = getattr(module, func, None)
        if not callable(fn):
            raise UserError(f"defines no function {func}(); a recipe file defines recipe() returning a Recipe "
                            "(or pipeline() returning a Pipeline)", str(path))
        recipe = fn()
    except UserError:
        raise
    except Exception as exc:  # the user's code failed: say where, in one line
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
        line = f" line {frames[-1].lineno}" if frames else (f" line {exc.lineno}" if isinstance(exc, SyntaxError) else "")
        raise UserError(f"{type(exc).__name__}{line}: {exc}", str(path)) from None
    if isinstance(recipe, Pipeline):
        check(recipe, str(path))
        return recipe, path
    if not isinstance(recipe, Recipe):
        raise UserError(f"{func}() returned {type(recipe).__name__}, expected launcher.recipe.Recipe "
                        "(or launcher.pipeline.Pipeline)", str(path))
    return config_io.typed(recipe, f"{path}: "), path


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Apply ``key=value`` overrides; ``model=NAME`` first swaps in a model preset."""
    rest = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key == "model" and sep:
            if value not in PRESETS:
                raise UserError(f"unknown model preset {value!r}; valid: {', '.join(PRESETS)}", "model")
            recipe = dataclasses.replace(recipe, model=PRESETS[value]())
        else:
            rest.append(item)
    return config_io.apply_dotlist(recipe, rest) if rest else recipe
