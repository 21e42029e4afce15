"""npvae tour conv-vae: the convolutional VAE's backward pass node by node, each node
checked by central differences and the whole against ConvVAE.loss_and_grads."""
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
    (["tour", "conv-vqvae"], "npvae gradcheck conv-vqvae"),
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
