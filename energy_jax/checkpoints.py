"""Orbax checkpoints of training runs, and loading of pretrained weights.

A run's directory holds ``checkpoints/<epoch>/{state,meta}``: the whole
:class:`~energy_jax.train.TrainState` and a JSON record (epoch, architecture,
whether the run finished). Saves are asynchronous; :meth:`RunCheckpoints.close`
waits for them. Pretrained weights come from such a directory (the latest
epoch) or from the authors' PyTorch ``.pt`` through :mod:`energy_jax.convert`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from energy_jax import convert, models


def architecture(config) -> Dict[str, Any]:
  """``{depth, widen_factor, num_classes}`` of ``config``: what a checkpoint must match."""
  return {"depth": int(config.depth), "widen_factor": int(config.widen_factor),
          "num_classes": int(config.num_classes)}


class RunCheckpoints:
  """Per-epoch checkpoints of one run, keeping the last ``max_to_keep``."""

  def __init__(self, workdir: str, max_to_keep: int = 2, save_every: int = 1):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             save_interval_steps=max(1, save_every)))

  def latest_epoch(self) -> Optional[int]:
    """The newest saved epoch (0-based), or None for an empty run."""
    return self.manager.latest_step()

  def should_save(self, epoch: int) -> bool:
    """Whether :meth:`save` (without ``force``) would write ``epoch``."""
    return self.manager.should_save(epoch)

  def save(self, epoch: int, state, meta: Dict[str, Any], force: bool = False) -> bool:
    """Saves ``state`` and the JSON ``meta`` asynchronously; ``force`` ignores the save interval."""
    return self.manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, target_state, epoch: Optional[int] = None) -> Tuple[Any, Dict[str, Any]]:
    """``(state, meta)`` of ``epoch`` (default: latest), shaped like ``target_state``."""
    epoch = self.latest_epoch() if epoch is None else epoch
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target_state)
    out = self.manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def read_meta(self, epoch: Optional[int] = None) -> Dict[str, Any]:
    """The JSON record of ``epoch`` (default: latest) without reading the arrays."""
    epoch = self.latest_epoch() if epoch is None else epoch
    return self.manager.restore(epoch, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def close(self):
    """Waits for pending asynchronous saves, then releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def _check_architecture(found: Dict[str, Any], config, source: str):
  want = architecture(config)
  diff = {k: (found.get(k), v) for k, v in want.items() if found.get(k) != v}
  if diff:
    detail = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
    raise ValueError(f"checkpoint {source} does not match the configured model ({detail})")


def load_variables(path: str, config) -> Dict[str, Any]:
  """``{'params', 'batch_stats'}`` from a run directory (latest epoch), its
  ``checkpoints/`` folder, or a PyTorch ``.pt`` state_dict, checked against ``config``."""
  if not path:
    raise ValueError("no pretrained checkpoint given (config.pretrained is empty)")
  if not os.path.exists(path):
    raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
  if os.path.isfile(path):
    return convert.load_torch_checkpoint(path, models.from_config(config))
  workdir = os.path.dirname(path.rstrip("/")) if os.path.basename(
      path.rstrip("/")) == "checkpoints" else path
  ckpts = RunCheckpoints(workdir)
  try:
    epoch = ckpts.latest_epoch()
    if epoch is None:
      raise FileNotFoundError(f"{path} holds no Orbax checkpoint (looked in {ckpts.directory})")
    meta = ckpts.read_meta(epoch)
    _check_architecture(meta.get("architecture", {}), config, f"{ckpts.directory}/{epoch}")
    restored = ckpts.manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
  finally:
    ckpts.close()
  return {"params": restored["params"], "batch_stats": restored["batch_stats"]}
