"""A model, a fitted detector and its threshold saved as one Orbax artifact and loaded by one call
into ``is_ood(images)``, which must flag exactly what the detector's scores and the threshold say."""

import jax
import numpy as np
import pytest

from energy_jax import config as config_lib, detectors, export, models
from energy_jax.data import augment
from energy_jax.ood import metrics


@pytest.fixture(scope="module")
def tiny():
  config = config_lib.get_config("test", "pretrain")
  config.num_classes = 3
  model = models.from_config(config)
  variables = models.init_variables(model, jax.random.PRNGKey(3))
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
  held_out = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
  query = np.concatenate([rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
                          rng.integers(0, 40, (6, 32, 32, 3), dtype=np.uint8)])
  out = lambda x: model.apply(variables, augment.normalize(x), train=False)
  train_out = out(train)
  labels = np.asarray(train_out.logits).argmax(1)
  labels[:3] = np.arange(3)
  fit_inputs = dict(train_logits=np.asarray(train_out.logits),
                    train_features=np.asarray(train_out.features),
                    train_blocks=tuple(np.asarray(b) for b in train_out.blocks),
                    train_labels=labels.astype(np.int32),
                    head=models.head(config, variables["params"]),
                    model=(models.inference_fn(model), variables))
  return dict(config=config, model=model, variables=variables, held_out=held_out, query=query,
              out=out, fit_inputs=fit_inputs)


def _score(det, params, t, images):
  """The detector called directly on the model's outputs."""
  o = t["out"](images)
  return np.asarray(det.score(params, logits=o.logits, features=o.features, blocks=o.blocks,
                              images=augment.normalize(images),
                              model=(models.inference_fn(t["model"]), t["variables"])))


# The exported scores (model and detector in one jitted program) against the detector called on
# the model's outputs (other programs): equal up to float32 rounding, which KNN's sqrt(2 - 2 cos)
# near cos = 1 and relative Mahalanobis' pseudo-inverse of a singular covariance (48 examples, 64
# dims) amplify. Tolerance: max |got - want| over max |want|. Measured 2026-12-06 (native AVX2 /
# AVX / SSE4_2): energy 1.0e-7, knn 1.5e-6, relative_mahalanobis 8.9e-6, odin 8.8e-8; the
# tolerances are about 100x those.
SCORE_TOL = {"energy": 1e-5, "knn": 1e-4, "relative_mahalanobis": 1e-3, "odin": 1e-5}


@pytest.mark.parametrize("name,hparams", [("energy", {}), ("knn", {"k": 4}),
                                          ("relative_mahalanobis", {}),
                                          ("odin", {"temperature": 10.0, "epsilon": 0.002})])
def test_exported_detector_flags_what_its_scores_and_threshold_say(tiny, tmp_path, name, hparams):
  det = detectors.create(name, **hparams)
  params = det.fit(**tiny["fit_inputs"])
  threshold = metrics.threshold_at_tpr(_score(det, params, tiny, tiny["held_out"]), 0.95)
  path = export.save(str(tmp_path / "artifact"), config=tiny["config"],
                     variables=tiny["variables"], detector=det, params=params,
                     threshold=threshold)
  is_ood = export.load(path)
  want = _score(det, params, tiny, tiny["query"])
  got = np.asarray(is_ood.scores(tiny["query"]))
  tol = SCORE_TOL[name] * np.max(np.abs(want))
  np.testing.assert_allclose(got, want, rtol=0, atol=tol)
  # Bit for bit: is_ood runs the compiled program of is_ood.scores, then the float32 comparison.
  np.testing.assert_array_equal(np.asarray(is_ood(tiny["query"])), got < threshold)
  # The flags of the two programs agree except within the score tolerance of the threshold.
  near = np.abs(want - threshold) <= tol
  np.testing.assert_array_equal((got < threshold)[~near], (want < threshold)[~near])
  assert is_ood.artifact.detector == det and is_ood.artifact.threshold == threshold
  # On the held-out ID set itself, 95% are accepted (up to the score tolerance at the threshold).
  held_out = np.asarray(is_ood.scores(tiny["held_out"]))
  assert np.mean(held_out >= threshold - SCORE_TOL[name] * np.max(np.abs(held_out))) >= 0.95


def test_export_refuses_what_it_could_not_load(tiny, tmp_path):
  det = detectors.create("react")
  common = dict(config=tiny["config"], variables=tiny["variables"], threshold=1.0)
  with pytest.raises(ValueError, match="needs fitted params"):
    export.save(str(tmp_path / "a"), detector=det, params={}, **common)
  with pytest.raises(ValueError, match="threshold must be finite"):
    export.save(str(tmp_path / "a"), detector=detectors.create("msp"), params={},
                **dict(common, threshold=float("nan")))
  path = export.save(str(tmp_path / "a"), detector=detectors.create("msp"), params={}, **common)
  with pytest.raises(FileExistsError, match="exists"):
    export.save(path, detector=detectors.create("msp"), params={}, **common)
  is_ood = export.load(path)
  with pytest.raises(ValueError, match=r"uint8 images \[N, 32, 32, 3\], got float32"):
    is_ood(tiny["query"].astype(np.float32))
  with pytest.raises(FileNotFoundError, match="no OOD-detector artifact"):
    export.load(str(tmp_path / "missing"))
