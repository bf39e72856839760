"""The persistent compilation cache (energy_jax.compilation_cache): where it lives, how it is
turned off, bad folders, and a second process loading what the first compiled."""

import json
import os
import subprocess
import sys
import warnings

import pytest

from energy_jax import compilation_cache, fetch
from conftest import REPO


def test_the_folder_is_the_argument_else_the_variable_else_the_energy_jax_cache(monkeypatch,
                                                                                 tmp_path):
  monkeypatch.delenv(compilation_cache.ENV, raising=False)
  monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
  assert compilation_cache.folder() == str(tmp_path / "cache" / "jax_compilation_cache")
  monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "env"))
  assert compilation_cache.folder() == str(tmp_path / "env")
  assert compilation_cache.folder(str(tmp_path / "flag")) == str(tmp_path / "flag")
  for off in ("", "off", "OFF"):
    assert compilation_cache.folder(off) is None
  monkeypatch.setenv(compilation_cache.ENV, "off")
  assert compilation_cache.folder() is None


def test_a_folder_that_cannot_serve_is_named_or_the_default_falls_back(monkeypatch, tmp_path):
  import jax
  before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
  try:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=f"compilation cache {a_file}: it is a file"):
      compilation_cache.enable(str(a_file))
    # The default folder under a cache that is a file: no cache, a warning, the run goes on.
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    monkeypatch.setenv(fetch.CACHE_ENV, str(a_file))
    with pytest.warns(UserWarning, match="no compilation cache: cannot be made"):
      assert compilation_cache.enable() is None
    assert jax.config.jax_enable_compilation_cache is False
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      assert compilation_cache.enable(str(tmp_path / "ok")) == str(tmp_path / "ok")
    assert jax.config.jax_enable_compilation_cache is True
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "ok")
  finally:
    jax.config.update("jax_enable_compilation_cache", before[0])
    jax.config.update("jax_compilation_cache_dir", before[1])


# A process that compiles one program with the cache as energy-jax sets it up, and prints JAX's
# own count of cache hits and misses.
_COMPILE_ONCE = """
import json, sys
import jax, jax.numpy as jnp
from energy_jax import compilation_cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
print("FOLDER", compilation_cache.enable(sys.argv[1] if len(sys.argv) > 1 else None))
y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.arange(64.0).reshape(8, 8))
print("RESULT", json.dumps({"value": float(y),
                            "hits": events.count("/jax/compilation_cache/cache_hits"),
                            "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _compile_once(env, *args):
  out = subprocess.run([sys.executable, "-c", _COMPILE_ONCE, *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
  return lines["FOLDER"], json.loads(lines["RESULT"])


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="",
             **{compilation_cache.ENV: str(tmp_path / "jcc")})
  folder, first = _compile_once(env)
  assert folder == str(tmp_path / "jcc") and os.listdir(folder)
  assert first["misses"] >= 1 and first["hits"] == 0, first
  _, second = _compile_once(env)
  assert second["hits"] >= 1 and second["misses"] == 0, second
  assert second["value"] == first["value"]
  # Off: nothing read or written.
  folder, off = _compile_once(env, "off")
  assert folder == "None" and off["hits"] == off["misses"] == 0, off
