"""The golden tiny run: pretrain, energy / OE fine-tune and evaluate a WRN-10-1 on generated data,
on both input paths, and summarise what came out (per-epoch losses, hashes of the final
variables, the evaluation table). ``tests/test_golden.py`` compares a fresh run against the
summary stored in ``tests/data/golden_tiny_run.json``; ``python tests/golden_run.py`` rewrites it
(only when a change is meant to alter the numbers; the commit says which)."""

import hashlib
import json
import os
import sys
import tempfile

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "data", "golden_tiny_run.json")


def _hash(tree) -> str:
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(tree):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(str((a.dtype, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def _sums(tree):
  return [float(np.sum(np.asarray(l, np.float64))) for l in jax.tree_util.tree_leaves(tree)]


def golden_run(workdir: str) -> dict:
  from energy_jax import checkpoints, config as config_lib, data, detectors, train
  from energy_jax.data import synthetic, toy
  from energy_jax.ood import evaluation
  toy_id, toy_out = toy.make_toy_dataset(os.path.join(workdir, "data"), train_per_class=25,
                                              test_per_class=16, num_outliers=96, seed=3)

  def config(stage, pipeline, **kw):
    c = config_lib.get_config("test", stage)
    c.in_train = c.in_test = toy_id
    c.outliers = toy_out
    c.num_devices = 1
    c.input_pipeline = pipeline
    c.steps_per_call = 4
    c.model.dropout_rate = 0.3
    c.seed = 5
    for k, v in kw.items():
      setattr(c, k, v)
    return c

  out = {}
  test = data.load(toy_id, "test")
  ood = {"noise": synthetic.make_ood_set("uniform_noise", 24, seed=1),
         "jigsaw": synthetic.make_ood_set("jigsaw", 24, seed=1, base=test)}
  chosen = [detectors.create("msp"), detectors.create("energy", temperature=1.0),
            detectors.create("odin", temperature=10.0, epsilon=0.002),
            detectors.create("mahalanobis", epsilon=0.001)]
  for pipeline in ("device", "tfdata"):
    runs = {"pretrain": config("pretrain", pipeline, epochs=2),
            "energy": config("finetune", pipeline, epochs=2),
            "oe": config("finetune", pipeline, epochs=1, objective="oe")}
    for name, c in runs.items():
      if name != "pretrain":
        c.pretrained = os.path.join(workdir, pipeline, "pretrain")
      run_dir = os.path.join(workdir, pipeline, name)
      train.train_and_evaluate(c, run_dir, log=lambda s: None)
      rows = [json.loads(l) for l in open(os.path.join(run_dir, "results.jsonl"))]
      variables = checkpoints.load_variables(run_dir, c)
      entry = {"train_loss": [r["train_loss"] for r in rows],
               "test_loss": [r.get("test_loss") for r in rows],
               "test_error": [r.get("test_error") for r in rows],
               "params_sha256": _hash(variables["params"]),
               "batch_stats_sha256": _hash(variables["batch_stats"]),
               "params_sums": _sums(variables["params"]),
               "batch_stats_sums": _sums(variables["batch_stats"])}
      if name == "energy":
        scorer = evaluation.Scorer.from_config(c, variables, batch_size=32)
        scorer.fit(chosen, data.load(toy_id, "train"))
        results = evaluation.evaluate(scorer, test, ood, chosen, num_to_avg=2, seed=0,
                                      log=lambda s: None)
        entry["evaluation"] = {label: {s: {k: m[k] for k in ("fpr", "auroc", "aupr_in")}
                                       for s, m in per_set.items()}
                               for label, per_set in results.items()}
      out[f"{pipeline}/{name}"] = entry
  return out


def versions() -> dict:
  import jaxlib
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "platform": jax.default_backend()}


if __name__ == "__main__":
  # The environment of the tests (tests/conftest.py).
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(HERE))
  with tempfile.TemporaryDirectory() as d:
    summary = {"versions": versions(), "runs": golden_run(d)}
  os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
  with open(GOLDEN, "w") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  print("wrote", GOLDEN)
