"""Find and load recipe files, apply command-line overrides, and check field values.

``launch RECIPE``: RECIPE is a path to a ``.py`` file (optionally ``file.py:function``), or the
name of a shipped recipe (``full_ft``, ``recipes/full_ft.py`` also works from any directory).
The file must define ``recipe()`` returning a :class:`launcher.recipe.Recipe`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
import traceback
from pathlib import Path

from launcher import config_io, paths
from launcher.errors import ENV_NAME, Problem, UserError, check_no_control_chars
from launcher.recipe import CHOICES, Recipe
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


def _get(obj: object, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate_fields(recipe: Recipe) -> list[Problem]:
    """Field-level problems (choices, ranges, names). Layout checks live in preflight.py."""
    problems: list[Problem] = []

    def add(field: str, message: str) -> None:
        problems.append(Problem("error", field, message))

    try:
        check_no_control_chars(dataclasses.asdict(recipe), "recipe")
    except UserError as exc:
        add(exc.field, str(exc).split(": ", 1)[1])
    for key, allowed in CHOICES.items():
        value = _get(recipe, key)
        if value not in allowed:
            add(key, f"{value!r} is not valid; choose one of {', '.join(allowed)}")
    positive = ["train.global_batch_size", "train.micro_batch_size", "train.max_steps", "data.seq_length",
                "checkpoint.interval", "checkpoint.keep", "model.num_hidden_layers", "model.hidden_size",
                "model.num_attention_heads", "model.vocab_size"]
    positive += [f"parallel.{k}" for k in ("tp", "pp", "vpp", "ep", "etp", "cp", "dp") if getattr(recipe.parallel, k) is not None]
    for key in positive:
        if _get(recipe, key) < 1:
            add(key, f"must be >= 1, got {_get(recipe, key)}")
    for key in ("train.lr", "train.min_lr", "train.weight_decay", "train.grad_clip", "train.warmup_steps"):
        if _get(recipe, key) < 0:
            add(key, f"must be >= 0, got {_get(recipe, key)}")
    if recipe.train.min_lr > recipe.train.lr:
        add("train.min_lr", f"{recipe.train.min_lr} is above train.lr {recipe.train.lr}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", recipe.name):
        add("name", f"{recipe.name!r} is not valid; use letters, digits, '.', '_' or '-' (it names the job and run directory)")
    for k in recipe.env:
        if not ENV_NAME.match(k):
            add(f"env.{k}", "not a valid environment variable name (letters, digits, '_', not starting with a digit)")
    m = recipe.model
    if m.n_routed_experts and not 1 <= m.num_experts_per_tok <= m.n_routed_experts:
        add("model.num_experts_per_tok", f"{m.num_experts_per_tok} must be between 1 and n_routed_experts ({m.n_routed_experts})")
    if m.n_routed_experts and (m.n_group < 1 or m.n_routed_experts % m.n_group or not 1 <= m.topk_group <= m.n_group):
        add("model.n_group", f"{m.n_group} groups with topk_group {m.topk_group} do not split {m.n_routed_experts} experts; n_group must divide the experts and 1 <= topk_group <= n_group")
    if recipe.peft.method == "lora" and (recipe.peft.rank < 1 or recipe.peft.alpha <= 0):
        add("peft.rank", f"LoRA needs rank >= 1 and alpha > 0, got rank {recipe.peft.rank}, alpha {recipe.peft.alpha}")
    return problems
