"""npvae tour: one backward pass node by node, each node checked, equal to the model's own."""
import numpy as np
import pytest

from npvae import cli
from npvae import tour as tour_module
from npvae.models import build
from npvae.tour import NODE_TOL, Node, format_tour, tour, tour_model

KINDS = ("vae-gaussian", "vae-bernoulli", "ae", "vqvae")
# What sits between the decoder's first layer and the encoder's last, in backward order.
LATENT_NODES = {
    "vae-gaussian": ["reparameterization", "KL(", "sum of the two paths into mu/logvar"],
    "vae-bernoulli": ["reparameterization", "KL(", "sum of the two paths into mu/logvar"],
    "ae": ["L2 penalty", "sum of the two paths into code"],
    "vqvae": ["quantizer", "commitment loss", "sum of the two paths into z_e", "codebook loss"],
}


@pytest.fixture(scope="module")
def tours():
    """Each kind's tour, run once for the whole module."""
    return {kind: tour(*tour_model(kind)) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_nodes_run_from_the_loss_back_to_the_first_layer(tours, kind):
    nodes = tours[kind]
    assert all(isinstance(node, Node) for node in nodes)
    names = [node.name for node in nodes]
    assert names[0].startswith("loss = mean(-logp)")
    assert names[1].startswith("likelihood")
    assert names[2:6] == ["dec.1 bias (no activation)", "dec.1 linear a = h W",
                          "dec.0 bias + relu", "dec.0 linear a = h W"]
    latent = names[6:-4]
    assert len(latent) == len(LATENT_NODES[kind])
    assert all(name.startswith(start) for name, start in zip(latent, LATENT_NODES[kind]))
    assert names[-4:] == ["enc.1 bias (no activation)", "enc.1 linear a = h W",
                          "enc.0 bias + relu", "enc.0 linear a = h W"]
    # the gradient each node sends is what the next node in the table receives
    for before, after in zip(nodes[2:5], nodes[3:6]):
        assert list(before.grad_norms.values())[0] == after.upstream[0][2]
    assert all(node.tags for node in nodes)


@pytest.mark.parametrize("kind", KINDS)
def test_every_derived_node_agrees_with_central_differences(tours, kind):
    for node in tours[kind]:
        if node.copied:
            continue
        assert node.error is not None and node.error <= NODE_TOL, (node.name, node.error)
        assert node.passed


@pytest.mark.parametrize("kind", KINDS)
def test_tour_gradients_equal_loss_and_grads(tours, kind):
    model, x, eps = tour_model(kind)
    nodes = tours[kind]
    _, grads, _ = model.loss_and_grads(x, eps=eps)
    assert set(nodes.grads) == set(model.params)
    for name in model.params:
        np.testing.assert_allclose(nodes.grads[name], grads[name], rtol=0, atol=1e-12)
    assert nodes.max_difference <= 1e-12 and nodes.matches_model and nodes.ok


def test_only_the_straight_through_node_is_copied(tours):
    for kind in ("vae-gaussian", "vae-bernoulli", "ae"):
        assert not any(node.copied for node in tours[kind])
    copied = [node for node in tours["vqvae"] if node.copied]
    assert len(copied) == 1
    q = copied[0]
    assert q.name.startswith("quantizer") and "VQ.3" in q.tags
    assert "copied (straight-through), not derived (VQ.3)" in q.note
    assert "dz_e == dz_q exactly: True" in q.note
    # dz_e is dz_q itself: the same norm to the last bit
    assert q.grad_norms["dz_e"] == q.upstream[0][2]
    # the true derivative of the selection is zero: central differences see nothing
    # exact: the quantized output does not change under the small steps, so each central
    # difference is x - x = 0; rel_error(a, 0) = |a| / |a| = 1
    assert q.numeric_norm == 0.0 and q.error == 1.0
    assert q.stopped["codebook"] > 0.1  # the derivative in the codebook, dropped on purpose


def test_vq_stop_gradients_are_shown(tours):
    by_name = {node.name.split(" ")[0] + " " + node.name.split(" ")[1]: node
               for node in tours["vqvae"]}
    commitment, codebook = by_name["commitment loss"], by_name["codebook loss"]
    assert set(commitment.grad_shapes) == {"dz_e"} and set(commitment.stopped) == {"codebook"}
    assert set(codebook.grad_shapes) == {"dcodebook"} and set(codebook.stopped) == {"z_e"}
    assert commitment.stopped["codebook"] > 0 and codebook.stopped["z_e"] > 0
    assert "sg[" in commitment.note and "sg[" in codebook.note


@pytest.mark.parametrize("cfg", [
    dict(kind="ae", hidden=[6, 5], latent=3, sampled=True, activation="tanh"),
    dict(kind="vae-bernoulli", hidden=[6], latent=3, free_bits=0.3, beta=0.5,
         activation="softplus"),
    dict(kind="vae-gaussian", hidden=[6], latent=3, sigma2=0.5, activation="leaky_relu"),
    dict(kind="vqvae", hidden=[], num_codes=5, code_dim=2, num_vectors=2, ema=True,
         metric="dot"),
], ids=["ae-sampled", "vae-free-bits", "vae-gaussian-sigma2", "vqvae-ema-dot"])
def test_other_configurations(cfg):
    model = build(dict(cfg, data_dim=10, dtype="float64"), rng=2)
    x = np.random.default_rng(1).uniform(0.05, 0.95, (3, 10))
    nodes = tour(model, x, max_entries=8)
    assert nodes.ok, [(node.name, node.error) for node in nodes if not node.passed]
    assert nodes[-1].name.startswith("enc.0 linear")


def test_float32_model_is_refused():
    model = build(dict(kind="vae-bernoulli", data_dim=6, hidden=[4], latent=2), rng=0)
    with pytest.raises(ValueError, match="float64"):
        tour(model, np.full((2, 6), 0.5, dtype=np.float32))


def _scaled(real, which):
    def wrong(*args):
        grads = list(real(*args))
        grads[which] = 1.01 * grads[which]
        return tuple(grads)
    return wrong


@pytest.mark.parametrize("op, which, marks, count", [
    ("reparameterize_backward", 1, "reparameterization", 1),  # dlogvar 1% too large
    ("bias_activation_backward", 1, " bias", 4),  # db 1% too large, in every layer
])
def test_a_wrong_backward_is_caught(monkeypatch, capsys, op, which, marks, count):
    monkeypatch.setattr(tour_module, op, _scaled(getattr(tour_module, op), which))
    nodes = tour(*tour_model("vae-bernoulli"))
    failed = [n for n in nodes if not n.passed]
    assert len(failed) == count and all(marks in n.name for n in failed)
    assert all(n.error > 1e-3 for n in failed)
    assert not nodes.matches_model and not nodes.ok
    assert cli.main(["tour", "vae-bernoulli"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "MISMATCH" in out


def test_cli_prints_the_node_table(capsys):
    assert cli.main(["tour", "vae-bernoulli"]) == 0
    out = capsys.readouterr().out
    for words in ["loss = mean(-logp) + w*mean(KL)", "(LIK.4)", "dec.1 linear a = h W",
                  "(LIN.2, LIN.3)", "(ACT.1, LIN.4)", "(REP.2, REP.3)", "(KL.2, KL.3)",
                  "sum of the two paths into mu/logvar", "enc.0 linear a = h W", "rel. error",
                  "the tour's gradients match model.loss_and_grads: max difference"]:
        assert words in out, words
    assert out.index("likelihood") < out.index("reparameterization") < out.index("enc.0 linear")
    assert "FAIL" not in out


def test_cli_vqvae_shows_the_copy(capsys):
    assert cli.main(["tour", "vqvae", "--batch", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "copied (straight-through), not derived (VQ.3)" in out
    assert "dz_e == dz_q exactly: True" in out
    assert "stopped" in out


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["tour", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for word in ["MODEL", "vqvae", "--seed", "--batch", "--data-dim", "examples", "--likelihood",
                 "--sampled", "--metric", "the tutorial's own models"]:
        assert word in text, word


def test_format_tour_takes_a_plain_list(tours):
    text = format_tour(list(tours["ae"]))
    assert "L2 penalty" in text and "match model.loss_and_grads" not in text


# ----------------------------------------------------------------------------------
# Formulas, forward values, layer sizes and the options that tour the tutorial's models

DOC_TAGS = set(__import__("re").findall(
    r"^\*\*\(([A-Z]+\.\d+)\)\*\*",
    (__import__("pathlib").Path(__file__).resolve().parents[1] / "docs" / "derivations.md")
    .read_text(encoding="utf-8"), __import__("re").M))


@pytest.mark.parametrize("kind", KINDS)
def test_every_node_shows_its_equations_and_value(tours, kind):
    import re
    for node in tours[kind]:
        assert node.formula and node.gradient and node.value, node.name
        cited = re.findall(r"\(([A-Z]+\.\d+)", node.formula + " " + node.gradient)
        assert all(tag in DOC_TAGS for tag in cited), (node.name, cited)
    by_start = {node.name.split(" ")[0]: node for node in tours[kind]}
    assert "(MLP.1" in by_start["enc.0"].formula


@pytest.mark.parametrize("kind", ["vae-gaussian", "vae-bernoulli", "ae"])
def test_forward_values_are_the_models_own(tours, kind):
    model, x, eps = tour_model(kind)
    _, _, stats = model.loss_and_grads(x, eps=eps)
    values = tours[kind].forward
    assert values["reconstruction"] == pytest.approx(stats["recon"], rel=1e-12)
    assert values["kl"] == pytest.approx(stats["kl"], rel=1e-12)
    assert values["elbo"] == pytest.approx(-(stats["recon"] + stats["kl"]), rel=1e-12)
    loss_node, lik_node = tours[kind][0], tours[kind][1]
    assert f"{values['elbo']:.6g}" in loss_node.value
    assert f"{values['reconstruction']:.6g}" in lik_node.value


def test_vq_forward_values_use_the_constant_kl(tours):
    model, x, _ = tour_model("vqvae")
    values = tours["vqvae"].forward
    assert values["kl"] == pytest.approx(model.M * np.log(model.K))
    assert values["elbo"] == pytest.approx(-(values["reconstruction"] + values["kl"]))
    assert "M log K" in tours["vqvae"][0].value


@pytest.mark.parametrize("kind, options, config, sizes", [
    ("vae-gaussian", {}, {"likelihood": "gaussian"},
     ["encoder 64-16-4: 64 inputs, a hidden layer of 16 (relu), 4 = mu and log sigma^2 for 2 "
      "latents", "64 = means of 64 Gaussian pixels"]),
    ("ae", dict(sampled=True, likelihood="gaussian"), {"sampled": True, "likelihood": "gaussian"},
     ["encoder 64-16-2: 64 inputs, a hidden layer of 16 (relu), 2 = the code", "2 latents in"]),
    ("vqvae", dict(metric="dot", likelihood="gaussian"), {"metric": "dot", "likelihood": "gaussian"},
     ["4 = 2 code vectors of size 2", "decoder 4-16-64: 4 = the 2 chosen codes of size 2"]),
], ids=["gaussian-vae", "noisy-ae", "dot-vqvae"])
def test_the_tutorials_models_can_be_toured(kind, options, config, sizes):
    model, x, eps = tour_model(kind, **options)
    assert {k: model.config[k] for k in config} == config
    nodes = tour(model, x, eps)
    assert nodes.ok
    text = " ".join(format_tour(nodes).split())  # wrapped lines joined
    for words in sizes:
        assert words in text, words
    names = [node.name for node in nodes]
    if kind == "ae":
        assert any(name.startswith("sampling z = code + eps") for name in names)
        assert "(REP.1 with logvar = 0)" in text
        assert "a lower bound on log p(x)" in text
    if kind == "vqvae":
        assert "k_r = argmax_k z_r . e_k (VQ.2)" in text
    assert "logp_n = -||x_n - m_n||^2 / (2 s2)" in text and "(LIK.1)" in text


@pytest.mark.parametrize("kind, options", [
    ("vae-bernoulli", dict(sampled=True)), ("vae-gaussian", dict(likelihood="bernoulli")),
    ("ae", dict(metric="dot")), ("vqvae", dict(sampled=True)), ("made", dict(metric="dot")),
])
def test_an_option_the_model_does_not_take_is_refused(kind, options):
    with pytest.raises(ValueError, match="is for"):
        tour_model(kind, **options)


def test_cli_tours_the_noisy_autoencoder_with_formulas_and_values(capsys):
    assert cli.main(["tour", "ae", "--sampled", "--likelihood", "gaussian"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("npvae tour ae --likelihood gaussian --sampled, seed 0")
    for words in ["forward, nats per example: reconstruction -mean log p(x|z) =", "KL =",
                  "ELBO =", "forward   loss = -mean_n logp_n + w mean_n l2_n  (AE.2)",
                  "backward  dcode = dl2 * code  (AE.3)", "value     l2 (4,), mean",
                  "2-norm of a gradient array", "docs/derivations.md",
                  "encoder 64-16-2: 64 inputs"]:
        assert words in out, words
    assert out.count("forward   ") == out.count("backward  ") == out.count("check     ")


def test_cli_tours_the_dot_product_vqvae(capsys):
    assert cli.main(["tour", "vqvae", "--metric", "dot", "--likelihood", "gaussian"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # wrapped lines joined
    assert "dot assignment" in out and "means of 64 Gaussian pixels" in out
    assert "copied (straight-through), not derived (VQ.3)" in out


@pytest.mark.parametrize("argv", [["tour", "vae-bernoulli", "--sampled"],
                                  ["tour", "ae", "--metric", "dot"],
                                  ["tour", "vae-gaussian", "--likelihood", "bernoulli"]])
def test_cli_refuses_an_option_of_another_model(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "is for" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_learned_priors_nodes_show_their_equations():
    import re
    nodes = tour(*tour_model("made"))
    assert nodes.ok
    for node in nodes:
        assert node.formula and node.gradient and node.value, node.name
        cited = re.findall(r"\(([A-Z]+\.\d+)", node.formula + " " + node.gradient)
        assert cited and all(tag in DOC_TAGS for tag in cited), (node.name, cited)
