"""The exercises and their autograder (`npvae exercises`).

- the grader passes every solution and fails every blank and every bug hunt, each named;
- it also fails typical wrong answers, one per check it makes;
- every template differs from its solution: a fill template is its solution with each
  solution block stripped (checked by a rule written here), a bug hunt differs from its fixed
  version in one place, and each line a hunt replaces matches exactly once;
- the solutions' backward passes agree with npvae's own ops;
- `new` and `solutions` refuse to overwrite; `check` exits 0 only when all pass;
- a hostile or broken file is a FAIL, never a crash, and leaves sys.modules alone;
- pyproject's package data covers every exercise file.
"""
import difflib
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from npvae.cli import main
from npvae.exercises import grader
from npvae.exercises.files import SOLUTIONS, exercise_texts, hunt_text, replace_lines, write_out
from npvae.exercises.grader import EXERCISES, check_folder, grade
from npvae.exercises.hunts import HUNTS

ROOT = Path(__file__).resolve().parents[1]
NAMES = [e.name for e in EXERCISES]
FILL = [e.name for e in EXERCISES if e.kind == "fill"]
BUGS = [e.name for e in EXERCISES if e.kind == "bugs"]
TEMPLATE_TEXTS, SOLVED_TEXTS = exercise_texts(solved=False), exercise_texts(solved=True)


def by_name(name):
    return grader.BY_NAME[name]


def load(path):
    spec = importlib.util.spec_from_file_location(f"_test_exercise_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def solution(name):
    return load(SOLUTIONS / by_name(name).path)


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """A folder as `npvae exercises new` writes it."""
    folder = tmp_path_factory.mktemp("exercises") / "templates"
    write_out(False, folder)
    return folder


@pytest.fixture(scope="module")
def solutions(tmp_path_factory):
    """A folder as `npvae exercises solutions` writes it."""
    folder = tmp_path_factory.mktemp("exercises") / "solutions"
    write_out(True, folder)
    return folder


def test_there_are_enough_exercises():
    assert len(FILL) >= 9 and len(BUGS) >= 6
    for texts in (TEMPLATE_TEXTS, SOLVED_TEXTS):
        assert sorted(map(str, texts)) == sorted(["README.md", *(str(e.path) for e in EXERCISES)])


@pytest.mark.parametrize("name", NAMES)
def test_grader_passes_the_solution(name, solutions):
    result = grade(by_name(name), solutions)
    assert result.passed, f"{name}: {result.message} (hint: {result.hint})"


@pytest.mark.parametrize("name", FILL)
def test_grader_fails_the_blank(name, templates):
    result = grade(by_name(name), templates)
    assert not result.passed
    assert "not written yet" in result.message and result.hint


@pytest.mark.parametrize("name", BUGS)
def test_grader_fails_the_bug_hunt(name, templates):
    result = grade(by_name(name), templates)
    assert not result.passed, name
    assert result.hint and "not written yet" not in result.message


@pytest.mark.parametrize("name", NAMES)
def test_every_template_differs_from_its_solution(name):
    path = by_name(name).path
    assert TEMPLATE_TEXTS[path] != SOLVED_TEXTS[path]


def strip_solutions(text):
    """Each "# BEGIN SOLUTION" ... "# END SOLUTION" block replaced by the stub a student
    sees, naming the function it stands in: the rule, written apart from files.blank."""
    def stub(m):
        function = re.findall(r"def (\w+)\(", text[:m.start()])[-1]
        return (f"{m['indent']}# Your code here: see the docstring at the top of the file.\n"
                f'{m["indent"]}raise NotImplementedError("{function} is not written yet")\n')
    return re.sub(r"^(?P<indent> *)# BEGIN SOLUTION\n.*?^ *# END SOLUTION\n", stub, text,
                  flags=re.M | re.S)


@pytest.mark.parametrize("name", FILL)
def test_fill_template_is_its_solution_with_the_solution_blocks_stripped(name):
    path = by_name(name).path
    assert SOLVED_TEXTS[path].count("# BEGIN SOLUTION") >= 1
    assert TEMPLATE_TEXTS[path] == strip_solutions(SOLVED_TEXTS[path])


@pytest.mark.parametrize("hunt", HUNTS, ids=[h.name for h in HUNTS])
def test_each_line_a_bug_hunt_replaces_matches_exactly_once(hunt):
    shared = hunt_text(hunt._replace(variant=()), solved=True)  # before the variant's edits
    for pairs, text in ((hunt.variant, shared), (hunt.bug, SOLVED_TEXTS[by_name(hunt.name).path])):
        lines = [line.strip() for line in text.split("\n")]
        for old, _ in pairs:
            old = old.split("\n")
            assert sum(lines[i:i + len(old)] == old for i in range(len(lines))) == 1, old
    stale = hunt._replace(bug=((hunt.bug[0][0] + " ", "x = 1"), *hunt.bug[1:]))
    with pytest.raises(ValueError, match="0 places match"):
        hunt_text(stale, solved=False)


def test_a_replacement_must_match_exactly_once():
    text = "def f():\n    a = 1\n    b = 2\n    b = 2\n"
    assert replace_lines(text, [("a = 1", "a = 0\nc = 3")], "f") == \
        "def f():\n    a = 0\n    c = 3\n    b = 2\n    b = 2\n"
    with pytest.raises(ValueError, match="2 places match"):
        replace_lines(text, [("b = 2", "b = 3")], "f")
    with pytest.raises(ValueError, match="0 places match"):
        replace_lines(text, [("a = 1\nb = 3", "")], "f")


@pytest.mark.parametrize("name", BUGS)
def test_each_bug_hunt_has_one_planted_change(name):
    path = by_name(name).path
    planted = TEMPLATE_TEXTS[path].splitlines()
    fixed = SOLVED_TEXTS[path].splitlines()
    changes = [op for op in difflib.SequenceMatcher(None, planted, fixed).get_opcodes()
               if op[0] != "equal"]
    # one bug: one place, or a forward line and the backward line that mirrors it (so
    # that a gradient check passes and only a value check can find it)
    assert 1 <= len(changes) <= 2, changes
    assert all(max(i2 - i1, j2 - j1) <= 4 for _, i1, i2, j1, j2 in changes)


# Typical wrong answers, each caught by a different check of the grader.
WRONG = [
    ("01_linear", "dW = x.T @ dy", "dW = x.T @ dy / len(x)"),
    ("01_linear", "db = dy.sum(axis=0)", "db = dy.sum(axis=1).sum() * np.ones(dy.shape[1])"),
    ("02_relu", "da = dh * np.where(h > 0, 1.0, slope)", "da = dh * np.where(h > 0, 1.0, 0.0)"),
    ("03_tanh", "da = dh * (1.0 - h * h)", "da = dh * (1.0 - np.tanh(h) ** 2)"),
    ("04_sigmoid", "da = dh * h * (1.0 - h)", "da = h * (1.0 - h)"),
    ("05_softplus", "da = dh * -np.expm1(-h)", "da = dh * (1.0 - np.exp(-h))"),
    ("06_reparameterize", "dlogvar = 0.5 * dz * eps * sigma", "dlogvar = dz * eps * sigma"),
    ("07_gaussian_kl", "dlogvar = 0.5 * dkl * (var - 1.0)", "dlogvar = 0.5 * dkl * var"),
    ("08_bernoulli_loglik", "dlogits = dlogp[:, None] * (x - sigmoid(logits))",
     "dlogits = dlogp.sum() * (x - sigmoid(logits))"),
    ("08_bernoulli_loglik", "dlogits = dlogp[:, None] * (x - sigmoid(logits))",
     "dlogits = dlogp[:, None] * (x - np.exp(logits) / (1.0 + np.exp(logits)))"),
    ("09_gaussian_loglik", "dmean = dlogp[:, None] * r / s2", "dmean = dlogp[:, None] * r"),
    ("10_vector_quantization", "dz_e = dz_q.copy()", "dz_e = np.zeros_like(dz_q)"),
    ("10_vector_quantization", "np.add.at(dcodebook, idx, drows)", "dcodebook[idx] += drows"),
    ("10_vector_quantization", "dz_e = 2.0 * beta * dl[:, None] * diff",
     "dz_e = 2.0 * dl[:, None] * diff"),
    ("11_adam", "m_hat = m / (1.0 - beta1**t)", "m_hat = m"),
    ("11_adam", "p -= lr * m_hat / (np.sqrt(v_hat) + eps)",
     "p = p - lr * m_hat / (np.sqrt(v_hat) + eps)"),
    ("12_iw_loglik", "e = np.exp(a - m)", "e = np.exp(a)"),
    ("12_iw_loglik", "da = dL[:, None] * w", "da = w"),
]


@pytest.mark.parametrize("name, old, new", WRONG, ids=[f"{w[0]}-{i}" for i, w in enumerate(WRONG)])
def test_grader_fails_typical_wrong_answers(tmp_path, name, old, new):
    exercise = by_name(name)
    text = (SOLUTIONS / exercise.path).read_text()
    assert text.count(old) == 1
    target = tmp_path / exercise.path
    target.parent.mkdir(parents=True)
    target.write_text(text.replace(old, new))
    result = grade(exercise, tmp_path)
    assert not result.passed and result.hint, result


# A forward pass changed together with its backward (a gradient check cannot see these),
# and answers whose mistake needs its own hint: (name, [(old, new), ...], words of the hint).
WRONG_TOGETHER = [
    ("07_gaussian_kl", [("kl = 0.5 * (mu * mu + var - logvar - 1.0)", "kl = (mu * mu + var - logvar - 1.0)"),
                        ("dmu = dkl * mu", "dmu = 2.0 * dkl * mu"),
                        ("dlogvar = 0.5 * dkl * (var - 1.0)", "dlogvar = dkl * (var - 1.0)")],
     "KL.1"),
    ("08_bernoulli_loglik", [("logp = np.sum(x * logits - softplus(logits), axis=1)",
                              "logp = np.sum(-softplus(logits), axis=1)"),
                             ("dlogits = dlogp[:, None] * (x - sigmoid(logits))",
                              "dlogits = -dlogp[:, None] * sigmoid(logits)")], "LIK.3"),
    ("09_gaussian_loglik", [(" - 0.5 * d * math.log(2.0 * math.pi * s2)", "")], "LIK.1"),
    ("10_vector_quantization", [("return beta * np.sum(diff * diff, axis=1), (diff, beta)",
                                 "return np.sum(diff * diff, axis=1), (diff, beta)"),
                                ("dz_e = 2.0 * beta * dl[:, None] * diff",
                                 "dz_e = 2.0 * dl[:, None] * diff")], "VQ.5"),
    ("12_iw_loglik", [(" - math.log(a.shape[1])", "")], "log k"),
    ("11_adam", [("p -= lr * m_hat / (np.sqrt(v_hat) + eps)",
                  "p += lr * m_hat / (np.sqrt(v_hat) + eps)")], "against the gradient"),
    # the naive fix of bug hunt 6: right for small logits, NaN once the decoder is confident
    ("b6_bce_logits", [("softplus = np.maximum(out, 0.0) + np.log1p(np.exp(-np.abs(out)))  # (N, D)\n",
                        "prob = 1.0 / (1.0 + np.exp(-out))  # (N, D)\n"),
                       ("logp = np.sum(x * out - softplus, axis=1)",
                        "logp = np.sum(x * np.log(prob) + (1.0 - x) * np.log(1.0 - prob), axis=1)")],
     "softplus"),
]


@pytest.mark.parametrize("name, edits, words", WRONG_TOGETHER,
                         ids=[w[0] for w in WRONG_TOGETHER])
def test_grader_fails_wrong_answers_a_gradient_check_cannot_see(tmp_path, name, edits, words):
    exercise = by_name(name)
    text = SOLVED_TEXTS[exercise.path]
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    target = tmp_path / exercise.path
    target.parent.mkdir(parents=True)
    target.write_text(text)
    result = grade(exercise, tmp_path)
    assert not result.passed and words in result.hint, result


def test_an_answer_that_reuses_its_inputs_in_place_is_graded_on_its_values(tmp_path):
    """Scaling dy or x in place inside backward must not corrupt the grader's own arrays."""
    text = (SOLUTIONS / "fill" / "01_linear.py").read_text().replace(
        "    dx = dy @ W.T  # (N, I)  (LIN.2)",
        "    dy *= 2.0  # in place, then undone below\n    x *= 2.0\n"
        "    dx = dy @ W.T / 2.0  # (N, I)  (LIN.2)")
    text = text.replace("    dW = x.T @ dy  # (I, O)  (LIN.3)", "    dW = x.T @ dy / 4.0  # (I, O)  (LIN.3)")
    text = text.replace("    db = dy.sum(axis=0)  # (O,)  (LIN.4)", "    db = dy.sum(axis=0) / 2.0  # (O,)  (LIN.4)")
    (tmp_path / "fill").mkdir()
    (tmp_path / "fill" / "01_linear.py").write_text(text)
    result = grade(by_name("01_linear"), tmp_path)
    assert result.passed, result


# ---------------------------------------------------------------------------- against npvae's ops


def test_solutions_agree_with_npvae_ops(rng):
    from npvae import ops
    from npvae.evaluate import RunningLogSumExp
    from npvae.optim import Adam
    from npvae.params import FlatDict

    x, W, b = rng.normal(size=(4, 3)), rng.normal(size=(3, 5)), rng.normal(size=5)
    dy = rng.normal(size=(4, 5))
    mine = solution("01_linear")
    got = mine.linear_backward(dy, mine.linear_forward(x, W, b)[1])
    want = ops.linear_backward(dy, ops.linear_forward(x, W, b)[1])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12)

    a = rng.uniform(0.1, 3, (4, 5)) * rng.choice([-1.0, 1.0], (4, 5))
    dh = rng.normal(size=a.shape)
    acts = solution("02_relu")
    for module, name, fwd in ((acts, "relu", acts.relu_forward),
                              (acts, "leaky_relu", acts.leaky_relu_forward),
                              (solution("03_tanh"), "tanh", None),
                              (solution("04_sigmoid"), "sigmoid", None),
                              (solution("05_softplus"), "softplus", None)):
        fwd = getattr(module, f"{name}_forward")
        h, cache = fwd(a)
        np.testing.assert_allclose(h, ops.activation_forward(a, name)[0], rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(getattr(module, f"{name}_backward")(dh, cache),
                                   ops.activation_backward(dh, ops.activation_forward(a, name)[1]),
                                   rtol=1e-12, atol=1e-300)

    mu, logvar, eps = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    dz = rng.normal(size=(4, 3))
    rep = solution("06_reparameterize")
    for g, w in zip(rep.reparameterize_backward(dz, rep.reparameterize_forward(mu, logvar, eps)[1]),
                    ops.reparameterize_backward(dz, ops.reparameterize_forward(mu, logvar, eps)[1])):
        np.testing.assert_allclose(g, w, rtol=1e-12)
    kl = solution("07_gaussian_kl")
    for g, w in zip(kl.gaussian_kl_backward(dz, kl.gaussian_kl_forward(mu, logvar)[1]),
                    ops.gaussian_kl_backward(dz, ops.gaussian_kl_forward(mu, logvar)[1])):
        np.testing.assert_allclose(g, w, rtol=1e-12)

    logits, target = rng.normal(scale=3, size=(4, 6)), rng.uniform(size=(4, 6))
    dlogp = rng.normal(size=4)
    bern = solution("08_bernoulli_loglik")
    lp, cache = bern.bernoulli_loglik_forward(logits, target)
    np.testing.assert_allclose(lp, ops.bernoulli_loglik_forward(logits, target)[0], rtol=1e-12)
    np.testing.assert_allclose(bern.bernoulli_loglik_backward(dlogp, cache),
                               ops.bernoulli_loglik_backward(
                                   dlogp, ops.bernoulli_loglik_forward(logits, target)[1]),
                               rtol=1e-12)
    gauss = solution("09_gaussian_loglik")
    mean = rng.normal(size=(4, 6))
    target = rng.normal(size=(4, 6))
    lp, cache = gauss.gaussian_loglik_forward(mean, target, 0.3)
    np.testing.assert_allclose(lp, ops.gaussian_loglik_forward(mean, target, 0.3)[0], rtol=1e-12)
    np.testing.assert_allclose(gauss.gaussian_loglik_backward(dlogp, cache),
                               ops.gaussian_loglik_backward(
                                   dlogp, ops.gaussian_loglik_forward(mean, target, 0.3)[1]),
                               rtol=1e-12)

    vq = solution("10_vector_quantization")
    codebook = rng.normal(size=(5, 3))
    z_e = rng.normal(size=(9, 3))
    zq, idx, cache = vq.quantize_forward(z_e, codebook)
    zq_ref, qcache = ops.quantize_forward(z_e, codebook)
    np.testing.assert_array_equal(idx, qcache.idx)
    dzq = rng.normal(size=zq.shape)
    np.testing.assert_array_equal(vq.quantize_backward(dzq, cache), ops.quantize_backward(dzq, qcache))
    dl = rng.normal(size=9)
    np.testing.assert_allclose(
        vq.codebook_loss_backward(dl, vq.codebook_loss_forward(z_e, codebook, idx)[1]),
        ops.codebook_loss_backward(dl, ops.codebook_loss_forward(z_e, codebook, qcache.idx)[1]),
        rtol=1e-12)
    np.testing.assert_allclose(
        vq.commitment_loss_backward(dl, vq.commitment_loss_forward(z_e, codebook, idx, 0.3)[1]),
        ops.commitment_loss_backward(dl, ops.commitment_loss_forward(z_e, codebook, qcache.idx, 0.3)[1]),
        rtol=1e-12)

    adam = solution("11_adam")
    p = rng.normal(size=(3, 4))
    ref = FlatDict.from_arrays({"p": p})
    opt = Adam(ref, lr=0.01, betas=(0.8, 0.99), eps=1e-7)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t in range(1, 8):
        g = rng.normal(size=p.shape)
        adam.adam_step(p, g, m, v, t, lr=0.01, beta1=0.8, beta2=0.99, eps=1e-7)
        opt.step({"p": g})
        np.testing.assert_allclose(p, ref["p"], rtol=1e-12)

    iw = solution("12_iw_loglik")
    a = rng.normal(scale=50, size=(3, 7))
    L, cache = iw.iw_loglik_forward(a)
    running = RunningLogSumExp(3)
    running.update(a[:, :3])
    running.update(a[:, 3:])
    np.testing.assert_allclose(L, running.result() - np.log(7), rtol=1e-12)
    dL = rng.normal(size=3)
    e = np.exp(a - a.max(axis=1, keepdims=True))
    np.testing.assert_allclose(iw.iw_loglik_backward(dL, cache),
                               dL[:, None] * e / e.sum(axis=1, keepdims=True), rtol=1e-12)


# ---------------------------------------------------------------------------- the command


def test_new_writes_the_templates_and_refuses_to_overwrite(tmp_path, capsys):
    folder = tmp_path / "hw"
    assert main(["exercises", "new", str(folder)]) == 0
    for e in EXERCISES:
        assert (folder / e.path).read_text() == TEMPLATE_TEXTS[e.path]
    assert (folder / "README.md").is_file()
    mine = folder / "fill" / "01_linear.py"
    mine.write_text("# my work\n")
    capsys.readouterr()
    assert main(["exercises", "new", str(folder)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert mine.read_text() == "# my work\n"  # untouched
    assert main(["exercises", "solutions", str(folder)]) == 2
    assert mine.read_text() == "# my work\n"


def test_check_exit_status_and_output(tmp_path, capsys):
    hw, sol = tmp_path / "hw", tmp_path / "sol"
    assert main(["exercises", "new", str(hw)]) == 0
    assert main(["exercises", "solutions", str(sol)]) == 0
    capsys.readouterr()
    assert main(["exercises", "check", str(sol)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == len(EXERCISES) and f"{len(EXERCISES)} of {len(EXERCISES)} passed" in out
    assert main(["exercises", "check", str(hw), "01", "b2"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  01_linear" in out and "FAIL  b2_kl_sign" in out and out.count("hint:") == 2
    assert main(["exercises", "check", str(hw), "99"]) == 2
    assert main(["exercises", "check", str(tmp_path / "nowhere")]) == 2


# ---------------------------------------------------------------------------- hostile files


@pytest.mark.parametrize("body, words", [
    ("raise SystemExit(3)\n", "SystemExit"),
    ("def linear_forward(:\n", "SyntaxError"),
    ("import os\n", "no function linear_forward"),
    ("from solution_helpers import answer\n", "ModuleNotFoundError"),
])
def test_a_broken_file_is_a_failure_not_a_crash(tmp_path, body, words):
    (tmp_path / "fill").mkdir()
    (tmp_path / "fill" / "01_linear.py").write_text(body)
    modules, path = set(sys.modules), list(sys.path)
    result = grade(by_name("01_linear"), tmp_path)
    assert not result.passed and words in result.message
    assert set(sys.modules) == modules and sys.path == path


def test_a_file_that_never_returns_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(grader, "TIME_LIMIT", 1)
    text = (SOLUTIONS / "fill" / "03_tanh.py").read_text().replace(
        "da = dh * (1.0 - h * h)", "while True:\n        pass")
    (tmp_path / "fill").mkdir()
    (tmp_path / "fill" / "03_tanh.py").write_text(text)
    result = grade(by_name("03_tanh"), tmp_path)
    assert not result.passed and "still running" in result.message


def test_missing_file_is_named(tmp_path):
    results = check_folder(tmp_path, ["b5"])
    assert not results[0].passed and "b5_straight_through.py is missing" in results[0].message


# ---------------------------------------------------------------------------- packaging


def test_package_data_covers_every_exercise_file():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["npvae.exercises"]
    package = ROOT / "npvae" / "exercises"
    files = [p.relative_to(package) for tree in ("templates", "solutions")
             for p in (package / tree).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert files
    uncovered = [str(f) for f in files if not any(f.match(pat) and len(f.parts) == len(Path(pat).parts)
                                                  for pat in patterns)]
    assert not uncovered, f"not installed with the package: {uncovered}"
