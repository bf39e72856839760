"""End-to-end reproduction on the offline packs: pretrain, energy fine-tune, evaluate; wall time per stage.

  python benchmarks/reproduce.py --data ../shared/data --workdir /tmp/repro          # paper schedule
  python benchmarks/reproduce.py --data ../shared/data --smoke                      # CPU check
  python benchmarks/reproduce.py --overlap-compile ...   # compile in a thread, overlapped

Pretraining: WRN-40-2, 100 epochs, batch 128, lr 0.1; fine-tuning: 10 epochs, 128 + 256,
lr 0.001, m_in -23, m_out -5; both device-resident, bf16 compute by default. Evaluation:
MSP and energy (T=1) of both models on the Tiny-ImageNet OOD pack and synthetic sets.
Needs no TensorFlow. Adds convolutions to XLA's CUDA graphs (``GPU_CONV_GRAPHS``) unless
``--no-gpu-conv-graphs`` or ``XLA_FLAGS`` already choose the command types.
"""

import time

T_LAUNCH = time.time()                 # before the imports: the total counts them too

import argparse  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Callable, List, Optional  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402

from energy_jax import (checkpoints, config as config_lib, data, detectors,  # noqa: E402
                        train)
from energy_jax.data import synthetic  # noqa: E402
from energy_jax.ood import evaluation, report  # noqa: E402
from energy_jax import objectives  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
# Convolutions in XLA's CUDA graphs: on an H200 the pretraining step ran at 32.6k images/s
# instead of 31.5k and compiled in 19.8 s instead of 23.3 s (docs/logs/2026-11-26_h200_tuned.log).
# XLA:CPU parses the flag and ignores it. Not for a process that compiles with TensorFlow's own XLA (2.21
# rejects the value); this script uses no TensorFlow.
GPU_CONV_GRAPHS = "--xla_gpu_enable_command_buffer=+CONVOLUTION"


def with_gpu_conv_graphs(xla_flags: str) -> str:
  """``xla_flags`` plus :data:`GPU_CONV_GRAPHS`, unless they set the command types already."""
  if "--xla_gpu_enable_command_buffer" in xla_flags:
    return xla_flags
  return f"{xla_flags} {GPU_CONV_GRAPHS}".strip()


class BackgroundCompile(threading.Thread):
  """Runs compile jobs one after the other in a daemon thread (XLA compiles without holding
  the GIL, so the main thread decodes data or trains meanwhile). ``wait(i)`` blocks until job
  ``i`` is done and re-raises, in the caller's thread, the error of job ``i`` or of an earlier
  job (after a failure the later jobs do not run)."""

  def __init__(self, jobs: List[Callable[[], None]]):
    super().__init__(daemon=True)
    self.jobs = list(jobs)
    self.done = [threading.Event() for _ in self.jobs]
    self.seconds = [0.0] * len(self.jobs)
    self.error: Optional[BaseException] = None
    self.failed_job: Optional[int] = None
    self.start()

  def run(self):
    for i, job in enumerate(self.jobs):
      t0 = time.time()
      try:
        job()
      except BaseException as e:  # re-raised by wait()
        self.error, self.failed_job = e, i
        for event in self.done[i:]:
          event.set()
        return
      self.seconds[i] = time.time() - t0
      self.done[i].set()

  def wait(self, i: int = -1) -> float:
    """Blocks until job ``i`` (default: the last) is compiled; returns the seconds waited."""
    i = i % len(self.jobs)
    t0 = time.time()
    self.done[i].wait()
    if self.failed_job is not None and self.failed_job <= i:
      raise RuntimeError(f"compiling in the background failed (job {self.failed_job}"
                         f"{'' if self.failed_job == i else f', before job {i}'})") from self.error
    return time.time() - t0


def compile_jobs(stage, config):
  """``{name: job}`` of the stage, for the image counts of its sources (nothing decoded): what
  the run compiles before its first epoch (:func:`energy_jax.train.compile_run`, which the run
  calls too and then finds compiled), then its test-set evaluation (needed only later; the
  fine-tuning stage finds pretraining's where the model and batch are the same)."""
  uses_outliers = objectives.get(config.objective.name).uses_outliers
  num_train, num_test, num_outliers = data.count_run_data(config, uses_outliers)
  return {f"{stage} state + epoch": functools.partial(train.compile_run, config, num_train,
                                                      num_test, num_outliers, evaluation=False),
          f"{stage} evaluation": functools.partial(train.compile_evaluation, config, num_test)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=SHARED_DATA)
  p.add_argument("--workdir", default="/tmp/energy_jax_reproduce")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--pretrain-epochs", type=int, default=100)
  p.add_argument("--finetune-epochs", type=int, default=10)
  p.add_argument("--smoke", action="store_true", help="WRN-10-1 on 2k images, 1+1 epochs")
  p.add_argument("--num-to-avg", type=int, default=5)
  p.add_argument("--overlap-compile", action="store_true",
                 help="compile both stages in a thread, pretraining while the data decode and "
                      "fine-tuning while pretraining runs; the runs reuse the executables")
  p.add_argument("--unroll", type=int, default=0,
                 help="config.scan_unroll of the fused epoch (0: unrolled on CPU only)")
  p.add_argument("--eval-every", type=int, default=0,
                 help="test-set evaluation every N epochs during training, and after the last "
                      "(default 0: after the last only)")
  p.add_argument("--no-gpu-conv-graphs", action="store_true",
                 help=f"leave XLA_FLAGS as they are (default: add {GPU_CONV_GRAPHS})")
  args = p.parse_args()
  if args.eval_every < 0:
    p.error(f"--eval-every must be >= 0, got {args.eval_every}")
  if not args.no_gpu_conv_graphs:     # XLA reads its flags when the backend starts, just below
    os.environ["XLA_FLAGS"] = with_gpu_conv_graphs(os.environ.get("XLA_FLAGS", ""))
  t_start = time.time()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
        f"prng {jax.config.jax_default_prng_impl}, unroll {args.unroll}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)

  def stage_config(stage):
    c = config_lib.get_config("offline", stage)
    c.data_dir = args.data
    c.model.dtype = args.dtype
    c.progress_bar = False
    c.tensorboard = False             # the GPU machines have no TensorFlow; the CSV/JSONL stay
    c.steps_per_call = 400            # a whole epoch (390 steps) as one compiled loop
    c.scan_unroll = args.unroll
    c.checkpoint_every_epochs = 10
    c.epochs = args.pretrain_epochs if stage == "pretrain" else args.finetune_epochs
    c.eval_every_epochs = args.eval_every or c.epochs
    if args.smoke:
      c.model.depth, c.model.widen_factor, c.train_subset, c.epochs = 10, 1, 2048, 1
      c.steps_per_call = 8
    return c

  times = {}
  decoded = {}                        # each source is decoded once for all three stages
  ood_pack = os.path.join(args.data, "tin32-ood.zip")

  pre_dir = os.path.join(args.workdir, "pretrain")
  ft_dir = os.path.join(args.workdir, "finetune")
  for d in (pre_dir, ft_dir):
    # Checked before anything starts: a refusal later would come after minutes of compiling.
    if os.path.isdir(d) and os.listdir(d):
      p.error(f"{d} is not empty: reproduce.py times both runs from scratch, so give a new or "
              "empty --workdir (nothing was deleted)")
  pre_cfg = stage_config("pretrain")
  ft_cfg = stage_config("finetune")
  ft_cfg.pretrained = pre_dir
  ahead = None
  if args.overlap_compile:
    t0 = time.time()
    # One thread compiles, in this order: pretraining's state and epoch (while the data decode),
    # its evaluation, fine-tuning's state and epoch, its evaluation (while pretraining runs).
    jobs = {**compile_jobs("pretrain", pre_cfg), **compile_jobs("finetune", ft_cfg)}
    ahead = BackgroundCompile(list(jobs.values()))
    data.load_run_data(ft_cfg, True, decoded)
    data.load_cached(decoded, ood_pack)   # free while the pretraining epoch compiles
    times["data (all, up front)"] = time.time() - t0

  for stage, cfg, workdir in (("pretrain", pre_cfg, pre_dir), ("finetune", ft_cfg, ft_dir)):
    if ahead is not None:
      try:
        job = list(jobs).index(f"{stage} state + epoch")   # its evaluation is needed later
        waited = ahead.wait(job)
        print(f"[stage] {stage} state + epoch compiled ahead in {ahead.seconds[job]:.1f} s "
              f"(waited {waited:.1f} s for it)", flush=True)
        times[f"{stage} compile wait"] = waited
      except RuntimeError as e:       # the run compiles what it needs itself: slower, not wrong
        print(f"[stage] WARNING: compiling {stage} ahead failed ({e.__cause__!r}); the run "
              "compiles it itself", flush=True)
    t0 = time.time()
    row = train.train_and_evaluate(cfg, workdir, data_cache=decoded)
    times[stage] = time.time() - t0
    print(f"[stage] {stage}: {times[stage]:.1f} s, test error {row.get('test_error')}", flush=True)

  t0 = time.time()
  test = data.load_run_data(ft_cfg, True, decoded).test     # decoded already
  ood = {"tin32_ood": data.load_cached(decoded, ood_pack)}
  n = len(test) // 5
  for name in ("uniform_noise", "gaussian_noise", "jigsaw", "rgb_shift", "invert"):
    ood[name] = synthetic.make_ood_set(name, n * 2, seed=1, base=test)
  t_load = time.time() - t0
  chosen = [detectors.create("msp"), detectors.create("energy", temperature=1.0)]
  t0 = time.time()
  for label, cfg, workdir in (("baseline (pretrained)", pre_cfg, pre_dir),
                              ("energy fine-tuned", ft_cfg, ft_dir)):
    variables = checkpoints.load_variables(workdir, cfg)
    # The training runs' evaluation batch: the compiled forward pass is reused.
    scorer = evaluation.Scorer.from_config(cfg, variables, cfg.eval_batch_size)
    logits = scorer.outputs(test.images).logits
    result = evaluation.classification_report(logits, test.labels)
    results = evaluation.evaluate(scorer, test, ood, chosen, num_to_avg=args.num_to_avg)
    print(f"\n### {label}: test error {100 * result['error']:.2f}%\n")
    print(report.markdown_table(results, list(ood)), flush=True)
    report.save_results(results, workdir, {"classification": result})
  times["evaluate"] = time.time() - t0
  times["eval data"] = t_load
  if ahead is not None:
    try:
      ahead.wait()
    except RuntimeError:
      pass                             # said above, where a run needed the job
    print("[compile ahead] " + ", ".join(f"{n} {t:.1f} s" for n, t in zip(jobs, ahead.seconds)),
          flush=True)
  now = time.time()
  print("\n[times] " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
        + f", total {now - T_LAUNCH:.1f} s from launch ({t_start - T_LAUNCH:.1f} s imports and "
        f"device start, then {now - t_start:.1f} s)", flush=True)


if __name__ == "__main__":
  main()
