"""Recipe files, overrides and field validation."""

import pytest

from launcher.errors import UserError
from launcher.recipe import Recipe
from launcher.recipe_loader import apply_overrides, load_recipe, shipped_names
from launcher.validate import recipe_problems as validate_fields

SHIPPED = ["full_ft", "full_ft_16b", "lora", "pretrain", "smoke"]


def test_shipped_recipes_listed():
    assert set(SHIPPED) <= set(shipped_names())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_loads_and_is_valid(name):
    recipe, path = load_recipe(f"recipes/{name}.py")
    assert isinstance(recipe, Recipe) and path.name == f"{name}.py"
    assert validate_fields(recipe) == []


def test_published_layouts_in_recipes():
    full, _ = load_recipe("full_ft")
    assert (full.parallel.tp, full.parallel.pp, full.parallel.ep) == (1, 8, 64)
    lora, _ = load_recipe("lora")
    assert (lora.parallel.tp, lora.parallel.sp, lora.peft.method, lora.parallel.pp) == (8, True, "lora", None)


def test_overrides_apply_with_types():
    r, _ = load_recipe("smoke")
    r2 = apply_overrides(r, ["train.max_steps=100", "parallel.tp=4", "train.lr=1e-4", "env.FOO=bar baz", "parallel.pp=null"])
    assert (r2.train.max_steps, r2.parallel.tp, r2.train.lr, r2.env["FOO"], r2.parallel.pp) == (100, 4, 1e-4, "bar baz", None)
    assert r.train.max_steps == 60  # the original is untouched


def test_model_override_swaps_preset_then_tweaks():
    r, _ = load_recipe("smoke")
    r2 = apply_overrides(r, ["model=deepseek-v2-lite", "model.num_hidden_layers=4"])
    assert r2.model.name == "deepseek-v2-lite" and r2.model.num_hidden_layers == 4 and r2.model.q_lora_rank is None


@pytest.mark.parametrize("override, field, words", [
    ("train.max_stepz=3", "train.max_stepz", "unknown key"),
    ("trian.max_steps=3", "trian", "unknown key"),
    ("train.max_steps=abc", "train.max_steps", "expected an integer"),
    ("parallel.sp=maybe", "parallel.sp", "expected true or false"),
    ("model=gpt-5", "model", "deepseek-v3"),
    ("train.max_steps", "override", "key=value"),
    ("=3", "override", "key=value"),
])
def test_bad_overrides_name_the_key(override, field, words):
    r, _ = load_recipe("smoke")
    with pytest.raises(UserError) as exc:
        apply_overrides(r, [override])
    assert field in exc.value.field and words in str(exc.value)
    assert "\n" not in str(exc.value)


def test_newline_in_override_value_is_refused_except_in_env():
    r, _ = load_recipe("smoke")
    with pytest.raises(UserError, match="newline"):
        apply_overrides(r, ["data.path=a\nb"])
    assert apply_overrides(r, ["env.X=a\nb"]).env["X"] == "a\nb"


@pytest.mark.parametrize("override, field", [
    ("train.precision=fp16", "train.precision"),
    ("backend.name=deepspeed", "backend.name"),
    ("train.global_batch_size=0", "train.global_batch_size"),
    ("name=my job", "name"),
    ("name=$(reboot)", "name"),
    ("env.1BAD=x", "env.1BAD"),
    ("train.lr=-1", "train.lr"),
])
def test_invalid_values_reported_by_field(override, field):
    r, _ = load_recipe("smoke")
    problems = validate_fields(apply_overrides(r, [override]))
    assert any(p.field == field for p in problems), problems


def test_unknown_recipe_lists_shipped(tmp_path):
    with pytest.raises(UserError, match="full_ft"):
        load_recipe("nope.py")


@pytest.mark.parametrize("body, words", [
    ("def recipe(:\n", "SyntaxError line 1"),
    ("x = 1\n", "defines no function recipe()"),
    ("def recipe():\n    return 3\n", "returned int"),
    ("def recipe():\n    raise ValueError('boom')\n", "ValueError line 2: boom"),
    ("from launcher.recipe import Recipe, Parallel\ndef recipe():\n    return Recipe(parallel=Parallel(tp='eight'))\n",
     "parallel.tp: expected an integer; got 'eight'"),
])
def test_broken_recipe_files(tmp_path, body, words):
    f = tmp_path / "mine.py"
    f.write_text(body)
    with pytest.raises(UserError) as exc:
        load_recipe(str(f))
    assert words in str(exc.value) and str(f) in str(exc.value)


def test_recipe_function_selector(tmp_path):
    f = tmp_path / "two.py"
    f.write_text("from launcher.recipe import Recipe\n\ndef small():\n    return Recipe(name='small')\n")
    r, _ = load_recipe(f"{f}:small")
    assert r.name == "small"
