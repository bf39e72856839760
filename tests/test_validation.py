"""Bad configs and bad inputs end in a message naming the field, the value or the path, before
any work; inputs that are only read are never written to (docs/reliability.md)."""

import os
import re
import subprocess
import sys

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import pytest
from PIL import Image

from conftest import REPO
from energy_jax import checkpoints, config as config_lib, data, models, train
from energy_jax.data import run_data, toy


def _config(stage="finetune", **fields):
  """The test preset with ``fields`` (dotted names) set, in a ConfigDict without the type locks
  of the base config (so that a wrong type reaches validate, as from a hand-built config)."""
  d = config_lib.get_config("test", stage).to_dict()
  for name, value in fields.items():
    node = d
    *parents, leaf = name.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return ml_collections.ConfigDict(d)


def test_every_field_has_a_check_and_every_preset_validates():
  names = [f.name for f in config_lib.fields()]
  assert len(names) == len(set(names)) and all(callable(f.check) for f in config_lib.fields())
  assert sorted(names) == sorted(n for n, _ in config_lib.flat_items(config_lib.base_config()))
  for preset in config_lib.presets():
    for stage in config_lib.STAGES:
      config_lib.validate(config_lib.get_config(preset, stage))


SEED_RANGE = ("in [0, 4294967296) (numpy's seeds are non-negative, and JAX's keys hold 32 bits: "
              "PRNGKey(2**32) is PRNGKey(0))")
BAD_VALUES = [
    # (field, value, what the message says after "config.FIELD must be")
    ("batch_size", 0, "a positive integer"),
    ("batch_size", -16, "a positive integer"),
    ("batch_size", 16.0, "an integer"),
    ("batch_size", True, "an integer"),
    ("outlier_batch_size", 0, "a positive integer"),
    ("eval_batch_size", 0, "a positive integer"),
    ("epochs", 0, "a positive integer"),
    ("steps_per_call", 0, "a positive integer"),
    ("image_size", 0, "a positive integer"),
    ("keep_checkpoints", 0, ">= 1 (0 would leave no checkpoint)"),
    ("train_subset", -5, ">= 0"),
    ("eval_every_epochs", 0, ">= 1"),
    ("checkpoint_every_epochs", -1, ">= 1"),
    ("num_devices", -1, ">= 0"),
    ("member_groups", 0, ">= 1"),
    ("scan_unroll", -2, ">= 0"),
    ("num_classes", 1, ">= 2 (a softmax over one class is constant)"),
    ("seed", -1, SEED_RANGE),
    ("seed", 2 ** 32, SEED_RANGE),
    ("seed", -5, SEED_RANGE),
    ("epochs", 2 ** 31, "in [1, 2147483647] (JAX's integers are 32-bit)"),
    ("batch_size", 2 ** 40, "in [1, 2147483647] (JAX's integers are 32-bit)"),
    ("num_devices", 2 ** 31, "in [0, 2147483647] (JAX's integers are 32-bit)"),
    ("optimizer.learning_rate", 1e39, "in [1.1754944e-38, 3.4028235e+38] (the run computes in "
                                      "float32, where it overflows)"),
    ("optimizer.learning_rate", 1e-39, "in [1.1754944e-38, 3.4028235e+38] (the run computes in "
                                       "float32, where it underflows)"),
    ("optimizer.weight_decay", 1e-45, "0 or in [1.1754944e-38, 3.4028235e+38] (the run computes "
                                      "in float32, where it underflows)"),
    ("objective.m_in", -1e39, "in [-3.4028235e+38, -1.1754944e-38] or 0 or in [1.1754944e-38, "
                    "3.4028235e+38] (the run computes in float32, where it overflows)"),
    ("model.dropout_rate", 1e-300, "0 or in [1.1754944e-38, 1) (the run computes in float32, "
                                   "where it underflows)"),
    ("optimizer.learning_rate", 0.0, "> 0.0"),
    ("optimizer.learning_rate", float("nan"), "finite"),
    ("optimizer.learning_rate", "0.1", "a number"),
    ("optimizer.min_learning_rate", -1e-6, ">= 0.0"),
    ("optimizer.momentum", 1.0, "in [0.0, 1.0)"),
    ("optimizer.weight_decay", float("inf"), "finite"),
    ("optimizer.b1", -0.1, "in [0.0, 1.0)"),
    ("optimizer.b2", 1.0, "in [0.0, 1.0)"),
    ("optimizer.eps", 0.0, "> 0.0"),
    ("objective.m_in", float("-inf"), "finite"),
    ("objective.m_out", None, "a number or 'auto'"),
    ("objective.m_in", "automatic", "a number or 'auto'"),
    ("objective.auto_margins", "m_in,seed", "'' or some of m_in, m_out, comma-separated"),
    ("objective.energy_weight", -0.1, ">= 0.0"),
    ("objective.oe_weight", float("nan"), "finite"),
    ("model.depth", 12, "6n+4 (10, 16, 22, 28, 40, ...: n blocks per group of the WRN)"),
    ("model.depth", 4, ">= 10"),
    ("model.widen_factor", 0, "a positive integer"),
    ("model.dropout_rate", 1.0, "in [0.0, 1.0)"),
    ("model.pooling", "max", "one of 'mean', 'reference'"),
    ("model.dtype", "float16", "one of 'float32', 'bfloat16'"),
    ("model.name", "resnet9", "one of 'wrn'"),
    ("objective.name", "hinge", "one of 'ce', 'energy', 'oe'"),
    ("optimizer.name", "lbfgs", "one of 'sgd', 'adamw'"),
    ("input_pipeline", "grpc", "one of 'device', 'tfdata'"),
    ("outlier_sampling", "random", "one of 'window', 'shuffle'"),
    ("validation_sets", (), "a non-empty tuple of names"),
    ("dataset", "", "a non-empty string"),
    ("in_train", "", "a non-empty string"),
    ("in_test", None, "a string"),
    ("in_test_split", None, "a string"),
    ("data_dir", 3, "a string"),
    ("pretrained", None, "a string"),
    ("drop_remainder", 0, "True or False"),
    ("optimizer.nesterov", "yes", "True or False"),
    ("progress_bar", None, "True or False"),
    ("tensorboard", 1, "True or False"),
    ("resume_override", ("seed",), "a string"),
]


# A choice close to a misspelt one is named after the message.
SUGGESTED = {("model.dtype", "float16"): "; did you mean 'bfloat16'?"}


@pytest.mark.parametrize("field,value,requirement", BAD_VALUES,
                         ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_a_bad_value_is_refused_naming_the_field_and_the_value(field, value, requirement):
  with pytest.raises(ValueError) as e:
    config_lib.validate(_config(**{field: value}))
  assert str(e.value) == (f"config.{field} must be {requirement}, got {value!r}"
                          f"{SUGGESTED.get((field, value), '')}")


def test_seeds_outside_what_numpy_and_jax_take_are_refused_naming_the_flag():
  for bad in (-5, 2 ** 32, 1.5, True):
    with pytest.raises(ValueError) as e:
      config_lib.check_seed(bad, "--seed")
    assert str(e.value) == (f"--seed must be an integer in [0, 4294967296) (numpy's seeds are "
                            "non-negative, and JAX's keys hold 32 bits: PRNGKey(2**32) is "
                            f"PRNGKey(0)), got {bad!r}")
  for good in (0, 2 ** 32 - 1):
    config_lib.check_seed(good, "--seed")


def test_another_models_numbers_are_bounded_as_the_run_computes_them(probe_model):
  c = _config()
  c.model = ml_collections.ConfigDict({"name": "probe", "dtype": "float32", "width": 2 ** 31})
  with pytest.raises(ValueError, match=re.escape(
      "config.model.width must be in [-2147483648, 2147483647] (JAX's integers are 32-bit), got "
      "2147483648")):
    config_lib.validate(c)


def test_every_field_is_among_the_bad_values_tried():
  tried = {f for f, _, _ in BAD_VALUES} | {"validation_sets", "outliers", "outliers_split",
                                           "validation_base", "validation_base_split",
                                           "in_train_split"}
  untried = {f.name for f in config_lib.fields()} - tried
  assert untried == set(), untried


def test_sources_splits_and_validation_sets():
  for field in ("outliers_split", "validation_base_split", "in_train_split"):
    with pytest.raises(ValueError, match=rf"^config\.{field} must be a string, got 0$"):
      config_lib.validate(_config(**{field: 0}))
  with pytest.raises(ValueError, match=r"config.validation_sets = \('jigsaw', 'fog'\) holds "
                                       r"unknown set\(s\) 'fog'; known .*uniform_noise"):
    config_lib.validate(_config(validation_sets=("jigsaw", "fog")))
  with pytest.raises(ValueError, match=r"config.validation_base must be a string, got None"):
    config_lib.validate(_config(validation_base=None))
  # '' is no source for the training set, but means "none" / "the ID test set" for these two.
  config_lib.validate(_config("pretrain", outliers="", validation_base=""))


def test_unknown_renamed_and_missing_fields():
  with pytest.raises(ValueError, match=r"^config.batch_szie is not a config field; did you mean "
                                       r"config.batch_size\?$"):
    config_lib.validate(_config(batch_szie=128))
  with pytest.raises(ValueError, match=r"^config.model.detph is not a field of model 'wrn' \(its "
                                       r"fields: depth, dropout_rate, pooling, widen_factor\); "
                                       r"did you mean config.model.depth\?$"):
    config_lib.validate(_config(**{"model.detph": 16}))
  with pytest.raises(ValueError, match=r"^config.zzz is not a config field$"):
    config_lib.validate(_config(zzz=1))
  with pytest.raises(ValueError, match=r"score -> objective.name \(energy-jax 0.2\)"):
    config_lib.validate(_config(score="energy"))
  # The keys of 0.2 that 0.3 moved into the objective and optimizer sections.
  with pytest.raises(ValueError, match=re.escape(
      "config keys renamed: learning_rate -> optimizer.learning_rate (energy-jax 0.3), m_in -> "
      "objective.m_in (energy-jax 0.3)")):
    config_lib.validate(_config(m_in=-20.0, learning_rate=0.1))
  with pytest.raises(ValueError, match=re.escape(
      "objective -> objective.name (energy-jax 0.3: config.objective is a section)")):
    config_lib.validate(_config(objective="energy"))
  with pytest.raises(ValueError, match=r"^config.objective.m_inn is not a field of any registered "
                                       r"objective .*; did you mean config.objective.m_in\?$"):
    config_lib.validate(_config(**{"objective.m_inn": -20.0}))
  c = _config()
  del c["seed"]
  with pytest.raises(ValueError, match=r"^config has no field seed: start from"):
    config_lib.validate(c)
  c = _config()
  c.model = None
  with pytest.raises(ValueError, match="config.model must be a ConfigDict .* got None"):
    config_lib.validate(c)


def test_fields_that_must_agree():
  with pytest.raises(ValueError, match=r"config.objective.m_in = -2.0 must lie below "
                                       r"config.objective.m_out = -2.0"):
    config_lib.validate(_config(**{"objective.m_in": -2.0, "objective.m_out": -2.0}))
  config_lib.validate(_config("pretrain", **{"objective.m_in": -2.0,      # not read by "ce"
                                             "objective.m_out": -2.0}))
  # "auto" margins are computed by the energy objective from the outliers; m_in < m_out is
  # checked once they are numbers (energy_jax.train.margins).
  config_lib.validate(_config(**{"objective.m_in": "auto", "objective.m_out": "auto"}))
  config_lib.validate(_config(**{"objective.m_in": "auto", "objective.m_out": -30.0}))
  with pytest.raises(ValueError, match=r"^config.objective.m_out = 'auto' is computed for the "
                                       r"energy objective, but config.objective.name = 'oe'"):
    config_lib.validate(_config(**{"objective.name": "oe", "objective.m_out": "auto"}))
  with pytest.raises(ValueError, match=r"config.outliers is empty, but config.objective.name = "
                                       r"'energy' trains on outlier images"):
    config_lib.validate(_config(outliers="", **{"objective.m_in": "auto"}))
  with pytest.raises(ValueError, match=r"config.outliers is empty, but config.objective.name = "
                                       r"'oe' trains on outlier images"):
    config_lib.validate(_config(outliers="", **{"objective.name": "oe"}))
  with pytest.raises(ValueError, match=r"config.optimizer.min_learning_rate = 0.5 must not "
                                       r"exceed config.optimizer.learning_rate = 0.1"):
    config_lib.validate(_config(**{"optimizer.learning_rate": 0.1,
                                   "optimizer.min_learning_rate": 0.5}))


class _Probe(nn.Module):
  width: int
  num_classes: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False, mask=None, example_ids=None):
    features = jnp.mean(nn.Conv(self.width, (3, 3), name="conv")(x), axis=(1, 2))
    return models.ModelOutput(nn.Dense(self.num_classes, name="head")(features), features,
                              (features,))


def _build_probe(*, num_classes, dtype, axis_name=None, width=4):
  return _Probe(width=width, num_classes=num_classes, dtype=dtype)


@pytest.fixture
def probe_model():
  models.register("probe", shape_fields=("width",), head="head")(_build_probe)
  yield
  models.MODELS.unregister("probe")


def test_another_models_fields_are_checked_by_the_types_of_its_defaults(probe_model):
  c = _config()
  c.model = ml_collections.ConfigDict({"name": "probe", "dtype": "float32", "width": True})
  with pytest.raises(ValueError, match=r"^config.model.width must be an integer, got True$"):
    config_lib.validate(c)
  c.model = ml_collections.ConfigDict({"name": "probe", "dtype": "float32", "width": 6})
  config_lib.validate(c)
  c.model.depth = 16                           # a WRN field
  with pytest.raises(ValueError, match=r"config.model.depth is not a field of model 'probe' "
                                       r"\(its fields: width\)"):
    config_lib.validate(c)


@pytest.mark.parametrize("field,value", [("keep_checkpoints", 0), ("batch_size", 0),
                                         ("train_subset", -5), ("batch_size", -16)])
def test_a_bad_value_stops_the_run_before_anything_is_read_or_written(tmp_path, field, value):
  # The test preset's data (DATA/...) does not exist: reading it would fail otherwise.
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=re.escape(f"config.{field} must be")):
    train.train_and_evaluate(_config("pretrain", **{field: value}), str(workdir))
  assert not workdir.exists()


def test_a_url_other_than_gs_or_an_unreachable_bucket_is_refused_before_any_work(monkeypatch,
                                                                                tmp_path):
  # The test preset's data does not exist: reading it would fail with another message.
  c = _config("pretrain")
  with pytest.raises(ValueError, match=r"^workdir s3://bucket/run: s3:// is not supported; a run "
                                       r"lives on a local or shared disk or at gs://$"):
    train.train_and_evaluate(c, "s3://bucket/run")
  with pytest.raises(ValueError, match=r"^checkpoint http://host/run: http:// is not supported"):
    checkpoints.load_variables("http://host/run", c)
  with pytest.raises(ValueError, match=r"^workdir gs:// names no bucket"):
    train.train_and_evaluate(c, "gs://")
  with pytest.raises(ValueError, match=r"^workdir gs:/bucket/run reads as a URL without its '//' "
                                       r"\(e\.g\. gs://BUCKET/PATH\)"):
    train.train_and_evaluate(c, "gs:/bucket/run")
  with pytest.raises(ValueError, match=r"^config\.pretrained s3://b/w\.pt: s3:// is not supported"):
    train.train_and_evaluate(_config("pretrain", pretrained="s3://b/w.pt"), str(tmp_path))
  # gs:// without google-cloud-storage (Orbax lists a bucket's checkpoints with it) ...
  monkeypatch.setitem(sys.modules, "google.cloud.storage", None)
  with pytest.raises(OSError, match=r"^workdir gs://bucket/run is in a bucket, where Orbax lists "
                                    r"and deletes checkpoints through google-cloud-storage, which "
                                    r"cannot be imported .*pip install 'energy_jax\[gcs\]'"):
    train.train_and_evaluate(c, "gs://bucket/run")
  # ... and with neither of epath's backends (TensorFlow's gfile, fsspec's gcsfs).
  from energy_jax import storage
  from etils.epath import backend, gpath
  monkeypatch.setattr(storage, "require_bucket_client", lambda path, what: None)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setitem(sys.modules, "gcsfs", None)
  backend.fsspec_backend._get_filesystem.cache_clear()
  with pytest.raises(OSError, match=r"^workdir gs://bucket/run cannot be reached \(ImportError: "
                                    r".*gs:// paths need TensorFlow or gcsfs"):
    train.train_and_evaluate(c, "gs://bucket/run")
  backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.mark.parametrize("value", ["0", "-3"])
def test_evaluate_refuses_num_to_avg_below_one(value):
  out = subprocess.run([sys.executable, "experiments/evaluate.py", "--checkpoint=/nowhere",
                        f"--num_to_avg={value}"], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
  assert out.returncode != 0
  assert f"--num_to_avg={value}: {value} is not a positive integer" in out.stderr + out.stdout


def _image_folder(root, split, classes, n=2):
  for c in classes:
    os.makedirs(root / split / c, exist_ok=True)
    for i in range(n):
      Image.new("RGB", (32, 32), color=(40 * i, 0, 0)).save(root / split / c / f"{i}.png")


def test_train_and_test_classes_are_matched_by_name(tmp_path):
  _image_folder(tmp_path / "f", "train", ("a", "b"), n=3)
  _image_folder(tmp_path / "f", "test", ("a", "c"))
  c = _config("pretrain", in_train=str(tmp_path / "f"), in_test=str(tmp_path / "f"),
              num_classes=2)
  with pytest.raises(ValueError, match=re.escape(
      "config.in_test classes ['a', 'c'] differ from config.in_train classes ['a', 'b']: "
      "missing 'b', extra 'c'")):
    data.load_run_data(c, False)
  with pytest.raises(ValueError, match=re.escape(
      "classes ['b', 'a'] differ from config.in_train classes ['a', 'b']: the same names in "
      "another order")):
    run_data.check_same_classes(("a", "b"), ("b", "a"))
  _image_folder(tmp_path / "g", "train", ("a", "b"), n=3)
  _image_folder(tmp_path / "g", "test", ("a", "b"))
  ok = data.load_run_data(_config("pretrain", in_train=str(tmp_path / "g"),
                                  in_test=str(tmp_path / "g"), num_classes=2), False)
  assert ok.train.class_names == ok.test.class_names == ("a", "b")
  assert ok.train.labels.tolist() == [0, 0, 0, 1, 1, 1] and ok.test.labels.tolist() == [0, 0, 1, 1]


def test_train_subset_is_a_count_of_the_training_set(tmp_path):
  _image_folder(tmp_path / "f", "train", ("a", "b"), n=3)
  _image_folder(tmp_path / "f", "test", ("a", "b"))
  c = _config("pretrain", in_train=str(tmp_path / "f"), in_test=str(tmp_path / "f"),
              num_classes=2, train_subset=4)
  assert len(data.load_run_data(c, False).train) == 4
  assert data.count_run_data(c, False) == (4, 4, 0)
  c.train_subset = 7
  for fn in (data.load_run_data, data.count_run_data):
    with pytest.raises(ValueError, match=r"config.train_subset = 7 exceeds the 6 images of "
                                         r"config.in_train \(.*f"):
      fn(c, False)


def _tree(root):
  """``{path: (size, mtime)}`` of everything under ``root``."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      st = os.lstat(os.path.join(dirpath, name))
      out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
  return out


def test_a_checkpoint_given_to_read_is_never_written(tmp_path, probe_model):
  # A folder without a run: refused, and no checkpoints/ folder is made in it.
  plain = tmp_path / "plain"
  plain.mkdir()
  c = _config("pretrain")
  with pytest.raises(FileNotFoundError, match=re.escape(f"{plain} holds no Orbax checkpoint")):
    checkpoints.load_variables(str(plain), c)
  assert os.listdir(plain) == []
  checkpoints.RunCheckpoints(str(plain), read_only=True).close()
  assert os.listdir(plain) == []
  # A run directory: loading it (the run or its checkpoints/ folder) changes no file in it.
  toy_id, _ = toy.make_toy_dataset(str(tmp_path / "data"), train_per_class=8, test_per_class=4,
                                   num_outliers=0)
  c.model = ml_collections.ConfigDict({"name": "probe", "dtype": "float32", "width": 4})
  c.in_train = c.in_test = toy_id
  c.num_devices, c.epochs, c.steps_per_call = 1, 1, 2
  run = tmp_path / "run"
  train.train_and_evaluate(c, str(run), log=lambda s: None)
  before = _tree(run)
  for path in (run, run / "checkpoints"):
    variables = checkpoints.load_variables(str(path), c)
    assert variables["params"]["conv"]["kernel"].shape == (3, 3, 3, 4)
  assert _tree(run) == before
