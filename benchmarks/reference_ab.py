"""A/B: the reference's training recipe in PyTorch against energy-jax, on the same data.

Arm "reference" is wetliu/energy_ood's recipe written out in PyTorch: its WRN (the twin of
tests/torch_twin.py with the reference's initialisation), SGD(nesterov, momentum 0.9, weight
decay 5e-4) under LambdaLR(cosine_annealing(step, epochs * len(loader), 1, 1e-6 / lr)) stepped
before the optimiser, a loader that reshuffles each epoch and keeps the last partial batch,
zero-pad-4 random crop + horizontal flip, and for energy fine-tuning 128 ID + 256 outliers in one
forward pass, the outliers a contiguous window from a random offset each epoch. Arm "energy-jax"
is ``train.train_and_evaluate`` with the ``offline`` preset. Both run in float32 on the same
decoded images, with the cosine over the shortened schedule given here.

For each arm: the pretrained model's test error and its energy FPR95 / AUROC on the Tiny-ImageNet
OOD pack (all of it, ID positive, higher -E = more ID), then the same after energy fine-tuning,
and the differences.

Decision rule, fixed before any run: a gap in the pretrained test error under 0.5 points clears
the code; the distance to the paper's 5.16% is then the data's (JPEG-compressed CIFAR-10, and a
shorter schedule when one is given).

  python benchmarks/reference_ab.py --data ../shared/data --pretrain-epochs 20 --finetune-epochs 2
  python benchmarks/reference_ab.py --tiny                 # WRN-10-1 on 1,024 images, CPU minutes
"""

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))        # the PyTorch twin of the reference WRN

import numpy as np  # noqa: E402

from energy_jax import checkpoints, config as config_lib, data, train  # noqa: E402
from energy_jax.data import augment  # noqa: E402
from energy_jax.ood import evaluation, metrics  # noqa: E402

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

  def __init__(self, args, num_classes, device):
    import torch
    from torch_twin import TwinWRN
    self.torch, self.args, self.device = torch, args, device
    torch.manual_seed(args.seed)
    self.rng = np.random.RandomState(args.seed)
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


def jax_arm(args, workdir):
  out = {}
  variables = None
  for stage, epochs in (("pretrain", args.pretrain_epochs), ("finetune", args.finetune_epochs)):
    c = config_lib.get_config("offline", stage)
    c.data_dir = args.data
    c.model.depth, c.model.widen_factor = args.depth, args.widen
    c.epochs, c.seed = epochs, args.seed
    c.train_subset = args.train_subset
    c.batch_size, c.outlier_batch_size = args.batch_size, 2 * args.batch_size
    c.eval_every_epochs, c.checkpoint_every_epochs = epochs, epochs
    c.progress_bar = c.tensorboard = False
    c.steps_per_call = 400
    if stage == "finetune":
      c.pretrained = os.path.join(workdir, "pretrain")
    t0 = time.time()
    train.train_and_evaluate(c, os.path.join(workdir, stage), log=lambda s: None,
                             data_cache=args.cache)
    variables = checkpoints.load_variables(os.path.join(workdir, stage), c)
    scorer = evaluation.Scorer.from_config(c, variables, batch_size=1000)
    out[stage] = {"logits_test": scorer.outputs(args.test.images).logits.astype(np.float64),
                  "logits_ood": scorer.outputs(args.ood.images).logits.astype(np.float64),
                  "seconds": time.time() - t0}
  return out


def reference_arm(args):
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  arm = ReferenceArm(args, args.test.num_classes, device)
  out = {}
  for stage, epochs, lr in (("pretrain", args.pretrain_epochs, 0.1),
                            ("finetune", args.finetune_epochs, 0.001)):
    t0 = time.time()
    arm.train(args.train_set, epochs, lr, args.outliers if stage == "finetune" else None)
    out[stage] = {"logits_test": arm.logits(args.test.images),
                  "logits_ood": arm.logits(args.ood.images), "seconds": time.time() - t0}
  return out


def report(results):
  """Prints the table of both arms, their differences and the verdict of the decision rule."""
  print("\n| arm | stage | test error % | energy FPR95 % (tin32-ood) | AUROC % | seconds |")
  print("|---|---|---|---|---|---|")
  for arm, stages in results.items():
    if arm == "gap_points":
      continue
    for stage, r in stages.items():
      print(f"| {arm} | {stage} | {r['test_error']:.2f} | {r['fpr95']:.2f} | {r['auroc']:.2f} | "
            f"{r['seconds']:.0f} |")
  if "energy-jax" in results and "reference" in results:
    a, b = results["energy-jax"], results["reference"]
    gap = a["pretrain"]["test_error"] - b["pretrain"]["test_error"]
    for stage in ("pretrain", "finetune"):
      print(f"| energy-jax - reference | {stage} | "
            f"{a[stage]['test_error'] - b[stage]['test_error']:+.2f} | "
            f"{a[stage]['fpr95'] - b[stage]['fpr95']:+.2f} | "
            f"{a[stage]['auroc'] - b[stage]['auroc']:+.2f} | |")
    cleared = abs(gap) < DECISION_POINTS
    print(f"\nverdict: the pretrained test-error gap is {gap:+.2f} points: "
          f"{'under' if cleared else 'not under'} {DECISION_POINTS}, "
          f"{'clears the code' if cleared else 'does NOT clear the code'}")
    results["gap_points"] = gap


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=SHARED_DATA)
  p.add_argument("--pretrain-epochs", type=int, default=20)
  p.add_argument("--finetune-epochs", type=int, default=2)
  p.add_argument("--depth", type=int, default=40)
  p.add_argument("--widen", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--train-subset", type=int, default=0)
  p.add_argument("--seed", type=int, default=1)
  p.add_argument("--tiny", action="store_true", help="WRN-10-1 on 1,024 images, 1 + 1 epochs")
  p.add_argument("--arms", default="energy-jax,reference")
  p.add_argument("--out", default="", help="write the results as JSON here")
  p.add_argument("--combine", nargs="+", default=(),
                 help="print the table of arms run apart (their --out files) and stop")
  args = p.parse_args()
  if args.combine:
    results = {}
    for path in args.combine:
      results.update({k: v for k, v in json.load(open(path)).items() if k != "gap_points"})
    report(results)
    return
  if args.tiny:
    args.depth, args.widen, args.train_subset = 10, 1, 1024
    args.pretrain_epochs, args.finetune_epochs = 1, 1
  import jax
  import torch
  print(f"devices: jax {jax.devices()[0].device_kind}, torch "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}; "
        f"WRN-{args.depth}-{args.widen}, {args.pretrain_epochs} + {args.finetune_epochs} epochs, "
        f"float32", flush=True)
  t0 = time.time()
  args.cache = {}
  c = config_lib.get_config("offline", "finetune")
  c.data_dir, c.train_subset, c.seed = args.data, args.train_subset, args.seed
  run_data = data.load_run_data(c, True, args.cache)
  args.train_set, args.test, args.outliers = run_data.train, run_data.test, run_data.outliers
  args.ood = data.load(os.path.join(args.data, "tin32-ood.zip"))
  print(f"data: {len(args.train_set)} train, {len(args.test)} test, {len(args.outliers)} "
        f"outliers, {len(args.ood)} OOD images, decoded in {time.time() - t0:.1f} s", flush=True)
  results = {}
  with tempfile.TemporaryDirectory() as workdir:
    for arm in args.arms.split(","):
      raw = jax_arm(args, workdir) if arm == "energy-jax" else reference_arm(args)
      results[arm] = {stage: {**summary(r["logits_test"], args.test.labels, r["logits_ood"]),
                              "seconds": r["seconds"]} for stage, r in raw.items()}
      print(arm, json.dumps(results[arm]), flush=True)
  report(results)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
