"""A model, a fitted detector and its threshold saved as one Orbax artifact and loaded by one call
into ``is_ood(images)``, which must flag exactly what the detector's scores and the threshold say."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from etils import epath

from energy_jax import checkpoints, config as config_lib, detectors, export, models, storage
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


# Faults in an artifact: each is refused at save, or at load with a ValueError that says "is
# damaged" (or "is not an OOD-detector artifact"), names the folder and the part, and carries no
# traceback from Orbax or json (raised "from None").

@pytest.fixture(scope="module")
def sealed(tiny, tmp_path_factory):
  """An exported energy detector whose scores on the query images straddle its threshold."""
  det = detectors.create("energy")
  threshold = float(np.median(_score(det, {}, tiny, tiny["query"])))
  return export.save(str(tmp_path_factory.mktemp("sealed") / "artifact"), config=tiny["config"],
                     variables=tiny["variables"], detector=det, params={}, threshold=threshold)


def _copy(sealed, tmp_path) -> str:
  path = str(tmp_path / "artifact")
  shutil.copytree(sealed, path)
  return path


def _edit_meta(path: str, edit) -> None:
  meta_file = os.path.join(path, "meta", "metadata")
  with open(meta_file) as f:
    meta = json.load(f)
  edit(meta)
  with open(meta_file, "w") as f:
    json.dump(meta, f)


def _reseal(path: str) -> None:
  """A new integrity record of the files as they are: the artifact then passes the record check,
  so the checks behind it are reached."""
  os.remove(os.path.join(path, export.RECORD))
  storage.write_text(os.path.join(path, export.RECORD),
                     json.dumps(checkpoints.integrity_record(path)))


def _refused(path: str, *fragments: str) -> str:
  with pytest.raises(ValueError) as raised:
    export.load(path)
  message = str(raised.value)
  assert type(raised.value) is ValueError and raised.value.__cause__ is None, message
  assert raised.value.__suppress_context__ or raised.value.__context__ is None, message
  for fragment in (path, *fragments):
    assert fragment in message, message
  assert len(message.splitlines()) <= 3, message
  return message


def test_the_sealed_artifact_round_trips(sealed, tiny):
  flags = np.asarray(export.load(sealed)(tiny["query"]))
  assert 0 < flags.sum() < len(flags)
  assert os.path.isfile(os.path.join(sealed, export.RECORD))


def test_non_finite_weights_or_params_are_not_saved_nor_loaded(tiny, tmp_path):
  head = models.get(tiny["config"].model.name).head
  params = jax.tree_util.tree_map(np.array, tiny["variables"]["params"])
  params[head]["kernel"][0, 0] = np.nan
  nan_variables = dict(tiny["variables"], params=params)
  common = dict(config=tiny["config"], threshold=1.0)
  with pytest.raises(FloatingPointError, match=(
      f"the model to export holds 1 non-finite value.*the first params/{head}/kernel; "
      "it is not saved")):
    export.save(str(tmp_path / "a"), variables=nan_variables, detector=detectors.create("msp"),
                params={}, **common)
  with pytest.raises(FloatingPointError, match="the fitted detector 'knn.*holds 2 non-finite"):
    export.save(str(tmp_path / "a"), variables=tiny["variables"], params={
        "bank": np.array([[np.inf, 0.0], [0.0, np.nan]], np.float32)},
                detector=detectors.create("knn", k=1), **common)
  assert not (tmp_path / "a").exists()
  # Written by export's own writer past save's checks: refused at load.
  meta = {"format": export.ARTIFACT_FORMAT, "version": "x", "config": tiny["config"].to_dict(),
          "detector": {"name": "msp", "hparams": {}}, "threshold": 1.0,
          "empty_variables": []}
  export._write(epath.Path(tmp_path / "b"), {"variables": nan_variables}, meta)
  _refused(str(tmp_path / "b"), "is damaged: the model in its arrays holds 1 non-finite value",
           f"the first params/{head}/kernel; it is not loaded")


def test_a_nan_threshold_in_the_meta_is_refused(sealed, tmp_path):
  path = _copy(sealed, tmp_path)
  _edit_meta(path, lambda meta: meta.update(threshold=float("nan")))
  _refused(path, "is damaged: in its meta (config, detector, threshold), meta/metadata changed "
           "since the export (by its integrity record sha256.json)")
  _reseal(path)
  _refused(path, "is damaged: its meta's threshold is nan, not a finite number")


def test_a_flipped_byte_in_an_array_file_is_named(sealed, tmp_path):
  path = _copy(sealed, tmp_path)
  files = storage.files_below(os.path.join(path, "arrays"))
  name = max(files, key=lambda n: os.path.getsize(files[n]))
  blob = bytearray(open(files[name], "rb").read())
  blob[len(blob) // 2] ^= 0x01
  open(files[name], "wb").write(bytes(blob))
  _refused(path, "is damaged: in its arrays (the model's variables, the detector's params), "
           f"arrays/{name} changed since the export (by its integrity record sha256.json)",
           "export the detector again")


def test_a_truncated_or_missing_file_is_named(sealed, tmp_path):
  path = _copy(sealed, tmp_path)
  victim = os.path.join(path, "arrays", "_METADATA")
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  os.remove(os.path.join(path, "_CHECKPOINT_METADATA"))
  _refused(path, "is damaged: in its Orbax checkpoint records and its arrays (the model's "
           "variables, the detector's params), _CHECKPOINT_METADATA missing, arrays/_METADATA "
           "changed since the export")


def test_a_half_written_meta_is_refused(sealed, tmp_path):
  path = _copy(sealed, tmp_path)
  victim = os.path.join(path, "meta", "metadata")
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  _refused(path, "is damaged: in its meta (config, detector, threshold), meta/metadata changed "
           "since the export")
  _reseal(path)             # a writer that sealed a half-written meta
  _refused(path, "is damaged: Orbax cannot read its meta (config, detector, threshold) (")


def test_an_edited_class_count_is_refused(sealed, tiny, tmp_path):
  path = _copy(sealed, tmp_path)
  _edit_meta(path, lambda meta: meta["config"].update(num_classes=5))
  _refused(path, "is damaged: in its meta (config, detector, threshold), meta/metadata changed")
  _reseal(path)
  head = models.get(tiny["config"].model.name).head
  _refused(path, "is damaged: its arrays do not fit the model of its meta's config "
           "(config.num_classes is 5 but the classifier head has 3 outputs; 2 tensor(s) differ, "
           f"the first params/{head}/bias: saved (3,) vs (5,) from the config)")
  # Nor is such an artifact written.
  config = tiny["config"].copy_and_resolve_references()
  config.num_classes = 5
  with pytest.raises(ValueError, match=r"the variables do not fit the model of the config "
                     r"\(config.num_classes is 5 but the classifier head has 3 outputs"):
    export.save(str(tmp_path / "b"), config=config, variables=tiny["variables"],
                detector=detectors.create("msp"), params={}, threshold=1.0)


def test_a_training_run_is_not_an_artifact(tmp_path):
  with checkpoints.RunCheckpoints(tmp_path / "run", log=lambda m: None) as ckpts:
    ckpts.save(4, {"w": np.zeros(3, np.float32)}, {"epoch": 0})
  _refused(str(tmp_path / "run"), "is not an OOD-detector artifact (it holds a training run",
           "it has neither sha256.json nor arrays/, only ['checkpoints', 'checkpoints.sha256']")
  _refused(str(tmp_path / "run" / "checkpoints" / "4"),
           "is not an OOD-detector artifact (it is a training checkpoint)")
  _refused(str(tmp_path / "run" / "checkpoints.sha256" / "4.json"),
           "is not an OOD-detector artifact: it is a file")


def test_a_missing_or_unreadable_integrity_record_is_refused(sealed, tmp_path):
  path = _copy(sealed, tmp_path)
  os.remove(os.path.join(path, export.RECORD))
  _refused(path, "is damaged: it has no integrity record sha256.json (the export was cut short")
  with open(os.path.join(path, export.RECORD), "w") as f:
    f.write('{"meta/metadata": ')
  _refused(path, "is damaged: its integrity record sha256.json cannot be read (JSONDecodeError")
