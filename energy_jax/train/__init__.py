"""Training: the optimiser and its schedule (:mod:`~energy_jax.train.optim`), the objectives by
name (:mod:`~energy_jax.train.objectives`), the state (:mod:`~energy_jax.train.state`), the step
and its compiled epoch (:mod:`~energy_jax.train.step`), the run (:mod:`~energy_jax.train.loop`)
and its log (:mod:`~energy_jax.train.writer`)."""

from energy_jax.train import objectives
from energy_jax.train.loop import train_and_evaluate
from energy_jax.train.optim import Optimizer, cosine_schedule, make_optimizer
from energy_jax.train.state import (TrainState, create_train_state, frozen,
                                    lower_create_train_state)
from energy_jax.train.step import device_epoch_fn, host_step_fn, train_step

__all__ = ["objectives", "train_and_evaluate", "Optimizer", "cosine_schedule", "make_optimizer",
           "TrainState", "create_train_state", "frozen", "lower_create_train_state",
           "device_epoch_fn", "host_step_fn",
           "train_step"]
