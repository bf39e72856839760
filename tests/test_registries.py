"""A model, a detector and a data source registered from this file alone (no library edit) run
through a tiny training and evaluation; the registries refuse what would be ambiguous."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energy_jax import config as config_lib, data, detectors, models, train
from energy_jax.data import synthetic, toy
from energy_jax.ood import evaluation
from energy_jax.registry import Registry


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
  c.num_devices, c.epochs, c.learning_rate = 1, 2, 0.05
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
    train.objectives.get("hinge")
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
