import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energy_jax import checkpoints, models
from energy_jax.models import wrn_convert as convert

torch = pytest.importorskip("torch")
from torch_twin import TwinWRN, randomize_batchnorm  # noqa: E402


def test_wrn_40_2_has_reference_parameter_count():
  model = models.WideResNet(40, 2, 10, 0.3)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  assert models.count_params(variables["params"]) == 2_243_546
  twin = TwinWRN(40, 10, 2, 0.3)
  assert sum(p.numel() for p in twin.parameters()) == 2_243_546


def test_initialisation_compiled_with_its_options_gives_the_default_compiles_values():
  """``models.init_variables`` compiles with ``init_compiler_options`` (LLVM -O1 on XLA:CPU, for
  compile time); the values are those of a plain ``jax.jit`` (measured bit-equal here; within
  float32 rounding claimed)."""
  import flax.linen as nn

  class Small(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Conv(8, (3, 3), kernel_init=nn.initializers.variance_scaling(2.0, "fan_out",
                                                                          "normal"))(x)
      return nn.Dense(3)(x.mean((1, 2)))

  if jax.default_backend() == "cpu":
    assert models.init_compiler_options() == {"xla_backend_optimization_level": 1}
  key = jax.random.PRNGKey(4)
  got = models.init_variables(Small(), key, (8, 8, 3))
  want = jax.jit(models.lazy_init_variables, static_argnums=(0, 2))(Small(), key, (8, 8, 3))
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
  assert float(np.std(got["params"]["Conv_0"]["kernel"])) > 0


def test_init_statistics_follow_reference():
  model = models.WideResNet(40, 2, 10)
  params = models.init_variables(model, jax.random.PRNGKey(1))["params"]
  kernel = np.asarray(params["block3_layer_1"]["conv2"]["kernel"])   # 3x3, 128 out
  assert kernel.std() == pytest.approx(np.sqrt(2 / (9 * 128)), rel=0.02)   # sampling: 1.3e-3
  assert np.all(np.asarray(params["bn1"]["scale"]) == 1)
  assert np.all(np.asarray(params["fc"]["bias"]) == 0)
  assert np.abs(np.asarray(params["fc"]["kernel"])).max() <= 1 / np.sqrt(128)


@pytest.mark.parametrize("depth,widen,classes", [(40, 2, 10), (10, 1, 7)])
def test_converted_twin_matches_logits_and_features(depth, widen, classes):
  gen = torch.Generator().manual_seed(depth)
  twin = randomize_batchnorm(TwinWRN(depth, classes, widen, 0.3), gen).eval()
  model = models.WideResNet(depth, widen, classes, 0.3)
  variables = convert.state_dict_to_variables(twin.state_dict(), model)
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    want_feat = twin.features(xt).numpy()
    want_logits = twin(xt).numpy()
  out = model.apply(variables, jnp.asarray(x), train=False)
  logits, feats = out.logits, out.features
  # Two float32 implementations (XLA, torch): measured |diff| 2.4e-7 (SSE4_2, AVX, AVX2;
  # 2026-12-06), here and in the next test; 1e-4 leaves over 100x.
  np.testing.assert_allclose(np.asarray(feats), want_feat, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-4, rtol=1e-4)


def test_train_mode_batchnorm_matches_torch_update():
  """One train-mode forward: same output, same running mean and unbiased running var."""
  gen = torch.Generator().manual_seed(3)
  twin = randomize_batchnorm(TwinWRN(10, 5, 1, 0.0), gen).train()
  model = models.WideResNet(10, 1, 5, 0.0)
  variables = convert.state_dict_to_variables(twin.state_dict(), model)
  x = np.random.default_rng(1).normal(size=(6, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  got, updates = model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(got.logits), want, atol=1e-4, rtol=1e-4)
  after = convert.state_dict_to_variables(twin.state_dict(), model)["batch_stats"]
  for a, b in zip(jax.tree_util.tree_leaves(updates["batch_stats"]),
                  jax.tree_util.tree_leaves(after)):
    # Two implementations: measured |diff| 1.2e-7 (SSE4_2, AVX, AVX2).
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_converter_names_mismatched_tensor():
  twin = TwinWRN(10, 10, 1)
  with pytest.raises(ValueError, match=r"fc.weight.*\(10, 64\).*WRN-10-1 with 100 classes"):
    convert.state_dict_to_variables(twin.state_dict(), models.WideResNet(10, 1, 100))
  with pytest.raises(ValueError, match="block1.layer.0.conv1.weight"):
    convert.state_dict_to_variables(twin.state_dict(), models.WideResNet(10, 2, 10))
  with pytest.raises(ValueError, match=r"missing .*block1_layer_1"):
    convert.state_dict_to_variables(twin.state_dict(), models.WideResNet(16, 1, 10))


def test_load_torch_checkpoint_roundtrip_and_errors(tmp_path):
  twin = randomize_batchnorm(TwinWRN(10, 10, 1), torch.Generator().manual_seed(0))
  path = tmp_path / "cifar10_wrn_pretrained_epoch_99.pt"
  sd = {"module." + k: v for k, v in twin.state_dict().items()}   # DataParallel prefix
  torch.save(sd, path)
  variables = convert.state_dict_to_variables(checkpoints.read_torch_state_dict(str(path)),
                                              models.WideResNet(10, 1, 10))
  np.testing.assert_allclose(variables["batch_stats"]["bn1"]["var"],          # a copy: exact
                             twin.bn1.running_var.numpy())
  with pytest.raises(FileNotFoundError, match="nope.pt"):
    checkpoints.read_torch_state_dict(str(tmp_path / "nope.pt"))
  bad = tmp_path / "corrupt.pt"
  bad.write_bytes(path.read_bytes()[:200])
  with pytest.raises(ValueError, match="corrupt.pt"):
    checkpoints.read_torch_state_dict(str(bad))


def test_bad_depth_and_input_shape():
  with pytest.raises(ValueError, match="6n\\+4"):
    models.init_variables(models.WideResNet(12, 1, 10), jax.random.PRNGKey(0))
  model = models.WideResNet(10, 1, 10)
  v = models.init_variables(model, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="NHWC"):
    model.apply(v, jnp.zeros((2, 3, 32, 32)))


def test_converter_refuses_non_finite_tensors_naming_each(tmp_path):
  from energy_jax import config as config_lib
  twin = randomize_batchnorm(TwinWRN(10, 4, 1), torch.Generator().manual_seed(0))
  sd = {k: v.clone() for k, v in twin.state_dict().items()}
  sd["fc.weight"][0, 0] = float("nan")
  sd["bn1.running_var"][:3] = float("inf")
  sd["conv1.weight"] = sd["conv1.weight"].double()
  sd["conv1.weight"][0, 0, 0, :2] = 1e300                    # finite in float64, inf in float32
  message = ("state_dict holds non-finite (NaN or inf) values in 3 tensor(s): conv1.weight (2 of "
             "432), bn1.running_var (3 of 64), fc.weight (1 of 256)")
  model = models.WideResNet(10, 1, 4)
  with pytest.raises(ValueError, match=re.escape(message)):
    convert.state_dict_to_variables(sd, model)
  with pytest.raises(ValueError, match=r"state_dict entry 'fc.bias' is no numeric tensor \(str"):
    convert.state_dict_to_variables({**twin.state_dict(), "fc.bias": "zeros"}, model)
  # Through a .pt file given as config.pretrained / --checkpoint.
  path = tmp_path / "nan.pt"
  torch.save(sd, path)
  config = config_lib.get_config("test", "pretrain")
  with pytest.raises(ValueError, match=re.escape(message)):
    checkpoints.load_variables(str(path), config)


def test_bfloat16_and_float64_state_dicts_convert():
  twin = randomize_batchnorm(TwinWRN(10, 4, 1), torch.Generator().manual_seed(1))
  model = models.WideResNet(10, 1, 4)
  for dtype in (torch.bfloat16, torch.float64):
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in twin.state_dict().items()}
    variables = convert.state_dict_to_variables(sd, model)
    # Exact: both sides are the same cast to float32 (numpy, torch round alike).
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"],
                                  sd["fc.weight"].float().numpy().T)
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"],
                                  sd["bn1.running_var"].float().numpy())


def test_a_pt_file_with_pickled_objects_is_refused_without_running_them(tmp_path):
  # torch.save(model) pickles the module's class; torch's own advice (weights_only=False) would
  # run that pickle's code. The message says what to save instead.
  path = tmp_path / "whole_model.pt"
  torch.save(torch.nn.Linear(2, 3), path)
  with pytest.raises(ValueError, match=r"whole_model\.pt holds pickled objects other than "
                                       r"tensors .* save the model's state_dict\(\) instead"):
    checkpoints.read_torch_state_dict(str(path))
