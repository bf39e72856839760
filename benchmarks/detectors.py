"""Every registered detector on one trained model: FPR95 / AUROC per OOD set and their mean, fit
seconds and scoring images/s, as one markdown table per model; and the exact KNN search on a
synthetic feature bank.

  python benchmarks/detectors.py --small --out /tmp/detectors.json        # CPU, a few minutes
  python benchmarks/detectors.py --pretrained W/pretrain --finetuned W/finetune \\
      --data ../shared/data --dtype bfloat16 --knn-bank 1281167,2048       # a GPU
  python benchmarks/detectors.py --knn-only --knn-bank 1281167,2048        # the bank alone

``--small`` trains a WRN-10-1 on generated toy data (pretrained, then energy fine-tuned) and
evaluates both; otherwise the run directories are ``benchmarks/reproduce.py``'s
``<workdir>/pretrain`` and ``<workdir>/finetune`` (config preset "offline", data from ``--data``).
Needs no TensorFlow.

Protocol: detectors at their defaults (OpenOOD v1.5's for CIFAR), fitted on the training set;
the multi-layer Mahalanobis' regression on the validation sets (synthetic corruptions of the ID
test set: arithmetic and geometric means, speckle, pixelate, Gaussian noise); the test OOD sets
are disjoint from them (the real OOD set, uniform noise, jigsaw, RGB shift, invert). FPR95 in
the reference's convention (ID positive), one draw of ``len(test) // 5`` per set (seed 0).
"Fit s": the detector's own fit (the training set's forward pass is shared and not counted).
"img/s": the scoring of all test and OOD images from uint8 pixels, compiled beforehand: the
model's forward pass (measured once) plus the detector's score and metrics, or for the detectors
that take images, their own passes; "score-only img/s" leaves the shared forward pass out.
"""

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from energy_jax import (checkpoints, config as config_lib, data, detectors, inference,  # noqa: E402
                        models, parallel, train)
from energy_jax.data import synthetic, toy  # noqa: E402
from energy_jax.ood import evaluation, metrics  # noqa: E402

VALIDATION = ("arithmetic_mean", "geometric_mean", "speckle", "pixelate", "gaussian_noise")
TEST_SYNTHETIC = ("uniform_noise", "jigsaw", "rgb_shift", "invert")


def small_runs(workdir: str, log):
  """A WRN-10-1 pretrained on toy data, then energy fine-tuned: ``(configs, dirs, ood_real,
  outliers)``."""
  toy_id, toy_out = toy.make_toy_dataset(os.path.join(workdir, "data"), train_per_class=128,
                                         test_per_class=64, num_outliers=512, seed=0)
  configs, dirs = {}, {}
  for stage in ("pretrain", "finetune"):
    c = config_lib.get_config("toy", stage)
    c.in_train = c.in_test = toy_id
    c.outliers = toy_out
    c.num_devices = 1
    c.epochs = 6 if stage == "pretrain" else 3
    c.progress_bar = c.tensorboard = False
    if stage == "finetune":
      c.pretrained = dirs["pretrain"]
    dirs[stage] = os.path.join(workdir, stage)
    t0 = time.time()
    row = train.train_and_evaluate(c, dirs[stage], log=lambda s: None)
    log(f"[train] {stage}: {time.time() - t0:.1f} s, test error {row.get('test_error')}")
    configs[stage] = c
  held_out = toy.outlier_images(256, np.random.default_rng(99))      # not the training outliers
  real = data.ImageSet(held_out, np.zeros(len(held_out), np.int32), ("",), "toy outliers")
  outliers = data.load(toy_out)
  return configs, dirs, ("toy_outliers", real), outliers


def offline_runs(args, log):
  """The reproduction's run directories on the offline packs (preset "offline", the model as the
  run's ``config.json`` records it, computed in ``--dtype``)."""
  configs, dirs = {}, {"pretrain": args.pretrained, "finetune": args.finetuned}
  for stage in ("pretrain", "finetune"):
    c = config_lib.get_config("offline", stage)
    saved = os.path.join(dirs[stage], "config.json")       # the run's architecture
    if os.path.exists(saved):
      c.model = ml_collections.ConfigDict(json.load(open(saved))["model"])
    c.data_dir = args.data
    c.model.dtype = args.dtype
    c.progress_bar = c.tensorboard = False
    configs[stage] = c
  t0 = time.time()
  real = data.load(os.path.join(args.data, "tin32-ood.zip"))
  outliers = data.load(os.path.join(args.data, "tin32-outliers.zip"))
  log(f"[data] OOD and outlier packs decoded in {time.time() - t0:.1f} s")
  return configs, dirs, ("tin32_ood", real), outliers


def benchmark_model(config, run_dir, ood_real, outliers, batch_size, log, decoded):
  variables = checkpoints.load_variables(run_dir, config)
  size = int(config.image_size)
  in_data_dir = lambda source: data.sources.join_data_dir(config.data_dir, source)
  train_set = data.load_cached(decoded, in_data_dir(config.in_train), config.in_train_split or None,
                               size)
  test = data.load_cached(decoded, in_data_dir(config.in_test), config.in_test_split or None, size)
  n = len(test) // 5
  val = {name: synthetic.make_ood_set(name, n, seed=1, base=test) for name in VALIDATION}
  ood = {ood_real[0]: ood_real[1]}
  ood.update({name: synthetic.make_ood_set(name, 2 * n, seed=2, base=test)
              for name in TEST_SYNTHETIC})
  scorer = evaluation.Scorer.from_config(config, variables, batch_size)
  chosen = [detectors.create(name) for name in detectors.names()]
  t0 = time.time()
  train_out = scorer.outputs(train_set.images, blocks=True)
  log(f"[outputs] training set ({len(train_set)} images) in {time.time() - t0:.1f} s")
  scorer.fit(chosen, train_set, (test, val))
  error = float(np.mean(scorer.outputs(test.images).logits.argmax(1) != test.labels))
  # The forward pass, timed once on all evaluated images (compiled by the calls above).
  for o in ood.values():
    scorer.outputs(o.images)                          # cached: no detector's time counts them
  every = np.concatenate([test.images] + [o.images for o in ood.values()])
  t0 = time.perf_counter()
  inference.predict(scorer.model, scorer.variables, every, batch_size, scorer.mesh)
  forward_seconds = time.perf_counter() - t0
  rows = {}
  for det in chosen:
    scorer.score(det, test.images[:batch_size])       # compiles: every batch has this shape
    t0 = time.perf_counter()
    per_set = evaluation.evaluate(scorer, test, ood, [det], num_to_avg=1, seed=0,
                                  log=log)[det.label]
    seconds = time.perf_counter() - t0
    end_to_end = seconds + (0.0 if "images" in det.needs else forward_seconds)
    rows[det.label] = {"per_set": {k: {"fpr": m["fpr"], "auroc": m["auroc"]}
                                   for k, m in per_set.items()},
                       "fit_seconds": scorer.fit_seconds.get(det, 0.0),
                       "images_per_second": len(every) / end_to_end,
                       "score_images_per_second": len(every) / seconds}
  # Margins the pretrained model's energies suggest (ID training images vs the outliers).
  pick = np.random.default_rng(0).permutation(len(outliers))[:10000]
  e_out = -np.asarray(jax.nn.logsumexp(inference.predict(
      scorer.model, scorer.variables, outliers.images[pick], batch_size, scorer.mesh).logits, -1))
  e_in = -np.asarray(jax.nn.logsumexp(train_out.logits, -1))
  try:
    margins = [round(m, 2) for m in metrics.suggest_margins(e_in, e_out)]
  except ValueError as e:
    margins = str(e)
  return {"test_error": error, "num_images": int(len(every)),
          "forward_images_per_second": len(every) / forward_seconds, "detectors": rows,
          "ood_sets": list(ood), "suggested_margins": margins,
          "energy_quantiles": {"in": np.quantile(e_in, [0.05, 0.5, 0.95]).tolist(),
                               "out": np.quantile(e_out, [0.05, 0.5, 0.95]).tolist()},
          "energies": (e_in, e_out)}


def markdown(result) -> str:
  sets = result["ood_sets"]
  head = ("| detector | " + " | ".join(f"{s} FPR95 / AUROC" for s in sets)
          + " | **mean FPR95** | **mean AUROC** | fit s | img/s | score-only img/s |")
  lines = [head, "|---|" + "---|" * (len(sets) + 5)]
  for label, row in result["detectors"].items():
    cells = [f"{100 * row['per_set'][s]['fpr']:.1f} / {100 * row['per_set'][s]['auroc']:.1f}"
             for s in sets]
    mean = row["per_set"]["mean"]
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * mean['fpr']:.2f} | "
                 f"{100 * mean['auroc']:.2f} | {row['fit_seconds']:.2f} | "
                 f"{row['images_per_second']:,.0f} | {row['score_images_per_second']:,.0f} |")
  return "\n".join(lines)


def knn_bank(spec: str, queries: int, memory_bytes: int, log):
  """Fit and scoring time of the exact KNN search on a synthetic ``N x D`` bank on the devices."""
  n, d = (int(v) for v in spec.split(","))
  mesh = parallel.make_mesh() if jax.device_count() > 1 else None
  det = detectors.create("knn", k=50, memory_bytes=memory_bytes, mesh=mesh)
  key_bank, key_query = jax.random.split(jax.random.PRNGKey(0))
  bank = jax.block_until_ready(jax.nn.relu(jax.random.normal(key_bank, (n, d), jax.numpy.float32)))
  t0 = time.perf_counter()
  params = jax.block_until_ready(det.fit(train_features=bank))
  fit_seconds = time.perf_counter() - t0
  del bank
  q = jax.nn.relu(jax.random.normal(key_query, (queries, d), jax.numpy.float32))
  t0 = time.perf_counter()
  jax.block_until_ready(det.score(params, features=q))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(det.score(params, features=q))
  seconds = time.perf_counter() - t0
  chunk = detectors.knn.chunk_rows(queries, params["bank"].shape[0] // (mesh.devices.size if mesh
                                                                         else 1), 50, memory_bytes)
  out = {"bank": [n, d], "bank_gib": n * d * 4 / 2**30, "devices": jax.device_count(),
         "queries": queries, "k": 50, "memory_bytes": memory_bytes, "chunk_rows": chunk,
         "fit_seconds": fit_seconds, "first_call_seconds": first,
         "queries_per_second": queries / seconds}
  log(f"[knn bank] {n:,} x {d} ({out['bank_gib']:.2f} GiB float32) on {out['devices']} device(s): "
      f"fit {fit_seconds:.2f} s; {queries} queries, K=50, chunks of {chunk} rows "
      f"({memory_bytes / 2**20:.0f} MiB): {out['queries_per_second']:,.0f} queries/s "
      f"(first call, compile included: {first:.2f} s)")
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--small", action="store_true", help="train a WRN-10-1 on toy data (CPU)")
  p.add_argument("--pretrained", help="reproduce.py's <workdir>/pretrain")
  p.add_argument("--finetuned", help="reproduce.py's <workdir>/finetune")
  p.add_argument("--data", default=os.path.join(os.path.dirname(REPO), "shared", "data"))
  p.add_argument("--dtype", default="bfloat16", help="the runs' config.model.dtype")
  p.add_argument("--batch-size", type=int, default=0,
                 help="images per scoring batch (default 500; 64 with --small, below every set)")
  p.add_argument("--knn-bank", default="50000,128", help="N,D of the synthetic KNN bank")
  p.add_argument("--knn-queries", type=int, default=1000)
  p.add_argument("--knn-memory-mib", type=int, default=256)
  p.add_argument("--knn-only", action="store_true", help="only the synthetic bank")
  p.add_argument("--out", help="write the results as JSON here")
  p.add_argument("--save-energies", help="write the pretrained model's energies (.npz) here")
  args = p.parse_args()
  if not args.knn_only and not args.small and not (args.pretrained and args.finetuned):
    p.error("give --small, or --pretrained and --finetuned (run directories), or --knn-only")
  log = lambda s: print(s, flush=True)
  device = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
  date = datetime.date.today().isoformat()
  log(f"device: {device}, jax {jax.__version__}, {date}")
  out = {"device": device, "date": date, "command": "python " + " ".join(sys.argv),
         "jax": jax.__version__}
  out["knn_bank"] = knn_bank(args.knn_bank, args.knn_queries, args.knn_memory_mib * 2**20, log)
  if not args.knn_only:
    with tempfile.TemporaryDirectory() as tmp:
      configs, dirs, ood_real, outliers = (small_runs(tmp, log) if args.small
                                           else offline_runs(args, log))
      out["models"] = {}
      batch_size = args.batch_size or (64 if args.small else 500)
      decoded = {}                   # the training and test sets, decoded once for both models
      for stage, label in (("pretrain", "pretrained"), ("finetune", "energy fine-tuned")):
        t0 = time.time()
        result = benchmark_model(configs[stage], dirs[stage], ood_real, outliers,
                                 batch_size, log, decoded)
        energies = result.pop("energies")
        if stage == "pretrain" and args.save_energies:
          np.savez_compressed(args.save_energies, id_train=energies[0].astype(np.float32),
                              outliers=energies[1].astype(np.float32))
        log(f"\n### {label}: test error {100 * result['test_error']:.2f}%, {device}, "
            f"{time.time() - t0:.0f} s\n")
        log(markdown(result))
        slowest = min(result["detectors"].items(), key=lambda kv: kv[1]["images_per_second"])
        log(f"\nslowest: {slowest[0]} at {slowest[1]['images_per_second']:,.0f} images/s; "
            f"the forward pass alone {result['forward_images_per_second']:,.0f} images/s; "
            f"energies (5/50/95%): ID {np.round(result['energy_quantiles']['in'], 2).tolist()}, "
            f"outliers {np.round(result['energy_quantiles']['out'], 2).tolist()}; "
            f"suggested margins {result['suggested_margins']}")
        out["models"][label] = result
        _write(args.out, out)                # after each model: a run cut short keeps the first
  _write(args.out, out)


def _write(path, out):
  if path:
    with open(path, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
