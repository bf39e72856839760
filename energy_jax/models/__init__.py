"""Models behind one interface (:mod:`energy_jax.models.base`), chosen by ``config.model.name``.

``models.from_config(config)`` builds the configured model; ``models.register`` adds one.
Registered here: ``"wrn"`` (:mod:`energy_jax.models.wrn`, the reference's WideResNet).
"""

from energy_jax.models.base import (DTYPES, MODELS, ModelEntry, ModelOutput, architecture,
                                    check_architecture, count_params, default_spec, fields,
                                    from_config, get, head, inference_fn, init_compiler_options,
                                    init_variables, jit_for_init, lazy_init_variables, names,
                                    register, spec_fields, spec_of)
from energy_jax.models import wrn  # noqa: F401  registers "wrn"
from energy_jax.models.wrn import BatchNorm, WideResNet

__all__ = ["DTYPES", "MODELS", "ModelEntry", "ModelOutput", "architecture", "check_architecture",
           "count_params", "default_spec", "fields", "from_config", "get", "head", "inference_fn",
           "init_compiler_options", "init_variables", "jit_for_init", "lazy_init_variables",
           "names", "register", "spec_fields", "spec_of", "BatchNorm", "WideResNet"]
