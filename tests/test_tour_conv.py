"""npvae tour conv-vae and conv-vqvae: the convolutional models' backward passes node by
node, each node checked by central differences and the whole against loss_and_grads."""
import numpy as np
import pytest

from npvae import cli
from npvae import tour_conv
from npvae.tour import format_tour, tour, tour_model


@pytest.fixture(scope="module")
def nodes():
    return tour(*tour_model("conv-vae"))


def test_the_nodes_run_from_the_loss_through_the_conv_layers(nodes):
    names = [n.name for n in nodes]
    expected = ["loss", "likelihood", "dec.convT1 transposed convolution", "dec.convT0 relu",
                "dec.convT0 transposed convolution", "dec.fc relu", "dec.fc linear",
                "reparameterization", "KL", "sum of the two paths", "enc.fc linear",
                "enc.conv1 relu", "enc.conv1 convolution", "enc.conv0 relu",
                "enc.conv0 convolution"]
    assert len(names) == len(expected)
    for name, start in zip(names, expected):
        assert name.startswith(start), (name, start)


def test_each_node_has_its_tags_and_the_first_conv_sends_no_dx(nodes):
    tags = {n.name.split()[0]: n.tags for n in nodes}
    assert tags["enc.conv1"] == ("CONV.2", "CONV.3", "CONV.4")
    assert tags["enc.conv0"] == ("CONV.3", "CONV.4")  # x is data
    assert tags["dec.convT0"] == tags["dec.convT1"] == ("CONVT.2", "CONV.4")
    first = nodes[-1]
    assert set(first.grad_shapes) == {"d(enc.conv0.w)", "d(enc.conv0.b)"}
    assert first.input_shapes["x"] == (4, 1, 8, 8)
    assert first.grad_shapes["d(enc.conv0.w)"] == (2, 1, 4, 4)


def test_every_node_agrees_and_the_gradients_are_the_models(nodes):
    assert nodes.ok and nodes.matches_model
    assert all(n.error is not None and n.error < 1e-6 for n in nodes)
    assert set(nodes.grads) == set(tour_model("conv-vae")[0].params)


def test_forward_values_are_the_models_own(nodes):
    model, x, eps = tour_model("conv-vae")
    loss, _, stats = model.loss_and_grads(x, eps=eps)
    assert nodes.loss == pytest.approx(loss, rel=1e-12)
    assert nodes.forward["reconstruction"] == pytest.approx(stats["recon"], rel=1e-12)
    assert nodes.forward["kl"] == pytest.approx(stats["kl"], rel=1e-12)


@pytest.mark.parametrize("seed, likelihood, batch, data_dim", [
    (1, "gaussian", 3, 64), (2, None, 1, 64), (3, "bernoulli", 2, 144)])
def test_other_seeds_likelihoods_and_sizes(seed, likelihood, batch, data_dim):
    model, x, eps = tour_model("conv-vae", data_dim, batch, seed, likelihood=likelihood)
    assert tour_conv._kink_margin(model, x, eps) > tour_conv.KINK_MARGIN
    assert tour(model, x, eps).ok


def _scaled(real, which):
    def wrong(*args, **kwargs):
        grads = list(real(*args, **kwargs))
        grads[which] = 1.01 * grads[which]
        return tuple(grads)
    return wrong


@pytest.mark.parametrize("op, which, marks, count", [
    ("conv2d_backward", 1, "convolution a = conv", 2),  # dw 1% too large, both layers
    ("conv_transpose2d_backward", 0, "transposed convolution", 2),  # dh 1% too large
])
def test_a_wrong_conv_backward_is_caught(monkeypatch, capsys, op, which, marks, count):
    monkeypatch.setattr(tour_conv, op, _scaled(getattr(tour_conv, op), which))
    nodes = tour(*tour_model("conv-vae"))
    failed = [n for n in nodes if not n.passed]
    assert len(failed) == count and all(marks in n.name for n in failed)
    assert not nodes.ok
    assert cli.main(["tour", "conv-vae"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["tour", "conv-vae"], ["tour", "--model", "conv-vae"]])
def test_cli_prints_the_conv_nodes(capsys, argv):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    joined = " ".join(out.split())
    for words in ["npvae tour conv-vae, seed 0", "encoder 1x8x8 -> conv 4x4/2 + relu -> 2x4x4",
                  "conv^T 4x4/2 -> 1x8x8 logits", "(CONV.2, CONV.3, CONV.4)", "(CONVT.2, CONV.4)",
                  "(CONV.1)", "(CONVT.1)", "x is data: its gradient is not needed",
                  "the tour's gradients match model.loss_and_grads",
                  "every derived node agrees with central differences"]:
        assert words in joined, words
    assert out.count("forward   ") == out.count("backward  ") == out.count("check     ") == 15


def test_format_tour_reads_the_conv_tour(nodes):
    text = format_tour(nodes)
    assert text.startswith("conv-vae: one training step on 4 images of 1x8x8")
    assert "gaussian" not in text.splitlines()[1]


@pytest.mark.parametrize("argv, words", [
    (["tour", "conv-vae", "--data-dim", "60"], "square images"),
    (["tour", "conv-vae", "--metric", "dot"], "is for"),
    (["tour", "conv-vae", "--sampled"], "is for"),
    (["tour", "conv-vqvae", "--sampled"], "is for"),
])
def test_cli_refuses_what_the_conv_tour_cannot_do(capsys, argv, words):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_float32_conv_model_is_refused():
    from npvae.models import ConvVAE

    model = ConvVAE(image_shape=(1, 8, 8), channels=(2, 3), latent=2)
    with pytest.raises(ValueError, match="float64"):
        tour(model, np.full((2, 64), 0.5, dtype=np.float32))


# ----------------------------------------------------------------------------- conv-vqvae


def test_the_conv_vqvae_tour_reads_its_map_as_rows_and_back():
    nodes = tour(*tour_model("conv-vqvae"))
    assert nodes.ok and nodes.matches_model
    names = [n.name for n in nodes]
    order = ["loss", "likelihood", "dec.convT1", "dec.convT0 relu", "dec.convT0", "dec.in relu",
             "dec.in convolution", "the rows put back on the map", "quantizer", "commitment",
             "sum of the two paths into z_e", "codebook loss", "code map read as M rows",
             "enc.out convolution", "enc.conv1 relu", "enc.conv1", "enc.conv0 relu", "enc.conv0"]
    assert len(names) == len(order)
    for name, start in zip(names, order):
        assert name.startswith(start), (name, start)
    assert [n.name for n in nodes if n.copied] == ["quantizer z_q = E[k], k the nearest code"]
    rows = {n.name: n for n in nodes}["code map read as M rows, raster order"]
    assert rows.tags == ("CVQ.2",) and rows.input_shapes["enc.out.a"] == (4, 2, 2, 2)


@pytest.mark.parametrize("options", [dict(metric="dot", likelihood="gaussian"), dict(seed=3)])
def test_other_conv_vqvae_tours(options):
    seed = options.pop("seed", 0)
    model, x, eps = tour_model("conv-vqvae", 64, 3, seed, **options)
    assert eps is None and tour_conv._kink_margin(model, x, eps) > tour_conv.KINK_MARGIN
    assert tour(model, x).ok


def test_map_to_rows_is_the_models_permutation_and_its_inverse():
    model, x, _ = tour_model("conv-vqvae")
    z_map = model.code_map(x)  # (N, Dz, h', w')
    rows, shape = tour_conv.map_to_rows_forward(z_map)
    assert np.array_equal(rows.reshape(len(x), model.M, model.Dz), model.encode(x))
    back, _ = tour_conv.rows_to_map_forward(rows, shape[1:])
    assert np.array_equal(back, z_map)
    assert np.array_equal(tour_conv.map_to_rows_backward(rows, shape), z_map)


def test_cli_tours_the_conv_vqvae(capsys):
    assert cli.main(["tour", "--model", "conv-vqvae", "--metric", "dot"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for words in ["8 codes of size 2, 4 per example (a 2x2 map), dot assignment",
                  "conv 1x1 -> 2x2x2 = z_e", "(CVQ.1)", "(CVQ.2)", "(CONVT.1)",
                  "copied (straight-through), not derived (VQ.3)"]:
        assert words in out, words
