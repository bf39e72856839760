"""Training: the state, which carries its optimiser (:mod:`~energy_jax.train.state`), the step
and its compiled epoch (:mod:`~energy_jax.train.step`), the programs a run compiles ahead
(:mod:`~energy_jax.train.programs`), the run (:mod:`~energy_jax.train.loop`)
and its log (:mod:`~energy_jax.train.writer`). The objectives and optimisers it trains with are
chosen by name: :mod:`energy_jax.objectives`, :mod:`energy_jax.optimizers`."""

from energy_jax.train.loop import train_and_evaluate
from energy_jax.train.programs import (RunPrograms, compile_evaluation, compile_run,
                                       lower_epoch)
from energy_jax.train.state import (TrainState, create_train_state, hashable_config,
                                    lower_create_train_state)
from energy_jax.train.step import device_epoch_fn, host_step_fn, train_step

__all__ = ["train_and_evaluate", "RunPrograms", "compile_evaluation", "compile_run",
           "lower_epoch", "TrainState", "create_train_state", "hashable_config",
           "lower_create_train_state", "device_epoch_fn", "host_step_fn", "train_step"]
