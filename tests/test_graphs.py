"""demos/graphs.py draws each model's forward and backward graph from its tour's nodes."""
import importlib.util
from pathlib import Path

import pytest

from npvae.tour import tour, tour_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graphs():
    spec = importlib.util.spec_from_file_location("graphs", ROOT / "demos" / "graphs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_vqvae_graph_has_the_copy_and_the_cuts(graphs, tmp_path):
    path = tmp_path / "graph.png"
    counts = graphs.draw("vqvae", path, data_dim=6, metric="dot", likelihood="gaussian")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one straight-through copy (VQ.3); sg[.] cuts the codebook out of the quantizer's and
    # the commitment loss's backward (VQ.3, VQ.5) and z_e out of the codebook loss's (VQ.4)
    assert counts["copied"] == 1 and counts["cut"] == 3


def test_the_graph_is_read_from_the_tour(graphs):
    nodes = tour(*tour_model("vae-bernoulli", data_dim=6))
    ops, sources, edges = graphs.graph(nodes)
    assert [op.name for op in ops] == [node.name for node in reversed(nodes)]
    assert set(sources) == {"x", "eps"}
    by_name = {op.name: j for j, op in enumerate(ops)}
    reparam = next(j for name, j in by_name.items() if name.startswith("reparameterization"))
    into = {(e["src"] if isinstance(e["src"], str) else ops[e["src"]].name, e["tensor"], e["back"])
            for e in edges if e["dst"] == reparam}
    split = "sum of the two paths into mu/logvar"
    assert into == {(split, "mu", "derived"), (split, "logvar", "derived"), ("eps", "eps", None)}
    # every op but the first layer reads another op's output, and the loss reads two
    assert all(any(e["dst"] == j and isinstance(e["src"], int) for e in edges)
               for j in range(1, len(ops)))
    assert sum(e["dst"] == len(ops) - 1 for e in edges) == 2
    assert not any(e["back"] in ("copied", "cut") for e in edges)


def test_the_script_writes_every_model(graphs, tmp_path, monkeypatch):
    monkeypatch.setattr(graphs, "MODELS", {"ae": ("ae", dict(sampled=True,
                                                             likelihood="gaussian"))})
    assert graphs.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "graph-ae.png").read_bytes()[:4] == b"\x89PNG"
