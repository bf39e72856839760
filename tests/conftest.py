"""Test setup: 8 virtual CPU devices for the data-parallel tests, TF kept off accelerators."""

import os
import sys

# Appended to the caller's XLA_FLAGS, so that e.g. --xla_cpu_max_isa=SSE4_2 (another CPU's
# instruction set) keeps the 8 devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
sys.path.insert(0, REPO)

# One compilation cache for the tests, their scripts and notebooks (they inherit the variable), in
# the checkout rather than the user's ~/.cache: most tests compile the same tiny programs, and the
# heavy tier's processes load what the fast tier compiled.
os.environ.setdefault("ENERGY_JAX_COMPILATION_CACHE",
                      os.path.join(REPO, ".pytest_cache", "jax_compilation_cache"))
from energy_jax import compilation_cache  # noqa: E402

compilation_cache.enable()


def shared_pack(name: str) -> str:
  """Path of an offline pack in ../shared/data, or a skip naming what is missing."""
  path = os.path.join(SHARED_DATA, name)
  if not os.path.exists(path):
    pytest.skip(f"offline data pack {path} is absent on this machine")
  return path
