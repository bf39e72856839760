"""Orbax checkpoints of training runs, and loading of pretrained weights.

A run's directory holds ``checkpoints/<epoch>/{state,meta}``: the whole
:class:`~energy_jax.train.TrainState` and a JSON record (:func:`run_meta`: the package version,
the run format, the config, the model's architecture, the epoch and whether the run finished).
Saves are asynchronous; :meth:`RunCheckpoints.close` waits for them. Pretrained weights come from
such a directory (the latest epoch) or from a PyTorch ``.pt`` ``state_dict`` converted by the
model's registered converter (the reference's WRN checkpoints for ``"wrn"``).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from energy_jax import __version__, models

# The training recipe's numbers: a change that alters them bumps it, and a run saved under
# another format is not resumed (its remaining epochs would follow other rules).
RUN_FORMAT = 3


def run_meta(config, epoch: int, finished: bool, row: Dict[str, Any]) -> Dict[str, Any]:
  """The JSON record saved beside each state."""
  return {"epoch": epoch, "finished": finished, "version": __version__, "format": RUN_FORMAT,
          "architecture": models.architecture(config), "objective": config.objective,
          "config": config.to_dict(), "results": row}


def architecture_of(meta: Mapping[str, Any]) -> Dict[str, Any]:
  """The architecture a checkpoint's meta records (energy-jax 0.1 runs: a WRN on 32x32)."""
  found = dict(meta.get("architecture", {}))
  if "name" not in found:
    found.update(name="wrn", image_size=32)
  return found


class RunCheckpoints:
  """Per-epoch checkpoints of one run, keeping the last ``max_to_keep``."""

  def __init__(self, workdir: str, max_to_keep: int = 2, save_every: int = 1,
               read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                             read_only=read_only,
                                             save_interval_steps=max(1, save_every)))

  def __enter__(self) -> "RunCheckpoints":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

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

  def restore(self, target_state, epoch: Optional[int] = None,
              sharding=None) -> Tuple[Any, Dict[str, Any]]:
    """``(state, meta)`` of ``epoch`` (default: latest), shaped like ``target_state`` and placed
    with ``sharding`` (e.g. replicated over a global mesh) when given."""
    epoch = self.latest_epoch() if epoch is None else epoch
    abstract = jax.tree_util.tree_map(
        lambda x: (jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) if sharding
                   else ocp.utils.to_shape_dtype_struct(x)), target_state)
    out = self.manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_variables(self, epoch: Optional[int] = None) -> Dict[str, Any]:
    """``{'params', 'batch_stats'}`` of ``epoch`` (default: latest), as saved."""
    epoch = self.latest_epoch() if epoch is None else epoch
    state = self.manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
    return {"params": state["params"], "batch_stats": state["batch_stats"]}

  def read_meta(self, epoch: Optional[int] = None) -> Dict[str, Any]:
    """The JSON record of ``epoch`` (default: latest) without reading the arrays."""
    epoch = self.latest_epoch() if epoch is None else epoch
    return self.manager.restore(epoch, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def close(self):
    """Waits for pending asynchronous saves, then releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def read_torch_state_dict(path: str) -> Mapping[str, Any]:
  """A ``.pt`` ``state_dict``, read with ``torch.load(weights_only=True)``: no pickled code runs.
  A ``module.`` prefix (``nn.DataParallel``) is left for the converter."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("reading .pt checkpoints needs torch: pip install 'energy_jax[torch]'") from e
  try:
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for truncated / foreign files
    raise ValueError(f"cannot read PyTorch checkpoint {path}: {type(e).__name__}: {e}") from e
  if isinstance(state_dict, Mapping) and "state_dict" in state_dict:
    state_dict = state_dict["state_dict"]
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state_dict")
  return state_dict


def load_torch_checkpoint(path: str, config) -> Dict[str, Any]:
  """``{'params', 'batch_stats'}`` of ``config``'s model from a PyTorch ``.pt`` file, through
  the model's registered converter."""
  entry = models.get(config.model.name)
  if entry.from_torch is None:
    raise ValueError(f"model {config.model.name!r} has no PyTorch converter registered; "
                     f"{path} cannot be read")
  return entry.from_torch(read_torch_state_dict(path), models.from_config(config))


def load_variables(path: str, config) -> Dict[str, Any]:
  """``{'params', 'batch_stats'}`` from a run directory (latest epoch), its ``checkpoints/``
  folder, or a PyTorch ``.pt`` state_dict, checked against ``config``'s model."""
  if not path:
    raise ValueError("no pretrained checkpoint given (config.pretrained is empty)")
  if not os.path.exists(path):
    raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
  if os.path.isfile(path):
    return load_torch_checkpoint(path, config)
  workdir = os.path.dirname(path.rstrip("/")) if os.path.basename(
      path.rstrip("/")) == "checkpoints" else path
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):   # read, never created
    raise FileNotFoundError(f"{path} holds no Orbax checkpoint (no folder "
                            f"{os.path.join(workdir, 'checkpoints')})")
  with RunCheckpoints(workdir, read_only=True) as ckpts:     # an input: never written to
    epoch = ckpts.latest_epoch()
    if epoch is None:
      raise FileNotFoundError(f"{path} holds no Orbax checkpoint (looked in {ckpts.directory})")
    models.check_architecture(architecture_of(ckpts.read_meta(epoch)), config,
                              f"{ckpts.directory}/{epoch}")
    return ckpts.restore_variables(epoch)
