"""benchmarks/sweep.py: reading train_step.py's output, the pick, and the export lines."""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import sweep  # noqa: E402

OUTPUT = """device: NVIDIA H200 (gpu), jax 0.11.2, prng threefry2x32, unroll None, XLA_FLAGS=''
  pretrain jax bfloat16: 31198 img/s; first call (compile) 27.5 s
pretrain  WRN-40-2 128+0   jax bfloat16                    31198 img/s
"""


def test_parse_reads_the_stage_line():
  assert sweep.parse(OUTPUT, "pretrain") == {"img_s": 31198.0, "first_call_s": 27.5}
  assert sweep.parse(OUTPUT, "finetune") is None
  assert sweep.parse("Traceback ...", "pretrain") is None


def result(img_s, first_call_s=30.0):
  return {"img_s": float(img_s), "first_call_s": first_call_s}


def test_projected_seconds_of_the_reproduction():
  # 100 epochs x 390 steps x 128 images at 31,200 images/s, plus the first call.
  assert sweep.projected_seconds(result(31_200, 30.0), "pretrain") == pytest.approx(
      4_992_000 / 31_200 + 30.0)
  assert sweep.projected_seconds(result(52_000, 0.0), "finetune") == pytest.approx(
      10 * 390 * 384 / 52_000)


def test_pick_needs_a_margin_over_default():
  default = result(31_200)                    # 160 s + 30 s = 190 s
  assert sweep.pick({"default": default, "rbg": result(32_000)}) == "default"   # 186 s: -2%
  assert sweep.pick({"default": default, "rbg": result(32_000),
                     "cmd_buffer_conv_while": result(36_000)}) == "cmd_buffer_conv_while"  # 168.7 s
  # A faster compile counts as well as a faster step.
  assert sweep.pick({"default": default, "autotune2": result(31_200, 20.0)}) == "autotune2"
  # Failed variants are skipped; without a default there is nothing to compare with.
  assert sweep.pick({"default": default, "unroll2": None}) == "default"
  assert sweep.pick({"default": None, "rbg": result(90_000)}) == "default"


def test_export_lines_set_the_variant_in_a_shell():
  lines = sweep.export_lines("cmd_buffer_conv_while") + sweep.export_lines("unroll2").replace(
      "REPRO_UNROLL", "UNROLL_OF_SECOND")
  out = subprocess.run(["bash", "-c", lines + 'echo "$XLA_FLAGS|$JAX_DEFAULT_PRNG_IMPL|'
                        '$REPRO_UNROLL|$UNROLL_OF_SECOND"'], capture_output=True, text=True,
                       check=True).stdout.strip()
  # The second variant's lines reset the flags of the first.
  assert out == "|threefry2x32|0|2"
  out = subprocess.run(["bash", "-c", sweep.export_lines("cmd_buffer_conv_while")
                        + 'echo "$XLA_FLAGS"'], capture_output=True, text=True,
                       check=True).stdout.strip()
  assert out == sweep.VARIANTS["cmd_buffer_conv_while"]["XLA_FLAGS"]


def jax_starts_with(xla_flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(2).sum()"],
                        env={**os.environ, "XLA_FLAGS": xla_flags}, capture_output=True,
                        text=True, timeout=120)


def test_every_variants_xla_flags_are_known_to_this_jaxlib():
  # XLA parses every XLA_FLAGS entry, GPU ones included, whatever the backend, and aborts on an
  # unknown flag or value: a typo would cost a GPU session its variant.
  flags = sorted({v["XLA_FLAGS"] for v in sweep.VARIANTS.values() if v.get("XLA_FLAGS")})
  assert "--xla_gpu_enable_command_buffer=+CONVOLUTION" in flags
  for f in flags:
    out = jax_starts_with(f)
    assert out.returncode == 0, (f, out.stderr[-500:])
  out = jax_starts_with("--xla_gpu_enable_command_buffer=+CONVOLUTIONS")    # the control
  assert out.returncode != 0 and "Illegal value" in out.stderr
