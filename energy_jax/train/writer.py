"""One writer for a run's epochs: each row goes to stdout, ``training_results.csv`` (the
reference's format), ``results.jsonl`` and TensorBoard event files (``tensorboard --logdir
WORKDIR``). The workdir may be a ``gs://`` URL (:mod:`energy_jax.storage`): the CSV and JSONL
are rewritten whole after each epoch, since objects in a bucket cannot be appended to.

TensorBoard scalars are written with TensorFlow's summary op, tagged for the scalars plugin as
``tensorboard.summary.scalar`` tags them (viewing needs ``pip install tensorboard``, writing does
not). Where TensorFlow cannot be imported the run says so once and goes on: the CSV and JSONL
hold the same numbers.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from etils import epath

from energy_jax import storage

CSV = "training_results.csv"
JSONL = "results.jsonl"
CONFIG = "config.json"
TENSORBOARD = "tensorboard"
CSV_HEADER = "epoch,time(s),train_loss,test_loss,test_error(%)\n"


class ScalarWriter:
  """Writes ``{name: value}`` scalars at a step into ``logdir``; flushed after every write."""

  def __init__(self, logdir: str):
    from energy_jax.tf_support import import_tensorflow
    tf = import_tensorflow()
    from tensorflow.core.framework import summary_pb2
    self._tf = tf
    self._metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    self.logdir = logdir
    self._writer = tf.summary.create_file_writer(logdir)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    tf = self._tf
    with self._writer.as_default():
      for name, value in scalars.items():
        tf.summary.write(name, tf.constant(float(value), tf.float32), step=int(step),
                         metadata=self._metadata)
    self._writer.flush()

  def write_missing(self, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes the rows whose epoch the event files in ``logdir`` lack (a resumed run's history,
    where a kill came between a row and its scalars)."""
    have = read_scalars(self.logdir).get("train/loss", {})
    for row in rows:
      if row["epoch"] not in have:
        self.write(row["epoch"], tensorboard_scalars(row))

  def close(self) -> None:
    self._writer.close()


def open_scalar_writer(config, workdir: str, log: Callable[[str], None]) -> Optional[ScalarWriter]:
  """The run's TensorBoard writer when ``config.tensorboard`` is on, else None; also None, said
  through ``log``, when TensorFlow cannot be imported."""
  if not config.tensorboard:
    return None
  try:
    import tensorflow  # noqa: F401
  except ImportError as e:
    log(f"TensorBoard scalars off: TensorFlow cannot be imported ({e}); the epoch rows still go "
        f"to {CSV} and {JSONL}")
    return None
  return ScalarWriter(str(epath.Path(workdir) / TENSORBOARD))


def read_scalars(logdir: str) -> Dict[str, Dict[int, float]]:
  """``{name: {step: value}}`` from the event files in ``logdir`` (none: ``{}``); a record a kill
  cut short ends its file."""
  from energy_jax.tf_support import import_tensorflow
  tf = import_tensorflow()
  out: Dict[str, Dict[int, float]] = {}
  if not epath.Path(logdir).exists():
    return out
  for path in sorted(epath.Path(logdir).iterdir()):
    try:
      for event in tf.compat.v1.train.summary_iterator(str(path)):
        for value in event.summary.value:
          out.setdefault(value.tag, {})[int(event.step)] = float(tf.make_ndarray(value.tensor))
    except tf.errors.DataLossError:
      pass
  return out


class RunWriter:
  """Writes the run's resolved config (``config.json``) and its epoch rows. A resumed run's rows
  are rebuilt from ``history``, the rows its checkpoint holds (rows of epochs after it, or one a
  kill cut short, are dropped, since those epochs run again; a row a kill kept from the files is
  written again); a checkpoint without a history (format 4 before it was kept) keeps the rows
  of the files."""

  def __init__(self, config, workdir, start_epoch: int, log: Callable[[str], None] = print,
               history: Optional[Sequence[Mapping[str, Any]]] = None):
    self.log = log
    workdir = storage.location(workdir)
    storage.write_text(workdir / CONFIG, config.to_json(indent=1, sort_keys=True) + "\n")
    self.csv_path, self.jsonl_path = workdir / CSV, workdir / JSONL
    self.csv_rows: List[str] = []
    self.jsonl_rows: List[str] = []
    if history is not None:
      self.csv_rows = [csv_line(r) for r in history]
      self.jsonl_rows = [json.dumps(r) for r in history]
    elif start_epoch > 0 and self.csv_path.exists():
      self.csv_rows, self.jsonl_rows = rows_up_to(self.csv_path, self.jsonl_path, start_epoch)
    self._flush()
    self.scalars = open_scalar_writer(config, workdir, log)
    if self.scalars is not None and history:
      self.scalars.write_missing(history)

  def _flush(self) -> None:
    storage.write_text(self.csv_path, CSV_HEADER + "".join(r + "\n" for r in self.csv_rows))
    storage.write_text(self.jsonl_path, "".join(r + "\n" for r in self.jsonl_rows))

  def __enter__(self) -> "RunWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def write(self, row: Mapping[str, Any]) -> None:
    """Writes one epoch's ``row`` (``epoch``, ``train_loss``, ``time_s``, ``mean_*``,
    ``learning_rate`` and, when evaluated, ``test_loss`` / ``test_error``) everywhere."""
    self.csv_rows.append(csv_line(row))
    self.jsonl_rows.append(json.dumps(row))
    self._flush()
    if self.scalars is not None:
      self.scalars.write(row["epoch"], tensorboard_scalars(row))
    line = "Epoch {:3d} | Time {:5d} | Train Loss {:.4f}".format(row["epoch"], int(row["time_s"]),
                                                                  row["train_loss"])
    if "test_loss" in row:
      line += " | Test Loss {:.3f} | Test Error {:.2f}".format(row["test_loss"], row["test_error"])
    self.log(line)

  def close(self) -> None:
    if self.scalars is not None:
      self.scalars.close()
      self.scalars = None


def csv_line(row: Mapping[str, Any]) -> str:
  """An epoch's row in the reference's CSV format."""
  return "%03d,%05d,%0.6f,%s,%s" % (
      row["epoch"], row["time_s"], row["train_loss"],
      "%0.5f" % row["test_loss"] if "test_loss" in row else "",
      "%0.2f" % row["test_error"] if "test_error" in row else "")


def tensorboard_scalars(row: Mapping[str, Any]) -> Dict[str, float]:
  """An epoch's row as TensorBoard scalars (step = epoch, as the CSV; the rate is that of the
  epoch's last update)."""
  return {"train/loss": row["train_loss"],
          **{f"train/{k}": v for k, v in row.items() if k.startswith("mean_")},
          **{f"test/{k[5:]}": row[k] for k in ("test_loss", "test_error") if k in row},
          "learning_rate": row["learning_rate"], "epoch_seconds": row["time_s"]}


def history_rows(workdir) -> int:
  """How many epoch rows the run's CSV in ``workdir`` holds (0 when there is none)."""
  path = storage.location(workdir) / CSV
  return len(rows_up_to(path, storage.location(workdir) / JSONL, 1 << 30)[0]) if (
      path.exists()) else 0


class _NoWriter:
  """What the processes other than process 0 write: nothing."""

  def __enter__(self) -> "_NoWriter":
    return self

  def __exit__(self, *exc) -> None:
    pass

  def write(self, row: Mapping[str, Any]) -> None:
    pass


def open_run_writer(config, workdir: str, start_epoch: int, log: Callable[[str], None] = print,
                    history: Optional[Sequence[Mapping[str, Any]]] = None):
  """The run's :class:`RunWriter` on process 0; a writer of nothing on the other processes."""
  import jax
  if jax.process_index() != 0:
    return _NoWriter()
  return RunWriter(config, workdir, start_epoch, log, history)


def rows_up_to(csv_path, jsonl_path, epochs_done: int):
  """``(csv rows, jsonl rows)`` of epochs ``1..epochs_done`` in a run's logs, without the CSV
  header; rows that do not parse (a kill may cut the last one) are left out."""
  def epoch_of_csv(line):
    fields = line.split(",")
    return int(fields[0]) if len(fields) == 5 and fields[0].isdigit() else None

  def epoch_of_json(line):
    try:
      return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
      return None

  out = []
  for path, epoch_of, header in ((csv_path, epoch_of_csv, 1), (jsonl_path, epoch_of_json, 0)):
    path = epath.Path(path)
    lines = storage.read_text(path).splitlines()[header:] if path.exists() else []
    out.append([l for l in lines if (e := epoch_of(l)) is not None and e <= epochs_done])
  return tuple(out)
