"""Where the time of one energy fine-tuning step goes, by ablation (128 ID + 256 outliers).

Each variant is compiled once and timed over several calls on the same device:
  full        the device-resident fused step (gather, crop/flip, normalise, fwd+bwd, SGD)
  no_input    the same step on an already-augmented, normalised batch
  forward     the train-mode forward pass alone (BN statistics computed, no gradient)
  no_bn_stats the step with BatchNorm statistics replaced by a fixed affine (BN cost = difference)
  input_only  gather + crop/flip + normalise alone
Convolutions ~ forward + its share of the backward; data movement ~ full - no_input.

  python benchmarks/profile_step.py [--small] [--dtype bfloat16]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from energy_jax import configs, models, train  # noqa: E402
import train_step  # noqa: E402


def timeit(fn, *args, calls=10):
  out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / calls


class FixedAffineBN(models.BatchNorm):
  """BatchNorm without batch statistics: y = x * scale + bias (for the ablation only)."""

  @nn.compact
  def __call__(self, x, *, train):
    scale = self.param("scale", jax.nn.initializers.ones, (x.shape[-1],), jnp.float32)
    bias = self.param("bias", jax.nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    self.variable("batch_stats", "mean", lambda: jnp.zeros((x.shape[-1],), jnp.float32))
    self.variable("batch_stats", "var", lambda: jnp.ones((x.shape[-1],), jnp.float32))
    return (x * scale.astype(x.dtype) + bias.astype(x.dtype)).astype(self.dtype)


class Results(dict):
  """Prints each timing as it is measured (a run cut short by a timeout still shows some)."""

  def __setitem__(self, name, seconds):
    super().__setitem__(name, seconds)
    share = f"{100 * seconds / self['full']:5.1f}% of full" if "full" in self else ""
    print(f"  {name:12s} {1e3 * seconds:8.2f} ms/step  {384 / seconds:9.0f} img/s  {share}",
          flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--small", action="store_true")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--steps", type=int, default=20)
  args = p.parse_args()
  c = configs.apply_preset(configs.base_config(), "cifar10", "finetune")
  c.dtype = args.dtype
  if args.small:
    c.depth, c.widen_factor = 10, 1
  s = args.steps
  fused, state, data, i_in, i_out = train_step.fused_step_inputs(c, s)
  tx = train.make_optimizer(c, train_step.SCHEDULE_STEPS)   # as in fused_step_inputs
  dtype = train.make_model(c).dtype
  batch = jax.jit(lambda k: train.device_batch(k, data, i_in[0], i_out[0], dtype))(
      jax.random.PRNGKey(1))
  print(f"device: {jax.devices()[0].device_kind}, WRN-{c.depth}-{c.widen_factor}, {c.dtype}, "
        f"128+256 images", flush=True)
  res = Results()
  carry = [jax.tree_util.tree_map(jnp.copy, state)]    # the fused call donates its state

  def full_call():
    carry[0], m = fused(carry[0], data, i_in, i_out)
    return m["loss"]
  res["full"] = timeit(full_call) / s
  # Return the new parameters too: with the loss alone XLA drops the backward pass as dead code.
  host = jax.jit(lambda st, b: train.train_step(st, b, config=c, tx=tx, axis_name=None)[0].params)
  res["no_input"] = timeit(host, state, batch)
  model = train.make_model(c)
  x = jnp.concatenate([batch["image"], batch["outlier"]])
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                         rngs={"dropout": jax.random.PRNGKey(0)})[0])
  res["forward"] = timeit(fwd, state.variables, x)
  original = models.BatchNorm
  models.BatchNorm = FixedAffineBN          # the blocks look the class up at trace time
  try:
    res["no_bn_stats"] = timeit(jax.jit(
        lambda st, b: train.train_step(st, b, config=c, tx=tx, axis_name=None)[0].params),
        state, batch)
  finally:
    models.BatchNorm = original
  gather = jax.jit(lambda k: jax.tree_util.tree_map(   # every stream, or XLA drops the unused one
      jnp.sum, train.device_batch(k, data, i_in[0], i_out[0], dtype)))
  res["input_only"] = timeit(gather, jax.random.PRNGKey(2))
  print(f"  => fused input path over a ready batch ~{1e3 * (res['full'] - res['no_input']):.2f} ms, "
        f"BatchNorm statistics ~{1e3 * (res['no_input'] - res['no_bn_stats']):.2f} ms, "
        f"backward+update ~{1e3 * (res['no_input'] - res['forward']):.2f} ms", flush=True)


if __name__ == "__main__":
  main()
