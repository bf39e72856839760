"""Where the device time of a profiler trace goes: busy fraction, kernels per step, categories.

Reads the perfetto JSON that ``jax.profiler.start_trace(..., create_perfetto_trace=True)``
writes (``perfetto_trace.json.gz``). Device kernels are the complete ("X") events on the
``Stream ...`` threads of ``/device:...`` processes (derived lines such as "XLA Ops" repeat
them and are skipped). A low busy fraction with many short kernels means the step is bound by
launches and dependencies between small kernels, not by arithmetic.

  python benchmarks/trace_summary.py TRACE.json.gz [--steps N]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from typing import Dict, List, Tuple

# Ordered: the first matching rule names the category (kernel name and hlo_op, lowercased).
CATEGORIES = (
    ("convolution", re.compile(r"conv|xmma|implicit_gemm|cudnn|fprop|dgrad|wgrad")),
    ("matmul", re.compile(r"gemm|cublas|cutlass|dot")),
    ("copy / memset", re.compile(r"memcpy|memset|copy")),
    ("reduction fusion", re.compile(r"reduce|reduction")),
    ("elementwise fusion", re.compile(r"fusion|loop_|transpose|concatenate|slice")),
)


def category(name: str) -> str:
  """The category of a kernel (its name, plus its ``hlo_op`` when the trace gives one)."""
  low = name.lower()
  for label, pattern in CATEGORIES:
    if pattern.search(low):
      return label
  return "other"


def device_kernels(trace: Dict) -> List[Tuple[float, float, str, str]]:
  """``(start_us, end_us, kernel name, hlo_op)`` of every kernel on a device stream, by start."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e.get("args", {}).get("name", "")
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
  kernels = []
  for e in events:
    if (e.get("ph") == "X" and e.get("pid") in devices
        and threads.get((e["pid"], e.get("tid")), "").startswith("Stream")):
      kernels.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e["name"],
                      str((e.get("args") or {}).get("hlo_op", ""))))
  return sorted(kernels)


def summarize(kernels: List[Tuple[float, float, str, str]], steps: int = 1) -> Dict:
  """Span, busy time (union of kernel intervals), idle gaps, kernels per step, categories."""
  if not kernels:
    raise ValueError("the trace holds no device kernels (a CPU trace, or no Stream threads)")
  span = max(k[1] for k in kernels) - kernels[0][0]
  busy, cur_start, cur_end = 0.0, kernels[0][0], kernels[0][1]
  for start, end, _, _ in kernels[1:]:
    if start > cur_end:
      busy += cur_end - cur_start
      cur_start, cur_end = start, end
    else:
      cur_end = max(cur_end, end)
  busy += cur_end - cur_start
  by_category: Dict[str, float] = collections.defaultdict(float)
  by_name: Dict[str, float] = collections.defaultdict(float)
  for start, end, name, op in kernels:
    by_category[category(f"{name} {op}")] += end - start
    by_name[name] += end - start
  return {"span_us": span, "busy_us": busy, "idle_us": span - busy, "busy_fraction": busy / span,
          "kernels": len(kernels), "kernels_per_step": len(kernels) / steps,
          "span_per_step_us": span / steps,
          "mean_kernel_us": sum(k[1] - k[0] for k in kernels) / len(kernels),
          "by_category_us": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
          "top_kernels_us": dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:10])}


def load(path: str) -> Dict:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return json.load(f)


def report(summary: Dict) -> str:
  s = summary
  lines = [f"device span {s['span_us'] / 1e3:.2f} ms ({s['span_per_step_us'] / 1e3:.3f} ms/step), "
           f"busy {100 * s['busy_fraction']:.1f}% (idle between kernels {s['idle_us'] / 1e3:.2f} ms), "
           f"{s['kernels_per_step']:.0f} kernels/step, mean kernel {s['mean_kernel_us']:.1f} us"]
  kernel_time = sum(s["by_category_us"].values())
  for label, t in s["by_category_us"].items():
    lines.append(f"  {label:20s} {t / 1e3:8.2f} ms  {100 * t / kernel_time:5.1f}% of kernel time")
  lines.append("  top kernels:")
  for name, t in s["top_kernels_us"].items():
    lines.append(f"    {t / 1e3:8.2f} ms  {name[:100]}")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("trace")
  p.add_argument("--steps", type=int, default=1, help="steps the trace covers (for per-step figures)")
  args = p.parse_args()
  print(report(summarize(device_kernels(load(args.trace)), args.steps)))


if __name__ == "__main__":
  main()
