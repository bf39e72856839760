"""Name -> part registries: how models, data sources, objectives, optimisers and detectors are
chosen by name from a config (``models.get(config.model.name)``), and how a user adds one without
editing the library (``@models.register("resnet18")`` in their own file)."""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, Tuple, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """An ordered ``name -> entry`` table of one kind of part (``kind`` names it in errors)."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: Dict[str, T] = {}

  def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
    """Decorator: ``@registry.register("name")`` adds the decorated object under ``name``.

    A second registration of a name is refused (two parts would silently shadow each other)
    unless ``replace=True``.
    """
    if not isinstance(name, str) or not name:
      raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

    def add(entry: T) -> T:
      if name in self._entries and not replace and self._entries[name] is not entry:
        raise ValueError(f"{self.kind} {name!r} is registered already; pass replace=True to "
                         "override it")
      self._entries[name] = entry
      return entry
    return add

  def get(self, name: str) -> T:
    """The entry registered as ``name``; the error lists the known names."""
    try:
      return self._entries[name]
    except (KeyError, TypeError):
      raise ValueError(f"unknown {self.kind} {name!r}; registered: "
                       f"{', '.join(self._entries) or 'none'}") from None

  def unregister(self, name: str) -> None:
    """Removes ``name`` (for tests that register a temporary part)."""
    self._entries.pop(name, None)

  def names(self) -> Tuple[str, ...]:
    """Registered names, in registration order."""
    return tuple(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)
