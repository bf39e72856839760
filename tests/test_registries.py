"""A model, a detector, a data source, an objective and an optimiser registered from this file
alone (no library edit) run through a tiny training and evaluation; the registries refuse what
would be ambiguous."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from energy_jax import (config as config_lib, data, detectors, models, objectives, optimizers,
                        train)
from energy_jax.data import synthetic, toy
from energy_jax.fields import Field, real
from energy_jax.ood import evaluation
from energy_jax.registry import Registry
from energy_jax.train import step as step_lib


class TinyCNN(nn.Module):
  """One convolution, global pooling and a head: the model contract, nothing more."""
  width: int
  num_classes: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False, mask=None, example_ids=None):   # no BN, no dropout
    h = nn.relu(nn.Conv(self.width, (3, 3), dtype=self.dtype, name="conv")(x))
    features = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, name="head")(features)
    return models.ModelOutput(logits, features, (features,))


def build_tiny_cnn(*, num_classes, dtype, axis_name=None, width=8):
  return TinyCNN(width=width, num_classes=num_classes, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class LogitMargin(detectors.Detector):
  """Top-1 minus top-2 logit."""
  needs = frozenset({"logits"})

  def score(self, params, *, logits, **unused):
    top2 = jnp.sort(jnp.asarray(logits), axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def load_stripes(location, split, image_size):
  """``stripes:N``: N toy images per class for each of 4 classes (split seeds the draw)."""
  n = int(location)
  rng = np.random.default_rng({"train": 0, "test": 1}[split or "test"])
  images = np.concatenate([toy.class_images(c, n, rng) for c in range(4)])
  return data.ImageSet(images, np.repeat(np.arange(4), n).astype(np.int32),
                       ("a", "b", "c", "d"), f"stripes:{location}:{split}")


def feature_penalty(fields, *, logits_in, features_in, labels, mean_in, **unused):
  """Cross-entropy plus ``feature_weight * mean ||features||^2`` (reads the features)."""
  ce = mean_in(-jnp.take_along_axis(jax.nn.log_softmax(logits_in), labels[:, None], 1)[:, 0])
  norm = mean_in(jnp.sum(jnp.square(features_in), axis=-1))
  return ce + fields.feature_weight * norm, {"feature_norm": norm}


def clipped_sgd(learning_rate, *, weight_decay, max_norm):
  """Plain SGD after clipping the gradient's global norm to ``max_norm``."""
  return optax.chain(optax.clip_by_global_norm(max_norm), optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate))


@pytest.fixture
def registered_training():
  objectives.register("feature_penalty", uses_outliers=False, fields=(
      Field("feature_weight", 0.01, "feature_penalty: weight of the feature norm", real(0.0)),))(
          feature_penalty)
  optimizers.register("clipped_sgd", fields=(
      Field("max_norm", 1.0, "clipped_sgd: largest global gradient norm",
            real(0.0, low_open=True)),))(clipped_sgd)
  yield
  objectives.OBJECTIVES.unregister("feature_penalty")
  optimizers.OPTIMIZERS.unregister("clipped_sgd")


def test_an_objective_and_optimizer_registered_in_a_test_configure_and_train(
    registered, registered_training, tmp_path):
  c = config_lib.get_config("test", "pretrain")
  # Their fields join the config, its --help and its checks.
  assert (c.objective.feature_weight, c.optimizer.max_norm) == (0.01, 1.0)
  assert "--config.optimizer.max_norm" in config_lib.describe(c)
  c.objective.name, c.optimizer.name = "feature_penalty", "clipped_sgd"
  c.optimizer.max_norm = 0.0
  with pytest.raises(ValueError, match=r"^config.optimizer.max_norm must be > 0.0, got 0.0$"):
    config_lib.validate(c)
  c.optimizer.max_norm = 0.5
  # The objective sees the logits and the features of the step's forward pass: its loss is the
  # numpy one on them.
  rng = np.random.default_rng(0)
  out = models.ModelOutput(rng.normal(size=(6, 4)).astype(np.float32),
                           rng.normal(size=(6, 3)).astype(np.float32), ())
  labels = np.array([0, 1, 2, 3, 0, 1], np.int32)
  loss, metrics = step_lib.objective_loss(c, out, labels, 6)
  lg = out.logits.astype(np.float64)
  ce = np.mean(np.log(np.exp(lg).sum(1)) - lg[np.arange(6), labels])
  norm = np.mean(np.sum(out.features.astype(np.float64) ** 2, 1))
  np.testing.assert_allclose([loss, metrics["feature_norm"]], [ce + 0.01 * norm, norm],
                             rtol=1e-6)
  # The optimiser the state carries is the registered one: a clipped, decayed SGD step.
  tx = optimizers.from_config(c, 10).tx
  params, grads = {"w": np.full(4, 2.0, np.float32)}, {"w": np.full(4, 3.0, np.float32)}
  updates, _ = tx.update(grads, tx.init(params), params)
  want = -optimizers.cosine_schedule(0.1, 10)(0) * (3.0 * 0.5 / 6.0 + 5e-4 * 2.0)
  np.testing.assert_allclose(updates["w"], np.full(4, want), rtol=1e-6)
  c.model = models.default_spec("tiny_cnn", width=6)
  c.in_train = c.in_test = "stripes:8"
  c.num_devices, c.epochs = 1, 1
  row = train.train_and_evaluate(c, str(tmp_path / "run"), log=lambda s: None)
  assert row["epoch"] == 1 and np.isfinite(row["train_loss"]) and row["mean_feature_norm"] > 0


@pytest.fixture
def registered():
  models.register("tiny_cnn", shape_fields=("width",), head="head")(build_tiny_cnn)
  detectors.register("logit_margin")(LogitMargin)
  data.register("stripes", count=lambda location, split: 4 * int(location))(load_stripes)
  yield
  models.MODELS.unregister("tiny_cnn")
  detectors.DETECTORS.unregister("logit_margin")
  data.sources.SOURCES.unregister("stripes")


def test_a_model_detector_and_source_registered_in_a_test_train_and_evaluate(registered, tmp_path):
  c = config_lib.get_config("test", "pretrain")
  c.model = models.default_spec("tiny_cnn", width=6)
  c.in_train = c.in_test = "stripes:25"          # 100 images: a padded last batch of 4
  c.num_devices, c.epochs, c.optimizer.learning_rate = 1, 2, 0.05
  assert data.count_run_data(c, False) == (100, 100, 0)
  row = train.train_and_evaluate(c, str(tmp_path / "run"), log=lambda s: None)
  assert row["epoch"] == 2 and np.isfinite(row["train_loss"])

  from energy_jax import checkpoints
  variables = checkpoints.load_variables(str(tmp_path / "run"), c)
  assert variables["params"]["conv"]["kernel"].shape == (3, 3, 3, 6)
  W, b = models.head(c, variables["params"])
  test = data.load("stripes:25", "test")
  scorer = evaluation.Scorer.from_config(c, variables, batch_size=32)
  out = scorer.outputs(test.images, blocks=True)
  assert len(out.blocks) == 1
  # Two programs (the model's head, numpy's matmul): measured |diff| 6.0e-8 (SSE4_2, AVX, AVX2).
  np.testing.assert_allclose(out.logits, out.features @ np.asarray(W) + np.asarray(b),
                             rtol=1e-4, atol=1e-4)
  margin = detectors.create("logit_margin")
  ood = {"noise": synthetic.make_ood_set("uniform_noise", 40, seed=0)}
  res = evaluation.evaluate(scorer, test, ood, [margin], num_to_avg=2, log=lambda s: None)
  top2 = np.sort(out.logits, -1)[:, -2:]
  # The scorer's cached logits, one float32 subtraction either side: measured equal.
  np.testing.assert_allclose(scorer.score(margin, test.images), top2[:, 1] - top2[:, 0],
                             rtol=1e-5, atol=1e-5)
  assert set(res["logit_margin"]) == {"noise", "mean"}
  # A checkpoint of another width is refused, naming the field.
  c2 = c.copy_and_resolve_references()
  c2.model.width = 5
  with pytest.raises(ValueError, match="width: checkpoint 6 vs config 5"):
    checkpoints.load_variables(str(tmp_path / "run"), c2)


def test_the_wrn_spec_fields_are_checked_against_the_model(registered):
  c = config_lib.get_config("test", "pretrain")
  c.model.name = "tiny_cnn"                 # the WRN's depth etc. are no fields of tiny_cnn
  with pytest.raises(ValueError, match=r"config.model.depth is not a field of model 'tiny_cnn'"):
    models.from_config(c)
  with pytest.raises(ValueError, match=r"no field\(s\) \['depth'\]; it has \['width'\]"):
    models.default_spec("tiny_cnn", depth=3)


def test_registries_refuse_duplicates_and_name_the_known_entries():
  r = Registry("widget")
  r.register("a")(1)
  with pytest.raises(ValueError, match="widget 'a' is registered already"):
    r.register("a")(2)
  r.register("a", replace=True)(2)
  assert r.get("a") == 2 and r.names() == ("a",)
  with pytest.raises(ValueError, match="unknown widget 'b'; registered: a"):
    r.get("b")
  with pytest.raises(ValueError, match="unknown model 'resnet9'; registered: wrn"):
    models.get("resnet9")
  with pytest.raises(ValueError, match="unknown objective 'hinge'"):
    objectives.get("hinge")
  with pytest.raises(ValueError, match="optimizer field 'momentum' is declared twice with "
                                       "different defaults"):
    optimizers.register("heavy_ball", fields=(Field("momentum", 0.5, "", real()),))(clipped_sgd)
  assert "heavy_ball" not in optimizers.names()
  with pytest.raises(TypeError, match="must be a Detector subclass"):
    detectors.register("not_a_detector")(object)
  with pytest.raises(ValueError, match=r"unknown inputs \['pixels'\]"):
    @detectors.register("bad_inputs")
    @dataclasses.dataclass(frozen=True)
    class Bad(detectors.Detector):
      needs = frozenset({"pixels"})


def test_wrn_output_contract():
  model = models.WideResNet(10, 1, 5, 0.0)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  out = model.apply(variables, x)
  assert out.logits.shape == (3, 5) and out.features.shape == (3, 64)
  assert [b.shape for b in out.blocks] == [(3, 16), (3, 16), (3, 32), (3, 64)]
  np.testing.assert_array_equal(out.blocks[-1], out.features)      # the same output tensor
  W, b = models.head("wrn", variables["params"])
  # Two programs (the model's head, numpy's matmul): measured equal here (SSE4_2, AVX, AVX2).
  np.testing.assert_allclose(out.logits, out.features @ W + b, rtol=1e-5, atol=1e-5)
  # Other input sizes go through (global pooling).
  assert model.apply(variables, np.zeros((2, 48, 48, 3), np.float32)).logits.shape == (2, 5)
