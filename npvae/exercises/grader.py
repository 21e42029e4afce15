"""The autograder: load each of a student's files, check it, say PASS or FAIL with a hint.

Every gradient is checked in float64 against central differences (npvae.gradcheck, GC.1,
GC.4) with a random upstream gradient (GC.2) and fixed noise, error measured as (GC.3)
and required below ``TOL``. Where a gradient check cannot see a mistake (a forward pass
that is wrong together with its matching backward), a forward check compares values with
npvae's own ops, or with Monte Carlo moments for sampling.

A student's file is run, not imported: it is loaded under a private module name that
never enters ``sys.modules``, the folder is never put on ``sys.path``, any exception
(even ``SystemExit``) becomes a FAIL with its message, and each exercise has a time
limit. Floating-point warnings are silenced, because a NaN is reported as a failure.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import signal
import threading
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from ..gradcheck import numerical_gradient, rel_error

TOL = 1e-6  # largest relative error (GC.3) a correct backward may show
TIME_LIMIT = 60  # seconds per exercise


class Fail(Exception):
    """A failed check: what went wrong, and a hint toward the fix."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message, self.hint = message, hint


class Result(NamedTuple):
    name: str
    passed: bool
    message: str = ""
    hint: str = ""


class Exercise(NamedTuple):
    name: str  # file stem, e.g. "01_linear"
    kind: str  # "fill" (write the backward) or "bugs" (find the planted bug)
    title: str
    check: Callable  # check(module) raises Fail, or returns when every check passes

    @property
    def path(self) -> Path:
        return Path(self.kind) / f"{self.name}.py"


# ---------------------------------------------------------------------------- loading

_counter = itertools.count()


def load(path: Path):
    """Run a student's file as a fresh module, outside sys.modules; returns the module."""
    spec = importlib.util.spec_from_file_location(f"_npvae_student_{next(_counter)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _TimeLimit:
    """Raise Fail after ``seconds`` (only in the main thread, where signals work)."""

    def __init__(self, seconds: int):
        self.seconds = seconds
        self.active = (hasattr(signal, "SIGALRM")
                       and threading.current_thread() is threading.main_thread())

    def _expire(self, signum, frame):
        raise Fail(f"still running after {self.seconds} s",
                   "look for a loop that never ends, or work that grows with the data")

    def __enter__(self):
        if self.active:
            self.old = signal.signal(signal.SIGALRM, self._expire)
            signal.alarm(self.seconds)

    def __exit__(self, *exc):
        if self.active:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, self.old)


def function(module, name):
    fn = getattr(module, name, None)
    if not callable(fn):
        raise Fail(f"the file has no function {name}", "keep the function names of the template")
    return fn


def grade(exercise: Exercise, folder: Path) -> Result:
    """Check one exercise in ``folder``; never raises for the student's mistakes."""
    path = Path(folder) / exercise.path
    if not path.is_file():
        return Result(exercise.name, False, f"{exercise.path} is missing",
                      "npvae exercises new DIR writes every file")
    try:
        with _TimeLimit(TIME_LIMIT), np.errstate(all="ignore"):
            module = load(path)
            exercise.check(module)
    except Fail as exc:
        return Result(exercise.name, False, exc.message, exc.hint)
    except NotImplementedError as exc:
        return Result(exercise.name, False, f"not written yet: {exc}",
                      "replace the NotImplementedError with your code")
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 -- any error in a student's file is a FAIL
        where = traceback.extract_tb(exc.__traceback__)
        line = next((f" (line {f.lineno})" for f in reversed(where) if f.filename == str(path)), "")
        return Result(exercise.name, False, f"{type(exc).__name__}{line}: {exc}",
                      "run the file's functions on small arrays and read the traceback")
    return Result(exercise.name, True)


# ---------------------------------------------------------------------------- check helpers


def as_tuple(grads, count, name):
    if not isinstance(grads, tuple):
        grads = (grads,)
    if len(grads) != count:
        raise Fail(f"{name} returned {len(grads)} value(s), expected {count}",
                   "return the gradients of the forward inputs, in their order")
    return grads


def same_shape(name, got, want):
    got = np.asarray(got) if got is not None else None
    if got is None or got.shape != np.shape(want):
        shape = None if got is None else got.shape
        raise Fail(f"{name} has shape {shape}, expected {np.shape(want)}",
                   f"a gradient has the shape of what it is the gradient of ({name})")
    return got


def gradient_check(forward, backward, args, wrt, names, hints, rng, n_out=None):
    """Check backward(g, cache) against central differences of sum(g * forward(*args)[0]).

    ``wrt`` maps an argument position to the position of its gradient in backward's
    result; ``names`` and ``hints`` are per argument position.
    """
    fresh = [a.copy() if isinstance(a, np.ndarray) else a for a in args]  # the student's own
    out, cache = forward(*fresh)[:2]
    g = rng.standard_normal(np.shape(out))  # random upstream gradient  (GC.2)
    grads = as_tuple(backward(g.copy(), cache), n_out or len(wrt), backward.__name__)

    def f():
        return float(np.sum(g * forward(*args)[0]))  # (GC.2)

    for i, j in wrt.items():
        analytic = same_shape(names[i], grads[j], args[i])
        numeric = numerical_gradient(f, args[i])  # (GC.1) (GC.4)
        err = rel_error(analytic, numeric)  # (GC.3)
        if not err < TOL:  # NaN fails too
            raise Fail(f"{names[i]}: relative error {err:.1e} against central differences "
                       f"(needs < {TOL:.0e})", hints[i])


def close(name, got, want, hint, rtol=1e-9):
    got = np.asarray(got, dtype=np.float64)
    if got.shape != np.shape(want) or not np.allclose(got, want, rtol=rtol, atol=rtol):
        worst = (np.nanmax(np.abs(got - want)) if got.shape == np.shape(want) else "shape")
        raise Fail(f"{name} differs from the expected value (worst difference {worst})", hint)


def away_from_zero(rng, shape, lo=0.1, hi=2.0):
    return rng.uniform(lo, hi, shape) * rng.choice([-1.0, 1.0], shape)


# ---------------------------------------------------------------------------- fill-in checks


def check_linear(m):
    rng = np.random.default_rng(1)
    x, W, b = rng.normal(size=(4, 3)), rng.normal(size=(3, 5)), rng.normal(size=5)
    close("linear_forward", function(m, "linear_forward")(x, W, b)[0], x @ W + b,
          "the forward pass is given; restore it from the template")
    gradient_check(function(m, "linear_forward"), function(m, "linear_backward"), [x, W, b],
                   {0: 0, 1: 1, 2: 2}, ["dx", "dW", "db"],
                   ["dx = dy W^T: each x[n, i] reaches every output o of row n (LIN.2)",
                    "dW = x^T dy: W is used by every example, so the rows add up (LIN.3)",
                    "db sums dy over the batch, one number per output (LIN.4)"], rng)


def check_relu(m):
    rng = np.random.default_rng(2)
    a = away_from_zero(rng, (4, 5))  # finite differences are meaningless at the kink
    gradient_check(function(m, "relu_forward"), function(m, "relu_backward"), [a], {0: 0},
                   ["relu: da"], ["da = dh where h > 0 and 0 elsewhere (ACT.1); multiply, "
                                  "do not replace, the upstream gradient"], rng)
    fwd = function(m, "leaky_relu_forward")
    gradient_check(lambda a: fwd(a, 0.05), function(m, "leaky_relu_backward"), [a], {0: 0},
                   ["leaky relu: da"], ["the slope where h <= 0 comes from the cache (ACT.2)"], rng)


def _elementwise(m, name, lo=-3.0, hi=3.0, tag=""):
    rng = np.random.default_rng(3)
    a = rng.uniform(lo, hi, (4, 5))
    gradient_check(function(m, f"{name}_forward"), function(m, f"{name}_backward"), [a], {0: 0},
                   [f"{name}: da"], [f"write f'(a) from the cached output h, then multiply by "
                                     f"the upstream dh {tag}"], rng)


def check_tanh(m):
    _elementwise(m, "tanh", tag="(ACT.3): 1 - h^2")


def check_sigmoid(m):
    _elementwise(m, "sigmoid", -6.0, 6.0, "(ACT.4): h (1 - h)")
    a = np.array([[-800.0, -40.0, 0.0, 40.0, 800.0]])
    h, cache = function(m, "sigmoid_forward")(a)
    da = function(m, "sigmoid_backward")(np.ones_like(a), cache)
    if not np.all(np.isfinite(da)):
        raise Fail("sigmoid_backward is not finite for inputs of +-800",
                   "use only the cached h: h (1 - h) never overflows")


def check_softplus(m):
    _elementwise(m, "softplus", -6.0, 6.0, "(ACT.5): the derivative is sigmoid(a) = 1 - exp(-h)")
    a = np.array([[-1000.0, -30.0, 1e-12, 30.0, 1000.0]])
    h, cache = function(m, "softplus_forward")(a)
    da = function(m, "softplus_backward")(np.ones_like(a), cache)
    want = 1.0 / (1.0 + np.exp(-np.clip(a, -700, 700)))
    if not (np.all(np.isfinite(da)) and np.allclose(da, want, rtol=1e-6, atol=1e-300)):
        raise Fail(f"softplus_backward gives {np.asarray(da).ravel()} for inputs "
                   f"{a.ravel()}, expected sigmoid(a)",
                   "1 - exp(-h) is sigmoid(a); -np.expm1(-h) computes it without overflow "
                   "and without losing digits when h is tiny (ACT.5)")


def check_reparameterize(m):
    rng = np.random.default_rng(4)
    mu, logvar, eps = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    fwd = function(m, "reparameterize_forward")
    close("reparameterize_forward", fwd(mu, logvar, eps)[0], mu + eps * np.exp(0.5 * logvar),
          "the forward pass is given; restore it from the template")
    gradient_check(fwd, function(m, "reparameterize_backward"), [mu, logvar, eps], {0: 0, 1: 1},
                   ["dmu", "dlogvar"],
                   ["z moves one for one with mu: dmu = dz (REP.2)",
                    "d exp(logvar / 2) / d logvar = exp(logvar / 2) / 2: "
                    "dlogvar = dz * eps * sigma / 2 (REP.3)"], rng, n_out=2)


def check_gaussian_kl(m):
    rng = np.random.default_rng(5)
    mu, logvar = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    from ..ops import gaussian_kl_forward

    close("gaussian_kl_forward", function(m, "gaussian_kl_forward")(mu, logvar)[0],
          gaussian_kl_forward(mu, logvar)[0], "the forward pass is given; restore it from "
          "the template (KL.1)")
    gradient_check(function(m, "gaussian_kl_forward"), function(m, "gaussian_kl_backward"),
                   [mu, logvar], {0: 0, 1: 1}, ["dmu", "dlogvar"],
                   ["d/dmu of mu^2 / 2 is mu, times the upstream dkl (KL.2)",
                    "d/dlogvar of (exp(logvar) - logvar) / 2 is (sigma^2 - 1) / 2 (KL.3)"], rng)


def check_bernoulli(m):
    rng = np.random.default_rng(6)
    logits, x = rng.normal(scale=2.0, size=(4, 5)), rng.uniform(size=(4, 5))
    fwd, bwd = function(m, "bernoulli_loglik_forward"), function(m, "bernoulli_loglik_backward")
    from ..ops import bernoulli_loglik_forward

    close("bernoulli_loglik_forward", fwd(logits, x)[0], bernoulli_loglik_forward(logits, x)[0],
          "the forward pass is given; restore it from the template (LIK.3)")
    hint = ("dlogits = dlogp[:, None] * (x - sigmoid(logits)): one upstream number per "
            "example multiplies its whole row (LIK.4)")
    gradient_check(fwd, bwd, [logits, x], {0: 0}, ["dlogits", "dx"], [hint, ""], rng, n_out=1)
    big = np.array([[-1000.0, -50.0, 50.0, 1000.0]])
    xb = np.array([[1.0, 0.0, 1.0, 0.0]])
    d = bwd(np.ones(1), fwd(big, xb)[1])
    want = xb - (big > 0)
    if not (np.all(np.isfinite(d)) and np.allclose(d, want, atol=1e-12)):
        raise Fail("bernoulli_loglik_backward is not right for logits of +-1000",
                   "compute sigmoid without overflow, e.g. with the file's sigmoid()")


def check_gaussian(m):
    rng = np.random.default_rng(7)
    mean, x = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    fwd = function(m, "gaussian_loglik_forward")
    from ..ops import gaussian_loglik_forward

    close("gaussian_loglik_forward", fwd(mean, x, 0.5)[0],
          gaussian_loglik_forward(mean, x, 0.5)[0],
          "the forward pass is given; restore it from the template (LIK.1)")
    gradient_check(lambda mean, x: fwd(mean, x, 0.5), function(m, "gaussian_loglik_backward"),
                   [mean, x], {0: 0}, ["dmean", "dx"],
                   ["dmean = dlogp[:, None] * (x - mean) / s2: mind the sign, the variance "
                    "and the broadcast of one number per example (LIK.2)", ""], rng, n_out=1)


def check_vq(m):
    rng = np.random.default_rng(8)
    codebook = rng.normal(size=(4, 3))
    idx = np.array([0, 0, 1, 3, 3, 3])  # code 2 unused, codes 0 and 3 shared
    z_e = codebook[idx] + 0.1 * rng.normal(size=(6, 3))
    zq, idx_got, cache = function(m, "quantize_forward")(z_e, codebook)
    close("quantize_forward", zq, codebook[idx], "the forward pass is given; restore it")
    from ..ops import vq as ops_vq

    close("codebook_loss_forward", function(m, "codebook_loss_forward")(z_e, codebook, idx)[0],
          ops_vq.codebook_loss_forward(z_e, codebook, idx)[0],
          "the forward pass is given; restore it from the template (VQ.4)")
    close("commitment_loss_forward",
          function(m, "commitment_loss_forward")(z_e, codebook, idx, 0.4)[0],
          ops_vq.commitment_loss_forward(z_e, codebook, idx, 0.4)[0],
          "the forward pass is given; restore it from the template (VQ.5)")
    dz_q = rng.standard_normal(zq.shape)
    dz_e = same_shape("quantize_backward", function(m, "quantize_backward")(dz_q, cache), z_e)
    # the straight-through surrogate z_e + sg[e - z_e] has the derivative 1 in z_e  (VQ.3)
    z0, e0 = z_e.copy(), codebook[idx].copy()  # frozen at the forward values
    surrogate = numerical_gradient(lambda: float(np.sum(dz_q * (z_e + (e0 - z0)))), z_e)
    if not rel_error(dz_e, surrogate) < TOL:
        raise Fail("quantize_backward does not pass dz_q straight through",
                   "the straight-through gradient is chosen, not derived: copy dz_q to z_e, "
                   "unchanged (VQ.3)")
    gradient_check(lambda z, e: function(m, "codebook_loss_forward")(z, e, idx),
                   function(m, "codebook_loss_backward"), [z_e, codebook], {1: 0},
                   ["dz_e", "dcodebook"],
                   ["", "each row r adds -2 dl[r] (z_e[r] - E[idx[r]]) to the code it chose; "
                        "np.add.at adds repeated indices, fancy-index += does not (VQ.4)"],
                   rng, n_out=1)
    gradient_check(lambda z, e: function(m, "commitment_loss_forward")(z, e, idx, 0.4),
                   function(m, "commitment_loss_backward"), [z_e, codebook], {0: 0},
                   ["dz_e", "dcodebook"],
                   ["dz_e = 2 beta dl[r] (z_e[r] - E[idx[r]]) (VQ.5)", ""], rng, n_out=1)


def check_adam(m):
    from ..optim import Adam
    from ..params import FlatDict

    rng = np.random.default_rng(9)
    step = function(m, "adam_step")
    p = rng.normal(size=(3, 4))
    m_, v_ = np.zeros_like(p), np.zeros_like(p)
    ref = FlatDict.from_arrays({"p": p})  # a copy, updated by npvae's Adam
    opt = Adam(ref, lr=0.01, betas=(0.8, 0.99), eps=1e-8)
    start = p.copy()
    for t in range(1, 6):
        g = rng.normal(scale=10.0 ** rng.integers(-3, 3), size=p.shape)
        step(p, g, m_, v_, t, lr=0.01, beta1=0.8, beta2=0.99, eps=1e-8)  # in place
        opt.step({"p": g})
        if t == 1 and not np.allclose(np.abs(p - start), 0.01, rtol=1e-3):
            raise Fail("after the first step the entries did not each move by about lr",
                       "update p, m and v in place (p -= ..., m *= ...); with the bias "
                       "correction (ADAM.3) the first step is lr g / (|g| + eps) (ADAM.4)")
        if t == 1 and not np.all(np.sign(p - start) == -np.sign(g)):
            raise Fail("after the first step the entries moved along the gradient",
                       "a descent step goes against the gradient: p -= lr m_hat / "
                       "(sqrt(v_hat) + eps) (ADAM.4)")
        for name, got, want in (("m", m_, opt.buffers["m"]["p"]), ("v", v_, opt.buffers["v"]["p"]),
                                ("p", p, ref["p"])):
            if not np.allclose(got, want, rtol=1e-10, atol=1e-300):
                hints = {"m": "m <- beta1 m + (1 - beta1) g, in place (ADAM.1)",
                         "v": "v <- beta2 v + (1 - beta2) g^2, in place (ADAM.2)",
                         "p": "divide m and v by 1 - beta^t (ADAM.3), and add eps after the "
                              "square root (ADAM.4)"}
                raise Fail(f"{name} differs from Adam's after step {t}", hints[name])


def check_iw(m):
    rng = np.random.default_rng(10)
    a = rng.normal(scale=3.0, size=(3, 5))
    fwd, bwd = function(m, "iw_loglik_forward"), function(m, "iw_loglik_backward")
    close("iw_loglik_forward", fwd(a)[0], np.log(np.mean(np.exp(a), axis=1)),
          "the forward pass is given; restore it from the template: the log of the mean "
          "weight, so minus log k (IW.5)")
    gradient_check(fwd, bwd, [a], {0: 0}, ["da"],
                   ["dL/da_i is the normalised weight exp(a_i) / sum_j exp(a_j), times dL"], rng)
    huge = np.array([[-1000.0, -1001.0, -1003.0], [1000.0, 999.0, 0.0]])
    da = bwd(np.ones(2), fwd(huge)[1])
    if not (np.all(np.isfinite(da)) and np.allclose(np.sum(da, axis=1), 1.0)):
        raise Fail("iw_loglik_backward breaks for log weights of +-1000",
                   "subtract the row maximum before exp, as the forward pass does (IW.5)")


# ---------------------------------------------------------------------------- bug-hunt checks


def _tiny_vae_reference(params, x, eps, likelihood):
    """Negative ELBO of the tiny VAE, batch mean, from npvae's own ops."""
    from ..ops import (bernoulli_loglik_forward, gaussian_kl_forward, gaussian_loglik_forward,
                       linear_forward, reparameterize_forward)

    z_dim = eps.shape[1]
    h, _ = linear_forward(x, params["enc.W"], params["enc.b"])
    mu, logvar = h[:, :z_dim].copy(), h[:, z_dim:].copy()
    z, _ = reparameterize_forward(mu, logvar, eps)
    out, _ = linear_forward(z, params["dec.W"], params["dec.b"])
    if likelihood == "gaussian":
        logp, _ = gaussian_loglik_forward(out, x)
    else:
        logp, _ = bernoulli_loglik_forward(out, x)
    kl, _ = gaussian_kl_forward(mu, logvar)
    return float(np.mean(-logp + kl.sum(axis=1)))


def _value_and_gradients(loss_and_grads, params, x, eps, likelihood, value_hint, gradient_hint,
                         where=""):
    """The tiny VAE's loss against npvae's own ops, then each gradient against central
    differences; ``where`` opens the failure messages."""
    loss, grads = loss_and_grads(params, x, eps)
    want = _tiny_vae_reference(params, x, eps, likelihood)
    if not (np.isfinite(loss) and math.isclose(loss, want, rel_tol=1e-9, abs_tol=1e-9)):
        raise Fail(f"{where}the loss is {loss:.6g}, but the negative ELBO of this batch is "
                   f"{want:.6g}", value_hint)
    for key, p in params.items():
        analytic = same_shape(f"grads[{key!r}]", grads.get(key) if isinstance(grads, dict)
                              else None, p)
        numeric = numerical_gradient(lambda: float(loss_and_grads(params, x, eps)[0]), p)
        err = rel_error(analytic, numeric)
        if not err < TOL:
            raise Fail(f"{where}grads[{key!r}]: relative error {err:.1e} against central "
                       f"differences (needs < {TOL:.0e})", gradient_hint)


def _tiny_vae_checks(likelihood, hints):
    """Sampling, value and gradient checks of a tiny-VAE bug hunt, in that order; hints per check."""

    def check(m):
        rng = np.random.default_rng(11)
        d, z, n = 6, 2, 5
        params = {"enc.W": rng.normal(scale=0.5, size=(d, 2 * z)),
                  "enc.b": rng.normal(scale=0.3, size=2 * z),
                  "dec.W": rng.normal(scale=0.8, size=(z, d)),
                  "dec.b": rng.normal(scale=0.3, size=d)}
        x = (rng.random((n, d)) < 0.5).astype(np.float64) if likelihood == "bernoulli" \
            else rng.normal(size=(n, d))
        eps = rng.normal(size=(n, z))
        loss_and_grads = function(m, "loss_and_grads")

        # 1. sampling: the moments of z = reparameterize(mu, logvar, eps)
        mu = np.array([0.5, -1.0])
        logvar = np.log(np.array([4.0, 0.25]))
        draws = rng.standard_normal((40000, 2))
        zs = np.asarray(function(m, "reparameterize")(np.broadcast_to(mu, draws.shape).copy(),
                                                       np.broadcast_to(logvar, draws.shape).copy(),
                                                       draws)[0])
        if not (np.allclose(zs.mean(axis=0), mu, atol=0.05)
                and np.allclose(zs.var(axis=0), np.exp(logvar), rtol=0.05)):
            raise Fail(f"samples of z have variance {np.round(zs.var(axis=0), 3)} where "
                       f"exp(logvar) is {np.exp(logvar)}", hints["sampling"])

        # 2. the value, the negative ELBO as a batch mean, then 3. the gradients (noise fixed)
        _value_and_gradients(loss_and_grads, params, x, eps, likelihood, hints["value"],
                             hints["gradient"])
        # 4. Bernoulli: a confident decoder, logits near +-40, where sigmoid rounds to 1
        if likelihood == "bernoulli":
            shift = np.where(np.arange(d) % 2, -40.0, 40.0)
            far = dict(params, **{"dec.b": params["dec.b"] + shift})
            _value_and_gradients(loss_and_grads, far, x, eps, likelihood, hints["confident"],
                                 hints["confident"], where="with logits near +-40, ")

    return check


def check_iwae_weights(m):
    rng = np.random.default_rng(12)
    a = rng.normal(scale=2.0, size=(3, 4))
    fwd, bwd = function(m, "iw_bound_forward"), function(m, "iw_bound_backward")
    L = fwd(a)[0]
    want = np.log(np.mean(np.exp(a), axis=1))
    close("iw_bound_forward", L, want, "the bound is the log of the mean weight (IW.1)")
    gradient_check(fwd, bwd, [a], {0: 0}, ["da"],
                   ["the normalised weights come out of the forward pass as numbers: the "
                    "gradient of log-mean-exp is the softmax itself, with nothing added"], rng)


def check_straight_through(m):
    rng = np.random.default_rng(13)
    codebook = rng.normal(size=(5, 3))
    idx0 = np.array([0, 0, 1, 3, 3, 4, 1, 0])  # code 2 unused
    z0 = codebook[idx0] + 0.05 * rng.normal(size=(8, 3))
    beta = 0.25
    fwd, bwd = function(m, "vq_forward"), function(m, "vq_backward")
    z_q, aux, cache = fwd(z0, codebook, beta)
    close("vq_forward z_q", z_q, codebook[idx0], "the forward pass picks the nearest code")
    close("vq_forward aux", aux, (1 + beta) * np.sum((z0 - codebook[idx0]) ** 2, axis=1),
          "aux adds the codebook and the commitment terms")
    g, ga = rng.standard_normal(z_q.shape), rng.standard_normal(aux.shape)
    dz_e, dcodebook = as_tuple(bwd(g, ga, cache), 2, "vq_backward")
    e0 = codebook[idx0].copy()
    z_e, E = z0.copy(), codebook.copy()

    def surrogate():  # (VQVAE.4): what the straight-through estimator differentiates
        zq = z_e + (e0 - z0)  # value e0, slope 1 in z_e, none in E  (VQ.3)
        cb = np.sum((z0 - E[idx0]) ** 2, axis=1)  # sg on z_e  (VQ.4)
        cm = beta * np.sum((z_e - e0) ** 2, axis=1)  # sg on E  (VQ.5)
        return float(np.sum(g * zq) + np.sum(ga * (cb + cm)))

    hint = ("the decoder's gradient dz_q belongs to the encoder output z_e, copied as it is; "
            "the codebook learns only from its own loss (VQ.3, VQ.4)")
    for name, got, arr in (("dz_e", dz_e, z_e), ("dcodebook", dcodebook, E)):
        got = same_shape(name, got, arr)
        err = rel_error(got, numerical_gradient(surrogate, arr))
        if not err < TOL:
            raise Fail(f"{name}: relative error {err:.1e} against central differences of the "
                       f"straight-through surrogate (VQVAE.4)", hint)


# ---------------------------------------------------------------------------- the catalog

_GAUSS_HINTS = dict(
    sampling="sigma is the standard deviation: exp(logvar / 2) (REP.1)",
    gradient="the gradient disagrees with the loss: follow the loss term by term and see "
             "where a factor of the backward pass differs from the forward's",
    value="the loss should be -log p(x|z) + KL, averaged over the batch (OBJ.1); the KL is "
          "never negative (T.7)",
)

EXERCISES = (
    Exercise("01_linear", "fill", "affine layer (LIN.2-4)", check_linear),
    Exercise("02_relu", "fill", "ReLU and leaky ReLU (ACT.1, ACT.2)", check_relu),
    Exercise("03_tanh", "fill", "tanh (ACT.3)", check_tanh),
    Exercise("04_sigmoid", "fill", "sigmoid (ACT.4)", check_sigmoid),
    Exercise("05_softplus", "fill", "softplus (ACT.5)", check_softplus),
    Exercise("06_reparameterize", "fill", "reparameterization (REP.2-3)", check_reparameterize),
    Exercise("07_gaussian_kl", "fill", "KL to the standard normal (KL.2-3)", check_gaussian_kl),
    Exercise("08_bernoulli_loglik", "fill", "Bernoulli likelihood from logits (LIK.4)",
             check_bernoulli),
    Exercise("09_gaussian_loglik", "fill", "Gaussian likelihood (LIK.2)", check_gaussian),
    Exercise("10_vector_quantization", "fill",
             "straight-through quantization, codebook and commitment losses (VQ.3-5)", check_vq),
    Exercise("11_adam", "fill", "one Adam step (ADAM.1-4)", check_adam),
    Exercise("12_iw_loglik", "fill", "importance-weighted log-likelihood (IW.1, IW.5)", check_iw),
    Exercise("b1_sampling", "bugs", "a Gaussian VAE's sampling", _tiny_vae_checks("gaussian", dict(
        _GAUSS_HINTS, sampling="compare the spread of z with exp(logvar): is sigma the "
                               "standard deviation? (REP.1)"))),
    Exercise("b2_kl_sign", "bugs", "a Gaussian VAE's objective", _tiny_vae_checks("gaussian", dict(
        _GAUSS_HINTS, value="compute -log p(x|z) and the KL of one example by hand: is the "
                            "loss their sum? (T.5, OBJ.1)"))),
    Exercise("b3_batch_mean", "bugs", "a Gaussian VAE's batch", _tiny_vae_checks("gaussian", dict(
        _GAUSS_HINTS, gradient="the loss is a mean over the batch: does every term of the "
                               "backward pass carry the same 1/N? (OBJ.1)"))),
    Exercise("b4_iwae_weights", "bugs", "an importance-weighted bound's gradient",
             check_iwae_weights),
    Exercise("b5_straight_through", "bugs", "a VQ layer's straight-through gradient",
             check_straight_through),
    Exercise("b6_bce_logits", "bugs", "a Bernoulli VAE's cross-entropy",
             _tiny_vae_checks("bernoulli", dict(
                 _GAUSS_HINTS, value="the decoder outputs logits, any real number; the pixel "
                                     "probabilities are sigmoid(logits) (LIK.3)",
                 confident="in float64 sigmoid(40) is exactly 1, and log(1 - 1) is -inf: write "
                           "x log p + (1 - x) log(1 - p) as x l - softplus(l), with softplus "
                           "computed without overflow (LIK.3)"))),
)
BY_NAME = {e.name: e for e in EXERCISES}


def select(names) -> list:
    """Exercises by full name or by prefix ("01", "b3"); all when ``names`` is empty."""
    if not names:
        return list(EXERCISES)
    chosen = []
    for name in names:
        hits = [e for e in EXERCISES if e.name == name or e.name.startswith(name + "_")]
        if not hits:
            raise KeyError(f"no exercise named {name!r}; the names are "
                           f"{', '.join(e.name for e in EXERCISES)}")
        chosen += [e for e in hits if e not in chosen]
    return chosen


def check_folder(folder, names=()) -> list:
    """Grade the chosen exercises in ``folder``; one Result each."""
    return [grade(e, Path(folder)) for e in select(names)]
