"""The convolutional VQ-VAE: whole-model straight-through gradients against central
differences, the code map's geometry and raster order, the codebook's bookkeeping on the
map's rows (moving averages, restarts, k-means), rebuilding and checkpoints, and a learned
prior over its M = 49 codes."""
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from npvae.checkpoint import load_checkpoint, save_checkpoint
from npvae.codeprior import decode_codes, encode_codes, require_vqvae, sample_codes
from npvae.gradcheck import check_model
from npvae.models import MODELS, ConvVQVAE, MADEPrior, VQVAE, build
from npvae.ops.conv import conv2d_forward, conv_transpose2d_forward
from npvae.ops.vq import kmeans_init
from npvae.optim import Adam
from npvae.train import train

from strategies import seeds
from test_vq_bookkeeping import assert_encoder_receives_dz_q, ema_by_hand

TOL = 1e-6
MARGIN = 1e-3  # distance kept from ReLU kinks and code ties: a step of 1e-4 in one
# parameter moves a pre-activation by 1e-4 times an input of order one, well under it


def tiny(likelihood="bernoulli", dtype=np.float64, **kw):
    """8 x 8 images, channels (2, 3): a 2 x 2 map, M = 4 code vectors of size 2."""
    args = dict(image_shape=(1, 8, 8), channels=(2, 3), num_codes=5, code_dim=2,
                likelihood=likelihood, ema=False, restart_after=0, kmeans_init=False,
                dtype=dtype, rng=0)
    args.update(kw)
    return ConvVQVAE(**args)


def images(n, rng, d=64, dtype=np.float64):
    return rng.random((n, d)).astype(dtype)


def preactivations(model, x):
    """Every ReLU's input, encoder on x and decoder on the chosen codes, recomputed here
    from the conv ops (not from the model's caches)."""
    p, out = model.params, []
    h = x.reshape((x.shape[0],) + model.image_shape)
    for i in range(model.n_conv):
        a, _ = conv2d_forward(h, p[f"enc.conv{i}.w"], p[f"enc.conv{i}.b"], 2, 1)
        out.append(a)
        h = np.maximum(a, 0)
    idx = model.assign(x)  # (N, M)
    z = model.params["codebook"][idx]  # (N, M, Dz)
    z = z.reshape((x.shape[0],) + model.map_side + (model.Dz,)).transpose(0, 3, 1, 2)
    a, _ = conv2d_forward(np.ascontiguousarray(z), p["dec.in.w"], p["dec.in.b"], 1, 1)
    out.append(a)
    h = np.maximum(a, 0)
    for i in range(model.n_conv - 1):
        a, _ = conv_transpose2d_forward(h, p[f"dec.convT{i}.w"], p[f"dec.convT{i}.b"], 2, 1)
        out.append(a)
        h = np.maximum(a, 0)
    return out


# ----------------------------------------------------------------------------------
# Gradients: the straight-through estimate is the true gradient of (VQVAE.4)


@settings(max_examples=8, deadline=None)
@given(seeds, st.sampled_from(["bernoulli", "gaussian"]), st.sampled_from(["euclidean", "dot"]),
       st.booleans())
def test_every_gradient_matches_central_differences(seed, likelihood, metric, ema):
    rng = np.random.default_rng(seed)
    model = tiny(likelihood, metric=metric, ema=ema, rng=seed)
    for p in model.params.values():  # non-trivial biases, so a wrong db cannot hide
        if p.ndim == 1:
            p[...] = rng.normal(scale=0.1, size=p.shape)
    x = images(3, rng)
    assume(model.assignment_margin(x) > MARGIN)
    assume(all(np.abs(a).min() > MARGIN for a in preactivations(model, x)))
    loss, grads, _ = model.loss_and_grads(x)
    assert model.straight_through_objective(x)() == pytest.approx(loss, rel=1e-12)
    if ema:
        assert not grads["codebook"].any()  # learned by moving averages, not by gradient
    rows = check_model(model, x, max_entries=12, rng=rng)
    worst = max(r.rel_error for r in rows)
    assert worst <= TOL, "\n".join(str(r) for r in rows)


def test_with_beta_zero_each_row_gets_its_decoder_input_gradient_copied():
    """(VQ.3, CVQ.1): without the commitment term, dz_e is dz_q row for row."""
    assert_encoder_receives_dz_q(tiny(beta=0.0, rng=3), images(2, np.random.default_rng(3)))


def test_float32_agrees_with_float64():
    m64 = tiny(likelihood="gaussian", rng=2)
    m32 = tiny(likelihood="gaussian", dtype=np.float32, rng=2)
    m32.params.flat[...] = m64.params.flat
    x = images(4, np.random.default_rng(2))
    assert m64.assignment_margin(x) > 1e-4  # float32's rounding (~1e-7 here) cannot flip a code
    assert np.array_equal(m32.assign(x.astype(np.float32)), m64.assign(x))
    l64, g64, _ = m64.loss_and_grads(x)
    l32, g32, _ = m32.loss_and_grads(x.astype(np.float32))
    assert g32.flat.dtype == np.float32
    assert l32 == pytest.approx(l64, rel=1e-5)
    scale = np.abs(g64.flat).max()
    assert np.abs(g32.flat - g64.flat).max() / scale < 1e-4


# ----------------------------------------------------------------------------------
# Geometry and checks


def test_geometry_of_the_default_model():
    model = ConvVQVAE()
    assert model.M == model.config["num_vectors"] == 49 and model.map_side == (7, 7)
    assert (model.K, model.Dz) == (model.config["num_codes"], model.config["code_dim"])
    shapes = {k: v.shape for k, v in model.params.items()}
    assert shapes["enc.conv0.w"] == (32, 1, 4, 4) and shapes["enc.conv1.w"] == (64, 32, 4, 4)
    assert shapes["enc.out.w"] == (model.Dz, 64, 1, 1) and shapes["dec.in.w"] == (64, model.Dz, 3, 3)
    assert shapes["dec.convT0.w"] == (64, 32, 4, 4) and shapes["dec.convT1.w"] == (32, 1, 4, 4)
    assert shapes["codebook"] == (model.K, model.Dz)
    x = np.random.default_rng(0).random((3, 784)).astype(np.float32)
    z_e = model.encode(x)
    assert z_e.shape == (3, 49, model.Dz)
    assert model.code_map(x).shape == (3, model.Dz, 7, 7)
    idx = model.assign(x)
    assert idx.shape == (3, 49) and idx.min() >= 0 and idx.max() < model.K
    assert model.assign_map(x).shape == (3, 7, 7)
    assert model.decode_indices(idx).shape == (3, 784)
    assert model.reconstruct(x).shape == (3, 784)
    assert model.sample(2, rng=0).shape == (2, 784)
    loss, grads, stats = model.loss_and_grads(x)
    assert np.isfinite(loss) and set(grads) == set(model.params)
    assert stats["kl"] == pytest.approx(49 * np.log(model.K))  # (VQVAE.1)


def test_rows_are_the_map_in_raster_order():
    """Code vector m of an image is the map's column at (i, j) = (m // w', m % w')  (CVQ.1)."""
    model = ConvVQVAE(image_shape=(1, 12, 8), channels=(2, 3), code_dim=3, rng=1)
    assert model.map_side == (3, 2) and model.M == 6
    x = images(2, np.random.default_rng(1), d=96, dtype=np.float32)
    rows, z_map = model.encode(x), model.code_map(x)
    for m in range(6):
        np.testing.assert_array_equal(rows[:, m], z_map[:, :, m // 2, m % 2])
    assert np.array_equal(model.assign_map(x).reshape(2, 6), model.assign(x))


def test_changing_one_code_changes_the_image_near_its_position_only():
    """The decoder reads code m through a 3x3 conv and two stride-2 conv^T: position (0, 0)
    of a 7 x 7 map reaches map positions 0..1, then 0..4 of the 14 x 14 layer (a conv^T
    4x4/2 pad 1 sends input i to outputs 2i - 1 .. 2i + 2), then pixels 0..10 of 28 x 28."""
    model = ConvVQVAE(channels=(4, 8), num_codes=6, code_dim=2, rng=2)
    idx = np.zeros((1, 49), dtype=np.int64)
    other = idx.copy()
    other[0, 0] = 5
    diff = np.abs(model.decode_indices(idx) - model.decode_indices(other)).reshape(28, 28)
    assert diff.max() > 0
    assert not diff[11:, :].any() and not diff[:, 11:].any()
    assert diff[10, :].any() and diff[:, 10].any()  # the bound is tight


def _reach(side, inputs):
    """The positions of a map of ``side`` a 4x4/2 pad 1 conv^T output in ``inputs`` reads:
    input p reaches outputs 2p - 1 .. 2p + 2."""
    return {p for p in range(side) if any(2 * p - 1 <= o <= 2 * p + 2 for o in inputs)}


def test_each_pixel_reads_the_codes_of_a_block_of_2_to_5_positions_per_side():
    """Two conv^T 4x4/2 let a pixel see 1 to 3 map positions per side, the 3x3 conv one
    more on each side: 2 to 5 positions, 4 or 5 away from the border (CVQ.1)."""
    model = ConvVQVAE(channels=(4, 8), num_codes=6, code_dim=2, dtype=np.float64, rng=2)
    rng = np.random.default_rng(1)
    for name, p in model.params.items():  # non-zero biases: fewer ReLUs silent on a change
        if name.endswith(".b"):
            p[...] = rng.normal(scale=0.1, size=p.shape)
    base = rng.integers(6, size=(1, 49))
    others = np.repeat(base, 49 * 5, axis=0)  # row 5 m + a: code m set to its a-th other value
    for m in range(49):
        others[5 * m:5 * m + 5, m] = [k for k in range(6) if k != base[0, m]]
    out = model.decode_indices(np.concatenate([base, others])).reshape(-1, 28, 28)
    # a pixel the code cannot reach may still differ in its last bits: the batch's rows
    # meet the matrix products' blocks at different places, which BLAS rounds differently
    # (1e-16 seen with AVX2 kernels); in float64 a real change is above 7e-8 here
    changed = (np.abs(out[1:] - out[0]) > 1e-10).reshape(49, 5, 28, 28).any(axis=1)  # (M, 28, 28)
    changed = changed.reshape(7, 7, 28, 28)  # [i, j, r, c]: pixel (r, c) reads code (i, j)
    window = {o: {i + d for i in _reach(7, _reach(14, {o})) for d in (-1, 0, 1)} & set(range(7))
              for o in range(28)}  # the map positions pixel row (or column) o can read
    assert {len(w) for w in window.values()} == {2, 3, 4, 5}
    assert {len(window[o]) for o in range(5, 23)} == {4, 5}  # away from the border
    spans = set()
    for r in range(28):
        for c in range(28):
            rows, cols = np.nonzero(changed[:, :, r, c])
            assert set(rows) <= window[r] and set(cols) <= window[c]
            spans |= {np.ptp(rows) + 1, np.ptp(cols) + 1}
    assert spans == {2, 3, 4, 5}  # measured: no pixel reads a block wider than 5
    rows, cols = np.nonzero(changed[:, :, 14, 14])  # the bound is reached: a 5 x 5 block
    assert set(rows) == set(cols) == {1, 2, 3, 4, 5}
    rows, cols = np.nonzero(changed[:, :, 0, 0])  # and in the corner, 2 x 2
    assert set(rows) == set(cols) == {0, 1}


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_shape=(1, 30, 30)), "divisible by 4"),
    (dict(image_shape=(28, 28)), r"\(C, H, W\)"),
    (dict(image_shape=(1, 28, 28), channels=(8, 8, 8)), "divisible by 8"),
    (dict(channels=()), "positive"),
    (dict(image_shape=(1, 28.5, 28)), r"image_shape\[1\] must be a positive integer, got 28.5"),
    (dict(channels=(2.9, 3)), r"channels\[0\] must be a positive integer, got 2.9"),
    (dict(channels=("2", "3")), r"channels\[0\] must be a positive integer, got '2'"),
    (dict(num_vectors=4), "num_vectors 4 does not match .* M = 49"),
    (dict(data_dim=100), "data_dim 100 does not match"),
    (dict(hidden=(400,)), "no hidden list"),
    (dict(activation="tanh"), "ReLU"),
    (dict(num_codes=0), "num_codes must be a positive integer, got 0"),
    (dict(code_dim=0), "code_dim must be a positive integer, got 0"),
    (dict(beta=-1.0), "beta"),
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(restart_after=-1), "restart_after"),
    (dict(metric="cosine"), "metric"),
    (dict(likelihood="poisson"), "likelihood"),
])
def test_bad_config_is_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvVQVAE(**kwargs)


def test_the_settings_that_match_the_architecture_are_accepted():
    model = ConvVQVAE(data_dim=784, num_vectors=49, hidden=[], activation="relu")
    assert model.config["num_vectors"] == 49


@pytest.mark.parametrize("shape, match", [((2, 1, 28, 28), "2 dimensions|2-D|ndim|dimension"),
                                          ((2, 783), "784 features")])
def test_bad_input_shapes_are_refused(shape, match):
    model = ConvVQVAE(channels=(2, 3), rng=0)
    x = np.zeros(shape, dtype=np.float32)
    for call in (model.loss_and_grads, model.encode, model.assign, model.reconstruct):
        with pytest.raises(ValueError, match=match):
            call(x)


def test_bad_code_indices_are_refused():
    model = ConvVQVAE(channels=(2, 3), num_codes=8, rng=0)
    with pytest.raises(ValueError, match=r"\(N, 49\)"):
        model.decode_indices(np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        model.decode_indices(np.full((2, 49), 8))


# ----------------------------------------------------------------------------------
# The codebook's bookkeeping, on the rows of the map


def test_kmeans_init_fits_the_first_batch_rows():
    """(VQ.7): the first batch's code vectors, all N M = 4 N rows, are what k-means fits."""
    model = tiny(num_codes=4, kmeans_init=True, ema=True)
    assert not model.buffers["initialised"]
    x = images(6, np.random.default_rng(0))
    rows = model.encode(x).reshape(-1, model.Dz)  # (24, 2)
    model.on_batch_start(x, np.random.default_rng(5))
    expected = kmeans_init(rows, 4, np.random.default_rng(5))
    np.testing.assert_array_equal(model.params["codebook"], expected)  # the same computation
    np.testing.assert_array_equal(model.buffers["ema_embed_sum"], expected)  # N_k = 1, S_k = e_k
    np.testing.assert_array_equal(model.buffers["ema_cluster_size"], np.ones(4))
    assert model.buffers["initialised"]
    model.on_batch_start(images(6, np.random.default_rng(1)), np.random.default_rng(6))
    np.testing.assert_array_equal(model.params["codebook"], expected)  # only the first batch


def test_ema_after_step_averages_the_map_rows():
    """(VQ.6) on the R = N M rows of the map, against the update written out with loops."""
    decay = 0.8
    model = tiny(num_codes=4, ema=True, ema_decay=decay)
    x = images(5, np.random.default_rng(2))
    size0 = model.buffers["ema_cluster_size"].copy()
    sum0 = model.buffers["ema_embed_sum"].copy()
    fwd = model.forward(x)
    rows = model.encode(x).reshape(-1, 2)  # (20, 2)
    idx = model.assign(x).reshape(-1)  # (20,)
    model.after_step(fwd, np.random.default_rng(0))
    codebook, size, embed_sum = ema_by_hand(size0, sum0, rows, idx, decay, 1e-5, 4)
    np.testing.assert_allclose(model.buffers["ema_cluster_size"], size, rtol=1e-12)
    np.testing.assert_allclose(model.buffers["ema_embed_sum"], embed_sum, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(model.params["codebook"], codebook, rtol=1e-9, atol=1e-12)


def test_a_dead_code_is_restarted_onto_a_map_row():
    """(VQVAE.3): a code no position chooses for restart_after steps moves onto a row."""
    rng = np.random.default_rng(0)
    model = tiny(num_codes=4, restart_after=2)
    far = np.full(2, 50.0)
    model.params["codebook"][3] = far  # never the nearest: dead from the start
    x = images(4, rng)
    for _ in range(2):
        fwd = model.forward(x)
        before = model.buffers["steps_unused"].copy()
        model.after_step(fwd, rng)
    assert before[3] == 1  # counted as unused, then restarted on the second step
    new = model.params["codebook"][3]
    rows = model.encode(x).reshape(-1, 2)  # (16, 2): the rows of every position
    assert not np.allclose(new, far)
    assert np.min(np.linalg.norm(rows - new, axis=1)) < 1e-2
    assert model.buffers["steps_unused"][3] == 0


def test_training_steps_lower_the_loss_and_keep_the_codes_alive():
    """A few Adam steps through the hooks the training loop calls, on 16 x 16 blobs."""
    rng = np.random.default_rng(0)
    model = ConvVQVAE(image_shape=(1, 16, 16), channels=(4, 8), num_codes=8, code_dim=4,
                      restart_after=5, rng=0)
    yy, xx = np.mgrid[:16, :16]
    centres = rng.uniform(3, 13, size=(64, 2))
    x = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 8.0)
    x = x.reshape(64, 256).astype(np.float32)
    opt = Adam(model.params, lr=3e-3)
    model.on_batch_start(x, rng)
    first = model.loss_and_grads(x)[0]
    for _ in range(30):
        fwd = model.forward(x)
        opt.step(model.backward(fwd))
        model.after_step(fwd, rng)
    assert fwd.loss < first
    assert fwd.stats["used_fraction"] > 0.5


# ----------------------------------------------------------------------------------
# Rebuilding, checkpoints, and the learned prior over M = 49 codes


def test_rebuilt_from_its_config_gives_the_same_outputs():
    model = ConvVQVAE(channels=(3, 4), num_codes=16, code_dim=3, rng=4)
    assert MODELS["conv-vqvae"] is ConvVQVAE and isinstance(model, VQVAE)
    again = build(model.config, rng=4)
    assert type(again) is ConvVQVAE and again.config == model.config
    np.testing.assert_array_equal(again.params.flat, model.params.flat)  # same init, exactly
    x = images(3, np.random.default_rng(4), d=784, dtype=np.float32)
    np.testing.assert_array_equal(again.reconstruct(x), model.reconstruct(x))
    assert again.loss_and_grads(x)[0] == model.loss_and_grads(x)[0]


def test_checkpoint_round_trip_keeps_params_buffers_and_outputs(tmp_path):
    rng = np.random.default_rng(7)
    model = ConvVQVAE(channels=(3, 4), num_codes=16, code_dim=3, restart_after=1, rng=0)
    opt = Adam(model.params, lr=1e-2)
    x = images(4, rng, d=784, dtype=np.float32)
    model.on_batch_start(x, rng)
    for _ in range(3):
        fwd = model.forward(x)
        opt.step(model.backward(fwd))
        model.after_step(fwd, rng)
    save_checkpoint(tmp_path / "c.npz", model, opt, rng, 1, 3, [], {})
    ck = load_checkpoint(tmp_path / "c.npz")
    assert type(ck.model) is ConvVQVAE and ck.model.config == model.config
    np.testing.assert_array_equal(ck.model.params.flat, model.params.flat)
    for k, v in model.buffers.items():
        assert np.array_equal(ck.model.buffers[k], v) and ck.model.buffers[k].dtype == v.dtype
    assert ck.model.buffers["initialised"]  # k-means is not run again after a resume
    np.testing.assert_array_equal(ck.model.assign(x), model.assign(x))
    np.testing.assert_array_equal(ck.model.reconstruct(x), model.reconstruct(x))


def test_a_made_prior_fits_the_49_codes_and_its_samples_decode_to_images():
    """The learned prior (MADE, raster order over the M = 49 positions) works unchanged."""
    rng = np.random.default_rng(0)
    vq = ConvVQVAE(channels=(2, 4), num_codes=8, code_dim=2, rng=0)
    require_vqvae(vq, "here")  # a conv VQ-VAE has codes to fit a prior to
    imgs = rng.integers(0, 256, size=(40, 784), dtype=np.uint8)
    codes = encode_codes(vq, imgs, "static", np.random.default_rng(1), batch_size=16)
    assert codes.shape == (40, 49) and codes.dtype == np.int64
    prior = MADEPrior(num_codes=vq.K, num_vectors=vq.M, hidden=(16,), dtype=vq.dtype, rng=0)
    x1 = prior.one_hot(codes)  # (40, 49 K)
    opt = Adam(prior.params, lr=1e-2)
    first = prior.loss_and_grads(x1)[0]
    for _ in range(20):
        loss, grads, _ = prior.loss_and_grads(x1)
        opt.step(grads)
    assert loss < first
    drawn = sample_codes(vq, prior, 5, np.random.default_rng(2))  # (5, 49)
    assert drawn.shape == (5, 49) and drawn.min() >= 0 and drawn.max() < vq.K
    pictures = decode_codes(vq, drawn)
    assert pictures.shape == (5, 784) and pictures.min() >= 0 and pictures.max() <= 1
    assert np.isfinite(prior.log_prob(codes)).all()


def test_the_training_loop_runs_it_and_resumes_it_exactly(tmp_path):
    """train() drives k-means, moving averages and restarts through the model's hooks; a
    run stopped after one epoch and resumed ends where an uninterrupted run does."""
    config = dict(kind="conv-vqvae", image_shape=[1, 8, 8], channels=[2, 3], num_codes=6,
                  code_dim=2, restart_after=3)
    rng = np.random.default_rng(0)
    data = rng.random((96, 64)).astype(np.float32), rng.random((20, 64)).astype(np.float32)
    loop = dict(batch_size=32, lr=3e-3, seed=1, binarize="dynamic", progress=False, verbose=False)
    whole = build(config, rng=0)
    train(whole, *data, epochs=3, run_dir=tmp_path / "whole", **loop)
    assert whole.buffers["initialised"]
    assert not np.array_equal(whole.params.flat, build(config, rng=0).params.flat)
    train(build(config, rng=0), *data, epochs=1, run_dir=tmp_path / "cut", **loop)
    resumed = build(config, rng=5)  # another init: everything must come from the checkpoint
    train(resumed, *data, epochs=3, run_dir=tmp_path / "cut", resume_from=tmp_path / "cut", **loop)
    np.testing.assert_array_equal(resumed.params.flat, whole.params.flat)
    for k, v in whole.buffers.items():
        np.testing.assert_array_equal(resumed.buffers[k], v)
