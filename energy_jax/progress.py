"""Progress bars for the long steps (epochs, decoding, inference, detectors, validation grids)."""

from __future__ import annotations


class _Silent:
  """A bar that shows nothing: for ``enabled=False`` and where tqdm is not installed."""
  n = 0

  def update(self, k: int = 1):
    self.n += k

  def set_postfix(self, **kwargs):
    pass

  def close(self):
    pass


def bar(total: int, desc: str, enabled: bool = True, unit: str = "it"):
  """A tqdm bar of ``total`` steps (left on screen only while it runs), or a silent one (on
  every process but process 0 of a multi-process run too)."""
  from energy_jax import distributed
  if not enabled or not distributed.is_main_process():
    return _Silent()
  try:
    from tqdm import tqdm
  except ImportError:
    return _Silent()
  return tqdm(total=total, desc=desc, unit=unit, leave=False)
