"""A sweep as runs on disk: its members trained as one compiled program (:mod:`.sweep`), each
written as a run of its own, then evaluated on the validation sets and one of them chosen.

``<workdir>/`` holds

* ``sweep.json``: the sweep's config, its members (their settings, labels, workdirs, status:
  training, finished or diverged) and the global step every member still training has a
  checkpoint at (the sweep's commit, written after the members' checkpoints);
* ``members/<k>_<label>/`` (e.g. ``members/0_m_in=-23_m_out=-5``): member ``k`` as any run's
  workdir, written by the single run's code (:class:`~energy_jax.train.writer.RunWriter`,
  :class:`~energy_jax.checkpoints.RunCheckpoints`): ``config.json`` (the member's whole config),
  ``checkpoints/``, ``training_results.csv``, ``results.jsonl``, ``tensorboard/``; so
  ``evaluate.py --checkpoint=<member>`` and ``--config.pretrained=<member>`` read it as a run;
* ``validation.json``, ``validation.csv``, ``validation_scores.npz``: each member's energy score
  (-E(x)) on the ID test set and on the validation sets, their FPR95 and AUROC, and the member
  chosen.

The sweep resumes as a whole: every member continues from the sweep's commit (a checkpoint a
member saved after it, before a kill, is dropped and computed again). A member whose training
loss turns non-finite is stopped, named in the log and in ``sweep.json``, with a last row in its
CSV that says so and its last good checkpoint kept; the others go on. The members' images are
drawn with the sweep's ``config.seed`` (:mod:`.sweep`: a member's seed gives its initialisation,
augmentation and dropout).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from energy_jax import __version__, checkpoints, detectors, distributed, storage
from energy_jax.config import resume
from energy_jax.data import load_run_data, sampling
from energy_jax.ood import evaluation, protocol
from energy_jax.ood.metrics import ood_metrics
from energy_jax.train import loop, sweep as sweep_lib
from energy_jax.train.preemption import PreemptionWatch
from energy_jax.train.programs import RunPrograms
from energy_jax.train.run_lock import WorkdirLock
from energy_jax.train.writer import CSV, JSONL, history_rows, open_run_writer

RECORD = loop.SWEEP_RECORD
MEMBERS = loop.SWEEP_MEMBERS
VALIDATION_JSON, VALIDATION_CSV = "validation.json", "validation.csv"
VALIDATION_SCORES = "validation_scores.npz"
TRAINING, FINISHED, DIVERGED = "training", "finished", "diverged"
RULE = ("the lowest mean FPR95 over config.validation_sets (energy score -E(x), ID test images "
        "positive), ties broken by the highest mean AUROC")


class Member(NamedTuple):
  """Member ``index`` of a sweep: its ``overrides`` of the sweep's config, ``label``
  (``m_in=-23,m_out=-5``), whole ``config`` and ``workdir``."""
  index: int
  label: str
  overrides: Dict[str, Any]
  config: Any
  workdir: Any


def member_dirname(index: int, overrides: Mapping[str, Any]) -> str:
  """The folder of member ``index`` under ``members/``: its index and settings, e.g.
  ``0_m_in=-23_m_out=-5`` (characters a shell would need quoted become ``_``)."""
  return re.sub(r"[^A-Za-z0-9_.=+-]", "_", f"{index}_{sweep_lib.describe(overrides)}")


def sweep_members(config, members: Sequence[Mapping[str, Any]], workdir) -> List[Member]:
  """The members of a sweep of ``config`` in ``workdir``, each checked as a run's config
  (:func:`~energy_jax.train.sweep.member_configs`)."""
  root = storage.location(workdir) / MEMBERS
  return [Member(k, sweep_lib.describe(m), dict(m), c, root / member_dirname(k, m))
          for k, (m, c) in enumerate(zip(members, sweep_lib.member_configs(config, members)))]


def train_and_evaluate_sweep(config, members: Sequence[Mapping[str, Any]], workdir: str, *,
                             log: Callable[[str], None] = print,
                             data_cache: Optional[Dict] = None,
                             choose: bool = True) -> Dict[str, Any]:
  """Trains the ``members`` of a sweep of ``config`` (dicts of overrides, see
  :func:`~energy_jax.train.sweep.create_sweep_state`) in ``workdir`` as one compiled program,
  each member written as a run of its own (module docstring), then evaluates every member on
  the validation sets and chooses one by :data:`RULE`.

  Returns ``{"preempted": True, ...}`` when SIGTERM or SIGINT stopped it (the same call then
  continues where it stopped), else :func:`choose_member`'s summary: ``chosen`` (the index),
  ``chosen_workdir`` and each member's validation metrics (without ``choose``: only
  ``members``, their workdirs and status, nothing evaluated). Raises ``FloatingPointError``
  when every member diverged. The data are read once, with the sweep's config."""
  sweep_lib.check_sweep_config(config)
  objective, mesh = loop.check_config(config, sweep=True)
  train_mesh = sweep_lib.sweep_mesh(config, len(members), mesh)    # mesh: evaluation's
  log = distributed.main_process_only(log)
  workdir = storage.check_reachable(workdir)
  if config.pretrained:
    storage.check_reachable(config.pretrained, "config.pretrained")
  team = sweep_members(config, members, workdir)
  log(f"sweep of {len(team)} members in {workdir}/{MEMBERS}: "
      f"{'; '.join(f'{m.index}: {m.label}' for m in team)}\nconfig:\n{config}")
  t0 = time.time()
  data = load_run_data(config, objective.uses_outliers, data_cache)
  steps = sampling.steps_per_epoch(len(data.train), config.batch_size, config.drop_remainder,
                                   data.train.source)
  times = {"data": time.time() - t0}
  kept = lambda path: loop.holds_files(path / MEMBERS)     # a member's folder: work kept
  with loop.removed_if_start_fails(workdir, kept), WorkdirLock(workdir, log), \
      PreemptionWatch() as watch, contextlib.ExitStack() as stack:
    record = read_record(workdir, team, config)
    ckpts = []
    for m in team:
      stack.enter_context(loop.removed_if_start_fails(m.workdir))
      stack.enter_context(WorkdirLock(m.workdir, log))
      # Two kept at least: a member that saved past the sweep's commit before a kill still holds
      # the checkpoint at the commit.
      ckpts.append(stack.enter_context(checkpoints.RunCheckpoints(
          m.workdir, max(config.keep_checkpoints, 2), member_log(log, m))))
    sweep, start = initial_sweep(config, team, record, ckpts, steps, log)
    sweep = sweep_lib.put_sweep(sweep, train_mesh)
    times["setup"] = time.time() - t0 - times["data"]
    log(loop.run_summary(config, data, steps, train_mesh, times))
    if start.finished:
      for k in live(record):
        record["members"][k]["status"] = FINISHED
      write_record(workdir, record, config)
    else:
      sweep, stopped = train_members(config, team, record, sweep, start, ckpts, data,
                                     train_mesh, mesh, steps, watch, workdir, log, times)
      if stopped is not None:
        return stopped
    if choose:
      summary = choose_member(team, record, sweep_lib.gathered(sweep), data.test, mesh,
                              workdir, log)
    else:
      summary = {"members": [dict(r, workdir=str(storage.location(workdir) / r["workdir"]))
                             for r in record["members"]]}
  log(loop.timing_summary(times, t0))
  return summary


class SweepStart(NamedTuple):
  """Where a sweep starts: ``epoch`` at ``step`` of it (every member alike); per member the
  rows of its epochs before (``history``) and the per-step metrics of a preempted epoch
  (``partial``); ``finished``: every member still training has finished."""
  epoch: int
  step: int
  history: Dict[int, List[Dict[str, Any]]]
  partial: Dict[int, Optional[Dict[str, List[float]]]]
  finished: bool = False


def member_log(log: Callable[[str], None], member: Member) -> Callable[[str], None]:
  return lambda text: log(f"[member {member.index} {member.label}] {text}")


def read_record(workdir, team: Sequence[Member], config) -> Dict[str, Any]:
  """The sweep's record in ``workdir`` (a new one if there is none), after checking that it
  records these members, that its config is one the sweep may continue under (as a run's,
  :func:`energy_jax.config.resume.check_resumable`: the sweep's seed, which draws the images of
  every member, included) and that the folder holds no single run."""
  path = storage.location(workdir)
  if (path / "checkpoints").exists() or history_rows(path):
    raise FileExistsError(f"{path} holds a single run (checkpoints/, {CSV}): a sweep needs "
                          "a --workdir of its own")
  members = [{"index": m.index, "label": m.label, "overrides": m.overrides,
              "workdir": f"{MEMBERS}/{m.workdir.name}", "status": TRAINING} for m in team]
  if not (path / RECORD).exists():
    held = [m.workdir for m in team if (m.workdir / "checkpoints").exists()]
    if held:
      raise FileExistsError(f"{held[0]} holds checkpoints but {path / RECORD}, the sweep's "
                            "record, is missing: restore it, or start a new --workdir")
    return {"format": 1, "version": __version__, "step": None, "members": members}
  try:
    record = json.loads(storage.read_text(path / RECORD))
    saved = [(r["label"], r["overrides"]) for r in record["members"]]
  except (ValueError, KeyError, TypeError) as e:      # cut short, edited, not a sweep's
    raise ValueError(f"{path / RECORD}, the sweep's record, is damaged ({type(e).__name__}: "
                     f"{e}): restore it, or start a new --workdir") from None
  now = [(r["label"], json.loads(json.dumps(r["overrides"]))) for r in members]
  if saved != now:
    raise ValueError(f"{path} holds a sweep of other members ({', '.join(l for l, _ in saved)}) "
                     f"than these ({', '.join(l for l, _ in now)}): give the same --sweep flags "
                     "to continue it, or start a new --workdir")
  if "config" in record:
    resume.check_resumable(record["config"], config, str(path))
  return record


def write_record(workdir, record: Dict[str, Any], config) -> None:
  if distributed.is_main_process():
    storage.write_text(storage.location(workdir) / RECORD,
                       json.dumps({**record, "config": config.to_dict()}, indent=1) + "\n")


def live(record: Mapping[str, Any]) -> List[int]:
  """The members that have not diverged."""
  return [r["index"] for r in record["members"] if r["status"] != DIVERGED]


def initial_sweep(config, team: Sequence[Member], record: Dict[str, Any],
                  ckpts: Sequence[checkpoints.RunCheckpoints], steps: int,
                  log: Callable[[str], None]):
  """``(sweep state on the host, start)``: every member not diverged from its checkpoint at the
  sweep's commit, else (nothing committed) fresh from its seed around the pretrained weights.
  A diverged member keeps a fresh state it never saves."""
  committed = record["step"]
  if not live(record):
    raise FloatingPointError(f"every member of the sweep in {team[0].workdir.parent.parent} "
                             f"diverged (see {RECORD}): nothing to continue")
  for k in live(record):
    loop.check_run_format(ckpts[k], team[k].workdir)
    drop_after(ckpts[k], committed, member_log(log, team[k]))
  total_steps = steps * config.epochs
  overrides = [m.overrides for m in team]
  if committed is None:
    sweep = sweep_lib.create_sweep_state(config, overrides, total_steps,
                                         loop.pretrained_variables(config, log))
    return sweep, SweepStart(0, 0, {k: [] for k in live(record)}, {k: None for k in live(record)})
  sweep = sweep_lib.create_sweep_state(config, overrides, total_steps)
  slots = [sweep_lib.take_member(sweep.members, k) for k in range(len(team))]
  history, partial, finished, where = {}, {}, [], set()
  for k in live(record):
    m, source = team[k], f"{ckpts[k].directory}/{committed}"
    problem = ckpts[k].verify_on_main(committed)
    if problem:
      raise ValueError(f"member {k} ({m.label}): {source}, where the sweep continues every "
                       f"member from, is damaged ({problem}); the sweep's members continue from "
                       "one step: start a new --workdir")
    meta = ckpts[k].read_meta(committed)
    loop.check_resumable_checkpoint(meta, m.config, m.workdir, source, steps)
    state, _ = ckpts[k].restore(sweep_lib.member_state(sweep, k), committed)
    slots[k] = state.replace(tx=sweep.members.tx, learning_rate=sweep.members.learning_rate)
    where.add((meta["epoch"], meta["steps_done"]))
    history[k] = list(meta.get("history") or [])
    partial[k] = meta["partial"] if meta["steps_done"] < steps else None
    finished.append(bool(meta.get("finished")) and meta["epoch"] + 1 >= config.epochs)
  (epoch, done), = where           # one commit: every member at the same step
  stopped = len(team) - len(live(record))
  log(f"resuming the sweep at epoch {epoch + 1}, step {done} of {steps}"
      f"{f' ({stopped} of its {len(team)} members diverged before)' if stopped else ''}")
  start = (SweepStart(epoch + 1, 0, history, {k: None for k in partial}, all(finished))
           if done == steps else SweepStart(epoch, done, history, partial))
  return sweep.replace(members=sweep_lib.stack_members(slots)), start


def drop_after(ckpts: checkpoints.RunCheckpoints, committed: Optional[int],
               log: Callable[[str], None]) -> None:
  """Deletes the checkpoints after the sweep's commit ``committed`` (all, for None): saved
  before a kill stopped the sweep short of its commit, they are computed again."""
  for step in ckpts.steps():
    if committed is None or step > committed:
      log(f"checkpoint {ckpts.directory}/{step} is past the sweep's last commit (a kill between "
          "the members' saves): removed, the sweep computes it again")
      ckpts.delete(step)


def train_members(config, team: Sequence[Member], record: Dict[str, Any], sweep,
                  start: SweepStart, ckpts, data, train_mesh, mesh, steps: int,
                  watch: PreemptionWatch, workdir, log: Callable[[str], None],
                  times: Dict[str, float]):
  """The epochs from ``start``, as :func:`~energy_jax.train.train_and_evaluate` runs them, for
  every member still training (on ``train_mesh``, :func:`~energy_jax.train.sweep.sweep_mesh`;
  each member's test set evaluated on ``mesh``): ``(sweep, None)`` at the end, ``(sweep,
  stopped)`` where a signal stopped it (saved, committed)."""
  run_epoch = loop.epoch_runner(
      config, data, train_mesh, steps, watch, RunPrograms(None, {}, None),
      epoch_fn=lambda padded: sweep_lib.sweep_epoch_fn(train_mesh, padded))
  history, partial = dict(start.history), dict(start.partial)
  with contextlib.ExitStack() as stack:
    writers = {k: stack.enter_context(open_run_writer(
        team[k].config, team[k].workdir, start.epoch, member_log(log, team[k]), history[k]))
        for k in live(record)}

    def save(states, epoch, done, rows=None, finished=False, partials=None):
      for k in live(record):
        loop.save_checkpoint(ckpts[k], team[k].config, states[k], epoch, done, steps, history[k],
                             (rows or {}).get(k), finished,
                             None if partials is None else partials[k])
      record["step"] = epoch * steps + done
      write_record(workdir, record, config)

    write_record(workdir, record, config)
    for epoch in range(start.epoch, config.epochs):
      t_epoch = time.time()
      first = start.step if epoch == start.epoch else 0
      sweep, metrics, done = run_epoch(sweep, epoch, first)
      train_s = time.time() - t_epoch
      times.setdefault("first_epoch", train_s)
      per_member = {k: loop.with_steps_before(partial[k] if epoch == start.epoch else None,
                                              {n: v[:, k] for n, v in metrics.items()})
                    for k in live(record)}
      held = sweep_lib.gathered(sweep)     # every member on every device: read once, below
      finite = np.asarray(sweep_lib.finite_members(held.members))
      states = {k: sweep_lib.member_state(held, k) for k in live(record)}    # checked, saved
      for k in live(record):
        state = states[k]
        problem = divergence(state, finite[k], per_member[k]["loss"], epoch, done, ckpts[k])
        if problem:
          rate = float(state.learning_rate((epoch + 1) * steps - 1))
          stop_diverged(team[k], record, problem, writers.pop(k), config, epoch, per_member[k],
                        rate, train_s, workdir, log)
      if not live(record):
        raise FloatingPointError(f"every member of the sweep diverged (see {RECORD}); nothing "
                                 "to choose from")
      if done < steps:                # preempted: saved where it stopped, nothing else written
        save(states, epoch, done, partials=per_member)
        return sweep, loop.stopped_by_signal(epoch, done, steps, watch.signal_name, log)
      rows = {}
      for k in live(record):
        rows[k] = loop.completed_epoch_row(team[k].config, states[k],
                                           epoch, per_member[k], steps, train_s, t_epoch,
                                           data.test, mesh)
        writers[k].write(rows[k])      # the rows, then the checkpoints, then the commit
        history[k].append(rows[k])
      stopped = loop.save_after_epoch(config, epoch, steps, watch, lambda finished: save(
          states, epoch, steps, rows, finished), log)
      if stopped:
        return sweep, stopped
    for k in live(record):
      record["members"][k]["status"] = FINISHED
    write_record(workdir, record, config)
  return sweep, None


def divergence(state, finite: bool, losses: np.ndarray, epoch: int, done: int,
               ckpts: checkpoints.RunCheckpoints) -> Optional[str]:
  """Why a member must stop at step ``done`` of ``epoch``: a non-finite training loss among
  ``losses``, or (``finite`` False) NaN or inf in its ``state``; None if it goes on."""
  try:
    loop.check_losses_finite(losses, epoch, ckpts)
    if not finite:
      saved = ckpts.steps()
      checkpoints.check_finite(
          (state.params, state.batch_stats, state.opt_state),
          f"its training state at epoch {epoch + 1}, step {done}",
          "nothing after the last good checkpoint was saved: "
          f"{f'{ckpts.directory}/{saved[0]}' if saved else 'none yet'}")
  except FloatingPointError as e:
    return str(e)
  return None


def stop_diverged(member: Member, record: Dict[str, Any], problem: str, writer,
                  config, epoch: int, metrics: Dict[str, np.ndarray], learning_rate: float,
                  train_s: float, workdir, log: Callable[[str], None]) -> None:
  """Stops ``member``, whose training loss or state turned non-finite: a last row in its files
  says so (its ``train_loss`` NaN, ``diverged`` the reason; the row is in no checkpoint: a
  resumed sweep leaves the member as it is), the record names it."""
  log(f"member {member.index} ({member.label}) diverged and is stopped; the others go on: "
      f"{problem}")
  row = loop.epoch_row(member.config, epoch, metrics, learning_rate, train_s)
  # The epoch gave no model to go on with: its loss is NaN in every file, even where the loss
  # of its steps stayed finite while the state did not.
  row.update(time_s=train_s, train_loss=float("nan"), diverged=problem)
  writer.write(row)
  entry = record["members"][member.index]
  entry.update(status=DIVERGED, diverged=problem)
  write_record(workdir, record, config)


# ----------------------------------------------------------------------------------------------
# The choice of a member, on validation data only.

def validation_scores(config, variables, test, validation_sets: Mapping[str, Any], mesh):
  """``(scores of the ID test images, {set: scores})``: the energy score -E(x) of the model of
  ``config`` around ``variables``."""
  scorer = evaluation.Scorer.from_config(config, variables, config.eval_batch_size, mesh)
  energy = detectors.create("energy")
  return (scorer.score(energy, test.images),
          {name: scorer.score(energy, s.images) for name, s in validation_sets.items()})


def choose_member(team: Sequence[Member], record: Dict[str, Any], sweep, test, mesh, workdir,
                  log: Callable[[str], None]) -> Dict[str, Any]:
  """Scores every member that did not diverge on the validation sets of the sweep's config
  (:func:`energy_jax.ood.protocol.validation_sets`, never the test OOD sets), chooses one by
  :data:`RULE`, prints one table and writes it (``validation.json``, ``validation.csv``) with
  the scores (``validation_scores.npz``) into ``workdir``."""
  config = team[0].config
  sets = protocol.validation_sets(config, test, 0)
  out, scores = [], {}
  for m, entry in zip(team, record["members"]):
    row = {"index": m.index, "label": m.label, "workdir": entry["workdir"],
           "status": entry["status"]}
    if entry["status"] != DIVERGED:
      state = sweep_lib.member_state(sweep, m.index)
      s_in, s_out = validation_scores(m.config, state.variables, test, sets, mesh)
      scores[f"{m.index}/in"] = s_in
      per_set = {n: ood_metrics(s_in, s) for n, s in s_out.items()}
      scores.update({f"{m.index}/{n}": s for n, s in s_out.items()})
      row.update(fpr95=float(np.mean([r["fpr"] for r in per_set.values()])),
                 auroc=float(np.mean([r["auroc"] for r in per_set.values()])),
                 per_set={n: {"fpr95": r["fpr"], "auroc": r["auroc"]} for n, r in per_set.items()})
      last = [r for r in read_rows(m.workdir) if "test_error" in r]
      row["test_error"] = last[-1]["test_error"] if last else None
    out.append(row)
  candidates = [r for r in out if r["status"] != DIVERGED]
  chosen = min(candidates, key=lambda r: (r["fpr95"], -r["auroc"], r["index"]))
  summary = {"rule": RULE, "validation_sets": list(sets), "chosen": chosen["index"],
             "chosen_workdir": str(team[chosen["index"]].workdir), "members": out}
  log(validation_table(out, chosen["index"]))
  log(f"chosen: member {chosen['index']} ({chosen['label']}), {team[chosen['index']].workdir} "
      f"({RULE})")
  if distributed.is_main_process():
    path = storage.location(workdir)
    buffer = io.BytesIO()
    np.savez(buffer, **scores)
    storage.write_bytes(path / VALIDATION_SCORES, buffer.getvalue())
    storage.write_text(path / VALIDATION_CSV, validation_csv(out, chosen["index"]))
    storage.write_text(path / VALIDATION_JSON, json.dumps(summary, indent=1) + "\n")  # last
  return summary


def read_rows(workdir) -> List[Dict[str, Any]]:
  """The rows of a run's ``results.jsonl``."""
  path = storage.location(workdir) / JSONL
  return [json.loads(l) for l in storage.read_text(path).splitlines() if l.strip()] if (
      path.exists()) else []


def _pct(value: Optional[float]) -> str:
  return "" if value is None else f"{100 * value:.2f}"


def validation_table(rows: Sequence[Mapping[str, Any]], chosen: int) -> str:
  """The members as one markdown table: settings, status, last test error, validation FPR95
  and AUROC of the energy score, the chosen one marked."""
  lines = ["| member | settings | status | test error % | val FPR95 % ↓ | val AUROC % ↑ "
           "| chosen |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    error = "" if r.get("test_error") is None else f"{r['test_error']:.2f}"
    lines.append(f"| {r['index']} | {r['label']} | {r['status']} | {error} | "
                 f"{_pct(r.get('fpr95'))} | {_pct(r.get('auroc'))} | "
                 f"{'**chosen**' if r['index'] == chosen else ''} |")
  return "\n".join(lines)


def validation_csv(rows: Sequence[Mapping[str, Any]], chosen: int) -> str:
  lines = ["member,label,status,test_error,val_fpr95,val_auroc,chosen,workdir\n"]
  for r in rows:
    fields = [r.get("test_error"), r.get("fpr95"), r.get("auroc")]
    lines.append(f"{r['index']},\"{r['label']}\",{r['status']},"
                 + ",".join("" if v is None else f"{v:.6f}" for v in fields)
                 + f",{int(r['index'] == chosen)},{r['workdir']}\n")
  return "".join(lines)
