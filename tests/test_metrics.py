import re

import numpy as np
import pytest
from sklearn import metrics as skm

import os

from energy_jax.ood import metrics
from energy_jax.ood.metrics import (InvertedEnergiesWarning, auroc, average_precision, fpr_at_tpr,
                                    ood_metrics, suggest_margins, threshold_at_tpr)

ENERGIES = os.path.join(os.path.dirname(__file__), "data", "toy_pretrained_energies.npz")


def _sk(scores_in, scores_out):
  y = np.r_[np.ones(len(scores_in)), np.zeros(len(scores_out))]
  s = np.r_[scores_in, scores_out]
  return skm.roc_auc_score(y, s), skm.average_precision_score(y, s)


@pytest.mark.parametrize("seed,n_in,n_out,rounding", [(0, 500, 300, None), (1, 50, 80, 1),
                                                      (2, 7, 3, 0)])
def test_auroc_and_aupr_agree_with_sklearn(seed, n_in, n_out, rounding):
  rng = np.random.default_rng(seed)
  s_in, s_out = rng.normal(1, 1, n_in), rng.normal(0, 1, n_out)
  if rounding is not None:   # many ties
    s_in, s_out = np.round(s_in, rounding), np.round(s_out, rounding)
  want_auroc, want_aupr = _sk(s_in, s_out)
  m = ood_metrics(s_in, s_out)
  assert m["auroc"] == pytest.approx(want_auroc, abs=1e-12)
  assert m["aupr_in"] == pytest.approx(want_aupr, abs=1e-12)
  _, want_out = _sk(-s_out, -s_in)
  assert m["aupr_out"] == pytest.approx(want_out, abs=1e-12)


def test_fpr_hand_computed():
  # 20 ID scores 1..20, OOD scores 0.5, 10.5, 19.5. TPR 0.95 = threshold 2 (19 of 20 ID);
  # the OOD above 2 are 10.5 and 19.5 -> FPR 2/3.
  s_in = np.arange(1, 21, dtype=float)
  s_out = np.array([0.5, 10.5, 19.5])
  assert fpr_at_tpr(s_in, s_out) == pytest.approx(2 / 3)
  assert fpr_at_tpr(s_in, s_out, method="conservative") == pytest.approx(2 / 3)


def test_fpr_closest_versus_conservative():
  # 10 ID scores: TPR moves in steps of 0.1; TPR 0.9 (|0.05|) ties TPR 1.0 (|0.05|):
  # the reference takes the higher TPR on a tie (the point reached first from full recall).
  s_in = np.arange(10, dtype=float)
  s_out = np.array([-1.0, 0.5, 5.5])
  assert fpr_at_tpr(s_in, s_out) == pytest.approx(2 / 3)          # threshold 0: OOD 0.5, 5.5
  assert fpr_at_tpr(s_in, s_out, method="conservative") == pytest.approx(2 / 3)
  # 8 ID: TPR 0.875 (|0.075|) or 1.0 (|0.05|) -> closest is 1.0; conservative is 1.0 too.
  # 30 ID: TPR 28/30=0.933 (|0.0167|) beats 29/30=0.967 (|0.0167|)? tie -> higher, 0.967.
  s_in = np.arange(30, dtype=float)
  s_out = np.array([0.5, 1.5, 2.5])
  assert fpr_at_tpr(s_in, s_out) == pytest.approx(2 / 3)          # threshold 1: 1.5, 2.5
  # 40 ID: TPR 38/40 = 0.95 at thresholds 2 (1 OOD above) and 1.5 (2 OOD above). The
  # reference scans from full recall down and keeps the first minimum: threshold 1.5.
  # The conservative rule takes the first threshold reaching 0.95: threshold 2.
  s_in = np.arange(40, dtype=float)
  assert fpr_at_tpr(s_in, s_out) == pytest.approx(2 / 3)
  assert fpr_at_tpr(s_in, s_out, method="conservative") == pytest.approx(1 / 3)
  # 15 ID: 14/15=0.933 (|0.0167|) is closer than 15/15 (|0.05|): closest takes 0.933,
  # conservative must reach >= 0.95 and takes 1.0.
  s_in = np.arange(15, dtype=float)
  s_out = np.array([0.0, -1.0, 20.0])      # the OOD 0.0 ties the lowest ID score
  assert fpr_at_tpr(s_in, s_out) == pytest.approx(1 / 3)                        # threshold 1
  assert fpr_at_tpr(s_in, s_out, method="conservative") == pytest.approx(2 / 3)  # threshold 0


def test_ties_all_equal_perfect_and_tiny():
  m = ood_metrics(np.zeros(5), np.zeros(4))
  assert m["auroc"] == 0.5 and m["fpr"] == 1.0 and m["detection_error"] == 0.5
  assert m["aupr_in"] == pytest.approx(5 / 9)
  m = ood_metrics([2.0, 3.0], [0.0, 1.0])
  assert (m["auroc"], m["fpr"], m["aupr_in"], m["aupr_out"], m["detection_error"]) == (
      1.0, 0.0, 1.0, 1.0, 0.0)
  m = ood_metrics([0.0], [1.0])
  assert m["auroc"] == 0.0 and m["fpr"] == 1.0


def test_reversed_convention_matches_reference_pairing():
  """The reference calls get_measures(-in_energy, -out_energy): ID positive, -E as score."""
  rng = np.random.default_rng(3)
  e_in, e_out = rng.normal(-10, 2, 100), rng.normal(-6, 2, 60)
  want_auroc, _ = _sk(-e_in, -e_out)
  assert auroc(-e_in, -e_out) == pytest.approx(want_auroc)
  assert average_precision(-e_in, -e_out) == pytest.approx(_sk(-e_in, -e_out)[1])


def test_metric_input_errors():
  with pytest.raises(ValueError, match="scores_out is empty"):
    ood_metrics([1.0], [])
  with pytest.raises(ValueError, match="scores_in holds 1 non-finite.*index 1"):
    ood_metrics([1.0, np.nan], [0.0])
  with pytest.raises(ValueError, match="one-dimensional"):
    ood_metrics(np.ones((2, 2)), [0.0])
  with pytest.raises(ValueError, match="unknown FPR method"):
    ood_metrics([1.0], [0.0], fpr_method="best")
  for level in (0.0, 1.5, "0.95", None, True):
    with pytest.raises(ValueError, match=re.escape(f"tpr_level must lie in (0, 1], got {level!r}")):
      ood_metrics([1.0], [0.0], recall_level=level)
    with pytest.raises(ValueError, match=re.escape(f"tpr must lie in (0, 1], got {level!r}")):
      threshold_at_tpr([1.0, 2.0], level)
  with pytest.raises(ValueError,
                     match=re.escape("quantiles must lie in [0, 1] (two of them), got 0.05")):
    suggest_margins([-3.0, -2.0], [0.0, 1.0], quantiles=0.05)


def _openood_fpr95(scores_in, scores_out):
  """OpenOOD v1.5's FPR95, written from its description: OOD is the positive class, the score is
  negated, and the FPR is read at the first ROC point whose TPR reaches 0.95."""
  is_ood = np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))]
  fpr, tpr, _ = skm.roc_curve(is_ood, -np.r_[scores_in, scores_out])
  return fpr[np.argmax(tpr >= 0.95)]


@pytest.mark.parametrize("seed,n_in,n_out,rounding", [(0, 500, 300, None), (1, 50, 80, 1),
                                                      (2, 7, 40, 0), (3, 1000, 20, 2)])
def test_ood_positive_fpr_is_openoods(seed, n_in, n_out, rounding):
  rng = np.random.default_rng(seed)
  s_in, s_out = rng.normal(1, 1, n_in), rng.normal(0, 1.5, n_out)
  if rounding is not None:
    s_in, s_out = np.round(s_in, rounding), np.round(s_out, rounding)
  m = ood_metrics(s_in, s_out, ood_positive=True)
  assert m["fpr"] == pytest.approx(_openood_fpr95(s_in, s_out), abs=1e-12)
  ref = ood_metrics(s_in, s_out)
  for key in ("auroc", "aupr_in", "aupr_out", "detection_error"):    # the FPR alone differs
    assert m[key] == ref[key]


def test_the_two_fpr95_conventions_differ_on_this_example():
  # The example of docs/detectors.md. ID scores 1..100, OOD scores 0.5, 1.5, ..., 19.5 (20).
  # ID positive: keep 95% of ID (ID 6 ... 100). The reference's rule takes the lowest threshold
  # with that TPR, just above ID 5: OOD 5.5 ... 19.5 pass -> 15 / 20 = 0.75.
  # OOD positive: catch 95% of OOD (19 of 20, threshold below 18.5): ID 1 ... 18 are flagged
  # too -> 18 / 100 = 0.18.
  s_in = np.arange(1, 101, dtype=float)
  s_out = np.arange(20) + 0.5
  assert ood_metrics(s_in, s_out)["fpr"] == pytest.approx(0.75)
  assert ood_metrics(s_in, s_out, ood_positive=True)["fpr"] == pytest.approx(0.18)
  assert _openood_fpr95(s_in, s_out) == pytest.approx(0.18)


def test_threshold_at_tpr_keeps_the_asked_share_of_held_out_id():
  s = np.arange(1, 21, dtype=float)                  # 20 held-out ID scores
  assert threshold_at_tpr(s, 0.95) == 2.0            # 19 of 20 at or above 2
  assert threshold_at_tpr(s, 0.9) == 3.0
  assert threshold_at_tpr(s, 1.0) == 1.0
  assert threshold_at_tpr(s, 0.01) == 20.0
  rng = np.random.default_rng(0)
  for tpr in (0.5, 0.95, 0.99):
    s = np.round(rng.normal(size=997), 1)            # ties
    t = threshold_at_tpr(s, tpr)
    assert np.mean(s >= t) >= tpr and np.mean(s >= np.min(s[s > t])) < tpr
  with pytest.raises(ValueError, match=r"tpr must lie in \(0, 1\]"):
    threshold_at_tpr(s, 0.0)
  with pytest.raises(ValueError, match="scores_in holds 1 non-finite"):
    threshold_at_tpr([1.0, np.inf], 0.95)


def test_suggest_margins_on_stored_energies_of_a_pretrained_model():
  """Free energies of the toy WRN-10-1 that ``python benchmarks/detectors.py --small
  --save-energies`` pretrains: its 512 training images and 512 toy outliers."""
  stored = np.load(ENERGIES)
  e_in, e_out = stored["id_train"].astype(np.float64), stored["outliers"].astype(np.float64)
  # The stated rule: the 5% quantile of the ID energies, the 95% quantile of the outliers'.
  want = (np.quantile(e_in, 0.05), np.quantile(e_out, 0.95))
  assert suggest_margins(e_in, e_out) == pytest.approx(want, abs=1e-12)
  assert suggest_margins(e_in, e_out) == pytest.approx((-7.908, -1.379), abs=1e-3)
  # The demo preset chose m_in -8, m_out -2 by hand for such a model; the rule lands beside it,
  # below 95% of the ID energies and above 95% of the outliers'.
  m_in, m_out = suggest_margins(e_in, e_out)
  assert np.mean(e_in <= m_in) == pytest.approx(0.05, abs=0.01)
  assert np.mean(e_out >= m_out) == pytest.approx(0.05, abs=0.01)
  assert suggest_margins(e_in, e_out, quantiles=(0.5, 0.5)) == pytest.approx(
      (np.median(e_in), np.median(e_out)), abs=1e-12)
  with pytest.raises(ValueError, match=r"quantiles must lie in \[0, 1\]"):
    suggest_margins(e_in, e_out, quantiles=(5, 95))
  with pytest.raises(ValueError, match=r"is not below m_out .* choose quantiles\[0\] lower"):
    suggest_margins(e_in, e_out, quantiles=(0.99, 0.01))


def test_suggest_margins_when_outliers_look_more_in_distribution_than_the_id_data():
  """A pretrained model that gives the outliers lower energies than the ID images (the demo's:
  median -17.3 against -9.4): both margins come from the ID energies, with a warning."""
  rng = np.random.default_rng(0)
  e_in = rng.normal(-9.4, 1.5, 2000)
  e_out = rng.normal(-17.3, 2.0, 3000)
  with pytest.warns(InvertedEnergiesWarning) as caught:
    m_in, m_out = suggest_margins(e_in, e_out)
  assert (m_in, m_out) == pytest.approx((np.quantile(e_in, 0.05), np.quantile(e_in, 0.95)),
                                        abs=1e-12)
  assert m_in < m_out
  # Both bounds bite: 95% of the ID energies lie above m_in, (nearly) every outlier below m_out.
  assert np.mean(e_in > m_in) == pytest.approx(0.95, abs=0.01) and np.mean(e_out < m_out) > 0.99
  message = str(caught[0].message)
  assert re.search(r"the outliers' energies \(median -17\.\d\d\) do not lie above the ID energies "
                   r"\(median -9\.\d\d\): the model scores the outliers as more in-distribution "
                   r"than the ID data", message), message
  assert (f"chosen from the ID energies alone: m_in {m_in:.2f} = their 5% quantile, m_out "
          f"{m_out:.2f} = their 95% quantile") in message
  # Other quantiles, of the ID energies too; the stored toy energies swapped are such a case.
  with pytest.warns(InvertedEnergiesWarning, match="their 10% quantile, m_out .* their 90%"):
    assert suggest_margins(e_in, e_out, quantiles=(0.1, 0.9)) == pytest.approx(
        (np.quantile(e_in, 0.1), np.quantile(e_in, 0.9)), abs=1e-12)
  stored = np.load(ENERGIES)
  toy_out = stored["outliers"].astype(np.float64)
  with pytest.warns(InvertedEnergiesWarning, match=r"median -3.99\) do not lie above the ID "
                                                   r"energies \(median -1.52\)"):
    assert suggest_margins(toy_out, stored["id_train"]) == pytest.approx(
        (np.quantile(toy_out, 0.05), np.quantile(toy_out, 0.95)), abs=1e-12)
  # ID energies that are all equal leave no room between the margins.
  with pytest.raises(ValueError, match="is not below m_out"):
    suggest_margins(np.full(10, -5.0), e_out)


def _sk_all(s_in, s_out):
  """sklearn's AUROC, AUPR-In and AUPR-Out of exactly representable scores."""
  s_in, s_out = np.asarray(s_in, np.float64), np.asarray(s_out, np.float64)
  return _sk(s_in, s_out) + (_sk(-s_out, -s_in)[1],)


@pytest.mark.parametrize("shift,dtype", [(2 ** 62, np.int64), (-(2 ** 63), np.int64),
                                         (2 ** 63 + 2 ** 62, np.uint64), (0, np.int8)])
def test_integer_scores_of_any_size_are_exact(shift, dtype):
  rng = np.random.default_rng(7)
  small_in, small_out = rng.integers(0, 40, 300), rng.integers(15, 60, 200)     # many ties
  s_in = (small_in.astype(object) + shift).astype(dtype)
  s_out = (small_out.astype(object) + shift).astype(dtype)
  if shift:      # float64 would merge neighbours here: the test is only meaningful if it does
    assert len(np.unique(s_in.astype(np.float64))) < len(np.unique(s_in))
  got = ood_metrics(s_in, s_out)
  want_auroc, want_in, want_out = _sk_all(small_in, small_out)
  assert got["auroc"] == pytest.approx(want_auroc, abs=1e-12)
  assert got["aupr_in"] == pytest.approx(want_in, abs=1e-12)
  assert got["aupr_out"] == pytest.approx(want_out, abs=1e-12)
  assert got == ood_metrics(small_in.astype(np.float64), small_out.astype(np.float64))
  assert ood_metrics(s_in, s_out, ood_positive=True) == ood_metrics(
      small_in.astype(np.float64), small_out.astype(np.float64), ood_positive=True)
  t = threshold_at_tpr(s_in, 0.95)
  assert isinstance(t, int) and t == int(np.sort(small_in)[::-1][284]) + shift   # 285th of 300


def test_mixed_integer_kinds_and_integers_beside_floats():
  rng = np.random.default_rng(8)
  a, b = rng.integers(0, 30, 50), rng.integers(10, 40, 70)
  want = ood_metrics(a.astype(np.float64), b.astype(np.float64))
  # int64 beside uint64 (numpy's common type would be float64): compared as integers.
  assert ood_metrics((a + 2 ** 62).astype(np.int64), (b + 2 ** 62).astype(np.uint64)) == want
  # Small integers beside floats are exact in float64.
  assert ood_metrics(a.astype(np.int32), b.astype(np.float32)) == want
  with pytest.raises(TypeError, match=r"integer scores beyond 2\*\*53 \(here up to "
                                      r"46116860184273879\d\d\) cannot be compared exactly with "
                                      "float scores"):
    ood_metrics(a + 2 ** 62, b.astype(np.float64))


def test_bfloat16_float16_and_jax_scores():
  import jax.numpy as jnp
  import ml_dtypes
  rng = np.random.default_rng(9)
  s_in, s_out = rng.normal(1, 1, 400), rng.normal(0, 1, 300)
  for to in (lambda x: x.astype(ml_dtypes.bfloat16), lambda x: x.astype(np.float16),
             lambda x: jnp.asarray(x, jnp.bfloat16), lambda x: jnp.asarray(x, jnp.float32)):
    a, b = to(s_in), to(s_out)
    exact = np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64)   # the values held
    got = ood_metrics(a, b)
    assert got == ood_metrics(*exact)
    want_auroc, want_in, want_out = _sk_all(*exact)
    assert got["auroc"] == pytest.approx(want_auroc, abs=1e-12)
    assert got["aupr_in"] == pytest.approx(want_in, abs=1e-12)
    assert got["aupr_out"] == pytest.approx(want_out, abs=1e-12)
  with pytest.raises(TypeError, match="scores_in must be numeric, got dtype bool"):
    ood_metrics(np.ones(3, bool), [0.0])
  with pytest.raises(ValueError, match="scores_out holds 1 non-finite"):
    ood_metrics(np.ones(3, ml_dtypes.bfloat16), np.array([0.0, np.inf], ml_dtypes.bfloat16))


def test_complex_and_masked_scores_are_refused():
  rng = np.random.default_rng(0)
  s_in, s_out = rng.normal(1, 1, 50), rng.normal(0, 1, 40)
  complex_in = s_in + 1j * rng.normal(size=50)
  masked_in = np.ma.masked_array(s_in, s_in > 2)
  real = "scores_in must be real, got dtype complex128: its imaginary part would be dropped"
  mask = ("scores_in is a masked array, whose mask would be ignored (every value, masked or not, "
          "would count): pass a plain array of the values to use")
  for fn in (metrics.ood_metrics, metrics.auroc, metrics.fpr_at_tpr, metrics.detection_error):
    for bad, message in ((complex_in, real), (masked_in, mask), (list(complex_in), real)):
      with pytest.raises(TypeError) as e:
        fn(bad, s_out)
      assert str(e.value) == message
  with pytest.raises(TypeError) as e:
    metrics.threshold_at_tpr(masked_in)
  assert str(e.value) == mask
  with pytest.raises(TypeError) as e:
    metrics.suggest_margins(-s_in, (-s_out).astype(np.complex64))
  assert str(e.value) == ("energies_out must be real, got dtype complex64: its imaginary part "
                          "would be dropped")
  # The unmasked values, passed as a plain array, are what a masked array meant.
  kept = masked_in.compressed()
  assert metrics.auroc(kept, s_out) == metrics.auroc(s_in[s_in <= 2], s_out)
