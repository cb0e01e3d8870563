"""The one cache of the gradient questions: values per owner object, weak and bounded.

Policy, for every module-level cache of :mod:`gradmagic.core.questions`
(compiled functions, declared inputs, warm compiled losses, compiled-loss
copies, layer layouts, the attribute names a model class reads):

- **Weak per owner.** Entries are filed under an owner (a model, a layer, a
  class), held by a weak reference: caching never keeps an owner alive, and an
  owner's entries go when it does.
- **Bounded per owner.** An owner keeps at most ``size`` entries; the least
  recently used one goes first. ``size=1`` is "the current value": storing
  replaces it.
- **Exact or absent.** A cache never decides freshness itself: what is stored
  says what it was made from (a :class:`~gradmagic.core.questions.cache_keys.Key`,
  a layout's attribute names), and the caller compares that before use.

The one exception is :func:`~gradmagic.core.questions.cache_keys.global_names`,
keyed by code objects, which take no weak reference: a ``functools.lru_cache``
bounded at 512 entries (code objects are small and immutable).
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any


class WeakCache:
    """Values per owner object, weakly keyed by the owner and bounded per owner (see the module docstring).

    ``cache[owner]`` and ``cache.get(owner)`` give the owner's entries as a
    read-only mapping (for inspection and tests); ``lookup``, ``store``,
    ``drop`` and ``clear`` change them.

    Args:
        size: Entries kept per owner. Defaults to 1.
    """

    def __init__(self, size: int = 1) -> None:
        if size < 1:
            raise ValueError(f"Received: size={size}. Expected at least 1.")
        self.size = size
        self._owners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def lookup(self, owner: Any, key: Hashable = None) -> Any | None:
        """The value stored for ``(owner, key)``, marked as just used; ``None`` when there is none."""
        entries = self._owners.get(owner)
        if entries is None:
            return None
        value = entries.get(key)
        if value is not None and self.size > 1:
            entries.move_to_end(key)
        return value

    def store(self, owner: Any, value: Any, key: Hashable = None) -> Any:
        """Keep ``value`` for ``(owner, key)``, dropping the owner's least recently used entry beyond ``size``.

        Returns:
            ``value``, for ``return cache.store(...)``.
        """
        entries = self._owners.get(owner)
        if entries is None:
            entries = self._owners[owner] = collections.OrderedDict()
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > self.size:
            entries.popitem(last=False)
        return value

    def drop(self, owner: Any, key: Hashable = None) -> None:
        """Forget ``(owner, key)`` (nothing happens if it is not stored)."""
        entries = self._owners.get(owner)
        if entries is not None:
            entries.pop(key, None)

    def keyed(self, owner: Any, key: Any, build: Callable[[], Any]) -> Any:
        """The value stored under a question's cache ``key``, built on first use.

        ``key`` is a :class:`~gradmagic.core.questions.cache_keys.Key`: a stored
        value is reused only while every object the key holds by identity is
        still alive; ``key=None`` (a question that cannot be keyed safely) builds
        a fresh value every time and stores nothing.
        """
        if key is None:
            return build()
        entry = self.lookup(owner, key.token)
        if entry is None or not entry[1].alive():
            entry = self.store(owner, (build(), key.stored()), key.token)
        return entry[0]

    def forget(self, owner: Any, key: Any) -> None:
        """Drop the value stored under a question's cache ``key`` (``None``: nothing stored, nothing to drop)."""
        if key is not None:
            self.drop(owner, key.token)

    def clear(self, owner: Any = None) -> None:
        """Forget every entry of ``owner``, or of every owner when ``owner`` is ``None``."""
        if owner is None:
            self._owners.clear()
        else:
            self._owners.pop(owner, None)

    def get(self, owner: Any, default: Any = None) -> Mapping[Hashable, Any] | Any:
        """The owner's entries (``key -> value``, least recently used first), or ``default``."""
        entries = self._owners.get(owner)
        return default if entries is None else _ReadOnly(entries)

    def __getitem__(self, owner: Any) -> Mapping[Hashable, Any]:
        return _ReadOnly(self._owners[owner])

    def __contains__(self, owner: Any) -> bool:
        return owner in self._owners


class _ReadOnly(Mapping):
    """A read-only view of one owner's entries."""

    def __init__(self, entries: Mapping) -> None:
        self._entries = entries

    def __getitem__(self, key: Hashable) -> Any:
        return self._entries[key]

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
