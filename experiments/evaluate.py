"""The paper's OOD table for a checkpoint: MSP, energy, ODIN, Mahalanobis, or any registered detector.

  python experiments/evaluate.py --checkpoint workdirs/cifar10_finetune \
      --config=experiments/configs/finetune.py:cifar10 --ood textures,svhn,places365,lsun_c,lsun_r,isun
  python experiments/evaluate.py --checkpoint cifar10_wrn_pretrained_epoch_99.pt --ood svhn=/data/svhn.npy \
      --detectors=energy,odin --hparam=odin.temperature=1000 --hparam=odin.epsilon=0.0014
  python experiments/evaluate.py --checkpoint=energy_ood:cifar10_energy_ft   # the authors' weights
  python experiments/evaluate.py --checkpoint RUN --detectors=all --validate --grid=openood \
      --ood_positive      # every detector, tuned on OpenOOD's grids, FPR95 as OpenOOD reads it

Any registered model and input size: --config.model.name=..., --config.image_size=....
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _main  # noqa: E402  the scripts' shared --help and command-line checks
from absl import app, flags, logging  # noqa: E402
from energy_jax.ood import protocol  # noqa: E402  (for the bound of --num_to_avg)

DEFAULT_CONFIG = "configs/finetune.py:cifar10"
_main.define_config(DEFAULT_CONFIG, "the model / ID data config")
flags.DEFINE_string("checkpoint", None, "run directory (Orbax), reference .pt, or a name "
                    "such as energy_ood:cifar10_energy_ft (python -m energy_jax.fetch list)",
                    required=True)
flags.DEFINE_list("ood", ["textures", "svhn", "places365", "lsun_c", "lsun_r", "isun"],
                  "OOD sets: paper names (each prepared as the reference does), NAME=SOURCE "
                  "(resized), NAME=SOURCE@as_is, or synthetic:NAME")
flags.DEFINE_list("detectors", ["msp", "energy", "odin", "mahalanobis"],
                  "registered detectors (energy_jax.detectors.names()), or all")
flags.DEFINE_multi_string("hparam", [], "a detector's hyper-parameter, DETECTOR.NAME=VALUE "
                          "(e.g. odin.temperature=1000); validation overrides the tuned ones")
flags.DEFINE_integer("num_to_avg", 10, "draws of len(test)//5 OOD images per set, at most "
                     f"{protocol.MAX_NUM_TO_AVG} (the reference's run.sh: 10)", lower_bound=1)
# Checked as the flags are parsed, after the lower bound (whose message stays absl's own).
flags.register_validator(
    "num_to_avg", lambda n: n is None or n <= protocol.MAX_NUM_TO_AVG,
    f"the draws averaged per OOD set must be an integer in [1, {protocol.MAX_NUM_TO_AVG}] (the "
    "reference makes 10)")
flags.DEFINE_integer("seed", 0, "seed of the draws")


def _check_seed(seed) -> bool:
  from energy_jax import config as config_lib
  try:
    config_lib.check_seed(seed, "--seed")
  except ValueError as e:
    raise flags.ValidationError(str(e))
  return True


flags.register_validator("seed", _check_seed)
flags.DEFINE_bool("validate", False, "tune every detector on its grid, on the synthetic "
                  "validation sets (never the test sets)")
flags.DEFINE_enum("grid", "reference", ["reference", "openood"], "which grids --validate walks: "
                  "the reference's where it has one (else OpenOOD v1.5's), or OpenOOD v1.5's")
flags.DEFINE_bool("ood_positive", False, "FPR95 with OOD as the positive class (OpenOOD, "
                  "pytorch-ood) instead of the reference's ID-positive convention")
flags.DEFINE_bool("progress", True, "progress bars for the long steps")
flags.DEFINE_bool("temperature_ablation", False, "energy score at T = 1 ... 1000")
flags.DEFINE_string("workdir", None, "where results go (default: the checkpoint's folder/eval)")
_main.define_process_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  F = flags.FLAGS
  _main.check_config(F.config)
  from energy_jax import config as config_lib, detectors, storage
  from energy_jax.ood import evaluation, report
  try:
    sources = protocol.parse_ood_list(F.ood)
  except ValueError as e:
    raise app.UsageError(f"--ood: {e}")
  names = list(detectors.names()) if F.detectors == ["all"] else F.detectors
  unknown = [d for d in names if d not in detectors.names()]
  if unknown:
    raise app.UsageError(f"unknown detector(s) {unknown}; choose from {list(detectors.names())}"
                         f"{config_lib.did_you_mean(unknown[0], detectors.names())}")
  hparams = {d: {} for d in names}
  for item in F.hparam:
    key, _, value = item.partition("=")
    det, _, name = key.partition(".")
    if det not in hparams or not name or not value:
      raise app.UsageError(f"--hparam {item!r}: expected DETECTOR.NAME=VALUE for one of {names}")
    hparams[det][name] = value
  try:
    chosen = [detectors.create_from_strings(d, hparams[d]) for d in names]
  except ValueError as e:
    raise app.UsageError(f"--hparam {e}")
  _main.join_processes()
  try:
    checkpoint = storage.check_reachable(F.checkpoint, "--checkpoint")
    if F.workdir:
      storage.check_reachable(F.workdir, "--workdir")
  except (ValueError, OSError) as e:
    raise app.UsageError(str(e))
  _main.check_local_path(F.checkpoint, f"--checkpoint {F.checkpoint}: no such run directory or "
                         ".pt file; name a --workdir of experiments/pretrain.py or finetune.py, "
                         "or a reference .pt file")
  from energy_jax import fetch
  if fetch.is_name(F.checkpoint):     # the authors' weights by name: results beside the runs
    workdir = F.workdir or os.path.join("workdirs", F.checkpoint.replace(":", "_"), "eval")
  else:
    workdir = F.workdir or str(
        (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "eval")
  try:
    evaluation.check_checkpoint(F.checkpoint, "--checkpoint")
    report.check_output_folder(workdir, "--workdir" if F.workdir else
                               "--workdir (default: the checkpoint's folder/eval)")
  except (ValueError, OSError) as e:
    raise app.UsageError(str(e))
  check_sources(F.config, sources, any(d.fit_needs for d in chosen))
  evaluation.run(F.config, F.checkpoint, sources, workdir, chosen, F.num_to_avg, F.seed,
                 F.validate, F.temperature_ablation, grid_source=F.grid,
                 ood_positive=F.ood_positive, progress_bar=F.progress)


def check_sources(config, ood_sets, fits: bool) -> None:
  """Exits naming the first missing path among the sets the evaluation reads: the ID test set,
  the training set (when a detector is fitted on it) and the OOD sets."""
  from energy_jax import config as config_lib
  try:
    config_lib.check_sources_exist(config, ("in_test", "in_train") if fits else ("in_test",))
  except FileNotFoundError as e:
    _main.fail(e)
  for name, spec in ood_sets.items():
    if not spec.source.startswith("synthetic:"):
      problem = config_lib.missing_source(spec.source, config.data_dir)
      if problem:
        _main.fail(f"--ood {name} = {problem}")


if __name__ == "__main__":
  __doc__ = _main.config_help(__doc__, _main.config_spec(sys.argv, DEFAULT_CONFIG))
  _main.start(main)
