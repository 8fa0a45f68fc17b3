"""NIR export: node types and shapes, folded weights bit for bit, NIR LIF semantics in seconds, max-pooling of
spikes as sum-pool + gate, refusals, compression, `--dt` and `ndsnn inspect`. The readers: test_nir_readers.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_export_source

from ndsnn_cli.build import build_model
from ndsnn_cli.checkpoint import save_checkpoint
from ndsnn_cli.data.loading import build_datasets
from ndsnn_cli.export.fold import fold_batchnorm, load_trained
from ndsnn_cli.recipe import Recipe
from ndsnn_cli.sparse.budget import active_count
from ndsnn_cli.sparse.masks import random_mask, sparse_parameter_names

nir = pytest.importorskip("nir")
LOGIT_TOL = 1e-4  # numpy float32 simulation vs PyTorch: same weights, summation order differs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny NDSNN-trained spiking MLP (T=2, 90% sparse, synthetic data, 1 epoch): about a second."""
    return train_export_source(tmp_path_factory.mktemp("nir") / "run", name="nir-test", arch="mlp",
                               train_limit=256, test_limit=64, update_every_steps=2)




def _simulate(graph, images: np.ndarray, timesteps: int) -> np.ndarray:
    """The NIR graph of a feed-forward MLP run by NIR's own semantics: LIF forward Euler with the graph's dt."""
    dt = float(graph.metadata["dt"])
    order = ["input"]
    while order[-1] != "output":
        order.append(next(dst for src, dst in graph.edges if src == order[-1]))
    state: dict[str, np.ndarray] = {}
    outputs = []
    for _ in range(timesteps):
        x = images
        for name in order[1:-1]:
            node = graph.nodes[name]
            if isinstance(node, nir.Flatten):
                x = x.reshape(x.shape[0], -1)
            elif isinstance(node, nir.Affine):
                x = x @ node.weight.T + node.bias
            elif isinstance(node, nir.LIF):
                v = state.get(name, np.zeros_like(x))
                v = v + dt / node.tau * (node.v_leak - v + node.r * x)
                spikes = (v >= node.v_threshold).astype(np.float32)
                state[name] = np.where(spikes > 0, node.v_reset, v).astype(np.float32)
                x = spikes
            else:
                raise AssertionError(f"unexpected node {type(node).__name__}")
        outputs.append(x)
    return np.stack(outputs)


def test_mlp_exports_to_nir_with_folded_weights_full_shape_lif_and_sparsity(run_dir: Path, tmp_path: Path,
                                                                            run_main) -> None:
    target = tmp_path / "mlp.nir"
    code, out, err = run_main("export", str(run_dir), "--format", "nir", "-o", str(target), "--json")
    assert code == 0, err
    report = json.loads(out)
    graph = nir.read(target)  # type-checks shapes between every pair of connected nodes
    kinds = {name: type(node).__name__ for name, node in graph.nodes.items()}
    assert kinds == {"input": "Input", "encoder.0": "Flatten", "encoder.1": "Affine", "body.0": "LIF",
                     "body.1": "Affine", "output": "Output"}
    assert sorted(graph.edges) == sorted([("input", "encoder.0"), ("encoder.0", "encoder.1"),
                                          ("encoder.1", "body.0"), ("body.0", "body.1"), ("body.1", "output")])
    assert graph.nodes["input"].input_type["input"].tolist() == [1, 28, 28]
    assert graph.nodes["encoder.0"].output_type["output"].tolist() == [784]
    assert graph.nodes["output"].output_type["output"].tolist() == [10]

    trained = load_trained(run_dir)
    folded = dict(fold_batchnorm(trained.model).named_parameters())
    for name in ("encoder.1", "body.1"):
        node = graph.nodes[name]
        for part in ("weight", "bias"):
            expected = folded[f"{name}.{part}"].detach().numpy()
            assert node.__dict__[part].dtype == np.float32 and np.array_equal(node.__dict__[part], expected)
        mask = trained.masks[f"{name}.weight"]
        assert int(node.metadata["nnz"]) == int(mask.sum()) and int(node.metadata["numel"]) == mask.numel()
        assert float(node.metadata["sparsity"]) == pytest.approx(1 - int(mask.sum()) / mask.numel())
        assert not node.weight[~mask.numpy()].any()  # zero outside the mask
    lif = graph.nodes["body.0"]
    for field, value in (("tau", 4 / 3 * 1e-4), ("r", 1.0), ("v_leak", 0.0), ("v_threshold", 1.0), ("v_reset", 0.0)):
        array = getattr(lif, field)
        assert array.shape == (128,) and np.all(array == np.float32(value)), field
    numel = sum(m.numel() for m in trained.masks.values())
    nnz = sum(int(m.sum()) for m in trained.masks.values())
    assert int(graph.metadata["timesteps"]) == 2 and float(graph.metadata["dt"]) == 1e-4 == report["dt"]
    assert float(graph.metadata["sparsity"]) == pytest.approx(1 - nnz / numel) == pytest.approx(report["sparsity"])
    assert graph.metadata["recipe_sha256"] == report["recipe_sha256"] and report["nodes"] == 6


@pytest.mark.parametrize("dt", [1e-4, 1.0, 1e-3])
def test_nir_lif_semantics_at_the_graphs_dt_reproduce_the_pytorch_logits(run_dir: Path, tmp_path: Path,
                                                                         dt: float) -> None:
    from ndsnn_cli.export.nir import export_nir

    path, _ = export_nir(run_dir, tmp_path / "mlp.nir", dt=dt)
    trained = load_trained(run_dir)
    _, test = build_datasets(trained.recipe.data)
    images = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        expected = trained.model(images).numpy()
    got = _simulate(nir.read(path), images.numpy(), timesteps=2)
    assert got.shape == expected.shape == (2, 64, 10)
    assert np.abs(got - expected).max() <= LOGIT_TOL
    assert np.array_equal(got.sum(0).argmax(-1), expected.sum(0).argmax(-1))
    assert len(set(got.sum(0).argmax(-1).tolist())) > 1  # spikes reach the readout: not just the bias


def _fresh_checkpoint(arch: str, path: Path, dataset: str = "synthetic") -> Path:
    """An untrained 90%-sparse checkpoint of `arch` for `dataset`'s image shape (no training needed to test
    the graph; synthetic is 1x28x28, cifar10 3x32x32)."""
    recipe = Recipe().replace(model={"arch": arch, "timesteps": 2}, data={"dataset": dataset},
                              sparsity={"method": "static", "final": 0.9})
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    masks = {n: random_mask(params[n].shape, active_count(params[n].numel(), 0.1), generator)
             for n in sparse_parameter_names(model)}
    with torch.no_grad():
        for n, mask in masks.items():
            params[n].mul_(mask)
    return save_checkpoint(path, model=model, optimizer=None, extra_tensors={f"mask::{n}": m for n, m in masks.items()},
                           meta={"recipe": recipe.to_toml(), "epoch": 0, "step": 0})


def test_resnet19_maps_residual_sums_to_two_edges_and_global_pool_to_avgpool(tmp_path: Path) -> None:
    from ndsnn_cli.export.nir import export_nir

    path, meta = export_nir(_fresh_checkpoint("resnet19", tmp_path / "r.safetensors"), tmp_path / "r.nir")
    graph = nir.read(path)
    into = {}
    for src, dst in graph.edges:
        into.setdefault(dst, []).append(src)
    assert sorted(into["body.1.lif2"]) == ["body.1.conv2", "body.1.shortcut.0"]  # projection shortcut
    assert sorted(into["body.2.lif2"]) == ["body.1.lif2", "body.2.conv2"]  # identity shortcut
    pool = graph.nodes["body.9"]
    assert isinstance(pool, nir.AvgPool2d) and pool.kernel_size.tolist() == [4, 4]  # 28 -> 14 -> 7 -> 4
    kinds = [type(n).__name__ for n in graph.nodes.values()]
    # stem + 8 blocks x 2 + 3 projection shortcuts; stem LIF + 8 x 2 + fc LIF; fc 512->256, 256->10
    assert kinds.count("Conv2d") == 20 and kinds.count("LIF") == 18 and kinds.count("Affine") == 2
    assert meta["nodes"] == len(graph.nodes)


def test_vgg16_max_pools_become_sum_pool_then_a_memoryless_gate_lif(tmp_path: Path) -> None:
    from ndsnn_cli.export.nir import GATE_TAU_STEPS, GATE_THRESHOLD, export_nir

    path, _ = export_nir(_fresh_checkpoint("vgg16", tmp_path / "v.safetensors", "cifar10"), tmp_path / "v.nir")
    graph = nir.read(path)
    pools = [name for name, node in graph.nodes.items() if isinstance(node, nir.SumPool2d)]
    assert len(pools) == 5 and not any(isinstance(n, nir.AvgPool2d | nir.Threshold) for n in graph.nodes.values())
    for name in pools:
        assert graph.nodes[name].kernel_size.tolist() == [2, 2] == graph.nodes[name].stride.tolist()
        gate = graph.nodes[f"{name}.gate"]
        assert [dst for src, dst in graph.edges if src == name] == [f"{name}.gate"]
        assert np.all(gate.tau == np.float32(GATE_TAU_STEPS * 1e-4)) and np.all(gate.v_threshold == GATE_THRESHOLD)
        assert np.all(gate.r == 1) and not gate.v_leak.any() and not gate.v_reset.any()
    flatten = graph.nodes["body.42"]
    assert isinstance(flatten, nir.Flatten) and flatten.input_type["input"].tolist() == [512, 1, 1]  # 32 -> 1


def test_sum_pool_then_gate_lif_is_max_pool_of_spikes_at_every_step() -> None:
    """NIR's Euler LIF (any dt) after a 2x2 sum-pool of 0/1 spikes reproduces max-pooling step by step."""
    from ndsnn_cli.export.nir import GATE_TAU_STEPS, GATE_THRESHOLD

    spikes = (torch.rand(6, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.2).float()  # [T, B, C, H, W]
    v = torch.zeros(4, 3, 4, 4)
    for step in spikes:
        summed = torch.nn.functional.avg_pool2d(step, 2) * 4
        v = v + (summed - v) / GATE_TAU_STEPS  # dt / tau = 1 / GATE_TAU_STEPS
        fired = (v >= GATE_THRESHOLD).float()
        v = v * (1 - fired)
        assert torch.equal(fired, torch.nn.functional.max_pool2d(step, 2)) and not v.any()


@pytest.mark.parametrize(("arch", "dataset", "reason"), [("scnn", "synthetic", "pools analog values"),
                                                         ("vgg16", "synthetic", "ceil_mode")])
def test_unfaithful_max_pools_are_refused_with_one_line_and_exit_2(arch: str, dataset: str, reason: str,
                                                                    tmp_path: Path, run_main) -> None:
    """scnn's encoder pools the analog conv output; vgg16 at 28x28 pools a 7x7 map with ceil_mode."""
    ckpt = _fresh_checkpoint(arch, tmp_path / "c.safetensors", dataset)
    target = tmp_path / "m.nir"
    code, _, err = run_main("export", str(ckpt), "--format", "nir", "-o", str(target))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "MaxPool2d" in lines[0] and "NIR" in lines[0]
    assert reason in lines[0]
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


def test_nir_file_is_gzip_compressed_and_the_summary_gives_its_size_and_dt(run_dir: Path, tmp_path: Path,
                                                                          run_main) -> None:
    import h5py

    target = tmp_path / "mlp.nir"
    code, out, err = run_main("export", str(run_dir), "--format", "nir", "-o", str(target), "--dt", "0.001")
    assert code == 0, err
    size = target.stat().st_size
    assert f"{size:,} bytes" in out and f"{size / 1e6:.2f} MB" in out and "dt = 0.001 s" in out
    with h5py.File(target) as file:
        weight = file["node/nodes/encoder.1/weight"]
        assert weight.compression == "gzip" and weight.compression_opts == 4
    graph = nir.read(target)
    assert float(graph.metadata["dt"]) == 1e-3 and np.all(graph.nodes["body.0"].tau == np.float32(4 / 3 * 1e-3))


@pytest.mark.parametrize("dt", ["0", "-1e-4", "nan", "inf"])
def test_a_non_positive_or_non_finite_dt_is_refused_with_exit_2(dt: str, run_dir: Path, tmp_path: Path,
                                                                run_main) -> None:
    code, _, err = run_main("export", str(run_dir), "--format", "nir", "-o", str(tmp_path / "m.nir"), f"--dt={dt}")
    assert code == 2 and err.strip().startswith("error: --dt") and not (tmp_path / "m.nir").exists()


def test_inspect_shows_a_nir_files_dt_nodes_and_sparsity(run_dir: Path, tmp_path: Path, run_main) -> None:
    target = tmp_path / "mlp.nir"
    assert run_main("export", str(run_dir), "--format", "nir", "-o", str(target))[0] == 0
    code, out, err = run_main("inspect", str(target), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == "nir" and info["format"] == "ndsnn-nir" and info["version"] == 2
    assert info["dt"] == 1e-4 and info["timesteps"] == 2 and info["recipe"]["arch"] == "mlp"
    rows = {row["name"]: row for row in info["layers"]}
    assert rows["encoder.1"]["shape"] == [128, 784] and rows["encoder.1"]["density"] == pytest.approx(
        1 - info["sparsity"], abs=0.05)
    assert rows["body.0"]["storage"].startswith("LIF (tau 0.000133 s)")
    code, out, _ = run_main("inspect", str(target))
    assert code == 0 and "dt = 0.0001 s" in out


def test_a_file_that_is_not_nir_is_refused_by_inspect(tmp_path: Path, run_main) -> None:
    bogus = tmp_path / "x.nir"
    bogus.write_bytes(b"not hdf5")
    code, _, err = run_main("inspect", str(bogus))
    assert code == 2 and "not a readable NIR file" in err
