"""A mistake at the scripts' command line ends in a few lines that name it and the fix: no
traceback, no help dump, exit status 1, before any data is read or anything compiled."""

import json
import os
import select
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

FT = "--config=experiments/configs/finetune.py:test"
PRE = "--config=experiments/configs/pretrain.py:test"

# (script, arguments ({tmp}: a folder that exists, holding the file afile, the run directory run
# and outliers.npy), what the output must say)
MISTAKES = [
    ("finetune", ["--config.objective.m_inn=-20"],
     ["error: config.objective.m_inn is not a field of any registered objective",
      "did you mean config.objective.m_in?"]),
    ("finetune", ["--config.m_in=-20"],
     ["--config.m_in was renamed --config.objective.m_in (energy-jax 0.3)"]),
    ("pretrain", ["--config.model.dpth=16"],
     ["config.model.dpth is not a field of model 'wrn' (its fields: depth, dropout_rate, pooling, "
      "widen_factor); did you mean config.model.depth?"]),
    ("pretrain", ["--config.depth=16"],
     ["--config.depth was renamed --config.model.depth"]),
    ("pretrain", ["--epochs=3"],
     ["Unknown command line flag 'epochs'; config fields are set as --config.epochs=VALUE"]),
    ("evaluate", ["--chekpoint={tmp}/run"],
     ["Unknown command line flag 'chekpoint'. Did you mean: checkpoint ?"]),
    ("finetune", ["--config.objective.name=logitnorm"],
     ["config.objective.name must be one of 'ce', 'energy', 'oe', got 'logitnorm'"]),
    ("pretrain", ["--config.model.name=wrm"],
     ["config.model.name must be one of 'wrn', got 'wrm'; did you mean 'wrn'?"]),
    ("pretrain", ["--config.epochs=0"],
     ["config.epochs must be a positive integer, got 0"]),
    ("finetune", ["--config.objective.m_in=-2", "--config.objective.m_out=-5"],
     ["config.objective.m_in = -2", "must lie below config.objective.m_out = -5"]),
    ("pretrain", ["--config.objective.m_in=auto"],
     ["config.objective.m_in = 'auto' is computed for the energy objective, but "
      "config.objective.name = 'ce': set a number, or objective.name 'energy'"]),
    ("finetune", ["--config.objective.m_out=automatic"],
     ["config.objective.m_out must be a number or 'auto', got 'automatic'"]),
    ("pretrain", ["--config.epochs=abc"],
     ["--config.epochs=abc: invalid literal for int()"]),
    ("finetune", ["--config=experiments/configs/finetune.py:cifar1O"],
     ["unknown preset 'cifar1O'; choose one of ('cifar10', 'cifar100', 'digits', 'offline', "
      "'test', 'toy'); did you mean 'cifar10'?"]),
    ("finetune", ["--config=experiments/configs/fine_tune.py:test"],
     ["--config=experiments/configs/fine_tune.py:test: no such config file"]),
    ("evaluate", ["--checkpoint={tmp}/run", "--detectors=enrgy"],
     ["unknown detector(s) ['enrgy']; choose from ['msp', ", "did you mean 'energy'?"]),
    ("evaluate", ["--checkpoint={tmp}/run", "--ood=svhn10"],
     ["unknown OOD set 'svhn10': use one of"]),
    ("evaluate", ["--checkpoint=/nonexistent/run"],
     ["--checkpoint /nonexistent/run: no such run directory or .pt file; name a --workdir of "
      "experiments/pretrain.py or finetune.py, or a reference .pt file"]),
    ("evaluate", [], ["--checkpoint must have a value"]),
    ("evaluate", ["--checkpoint={tmp}/run", "--ood=mine=/nonexistent/ood.npy"],
     ["--ood mine = '/nonexistent/ood.npy': no such file or folder"]),
    ("pretrain", [PRE, "--config.in_train=/nonexistent"],
     ["config.in_train = '/nonexistent': no such file or folder"]),
    ("pretrain", ["--config.in_train=tfsd:cifar10"],
     ["config.in_train = 'tfsd:cifar10': no such file or folder, and 'tfsd' is no source kind; "
      "did you mean 'tfds'? (sources: ", "tfds:NAME"]),
    ("finetune", [FT, "--config.in_train={tmp}", "--config.in_test={tmp}",
                  "--config.outliers={tmp}/outliers.npy", "--config.pretrained={tmp}/nowhere"],
     ["config.pretrained = '{tmp}/nowhere': no such run directory or .pt file; set it to a "
      "--workdir of experiments/pretrain.py or a reference .pt file"]),
    ("pretrain", [PRE, "--config.in_train={tmp}", "--config.in_test={tmp}",
                  "--workdir={tmp}/afile"],
     ["--workdir {tmp}/afile is a file, not a folder"]),
    ("pretrain", ["stray"], ["unexpected arguments: ['stray']"]),
    ("finetune", ["--sweep=m_in=-23,-25", "--sweep=batch_size=64,128"],
     ["--sweep=batch_size=64,128: config.batch_size cannot differ between the members of a "
      "sweep"]),
    # The evaluation's mistakes that used to surface after the scoring, or in PyTorch's words.
    # {tmp}/run holds no checkpoint: a check made after the model load would end in the
    # loader's "holds no Orbax checkpoint" instead of the message below.
    ("evaluate", ["--checkpoint={tmp}/run_with_eval_file"],
     ["--workdir (default: the checkpoint's folder/eval) {tmp}/run_with_eval_file/eval is a "
      "file, not a folder: name another folder for the results, or move the file away"]),
    ("evaluate", ["--checkpoint={tmp}/run", "--workdir={tmp}/nowhere/eval"],
     ["--workdir {tmp}/nowhere/eval: its parent folder {tmp}/nowhere does not exist: create it "
      "(mkdir -p {tmp}/nowhere) or name another folder"]),
    ("evaluate", ["--checkpoint={tmp}/run", "--num_to_avg=1000000000"],
     ["flag --num_to_avg=1000000000: the draws averaged per OOD set must be an integer in "
      "[1, 1000] (the reference makes 10)"]),
    ("evaluate", ["--checkpoint={tmp}/run", "--ood=svhn,textures,svhn=synthetic:uniform_noise"],
     ["--ood: the OOD set name 'svhn' is given twice ('svhn' and "
      "'svhn=synthetic:uniform_noise'): give each set its own name, NAME=SOURCE"]),
    ("evaluate", ["--checkpoint={tmp}/run", "--seed=-5"],
     ["flag --seed=-5: --seed must be an integer in [0, 4294967296)"]),
    ("evaluate", ["--checkpoint={tmp}/run", "--ood=mean=synthetic:uniform_noise"],
     ["--ood: an OOD set cannot be named 'mean'"]),
    ("evaluate", ["--checkpoint={tmp}/finished_run/config.json"],
     ["--checkpoint {tmp}/finished_run/config.json is a file but no PyTorch checkpoint (torch.save "
      "writes a zip archive holding data.pkl, or a pickle): name a run folder (the --workdir of experiments/pretrain.py "
      "or finetune.py, which holds checkpoints/) or a reference .pt file; its folder is a run "
      "folder: --checkpoint={tmp}/finished_run"]),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli")
  (d / "afile").write_text("")
  (d / "run").mkdir()
  (d / "run_with_eval_file").mkdir()
  (d / "run_with_eval_file" / "eval").write_text("")
  (d / "finished_run" / "checkpoints").mkdir(parents=True)
  (d / "finished_run" / "config.json").write_text('{"epochs": 1}')
  np.save(d / "outliers.npy", np.zeros((4, 32, 32, 3), np.uint8))
  return str(d)


ENV = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def run_script(script, args):
  """``(exit status, stdout + stderr)`` of ``python experiments/SCRIPT.py ARGS``."""
  out = subprocess.run([sys.executable, f"experiments/{script}.py", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=ENV)
  return out.returncode, out.stdout + out.stderr


class ScriptServer:
  """The command lines of this module's tests, each in a fork of one process that imported JAX
  once (tests/script_server.py): what ``run_script`` gives, a few seconds faster a case."""

  def __init__(self):
    self.process = None

  def start(self):
    # A session of its own: a timeout kills the server and the child it waits for.
    self.process = subprocess.Popen([sys.executable, "tests/script_server.py"], cwd=REPO,
                                    env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, start_new_session=True)

  def run(self, script, args, timeout=120):
    if self.process is None or self.process.poll() is not None:
      self.start()                 # (again, after a case that killed it)
    self.process.stdin.write(json.dumps({"script": f"experiments/{script}.py",
                                         "args": args}) + "\n")
    self.process.stdin.flush()
    if not select.select([self.process.stdout], [], [], timeout)[0]:
      self.close(kill=True)
      raise TimeoutError(f"experiments/{script}.py {args} ran over {timeout} s")
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"the script server ended (status {self.process.wait()}) on "
                         f"experiments/{script}.py {args}; its stderr is in the test's output")
    reply = json.loads(line)
    return reply["status"], reply["stdout"] + reply["stderr"]

  def close(self, kill=False):
    if self.process is None:
      return
    if kill:
      os.killpg(self.process.pid, signal.SIGKILL)
    self.process.stdin.close()
    self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
  s = ScriptServer()
  yield s
  s.close()


@pytest.mark.parametrize("script,args,said", MISTAKES,
                         ids=[f"{s}:{' '.join(a)}" for s, a, _ in MISTAKES])
def test_a_mistake_ends_in_a_short_message_naming_it(tmp, server, script, args, said):
  status, out = server.run(script, [a.format(tmp=tmp) for a in args])
  assert_short_error(script, status, out, [text.format(tmp=tmp) for text in said])


def test_the_server_gives_what_a_new_interpreter_gives(tmp, server):
  """The forked command lines above against the same lines in new interpreters (two of them:
  an unknown config field, and a mistake found once the run's folder is checked)."""
  for script, args, _ in (MISTAKES[0], MISTAKES[-1]):
    args = [a.format(tmp=tmp) for a in args]
    assert server.run(script, args) == run_script(script, args)


def test_evaluate_results_folder_not_writable(tmp):
  folder = os.path.join(tmp, "read_only")
  os.makedirs(folder, exist_ok=True)
  os.chmod(folder, 0o555)
  if os.access(folder, os.W_OK):     # root, whom modes do not bind: a read-only file system
    folder = "/proc/sys"
    if not os.path.isdir(folder) or os.access(folder, os.W_OK):
      pytest.skip("no folder here that this user cannot write to")
  status, out = run_script("evaluate", [f"--checkpoint={tmp}/run", f"--workdir={folder}"])
  assert_short_error("evaluate", status, out, [
      f"--workdir {folder} is not writable: name a folder you can write to, or make it "
      "writable"])


def assert_short_error(script, status, out, said):
  assert status == 1, out
  assert "Traceback" not in out and "Try --helpfull" not in out, out
  lines = out.splitlines()
  assert len(lines) <= 4, out
  assert lines[0].startswith(f"{script}.py: error: "), out
  for text in said:
    assert text in out, out
