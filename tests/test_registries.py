"""Each set of names is registered once; recipe choices, prune-compare and `ndsnn cost` derive from it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ndsnn_cli.cost import METHOD_ORDER
from ndsnn_cli.recipe import METHODS, ModelConfig, RecipeError, SparsityConfig, parse_recipe
from ndsnn_cli.snn import LIF_BACKENDS, SURROGATE_NAMES
from ndsnn_cli.snn.models import create_model
from ndsnn_cli.snn.neuron import LIF, SURROGATES
from ndsnn_cli.sparse.schedules import METHOD_SCHEDULES


def choices(cls: type, name: str) -> tuple[str, ...]:
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["choices"]


def test_method_names_come_from_the_schedule_registry() -> None:
    assert METHODS == tuple(METHOD_SCHEDULES) == ("dense", "static", "set", "rigl", "gmp", "ndsnn", "lth")
    assert choices(SparsityConfig, "method") == METHODS
    assert sorted(METHOD_ORDER) == sorted(METHODS) and len(METHOD_ORDER) == len(set(METHOD_ORDER))


def test_sparse_kernel_modes_come_from_the_kernel_registry() -> None:
    from ndsnn_cli.kernels import SPARSE_KERNEL_MODES
    from ndsnn_cli.recipe import TrainConfig

    assert choices(TrainConfig, "sparse_kernels") == SPARSE_KERNEL_MODES


def test_surrogate_and_backend_names_match_the_neuron_implementations() -> None:
    assert tuple(SURROGATES) == SURROGATE_NAMES == choices(ModelConfig, "surrogate")
    assert LIF_BACKENDS == choices(ModelConfig, "lif_backend")
    for backend in LIF_BACKENDS:
        assert LIF(2, backend=backend)(torch.zeros(4, 3)).shape == (4, 3)


@pytest.mark.parametrize(("table", "key", "typo", "hint"), [("sparsity", "method", "rigll", "rigl"),
                                                            ("model", "surrogate", "atn", "atan"),
                                                            ("model", "lif_backend", "fusde", "fused")])
def test_a_typo_in_a_registered_name_is_a_recipe_error(table: str, key: str, typo: str, hint: str) -> None:
    with pytest.raises(RecipeError, match=rf"\[{table}\] {key} = \"{typo}\" must be one of .*did you mean '{hint}'"):
        parse_recipe(f'[{table}]\n{key} = "{typo}"\n', "r.toml")


def test_an_unknown_lif_backend_is_an_error_not_the_reference_loop() -> None:
    with pytest.raises(ValueError, match="unknown LIF backend 'fusde'"):
        LIF(2, backend="fusde")
    model = create_model("mlp", num_classes=10, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="unknown LIF backend"):
        model.set_lif_backend("cuda")
