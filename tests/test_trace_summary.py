"""benchmarks/trace_summary.py on a hand-built perfetto trace with hand-computed answers."""

import gzip
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import trace_summary  # noqa: E402


def _trace():
  meta = lambda pid, tid, kind, name: {"ph": "M", "pid": pid, "tid": tid, "name": kind,
                                       "args": {"name": name}}
  kernel = lambda tid, ts, dur, name, op="": {"ph": "X", "pid": 2, "tid": tid, "ts": ts,
                                              "dur": dur, "name": name, "args": {"hlo_op": op}}
  return {"traceEvents": [
      meta(1, None, "process_name", "/host:CPU"), meta(2, None, "process_name", "/device:GPU:0"),
      meta(1, 7, "thread_name", "python"), meta(2, 11, "thread_name", "Stream #11(Compute)"),
      meta(2, 12, "thread_name", "Stream #12(Compute)"), meta(2, 99, "thread_name", "XLA Ops"),
      {"ph": "X", "pid": 1, "tid": 7, "ts": 0, "dur": 500, "name": "PjitFunction(step)"},
      kernel(11, 100, 10, "sm90_xmma_fprop_implicit_gemm_bf16"),      # [100, 110)
      kernel(12, 105, 10, "loop_add_fusion", "add_fusion.3"),           # [105, 115): overlaps
      kernel(11, 120, 10, "cutlass_80_tensorop_gemm", "dot.1"),         # [120, 130)
      kernel(11, 140, 1, "memcpy32_post"),                              # [140, 141)
      kernel(99, 100, 41, "fusion.3"),                                  # a derived line: skipped
  ]}


def test_summary_of_a_hand_built_trace(tmp_path):
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump(_trace(), f)
  kernels = trace_summary.device_kernels(trace_summary.load(str(path)))
  assert [k[0] for k in kernels] == [100, 105, 120, 140]
  s = trace_summary.summarize(kernels, steps=2)
  # Span 100..141 = 41 us; busy = [100,115) + [120,130) + [140,141) = 26 us; idle 5 + 10 us.
  assert s["span_us"] == 41 and s["busy_us"] == 26 and s["idle_us"] == 15
  assert s["busy_fraction"] == pytest.approx(26 / 41)
  assert s["kernels_per_step"] == 2 and s["span_per_step_us"] == 20.5
  assert s["mean_kernel_us"] == pytest.approx(31 / 4)
  assert s["by_category_us"] == {"convolution": 10, "elementwise fusion": 10, "matmul": 10,
                                 "copy / memset": 1}
  assert "busy 63.4%" in trace_summary.report(s)
  with pytest.raises(ValueError, match="no device kernels"):
    trace_summary.summarize([])
