"""What may change when a run is resumed: the fields that do not change its numbers.

Resuming a run under a config that differs in any other field (learning rate, seed, epochs,
data, model, ...) would continue a different run; it is refused, naming each changed field,
unless ``config.resume_override`` lists it (comma-separated, e.g.
``--config.resume_override=epochs,optimizer.learning_rate``).

Margins a run computed from "auto" (``objective.auto_margins``, :mod:`energy_jax.train.margins`)
are its own: "auto" on the command line of the resumed run stands for the numbers the run saved.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import ml_collections

from energy_jax import config as config_lib

# How a run is watched, evaluated and laid out on the hardware: free to change on resume.
MAY_CHANGE = ("progress_bar", "tensorboard", "eval_every_epochs", "eval_batch_size",
              "checkpoint_every_epochs", "keep_checkpoints", "num_devices", "member_groups",
              "steps_per_call", "scan_unroll", "data_dir", "resume_override")


def _flat(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """``{dotted name: value}``, tuples as the lists a config saved as JSON holds."""
  return {name: list(value) if isinstance(value, tuple) else value
          for name, value in config_lib.flat_items(config)}


def check_resumable(saved: Mapping[str, Any], config, source: str) -> None:
  """Raises naming every field where ``config`` differs from the ``saved`` config of the run at
  ``source``, other than :data:`MAY_CHANGE` and those ``config.resume_override`` lists."""
  old = [m for k, v in saved.items() if (m := config_lib.renamed_key(k, v))]
  if old:
    raise ValueError(f"{source} was started by an earlier energy-jax, whose config keys were "
                     f"renamed since ({', '.join(old)}): finish it with that version, or start a "
                     "new --workdir (as --config.pretrained, its model loads as it is)")
  now = _flat(config)
  then = _flat(ml_collections.ConfigDict(dict(saved)))
  # auto_margins records how the run got its margins.
  computed = config_lib.field_names(then.pop("objective.auto_margins", ""))
  now.pop("objective.auto_margins", None)
  for name in computed:
    if now.get(f"objective.{name}") == config_lib.AUTO:
      now[f"objective.{name}"] = then.get(f"objective.{name}")
  allowed = set(MAY_CHANGE) | set(config_lib.field_names(config.get("resume_override", "")))
  changed = [f"{k}: {then.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}"
             for k in sorted(set(now) | set(then))
             if k not in allowed and then.get(k) != now.get(k)]
  if changed:
    raise ValueError(f"{source} was started with another config; resuming would continue a "
                     f"different run. Changed: {'; '.join(changed)}. Restore those values, "
                     "start a new --workdir, or list the fields in config.resume_override")
