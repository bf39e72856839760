"""Every registered detector against an independent numpy / torch / sklearn implementation of its
published formula (written here, never calling the library), on random logits and features; the
interface's shapes, dtypes and errors; traced hyper-parameters (one compile per shape)."""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import entropy
from sklearn.covariance import EmpiricalCovariance
from sklearn.linear_model import LogisticRegression

from energy_jax import detectors, models, parallel
from energy_jax.data.augment import STD
from energy_jax.detectors import logistic

N, D, C = 40, 24, 6
TRAIN = 400

# Tolerances: each detector (float32, XLA) against a float64 reference of its formula, so within
# float32 rounding. "measured": the largest max |got - want| / |want| (or |got - want| where
# said) with XLA:CPU held to SSE4_2, AVX and AVX2 (2026-12-06); every tolerance is at least 10x it.


def _softmax(l):
  e = np.exp(l - l.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
  """Post-ReLU-like features, a head with a class direction each, labels mostly as predicted."""
  rng = np.random.default_rng(0)
  w = (rng.normal(size=(D, C)) + 3.0 * np.eye(D, C)).astype(np.float32)
  b = rng.normal(size=C).astype(np.float32)
  labels = rng.integers(0, C, TRAIN).astype(np.int32)
  train = np.maximum(rng.normal(0.3, 1.0, size=(TRAIN, D)), 0).astype(np.float32)
  train[np.arange(TRAIN), labels] += 2.5                    # each class along its own unit
  train_logits = (train.astype(np.float64) @ w + b).astype(np.float32)
  feats = np.maximum(rng.normal(0.3, 1.2, size=(N, D)), 0).astype(np.float32)
  feats[:5] *= 3.0                                          # a few far from the rest
  logits = (feats.astype(np.float64) @ w + b).astype(np.float32)
  return dict(w=w, b=b, train=train, train_logits=train_logits, labels=labels, feats=feats,
              logits=logits)


def _fit_score(det, d):
  params = det.fit(train_logits=d["train_logits"], train_features=d["train"],
                   train_labels=d["labels"], head=(d["w"], d["b"]), train_blocks=(d["train"],))
  s = det.score(params, logits=d["logits"], features=d["feats"], blocks=(d["feats"],))
  chex.assert_shape(s, (N,))
  chex.assert_type(s, jnp.float32)
  return np.asarray(s, np.float64), params


def _energy(logits):
  return logsumexp(np.asarray(logits, np.float64), axis=-1)


# ----- logit detectors ------------------------------------------------------------------------

def test_msp_maxlogit_energy(data):
  l = data["logits"].astype(np.float64)
  np.testing.assert_allclose(_fit_score(detectors.create("msp"), data)[0],
                             _softmax(l).max(-1), rtol=1e-5)                 # measured 1.4e-7
  # Exact in fact (a max of float32 values), measured 0.
  np.testing.assert_allclose(_fit_score(detectors.create("max_logit"), data)[0], l.max(-1),
                             rtol=1e-6)
  for t in (1.0, 3.0, 1000.0):
    np.testing.assert_allclose(_fit_score(detectors.create("energy", temperature=t), data)[0],
                               t * _energy(l / t), rtol=1e-5)                # measured 8.9e-8


@pytest.mark.parametrize("gamma,m", [(0.1, 100), (0.5, 3), (2.0, 1)])
def test_gen(data, gamma, m):
  l = data["logits"].astype(np.float64)
  p = _softmax(l)
  rest = np.stack([np.delete(p, j, axis=1).sum(1) for j in range(C)], 1)    # 1 - p, no cancelling
  terms = np.take_along_axis(p ** gamma * rest ** gamma, np.argsort(p, axis=1), axis=1)[:, -m:]
  want = -np.sum(terms, axis=1)                                         # over the M largest p
  got, _ = _fit_score(detectors.create("gen", gamma=gamma, top_classes=m), data)
  np.testing.assert_allclose(got, want, rtol=1e-4)                           # measured 3.7e-6


def test_kl_matching(data):
  p_train = _softmax(data["train_logits"].astype(np.float64))
  pred = data["train_logits"].argmax(1)
  templates = [p_train[pred == k].mean(0) if (pred == k).any() else np.eye(C)[k]
               for k in range(C)]
  p = _softmax(data["logits"].astype(np.float64))
  want = -np.array([min(entropy(pi, q) for q in templates) for pi in p])   # KL(p || d_k)
  got, _ = _fit_score(detectors.create("klm"), data)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)               # measured 1.1e-6


# ----- activation shaping ---------------------------------------------------------------------

def _head_energy(z, d, w=None):
  return _energy(z @ (d["w"] if w is None else w).astype(np.float64) + d["b"])


@pytest.mark.parametrize("p", [85.0, 90.0, 99.0])
def test_react(data, p):
  c = np.percentile(data["train"].astype(np.float64).ravel(), p)
  want = _head_energy(np.minimum(data["feats"].astype(np.float64), c), data)
  got, params = _fit_score(detectors.create("react", percentile=p), data)
  np.testing.assert_allclose(got, want, rtol=1e-5)                           # measured 2.1e-7
  assert float(params["threshold"]) == pytest.approx(c, rel=1e-6)           # measured 2.5e-8


def _torch_topk_prune(z, p):
  """ASH's pruning as its paper writes it: keep the top k = n - round(n p / 100), zero the rest."""
  x = torch.tensor(z, dtype=torch.float64)
  n = x.shape[1]
  k = n - int(np.round(n * p / 100.0))
  values, index = torch.topk(x, k, dim=1)
  kept = torch.zeros_like(x).scatter_(1, index, values)
  mask = torch.zeros_like(x).scatter_(1, index, torch.ones_like(values))
  return x, kept, mask, k


@pytest.mark.parametrize("p", [65.0, 90.0])
def test_ash_p_b_s_and_scale(data, p):
  x, kept, mask, k = _torch_topk_prune(data["feats"], p)
  s1 = x.sum(1, keepdim=True)
  s2 = kept.sum(1, keepdim=True)
  want = {"ash_p": kept, "ash_b": mask * s1 / k, "ash_s": kept * torch.exp(s1 / s2),
          "scale": x * torch.exp(s1 / s2)}
  for name, shaped in want.items():
    got, _ = _fit_score(detectors.create(name, percentile=p), data)
    # measured 7.3e-7
    np.testing.assert_allclose(got, _head_energy(shaped.numpy(), data), rtol=2e-5, err_msg=name)


def test_dice(data):
  mean = data["train"].astype(np.float64).mean(0)
  contribution = mean[:, None] * data["w"]
  for p in (90.0, 50.0):
    masked = data["w"] * (contribution > np.percentile(contribution, p))
    got, _ = _fit_score(detectors.create("dice", sparsity=p), data)
    np.testing.assert_allclose(got, _head_energy(data["feats"].astype(np.float64), data, masked),
                               rtol=1e-5)                                    # measured 1.9e-7


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_gradnorm_equals_torch_autograd_of_the_head(data, t):
  fc = torch.nn.Linear(D, C).double()
  with torch.no_grad():
    fc.weight.copy_(torch.tensor(data["w"].T))
    fc.bias.copy_(torch.tensor(data["b"]))
  want = []
  for z in torch.tensor(data["feats"], dtype=torch.float64):
    fc.zero_grad()
    loss = torch.sum(-torch.log_softmax(fc(z[None]) / t, dim=-1))     # all-ones targets
    loss.backward()
    want.append(fc.weight.grad.abs().sum().item())
  got, _ = _fit_score(detectors.create("gradnorm", temperature=t), data)
  np.testing.assert_allclose(got, want, rtol=1e-4)                           # measured 3.1e-7


# ----- feature space --------------------------------------------------------------------------

def test_relative_mahalanobis_against_sklearn(data):
  z, y = data["train"].astype(np.float64), data["labels"]
  means = np.stack([z[y == c].mean(0) for c in range(C)])
  prec = EmpiricalCovariance().fit(z - means[y]).precision_
  mean0 = z.mean(0)
  prec0 = EmpiricalCovariance().fit(z - mean0).precision_
  q = data["feats"].astype(np.float64)
  md = np.stack([np.einsum("nd,de,ne->n", q - m, prec, q - m) for m in means], 1)
  md0 = np.einsum("nd,de,ne->n", q - mean0, prec0, q - mean0)
  got, _ = _fit_score(detectors.create("relative_mahalanobis"), data)
  # A difference of two distances (cancellation): measured |got - want| 4.0e-5.
  np.testing.assert_allclose(got, np.max(-(md - md0[:, None]), axis=1), rtol=1e-3, atol=1e-3)


def test_she(data):
  z, y = data["train"].astype(np.float64), data["labels"]
  correct = data["train_logits"].argmax(1) == y
  patterns = np.stack([z[correct & (y == k)].mean(0) for k in range(C)])
  want = np.sum(data["feats"] * patterns[data["logits"].argmax(1)], axis=1)
  # measured 1.7e-7, here and below
  np.testing.assert_allclose(_fit_score(detectors.create("she"), data)[0], want, rtol=1e-5)
  # A class never classified correctly keeps the mean of all its examples.
  wrong = dict(data, labels=np.where((y == 2) & correct, 3, y).astype(np.int32))
  patterns[2] = z[wrong["labels"] == 2].mean(0)
  now_correct = data["train_logits"].argmax(1) == wrong["labels"]
  patterns[3] = z[now_correct & (wrong["labels"] == 3)].mean(0)
  want = np.sum(data["feats"] * patterns[data["logits"].argmax(1)], axis=1)
  np.testing.assert_allclose(_fit_score(detectors.create("she"), wrong)[0], want, rtol=1e-5)
  with pytest.raises(ValueError, match=r"classes \[5\] have none"):
    detectors.create("she").fit(train_features=z, train_labels=np.minimum(y, 4),
                                train_logits=data["train_logits"])


def _vim_reference(d, dim):
  """ViM as Wang et al. write it: origin -pinv(W^T) b, principal space of the centred train
  features (eig of the uncentred-about-origin covariance), alpha from the training set."""
  w, b = d["w"].astype(np.float64).T, d["b"].astype(np.float64)          # torch layout [C, D]
  u = -np.linalg.pinv(w) @ b
  z = d["train"].astype(np.float64)
  cov = EmpiricalCovariance(assume_centered=True).fit(z - u).covariance_
  values, vectors = np.linalg.eig(cov)
  ns = np.real(vectors.T[np.argsort(-np.real(values))[dim:]]).T
  residual_train = np.linalg.norm((z - u) @ ns, axis=-1)
  alpha = (z @ w.T + b).max(-1).mean() / residual_train.mean()
  q = d["feats"].astype(np.float64)
  residual = np.linalg.norm((q - u) @ ns, axis=-1)
  return _energy(q @ w.T + b) - alpha * residual, -residual


@pytest.mark.parametrize("dim", [0, 5])
def test_vim_and_residual(data, dim):
  want_vim, want_residual = _vim_reference(data, dim or D // 2)
  # measured |got - want| 8.2e-6 (ViM), 1.6e-6 (residual); rel 1.9e-7 where |want| > 1
  np.testing.assert_allclose(_fit_score(detectors.create("vim", dim=dim), data)[0], want_vim,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(_fit_score(detectors.create("residual", dim=dim), data)[0],
                             want_residual, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match=rf"dim must lie in \[1, {D - 1}\] for D={D}"):
    detectors.create("vim", dim=D).fit(train_features=data["train"], head=(data["w"], data["b"]))


def _knn_reference(bank, queries, k):
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  dist = np.linalg.norm(q[:, None, :] - bank[None], axis=-1)
  return -np.sort(dist, axis=1)[:, k - 1]


@pytest.mark.parametrize("k,memory", [(1, 2**20), (50, 2**20), (7, 8 * N * 13)])
def test_knn_exact_in_chunks(data, k, memory):
  # memory = 8 * N * 13 bytes: chunks of 13 rows (not dividing 400), so the last is shifted.
  want = _knn_reference(data["train"].astype(np.float64), data["feats"].astype(np.float64), k)
  got, _ = _fit_score(detectors.create("knn", k=k, memory_bytes=memory), data)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)               # measured 7.3e-7


def test_knn_sharded_over_a_mesh_equals_one_device(data):
  mesh = parallel.make_mesh(8)
  bank = data["train"][:397]                                # 397 rows: padded to 400 over 8
  det = detectors.create("knn", k=9, memory_bytes=8 * N * 11, mesh=mesh)
  params = det.fit(train_features=bank)
  assert params["bank"].sharding.spec[0] == parallel.AXIS and int(params["bank_size"]) == 397
  got = det.score(params, features=data["feats"])
  # Against the float64 reference, as on one device: measured 2.9e-7.
  np.testing.assert_allclose(got, _knn_reference(bank.astype(np.float64),
                                                 data["feats"].astype(np.float64), 9),
                             rtol=1e-4, atol=1e-5)
  assert det.label == "knn (K=9)"
  with pytest.raises(ValueError, match="fewer than K=500"):
    detectors.create("knn", k=500).fit(train_features=bank)


# ----- detectors that take images -------------------------------------------------------------

_MODEL = models.WideResNet(10, 1, 4, 0.0)


@pytest.fixture(scope="module")
def tiny():
  variables = models.init_variables(_MODEL, jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  train = rng.normal(size=(64, 32, 32, 3)).astype(np.float32)
  test = rng.normal(size=(6, 32, 32, 3)).astype(np.float32)
  out = _MODEL.apply(variables, train)
  labels = np.asarray(out.logits).argmax(-1)
  labels[:4] = np.arange(4)                                  # every class present
  return dict(variables=variables, train=train, test=test, out=out, labels=labels,
              head=models.head("wrn", variables["params"]),
              model=(models.inference_fn(_MODEL), variables))


def _per_example_step(x, loss, eps):
  """``x - eps * sign(grad loss) / std`` with each example's own gradient (``vmap`` of the
  gradient of one example's loss)."""
  grads = np.asarray(jax.vmap(jax.grad(loss))(jnp.asarray(x)))
  return x - eps * np.where(grads >= 0, 1.0, -1.0) / np.asarray(STD)


def test_odin_is_the_published_perturbation(tiny):
  v = tiny["variables"]
  logits_of = lambda x: np.asarray(_MODEL.apply(v, x).logits, np.float64)
  for t, eps in ((1000.0, 0.0014), (10.0, 0.01)):
    def loss(xi):
      lg = _MODEL.apply(v, xi[None]).logits[0]
      return -jax.nn.log_softmax(lg / t)[jnp.argmax(lg)]
    want = _softmax(logits_of(_per_example_step(tiny["test"], loss, eps)) / t).max(-1)
    got = detectors.create("odin", temperature=t, epsilon=eps).score(
        {}, images=tiny["test"], model=tiny["model"])
    np.testing.assert_allclose(got, want, rtol=2e-4)                         # measured 9.5e-8


def _gaussians(z, y):
  z = np.asarray(z, np.float64)
  means = np.stack([z[y == c].mean(0) for c in range(4)])
  return means, EmpiricalCovariance().fit(z - means[y]).precision_


def _noisy_layer_score(v, x, layer, means, prec, eps):
  """Lee et al.: step against the gradient of the closest class's distance, then -1/2 min d^2."""
  feats = lambda xs: _MODEL.apply(v, xs).blocks[layer]
  m, p = jnp.asarray(means, jnp.float32), jnp.asarray(prec, jnp.float32)

  def loss(xi):
    f = feats(xi[None])[0]
    d2 = jnp.einsum("cd,de,ce->c", f - m, p, f - m)
    return 0.5 * d2[jnp.argmin(d2)]
  f = np.asarray(feats(_per_example_step(x, loss, eps)), np.float64)
  return np.max(np.stack([-0.5 * np.einsum("nd,de,ne->n", f - mu, prec, f - mu)
                          for mu in means], 1), axis=1)


def test_mahalanobis_last_layer_with_noise(tiny):
  means, prec = _gaussians(tiny["out"].features, tiny["labels"])
  det = detectors.create("mahalanobis", epsilon=0.002)
  params = det.fit(train_features=np.asarray(tiny["out"].features), train_labels=tiny["labels"],
                   head=tiny["head"])
  want = _noisy_layer_score(tiny["variables"], tiny["test"], -1, means, prec, 0.002)
  got = det.score(params, images=tiny["test"], model=tiny["model"])
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-2)               # measured 1.8e-6


def test_mahalanobis_ensemble_weights_are_sklearns_logistic_regression(tiny):
  rng = np.random.default_rng(2)
  val_in = tiny["train"][:20] * 0.5
  val_out = rng.uniform(-2, 2, size=(16, 32, 32, 3)).astype(np.float32)
  blocks = [np.asarray(b) for b in tiny["out"].blocks]
  eps = 0.001
  det = detectors.create("mahalanobis_ensemble", epsilon=eps)
  params = det.fit(train_blocks=tuple(blocks), train_labels=tiny["labels"], head=tiny["head"],
                   validation=(val_in, val_out), model=tiny["model"])
  fitted = [_gaussians(b, tiny["labels"]) for b in blocks]
  layer = lambda x: np.stack([_noisy_layer_score(tiny["variables"], x, i, *g, eps)
                              for i, g in enumerate(fitted)], 1)
  s_val = np.concatenate([layer(val_in), layer(val_out)])
  y_val = np.r_[np.ones(20), np.zeros(16)]
  lr = LogisticRegression(C=1.0, tol=1e-12, max_iter=100000).fit(s_val, y_val)
  assert np.all(np.abs(lr.coef_) > 1e-4)                    # every block counts
  # Against sklearn's solver (to its tol): measured rel 1.6e-4 (|diff| 8.7e-8 on weights of 2e-2),
  # 2.2e-7 (bias), 2.1e-6 (scores).
  np.testing.assert_allclose(params["weights"], lr.coef_[0], rtol=2e-3, atol=1e-7)
  np.testing.assert_allclose(params["bias"], lr.intercept_[0], rtol=2e-3)
  got = det.score(params, images=tiny["test"], model=tiny["model"])
  np.testing.assert_allclose(got, lr.decision_function(layer(tiny["test"])), rtol=2e-3,
                             atol=2e-3)


def test_logistic_regression_matches_sklearn_on_separable_scales():
  rng = np.random.default_rng(5)
  x = np.concatenate([rng.normal(0, 30, (80, 3)) - 40, rng.normal(0, 30, (60, 3))])
  y = np.r_[np.ones(80), np.zeros(60)]
  w, b = logistic.fit_logistic_regression(x, y)
  lr = LogisticRegression(C=1.0, tol=1e-12, max_iter=100000).fit(x, y)
  # float64 (numpy) against sklearn: measured 1.8e-9.
  np.testing.assert_allclose(w, lr.coef_[0], rtol=1e-4, atol=1e-7)
  assert b == pytest.approx(lr.intercept_[0], rel=1e-4, abs=1e-6)
  with pytest.raises(ValueError, match="both classes"):
    logistic.fit_logistic_regression(x, np.ones(140))


# ----- the interface --------------------------------------------------------------------------

EVERY = set(detectors.names())
IMAGE_DETECTORS = {"odin", "mahalanobis", "mahalanobis_ensemble"}


def test_every_registered_detector_is_tested_here():
  tested = {"msp", "max_logit", "energy", "gen", "klm", "react", "ash_p", "ash_b", "ash_s",
            "scale", "dice", "gradnorm", "relative_mahalanobis", "she", "vim", "residual", "knn",
            "odin", "mahalanobis", "mahalanobis_ensemble"}
  assert EVERY == tested


def test_labels_defaults_and_grids():
  assert detectors.create("msp").label == "msp"
  assert detectors.create("energy", temperature=1.0).label == "energy (T=1)"
  assert detectors.create("odin").label == "odin (T=1000, eps=0.0014)"
  assert detectors.create("mahalanobis").label == "mahalanobis (eps=0.0014)"
  # OpenOOD v1.5's CIFAR defaults.
  defaults = {"react": {"percentile": 90.0}, "knn": {"k": 50}, "ash_p": {"percentile": 90.0},
              "dice": {"sparsity": 90.0}, "scale": {"percentile": 85.0},
              "gen": {"gamma": 0.1, "top_classes": 100}}
  for name, want in defaults.items():
    hp = detectors.create(name).hparams
    assert {k: hp[k] for k in want} == want, name
  odin = detectors.create("odin")
  assert len(list(odin.grid_points())) == 8 and len(list(odin.grid_points(source="reference"))) == 40
  assert [d.epsilon for d in detectors.create("mahalanobis").grid_points(source="reference")] == [
      0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01]
  assert list(detectors.create("energy").grid_points(source="reference")) == [
      detectors.create("energy")]
  for name in EVERY:
    det = detectors.create(name)
    assert det.needs and det.needs <= detectors.SCORE_INPUTS, name
    assert det.__doc__ and ("20" in det.__doc__), name        # its paper and year
    for point in det.grid_points():
      assert point.name == name


@pytest.mark.parametrize("name", sorted(EVERY - IMAGE_DETECTORS))
def test_bad_inputs_raise_naming_the_problem(data, name):
  det = detectors.create(name)
  _, params = _fit_score(det, data)
  good = dict(logits=data["logits"], features=data["feats"], blocks=(data["feats"],))
  needed = sorted(det.needs)
  with pytest.raises(ValueError, match=rf"needs .*missing \['{needed[0]}'\]"):
    det.score(params, **{k: v for k, v in good.items() if k != needed[0]})
  bad_rank = dict(good, **{k: good[k][None] for k in ("logits", "features")})
  with pytest.raises(ValueError, match=r"must be \[N, "):
    det.score(params, **bad_rank)
  as_int = dict(good, logits=good["logits"].astype(np.int32),
                features=good["features"].astype(np.int32))
  with pytest.raises(TypeError, match="must be floating point, got dtype int32"):
    det.score(params, **as_int)
  if {"logits", "features"} <= det.needs:
    with pytest.raises(ValueError, match="disagree on the number of examples"):
      det.score(params, **dict(good, features=good["features"][:-1]))
  if det.fit_needs:
    with pytest.raises(ValueError, match="must be fitted first"):
      det.score({}, **good)
    if "features" in det.needs:
      with pytest.raises(ValueError, match=rf"features have D={D - 1}"):
        det.score(params, **dict(good, features=good["features"][:, 1:]))
    missing = sorted(det.fit_needs)[0]
    with pytest.raises(ValueError, match=rf"missing \['{missing}'\]"):
      det.fit(**{k: v for k, v in dict(train_logits=data["train_logits"],
                                        train_features=data["train"], train_labels=data["labels"],
                                        head=(data["w"], data["b"]),
                                        train_blocks=(data["train"],)).items() if k != missing})
  # Half-precision inputs are scored in float32.
  s16 = det.score(params, **{k: (v.astype(np.float16) if k != "blocks" else v)
                             for k, v in good.items()})
  chex.assert_type(s16, jnp.float32)


def test_bad_hyper_parameters_and_fit_inputs(data):
  with pytest.raises(ValueError, match=r"percentile must lie in \[0.0, 100.0\), got 100"):
    detectors.create("react", percentile=100)
  with pytest.raises(ValueError, match="temperature must lie in"):
    detectors.create("energy", temperature=-1.0)
  with pytest.raises(ValueError, match="epsilon must lie in"):
    detectors.create("odin", epsilon=-0.1)
  with pytest.raises(ValueError, match=r"k \(K\) must be a positive integer"):
    detectors.create("knn", k=0)
  with pytest.raises(ValueError, match=r"top_classes \(M\) must be a positive integer"):
    detectors.create("gen", top_classes=2.5)
  with pytest.raises(ValueError, match=r"head must be \(W \[D, C\], b \[C\]\), got W \(24, 6\) "
                                       r"and b \(5,\)"):
    detectors.create("react").fit(train_features=data["train"], head=(data["w"], data["b"][:5]))
  with pytest.raises(ValueError, match="train_features have D=23"):
    detectors.create("react").fit(train_features=data["train"][:, 1:], head=(data["w"], data["b"]))
  with pytest.raises(ValueError, match=r"train_labels must lie in \[0, 6\)"):
    detectors.create("relative_mahalanobis").fit(
        train_features=data["train"], train_labels=data["labels"] + 1, head=(data["w"], data["b"]))
  with pytest.raises(ValueError, match="train_features contains NaN"):
    detectors.create("knn").fit(train_features=np.full((60, 3), np.nan, np.float32))
  with pytest.raises(ValueError, match=r"unknown fit input\(s\) \['train_feature'\]"):
    detectors.create("knn").fit(train_feature=data["train"])
  with pytest.raises(ValueError, match=r"needs \['images', 'model'\]; missing \['model'\]"):
    detectors.create("odin").score({}, images=np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"images must be normalised \[N, H, W, C\]"):
    detectors.create("odin").score({}, images=np.zeros((8, 8, 3), np.float32),
                                   model=(lambda v, x: x, {}))


def _counted(det, max_traces):
  """``det`` as a fresh subclass whose formula counts its traces (chex)."""
  cls = type(det)
  sub = type(f"Counted{cls.__name__}", (cls,),
             {"compute": chex.assert_max_traces(cls.compute, n=max_traces)})
  sub = dataclasses.dataclass(frozen=True)(sub)
  sub.name = cls.name
  return sub(**det.hparams)


@pytest.mark.parametrize("name,grid", [
    ("energy", {"temperature": (1.0, 2.0, 50.0)}),
    ("react", {"percentile": (85.0, 95.0)}),
    ("ash_s", {"percentile": (65.0, 90.0)}),
    ("dice", {"sparsity": (50.0, 90.0)}),
    ("gen", {"gamma": (0.1, 1.0), "top_classes": (2, 100)}),
    ("gradnorm", {"temperature": (1.0, 3.0)}),
    ("knn", {}), ("vim", {}), ("klm", {}), ("she", {}), ("relative_mahalanobis", {}),
    ("msp", {}), ("max_logit", {}), ("scale", {}), ("ash_p", {}), ("ash_b", {}), ("residual", {})])
def test_each_score_traces_once_per_shape_whatever_its_traced_hyper_parameters(data, name, grid):
  chex.clear_trace_counter()
  det = _counted(detectors.create(name), max_traces=2)
  points = list(det.grid_points(grid)) if grid else [det]
  plain = [detectors.create(name, **{k: getattr(p, k) for k in grid}) for p in points]
  for point, reference in zip(points, plain):
    got, params = _fit_score(point, data)               # one shape: one trace for all points
    # The same formula with its hyper-parameters traced in both: measured equal bit for bit.
    np.testing.assert_allclose(got, _fit_score(reference, data)[0], rtol=1e-6)
  half = {k: v[: N // 2] for k, v in dict(logits=data["logits"], features=data["feats"]).items()}
  chex.assert_shape(points[0].score(params, **half, blocks=(half["features"],)), (N // 2,))
  with pytest.raises(AssertionError, match="traced > 2 times"):   # a third shape retraces
    points[0].score(params, **{k: v[:3] for k, v in half.items()}, blocks=(half["features"][:3],))


def test_odin_grid_of_temperature_and_noise_traces_once(tiny):
  chex.clear_trace_counter()
  det = _counted(detectors.create("odin"), max_traces=1)
  grid = {"temperature": (1.0, 1000.0), "epsilon": (0.0, 0.0014, 0.004)}
  outs = [np.asarray(p.score({}, images=tiny["test"], model=tiny["model"]))
          for p in det.grid_points(grid)]
  assert len({o.tobytes() for o in outs}) == 6                     # six different score vectors
  with pytest.raises(AssertionError, match="traced > 1 times"):
    det.score({}, images=tiny["test"][:2], model=tiny["model"])


def test_mahalanobis_noise_grid_traces_once(tiny):
  chex.clear_trace_counter()
  det = _counted(detectors.create("mahalanobis"), max_traces=1)
  params = det.fit(train_features=np.asarray(tiny["out"].features), train_labels=tiny["labels"],
                   head=tiny["head"])
  outs = [np.asarray(p.score(params, images=tiny["test"], model=tiny["model"]))
          for p in det.grid_points(source="reference")]                  # 7 noise magnitudes
  assert len(outs) == 7 and len({o.tobytes() for o in outs}) == 7


# ----- degenerate Gaussian fits (docs/reliability.md) ------------------------------------------

def test_degenerate_gaussian_fits_are_refused(data):
  head = (data["w"], data["b"])
  y = np.arange(60) % C
  constant = np.ones((60, D), np.float32)
  with pytest.raises(ValueError, match=r"degenerate Gaussian fit on the penultimate features: the "
                                       rf"covariance of the {D} dimensions around the {C} mean\(s\) "
                                       "is zero"):
    detectors.create("mahalanobis").fit(train_features=constant, train_labels=y, head=head)
  # Constant within each class, different between classes: no spread around the class means.
  per_class = np.repeat(np.arange(C, dtype=np.float32)[:, None], D, 1)[y]
  with pytest.raises(ValueError, match=r"degenerate Gaussian fit on the training features "
                                       r"\(classes\): .* is zero"):
    detectors.create("relative_mahalanobis").fit(train_features=per_class, train_labels=y,
                                                 head=head)
  # The ensemble names the block (the error comes before the model is needed).
  blocks = (data["train"][:60], constant[:, :8])
  with pytest.raises(ValueError, match="degenerate Gaussian fit on the features of block 1"):
    images = np.zeros((2, 32, 32, 3), np.float32)
    detectors.create("mahalanobis_ensemble").fit(train_blocks=blocks, train_labels=y, head=head,
                                                 validation=(images, images), model=(None, None))


def _pinv_of_class_covariance(z, y):
  z = np.asarray(z, np.float64)
  means = np.stack([z[y == c].mean(0) for c in range(C)])
  centred = z - means[y]
  return means, np.linalg.pinv(centred.T @ centred / len(z), hermitian=True)


def test_singular_gaussian_fits_are_warned_about_and_use_the_pseudo_inverse(data):
  from energy_jax.detectors.gaussians import SingularCovarianceWarning
  head = (data["w"], data["b"])
  # Fewer examples than dimensions: rank N - C.
  z, y = data["train"][:16], np.arange(16) % C
  with pytest.warns(SingularCovarianceWarning, match=rf"on the penultimate features: the "
                    rf"covariance of the {D} dimensions has numerical rank {16 - C} \(16 examples "
                    rf"around {C} mean\(s\) give at most {16 - C}; 0 dimension\(s\) constant"):
    params = detectors.create("mahalanobis").fit(train_features=z, train_labels=y, head=head)
  means, precision = _pinv_of_class_covariance(z, y)
  # Against numpy's float64 pinv: measured 5.8e-8 (means, precision), 5.3e-8 (below).
  np.testing.assert_allclose(params["means"], means, rtol=1e-6)
  np.testing.assert_allclose(params["precision"], precision, rtol=1e-4, atol=1e-4)
  # A dead unit (a feature constant everywhere), enough examples otherwise.
  z, y = data["train"].copy(), data["labels"]
  z[:, 3] = 0.0
  with pytest.warns(SingularCovarianceWarning, match=rf"rank {D - 1} .*; 1 dimension\(s\) "
                    r"constant within every class\); .* ignores 1 direction"):
    params = detectors.create("mahalanobis").fit(train_features=z, train_labels=y, head=head)
  np.testing.assert_allclose(params["precision"], _pinv_of_class_covariance(z, y)[1], rtol=1e-4,
                             atol=1e-6)
  assert np.abs(np.asarray(params["precision"])[3]).max() < 1e-12    # the dead unit: ignored
  # The relative detector's background Gaussian is checked too.
  with pytest.warns(SingularCovarianceWarning) as caught:
    detectors.create("relative_mahalanobis").fit(train_features=z, train_labels=y, head=head)
  assert [re.search(r"on the training features \((\w+)\)", str(w.message)).group(1)
          for w in caught] == ["classes", "background"]


def test_a_full_rank_gaussian_fit_warns_nothing(data):
  import warnings
  from energy_jax.detectors.gaussians import SingularCovarianceWarning
  with warnings.catch_warnings():
    warnings.simplefilter("error", SingularCovarianceWarning)
    for name in ("mahalanobis", "relative_mahalanobis"):
      detectors.create(name).fit(train_features=data["train"], train_labels=data["labels"],
                                 head=(data["w"], data["b"]))


def test_a_singular_fit_of_the_multi_layer_ensemble_is_warned_about(data):
  from energy_jax.detectors.gaussians import SingularCovarianceWarning
  z, y = data["train"][:16], np.arange(16) % C                  # fewer examples than dimensions
  images = np.zeros((2, 32, 32, 3), np.float32)
  with pytest.warns(SingularCovarianceWarning, match=rf"on the features of block 0: the "
                    rf"covariance of the {D} dimensions has numerical rank {16 - C} "):
    with pytest.raises(TypeError):                  # no model here: the warning comes first
      detectors.create("mahalanobis_ensemble").fit(
          train_blocks=(z,), train_labels=y, head=(data["w"], data["b"]),
          validation=(images, images), model=(None, None))


# ----- degenerate subspace fits (ViM, Residual) ---------------------------------------------------

def _vim_origin(d):
  return -np.linalg.pinv(np.asarray(d["w"], np.float64).T) @ np.asarray(d["b"], np.float64)


@pytest.mark.parametrize("name", ["vim", "residual"])
@pytest.mark.parametrize("n", [1, 2])
def test_subspace_fits_on_fewer_examples_than_dim_are_warned_about(data, name, n):
  from energy_jax.detectors.gaussians import SingularCovarianceWarning
  z = data["train"][:n]
  rank = np.linalg.matrix_rank(np.asarray(z, np.float64) - _vim_origin(data))
  assert rank == n
  message = (f"degenerate subspace fit of '{name}': the {n} training feature vector(s) span "
             f"{rank} of the {D} dimensions about the origin u (at most N = {n}), no more than "
             f"the dim = {D // 2} principal ones, so the residual space of the other {D // 2} "
             "holds none of their variance and the residual norms are rounding error; fit on "
             "more than dim examples that vary, or lower dim")
  with pytest.warns(SingularCovarianceWarning) as caught:
    detectors.create(name).fit(train_features=z, head=(data["w"], data["b"]))
  assert [str(w.message) for w in caught] == [message]
  # dim below the rank: a residual with variance, no warning.
  if n == 2:
    import warnings
    with warnings.catch_warnings():
      warnings.simplefilter("error", SingularCovarianceWarning)
      detectors.create(name, dim=1).fit(train_features=z, head=(data["w"], data["b"]))


def test_subspace_fits_on_features_at_the_origin_are_refused(data):
  at_origin = np.tile(_vim_origin(data), (5, 1))
  for name in ("vim", "residual"):
    with pytest.raises(ValueError) as e:
      detectors.create(name).fit(train_features=at_origin, head=(data["w"], data["b"]))
    assert str(e.value) == (f"degenerate subspace fit of '{name}': all 5 training features equal "
                            "the origin u = -pinv(W^T) b, so no direction is principal; fit on "
                            "features that vary")


def test_full_rank_subspace_fits_warn_nothing(data):
  import warnings
  from energy_jax.detectors.gaussians import SingularCovarianceWarning
  with warnings.catch_warnings():
    warnings.simplefilter("error", SingularCovarianceWarning)
    for name in ("vim", "residual"):
      detectors.create(name).fit(train_features=data["train"], head=(data["w"], data["b"]))


# ----- hyper-parameters in float32, the dtype they are traced in --------------------------------

_F32 = "[1.1754944e-38, 3.4028235e+38]"


@pytest.mark.parametrize("name,hparams,message", [
    ("odin", {"epsilon": 1e39},
     f"epsilon = 1e+39 overflows float32, in which it is computed: it must be 0 or in {_F32}"),
    ("odin", {"epsilon": 1e-45},
     f"epsilon = 1e-45 underflows float32, in which it is computed: it must be 0 or in {_F32}"),
    ("odin", {"temperature": 1e39},
     f"temperature = 1e+39 overflows float32, in which it is computed: it must be in {_F32}"),
    ("odin", {"temperature": 1e-39},
     f"temperature = 1e-39 underflows float32, in which it is computed: it must be in {_F32}"),
    ("energy", {"temperature": 3.5e38},
     f"temperature = 3.5e+38 overflows float32, in which it is computed: it must be in {_F32}"),
    ("gradnorm", {"temperature": 1e-40},
     f"temperature = 1e-40 underflows float32, in which it is computed: it must be in {_F32}"),
    ("gen", {"gamma": 1e39},
     f"gamma = 1e+39 overflows float32, in which it is computed: it must be in {_F32}"),
    ("react", {"percentile": 1e-40},
     "percentile = 1e-40 underflows float32, in which it is computed: it must be 0 or in "
     "[1.1754944e-38, 100)"),
    ("mahalanobis", {"epsilon": 1e39},
     f"epsilon = 1e+39 overflows float32, in which it is computed: it must be 0 or in {_F32}"),
    ("mahalanobis_ensemble", {"epsilon": 1e39},
     f"epsilon = 1e+39 overflows float32, in which it is computed: it must be 0 or in {_F32}"),
])
def test_hyper_parameters_that_float32_cannot_hold_are_refused(name, hparams, message):
  with pytest.raises(ValueError) as e:
    detectors.create(name, **hparams)
  assert str(e.value) == f"detector {name!r}: {message}"


def test_hyper_parameters_at_float32s_ends_are_kept_exactly():
  f32 = np.finfo(np.float32)
  det = detectors.create("odin", temperature=float(f32.max), epsilon=float(f32.tiny))
  hp = det.traced_hparams()
  assert float(hp["temperature"]) == float(f32.max) and float(hp["epsilon"]) == float(f32.tiny)
  assert float(detectors.create("odin", epsilon=0.0).traced_hparams()["epsilon"]) == 0.0
  with pytest.raises(TypeError) as e:
    detectors.create("energy", temperature="2")     # the temperature's own check, as the scores'
  assert str(e.value) == "detector 'energy': temperature must be a number, got '2'"
  with pytest.raises(TypeError) as e:
    detectors.create("gen", gamma="2")              # float("2") passes the range check
  assert str(e.value) == ("detector 'gen': gamma must be a real number (it is traced as float32), "
                          "got '2'")


# ----- complex and masked inputs ------------------------------------------------------------------

def test_complex_and_masked_inputs_are_refused(data):
  energy = detectors.create("energy")
  logits = data["logits"]
  cases = [
      (lambda: energy.score({}, logits=logits + 1j),
       "logits must be real, got dtype complex64: its imaginary part would be dropped"),
      (lambda: energy.score({}, logits=np.ma.masked_array(logits, logits > 5)),
       "logits is a masked array, whose mask would be ignored (every value, masked or not, "
       "would count): pass a plain array of the values to use"),
      (lambda: detectors.create("knn").fit(train_features=np.ma.masked_array(data["train"])),
       "train_features is a masked array, whose mask would be ignored (every value, masked or "
       "not, would count): pass a plain array of the values to use"),
      (lambda: detectors.create("mahalanobis").fit(
          train_features=data["train"], train_labels=np.ma.masked_array(data["labels"]),
          head=(data["w"], data["b"])),
       "train_labels is a masked array, whose mask would be ignored (every value, masked or not, "
       "would count): pass a plain array of the values to use"),
      (lambda: detectors.create("react").fit(train_features=data["train"],
                                             head=(data["w"].astype(np.complex64), data["b"])),
       "the head's W must be real, got dtype complex64: its imaginary part would be dropped"),
      (lambda: detectors.create("odin").score({}, images=np.zeros((2, 8, 8, 3), np.complex64),
                                              model=(lambda v, x: x, {})),
       "images must be real, got dtype complex64: its imaginary part would be dropped"),
  ]
  for call, message in cases:
    with pytest.raises(TypeError) as e:
      call()
    assert str(e.value) == message


@dataclasses.dataclass(frozen=True)
class _Prefixed(detectors.Detector):
  """A detector with its own score and a string hyper-parameter (never traced)."""
  prefix: str = "x"

  def score(self, params, *, logits, **unused):
    return jnp.max(jnp.asarray(logits), axis=-1)


def test_a_detector_with_its_own_score_keeps_other_hyper_parameters():
  assert _Prefixed(prefix="y").prefix == "y"


# ----- hyper-parameters given as text (the command line's --hparam) -----------------------------

def test_hyper_parameters_from_strings_take_the_type_of_their_default():
  assert detectors.create_from_strings("knn", {"k": "5"}) == detectors.create("knn", k=5)
  assert detectors.create_from_strings("knn", {"k": "1e3"}).k == 1000
  odin = detectors.create_from_strings("odin", {"temperature": "1000", "epsilon": "0.0014"})
  assert odin == detectors.create("odin", temperature=1000.0, epsilon=0.0014)
  assert detectors.create_from_strings("energy", {}) == detectors.create("energy")
  with pytest.raises(ValueError, match=re.escape("knn.k=2.5: expected a int")):
    detectors.create_from_strings("knn", {"k": "2.5"})
  with pytest.raises(ValueError, match=re.escape("odin.temperature=hot: expected a float")):
    detectors.create_from_strings("odin", {"temperature": "hot"})
  # The mesh is set in code, never from text.
  with pytest.raises(ValueError, match=re.escape("detector 'knn' has no hyper-parameter(s) "
                                                 "['mesh']; it has ['k', 'memory_bytes']")):
    detectors.create_from_strings("knn", {"mesh": "x"})
  with pytest.raises(ValueError, match=r"detector 'odin': temperature must lie in \(0.0, inf\)"):
    detectors.create_from_strings("odin", {"temperature": "-1"})
