"""The authors' PyTorch WideResNet ``state_dict``s as Flax variables of :mod:`energy_jax.models.wrn`.

The reference publishes ``state_dict``s such as ``cifar10_wrn_pretrained_epoch_99.pt``; reading
the file (``torch`` needed) is :func:`energy_jax.checkpoints.read_torch_state_dict`.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np
from flax import traverse_util

from energy_jax.models.base import lazy_init_variables

_BLOCK_RE = re.compile(r"^block(\d+)\.layer\.(\d+)\.(.+)$")
_RUNNING = {"running_mean": "mean", "running_var": "var"}


def _flax_path(torch_key: str, is_bn: bool) -> Tuple[str, ...]:
  """``block2.layer.0.convShortcut.weight`` -> ``('params', 'block2_layer_0', 'conv_shortcut', 'kernel')``."""
  prefix: Tuple[str, ...] = ()
  key = torch_key
  match = _BLOCK_RE.match(key)
  if match:
    prefix = (f"block{match.group(1)}_layer_{match.group(2)}",)
    key = match.group(3)
  module, leaf = key.rsplit(".", 1)
  module = {"convShortcut": "conv_shortcut"}.get(module, module)
  if leaf in ("running_mean", "running_var"):
    return ("batch_stats", *prefix, module, _RUNNING[leaf])
  if leaf == "weight":
    leaf = "scale" if is_bn else "kernel"
  return ("params", *prefix, module, leaf)


def state_dict_to_variables(state_dict: Mapping[str, Any], model) -> Dict[str, Any]:
  """Converts a reference ``WideResNet.state_dict()`` to ``{'params', 'batch_stats'}``.

  Conv kernels go from OIHW to HWIO and the Linear weight is transposed. A
  ``module.`` prefix (``nn.DataParallel``) is removed; ``num_batches_tracked`` is
  ignored (the momentum update does not use it).

  Raises:
    ValueError: naming every tensor that is missing, unexpected, or of another
      shape than ``model`` (depth, widen factor and class count) needs, and every
      tensor holding NaN or inf (as float32: a float64 beyond its range counts), with
      the count: such weights would load and score every input NaN.
  """
  import jax  # local: keeps the module importable for docs without a backend

  template = jax.eval_shape(lambda: lazy_init_variables(model, jax.random.PRNGKey(0), (32, 32, 3)))
  expected = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda x: tuple(x.shape),
                                                               template))
  arch = (f"WRN-{model.depth}-{model.widen_factor} with {model.num_classes} classes")

  state_dict = {(k[len("module."):] if k.startswith("module.") else k): v
                for k, v in state_dict.items()}
  # A torch module is a BatchNorm exactly when it carries running statistics.
  bn_modules = {k.rsplit(".", 1)[0] for k in state_dict if k.endswith(".running_mean")}
  converted: Dict[Tuple[str, ...], np.ndarray] = {}
  unexpected, non_finite = [], []
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    # A copy: torch.Tensor.numpy() shares memory, and torch updates BN buffers in place. float()
    # first: numpy has no bfloat16 for torch to hand over.
    try:
      array = np.array(value.detach().cpu().float().numpy() if hasattr(value, "detach") else value,
                       dtype=np.float32, copy=True)
    except (TypeError, ValueError) as e:
      raise ValueError(f"state_dict entry {key!r} is no numeric tensor ({type(value).__name__}: "
                       f"{e})") from None
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
      non_finite.append(f"{key} ({bad} of {array.size})")
    path = _flax_path(key, is_bn=key.rsplit(".", 1)[0] in bn_modules)
    if path not in expected:
      unexpected.append(key)
      continue
    if array.ndim == 4:
      array = array.transpose(2, 3, 1, 0)          # OIHW -> HWIO
    elif path[-2] == "fc" and path[-1] == "kernel":
      array = array.T                              # [out, in] -> [in, out]
    if array.shape != expected[path]:
      torch_shape = tuple(np.shape(value))
      raise ValueError(
          f"tensor {key!r} has shape {torch_shape} (as Flax {array.shape}) but "
          f"{arch} needs {expected[path]} at {'/'.join(path)}; check depth, "
          f"widen_factor and num_classes")
    converted[path] = array
  if non_finite:
    raise ValueError(f"state_dict holds non-finite (NaN or inf) values in {len(non_finite)} "
                     f"tensor(s): {', '.join(non_finite)}")
  missing = sorted("/".join(p) for p in expected if p not in converted)
  if unexpected or missing:
    raise ValueError(
        f"state_dict does not match {arch}: missing {missing[:8]}"
        f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all), unexpected "
        f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} in all)")
  return traverse_util.unflatten_dict(converted)
