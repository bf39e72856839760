"""The model interface and the model registry.

A model is a ``flax.linen.Module`` built by a registered factory
``build(*, num_classes, dtype, axis_name, **spec)`` (``spec``: the model's own fields of
``config.model``, e.g. ``depth`` and ``widen_factor`` of the WRN). Its contract:

* ``model.apply(variables, images, train=...)`` with ``images`` normalised NHWC floats
  ``[N, H, W, 3]`` of any size the architecture accepts; ``variables`` is
  ``{'params', 'batch_stats'}`` (``batch_stats`` may be empty); with ``train=True`` a dropout rng
  (``rngs={'dropout': key}``) and ``mutable=['batch_stats']``. Training passes ``mask=[N] bool``
  when a batch holds padding (the last partial batch of an epoch): batch statistics must then
  cover the True examples only (a model without batch statistics ignores it); and
  ``example_ids=[N] int``, the examples' positions in the global batch: randomness inside the
  model (dropout) is drawn per example from the dropout rng and its id, so that a run's
  numbers do not depend on how the batch is split over devices and processes.
* It returns a :class:`ModelOutput`: float32 ``logits [N, C]``, the penultimate ``features
  [N, D]`` the classifier head reads, and ``blocks``: the spatial means of each stage's output,
  shallow to deep (the last is ``features``), which multi-layer detectors fit on.
* BatchNorm statistics are synchronised over the mapped axis ``axis_name`` when one is given
  (data-parallel training computes what one device would on the global batch).
* The classifier head is a ``Dense`` layer whose parameters sit at ``params[entry.head]``:
  ``logits = features @ W + b`` with ``(W, b) = head(params)``, which post-hoc detectors (ReAct,
  DICE, ViM, GradNorm, ...) need.

A new architecture is one file: a module honouring this contract plus ``@register("name",
shape_fields=...)`` on its factory (its keyword defaults are the fields' defaults; ``meanings``
and ``checks`` give their ``--help`` lines and checks, else they are checked by the defaults'
types), imported by the caller (or listed in
``energy_jax/models/__init__.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from energy_jax.fields import Check, Field, typed_like
from energy_jax.registry import Registry

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ModelOutput(NamedTuple):
  """What every model returns: ``logits [N, C]``, ``features [N, D]`` and per-stage ``blocks``."""
  logits: Array
  features: Array
  blocks: Tuple[Array, ...]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """A registered architecture.

  Attributes:
    build: ``build(*, num_classes, dtype, axis_name, **spec) -> nn.Module``.
    shape_fields: the spec fields that fix the variables' shapes (a checkpoint must match them).
    head: the name of the classifier ``Dense`` in ``params``.
    from_torch: optional ``from_torch(state_dict, model) -> variables`` for ``.pt`` files.
    meanings: the ``--help`` line of each field.
    checks: the check of each field (:mod:`energy_jax.fields`; else by its default's type).
  """
  build: Callable[..., Any]
  shape_fields: Tuple[str, ...]
  head: str = "fc"
  from_torch: Optional[Callable[[Any, Any], Dict[str, Any]]] = None
  meanings: Tuple[Tuple[str, str], ...] = ()
  checks: Tuple[Tuple[str, Check], ...] = ()


MODELS: Registry[ModelEntry] = Registry("model")


def register(name: str, *, shape_fields: Sequence[str], head: str = "fc",
             from_torch: Optional[Callable] = None, meanings: Optional[Dict[str, str]] = None,
             checks: Optional[Dict[str, Check]] = None, replace: bool = False):
  """Decorator registering a model factory under ``name`` (see the module docstring)."""
  def add(build):
    MODELS.register(name, replace=replace)(ModelEntry(
        build, tuple(shape_fields), head, from_torch, tuple((meanings or {}).items()),
        tuple((checks or {}).items())))
    return build
  return add


def get(name: str) -> ModelEntry:
  """The registered model ``name``."""
  return MODELS.get(name)


def names() -> Tuple[str, ...]:
  """The registered model names."""
  return MODELS.names()


# Arguments every factory takes from the run rather than from ``config.model``.
_RUN_ARGS = ("num_classes", "dtype", "axis_name")


def spec_fields(name: str) -> Dict[str, Any]:
  """The fields of model ``name`` in ``config.model`` with their defaults (the factory's keyword
  arguments, other than what the run passes)."""
  params = inspect.signature(get(name).build).parameters
  return {k: p.default for k, p in params.items()
          if k not in _RUN_ARGS and p.default is not inspect.Parameter.empty}


def fields(name: str) -> Tuple[Field, ...]:
  """The fields of model ``name`` in ``config.model``: defaults, ``--help`` lines and checks."""
  entry = get(name)
  meanings, checks = dict(entry.meanings), dict(entry.checks)
  return tuple(Field(k, default, meanings.get(k, f"{name} field"),
                     checks.get(k, typed_like(default)))
               for k, default in spec_fields(name).items())


def default_spec(name: str, dtype: str = "float32", **fields):
  """A ``config.model`` for model ``name``: its fields at their defaults, ``fields`` changed;
  e.g. ``config.model = models.default_spec("resnet18")``."""
  import ml_collections
  known = spec_fields(name)
  unknown = set(fields) - set(known)
  if unknown:
    raise ValueError(f"model {name!r} has no field(s) {sorted(unknown)}; it has {sorted(known)}")
  return ml_collections.ConfigDict({"name": name, "dtype": dtype, **known, **fields})


def spec_of(config) -> Dict[str, Any]:
  """``config.model`` as a plain dict without ``name`` and ``dtype``: the factory's fields,
  checked against it."""
  spec = dict(config.model.to_dict() if hasattr(config.model, "to_dict") else config.model)
  name = spec.pop("name", None)
  spec.pop("dtype", None)
  known = spec_fields(name)
  unknown = sorted(set(spec) - set(known))
  if unknown:
    raise ValueError(f"config.model.{unknown[0]} is not a field of model {name!r} (its fields: "
                     f"{sorted(known)}); set config.model = energy_jax.models.default_spec"
                     f"({name!r}) in the config")
  return spec


def from_config(config, axis_name: Optional[str] = None):
  """The model ``config.model`` names (``name``, ``dtype`` and the architecture's own fields),
  with ``config.num_classes`` logits."""
  dtype = config.model.dtype
  if dtype not in DTYPES:
    raise ValueError(f"config.model.dtype = {dtype!r}; choose one of {sorted(DTYPES)}")
  entry = get(config.model.name)
  return entry.build(num_classes=int(config.num_classes), dtype=DTYPES[dtype],
                     axis_name=axis_name, **spec_of(config))


def architecture(config) -> Dict[str, Any]:
  """What a checkpoint must match to be loaded into ``config``'s model: its name, the fields that
  fix its shapes, the class count and the input size."""
  entry = get(config.model.name)
  spec = spec_of(config)
  return {"name": config.model.name, **{k: spec.get(k) for k in entry.shape_fields},
          "num_classes": int(config.num_classes), "image_size": int(config.image_size)}


def check_architecture(found: Dict[str, Any], config, source: str) -> None:
  """Raises naming each field where the checkpoint at ``source`` differs from ``config``."""
  want = architecture(config)
  diff = {k: (found.get(k), v) for k, v in want.items() if found.get(k) != v}
  if diff:
    detail = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
    raise ValueError(f"checkpoint {source} does not match the configured model ({detail})")


def head(config_or_name, params) -> Tuple[Array, Array]:
  """The classifier head ``(W [D, C], b [C])``: ``logits = features @ W + b``."""
  name = config_or_name if isinstance(config_or_name, str) else config_or_name.model.name
  dense = params[get(name).head]
  return dense["kernel"], dense["bias"]


def count_params(params) -> int:
  """Number of scalars in a parameter tree (BatchNorm running statistics excluded)."""
  return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))


def init_variables(model, rng: Array, image_shape: Sequence[int] = (32, 32, 3)):
  """``{'params', 'batch_stats'}`` of ``model`` for images of ``image_shape``.

  A jitted ``lazy_init``: only the initialisers run, in one compiled program (an eager
  ``model.init`` compiles every operation of a forward pass on its own), compiled with
  :func:`init_compiler_options`. Inside a traced function (``jax.jit``, ``jax.eval_shape``):
  :func:`lazy_init_variables`.
  """
  return jit_for_init(lazy_init_variables, static_argnums=(0, 2))(model, rng,
                                                                  tuple(image_shape))


def lazy_init_variables(model, rng: Array, image_shape: Tuple[int, ...]):
  """What :func:`init_variables` computes, uncompiled: for use inside another program that
  initialises (one compiled with :func:`jit_for_init`; a nested ``jax.jit`` cannot take compiler
  options)."""
  dummy = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = model.lazy_init({"params": rng}, dummy, train=False)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def init_compiler_options() -> Optional[Dict[str, Any]]:
  """XLA options for programs that initialise parameters: on XLA:CPU, LLVM's ``-O1``.

  At the default ``-O2`` most of such a program's compile time goes to the initialisers' random
  numbers (threefry), up to a second per parameter tensor: a WRN-40-2's training state compiled
  in 11.2 s, at ``-O1`` in 5.2 s, to the same values (docs/performance.md). The program runs
  once per run, so its speed does not matter. Other backends: their defaults."""
  return {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else None


@functools.lru_cache(maxsize=None)
def _jit_for_init(fn: Callable, static_argnums: Tuple[int, ...]) -> Callable:
  return jax.jit(fn, static_argnums=static_argnums, compiler_options=init_compiler_options())


def jit_for_init(fn: Callable, static_argnums: Tuple[int, ...] = ()) -> Callable:
  """``jax.jit(fn, static_argnums)`` compiled with :func:`init_compiler_options` (one jitted
  function per ``fn``, so that its compiled programs are kept)."""
  return _jit_for_init(fn, tuple(static_argnums))


@functools.lru_cache(maxsize=None)
def inference_fn(model) -> Callable[[Any, Array], ModelOutput]:
  """``fn(variables, images) -> ModelOutput`` of ``model`` in inference mode: one function object
  per model, so that jitted code taking it as a static argument compiles once."""
  def fn(variables, images):
    return model.apply(variables, images, train=False)
  return fn
