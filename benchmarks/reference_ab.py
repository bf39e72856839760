"""A/B: the reference's training recipe in PyTorch against energy-jax, on the same data.

Arm "reference" is wetliu/energy_ood's recipe written out in PyTorch: its WRN (the twin of
tests/torch_twin.py with the reference's initialisation), SGD(nesterov, momentum 0.9, weight
decay 5e-4) under LambdaLR(cosine_annealing(step, epochs * len(loader), 1, 1e-6 / lr)) stepped
before the optimiser, a loader that reshuffles each epoch and keeps the last partial batch,
zero-pad-4 random crop + horizontal flip, and for energy fine-tuning 128 ID + 256 outliers in one
forward pass, the outliers a contiguous window from a random offset each epoch. Arm "energy-jax"
is the ``offline`` preset trained as a sweep whose members are the seeds
(``energy_jax.train.sweep_loop``): pretraining as one sweep of every seed, each seed's
fine-tuning (from its own pretrained member) as a sweep of that member. Both run in float32 on
the same decoded images (the training subset drawn with the first seed), with the cosine over
the shortened schedule given here. The reference arm runs each seed in a process of its own, all
at once. A seed gives a member its initialisation, augmentation and dropout; the energy-jax
members share the order of the images (the first seed's), the reference's seeds each draw
their own.

For each arm and seed: the pretrained model's test error and its energy FPR95 / AUROC on the
Tiny-ImageNet OOD pack (all of it, ID positive, higher -E = more ID), then the same after energy
fine-tuning; each arm's mean ± standard deviation over the seeds, and the gap energy-jax -
reference per seed, as mean ± standard deviation.

Decision rule, fixed before any run: a mean gap in the pretrained test error under 0.5 points
clears the code; the distance to the paper's 5.16% is then the data's (JPEG-compressed
CIFAR-10, and a shorter schedule when one is given).

  python benchmarks/reference_ab.py --data ../shared/data --pretrain-epochs 20 --finetune-epochs 2 \
      --seeds 1,2,3,4
  python benchmarks/reference_ab.py --tiny --seeds 1,2,3,4   # WRN-10-1 on 1,024 images, CPU minutes
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))        # the PyTorch twin of the reference WRN

import numpy as np  # noqa: E402

from energy_jax import checkpoints, config as config_lib, data  # noqa: E402
from energy_jax.data import augment  # noqa: E402
from energy_jax.ood import evaluation, metrics  # noqa: E402
from energy_jax.train import sweep_loop  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
DECISION_POINTS = 0.5


def reference_init(net):
  """The reference WRN's initialisation: conv N(0, sqrt(2 / (k*k*out))), BN 1 / 0, Linear bias 0
  (its Linear weight keeps PyTorch's default)."""
  import torch
  for m in net.modules():
    if isinstance(m, torch.nn.Conv2d):
      n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
      m.weight.data.normal_(0, np.sqrt(2.0 / n))
    elif isinstance(m, torch.nn.BatchNorm2d):
      m.weight.data.fill_(1)
      m.bias.data.zero_()
    elif isinstance(m, torch.nn.Linear):
      m.bias.data.zero_()
  return net


class ReferenceArm:
  """The reference's recipe on device tensors (uint8 data on the device, augmented there)."""

  def __init__(self, args, seed, num_classes, device):
    import torch
    from torch_twin import TwinWRN
    self.torch, self.args, self.device = torch, args, device
    torch.manual_seed(seed)
    self.rng = np.random.RandomState(seed)
    self.net = reference_init(TwinWRN(args.depth, num_classes, args.widen, 0.3)).to(device)
    self.mean = torch.tensor(augment.MEAN, device=device).view(1, 3, 1, 1)
    self.std = torch.tensor(augment.STD, device=device).view(1, 3, 1, 1)

  def _to_device(self, images):
    return self.torch.from_numpy(np.ascontiguousarray(images)).to(self.device)

  def _augment(self, x):
    """RandomCrop(32, padding=4) + RandomHorizontalFlip on a uint8 NHWC batch -> normalised NCHW."""
    torch = self.torch
    n, h, w, _ = x.shape
    x = x.permute(0, 3, 1, 2).float() / 255.0
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), device=x.device)
    dx = torch.randint(0, 9, (n,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])           # [n, h]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])           # [n, w]
    flip = torch.rand(n, device=x.device) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    crop = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]   # [n, h, w, 3]
    return (crop.permute(0, 3, 1, 2) - self.mean) / self.std

  def train(self, train_set, epochs, lr, outliers=None, m_in=-23.0, m_out=-5.0):
    torch, F = self.torch, self.torch.nn.functional
    images, labels = self._to_device(train_set.images), self._to_device(train_set.labels).long()
    out_images = self._to_device(outliers.images) if outliers is not None else None
    n, batch, out_batch = len(train_set), self.args.batch_size, 2 * self.args.batch_size
    steps = -(-n // batch)                        # the DataLoader keeps the last partial batch
    opt = torch.optim.SGD(self.net.parameters(), lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    total = epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 1e-6 / lr + (1 - 1e-6 / lr) * 0.5 * (1 + np.cos(step / total * np.pi)))
    self.net.train()
    for _ in range(epochs):
      order = torch.randperm(n, device=self.device)
      offset = self.rng.randint(len(out_images)) if out_images is not None else 0
      for s in range(steps):
        idx = order[s * batch:(s + 1) * batch]
        x = self._augment(images[idx])
        if out_images is not None:
          o = (offset + torch.arange(s * out_batch, (s + 1) * out_batch, device=self.device))
          x = torch.cat([x, self._augment(out_images[o % len(out_images)])])
        logits = self.net(x)
        sched.step()
        opt.zero_grad()
        k = len(idx)
        loss = F.cross_entropy(logits[:k], labels[idx])
        if out_images is not None:
          e_in = -torch.logsumexp(logits[:k], dim=1)
          e_out = -torch.logsumexp(logits[k:], dim=1)
          loss = loss + 0.1 * (F.relu(e_in - m_in).pow(2).mean()
                               + F.relu(m_out - e_out).pow(2).mean())
        loss.backward()
        opt.step()

  def logits(self, images):
    torch = self.torch
    self.net.eval()
    out = []
    with torch.no_grad():
      for start in range(0, len(images), 1000):
        x = self._to_device(images[start:start + 1000]).permute(0, 3, 1, 2).float() / 255.0
        out.append(self.net((x - self.mean) / self.std).double().cpu().numpy())
    return np.concatenate(out)


def summary(logits_test, labels, logits_ood):
  """Test error (%) and energy FPR95 / AUROC (%) on the OOD set."""
  from scipy.special import logsumexp
  m = metrics.ood_metrics(logsumexp(logits_test, axis=1), logsumexp(logits_ood, axis=1))
  return {"test_error": 100.0 * float(np.mean(logits_test.argmax(1) != labels)),
          "fpr95": 100.0 * m["fpr"], "auroc": 100.0 * m["auroc"]}


def stage_config(args, stage, epochs):
  """The offline preset's config of ``stage`` at this benchmark's size; its seed is the first of
  ``--seeds``, which draws the training subset and the images of every step for all seeds."""
  c = config_lib.get_config("offline", stage)
  c.data_dir = args.data
  c.model.depth, c.model.widen_factor = args.depth, args.widen
  c.epochs, c.seed = epochs, args.seeds[0]
  c.train_subset = args.train_subset
  c.batch_size, c.outlier_batch_size = args.batch_size, 2 * args.batch_size
  c.eval_every_epochs, c.checkpoint_every_epochs = epochs, epochs
  c.progress_bar = c.tensorboard = False
  c.steps_per_call = 400
  return c


def stage_outputs(args, config, run_dir, seconds):
  variables = checkpoints.load_variables(run_dir, config)
  scorer = evaluation.Scorer.from_config(config, variables, batch_size=1000)
  return {"logits_test": scorer.outputs(args.test.images).logits.astype(np.float64),
          "logits_ood": scorer.outputs(args.ood.images).logits.astype(np.float64),
          "seconds": seconds}


def jax_arm(args, workdir):
  """``{seed: {stage: outputs}}``: pretraining as one sweep whose members are the seeds; each
  seed's fine-tuning, which starts from its own pretrained member, as a sweep of that one member
  (the same images, drawn with the first seed). ``seconds``: the whole sweep's, for every
  member."""
  quiet = lambda s: None
  out = {s: {} for s in args.seeds}
  c = stage_config(args, "pretrain", args.pretrain_epochs)
  t0 = time.time()
  pretrained = sweep_loop.train_and_evaluate_sweep(
      c, [{"seed": s} for s in args.seeds], os.path.join(workdir, "pretrain"), log=quiet,
      data_cache=args.cache, choose=False)["members"]
  seconds = time.time() - t0
  for seed, member in zip(args.seeds, pretrained):
    out[seed]["pretrain"] = stage_outputs(args, c, member["workdir"], seconds)
  for seed, member in zip(args.seeds, pretrained):
    c = stage_config(args, "finetune", args.finetune_epochs)
    c.pretrained = member["workdir"]
    t0 = time.time()
    run = sweep_loop.train_and_evaluate_sweep(
        c, [{"seed": seed}], os.path.join(workdir, f"finetune_{seed}"), log=quiet,
        data_cache=args.cache, choose=False)["members"][0]
    out[seed]["finetune"] = stage_outputs(args, c, run["workdir"], time.time() - t0)
  return out


def reference_arm(args):
  """``{seed: {stage: outputs}}`` of the reference's recipe, the seeds one after another."""
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  out = {}
  for seed in args.seeds:
    arm = ReferenceArm(args, seed, args.test.num_classes, device)
    out[seed] = {}
    for stage, epochs, lr in (("pretrain", args.pretrain_epochs, 0.1),
                              ("finetune", args.finetune_epochs, 0.001)):
      t0 = time.time()
      arm.train(args.train_set, epochs, lr, args.outliers if stage == "finetune" else None)
      out[seed][stage] = {"logits_test": arm.logits(args.test.images),
                          "logits_ood": arm.logits(args.ood.images),
                          "seconds": time.time() - t0}
  return out


def reference_processes(args, folder):
  """The reference arm with each seed in a process of its own, all at once; their results."""
  threads = max(1, (os.cpu_count() or 1) // len(args.seeds))
  runs = []
  for seed in args.seeds:
    path = os.path.join(folder, f"reference_{seed}.json")
    command = [sys.executable, os.path.abspath(__file__), "--arms", "reference", "--seeds",
               str(seed), "--subset-seed", str(args.seeds[0]), "--out", path, "--data",
               args.data, "--depth", str(args.depth), "--widen", str(args.widen),
               "--batch-size", str(args.batch_size), "--train-subset", str(args.train_subset),
               "--pretrain-epochs", str(args.pretrain_epochs), "--finetune-epochs",
               str(args.finetune_epochs), "--torch-threads", str(threads)]
    runs.append((seed, path, subprocess.Popen(command, stdout=subprocess.DEVNULL)))
  results = {}
  for seed, path, process in runs:
    if process.wait() != 0:
      raise SystemExit(f"the reference arm of seed {seed} failed (exit {process.returncode}): "
                       f"run {' '.join(process.args)} to see why")
    results.update(json.load(open(path))["reference"])
  return results


def mean_std(values, signed=False):
  """``mean ± std`` over seeds (the sample standard deviation; n/a for one seed)."""
  values = np.asarray(values, np.float64)
  spread = f"{values.std(ddof=1):.2f}" if len(values) > 1 else "n/a"
  return f"{values.mean():{'+' if signed else ''}.2f} ± {spread}"


METRICS = (("test_error", "test error %"), ("fpr95", "energy FPR95 % (tin32-ood)"),
           ("auroc", "AUROC %"))


def report(results):
  """Prints each arm's numbers per seed, their mean ± std over the seeds, the gap between the
  arms (per seed, then mean ± std) and the verdict of the decision rule on the mean gap."""
  arms = [a for a in ("energy-jax", "reference") if a in results]
  print("\n| arm | seed | stage | " + " | ".join(h for _, h in METRICS) + " | seconds |")
  print("|---|---|---|" + "---|" * (len(METRICS) + 1))
  for arm in arms:
    for seed, stages in sorted(results[arm].items()):
      for stage, r in stages.items():
        print(f"| {arm} | {seed} | {stage} | "
              + " | ".join(f"{r[k]:.2f}" for k, _ in METRICS) + f" | {r['seconds']:.0f} |")
  print("\nmean ± std over seeds:\n\n| arm | seeds | stage | "
        + " | ".join(h for _, h in METRICS) + " |")
  print("|---|---|---|" + "---|" * len(METRICS))
  for arm in arms:
    for stage in ("pretrain", "finetune"):
      rows = [st[stage] for st in results[arm].values()]
      print(f"| {arm} | {len(rows)} | {stage} | "
            + " | ".join(mean_std([r[k] for r in rows]) for k, _ in METRICS) + " |")
  if len(arms) < 2:
    return
  a, b = results["energy-jax"], results["reference"]
  seeds = sorted(set(a) & set(b))
  for stage in ("pretrain", "finetune"):
    print(f"| energy-jax - reference (same seed) | {len(seeds)} | {stage} | "
          + " | ".join(mean_std([a[s][stage][k] - b[s][stage][k] for s in seeds], True)
                       for k, _ in METRICS) + " |")
  gaps = [a[s]["pretrain"]["test_error"] - b[s]["pretrain"]["test_error"] for s in seeds]
  gap = float(np.mean(gaps))
  cleared = abs(gap) < DECISION_POINTS
  print(f"\nverdict: the pretrained test-error gap is {mean_std(gaps, True)} points over "
        f"{len(seeds)} seed(s): its mean is {abs(gap):.2f} points from 0, "
        f"{'under' if cleared else 'not under'} {DECISION_POINTS}, "
        f"{'clears the code' if cleared else 'does NOT clear the code'}")
  results["gap_points"] = {"mean": gap, "per_seed": dict(zip(seeds, gaps))}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=SHARED_DATA)
  p.add_argument("--pretrain-epochs", type=int, default=20)
  p.add_argument("--finetune-epochs", type=int, default=2)
  p.add_argument("--depth", type=int, default=40)
  p.add_argument("--widen", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--train-subset", type=int, default=0)
  p.add_argument("--seeds", default="1", help="comma-separated seeds: the energy-jax arm trains "
                 "them as one sweep, the reference arm as one process each, all at once")
  p.add_argument("--subset-seed", type=int, default=None,
                 help="seed of the training subset (default: the first of --seeds)")
  p.add_argument("--torch-threads", type=int, default=0, help="torch's CPU threads (0: its own)")
  p.add_argument("--tiny", action="store_true", help="WRN-10-1 on 1,024 images, 1 + 1 epochs")
  p.add_argument("--arms", default="energy-jax,reference")
  p.add_argument("--out", default="", help="write the results as JSON here")
  p.add_argument("--combine", nargs="+", default=(),
                 help="print the table of arms run apart (their --out files) and stop")
  args = p.parse_args()
  if args.combine:
    results = {}
    for path in args.combine:
      for arm, seeds in json.load(open(path)).items():
        if arm != "gap_points":
          results.setdefault(arm, {}).update(seeds)
    report(results)
    return
  try:
    args.seeds = [int(s) for s in args.seeds.split(",")]
  except ValueError:
    p.error(f"--seeds {args.seeds!r}: expected comma-separated integers such as 1,2,3,4")
  if len(set(args.seeds)) != len(args.seeds):
    p.error(f"--seeds {args.seeds}: a seed is given twice")
  if args.tiny:
    args.depth, args.widen, args.train_subset = 10, 1, 1024
    args.pretrain_epochs, args.finetune_epochs = 1, 1
  import jax
  import torch
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  arms = args.arms.split(",")
  print(f"devices: jax {jax.devices()[0].device_kind}, torch "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}; "
        f"WRN-{args.depth}-{args.widen}, {args.pretrain_epochs} + {args.finetune_epochs} epochs, "
        f"float32, seeds {args.seeds}", flush=True)
  t0 = time.time()
  args.cache = {}
  c = config_lib.get_config("offline", "finetune")
  c.data_dir, c.train_subset = args.data, args.train_subset
  c.seed = args.seeds[0] if args.subset_seed is None else args.subset_seed
  run_data = data.load_run_data(c, True, args.cache)
  args.train_set, args.test, args.outliers = run_data.train, run_data.test, run_data.outliers
  args.ood = data.load(os.path.join(args.data, "tin32-ood.zip"))
  print(f"data: {len(args.train_set)} train, {len(args.test)} test, {len(args.outliers)} "
        f"outliers, {len(args.ood)} OOD images, decoded in {time.time() - t0:.1f} s", flush=True)
  results = {}
  with tempfile.TemporaryDirectory() as workdir:
    for arm in arms:
      if arm == "energy-jax":
        raw = jax_arm(args, workdir)
      elif len(args.seeds) > 1:
        results[arm] = reference_processes(args, workdir)
        print(arm, json.dumps(results[arm]), flush=True)
        continue
      else:
        raw = reference_arm(args)
      results[arm] = {str(seed): {stage: {**summary(r["logits_test"], args.test.labels,
                                                    r["logits_ood"]), "seconds": r["seconds"]}
                                  for stage, r in stages.items()}
                      for seed, stages in raw.items()}
      print(arm, json.dumps(results[arm]), flush=True)
  report(results)
  if args.tiny:
    print("(--tiny: a smoke run of both arms; one epoch on 1,024 images says nothing of the "
          "recipe)")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
