"""Recipes: every validation path is one RecipeError line naming file, table and key; TOML round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from ndsnn_cli.errors import UserError
from ndsnn_cli.recipe import Recipe, RecipeError, load_recipe, parse_recipe, sparse_epochs

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


def error_of(text: str, source: str = "quickstart.toml") -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source)
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, UserError)
    return message


def test_out_of_range_sparsity_names_file_table_and_key_exactly() -> None:
    assert error_of("[sparsity]\nfinal = 1.2\n") == "quickstart.toml: [sparsity] final = 1.2 must be in [0, 1)"


@pytest.mark.parametrize(("text", "expected"), [
    ("[sparsity]\nfinl = 0.5\n",
     "quickstart.toml: [sparsity] finl is not a key of [sparsity] (did you mean 'final'?)"),
    ("modle = 1\n", "quickstart.toml: modle is not a recipe key (did you mean 'model'?)"),
    ("[sparsity]\nmethod = \"ndsn\"\n",
     "quickstart.toml: [sparsity] method = \"ndsn\" must be one of dense, static, set, rigl, gmp, ndsnn, lth "
     "(did you mean 'ndsnn'?)"),
])
def test_unknown_key_or_choice_suggests_the_closest_name(text: str, expected: str) -> None:
    assert error_of(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ('[model]\ntimesteps = "a"\n', 'quickstart.toml: [model] timesteps = "a" must be an integer'),
    ("[model]\ntimesteps = 2.0\n", "quickstart.toml: [model] timesteps = 2 must be an integer"),
    ("[train]\nlr = true\n", "quickstart.toml: [train] lr = true must be a number"),
    ("[train]\namp = 1\n", "quickstart.toml: [train] amp = 1 must be true or false"),
    ("[sparsity]\ndense = \"fc\"\n", 'quickstart.toml: [sparsity] dense = "fc" must be a list of strings'),
    ("seed = \"zero\"\n", 'quickstart.toml: seed = "zero" must be an integer'),
    ("model = 3\n", "quickstart.toml: model must be a table ([model])"),
    ("[train]\nlr = nan\n", "quickstart.toml: [train] lr = nan must be a finite number"),
])
def test_wrong_type_is_one_line_naming_the_key(text: str, expected: str) -> None:
    assert error_of(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("[train]\nepochs = 0\n", "quickstart.toml: [train] epochs = 0 must be in [1, 100000]"),
    ("[train]\nlr = 0\n", "quickstart.toml: [train] lr = 0 must be > 0"),
    ("[train]\nmomentum = 1.0\n", "quickstart.toml: [train] momentum = 1 must be in [0, 1)"),
    ("[model]\ntau = 1.0\n", "quickstart.toml: [model] tau = 1 must be > 1"),
    ("[sparsity]\ninitial = -0.1\n", "quickstart.toml: [sparsity] initial = -0.1 must be in [0, 1)"),
])
def test_out_of_range_values_state_the_allowed_interval(text: str, expected: str) -> None:
    assert error_of(text) == expected


def test_ndsnn_initial_above_final_is_rejected() -> None:
    assert error_of('[sparsity]\nmethod = "ndsnn"\ninitial = 0.9\nfinal = 0.5\n') == (
        "quickstart.toml: [sparsity] initial = 0.9 must be <= final (0.5): "
        "NDSNN ramps sparsity up from initial to final")


def test_ramp_end_after_update_end_is_rejected() -> None:
    text = '[train]\nepochs = 4\n[sparsity]\nmethod = "ndsnn"\nramp_end_epoch = 3\nupdate_end_epoch = 2\n'
    assert error_of(text) == "quickstart.toml: [sparsity] ramp_end_epoch = 3 must be <= update_end_epoch (2)"


def test_update_end_beyond_training_is_rejected() -> None:
    text = '[train]\nepochs = 2\n[sparsity]\nmethod = "rigl"\nupdate_end_epoch = 3\n'
    assert error_of(text) == "quickstart.toml: [sparsity] update_end_epoch = 3 must be in (0, train.epochs = 2]"


def test_lth_requires_prune_rate_and_rewind_epoch() -> None:
    assert error_of('[sparsity]\nmethod = "lth"\n').startswith(
        'quickstart.toml: [sparsity] prune_rate is required for method = "lth"')
    assert error_of('[sparsity]\nmethod = "lth"\nprune_rate = 0.25\n').startswith(
        'quickstart.toml: [sparsity] rewind_epoch is required for method = "lth"')
    assert error_of('[train]\nepochs = 3\n[sparsity]\nmethod = "lth"\nprune_rate = 0.25\nrewind_epoch = 3\n') == (
        "quickstart.toml: [sparsity] rewind_epoch = 3 must be in [0, 3) (the epochs of a round)")


def test_lth_keys_on_another_method_are_rejected() -> None:
    assert error_of('[sparsity]\nmethod = "rigl"\nprune_rate = 0.3\n') == (
        'quickstart.toml: [sparsity] prune_rate only applies to method = "lth" (method is "rigl")')


def test_toml_syntax_error_is_one_line_with_position() -> None:
    message = error_of('[sparsity\nmethod = "lth"\n')
    assert message.startswith("quickstart.toml: TOML syntax error: ")
    assert "line 1" in message


def test_load_recipe_reports_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"name = \"\xff\"\n")
    with pytest.raises(RecipeError, match=r"^bad\.toml: is not a UTF-8 text file$"):
        load_recipe(bad)
    syntax = tmp_path / "syntax.toml"
    syntax.write_text("[train\n")
    with pytest.raises(RecipeError, match=r"^syntax\.toml: TOML syntax error"):
        load_recipe(syntax)


def test_to_toml_round_trips_defaults_and_edited_values() -> None:
    recipes = [
        Recipe(),
        Recipe().replace(name='odd "name" \\ with\ttab\nnewline and é', seed=7,
                         model={"tau": 4.0 / 3.0, "timesteps": 5, "arch": "vgg16"},
                         train={"lr": 1e-5, "weight_decay": 5e-4, "amp": True},
                         sparsity={"method": "ndsnn", "initial": 0.6, "final": 0.99, "dense": ["encoder.0", "x"],
                                   "ramp_end_epoch": 1.5}),
        Recipe().replace(sparsity={"method": "lth", "prune_rate": 0.25, "rewind_epoch": 1}),
    ]
    for recipe in recipes:
        again = parse_recipe(recipe.to_toml())
        assert again == recipe
        assert again.to_toml() == recipe.to_toml()
        assert again.sha256() == recipe.sha256()


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads_and_round_trips(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.source == path.name
    assert parse_recipe(recipe.to_toml()) == recipe


def test_shipped_recipes_exist() -> None:
    assert any(p.name == "quickstart.toml" for p in RECIPES)


def test_replace_validates_like_a_file() -> None:
    with pytest.raises(RecipeError, match=r"\[sparsity\] final = 1 must be in \[0, 1\)"):
        Recipe().replace(sparsity={"final": 1.0})


def test_sparse_epochs_defaults_are_75_percent() -> None:
    recipe = Recipe().replace(train={"epochs": 8}, sparsity={"method": "ndsnn"})
    assert sparse_epochs(recipe) == (0.0, 4.5, 6.0)
    explicit = recipe.replace(sparsity={"ramp_start_epoch": 1.0, "ramp_end_epoch": 2.0, "update_end_epoch": 3.0})
    assert sparse_epochs(explicit) == (1.0, 2.0, 3.0)
