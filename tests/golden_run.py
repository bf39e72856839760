"""The golden tiny run: pretrain, energy / OE fine-tune and evaluate a WRN-10-1 on generated data,
on both input paths, and summarise what came out (per-epoch losses, hashes of the final
variables, the evaluation table). ``tests/test_golden.py`` compares a fresh run against the
summary stored in ``tests/data/golden_tiny_run.json``.

``python tests/golden_run.py`` rewrites that file (only when a change is meant to alter the
numbers; the commit says which): the run on this machine, the fingerprint of this machine, and
the tolerances for other machines. XLA:CPU emits different code for different instruction sets,
so another CPU computes the same run with other rounding. The same run is repeated here with
XLA:CPU held to smaller instruction sets (``--xla_cpu_max_isa``), standing in for other CPUs;
the largest difference from the recording, per quantity, is stored as the measured spread, and
the tolerance is a multiple of it (:func:`tolerances`)."""

import hashlib
import json
import os
import platform
import re
import subprocess
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


PIPELINES = ("device", "tfdata")


def golden_run(workdir: str, pipelines=PIPELINES) -> dict:
  """The summary of the runs on ``pipelines`` (keys ``"<pipeline>/<run>"``)."""
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
    c.steps_per_call = 1
    c.model.dropout_rate = 0.3
    c.seed = 5
    c.update_from_flattened_dict(kw)
    return c

  out = {}
  test = data.load(toy_id, "test")
  ood = {"noise": synthetic.make_ood_set("uniform_noise", 24, seed=1),
         "jigsaw": synthetic.make_ood_set("jigsaw", 24, seed=1, base=test)}
  chosen = [detectors.create("msp"), detectors.create("energy", temperature=1.0),
            detectors.create("odin", temperature=10.0, epsilon=0.002),
            detectors.create("mahalanobis", epsilon=0.001)]
  for pipeline in pipelines:
    runs = {"pretrain": config("pretrain", pipeline, epochs=2),
            "energy": config("finetune", pipeline, epochs=2),
            "oe": config("finetune", pipeline, epochs=1, **{"objective.name": "oe"})}
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


# XLA:CPU instruction sets that stand in for other CPUs when the spread is measured.
ISA_VARIANTS = ("SSE4_2", "AVX", "AVX2")
# CPU features that change the code XLA:CPU emits (x86-64, then arm64), as /proc/cpuinfo names them.
XLA_CPU_FEATURES = frozenset(
    "sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512cd avx512bw avx512dq avx512vl avx512_vnni "
    "avx512_bf16 avx512_fp16 avx_vnni amx_tile amx_bf16 amx_int8 "
    "asimd asimdhp asimddp sve sve2 bf16 i8mm".split())
# A tolerance is this many times the largest difference measured across ISA_VARIANTS, and never
# below one float32 rounding (relative), one step of a metric (FPR over 2 draws of 12 OOD images)
# or one test image.
SPREAD_FACTOR = 10
FLOAT32_EPS = float(np.finfo(np.float32).eps)
METRIC_STEP = 1 / 24


def _cpuinfo() -> dict:
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return info


def fingerprint() -> dict:
  """What decides the bits of the run: the JAX build, the backend, the CPU's model and the
  instruction sets XLA:CPU may use (capped by ``--xla_cpu_max_isa`` in XLA_FLAGS)."""
  import jaxlib
  info = _cpuinfo()
  flags = set((info.get("flags") or info.get("Features") or "").split())
  max_isa = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "platform": jax.default_backend(), "machine": platform.machine(),
          "cpu": info.get("model name") or info.get("CPU part") or platform.processor(),
          "cpu_features": sorted(flags & XLA_CPU_FEATURES),
          "xla_cpu_max_isa": max_isa.group(1) if max_isa else None}


def _numbers(runs: dict, path=()):
  """``{(run, key, ...): float}`` of every number in a summary (hashes and strings left out)."""
  out = {}
  items = runs.items() if isinstance(runs, dict) else enumerate(runs)
  for k, v in items:
    if isinstance(v, (dict, list)):
      out.update(_numbers(v, path + (k,)))
    elif isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)):
      out[path + (k,)] = float(v)
  return out


def kind(key: tuple) -> str:
  """Which tolerance a number of the summary takes: ``evaluation`` (rank metrics, absolute),
  ``test_error`` (percent of the test images, absolute), else ``relative`` (losses and sums of
  variables, relative to ``max(|value|, 1)``: a sum near zero is compared absolutely)."""
  return ("evaluation" if "evaluation" in key else "test_error" if "test_error" in key
          else "relative")


def spread(reference: dict, others) -> dict:
  """The largest difference of each :func:`kind` between ``reference`` and any of ``others``
  (relative for ``relative``, absolute otherwise)."""
  want = _numbers(reference)
  out = {"relative": 0.0, "evaluation": 0.0, "test_error": 0.0}
  for other in others:
    got = _numbers(other)
    assert got.keys() == want.keys()
    for key, w in want.items():
      d = abs(got[key] - w)
      if kind(key) == "relative":
        d /= max(abs(w), 1.0)
      out[kind(key)] = max(out[kind(key)], d)
  return out


def tolerances(measured: dict, num_test: int) -> dict:
  """SPREAD_FACTOR times each measured spread, at least one float32 rounding (relative), one
  metric step (evaluation) or one test image (test_error, in percent)."""
  return {"relative": max(SPREAD_FACTOR * measured["relative"], FLOAT32_EPS),
          "evaluation": max(SPREAD_FACTOR * measured["evaluation"], METRIC_STEP),
          "test_error": max(SPREAD_FACTOR * measured["test_error"], 100 / num_test)}


def _run_in_subprocess(xla_flags: str) -> dict:
  """The golden run in a fresh process under ``xla_flags`` (its runs and fingerprint)."""
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "summary.json")
    print("golden run with XLA_FLAGS =", xla_flags, flush=True)
    env = dict(os.environ, XLA_FLAGS=xla_flags)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--summary-only", out],
                   env=env, check=True)
    with open(out) as f:
      return json.load(f)


def _with_devices(flags: str) -> str:
  # The environment of the tests (tests/conftest.py): 8 host devices.
  return (flags + " --xla_force_host_platform_device_count=8").strip()


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(HERE))
  if sys.argv[1:2] == ["--summary-only"]:
    with tempfile.TemporaryDirectory() as d:
      summary = {"fingerprint": fingerprint(), "runs": golden_run(d)}
    with open(sys.argv[2], "w") as f:
      json.dump(summary, f)
    sys.exit(0)
  base_flags = os.environ.get("XLA_FLAGS", "")
  recorded = _run_in_subprocess(_with_devices(base_flags))
  variants = {isa: _run_in_subprocess(_with_devices(f"{base_flags} --xla_cpu_max_isa={isa}"))
              for isa in ISA_VARIANTS}
  measured = spread(recorded["runs"], [v["runs"] for v in variants.values()])
  for isa, v in variants.items():
    print(f"--xla_cpu_max_isa={isa}: largest difference {spread(recorded['runs'], [v['runs']])}")
  summary = {"fingerprint": recorded["fingerprint"], "runs": recorded["runs"],
             "spread": {"measured": measured, "isa_variants": list(ISA_VARIANTS),
                        "factor": SPREAD_FACTOR},
             "tolerance": tolerances(measured, num_test=64)}
  os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
  with open(GOLDEN, "w") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  print("measured spread", measured, "\ntolerances", summary["tolerance"], "\nwrote", GOLDEN)
