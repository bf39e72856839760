"""``--config.objective.m_in=auto --config.objective.m_out=auto``: the margins from the
pretrained model's energies, printed, saved in config.json, kept by a resumed run."""

import json
import re

import numpy as np
import pytest

from energy_jax import checkpoints, config as config_lib, data, inference, models, parallel, train
from energy_jax.config import resume
from energy_jax.data import toy
from energy_jax.train import loop
from test_checkpoints import _StopAfter  # a preemption watch that stops after n boundaries


def _margins_rule(e_in, e_out):
  """suggest_margins' rule, written out: the 5% quantile of the ID energies, and the 95%
  quantile of the outliers' energies, or of the ID energies when the outliers' median energy is
  not above the ID median."""
  upper = e_out if np.median(e_out) > np.median(e_in) else e_in
  return np.quantile(e_in, 0.05), np.quantile(upper, 0.95)


def _energies(config, variables, images):
  logits = inference.predict(models.from_config(config), variables, images, 256,
                             parallel.make_mesh(1)).logits.astype(np.float64)
  top = logits.max(axis=1)
  return -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))


def test_resume_takes_auto_as_the_numbers_the_run_computed():
  saved = config_lib.get_config("test", "finetune").to_dict()
  saved["objective"].update(m_in=-9.5, m_out=-3.25, auto_margins="m_in,m_out")
  c = config_lib.get_config("test", "finetune")
  c.objective.m_in = c.objective.m_out = "auto"
  resume.check_resumable(saved, c, "RUN")
  c.objective.m_in = -9.5                        # the same number, given as a number
  resume.check_resumable(saved, c, "RUN")
  c.objective.m_in = -9.0
  with pytest.raises(ValueError, match=r"Changed: objective.m_in: -9.5 -> -9.0\. Restore"):
    resume.check_resumable(saved, c, "RUN")
  # A run that started with numbers does not take "auto" on resume.
  saved["objective"].update(auto_margins="")
  c.objective.m_in = "auto"
  with pytest.raises(ValueError, match=r"Changed: objective.m_in: -9.5 -> 'auto'; "
                                       r"objective.m_out: -3.25 -> 'auto'\. "):
    resume.check_resumable(saved, c, "RUN")
  # A run of energy-jax 0.2 (flat m_in, learning_rate, a string objective) is refused naming
  # the renamed keys and what to do.
  flat = {k: v for k, v in saved.items() if k not in ("objective", "optimizer")}
  flat.update(objective="energy", m_in=-9.5, m_out=-3.25, auto_margins="", learning_rate=0.001)
  with pytest.raises(ValueError, match=r"RUN was started by an earlier energy-jax, whose config "
                                       r"keys were renamed since \(objective -> objective.name "
                                       r".*m_in -> objective.m_in .*start a new --workdir"):
    resume.check_resumable(flat, c, "RUN")




def test_finetune_with_auto_margins_prints_saves_and_keeps_them(tmp_path, capsys, monkeypatch):
  toy_id, toy_out = toy.make_toy_dataset(str(tmp_path / "data"), train_per_class=16,
                                         test_per_class=4, num_outliers=64)
  fast = dict(in_train=toy_id, in_test=toy_id, outliers=toy_out, num_devices=1, epochs=1)
  pre = config_lib.get_config("test", "pretrain")
  for k, v in fast.items():
    setattr(pre, k, v)
  train.train_and_evaluate(pre, str(tmp_path / "pre"), log=lambda s: None)

  # Fine-tuning for 2 epochs with both margins "auto" (as --config.m_in=auto gives them),
  # stopped after the first as SIGTERM would.
  c = config_lib.get_config("test", "finetune")
  for k, v in dict(fast, epochs=2, pretrained=str(tmp_path / "pre")).items():
    setattr(c, k, v)
  c.objective.m_in = c.objective.m_out = "auto"
  run = tmp_path / "ft"
  monkeypatch.setattr(loop, "PreemptionWatch", lambda: _StopAfter(0))
  assert train.train_and_evaluate(c, str(run))["preempted"]
  monkeypatch.undo()
  out = capsys.readouterr().out
  said = re.search(r"margins from the energies of the pretrained model on 64 training images and "
                   r"64 outliers \(energy_jax.ood.metrics.suggest_margins\): m_in = (\S+), "
                   r"m_out = (\S+)\n", out)
  assert said, out
  printed = float(said.group(1).rstrip(",")), float(said.group(2))
  saved = json.load(open(run / "config.json"))
  saved = saved["objective"]
  assert (saved["m_in"], saved["m_out"]) == printed and saved["auto_margins"] == "m_in,m_out"

  # The rule on the pretrained model's energies of the same images, computed here.
  variables = checkpoints.load_variables(str(tmp_path / "pre"), c)
  e_in = _energies(c, variables, data.load(toy_id, "train").images)
  e_out = _energies(c, variables, data.load(toy_out).images)
  assert printed == pytest.approx(_margins_rule(e_in, e_out), abs=1e-5)

  # Resumed by the same call: the numbers of the start are kept (the fine-tuned model's
  # energies would give others), not computed again.
  assert train.train_and_evaluate(c, str(run))["epoch"] == 2
  out = capsys.readouterr().out
  assert "resuming" in out and "margins from the energies" not in out
  again = json.load(open(run / "config.json"))["objective"]
  assert (again["m_in"], again["m_out"], again["auto_margins"]) == (*printed, "m_in,m_out")
  assert [json.loads(l)["epoch"] for l in open(run / "results.jsonl")] == [1, 2]
