import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.special import logsumexp as np_logsumexp, softmax as np_softmax

import energy_jax
from energy_jax import arrays, detectors, losses, models
from energy_jax.data.augment import STD
from energy_jax.detectors import gaussians, scores

# Tolerances: the jitted float32 scores and losses against float64 numpy / scipy, so within float32
# rounding. "measured": the largest max |got - want| / |want| (or |got - want| where said) with
# XLA:CPU held to SSE4_2, AVX and AVX2 (2026-12-06); every tolerance is at least 10x it.
EXTREME = np.array([[1000.0, -1000.0, 0.0], [-1e4, -1e4 + 1, -1e4 + 2], [3.0, 3.0, 3.0]],
                   np.float32)


def test_energy_score_is_exported_jitted_and_matches_numpy():
  assert energy_jax.energy_score is scores.energy_score
  assert hasattr(energy_jax.energy_score, "lower")
  for t in (1.0, 2.0, 1000.0):
    want = t * np_logsumexp(EXTREME.astype(np.float64) / t, axis=-1)
    # measured 7.4e-8 (both)
    np.testing.assert_allclose(scores.energy_score(EXTREME, temperature=t), want, rtol=1e-6)
    np.testing.assert_allclose(scores.free_energy(EXTREME, t), -want, rtol=1e-6)


def test_hyper_parameters_are_traced_so_a_grid_compiles_once():
  logits = np.random.default_rng(1).normal(size=(7, 5)).astype(np.float32)
  scores.energy_score.clear_cache()
  for t in (1.0, 2.0, 1000.0):
    np.testing.assert_allclose(scores.energy_score(logits, t),                   # measured 8.8e-8
                               t * np_logsumexp(logits.astype(np.float64) / t, -1), rtol=1e-5)
  assert scores.energy_score._cache_size() == 1
  _, variables = _tiny()
  x = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype(np.float32)
  scores.odin_score.clear_cache()
  outs = [np.asarray(scores.odin_score(_apply, variables, x, temperature=t, epsilon=e))
          for t in (1.0, 1000.0) for e in (0.0, 0.004)]
  assert scores.odin_score._cache_size() == 1 and len({o.tobytes() for o in outs}) == 4
  with pytest.raises(ValueError, match=re.escape("epsilon must lie in [0.0, inf), got -1.0")):
    scores.odin_score(_apply, variables, x, epsilon=-1.0)
  with pytest.raises(ValueError, match=re.escape("temperature must lie in (0.0, inf), got inf")):
    scores.msp_score(logits, temperature=float("inf"))


def test_scores_batch_over_leading_shape():
  logits = np.random.default_rng(0).normal(size=(2, 3, 5, 10)).astype(np.float32)
  out = scores.energy_score(logits)
  chex.assert_shape(out, (2, 3, 5))
  # measured 1.1e-7, 1.5e-7; the max is exact (measured 0)
  np.testing.assert_allclose(out, np_logsumexp(logits, -1), rtol=1e-5)
  np.testing.assert_allclose(scores.msp_score(logits), np_softmax(logits, -1).max(-1), rtol=1e-5)
  np.testing.assert_allclose(scores.max_logit_score(logits), logits.max(-1))


def test_score_input_errors_and_nan_rows():
  with pytest.raises(ValueError, match="rank-0"):
    scores.energy_score(jnp.float32(1.0))
  with pytest.raises(TypeError, match="int32"):
    scores.energy_score(np.ones((2, 3), np.int32))
  with pytest.raises(ValueError, match="temperature"):
    scores.energy_score(np.ones((2, 3), np.float32), temperature=0.0)
  bad = np.array([[1.0, np.nan], [1.0, 2.0], [np.inf, 0.0]], np.float32)
  out = np.asarray(scores.energy_score(bad))
  assert np.isnan(out[0]) and np.isnan(out[2]) and np.isfinite(out[1])


def _tiny():
  model = models.WideResNet(10, 1, 4, 0.0)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  return model, variables


def _apply(variables, x):
  return _tiny_model.apply(variables, x, train=False).logits


def _features(variables, x):
  return _tiny_model.apply(variables, x, train=False).features


_tiny_model = models.WideResNet(10, 1, 4, 0.0)


def test_odin_matches_hand_computed_perturbation():
  _, variables = _tiny()
  x = np.random.default_rng(0).normal(size=(5, 32, 32, 3)).astype(np.float32)
  t, eps = 10.0, 0.01

  def loss(xi):   # the reference's CE of tempered logits against the argmax label
    logits = _apply(variables, xi[None])[0]
    return -jax.nn.log_softmax(logits / t)[jnp.argmax(logits)]
  grads = np.stack([np.asarray(jax.grad(loss)(jnp.asarray(xi))) for xi in x])
  x_pert = x - eps * np.where(grads >= 0, 1.0, -1.0) / np.asarray(STD)
  want = np_softmax(np.asarray(_apply(variables, x_pert), np.float64) / t, -1).max(-1)
  got = scores.odin_score(_apply, variables, x, temperature=t, epsilon=eps)
  np.testing.assert_allclose(got, want, rtol=1e-5)                           # measured 5.5e-8
  no_noise = scores.odin_score(_apply, variables, x, temperature=t, epsilon=0.0)
  # Two float32 programs (ODIN at eps 0, the model then MSP): measured equal.
  np.testing.assert_allclose(no_noise, scores.msp_score(_apply(variables, x), t), rtol=1e-6)


def test_mahalanobis_fit_matches_sklearn_and_score_is_min_distance():
  from sklearn.covariance import EmpiricalCovariance
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 40)
  feats = rng.normal(size=(120, 5)) + labels[:, None] * 2.0
  params = gaussians.fit_mahalanobis(feats, labels, 3)
  means = np.stack([feats[labels == c].mean(0) for c in range(3)])
  cov = EmpiricalCovariance(assume_centered=False).fit(feats - means[labels])
  # measured 3.4e-8 (means), 3.7e-8 (precision), 7.8e-8 (scores)
  np.testing.assert_allclose(params.means, means, rtol=1e-5)
  np.testing.assert_allclose(params.precision, cov.precision_, rtol=1e-4, atol=1e-5)
  query = rng.normal(size=(7, 5))
  d2 = np.stack([np.einsum("nd,de,ne->n", query - m, cov.precision_, query - m) for m in means], 1)
  np.testing.assert_allclose(gaussians.mahalanobis_from_features(query, params),
                             -0.5 * d2.min(1), rtol=1e-4)
  with pytest.raises(ValueError, match=r"classes without examples: \[3\]"):
    gaussians.fit_mahalanobis(feats, labels, 4)


def test_mahalanobis_input_processing_moves_toward_closest_class():
  _, variables = _tiny()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(40, 32, 32, 3)).astype(np.float32)
  feats = np.asarray(_features(variables, x))
  with pytest.warns(gaussians.SingularCovarianceWarning, match="rank 36 .40 examples"):  # 64 dims
    params = gaussians.fit_mahalanobis(feats, np.arange(40) % 4, 4)
  plain = scores.mahalanobis_score(_features, variables, x[:6], params)
  # Two float32 programs (the model and the score in one, the features then the score): measured
  # equal.
  np.testing.assert_allclose(plain, gaussians.mahalanobis_from_features(feats[:6], params), rtol=1e-5)
  moved = scores.mahalanobis_score(_features, variables, x[:6], params, epsilon=0.002)
  assert np.all(np.asarray(moved) >= np.asarray(plain) - 1e-4)  # a step up the score


def test_losses_match_numpy_on_extreme_logits():
  lin = EXTREME
  lout = EXTREME[::-1] * 0.01
  labels = np.array([0, 2, 1], np.int32)
  lse = np_logsumexp(lin.astype(np.float64), -1)
  # lse - logit cancels at 1e4, where a float32 ulp is 1e-3: measured |got - want| 3.8e-4.
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits=lin, labels=labels),
                             lse - lin[np.arange(3), labels], rtol=1e-5, atol=1e-2)
  e_in, e_out = -lse, -np_logsumexp(lout.astype(np.float64), -1)
  m_in, m_out = -23.0, -5.0
  want = (np.mean(np.maximum(e_in - m_in, 0) ** 2) + np.mean(np.maximum(m_out - e_out, 0) ** 2))
  got = losses.energy_bounded_loss(logits_in=lin, logits_out=lout, m_in=m_in, m_out=m_out)
  np.testing.assert_allclose(got, want, rtol=1e-5)                           # measured 1.6e-7
  oe = np_logsumexp(lout.astype(np.float64), -1) - lout.mean(-1)
  # measured 5.1e-7
  np.testing.assert_allclose(losses.outlier_exposure_loss(logits_out=lout), oe.mean(), rtol=1e-5)
  chex.assert_shape(losses.energy_hinge_in(logits=lin, m_in=m_in), (3,))


def test_loss_gradients():
  rng = np.random.default_rng(0)
  lin = jnp.asarray(rng.normal(size=(4, 5)) * 8)
  lout = jnp.asarray(rng.normal(size=(6, 5)) * 8)
  f = lambda a, b: losses.energy_bounded_loss(logits_in=a, logits_out=b, m_in=-3.0, m_out=-1.0)
  # Autodiff against finite differences: measured 3.1e-3 of the 1e-2 tolerances.
  check_grads(f, (lin, lout), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
  check_grads(lambda b: losses.outlier_exposure_loss(logits_out=b), (lout,), order=2,
              modes=["rev"], atol=1e-2, rtol=1e-2)


def test_cross_entropy_gradient_is_softmax_minus_one_hot_without_a_scatter():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 4)).astype(np.float32) * 5
  labels = np.array([0, 3, 1, 2, 3, 0], np.int32)
  grad = jax.grad(lambda z: jnp.sum(losses.softmax_cross_entropy(logits=z, labels=labels)))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(grad(logits), p - np.eye(4)[labels], atol=1e-6)  # measured 3.0e-8
  # The backward pass is elementwise: no scatter-add to launch (or to make GPU runs differ).
  assert "scatter" not in str(jax.make_jaxpr(grad)(logits))


def test_cross_entropy_is_nan_for_a_label_out_of_range():
  ce = np.asarray(losses.softmax_cross_entropy(logits=np.zeros((4, 3), np.float32),
                                               labels=np.array([0, 3, -1, 2], np.int32)))
  np.testing.assert_allclose(ce[[0, 3]], np.log(3.0), rtol=1e-6)           # measured 1.8e-8
  assert np.isnan(ce[1]) and np.isnan(ce[2])      # -1 wrapped to the last class before


def test_loss_input_errors():
  with pytest.raises(ValueError, match=r"labels must be \[3\]"):
    losses.softmax_cross_entropy(logits=EXTREME, labels=np.zeros(2, np.int32))
  with pytest.raises(ValueError, match="logits_out must be"):
    losses.outlier_exposure_loss(logits_out=np.ones(3, np.float32))


# ----- bad and edge inputs (docs/reliability.md) ------------------------------------------------

def _np_energy(l64, t):
  return t * np_logsumexp(l64 / t, axis=-1)


def _np_msp(l64, t):
  return np_softmax(l64 / t, axis=-1).max(-1)


def test_scores_accept_array_likes_and_every_float_width():
  import ml_dtypes
  base = np.random.default_rng(4).normal(size=(6, 5)) * 4
  forms = {"list": base.tolist(), "tuple": tuple(map(tuple, base)), "float64": base,
           "float32": base.astype(np.float32), "float16": base.astype(np.float16),
           "bfloat16": base.astype(ml_dtypes.bfloat16),
           "jax bfloat16": jnp.asarray(base, jnp.bfloat16), "jax float16": jnp.asarray(base, jnp.float16)}
  for name, logits in forms.items():
    # The reference: float64 formulas on the values the input holds (rounded to its width).
    l64 = np.asarray(logits).astype(np.float64)
    # measured 8.9e-8 (energy, free energy), 8.5e-8 (MSP); the max is exact (measured 0)
    for t in (1.0, 0.5):
      np.testing.assert_allclose(scores.energy_score(logits, t), _np_energy(l64, t), rtol=1e-6,
                                 err_msg=name)
      np.testing.assert_allclose(scores.msp_score(logits, t), _np_msp(l64, t), rtol=1e-6,
                                 err_msg=name)
    np.testing.assert_allclose(scores.free_energy(logits), -_np_energy(l64, 1.0), rtol=1e-6)
    np.testing.assert_array_equal(scores.max_logit_score(logits), l64.max(-1).astype(np.float32))
    assert np.asarray(scores.energy_score(logits)).dtype == np.float32, name
  # Whole numbers in a list are logits too; an integer array is refused (labels, most likely).
  # measured 7.7e-8
  np.testing.assert_allclose(scores.energy_score([[1, 2], [3, 3]]),
                             np_logsumexp([[1.0, 2.0], [3.0, 3.0]], -1), rtol=1e-6)
  with pytest.raises(TypeError, match="logits must be floating point, got dtype int64"):
    scores.msp_score(np.ones((2, 3), np.int64))
  with pytest.raises(TypeError, match="logits must be an array of numbers, got list"):
    scores.energy_score([[1.0, 2.0], [3.0]])
  with pytest.raises(TypeError, match="logits must be an array of numbers, got list of dtype <U1"):
    scores.max_logit_score([["a", "b"]])


TIES_AND_EXTREMES = np.array([[1.0, 2.0, 3.0], [-5.0, -6.0, -7.0], [1000.0, -1000.0, 0.0],
                              [3.0, 3.0, 3.0], [-1e4, -1e4 + 1, -1e4 + 2], [7.0, 7.0, -2.0]],
                             np.float32)


@pytest.mark.parametrize("t", [0.9, 0.3, 1e-3, 1e-10, 1e-20, 1e-30, 2e-38])
def test_small_temperatures_give_the_finite_score(t):
  l64 = TIES_AND_EXTREMES.astype(np.float64)
  energy = np.asarray(scores.energy_score(TIES_AND_EXTREMES, t))
  msp = np.asarray(scores.msp_score(TIES_AND_EXTREMES, t))
  assert np.all(np.isfinite(energy)) and np.all(np.isfinite(msp))
  # measured 4.8e-8 (energy), 5.0e-8 (MSP), 3.0e-8 (the limits), |got - want| 3.3e-8 (gradient)
  np.testing.assert_allclose(energy, _np_energy(l64, t), rtol=1e-6)
  np.testing.assert_allclose(msp, _np_msp(l64, t), rtol=1e-6)
  if t <= 1e-10:       # the limits: the maximum logit, and 1 / (the number of classes tying it)
    np.testing.assert_allclose(energy, l64.max(-1), rtol=1e-6)
    np.testing.assert_allclose(msp, [1, 1, 1, 1 / 3, 1, 1 / 2], rtol=1e-6)
  # Inside traced code (the training objectives): the gradient is softmax(l / T). Below T ~ 1e-37
  # its chain T * softmax * (1 / T) passes through float32 subnormals, which XLA flushes to 0.
  if t >= 1e-30:
    grad = jax.grad(lambda l: jnp.sum(scores.energy(l, t)))(jnp.asarray(TIES_AND_EXTREMES))
    np.testing.assert_allclose(grad, np_softmax(l64 / t, axis=-1), atol=1e-6)


def test_temperatures_of_one_and_above_are_the_plain_computation_bit_for_bit():
  # Bit for bit by design: T >= 1 runs the plain formula as its own lax.cond branch (nothing
  # fuses into it), the plain jit's operations compiled alike. Measured equal (SSE4_2, AVX, AVX2).
  logits = np.random.default_rng(5).normal(size=(64, 10)).astype(np.float32) * 6
  plain = jax.jit(lambda l, t: t * jax.nn.logsumexp(l / t, axis=-1))
  plain_msp = jax.jit(lambda l, t: jnp.max(jax.nn.softmax(l / t, axis=-1), axis=-1))
  for t in (1.0, 10.0, 1000.0):
    np.testing.assert_array_equal(scores.energy_score(logits, t), plain(logits, t))
    np.testing.assert_array_equal(scores.msp_score(logits, t), plain_msp(logits, t))


@pytest.mark.parametrize("bad,error,message", [
    (0.0, ValueError, "temperature must lie in (0.0, inf), got 0.0"),
    (-1.0, ValueError, "temperature must lie in (0.0, inf), got -1.0"),
    (float("nan"), ValueError, "temperature must lie in (0.0, inf), got nan"),
    (1e-40, ValueError, "temperature = 1e-40 underflows float32, in which it is computed: it "
                        "must be in [1.1754944e-38, 3.4028235e+38]"),
    (1e39, ValueError, "temperature = 1e+39 overflows float32"),
    ("1.0", TypeError, "temperature must be a number, got '1.0'"),
    (True, TypeError, "temperature must be a number, got True"),
    ([1.0, 2.0], TypeError, "temperature must be a number, got [1.0, 2.0]"),
])
def test_bad_temperatures_are_refused_naming_the_value(bad, error, message):
  for fn in (scores.energy_score, scores.free_energy, scores.msp_score):
    with pytest.raises(error, match=re.escape(message)):
      fn(EXTREME, bad)
  with pytest.raises(TypeError, match=re.escape("epsilon must be a number, got 'x'")):
    scores.odin_score(_apply, _tiny()[1], np.zeros((1, 32, 32, 3), np.float32), epsilon="x")


def test_the_scores_and_the_detectors_check_hyper_parameters_alike():
  # One check each for the temperature and the noise: the scores' arguments and the detectors'
  # fields are refused in the same words (the detector's name first).
  for name, field, bad in (("energy", "temperature", -1.0), ("odin", "temperature", 1e39),
                           ("odin", "epsilon", -0.5), ("mahalanobis", "epsilon", 1e39)):
    with pytest.raises(ValueError) as by_detector:
      detectors.create(name, **{field: bad})
    check = scores.check_temperature if field == "temperature" else scores.check_epsilon
    with pytest.raises(ValueError) as by_score:
      check(bad)
    assert str(by_detector.value) == f"detector {name!r}: {by_score.value}"


def test_the_public_scores_keep_their_documented_paths():
  from energy_jax.ood import scores as documented
  for name in ("energy_score", "free_energy", "msp_score", "max_logit_score", "odin_score",
               "mahalanobis_score"):
    assert getattr(documented, name) is getattr(scores, name) is getattr(energy_jax, name)
  assert documented.fit_mahalanobis is gaussians.fit_mahalanobis


def test_half_precision_host_arrays_reach_xla_as_float32():
  # XLA:CPU's float16 convert needs F16C (absent on some x86 CPUs; `--xla_cpu_max_isa=SSE4_2`
  # stands in for one): host float16 arrays are widened, exactly, before the jitted call.
  h = np.array([[1.5, -2.25], [65504.0, 6e-8]], np.float16)
  for x in (h, jnp.asarray(h)):
    w = arrays.widen_host_half(x)
    assert isinstance(w, np.ndarray) and w.dtype == np.float32
    np.testing.assert_array_equal(w, h.astype(np.float32))
  for other in (h.astype(np.float32), jnp.asarray(h, jnp.bfloat16)):
    assert arrays.widen_host_half(other) is other


# ----- hyper-parameters traced by the caller's own jit; complex and masked inputs ----------------

def _linear_logits(w, x):       # module level: the jitted scores take it as a static argument
  return x.reshape(x.shape[0], -1) @ w


_LINEAR_W = np.random.default_rng(9).normal(size=(2 * 2 * 3, 4)).astype(np.float32)
_LINEAR_X = np.random.default_rng(10).normal(size=(5, 2, 2, 3)).astype(np.float32)


def test_an_invalid_hyper_parameter_traced_by_a_users_jit_gives_nan():
  # A traced value cannot raise: every score of an invalid one is NaN, never a plausible number;
  # a valid one gives the score of the same value passed as a number. One compile per function:
  # the values are mapped over inside the caller's jit.
  bad_t = [-1.0, 0.0, float("nan"), float("inf"), 1e-39]        # 1e-39: subnormal, flushed to 0
  good_t = [0.5, 2.0, 2e-38]
  ts = jnp.asarray(bad_t + good_t, jnp.float32)
  for fn in (scores.energy_score, scores.free_energy, scores.msp_score):
    got = np.asarray(jax.jit(lambda l, ts: jax.vmap(lambda t: fn(l, t))(ts))(EXTREME, ts))
    assert np.all(np.isnan(got[:len(bad_t)])), (fn, got)
    for row, t in zip(got[len(bad_t):], good_t):
      # measured 0 here
      np.testing.assert_allclose(row, fn(EXTREME, float(np.float32(t))), rtol=1e-6)
  eps = jnp.asarray([-0.001, float("nan"), float("inf"), 0.002], jnp.float32)
  odin = jax.jit(jax.vmap(lambda t, e: scores.odin_score(_linear_logits, _LINEAR_W, _LINEAR_X,
                                                         temperature=t, epsilon=e)))
  got = np.asarray(odin(jnp.asarray([-1.0, 10.0, 10.0, 10.0, 10.0]),
                        jnp.concatenate([jnp.asarray([0.002]), eps])))
  assert np.all(np.isnan(got[:4])), got
  np.testing.assert_allclose(got[4], scores.odin_score(_linear_logits, _LINEAR_W, _LINEAR_X,
                                                       temperature=10.0, epsilon=0.002),
                             rtol=1e-6)                                       # measured 0 here
  params = gaussians.MahalanobisParams(jnp.zeros((2, 4)), jnp.eye(4))
  maha = jax.jit(jax.vmap(lambda e: scores.mahalanobis_score(_linear_logits, _LINEAR_W, _LINEAR_X,
                                                             params, epsilon=e)))
  got = np.asarray(maha(eps))
  assert np.all(np.isnan(got[:3])), got
  np.testing.assert_allclose(got[3], scores.mahalanobis_score(
      _linear_logits, _LINEAR_W, _LINEAR_X, params, epsilon=0.002), rtol=1e-6)  # measured 0 here


def test_an_epsilon_that_float32_cannot_hold_is_refused():
  message = ("epsilon = 1e+39 overflows float32, in which it is computed: it must be 0 or in "
             "[1.1754944e-38, 3.4028235e+38]")
  params = gaussians.MahalanobisParams(jnp.zeros((2, 4)), jnp.eye(4))
  for call in (lambda: scores.odin_score(_linear_logits, _LINEAR_W, _LINEAR_X, epsilon=1e39),
               lambda: scores.mahalanobis_score(_linear_logits, _LINEAR_W, _LINEAR_X, params,
                                                epsilon=1e39)):
    with pytest.raises(ValueError) as e:
      call()
    assert str(e.value) == message


def test_complex_and_masked_scores_inputs_are_refused():
  masked = ("logits is a masked array, whose mask would be ignored (every value, masked or not, "
            "would count): pass a plain array of the values to use")
  cases = [
      (lambda fn: fn(EXTREME + 1j), "logits must be real, got dtype complex64: its imaginary "
                                    "part would be dropped"),
      (lambda fn: fn([[1.0, 2j]]), "logits must be real, got dtype complex128: its imaginary "
                                   "part would be dropped"),
      (lambda fn: fn(np.ma.masked_array(EXTREME, EXTREME > 100)), masked),
  ]
  for fn in (scores.energy_score, scores.free_energy, scores.msp_score, scores.max_logit_score):
    for call, message in cases:
      with pytest.raises(TypeError) as e:
        call(fn)
      assert str(e.value) == message
  with pytest.raises(TypeError) as e:
    scores.odin_score(_linear_logits, _LINEAR_W, _LINEAR_X.astype(np.complex64))
  assert str(e.value) == "images must be real, got dtype complex64: its imaginary part would be " \
                         "dropped"
  with pytest.raises(TypeError) as e:
    gaussians.fit_mahalanobis(np.ma.masked_array(np.ones((4, 2))), np.zeros(4, int), 1)
  assert str(e.value).startswith("features is a masked array, whose mask would be ignored")
